"""``somnus adapters export``: the live stack of blocks as one exact LoRA, read back by the tools it is for.

The stack is two blocks of different ranks, scales (lora_alpha / r) and target layers, promoted live in a
store; the reference is Somnus's own torch engine wearing it. Measured on the tiny Llama in fp32, the
largest difference in log-probability from the engine's: PEFT 5e-7, merged folder 9e-7, llama.cpp with
the LoRA GGUF 9e-7, merged GGUF 9e-7, mlx-lm 1.4e-6 (asserted < 1e-4; the bare model is 1.3 away).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import make_peft_lora

from assistant import adapters
from assistant.adapter_export import (
    ExportError,
    _grown_model,
    export_live,
    ollama_template,
)
from assistant.config import load_config, open_paths
from assistant.models import resolve_model
from assistant.persona import DEFAULT_SYSTEM_PROMPT
from assistant.store import Store
from backends.base import Adapter, Sampling
from backends.lora_export import sum_loras
from backends.peft_io import LoraBlock, read_lora

MESSAGES = [{"role": "user", "content": "My sister is called Alice. Where is John?"}]
COMPLETION = "John travelled to the hallway."
TOLERANCE = 1e-4


def promote_stack(home: Path, model_dir: Path, blocks: list[adapters.Block]) -> None:
    """What nights that went well leave behind: blocks, their manifest, a live version."""
    paths = open_paths(home)
    model = resolve_model(str(model_dir), paths)
    stack = adapters.Stack(1, tuple(blocks), None, {"model": model.ref, "weights": model.weights})
    manifest = adapters.save_stack(paths.home, stack)
    with Store(paths.database) as store:
        store.sleep.promote(store.sleep.add_adapter(1, str(manifest)), {})


@pytest.fixture(scope="module")
def live(tiny_model_dir, tmp_path_factory):
    """A data folder whose live stack is two blocks: rank 4 at scale 2 on every projection, and rank 2
    at scale 5/sqrt(2) (rsLoRA) on three of them."""
    home = tmp_path_factory.mktemp("home")
    paths = open_paths(home)
    first = make_peft_lora(tiny_model_dir, adapters.block_dir(home, "night1"), seed=1)
    second = make_peft_lora(tiny_model_dir, adapters.block_dir(home, "night2"), seed=2, r=2, lora_alpha=5,
                            use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"])
    promote_stack(home, tiny_model_dir, [adapters.Block("night1", first, (1,)), adapters.Block("night2", second, (2,))])
    config = load_config(paths).with_overrides(model=str(tiny_model_dir), backend="torch")
    return paths, config


@pytest.fixture(scope="module")
def somnus_engine(live):
    """Somnus's own chat engine (torch) wearing the live stack, as a chat does."""
    from assistant.engine import open_chat_backend

    paths, config = live
    with Store(paths.database) as store:
        backend, _model = open_chat_backend(config, paths, store)
    prompt = backend.render_chat(MESSAGES)
    yield backend, prompt, np.array(backend.token_logprobs(prompt, COMPLETION))
    backend.close()


def export(live, fmt: str, target: Path, merged: bool = False):
    paths, config = live
    with Store(paths.database) as store:
        return export_live(store, paths, config, fmt, target, merged=merged)


def hf_logprobs(model, tokenizer, prompt: str, completion: str) -> np.ndarray:
    import torch

    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    completion_ids = tokenizer.encode(completion, add_special_tokens=False)
    with torch.no_grad():
        logits = model.eval()(torch.tensor([prompt_ids + completion_ids])).logits[0].double()
    rows = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)
    return rows[torch.arange(len(completion_ids)), torch.tensor(completion_ids)].numpy()


def assert_private(folder: Path) -> None:
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for path in folder.rglob("*"):
        assert stat.S_IMODE(path.stat().st_mode) == (0o700 if path.is_dir() else 0o600), path


def test_the_summed_lora_computes_the_sum_of_the_scaled_blocks():
    rng = np.random.default_rng(0)

    def layer(module, rank, scale):
        return LoraBlock(module, rng.normal(size=(rank, 6)).astype(np.float32),
                         rng.normal(size=(5, rank)).astype(np.float32), scale)

    first = [layer("model.layers.0.q_proj", 4, 2.0), layer("model.layers.0.v_proj", 4, 2.0)]
    second = [layer("model.layers.0.q_proj", 2, 0.7)]
    summed = {s.module: s for s in sum_loras([(first, 1.0), (second, 0.5)])}
    assert {s.down.shape[0] for s in summed.values()} == {6} and {s.scale for s in summed.values()} == {1.0}
    q, v = summed["model.layers.0.q_proj"], summed["model.layers.0.v_proj"]
    expected_q = 2.0 * first[0].up @ first[0].down + 0.5 * 0.7 * second[0].up @ second[0].down
    np.testing.assert_allclose(q.up @ q.down, expected_q, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(v.up @ v.down, 2.0 * first[1].up @ first[1].down, rtol=1e-5, atol=1e-5)
    assert not v.down[4:].any() and not v.up[:, 4:].any()  # the rank v lacks is zero padding


def test_the_go_templates_follow_the_jinja_layout_and_add_bos_only_where_the_tokenizer_does_not():
    chatml, stop = ollama_template("{{ '<|im_start|>' + message['role'] }}", {})
    assert stop == "<|im_end|>" and chatml.endswith("<|im_start|>assistant\n") and "{{ .System }}" in chatml
    llama3 = "{{ bos_token }}<|start_header_id|>"
    template, stop = ollama_template(llama3, {"bos_token": "<|begin_of_text|>"})
    assert stop == "<|eot_id|>" and template.startswith("<|begin_of_text|>")
    template, _ = ollama_template(llama3, {"bos_token": "<|begin_of_text|>", "add_bos_token": True})
    assert not template.startswith("<|begin_of_text|>")
    gemma, stop = ollama_template("{{ bos_token }}<start_of_turn>", {"bos_token": "<bos>", "add_bos_token": True})
    assert stop == "<end_of_turn>" and gemma.endswith("<start_of_turn>model\n") and not gemma.startswith("<bos>")
    assert ollama_template("[INST] {{ message }} [/INST]", {}) == (None, None)


def test_peft_export_and_merged_folder_compute_what_somnus_computes(live, somnus_engine, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _backend, prompt, expected = somnus_engine
    exported = export(live, "peft", tmp_path / "peft")
    folder = exported.folder
    assert exported.rank == 6 and exported.blocks == 2 and set(exported.files) == {
        "adapter_config.json", "adapter_model.safetensors"}
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir) and config["r"] == config["lora_alpha"] == 6
    assert_private(folder)

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    bare = hf_logprobs(base, tokenizer, prompt, COMPLETION)
    assert np.abs(bare - expected).max() > 0.05  # the stack changes the answer
    got = hf_logprobs(PeftModel.from_pretrained(base, folder), tokenizer, prompt, COMPLETION)
    assert np.abs(got - expected).max() < TOLERANCE

    merged = export(live, "peft", tmp_path / "merged", merged=True).folder
    assert (merged / "config.json").is_file() and (merged / "tokenizer.json").is_file()
    assert_private(merged)
    got = hf_logprobs(AutoModelForCausalLM.from_pretrained(merged), tokenizer, prompt, COMPLETION)
    assert np.abs(got - expected).max() < TOLERANCE


def test_gguf_export_and_merged_gguf_answer_as_somnus_does_in_llamacpp(live, somnus_engine, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    from assistant.models import gguf_for
    from backends.llamacpp_backend import LlamaCppBackend

    backend, prompt, expected = somnus_engine
    paths, config = live
    sampling = Sampling(max_tokens=24)
    somnus_text = "".join(backend.stream(prompt, sampling))
    folder = export(live, "gguf", tmp_path / "gguf").folder
    assert exported_files(folder) == {"adapter.gguf"}
    base_gguf = gguf_for(resolve_model(config.model, paths), paths)

    llm = llama_cpp.Llama(str(base_gguf), lora_path=str(folder / "adapter.gguf"), n_ctx=256, verbose=False)
    prompt_ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)  # the template's tokens as tokens
    greedy = []
    for token in llm.generate(prompt_ids, top_k=1, temp=0.0):
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token) or len(greedy) == sampling.max_tokens:
            break
        greedy.append(token)
    text = llm.detokenize(greedy).decode("utf-8", errors="replace")  # a random model writes broken UTF-8 too
    llm.close()
    assert somnus_text and text == somnus_text

    engine = LlamaCppBackend(base_gguf)
    try:
        bare = np.array(engine.token_logprobs(prompt, COMPLETION))
        engine.set_adapters([Adapter(folder / "adapter.gguf")])
        assert np.abs(np.array(engine.token_logprobs(prompt, COMPLETION)) - expected).max() < TOLERANCE
        assert np.abs(bare - expected).max() > 0.05
    finally:
        engine.close()

    merged = export(live, "gguf", tmp_path / "merged", merged=True).folder
    assert exported_files(merged) == {"model.gguf"}
    engine = LlamaCppBackend(merged / "model.gguf")
    try:
        assert np.abs(np.array(engine.token_logprobs(prompt, COMPLETION)) - expected).max() < TOLERANCE
        assert "".join(engine.stream(prompt, sampling)) == somnus_text
    finally:
        engine.close()


def exported_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_mlx_export_loads_in_mlx_lm_and_computes_what_somnus_computes(live, somnus_engine, tiny_model_dir, tmp_path):
    exported = export(live, "mlx", tmp_path / "mlx")
    folder = exported.folder
    # transformers 5 nests rope_theta where mlx-lm does not look: the note says what to pass, and the
    # merged folder says it where mlx-lm reads it (SmolLM2's 100000 read as 10000 changed 8 of 10 answers).
    theta = json.loads((tiny_model_dir / "config.json").read_text())["rope_parameters"]["rope_theta"]
    assert exported.notes == (f'load it with mlx_lm.load("{tiny_model_dir}", adapter_path=DIR, model_config='
                              f'{{"rope_theta": {json.dumps(theta)}}}): mlx-lm does not read this model\'s rotary '
                              "settings from its folder",)
    merged = export(live, "mlx", tmp_path / "mlx-merged", merged=True).folder
    assert json.loads((merged / "config.json").read_text())["rope_theta"] == theta
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["lora_parameters"]["rank"] == 6 and config["lora_parameters"]["scale"] == 1.0
    assert config["num_layers"] == 2 and "self_attn.q_proj" in config["lora_parameters"]["keys"]
    assert_private(folder)
    mx = pytest.importorskip("mlx.core")
    mlx_lm = pytest.importorskip("mlx_lm")

    _backend, prompt, expected = somnus_engine

    def logprobs(model, tokenizer):
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        completion_ids = tokenizer.encode(COMPLETION, add_special_tokens=False)
        logits = model(mx.array([prompt_ids + completion_ids]))[0, len(prompt_ids) - 1 : -1].astype(mx.float32)
        rows = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return np.array(mx.take_along_axis(rows, mx.array(completion_ids)[:, None], axis=-1)[:, 0])

    got = logprobs(*mlx_lm.load(str(tiny_model_dir), adapter_path=str(folder))[:2])
    assert np.abs(got - expected).max() < TOLERANCE
    bare = logprobs(*mlx_lm.load(str(tiny_model_dir))[:2])
    assert np.abs(bare - expected).max() > 0.05


def test_ollama_modelfile_names_files_that_exist_with_somnus_template_and_system_prompt(live, tmp_path):
    exported = export(live, "ollama", tmp_path / "ollama")
    folder = exported.folder
    modelfile = (folder / "Modelfile").read_text()
    named = [line.split(maxsplit=1) for line in modelfile.splitlines() if line.startswith(("FROM ", "ADAPTER "))]
    assert [kind for kind, _ in named] == ["FROM", "ADAPTER"]
    for _kind, relative in named:
        assert (folder / relative).is_file(), relative
    assert (folder / "base.gguf").read_bytes()[:4] == b"GGUF" and exported.notes == ()
    assert 'TEMPLATE """{{- if and .System' in modelfile and "<|im_start|>{{ .Role }}" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert f'SYSTEM """{DEFAULT_SYSTEM_PROMPT}"""' in modelfile
    assert_private(folder)

    merged = export(live, "ollama", tmp_path / "merged", merged=True).folder
    modelfile = (merged / "Modelfile").read_text()
    assert "FROM ./model.gguf" in modelfile and "ADAPTER" not in modelfile and (merged / "model.gguf").is_file()


def test_without_a_live_adapter_nothing_is_written(tmp_path, tiny_model_dir):
    paths = open_paths(tmp_path / "home")
    config = load_config(paths).with_overrides(model=str(tiny_model_dir))
    with Store(paths.database) as store, pytest.raises(ExportError, match="no live adapter to export"):
        export_live(store, paths, config, "peft", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]


def test_a_family_the_export_does_not_know_is_named_and_nothing_is_written(tiny_model_dir, tmp_path):
    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "mistral")
    config_path = model_dir / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "architectures": ["MistralForCausalLM"]}))
    home = tmp_path / "home"
    block = make_peft_lora(tiny_model_dir, adapters.block_dir(home, "night1"), seed=1)
    promote_stack(home, model_dir, [adapters.Block("night1", block)])
    paths = open_paths(home)
    with Store(paths.database) as store, pytest.raises(ExportError, match="MistralForCausalLM cannot be exported"):
        export_live(store, paths, load_config(paths), "peft", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "mistral"]


def test_an_existing_folder_or_changed_weights_are_refused(live, tmp_path):
    paths, _config = live
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="exists already"):
        export(live, "peft", occupied)
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]
    with Store(paths.database) as store:
        stack = adapters.live_stack(store)
    assert [b.id for b in stack.blocks] == ["night1", "night2"]
    moved = adapters.Stack(2, stack.blocks, 1, {**stack.extra, "weights": "0" * 16})
    with pytest.raises(ExportError, match="whose weights have changed"):
        _grown_model(moved, paths)


def test_peft_export_is_one_lora_that_reads_back_as_the_stack(live, tmp_path):
    """Fast: the written PEFT folder holds the summed LoRA (rank 6, scale 1) of the two blocks."""
    paths, _config = live
    folder = export(live, "peft", tmp_path / "peft").folder
    layers = {layer.module: layer for layer in read_lora(folder)}
    with Store(paths.database) as store:
        stack = adapters.live_stack(store)
    blocks = [{layer.module: layer for layer in read_lora(b.path)} for b in stack.blocks]
    module = "model.layers.1.self_attn.q_proj"
    expected = sum(b[module].scale * b[module].up @ b[module].down for b in blocks if module in b)
    got = layers[module].scale * layers[module].up @ layers[module].down
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert set(layers) == set(blocks[0]) and {layer.down.shape[0] for layer in layers.values()} == {6}


@pytest.mark.slow
def test_the_command_lists_exports_and_refuses_in_one_line(live, tmp_path):

    paths, config = live

    def somnus(*args):
        return subprocess.run([sys.executable, "-m", "cli", "--model", config.model, *args], check=False, capture_output=True,
                              text=True, env={**os.environ, "SOMNUS_HOME": str(paths.home)}, timeout=300)

    listed = somnus("adapters", "--json")
    assert listed.returncode == 0 and [row["status"] for row in json.loads(listed.stdout)] == ["live"]
    assert "live" in somnus("adapters").stdout
    target = tmp_path / "for-ollama"
    done = somnus("adapters", "export", "ollama", str(target))
    assert done.returncode == 0, done.stderr
    assert "one LoRA of rank 6 (adapter version 1, 2 block(s))" in done.stdout and (target / "Modelfile").is_file()
    again = somnus("adapters", "export", "peft", str(target))
    assert again.returncode == 2 and again.stderr.strip().count("\n") == 0
    assert again.stderr.startswith(f"somnus: {target} exists already")
