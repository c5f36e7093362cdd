"""Scripted fakes at the engine seam, so the sleep's orchestration is tested in milliseconds.

``FakeTrainer`` implements ``backends.base.BlockTrainer`` with no model at all, in the manner of
simonw/llm's ``MockModel``: its answers are scripted and every call is recorded. What it knows is
a list of ``Fact``s, read the way a chat model reads a session:

- with a session in its context (the teacher), it answers a question about a fact the session
  says; when several sentences answer it, the one said last wins, as a newer statement should;
- asked for questions (``teach.ASK``, or the dreams' request), it lists the questions of the facts
  in its context;
- with no context (the student, or the live stack), it answers from memory: the frozen blocks it
  was opened with (their memories are stored in the block files it saved) and, with the new block
  on, what training taught the new block, once the block is strong enough (``learns_after``).

Training teaches a student's prompt the completion it is trained towards when that is a fact's
answer to it, or the user's words telling it (and then every phrasing of that fact); the
student's own samples teach nothing, as distillation pulls them towards the teacher rather than
towards themselves. The new block's strength is its optimiser steps (a checkpoint's step, as the
gate loads it), so a test scripts which of the gate's candidates recall, forget older nights'
facts (``forgets``) or stop reading their context (``reading_lost_after``), and so drives the gate
to promote or to reject. ``respond`` overrides any answer (canned responses); ``crash_on`` makes a
method raise once, at its n-th call of a night. Each ``open`` starts a ``Night`` record: the
prompts generated, the rows trained, the scales set, the blocks saved.

``FakeChatBackend`` is the chat side's ``Backend``: a canned reply, for recording (or not) a day.
Tokens are UTF-8 bytes plus five special tokens, so encode and decode round-trip any text.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from assistant.sleep.rewards import normalise_answer
from assistant.sleep.teach import ASK
from backends.base import Adapter, BackendError, LoraSpec, Sampling
from backends.ops import TORCH_OPS
from backends.peft_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_lora

SPECIALS = ("<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
END = "<|end|>"
GENERATION_PROMPT = "<|assistant|>"
VOCAB = len(SPECIALS) + 256
UNKNOWN = "I don't know."
UNREAD = "I cannot read that."  # what a candidate that lost its reading says with a context
NO_QUESTIONS = "I have no questions."
MEMORY_KEY = "somnus_fake_memory"  # safetensors metadata: what a saved block answers from memory
CONFIDENT = 12.0  # logit of the token the fake would say next: probability ~0.995 over 261 tokens
DEFAULT_SPEC, DEFAULT_SAMPLING = LoraSpec(), Sampling()
RECALL_SCALE = 0.5  # a frozen block worn at less than this (dreams' noise) recalls nothing

_SPECIAL = re.compile("(" + "|".join(re.escape(token) for token in SPECIALS) + ")")
_TURN = re.compile(r"<\|(system|user|assistant)\|>(.*?)<\|end\|>\n", re.DOTALL)


def encode(text: str) -> list[int]:
    """Special tokens as their ids, everything else one id per UTF-8 byte."""
    return list(_encode(text))


def decode(ids: Sequence[int], specials: bool = False) -> str:
    """The text of ``ids``; special tokens dropped, as the Protocol says, unless ``specials``."""
    return _decode(tuple(ids), specials)


@functools.lru_cache(maxsize=8192)  # a night encodes and decodes the same prompts many times
def _encode(text: str) -> tuple[int, ...]:
    ids: list[int] = []
    for part in _SPECIAL.split(text):
        if part in SPECIALS:
            ids.append(SPECIALS.index(part))
        elif part:
            ids += [len(SPECIALS) + byte for byte in part.encode("utf-8")]
    return tuple(ids)


@functools.lru_cache(maxsize=8192)
def _decode(ids: tuple[int, ...], specials: bool) -> str:
    text, start = [], 0
    for at in [i for i, token in enumerate(ids) if token < len(SPECIALS)] + [len(ids)]:
        text.append(bytes(token - len(SPECIALS) for token in ids[start:at]).decode("utf-8", "replace"))
        if specials and at < len(ids):
            text.append(SPECIALS[ids[at]])
        start = at + 1
    return "".join(text)


def render_chat(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
    """A deterministic template: ``<|role|>content<|end|>`` per turn, then ``<|assistant|>``."""
    text = "".join(f"<|{m['role']}|>{m['content']}{END}\n" for m in messages)
    return text + (GENERATION_PROMPT if add_generation_prompt else "")


def parse_chat(prompt: str) -> tuple[list[dict], str | None]:
    """The turns of a rendered prompt (system turns left out) and the text the assistant has
    already begun after the generation prompt ("" for none; None when there is no generation
    prompt)."""
    turns, at = [], 0
    for match in _TURN.finditer(prompt):
        if match.start() != at:
            break
        at = match.end()
        if match.group(1) != "system":
            turns.append({"role": match.group(1), "content": match.group(2)})
    tail = prompt[at:]
    return turns, tail[len(GENERATION_PROMPT):] if tail.startswith(GENERATION_PROMPT) else None


def make_model_folder(folder: Path) -> Path:
    """A folder that ``assistant.models`` resolves as a Hugging Face model (config.json and
    safetensors weights) and no engine could load: only a fake trainer ever opens it."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "somnus-fake"}))
    save_file({"weight": torch.zeros(4)}, str(folder / "model.safetensors"))
    return folder


@dataclass(frozen=True)
class Fact:
    """A sentence the user may say, the questions it answers, and the answer read from it.

    Two facts with the same questions and different answers are one thing said two ways ("I live
    in Porto." then "I live in Lyon now."): read together, the later sentence answers."""

    said: str
    questions: tuple[str, ...]
    answer: str
    writes: tuple[str, ...] = ()  # the questions the teacher writes about it, when not all of ``questions``

    def asked_by(self, text: str) -> bool:
        """Whether ``text`` is one of the fact's questions, however it is led in ("Hey, where ...")."""
        return any(text.lower().endswith(question.lower()) for question in self.questions)


class FakeCrash(RuntimeError):
    """The failure ``crash_on`` scripts, as an engine's error in the middle of a night."""


@dataclass(frozen=True)
class Generation:
    prompt: str
    new_block: bool
    sampling: Sampling
    text: str


@dataclass(frozen=True)
class Trained:
    """One row of a training step: the prompt as rendered and the completion as decoded."""

    step: int
    prompt: str
    completion: str

    @property
    def question(self) -> str | None:
        """The bare question when the prompt is one user turn and nothing else (a student's prompt)."""
        turns, begun = parse_chat(self.prompt)
        return turns[0]["content"] if len(turns) == 1 and turns[0]["role"] == "user" and begun == "" else None


@dataclass
class Night:
    """Everything one opening of the fake saw: how it was opened, and each call of the night."""

    model_path: Path | None = None
    blocks: list[Adapter] = field(default_factory=list)
    spec: LoraSpec | None = None
    lr: float | None = None
    seed: int | None = None
    calls: Counter = field(default_factory=Counter)
    generated: list[Generation] = field(default_factory=list)
    trained: list[Trained] = field(default_factory=list)
    scales: list[list[float]] = field(default_factory=list)
    loaded_lrs: list[float | None] = field(default_factory=list)
    saved: list[Path] = field(default_factory=list)
    closed: bool = False

    def prompts(self, *, new_block: bool | None = None) -> list[str]:
        return [g.prompt for g in self.generated if new_block is None or g.new_block == new_block]


class FakeTrainer:
    """A ``BlockTrainer`` whose knowledge is ``facts`` and whose learning is scripted.

    ``learns_after``: the new block's strength (its optimiser steps) from which it
    recalls what it was trained on (None: it never learns). ``forgets_after``: from which it
    answers none of the questions of the facts in ``forgets``, whatever the frozen blocks or its
    own training say. ``reading_lost_after``: from which it no longer reads its context (text in
    context that says no fact it answers with ``UNKNOWN``, and with ``UNREAD`` once reading is lost).
    ``respond(turns, new_block)``: an answer that overrides the scripted reading when not None.
    """

    name = "fake"

    def __init__(
        self,
        facts: Iterable[Fact] = (),
        *,
        learns_after: float | None = 1.0,
        forgets: Iterable[Fact] = (),
        forgets_after: float | None = None,
        reading_lost_after: float | None = None,
        respond: Callable[[list[dict], bool], str | None] | None = None,
        context_length: int = 4096,
    ) -> None:
        self.ops = TORCH_OPS
        self.precision = "float32"
        self.context_length = context_length
        self.facts = list(facts)
        self.learns_after = learns_after
        self.forgets = list(forgets)
        self.forgets_after = forgets_after
        self.reading_lost_after = reading_lost_after
        self.respond = respond
        self.nights: list[Night] = []
        self._crashes: dict[str, tuple[int, BaseException]] = {}
        self._reset()

    # -- scripting and inspection -------------------------------------------------------------------

    def open(self, model_path: Path, *, blocks: Sequence[Adapter] = (), spec: LoraSpec = DEFAULT_SPEC,
             lr: float = 1e-3, seed: int = 0) -> FakeTrainer:
        """``sleep_cycle``'s ``open_trainer``: a new night wearing ``blocks``, read as an engine
        would (a folder that is no PEFT LoRA fails here)."""
        frozen = []
        for block in blocks:
            read_lora(block.path)
            frozen.append(_read_memory(block.path))
        self.__dict__.pop("render_chat", None)  # the cycle may have framed the last night's template
        self.nights.append(Night(Path(model_path), list(blocks), spec, lr, seed))
        self._reset(frozen, [block.scale for block in blocks])
        return self

    def crash_on(self, method: str, call: int = 1, error: BaseException | None = None) -> None:
        """Make ``method`` raise ``error`` (a ``FakeCrash`` by default) at its ``call``-th call of
        the night, once."""
        self._crashes[method] = (call, error or FakeCrash(f"scripted crash in {method}, call {call}"))

    @property
    def night(self) -> Night:
        """The current night's record (one is started if the fake is used without ``open``)."""
        if not self.nights:
            self.nights.append(Night())
        return self.nights[-1]

    def strength(self) -> float:
        """The new block's strength: its steps since it started at B = 0, times its scale."""
        return float((self._b @ self._a)[0, 0])

    def answer(self, messages: Sequence[Mapping[str, str]], *, new_block: bool) -> str:
        """What the fake says after ``messages`` (a check for tests; recorded nowhere)."""
        return self._answer([dict(m) for m in messages if m["role"] != "system"], new_block)

    # -- BlockTrainer --------------------------------------------------------------------------------

    def render_chat(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        return render_chat(messages, add_generation_prompt)

    def encode(self, text: str) -> list[int]:
        return encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return decode(ids)

    def generate(self, prompts: Sequence[str], sampling: Sampling, *, new_block: bool) -> list[str]:
        self._called("generate")
        texts = []
        for prompt in prompts:
            text = decode(encode(self._continue(prompt, new_block))[: sampling.max_tokens])
            self.night.generated.append(Generation(prompt, new_block, sampling, text))
            if new_block:  # the student's own samples: distilling on them teaches the teacher's view, not them
                self._sampled.add(normalise_answer(text))
            texts.append(text)
        return texts

    def completion_logits(self, prefixes: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], *,
                          new_block: bool) -> tuple[torch.Tensor, torch.Tensor]:
        self._called("completion_logits")
        return self._logits(prefixes, completions, new_block)

    def train_step(self, prefixes: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                   loss_fn: Callable[[object, object, object], object]) -> float:
        self._called("train_step")
        loss = self._backward(prefixes, completions, loss_fn)
        self._bias.grad = None
        step = self.night.calls["train_step"]
        for prefix, completion in zip(prefixes, completions):
            row = Trained(step, decode(prefix, specials=True), decode(completion))
            self.night.trained.append(row)
            self._learn(row)
        with torch.no_grad():  # one step adds exactly 1 to the strength, whatever the scale
            self._b[0, 0] += 1.0 / float(self._a[0, 0])
        return loss

    def gradient_norm(self, prefixes: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                      loss_fn: Callable[[object, object, object], object]) -> float:
        self._called("gradient_norm")
        self._backward(prefixes, completions, loss_fn)
        norm = float(self._bias.grad.norm())
        self._bias.grad = None
        return norm

    def set_block_scales(self, scales: Sequence[float]) -> None:
        self._called("set_block_scales")
        if len(scales) != len(self._frozen):
            raise ValueError(f"{len(scales)} scales for {len(self._frozen)} frozen blocks")
        self._scales = [float(scale) for scale in scales]
        self.night.scales.append(list(self._scales))

    def new_block_state(self) -> list[torch.Tensor]:
        self._called("new_block_state")
        return [self._a.clone(), self._b.clone()]

    def load_new_block_state(self, state: object, lr: float | None = None) -> None:
        self._called("load_new_block_state")
        a, b = state
        self._a, self._b = a.clone(), b.clone()
        self.night.loaded_lrs.append(lr)

    def save_new_block(self, path: Path) -> None:
        """A PEFT LoRA folder (one layer per target of the spec), written under a temporary name
        and renamed, as the real engines do; its memory rides in the safetensors metadata. A
        scripted crash here leaves a half-written folder at ``path``, the worst an engine could do."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.exists():
            raise BackendError(f"{path}: already exists, a block is never overwritten")
        spec = self.night.spec or DEFAULT_SPEC
        rank = self._a.shape[0]
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(self.night.model_path),
                  "r": rank, "lora_alpha": spec.alpha * rank / spec.rank, "lora_dropout": 0.0,
                  "target_modules": sorted(spec.targets), "bias": "none", "inference_mode": True}
        if self._crashes.get("save_new_block", (0,))[0] == self.night.calls["save_new_block"] + 1:
            path.mkdir(parents=True)
            (path / ADAPTER_CONFIG).write_text(json.dumps(config))
        self._called("save_new_block")
        recalled = self.learns_after is not None and self.strength() >= self.learns_after
        tensors = {f"base_model.model.model.layers.0.mlp.{target}.lora_{part}.weight": weight.clone()
                   for target in spec.targets for part, weight in (("A", self._a), ("B", self._b))}
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
        try:
            (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
            save_file(tensors, str(staging / ADAPTER_WEIGHTS),
                      metadata={"format": "pt", MEMORY_KEY: json.dumps(self._learnt if recalled else {})})
            os.rename(staging, path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.night.saved.append(path)

    def close(self) -> None:
        self._called("close")
        self.night.closed = True

    # -- the scripted model --------------------------------------------------------------------------

    def _reset(self, frozen: Sequence[dict[str, str]] = (), scales: Sequence[float] = ()) -> None:
        self._frozen = list(frozen)
        self._scales = list(scales)
        self._a = torch.zeros(2, 4)
        self._a[0, 0] = 1.0
        self._b = torch.zeros(4, 2)  # B = 0: the new block changes nothing until it trains
        self._bias = torch.zeros(VOCAB, requires_grad=True)  # what gradients reach
        self._learnt: dict[str, str] = {}  # bare question (lower case) -> answer, taught to the new block
        self._sampled: set[str] = set()

    def _called(self, method: str) -> None:
        self.night.calls[method] += 1
        call, error = self._crashes.get(method, (0, None))
        if error is not None and call == self.night.calls[method]:
            del self._crashes[method]  # once: the next night runs as if the engine had been restarted
            raise error

    def _continue(self, prompt: str, new_block: bool) -> str:
        """The rest of the answer to a rendered prompt, after whatever the assistant has begun."""
        turns, begun = parse_chat(prompt)
        if begun is None:
            return ""
        full = self._answer(turns, new_block)
        return full[len(begun):] if full.startswith(begun) else ""

    def _answer(self, turns: list[dict], new_block: bool) -> str:
        if self.respond is not None and (scripted := self.respond(turns, new_block)) is not None:
            return scripted
        asked = turns[-1]["content"] if turns and turns[-1]["role"] == "user" else ""
        context = turns[:-1]
        heard = "\n".join(m["content"] for m in context if m["role"] == "user")
        cannot_read = new_block and _reached(self.strength(), self.reading_lost_after)
        if asked == ASK:  # the night's request for questions, and the dreams'
            questions = list(dict.fromkeys(q for fact in self._said_in(heard) for q in fact.writes or fact.questions))
            return "\n".join(f"{n}. {q}" for n, q in enumerate(questions, 1)) or NO_QUESTIONS
        if context:
            if cannot_read:
                return UNREAD
            answering = [fact for fact in self._said_in(heard) if fact.asked_by(asked)]
            return answering[-1].answer if answering else UNKNOWN
        return self._recall(asked, new_block) or UNKNOWN

    def _said_in(self, heard: str) -> list[Fact]:
        """The facts ``heard`` says, in the order it last says them."""
        said = [fact for fact in self.facts if fact.said in heard]
        return sorted(said, key=lambda fact: heard.rfind(fact.said))

    def _bare(self, asked: str) -> str | None:
        """The known question ``asked`` ends with, lower-cased (the key of every memory)."""
        found = [q.lower() for fact in self.facts for q in fact.questions if asked.lower().endswith(q.lower())]
        return max(found, key=len) if found else None

    def _recall(self, asked: str, new_block: bool) -> str | None:
        question = self._bare(asked)
        if question is None:
            return None
        strength = self.strength() if new_block else 0.0
        if new_block and _reached(strength, self.forgets_after) and any(f.asked_by(asked) for f in self.forgets):
            return None
        if new_block and _reached(strength, self.learns_after) and question in self._learnt:
            return self._learnt[question]
        for memory, scale in reversed(list(zip(self._frozen, self._scales))):
            if scale >= RECALL_SCALE and question in memory:
                return memory[question]
        return None

    def _learn(self, row: Trained) -> None:
        """A student's prompt trained towards a fact's answer, or towards the user's words that tell
        it (a recital), teaches every phrasing of that fact; the student's own samples and
        everything else teach nothing."""
        question = row.question
        answer = normalise_answer(row.completion)
        if question is None or answer in self._sampled:
            return
        for fact in self.facts:
            if (fact.asked_by(question) and normalise_answer(fact.answer) == answer
                    or normalise_answer(fact.said) in answer):
                self._learnt.update({q.lower(): fact.answer for q in fact.questions})

    def _logits(self, prefixes, completions, new_block: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits sure of the fake's own answer after each prefix, token by token, while the
        completion follows it; uniform from where it leaves it."""
        width = max((len(c) for c in completions), default=0)
        logits = torch.zeros(len(prefixes), width, VOCAB)
        mask = torch.zeros(len(prefixes), width)
        for row, (prefix, completion) in enumerate(zip(prefixes, completions)):
            expected = encode(self._continue(decode(prefix, specials=True), new_block) + END)
            mask[row, : len(completion)] = 1.0
            for t in range(min(len(completion), len(expected))):
                if list(completion[:t]) != expected[:t]:
                    break  # off the fake's own answer: no opinion about the rest (uniform)
                logits[row, t, expected[t]] = CONFIDENT
        return logits, mask

    def _backward(self, prefixes, completions, loss_fn) -> float:
        logits, mask = self._logits(prefixes, completions, new_block=True)
        width = logits.shape[1]
        targets = torch.tensor([list(c) + [0] * (width - len(c)) for c in completions], dtype=torch.long)
        loss = loss_fn(logits + self._bias, targets, mask)
        loss.backward()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise BackendError(f"training step refused: the loss ({value}) is not finite")
        return value


def _reached(strength: float, threshold: float | None) -> bool:
    return threshold is not None and strength >= threshold


def _read_memory(folder: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(Path(folder) / ADAPTER_WEIGHTS), framework="pt") as weights:
        return json.loads((weights.metadata() or {}).get(MEMORY_KEY, "{}"))


class FakeChatBackend:
    """A chat ``Backend`` that streams a canned reply, for recording a day through ``assistant.chat``."""

    name = "fake"
    context_length = 4096

    def __init__(self, reply: str = "Noted.") -> None:
        self.reply = reply
        self.prompts: list[str] = []
        self.adapters: list[list[Adapter]] = []

    def render_chat(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        return render_chat(messages, add_generation_prompt)

    def count_tokens(self, text: str) -> int:
        return len(encode(text))

    def stream(self, prompt: str, sampling: Sampling = DEFAULT_SAMPLING,
               cancel: threading.Event | None = None) -> Iterator[str]:
        self.prompts.append(prompt)
        yield from self.reply.split(" ")[:1] + [" " + word for word in self.reply.split(" ")[1:]]

    def token_logprobs(self, prompt: str, completion: str) -> list[float]:
        return [0.0] * len(encode(completion))

    def set_adapters(self, adapters: Sequence[Adapter]) -> None:
        self.adapters.append(list(adapters))

    def close(self) -> None:
        pass
