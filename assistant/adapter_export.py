"""``somnus adapters export``: what the model learnt in its sleeps, for other tools.

The live stack of LoRA blocks leaves Somnus as ONE LoRA that computes exactly what the stack does
(``backends.lora_export.sum_loras``: A matrices stacked, B side by side, each block's scale folded
in; its rank is the sum of theirs), in the format a tool reads:

* ``peft``: a PEFT folder (``PeftModel.from_pretrained(base, DIR)``; the base's path in its config);
* ``gguf``: ``DIR/adapter.gguf``, a llama.cpp LoRA (``llama-cli --lora``, llama-cpp-python's ``lora_path``);
* ``ollama``: ``DIR/Modelfile`` with the base GGUF, the LoRA GGUF, and the chat template and system
  prompt Somnus uses (``ollama create NAME -f DIR/Modelfile``);
* ``mlx``: ``adapters.safetensors`` and ``adapter_config.json`` for ``mlx_lm.load(base, adapter_path=DIR)``.

``merged`` writes the base with the LoRA folded into its weights instead: a Hugging Face folder (peft,
mlx) or ``DIR/model.gguf`` (gguf, ollama). The folder appears whole or not at all (it is written
under a temporary name beside it and renamed), its files 0600 and its folders 0700.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from assistant.adapters import Stack, grown_on, live_stack
from assistant.config import Config, Paths, SomnusError
from assistant.models import (
    IMPORTED_MARK,
    Model,
    ModelError,
    gguf_dtype,
    gguf_for,
    make_private,
    resolve_model,
    system_prompt_for,
)
from backends.base import BackendError

FORMATS = ("peft", "gguf", "ollama", "mlx")


class ExportError(SomnusError):
    """The live adapter cannot be exported as asked."""


@dataclass(frozen=True)
class Exported:
    """What an export wrote: the folder, its files, and what the LoRA in it is."""

    format: str
    folder: Path
    files: tuple[str, ...]
    version: int
    blocks: int
    rank: int
    merged: bool
    notes: tuple[str, ...] = field(default=())


def export_live(store, paths: Paths, config: Config, fmt: str, target: Path, *, merged: bool = False) -> Exported:
    """Export the store's live adapter stack to ``target`` (a folder that must not exist, or be empty)."""
    stack = live_stack(store)
    if not stack.blocks:
        raise ExportError("no live adapter to export: the model has not slept yet (or was rolled back to the bare model)")
    return export_stack(stack, _grown_model(stack, paths), paths, config, fmt, target, merged=merged)


def export_stack(stack: Stack, model: Model, paths: Paths, config: Config, fmt: str, target: Path, *,
                 merged: bool = False) -> Exported:
    """Export ``stack``, worn on ``model``, as one LoRA in ``fmt`` (see the module's docstring)."""
    from backends.gguf_export import check_exportable
    from backends.lora_export import sum_loras
    from backends.peft_io import read_lora

    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    target = Path(target).expanduser().absolute()
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):
        raise ExportError(f"{target} exists already: export into a new (or empty) folder")
    try:
        check_exportable(model.path)  # the families Somnus grows blocks on, for every format alike
        layers = sum_loras([(read_lora(adapter.path), adapter.scale) for adapter in stack.adapters()])
    except BackendError as error:
        raise ExportError(f"cannot export the live adapter: {error}") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.export-"))
    try:
        notes = _WRITERS[fmt](staging, layers, model, paths, config, merged)
        make_private(staging)
        if target.exists():
            target.rmdir()  # an empty folder the user made for it
        os.rename(staging, target)
    except BackendError as error:
        raise ExportError(f"cannot export the live adapter: {error}") from None
    except OSError as error:
        raise ExportError(f"cannot write {target}: {error.strerror or error}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    files = tuple(sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()))
    rank = layers[0].down.shape[0]
    return Exported(fmt, target, files, stack.version, len(stack.blocks), rank, merged, tuple(notes))


def _grown_model(stack: Stack, paths: Paths) -> Model:
    """The model the stack was grown on, with the very weights it was grown on."""
    ref = stack.extra.get("model")
    try:
        model = resolve_model(ref, paths) if ref else None
    except ModelError as error:
        raise ExportError(f"the live adapter was grown on {ref}, which is not here any more ({error})") from None
    if model is None or not grown_on(stack, model):
        raise ExportError(f"the live adapter was grown on {ref or 'an unrecorded model'}, whose weights have changed "
                          "since: it fits no model here")
    return model


def _peft(folder: Path, layers, model: Model, _paths: Paths, _config: Config, merged: bool) -> list[str]:
    from backends.lora_export import write_merged, write_peft

    if merged:
        write_merged(model.path, layers, folder, skip=(IMPORTED_MARK,))
    else:
        write_peft(folder, layers, str(model.path))
    return []


def _mlx(folder: Path, layers, model: Model, paths: Paths, config: Config, merged: bool) -> list[str]:
    from backends.lora_export import write_mlx
    from backends.peft_io import mlx_model_settings

    model_config = json.loads((model.path / "config.json").read_text())
    # transformers 5 nests the rotary settings where mlx-lm does not look: told nothing, it drifts from Somnus.
    settings = mlx_model_settings(model_config, model.path)
    if merged:
        _peft(folder, layers, model, paths, config, merged)
        merged_config = folder / "config.json"
        merged_config.write_text(json.dumps({**json.loads(merged_config.read_text()), **settings}, indent=2))
        return []
    write_mlx(folder, layers, int(model_config["num_hidden_layers"]))
    if not settings:
        return []
    return [f"load it with mlx_lm.load(\"{model.path}\", adapter_path=DIR, model_config={json.dumps(settings)}): "
            "mlx-lm does not read this model's rotary settings from its folder"]


def _gguf(folder: Path, layers, model: Model, _paths: Paths, _config: Config, merged: bool) -> list[str]:
    from backends.gguf_export import export_lora_for_model, export_model
    from backends.lora_export import write_merged, write_peft

    scratch = folder / ".scratch"
    scratch.mkdir()
    if merged:
        write_merged(model.path, layers, scratch, skip=(IMPORTED_MARK,))
        export_model(scratch, folder / "model.gguf", dtype=gguf_dtype(model))
    else:
        write_peft(scratch, layers, str(model.path))
        export_lora_for_model(scratch, model.path, folder / "adapter.gguf")
    shutil.rmtree(scratch)
    return []


def _ollama(folder: Path, layers, model: Model, paths: Paths, config: Config, merged: bool) -> list[str]:
    from backends.gguf_export import chat_template_of

    _gguf(folder, layers, model, paths, config, merged)
    if merged:
        lines = ["FROM ./model.gguf"]
    else:
        _link_or_copy(gguf_for(model, paths), folder / "base.gguf")
        lines = ["FROM ./base.gguf", "ADAPTER ./adapter.gguf"]
    notes = []
    template, stop = ollama_template(chat_template_of(model.path) or "", _tokenizer_config(model.path))
    if template is None:
        notes.append("no Go translation of this model's chat template: Ollama will use the one inside the GGUF")
        lines.append(f"# {notes[-1]}")
    else:
        lines.append(f'TEMPLATE """{template}"""')
        lines.append(f'PARAMETER stop "{stop}"')
    system = system_prompt_for(model, config)
    if system is not None:
        if '"""' in system:
            raise ExportError('the system prompt holds """, which a Modelfile cannot quote: change it in config.toml')
        lines.append(f'SYSTEM """{system}"""')
    (folder / "Modelfile").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return notes


_WRITERS = {"peft": _peft, "gguf": _gguf, "ollama": _ollama, "mlx": _mlx}

# Ollama's Go templates for the chat layouts Somnus's models use, as their Jinja templates render a
# conversation: a system turn (Ollama passes the Modelfile's SYSTEM as .System, and also as the first
# message in its newer versions, hence the check), then each turn, then the assistant's header.
_FIRST_IS_NOT_SYSTEM = '(or (not .Messages) (ne (index .Messages 0).Role "system"))'
_CHATML = (
    "{{- if and .System " + _FIRST_IS_NOT_SYSTEM + " }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
)
_LLAMA3 = (
    "{{- if and .System " + _FIRST_IS_NOT_SYSTEM + " }}<|start_header_id|>system<|end_header_id|>\n\n"
    "{{ .System }}<|eot_id|>{{ end }}"
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
# Gemma has no system turn: its template puts the system prompt before the first user message.
_GEMMA = (
    "{{- $system := .System }}"
    '{{- range .Messages }}{{- if eq .Role "user" }}<start_of_turn>user\n'
    "{{ if $system }}{{ $system }}\n\n{{ $system = \"\" }}{{ end }}{{ .Content }}<end_of_turn>\n"
    '{{ else if eq .Role "assistant" }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n{{ end }}'
    "{{- end }}<start_of_turn>model\n"
)
_LAYOUTS = (("<|im_start|>", _CHATML, "<|im_end|>"), ("<|start_header_id|>", _LLAMA3, "<|eot_id|>"),
            ("<start_of_turn>", _GEMMA, "<end_of_turn>"))


def ollama_template(jinja: str, tokenizer_config: dict) -> tuple[str | None, str | None]:
    """(Ollama's TEMPLATE, its stop string) for a model's Jinja chat template, or (None, None) for a
    layout other than ChatML, Llama 3 and Gemma. A template that writes the BOS token itself, for a
    tokenizer that does not add it, gets it in front (Ollama adds it only where the GGUF says so)."""
    for marker, template, stop in _LAYOUTS:
        if marker in jinja:
            bos = tokenizer_config.get("bos_token")
            bos = bos.get("content") if isinstance(bos, dict) else bos
            if "bos_token" in jinja and bos and not tokenizer_config.get("add_bos_token", False):
                template = bos + template
            return template, stop
    return None, None


def _tokenizer_config(hf_dir: Path) -> dict:
    path = hf_dir / "tokenizer_config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError) as error:
        raise BackendError(f"{path}: unreadable ({error})") from None


def _link_or_copy(source: Path, target: Path) -> None:
    """The base GGUF beside the Modelfile: a hard link to Somnus's cached export where possible."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)

