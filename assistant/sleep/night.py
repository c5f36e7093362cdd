"""What one night knows as it goes: its settings, its inputs, what each stage leaves for the next."""

from __future__ import annotations

import functools
import random
import shutil
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field

from assistant import adapters
from assistant.adapters import Stack
from assistant.config import Config, Paths
from assistant.models import (
    Model,
    hidden_size,
    local_model,
    material_for,
    require_trainable,
    system_prompt_for,
)
from assistant.persona import framed
from assistant.sleep.gate import Measurement, Probe, Readings, Verdict
from assistant.sleep.material import Material
from assistant.sleep.seeding import Row
from assistant.sleep.teach import Lesson
from assistant.store import Store
from backends.base import BlockTrainer, LoraSpec

Progress = Callable[[str, float, str], None]  # (stage, fraction done, message)
# The MLP projections only: adapting attention too cost in-context reading (docs/decisions.md).
MLP = ("gate_proj", "up_proj", "down_proj")
MIN_PROBES = 4  # held-out questions a night needs to be judged on them alone
# Of the night's budget, what sampled question lists, written and answered, may take: they widened
# nano's questions for no recall and cost Qwen half its training time (docs/decisions.md).
WIDENING_SHARE = 0.1
REFERENCE_WIDTH = 1024  # the hidden size ``SleepSettings.lr`` is the rate for


@dataclass(frozen=True)
class SleepSettings:
    """The night's knobs, each with why; measurements behind the values are in docs/decisions.md."""

    budget_minutes: float = 15.0  # the whole night, teaching to promotion: a night must end before the user is back
    rank: int = 16  # of each night's LoRA block: room for a day of facts, little for anything else
    lr: float = 2.6e-4  # Adam on the new block of a model 1024 wide (``rate``); zero-init B keeps the first step harmless
    max_steps: int = 400  # training stops here or at the budget, whichever comes first
    batch_size: int = 8  # rows per step, tonight's and replayed and anchors together
    question_lists: int = 3  # per window and wording: one greedy, the rest sampled while a tenth of the budget lasts
    probe_share: float = 0.3  # of each session's questions, held out for the gate and never trained on
    grounding: float = 2.0  # nats the session must add to an answer for it to be taught (7x more likely)
    replay_share: float = 0.5  # of a batch, earlier nights' answers, held to the live stack
    anchor_share: float = 0.4  # of a batch, everyday prompts and readings held to the live stack: reading goes first
    imitation: bool = False  # the paper's Learning-to-Imitate term beside distillation (an ablation until it wins)
    dream: bool = False  # stage 2, rehearsal of the model's own dreams (an ablation until it wins)
    retention_tolerance: float = 0.5  # nats an earlier answer may lose on average before a block is refused
    reading_tolerance: float = 0.5  # nats the readings may lose on average against the bare model: below it answers in context held
    seed: int = 0

    def rate(self, width: int | None) -> float:
        """Adam's rate for a model ``width`` wide (None: ``lr``): ``lr`` times REFERENCE_WIDTH / width,
        as GPT-3's rates and muP scale with width, so a narrow model takes the larger steps it needs."""
        return self.lr * REFERENCE_WIDTH / width if width else self.lr

    @property
    def spec(self) -> LoraSpec:
        """The night's new block: ``rank`` on the MLP projections, alpha twice the rank."""
        return LoraSpec(rank=self.rank, alpha=2 * self.rank, targets=MLP)


@dataclass
class SleepReport:
    status: str  # promoted, rejected, nothing or failed
    adapter: int | None = None
    sessions: list[int] = field(default_factory=list)
    recall_before: float | None = None
    recall_after: float | None = None
    retention: float | None = None
    in_context_before: float | None = None
    in_context_after: float | None = None
    seconds: float = 0.0
    reason: str = ""
    run: int | None = None
    training: dict = field(default_factory=dict)
    dreaming: dict = field(default_factory=dict)
    reading_change: float | None = None  # nats the block's in-context reading moved against the bare model

    def record(self) -> dict:
        return asdict(self)


@dataclass
class Night:
    """One night's state: set by ``cycle.open_night``, filled in stage by stage."""

    paths: Paths
    store: Store
    run_id: int
    settings: SleepSettings
    progress: Progress
    model: Model
    stack: Stack
    trainer: BlockTrainer
    pending: list[dict]
    material_source: Material
    dream_reward: Callable | None = None
    started: float = field(default_factory=time.monotonic)
    lessons: list[Lesson] = field(default_factory=list)  # tonight's, grounded
    probes: list[Probe] = field(default_factory=list)  # tonight's held out
    asked: list[Probe] = field(default_factory=list)  # what the gate judges recall by
    earlier: list[Probe] = field(default_factory=list)  # earlier nights' answers still true
    rows: list[Row] = field(default_factory=list)  # tonight's and replayed
    anchors: list[Row] = field(default_factory=list)  # everyday material, held to the live stack
    readings: Readings | None = None
    material: dict = field(default_factory=dict)  # the manifest's cache of the bare model's material answers
    before: Measurement | None = None
    candidates: dict[str, object] = field(default_factory=dict)  # name -> new block state
    training: dict = field(default_factory=dict)
    dreaming: dict = field(default_factory=dict)
    verdict: Verdict | None = None
    chosen: object = None
    report: SleepReport | None = None

    @property
    def sessions(self) -> list[int]:
        return [row["session_id"] for row in self.pending]

    def __post_init__(self) -> None:
        # One stream for the night, so its stages draw different numbers rather than the same ones.
        self.rng = random.Random(self.settings.seed + self.run_id)

    @property
    def scales(self) -> list[float]:
        """The frozen blocks' scales, as the live stack wears them."""
        return [block.scale for block in self.stack.adapters()]

    def widening_deadline(self) -> float:
        """When the teacher's sampled question lists, answers included, must end."""
        return self.started + WIDENING_SHARE * self.settings.budget_minutes * 60

    def left(self) -> float:
        """Seconds left of the night's budget."""
        return self.settings.budget_minutes * 60 - (time.monotonic() - self.started)

    def render(self, messages: list[dict]) -> str:
        return self.trainer.render_chat(messages)

    def say(self, stage: str, fraction: float, message: str) -> None:
        self.progress(stage, fraction, f"{message} ({max(0, self.left()) / 60:.1f} min left)")

    def questions(self) -> set[str]:
        """The questions tonight teaches or holds out."""
        return {lesson.question for lesson in self.lessons} | {probe.question for probe in self.probes}

    def earlier_answers(self, asked: set[str]) -> list[Probe]:
        """Earlier nights' answers (taught and held out) that tonight does not ask again and whose
        session is still stored: a deleted session's answers are neither replayed nor probed."""
        extra = self.stack.extra
        earlier = [Probe(**p) for p in extra.get("taught", []) + extra.get("probes", [])]
        return [p for p in earlier if p.question not in asked and self.exists(p.session_id)]

    def manifest(self) -> dict:
        """What the grown stack's manifest keeps for later nights: the answers still true (taught and
        held out), the verdict, and the bare model's material answers."""
        still, extra = {p.question for p in self.earlier}, self.stack.extra
        return {"model": self.model.ref, "weights": self.model.weights, "verdict": self.verdict.record(),
                "taught": [p for p in extra.get("taught", []) if p["question"] in still]
                + [asdict(lesson.probe()) for lesson in self.lessons],
                "probes": [p for p in extra.get("probes", []) if p["question"] in still] + [asdict(p) for p in self.probes],
                "material": self.material}

    def judged(self, version: int) -> SleepReport:
        v = self.verdict
        return SleepReport("promoted" if v.promote else "rejected", version, self.sessions, v.recall_before,
                           v.recall_after, v.retention, v.in_context_before, v.in_context_after, reason=v.reason,
                           training=self.training, dreaming=self.dreaming, reading_change=v.reading_change)

    def replayed(self) -> list[Probe]:
        """The earlier answers replayed tonight: those taught on earlier nights and still true
        (earlier probes are never trained on, so they can still tell what fades)."""
        taught = {p["question"] for p in self.stack.extra.get("taught", [])}
        return [p for p in self.earlier if p.question in taught]

    def learnt(self) -> dict[int, int]:
        """What a live adapter records as consolidated: each session up to its last message."""
        return {row["session_id"]: row["last_message_id"] for row in self.pending}

    def exists(self, session_id: int | None) -> bool:
        """Whether an earlier answer's session is still stored: a deleted session's answers are not replayed."""
        return session_id is not None and self.store.has_session(session_id)

    def nothing(self, reason: str) -> SleepReport:
        """No block: what the sessions say is already answered; the live adapter (or, before the first
        one, the bare model) is recorded as holding it, so later nights do not read them again."""
        if (live := self.store.sleep.live_adapter()) is not None:
            self.store.sleep.record_consolidation(live["id"], self.learnt())
        else:
            self.store.sleep.settle(self.learnt())
        return SleepReport("nothing", sessions=self.sessions, reason=reason)


def open_night(paths: Paths, config: Config, store: Store, run_id: int, settings: SleepSettings, progress: Progress,
               open_trainer: Callable[..., BlockTrainer] | None, dream_reward,
               sessions: Collection[int] | None = None) -> Night | SleepReport:
    """The night's sessions (of those not yet learnt, only ``sessions`` if given), model, live stack
    and trainer (a report instead when there is nothing to do)."""
    progress("select", 0.0, "looking for sessions to consolidate")
    for orphan in adapters.orphan_blocks(paths.home):  # a killed save's folder: it may hold what a session said
        shutil.rmtree(orphan, ignore_errors=True)
    pending = [row for row in store.sleep.unconsolidated_sessions() if sessions is None or row["session_id"] in sessions]
    if not pending:
        return SleepReport("nothing", reason="nothing to consolidate: no new sessions since the last sleep")
    model = local_model(config.model, paths)
    require_trainable(model, "sleep")
    stack = adapters.live_stack(store)
    if stack.blocks and not adapters.grown_on(stack, model):
        progress("teach", 0.0, "the live adapter was grown on another model: starting a new stack")
        stack = adapters.empty_stack()  # the old one stays on disk for the model it was grown on
    if open_trainer is None:
        from backends.select import choose_engines
        from backends.select import open_trainer as open_engine
        open_trainer = functools.partial(open_engine, choose_engines(config.backend)[1])
    trainer = open_trainer(model.path, blocks=stack.adapters(), spec=settings.spec,
                           lr=settings.rate(hidden_size(model)), seed=settings.seed)
    frame(trainer, system_prompt_for(model, config))  # the night's prompts read as the day's chat does

    def told(stage: str, fraction: float, message: str) -> None:
        store.sleep.set_stage(run_id, stage)
        progress(stage, fraction, message)

    return Night(paths, store, run_id, settings, told, model, stack, trainer, pending, material_for(model),
                 dream_reward)


def frame(trainer: BlockTrainer, system: str | None) -> None:
    """Put ``system`` (None: nothing) before every chat ``trainer`` renders from now on."""
    if system is not None:
        trainer.render_chat = functools.partial(_render_framed, trainer.render_chat, system)


def _render_framed(render, system: str, messages, add_generation_prompt: bool = True) -> str:
    return render(framed(messages, system), add_generation_prompt=add_generation_prompt)
