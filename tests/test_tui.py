"""The app through Textual's pilot, with the real tiny model on torch and a real data folder."""

from __future__ import annotations

import asyncio
import stat
import time

import pytest
from textual.widgets import Input, Label, ListView

from assistant.config import load_config, open_paths
from assistant.store import Store
from tui.app import SomnusApp
from tui.widgets.chat_view import AssistantTurn, ChatView, Notice, UserTurn
from tui.widgets.dialogs import AskScreen, ConfirmScreen, PageScreen
from tui.widgets.sidebar import SessionItem

SIZE = (110, 32)


@pytest.fixture
def app_home(somnus_home, tiny_model_dir):
    """A data folder whose config picks the tiny model on torch, with replies long enough to interrupt."""
    somnus_home.mkdir()
    (somnus_home / "config.toml").write_text(f'model = "{tiny_model_dir}"\nbackend = "torch"\nmax_tokens = 300\n')
    return somnus_home


@pytest.fixture
def nano_home(somnus_home):
    """A data folder on the bundled nano model: a night that grows a block needs a model that reads
    what it is told (the tiny random one grounds no answer, so its nights end before training)."""
    from assistant.models import NANO_DIR

    if not (NANO_DIR / "model.safetensors").is_file():
        pytest.skip("nano model not built")
    somnus_home.mkdir()
    (somnus_home / "config.toml").write_text('model = "nano"\nbackend = "torch"\nmax_tokens = 300\n')
    return somnus_home


def make_app(**options) -> SomnusApp:
    paths = open_paths()
    return SomnusApp(paths, load_config(paths), **options)


def recorded(*conversations: list[str]) -> list[int]:
    """Sessions written straight to the store: turns alternate user, assistant."""
    with Store(open_paths().database) as store:
        ids = []
        for turns in conversations:
            session_id = store.create_session(model="tiny")
            for index, text in enumerate(turns):
                store.add_message(session_id, "user" if index % 2 == 0 else "assistant", text)
            ids.append(session_id)
    return ids


def stored() -> tuple[list[dict], list[dict]]:
    """Sessions and all messages as another process would read them."""
    with Store(open_paths().database) as store:
        sessions = store.sessions()
        return sessions, [message for session in sessions for message in store.messages(session["id"])]


async def until(pilot, condition, timeout: float = 90.0, what: str = "the condition") -> None:
    """Poll without waiting for the app to be idle: a streaming reply keeps it busy until its end."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def type_and_send(pilot, text: str) -> None:
    """Type into the prompt, then press Enter without waiting for what it starts to finish (only for the
    prompt to take the text: keys pressed before that would join it)."""
    prompt = pilot.app.query_one("#prompt", Input)
    prompt.focus()
    await pilot.press(*text)
    pilot.app.simulate_key("enter")
    await until(pilot, lambda: prompt.value == "", timeout=30, what="the prompt to take the text")


async def page_text(pilot, what: str) -> str:
    """The Markdown of the page the app opened (it renders just after the page appears)."""
    app = pilot.app
    await until(pilot, lambda: isinstance(app.screen, PageScreen) and app.screen.query_one("Markdown").source,
                what=what)
    return app.screen.query_one("Markdown").source


async def answer_yes(pilot) -> None:
    """Click the confirming button of the question on screen, once it is laid out."""
    await until(pilot, lambda: isinstance(pilot.app.screen, ConfirmScreen), what="the question")
    await pilot.pause()
    await pilot.click("#confirm")
    await until(pilot, lambda: not isinstance(pilot.app.screen, ConfirmScreen), what="the answer")


def turns(app: SomnusApp) -> list[tuple[str, str]]:
    return [("user", str(widget.render())) if isinstance(widget, UserTurn) else ("assistant", widget.source)
            for widget in app.query_one(ChatView).query("UserTurn, AssistantTurn")]


def toasts(app: SomnusApp) -> str:
    """The notifications on screen, as text."""
    return "\n".join(str(toast.render()) for toast in app.screen.query("Toast"))


def sidebar_titles(app: SomnusApp) -> list[str]:
    return [item.entry.title for item in app.query(SessionItem)]


async def test_a_message_streams_a_reply_that_is_recorded_as_a_session(app_home):
    app = make_app()
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await type_and_send(pilot, "Hello there")
        await until(pilot, lambda: app.replying, what="the reply to start")
        reply = app.query_one(AssistantTurn)
        await until(pilot, lambda: reply.source, what="the first piece")
        partial = reply.source
        await until(pilot, lambda: not app.replying, what="the reply to end")
        sessions, messages = stored()
        assert [(m["role"], m["status"]) for m in messages] == [("user", "complete"), ("assistant", "complete")]
        assert turns(app) == [("user", "Hello there"), ("assistant", messages[1]["content"])]
        assert messages[1]["content"].startswith(partial) and len(partial) < len(messages[1]["content"])
        assert [s["title"] for s in sessions] == ["Hello there"] == sidebar_titles(app)
        assert app.query_one(ChatView).border_title == "Hello there"
        assert app.query_one("#prompt", Input).value == ""


async def test_escape_stops_the_reply_and_keeps_the_users_turn(app_home):
    app = make_app()
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await type_and_send(pilot, "Tell me a long story")
        await until(pilot, lambda: app.query(AssistantTurn), what="the reply")
        reply = app.query_one(AssistantTurn)
        await until(pilot, lambda: reply.source, what="the first piece")
        app.simulate_key("escape")
        await until(pilot, lambda: not app.replying, what="the reply to stop")
        _, messages = stored()
        assert [(m["role"], m["content"], m["status"]) for m in messages] == [
            ("user", "Tell me a long story", "complete"), ("assistant", reply.source, "cancelled")]
        assert reply.has_class("-incomplete") and reply.border_subtitle == "stopped"
        assert turns(app)[0] == ("user", "Tell me a long story")

        await type_and_send(pilot, "Again")  # the conversation goes on in the same session
        await until(pilot, lambda: len(stored()[1]) == 4, what="the second turn")
        await until(pilot, lambda: not app.replying, what="the second reply")
        assert len(stored()[0]) == 1


async def test_a_user_who_scrolled_up_is_not_pulled_down_by_the_stream(app_home):
    recorded([f"Line {n} of a long chat about Porto and Rex. " * 3 for n in range(30)])
    app = make_app(session_id=1)
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        view = app.query_one(ChatView)
        await until(pilot, lambda: view.max_scroll_y > 0 and view.scroll_y == view.max_scroll_y,
                    what="the session to open at its end")
        await type_and_send(pilot, "And then?")
        await until(pilot, lambda: app.replying, what="the reply")
        reply = view.query(AssistantTurn).last()
        await until(pilot, lambda: reply.source, what="the first piece")
        await pilot.click("#chat")
        await pilot.press("pageup")
        await until(pilot, lambda: view.scroll_y < view.max_scroll_y - 5, what="the scroll up")
        reading = view.scroll_y
        await until(pilot, lambda: not app.replying, what="the reply to end")
        await pilot.pause(0.2)
        assert view.scroll_y == reading < view.max_scroll_y
        await type_and_send(pilot, "More")  # sending follows the conversation again
        await until(pilot, lambda: view.scroll_y == view.max_scroll_y, what="the view to follow")
        await until(pilot, lambda: not app.replying, what="the last reply")


async def test_slash_commands_complete_show_help_and_refuse_unknown_ones(app_home):
    app = make_app()
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        prompt = app.query_one("#prompt", Input)
        hints = app.query_one("#command-hints", Label)
        await pilot.press("/")
        assert hints.display and "/sleep" in str(hints.render()) and "/help" in str(hints.render())
        await pilot.press("h", "e")
        assert str(hints.render()).splitlines() == ["/help              Commands and keys"]
        await pilot.press("tab")
        assert prompt.value == "/help " and app.focused is prompt
        await pilot.press("enter")
        page = await page_text(pilot, "the help page")
        assert all(f"`/{name}" in page for name in ("sleep", "status", "new", "private", "model", "adapters",
                                                    "rollback", "export", "help"))
        await pilot.press("escape")
        assert not isinstance(app.screen, PageScreen) and not hints.display

        await type_and_send(pilot, "/dream")
        await until(pilot, lambda: "unknown command /dream: /help lists the commands" in toasts(app),
                    timeout=5, what="the refusal")
        await type_and_send(pilot, "/new now")
        await until(pilot, lambda: "/new takes no argument" in toasts(app), timeout=5, what="the refusal")
        assert not (open_paths().database.exists() and stored()[1])


async def test_a_private_session_is_marked_and_records_nothing(app_home):
    app = make_app()
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        banner = app.query_one("#private-banner", Label)
        assert not banner.display
        await type_and_send(pilot, "/private")
        await pilot.pause()
        assert app.screen.has_class("-private") and banner.display
        assert "nothing here is recorded" in str(banner.render())
        assert app.query_one(ChatView).border_title == "Private session"
        await type_and_send(pilot, "My secret is 42")
        await until(pilot, lambda: app.query(AssistantTurn) and not app.replying, what="the private reply")
        assert app.query_one(AssistantTurn).source
        assert stored() == ([], []) and sidebar_titles(app) == []

        await type_and_send(pilot, "/new")
        await pilot.pause()
        assert not app.screen.has_class("-private") and not banner.display and turns(app) == []


async def test_sessions_are_switched_renamed_and_deleted_with_confirmation(app_home):
    porto, rex = recorded(["Alice lives in Porto", "Noted"], ["Rex likes the park", "Good dog"])
    app = make_app()
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await until(pilot, lambda: len(sidebar_titles(app)) == 2, what="the sessions")
        assert sidebar_titles(app) == ["Rex likes the park", "Alice lives in Porto"]
        listing = app.query_one("#sessions", ListView)
        await pilot.click(f"#session-{porto}")
        await until(pilot, lambda: turns(app) == [("user", "Alice lives in Porto"), ("assistant", "Noted")],
                    what="the session to open")

        listing.focus()
        listing.index = 1
        await pilot.press("f2")
        await until(pilot, lambda: isinstance(app.screen, AskScreen), what="the rename question")
        answer = app.screen.query_one(Input)
        answer.value = ""
        await pilot.press(*"Family", "enter")
        await until(pilot, lambda: "Family" in sidebar_titles(app), what="the new title")
        assert app.query_one(ChatView).border_title == "Family"

        listing.focus()
        listing.index = sidebar_titles(app).index("Family")
        await pilot.press("delete")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the confirmation")
        await pilot.press("enter")  # the focused button is "Keep"
        await until(pilot, lambda: not isinstance(app.screen, ConfirmScreen), what="the answer")
        assert {s["id"] for s in stored()[0]} == {porto, rex}

        listing.focus()
        listing.index = sidebar_titles(app).index("Family")
        await pilot.press("delete")
        await answer_yes(pilot)
        await until(pilot, lambda: sidebar_titles(app) == ["Rex likes the park"], what="the deletion")
        sessions, messages = stored()
        assert [s["id"] for s in sessions] == [rex] and {m["session_id"] for m in messages} == {rex}
        assert turns(app) == [] and app.query_one(ChatView).border_title == "New session"


async def test_the_sidebar_searches_everything_said(app_home):
    recorded(["Alice lives in Porto", "Noted"], ["Rex likes the park", "Good dog"], ["Hello", "Hi"])
    app = make_app()
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await until(pilot, lambda: len(sidebar_titles(app)) == 3, what="the sessions")
        await pilot.press("ctrl+f")
        await pilot.press(*"dog")
        await until(pilot, lambda: sidebar_titles(app) == ["Rex likes the park"], what="the search")
        assert "[dog]" in str(app.query_one(SessionItem).query_one(".snippet", Label).render())
        await pilot.press("enter", "enter")
        await until(pilot, lambda: turns(app)[:1] == [("user", "Rex likes the park")], what="the found session")
        app.query_one("#session-search", Input).value = ""
        await until(pilot, lambda: len(sidebar_titles(app)) == 3, what="the full list again")


async def test_the_command_palette_runs_the_slash_commands(app_home):
    app = make_app()
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"/private")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await until(pilot, lambda: app.screen.has_class("-private"), what="the private session")


async def test_status_models_adapters_and_export_pages(app_home, tiny_model_dir, tmp_path):
    (session_id,) = recorded(["Alice lives in Porto", "Noted"])
    app = make_app(session_id=session_id)
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await until(pilot, lambda: " · torch · " in str(app.query_one("#status-text", Label).render()),
                    what="the model to load")
        status = str(app.query_one("#status-text", Label).render())
        assert status.startswith(f"{tiny_model_dir.name} · torch · adapter none · last sleep never · next ")

        for command, expected in (("/status", "sessions not slept on**: 1"), ("/model", "| ✓ |"),
                                  ("/adapters", "No adapter yet")):
            await type_and_send(pilot, command)
            assert expected in await page_text(pilot, command)
            await pilot.press("escape")

        target = tmp_path / "out" / "porto.md"
        await type_and_send(pilot, f"/export {target}")
        await until(pilot, target.exists, what="the export")
        assert "Alice lives in Porto" in target.read_text() and stat.S_IMODE(target.stat().st_mode) == 0o600


async def test_a_model_that_cannot_load_is_one_line_and_the_message_is_kept(somnus_home, tmp_path):
    somnus_home.mkdir()
    (somnus_home / "config.toml").write_text(f'model = "{tmp_path / "missing.gguf"}"\nbackend = "torch"\n')
    app = make_app()
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await until(pilot, lambda: app.query(Notice), what="the load error")
        assert "missing.gguf not found" in str(app.query_one(Notice).render())
        await pilot.press(*"Are you there?")
        app.simulate_key("enter")  # the prompt empties, then gets the text back when the reply fails
        await until(pilot, lambda: len(app.query(Notice)) == 2, what="the reply error")
        assert app.query_one("#prompt", Input).value == "Are you there?"
        assert stored() == ([], [])


async def keypress_echo_seconds(pilot, key: str = "x") -> float:
    """From a keypress reaching the app to the prompt showing it."""
    prompt = pilot.app.query_one("#prompt", Input)
    before = prompt.value
    started = time.perf_counter()
    pilot.app.simulate_key(key)
    while prompt.value == before:
        await asyncio.sleep(0.001)
    return time.perf_counter() - started


@pytest.mark.slow
async def test_sleep_runs_beside_the_chat_with_progress_and_a_report(nano_home):
    (session_id,) = recorded(["My sister is called Zara. I live in Porto.", "Noted.",
                              "Where do I live? And what is my sister's name?", "You live in Porto."])
    app = make_app()
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        status = app.query_one("#status")
        await until(pilot, lambda: app.engine.ready, what="the model")
        await type_and_send(pilot, "/sleep")
        await until(pilot, lambda: status.has_class("-sleeping"), what="the sleep to start")
        stages = set()
        await until(pilot, lambda: stages.add(status.sleeping_stage) or "consolidate" in status.sleeping_stage,
                    what="the consolidation stage")
        assert app.query_one("#sleep-progress").display

        latencies = [await keypress_echo_seconds(pilot) for _ in range(20)]
        print(f"keypress echo while sleeping: median {sorted(latencies)[10] * 1000:.1f} ms, "
              f"max {max(latencies) * 1000:.1f} ms")
        assert max(latencies) < 0.1
        app.query_one("#prompt", Input).value = ""

        await type_and_send(pilot, "Are you awake?")  # the chat answers while the model sleeps
        await until(pilot, lambda: len(stored()[0]) == 2 and not app.replying, what="a reply during the sleep")
        assert status.has_class("-sleeping")

        await type_and_send(pilot, "/sleep")
        await until(pilot, lambda: "Already sleeping" in toasts(app), timeout=5, what="the refusal")

        await until(pilot, lambda: not status.has_class("-sleeping"), timeout=600, what="the sleep to end")
        assert any(stage.startswith("sleeping · select") for stage in stages)
        with Store(open_paths().database) as store:
            run = store.sleep.last_run()
        assert run["status"] == "complete" and run["report"]["sessions"] == [session_id]
        await until(pilot, lambda: f"sleep {run['report']['status']}" in toasts(app), what="the sleep's notice")
        assert "/report to read it" in toasts(app)
        assert "last sleep " in str(app.query_one("#status-text", Label).render())

        await type_and_send(pilot, "/report")
        report = await page_text(pilot, "the report")
        assert "- **why**: you asked with /sleep" in report
        assert f"## Sessions slept on (1)\n\n- {session_id}: My sister is called Zara. I live in Porto." in report
        assert "recall before" in report or run["report"]["status"] == "nothing"


def train_and_promote_a_block(model_dir, reply: str) -> int:
    """What a night that goes well leaves behind: a trained block, its manifest, a promoted version."""
    from assistant import adapters
    from assistant.models import resolve_model
    from backends import ops
    from backends.select import open_trainer

    def cross_entropy(logits, targets, mask):
        logprobs = ops.TORCH_OPS.take_along_last_axis(ops.TORCH_OPS.log_softmax(logits), targets)
        return -ops.TORCH_OPS.sum(logprobs * mask) / ops.TORCH_OPS.sum(mask)

    paths = open_paths()
    trainer = open_trainer("torch", model_dir, lr=0.05)
    try:
        prompt = trainer.render_chat([{"role": "user", "content": "Hello there"}])
        for _ in range(10):
            trainer.train_step([trainer.encode(prompt)], [trainer.encode(reply + "<|im_end|>")], cross_entropy)
        block = adapters.Block("night0001-test", adapters.block_dir(paths.home, "night0001-test"), (1,), None)
        trainer.save_new_block(block.path)
    finally:
        trainer.close()
    stack = adapters.empty_stack().grown(block, 1)
    model = resolve_model(str(model_dir), paths)
    manifest = adapters.save_stack(paths.home, adapters.Stack(1, stack.blocks, None, {"model": str(model_dir), "weights": model.weights}))
    with Store(paths.database) as store:
        adapter = store.sleep.add_adapter(1, str(manifest))
        store.sleep.promote(adapter, {1: store.messages(1)[-1]["id"]})
    return adapter


@pytest.mark.slow
async def test_a_promoted_adapter_is_worn_by_the_next_reply_and_rollback_takes_it_off(app_home, tiny_model_dir):
    app = make_app()
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        status = app.query_one("#status-text", Label)

        async def answer(text: str) -> str:
            await type_and_send(pilot, "/new")
            await until(pilot, lambda: turns(app) == [], what="a new session")
            await type_and_send(pilot, text)
            await until(pilot, lambda: app.query(AssistantTurn) and not app.replying, what="the reply")
            return app.query_one(AssistantTurn).source

        bare = await answer("Hello there")
        train_and_promote_a_block(tiny_model_dir, "Porto is lovely in May.")  # e.g. the daemon's night
        app.refresh_status()  # the app's periodic refresh notices the new live version
        await until(pilot, lambda: "adapter v1" in str(status.render()) and app.engine.ready, what="the reload")
        worn = await answer("Hello there")
        assert worn != bare  # the same prompt, greedy: only the adapter differs

        await type_and_send(pilot, "/adapters")
        assert "| v1 | live |" in await page_text(pilot, "the adapters page")
        await pilot.press("escape")

        await type_and_send(pilot, "/rollback")
        await answer_yes(pilot)
        await until(pilot, lambda: "adapter none" in str(status.render()) and app.engine.ready
                    and app.engine.adapter_version is None, what="the rollback")
        assert await answer("Hello there") == bare



async def test_a_reply_an_engine_crash_cut_short_is_told_when_the_app_starts(app_home):
    import subprocess
    import sys

    marks = open_paths().replying
    dies = ("import os, signal, sys; from pathlib import Path; from assistant.crashes import ReplyJournal\n"
            "with ReplyJournal(Path(sys.argv[1])).replying(4, 'smollm2'):\n"
            "    os.kill(os.getpid(), signal.SIGSEGV)\n")
    subprocess.run([sys.executable, "-c", dies, str(marks)], capture_output=True)
    app = make_app()
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await until(pilot, lambda: "never finished" in toasts(app), what="the crash notice")
        assert "session 4" in toasts(app) and "your message is kept" in toasts(app)
    assert list(marks.iterdir()) == []
