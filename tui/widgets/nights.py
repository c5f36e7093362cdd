"""The Nights page: every night in a table, then recall and retention plotted over the nights."""

from __future__ import annotations

from collections.abc import Sequence

from textual.app import ComposeResult
from textual_plotext import PlotextPlot

from assistant.report import NightRow, draw
from tui.widgets.dialogs import PageScreen


class NightsScreen(PageScreen):
    """The nights' table (Markdown) and, once a night has judged a block, the plot under it."""

    def __init__(self, markdown: str, rows: Sequence[NightRow]) -> None:
        super().__init__(markdown, name="nights")
        self.add_class("nights")
        self.rows = list(rows)

    def body(self) -> ComposeResult:
        yield from super().body()
        if any(row.judged for row in self.rows):
            yield PlotextPlot(id="nights-plot")

    def on_mount(self) -> None:
        for plot in self.query(PlotextPlot):
            draw(plot.plt, self.rows)
