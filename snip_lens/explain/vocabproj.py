"""Output-centric evidence from weights alone: VocabProj (Gur-Arieh et al., ACL 2025, "Enhancing Automated
Interpretability with Output-Centric Feature Descriptions").

A neuron adds ``a * W_out[n]`` to the residual stream (``a`` its activation at ``mlp.hook_post``, for plain
and gated MLPs alike). Its direct effect on the next-token logits goes through the final norm and the
unembedding. VocabProj reads that effect from the weights:

    direction_n = s_n * (norm(W_out[n] / s_n) - norm(0)),   effect_n = direction_n @ W_U

with ``s_n`` the scale the norm divides by (RMS of ``W_out[n]`` for RMSNorm, its standard deviation for
LayerNorm). Running the model's own final-norm module on the rescaled rows applies whatever it does (its
gain, Gemma's ``1 + weight``, LayerNorm's centring) without a rule per norm type; subtracting ``norm(0)``
removes LayerNorm's bias, which does not depend on the neuron. This is exactly the limit of stimulating the
neuron so strongly that its write dominates the residual stream, scaled back to one unit of activation.
Tied and untied unembeddings are the same ``W_U`` here.

Gated MLPs (``act(gate) * up``) activate with either sign. A neuron whose typical strong activation is
negative raises the logits that ``effect_n`` lowers, so its promoted and suppressed lists swap
(:func:`activation_signs` reads the sign from collected statistics). Whole layers are projected at once, in
chunks of neurons, with ``topk`` on each chunk's ``[chunk, vocab]`` logit block.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..types import NeuronId, OutputEvidence, TokenWeight

logger = logging.getLogger(__name__)


@dataclass
class VocabProjection:
    """Top promoted and suppressed tokens of every neuron of some layers (VocabProj)."""

    layers: list[int]
    """Projected layers; row ``i`` of each tensor is layer ``layers[i]``."""
    promoted_ids: Int[Tensor, "layer neuron k"]
    """Token ids whose logits the neuron's typical activation raises most, strongest first."""
    promoted_weights: Float[Tensor, "layer neuron k"]
    """Logit change per unit of typical activation for ``promoted_ids`` (positive)."""
    suppressed_ids: Int[Tensor, "layer neuron k"]
    """Token ids it lowers most, strongest first."""
    suppressed_weights: Float[Tensor, "layer neuron k"]
    """Logit change for ``suppressed_ids`` (negative)."""
    signs: Int[Tensor, "layer neuron"]
    """+1, or -1 where the typical strong activation is negative (lists already swapped)."""
    vocab: dict[int, str]
    """Decoded string of every token id that appears in the lists."""

    def evidence(self, neuron: NeuronId) -> OutputEvidence:
        """The typed evidence of one neuron."""
        if neuron.layer not in self.layers:
            raise ValueError(f"layer {neuron.layer} was not projected (layers {self.layers}); project it first")
        i = self.layers.index(neuron.layer)
        if not 0 <= neuron.index < self.promoted_ids.shape[1]:
            raise ValueError(f"neuron index {neuron.index} is outside 0..{self.promoted_ids.shape[1] - 1}")
        n = neuron.index
        pro = [TokenWeight(self.vocab[int(t)], float(w)) for t, w in
               zip(self.promoted_ids[i, n], self.promoted_weights[i, n])]
        sup = [TokenWeight(self.vocab[int(t)], float(w)) for t, w in
               zip(self.suppressed_ids[i, n], self.suppressed_weights[i, n])]
        return OutputEvidence(promoted=pro, suppressed=sup, sign=int(self.signs[i, n]), method="vocabproj")


def _final_norm(model: Any) -> Any:
    ln = getattr(model, "ln_final", None)
    if ln is None:
        return None
    return getattr(ln, "original_component", ln)


def _norm_scale_kind(norm: Any) -> str:
    """"std" when the norm centres its input (LayerNorm), "rms" otherwise (RMSNorm and relatives)."""
    try:
        # A centring norm maps a constant vector to its bias; an RMS norm keeps it constant and non-zero.
        with torch.no_grad():
            const = norm(torch.ones(1, _width(norm)))
            zero = norm(torch.zeros(1, _width(norm)))
        return "std" if torch.allclose(const, zero, atol=1e-4) else "rms"
    except Exception:  # noqa: BLE001 - an unusual norm: assume RMS-type scaling
        return "rms"


def _width(norm: Any) -> int:
    w = getattr(norm, "weight", None)
    if w is None:
        raise ValueError(f"final norm {type(norm).__name__} has no weight to tell its width")
    return int(w.shape[-1])


def direction_through_norm(model: Any, w_out: Float[Tensor, "n d_model"]) -> Float[Tensor, "n d_model"]:
    """Each row's write to the residual stream as the final norm passes it on (see the module doc)."""
    norm = _final_norm(model)
    w = w_out.detach().float()
    if norm is None:  # no final norm: the write goes straight to the unembedding
        return w
    kind = _norm_scale_kind(norm)
    scale = (w.std(dim=-1, unbiased=False) if kind == "std" else w.pow(2).mean(dim=-1).sqrt()).clamp_min(1e-12)
    with torch.no_grad():
        dtype = next(norm.parameters()).dtype
        normed = norm((w / scale[:, None]).to(dtype)).float()
        zero = norm(torch.zeros(1, w.shape[1], dtype=dtype)).float()
    return (normed - zero) * scale[:, None]


def activation_signs(records: Any, *, corpus: str | None = None) -> Int[Tensor, "layer neuron"]:
    """+1 / -1 per neuron: the sign of its typical strong activation, from collected statistics.

    Positive and negative activation mass are ``(mean_abs ± mean) / 2``; the larger one wins (ties +1).
    ``corpus`` names the statistics (default: the records corpus).
    """
    name = corpus or records.records_corpus
    if name not in records.stats:
        raise ValueError(f"no statistics for corpus {name!r} in the records (have {sorted(records.stats)})")
    st = records.stats[name]
    return torch.where(st.mean >= 0, 1, -1).to(torch.int64)


def vocab_projection(model: Any, *, layers: list[int] | None = None, k: int = 12,
                     signs: Int[Tensor, "layer neuron"] | None = None, chunk: int = 512,
                     progress: bool = False) -> VocabProjection:
    """VocabProj of every neuron of ``layers`` (default all): top ``k`` promoted and suppressed tokens.

    ``signs`` (one row per projected layer, +1/-1) flips neurons whose typical strong activation is
    negative; None takes +1 for every neuron. Weights only: no forward pass.
    """
    from tqdm.auto import tqdm

    from .. import models as M

    n_layers = M.n_layers(model)
    layers = list(range(n_layers)) if layers is None else list(layers)
    bad = [lay for lay in layers if not 0 <= lay < n_layers]
    if bad:
        raise ValueError(f"layers {bad} are outside the model's 0..{n_layers - 1}")
    if k < 1:
        raise ValueError(f"k (tokens per list) must be >= 1, got {k}")
    W_U = model.W_U.detach().float()  # (d_model, vocab): tied or untied alike
    d_mlp = M.d_mlp(model)
    if signs is not None:
        signs = torch.as_tensor(signs, dtype=torch.int64)
        if tuple(signs.shape) != (len(layers), d_mlp):
            raise ValueError(f"signs must have shape ({len(layers)}, {d_mlp}) (one row per projected layer), "
                             f"got {tuple(signs.shape)}")
        if not bool(((signs == 1) | (signs == -1)).all()):
            raise ValueError("signs must hold only +1 and -1")
    else:
        signs = torch.ones(len(layers), d_mlp, dtype=torch.int64)
    k = min(k, W_U.shape[1])
    shape = (len(layers), d_mlp, k)
    p_ids = torch.empty(shape, dtype=torch.int64)
    p_w = torch.empty(shape)
    s_ids = torch.empty(shape, dtype=torch.int64)
    s_w = torch.empty(shape)
    for li, layer in enumerate(tqdm(layers, desc="vocabproj", disable=not progress)):
        w_out = model.blocks[layer].mlp.W_out.detach()  # (d_mlp, d_model)
        for s in range(0, d_mlp, chunk):
            e = slice(s, s + chunk)
            eff = direction_through_norm(model, w_out[e]) @ W_U  # (chunk, vocab)
            eff = eff * signs[li, e, None].float()
            top = eff.topk(k, dim=1)
            bot = eff.topk(k, dim=1, largest=False)
            p_ids[li, e], p_w[li, e] = top.indices, top.values
            s_ids[li, e], s_w[li, e] = bot.indices, bot.values
    ids = torch.unique(torch.cat([p_ids.flatten(), s_ids.flatten()])).tolist()
    tok = model.tokenizer
    vocab = {int(i): tok.decode([int(i)]) for i in ids}
    return VocabProjection(layers=layers, promoted_ids=p_ids, promoted_weights=p_w, suppressed_ids=s_ids,
                           suppressed_weights=s_w, signs=signs, vocab=vocab)
