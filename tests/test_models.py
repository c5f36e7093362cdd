"""Model references on real folders and files, hub downloads that cannot happen, GGUF exports, engines."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import assistant.models as models
from assistant.config import Config, open_paths
from assistant.engine import open_chat_backend
from assistant.models import (
    ModelError,
    gguf_for,
    hub_folder,
    known_models,
    pull_model,
    resolve_model,
)
from backends.base import BackendError
from backends.select import is_installed

needs_llamacpp = pytest.mark.skipif(not is_installed("llamacpp"), reason="llama-cpp-python is not installed")


@pytest.fixture
def paths(somnus_home):
    return open_paths()


@pytest.fixture
def own_copy(tiny_model_dir, tmp_path) -> Path:
    """A copy of the tiny model this test may change."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "my-model"))


def test_nano_not_built_yet_says_how_to_train_it(paths, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "NANO_DIR", tmp_path / "nano-model")
    with pytest.raises(ModelError, match=r"python -m assistant\.nano\.train"):
        resolve_model("nano", paths)


def test_nano_resolves_to_the_bundled_folder_once_built(paths, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(models, "NANO_DIR", tiny_model_dir)
    assert resolve_model("nano", paths) == models.Model("nano", "nano", tiny_model_dir)


def test_a_model_folder_resolves_to_its_absolute_path(paths, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tiny_model_dir.parent)
    model = resolve_model(tiny_model_dir.name, paths)
    assert model.kind == "folder" and model.path == tiny_model_dir and model.ref == str(tiny_model_dir)


def test_the_weights_id_follows_the_bytes_not_the_file_dates(paths, own_copy, tiny_model_dir):
    from safetensors.torch import load_file, save_file

    weights = own_copy / "model.safetensors"
    os.utime(weights, (0, 0))  # a reinstall copies the same bytes with new dates
    assert resolve_model(str(own_copy), paths).weights == resolve_model(str(tiny_model_dir), paths).weights
    tensors = load_file(weights)
    name = sorted(tensors)[-1]
    tensors[name] = tensors[name] + 1  # a retraining in place: same shapes, other numbers
    save_file(tensors, weights, metadata={"format": "pt"})
    assert resolve_model(str(own_copy), paths).weights != resolve_model(str(tiny_model_dir), paths).weights


def test_folders_that_are_not_models_are_named(paths, own_copy):
    (own_copy / "model.safetensors").unlink()
    with pytest.raises(ModelError, match=f"{own_copy} has no .safetensors weights"):
        resolve_model(str(own_copy), paths)
    (own_copy / "config.json").unlink()
    with pytest.raises(ModelError, match=f"{own_copy} is not a Hugging Face model folder"):
        resolve_model(str(own_copy), paths)


def test_gguf_files_must_exist(paths, tmp_path):
    missing = tmp_path / "absent.gguf"
    with pytest.raises(ModelError, match=f"model file {missing} not found"):
        resolve_model(str(missing), paths)
    present = tmp_path / "present.GGUF"
    present.write_bytes(b"GGUF")
    assert resolve_model(str(present), paths).kind == "gguf"


def test_hub_ids_must_be_pulled_first(paths, tiny_model_dir):
    with pytest.raises(ModelError, match=r"run `somnus model pull someone/tiny`"):
        resolve_model("someone/tiny", paths)
    shutil.copytree(tiny_model_dir, hub_folder("someone/tiny", paths))
    model = resolve_model("someone/tiny", paths)
    assert (model.ref, model.kind, model.path) == ("someone/tiny", "hub", paths.models / "someone--tiny")


@pytest.mark.parametrize("ref", ["not a model!", "a/b/c", "./missing-folder", "gpt"])
def test_unknown_references_are_one_clear_line(paths, ref):
    with pytest.raises(ModelError, match="unknown model") as caught:
        resolve_model(ref, paths)
    assert "\n" not in str(caught.value)


def test_pull_refuses_what_is_not_a_hub_id(paths):
    with pytest.raises(ModelError, match="not a Hugging Face model id"):
        pull_model("../escape", paths)


def pull_in_subprocess(home: Path, **env: str) -> subprocess.CompletedProcess:
    """``somnus model pull`` in a fresh process, so huggingface_hub reads the environment given here."""
    return subprocess.run(
        [sys.executable, "-m", "cli", "--home", str(home), "model", "pull", "someone/tiny"],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=120,
    )


def test_pull_while_offline_is_one_line_and_leaves_nothing(tmp_path):
    result = pull_in_subprocess(tmp_path / "home", HF_HUB_OFFLINE="1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "somnus: cannot download someone/tiny: HF_HUB_OFFLINE is set (unset it to allow downloads)"]
    assert list((tmp_path / "home" / "models").iterdir()) == []


def test_pull_without_a_network_is_one_line_and_leaves_nothing(tmp_path):
    # A closed port on this machine stands for an unreachable hub: the connection is refused at once.
    result = pull_in_subprocess(tmp_path / "home", HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "somnus: cannot download someone/tiny: the Hugging Face hub cannot be reached (check the network connection)"]
    assert list((tmp_path / "home" / "models").iterdir()) == []


def test_known_models_list_the_bundled_the_pulled_and_the_current(paths, tiny_model_dir, monkeypatch, tmp_path):
    monkeypatch.setattr(models, "NANO_DIR", tmp_path / "nano-model")
    shutil.copytree(tiny_model_dir, hub_folder("someone/tiny", paths))
    listed = {row["ref"]: row for row in known_models(paths, current=str(tiny_model_dir))}
    assert list(listed) == ["smollm2", "nano", "someone/tiny", str(tiny_model_dir)]
    assert not listed["nano"]["ready"] and "assistant.nano.train" in listed["nano"]["problem"]
    assert listed["someone/tiny"]["ready"] and not listed["someone/tiny"]["current"]
    assert listed[str(tiny_model_dir)]["current"] and listed[str(tiny_model_dir)]["kind"] == "folder"


def test_a_gguf_model_is_its_own_export(paths, tmp_path):
    file = tmp_path / "model.gguf"
    file.write_bytes(b"GGUF")
    assert gguf_for(resolve_model(str(file), paths), paths) == file


def test_folders_are_exported_once_and_again_when_the_weights_change(paths, own_copy):
    model = resolve_model(str(own_copy), paths)
    export = gguf_for(model, paths)
    assert export.parent == paths.cache / "gguf" and export.read_bytes()[:4] == b"GGUF"
    assert export.stat().st_mode & 0o777 == 0o600
    written = export.stat().st_mtime_ns
    assert gguf_for(model, paths) == export and export.stat().st_mtime_ns == written

    weights = own_copy / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000_000))
    renewed = gguf_for(model, paths)
    assert renewed != export and renewed.is_file()
    assert not export.exists()  # the stale export of the same folder is dropped


def test_the_torch_engine_opens_the_tiny_model(paths, tiny_model_dir):
    backend, model = open_chat_backend(Config(model=str(tiny_model_dir), backend="torch"), paths)
    try:
        assert backend.name == "torch" and model.path == tiny_model_dir
        assert backend.count_tokens(backend.render_chat([{"role": "user", "content": "hi"}])) > 0
    finally:
        backend.close()


@needs_llamacpp
def test_the_llamacpp_engine_runs_a_cached_export(paths, tiny_model_dir):
    backend, model = open_chat_backend(Config(model=str(tiny_model_dir), backend="llamacpp"), paths)
    try:
        assert backend.name == "llamacpp" and model.kind == "folder"
        assert len(list((paths.cache / "gguf").glob("*.gguf"))) == 1
    finally:
        backend.close()


@needs_llamacpp
def test_a_gguf_model_picks_llamacpp_on_auto_and_is_refused_by_torch(paths, tiny_model_dir):
    exported, _ = open_chat_backend(Config(model=str(tiny_model_dir), backend="llamacpp"), paths)
    exported.close()
    gguf_file = next((paths.cache / "gguf").glob("*.gguf"))
    backend, model = open_chat_backend(Config(model=str(gguf_file), backend="auto"), paths)
    backend.close()
    assert backend.name == "llamacpp" and model.kind == "gguf"
    with pytest.raises(ModelError, match="use --backend llamacpp"):
        open_chat_backend(Config(model=str(gguf_file), backend="torch"), paths)


@pytest.mark.skipif(is_installed("mlx"), reason="mlx is installed here")
def test_an_engine_that_is_not_installed_says_what_to_install(paths, tiny_model_dir):
    with pytest.raises(BackendError, match=r"somnus\[mlx\]"):
        open_chat_backend(Config(model=str(tiny_model_dir), backend="mlx"), paths)


def test_the_system_prompt_is_the_setting_except_for_nano_which_never_saw_one(paths, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(models, "NANO_DIR", tiny_model_dir)
    folder = resolve_model(str(tiny_model_dir), paths)  # nano named by its folder, as the benches do
    assert models.system_prompt_for(resolve_model("nano", paths), Config()) is None
    assert models.system_prompt_for(folder, Config()) is None
    other = models.Model("mine", "imported", tiny_model_dir.parent / "elsewhere")
    assert models.system_prompt_for(other, Config()) == Config().system_prompt
    assert models.system_prompt_for(other, Config(system_prompt="Be brief.")) == "Be brief."
    assert models.system_prompt_for(other, Config(system_prompt="  ")) is None


def test_the_width_is_read_from_the_folders_config(own_copy, tmp_path):
    config = json.loads((own_copy / "config.json").read_text())
    assert models.hidden_size(own_copy) == config["hidden_size"]
    (own_copy / "config.json").write_text(json.dumps({"text_config": {"hidden_size": 640}, **{
        k: v for k, v in config.items() if k != "hidden_size"}}))
    assert models.hidden_size(own_copy) == 640  # a model that also sees images keeps it in its text config
    (own_copy / "config.json").write_text("{not json")
    assert models.hidden_size(own_copy) is None
    assert models.hidden_size(tmp_path / "absent") is None
