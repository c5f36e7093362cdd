"""Engine choice on every kind of machine (platform facts injected), and opening each engine."""

from __future__ import annotations

import importlib.util
import re

import pytest

from backends.base import Backend, BackendError
from backends.select import choose_engines, is_installed, open_backend


def machine(system: str, arch: str, *, cuda: bool = False, installed: tuple[str, ...] = ()) -> dict:
    """choose_engines' platform arguments for a pretend machine."""
    return {
        "system": system,
        "machine": arch,
        "has_cuda": lambda: cuda,
        "installed": lambda engine: engine in installed or engine == "torch",
    }


@pytest.mark.parametrize(
    ("platform_facts", "expected"),
    [
        (machine("Darwin", "arm64", installed=("mlx", "llamacpp")), ("mlx", "torch")),
        (machine("Darwin", "arm64", installed=("llamacpp",)), ("llamacpp", "torch")),
        (machine("Darwin", "arm64"), ("torch", "torch")),
        (machine("Darwin", "x86_64", installed=("mlx", "llamacpp")), ("llamacpp", "torch")),
        (machine("Linux", "aarch64", installed=("mlx",)), ("torch", "torch")),
        (machine("Linux", "x86_64", cuda=True, installed=("llamacpp",)), ("torch", "torch")),
        (machine("Windows", "AMD64", installed=("llamacpp",)), ("llamacpp", "torch")),
        (machine("Linux", "x86_64"), ("torch", "torch")),
    ],
)
def test_auto_picks_the_fastest_installed_chat_engine_and_trains_on_torch(platform_facts, expected):
    assert choose_engines("auto", **platform_facts) == expected


@pytest.mark.parametrize("engine", ["torch", "llamacpp", "mlx"])
def test_a_requested_engine_wins_over_the_hardware(engine):
    facts = machine("Linux", "x86_64", cuda=True, installed=("llamacpp", "mlx"))
    assert choose_engines(engine, **facts) == (engine, "torch")


@pytest.mark.parametrize(("engine", "extra"), [("llamacpp", "somnus[cpu]"), ("mlx", "somnus[mlx]")])
def test_a_requested_engine_that_is_missing_names_the_pip_extra(engine, extra):
    with pytest.raises(BackendError, match=re.escape(f"pip install '{extra}'")):
        choose_engines(engine, **machine("Darwin", "arm64"))


def test_an_unknown_engine_is_refused():
    with pytest.raises(BackendError, match="unknown engine 'vllm'"):
        choose_engines("vllm")
    with pytest.raises(BackendError, match="unknown engine"):
        open_backend("vllm", hf_dir=None)


def test_installed_means_importable():
    assert is_installed("torch")
    assert is_installed("llamacpp") == (importlib.util.find_spec("llama_cpp") is not None)


def test_open_backend_loads_the_torch_engine(tiny_model_dir):
    backend = open_backend("torch", hf_dir=tiny_model_dir)
    assert isinstance(backend, Backend) and backend.name == "torch"
    with pytest.raises(ValueError, match="hf_dir"):
        open_backend("torch", gguf_path=tiny_model_dir / "model.gguf")


def test_open_backend_loads_the_mlx_engine(tiny_model_dir):
    backend = open_backend("mlx", hf_dir=tiny_model_dir)
    assert isinstance(backend, Backend) and backend.name == "mlx"


def test_open_backend_loads_the_llamacpp_engine(tiny_model_dir, tmp_path):
    from backends.gguf_export import export_model

    gguf_path = export_model(tiny_model_dir, tmp_path / "tiny.gguf")
    backend = open_backend("llamacpp", gguf_path=gguf_path)
    assert isinstance(backend, Backend) and backend.name == "llamacpp"
    torch_backend = open_backend("torch", hf_dir=tiny_model_dir)
    prompt = torch_backend.render_chat([{"role": "user", "content": "Where is John?"}])
    assert backend.count_tokens(prompt) == torch_backend.count_tokens(prompt)
    with pytest.raises(ValueError, match="gguf_path"):
        open_backend("llamacpp", hf_dir=tiny_model_dir)
