"""Replies an engine never finished: a native crash (llama.cpp's segfault) leaves no Python frame
to record it, so each reply in flight is marked by a small file in the data folder, removed when
the reply ends however it ends. A mark whose process is gone is a reply that died with its
engine; the next start says so in one line. The user's message was stored before generation, so
nothing they typed is lost.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from assistant.config import ensure_private_dir, write_private_file


class ReplyJournal:
    """The marks of replies in flight, one file per process, under ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @contextmanager
    def replying(self, session_id: int | None, model: str) -> Iterator[None]:
        mark = ensure_private_dir(self.folder) / f"{os.getpid()}.json"
        started = psutil.Process().create_time()
        write_private_file(mark, json.dumps({"pid": os.getpid(), "process_started": started,
                                             "session": session_id, "model": model}).encode())
        try:
            yield
        finally:
            mark.unlink(missing_ok=True)

    def crashed(self) -> list[str]:
        """One line for each reply whose process died while generating it; their marks are cleared."""
        if not self.folder.is_dir():
            return []
        lines = []
        for mark in sorted(self.folder.glob("*.json")):
            try:
                entry = json.loads(mark.read_text(encoding="utf-8"))
                if _alive(int(entry["pid"]), float(entry["process_started"])):
                    continue
                where = f"in session {entry['session']} " if entry.get("session") is not None else ""
                lines.append(f"the last reply {where}never finished: the {entry['model']} engine stopped "
                             "(it crashed or was killed); your message is kept")
            except (OSError, ValueError, KeyError, TypeError):
                pass  # a half-written mark says nothing; it goes
            mark.unlink(missing_ok=True)
        return lines


def _alive(pid: int, started: float) -> bool:
    """The process that wrote a mark still runs (a reused pid has another start time)."""
    try:
        return abs(psutil.Process(pid).create_time() - started) < 1e-3
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False
