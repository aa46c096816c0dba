"""Forget / retain language-model metrics (SNIP evaluation): next-token loss, top-1 and top-10 accuracy.

The sweep evaluates many masks on the same held-out windows. Every mask in a sweep leaves the blocks
below its lowest pruned layer untouched, so the residual stream entering that layer is the same for every
mask: ``prefix_cache`` computes it once and ``lm_metrics(..., start_cache=cache)`` runs only the blocks
from that layer on.

The model's backend (``snip_lens.backends``) runs the forward from block ``L`` without executing the
blocks below (the bridge needs a pass-through for them; ``HookedTransformer`` skips them itself). A hook
attached to a skipped block would silently not fire, so that is refused with an error.

Everything runs on the model's device and dtype: the residual cache stays there, the loss is
``cross_entropy`` over float32 chunks of the logits (bf16/fp16 logits are upcast a chunk at a time), and
only the three running sums come back to the host, once, at the end.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from ..backends import backend
from ..models import model_name
from ._common import hooked_names, masked

logger = logging.getLogger(__name__)

TOPK = 10
"""The k of the top-k next-token accuracy reported next to top-1."""


@dataclass
class ResidualCache:
    """The residual stream entering block ``layer`` for a fixed set of evaluation windows."""

    layer: int
    """Index of the first block that ``lm_metrics(..., start_cache=...)`` runs; blocks below are skipped."""
    tokens: Int[Tensor, "window pos"]
    """The evaluation windows this residual was computed from (the targets of the metrics)."""
    residual: Float[Tensor, "window pos d_model"]
    """Residual stream entering block ``layer`` (``blocks.{layer}.hook_in``), in the model's dtype and on its
    device (a prefix computed on the GPU is reused there, never copied through the host)."""
    model: str = ""
    """Name of the model it was computed with (checked when the cache is used)."""

    def __post_init__(self) -> None:
        if self.residual.shape[:2] != self.tokens.shape:
            raise ValueError(
                f"ResidualCache residual has shape {tuple(self.residual.shape)} but tokens have shape "
                f"{tuple(self.tokens.shape)}; the first two dimensions must match"
            )


def _check_tokens(model: Any, tokens: Any) -> Tensor:
    if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.is_floating_point():
        raise ValueError(
            "tokens must be an integer tensor of shape [window, pos] (e.g. from snip_lens.to_tokens or a "
            f"windowing step), got {type(tokens).__name__} with shape {tuple(getattr(tokens, 'shape', ()))}"
        )
    if tokens.shape[0] == 0 or tokens.shape[1] < 2:
        raise ValueError(
            f"tokens of shape {tuple(tokens.shape)} hold no next-token prediction; give at least one window "
            "of at least 2 tokens"
        )
    vocab = backend(model).d_vocab
    if int(tokens.min()) < 0 or int(tokens.max()) >= vocab:
        raise ValueError(
            f"token ids must lie in [0, {vocab}) for model {model_name(model)!r}; got ids from "
            f"{int(tokens.min())} to {int(tokens.max())}. Tokenise with this model's tokenizer"
        )
    return tokens


def _check_layer(model: Any, layer: int) -> int:
    n = backend(model).n_layers
    if not isinstance(layer, int) or not 0 <= layer < n:
        raise ValueError(f"layer {layer!r} is out of range for a model with {n} blocks; use 0..{n - 1}")
    return layer


def _refuse_hooks_below(model: Any, layer: int) -> None:
    """Refuse when a hook is attached anywhere in a block below ``layer``: it would not fire, and a mask
    there would silently have no effect."""
    blocks = backend(model).blocks()[:layer]
    hooked = [n for i, b in enumerate(blocks) for n in hooked_names(b, f"blocks.{i}")]
    if hooked:
        raise ValueError(
            f"hooks are attached below layer {layer} ({', '.join(hooked[:4])}"
            f"{', ...' if len(hooked) > 4 else ''}), where the residual cache skips computation; build the "
            f"cache at a layer no higher than the lowest hooked/pruned layer, or evaluate without start_cache"
        )


def prefix_cache(model: Any, tokens: Int[Tensor, "window pos"], layer: int, *, batch_size: int = 8,
                 progress: bool = False) -> ResidualCache:
    """Run blocks ``0..layer-1`` once on ``tokens`` and keep the residual stream entering block ``layer``.

    Compute it with no mask attached: it stands for the unpruned lower layers of every mask whose lowest
    pruned layer is ``>= layer``.
    """
    tokens = _check_tokens(model, tokens)
    layer = _check_layer(model, layer)
    _check_batch_size(batch_size)
    be = backend(model)
    device = be.device
    parts = []
    with torch.no_grad():
        for start in tqdm(range(0, tokens.shape[0], batch_size), desc=f"prefix to layer {layer}",
                          disable=not progress):
            batch = tokens[start:start + batch_size].to(device)
            parts.append(be.residual_before(batch, layer).detach())  # (B, pos, d_model), on the device
    return ResidualCache(layer=layer, tokens=tokens.cpu(), residual=torch.cat(parts), model=model_name(model))


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def _logits(model: Any, batch: Tensor, resid: Tensor | None, layer: int | None) -> Tensor:
    be = backend(model)
    if resid is None:
        return be.logits(batch)
    _refuse_hooks_below(model, layer)
    return be.logits_from(resid, layer)


LOSS_CHUNK_ELEMENTS = 1 << 24
"""Logit elements upcast to float32 at a time for the loss (64 MB), whatever the vocabulary."""


def _batch_sums(logits: Float[Tensor, "n vocab"], target: Int[Tensor, " n"]) -> tuple[Tensor, Tensor, Tensor]:
    """Summed loss (float64), top-1 hits and top-10 hits of one batch, as device tensors (no host sync)."""
    n, vocab = logits.shape
    rows = max(1, LOSS_CHUNK_ELEMENTS // vocab)
    loss = torch.zeros((), dtype=torch.float64, device=logits.device)
    for r in range(0, n, rows):
        loss += F.cross_entropy(logits[r:r + rows].float(), target[r:r + rows], reduction="sum").double()
    top = logits.topk(min(TOPK, vocab), dim=-1).indices  # (n, 10)
    hit = top == target[:, None]
    return loss, hit[:, 0].sum(), hit.any(-1).sum()


def lm_metrics(model: Any, tokens: Int[Tensor, "window pos"], *, batch_size: int = 8, mask: Any | None = None,
               progress: bool = False, start_cache: ResidualCache | None = None) -> dict[str, float]:
    """Next-token metrics of ``model`` on ``tokens``, optionally with ``mask`` applied.

    Every position but the last of each window predicts the next token; all of them count equally.

    Returns ``loss`` (mean cross-entropy, nats), ``top1`` and ``top10`` (fraction of positions whose
    target is the argmax / among the 10 highest logits; ties broken by ``torch.topk``) and ``n_tokens``
    (number of predicted positions). With ``start_cache`` (from ``prefix_cache`` on the same tokens),
    only blocks ``start_cache.layer`` and above run.
    """
    tokens = _check_tokens(model, tokens)
    _check_batch_size(batch_size)
    layer = None
    if start_cache is not None:
        if start_cache.tokens.shape != tokens.shape or not torch.equal(start_cache.tokens, tokens.cpu()):
            raise ValueError(
                "start_cache was computed on different tokens than the ones given; build it with "
                "prefix_cache(model, tokens, layer) on these tokens"
            )
        if start_cache.model and start_cache.model != model_name(model):
            raise ValueError(
                f"start_cache was computed with model {start_cache.model!r}, not {model_name(model)!r}; "
                "rebuild it with prefix_cache on this model"
            )
        layer = _check_layer(model, start_cache.layer)
    device = backend(model).device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    top1 = torch.zeros((), dtype=torch.long, device=device)
    top10 = torch.zeros((), dtype=torch.long, device=device)
    n = 0
    with masked(model, mask), torch.no_grad():
        for start in tqdm(range(0, tokens.shape[0], batch_size), desc="lm metrics", disable=not progress):
            batch = tokens[start:start + batch_size].to(device)
            resid = None if start_cache is None else start_cache.residual[start:start + batch_size].to(device)
            logits = _logits(model, batch, resid, layer)[:, :-1]  # (B, pos-1, vocab), the model's dtype
            target = batch[:, 1:]  # (B, pos-1)
            loss, hit1, hit10 = _batch_sums(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
            loss_sum += loss
            top1 += hit1
            top10 += hit10
            n += target.numel()
    # The only host transfer: three scalars.
    return {"loss": float(loss_sum) / n, "top1": int(top1) / n, "top10": int(top10) / n, "n_tokens": n}
