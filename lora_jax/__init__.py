"""lora_jax: functional LoRA fine-tuning of Flax encoders."""
