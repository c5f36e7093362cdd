"""The few array operations the sleep losses need, once per training engine.

The losses in ``assistant/sleep/losses.py`` are written once and run on torch tensors (gradients by
autograd) and on MLX arrays (gradients by ``mx.value_and_grad`` of a loss function). They reach the
engine only through an ``ArrayOps``: ``TORCH_OPS`` or ``MLX_OPS``. Both are built on first access, so
importing this module loads neither library, and a torch-only install never touches mlx.

Conventions shared by both: ``log_softmax`` and ``take_along_last_axis`` work on the last axis (the
vocabulary); ``sum`` and ``mean`` reduce everything when ``axis`` is None; ``asarray(values, like)``
gives a floating array with ``like``'s dtype and device (float32 on the default device without it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from backends.base import BackendError


@dataclass(frozen=True)
class ArrayOps:
    """One engine's array operations, each a plain function on that engine's arrays."""

    name: str
    asarray: Callable[..., Any]  # (values, like=None) -> floating array
    log_softmax: Callable[[Any], Any]
    take_along_last_axis: Callable[[Any, Any], Any]  # (x[..., V], indices[...]) -> x[..., indices]
    exp: Callable[[Any], Any]
    sqrt: Callable[[Any], Any]
    logaddexp: Callable[[Any, Any], Any]
    sum: Callable[..., Any]  # (x, axis=None)
    mean: Callable[..., Any]  # (x, axis=None)
    clip: Callable[..., Any]  # (x, low=None, high=None)
    stop_gradient: Callable[[Any], Any]
    # (rows of [T_i, V], width) -> [len(rows), width, V] float32, each row zero-padded to width
    stack_rows: Callable[[Sequence[Any], int], Any]
    to_compact: Callable[[Any], Any]  # a copy in float16, to keep (e.g. a cached teacher's log-probabilities)


@functools.cache
def _torch_ops() -> ArrayOps:
    import torch

    def asarray(values, like=None):
        if like is None:
            return torch.as_tensor(values, dtype=torch.float32)
        return torch.as_tensor(values, dtype=like.dtype, device=like.device)

    def take_along_last_axis(x, indices):
        return torch.gather(x, -1, torch.as_tensor(indices, device=x.device).long().unsqueeze(-1)).squeeze(-1)

    def stack_rows(rows, width):
        return torch.stack([torch.nn.functional.pad(r.float(), (0, 0, 0, width - r.shape[0])) for r in rows])

    return ArrayOps(
        name="torch",
        asarray=asarray,
        log_softmax=lambda x: torch.log_softmax(x, dim=-1),
        take_along_last_axis=take_along_last_axis,
        exp=torch.exp,
        sqrt=torch.sqrt,
        logaddexp=torch.logaddexp,
        sum=lambda x, axis=None: x.sum() if axis is None else x.sum(dim=axis),
        mean=lambda x, axis=None: x.mean() if axis is None else x.mean(dim=axis),
        clip=lambda x, low=None, high=None: torch.clamp(x, min=low, max=high),
        stop_gradient=torch.Tensor.detach,
        stack_rows=stack_rows,
        to_compact=lambda x: x.detach().to(torch.float16).clone(),
    )


@functools.cache
def _mlx_ops() -> ArrayOps:
    try:
        import mlx.core as mx
        import mlx.nn
    except (ImportError, OSError) as error:
        raise BackendError(f"MLX is not available ({error}): pip install 'somnus[mlx]'") from error

    def asarray(values, like=None):
        dtype = mx.float32 if like is None else like.dtype
        return values.astype(dtype) if isinstance(values, mx.array) else mx.array(values, dtype=dtype)

    def take_along_last_axis(x, indices):
        indices = mx.array(indices).astype(mx.int32)
        return mx.take_along_axis(x, mx.expand_dims(indices, -1), axis=-1).squeeze(-1)

    def stack_rows(rows, width):
        return mx.stack([mx.pad(r.astype(mx.float32), [(0, width - r.shape[0]), (0, 0)]) for r in rows])

    return ArrayOps(
        name="mlx",
        asarray=asarray,
        log_softmax=lambda x: mlx.nn.log_softmax(x, axis=-1),
        take_along_last_axis=take_along_last_axis,
        exp=mx.exp,
        sqrt=mx.sqrt,
        logaddexp=mx.logaddexp,
        sum=lambda x, axis=None: mx.sum(x, axis=axis),
        mean=lambda x, axis=None: mx.mean(x, axis=axis),
        clip=lambda x, low=None, high=None: mx.clip(x, low, high),
        stop_gradient=mx.stop_gradient,
        stack_rows=stack_rows,
        to_compact=lambda x: mx.stop_gradient(x).astype(mx.float16),
    )


_BUILDERS = {"TORCH_OPS": _torch_ops, "MLX_OPS": _mlx_ops}


def __getattr__(name: str) -> ArrayOps:
    """``TORCH_OPS`` and ``MLX_OPS`` as module attributes, each built (and its library imported) on first use."""
    if name in _BUILDERS:
        return _BUILDERS[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
