"""Snapshots of the app's main screens (pytest-textual-snapshot; `--snapshot-update` after a deliberate change).

Deterministic by construction: recorded sessions (no generated text), the model loaded before the
picture, and a clock fixed at noon on a far-off day, so the schedule reads the same on every run.
"""

from __future__ import annotations

import asyncio
from datetime import datetime

import pytest

from assistant.config import load_config, open_paths
from assistant.scheduler import SleepOutcome
from assistant.sleep.cycle import SleepReport
from assistant.sleep.runner import SleepEvent
from assistant.store import Store
from tui.app import SomnusApp

SIZE = (110, 30)
NOON = datetime(2099, 6, 1, 12, 0).astimezone()


@pytest.fixture
def app(somnus_home, tiny_model_dir):
    somnus_home.mkdir()
    (somnus_home / "config.toml").write_text(f'model = "{tiny_model_dir}"\nbackend = "torch"\n')
    with Store(somnus_home / "somnus.db") as store:
        for turns in (["Rex likes the park", "Good dog!"],
                      ["My sister Alice lives in **Porto**", "Noted:\n\n- *sister*: Alice\n- *city*: Porto",
                       "Where does she live?", "In Porto."]):
            session_id = store.create_session(model="tiny")
            for index, text in enumerate(turns):
                store.add_message(session_id, "user" if index % 2 == 0 else "assistant", text)
    paths = open_paths()
    return SomnusApp(paths, load_config(paths), session_id=2, now=lambda: NOON)


async def loaded(pilot) -> None:
    while not pilot.app.engine.ready:
        await asyncio.sleep(0.02)
    pilot.app.refresh_status()
    await pilot.pause()


def test_a_session_with_its_sidebar_and_status(app, snap_compare):
    assert snap_compare(app, terminal_size=SIZE, run_before=loaded)


def test_a_private_session_is_marked(app, snap_compare):
    async def private(pilot) -> None:
        await loaded(pilot)
        await pilot.press(*"/private", "enter")

    assert snap_compare(app, terminal_size=SIZE, run_before=private)


def test_slash_completion_and_hints(app, snap_compare):
    async def typing(pilot) -> None:
        await loaded(pilot)
        await pilot.press("/", "r")

    assert snap_compare(app, terminal_size=SIZE, run_before=typing)


def test_the_help_page(app, snap_compare):
    async def help_page(pilot) -> None:
        await loaded(pilot)
        await pilot.press("f1")

    assert snap_compare(app, terminal_size=SIZE, run_before=help_page)


def test_the_status_bar_while_sleeping(app, snap_compare):
    async def sleeping(pilot) -> None:
        await loaded(pilot)
        pilot.app.sleep_started("you asked with /sleep")
        pilot.app.sleep_progress(SleepEvent("consolidate", 0.4, "step 48/120"))
        await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=sleeping)


def test_a_sleep_report(app, snap_compare):
    async def report(pilot) -> None:
        await loaded(pilot)
        pilot.app.last_sleep = SleepOutcome("idle for 30 min in the sleep window", SleepReport(
            "promoted", adapter=1, sessions=[1, 2], recall_before=0.2, recall_after=0.9, retention=1.0,
            seconds=312.4, reason="recall rose from 20% to 90%; retention held"))
        await pilot.press(*"/report", "enter")
        await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=report)
