"""What a model reference means, and how to get the files and the engine it needs.

A reference is one of: ``nano`` (the model bundled in ``assistant/nano/model/``), a local
Hugging Face model folder, a ``.gguf`` file, or a Hugging Face id ``org/name`` pulled into the
data folder. Nothing here touches the network except ``pull_model``, which the user asks for.
The llama.cpp engine reads GGUF only, so HF folders are exported once into the cache, under a
name that changes with the weights: a retrained model is never served from a stale export.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from assistant.config import PRIVATE_DIR_MODE, PRIVATE_FILE_MODE, Config, Paths, SomnusError, ensure_private_dir

if TYPE_CHECKING:
    from backends.base import Backend

NANO = "nano"
NANO_DIR = Path(__file__).resolve().parent / "nano" / "model"
TRAIN_NANO = "python -m assistant.nano.train"
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]

_MIB = 1 << 20
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelError(SomnusError):
    """A model reference that cannot be used as it is."""


@dataclass(frozen=True)
class Model:
    """A resolved reference: ``ref`` is what to record (an absolute path for local files)."""

    ref: str
    kind: str
    path: Path

    @functools.cached_property
    def weights(self) -> str:
        """An id of the weights themselves, so adapters grown on them are never worn by others.

        The reference alone is not enough: ``nano`` names whatever model this release bundles, and a
        folder can be retrained in place. Reading each weights file's size and its first and last
        MiB tells apart any two trainings, costs milliseconds even for large models, and survives
        a reinstall that copies the same bytes with new modification times.
        """
        files = [self.path] if self.path.is_file() else sorted(self.path.glob("*.safetensors"))
        digest = hashlib.sha256()
        for file in files:
            size = file.stat().st_size
            digest.update(f"{file.name}\0{size}\0".encode())
            with file.open("rb") as handle:
                digest.update(handle.read(_MIB))
                handle.seek(max(0, size - _MIB))
                digest.update(handle.read(_MIB))
        return digest.hexdigest()[:16]


def resolve_model(ref: str, paths: Paths) -> Model:
    """The local files behind ``ref``, or a ModelError saying how to get them."""
    ref = ref.strip()
    if ref == NANO:
        if not _is_hf_folder(NANO_DIR):
            raise ModelError(f"the bundled nano model is not built yet (no model in {NANO_DIR}): "
                             f"train it with `{TRAIN_NANO}`, or choose another with --model")
        return Model(NANO, "nano", NANO_DIR)
    local = Path(ref).expanduser()
    if local.suffix.lower() == ".gguf":
        if not local.is_file():
            raise ModelError(f"model file {local} not found")
        return Model(str(local.resolve()), "gguf", local.resolve())
    if local.is_dir():
        _check_hf_folder(local)
        return Model(str(local.resolve()), "folder", local.resolve())
    if _HUB_ID.match(ref):
        folder = hub_folder(ref, paths)
        if not _is_hf_folder(folder):
            raise ModelError(f"no folder {ref} here, and the Hugging Face model {ref} is not downloaded: "
                             f"run `somnus model pull {ref}`")
        return Model(ref, "hub", folder)
    raise ModelError(f"unknown model {ref!r}: use nano, a model folder, a .gguf file or a Hugging Face id org/name")


def hub_folder(repo_id: str, paths: Paths) -> Path:
    """Where ``org/name`` lives once pulled."""
    return paths.models / repo_id.replace("/", "--")


def pull_model(repo_id: str, paths: Paths) -> Model:
    """Download ``org/name`` (config, tokenizer, safetensors) into the data folder, with a progress bar."""
    if not _HUB_ID.match(repo_id):
        raise ModelError(f"{repo_id!r} is not a Hugging Face model id (org/name)")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    target = hub_folder(repo_id, paths)
    ensure_private_dir(paths.models)
    try:
        try:
            snapshot_download(repo_id, local_dir=target, allow_patterns=HUB_FILES)
        finally:
            _remove_if_nothing_downloaded(target)
    except LocalEntryNotFoundError as error:
        reason = ("HF_HUB_OFFLINE is set (unset it to allow downloads)" if constants.HF_HUB_OFFLINE
                  else "the Hugging Face hub cannot be reached (check the network connection)")
        raise ModelError(f"cannot download {repo_id}: {reason}") from error
    except GatedRepoError as error:
        raise ModelError(f"cannot download {repo_id}: it is gated; accept its terms on huggingface.co "
                         "and log in with `hf auth login`") from error
    except (RepositoryNotFoundError, RevisionNotFoundError) as error:
        raise ModelError(f"cannot download {repo_id}: no such model on the Hugging Face hub "
                         "(or it is private: log in with `hf auth login`)") from error
    except (HfHubHTTPError, OSError) as error:
        raise ModelError(f"cannot download {repo_id}: {_first_line(error)}") from error
    _make_private(target)
    _check_hf_folder(target)
    return Model(repo_id, "hub", target)


def known_models(paths: Paths, current: str) -> list[dict]:
    """The bundled model, the pulled ones and the configured one, each with whether it is ready."""
    refs = [NANO]
    if paths.models.is_dir():
        refs += sorted(folder.name.replace("--", "/", 1) for folder in paths.models.iterdir() if folder.is_dir())
    listed = []
    for ref in refs + ([current] if current not in refs else []):
        try:
            model = resolve_model(ref, paths)
            entry = {"ref": model.ref, "kind": model.kind, "path": str(model.path), "ready": True, "problem": None}
        except ModelError as error:
            entry = {"ref": ref, "kind": None, "path": None, "ready": False, "problem": str(error)}
        entry["current"] = ref == current or entry["ref"] == current
        listed.append(entry)
    return listed


def gguf_for(model: Model, paths: Paths) -> Path:
    """A GGUF file of ``model`` for llama.cpp: the file itself, or a cached export of the HF folder."""
    if model.kind == "gguf":
        return model.path
    source = model.path.resolve()
    slug = re.sub(r"[^\w.-]", "_", source.name) + "-" + hashlib.sha256(str(source).encode()).hexdigest()[:8]
    folder = ensure_private_dir(paths.cache / "gguf")
    export = folder / f"{slug}-{_fingerprint(source)}.gguf"
    if export.is_file():
        return export
    from backends.gguf_export import export_model

    export_model(source, export)  # appears whole (mode 0600) or not at all: the cache never holds half a file
    for stale in folder.glob(f"{slug}-*.gguf"):
        if stale != export:
            stale.unlink()
    return export


def open_chat_backend(config: Config, paths: Paths, store=None) -> tuple[Backend, Model]:
    """The chat engine for the configured model and backend setting, loaded, and the model it runs.

    With a ``store``, the engine wears the live adapter stack: what the model learnt in its sleeps.
    """
    from backends.select import choose_engines, open_backend

    model = resolve_model(config.model, paths)
    requested = "llamacpp" if model.kind == "gguf" and config.backend == "auto" else config.backend
    engine, _training_engine = choose_engines(requested)
    if engine == "llamacpp":
        backend = open_backend(engine, gguf_path=gguf_for(model, paths))
    elif model.kind == "gguf":
        raise ModelError(f"the {engine} engine needs a Hugging Face model folder, not the GGUF file {model.path}: "
                         "use --backend llamacpp")
    else:
        backend = open_backend(engine, hf_dir=model.path)
    if store is not None:
        from assistant.sleep.blocks import live_adapters

        backend.set_adapters(live_adapters(store, model))
    return backend, model


def _fingerprint(folder: Path) -> str:
    """Changes whenever a file of the model folder does (name, size or modification time)."""
    digest = hashlib.sha256()
    for file in sorted(folder.iterdir()):
        if file.is_file() and not file.name.startswith("."):
            stat = file.stat()
            digest.update(f"{file.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:12]


def _is_hf_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _check_hf_folder(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder} is not a Hugging Face model folder (no config.json)")
    if not any(folder.glob("*.safetensors")):
        raise ModelError(f"{folder} has no .safetensors weights")


def _make_private(folder: Path) -> None:
    for directory, _subfolders, files in os.walk(folder):
        os.chmod(directory, PRIVATE_DIR_MODE)
        for name in files:
            os.chmod(os.path.join(directory, name), PRIVATE_FILE_MODE)


def _remove_if_nothing_downloaded(folder: Path) -> None:
    """Drop a folder a failed pull left with only the hub's bookkeeping, so `model ls` shows no ghost."""
    if folder.is_dir() and not any(path.is_file() for path in folder.rglob("*") if ".cache" not in path.parts):
        shutil.rmtree(folder)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
