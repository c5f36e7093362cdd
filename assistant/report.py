"""The nights so far: one row a sleep run, with what the gate measured that night as the night stored
it (never measured again), and a plot of recall and retention over the nights."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from assistant.store import Store

NO_NIGHTS = "no nights yet: the model has not slept"
NOTHING_TO_PLOT = "no night has judged a block yet: nothing to plot"
COLUMNS = ("night", "date", "outcome", "block", "sessions", "recall", "retention", "ability drop", "reading",
           "seconds", "why")
MAX_TICKS = 12  # night numbers under the plot; more would run into each other
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class NightRow:
    """One sleep run as it was recorded."""

    night: int  # the sleep run's id
    started: str
    outcome: str  # promoted, rejected (the old block was kept), nothing, failed; running or cancelled without a report
    block: int | None  # the version the night grew, promoted or not
    block_status: str | None  # that version now: live, retired (superseded or rolled back), rejected...
    sessions: list[int]
    recall_before: float | None  # share of the night's held-out questions recalled, 0..1
    recall_after: float | None
    retention: float | None  # share of earlier nights' answers still recalled
    in_context_before: float | None  # share of reading exercises read as well as the bare model
    in_context_after: float | None
    ability_drop: float | None  # in-context reading lost, in percentage points (negative: it read better)
    reading_change: float | None  # mean nats the reading exercises moved against the bare model (the gate's test)
    seconds: float | None
    reason: str

    @property
    def judged(self) -> bool:
        """The gate measured a block this night."""
        return self.recall_after is not None


def nights(store: Store) -> list[NightRow]:
    """Every night, oldest first, from its run row and the report it stored."""
    statuses = {adapter["version"]: adapter["status"] for adapter in store.sleep.adapters()}
    return [_night(run, statuses) for run in store.sleep.runs()]


def _night(run: dict, statuses: dict[int, str]) -> NightRow:
    report = run.get("report") or {}
    block = report.get("adapter")
    before, after = report.get("in_context_before"), report.get("in_context_after")
    return NightRow(
        night=run["id"], started=run["started"], outcome=report.get("status") or run["status"],
        block=block, block_status=statuses.get(block), sessions=list(report.get("sessions") or []),
        recall_before=report.get("recall_before"), recall_after=report.get("recall_after"),
        retention=report.get("retention"), in_context_before=before, in_context_after=after,
        ability_drop=None if before is None or after is None else round(100 * (before - after), 2),
        reading_change=report.get("reading_change"),
        seconds=report.get("seconds"), reason=report.get("reason") or run.get("error") or "",
    )


def cells(row: NightRow) -> list[str]:
    """The row as a table shows it, one string per column of ``COLUMNS``: one line each, nothing the
    terminal would act on."""
    block = "-" if row.block is None else f"v{row.block} {row.block_status or 'unknown'}"
    drop = "-" if row.ability_drop is None else f"{row.ability_drop:+.1f} pts"
    reading = "-" if row.reading_change is None else f"{row.reading_change:+.2f} nats"
    seconds = "-" if row.seconds is None else f"{row.seconds:.0f}"
    return [str(row.night), row.started[:10], row.outcome, block, str(len(row.sessions)),
            f"{_percent(row.recall_before)} -> {_percent(row.recall_after)}", _percent(row.retention), drop, reading,
            seconds, _CONTROLS.sub(_escape, " ".join(row.reason.split()))]


def _escape(match: re.Match) -> str:
    # A stored error could hold an escape sequence: shown, it must read as text, never act on the terminal.
    return f"\\x{ord(match.group()):02x}"


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{share:.0%}"


def draw(plt, rows: Sequence[NightRow]) -> None:
    """Recall (*) and retention (o) in percent per night on ``plt`` (plotext, or a textual-plotext
    widget's plot): a point for each night that judged a block, lines between them."""
    judged = [row for row in rows if row.judged]
    kept = [row for row in judged if row.retention is not None]
    for series, share, marker, color in ((judged, "recall_after", "*", "cyan"), (kept, "retention", "o", "magenta")):
        if series:
            x, y = [row.night for row in series], [100 * getattr(row, share) for row in series]
            plt.plot(x, y, marker="braille", color=color)
            plt.scatter(x, y, marker=marker, color=color)
    ticks = [row.night for row in judged]
    if ticks:
        plt.xticks(ticks[:: -(-len(ticks) // MAX_TICKS)])  # every night, or every k-th when there are many
    plt.ylim(0, 100)
    plt.yticks([0, 25, 50, 75, 100])
    plt.title("recall (*) and retention (o) per night, %")
    plt.xlabel("night")


def plot(rows: Sequence[NightRow], width: int = 80, height: int = 16, *, color: bool = False) -> str:
    """The plot as text (``color``: with the terminal's colour codes), or why there is none."""
    if not any(row.judged for row in rows):
        return NOTHING_TO_PLOT if rows else NO_NIGHTS
    import plotext as plt  # here: only the report draws, and plotext is no small import

    plt.clear_figure()
    plt.plotsize(width, height)
    plt.theme("clear")  # the terminal's own background and text colours
    draw(plt, rows)
    text = plt.build()
    return text if color else plt.uncolorize(text)
