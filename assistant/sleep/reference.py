"""The bare model's own answers to the generic material, computed once per model and stack.

Anchors and the gate's reading check both hold the night to the model as it was before its first
night. Its answers (and its log-probabilities of the readings' answers) are computed the first
night, with every frozen block switched off, and kept in the stack's manifest; later nights read
them from there instead of generating them again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence

from assistant.sleep.gate import Readings, logprob
from assistant.sleep.material import Material
from backends.base import BlockTrainer, Sampling

ANSWER = Sampling(max_tokens=32, temperature=0.0)  # a path to anchor on, not a whole reply


def bare_answers(trainer: BlockTrainer, render: Callable[[list[dict]], str], material: Material,
                 scales: Sequence[float], weights: str, cached: dict | None) -> dict:
    """{"weights", "material", "everyday", "readings", "base"}: from ``cached`` when it was made for
    these weights and this material (its prompts' digest), else computed on the bare model (``scales``: the frozen blocks' own, restored after)."""
    everyday = [render(chat) for chat in material.everyday()]
    reading = [render(chat) for chat in material.readings()]
    digest = hashlib.sha256(json.dumps([everyday, reading]).encode()).hexdigest()[:16]
    if cached and cached.get("weights") == weights and cached.get("material") == digest:
        return cached
    trainer.set_block_scales([0.0] * len(scales))
    try:
        answers = [a.strip() for a in trainer.generate(everyday + reading, ANSWER, new_block=False)]
        base = logprob(trainer, reading, answers[len(everyday):], new_block=False)
    finally:
        trainer.set_block_scales(list(scales))
    return {"weights": weights, "material": digest, "everyday": answers[:len(everyday)], "readings": answers[len(everyday):], "base": base}


def readings(render: Callable[[list[dict]], str], material: Material, answered: dict) -> Readings:
    """The odd readings, for the gate: never trained on (the even ones anchor, see ``anchors``)."""
    chats = material.readings()
    odd = range(1, len(chats), 2)
    return Readings(tuple(render(chats[i]) for i in odd), tuple(answered["readings"][i] for i in odd),
                    tuple(answered["base"][i] for i in odd))


def anchors(render: Callable[[list[dict]], str], material: Material, answered: dict) -> list[tuple[str, str]]:
    """(prompt, the bare model's answer) of each everyday prompt and even reading it answered at all:
    a night that teaches answering from memory must keep answering small talk and reading a text."""
    chats = material.everyday() + material.readings()[::2]
    answers = answered["everyday"] + answered["readings"][::2]
    return [(render(chat), a) for chat, a in zip(chats, answers) if a]
