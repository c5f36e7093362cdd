"""``somnus daemon``: the app's sleep scheduler without the app, so nights happen with the app closed.

``install_service`` writes the unit that starts it at login: a systemd user unit on Linux, a
launchd agent on macOS. It only writes the file and says how to enable it: turning services on
is the user's decision, so Somnus never runs ``systemctl`` or ``launchctl`` itself.
"""

from __future__ import annotations

import asyncio
import os
import plistlib
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from assistant.config import Config, Paths, SomnusError, write_private_file
from assistant.scheduler import SleepScheduler, describe_outcome

SYSTEMD_UNIT = "somnus.service"
LAUNCHD_LABEL = "org.somnus.daemon"


def run_daemon(paths: Paths, config: Config, say: Callable[[str], None] = print) -> None:
    """Run the idle check until SIGINT or SIGTERM, reporting each sleep as a line (for the journal)."""
    asyncio.run(_serve(paths, config, say))


async def _serve(paths: Paths, config: Config, say: Callable[[str], None]) -> None:
    from assistant.store import open_store

    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signal_number, stopped.set)
    from assistant.forget import finish_interrupted

    with open_store(paths, config) as store:
        for line in finish_interrupted(paths, store):
            say(f"somnus: {line}")
        scheduler = SleepScheduler(
            paths, config, store,
            on_start=lambda reason: say(f"sleeping: {reason}"),
            on_finish=lambda outcome: say(describe_outcome(outcome)),
            all_cores=True,  # no app of this process to keep responsive
        )
        scheduler.start()
        say(f"somnus daemon: watching {paths.home} (sleep window {config.sleep_window}, "
            f"idle {config.idle_minutes} min, or {config.sleep_after_sessions} sessions waiting)")
        try:
            await stopped.wait()
        finally:
            scheduler.stop()


def install_service(paths: Paths, *, platform: str = sys.platform, user_home: Path | None = None) -> tuple[Path, str]:
    """Write the login service for ``somnus daemon`` on this data folder; returns its path and how to enable it."""
    user_home = user_home or Path.home()
    command = [sys.executable, "-m", "cli", "--home", str(paths.home), "daemon"]
    if platform.startswith("linux"):
        config_home = Path(os.environ.get("XDG_CONFIG_HOME") or user_home / ".config")
        target = config_home / "systemd" / "user" / SYSTEMD_UNIT
        write_private_file(target, _systemd_unit(command).encode())
        return target, f"systemctl --user daemon-reload && systemctl --user enable --now {SYSTEMD_UNIT}"
    if platform == "darwin":
        target = user_home / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"
        write_private_file(target, _launchd_plist(command, paths))
        return target, f"launchctl load -w {target}"
    raise SomnusError(f"somnus daemon --install knows systemd (Linux) and launchd (macOS), not {platform}; "
                      "start `somnus daemon` from your system's own login items instead")


def _systemd_unit(command: list[str]) -> str:
    return "\n".join([
        "[Unit]",
        "Description=Somnus: sleeps on the day's conversations while you are away",
        "",
        "[Service]",
        "Type=simple",
        "ExecStart=" + " ".join(_systemd_quoted(part) for part in command),
        "Restart=on-failure",
        "RestartSec=60",
        "Nice=10",
        "",
        "[Install]",
        "WantedBy=default.target",
        "",
    ])


def _systemd_quoted(word: str) -> str:
    """systemd's own quoting: double quotes, with backslashes and quotes escaped (paths may hold spaces)."""
    if word and not any(character in word for character in ' "\\\'$%'):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$") + '"'


def _launchd_plist(command: list[str], paths: Paths) -> bytes:
    log = str(paths.home / "daemon.log")
    return plistlib.dumps({
        "Label": LAUNCHD_LABEL,
        "ProgramArguments": command,
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},
        "ProcessType": "Background",
        "StandardOutPath": log,
        "StandardErrorPath": log,
    })

