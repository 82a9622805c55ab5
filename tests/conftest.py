"""Shared test fixtures (the offline / CPU environment is set in the root ``conftest.py``)."""

import pytest


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
