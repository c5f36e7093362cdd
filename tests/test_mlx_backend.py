"""The MLX engine against the torch engine on the same tiny weights and the same PEFT adapters.

MLX runs on the CPU here (mlx[cpu]) in float32, so greedy tokens must be identical to torch's and
log-probabilities equal to within float32 rounding of a different kernel order.
"""

from __future__ import annotations

import json
import re
import shutil

import mlx.core as mx
import numpy as np
import pytest
from helpers import (
    COMPLETION,
    PROMPT_MESSAGES,
    check_cancel_stops_between_tokens,
    check_stops_at_end_token,
)
from mlx_lm.generate import generate_step

from backends.base import Adapter, Backend, BackendError, Sampling
from backends.mlx_backend import MlxBackend
from backends.torch_backend import TorchBackend

LOGPROB_TOLERANCE = 1e-4  # absolute, natural log; measured differences are at most 2e-6


@pytest.fixture(scope="module")
def torch_engine(tiny_model_dir) -> TorchBackend:
    return TorchBackend(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def loaded(tiny_model_dir) -> MlxBackend:
    return MlxBackend(tiny_model_dir)


@pytest.fixture
def engines(loaded, torch_engine):
    """Both engines, bare again after each test."""
    yield loaded, torch_engine
    loaded.set_adapters([])
    torch_engine.set_adapters([])


def assert_engines_agree(mlx_engine: MlxBackend, torch_engine: TorchBackend) -> None:
    prompt = torch_engine.render_chat(PROMPT_MESSAGES)
    greedy = Sampling(max_tokens=16)
    assert "".join(mlx_engine.stream(prompt, greedy)) == "".join(torch_engine.stream(prompt, greedy))
    np.testing.assert_allclose(
        mlx_engine.token_logprobs(prompt, COMPLETION),
        torch_engine.token_logprobs(prompt, COMPLETION),
        rtol=0,
        atol=LOGPROB_TOLERANCE,
    )


def test_bare_model_agrees_with_torch(engines):
    mlx_engine, torch_engine = engines
    assert isinstance(mlx_engine, Backend)
    assert (mlx_engine.name, mlx_engine.context_length) == ("mlx", torch_engine.context_length)
    prompt = mlx_engine.render_chat(PROMPT_MESSAGES)
    assert prompt == torch_engine.render_chat(PROMPT_MESSAGES)
    assert mlx_engine.count_tokens(prompt) == torch_engine.count_tokens(prompt)
    assert_engines_agree(mlx_engine, torch_engine)


def test_stacked_adapters_agree_with_torch_and_detach_exactly(engines, tiny_adapters):
    mlx_engine, torch_engine = engines
    prompt = mlx_engine.render_chat(PROMPT_MESSAGES)
    bare = mlx_engine.token_logprobs(prompt, COMPLETION)
    for stack in (
        [Adapter(tiny_adapters["first"], 1.0)],
        [Adapter(tiny_adapters["first"], 0.5), Adapter(tiny_adapters["second"], -1.5)],
    ):
        mlx_engine.set_adapters(stack)
        torch_engine.set_adapters(stack)
        assert mlx_engine.token_logprobs(prompt, COMPLETION) != bare
        assert_engines_agree(mlx_engine, torch_engine)
    mlx_engine.set_adapters([])
    assert mlx_engine.token_logprobs(prompt, COMPLETION) == bare


def test_seeded_sampling_is_reproducible_and_cancel_stops(engines):
    mlx_engine, _ = engines
    prompt = mlx_engine.render_chat(PROMPT_MESSAGES)
    hot = Sampling(max_tokens=12, temperature=1.0, top_p=0.9, seed=3)
    assert list(mlx_engine.stream(prompt, hot)) == list(mlx_engine.stream(prompt, hot))
    check_cancel_stops_between_tokens(mlx_engine)


def test_stream_stops_at_end_of_turn_without_showing_it(engines):
    mlx_engine, _ = engines
    ends = {mlx_engine.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    assert mlx_engine.end_token_ids == ends  # the end of turn, and the end of text llama.cpp stops at too
    prompt_ids = mx.array(mlx_engine.encode(mlx_engine.render_chat(PROMPT_MESSAGES)))
    greedy = [token for token, _ in generate_step(prompt_ids, mlx_engine.model, max_tokens=8)]
    check_stops_at_end_token(mlx_engine, greedy, mlx_engine.tokenizer.decode)


def test_rope_parameters_written_by_transformers_5_are_honoured(tiny_model_dir, tmp_path):
    """mlx-lm reads ``rope_theta`` only; a model saved with another theta must still agree."""
    model_dir = tmp_path / "other-theta"
    shutil.copytree(tiny_model_dir, model_dir)
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["rope_parameters"]["rope_theta"] = 50.0
    config_path.write_text(json.dumps(config))
    torch_engine = TorchBackend(model_dir, device="cpu")
    prompt = torch_engine.render_chat(PROMPT_MESSAGES)
    np.testing.assert_allclose(
        MlxBackend(model_dir).token_logprobs(prompt, COMPLETION),
        torch_engine.token_logprobs(prompt, COMPLETION),
        rtol=0,
        atol=LOGPROB_TOLERANCE,
    )


def test_bad_inputs_are_refused(engines, tiny_adapters, truncated_model_dir, templateless_model_dir):
    mlx_engine, _ = engines
    prompt = mlx_engine.render_chat(PROMPT_MESSAGES)
    mlx_engine.set_adapters([Adapter(tiny_adapters["first"], 1.0)])
    before = mlx_engine.token_logprobs(prompt, COMPLETION)
    with pytest.raises(BackendError, match=re.escape(str(tiny_adapters["other_model"]))):
        mlx_engine.set_adapters([Adapter(tiny_adapters["other_model"], 1.0)])
    assert mlx_engine.token_logprobs(prompt, COMPLETION) == before
    with pytest.raises(BackendError, match=re.escape(str(truncated_model_dir / "model.safetensors"))):
        MlxBackend(truncated_model_dir)
    with pytest.raises(BackendError, match="no chat template"):
        MlxBackend(templateless_model_dir).render_chat(PROMPT_MESSAGES)
