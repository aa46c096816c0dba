"""The one seam between snip_lens and the model library: what every backend offers.

A backend wraps one model object (a TransformerLens 4.x ``TransformerBridge`` or a TransformerLens 3.x
``HookedTransformer``) and answers everything the pipeline needs to know about it: its shape, device and
dtype, its tokenizer and BOS convention, its hook points (adding a hook returns a handle that really
removes it), forwards that stop at or start from a layer, KV-cache scoring and sampling. No other module
of snip_lens touches a library's internals (``original_model``, KV-cache plumbing, component paths).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

HookFn = Callable[[Tensor, Any], Tensor | None]


@dataclass(eq=False)
class HookHandle:
    """One hook added through a backend; ``remove()`` takes off exactly that hook (idempotent)."""

    point: Any
    """The hook point (a TransformerLens ``HookPoint``) the hook sits on."""
    lens_handle: Any
    """TransformerLens's own record of the hook (a ``LensHandle``), as listed in ``point.fwd_hooks``."""

    @property
    def active(self) -> bool:
        """True until ``remove()`` is called."""
        return self.lens_handle is not None

    def remove(self) -> None:
        """Remove the torch hook and its entry in ``point.fwd_hooks``; other hooks stay."""
        lens_handle, self.lens_handle = self.lens_handle, None
        if lens_handle is None:
            return
        lens_handle.hook.remove()
        # Identity, not ==: LensHandle is a dataclass whose == compares fields.
        self.point.fwd_hooks[:] = [h for h in self.point.fwd_hooks if h is not lens_handle]


class Backend:
    """What snip_lens needs from a model; subclasses implement it for one model class."""

    kind: str = "?"
    """Short name of the backend (``"bridge"``, ``"hooked"``)."""

    def __init__(self, model: Any):
        self.model = model

    # ---- shape, names, placement ----------------------------------------------------------------

    @property
    def cfg(self) -> Any:
        return self.model.cfg

    @property
    def n_layers(self) -> int:
        """Number of transformer blocks."""
        return int(self.cfg.n_layers)

    @property
    def d_mlp(self) -> int:
        """Neurons per MLP (the width of ``blocks.{l}.mlp.hook_post``)."""
        return int(self.cfg.d_mlp)

    @property
    def d_vocab(self) -> int:
        """Vocabulary size of the logits."""
        return int(self.cfg.d_vocab)

    @property
    def n_ctx(self) -> int:
        """Longest sequence the model takes."""
        return int(self.cfg.n_ctx)

    @property
    def model_name(self) -> str:
        """The name the model was loaded under."""
        return str(getattr(self.cfg, "model_name", None) or "unknown")

    @property
    def device(self) -> torch.device:
        """Where the input tokens go (the device of the embedding)."""
        p = next(self.model.parameters(), None)
        if p is not None:
            return p.device
        return torch.device(getattr(self.cfg, "device", None) or "cpu")

    @property
    def dtype(self) -> torch.dtype:
        """Floating-point dtype of the weights."""
        for p in self.model.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    # ---- tokenisation ---------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    def prepends_bos(self) -> bool:
        """Whether windows fed to this model should start with BOS."""
        return (bool(getattr(self.cfg, "default_prepend_bos", True))
                and getattr(self.tokenizer, "bos_token_id", None) is not None)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with no special tokens."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def to_tokens(self, texts: str | list[str]) -> Int[Tensor, "batch pos"]:
        """Tokens for a prompt or a batch of prompts, with BOS exactly when the model wants it."""
        return self.model.to_tokens(texts, prepend_bos=self.prepends_bos())

    # ---- hooks ----------------------------------------------------------------------------------

    def hook_point(self, name: str) -> Any:
        """The hook point called ``name``; raises ``KeyError`` naming it when the model has none."""
        hook_dict = self.model.hook_dict
        if name not in hook_dict:
            raise KeyError(f"model {self.model_name!r} has no hook point {name!r}")
        return hook_dict[name]

    def add_hook(self, name: str, fn: HookFn, *, permanent: bool = True) -> HookHandle:
        """Add a forward hook at ``name``; the handle's ``remove()`` removes exactly this hook.

        Permanent hooks survive TransformerLens's own ``reset_hooks()`` (``run_with_hooks``, ``hooks()``).
        TransformerLens < 4.3 returns no handle from ``HookPoint.add_hook``: the new entry of
        ``fwd_hooks`` is found by identity instead (it may be first when prepended).
        """
        point = self.hook_point(name)
        before = {id(h) for h in point.fwd_hooks}
        lens_handle = point.add_hook(fn, dir="fwd", is_permanent=permanent)
        if lens_handle is None:
            new = [h for h in point.fwd_hooks if id(h) not in before]
            if len(new) != 1:
                raise RuntimeError(f"internal: adding a hook at {name!r} added {len(new)} entries to its "
                                   "fwd_hooks, not one; this TransformerLens version is not supported")
            lens_handle = new[0]
        return HookHandle(point, lens_handle)

    @contextlib.contextmanager
    def temporary_hooks(self, fwd_hooks: list[tuple[str, HookFn]]) -> Iterator[None]:
        """The given hooks for the duration of the block, removed on exit (exceptions included)."""
        handles: list[HookHandle] = []
        try:
            for name, fn in fwd_hooks:
                handles.append(self.add_hook(name, fn, permanent=False))
            yield
        finally:
            for h in reversed(handles):
                h.remove()

    def blocks(self) -> list[Any]:
        """The transformer blocks, in order."""
        return list(self.model.blocks)

    # ---- forwards -------------------------------------------------------------------------------

    def run(self, tokens: Int[Tensor, "batch pos"]) -> None:
        """A forward whose output is not needed (hooks do the work)."""
        self.model(tokens, return_type=None)

    def logits(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos vocab"]:
        return self.model(tokens, return_type="logits")

    def residual_before(self, tokens: Int[Tensor, "batch pos"], layer: int) -> Float[Tensor, "batch pos d_model"]:
        """The residual stream entering block ``layer``."""
        return self.model(tokens, stop_at_layer=layer)

    def logits_from(self, residual: Float[Tensor, "batch pos d_model"], layer: int,
                    ) -> Float[Tensor, "batch pos vocab"]:
        """Logits of a forward that starts with ``residual`` entering block ``layer``."""
        raise NotImplementedError

    # ---- the HF model, KV caches, sampling ------------------------------------------------------

    def hf_model(self) -> Any | None:
        """The Hugging Face model underneath, when there is one (its modules are the hooked ones)."""
        return None

    def hf_state_dict(self) -> dict[str, Tensor]:
        """The state dict of ``hf_model()`` under the Hugging Face key names (no wrapper segments)."""
        hf = self.hf_model()
        if hf is None:
            raise ValueError(f"the {self.kind} backend has no Hugging Face model")
        return dict(hf.state_dict())

    def kv_prefill(self, ids: Int[Tensor, "1 pos"], n_keep: int) -> tuple[Float[Tensor, "keep vocab"], Any]:
        """Run ``ids`` (one sequence) filling a KV cache; return the last ``n_keep`` logit rows and the cache."""
        raise NotImplementedError

    def kv_extend(self, ids: Int[Tensor, "n pos"], cache: Any) -> Float[Tensor, "n pos vocab"]:
        """Logits of ``ids`` (right-padded rows) continuing the cached prefix; extends ``cache``."""
        raise NotImplementedError

    def kv_repeat(self, cache: Any, n: int) -> Any:
        """A fresh copy of a batch-1 cache repeated ``n`` times (``kv_extend`` extends caches in place)."""
        raise NotImplementedError

    def kv_context(self) -> contextlib.AbstractContextManager:
        """A context the KV-cache calls and ``generate`` must run inside (a no-op unless a shim is needed)."""
        return contextlib.nullcontext()

    def generate(self, input_ids: Int[Tensor, "batch pos"], *, temperature: float, top_k: int | None,
                 top_p: float, max_new_tokens: int, eos_token_id: int | None, pad_token_id: int | None,
                 ) -> Int[Tensor, "batch total"]:
        """Ancestral sampling with a KV cache; returns prompt + new tokens (rows that stopped are padded)."""
        raise NotImplementedError(f"the {self.kind} backend cannot generate text")
