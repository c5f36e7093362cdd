"""How well a model recalls: in context, without context, and on the real bAbI qa1 stories.

Everything here takes a ``reply(messages) -> str`` callable (greedy), so the same measurement serves
the training loop, ``somnus bench model`` on any engine, and the sleep benchmark later.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from assistant.nano.world import Probe, Session, World

Reply = Callable[[list[dict]], str]

BABI_FILE = "qa1_single-supporting-fact_test.txt"


def answered(reply: str, value: str) -> bool:
    """Whether ``reply`` states ``value`` (whole words, case-insensitive)."""
    return re.search(rf"\b{re.escape(value.lower())}\b", reply.lower()) is not None


def heldout_sessions(seed: int, count: int) -> list[Session]:
    """Evaluation sessions: held-out entities and held-out question phrasings, facts and stories."""
    world = World(seed, heldout=True)
    return [world.facts_session() if i % 2 == 0 else world.story_session() for i in range(count)]


def in_context_accuracy(reply: Reply, sessions: Sequence[Session]) -> float:
    """Each probe asked where it stands in its session, with everything before it in the context."""
    hits = total = 0
    for session in sessions:
        chat = session.chat()
        for probe in session.probes:
            hits += answered(reply(chat[: probe.at]), probe.value)
            total += 1
    return hits / max(total, 1)


def fact_probes(sessions: Sequence[Session]) -> list[Probe]:
    return [p for s in sessions if s.kind == "facts" for p in s.probes]


def no_context_accuracy(reply: Reply, probes: Sequence[Probe]) -> float:
    """The question alone, in a fresh session: what the weights know (sleep must raise this)."""
    hits = sum(answered(reply([{"role": "user", "content": p.question}]), p.value) for p in probes)
    return hits / max(len(probes), 1)


def chance(probes: Sequence[Probe]) -> float:
    """Expected accuracy of a uniform guess over each question's possible values."""
    return sum(1 / p.choices for p in probes) / max(len(probes), 1)


@dataclass
class BabiQuestion:
    """A qa1 question with the story lines since the previous question (the chat turn that asks it)."""

    lines: list[str]
    question: str
    answer: str


def read_babi(path: Path) -> list[list[BabiQuestion]]:
    """Stories of the original bAbI format: ``ID text`` lines, questions ``ID q<TAB>answer<TAB>ids``."""
    stories: list[list[BabiQuestion]] = []
    pending: list[str] = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        if not raw.strip():
            continue
        number, _, text = raw.strip().partition(" ")
        if number == "1":
            stories.append([])
            pending = []
        if "\t" in text:
            question, answer, _ = text.split("\t")
            stories[-1].append(BabiQuestion(pending, question.strip(), answer.strip()))
            pending = []
        else:
            pending.append(text.strip())
    return stories


def babi_turns(story: list[BabiQuestion]) -> Iterator[tuple[list[dict], str, list[dict]]]:
    """(context so far, gold answer, user turn) for each question of a story told as a chat.

    Each user turn holds the story lines since the last question, then the question, one per line.
    The assistant's earlier turns in the context are the gold answers, as a perfect reader would say.
    """
    context: list[dict] = []
    for item in story:
        turn = {"role": "user", "content": "\n".join(item.lines + [item.question])}
        yield context, item.answer, turn
        subject = item.question.removeprefix("Where is ").rstrip("?").strip()
        context = context + [turn, {"role": "assistant", "content": f"{subject} is in the {item.answer}."}]


def babi_accuracy(reply: Reply, stories: Sequence[list[BabiQuestion]]) -> float:
    hits = total = 0
    for story in stories:
        for context, gold, turn in babi_turns(story):
            hits += answered(reply(context + [turn]), gold)
            total += 1
    return hits / max(total, 1)


def find_babi(directory: Path | None) -> Path | None:
    """The qa1 test file in ``directory`` (default: ../shared/data/babi beside the checkout)."""
    candidates = [directory] if directory else [
        Path.cwd() / "../shared/data/babi",
        Path(__file__).resolve().parents[3] / "shared/data/babi",
    ]
    for folder in candidates:
        if folder and (folder / BABI_FILE).is_file():
            return folder / BABI_FILE
    return None
