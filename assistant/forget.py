"""Forget a session: from the store, and from the weights of every adapter block it reached.

A block reached a session when its night learnt the session, or replayed or probed an answer of it
(its version's manifest keeps those answers). A version that holds such a block, or whose manifest
names the session, is forgotten: the newest version none of that touches goes live again, and the
sessions the dropped blocks had learnt (all but the forgotten one) are learnt again, one night per
dropped block and gated like any night, so nothing else the user said is lost.

Crash safety: a forget is three steps, and a kill at any point leaves the old state or the new.
1. One store transaction: the session's rows leave, the versions are marked forgotten, the clean
   version goes live, and the files left to delete are recorded (``forgets``, status "deleting").
2. The files: the forgotten blocks' folders and manifests are deleted, then the database is
   rewritten so that none of its files holds the deleted text. ``finish_interrupted`` (at every
   start) redoes this step for a forget a kill cut short; both parts are idempotent.
3. Relearning: each dropped night's other sessions sleep again. A kill here leaves the clean
   version live and those sessions not yet learnt, which the next sleep learns.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from assistant.adapters import Stack, load_stack, orphan_blocks
from assistant.config import Paths
from assistant.store import Store


@dataclass(frozen=True)
class Plan:
    """What forgetting a session changes; ``nights`` are the sessions to relearn, one list per dropped block."""

    session_id: int
    forgotten: tuple[int, ...] = ()  # adapter ids
    versions: tuple[int, ...] = ()  # their version numbers, for the user
    live: int | None = None  # the adapter id that goes live when the live one is forgotten (None: the bare model)
    files: tuple[str, ...] = ()  # block folders and manifests to delete
    nights: tuple[tuple[int, ...], ...] = ()

    def record(self) -> dict:
        return {"files": list(self.files), "nights": [list(n) for n in self.nights], "versions": list(self.versions)}


@dataclass
class Forgotten:
    session_id: int
    messages: int
    versions: list[int] = field(default_factory=list)
    files: int = 0
    nights: list[list[int]] = field(default_factory=list)
    forget_id: int | None = None


def plan(paths: Paths, store: Store, session_id: int) -> Plan:
    """Which versions and blocks the session reached, which version stays live, what to relearn; block
    folders no manifest names (a killed save's) go too, as they may hold what the session said."""
    store.session(session_id)  # a wrong id fails here, before anything changes
    rows = {row["id"]: row for row in store.sleep.adapters() if row["status"] != "forgotten"}
    stacks = {adapter_id: _stack(row) for adapter_id, row in rows.items()}
    reached = {adapter_id for adapter_id, stack in stacks.items() if stack is None or _names(stack, session_id)}
    kept_blocks = {block.id for i, stack in stacks.items() if i not in reached and stack for block in stack.blocks}
    files = [row["path"] for i, row in rows.items() if i in reached]
    files += sorted({str(block.path) for i in reached if stacks[i] for block in stacks[i].blocks
                     if block.id not in kept_blocks} | {str(path) for path in orphan_blocks(paths.home)})
    live = next((row for row in rows.values() if row["status"] == "live"), None)
    if live is None or live["id"] not in reached:
        return Plan(session_id, tuple(sorted(reached)), _versions(rows, reached), files=tuple(files))
    by_version = {row["version"]: row for row in rows.values()}
    lineage, row = [], live
    while row is not None and row["id"] in reached:  # the live version's ancestors the session reached
        lineage.append(row)
        row = by_version.get(row["parent_version"])
    nights = []
    for dropped in reversed(lineage):  # oldest first, each the sessions its own block learnt
        stack = stacks[dropped["id"]]
        learnt = stack.blocks[-1].sessions if stack and stack.blocks else dropped["sessions"]
        if others := tuple(sid for sid in learnt if sid != session_id and store.has_session(sid)):
            nights.append(others)
    return Plan(session_id, tuple(sorted(reached)), _versions(rows, reached), None if row is None else row["id"],
                tuple(files), tuple(nights))


def forget(paths: Paths, store: Store, session_id: int) -> Forgotten:
    """Steps 1 and 2 under the sleep lock (no night may learn the session meanwhile). Step 3 is the
    caller's: a night (``sleep_now(..., sessions=...)``) for each of ``Forgotten.nights``, then
    ``finished``."""
    from assistant.sleep import sleep_lock

    with sleep_lock(paths):
        chosen = plan(paths, store, session_id)
        messages = len(store.messages(session_id))
        forget_id = store.sleep.forget(session_id, forgotten=chosen.forgotten, live=chosen.live, plan=chosen.record())
        _finish_files(store, forget_id, chosen.files)
    return Forgotten(session_id, messages, list(chosen.versions), len(chosen.files),
                     [list(n) for n in chosen.nights], forget_id)


def finished(store: Store, forgotten: Forgotten) -> None:
    """Record that the dropped nights' other sessions were slept on again."""
    if forgotten.forget_id is not None:
        store.sleep.set_forget_status(forgotten.forget_id, "done")


def finish_interrupted(paths: Paths, store: Store) -> list[str]:
    """Finish the file step of every forget a kill cut short; one line for each, to tell the user.
    A forget still running holds the sleep lock (as does a night): then it is left to finish itself."""
    from assistant.sleep import SleepBusy, sleep_lock

    pending = store.sleep.forgets("deleting")
    if not pending:
        return []
    try:
        lock = sleep_lock(paths)
    except SleepBusy:
        return []
    told = []
    with lock:
        for row in store.sleep.forgets("deleting"):
            _finish_files(store, row["id"], row["plan"]["files"])
            told.append(f"finished forgetting session {row['session_id']} (it was interrupted): "
                        f"its adapter blocks and text are gone")
    return told


def _finish_files(store: Store, forget_id: int, files) -> None:
    for name in files:
        path = Path(name)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    store.scrub()
    store.sleep.set_forget_status(forget_id, "relearning")


def _stack(row: dict) -> Stack | None:
    """The version's manifest; None when it is unreadable (it may name the session: it goes too)."""
    try:
        return load_stack(Path(row["path"]))
    except FileNotFoundError:
        return Stack(row["version"])
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
        return None


def _names(stack: Stack, session_id: int) -> bool:
    """Whether the version's blocks learnt the session or its manifest keeps an answer of it."""
    answers = stack.extra.get("taught", []) + stack.extra.get("probes", [])
    return (any(session_id in block.sessions for block in stack.blocks)
            or any(answer.get("session_id") == session_id for answer in answers))


def _versions(rows: dict, reached: set[int]) -> tuple[int, ...]:
    return tuple(sorted(rows[i]["version"] for i in reached))
