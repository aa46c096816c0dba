"""Backend for TransformerLens 4.x ``TransformerBridge`` (a Hugging Face model with hook points).

The bridge's components wrap the HF model's own modules, so calling the HF model directly
(``original_model``) fires the bridge's hook points too: KV-cache scoring and ``generate`` use it.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .base import Backend


def _accepts(module: Any, name: str) -> bool:
    return name in inspect.signature(module.forward).parameters


def _output_cache(output: Any) -> Any:
    """The KV cache of an HF model output, whichever attribute name this transformers version uses."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def _cache_kwarg(hf_model: Any) -> str:
    """The keyword under which this HF model's forward takes a KV cache (``cache`` in newer transformers)."""
    return "cache" if _accepts(hf_model, "cache") else "past_key_values"


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


@contextlib.contextmanager
def _skip_blocks_below(blocks: list[Any], layer: int) -> Iterator[None]:
    """Make blocks ``0..layer-1`` return their input unchanged (their output is discarded anyway).

    The bridge's ``forward(residual, start_at_layer=L)`` swaps the residual in at block ``L`` but still
    executes the blocks below; this saves that time.
    """

    def passthrough(*args: Any, **kwargs: Any) -> Tensor:
        # Newer HF decoder loops (transformers >= 5) take a bare tensor back from each layer.
        return args[0] if args else kwargs["hidden_states"]

    below = blocks[:layer]
    for block in below:
        # An instance attribute shadows the class's forward for this call only. Written to __dict__
        # directly because the bridge's components redirect attribute writes to the wrapped HF module.
        block.__dict__["forward"] = passthrough
    try:
        yield
    finally:
        for block in below:
            block.__dict__.pop("forward", None)


class BridgeBackend(Backend):
    """A TransformerLens 4.x ``TransformerBridge``."""

    kind = "bridge"

    @property
    def device(self) -> torch.device:
        emb = self.hf_model().get_input_embeddings()
        if emb is not None and getattr(emb, "weight", None) is not None:
            return emb.weight.device
        return super().device

    def hf_model(self) -> Any:
        return self.model.original_model

    def hf_state_dict(self) -> dict[str, Tensor]:
        # The bridge's components wrap HF modules as `_original_component`; drop that segment (first wins
        # when a tensor is reachable under both names).
        state: dict[str, Tensor] = {}
        for key, value in self.hf_model().state_dict().items():
            state.setdefault(key.replace("._original_component", ""), value)
        return state

    def logits_from(self, residual: Float[Tensor, "batch pos d_model"], layer: int,
                    ) -> Float[Tensor, "batch pos vocab"]:
        with _skip_blocks_below(self.blocks(), layer):
            return self.model(residual, start_at_layer=layer, return_type="logits")

    def kv_context(self) -> contextlib.AbstractContextManager:
        return kv_cache_fix(self.model)

    def kv_prefill(self, ids: Int[Tensor, "1 pos"], n_keep: int) -> tuple[Float[Tensor, "keep vocab"], Any]:
        hf = self.hf_model()
        keep = {"logits_to_keep": n_keep} if _accepts(hf, "logits_to_keep") else {}
        out = hf(input_ids=ids, use_cache=True, **keep)
        cache = _output_cache(out)
        if cache is None or cache.get_seq_length() != ids.shape[1]:
            raise RuntimeError("internal: the KV cache was not filled by the prefix forward (run KV-cache calls "
                               "inside backend.kv_context())")
        return out.logits[0, -n_keep:], cache

    def kv_extend(self, ids: Int[Tensor, "n pos"], cache: Any) -> Float[Tensor, "n pos vocab"]:
        hf = self.hf_model()
        return hf(input_ids=ids, use_cache=True, **{_cache_kwarg(hf): cache}).logits

    def kv_repeat(self, cache: Any, n: int) -> Any:
        new = copy.deepcopy(cache)
        new.batch_repeat_interleave(n)
        return new

    def logits_tail(self, ids: Int[Tensor, "n pos"], n_keep: int) -> Float[Tensor, "n keep vocab"]:
        """Logits of the last ``n_keep`` positions of a full forward without a cache (may return more)."""
        hf = self.hf_model()
        keep = {"logits_to_keep": n_keep} if _accepts(hf, "logits_to_keep") else {}
        return hf(input_ids=ids, use_cache=False, **keep).logits

    def generate(self, input_ids: Int[Tensor, "batch pos"], *, temperature: float, top_k: int | None,
                 top_p: float, max_new_tokens: int, eos_token_id: int | None, pad_token_id: int | None,
                 ) -> Int[Tensor, "batch total"]:
        from transformers import GenerationConfig

        # A complete generation config, so that nothing is inherited from the model's own defaults.
        gen = GenerationConfig(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p,
                               max_new_tokens=max_new_tokens, repetition_penalty=1.0, num_beams=1,
                               pad_token_id=pad_token_id, eos_token_id=eos_token_id, use_cache=True)
        return self.hf_model().generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                        generation_config=gen)
