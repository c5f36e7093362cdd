"""The slash commands: one table that the prompt's completion, its hints, /help and the command
palette all read, so a command is declared once and shows up everywhere."""

from __future__ import annotations

from dataclasses import dataclass

from textual.suggester import Suggester

from assistant.config import SomnusError


@dataclass(frozen=True)
class SlashCommand:
    """``/name [argument]``: ``action`` names the app's ``action_<action>`` method that runs it."""

    name: str
    help: str
    argument: str = ""

    @property
    def usage(self) -> str:
        return f"/{self.name} {self.argument}".rstrip()

    @property
    def action(self) -> str:
        return f"slash_{self.name}"


SLASH_COMMANDS: tuple[SlashCommand, ...] = (
    SlashCommand("sleep", "Sleep now: consolidate the sessions not yet slept on"),
    SlashCommand("status", "Model, engine, adapters, sleeps and what is recorded"),
    SlashCommand("new", "Start a new session"),
    SlashCommand("private", "Start a private session: never recorded, never slept on"),
    SlashCommand("model", "List the models, or switch to MODEL (saved as the default)", "[MODEL]"),
    SlashCommand("adapters", "The adapter versions sleep has made, and which one is live"),
    SlashCommand("rollback", "Return to the previous adapter version"),
    SlashCommand("export", "Write this session as Markdown (to PATH, or the current folder)", "[PATH]"),
    SlashCommand("report", "Open the report of the last sleep"),
    SlashCommand("nights", "Every night: recall, retention, ability, outcome and why, with a plot"),
    SlashCommand("help", "Commands and keys"),
)

_BY_NAME = {command.name: command for command in SLASH_COMMANDS}


def matching(text: str) -> list[SlashCommand]:
    """The commands that ``text`` (as typed so far, starting with /) could become."""
    if not text.startswith("/") or " " in text:
        return []
    typed = text[1:].casefold()
    return [command for command in SLASH_COMMANDS if command.name.startswith(typed)]


def parse(text: str) -> tuple[SlashCommand, str]:
    """The command and its argument in ``/name argument``, or a one-line error naming /help."""
    name, _, argument = text[1:].strip().partition(" ")
    command = _BY_NAME.get(name.casefold())
    if command is None:
        raise SomnusError(f"unknown command /{name}: /help lists the commands")
    if argument.strip() and not command.argument:
        raise SomnusError(f"/{command.name} takes no argument")
    return command, argument.strip()


class SlashSuggester(Suggester):
    """Completes the command name being typed (Tab or the right arrow accepts it)."""

    def __init__(self) -> None:
        super().__init__(use_cache=True, case_sensitive=True)

    async def get_suggestion(self, value: str) -> str | None:
        candidates = matching(value)
        return candidates[0].usage.split(" ")[0] if candidates else None
