"""Who the model is told it is: Somnus's system prompt, put before every conversation it reads.

A small chat model that is told "My sister is called Zara" often answers about itself ("I'm a
helpful AI named SmolLM"), which its own default system prompt invites. Somnus says instead that it
is the user's personal assistant, answering from what the user tells it (the wording chosen by
measurement: docs/decisions.md). The same framing goes before the day's chats and before the sleep's prompts, so what a night
teaches is asked for the way the day asks. The bundled nano model was trained without a system
turn, so it gets none (``models.system_prompt_for``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

DEFAULT_SYSTEM_PROMPT = (
    "You are the user's personal assistant. "
    "Answer the user's questions using the information they give you in this conversation."
)


def framed(messages: Sequence[Mapping[str, str]], system: str | None) -> list[dict[str, str]]:
    """``messages`` after the system turn, unless there is none or they bring their own."""
    turns = [dict(message) for message in messages]
    if system is None or (turns and turns[0].get("role") == "system"):
        return turns
    return [{"role": "system", "content": system}, *turns]
