"""The torch engine against transformers and PEFT themselves, on the tiny random Llama."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import (
    COMPLETION,
    LORA_ALPHA,
    LORA_RANK,
    PROMPT_MESSAGES,
    check_cancel_stops_between_tokens,
    check_stops_at_end_token,
)
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from backends.base import Adapter, Backend, BackendError, Sampling
from backends.incremental_text import IncrementalText
from backends.torch_backend import TorchBackend


def load_reference(hf_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def loaded(tiny_model_dir) -> TorchBackend:
    return TorchBackend(tiny_model_dir, device="cpu")


@pytest.fixture
def backend(loaded) -> TorchBackend:
    """The shared engine, bare again after each test."""
    yield loaded
    loaded.set_adapters([])


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return load_reference(tiny_model_dir), AutoTokenizer.from_pretrained(str(tiny_model_dir))


def prompt_of(backend: TorchBackend) -> str:
    return backend.render_chat(PROMPT_MESSAGES)


def reference_logprobs(model, tokenizer, prompt: str, completion: str) -> torch.Tensor:
    """Log-probs of the completion's tokens from one plain transformers forward pass."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    positions = torch.arange(len(prompt_ids) - 1, ids.shape[1] - 1)
    return logprobs[positions, torch.tensor(completion_ids)]


def test_implements_the_protocol(backend):
    assert isinstance(backend, Backend)
    assert backend.name == "torch"
    assert backend.context_length == 512


def test_chat_template_and_special_tokens(backend, reference):
    _, tokenizer = reference
    prompt = prompt_of(backend)
    assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_start|>assistant\n")
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert backend.count_tokens(prompt) == len(ids)


def test_greedy_stream_matches_transformers_generate(backend, reference):
    model, tokenizer = reference
    prompt = prompt_of(backend)
    pieces = list(backend.stream(prompt, Sampling(max_tokens=24)))
    assert pieces == list(backend.stream(prompt, Sampling(max_tokens=24)))
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    assert "".join(pieces) == tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)


def test_stream_stops_at_end_of_turn_without_showing_it(backend, reference):
    model, tokenizer = reference
    ends = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    assert backend.end_token_ids == ends  # the end of turn, and the end of text llama.cpp stops at too
    ids = tokenizer(prompt_of(backend), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        greedy = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids) :].tolist()
    check_stops_at_end_token(backend, greedy, tokenizer.decode)


def test_seeded_sampling_is_reproducible(backend):
    prompt = prompt_of(backend)
    hot = Sampling(max_tokens=20, temperature=1.0, top_p=0.9, seed=7)
    first = "".join(backend.stream(prompt, hot))
    assert first == "".join(backend.stream(prompt, hot))
    assert first != "".join(backend.stream(prompt, Sampling(max_tokens=20, temperature=1.0, top_p=0.9, seed=8)))


def test_cancel_stops_between_tokens(backend):
    check_cancel_stops_between_tokens(backend)


def test_incremental_text_never_splits_a_character(reference):
    _, tokenizer = reference
    text = "Olá, café em Lisboa 日本 🙂!"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text) / 2  # the tiny vocabulary spells most of these byte by byte
    pieces = IncrementalText(tokenizer.decode)
    streamed = [pieces.add(token) for token in ids] + [pieces.finish()]
    assert "".join(streamed) == text
    assert not any("\ufffd" in piece for piece in streamed)


def test_token_logprobs_match_a_direct_forward_pass(backend, reference):
    model, tokenizer = reference
    prompt = prompt_of(backend)
    ours = torch.tensor(backend.token_logprobs(prompt, COMPLETION))
    expected = reference_logprobs(model, tokenizer, prompt, COMPLETION)
    assert ours.shape == expected.shape == (len(tokenizer(COMPLETION, add_special_tokens=False)["input_ids"]),)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    assert bool((ours < 0).all())


def test_one_adapter_matches_peft(backend, reference, tiny_adapters, tiny_model_dir):
    _, tokenizer = reference
    prompt = prompt_of(backend)
    bare = torch.tensor(backend.token_logprobs(prompt, COMPLETION))
    backend.set_adapters([Adapter(tiny_adapters["first"], 1.0)])
    adapted = torch.tensor(backend.token_logprobs(prompt, COMPLETION))
    peft_model = PeftModel.from_pretrained(load_reference(tiny_model_dir), str(tiny_adapters["first"])).eval()
    expected = reference_logprobs(peft_model, tokenizer, prompt, COMPLETION)
    torch.testing.assert_close(adapted, expected, rtol=0, atol=1e-6)
    assert (adapted - bare).abs().max() > 0.05


def merged_by_hand(hf_dir: Path, scaled_adapters: list[tuple[Path, float]]) -> torch.nn.Module:
    """The base model with W += scale * alpha / r * B @ A of every adapter written into its weights."""
    model = load_reference(hf_dir)
    with torch.no_grad():
        for folder, scale in scaled_adapters:
            tensors = load_file(str(folder / "adapter_model.safetensors"))
            for key, down in tensors.items():
                if ".lora_A." in key:
                    up = tensors[key.replace(".lora_A.", ".lora_B.")]
                    layer = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                    model.get_submodule(layer).weight += scale * LORA_ALPHA / LORA_RANK * up @ down
    return model


def test_stacked_adapters_add_up_with_their_scales(backend, reference, tiny_adapters, tiny_model_dir):
    _, tokenizer = reference
    prompt = prompt_of(backend)
    backend.set_adapters([Adapter(tiny_adapters["second"], 1.0)])  # replaced below, not kept
    backend.set_adapters([Adapter(tiny_adapters["first"], 0.5), Adapter(tiny_adapters["second"], -1.5)])
    stacked = torch.tensor(backend.token_logprobs(prompt, COMPLETION))
    merged = merged_by_hand(tiny_model_dir, [(tiny_adapters["first"], 0.5), (tiny_adapters["second"], -1.5)])
    expected = reference_logprobs(merged, tokenizer, prompt, COMPLETION)
    torch.testing.assert_close(stacked, expected, rtol=0, atol=1e-5)


def test_no_adapters_restores_the_base_bit_for_bit(backend, tiny_adapters, tiny_model_dir):
    prompt = prompt_of(backend)
    bare = backend.token_logprobs(prompt, COMPLETION)
    bare_text = "".join(backend.stream(prompt, Sampling(max_tokens=16)))
    backend.set_adapters([Adapter(tiny_adapters["first"], 1.0), Adapter(tiny_adapters["second"], 2.0)])
    assert backend.token_logprobs(prompt, COMPLETION) != bare
    backend.set_adapters([])
    assert backend.token_logprobs(prompt, COMPLETION) == bare
    assert "".join(backend.stream(prompt, Sampling(max_tokens=16))) == bare_text
    saved = load_file(str(tiny_model_dir / "model.safetensors"))
    state = backend.model.state_dict()
    assert set(state) == set(saved)
    assert all(torch.equal(state[name], saved[name]) for name in saved)


def test_adapter_for_another_model_is_refused_and_changes_nothing(backend, tiny_adapters):
    prompt = prompt_of(backend)
    backend.set_adapters([Adapter(tiny_adapters["first"], 1.0)])
    before = backend.token_logprobs(prompt, COMPLETION)
    with pytest.raises(BackendError, match=re.escape(str(tiny_adapters["other_model"]))):
        backend.set_adapters([Adapter(tiny_adapters["second"], 1.0), Adapter(tiny_adapters["other_model"], 1.0)])
    assert backend.token_logprobs(prompt, COMPLETION) == before


def test_corrupt_adapter_weights_name_the_file(backend, tiny_adapters, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_adapters["first"], broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(BackendError, match=re.escape(str(weights))):
        backend.set_adapters([Adapter(broken, 1.0)])
    with pytest.raises(BackendError, match="adapter_config.json"):
        backend.set_adapters([Adapter(tmp_path / "missing", 1.0)])


def test_a_model_without_chat_template_says_so(templateless_model_dir):
    with pytest.raises(BackendError, match="no chat template"):
        TorchBackend(templateless_model_dir).render_chat(PROMPT_MESSAGES)


def test_truncated_model_weights_name_the_file(truncated_model_dir, tmp_path):
    with pytest.raises(BackendError, match=re.escape(str(truncated_model_dir / "model.safetensors"))):
        TorchBackend(truncated_model_dir)
    with pytest.raises(BackendError, match="not found"):
        TorchBackend(tmp_path / "nowhere")
