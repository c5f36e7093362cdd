"""The engine benchmark on the tiny model: real torch and llama.cpp runs, a table and a JSON file."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from assistant.bench.engines import run


def test_engine_benchmark_writes_positive_measurements(tiny_model_dir, tmp_path):
    pytest.importorskip("llama_cpp")
    json_path = tmp_path / "engines.json"
    output = io.StringIO()
    result = run(
        tiny_model_dir, json_path, prompts=["Hello!", "Where is John?"], max_tokens=12,
        console=Console(file=output, width=120),
    )

    assert json.loads(json_path.read_text()) == result
    assert (result["max_tokens"], result["prompts"]) == (12, 2)
    assert set(result["engines"]) == {"torch", "llamacpp"}
    for measured in result["engines"].values():
        assert measured["tokens_per_second"] > 0
        assert 0 < measured["first_token_seconds"] < 60
        assert len(measured["tokens"]) == 2 and all(0 < count <= 12 for count in measured["tokens"])
    assert result["engines"]["torch"]["tokens"] == result["engines"]["llamacpp"]["tokens"]
    assert result["speedup"] == pytest.approx(
        result["engines"]["llamacpp"]["tokens_per_second"] / result["engines"]["torch"]["tokens_per_second"]
    )
    table = output.getvalue()
    assert "torch" in table and "llamacpp" in table and "tokens/s" in table


def test_missing_model_is_reported_per_engine(tmp_path):
    result = run(tmp_path / "no-model", prompts=["Hello!"], max_tokens=4, console=Console(file=io.StringIO()))
    assert set(result["engines"]) == {"torch", "llamacpp"}
    assert all("no-model" in measured["error"] for measured in result["engines"].values())
    assert result["speedup"] is None
