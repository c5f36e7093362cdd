"""The pages the app opens (help, status, models, adapters, a sleep report, the nights), written as Markdown."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from assistant.report import COLUMNS, NOTHING_TO_PLOT, NightRow, cells
from tui.commands import SLASH_COMMANDS

KEYS = (
    ("Enter", "send the message (or run the /command)"),
    ("Tab", "complete the /command being typed"),
    ("Escape", "stop the reply being written (your message stays)"),
    ("Ctrl+N", "new session"),
    ("Ctrl+F", "search the sessions"),
    ("F2 / Delete", "rename / delete the highlighted session (in the sidebar)"),
    ("Ctrl+P", "command palette: every command by name"),
    ("Ctrl+Q", "quit"),
)

OUTCOMES = {
    "promoted": "promoted: the new adapter is live",
    "rejected": "rejected by the gate: the live adapter was kept",
    "nothing": "nothing new to consolidate",
    "failed": "failed: the live adapter was kept",
}


def help_page() -> str:
    lines = ["# Somnus", "", "Chat with the model; while you are away, Somnus sleeps on the day's sessions and "
             "learns them.", "", "## Commands", "", "| command | what it does |", "|---|---|"]
    lines += [f"| `{command.usage}` | {command.help} |" for command in SLASH_COMMANDS]
    lines += ["", "## Keys", "", "| key | what it does |", "|---|---|"]
    lines += [f"| {key} | {meaning} |" for key, meaning in KEYS]
    return "\n".join(lines)


def facts_page(title: str, facts: Mapping[str, object]) -> str:
    """A titled list of ``name: value`` lines, skipping the values that are None."""
    return "\n".join([f"# {title}", ""] + [f"- **{name}**: {value}" for name, value in facts.items()
                                           if value is not None])


def models_page(models: Sequence[Mapping]) -> str:
    lines = ["# Models", "", "| | model | kind | state |", "|---|---|---|---|"]
    lines += [f"| {'✓' if row['current'] else ''} | `{row['ref']}` | {row['kind'] or ''} | "
              f"{'ready' if row['ready'] else _cell(row['problem'])} |" for row in models]
    lines += ["", "Switch with `/model MODEL` (a name above, a model folder or a .gguf file)."]
    return "\n".join(lines)


def adapters_page(adapters: Sequence[Mapping]) -> str:
    if not adapters:
        return "# Adapters\n\nNo adapter yet: the model learns from its first sleep (`/sleep`)."
    lines = ["# Adapters", "", "| version | status | made | sessions |", "|---|---|---|---|"]
    lines += [f"| v{row['version']} | {row['status']} | {str(row.get('created', ''))[:16].replace('T', ' ')} | "
              f"{', '.join(str(session) for session in row.get('sessions', ()))} |" for row in adapters]
    return "\n".join(lines)


def report_page(report: Mapping, titles: Mapping[int, str], reason: str | None = None) -> str:
    """What one sleep consolidated, and the gate's recall before and after (``report``: SleepReport fields)."""
    from assistant.sleep import kept_training

    status = report.get("status", "")
    lines = ["# Sleep report", ""]
    if reason:
        lines.append(f"- **why**: {reason}")
    lines.append(f"- **result**: {OUTCOMES.get(status, status)}")
    if report.get("adapter") is not None:
        lines.append(f"- **adapter**: v{report['adapter']}")
    if report.get("reason"):
        lines.append(f"- **gate**: {report['reason']}")
    for label, key in (("recall before", "recall_before"), ("recall after", "recall_after"),
                       ("retention", "retention")):
        if report.get(key) is not None:
            lines.append(f"- **{label}**: {report[key]:.2f}")
    if kept := kept_training(report.get("training") or {}):
        lines.append(f"- **consolidation kept**: {kept}")
    dreaming = report.get("dreaming") or {}
    if dreaming:
        lines.append(f"- **dreams**: {dreaming.get('written', 0)} written, {dreaming.get('judged', 0)} judged, "
                     f"{dreaming.get('kept', 0)} rehearsed; the {dreaming.get('chosen', 'consolidated')} block "
                     "went forward")
    if report.get("seconds") is not None:
        lines.append(f"- **took**: {_duration(report['seconds'])}")
    sessions = report.get("sessions") or []
    lines += ["", f"## Sessions slept on ({len(sessions)})", ""]
    lines += [f"- {session}: {titles.get(session) or '(deleted or untitled)'}" for session in sessions]
    return "\n".join(lines)


def nights_page(rows: Sequence[NightRow]) -> str:
    """Every night as the gate judged it: a row each, oldest first."""
    if not rows:
        return "# Nights\n\nNo nights yet: the model learns from its first sleep (`/sleep`)."
    lines = ["# Nights", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(cell) for cell in cells(row)) + " |" for row in rows]
    lines += ["", ("Recall: the night's held-out questions answered, before and after its block. Retention: "
                   "earlier nights' answers still given. Ability drop: reading exercises lost against the bare "
                   "model, in points. Reading: how much likelier (+) or less likely (-) the block made the bare "
                   "model's readings, in nats on average (the gate refuses a block that loses too much).")]
    if not any(row.judged for row in rows):
        lines += ["", NOTHING_TO_PLOT[0].upper() + NOTHING_TO_PLOT[1:] + "."]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def _cell(text: str | None) -> str:
    return (text or "").replace("|", "\\|")
