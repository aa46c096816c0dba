"""Export a pruned model as a standard Hugging Face model directory (weights, config and tokenizer).

SNIP prunes with reversible hooks (``snip_lens.mask``); this module bakes a ``NeuronMask`` into a copy of
the weights so that plain ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` reproduces the
masked model with no snip_lens code. The live model is never modified: tensors are cloned from its state.

How each mode becomes weights (``W_out`` is the MLP output projection, a neuron is one of its inputs):

- ``zero``: the neuron's ``W_out`` weights are set to 0, so it contributes exactly 0 (= hook_post set to 0);
- ``scale``: the neuron's ``W_out`` weights are multiplied by the factor (exact, linear);
- ``mean``: the neuron's constant contribution ``value * W_out[:, j]`` is folded into the output bias and its
  weights are zeroed. This needs an output bias: GPT-2 has one; Llama/Gemma-style MLPs do not, and export
  of a mean mask there raises (keep the mean mask as a hook instead).

``compact=True`` also removes the neurons whose output no longer depends on the input (all zero- and mean-
masked neurons, scale factors of 0) from the MLP's input and output projections. A Hugging Face config has
ONE ``intermediate_size`` (``n_inner`` for GPT-2) for every layer, so per-layer widths would not load in
plain transformers (Llama, Mistral, Qwen2, Gemma and GPT-2 build every layer's MLP from that one number,
and loading a checkpoint of other shapes fails): all layers are cut to the largest kept width and layers
that pruned more are padded with inert neurons (zero input and output weights, which contribute exactly 0).
A global top-k mask prunes layers unevenly, so compaction is limited by the layer that pruned least; a
per-layer selection (``mask_from_scores(..., select="per-layer")``, ``--select per-layer``: k/L neurons in
every layer) compacts fully. The returned ``ExportReport`` says how many masked neurons were removed, how
many could not be, and why.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._io import atomic_directory
from .mask import NeuronMask
from .models import model_name as _model_name

logger = logging.getLogger(__name__)

REPORT_FILE = "snip_export.json"
MASK_FILE = "snip_mask.safetensors"

_MLP_KEY = re.compile(
    r"^(?P<prefix>.+)\.(?P<layer>\d+)\.mlp\.(?P<proj>gate_proj|up_proj|down_proj|c_fc|c_proj)\.(?P<kind>weight|bias)$"
)


@dataclass
class ExportReport:
    """What ``export_pruned`` wrote and how much of the MLPs it could remove."""

    out_dir: str
    """The model directory written."""
    architecture: str
    """The HF model class (``config.architectures[0]``)."""
    mode: str
    """Mode of the exported mask."""
    compact: bool
    """Whether pruned neurons were removed (True) or only zeroed in the weights (False)."""
    n_masked: int
    """Neurons in the mask."""
    d_mlp_before: int
    """Neurons per MLP in the source model."""
    width: int
    """Neurons per MLP in the exported model (the config's ``intermediate_size``/``n_inner``)."""
    kept_per_layer: list[int] = field(default_factory=list)
    """Real (unpruned or still input-dependent) neurons written in each layer."""
    padded_per_layer: list[int] = field(default_factory=list)
    """Inert zero neurons added to each layer to reach the common ``width``."""
    params_before: int = 0
    """Parameters of the source model (tied weights counted once)."""
    params_after: int = 0
    """Parameters of the exported model (tied weights counted once)."""
    notes: list[str] = field(default_factory=list)
    """Why some pruned neurons could not be removed, and other caveats."""

    @property
    def removed(self) -> int:
        """Neuron slots actually removed from the MLPs (summed over layers)."""
        return (self.d_mlp_before - self.width) * len(self.kept_per_layer)

    @property
    def n_removed(self) -> int:
        """Masked neurons removed from the weights (0 without ``compact``)."""
        return self.removed

    @property
    def n_not_removed(self) -> int:
        """Masked neurons still in the weights (zeroed, padded to the common width, or input-dependent)."""
        return self.n_masked - self.n_removed

    def to_json(self) -> dict:
        return {**asdict(self), "n_removed": self.n_removed, "n_not_removed": self.n_not_removed}


@dataclass
class _LayerMLP:
    """HF state-dict keys of one layer's MLP, and which tensor axis indexes neurons for each."""

    in_weights: list[tuple[str, int]]
    """(key, neuron axis) of the input projections (gate/up, or c_fc)."""
    in_biases: list[str]
    """Keys of input-projection biases (indexed by neuron), when they exist."""
    out_weight: tuple[str, int]
    """(key, neuron axis) of the output projection (down_proj, or c_proj)."""
    out_bias: str | None
    """Key of the output projection's bias (d_model), or None when it has none."""


def _hf_state(model: Any) -> tuple[Any, dict[str, Tensor]]:
    """The HF model under the bridge and its state with bridge wrapper segments removed from the keys."""
    hf = getattr(model, "original_model", None)
    if hf is None or not hasattr(hf, "config"):
        raise ValueError(
            f"cannot export {_model_name(model)!r}: it is not a TransformerBridge over a Hugging Face model "
            "(no original_model with a config); load it with snip_lens.load_model"
        )
    state: dict[str, Tensor] = {}
    for key, value in hf.state_dict().items():
        clean = key.replace("._original_component", "")
        state.setdefault(clean, value)
    return hf, state


def _layer_mlps(keys: list[str], n_layers: int, arch: str) -> tuple[list[_LayerMLP], str]:
    found: dict[int, dict[str, str]] = {}
    for key in keys:
        m = _MLP_KEY.match(key)
        if m:
            found.setdefault(int(m["layer"]), {})[f"{m['proj']}.{m['kind']}"] = key
    if sorted(found) != list(range(n_layers)):
        raise ValueError(
            f"cannot export {arch}: its MLP weights were not recognised (expected gate_proj/up_proj/down_proj "
            "as in Llama, Mistral, Qwen2, Gemma, or c_fc/c_proj as in GPT-2, in every layer). Export of this "
            "architecture is not supported; keep the mask as a hook (NeuronMask.attach)"
        )
    layers = []
    for layer in range(n_layers):
        f = found[layer]
        if "down_proj.weight" in f and "up_proj.weight" in f:
            ins = [(f[k], 0) for k in ("gate_proj.weight", "up_proj.weight") if k in f]  # nn.Linear [d_mlp, d_model]
            layers.append(_LayerMLP(ins, [f[k] for k in ("gate_proj.bias", "up_proj.bias") if k in f],
                                    (f["down_proj.weight"], 1), f.get("down_proj.bias")))  # [d_model, d_mlp]
            width_attr = "intermediate_size"
        elif "c_fc.weight" in f and "c_proj.weight" in f:
            # GPT-2 Conv1D stores weights transposed: c_fc [d_model, d_mlp], c_proj [d_mlp, d_model].
            layers.append(_LayerMLP([(f["c_fc.weight"], 1)], [f[k] for k in ("c_fc.bias",) if k in f],
                                    (f["c_proj.weight"], 0), f.get("c_proj.bias")))
            width_attr = "n_inner"
        else:
            raise ValueError(f"cannot export {arch}: layer {layer} has MLP weights {sorted(f)}, not a known layout")
    return layers, width_attr


def _select(t: Tensor, axis: int, idx: Tensor, width: int) -> Tensor:
    """Keep ``idx`` along ``axis`` and pad with zeros up to ``width``."""
    kept = t.index_select(axis, idx)
    pad = width - idx.numel()
    if pad <= 0:
        return kept.contiguous()
    shape = list(t.shape)
    shape[axis] = pad
    return torch.cat([kept, t.new_zeros(shape)], dim=axis).contiguous()


def _count(state: dict[str, Tensor], skip: set[str]) -> int:
    return sum(t.numel() for k, t in state.items() if k not in skip)


def export_pruned(model: Any, mask: NeuronMask, out_dir: str | os.PathLike, *, compact: bool = False,
                  overwrite: bool = False) -> ExportReport:
    """Write ``model`` with ``mask`` baked into its weights as a Hugging Face model directory.

    ``compact=False``: same shapes, masked neurons' output weights zeroed (scaled for ``scale``; folded into
    the output bias for ``mean``). ``compact=True``: additionally remove the neurons that became constant,
    down to the largest per-layer kept width (see the module docstring). The tokenizer, the mask
    (``snip_mask.safetensors``) and the report (``snip_export.json``) are written alongside. Refuses to
    replace an existing non-empty ``out_dir`` unless ``overwrite=True``.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    if not isinstance(mask, NeuronMask):
        raise TypeError(f"export_pruned takes a NeuronMask, got {type(mask).__name__}")
    mask.check_model(model)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{str(out)!r} already exists and is not empty; choose a new directory or pass "
                              "overwrite=True")

    hf, live = _hf_state(model)
    arch = type(hf).__name__
    config = copy.deepcopy(hf.config)
    config.architectures = [arch]
    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(config)
    expected = reference.state_dict()
    tied = reference._tied_weights_keys or {}
    tied_keys = set(tied) if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in expected if k not in live and k not in tied_keys]
    if missing:
        raise ValueError(f"cannot export {arch}: the bridged model lacks weights {missing[:5]}; it does not "
                         "look like a plain Hugging Face model")
    # Only the MLP tensors we edit are cloned; the rest are written from the live tensors (read-only).
    state: dict[str, Tensor] = {k: live[k].detach() for k in expected if k not in tied_keys}
    params_before = _count(state, set())

    layers, width_attr = _layer_mlps(list(state), mask.n_layers, arch)
    d = mask.d_mlp
    for spec in layers:
        key, axis = spec.out_weight
        if state[key].shape[axis] != d:
            raise ValueError(f"cannot export: {key} has {state[key].shape[axis]} neurons but the mask expects {d}")

    indices, values = mask.per_layer(), mask.per_layer_values()
    removable: dict[int, Tensor] = {}
    for layer, spec in enumerate(layers):
        if layer not in indices:
            continue
        idx, vals = indices[layer], values[layer]
        okey, oaxis = spec.out_weight
        w_out = state[okey].clone()
        state[okey] = w_out
        cols = w_out.index_select(oaxis, idx)  # the masked neurons' output weights
        if mask.mode == "zero":
            factor = torch.zeros(idx.numel(), dtype=w_out.dtype)
            removable[layer] = idx
        elif mask.mode == "scale":
            assert vals is not None
            factor = vals.to(w_out.dtype)
            removable[layer] = idx[vals == 0]
        else:  # mean: constant contribution goes to the output bias
            assert vals is not None
            if spec.out_bias is None:
                raise ValueError(
                    f"cannot export a 'mean' mask for {arch}: its MLP output projection ({okey}) has no bias to "
                    "absorb the constant value x weight of each replaced neuron. Export a 'zero' or 'scale' "
                    "mask, or keep the mean mask as a hook (NeuronMask.attach)"
                )
            # (d_model,) = sum_j value_j * W_out[:, j], in float64 for accuracy
            w = cols.double() if oaxis == 0 else cols.double().T  # (k, d_model)
            const = (vals.double()[:, None] * w).sum(0)
            state[spec.out_bias] = (state[spec.out_bias].double() + const).to(state[spec.out_bias].dtype)
            factor = torch.zeros(idx.numel(), dtype=w_out.dtype)
            removable[layer] = idx
        shape = [1, 1]
        shape[oaxis] = idx.numel()
        w_out.index_copy_(oaxis, idx, cols * factor.view(shape))

    notes: list[str] = []
    kept_counts = [d - (removable[l].numel() if l in removable else 0) for l in range(mask.n_layers)]
    width = d
    padded = [0] * mask.n_layers
    if compact:
        width = max(1, max(kept_counts))
        padded = [width - k for k in kept_counts]
        for layer, spec in enumerate(layers):
            keep_mask = torch.ones(d, dtype=torch.bool)
            if layer in removable:
                keep_mask[removable[layer]] = False
            keep = keep_mask.nonzero().flatten()
            for key, axis in [*spec.in_weights, *[(b, 0) for b in spec.in_biases], spec.out_weight]:
                state[key] = _select(state[key], axis, keep, width)
        setattr(config, width_attr, width)
        removable_total = sum(d - k for k in kept_counts)
        actually = (d - width) * mask.n_layers
        if actually < removable_total:
            worst = kept_counts.index(width)
            n_layers_ = mask.n_layers
            if max(kept_counts) - min(kept_counts) <= 1:  # already per-layer: k is not a multiple of the layers
                fix = (f"k={removable_total} is not a multiple of the {n_layers_} layers; a per-layer k of "
                       f"{removable_total - removable_total % n_layers_} or "
                       f"{removable_total - removable_total % n_layers_ + n_layers_} compacts fully")
            else:
                fix = "a per-layer selection (k/L neurons in every layer: --select per-layer) compacts fully"
            notes.append(
                f"{removable_total - actually} of the {removable_total} removable masked neurons could not be removed: "
                f"a Hugging Face config has one {width_attr} for all layers, so every layer keeps {width} neurons "
                f"(layer {worst} prunes only {d - width} of {d}); they remain as inert zero neurons; {fix}"
            )
        if mask.mode == "scale" and len(mask) > removable_total:
            notes.append(f"{len(mask) - removable_total} scaled neurons with a non-zero factor still depend on the "
                         "input and were kept")
    else:
        notes.append(f"none of the {len(mask)} masked neurons was removed: without compact they are zeroed in the "
                     "weights (same shapes); pass compact=True (--compact) to remove them")
    for note in notes:
        logger.warning("export: %s", note)

    params_after = _count(state, set())
    report = ExportReport(str(out), arch, mask.mode, compact, len(mask), d, width, kept_counts, padded,
                          params_before, params_after, notes)
    logger.info("export: %s %s-mask of %d neurons, MLP width %d -> %d, parameters %d -> %d",
                arch, mask.mode, len(mask), d, width, params_before, params_after)

    # Check the tensors match the (possibly narrowed) architecture before writing anything.
    with torch.device("meta"):
        check = AutoModelForCausalLM.from_config(config).state_dict()
    for k, t in state.items():
        if k not in check or tuple(check[k].shape) != tuple(t.shape):
            raise AssertionError(f"internal: exported tensor {k} {tuple(t.shape)} does not fit the config")

    with atomic_directory(out) as tmp:
        save_file({k: t.contiguous() for k, t in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        config.dtype = next(iter(state.values())).dtype
        config.save_pretrained(tmp)
        if getattr(hf, "generation_config", None) is not None:
            hf.generation_config.save_pretrained(tmp)
        model.tokenizer.save_pretrained(tmp)
        mask.save(tmp / MASK_FILE)
        (tmp / REPORT_FILE).write_text(json.dumps(report.to_json(), indent=2))
    return report
