"""Shared pytest setup: every test runs offline and on CPU."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_encoder_config():
    """A 2-layer, hidden-16 RoBERTa config with random weights (no tokenizer needed)."""
    from lora_jax.models import EncoderConfig

    return EncoderConfig(
        model_type="roberta",
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=40,
        type_vocab_size=1,
        pad_token_id=1,
    )
