"""The one small Protocol every engine implements, and its data types.

The domain (``assistant/``) speaks only this vocabulary: rendered prompts in, text pieces and
per-token log-probabilities out, and a stack of LoRA adapters to attach. Engines never learn what
a session or a sleep is, so a new engine is one file.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import jinja2.sandbox


class BackendError(Exception):
    """A clear, one-line problem with a model, an adapter or an engine (shown to the user as is)."""


def first_line(error: BaseException) -> str:
    """A library's error as one line for a BackendError: its first line, or its type when it says nothing."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# Special tokens that end a text wherever a model's vocabulary has them. llama.cpp stops generating at
# every one of them (its end-of-generation set), not only at the declared end of turn, so the other
# engines stop there too: a model that samples <|endoftext|> mid-reply ends the reply on all three.
END_OF_TEXT = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>", "<end_of_turn>", "</s>")


def end_token_ids(eos_token_id: int | None, added_vocab: Mapping[str, int]) -> frozenset[int]:
    """The ids that end generation: the end of turn, and the end-of-text tokens the vocabulary adds."""
    ends = {added_vocab[text] for text in END_OF_TEXT if text in added_vocab}
    return frozenset(ends | ({eos_token_id} if eos_token_id is not None else set()))


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


@dataclass(frozen=True)
class LoraSpec:
    """The shape of a new LoRA block: rank, alpha (scale = alpha / rank) and the projections it adapts."""

    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj", "q_proj", "k_proj", "v_proj", "o_proj")


@runtime_checkable
class BlockTrainer(Protocol):
    """A model wearing frozen LoRA blocks plus one new, trainable block: the sleep's student.

    The same object is also the teacher and the reference: ``new_block=False`` computes with the
    frozen blocks only, i.e. exactly the pre-sleep model (the new block starts at B = 0, so before
    the first step both views agree to the bit). Arrays are the engine's own (torch tensors or mlx
    arrays); losses reach them through ``ops`` so they are written once for every engine.
    """

    name: str
    ops: object  # backends.ops.ArrayOps
    context_length: int
    precision: str  # the frozen weights' dtype ("float32", "bfloat16"): likelihoods kept across nights depend on it

    def render_chat(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` through the model's own chat template."""

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, special tokens parsed."""

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` with special tokens dropped."""

    def generate(self, prompts: Sequence[str], sampling: Sampling, *, new_block: bool) -> list[str]:
        """Batched completions of rendered ``prompts``, each stopped at end of turn."""

    def completion_logits(
        self, prefixes: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], *, new_block: bool
    ) -> tuple[object, object]:
        """(logits [B, T, V], mask [B, T]) without gradient; row t predicts ``completions[b][t]``."""

    def train_step(
        self,
        prefixes: Sequence[Sequence[int]],
        completions: Sequence[Sequence[int]],
        loss_fn: Callable[[object, object, object], object],
    ) -> float:
        """One optimiser step of the new block on ``loss_fn(logits, targets, mask)``; returns the loss."""

    def gradient_norm(
        self,
        prefixes: Sequence[Sequence[int]],
        completions: Sequence[Sequence[int]],
        loss_fn: Callable[[object, object, object], object],
    ) -> float:
        """The L2 norm of the new block's gradient of the loss, without a step (scores dreams)."""

    def set_block_scales(self, scales: Sequence[float]) -> None:
        """Rescale the frozen blocks (0 drops one): the dreams' noise over old memories."""

    def new_block_state(self) -> object:
        """A copy of the new block's weights, to come back to (dreaming trains on a copy)."""

    def load_new_block_state(self, state: object, lr: float | None = None) -> None:
        """Put weights from ``new_block_state`` back into the new block; the optimiser starts afresh
        (at learning rate ``lr`` when given)."""

    def save_new_block(self, path: Path) -> None:
        """Write the new block as a PEFT LoRA folder that every engine's ``set_adapters`` loads."""

    def close(self) -> None:
        """Free the engine's memory."""
