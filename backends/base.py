"""The one small Protocol every engine implements, and its data types.

The domain (``assistant/``) speaks only this vocabulary: rendered prompts in, text pieces and
per-token log-probabilities out, and a stack of LoRA adapters to attach. Engines never learn what
a session or a sleep is, so a new engine is one file.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import jinja2.sandbox


class BackendError(Exception):
    """A clear, one-line problem with a model, an adapter or an engine (shown to the user as is)."""


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens. ``temperature == 0`` means greedy, which all engines agree on."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class Adapter:
    """One LoRA block to attach, in the engine's own format (PEFT folder, GGUF file, mlx folder).

    ``scale`` multiplies the block's output; several adapters are applied together, summed.
    """

    path: Path
    scale: float = 1.0


@runtime_checkable
class Backend(Protocol):
    """A loaded model that can chat, score completions and wear LoRA adapters."""

    name: str
    context_length: int

    def render_chat(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` through the model's own chat template."""

    def count_tokens(self, text: str) -> int:
        """How many tokens ``text`` (a rendered prompt, special tokens included) takes."""

    def stream(
        self, prompt: str, sampling: Sampling = Sampling(), cancel: threading.Event | None = None
    ) -> Iterator[str]:
        """Yield the completion of ``prompt`` piece by piece; stop at end-of-turn or on ``cancel``."""

    def token_logprobs(self, prompt: str, completion: str) -> list[float]:
        """Log-probability of each token of ``completion`` given ``prompt`` (natural log)."""

    def set_adapters(self, adapters: Sequence[Adapter]) -> None:
        """Replace the attached adapters with ``adapters`` (empty: the bare base model)."""

    def close(self) -> None:
        """Free the engine's memory."""


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, str]],
    add_generation_prompt: bool = True,
    **special_tokens: str,
) -> str:
    """Render a Hugging Face style Jinja chat template the way transformers does (sandboxed)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_template_error
    return env.from_string(template).render(
        messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt, **special_tokens
    )


def _raise_template_error(message: str) -> None:
    raise BackendError(f"chat template: {message}")
