"""Knowledge Seeding's training loop: where it keeps the block's state for the gate to choose from."""

from __future__ import annotations

import random

import pytest
import torch

from assistant.sleep import losses, seeding
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


def test_a_deadline_ends_training_early_and_its_last_step_is_a_checkpoint(tiny_model_dir):
    import time

    trainer = TorchBlockTrainer(tiny_model_dir, [], LoraSpec(rank=4, alpha=8.0), lr=1e-2, seed=0, device="cpu")
    prompt = trainer.render_chat([{"role": "user", "content": "Where do I live?"}])
    rows = [Row(prompt, prompt, "You live in Quito.", question="Where do I live?")]
    states, totals = [], []
    log = seeding.consolidate(trainer, rows, SeedingSettings(steps=50, checkpoints=3, lti_every=0, batch_size=2),
                              deadline=time.monotonic(), checkpoint=states.append,
                              progress=lambda step, total: totals.append(total))
    trainer.close()
    assert len(log.losses) == 1 and states == [1]  # the time was up: one step, and it is the night's block
    assert totals == [1]  # the progress bar's total follows the time left, not the steps allowed


def test_a_night_trains_at_least_one_step(tiny_model_dir):
    trainer = TorchBlockTrainer(tiny_model_dir, [], LoraSpec(rank=4, alpha=8.0), lr=1e-2, seed=0, device="cpu")
    with pytest.raises(ValueError, match="at least one step"):
        seeding.consolidate(trainer, [Row("a", "a", "b")], SeedingSettings(steps=0))
    trainer.close()


def test_a_seeding_step_takes_the_papers_objective_with_each_term_on_its_own_rows(tiny_model_dir):
    """Distillation rows and an LTI group share one batch (and one optimiser step): the loss is
    alpha * JSD over the distillation rows + (1 - alpha) * the group's policy-gradient loss, each
    read from its own rows, even where the group's completions are the longer ones; an anchor
    row's tokens count ``anchor_weight`` times in the divergence."""
    trainer = TorchBlockTrainer(tiny_model_dir, [], LoraSpec(rank=4, alpha=8.0), lr=1e-2, seed=0, device="cpu")
    ops, marker = trainer.ops, seeding.end_of_turn(trainer)

    def chat(*turns):
        return trainer.render_chat([{"role": "user", "content": turn} for turn in turns])

    rows = [Row(chat("I live in Quito.", "Where do I live?"), chat("Where do I live?"), "You live in Quito."),
            Row(chat("My dog is Rex.", "Name my dog."), chat("My dog is Rex.", "Name my dog."), "Rex.",
                kind="anchor")]
    seeding.prepare(trainer, rows, marker)
    completions = [trainer.encode("Your dog is called Rex, the big one." + marker), trainer.encode("Bo." + marker)]
    group = seeding.ImitationGroup(trainer.encode(rows[1].student_prompt), completions, [1.0, 0.0],
                                   ops.asarray([1.0, -1.0]), teaches=True)
    settings = SeedingSettings(on_policy=0.0, alpha=0.3, anchor_weight=3.0)

    def expected(with_group: bool) -> float:
        student, mask = trainer.completion_logits([r.student_ids for r in rows], [r.answer_ids for r in rows],
                                                  new_block=True)
        teacher, _ = trainer.completion_logits([r.teacher_ids for r in rows], [r.answer_ids for r in rows],
                                               new_block=False)
        weighted = mask * ops.asarray([[1.0], [settings.anchor_weight]])
        divergence = losses.generalized_jsd(ops, student, teacher, weighted, settings.beta)
        if not with_group:
            return float(settings.alpha * divergence)
        own, own_mask = trainer.completion_logits([group.prompt_ids] * 2, completions, new_block=True)
        imitation = group.loss(ops, own, seeding.pad(completions), own_mask)
        return float(losses.seeding_objective(ops, -imitation, divergence, settings.alpha))

    for with_group in (False, True, False):  # the block moves between steps; each loss is that of its step
        wanted = expected(with_group)
        loss = seeding.seeding_step(trainer, rows, group if with_group else None, settings, random.Random(0), marker)
        assert loss == pytest.approx(wanted, rel=1e-4)
    trainer.close()


def test_the_teachers_cache_gives_what_the_teacher_computes_and_asks_it_once_per_fixed_row(tiny_model_dir):
    trainer = TorchBlockTrainer(tiny_model_dir, [], LoraSpec(rank=4, alpha=8.0), lr=1e-2, seed=0, device="cpu")
    render = trainer.render_chat
    rows = [Row(render([{"role": "user", "content": f"I live in {city}. Where do I live?"}]),
                render([{"role": "user", "content": "Where do I live?"}]), f"You live in {city}.")
            for city in ("Quito", "Lima, in Peru")]
    seeding.prepare(trainer, rows, "")
    calls = []
    real = trainer.completion_logits
    trainer.completion_logits = lambda *a, **k: calls.append(len(a[0])) or real(*a, **k)
    cache = seeding.TeacherCache(trainer)
    sampled = trainer.encode(" no idea")
    answers = [rows[0].answer_ids, sampled, rows[1].answer_ids]
    batch = [rows[0], rows[1], rows[1]]
    first = cache(batch, answers, fixed=[True, False, True])
    expected, _ = real([r.teacher_ids for r in batch], answers, new_block=False)
    for i, answer in enumerate(answers):  # float16 log-probabilities: exact to about 1e-2 nats in the tail
        assert torch.allclose(first[i, : len(answer)], torch.log_softmax(expected[i, : len(answer)], -1), atol=2e-2)
    again = cache(batch, answers, fixed=[True, False, True])
    assert calls == [3, 1]  # the second batch asked the teacher only for the sampled completion
    assert torch.allclose(first, again, atol=2e-2)
    assert not torch.equal(first[1], first[2])  # a row's sampled completion is not mistaken for its fixed one
    unkept = seeding.TeacherCache(trainer, limit=0)
    unkept(batch, answers, fixed=[True, False, True])
    assert unkept.kept == {} and unkept.used == 0  # nothing kept past the limit
    trainer.close()
