"""The generic material a night holds the model to, and the bare model's answers to it (``reference``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from assistant.nano.material import NanoMaterial
from assistant.sleep import reference
from assistant.sleep.gate import Readings
from assistant.sleep.lessons import user_turn
from assistant.sleep.material import EVERYDAY, PACKAGED, READINGS
from backends.base import Adapter
from tests.fakes import (
    UNKNOWN,
    Fact,
    FakeCrash,
    FakeTrainer,
    encode,
    make_model_folder,
    render_chat,
)

# -- the packaged material ---------------------------------------------------------------------------


def _roles(chat: list[dict]) -> list[str]:
    return [message["role"] for message in chat]


def test_every_everyday_chat_is_one_user_turn():
    chats = PACKAGED.everyday()
    assert len(chats) == len(EVERYDAY) >= 20
    assert all(_roles(chat) == ["user"] and chat[0]["content"].strip() for chat in chats)
    assert len({chat[0]["content"] for chat in chats}) == len(chats)


def test_every_reading_chat_gives_a_text_and_ends_with_a_user_question_about_it():
    chats = PACKAGED.readings()
    assert len(chats) == len(READINGS) >= 10
    for chat, (text, question) in zip(chats, READINGS):
        assert _roles(chat) == ["user", "assistant", "user"]
        assert chat[0]["content"] == text and chat[-1]["content"] == question
        assert question.endswith("?") and not text.endswith("?")
    assert len({chat[-1]["content"] for chat in chats}) == len(chats)


def test_no_everyday_prompt_asks_about_the_users_own_things():
    """What the user owns or did is what a night changes: an anchor must not hold it as it was."""
    mine = re.compile(r"\b(my|mine|myself|our)\b", re.IGNORECASE)
    assert not [prompt for prompt in EVERYDAY if mine.search(prompt)]


def test_packaged_chats_are_fresh_lists_each_time():
    chats = PACKAGED.everyday()
    chats[0][0]["content"] = "changed"
    assert PACKAGED.everyday()[0][0]["content"] == EVERYDAY[0]


# -- the nano model's material -----------------------------------------------------------------------


def test_nano_material_chats_end_in_a_user_turn():
    material = NanoMaterial(seed=3, count=12)
    everyday, readings = material.everyday(), material.readings()
    assert len(everyday) == 12 and 1 <= len(readings) <= 6
    for chat in everyday + readings:
        assert chat and chat[-1]["role"] == "user" and chat[-1]["content"].strip()
        assert _roles(chat) == ["user", "assistant"] * (len(chat) // 2) + ["user"]  # turns alternate
    assert all(chat[-1]["content"].rstrip().endswith("?") for chat in readings)


def test_nano_material_is_deterministic_for_its_seed():
    assert NanoMaterial(seed=3, count=12).everyday() == NanoMaterial(seed=3, count=12).everyday()
    assert NanoMaterial(seed=3, count=12).readings() == NanoMaterial(seed=3, count=12).readings()
    assert NanoMaterial(seed=3, count=12).everyday() != NanoMaterial(seed=4, count=12).everyday()
    assert NanoMaterial(seed=3, count=12).readings() != NanoMaterial(seed=4, count=12).readings()


# -- reference: the bare model's answers -------------------------------------------------------------

DOG = Fact("My dog is called Rex.", ("What is my dog called?",), "Your dog is called Rex.")
TEXT = "Zorba keeps the key under the mat."
KEY = Fact(TEXT, ("Where is the key?",), "Under the mat.")


@dataclass(frozen=True)
class Scripted:
    """Material of a test's own: what a frozen block remembers is among the everyday prompts."""

    everyday_prompts: tuple[str, ...] = ("Hello!", "What is my dog called?")
    reading_count: int = 5

    def everyday(self) -> list[list[dict]]:
        return [user_turn(prompt) for prompt in self.everyday_prompts]

    def readings(self) -> list[list[dict]]:
        return [[{"role": "user", "content": f"{TEXT} ({i})"}, {"role": "assistant", "content": "Got it."},
                 {"role": "user", "content": "Where is the key?"}] for i in range(self.reading_count)]


def _mean_nll(logits, targets, mask):
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return -(logprobs * mask).sum() / mask.sum()


@pytest.fixture
def remembering(tmp_path: Path) -> FakeTrainer:
    """A fake wearing one frozen block that answers the dog's name from memory."""
    trainer = FakeTrainer([DOG, KEY])
    model = make_model_folder(tmp_path / "model")
    trainer.open(model)
    prompt = render_chat(user_turn("What is my dog called?"))
    trainer.train_step([encode(prompt)], [encode(DOG.answer + "<|end|>")], _mean_nll)
    trainer.save_new_block(tmp_path / "block")
    trainer.open(model, blocks=[Adapter(tmp_path / "block", 0.8)])
    assert trainer.answer(user_turn("What is my dog called?"), new_block=False) == DOG.answer
    return trainer


def test_bare_answers_are_the_models_with_every_frozen_block_off_and_restored_after(remembering):
    answered = reference.bare_answers(remembering, render_chat, Scripted(), [0.8], "weights-1", None)
    assert answered["weights"] == "weights-1"
    assert answered["everyday"] == [UNKNOWN, UNKNOWN]  # the bare model does not remember the dog
    assert answered["readings"] == [KEY.answer] * 5
    assert len(answered["base"]) == 5 and all(-0.05 < lp <= 0 for lp in answered["base"])  # its own answers
    assert remembering.night.scales == [[0.0], [0.8]]  # off while answering, then as they were
    assert remembering.answer(user_turn("What is my dog called?"), new_block=False) == DOG.answer


def test_bare_answers_are_read_without_the_new_block(tmp_path):
    trainer = FakeTrainer([KEY], reading_lost_after=0.0)  # worn, its new block would stop it reading
    answered = reference.bare_answers(trainer, render_chat, Scripted(everyday_prompts=()), [], "w", None)
    assert answered["readings"] == [KEY.answer] * 5
    assert all(-0.05 < lp <= 0 for lp in answered["base"])


def test_the_scales_are_restored_when_answering_fails(remembering):
    remembering.crash_on("generate")
    with pytest.raises(FakeCrash):
        reference.bare_answers(remembering, render_chat, Scripted(), [0.8], "weights-1", None)
    assert remembering.night.scales[-1] == [0.8]


def test_cached_answers_for_the_same_weights_are_reused_and_other_weights_recomputed(remembering):
    first = reference.bare_answers(remembering, render_chat, Scripted(), [0.8], "weights-1", None)
    cached = {**first, "everyday": ["a", "b"], "readings": ["r"] * 5, "base": [-1.0] * 5}
    calls = remembering.night.calls["generate"]
    assert reference.bare_answers(remembering, render_chat, Scripted(), [0.8], "weights-1", cached) is cached
    assert remembering.night.calls["generate"] == calls
    fresh = reference.bare_answers(remembering, render_chat, Scripted(), [0.8], "weights-2", cached)
    assert fresh["weights"] == "weights-2" and fresh["everyday"] == [UNKNOWN, UNKNOWN]
    assert remembering.night.calls["generate"] == calls + 1
    assert reference.bare_answers(remembering, render_chat, Scripted(), [0.8], "weights-2", {})["weights"] == "weights-2"


def test_cached_answers_for_other_material_are_recomputed(remembering):
    cached = reference.bare_answers(remembering, render_chat, Scripted(reading_count=3), [0.8], "weights-1", None)
    grown = Scripted(reading_count=5)  # the same weights, the material of a newer release
    answered = reference.bare_answers(remembering, render_chat, grown, [0.8], "weights-1", cached)
    assert len(reference.readings(render_chat, grown, answered).prompts) == 2


def _answered(material) -> dict:
    everyday, readings = material.everyday(), material.readings()
    return {"weights": "w", "everyday": [f"E{i}." for i in range(len(everyday))],
            "readings": [f"R{i}." for i in range(len(readings))], "base": [-float(i) for i in range(len(readings))]}


def test_the_gate_reads_the_odd_readings_and_the_anchors_are_the_everyday_and_even_ones():
    material = Scripted(reading_count=7)
    answered = _answered(material)
    gate_readings = reference.readings(render_chat, material, answered)
    chats = material.readings()
    assert gate_readings == Readings(tuple(render_chat(chats[i]) for i in (1, 3, 5)), ("R1.", "R3.", "R5."),
                                     (-1.0, -3.0, -5.0))
    anchors = reference.anchors(render_chat, material, answered)
    assert anchors == ([(render_chat(chat), f"E{i}.") for i, chat in enumerate(material.everyday())]
                       + [(render_chat(chats[i]), f"R{i}.") for i in (0, 2, 4, 6)])
    assert not set(gate_readings.prompts) & {prompt for prompt, _ in anchors}  # never trained on what the gate reads


def test_packaged_readings_and_anchors_never_overlap():
    answered = _answered(PACKAGED)
    gate_readings = reference.readings(render_chat, PACKAGED, answered)
    anchors = reference.anchors(render_chat, PACKAGED, answered)
    assert len(gate_readings.prompts) == len(READINGS) // 2
    assert len(anchors) == len(EVERYDAY) + (len(READINGS) + 1) // 2
    assert not set(gate_readings.prompts) & {prompt for prompt, _ in anchors}


def test_an_everyday_prompt_the_bare_model_did_not_answer_anchors_nothing():
    material = Scripted(reading_count=2)
    answered = {"weights": "w", "everyday": ["", "E1."], "readings": ["", "R1."], "base": [0.0, 0.0]}
    assert reference.anchors(render_chat, material, answered) == [(render_chat(material.everyday()[1]), "E1.")]
