"""Dreaming's parts: the noise over old blocks, the selection, and a night's dreams with the fake."""

from __future__ import annotations

import random

import pytest
from fakes import Fact, FakeTrainer, render_chat

from assistant.sleep import dreams, seeding
from assistant.sleep.dreams import DreamSettings, Memory
from assistant.sleep.lessons import knowledge_context, user_turn

REX = Fact("My dog is called Rex.", ("What is my dog called?", "What is my dog's name?"), "Your dog is called Rex.")
ZARA = Fact("My sister is called Zara.", ("What is my sister called?",), "Your sister is called Zara.")


def test_no_noise_leaves_the_scales_alone():
    assert dreams.block_noise([1.0, 0.5], 0.0, random.Random(0)) == [1.0, 0.5]


def test_noise_drops_and_rescales_blocks_within_its_amount():
    rng = random.Random(3)
    draws = [dreams.block_noise([1.0] * 4, 0.5, rng) for _ in range(200)]
    values = [v for draw in draws for v in draw]
    assert any(v == 0.0 for v in values) and any(v != 0.0 for v in values)
    assert all(v == 0.0 or 0.5 <= v <= 1.5 for v in values)
    dropped = sum(v == 0.0 for v in values) / len(values)
    assert 0.15 < dropped < 0.35  # amount / 2


def test_noise_brings_a_dropped_block_back():
    values = [dreams.block_noise([0.0], 0.5, random.Random(seed))[0] for seed in range(50)]
    assert any(v > 0 for v in values)


def test_noise_must_be_a_share():
    with pytest.raises(ValueError):
        dreams.block_noise([1.0], 1.5, random.Random(0))


def test_selection_keeps_the_top_scores_and_some_random_others():
    kept = dreams.select([0.1, 0.9, 0.5, 0.8, 0.2, 0.3], 2, 1, random.Random(0))
    assert {1, 3} <= set(kept) and len(kept) == 3 and kept == sorted(kept)


def test_selection_keeps_everything_when_there_are_few():
    assert dreams.select([0.3, 0.1], 2, 1, random.Random(0)) == [0, 1]


def _memories():
    return [Memory(1, knowledge_context(user_turn(REX.said))), Memory(2, knowledge_context(user_turn(ZARA.said)), "older")]


def test_a_night_writes_judges_scores_and_rehearses_dreams_never_asking_the_gates_questions():
    fake = FakeTrainer([REX, ZARA])
    rewards = []

    def reward(candidate, reference, semantic):
        rewards.append(reference)
        return float(candidate == reference)

    log = dreams.dream(fake, render_chat, _memories(), scales=[], held_out={"What is my dog's name?"},
                       settings=DreamSettings(steps=4), reward=reward)
    questions = {d.question for d in log.dreams}
    assert "What is my dog called?" in questions and "What is my sister called?" in questions
    assert "What is my dog's name?" not in questions  # a gate's probe is never dreamt
    assert all(d.reference in (REX.answer, ZARA.answer) for d in log.dreams)
    assert all(d.kept and d.score is not None for d in log.dreams)
    assert set(rewards) <= {REX.answer, ZARA.answer} and rewards
    # a step is taken while samples and the guiding reference differ: once learnt, a group is all-equal
    assert 1 <= fake.night.calls["train_step"] <= 4 and log.summary()["kept"] == len(log.dreams)
    assert {d.source for d in log.dreams} == {"tonight", "older"}


def test_a_dream_the_memory_does_not_ground_is_dropped():
    invented = "Your dog is called Paris."

    def respond(turns, new_block):  # the teacher invents the same answer with or without the memory
        return invented if turns[-1]["content"] == "What is my dog called?" else None

    fake = FakeTrainer([REX], respond=respond)
    log = dreams.dream(fake, render_chat, _memories()[:1], scales=[], held_out=set(),
                       settings=DreamSettings(steps=2), reward=lambda c, r, s: 0.0)
    assert {d.question for d in log.dreams if d.reference} == {"What is my dog's name?"}
    assert not [d for d in log.dreams if d.question == "What is my dog called?" and d.kept]


def test_writing_under_noise_restores_the_blocks_scales(tmp_path):
    fake = FakeTrainer([REX])
    fake.crash_on("generate")
    with pytest.raises(Exception):
        dreams.write(fake, render_chat, _memories()[:1], [], DreamSettings(), random.Random(0))
    assert fake.night.scales[-1] == []


def test_the_journal_summary_counts_what_happened():
    log = dreams.DreamLog([dreams.Dream("q1", "tonight", [], reference="a", kept=True, reward=0.5),
                           dreams.Dream("q2", "tonight", [], reference="b"), dreams.Dream("q3", "older", [])], 2.04)
    assert log.summary() == {"written": 3, "judged": 2, "kept": 1, "reward_mean": 0.5, "seconds": 2.0}


def test_a_guided_rehearsal_learns_a_reference_no_sample_reaches(tiny_model_dir):
    from backends.select import open_trainer

    trainer = open_trainer("torch", tiny_model_dir, lr=5e-2)
    try:
        dream = dreams.Dream("What is my dog called?", "tonight", [], 1, reference="Rex", kept=True,
                             teacher_prompt=trainer.render_chat(user_turn("What is my dog called?")))
        marker = seeding.end_of_turn(trainer)
        prompt = trainer.encode(trainer.render_chat(user_turn(dream.question)))
        before = seeding.mean_token_probability(trainer, [prompt], ["Rex"], marker, new_block=True)[0]
        dreams.rehearse(trainer, trainer.render_chat, [dream], DreamSettings(steps=8, group=2), random.Random(0),
                        reward=lambda candidate, reference, semantic: float(candidate.strip() == reference))
        after = seeding.mean_token_probability(trainer, [prompt], ["Rex"], marker, new_block=True)[0]
    finally:
        trainer.close()
    assert after > before and dream.reward is not None
