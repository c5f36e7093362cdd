"""`somnus report` and the app's Nights page: every night as it stored what the gate measured, and the plot."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from assistant.config import load_config, open_paths
from assistant.report import NO_NIGHTS, NOTHING_TO_PLOT, nights, plot
from assistant.sleep.night import SleepReport
from assistant.store import Store
from cli.main import app as cli_app

WIDE = {"COLUMNS": "200"}  # rich wraps its table at 80 columns off a terminal; the cells are asserted whole


def promoted_night(store: Store, version: int, sessions: list[int], recall: tuple[float, float],
                   retention: float | None, reading: tuple[float, float], seconds: float, parent: int | None = None,
                   live: bool = True) -> int:
    """A night that grew block ``version``: promoted (``live``) or rejected by the gate, as the cycle records it."""
    ledger = store.sleep
    run = ledger.start_run()
    adapter = ledger.add_adapter(version, f"/blocks/{version}", parent_version=parent, sleep_run_id=run,
                                 scores={"recall_before": 0.0, "recall_after": 0.0})  # not what the report reads
    if live:
        ledger.promote(adapter, {})
    else:
        ledger.set_adapter_status(adapter, "rejected")
    report = SleepReport("promoted" if live else "rejected", version, sessions, *recall, retention, *reading,
                         seconds=seconds, reason=f"the gate on v{version}", run=run, training={"steps": 40},
                         reading_change=round(reading[1] - reading[0], 2))
    ledger.finish_run(run, "complete", report=report.record())
    return run


@pytest.fixture
def recorded(somnus_home):
    """Five nights: nothing to do, v1 promoted (later superseded), v2 rejected, a crash, v3 promoted."""
    somnus_home.mkdir()
    with Store(somnus_home / "somnus.db") as store:
        ledger = store.sleep
        run = ledger.start_run()
        ledger.finish_run(run, "complete", report=SleepReport("nothing", reason="no new sessions", run=run).record())
        promoted_night(store, 1, [1, 2], (0.2, 0.8), None, (0.9, 0.88), 512.3)
        promoted_night(store, 2, [3], (0.25, 0.5), 0.6, (0.9, 0.8), 600.0, parent=1, live=False)
        ledger.finish_run(ledger.start_run(), "failed", error="out of memory\x1b[2J")
        promoted_night(store, 3, [3, 4], (0.1, 0.75), 1.0, (0.9, 0.91), 420.0, parent=1)
    return somnus_home


def test_each_night_is_a_row_of_what_it_stored(recorded):
    with Store(recorded / "somnus.db") as store:
        rows = nights(store)
    assert [(r.night, r.outcome, r.block, r.block_status) for r in rows] == [
        (1, "nothing", None, None), (2, "promoted", 1, "retired"), (3, "rejected", 2, "rejected"),
        (4, "failed", None, None), (5, "promoted", 3, "live")]
    second = rows[1]
    assert (second.sessions, second.recall_before, second.recall_after, second.retention) == ([1, 2], 0.2, 0.8, None)
    assert (second.ability_drop, second.seconds, second.reason) == (2.0, 512.3, "the gate on v1")
    assert rows[2].ability_drop == 10.0 and rows[4].ability_drop == -1.0  # points; negative: it read better
    assert rows[3].reason == "out of memory\x1b[2J" and rows[3].seconds is None and not rows[3].judged
    assert [r.judged for r in rows] == [False, True, True, False, True]


def test_the_plot_has_a_point_for_each_judged_night_at_its_percent(recorded):
    with Store(recorded / "somnus.db") as store:
        rows = nights(store)
    text = plot(rows, 80, 16)
    lines = text.splitlines()
    assert "recall (*) and retention (o) per night, %" in lines[0] and "┌" in lines[1] and "\x1b" not in text
    canvas = [line.split("┤" if "┤" in line else "│")[1] for line in lines[2:-3]]  # inside the frame
    assert sum(line.count("*") for line in canvas) == 3 and sum(line.count("o") for line in canvas) == 2
    by_label = {line.split("┤")[0].strip(): line.split("┤")[1] for line in lines if "┤" in line}
    assert by_label["100"].count("o") == 1  # v3's retention
    assert by_label["75"].count("*") == 2 and by_label["50"].count("*") == 1  # v1's 80% and v3's 75%; v2's 50%
    assert lines[-2].split() == ["2", "3", "5"]  # the judged nights, not the others
    assert "\x1b[" in plot(rows, 80, 16, color=True)


def test_no_plot_before_a_night_judges_a_block(somnus_home):
    somnus_home.mkdir()
    with Store(somnus_home / "somnus.db") as store:
        assert nights(store) == [] and plot(nights(store)) == NO_NIGHTS
        store.sleep.finish_run(store.sleep.start_run(), "complete", report=SleepReport("nothing").record())
        assert plot(nights(store)) == NOTHING_TO_PLOT


def test_somnus_report_prints_the_table_then_the_plot(recorded):
    result = CliRunner().invoke(cli_app, ["report"], env=WIDE)
    assert result.exit_code == 0, result.output
    table, _, chart = result.output.partition("\n\n")
    header, *rows = table.splitlines()
    assert header.split() == ["night", "date", "outcome", "block", "sessions", "recall", "retention", "ability",
                              "drop", "reading", "seconds", "why"]
    assert rows[1].split() == ["2", rows[1].split()[1], "promoted", "v1", "retired", "2", "20%", "->", "80%", "-",
                               "+2.0", "pts", "-0.02", "nats", "512", "the", "gate", "on", "v1"]
    assert "rejected  v2 rejected" in rows[2] and "v3 live" in rows[4]
    assert rows[3].rstrip().endswith("out of memory\\x1b[2J") and "\x1b" not in result.output  # escapes shown, not run
    assert "recall (*) and retention (o) per night, %" in chart and "┌" in chart and "└" in chart


def test_somnus_report_json_is_every_row(recorded):
    result = CliRunner().invoke(cli_app, ["report", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [row["outcome"] for row in rows] == ["nothing", "promoted", "rejected", "failed", "promoted"]
    assert rows[2] | {"started": None} == {
        "night": 3, "started": None, "outcome": "rejected", "block": 2, "block_status": "rejected", "sessions": [3],
        "recall_before": 0.25, "recall_after": 0.5, "retention": 0.6, "in_context_before": 0.9,
        "in_context_after": 0.8, "ability_drop": 10.0, "reading_change": -0.1, "seconds": 600.0, "reason": "the gate on v2"}


def test_somnus_report_before_the_first_night(somnus_home):
    runner = CliRunner()
    assert runner.invoke(cli_app, ["report"]).output == NO_NIGHTS + "\n"
    assert json.loads(runner.invoke(cli_app, ["report", "--json"]).output) == []


@pytest.fixture
def app_without_model(somnus_home):
    """The app on a model file that is not there: it opens at once and loads nothing (the page needs no model)."""
    from tui.app import SomnusApp

    somnus_home.mkdir(exist_ok=True)
    (somnus_home / "config.toml").write_text(f'model = "{somnus_home / "missing.gguf"}"\nbackend = "torch"\n')
    paths = open_paths()
    return SomnusApp(paths, load_config(paths))


async def open_nights(pilot):
    from tui.widgets.nights import NightsScreen

    pilot.app.query_one("#prompt").focus()
    await pilot.press(*"/nights", "enter")
    for _ in range(100):
        if isinstance(pilot.app.screen, NightsScreen) and pilot.app.screen.query_one("Markdown").source:
            await pilot.pause()
            return pilot.app.screen
        await pilot.pause(0.02)
    raise AssertionError("the Nights page did not open")


async def test_the_nights_page_shows_the_table_and_the_plot(recorded, app_without_model):
    from textual_plotext import PlotextPlot

    async with app_without_model.run_test(size=(160, 50)) as pilot:
        page = await open_nights(pilot)
        markdown = page.query_one("Markdown").source
        assert "| 2 | " in markdown and "| promoted | v1 retired | 2 | 20% -> 80% | - | +2.0 pts | -0.02 nats | 512 |" in markdown
        assert "| rejected | v2 rejected |" in markdown and "| out of memory\\x1b[2J |" in markdown
        assert "\x1b" not in markdown  # the stored escape is shown as text, never sent to the terminal
        drawn = str(page.query_one(PlotextPlot).render())
        assert "recall (*) and retention (o) per night, %" in drawn and "┌" in drawn
        await pilot.press("escape")
        assert not isinstance(pilot.app.screen, type(page))


async def test_the_nights_page_before_the_first_night_and_in_the_palette(app_without_model):
    from textual_plotext import PlotextPlot

    async with app_without_model.run_test(size=(120, 40)) as pilot:
        assert "/nights" in [command.title for command in pilot.app.get_system_commands(pilot.app.screen)]
        page = await open_nights(pilot)
        assert "No nights yet" in page.query_one("Markdown").source and not page.query(PlotextPlot)
