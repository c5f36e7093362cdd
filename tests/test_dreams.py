"""Dreaming's pure parts: block noise, selection, choosing the teacher's reference, the journal."""

from __future__ import annotations

import random

import pytest
import torch

from assistant.sleep import dreams, gate, losses, seeding
from backends.base import LoraSpec, Sampling


def test_no_noise_leaves_the_scales_alone():
    assert dreams.block_noise([1.0, 0.5, 1.0], 0.0, random.Random(0)) == [1.0, 0.5, 1.0]


def test_noise_drops_and_rescales_blocks_within_its_amount():
    rng = random.Random(1)
    draws = [dreams.block_noise([1.0] * 4, 0.5, rng) for _ in range(500)]
    values = [v for draw in draws for v in draw]
    dropped = sum(v == 0.0 for v in values) / len(values)
    assert 0.2 < dropped < 0.3  # half the amount
    kept = [v for v in values if v]
    assert min(kept) >= 0.5 and max(kept) <= 1.5
    assert len({round(v, 3) for v in kept}) > 100  # really rescaled, not just on or off


def test_noise_brings_a_dropped_block_back():
    draws = [dreams.block_noise([0.0], 0.2, random.Random(seed)) for seed in range(50)]
    assert any(draw[0] > 0.7 for draw in draws)


def test_noise_must_be_a_share():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        dreams.block_noise([1.0], 1.5, random.Random(0))


def test_selection_keeps_the_top_scores_and_some_random_others():
    scores = [0.1, 0.9, 0.3, 0.8, 0.2, 0.05, 0.7]
    kept = dreams.select(scores, 2, 2, random.Random(0))
    assert len(kept) == 4 and kept == sorted(kept)
    assert {1, 3} <= set(kept)
    others = {tuple(dreams.select(scores, 2, 2, random.Random(seed))) for seed in range(20)}
    assert len(others) > 1  # the random part varies with the seed


def test_selection_keeps_everything_when_there_are_few():
    assert dreams.select([0.3, 0.1], 2, 2, random.Random(0)) == [0, 1]


def test_the_newest_memory_that_grounds_the_answer_gives_the_reference():
    # (with the memory, without any memory): confident and made likelier by the memory
    assert dreams.newest_grounded([0.9, 0.2, 0.7], [0.1, 0.1, 0.1], 0.5, 2.0) == 2
    assert dreams.newest_grounded([0.9, 0.2, 0.4], [0.1, 0.1, 0.1], 0.5, 2.0) == 0
    assert dreams.newest_grounded([0.1, 0.2], [0.0, 0.0], 0.5, 2.0) is None
    assert dreams.newest_grounded([], [], 0.5, 2.0) is None


def test_a_confident_answer_the_memory_does_not_explain_is_no_reference():
    # the newest memory's answer is as likely without it: the teacher is guessing, not reading
    assert dreams.newest_grounded([0.9, 0.95], [0.1, 0.9], 0.5, 2.0) == 0


NIGHT = [
    "Nova is the name of my dog.\nI have a ferret named Poppy.",
    "The flower I like most is jasmine. Mei lives in Austin. Eric lives in Stockholm.",
    "My favourite drink is cocoa.\nI have a physiotherapist appointment on Saturday at 7:30 am.",
    "Eric works as a gardener. I'm seeing the accountant on Tuesday at 1:30 pm.",
    "Alexander works as a sailor. The instrument I like most is harp.",
]


@pytest.mark.parametrize("question, about", [
    ("Which city does Mei live in?", [1]),
    ("What is my dog's name?", [0]),
    ("Which drink do I like most?", [2]),  # "drink" is said once; "like" and "most" twice
    ("What does Eric do for a living?", [1, 3]),
    ("Where does Henre live?", []),  # a name nobody said: nobody was asked about
    ("Where do I live?", []),
])
def test_a_question_is_about_the_memories_that_say_its_most_specific_word(question, about):
    assert dreams.relevant(question, NIGHT) == about


def test_a_name_said_in_every_memory_still_picks_them_all():
    stories = ["Mary went to the office.", "Mary moved to the hall.", "John went to the garden."]
    assert dreams.relevant("Where is Mary?", stories) == [0, 1]
    assert dreams.relevant("Where is Mary?", stories[:2]) == [0, 1]
    assert dreams.relevant("What is my dog's name?", ["My dog is called Rex."]) == [0]


def test_a_dream_is_judged_on_what_it_was_written_about_and_what_supersedes_it():
    stories = ["Mary went to the office.", "John moved to the hall.", "Mary went back to the attic."]
    about_first = dreams.Dream("Where is Mary?", "tonight", [], (11,))
    assert dreams.candidates(about_first, [11, 12, 13], stories) == [0, 2]  # the newer story about Mary
    about_john = dreams.Dream("Where is John?", "tonight", [], (12,))
    assert dreams.candidates(about_john, [11, 12, 13], stories) == [1]
    combined = dreams.Dream("Where is Mary?", "combined", [], (11, 12))
    assert dreams.candidates(combined, [11, 12, 13], stories) == [0, 2]  # John's story says nothing of Mary
    recollection = dreams.Dream("Where is Mary?", "recollection", [])
    assert dreams.candidates(recollection, [11, 12, 13], stories) == [0, 2]
    made_up = dreams.Dream("Where is Azost?", "tonight", [], (11,))
    assert dreams.candidates(made_up, [11, 12, 13], stories) == []
    garbled = dreams.Dream("What is myOAWho is my playroo?", "tonight", [], (11,))
    assert dreams.candidates(garbled, [11, 12, 13], stories) == []


@pytest.mark.parametrize("question, ok", [
    ("Where is Mary?", True),
    ("What is my sister's name?", True),
    ("What do for a florist. What is my June1. What date is my dog?", False),
    ("Where does Stefan do for a livingok partner Siga. Where do I live?", False),
    ("Mary moved to the kitchen.", False),
    ("va is aboutimaruva do for a living?", False),
    ("Why?", False),
    ("What " + "very " * 20 + "long question is this?", False),
])
def test_only_one_short_question_makes_a_dream(question, ok):
    assert dreams.well_formed(question) is ok


def test_the_journal_summary_counts_what_happened():
    log = dreams.DreamLog([
        dreams.Dream("Where is Mary?", "tonight", [], reference="Mary is in the hall.", kept=True, reward=0.5),
        dreams.Dream("Where is John?", "combined", [1.0], reference="John is in the attic.", kept=True, reward=1.0),
        dreams.Dream("What is my dog called?", "recollection", [0.0], reference="Your dog is called Rex."),
        dreams.Dream("Who am I?", "recollection", [1.2]),
    ])
    assert log.summary() == {"written": 4, "judged": 3, "kept": 2, "reward_mean": 0.75, "seconds": 0.0}
    record = log.dreams[1].journal()
    assert record["scales"] == [1.0] and record["kept"] is True and record["source"] == "combined"


def test_the_apps_sleep_report_sums_up_the_dreams():
    from tui import pages

    report = {"status": "promoted", "adapter": 3, "reason": "recall 0% -> 50%", "recall_before": 0.0,
              "recall_after": 0.5, "sessions": [4], "seconds": 70,
              "dreaming": {"written": 12, "judged": 9, "kept": 6, "chosen": "dreamt"}}
    page = pages.report_page(report, {4: "my sister"})
    assert "12 written, 9 judged, 6 rehearsed; the dreamt block went forward" in page
    assert "dreams" not in pages.report_page({**report, "dreaming": {}}, {})
    assert "kept" not in page  # a report without checkpoints says nothing of them


def test_reports_say_how_much_of_the_consolidation_went_forward():
    from tui import pages

    judged = [{"steps": steps, "scale": scale, "chosen": (steps, scale) == (240, 0.85)}
              for steps in (120, 240, 360) for scale in (0.7, 0.85, 1.0)]
    assert gate.kept_training({"checkpoints": judged}) == "240 of 360 steps, 0.85 of the block"
    assert gate.kept_training({"checkpoints": [{**c, "chosen": False} for c in judged]}) is None
    assert gate.kept_training({}) is None  # a report from before checkpoints
    page = pages.report_page({"status": "promoted", "training": {"checkpoints": judged}}, {})
    assert "**consolidation kept**: 240 of 360 steps, 0.85 of the block" in page


def test_a_guided_rehearsal_learns_a_reference_no_sample_reaches(tiny_model_dir):
    from backends.torch_trainer import TorchBlockTrainer

    trainer = TorchBlockTrainer(tiny_model_dir, [], LoraSpec(rank=4, alpha=8.0), lr=1e-2, seed=0, device="cpu")
    marker = seeding.end_of_turn(trainer)
    prompt = trainer.render_chat([{"role": "user", "content": "Where does Zara live?"}])
    row = seeding.Row(prompt, prompt, "Zara lives in Porto.")
    seeding.prepare(trainer, [row], marker)
    exact = lambda candidate, reference, semantic: float(candidate == reference)  # noqa: E731
    sampling = Sampling(max_tokens=12, temperature=1.0, seed=1)

    def likelihood() -> float:  # the student's log-probability of the reference
        logits, _ = trainer.completion_logits([row.student_ids], [row.answer_ids], new_block=True)
        return float(losses.completion_logprobs(trainer.ops, logits, torch.tensor([row.answer_ids])).sum())

    before = likelihood()
    plain = seeding.policy_step(trainer, seeding.imitation_group(trainer, row, "", group=4, sampling=sampling,
                                                                 reward=exact, marker=marker))
    assert plain == [0.0] * 4 and likelihood() == before  # an all-equal group teaches nothing
    for _ in range(3):
        guided = seeding.policy_step(trainer, seeding.imitation_group(trainer, row, "", group=4, sampling=sampling,
                                                                      reward=exact, marker=marker, guide=True))
        assert len(guided) == 4  # the student's own rewards, for the journal
    assert likelihood() > before + 1.0
