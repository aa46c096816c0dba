"""Small helpers shared by the evaluations: the optional mask context, hook checks and atomic JSON writes.

KV-cache use and sampling belong to the model's backend (``snip_lens.backends``): ``kv_cache_fix`` is
re-exported from there for callers that used it from here."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from .._io import atomic_write_json
from ..backends.bridge import kv_cache_fix  # noqa: F401 - re-export


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



def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON through a temporary file and ``os.replace``."""
    atomic_write_json(path, obj)
