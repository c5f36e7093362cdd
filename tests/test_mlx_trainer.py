"""The MLX block trainer against the torch one: same stack, same step, same saved files.

MLX runs on the CPU here in float32 and is much slower than torch, so these tests are few and
short. Tolerances (absolute) come from measurements on the tiny model: logits differ by at most
2e-6 before a step and 1.2e-5 after one at lr 1e-2, losses by 0, gradient norms by 2e-7 relative,
trained weights by 7e-8 at lr 1e-3.
"""

from __future__ import annotations

import json
import os
import stat

import mlx.core as mx
import numpy as np
import pytest
import torch
from helpers import SPEC, chat_engine_logits, cross_entropy, prompts_of, token_batch
from mlx.utils import tree_flatten

from backends import ops
from backends.base import Adapter, BackendError, BlockTrainer, Sampling
from backends.mlx_backend import MlxBackend
from backends.mlx_trainer import MlxBlockTrainer
from backends.peft_io import read_lora
from backends.select import open_trainer
from backends.torch_trainer import TorchBlockTrainer

LOGITS_TOLERANCE = 1e-4
WEIGHTS_TOLERANCE = 1e-5
LR = 1e-3


@pytest.fixture
def started(tiny_model_dir, tiny_adapters, frozen):
    """A torch and an MLX trainer on one frozen block, both starting from the same random new block."""
    start = tiny_adapters["second"]  # non-zero A and B, so both get a gradient
    return (
        TorchBlockTrainer(tiny_model_dir, frozen[:1], SPEC, lr=LR, device="cpu", init_block=start),
        MlxBlockTrainer(tiny_model_dir, frozen[:1], SPEC, lr=LR, init_block=start),
    )


def as_numpy(array) -> np.ndarray:
    return array.numpy() if isinstance(array, torch.Tensor) else np.array(array)


def test_growth_is_exact_and_agrees_with_torch(tiny_model_dir, frozen):
    trainer = open_trainer("mlx", tiny_model_dir, blocks=frozen, spec=SPEC)
    assert isinstance(trainer, BlockTrainer) and isinstance(trainer, MlxBlockTrainer)
    assert (trainer.name, trainer.context_length, trainer.ops) == ("mlx", 512, ops.MLX_OPS)
    assert {name.split(".")[-1] for name, _ in tree_flatten(trainer.model.trainable_parameters())} == {
        "new_down", "new_up"}
    reference = TorchBlockTrainer(tiny_model_dir, frozen, SPEC, device="cpu")
    prefixes, completions = token_batch(reference)
    grown, mask = trainer.completion_logits(prefixes, completions, new_block=True)
    old, _ = trainer.completion_logits(prefixes, completions, new_block=False)
    assert mx.array_equal(grown, old).item()
    expected, expected_mask = reference.completion_logits(prefixes, completions, new_block=False)
    np.testing.assert_allclose(as_numpy(grown), as_numpy(expected), rtol=0, atol=LOGITS_TOLERANCE)
    assert as_numpy(mask).tolist() == expected_mask.tolist()
    trainer.set_block_scales([0.0, 1.0])
    without_first = MlxBlockTrainer(tiny_model_dir, frozen[1:], SPEC)
    assert mx.array_equal(trainer.completion_logits(prefixes, completions, new_block=False)[0],
                          without_first.completion_logits(prefixes, completions, new_block=False)[0]).item()


def test_one_step_matches_torch(started, tiny_adapters, tmp_path):
    torch_trainer, mlx_trainer = started
    prefixes, completions = token_batch(torch_trainer)
    torch_norm = torch_trainer.gradient_norm(prefixes, completions, cross_entropy)
    weights = [np.array(w) for _, w in tree_flatten(mlx_trainer.model.trainable_parameters())]
    assert mlx_trainer.gradient_norm(prefixes, completions, cross_entropy) == pytest.approx(torch_norm, rel=1e-5)
    assert all(np.array_equal(w, np.array(v))
               for w, (_, v) in zip(weights, tree_flatten(mlx_trainer.model.trainable_parameters())))
    losses = [trainer.train_step(prefixes, completions, cross_entropy) for trainer in started]
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)
    after = [trainer.completion_logits(prefixes, completions, new_block=True)[0] for trainer in started]
    np.testing.assert_allclose(as_numpy(after[1]), as_numpy(after[0]), rtol=0, atol=LOGITS_TOLERANCE)
    for trainer, name in zip(started, ("torch", "mlx")):
        trainer.save_new_block(tmp_path / name)
    assert (tmp_path / "mlx" / "adapter_config.json").read_bytes() == (
        tmp_path / "torch" / "adapter_config.json").read_bytes()
    saved = [{block.module: block for block in read_lora(tmp_path / name)} for name in ("torch", "mlx")]
    assert saved[0].keys() == saved[1].keys()
    for module, block in saved[0].items():
        np.testing.assert_allclose(saved[1][module].down, block.down, rtol=0, atol=WEIGHTS_TOLERANCE)
        np.testing.assert_allclose(saved[1][module].up, block.up, rtol=0, atol=WEIGHTS_TOLERANCE)
    initial = {block.module: block for block in read_lora(tiny_adapters["second"])}
    assert all(not np.array_equal(saved[1][module].up, initial[module].up) for module in initial)


def test_saved_block_loads_in_the_torch_engine(started, backend, frozen, tmp_path):
    _, mlx_trainer = started
    prefixes, completions = token_batch(started[0])
    old = {name: np.array(w) for name, w in tree_flatten(mlx_trainer.model.parameters()) if ".new_" not in name}
    losses = [mlx_trainer.train_step(prefixes, completions, cross_entropy) for _ in range(3)]
    assert losses == sorted(losses, reverse=True)
    assert all(np.array_equal(old[name], np.array(w))
               for name, w in tree_flatten(mlx_trainer.model.parameters()) if ".new_" not in name)
    with pytest.raises(BackendError, match="not finite"):
        mlx_trainer.train_step(prefixes, completions, lambda *arrays: cross_entropy(*arrays) / 0)
    folder = tmp_path / "night"
    mlx_trainer.save_new_block(folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert all(stat.S_IMODE((folder / name).stat().st_mode) == 0o600 for name in os.listdir(folder))
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == SPEC.rank
    backend.set_adapters([frozen[0], Adapter(folder, 1.0)])
    worn = chat_engine_logits(backend, prefixes, completions, started[0].pad_token_id)
    grown, _ = mlx_trainer.completion_logits(prefixes, completions, new_block=True)
    np.testing.assert_allclose(as_numpy(grown), worn.numpy(), rtol=0, atol=LOGITS_TOLERANCE)


def test_batched_greedy_generation_matches_the_mlx_engine(tiny_model_dir, started, frozen):
    torch_trainer, mlx_trainer = started
    prompts = prompts_of(torch_trainer)
    greedy = Sampling(max_tokens=12)
    chat = MlxBackend(tiny_model_dir)
    chat.set_adapters(frozen[:1])
    texts = mlx_trainer.generate(prompts, greedy, new_block=False)
    assert texts == ["".join(chat.stream(prompt, greedy)) for prompt in prompts]
    assert texts == torch_trainer.generate(prompts, greedy, new_block=False)
    hot = Sampling(max_tokens=12, temperature=1.0, top_p=0.9, seed=3)
    assert mlx_trainer.generate(prompts, hot, new_block=True) == mlx_trainer.generate(prompts, hot, new_block=True)


def test_a_copied_block_comes_back_exactly_and_trains_afresh_on_both_engines(started):
    """Dreaming trains a copy of the consolidated block; the gate may put the original back."""
    prefixes, completions = token_batch(started[0])
    for trainer in started:
        trainer.train_step(prefixes, completions, cross_entropy)
        saved = trainer.new_block_state()
        kept = as_numpy(trainer.completion_logits(prefixes, completions, new_block=True)[0])
        trainer.train_step(prefixes, completions, cross_entropy)
        moved = as_numpy(trainer.completion_logits(prefixes, completions, new_block=True)[0])
        assert not np.array_equal(moved, kept)
        trainer.load_new_block_state(saved, lr=LR / 10)
        np.testing.assert_array_equal(as_numpy(trainer.completion_logits(prefixes, completions, new_block=True)[0]),
                                      kept)
    for trainer in started:  # afresh: the same step from the same weights, a tenth of the rate, no moments
        trainer.train_step(prefixes, completions, cross_entropy)
    after = [as_numpy(t.completion_logits(prefixes, completions, new_block=True)[0]) for t in started]
    np.testing.assert_allclose(after[1], after[0], rtol=0, atol=LOGITS_TOLERANCE)


def test_the_teachers_cache_gives_the_same_log_probabilities_on_both_engines(tiny_model_dir):
    from assistant.sleep import seeding

    trainers = [MlxBlockTrainer(tiny_model_dir, [], SPEC, lr=LR),
                TorchBlockTrainer(tiny_model_dir, [], SPEC, lr=LR, device="cpu")]
    kept = []
    for trainer in trainers:
        rows = [seeding.Row(trainer.render_chat([{"role": "user", "content": f"I live in {city}. Where?"}]),
                            "unused", f"In {city}.") for city in ("Quito", "Lima, in Peru")]
        seeding.prepare(trainer, rows, "")
        cache = seeding.TeacherCache(trainer)
        answers = [row.answer_ids for row in rows]
        cache(rows, answers, fixed=[True, True])
        kept.append(as_numpy(cache(rows, answers, fixed=[True, True])))  # the second time from the cache
    assert kept[0].shape == kept[1].shape and np.abs(kept[0] - kept[1]).max() < 2e-2  # float16 log-probabilities
