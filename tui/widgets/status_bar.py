"""The status bar: what answers (model, engine, live adapter) and what sleep did and will do.

While a sleep runs, a progress bar with the current stage takes the place of the schedule.
"""

from __future__ import annotations

from dataclasses import dataclass

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Label, ProgressBar


@dataclass(frozen=True)
class StatusLine:
    """Everything the bar shows when no sleep runs, as display text."""

    model: str
    engine: str
    adapter: str
    last_sleep: str
    next_sleep: str

    def text(self) -> str:
        return (f"{self.model} · {self.engine} · adapter {self.adapter} · "
                f"last sleep {self.last_sleep} · next sleep {self.next_sleep}")


class StatusBar(Horizontal):
    """One line at the bottom of the screen."""

    line: StatusLine | None = None  # the last line asked for, shown again once the label is mounted

    def compose(self) -> ComposeResult:
        yield Label("starting", id="status-text", markup=False)
        yield Label("", id="sleep-stage", markup=False)
        yield ProgressBar(total=1.0, show_eta=False, id="sleep-progress")

    def on_mount(self) -> None:
        if self.line is not None:
            self.show(self.line)

    def show(self, line: StatusLine) -> None:
        """Show ``line``; asked before the bar's label is mounted (or after it is gone, as the app
        exits), the line waits for ``on_mount`` instead of raising."""
        self.line = line
        for label in self.query("#status-text").results(Label):
            label.update(line.text())

    def sleep_started(self, reason: str) -> None:
        self.add_class("-sleeping")
        self.query_one("#sleep-stage", Label).update(f"sleeping ({reason}): starting")
        self.query_one("#sleep-progress", ProgressBar).update(progress=0.0)

    def sleep_progress(self, stage: str, progress: float, message: str = "") -> None:
        detail = f"{stage}: {message}" if message else stage
        self.query_one("#sleep-stage", Label).update(f"sleeping · {detail}")
        self.query_one("#sleep-progress", ProgressBar).update(progress=max(0.0, min(1.0, progress)))

    def sleep_finished(self) -> None:
        self.remove_class("-sleeping")

    @property
    def sleeping_stage(self) -> str:
        return str(self.query_one("#sleep-stage", Label).render()) if self.has_class("-sleeping") else ""
