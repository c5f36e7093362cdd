"""``somnus bench model``: how well a model recalls in context, and how little it knows without.

One table, one JSON object. Keys (fractions in [0, 1] unless named otherwise):
``in_context_generated``, ``in_context_babi`` (None when no bAbI file is found), both read the way
the chat reads, after ``system_prompt`` (the text, or None); ``without_system_prompt`` = the same
two read without it (None when there is none), ``no_context_heldout``,
``chance``, ``question_quality`` (questions it writes about a session that are well formed and
answerable from it), ``engine_agreement`` (greedy first tokens equal on torch and llama.cpp, None when
llama.cpp is not installed), ``seconds`` and the settings of the run.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from assistant.nano import evaluate
from assistant.nano.world import QUESTION_REQUESTS, Session, World
from assistant.persona import framed
from backends.base import Backend, Sampling

GREEDY = Sampling(max_tokens=48, temperature=0.0)
QUESTION_LINE = re.compile(r"^\s*\d+[.)]\s*(.+?)\s*$")


def backend_reply(backend: Backend, sampling: Sampling = GREEDY, system: str | None = None) -> evaluate.Reply:
    def reply(messages: list[dict]) -> str:
        return "".join(backend.stream(backend.render_chat(framed(messages, system)), sampling))

    return reply


def question_quality(reply: evaluate.Reply, sessions: Sequence[Session]) -> float:
    """Share of the questions the model writes that are well formed and answerable from the session.

    Judged strictly by the world's own grammar: a question counts when it is, word for word, one of
    the phrasings the generator knows for a fact that this session states (so its answer is there).
    A reply with no numbered question counts as one failure.
    """
    good = total = 0
    for session in sessions:
        written = reply(session.chat() + [{"role": "user", "content": QUESTION_REQUESTS[0]}])
        lines = [m.group(1) for line in written.splitlines() if (m := QUESTION_LINE.match(line))]
        total += max(len(lines), 1)
        good += sum(line in session.answerable for line in lines)
    return good / max(total, 1)


def engine_agreement(hf_dir: Path, gguf_path: Path, prompts: Sequence[list[dict]], tokens: int = 20,
                     system: str | None = None) -> float:
    """Share of prompts whose first ``tokens`` greedy tokens are identical on torch and llama.cpp."""
    from backends.select import open_backend

    torch_engine = open_backend("torch", hf_dir=hf_dir)
    llama_engine = open_backend("llamacpp", gguf_path=gguf_path)
    sampling = Sampling(max_tokens=tokens, temperature=0.0)
    try:
        same = 0
        for messages in prompts:
            prompt = torch_engine.render_chat(framed(messages, system))
            same += "".join(torch_engine.stream(prompt, sampling)) == "".join(llama_engine.stream(prompt, sampling))
        return same / max(len(prompts), 1)
    finally:
        torch_engine.close()
        llama_engine.close()


def run(
    backend: Backend,
    *,
    babi_dir: Path | None = None,
    seed: int = 1234,
    sessions: int = 100,
    babi_stories: int = 200,
    parity: tuple[Path, Path] | None = None,
    system: str | None = None,
    json_path: Path | None = None,
    console: Console | None = None,
) -> dict:
    """Measure ``backend`` as the chat frames it (after ``system``, when given, and again without it);
    ``parity`` = (HF folder, GGUF file) adds the torch/llama.cpp agreement."""
    console = console or Console(stderr=True)
    started = time.time()
    reply = backend_reply(backend, system=system)
    held_out = evaluate.heldout_sessions(seed, sessions)
    probes = evaluate.fact_probes(held_out)
    babi_file = evaluate.find_babi(babi_dir)
    stories = evaluate.read_babi(babi_file)[:babi_stories] if babi_file else []

    def reading(answer: evaluate.Reply) -> dict:
        return {"in_context_generated": evaluate.in_context_accuracy(answer, held_out),
                "in_context_babi": evaluate.babi_accuracy(answer, stories) if stories else None}

    result: dict = {
        "engine": backend.name,
        "seed": seed,
        "sessions": sessions,
        "system_prompt": system,
        **reading(reply),
        "without_system_prompt": reading(backend_reply(backend)) if system else None,
        "no_context_heldout": evaluate.no_context_accuracy(reply, probes),
        "chance": evaluate.chance(probes),
        "babi_file": str(babi_file) if babi_file else None,
    }
    if stories:
        result["babi_stories"] = len(stories)
    question_world = World(seed + 1, heldout=True)
    question_sessions = [question_world.telling_session(4) for _ in range(30)]
    result["question_quality"] = question_quality(reply, question_sessions)
    result["engine_agreement"] = None
    if parity:
        prompts = [s.chat()[: s.probes[0].at] for s in held_out[:20] if s.probes]
        result["engine_agreement"] = engine_agreement(*parity, prompts, system=system)
    result["seconds"] = round(time.time() - started, 1)
    _print(result, console)
    if json_path:
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _print(result: dict, console: Console) -> None:
    table = Table(title=f"Somnus model benchmark ({result['engine']})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    plain = result["without_system_prompt"] or {}
    framing = ", with the system prompt" if result["system_prompt"] else ""
    rows = [
        (f"in-context accuracy, generated held-out{framing}", result["in_context_generated"]),
        ("  without the system prompt", plain.get("in_context_generated", "skip")),
        (f"in-context accuracy, bAbI qa1{framing}", result["in_context_babi"]),
        ("  without the system prompt", plain.get("in_context_babi", "skip")),
        ("no-context accuracy, held-out entities", result["no_context_heldout"]),
        ("chance", result["chance"]),
        ("written questions well formed and answerable", result["question_quality"]),
        ("torch / llama.cpp greedy agreement", result["engine_agreement"]),
    ]
    for label, value in rows:
        if value != "skip":
            table.add_row(label, "n/a" if value is None else f"{value:.1%}")
    if result["babi_file"] is None:
        table.add_row("bAbI qa1", "no bAbI file found (use --babi DIR)")
    table.add_row("seconds", f"{result['seconds']:.1f}")
    console.print(table)
