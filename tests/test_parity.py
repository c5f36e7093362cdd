"""Every installed engine computes the same thing from the same weights and the same LoRA.

Opened through ``backends.select.open_backend`` as the app opens them: torch and mlx on the Hugging
Face folder, llama.cpp on its GGUF export. Greedy decoding must give the same text token for token;
log-probabilities must agree within LOGPROB_TOLERANCE (measured on the tiny model: at most ~1e-6
between torch, f32 llama.cpp and mlx on the CPU, with and without adapters).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_gguf_export import make_peft_lora

from backends.base import Adapter, Sampling
from backends.gguf_export import export_model
from backends.select import ENGINES, is_installed, open_backend

pytestmark = pytest.mark.slow  # loads every engine and a few PEFT models: ~30 s in all

LOGPROB_TOLERANCE = 1e-4
GREEDY_TOKENS = 20
CONVERSATIONS = [
    [{"role": "user", "content": "Hello! How can I help you today?"}],
    [{"role": "user", "content": "John travelled to the hallway. Where is John?"}],
    [
        {"role": "user", "content": "My dog Rex likes the park."},
        {"role": "assistant", "content": "That is nice."},
        {"role": "user", "content": "Where does Rex like to go?"},
    ],
]
COMPLETION = "Rex likes the park. I work as a nurse in Lisbon."


@pytest.fixture(scope="module")
def engines(tiny_model_dir, tmp_path_factory):
    gguf_path = export_model(tiny_model_dir, tmp_path_factory.mktemp("parity") / "tiny.gguf")
    opened = {}
    for engine in (name for name in ENGINES if is_installed(name)):
        if engine == "llamacpp":
            opened[engine] = open_backend(engine, gguf_path=gguf_path)
        else:
            opened[engine] = open_backend(engine, hf_dir=tiny_model_dir)
    if len(opened) < 2:
        pytest.skip(f"parity needs two engines, only {', '.join(opened)} installed")
    yield opened
    for backend in opened.values():
        backend.close()


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> dict[str, list[Adapter]]:
    folder = tmp_path_factory.mktemp("parity-adapters")
    first = make_peft_lora(tiny_model_dir, folder / "first", seed=11)
    second = make_peft_lora(tiny_model_dir, folder / "second", seed=12, r=8, lora_alpha=16)
    return {
        "bare": [],
        "one LoRA": [Adapter(first)],
        "two scaled LoRAs": [Adapter(first, 0.6), Adapter(second, 1.4)],
    }


@pytest.mark.parametrize("stack", ["bare", "one LoRA", "two scaled LoRAs"])
def test_engines_agree_on_greedy_text_and_logprobs(engines, adapters, stack):
    results = {}
    for name, backend in engines.items():
        backend.set_adapters(adapters[stack])
        prompts = [backend.render_chat(conversation) for conversation in CONVERSATIONS]
        results[name] = {
            "prompts": prompts,
            "greedy": ["".join(backend.stream(p, Sampling(max_tokens=GREEDY_TOKENS))) for p in prompts],
            "logprobs": np.array([backend.token_logprobs(p, COMPLETION) for p in prompts]),
        }
    reference_name, reference = next(iter(results.items()))
    assert all(text for text in reference["greedy"])
    for name, result in results.items():
        assert result["prompts"] == reference["prompts"], name
        assert result["greedy"] == reference["greedy"], f"{name} vs {reference_name}"
        difference = np.abs(result["logprobs"] - reference["logprobs"]).max()
        assert difference < LOGPROB_TOLERANCE, f"{name} vs {reference_name}: {difference:.2e}"


def test_adapters_change_the_outputs(engines, adapters):
    """Guards the parity test against passing vacuously with adapters that do nothing."""
    backend = next(iter(engines.values()))
    prompt = backend.render_chat(CONVERSATIONS[0])
    backend.set_adapters([])
    bare = np.array(backend.token_logprobs(prompt, COMPLETION))
    backend.set_adapters(adapters["one LoRA"])
    adapted = np.array(backend.token_logprobs(prompt, COMPLETION))
    backend.set_adapters([])
    assert np.abs(adapted - bare).max() > 0.05
