"""The data folder's location and privacy, and config.toml's defaults, updates and refusals."""

from __future__ import annotations

import dataclasses
import stat

import platformdirs
import pytest
import tomllib

from assistant.config import (
    SETTING_RULES,
    Config,
    ConfigError,
    load_config,
    open_paths,
    resolve_home,
    update_config,
    write_private_file,
)


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_home_comes_from_the_flag_then_the_environment_then_the_platform(tmp_path, monkeypatch):
    monkeypatch.setenv("SOMNUS_HOME", str(tmp_path / "from-env"))
    assert resolve_home(tmp_path / "from-flag") == tmp_path / "from-flag"
    assert resolve_home() == tmp_path / "from-env"
    monkeypatch.delenv("SOMNUS_HOME")
    assert str(resolve_home()) == platformdirs.user_data_dir("somnus", appauthor=False)


def test_data_folder_is_created_private_and_tightened_if_loose(somnus_home):
    paths = open_paths()
    assert paths.home == somnus_home and mode(somnus_home) == 0o700
    somnus_home.chmod(0o755)
    open_paths()
    assert mode(somnus_home) == 0o700
    assert paths.cache == somnus_home / "cache" and paths.database.parent == somnus_home


def test_a_file_where_the_data_folder_should_be_is_refused(tmp_path):
    occupied = tmp_path / "occupied"
    occupied.write_text("not a folder")
    with pytest.raises(ConfigError, match=f"{occupied} is a file"):
        open_paths(occupied)


def test_defaults_need_no_file(somnus_home):
    config = load_config(open_paths())
    assert config == Config()
    assert (config.model, config.backend, config.temperature) == ("smollm2", "auto", 0.0)
    assert (config.idle_minutes, config.sleep_window, config.sleep_after_sessions) == (30, "01:00-06:00", 10)
    assert config.sleep_minutes == 15.0
    assert not (somnus_home / "config.toml").exists()


def test_update_writes_only_the_changed_keys_privately_and_keeps_the_others(somnus_home):
    paths = open_paths()
    paths.config_file.write_text('max_tokens = 64\n# a comment\n')
    config = update_config(paths, model="/models/mine")
    assert config.model == "/models/mine" and config.max_tokens == 64
    assert tomllib.loads(paths.config_file.read_text()) == {"max_tokens": 64, "model": "/models/mine"}
    assert mode(paths.config_file) == 0o600
    assert load_config(paths) == config


def test_integers_are_accepted_where_numbers_are_expected(somnus_home):
    paths = open_paths()
    paths.config_file.write_text("temperature = 1\nbusy_timeout_seconds = 2\n")
    config = load_config(paths)
    assert config.temperature == 1.0 and isinstance(config.temperature, float)
    assert config.busy_timeout_seconds == 2.0


def test_broken_toml_is_one_line_naming_the_file(somnus_home):
    paths = open_paths()
    paths.config_file.write_text("model = \n")
    with pytest.raises(ConfigError) as caught:
        load_config(paths)
    assert str(paths.config_file) in str(caught.value) and "\n" not in str(caught.value)


def test_a_config_that_is_not_text_is_refused(somnus_home):
    paths = open_paths()
    paths.config_file.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(paths)


def test_unknown_keys_are_named(somnus_home):
    paths = open_paths()
    paths.config_file.write_text('modle = "nano"\n')
    with pytest.raises(ConfigError, match="unknown key 'modle'"):
        load_config(paths)


@pytest.mark.parametrize(
    "line",
    [
        'backend = "gpu"',
        "max_tokens = 0",
        "max_tokens = true",
        "max_tokens = 1.5",
        "temperature = -0.5",
        'temperature = "hot"',
        "busy_timeout_seconds = 0",
        "idle_minutes = -3",
        'sleep_window = "25:00-06:00"',
        'sleep_window = "night"',
        "sleep_after_sessions = 0",
        'sleep_after_sessions = "ten"',
        "sleep_minutes = 0",
        'sleep_minutes = "all night"',
        'model = ""',
        "model = 3",
    ],
)
def test_wrong_values_are_refused_with_the_key_and_file(somnus_home, line):
    paths = open_paths()
    paths.config_file.write_text(line + "\n")
    key = line.split(" = ")[0]
    with pytest.raises(ConfigError) as caught:
        load_config(paths)
    assert str(caught.value).startswith(f"{paths.config_file}: {key} ")


def test_a_bad_update_leaves_the_file_as_it_was(somnus_home):
    paths = open_paths()
    paths.config_file.write_text("max_tokens = 64\n")
    with pytest.raises(ConfigError):
        update_config(paths, backend="gpu")
    assert paths.config_file.read_text() == "max_tokens = 64\n"


def test_every_setting_is_validated():
    assert set(SETTING_RULES) == {field.name for field in dataclasses.fields(Config)}


def test_command_line_overrides_skip_unset_flags():
    config = Config(model="a", backend="torch").with_overrides(model="b", backend=None)
    assert (config.model, config.backend) == ("b", "torch")


def test_private_files_are_written_whole_with_mode_0600(tmp_path):
    target = tmp_path / "deep" / "file.txt"
    write_private_file(target, b"first")
    write_private_file(target, b"second")
    assert target.read_bytes() == b"second" and mode(target) == 0o600 and mode(target.parent) == 0o700
    assert [path.name for path in target.parent.iterdir()] == ["file.txt"]
