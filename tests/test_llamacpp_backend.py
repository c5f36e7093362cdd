"""The llama.cpp engine on the exported tiny model: chat, streaming, scoring and live LoRA adapters.

References are transformers and PEFT themselves. Log-probabilities agree to ~2e-6 on the f32 model
(asserted < 1e-4).
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from helpers import make_peft_lora, torch_logits

from backends.base import Adapter, BackendError, Sampling
from backends.gguf_export import export_model
from backends.llamacpp_backend import LlamaCppBackend

LOGPROB_TOLERANCE = 1e-4
MESSAGES = [{"role": "user", "content": "My sister is called Alice. Where is John?"}]
COMPLETION = "John travelled to the hallway."


@pytest.fixture(scope="module")
def loaded(tiny_gguf):
    engine = LlamaCppBackend(tiny_gguf)
    yield engine
    engine.close()


@pytest.fixture
def backend(loaded):
    """The shared engine, handed back bare (no adapters) after each test."""
    yield loaded
    loaded.set_adapters([])


@pytest.fixture(scope="module")
def lora_pair(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("adapters")
    first = make_peft_lora(tiny_model_dir, folder / "first", seed=1)
    second = make_peft_lora(tiny_model_dir, folder / "second", seed=2, r=8, lora_alpha=4, use_rslora=True)
    return first, second


def torch_logprobs(model_dir, hf_tokenizer, prompt: str, completion: str, adapters=()) -> np.ndarray:
    prompt_ids = hf_tokenizer.encode(prompt, add_special_tokens=False)
    completion_ids = hf_tokenizer.encode(completion, add_special_tokens=False)
    logits = torch_logits(model_dir, prompt_ids + completion_ids, list(adapters)).astype(np.float64)
    rows = logits[len(prompt_ids) - 1 : -1]
    log_norm = np.log(np.exp(rows - rows.max(1, keepdims=True)).sum(1)) + rows.max(1)
    return rows[np.arange(len(completion_ids)), completion_ids] - log_norm


def build_scripted_model(tiny_model_dir: Path, out_dir: Path, transitions: list[tuple[int, int]]) -> Path:
    """The tiny model rewired so that greedy decoding follows ``transitions`` (after token a, emit b).

    With attention and MLP outputs zeroed, the last hidden state is the current token's embedding;
    one-hot embeddings then let lm_head columns act as a next-token table.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    hidden = model.config.hidden_size
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embeddings = model.model.embed_tokens.weight
        embeddings.zero_()
        embeddings[torch.arange(len(embeddings)), torch.arange(len(embeddings)) % hidden] = 1.0
        model.lm_head.weight.zero_()
        for after, emitted in transitions:
            model.lm_head.weight[emitted, after % hidden] = 1.0
    model.save_pretrained(out_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, out_dir / name)
    return out_dir


def test_render_chat_and_count_tokens_match_transformers(backend, hf_tokenizer):
    conversation = [*MESSAGES, {"role": "assistant", "content": "héllo 🎉\nJohn"}]
    for add_generation_prompt in (True, False):
        expected = hf_tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert backend.render_chat(conversation, add_generation_prompt) == expected
        assert backend.count_tokens(expected) == len(hf_tokenizer.encode(expected, add_special_tokens=False))
    assert backend.context_length == 512


def test_greedy_stream_equals_transformers_argmax(backend, tiny_model_dir, hf_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    prompt = backend.render_chat(MESSAGES)
    ids = hf_tokenizer.encode(prompt, add_special_tokens=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    completion = []
    with torch.no_grad():
        while len(completion) < 20 and (not completion or completion[-1] not in (0, 2)):
            completion.append(int(model(torch.tensor([ids + completion])).logits[0, -1].argmax()))
    expected = hf_tokenizer.decode(completion, skip_special_tokens=True)
    assert "".join(backend.stream(prompt, Sampling(max_tokens=20))) == expected
    assert "".join(backend.stream(prompt, Sampling(max_tokens=20))) == expected  # the prompt cache changes nothing


def test_seeded_sampling_repeats_and_respects_max_tokens(backend):
    prompt = backend.render_chat(MESSAGES)
    hot = Sampling(max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    first = "".join(backend.stream(prompt, hot))
    assert first == "".join(backend.stream(prompt, hot))
    assert first != "".join(backend.stream(prompt, Sampling(max_tokens=12, temperature=1.0, top_p=0.9, seed=8)))
    assert 0 < len(list(backend.stream(prompt, hot))) <= 12 + 1  # one piece a token, plus a flushed byte


def test_cancel_stops_the_stream(backend):
    prompt = backend.render_chat(MESSAGES)
    assert len(list(backend.stream(prompt, Sampling(max_tokens=60)))) > 20
    cancel = threading.Event()
    pieces = []
    for piece in backend.stream(prompt, Sampling(max_tokens=60), cancel):
        pieces.append(piece)
        cancel.set()
    assert len(pieces) <= 2  # the piece before the cancel, plus at most an undecodable byte flushed


def test_stream_joins_split_characters_and_stops_at_end_of_turn(tiny_model_dir, hf_tokenizer, tmp_path):
    euro_bytes = hf_tokenizer.encode("€", add_special_tokens=False)  # three byte tokens, one character
    newline, hello, end = hf_tokenizer.convert_tokens_to_ids(["Ċ", "Hello", "<|im_end|>"])
    path = [newline, *euro_bytes, hello, end, hello]  # after the end of turn the table would go on
    assert len(euro_bytes) == 3 and len({token % 64 for token in path[:-1]}) == len(path) - 1
    scripted = build_scripted_model(tiny_model_dir, tmp_path / "scripted", list(zip(path, path[1:])))
    engine = LlamaCppBackend(export_model(scripted, tmp_path / "scripted.gguf"))
    try:
        pieces = list(engine.stream(engine.render_chat(MESSAGES), Sampling(max_tokens=50)))
    finally:
        engine.close()
    assert pieces == ["€", "Hello"]


def test_token_logprobs_match_transformers(backend, tiny_model_dir, hf_tokenizer):
    prompt = backend.render_chat(MESSAGES)
    got = backend.token_logprobs(prompt, COMPLETION)
    expected = torch_logprobs(tiny_model_dir, hf_tokenizer, prompt, COMPLETION)
    assert len(got) == len(expected) > 3
    assert np.abs(np.array(got) - expected).max() < LOGPROB_TOLERANCE
    assert backend.token_logprobs(prompt, "") == []


def test_peft_folder_is_converted_and_matches_peft(backend, lora_pair, tiny_model_dir, hf_tokenizer):
    first, _ = lora_pair
    prompt = backend.render_chat(MESSAGES)
    base = np.array(backend.token_logprobs(prompt, COMPLETION))
    backend.set_adapters([Adapter(first, 1.0)])
    assert (first / "adapter.gguf").is_file()
    got = np.array(backend.token_logprobs(prompt, COMPLETION))
    expected = torch_logprobs(tiny_model_dir, hf_tokenizer, prompt, COMPLETION, [(first, 1.0)])
    assert np.abs(got - base).max() > 0.05
    assert np.abs(got - expected).max() < LOGPROB_TOLERANCE


def test_two_scaled_adapters_swap_without_reloading(backend, lora_pair, tiny_model_dir, hf_tokenizer):
    first, second = lora_pair
    prompt = backend.render_chat(MESSAGES)
    model_before = backend._llm
    base = backend.token_logprobs(prompt, COMPLETION)

    backend.set_adapters([Adapter(first, 0.5), Adapter(second, 1.5)])
    both = np.array(backend.token_logprobs(prompt, COMPLETION))
    expected = torch_logprobs(tiny_model_dir, hf_tokenizer, prompt, COMPLETION, [(first, 0.5), (second, 1.5)])
    assert np.abs(both - expected).max() < LOGPROB_TOLERANCE

    backend.set_adapters([Adapter(second / "adapter.gguf", 1.0)])  # a ready GGUF LoRA works too
    only_second = np.array(backend.token_logprobs(prompt, COMPLETION))
    expected = torch_logprobs(tiny_model_dir, hf_tokenizer, prompt, COMPLETION, [(second, 1.0)])
    assert np.abs(only_second - expected).max() < LOGPROB_TOLERANCE

    backend.set_adapters([])
    assert np.abs(np.array(backend.token_logprobs(prompt, COMPLETION)) - base).max() < 1e-6
    assert backend._llm is model_before


def test_adapter_retrained_in_place_is_reexported(backend, tiny_model_dir, hf_tokenizer, tmp_path):
    folder = make_peft_lora(tiny_model_dir, tmp_path / "nightly", seed=3)
    prompt = backend.render_chat(MESSAGES)
    backend.set_adapters([Adapter(folder)])
    make_peft_lora(tiny_model_dir, folder, seed=4)  # the next sleep overwrites the same block
    backend.set_adapters([Adapter(folder)])
    got = np.array(backend.token_logprobs(prompt, COMPLETION))
    expected = torch_logprobs(tiny_model_dir, hf_tokenizer, prompt, COMPLETION, [(folder, 1.0)])
    assert np.abs(got - expected).max() < LOGPROB_TOLERANCE


def test_adapter_for_another_model_is_refused_and_changes_nothing(backend, lora_pair, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    lora = get_peft_model(LlamaForCausalLM(other), LoraConfig(r=4, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "wide")
    prompt = backend.render_chat(MESSAGES)
    backend.set_adapters([Adapter(lora_pair[0])])
    before = backend.token_logprobs(prompt, COMPLETION)
    with pytest.raises(BackendError, match="wide.*does not fit"):
        backend.set_adapters([Adapter(tmp_path / "wide")])
    with pytest.raises(BackendError, match="missing-adapter: adapter not found"):
        backend.set_adapters([Adapter(tmp_path / "missing-adapter")])
    assert backend.token_logprobs(prompt, COMPLETION) == before


def test_missing_or_corrupt_gguf_names_the_file(tmp_path):
    with pytest.raises(BackendError, match="absent.gguf: GGUF model not found"):
        LlamaCppBackend(tmp_path / "absent.gguf")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(BackendError, match="garbage.gguf"):
        LlamaCppBackend(garbage)


def test_context_size_and_overlong_prompt(tiny_gguf):
    engine = LlamaCppBackend(tiny_gguf, n_ctx=256)  # llama.cpp rounds contexts up to a multiple of 256
    try:
        assert engine.context_length == 256
        assert engine.count_tokens("Hello! " * 200) > 256
        with pytest.raises(BackendError, match="context of 256"):
            list(engine.stream("Hello! " * 200))
        with pytest.raises(BackendError, match="context of 256"):
            engine.token_logprobs("Hello! " * 100, "Hello! " * 100)
    finally:
        engine.close()
