"""Reversible neuron masks: SNIP's pruning step, done with forward hooks instead of weight edits.

A ``NeuronMask`` is a set of MLP neurons ``(layer, index)`` and what to do with their activation at
``blocks.{layer}.mlp.hook_post`` (the input of the MLP's output projection):

- ``"zero"``: set it to 0 (pruning, as in the paper's main experiments);
- ``"mean"``: replace it by a given per-neuron value (e.g. its mean activation on a retain set);
- ``"scale"``: multiply it by a factor (the paper's "adjust rather than prune" variant).

The mask is applied as ONE forward hook per touched layer, on that layer's ``HookPoint``. The hooks are
registered as permanent so that TransformerLens's own ``reset_hooks()`` (called by ``run_with_hooks`` and
the ``hooks()`` context) does not strip a mask the user attached; they are removed only by us, one exact
handle at a time, which restores exactly the hook state found (a user's own hooks stay)::

    with mask.applied(model):        # temporary; removed on exit, also when the body raises
        logits = model(tokens)
    handle = mask.attach(model)      # persistent until handle.remove()

Masks are saved as safetensors (indices and values as tensors, the model's name and shape and the mode in
the file's metadata); never pickle.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .backends import HookHandle, backend
from .models import d_mlp as _d_mlp
from .models import hook_name
from .models import model_name as _model_name
from .models import n_layers as _n_layers
from .types import NeuronId

logger = logging.getLogger(__name__)

MaskMode = Literal["zero", "mean", "scale"]
MODES: tuple[str, ...] = ("zero", "mean", "scale")
FILE_FORMAT = "snip_lens.neuron_mask"
FILE_VERSION = "1"


def _as_neuron(item: Any) -> NeuronId:
    if isinstance(item, NeuronId):
        return item
    if isinstance(item, str):
        return NeuronId.parse(item)
    try:
        layer, index = item
    except (TypeError, ValueError):
        raise ValueError(
            f"cannot read neuron {item!r}: give a NeuronId, a (layer, index) pair or a string like 'L3/N17'"
        ) from None
    out = []
    for what, v in (("layer", layer), ("index", index)):
        try:
            if isinstance(v, bool) or isinstance(v, float):
                raise TypeError
            out.append(operator.index(v))
        except TypeError:
            raise ValueError(
                f"neuron {item!r} has a non-integer {what} {v!r}; layers and indices are integers"
            ) from None
    return NeuronId(out[0], out[1])


@dataclass(eq=False)
class NeuronMask:
    """A set of MLP neurons and how to override their activation; apply it with ``applied``/``attach``."""

    neurons: tuple[NeuronId, ...]
    """The masked neurons, sorted by (layer, index), without duplicates."""
    mode: MaskMode = "zero"
    """``"zero"``: activation set to 0; ``"mean"``: replaced by ``values``; ``"scale"``: multiplied by ``values``."""
    values: Float[Tensor, " n"] | None = None
    """Per-neuron replacement values (mean) or factors (scale), aligned with ``neurons``; None for zero."""
    model_name: str = "unknown"
    """Name of the model the mask was made for (recorded in saved files)."""
    n_layers: int = 0
    """Number of layers of that model; every neuron's layer is below it."""
    d_mlp: int = 0
    """Neurons per MLP of that model; every neuron's index is below it."""
    _per_layer: dict[int, tuple[Tensor, Tensor | None]] | None = field(default=None, init=False, repr=False,
                                                                    compare=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mask mode {self.mode!r}; choose one of {', '.join(map(repr, MODES))}")
        if isinstance(self.n_layers, bool) or not isinstance(self.n_layers, int) or self.n_layers <= 0:
            raise ValueError(f"n_layers must be a positive int, got {self.n_layers!r}")
        if isinstance(self.d_mlp, bool) or not isinstance(self.d_mlp, int) or self.d_mlp <= 0:
            raise ValueError(f"d_mlp must be a positive int, got {self.d_mlp!r}")
        neurons = tuple(_as_neuron(n) for n in self.neurons)
        for n in neurons:
            if not 0 <= n.layer < self.n_layers:
                raise ValueError(
                    f"neuron {n} has layer {n.layer}, out of range for {self.model_name!r} which has "
                    f"{self.n_layers} layers (valid: 0..{self.n_layers - 1})"
                )
            if not 0 <= n.index < self.d_mlp:
                raise ValueError(
                    f"neuron {n} has index {n.index}, out of range for {self.model_name!r} whose MLPs have "
                    f"{self.d_mlp} neurons (valid: 0..{self.d_mlp - 1})"
                )
        if list(neurons) != sorted(neurons):
            raise ValueError("NeuronMask.neurons must be sorted; build masks with NeuronMask.from_neurons")
        dups = sorted({a for a, b in zip(neurons, neurons[1:]) if a == b})
        if dups:
            raise ValueError(
                f"duplicate neurons in mask: {', '.join(map(str, dups[:10]))}{' ...' if len(dups) > 10 else ''}; "
                "list each neuron once"
            )
        self.neurons = neurons
        if self.mode == "zero":
            if self.values is not None:
                raise ValueError("mode 'zero' takes no values; pass values=None (or use mode 'mean' or 'scale')")
            return
        if self.values is None:
            raise ValueError(
                f"mode {self.mode!r} needs values: "
                + ("one replacement value per neuron (e.g. its mean activation)" if self.mode == "mean"
                   else "a factor (one float, or one per neuron)")
            )
        values = torch.as_tensor(self.values, dtype=torch.float32).detach().cpu()
        if values.ndim != 1 or values.shape[0] != len(neurons):
            raise ValueError(
                f"mode {self.mode!r} needs one value per neuron: got values of shape {tuple(values.shape)} "
                f"for {len(neurons)} neurons"
            )
        bad = ~torch.isfinite(values)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"{self.mode} value for neuron {neurons[i]} is {values[i].item()} ({int(bad.sum())} non-finite "
                "values in all); every value must be a finite number"
            )
        self.values = values

    # ---- construction ---------------------------------------------------------------------------

    @classmethod
    def from_neurons(cls, model: Any, neurons: Iterable[NeuronId | tuple[int, int] | str],
                     mode: MaskMode = "zero", values: Any = None) -> "NeuronMask":
        """A mask over ``neurons`` of ``model``.

        ``neurons``: ``NeuronId``s, ``(layer, index)`` pairs or strings like ``"L3/N17"``; any order, no
        duplicates. ``values``: None for ``"zero"``; for ``"mean"`` one value per neuron, in the order given;
        for ``"scale"`` one factor, or one per neuron in the order given.
        """
        if mode not in MODES:
            raise ValueError(f"unknown mask mode {mode!r}; choose one of {', '.join(map(repr, MODES))}")
        items = [_as_neuron(n) for n in neurons]
        seen: set[NeuronId] = set()
        dups = []
        for n in items:
            if n in seen:
                dups.append(n)
            seen.add(n)
        if dups:
            raise ValueError(
                f"duplicate neurons: {', '.join(map(str, dups[:10]))}{' ...' if len(dups) > 10 else ''}; "
                "list each neuron once"
            )
        order = sorted(range(len(items)), key=lambda i: items[i])
        vals: Tensor | None = None
        if values is not None:
            v = torch.as_tensor(values, dtype=torch.float32).detach().cpu()
            if v.ndim == 0:
                if mode != "scale":
                    raise ValueError(
                        f"mode {mode!r} needs one value per neuron, got the single number {v.item()}; only "
                        "mode 'scale' accepts one factor for all neurons"
                    )
                v = v.expand(len(items)).clone()
            if v.ndim != 1 or v.shape[0] != len(items):
                raise ValueError(
                    f"got {tuple(v.shape)} values for {len(items)} neurons; give one value per neuron"
                )
            vals = v[torch.tensor(order, dtype=torch.long)] if items else v
        return cls(tuple(items[i] for i in order), mode, vals, _model_name(model), _n_layers(model),
                   _d_mlp(model))

    # ---- set-like behaviour ---------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.neurons)

    def __iter__(self) -> Iterator[NeuronId]:
        return iter(self.neurons)

    def __contains__(self, neuron: object) -> bool:
        try:
            n = _as_neuron(neuron)
        except ValueError:
            return False
        return n in set(self.neurons)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NeuronMask):
            return NotImplemented
        same_values = (self.values is None and other.values is None) or (
            self.values is not None and other.values is not None and torch.equal(self.values, other.values))
        return (self.neurons == other.neurons and self.mode == other.mode and same_values
                and (self.model_name, self.n_layers, self.d_mlp) == (other.model_name, other.n_layers,
                                                                     other.d_mlp))

    __hash__ = None  # type: ignore[assignment]  # mutable tensor inside

    def __or__(self, other: "NeuronMask") -> "NeuronMask":
        """Union of two masks of the same model shape and mode.

        A neuron in both masks must carry the same value in both (always true for ``"zero"``); otherwise it
        is ambiguous and raises. Masks of different modes cannot be merged into one mask: apply both
        (nested ``applied`` blocks or two ``attach`` calls), which composes them in order.
        """
        if not isinstance(other, NeuronMask):
            return NotImplemented
        if (self.n_layers, self.d_mlp) != (other.n_layers, other.d_mlp):
            raise ValueError(
                f"cannot merge masks of different model shapes: {self.model_name!r} ({self.n_layers} layers x "
                f"{self.d_mlp} neurons) and {other.model_name!r} ({other.n_layers} x {other.d_mlp})"
            )
        if self.mode != other.mode:
            raise ValueError(
                f"cannot merge a {self.mode!r} mask with a {other.mode!r} mask into one mask; apply both instead "
                "(nested `with a.applied(model), b.applied(model):` or two attach calls)"
            )
        merged: dict[NeuronId, float | None] = {}
        for mask in (self, other):
            vals = mask.values.tolist() if mask.values is not None else [None] * len(mask)
            for n, v in zip(mask.neurons, vals):
                if n in merged and merged[n] != v:
                    raise ValueError(
                        f"neuron {n} has {self.mode} value {merged[n]} in one mask and {v} in the other; "
                        "the union is ambiguous: make the values agree or drop the neuron from one mask"
                    )
                merged[n] = v
        neurons = tuple(sorted(merged))
        values = None if self.mode == "zero" else torch.tensor([merged[n] for n in neurons], dtype=torch.float32)
        name = self.model_name if self.model_name == other.model_name else f"{self.model_name}|{other.model_name}"
        return NeuronMask(neurons, self.mode, values, name, self.n_layers, self.d_mlp)

    @property
    def layers(self) -> list[int]:
        """The layers that have at least one masked neuron, ascending."""
        return sorted({n.layer for n in self.neurons})

    def _layer_table(self) -> dict[int, tuple[Tensor, Tensor | None]]:
        if self._per_layer is None:
            table: dict[int, tuple[Tensor, Tensor | None]] = {}
            layers = torch.tensor([n.layer for n in self.neurons], dtype=torch.long)
            index = torch.tensor([n.index for n in self.neurons], dtype=torch.long)
            for layer in self.layers:
                sel = layers == layer
                table[layer] = (index[sel].contiguous(),
                                None if self.values is None else self.values[sel].contiguous())
            self._per_layer = table
        return self._per_layer

    def per_layer(self) -> dict[int, Int[Tensor, " k"]]:
        """Masked neuron indices of each touched layer (sorted int64 tensors)."""
        return {layer: idx for layer, (idx, _) in self._layer_table().items()}

    def per_layer_values(self) -> dict[int, Float[Tensor, " k"] | None]:
        """Values (mean) or factors (scale) of each touched layer, aligned with ``per_layer()``; None for zero."""
        return {layer: vals for layer, (_, vals) in self._layer_table().items()}

    # ---- application ----------------------------------------------------------------------------

    def check_model(self, model: Any) -> None:
        """Raise if ``model`` does not have the shape this mask was made for (warn if only the name differs)."""
        shape = (_n_layers(model), _d_mlp(model))
        if shape != (self.n_layers, self.d_mlp):
            raise ValueError(
                f"this mask was made for {self.model_name!r} ({self.n_layers} layers x {self.d_mlp} neurons) but "
                f"the model {_model_name(model)!r} has {shape[0]} layers x {shape[1]} neurons; build or load the "
                "mask for this model"
            )
        if _model_name(model) != self.model_name:
            logger.warning("mask made for %r applied to %r (same shape: %d layers x %d neurons)",
                           self.model_name, _model_name(model), self.n_layers, self.d_mlp)

    def hook_fn(self, layer: int) -> Any:
        """The forward-hook function for ``layer`` (its full-width factor/fill vectors precomputed once)."""
        table = self._layer_table()
        if layer not in table:
            raise ValueError(f"this mask touches no neuron of layer {layer}; its layers are {self.layers}")
        return _make_hook(self.mode, *table[layer], self.d_mlp)

    def attach(self, model: Any) -> "MaskHandle":
        """Apply the mask until ``handle.remove()``; one permanent forward hook per touched layer."""
        self.check_model(model)
        be = backend(model)
        handle = MaskHandle()
        try:
            for layer in self.layers:
                try:
                    handle._entries.append(be.add_hook(hook_name(layer), self.hook_fn(layer), permanent=True))
                except KeyError as exc:
                    raise KeyError(f"{exc.args[0]}; cannot mask layer {layer}") from None
        except BaseException:
            handle.remove()
            raise
        logger.debug("attached %s-mask of %d neurons on %d layers", self.mode, len(self), len(self.layers))
        return handle

    @contextlib.contextmanager
    def applied(self, model: Any) -> Iterator["NeuronMask"]:
        """Context manager: the mask is active inside the block and removed on exit, also on exceptions."""
        handle = self.attach(model)
        try:
            yield self
        finally:
            handle.remove()

    # ---- persistence ----------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the mask as safetensors (atomically); returns the path."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {
            "layers": torch.tensor([n.layer for n in self.neurons], dtype=torch.int64),
            "indices": torch.tensor([n.index for n in self.neurons], dtype=torch.int64),
        }
        if self.values is not None:
            tensors["values"] = self.values.contiguous()
        meta = {"format": FILE_FORMAT, "version": FILE_VERSION, "mode": self.mode, "model_name": self.model_name,
                "n_layers": str(self.n_layers), "d_mlp": str(self.d_mlp), "n_neurons": str(len(self))}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model: Any = None) -> "NeuronMask":
        """Read a mask written by ``save``; with ``model``, also check that it fits that model."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"mask file {str(path)!r} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types for damaged files
            raise ValueError(
                f"{str(path)!r} is not a readable NeuronMask file (truncated or not safetensors: {exc}); "
                "write masks with NeuronMask.save"
            ) from None
        if meta.get("format") != FILE_FORMAT:
            raise ValueError(
                f"{str(path)!r} is a safetensors file but not a NeuronMask (format {meta.get('format')!r}, "
                f"expected {FILE_FORMAT!r}); write masks with NeuronMask.save"
            )
        if meta.get("version") != FILE_VERSION:
            raise ValueError(f"{str(path)!r} has NeuronMask format version {meta.get('version')!r}; this "
                             f"snip_lens reads version {FILE_VERSION!r}")
        try:
            n_layers, d_mlp, n = int(meta["n_layers"]), int(meta["d_mlp"]), int(meta["n_neurons"])
            layers, indices = tensors["layers"], tensors["indices"]
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{str(path)!r} is a damaged NeuronMask file (missing or bad {exc})") from None
        if layers.shape != (n,) or indices.shape != (n,):
            raise ValueError(f"{str(path)!r} is a damaged NeuronMask file: {n} neurons in metadata but tensors "
                             f"of shapes {tuple(layers.shape)} and {tuple(indices.shape)}")
        neurons = tuple(NeuronId(int(a), int(b)) for a, b in zip(layers.tolist(), indices.tolist()))
        try:
            mask = cls(neurons, meta.get("mode", "?"), tensors.get("values"),  # type: ignore[arg-type]
                       meta.get("model_name", "unknown"), n_layers, d_mlp)
        except ValueError as exc:
            raise ValueError(f"{str(path)!r} holds an invalid NeuronMask: {exc}") from None
        if model is not None:
            mask.check_model(model)
        return mask

    def to_json(self) -> dict:
        """A JSON-able summary (neurons as ``[layer, index]``), for run records."""
        return {"mode": self.mode, "model_name": self.model_name, "n_layers": self.n_layers, "d_mlp": self.d_mlp,
                "neurons": [[n.layer, n.index] for n in self.neurons],
                "values": None if self.values is None else self.values.tolist()}

    def __repr__(self) -> str:
        return (f"NeuronMask({len(self)} neurons on {len(self.layers)} layers, mode={self.mode!r}, "
                f"model={self.model_name!r} {self.n_layers}x{self.d_mlp})")


def _make_hook(mode: str, idx: Tensor, vals: Tensor | None, width: int) -> Any:
    """One hook for one layer: a single full-width elementwise op on precomputed (d_mlp,) vectors.

    Full-width ``act * keep`` (+ ``fill``) is several times faster than gathering and scattering the masked
    columns, and it returns a new tensor (no in-place edit: a cache hook registered before ours may hold
    the activation it received, and autograd may need it). The vectors are moved to the activation's
    device and dtype once, then reused.
    """
    keep = torch.ones(width)  # (d_mlp,) 1 for untouched neurons
    fill = torch.zeros(width)  # (d_mlp,) value of replaced neurons (mean mode)
    if mode == "zero":
        keep[idx] = 0.0
    elif mode == "scale":
        assert vals is not None
        keep[idx] = vals
    else:
        assert vals is not None
        keep[idx] = 0.0
        fill[idx] = vals
    cache: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    def prepared(act: Tensor) -> tuple[Tensor, Tensor]:
        key = (act.device, act.dtype)
        if key not in cache:
            cache[key] = (keep.to(act.device, act.dtype), fill.to(act.device, act.dtype))
        return cache[key]

    if mode == "mean":
        def mean_hook(act: Float[Tensor, "batch pos d_mlp"], hook: Any) -> Tensor:
            k, f = prepared(act)
            return torch.addcmul(f, act, k)  # f + act * k
        return mean_hook

    def scale_hook(act: Float[Tensor, "batch pos d_mlp"], hook: Any) -> Tensor:
        k, _ = prepared(act)
        return act * k  # zero mode: factor 0, the same as zeroing the neuron's output weights
    return scale_hook


@dataclass
class MaskHandle:
    """The hooks one ``attach`` call added; ``remove()`` takes off exactly those (idempotent)."""

    _entries: list[HookHandle] = field(default_factory=list)
    """One backend hook handle per masked layer, in the order added."""

    @property
    def active(self) -> bool:
        """True until ``remove()`` is called."""
        return bool(self._entries)

    def remove(self) -> None:
        """Remove our hooks only, leaving every other hook (the user's, other masks') in place.

        Every handle is removed even when one fails; the first failure is raised afterwards.
        """
        error: BaseException | None = None
        while self._entries:
            try:
                self._entries.pop().remove()
            except BaseException as exc:  # noqa: BLE001 - keep removing the others, then re-raise
                error = error or exc
        if error is not None:
            raise error

    def __enter__(self) -> "MaskHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()
