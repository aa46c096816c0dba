"""The one seam to the model library: ``backend(model)`` wraps a model in the adapter for its class.

Supported: TransformerLens 4.x ``TransformerBridge`` (``BridgeBackend``; also the bridge of 3.x) and
TransformerLens 2.x/3.x ``HookedTransformer`` (``HookedBackend``). A second library is one new class here.
"""

from __future__ import annotations

from typing import Any

from .base import Backend, HookHandle
from .bridge import BridgeBackend
from .hooked import HookedBackend

__all__ = ["Backend", "BridgeBackend", "HookHandle", "HookedBackend", "backend"]


def _is_hooked_transformer(model: Any) -> bool:
    try:
        from transformer_lens import HookedTransformer  # absent from TransformerLens 4.x
    except ImportError:
        return False
    return isinstance(model, HookedTransformer)


def backend(model: Any) -> Backend:
    """The backend of ``model``; raises ``TypeError`` naming the class when no backend fits."""
    if isinstance(model, Backend):
        return model
    cached = getattr(model, "__dict__", {}).get("_snip_lens_backend")
    if cached is not None:
        return cached
    if _is_hooked_transformer(model):
        b: Backend = HookedBackend(model)
    elif getattr(model, "original_model", None) is not None and hasattr(model, "hook_dict"):
        b = BridgeBackend(model)
    else:
        raise TypeError(
            f"snip_lens works on a TransformerLens TransformerBridge (4.x, e.g. from snip_lens.load_model) or "
            f"HookedTransformer (2.x/3.x); got a {type(model).__module__}.{type(model).__name__}"
        )
    try:
        # Cached on the instance (plain __dict__ write: the bridge redirects attribute writes to the HF model).
        model.__dict__["_snip_lens_backend"] = b
    except (AttributeError, TypeError):
        pass
    return b
