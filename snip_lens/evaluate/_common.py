"""Small helpers shared by the evaluations: the optional mask context, hook checks, the KV-cache shim and
atomic JSON writes."""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path
from typing import Any, Iterator

from .._io import atomic_write_json


def masked(model: Any, mask: Any | None) -> contextlib.AbstractContextManager:
    """``mask.applied(model)`` when a mask is given, else a no-op context.

    The mask type lives in ``snip_lens.mask``; evaluations only need its ``applied`` context manager, so
    nothing is imported here and any object with that method (e.g. a test double) works.
    """
    if mask is None:
        return contextlib.nullcontext()
    applied = getattr(mask, "applied", None)
    if applied is None:
        raise TypeError(
            f"mask must be a NeuronMask (an object with an .applied(model) context manager), got "
            f"{type(mask).__name__}; pass mask=None to evaluate the unpruned model"
        )
    return applied(model)


def hooked_names(module: Any, prefix: str) -> list[str]:
    """Names of the hook points under ``module`` that currently have forward hooks attached."""
    found: list[str] = []
    for path, sub in module.named_modules():
        if getattr(sub, "fwd_hooks", None):
            # A hook point is reachable under several paths (aliases); report its own name once.
            name = getattr(sub, "name", None) or (f"{prefix}.{path}" if path else prefix)
            if name not in found:
                found.append(name)
    return found



@contextlib.contextmanager
def kv_cache_fix(model: Any) -> Iterator[None]:
    """Make the bridge's attention components fill Hugging Face KV caches, for the duration.

    transformers 5.x passes the cache to each attention layer as ``cache=``, while TransformerLens 4.3's
    attention bridges read ``past_key_values=`` (or ``layer_past=``). Without this the cache stays empty:
    cached scoring ignores the prefix and ``generate(use_cache=True)`` attends to the last token only. The
    pre-hooks copy ``cache`` to ``past_key_values``; they are plain torch hooks (not TransformerLens hook
    points) and are removed on exit, exceptions included.
    """

    def pre_hook(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
            return args, {**kwargs, "past_key_values": kwargs["cache"]}
        return None

    handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True)
               for m in model.modules() if hasattr(type(m), "_update_kv_cache")]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def cache_kwarg(hf_model: Any) -> str:
    """The keyword under which this HF model's forward takes a KV cache (``cache`` in newer transformers)."""
    params = inspect.signature(hf_model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(output: Any) -> Any:
    """The KV cache of an HF model output, whichever attribute name this transformers version uses."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON through a temporary file and ``os.replace``."""
    atomic_write_json(path, obj)
