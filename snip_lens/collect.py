"""Collect MLP neuron activations: top-activating records and activation statistics (SNIP step 1 input).

SNIP step 1 explains each MLP neuron from the text windows that activate it most (plus a few random
windows, as OpenAI's neuron explainer shows); the selective-pruning baseline of Pochinkov & Schoots (2024)
needs per-neuron activation statistics on a forget and a retain corpus. ``collect`` computes both in one
streaming pass over the corpus with forward hooks on ``blocks.{l}.mlp.hook_post``:

- per neuron, the ``top_k`` largest activations of the *records corpus* with where they occurred
  (window, position) and the neuron's activations on the tokens around each (``context``);
- per neuron, ``n_random`` records around uniformly sampled tokens that are not among its top-k: every
  window contributes two seeded random positions, and each neuron keeps the candidates with the largest
  seeded random keys (a bottom-k sample, which does not depend on the batch size);
- per neuron and per named corpus: token count, mean, mean |act|, std, max, and frequency of act > 0
  (batch moments merged in float64 with Chan's formula).

A BOS token prepended to a window (position 0, on models that take one, such as Gemma) is not text: no
record is centred on it, no context shows it, and it counts in no statistic (its activation is typically
an attention-sink outlier that would otherwise top many neurons' lists).

Memory is O(layers x neurons x (top_k + n_random) x context) whatever the number of tokens: each batch is
reduced inside the hook and then dropped. The forward pass is stopped by an exception right after the
last requested layer's hook, so later layers and the unembedding never run.

With ``out_dir`` the run is resumable: after every shard of windows the whole running state is written
atomically (temp file + ``os.replace``) to ``checkpoint.safetensors``; a run killed at any point and
started again resumes from the last shard and gives the same records as an uninterrupted run (ties are
broken by token order and shards always start a new batch, so the arithmetic is identical).

Device and dtype: the running state, scratch buffers and kernels live on the device of the activations
(the model's), in float32 (float64 for the moments) whatever the model's dtype. The random candidates are
drawn on the CPU from seeded generators (so CUDA and CPU runs sample the same tokens) and copied over once
per batch. Off the CPU the hooks use the sync-free top-k path: no host synchronisation inside the hooks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from . import models
from .backends import backend
from ._io import atomic_write, atomic_write_text
from .config import CollectionConfig
from .corpus import TokenWindows
from .kernels.topk import NO_INDEX, merge_topk, update_topk, update_topk_sync_free, update_topk_t
from .types import ActivationRecord, NeuronId, NeuronRecords

logger = logging.getLogger(__name__)

RECORDS_CORPUS = "records"
"""Name of the corpus that provides the top-k and random records when several corpora are given."""
SAMPLES_PER_WINDOW = 2
"""Random token positions each window offers as candidates for every neuron's random records."""
RANDOM_MARGIN = 2
"""Extra random candidates kept per neuron, so that a few that turn out to be top-k can be dropped."""
CHECKPOINT = "checkpoint.safetensors"
TENSORS_FILE = "activations.safetensors"
META_FILE = "records.json"
FORMAT_VERSION = 2
"""2: prepended BOS positions are left out of records and statistics (1 counted them)."""
STATS_CHUNK = 128
"""Token rows per cache-sized chunk of the statistics pass."""
PADDED_CONTEXT_RATIO = 10
"""Contexts are gathered from a padded copy of the batch once they hold over 1/this of its values."""
FUSED_KERNEL = True
"""On the CPU, reduce each batch with the one-pass kernels of ``kernels.fused`` where numba is installed
(False: always the torch path)."""


# ---- config -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CollectConfig:
    """Everything besides the model and the tokens that determines what ``collect`` produces."""

    layers: tuple[int, ...]
    """Layers whose ``mlp.hook_post`` neurons are collected, ascending, no repeats."""
    top_k: int = 20
    """Top-activating records kept per neuron."""
    context: tuple[int, int] = (32, 8)
    """Tokens kept (before, after) the activating token in every record (clipped at window edges)."""
    n_random: int = 5
    """Random non-top records kept per neuron (0 for none)."""
    seed: int = 0
    """Seed of the random records."""

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("layers is empty; give at least one layer index (or None for all layers)")
        if list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"layers must be ascending without repeats; got {list(self.layers)}")
        if self.layers[0] < 0:
            raise ValueError(f"layer indices must be >= 0; got {list(self.layers)}")
        if not isinstance(self.top_k, int) or self.top_k <= 0:
            raise ValueError(f"top_k must be a positive integer; got {self.top_k!r}")
        if len(self.context) != 2 or min(self.context) < 0:
            raise ValueError(f"context must be (tokens before, tokens after), both >= 0; got {self.context!r}")
        if self.n_random < 0:
            raise ValueError(f"n_random must be >= 0; got {self.n_random}")

    @property
    def context_len(self) -> int:
        """Tokens in one record: before + the activating token + after."""
        return self.context[0] + 1 + self.context[1]

    @property
    def n_candidates(self) -> int:
        """Random candidates kept per neuron during collection."""
        return self.n_random + RANDOM_MARGIN if self.n_random else 0


def parse_layers(spec: str) -> list[int]:
    """Parse a layer list such as ``"0-14"``, ``"3"``, ``"0,2,5-7"`` into sorted layer indices."""
    out: set[int] = set()
    try:
        for part in spec.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-"))
                if hi < lo:
                    raise ValueError
                out.update(range(lo, hi + 1))
            else:
                out.add(int(part))
    except ValueError:
        raise ValueError(f"cannot parse layers {spec!r}: write e.g. '0-14', '5' or '0,2,5-7'") from None
    return sorted(out)


# ---- artifact ---------------------------------------------------------------------------------------


@dataclass
class NeuronStats:
    """Activation statistics of every collected neuron over all tokens of one corpus."""

    count: Float[Tensor, "layer neuron"]
    """Number of tokens the statistics are over (the same for every neuron)."""
    mean: Float[Tensor, "layer neuron"]
    """Mean activation."""
    mean_abs: Float[Tensor, "layer neuron"]
    """Mean absolute activation (the importance measure of selective pruning)."""
    std: Float[Tensor, "layer neuron"]
    """Population standard deviation of the activation."""
    max: Float[Tensor, "layer neuron"]
    """Largest activation."""
    freq_pos: Float[Tensor, "layer neuron"]
    """Fraction of tokens on which the activation is > 0."""

    FIELDS = ("count", "mean", "mean_abs", "std", "max", "freq_pos")


@dataclass
class ActivationRecords:
    """Top-activating records, random records and activation statistics of a model's MLP neurons."""

    model_name: str
    """Name of the model the activations come from."""
    layers: list[int]
    """Collected layers; row ``i`` of every tensor is layer ``layers[i]``."""
    d_mlp: int
    """Neurons per layer."""
    top_k: int
    """Top records per neuron."""
    context: tuple[int, int]
    """Tokens (before, after) the activating token stored in each record."""
    records_corpus: str
    """Name of the corpus the records come from."""
    top_values: Float[Tensor, "layer neuron k"]
    """The ``top_k`` largest activations of each neuron, descending (ties: earlier token first)."""
    top_window: Int[Tensor, "layer neuron k"]
    """Window (index into ``windows``) of each top activation."""
    top_pos: Int[Tensor, "layer neuron k"]
    """Position inside its window of each top activation."""
    top_context: Float[Tensor, "layer neuron k ctx"]
    """Activations on the ``context[0]`` tokens before through ``context[1]`` after; NaN beyond the window."""
    random_values: Float[Tensor, "layer neuron r"]
    """Activations at random non-top tokens."""
    random_window: Int[Tensor, "layer neuron r"]
    """Window of each random record; -1 where fewer random records exist."""
    random_pos: Int[Tensor, "layer neuron r"]
    """Position inside its window of each random record; -1 where none."""
    random_context: Float[Tensor, "layer neuron r ctx"]
    """Activations around each random token; NaN beyond the window or for missing records."""
    windows: Int[Tensor, "window pos"]
    """Token ids of every window of the records corpus."""
    vocab: dict[int, str]
    """Decoded string of every token id that occurs in ``windows`` (records need no tokenizer)."""
    stats: dict[str, NeuronStats]
    """Activation statistics per corpus name."""
    config_hash: str = ""
    """sha256 of the collection config, model and tokens (what a resumed run must match)."""
    n_layers: int = 0
    """Layers of the whole model (collected or not); 0 when unknown."""

    # -- derived views --

    @property
    def mean_abs(self) -> Float[Tensor, "layer neuron"]:
        """Mean |activation| on the first corpus."""
        return next(iter(self.stats.values())).mean_abs

    @property
    def n_neurons(self) -> int:
        """Neurons over all collected layers."""
        return len(self.layers) * self.d_mlp

    def neurons(self) -> Iterator[NeuronId]:
        """Every collected neuron, layer by layer."""
        for layer in self.layers:
            for i in range(self.d_mlp):
                yield NeuronId(layer, i)

    def _row(self, neuron: NeuronId) -> int:
        if neuron.layer not in self.layers:
            raise ValueError(f"neuron {neuron} is in layer {neuron.layer}, which was not collected "
                             f"(collected layers: {self.layers}); collect that layer first")
        if not 0 <= neuron.index < self.d_mlp:
            raise ValueError(f"neuron {neuron} has index {neuron.index}, outside 0..{self.d_mlp - 1}")
        return self.layers.index(neuron.layer)

    def _record(self, window: int, pos: int, ctx: list[float]) -> ActivationRecord:
        start = pos - self.context[0]
        row = self._window_rows()[window]
        keep = [j for j, a in enumerate(ctx) if not math.isnan(a)]
        return ActivationRecord([self.vocab[row[start + j]] for j in keep], [float(ctx[j]) for j in keep],
                                document=window, position=pos)

    def _window_rows(self) -> list[list[int]]:
        # token ids as Python lists, built once: indexing a tensor element by element costs microseconds,
        # and a neuron's records read thousands of tokens
        cached = self.__dict__.get("_rows_cache")
        if cached is None or cached[0] is not self.windows:
            cached = self.__dict__["_rows_cache"] = (self.windows, self.windows.tolist())
        return cached[1]

    def _records(self, windows: Tensor, positions: Tensor, contexts: Tensor) -> list[ActivationRecord]:
        return [self._record(w, p, c) for w, p, c in zip(windows.tolist(), positions.tolist(), contexts.tolist())
                if w >= 0]

    def neuron_records(self, neuron: NeuronId) -> NeuronRecords:
        """The neuron's top records (strongest first) and random records.

        In each record, ``document`` is the window index in the records corpus and ``position`` the
        activating token's position inside that window.
        """
        li = self._row(neuron)
        n = neuron.index
        top = self._records(self.top_window[li, n], self.top_pos[li, n], self.top_context[li, n])
        rnd = self._records(self.random_window[li, n], self.random_pos[li, n], self.random_context[li, n])
        return NeuronRecords(neuron, top, rnd)

    def openai_format(self, neuron: NeuronId) -> dict:
        """One neuron's records in the shape of OpenAI neuron-explainer's ``NeuronRecord``.

        Activations are scaled to integers 0-10 relative to the neuron's largest top activation, as
        ``calculate_max_activation`` + ``relu_and_normalize_activations`` do (negative -> 0, floor).
        """
        recs = self.neuron_records(neuron)
        max_act = recs.max_activation

        def scale(a: float) -> int:
            if a <= 0 or max_act <= 0:
                return 0
            return min(10, math.floor(10 * a / max_act))

        def fmt(rs: list[ActivationRecord]) -> list[dict]:
            return [{"tokens": r.tokens, "activations": [scale(a) for a in r.activations]} for r in rs]

        return {"neuron_id": {"layer_index": neuron.layer, "neuron_index": neuron.index},
                "max_activation": max_act,
                "most_positive_activation_records": fmt(recs.top),
                "random_sample": fmt(recs.random)}

    # -- persistence --

    _TENSORS = ("top_values", "top_window", "top_pos", "top_context", "random_values", "random_window",
                "random_pos", "random_context", "windows")

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``activations.safetensors`` and ``records.json`` into ``directory`` (atomically each)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {name: getattr(self, name).contiguous() for name in self._TENSORS}
        for ci, st in enumerate(self.stats.values()):
            for f in NeuronStats.FIELDS:
                tensors[f"stats.{ci}.{f}"] = getattr(st, f).contiguous()
        _atomic_save_tensors(tensors, d / TENSORS_FILE)
        meta = {"format_version": FORMAT_VERSION, "model_name": self.model_name, "layers": self.layers,
                "d_mlp": self.d_mlp, "top_k": self.top_k, "context": list(self.context),
                "records_corpus": self.records_corpus, "corpora": list(self.stats),
                "config_hash": self.config_hash, "n_layers": self.n_layers,
                "vocab": {str(k): v for k, v in sorted(self.vocab.items())}}
        atomic_write_text(d / META_FILE, json.dumps(meta, ensure_ascii=False))
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "ActivationRecords":
        """Read what ``save`` wrote."""
        d = Path(directory)
        if not (d / META_FILE).exists() or not (d / TENSORS_FILE).exists():
            raise FileNotFoundError(f"{str(d)!r} holds no saved ActivationRecords ({META_FILE} and "
                                    f"{TENSORS_FILE}); run `snip collect --out {d}` first")
        meta = json.loads((d / META_FILE).read_text(encoding="utf-8"))
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{str(d)!r} was written in format {meta.get('format_version')!r}; this version "
                             f"reads format {FORMAT_VERSION}. Collect again.")
        t = load_file(str(d / TENSORS_FILE))
        stats = {name: NeuronStats(**{f: t[f"stats.{ci}.{f}"] for f in NeuronStats.FIELDS})
                 for ci, name in enumerate(meta["corpora"])}
        return cls(model_name=meta["model_name"], layers=list(meta["layers"]), d_mlp=int(meta["d_mlp"]),
                   top_k=int(meta["top_k"]), context=tuple(meta["context"]),
                   records_corpus=meta["records_corpus"], **{n: t[n] for n in cls._TENSORS},
                   vocab={int(k): v for k, v in meta["vocab"].items()}, stats=stats,
                   config_hash=meta.get("config_hash", ""), n_layers=int(meta.get("n_layers", 0)))


# ---- atomic files -----------------------------------------------------------------------------------


def _atomic_save_tensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


# ---- running state ----------------------------------------------------------------------------------


def _fused_kernels() -> Any:
    """``kernels.fused`` when numba works here, else None (imported on first use: numba is slow to import)."""
    from .kernels import fused

    return fused if fused.AVAILABLE else None


class _StopForward(Exception):
    """Raised by the last requested layer's hook: nothing after it needs computing."""


class _State:
    """Running top-k, random candidates and moments; every tensor is O(layers x neurons x k x context)."""

    def __init__(self, cfg: CollectConfig, d_mlp: int, corpora: list[str], device: torch.device | str = "cpu",
                 sync_free: bool | None = None, use_fused: bool | None = None):
        L, N, k, C, R = len(cfg.layers), d_mlp, cfg.top_k, cfg.context_len, cfg.n_candidates
        self.cfg, self.N, self.n_corpora = cfg, N, len(corpora)
        self.device = torch.device(device)
        self.sync_free = self.device.type != "cpu" if sync_free is None else sync_free
        """Use the kernels without host synchronisation (always off the CPU; on the CPU only for tests)."""
        want = (FUSED_KERNEL if use_fused is None else use_fused) and self.device.type == "cpu" and not self.sync_free
        self._kernels = _fused_kernels() if want else None
        self.fused = self._kernels is not None
        """Reduce each batch with the one-pass CPU kernels (``update_batch``) instead of the torch path."""
        if use_fused and want and not self.fused:
            raise ValueError("use_fused=True needs numba (pip install numba); leave use_fused unset to fall back "
                             "to the torch path")
        self._buf: Tensor | None = None
        self._mask: Tensor | None = None
        self._pad: Tensor | None = None
        self._xt: Tensor | None = None
        self._xt_of: Tensor | None = None
        self._many_fresh: dict[int, bool] = {}
        """Per layer row: whether the last batch's new top records took the padded-context path."""
        self._pad_of: Tensor | None = None
        """The batch ``_pad`` holds a padded copy of (so the top and random records share one copy)."""
        # Tokens seen per (corpus, layer row), mirrored on the host so the hooks never read a device scalar.
        self._count: dict[tuple[int, int], float] = {}
        with torch.device(self.device):
            self._init_tensors(L, N, k, C, R, corpora)
        self._relayout()

    def _init_tensors(self, L: int, N: int, k: int, C: int, R: int, corpora: list[str]) -> None:
        self.t: dict[str, Tensor] = {
            "top_v": torch.full((L, k, N), -math.inf), "top_i": torch.full((L, k, N), NO_INDEX),
            "top_ctx": torch.full((L, k, N, C), math.nan),
            "rnd_key": torch.full((L, R, N), -math.inf), "rnd_i": torch.full((L, R, N), NO_INDEX),
            "rnd_v": torch.full((L, R, N), math.nan), "rnd_ctx": torch.full((L, R, N, C), math.nan),
            # Payloads (context, value) stay in storage slots; *_slot maps each rank to its slot, so a new
            # entry writes only its own slot instead of shifting every payload of its column.
            "top_slot": torch.arange(k).view(1, k, 1).expand(L, k, N).clone(),
            "rnd_slot": torch.arange(R).view(1, R, 1).expand(L, R, N).clone(),
        }
        for ci in range(len(corpora)):
            self.t.update({
                f"s{ci}.n": torch.zeros(L, dtype=torch.float64),
                f"s{ci}.mean": torch.zeros(L, N, dtype=torch.float64),
                f"s{ci}.m2": torch.zeros(L, N, dtype=torch.float64),
                f"s{ci}.sum_abs": torch.zeros(L, N, dtype=torch.float64),
                f"s{ci}.n_pos": torch.zeros(L, N, dtype=torch.float64),
                f"s{ci}.max": torch.full((L, N), -math.inf, dtype=torch.float64),
            })

    _LIST_KEYS = ("top_v", "top_i", "top_slot", "rnd_key", "rnd_i", "rnd_slot")

    def _relayout(self) -> None:
        """For the fused kernels, store each (layer, rank, neuron) list tensor neuron-major in memory.

        The logical shape is unchanged (every reader sees the same tensor); only one neuron's list becomes
        contiguous, which is what the kernels walk. Called after anything that replaces these tensors.
        """
        if self.fused:
            for key in self._LIST_KEYS:
                v = self.t[key]
                if v.stride(1) != 1:
                    self.t[key] = v.transpose(1, 2).contiguous().transpose(1, 2)

    # -- per-batch work, called from the hook of layer row `li` --

    def update_batch(self, ci: int, li: int, x: Float[Tensor, "tok neuron"], skip: Any, records: bool, base: int,
                     n_pos: int, rand_rows: Tensor | None, rand_keys: Tensor | None) -> None:
        """``update_stats`` and (``records``) ``update_records`` in one pass of the fused CPU kernels.

        ``x`` holds every row of the batch; ``skip`` (numpy bool, one per row) marks the prepended BOS rows,
        which count in no statistic and no record (the torch path gets them filtered and set to -inf).
        """
        t, cfg = self.t, self.cfg
        xn = x.numpy()
        n_a = self._count.get((ci, li), 0.0)
        p = f"s{ci}."
        k = cfg.top_k
        values, index, slots = (t[n][li].numpy() for n in ("top_v", "top_i", "top_slot"))
        bound = np.full(self.N, -np.inf, dtype=np.float32)
        if records and bool((index[k - 1] == NO_INDEX).any()):  # a list not yet full: the group bound filters
            self._kernels.group_bound(xn, skip, k, bound)
        if records and rand_rows is not None and rand_keys is not None:
            rkeys, rrows = rand_keys[li].numpy(), rand_rows.numpy()
        else:
            rkeys, rrows = np.empty((0, self.N), dtype=np.float32), np.empty(0, dtype=np.int64)
        rnd = [t[n][li].numpy() for n in ("rnd_key", "rnd_i", "rnd_slot", "rnd_v", "rnd_ctx")]
        before, after = cfg.context
        counted = self._kernels.reduce_batch(
            xn, skip, n_pos, before, after, n_a, t[p + "mean"][li].numpy(), t[p + "m2"][li].numpy(),
            t[p + "sum_abs"][li].numpy(), t[p + "n_pos"][li].numpy(), t[p + "max"][li].numpy(), records, values,
            index, slots, bound, base, t["top_ctx"][li].numpy(), rkeys, rrows, *rnd)
        n_t = n_a + counted
        t[p + "n"][li] = n_t
        self._count[(ci, li)] = n_t

    def _buffers(self, shape: torch.Size) -> tuple[Tensor, Tensor]:
        # Reused scratch space: a fresh 6 MB temporary per reduction costs page faults on every batch.
        if self._buf is None or self._buf.shape != shape:
            self._buf = torch.empty(shape, device=self.device)
            self._mask = torch.empty(shape, dtype=torch.bool, device=self.device)
        assert self._mask is not None
        return self._buf, self._mask

    def update_stats(self, ci: int, li: int, x: Float[Tensor, "tok neuron"]) -> None:
        # Shifted sums: centring on the running mean (the first token for the first batch) keeps the float32
        # batch sums free of cancellation; batches are then merged in float64 (Chan et al.).
        t, m = self.t, x.shape[0]
        buf, _ = self._buffers(x.shape)
        n_a = self._count.get((ci, li), 0.0)
        shift = (t[f"s{ci}.mean"][li] if n_a else x[0].double()).float()
        s1 = torch.zeros(self.N, dtype=torch.float64, device=x.device)
        s2, sum_abs, n_pos = s1.clone(), s1.clone(), s1.clone()
        # Row chunks that stay in cache: each statistic is a pass over the chunk, not over the batch (on an
        # accelerator one pass over the whole batch: fewer kernel launches).
        chunk = STATS_CHUNK if not self.sync_free else max(m, 1)
        for c in range(0, m, chunk):
            xc, bc = x[c:c + chunk], buf[c:c + chunk]
            torch.sub(xc, shift, out=bc)  # (chunk, neuron) centred
            s1 += bc.sum(0)
            bc.square_()
            s2 += bc.sum(0)
            torch.abs(xc, out=bc)
            sum_abs += bc.sum(0)
            torch.gt(xc, 0, out=bc)  # as 0.0 / 1.0: a float sum is several times faster than a bool one
            n_pos += bc.sum(0)
        mean_b = shift.double() + s1 / m
        m2_b = (s2 - s1 * s1 / m).clamp(min=0)
        n_t = n_a + m
        delta = mean_b - t[f"s{ci}.mean"][li]
        t[f"s{ci}.mean"][li] += delta * (m / n_t)
        t[f"s{ci}.m2"][li] += m2_b + delta.square() * (n_a * m / n_t)
        t[f"s{ci}.n"][li] = n_t
        self._count[(ci, li)] = n_t
        t[f"s{ci}.sum_abs"][li] += sum_abs
        t[f"s{ci}.n_pos"][li] += n_pos
        torch.maximum(t[f"s{ci}.max"][li], x.amax(0).double(), out=t[f"s{ci}.max"][li])

    def _context(self, x: Tensor, rows: Tensor, cols: Tensor, n_pos: int) -> Tensor:
        """Activations of neuron ``cols[e]`` around token ``rows[e]``: (entry, ctx), NaN outside the window.

        Gathers only the entries' own ``ctx`` values (no padded copy of the whole batch).
        """
        before, after = self.cfg.context
        offsets = torch.arange(-before, after + 1, device=x.device)  # (ctx,)
        pos = (rows % n_pos).unsqueeze(1) + offsets  # (entry, ctx) position inside the window
        inside = (pos >= 0) & (pos < n_pos)
        src = (rows - rows % n_pos).unsqueeze(1) + pos.clamp(0, n_pos - 1)  # (entry, ctx) row in x
        vals = x[src, cols.unsqueeze(1).expand_as(src)]
        return torch.where(inside, vals, torch.full((), math.nan, device=x.device, dtype=x.dtype))

    def _context_padded(self, x: Tensor, rows: Tensor, cols: Tensor, n_pos: int) -> Tensor:
        """``_context`` through one transposed, NaN-padded copy of the batch (for many entries at once).

        Gathering ``ctx`` values a column apart costs a cache miss each; after one sequential copy to
        (neuron, window, NaN pad + positions + NaN pad) every entry's context is ``ctx`` consecutive floats.
        """
        before, after = self.cfg.context
        C, N = self.cfg.context_len, x.shape[1]
        W = x.shape[0] // n_pos
        P = before + n_pos + after
        if self._pad is None or self._pad.shape != (N, W, P) or self._pad.dtype != x.dtype:
            self._pad = torch.full((N, W, P), math.nan, dtype=x.dtype, device=x.device)
        if self._pad_of is not x:  # the pads stay NaN; only the positions are rewritten, once per batch
            # A plain transpose, then a copy of whole rows: faster than one copy through a 3-d permute.
            self._pad[:, :, before:before + n_pos].copy_(self._transposed(x).view(N, W, n_pos))
            self._pad_of = x
        flat = self._pad.view(-1)
        runs = flat.as_strided((flat.numel() - C + 1, C), (1, 1))  # row s: the C floats from s on
        start = (cols * W + torch.div(rows, n_pos, rounding_mode="floor")) * P + rows % n_pos
        return runs.index_select(0, start)

    def _transposed(self, x: Float[Tensor, "tok neuron"]) -> Float[Tensor, "neuron tok"]:
        """``x.t()`` as a contiguous copy, made once per batch (the top-k update and the contexts share it)."""
        if self._xt_of is not x:
            if self._xt is None or self._xt.shape != x.t().shape or self._xt.dtype != x.dtype:
                self._xt = torch.empty(x.shape[1], x.shape[0], dtype=x.dtype, device=x.device)
            self._xt.copy_(x.t())
            self._xt_of = x
        assert self._xt is not None
        return self._xt

    def _contexts(self, x: Tensor, rows: Tensor, cols: Tensor, n_pos: int) -> Tensor:
        """``_context`` by whichever way is cheaper for this many entries (the results are equal)."""
        # Once the padded copy of this batch exists (for the top records), the random records use it too.
        if self._pad_of is x or rows.numel() * self.cfg.context_len * PADDED_CONTEXT_RATIO > x.numel():
            return self._context_padded(x, rows, cols, n_pos)
        return self._context(x, rows, cols, n_pos)

    def _apply(self, li: int, names: tuple[str, str, str, str | None, str], new_key: Tensor, new_idx: Tensor,
               x: Tensor, base: int, n_pos: int) -> None:
        """Store a merged top list; entries new from this batch take the slots of the evicted ones."""
        key_n, idx_n, slot_n, val_n, ctx_n = names
        t = self.t
        size = new_idx.shape[0]
        fresh_mask = (new_idx >= base) & (new_idx != NO_INDEX)  # (rank, neuron) entries from this batch
        cols = fresh_mask.any(0).nonzero().squeeze(1)
        if cols.numel():
            fb = fresh_mask[:, cols]  # (rank, col)
            slots = t[slot_n][li][:, cols]  # (rank, col) slot of each old rank
            # Kept entries are the old list's first ones, in order; the fresh ones reuse the freed slots.
            kept_rank = (torch.cumsum((~fb).long(), 0) - 1).clamp(min=0)
            n_new = fb.sum(0, keepdim=True)
            freed_rank = (size - n_new + torch.cumsum(fb.long(), 0) - 1).clamp(0, size - 1)
            new_slots = torch.where(fb, torch.gather(slots, 0, freed_rank), torch.gather(slots, 0, kept_rank))
            t[slot_n][li][:, cols] = new_slots
            r, c = fb.nonzero(as_tuple=True)  # fresh entries: (rank, position in cols)
            col = cols[c]
            rows = new_idx[r, col] - base  # token row in x
            slot = new_slots[r, c]
            store = t[ctx_n][li]  # (slot, neuron, ctx), contiguous: row slot * N + col of its (-1, ctx) view
            where = slot * self.N + col
            store.view(-1, store.shape[-1]).index_copy_(0, where, self._contexts(x, rows, col, n_pos))
            if val_n is not None:
                t[val_n][li].view(-1).index_copy_(0, where, x[rows, col])
        t[key_n][li] = new_key
        t[idx_n][li] = new_idx

    def _apply_sync_free(self, li: int, names: tuple[str, str, str, str | None, str], new_key: Tensor,
                         new_idx: Tensor, x: Tensor, base: int, n_pos: int) -> None:
        """``_apply`` with a fixed sequence of kernels over every column (no ``nonzero``: no host sync)."""
        key_n, idx_n, slot_n, val_n, ctx_n = names
        t = self.t
        size = new_idx.shape[0]
        fresh = (new_idx >= base) & (new_idx != NO_INDEX)  # (rank, neuron) entries from this batch
        slots = t[slot_n][li]  # (rank, neuron) slot of each old rank
        kept_rank = (torch.cumsum((~fresh).long(), 0) - 1).clamp(min=0)
        n_new = fresh.sum(0, keepdim=True)
        freed_rank = (size - n_new + torch.cumsum(fresh.long(), 0) - 1).clamp(0, size - 1)
        new_slots = torch.where(fresh, torch.gather(slots, 0, freed_rank), torch.gather(slots, 0, kept_rank))
        t[slot_n][li] = new_slots
        rows = (new_idx - base).clamp(0, x.shape[0] - 1)  # (rank, neuron) token row in x where fresh
        cols = torch.arange(self.N, device=x.device).expand_as(rows)
        # new_slots is a permutation of the slots in every column: each slot is written exactly once.
        ctx = self._context(x, rows.reshape(-1), cols.reshape(-1), n_pos).view(size, self.N, -1)  # (rank, N, C)
        store = t[ctx_n][li]  # (slot, neuron, ctx)
        idx3 = new_slots.unsqueeze(2).expand_as(ctx)
        store.scatter_(0, idx3, torch.where(fresh.unsqueeze(2), ctx, torch.gather(store, 0, idx3)))
        if val_n is not None:
            vstore = t[val_n][li]
            vstore.scatter_(0, new_slots, torch.where(fresh, x[rows, cols], torch.gather(vstore, 0, new_slots)))
        t[key_n][li] = new_key
        t[idx_n][li] = new_idx

    def update_records(self, li: int, x: Float[Tensor, "tok neuron"], base: int, n_pos: int,
                       rand_rows: Tensor | None, rand_keys: Tensor | None) -> None:
        try:
            self._update_records(li, x, base, n_pos, rand_rows, rand_keys)
        finally:
            # The transposed and padded copies are of this call's batch only (and hold no reference to it).
            self._pad_of = self._xt_of = None

    def _update_records(self, li: int, x: Float[Tensor, "tok neuron"], base: int, n_pos: int,
                        rand_rows: Tensor | None, rand_keys: Tensor | None) -> None:
        t = self.t
        old_i = t["top_i"][li]
        row_index = torch.arange(base, base + x.shape[0], device=x.device)
        if self.sync_free:
            v, i = update_topk_sync_free(t["top_v"][li], old_i, x, row_index)
            self._apply_sync_free(li, ("top_v", "top_i", "top_slot", None, "top_ctx"), v, i, x, base, n_pos)
            if rand_rows is not None and rand_keys is not None:
                kv, ki = update_topk_sync_free(t["rnd_key"][li], t["rnd_i"][li], rand_keys[li], rand_rows + base)
                self._apply_sync_free(li, ("rnd_key", "rnd_i", "rnd_slot", "rnd_v", "rnd_ctx"), kv, ki, x, base,
                                      n_pos)
            return
        if self._many_fresh.get(li, True):
            # Many records changed in the last batch (early batches): the contexts will want the transposed
            # batch, and the top-k update is cheaper from it too.
            v, i = update_topk_t(t["top_v"][li], old_i, self._transposed(x), row_index)
        else:
            _, mask = self._buffers(x.shape)
            v, i = update_topk(t["top_v"][li], old_i, x, row_index, mask_out=mask)
        if i is not old_i:  # update_topk hands back its input when nothing changed
            self._apply(li, ("top_v", "top_i", "top_slot", None, "top_ctx"), v, i, x, base, n_pos)
        self._many_fresh[li] = self._pad_of is x
        if rand_rows is not None and rand_keys is not None:
            old_ri = t["rnd_i"][li]
            kv, ki = update_topk(t["rnd_key"][li], old_ri, rand_keys[li], rand_rows + base)
            if ki is not old_ri:
                self._apply(li, ("rnd_key", "rnd_i", "rnd_slot", "rnd_v", "rnd_ctx"), kv, ki, x, base, n_pos)

    # -- merging the states of disjoint shards (sharded collection, snip_lens.sharding) --

    _RECORD_KEYS = ("top_v", "top_i", "top_ctx", "top_slot", "rnd_key", "rnd_i", "rnd_v", "rnd_ctx", "rnd_slot")
    _STAT_KEYS = ("n", "mean", "m2", "sum_abs", "n_pos", "max")

    def part(self, ci: int, records: bool) -> dict[str, Tensor]:
        """The tensors a shard of corpus ``ci`` changed: its statistics, and the records if ``records``."""
        keys = [f"s{ci}.{k}" for k in self._STAT_KEYS] + (list(self._RECORD_KEYS) if records else [])
        return {k: self.t[k].detach().cpu().contiguous() for k in keys}

    def merge(self, part: dict[str, Tensor]) -> None:
        """Fold in the ``part`` of a state collected over other windows (exact for records, Chan for moments).

        Top-k and random candidates are merged by (key descending, token index ascending), the order the
        per-batch updates keep, so merging shards gives the records of one pass over all their windows.
        """
        t = self.t
        part = {k: v.to(self.device) for k, v in part.items()}
        if "top_v" in part:
            for key_n, idx_n, slot_n, val_n, ctx_n, size in (
                    ("top_v", "top_i", "top_slot", None, "top_ctx", self.cfg.top_k),
                    ("rnd_key", "rnd_i", "rnd_slot", "rnd_v", "rnd_ctx", self.cfg.n_candidates)):
                if size == 0:
                    continue
                L, _, N = t[key_n].shape
                for li in range(L):  # one layer at a time: the context payloads are the bulk of the state
                    key, idx, src = merge_topk(t[key_n][li], t[idx_n][li], part[key_n][li], part[idx_n][li], size)
                    # Rank row of cat([ours, theirs]) -> storage slot of cat([our slots, their slots]).
                    slots = torch.cat([t[slot_n][li], part[slot_n][li] + size], 0)  # (2 size, N)
                    store = torch.gather(slots, 0, src)  # (size, N)
                    ctx = torch.cat([t[ctx_n][li], part[ctx_n][li]], 0)  # (2 size, N, C) in storage order
                    t[ctx_n][li] = torch.gather(ctx, 0, store.unsqueeze(2).expand(-1, -1, ctx.shape[2]))
                    if val_n is not None:
                        t[val_n][li] = torch.gather(torch.cat([t[val_n][li], part[val_n][li]], 0), 0, store)
                    t[key_n][li], t[idx_n][li] = key, idx
                t[slot_n] = torch.arange(size, device=self.device).view(1, size, 1).expand(L, size, N).clone()
            self._relayout()
        for ci in range(self.n_corpora):
            p = f"s{ci}."
            if p + "n" not in part:
                continue
            n_a, n_b = t[p + "n"], part[p + "n"].to(t[p + "n"].dtype)  # (L,)
            n = n_a + n_b
            w_b = torch.where(n > 0, n_b / n.clamp(min=1), 0).unsqueeze(1)  # (L, 1)
            delta = part[p + "mean"] - t[p + "mean"]
            t[p + "m2"] = t[p + "m2"] + part[p + "m2"] + delta.square() * (n_a.unsqueeze(1) * w_b)
            t[p + "mean"] = t[p + "mean"] + delta * w_b
            t[p + "n"] = n
            t[p + "sum_abs"] = t[p + "sum_abs"] + part[p + "sum_abs"]
            t[p + "n_pos"] = t[p + "n_pos"] + part[p + "n_pos"]
            t[p + "max"] = torch.maximum(t[p + "max"], part[p + "max"])
            for li, n_li in enumerate(n.tolist()):  # the host mirror of the counts (once per merge)
                self._count[(ci, li)] = float(n_li)

    # -- results --

    def host_tensors(self) -> dict[str, Tensor]:
        """The running state on the CPU (for checkpoints and the final records)."""
        return {k: v.detach().cpu() for k, v in self.t.items()}

    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Replace the running state (from a checkpoint), on this state's device."""
        for k in self.t:
            self.t[k] = tensors[k].to(self.device)
        self._relayout()
        self._count = {}
        for k, v in tensors.items():
            if k.startswith("s") and k.endswith(".n"):
                ci = int(k[1:-2])
                for li, n in enumerate(v.tolist()):
                    self._count[(ci, li)] = float(n)

    def stats(self, ci: int) -> NeuronStats:
        t = {k: v.cpu() for k, v in self.t.items() if k.startswith(f"s{ci}.")}
        n = t[f"s{ci}.n"].unsqueeze(1).expand(-1, self.N)
        safe = n.clamp(min=1)
        return NeuronStats(count=n.clone(), mean=t[f"s{ci}.mean"].clone(),
                           mean_abs=t[f"s{ci}.sum_abs"] / safe,
                           std=(t[f"s{ci}.m2"] / safe).clamp(min=0).sqrt(),
                           max=t[f"s{ci}.max"].clone(), freq_pos=t[f"s{ci}.n_pos"] / safe)


def _random_candidates(cfg: CollectConfig, first_window: int, n_windows: int, n_pos: int, n_layers: int,
                       d_mlp: int) -> tuple[Tensor, Tensor]:
    """Seeded candidate rows and keys for windows ``first_window ..``: the same whatever the batching."""
    rows, keys = [], []
    s = min(SAMPLES_PER_WINDOW, n_pos)
    for b in range(n_windows):
        g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + first_window + b) % (2**63))
        rows.append(torch.sort(torch.randperm(n_pos, generator=g)[:s]).values + b * n_pos)
        keys.append(torch.rand(n_layers, s, d_mlp, generator=g))
    return torch.cat(rows), torch.cat(keys, dim=1)  # (cand,), (layer, cand, neuron)


# ---- the collection run -----------------------------------------------------------------------------


def _config_hash(cfg: CollectConfig, model_name: str, d_mlp: int, corpora: dict[str, TokenWindows]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT_VERSION, "config": asdict(cfg), "model": model_name, "d_mlp": d_mlp},
                        sort_keys=True).encode())
    for name, tw in corpora.items():
        h.update(json.dumps([name, list(tw.tokens.shape)]).encode())
        h.update(tw.tokens.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def _as_windows(model: Any, corpus: Any, name: str, n_ctx: int, seed: int, max_doc_tokens: int | None) -> Any:
    """Texts (a list of strings) or a source name become windows exactly as ``snip collect`` makes them."""
    from .corpus import load_corpus, make_windows

    if isinstance(corpus, str):
        return load_corpus(model, corpus, n_ctx=n_ctx, seed=seed, name=name, max_doc_tokens=max_doc_tokens)
    if isinstance(corpus, (list, tuple)) and corpus and all(isinstance(t, str) for t in corpus):
        return make_windows(model, list(corpus), n_ctx=n_ctx, seed=seed, name=name, max_doc_tokens=max_doc_tokens)
    return corpus


def _normalise_corpus(corpus: Any, model: Any = None, n_ctx: int = 128, seed: int = 0,
                      max_doc_tokens: int | None = 512) -> dict[str, TokenWindows]:
    if isinstance(corpus, (str, list, tuple)):
        name = corpus if isinstance(corpus, str) else RECORDS_CORPUS
        corpus = _as_windows(model, corpus, name, n_ctx, seed, max_doc_tokens)
    if isinstance(corpus, TokenWindows):
        corpora = {corpus.name or RECORDS_CORPUS: corpus}
    elif isinstance(corpus, dict) and corpus:
        corpora = {name: _as_windows(model, tw, name, n_ctx, seed, max_doc_tokens) for name, tw in corpus.items()}
        for name, tw in corpora.items():
            if not isinstance(tw, TokenWindows):
                raise ValueError(f"corpus {name!r} is a {type(tw).__name__}, not TokenWindows, texts or a source; "
                                 "give a list of strings, a source name, or windows from "
                                 "snip_lens.corpus.load_corpus / make_windows")
    else:
        raise ValueError(f"corpus must be TokenWindows, a non-empty list of strings, a source name, or a non-empty "
                         f"dict of name -> one of those; got "
                         f"{type(corpus).__name__ if not isinstance(corpus, dict) else 'an empty dict'}")
    for name, tw in corpora.items():
        if len(tw) == 0 or tw.n_ctx == 0:
            raise ValueError(f"corpus {name!r} is empty (0 windows); give it at least one window of text")
    return corpora


def _token_vocab(model: Any, windows: Tensor) -> dict[int, str]:
    ids = torch.unique(windows).tolist()
    tok = backend(model).tokenizer
    return {int(i): tok.decode([int(i)]) for i in ids}


FITTED_TOP_K = CollectionConfig.top_k_records
"""Top records per neuron of SNIP's pipeline (``snip collect``, ``CollectionConfig.top_k_records``): the
evidence match reads the peaks of all of them (``InputEvidence.peaks``)."""


def collect(model: Any, corpus: TokenWindows | list[str] | str | dict[str, Any], *, layers: list[int] | None = None,
            top_k: int | None = 20, context: tuple[int, int] = (32, 8), n_random: int = 5, batch_size: int = 8,
            out_dir: str | os.PathLike | None = None, progress: bool = True, seed: int = 0,
            shard_windows: int = 256, overwrite: bool = False,
            on_shard: Callable[[int], None] | None = None, n_ctx: int = 128,
            max_doc_tokens: int | None = 512, executor: Any = None) -> ActivationRecords:
    """Stream ``corpus`` through ``model`` and collect neuron records and statistics (see module docstring).

    ``top_k``: top records per neuron; None: :data:`FITTED_TOP_K`, or every text token of a smaller records
    corpus (an explicit ``top_k`` above the corpus's size is an error).

    ``corpus``: one ``TokenWindows``, or a dict name -> ``TokenWindows`` whose statistics are kept per
    name; a list of strings (documents) or a source name (``"prose"``, a file, a directory; see
    ``snip_lens.corpus``) may stand for any ``TokenWindows``: it is cut into windows of ``n_ctx`` tokens with
    ``max_doc_tokens`` and ``seed`` as ``snip collect`` does (a list alone is named ``"records"``). The
    records (top-k and random) come from the corpus named ``"records"`` if there is one, else from the
    first. ``layers``: layer indices (default all). ``out_dir``: directory for resumable checkpoints (one
    per ``shard_windows`` windows) and the final ``ActivationRecords``; a directory that holds results of
    a different config or corpus is refused unless ``overwrite``. ``on_shard`` is called with the number
    of windows done after each checkpoint. ``executor`` (such as
    :class:`snip_lens.sharding.RayExecutor`) collects the shards of ``shard_windows`` windows elsewhere and
    hands back their states, which are merged here; ``model`` then only supplies names, sizes and the
    vocabulary.
    """
    n_model_layers, d_mlp = models.n_layers(model), models.d_mlp(model)
    if layers is None:
        layers = list(range(n_model_layers))
    bad = [layer for layer in layers if not 0 <= int(layer) < n_model_layers]
    if bad:
        raise ValueError(f"layers {bad} are out of range: the model has {n_model_layers} layers "
                         f"(0..{n_model_layers - 1})")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be a positive number of windows; got {batch_size}")
    if shard_windows <= 0:
        raise ValueError(f"shard_windows must be a positive number of windows; got {shard_windows}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int | np.integer) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer number of records per neuron (or None: "
                         f"{FITTED_TOP_K}, fewer for a small corpus); got {top_k!r}")
    corpora = _normalise_corpus(corpus, model, n_ctx, seed, max_doc_tokens)
    names = list(corpora)
    rec_name = RECORDS_CORPUS if RECORDS_CORPUS in corpora else names[0]
    rec_ci = names.index(rec_name)
    be = backend(model)
    vocab_size = be.d_vocab
    for name, tw in corpora.items():
        lo, hi = int(tw.tokens.min()), int(tw.tokens.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"corpus {name!r} holds token ids {lo}..{hi}, outside the model's vocabulary "
                             f"0..{vocab_size - 1}; tokenise it with this model's tokenizer")
    bos_id = be.tokenizer.bos_token_id if models.prepends_bos(model) else None
    n_text = corpora[rec_name].n_tokens - len(_bos_rows(corpora[rec_name].tokens, bos_id))
    if top_k is None:
        top_k = max(1, min(FITTED_TOP_K, n_text))
        if top_k < FITTED_TOP_K:
            logger.info("records corpus %r has %d text tokens: keeping %d top records per neuron, not %d",
                        rec_name, n_text, top_k, FITTED_TOP_K)
    top_k = int(top_k)
    if n_text < top_k:
        raise ValueError(f"records corpus {rec_name!r} has {n_text} text tokens (BOS not counted), fewer than "
                         f"top_k={top_k}; use more text or a smaller top_k")
    cfg = CollectConfig(layers=tuple(sorted(set(int(x) for x in layers))), top_k=top_k,
                        context=(int(context[0]), int(context[1])), n_random=n_random, seed=seed)
    mname = models.model_name(model)
    chash = _config_hash(cfg, mname, d_mlp, corpora)

    device = be.device
    state = _State(cfg, d_mlp, names, device)
    start_ci, start_w = 0, 0
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        done = _prepare_out_dir(out, chash, overwrite)
        if done is not None:
            return done
    if executor is not None:
        executor.run(model, state, corpora, rec_ci=rec_ci, config_hash=chash, batch_size=batch_size,
                     shard_windows=shard_windows, out_dir=out, overwrite=overwrite, progress=progress,
                     on_shard=on_shard)
        result = _finish(state, cfg, mname, d_mlp, names, rec_ci, corpora, chash, model, out)
        executor.finished(out)
        return result
    if out is not None:
        ck = out / CHECKPOINT
        if ck.exists():
            start_ci, start_w = _load_checkpoint(ck, chash, state)
            n_done = sum(len(corpora[n]) for n in names[:start_ci]) + start_w
            logger.warning("resuming from %d of %d windows (checkpoint in %s)", n_done,
                           sum(len(corpora[n]) for n in names), out)

    total = sum(tw.n_tokens for tw in corpora.values())
    done_tokens = sum(corpora[n].n_tokens for n in names[:start_ci]) + start_w * corpora[names[start_ci]].n_ctx
    bar = tqdm(total=total, initial=done_tokens, unit="tok", unit_scale=True, desc="collect",
               disable=not progress, dynamic_ncols=True)

    def after_shard(ci: int, shard_end: int) -> None:
        if out is not None:
            _save_checkpoint(out / CHECKPOINT, chash, state, ci, shard_end)
        if on_shard is not None:
            on_shard(shard_end)

    todo = []
    for ci in range(start_ci, len(names)):
        tw = corpora[names[ci]]
        w0 = start_w if ci == start_ci else 0
        for shard_start in range((w0 // shard_windows) * shard_windows, len(tw), shard_windows):
            shard_end = min(shard_start + shard_windows, len(tw))
            todo.append((ci, tw.tokens[shard_start:shard_end], shard_start, max(shard_start, w0)))
    try:
        _collect_windows(model, state, rec_ci, todo, batch_size, bar.update, after_shard)
    finally:
        bar.close()
    return _finish(state, cfg, mname, d_mlp, names, rec_ci, corpora, chash, model, out)


def _finish(state: _State, cfg: CollectConfig, mname: str, d_mlp: int, names: list[str], rec_ci: int,
            corpora: dict[str, TokenWindows], chash: str, model: Any, out: Path | None) -> ActivationRecords:
    """Turn the final running state into ``ActivationRecords``; with ``out``, save them and drop the checkpoint."""
    rec_name = names[rec_ci]
    result = _finalise(state, cfg, mname, d_mlp, names, rec_ci, corpora[rec_name], chash, model)
    if out is not None:
        result.save(out)
        (out / CHECKPOINT).unlink(missing_ok=True)
        atomic_write_text(out / "config.json", json.dumps(
            {"config": asdict(cfg), "model": mname, "corpora": {n: list(corpora[n].tokens.shape) for n in names},
             "records_corpus": rec_name, "config_hash": chash}, indent=2))
    return result


def _collect_windows(model: Any, state: _State, rec_ci: int, todo: list[tuple[int, Tensor, int, int]],
                     batch_size: int, progress: Callable[[int], Any] | None,
                     after_shard: Callable[[int, int], None] | None) -> None:
    """Run shards of windows through ``model`` and reduce their activations into ``state``.

    Each ``todo`` item is ``(corpus index, the shard's windows, index of its first window in its corpus,
    first window to run)``; the last differs from the third only when resuming inside a shard. Batches
    never cross a shard, so a shard gives the same arithmetic wherever it runs. ``progress`` gets the
    tokens of each batch, ``after_shard`` the corpus index and end window of each finished shard.
    """
    cfg, d_mlp = state.cfg, state.N
    be = backend(model)
    device = state.device
    bos_id = be.tokenizer.bos_token_id if models.prepends_bos(model) else None
    L = len(cfg.layers)
    row_of = {layer: i for i, layer in enumerate(cfg.layers)}
    last = cfg.layers[-1]
    batch_ctx: dict[str, Any] = {}

    def make_hook(layer: int) -> Callable:
        li = row_of[layer]

        def hook(act: Tensor, hook: Any) -> None:
            x = act.detach().reshape(-1, d_mlp).float().contiguous()  # (batch*pos, neuron)
            ci = batch_ctx["ci"]
            # torch's thread count is the user's (it is process-wide): the hooks never change it.
            if state.fused:  # one pass of the CPU kernels; BOS rows are skipped inside
                state.update_batch(ci, li, x, batch_ctx["skip"], ci == rec_ci, batch_ctx["base"], batch_ctx["n_pos"],
                                   batch_ctx["rand_rows"], batch_ctx["rand_keys"])
                if layer == last:
                    raise _StopForward
                return None
            bos = batch_ctx["bos_rows"]
            if bos.numel():  # prepended BOS: out of the statistics, and -inf so that no top-k list takes it
                state.update_stats(ci, li, x[batch_ctx["text_rows"]])
                x = x.index_fill(0, bos, -math.inf)
            else:
                state.update_stats(ci, li, x)
            if ci == rec_ci:
                state.update_records(li, x, batch_ctx["base"], batch_ctx["n_pos"], batch_ctx["rand_rows"],
                                     batch_ctx["rand_keys"])
            if layer == last:
                raise _StopForward
            return None

        return hook

    fwd_hooks = [(models.hook_name(layer), make_hook(layer)) for layer in cfg.layers]
    # The hooks stay on for the whole run (not re-attached per batch); removed on exit, errors included.
    with torch.inference_mode(), be.temporary_hooks(fwd_hooks):
        for ci, tokens, first, w_from in todo:
            n_pos = int(tokens.shape[1])
            shard_end = first + int(tokens.shape[0])
            for b0 in range(w_from, shard_end, batch_size):
                b1 = min(b0 + batch_size, shard_end)
                bos = _bos_rows(tokens[b0 - first:b1 - first], bos_id)
                text_rows = _text_rows(b1 - b0, n_pos, bos)
                # Copied to the device once per batch, not once per layer.
                skip = np.zeros((b1 - b0) * n_pos, dtype=np.bool_)
                skip[bos.numpy()] = True
                batch_ctx.update(ci=ci, base=b0 * n_pos, n_pos=n_pos, rand_rows=None, rand_keys=None,
                                 bos_rows=bos.to(device), skip=skip,
                                 text_rows=None if text_rows is None else text_rows.to(device))
                if ci == rec_ci and cfg.n_random:
                    rows, keys = _random_candidates(cfg, b0, b1 - b0, n_pos, L, d_mlp)
                    if bos.numel():  # a BOS position is never a random record
                        usable = ~torch.isin(rows, bos)
                        rows, keys = rows[usable], keys[:, usable]
                    batch_ctx.update(rand_rows=rows.to(device), rand_keys=keys.to(device))
                _forward(be, tokens[b0 - first:b1 - first].to(device))
                if progress is not None:
                    progress((b1 - b0) * n_pos)
            if after_shard is not None:
                after_shard(ci, shard_end)


def _bos_rows(tokens: Int[Tensor, "window pos"], bos_id: int | None) -> Int[Tensor, " n"]:
    """Flat token rows (window * pos + 0) of the windows that start with a prepended BOS."""
    if bos_id is None:
        return torch.zeros(0, dtype=torch.long)
    return (tokens[:, 0] == bos_id).nonzero().squeeze(1) * tokens.shape[1]


def _text_rows(n_windows: int, n_pos: int, bos: Tensor) -> Tensor | None:
    """Flat token rows that are text (all but ``bos``); None when every row is."""
    if not bos.numel():
        return None
    keep = torch.ones(n_windows * n_pos, dtype=torch.bool)
    keep[bos] = False
    return keep.nonzero().squeeze(1)


def _forward(be: Any, tokens: Tensor) -> None:
    """Run the model until the last hooked layer raises ``_StopForward``."""
    try:
        be.run(tokens)
    except _StopForward:
        pass


def _prepare_out_dir(out: Path, chash: str, overwrite: bool) -> ActivationRecords | None:
    """Return finished results of this very config; refuse foreign results; clean stale temp files."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    meta_path, ck = out / META_FILE, out / CHECKPOINT
    if meta_path.exists():
        try:
            found = json.loads(meta_path.read_text(encoding="utf-8")).get("config_hash")
        except (OSError, json.JSONDecodeError):
            found = None
        if found == chash and not overwrite:
            logger.info("%s already holds these results; loading them", out)
            return ActivationRecords.load(out)
        if not overwrite:
            raise ValueError(f"{str(out)!r} already holds activation records of a different model, config or "
                             "corpus; choose another output directory or pass overwrite=True (--overwrite)")
        for f in (meta_path, out / TENSORS_FILE, out / "config.json"):
            f.unlink(missing_ok=True)
    if ck.exists():
        with safe_open(str(ck), framework="pt") as fh:
            found = (fh.metadata() or {}).get("config_hash")
        if found != chash:
            if not overwrite:
                raise ValueError(f"{str(out)!r} holds a checkpoint of a different model, config or corpus; "
                                 "choose another output directory or pass overwrite=True (--overwrite)")
            ck.unlink()
    return None


def _save_checkpoint(path: Path, chash: str, state: _State, ci: int, next_window: int) -> None:
    meta = {"config_hash": chash, "corpus": str(ci), "next_window": str(next_window)}
    _atomic_save_tensors({k: v.contiguous() for k, v in state.host_tensors().items()}, path, metadata=meta)


def _load_checkpoint(path: Path, chash: str, state: _State) -> tuple[int, int]:
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        if meta.get("config_hash") != chash:
            raise ValueError(f"checkpoint {str(path)!r} belongs to a different collection; delete it or use "
                             "another output directory")
        state.load_tensors({k: fh.get_tensor(k) for k in state.t})
    return int(meta["corpus"]), int(meta["next_window"])


def _gather_contexts(store: Float[Tensor, "layer slot neuron ctx"], slot: Int[Tensor, "layer rank neuron"],
                     ) -> Float[Tensor, "layer neuron rank ctx"]:
    """``store[l, slot[l, j, n], n]`` for every (l, n, j), with a prepended BOS (-inf in the hooks) as NaN."""
    L, S, N, C = store.shape
    r = slot.shape[1]
    base = (torch.arange(L).view(L, 1, 1) * S * N + torch.arange(N).view(1, N, 1))  # (L, N, 1)
    rows = base + slot.permute(0, 2, 1) * N  # (L, N, r): row of store.view(-1, C)
    out = store.reshape(-1, C).index_select(0, rows.reshape(-1)).view(L, N, r, C)
    return out.nan_to_num_(nan=math.nan, posinf=math.inf, neginf=math.nan)


def _finalise(state: _State, cfg: CollectConfig, mname: str, d_mlp: int, names: list[str], rec_ci: int,
              rec: TokenWindows, chash: str, model: Any) -> ActivationRecords:
    t, n_pos = state.host_tensors(), rec.n_ctx
    C = cfg.context_len
    L, R, N = len(cfg.layers), cfg.n_random, d_mlp
    top_i = t["top_i"]  # (layer, k, neuron)
    top_window = (top_i // n_pos).permute(0, 2, 1).contiguous()
    top_pos = (top_i % n_pos).permute(0, 2, 1).contiguous()
    # Payloads from storage slots straight into the (layer, neuron, rank, ctx) layout: one gather of whole
    # ctx rows per record (the context store is the bulk of the state).
    top_ctx = _gather_contexts(t["top_ctx"], t["top_slot"])
    if R:
        ri = t["rnd_i"]  # (layer, cand, neuron), ordered by key
        excluded = ri == NO_INDEX  # (layer, cand, neuron): empty, or one of the neuron's top records
        for j in range(top_i.shape[1]):  # k small comparisons, not one (layer, cand, k, neuron) tensor
            excluded |= ri == top_i[:, j:j + 1]
        order = torch.sort(excluded.to(torch.int8), dim=1, stable=True).indices[:, :R]  # usable first
        keep = ~torch.gather(excluded, 1, order)
        sel_i = torch.gather(ri, 1, order)
        slot = torch.gather(t["rnd_slot"], 1, order)  # (L, r, N) storage slot of each kept candidate
        r_val = torch.where(keep, torch.gather(t["rnd_v"], 1, slot), math.nan)
        r_ctx = _gather_contexts(t["rnd_ctx"], slot)  # (L, N, r, C)
        r_ctx.masked_fill_(~keep.permute(0, 2, 1).unsqueeze(3), math.nan)
        r_win = torch.where(keep, sel_i // n_pos, -1)
        r_pos = torch.where(keep, sel_i % n_pos, -1)
        r_val, r_win, r_pos = (v.permute(0, 2, 1).contiguous() for v in (r_val, r_win, r_pos))
    else:
        r_val = torch.zeros(L, N, 0)
        r_ctx = torch.zeros(L, N, 0, C)
        r_win = r_pos = torch.zeros(L, N, 0, dtype=torch.long)
    windows = rec.tokens.to(torch.int32).contiguous()
    return ActivationRecords(
        model_name=mname, layers=list(cfg.layers), d_mlp=d_mlp, top_k=cfg.top_k, context=cfg.context,
        records_corpus=names[rec_ci],
        top_values=t["top_v"].permute(0, 2, 1).contiguous(), top_window=top_window, top_pos=top_pos,
        top_context=top_ctx, random_values=r_val, random_window=r_win, random_pos=r_pos, random_context=r_ctx,
        windows=windows, vocab=_token_vocab(model, windows), stats={n: state.stats(i) for i, n in enumerate(names)},
        config_hash=chash, n_layers=models.n_layers(model))
