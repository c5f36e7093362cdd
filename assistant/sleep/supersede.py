"""Newer wins: an earlier answer that tonight's sessions contradict leaves replay and the gate.

The teacher reads the earlier session and one of tonight's, oldest first, and is asked the earlier
question again. When tonight's words make the earlier answer at least ``threshold`` nats less
likely than the earlier session alone did ("I moved to Porto" after "I live in Lisbon"), the answer
is superseded: replaying it would teach the old value against the new one, and a retention probe
on it would count learning the new value as forgetting. Likelihoods only, so any language and any
wording of the update are read the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from assistant.sleep.gate import Probe, logprob
from assistant.sleep.lessons import knowledge_context, user_turn
from backends.base import BlockTrainer


def superseded(trainer: BlockTrainer, render: Callable[[list[dict]], str], earlier: Sequence[Probe],
               said_then: Mapping[int, str], said_tonight: Sequence[tuple[int, str]], threshold: float) -> set[str]:
    """The questions of ``earlier`` whose answers one of tonight's sessions contradicts.

    ``said_then``: what the user said in each earlier session (by id); ``said_tonight``: (id, words)
    of tonight's sessions. An answer whose session is not in ``said_then`` is left alone."""
    fits = lambda prompt: len(trainer.encode(prompt)) < trainer.context_length - 64
    alone, alone_refs, both, owners = [], [], [], []
    for index, item in enumerate(earlier):
        then = said_then.get(item.session_id) if item.session_id is not None else None
        first = render(knowledge_context([_turn(then)]) + user_turn(item.question)) if then is not None else ""
        if then is None or not fits(first):
            continue
        pairs = [render(knowledge_context([_turn(then), _turn(now)]) + user_turn(item.question))
                 for session_id, now in said_tonight if session_id != item.session_id]
        pairs = [prompt for prompt in pairs if fits(prompt)]
        if pairs:
            alone.append(first)
            alone_refs.append(item.reference)
            both += pairs
            owners += [(index, len(alone) - 1)] * len(pairs)
    if not owners:
        return set()
    before = logprob(trainer, alone, alone_refs, new_block=False)
    after = logprob(trainer, both, [earlier[i].reference for i, _ in owners], new_block=False)
    return {earlier[i].question for (i, a), lp in zip(owners, after) if before[a] - lp >= threshold}


def _turn(text: str) -> dict:
    return {"role": "user", "content": text}

