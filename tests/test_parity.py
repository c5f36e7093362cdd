"""Every installed engine computes the same thing from the same weights and the same LoRA, per family.

Opened through ``backends.select.open_backend`` as the app opens them: torch and mlx on the Hugging
Face folder, llama.cpp on its GGUF export, for a tiny model of each family (Llama, Qwen2, Qwen3,
Gemma 3). Greedy decoding must give the same text token for token; log-probabilities must agree
within ``tolerance(family, engine)``: LOGPROB_TOLERANCE (measured on the tiny models: at most ~2e-6
between torch, f32 llama.cpp and mlx on the CPU, with and without adapters), except Gemma 3 on
llama.cpp, whose own measured bound is GEMMA3_LLAMACPP_TOLERANCE.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import make_peft_lora

from backends.base import Adapter, Sampling
from backends.gguf_export import export_model
from backends.select import ENGINES, is_installed, open_backend

pytestmark = pytest.mark.slow  # loads every engine on four tiny models and a few PEFT models

FAMILIES = ["llama", "qwen2", "qwen3", "gemma3"]
LOGPROB_TOLERANCE = 1e-4
# llama.cpp's CPU GELU reads an fp16 lookup table (GGML_GELU_FP16), so Gemma 3's log-probs there stray
# from torch's by up to 5.7e-4 on the tiny model, with or without LoRAs (greedy text still identical).
GEMMA3_LLAMACPP_TOLERANCE = 1e-3
PERTURBATION = 0.2  # added to one norm weight: moves log-probs by 1.6e-2 to 5.1e-2 on the tiny models
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
STACKS = ["bare", "one LoRA", "two scaled LoRAs"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model_dir(family, tiny_models) -> Path:
    return tiny_models(family)


def tolerance(family: str, engine: str) -> float:
    return GEMMA3_LLAMACPP_TOLERANCE if (family, engine) == ("gemma3", "llamacpp") else LOGPROB_TOLERANCE


def open_engine(engine: str, family: str, hf_dir: Path, folder: Path):
    """``engine`` on ``hf_dir`` as the app opens it (llama.cpp through a fresh GGUF export in ``folder``)."""
    if engine == "llamacpp":
        return open_backend(engine, gguf_path=export_model(hf_dir, folder / f"{family}.gguf"))
    return open_backend(engine, hf_dir=hf_dir)


@pytest.fixture(scope="module")
def engines(family, model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"parity-{family}")
    names = [name for name in ENGINES if is_installed(name)]
    if len(names) < 2:
        pytest.skip(f"parity needs two engines, only {', '.join(names)} installed for {family}")
    opened = {name: open_engine(name, family, model_dir, folder) for name in names}
    yield opened
    for backend in opened.values():
        backend.close()


@pytest.fixture(scope="module")
def adapters(family, model_dir, tmp_path_factory) -> dict[str, list[Adapter]]:
    folder = tmp_path_factory.mktemp(f"parity-adapters-{family}")
    first = make_peft_lora(model_dir, folder / "first", seed=11)
    second = make_peft_lora(model_dir, folder / "second", seed=12, r=8, lora_alpha=16)
    return {
        "bare": [],
        "one LoRA": [Adapter(first)],
        "two scaled LoRAs": [Adapter(first, 0.6), Adapter(second, 1.4)],
    }


def outputs(backend, greedy: bool = True) -> dict:
    """What the engine makes of the test conversations: its prompts, greedy replies and log-probs."""
    prompts = [backend.render_chat(conversation) for conversation in CONVERSATIONS]
    return {
        "prompts": prompts,
        "greedy": ["".join(backend.stream(p, Sampling(max_tokens=GREEDY_TOKENS))) for p in prompts] if greedy else None,
        "logprobs": np.array([backend.token_logprobs(p, COMPLETION) for p in prompts]),
    }


def disagreements(result: dict, reference: dict, limit: float) -> list[str]:
    """How ``result`` departs from ``reference``: different prompts or greedy text, or log-probs ``limit`` apart."""
    found = []
    if result["prompts"] != reference["prompts"]:
        found.append("prompts differ")
    if result["greedy"] is not None and result["greedy"] != reference["greedy"]:
        found.append("greedy text differs")
    difference = np.abs(result["logprobs"] - reference["logprobs"]).max()
    if not difference < limit:
        found.append(f"log-probs differ by {difference:.2e}")
    return found


@pytest.mark.parametrize("stack", STACKS)
def test_engines_agree_on_greedy_text_and_logprobs(family, engines, adapters, stack):
    results = {}
    for name, backend in engines.items():
        backend.set_adapters(adapters[stack])
        results[name] = outputs(backend)
    reference_name, reference = next(iter(results.items()))
    assert all(text for text in reference["greedy"])
    for name, result in results.items():
        assert not disagreements(result, reference, tolerance(family, name)), f"{name} vs {reference_name}"


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


def test_a_slightly_changed_weight_breaks_parity(family, engines, model_dir, tmp_path):
    """Guards the comparison itself: every engine but the reference, given one norm weight moved by
    PERTURBATION, must disagree by ten times its tolerance, so the tolerance cannot hide such a change."""
    from safetensors.torch import load_file, save_file

    changed = tmp_path / "changed"
    shutil.copytree(model_dir, changed)
    weights = load_file(changed / "model.safetensors")
    weights["model.layers.1.post_attention_layernorm.weight"][0] += PERTURBATION
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    reference_name, reference = next(iter(engines.items()))
    for backend in engines.values():
        backend.set_adapters([])
    expected = outputs(reference, greedy=False)
    for name in list(engines)[1:]:
        backend = open_engine(name, family, changed, tmp_path)
        try:
            found = disagreements(outputs(backend, greedy=False), expected, 10 * tolerance(family, name))
        finally:
            backend.close()
        assert any(line.startswith("log-probs differ") for line in found), f"{name} vs {reference_name}"
