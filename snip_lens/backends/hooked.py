"""Backend for TransformerLens 2.x/3.x ``HookedTransformer`` (TransformerLens's own implementation).

There is no Hugging Face model underneath: KV-cache scoring uses TransformerLens's own key-value cache and
sampling uses ``HookedTransformer.generate``; both run the model's hook points, so masks act on every token.
``forward(residual, start_at_layer=L)`` skips blocks below ``L`` by itself.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .base import Backend


def _kv_cache_class() -> Any:
    try:  # TransformerLens 3.x
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

        return TransformerLensKeyValueCache
    except ImportError:  # TransformerLens 2.x
        from transformer_lens.past_key_value_caching import HookedTransformerKeyValueCache

        return HookedTransformerKeyValueCache


class HookedBackend(Backend):
    """A TransformerLens ``HookedTransformer``."""

    kind = "hooked"

    @property
    def device(self) -> torch.device:
        return self.model.embed.W_E.device

    def logits_from(self, residual: Float[Tensor, "batch pos d_model"], layer: int,
                    ) -> Float[Tensor, "batch pos vocab"]:
        return self.model(residual, start_at_layer=layer, return_type="logits")

    def _forward_cached(self, ids: Tensor, cache: Any) -> Tensor:
        # An explicit all-ones mask: TransformerLens would otherwise guess padding from the pad token, which
        # is often BOS too. Right padding needs no mask under a causal model (no real token attends to it).
        return self.model(ids, return_type="logits", past_kv_cache=cache, attention_mask=torch.ones_like(ids))

    def kv_prefill(self, ids: Int[Tensor, "1 pos"], n_keep: int) -> tuple[Float[Tensor, "keep vocab"], Any]:
        cache = _kv_cache_class().init_cache(self.model.cfg, self.device, 1)
        logits = self._forward_cached(ids, cache)
        if cache.entries[0].past_keys.shape[1] != ids.shape[1]:
            raise RuntimeError("internal: the HookedTransformer KV cache was not filled by the prefix forward")
        return logits[0, -n_keep:], cache

    def kv_extend(self, ids: Int[Tensor, "n pos"], cache: Any) -> Float[Tensor, "n pos vocab"]:
        return self._forward_cached(ids, cache)

    def kv_repeat(self, cache: Any, n: int) -> Any:
        new = copy.copy(cache)
        new.entries = []
        for entry in cache.entries:
            e = copy.copy(entry)
            e.past_keys = entry.past_keys.repeat_interleave(n, dim=0)
            e.past_values = entry.past_values.repeat_interleave(n, dim=0)
            new.entries.append(e)
        new.previous_attention_mask = cache.previous_attention_mask.repeat_interleave(n, dim=0)
        return new

    def logits_tail(self, ids: Int[Tensor, "n pos"], n_keep: int) -> Float[Tensor, "n pos vocab"]:
        return self.model(ids, return_type="logits", attention_mask=torch.ones_like(ids))

    def generate(self, input_ids: Int[Tensor, "batch pos"], *, temperature: float, top_k: int | None,
                 top_p: float, max_new_tokens: int, eos_token_id: int | None, pad_token_id: int | None,
                 ) -> Int[Tensor, "batch total"]:
        out = self.model.generate(input_ids, max_new_tokens=max_new_tokens, stop_at_eos=eos_token_id is not None,
                                  eos_token_id=eos_token_id, do_sample=True, top_k=top_k,
                                  top_p=None if top_p >= 1.0 else top_p, temperature=temperature,
                                  use_past_kv_cache=True, return_type="tokens", verbose=False)
        if pad_token_id is not None and eos_token_id is not None and pad_token_id != eos_token_id:
            # HookedTransformer pads finished rows with EOS; HF pads them with the pad token.
            new = out[:, input_ids.shape[1]:]
            finished = torch.cumsum((new == eos_token_id).long(), dim=1) - (new == eos_token_id).long() > 0
            out = torch.cat([out[:, :input_ids.shape[1]], new.masked_fill(finished, pad_token_id)], dim=1)
        return out
