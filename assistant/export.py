"""Sessions as documents the user keeps: Markdown to read, or JSON for scripts."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from assistant.store import Store


def sessions_with_messages(store: Store, session_ids: Sequence[int]) -> list[dict]:
    return [{**store.session(one), "messages": store.messages(one)} for one in session_ids]


def as_json(sessions: Sequence[dict]) -> str:
    return json.dumps(list(sessions), ensure_ascii=False, indent=2) + "\n"


def as_markdown(sessions: Sequence[dict]) -> str:
    return "\n".join(_session_markdown(session) for session in sessions)


def _session_markdown(session: dict) -> str:
    lines = [f"# {session['title'] or 'Session ' + str(session['id'])}", "",
             f"- session: {session['id']}", f"- created: {session['created']}", f"- model: {session['model']}", ""]
    for message in session["messages"]:
        status = "" if message["status"] == "complete" else f", {message['status']}"
        lines += [f"## {message['role']} ({message['created']}{status})", "", message["content"], ""]
    return "\n".join(lines)
