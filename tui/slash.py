"""The slash commands (and the same in the command palette): parsing, completion, and what each does.

A mixin of the app: the commands act on the app's store, engine, scheduler and conversation.
"""

from __future__ import annotations

from dataclasses import asdict
from functools import partial
from pathlib import Path

from textual.app import SystemCommand
from textual.screen import Screen
from textual.widgets import Input, Label

from assistant.config import SomnusError, update_config, write_private_file
from assistant.export import as_markdown, sessions_with_messages
from assistant.report import nights
from tui import pages
from tui.commands import SLASH_COMMANDS, SlashCommand, matching, parse
from tui.conversation import Conversation
from tui.widgets.dialogs import ConfirmScreen, PageScreen


class SlashCommands:
    """``/name`` typed in the prompt runs ``slash_name``; the palette runs the same methods."""

    def show_command_hints(self, typed: str) -> None:
        """Under the prompt, the commands that what is typed could become, each with its help."""
        hints = self.query_one("#command-hints", Label)
        candidates = matching(typed)
        hints.update("\n".join(f"{command.usage:<18} {command.help}" for command in candidates))
        hints.display = bool(candidates)

    def action_complete(self) -> None:
        """Tab: accept the /command suggestion in the prompt; elsewhere, move focus as usual."""
        prompt = self.query_one("#prompt", Input)
        candidates = matching(prompt.value) if self.focused is prompt else []
        if candidates:
            prompt.value = f"/{candidates[0].name} "
            prompt.cursor_position = len(prompt.value)
        else:
            self.screen.focus_next()

    async def run_slash(self, text: str) -> None:
        try:
            command, argument = parse(text)
        except SomnusError as error:
            self.notify(str(error), severity="error")
            return
        await getattr(self, command.action)(argument)

    async def action_slash(self, name: str) -> None:
        await self.run_slash("/" + name)

    def get_system_commands(self, screen: Screen):
        yield from super().get_system_commands(screen)
        for command in SLASH_COMMANDS:
            yield SystemCommand(command.usage, command.help, partial(self._palette, command))

    async def _palette(self, command: SlashCommand) -> None:
        """From the palette a command runs without its (optional) argument."""
        await getattr(self, command.action)("")

    async def slash_new(self, _argument: str) -> None:
        await self.open_conversation(Conversation())

    async def slash_private(self, _argument: str) -> None:
        await self.open_conversation(Conversation(private=True))

    async def slash_help(self, _argument: str) -> None:
        self.push_screen(PageScreen(pages.help_page(), name="help"))

    async def slash_status(self, _argument: str) -> None:
        facts = {**self._status_facts(), "data folder": self.paths.home, "database": self.paths.database,
                 **self.store.counts(),
                 "sessions not slept on": len(self.store.sleep.unconsolidated_sessions()),
                 "this session": "private (not recorded)" if self.conversation.private
                 else self.conversation.session_id or "new (recorded from its first message)"}
        self.push_screen(PageScreen(pages.facts_page("Status", facts), name="status"))

    async def slash_model(self, argument: str) -> None:
        from assistant.models import known_models, resolve_model

        if not argument:
            self.push_screen(PageScreen(pages.models_page(known_models(self.paths, self.engine.config.model)),
                                        name="models"))
            return
        if self._replying:
            self.notify("Wait for the reply to end before switching models", severity="warning")
            return
        try:
            model = resolve_model(argument, self.paths)
            update_config(self.paths, model=model.ref)
        except SomnusError as error:
            self.notify(str(error), severity="error")
            return
        self.config = self.config.with_overrides(model=model.ref)
        self.notify(f"Switching to {model.ref} (now the default)")
        self.reload_engine(self.config)

    async def slash_adapters(self, _argument: str) -> None:
        self.push_screen(PageScreen(pages.adapters_page(self.store.sleep.adapters()), name="adapters"))

    async def slash_rollback(self, _argument: str) -> None:
        if self.scheduler.sleeping:
            self.notify("A sleep is running: roll back after it ends", severity="warning")
            return
        live = self.store.sleep.live_adapter()
        if live is None:
            self.notify("Nothing to roll back: no adapter is live", severity="warning")
            return
        question = (f"Roll back from adapter v{live['version']} to the one before? What v{live['version']} "
                    "learnt will be slept on again.")
        self.push_screen(ConfirmScreen(question, "Roll back"), self._rollback)

    def _rollback(self, confirmed: bool | None) -> None:
        if not confirmed:
            return
        try:
            live = self.store.sleep.rollback()
        except SomnusError as error:  # e.g. rolled back meanwhile from the command line
            self.notify(str(error), severity="error")
            return
        self.notify(f"Live adapter: v{live['version']}" if live else "Live: the bare model, no adapter")
        self.refresh_status()

    async def slash_export(self, argument: str) -> None:
        session_id = self.conversation.session_id
        if session_id is None:
            self.notify("Nothing to export: this session is private or has no message yet", severity="warning")
            return
        target = Path(argument or f"somnus-session-{session_id}.md").expanduser().resolve()
        try:
            write_private_file(target, as_markdown(sessions_with_messages(self.store, [session_id])).encode())
        except (OSError, SomnusError) as error:
            self.notify(f"cannot write {target}: {getattr(error, 'strerror', None) or error}", severity="error")
            return
        self.notify(f"Exported to {target}")

    async def slash_sleep(self, _argument: str) -> None:
        if self.scheduler.sleeping:
            self.notify("Already sleeping: the status bar shows how far it is", severity="warning")
            return
        self.run_worker(self.scheduler.sleep("you asked with /sleep"), group="sleep")

    async def slash_report(self, _argument: str) -> None:
        if self.last_sleep is not None and self.last_sleep.report is not None:
            report, reason = asdict(self.last_sleep.report), self.last_sleep.reason
        else:
            last_run = self.store.sleep.last_run()
            if last_run is None or not last_run.get("report"):
                self.notify("No sleep report yet: /sleep starts one", severity="warning")
                return
            report, reason = last_run["report"], None
        titles = {row["id"]: row["title"] for row in self.store.sessions()}
        self.push_screen(PageScreen(pages.report_page(report, titles, reason), name="report"))

    async def slash_nights(self, _argument: str) -> None:
        # Imported here: only this page needs plotext.
        from tui.widgets.nights import NightsScreen

        rows = nights(self.store)
        self.push_screen(NightsScreen(pages.nights_page(rows), rows))
