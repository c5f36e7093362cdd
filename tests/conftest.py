"""Shared fixtures: a tiny random Llama with the project's real tokenizer, and an isolated home."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TINY_CORPUS = [
    "Hello! How can I help you today?",
    "My sister is called Alice and she lives in Porto.",
    "John travelled to the hallway. Mary journeyed to the bathroom. Where is John?",
    "Daniel went back to the kitchen. Sandra moved to the garden. Where is Sandra?",
    "Thanks a lot, that was helpful. What can you do?",
    "My dog Rex likes the park. I work as a nurse in Lisbon.",
]


def build_tiny_llama(directory: Path, seed: int = 0) -> Path:
    """A random 2-layer Llama (grouped-query attention) with the real nano tokenizer, saved in fp32."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from assistant.nano.tokenizer import save, train_tokenizer

    tokenizer = train_tokenizer(TINY_CORPUS * 20, vocab_size=400)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights than the default init, so greedy choices are not near-ties
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.08)
    model.save_pretrained(str(directory), safe_serialization=True)
    save(tokenizer, directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def somnus_home(tmp_path, monkeypatch) -> Path:
    """A fresh data folder for one test, through the documented override."""
    home = tmp_path / "somnus-home"
    monkeypatch.setenv("SOMNUS_HOME", str(home))
    return home


@pytest.fixture(autouse=True, scope="session")
def _offline():
    """Tests never touch the network: the hub is off, as on a user's machine without a download."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    yield
