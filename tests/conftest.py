"""Shared fixtures: tiny random models (Llama, Qwen2, Qwen3, Gemma 3) with the project's real tokenizer,
the Llama one exported to GGUF, PEFT adapters for it and broken copies of it, and an isolated home."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
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


def _tiny_config(family: str, tokenizer):
    """The config of a tiny 2-layer model of ``family``: width 64, 4 query heads over 2 key/value heads."""
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config, Qwen3Config

    shared = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if family == "llama":
        return LlamaConfig(**shared, rope_theta=10000.0, tie_word_embeddings=False)
    if family == "qwen2":  # q/k/v biases; tied embeddings like Qwen2.5's small models
        return Qwen2Config(**shared, rope_theta=1000000.0, tie_word_embeddings=True)
    if family == "qwen3":  # q/k norms; heads wider than hidden/heads, as in Qwen3
        return Qwen3Config(**shared, head_dim=32, rope_theta=1000000.0, tie_word_embeddings=False)
    if family == "gemma3":  # one sliding layer with a window shorter than the test prompts, one global layer;
        # width 96, whose embedding scale sqrt(96) is no bfloat16 number, as at Gemma 3's real widths
        return Gemma3TextConfig(
            **{**shared, "hidden_size": 96},
            head_dim=32,
            query_pre_attn_scalar=32,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            },
            tie_word_embeddings=True,
        )
    raise ValueError(f"no tiny {family} model")


def build_tiny_model(directory: Path, family: str = "llama", seed: int = 0) -> Path:
    """A random 2-layer model of ``family`` (grouped-query attention) with the real nano tokenizer, in fp32.

    Beyond Llama (whose weights other tests' expectations rest on), norm weights and biases are
    random too: at their initial ones and zeros a bias or norm written wrongly would go unnoticed.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from assistant.nano.tokenizer import save, train_tokenizer

    tokenizer = train_tokenizer(TINY_CORPUS * 20, vocab_size=400)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_tiny_config(family, tokenizer))
    with torch.no_grad():  # larger weights than the default init, so greedy choices are not near-ties
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.08)
            elif family != "llama":
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(str(directory), safe_serialization=True)
    save(tokenizer, directory)
    return directory


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Callable[[str], Path]:
    """The tiny model folder of a family ("llama", "qwen2", "qwen3", "gemma3"), built on first use."""
    built: dict[str, Path] = {}

    def folder(family: str) -> Path:
        if family not in built:
            built[family] = build_tiny_model(tmp_path_factory.mktemp(f"tiny-{family}"), family)
        return built[family]

    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_models) -> Path:
    return tiny_models("llama")


@pytest.fixture(scope="module")
def tiny_adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Two PEFT LoRAs with random, non-zero B for the tiny Llama, and one made for a model of another width."""
    from helpers import make_peft_lora
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    other = LlamaForCausalLM(
        LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)
    )
    other.save_pretrained(str(root / "other-base"))
    return {
        "first": make_peft_lora(tiny_model_dir, root / "first", seed=1),
        "second": make_peft_lora(tiny_model_dir, root / "second", seed=2),
        "other_model": make_peft_lora(root / "other-base", root / "other-model", seed=3),
    }


@pytest.fixture
def truncated_model_dir(tiny_model_dir, tmp_path) -> Path:
    """A copy of the tiny model whose weights file stops halfway, like an interrupted download."""
    broken = shutil.copytree(tiny_model_dir, tmp_path / "broken-model")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return broken


@pytest.fixture
def templateless_model_dir(tiny_model_dir, tmp_path) -> Path:
    """A copy of the tiny model whose tokenizer has no chat template."""
    bare = shutil.copytree(tiny_model_dir, tmp_path / "no-template")
    config_path = bare / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    del config["chat_template"]
    config_path.write_text(json.dumps(config))
    return bare


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir, tmp_path_factory) -> Path:
    from backends.gguf_export import export_model

    return export_model(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


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


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    """The torch chat engine on the tiny Llama: the reference the block trainers are checked against."""
    from backends.torch_backend import TorchBackend

    return TorchBackend(tiny_model_dir, device="cpu")


@pytest.fixture
def backend(engine):
    """The chat engine as reference, bare again after each test."""
    yield engine
    engine.set_adapters([])


@pytest.fixture(scope="module")
def frozen(tiny_adapters):
    """Two older nights: random, non-zero PEFT blocks."""
    from backends.base import Adapter

    return [Adapter(tiny_adapters["first"], 1.0), Adapter(tiny_adapters["second"], 1.0)]
