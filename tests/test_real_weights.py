"""Real pretrained weights along the product's own path: GGUF import, torch, llama.cpp, a LoRA step.

The tiny random models of test_parity pin every engine to ~1e-6 but have a made-up tokenizer and two
layers. Three real GGUFs (SmolLM2-135M-Instruct, Qwen2.5-Coder-0.5B-Instruct and the Gemma 3 270M
base model) check the rest: ``somnus model import``'s ``import_gguf``, real tokenizers and chat
templates, 18-30 layers, and llama.cpp serving the f16 export of the imported folder, as the product
serves it, against torch in fp32 on the same folder. ``../shared/tools/fetch-weights NAME DIR`` puts
them in ``$SOMNUS_TEST_WEIGHTS`` (default ~/.cache/somnus-test-weights); a missing file skips its tests.

f16 weights and llama.cpp's f16 KV cache move log-probs by 4e-3 to 1.4e-2 against fp32 torch (the f32
export of SmolLM2 differs by 2.2e-5, so the export itself is exact), hence LLAMACPP_TOLERANCE per
model, measured here on the fixed prompts below with and without a trained block.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from backends import ops
from backends.base import Adapter, BackendError, LoraSpec, Sampling
from backends.gguf_export import export_model
from backends.gguf_import import import_gguf
from backends.select import is_installed, open_backend, open_trainer

pytestmark = pytest.mark.slow  # imports three real models: 4.4 minutes on one core, 3 of them importing

WEIGHTS = Path(os.environ.get("SOMNUS_TEST_WEIGHTS") or "~/.cache/somnus-test-weights").expanduser()
CHAT_MODELS = ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"]
BASE_MODEL = "gemma3-270m"  # pretrained only: no chat template
# Max |log-prob difference| of llama.cpp on the f16 export against fp32 torch, about twice the measured
# 1.4e-2, 7.7e-3 and 9.0e-3 (bare; 5.1e-3, 5.7e-3 and 4.4e-3 with the trained block).
LLAMACPP_TOLERANCE = {"smollm2-135m-instruct": 3e-2, "qwen2.5-coder-0.5b-instruct": 2e-2, "gemma3-270m": 2e-2}
MLX_TOLERANCE = 1e-3  # mlx and torch both in fp32 over 18-30 layers: measured 2.2e-4 (SmolLM2), 4.0e-4 (Gemma 3)
MLX_MODELS = ["smollm2-135m-instruct", "gemma3-270m"]  # mlx runs ~28x slower here: the 0.5B is left out
GREEDY_TOKENS = 8
AGREED_TOKENS = 4  # f16 rounding may flip a later near-tie, not the first tokens
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "My sister is called Zara and she lives in Lisbon. Where does my sister live?"}],
]
PLAIN_PROMPTS = ["<bos>The capital of France is", "<bos>My sister is called Zara and she lives in"]
COMPLETION = " Paris. My sister Zara lives in Lisbon, Portugal."
TOKENIZER_TEXTS = ["  two  spaces\tand a tab\n\n\nlines", "Émilie's café: 3.50€ — naïve 日本語 🙂", "def f(x):\n    return x**2"]
PERTURBED_TENSOR = "blk.1.ffn_norm.weight"  # its first weight moves by PERTURBATION in the perturbed GGUF
PERTURBATION = 0.25  # SmolLM2's 0.067 becomes 0.317: log-probs move by 0.51, 17 times the tolerance


@dataclass
class RealModel:
    """One imported model, open on torch (the reference) and on llama.cpp (its f16 export)."""

    name: str
    folder: Path
    gguf: Path
    torch: object
    llamacpp: object
    prompts: list[str]


@pytest.fixture(scope="session")
def imported(tmp_path_factory):
    """The Hugging Face folder and f16 GGUF export of a real model, imported once per test run."""
    done: dict[str, tuple[Path, Path]] = {}

    def folder_and_gguf(name: str) -> tuple[Path, Path]:
        if name not in done:
            source = WEIGHTS / f"{name}.gguf"
            if not source.is_file():
                pytest.skip(f"{source} is missing: fetch it with ../shared/tools/fetch-weights {name} {WEIGHTS}")
            root = tmp_path_factory.mktemp(name)
            folder = import_gguf(source, root / "model")
            done[name] = folder, export_model(folder, root / "model-f16.gguf", dtype="f16")
        return done[name]

    return folder_and_gguf


@pytest.fixture(scope="module", params=[*CHAT_MODELS, BASE_MODEL])
def model(request, imported):
    folder, gguf = imported(request.param)
    torch_engine = open_backend("torch", hf_dir=folder)
    llamacpp = open_backend("llamacpp", gguf_path=gguf)
    if request.param == BASE_MODEL:
        prompts = PLAIN_PROMPTS
    else:
        prompts = [torch_engine.render_chat(conversation) for conversation in CONVERSATIONS]
    yield RealModel(request.param, folder, gguf, torch_engine, llamacpp, prompts)
    torch_engine.close()
    llamacpp.close()


@pytest.fixture(scope="module")
def block(model, tmp_path_factory) -> Path:
    """A LoRA block after one training step on the torch trainer, saved as the sleep saves it."""
    trainer = open_trainer("torch", model.folder, spec=LoraSpec(rank=8, alpha=16), lr=1e-3, seed=0)
    try:
        prefixes = [trainer.encode(prompt) for prompt in model.prompts]
        trainer.train_step(prefixes, [trainer.encode(COMPLETION)] * len(prefixes), cross_entropy)
        path = tmp_path_factory.mktemp(f"{model.name}-block") / "block"
        trainer.save_new_block(path)
    finally:
        trainer.close()
    return path


@pytest.fixture
def engines(model):
    """The model's engines, bare again after each test."""
    yield model
    model.torch.set_adapters([])
    model.llamacpp.set_adapters([])


def cross_entropy(logits, targets, mask):
    logprobs = ops.TORCH_OPS.take_along_last_axis(ops.TORCH_OPS.log_softmax(logits), targets)
    return -(logprobs * mask).sum() / mask.sum()


def logprobs(backend, prompts: list[str]) -> np.ndarray:
    return np.array([backend.token_logprobs(prompt, COMPLETION) for prompt in prompts])


def disagreements(model: RealModel, backend, tolerance: float) -> list[str]:
    """How ``backend`` departs from torch on the model's prompts: the first greedy tokens, or log-probs."""
    found = []
    for prompt in model.prompts:
        greedy = Sampling(max_tokens=GREEDY_TOKENS)
        reference = "".join(model.torch.stream(prompt, greedy))
        head = model.torch.tokenizer.decode(model.torch.encode(reference)[:AGREED_TOKENS])
        if not head.strip() or not "".join(backend.stream(prompt, greedy)).startswith(head):
            found.append(f"greedy text differs from torch's {reference!r}")
    difference = np.abs(logprobs(backend, model.prompts) - logprobs(model.torch, model.prompts)).max()
    if not difference < tolerance:
        found.append(f"log-probs differ by {difference:.2e}")
    return found


def test_chat_template_renders_or_a_base_model_says_it_has_none(model):
    if model.name == BASE_MODEL:
        for backend in (model.torch, model.llamacpp):
            with pytest.raises(BackendError, match=r"^\S+: the model has no chat template$"):
                backend.render_chat(CONVERSATIONS[0])
        return
    for conversation, prompt in zip(CONVERSATIONS, model.prompts):
        assert conversation[0]["content"] in prompt
        assert model.llamacpp.render_chat(conversation) == prompt


def test_llamacpp_on_the_f16_export_agrees_with_torch(engines):
    for text in TOKENIZER_TEXTS:
        assert engines.llamacpp.count_tokens(text) == engines.torch.count_tokens(text), text
    assert not disagreements(engines, engines.llamacpp, LLAMACPP_TOLERANCE[engines.name])


def test_a_trained_block_changes_the_outputs_and_every_engine_agrees_on_it(engines, block):
    bare = logprobs(engines.torch, engines.prompts)
    for backend in (engines.torch, engines.llamacpp):
        backend.set_adapters([Adapter(block)])
    assert np.abs(logprobs(engines.torch, engines.prompts) - bare).max() > 0.05
    assert not disagreements(engines, engines.llamacpp, LLAMACPP_TOLERANCE[engines.name])
    if engines.name in MLX_MODELS and is_installed("mlx"):
        mlx = open_backend("mlx", hf_dir=engines.folder)
        try:
            mlx.set_adapters([Adapter(block)])
            difference = np.abs(logprobs(mlx, engines.prompts[:1]) - logprobs(engines.torch, engines.prompts[:1]))
        finally:
            mlx.close()
        assert difference.max() < MLX_TOLERANCE


@pytest.mark.parametrize("model", CHAT_MODELS[:1], indirect=True)
def test_one_perturbed_weight_in_the_export_breaks_the_agreement(engines, tmp_path):
    """Guards the agreement check itself: it must see one norm weight of the GGUF moved by PERTURBATION."""
    import gguf

    perturbed = shutil.copy(engines.gguf, tmp_path / "perturbed.gguf")
    reader = gguf.GGUFReader(perturbed, "r+")
    next(tensor for tensor in reader.tensors if tensor.name == PERTURBED_TENSOR).data[0] += PERTURBATION
    reader.data.flush()
    del reader
    backend = open_backend("llamacpp", gguf_path=perturbed)
    try:
        found = disagreements(engines, backend, LLAMACPP_TOLERANCE[engines.name])
    finally:
        backend.close()
    assert any(line.startswith("log-probs differ") for line in found)
