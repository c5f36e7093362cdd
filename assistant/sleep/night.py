"""What one night knows as it goes: its settings, its inputs, what each stage leaves for the next."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from assistant.adapters import Stack
from assistant.config import Paths
from assistant.models import Model
from assistant.sleep.material import Material
from assistant.sleep.gate import Measurement, Probe, Readings, Verdict
from assistant.sleep.seeding import Row
from assistant.sleep.teach import Lesson
from assistant.store import Store
from backends.base import BlockTrainer

Progress = Callable[[str, float, str], None]  # (stage, fraction done, message)


@dataclass(frozen=True)
class SleepSettings:
    """The night's knobs, each with why; measurements behind the values are in docs/decisions.md."""

    budget_minutes: float = 15.0  # the whole night, teaching to promotion: a night must end before the user is back
    rank: int = 16  # of each night's LoRA block: room for a day of facts, little for anything else
    lr: float = 1e-3  # Adam on the new block only; zero-init B keeps the first step harmless
    max_steps: int = 400  # training stops here or at the budget, whichever comes first
    batch_size: int = 8  # rows per step, tonight's and replayed and anchors together
    question_lists: int = 3  # lists of questions the teacher writes per window (one greedy, the rest sampled)
    probe_share: float = 0.3  # of each session's questions, held out for the gate and never trained on
    grounding: float = 2.0  # nats the session must add to an answer for it to be taught (7x more likely)
    replay_share: float = 0.5  # of a batch, earlier nights' answers, held to the live stack
    anchor_share: float = 0.25  # of a batch, everyday prompts, held to the live stack
    imitation: bool = False  # the paper's Learning-to-Imitate term beside distillation (an ablation until it wins)
    dream: bool = False  # stage 2, rehearsal of the model's own dreams (an ablation until it wins)
    retention_tolerance: float = 0.5  # nats an earlier answer may lose on average before a block is refused
    reading_tolerance: float = 0.25  # nats the readings may lose on average against the bare model
    seed: int = 0


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
    rows: list[Row] = field(default_factory=list)
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

    @property
    def rng(self) -> random.Random:
        return random.Random(self.settings.seed + self.run_id)

    def left(self) -> float:
        """Seconds left of the night's budget."""
        return self.settings.budget_minutes * 60 - (time.monotonic() - self.started)

    def render(self, messages: list[dict]) -> str:
        return self.trainer.render_chat(messages)

    def say(self, stage: str, fraction: float, message: str) -> None:
        self.progress(stage, fraction, f"{message} ({max(0, self.left()) / 60:.1f} min left)")
