"""Knowledge Seeding's training loop: where it keeps the block's state for the gate to choose from."""

from __future__ import annotations

import pytest
import torch

from assistant.sleep import seeding
from assistant.sleep.seeding import Row, SeedingSettings
from backends.base import LoraSpec
from backends.torch_trainer import TorchBlockTrainer


@pytest.mark.parametrize(("steps", "count", "expected"), [
    (360, 3, [120, 240, 360]),
    (10, 3, [3, 7, 10]),
    (2, 3, [1, 2]),  # fewer steps than checkpoints: each step at most once
    (5, 1, [5]),
    (5, 0, []),
])
def test_checkpoints_are_evenly_spaced_and_end_with_the_last_step(steps, count, expected):
    assert seeding.checkpoint_steps(steps, count) == expected


def test_consolidation_hands_over_each_checkpoint_and_ends_on_the_last(tiny_model_dir):
    trainer = TorchBlockTrainer(tiny_model_dir, [], LoraSpec(rank=4, alpha=8.0), lr=1e-2, seed=0, device="cpu")
    prompt = trainer.render_chat([{"role": "user", "content": "Where do I live?"}])
    rows = [Row(prompt, prompt, "You live in Quito.", question="Where do I live?")]
    states = {}
    seeding.consolidate(trainer, rows, SeedingSettings(steps=6, checkpoints=3, lti_every=0, batch_size=2),
                        checkpoint=lambda step: states.__setitem__(step, trainer.new_block_state()))
    assert sorted(states) == [2, 4, 6]
    assert not all(torch.equal(a, b) for a, b in zip(states[2], states[4]))  # training went on between them
    assert all(torch.equal(a, b) for a, b in zip(states[6], trainer.new_block_state()))
    trainer.close()


def test_a_night_trains_at_least_one_step(tiny_model_dir):
    trainer = TorchBlockTrainer(tiny_model_dir, [], LoraSpec(rank=4, alpha=8.0), lr=1e-2, seed=0, device="cpu")
    with pytest.raises(ValueError, match="at least one step"):
        seeding.consolidate(trainer, [Row("a", "a", "b")], SeedingSettings(steps=0))
    trainer.close()
