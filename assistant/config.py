"""Where Somnus keeps the user's data, and the settings in its ``config.toml``.

Everything private lives in one data folder (folders 0700, files 0600) so a user can back it up,
move it, or point ``SOMNUS_HOME`` / ``--home`` at a scratch folder; tests rely on that to stay
isolated. The config file is optional: every key has a default that works without editing, and
only the keys a user changes are written back, so later releases can improve the defaults.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import platformdirs
import tomli_w

from assistant.persona import DEFAULT_SYSTEM_PROMPT

APP_NAME = "somnus"
HOME_ENV = "SOMNUS_HOME"
BackendName = Literal["auto", "torch", "llamacpp", "mlx"]
BACKENDS: tuple[str, ...] = get_args(BackendName)

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600

_SLEEP_WINDOW = re.compile(r"^([01]\d|2[0-3]):[0-5]\d-([01]\d|2[0-3]):[0-5]\d$")


class SomnusError(Exception):
    """A problem the user can fix, shown as one line (the CLI exits 2 on it)."""


class ConfigError(SomnusError):
    """The data folder or the config file cannot be used as it is."""


@dataclass(frozen=True)
class Paths:
    """The layout of the data folder."""

    home: Path

    @property
    def config_file(self) -> Path:
        return self.home / "config.toml"

    @property
    def database(self) -> Path:
        return self.home / "somnus.db"

    @property
    def models(self) -> Path:
        """Models downloaded from the Hugging Face hub, one folder each."""
        return self.home / "models"

    @property
    def replying(self) -> Path:
        """Marks of replies in flight, so a reply an engine crash cut short is told at the next start."""
        return self.home / "replying"

    @property
    def cache(self) -> Path:
        """Derived files that can be rebuilt at any time (GGUF exports)."""
        return self.home / "cache"


@dataclass(frozen=True)
class Config:
    """The user's settings; the defaults need no editing."""

    model: str = "smollm2"
    backend: str = "auto"
    max_tokens: int = 256
    temperature: float = 0.0
    busy_timeout_seconds: float = 5.0
    idle_minutes: int = 30
    sleep_window: str = "01:00-06:00"
    sleep_after_sessions: int = 10  # this many sessions not yet slept on: sleep at any hour once idle
    sleep_minutes: float = 15.0  # a night's time budget, teaching to promotion
    system_prompt: str = DEFAULT_SYSTEM_PROMPT  # "" sends none

    def with_overrides(self, **overrides: object) -> Config:
        """This config with the given values replaced, skipping those that are ``None`` (unset flags)."""
        return dataclasses.replace(self, **{key: value for key, value in overrides.items() if value is not None})


def resolve_home(override: str | os.PathLike[str] | None = None) -> Path:
    """The data folder: ``--home`` first, then ``$SOMNUS_HOME``, then the platform's user data folder."""
    chosen = override or os.environ.get(HOME_ENV) or platformdirs.user_data_dir(APP_NAME, appauthor=False)
    return Path(chosen).expanduser().resolve()


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) if needed and make it readable by the user only."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
        path.chmod(PRIVATE_DIR_MODE)
    except OSError as error:
        raise ConfigError(f"cannot use folder {path}: {error.strerror or error}") from error
    return path


def open_paths(home_override: str | os.PathLike[str] | None = None) -> Paths:
    """The data folder's layout, creating the folder privately on first use."""
    paths = Paths(resolve_home(home_override))
    if paths.home.exists() and not paths.home.is_dir():
        raise ConfigError(f"data folder {paths.home} is a file, not a folder")
    ensure_private_dir(paths.home)
    return paths


def write_private_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600, so a crash never leaves half a file."""
    ensure_private_dir(path.parent)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.chmod(temporary, PRIVATE_FILE_MODE)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_config(paths: Paths) -> Config:
    """The config from ``config.toml`` (defaults when the file does not exist), validated."""
    return _validated(_read_table(paths.config_file), paths.config_file)


def update_config(paths: Paths, **changes: object) -> Config:
    """Set ``changes`` in ``config.toml``, keeping the user's other keys as they were."""
    table = _read_table(paths.config_file)
    table.update(changes)
    config = _validated(table, paths.config_file)
    write_private_file(paths.config_file, tomli_w.dumps(table).encode())
    return config


def _read_table(path: Path) -> dict[str, object]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML ({error})") from error
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML (not UTF-8 text)") from error
    except OSError as error:
        raise ConfigError(f"{path}: cannot read it ({error.strerror or error})") from error


def _validated(table: dict[str, object], path: Path) -> Config:
    unknown = sorted(set(table) - set(SETTING_RULES))
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r} (known keys: {', '.join(SETTING_RULES)})")
    for key, value in table.items():
        is_valid, requirement = SETTING_RULES[key]
        if not is_valid(value):
            raise ConfigError(f"{path}: {key} {requirement} (got {value!r})")
    floats = {field.name for field in dataclasses.fields(Config) if field.type == "float"}
    return Config(**{key: float(value) if key in floats else value for key, value in table.items()})


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_positive_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


SETTING_RULES: dict[str, tuple[Callable[[object], bool], str]] = {
    "model": (lambda value: isinstance(value, str) and bool(value.strip()), "must be a non-empty string"),
    "backend": (lambda value: value in BACKENDS, f"must be one of {', '.join(BACKENDS)}"),
    "max_tokens": (_is_positive_integer, "must be a positive integer"),
    "temperature": (lambda value: _is_number(value) and value >= 0, "must be a number >= 0 (0 means greedy)"),
    "busy_timeout_seconds": (lambda value: _is_number(value) and value > 0, "must be a number of seconds > 0"),
    "idle_minutes": (_is_positive_integer, "must be a positive integer"),
    "sleep_window": (lambda value: isinstance(value, str) and bool(_SLEEP_WINDOW.match(value)),
                     'must look like "01:00-06:00"'),
    "sleep_after_sessions": (_is_positive_integer, "must be a positive integer"),
    "sleep_minutes": (lambda value: _is_number(value) and 1 <= value <= 24 * 60, "must be a number of minutes from 1 to 1440"),
    "system_prompt": (lambda value: isinstance(value, str) and len(value) <= 4000,
                      'must be a string of at most 4000 characters ("" sends none)'),
}
