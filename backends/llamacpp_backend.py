"""The llama.cpp engine: a GGUF model through llama-cpp-python, with LoRA adapters swapped live.

llama.cpp is the fast CPU engine. The base model stays loaded for the life of the backend; LoRA
adapters (PEFT folders, converted once to ``adapter.gguf`` beside them, or ready GGUF files) are
attached to the context with llama.cpp's adapter API, so a sleep cycle's new blocks apply without
reloading the base. llama.cpp reports problems on its log rather than by exception, so the log is
captured (never printed) and its last error becomes the ``BackendError`` message.
"""

from __future__ import annotations

import codecs
import ctypes
import os
import threading
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import psutil

from backends.base import Adapter, BackendError, Sampling, render_chat_template

DEFAULT_MAX_CONTEXT = 8192
_GGML_LOG_ERROR = 4
_GGML_TYPE_F32 = 0
_LLAMA_FTYPE_ALL_F32 = 0
_recent_errors: deque[str] = deque(maxlen=8)
_log_callback = None  # kept referenced: llama.cpp calls it for the life of the process


class LlamaCppBackend:
    """A GGUF model loaded in llama.cpp that streams, scores and wears LoRA adapters.

    ``n_ctx`` defaults to the model's trained context, at most DEFAULT_MAX_CONTEXT tokens (the KV
    cache of a long-context model would not fit a laptop); llama.cpp rounds it up to a multiple of 256.
    """

    name = "llamacpp"

    def __init__(self, gguf_path: Path, n_ctx: int | None = None):
        self.gguf_path = Path(gguf_path)
        if not self.gguf_path.is_file():
            raise BackendError(f"{self.gguf_path}: GGUF model not found")
        llama_cpp = _import_llama_cpp()
        header = _read_header(self.gguf_path)
        # An f32 model keeps an f32 KV cache so its outputs match the torch engine to ~1e-6;
        # smaller weights get llama.cpp's default (f16) cache, as precise as the weights.
        kv_type = _GGML_TYPE_F32 if header["general.file_type"] == _LLAMA_FTYPE_ALL_F32 else None
        trained_context = int(header.get(f"{header['general.architecture']}.context_length", DEFAULT_MAX_CONTEXT))
        _recent_errors.clear()
        try:
            self._llm = llama_cpp.Llama(
                model_path=str(self.gguf_path),
                n_ctx=n_ctx or min(trained_context, DEFAULT_MAX_CONTEXT),
                n_threads=_threads(),
                type_k=kv_type,
                type_v=kv_type,
                verbose=False,
            )
        except (ValueError, RuntimeError) as error:
            raise BackendError(f"{self.gguf_path}: llama.cpp cannot load it ({_last_error(str(error))})") from None
        self._lib = llama_cpp
        self._vocab = llama_cpp.llama_model_get_vocab(self._llm.model)
        self.context_length = self._llm.n_ctx()
        self._metadata = dict(self._llm.metadata)
        self._attached: dict[tuple[Path, int], object] = {}

    def render_chat(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        template = self._metadata.get("tokenizer.chat_template")
        if not template:
            raise BackendError(f"{self.gguf_path}: the model has no chat template")
        return render_chat_template(
            template,
            messages,
            add_generation_prompt,
            bos_token=self._token_text(self._llm.token_bos()),
            eos_token=self._token_text(self._llm.token_eos()),
        )

    def count_tokens(self, text: str) -> int:
        return len(self._tokenize(text))

    def stream(
        self, prompt: str, sampling: Sampling = Sampling(), cancel: threading.Event | None = None
    ) -> Iterator[str]:
        prompt_ids = self._tokenize(prompt)
        budget = min(sampling.max_tokens, self._room_after(prompt_ids))
        if budget <= 0 or (cancel is not None and cancel.is_set()):
            return
        seed = sampling.seed if sampling.seed is not None else self._lib.LLAMA_DEFAULT_SEED  # default: random
        self._llm.set_seed(seed)
        # Only temperature and top-p shape the choice (no top-k/min-p/penalties), as on every engine.
        tokens = self._llm.generate(
            prompt_ids, temp=sampling.temperature, top_p=sampling.top_p, top_k=0, min_p=0.0, repeat_penalty=1.0
        )
        # A token may end inside a multi-byte character: decode incrementally, never split a character.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            for produced, token in enumerate(tokens, start=1):
                if (cancel is not None and cancel.is_set()) or self._lib.llama_vocab_is_eog(self._vocab, token):
                    break
                piece = decoder.decode(self._llm.detokenize([token]))
                if piece:
                    yield piece
                if produced >= budget:
                    break
        finally:
            tokens.close()
        tail = decoder.decode(b"", final=True)
        if tail:
            yield tail

    def token_logprobs(self, prompt: str, completion: str) -> list[float]:
        """Log-probabilities of ``completion``'s tokens, each tokenized apart from the prompt."""
        prompt_ids, completion_ids = self._tokenize(prompt), self._tokenize(completion)
        if not completion_ids:
            return []
        if not prompt_ids:
            raise BackendError("token_logprobs needs a non-empty prompt to condition the first token on")
        ids = prompt_ids + completion_ids
        if len(ids) > self.context_length:
            raise BackendError(f"{len(ids)} tokens do not fit the context of {self.context_length}")
        rows = self._logits_for(ids, first=len(prompt_ids) - 1, last=len(ids) - 2)
        rows = rows.astype(np.float64)
        peak = rows.max(axis=1, keepdims=True)
        log_norm = peak[:, 0] + np.log(np.exp(rows - peak).sum(axis=1))
        return (rows[np.arange(len(completion_ids)), completion_ids] - log_norm).tolist()

    def set_adapters(self, adapters: Sequence[Adapter]) -> None:
        # Keyed by file and modification time: an adapter re-trained in place is loaded afresh.
        keys = [(path, path.stat().st_mtime_ns) for path in (self._adapter_gguf(Path(a.path)) for a in adapters)]
        handles = {key: self._attached.get(key) or self._load_adapter(key[0]) for key in keys}
        pointers = (self._lib.llama_adapter_lora_p_ctypes * len(keys))(*(handles[key] for key in keys))
        scales = (ctypes.c_float * len(keys))(*(float(adapter.scale) for adapter in adapters))
        if self._lib.llama_set_adapters_lora(self._llm.ctx, pointers, len(keys), scales) != 0:
            names = ", ".join(str(path) for path, _ in keys)
            raise BackendError(f"llama.cpp refused the adapters {names} ({_last_error()})")
        for key, handle in self._attached.items():
            if key not in handles:
                self._lib.llama_adapter_lora_free(handle)
        self._attached = handles
        self._llm.reset()  # the cached prompt was computed under the previous adapters

    def close(self) -> None:
        """Free the model; llama.cpp frees the adapters still loaded on it."""
        self._attached = {}
        self._llm.close()

    def _tokenize(self, text: str) -> list[int]:
        return self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def _token_text(self, token: int) -> str:
        return self._llm.detokenize([token], special=True).decode("utf-8", errors="replace") if token >= 0 else ""

    def _room_after(self, prompt_ids: list[int]) -> int:
        if len(prompt_ids) >= self.context_length:
            raise BackendError(f"the prompt's {len(prompt_ids)} tokens fill the context of {self.context_length}")
        return self.context_length - len(prompt_ids)

    def _logits_for(self, ids: list[int], first: int, last: int) -> np.ndarray:
        """Logits after each position ``first..last`` of ``ids``, decoded in one pass from empty memory.

        The high-level ``Llama`` keeps logits of the last token only (or of every token in a
        context-sized buffer with ``logits_all``), so scoring asks llama.cpp for exactly the rows it needs.
        """
        lib, ctx = self._lib, self._llm.ctx
        self._llm.reset()
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        n_batch, n_vocab = self._llm.n_batch, self._llm.n_vocab()
        rows = np.empty((last - first + 1, n_vocab), dtype=np.float32)
        batch = lib.llama_batch_init(n_batch, 0, 1)
        try:
            for start in range(0, len(ids), n_batch):
                chunk = ids[start : start + n_batch]
                batch.n_tokens = len(chunk)
                for i, token in enumerate(chunk):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, start + i, 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = first <= start + i <= last
                if lib.llama_decode(ctx, batch) != 0:
                    raise BackendError(f"llama.cpp failed to evaluate {len(ids)} tokens ({_last_error()})")
                for i in range(len(chunk)):
                    if first <= start + i <= last:
                        logits = lib.llama_get_logits_ith(ctx, i)
                        rows[start + i - first] = np.ctypeslib.as_array(logits, shape=(n_vocab,))
        finally:
            lib.llama_batch_free(batch)
            self._llm.reset()
        return rows

    def _adapter_gguf(self, path: Path) -> Path:
        """The GGUF LoRA for ``path``: the file itself, or a PEFT folder's (re)exported ``adapter.gguf``."""
        if path.is_file():
            return path.resolve()
        if not path.is_dir():
            raise BackendError(f"{path}: adapter not found")
        from backends.gguf_export import export_lora

        target = path / "adapter.gguf"
        sources = [path / "adapter_config.json", path / "adapter_model.safetensors"]
        newest_source = max((s.stat().st_mtime_ns for s in sources if s.exists()), default=0)
        if not target.exists() or target.stat().st_mtime_ns < newest_source:
            arch = self._metadata["general.architecture"]
            export_lora(
                path,
                target,
                arch=arch,
                n_head=int(self._metadata[f"{arch}.attention.head_count"]),
                n_head_kv=int(self._metadata.get(f"{arch}.attention.head_count_kv", 0))
                or int(self._metadata[f"{arch}.attention.head_count"]),
            )
        return target.resolve()

    def _load_adapter(self, path: Path) -> object:
        _recent_errors.clear()
        handle = self._lib.llama_adapter_lora_init(self._llm.model, os.fsencode(path))
        if not handle:
            raise BackendError(f"{path}: LoRA adapter does not fit {self.gguf_path.name} ({_last_error()})")
        return handle


def _import_llama_cpp():
    """llama_cpp, with its native log routed into our buffer instead of stderr."""
    global _log_callback
    try:
        import llama_cpp
    except ImportError:
        raise BackendError("the llama.cpp engine is not installed: pip install 'somnus[cpu]'") from None
    if _log_callback is None:

        @llama_cpp.llama_log_callback
        def keep_errors(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
            if level == _GGML_LOG_ERROR:
                _recent_errors.append(text.decode("utf-8", errors="replace").strip())

        _log_callback = keep_errors
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
    return llama_cpp


def _last_error(fallback: str = "no details from llama.cpp") -> str:
    """llama.cpp's latest error line, without its ``function_name:`` prefix."""
    if not _recent_errors:
        return fallback
    return _recent_errors[-1].split(": ", 1)[-1]


def _read_header(path: Path) -> dict[str, object]:
    """The scalar metadata of a GGUF file, read without loading its weights."""
    import gguf

    try:
        fields = gguf.GGUFReader(path).fields
    except (ValueError, OSError) as error:
        raise BackendError(f"{path}: not a valid GGUF file ({error})") from None
    header = {key: field.contents() for key, field in fields.items() if len(field.data) == 1}
    if "general.architecture" not in header:
        raise BackendError(f"{path}: GGUF file without an architecture")
    header.setdefault("general.file_type", None)
    return header


def _threads() -> int:
    """One thread per physical core this process may run on: llama.cpp's threads wait for each other
    at every layer, so a thread more than the cores it is given (taskset, a container's CPU set)
    stalls every token."""
    physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else physical
    return max(1, min(physical, allowed))
