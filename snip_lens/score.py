"""Importance of each neuron for the forget set, and free-text search over neurons (SNIP step 3).

SNIP scores neuron ``n_ij`` by ``s(n_ij) = max_{e' in E'} cos(e_ij, e')``: the largest cosine similarity
between the embedding of its explanation and the embedding of any forget-set concept. With unit vectors
that is a maximum inner product, which FAISS answers exactly with an ``IndexFlatIP`` over the concept
vectors (k=1 per neuron gives the maximum and the concept that attains it).

That is ``match="embedding"``, the paper's score. The default, ``match="evidence"``, matches what an
explanation quotes rather than how its sentence reads: every explanation keeps the evidence it was written
from, and every set of concepts keeps the forget set's term weights (each term's log-odds z-score, forget
set vs reference; see :func:`snip_lens.concepts.concept_terms`). A neuron's evidence score is the mean of
up to three readings, each a share-weighted mean of its evidence tokens' term weights: the peak tokens of
its top windows (weighted by peak activation), the tokens carrying its activity on typical text (every
token of its random windows, weighted by |activation|; ``InputEvidence.active``), and its top promoted
tokens (output evidence). Input explanations have the first two, output the third, both all three. A token
weighs the larger of its two readings: as words (``concepts.terms``) and as the model's own token
(``concepts.token_terms``, which weigh the word pieces no word count knows). Why: a sentence embedding of
"the tokens 'X' and 'Y' after 'A'" is mostly the embedding of its template, so its cosine to a concept says
little about X and Y; and a neuron's strongest windows say what it can do, its random windows what it
does on the forget set's kind of text, which is what pruning it takes away. The readings and the records
behind them (64 top and 32 random windows per neuron) were chosen on pilot splits of the code and German
scenarios (documents split with seed 1; ``benchmarks/snip_pilot.py``, results in
``benchmarks/results/snip_pilot_records*.json``); the benchmark's figures are in
``benchmarks/results/unlearning.md``. ``match="both"`` adds the evidence score and the cosine, each
standardised over the scored neurons.

Neurons without a usable explanation get ``-inf``: they rank after every scored neuron and are never
picked by ``top_k`` (NaN is not used, so comparisons and sorting stay well defined).

:class:`NeuronIndex` is the other direction: an index over the neurons' explanation vectors (flat by
default, HNSW or IVF for millions of neurons) that answers "which neurons are about QUERY?".
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from ._io import atomic_write_text
from .types import DatasetConcepts, NeuronExplanation, NeuronId

logger = logging.getLogger(__name__)

MISSING_SCORE = float("-inf")
"""Score of a neuron without an explanation."""


SELECTIONS = ("global", "per-layer")
"""How ``top_k`` picks k neurons: the k best overall, or k/L best in each of the L layers."""


@dataclass
class CutTies:
    """How many neurons were tied at the cut of one top-k selection (what decided who was pruned)."""

    tied: int = 0
    """Neurons sharing the score of the last selected neuron, when that group straddles the cut (else 0)."""
    selected: int = 0
    """Of those, how many were selected."""
    tied_after_secondary: int = 0
    """Of ``tied``, how many also share the last selected neuron's secondary signal, when that group still
    straddles the cut: the seeded random draw chose among these (0: the secondary signal decided)."""

    def to_json(self) -> dict:
        return {"tied": self.tied, "selected": self.selected, "tied_after_secondary": self.tied_after_secondary}


@dataclass
class NeuronScores:
    """A score per MLP neuron (higher = more important for the forget set = pruned first).

    Order: by ``scores``; among equal scores by the declared ``secondary`` signal (higher first); among
    neurons equal on both, by a random draw seeded with ``tie_seed``. Never by (layer, index), which would
    favour low layers and low indices whenever a method gives many neurons the same score.
    """

    scores: Float[Tensor, "layer neuron"]
    """Score of neuron ``(layer, index)``; ``-inf`` for neurons the method could not score."""
    method: str
    """Which method produced them (``"snip"``, ``"random"``, ``"activation"``, ...)."""
    labels: dict[NeuronId, str] = field(default_factory=dict)
    """Why a neuron scored: for SNIP the concept that matched its explanation best."""
    model_name: str = ""
    """Name of the model the neurons belong to."""
    secondary: Float[Tensor, "layer neuron"] | None = None
    """Tie-break among equal scores (higher first; non-finite = no value, after those with one); None: none."""
    secondary_name: str = ""
    """What ``secondary`` measures, e.g. ``"explanation score"`` (shown in results and reports)."""
    tie_seed: int = 0
    """Seed of the random draw that orders neurons equal on score and secondary."""
    score_name: str = ""
    """What ``scores`` measures, when the method can measure it more than one way (SNIP: ``"cosine"``,
    ``"evidence score"``, ``"evidence + cosine (standardised)"``); shown in reports."""

    def __post_init__(self) -> None:
        if not isinstance(self.scores, Tensor):
            self.scores = torch.as_tensor(np.asarray(self.scores))
        if self.scores.ndim != 2:
            raise ValueError(f"NeuronScores.scores must be [layer, neuron], got shape {tuple(self.scores.shape)}")
        if not self.scores.is_floating_point():
            self.scores = self.scores.double()
        if self.secondary is not None:
            if not isinstance(self.secondary, Tensor):
                self.secondary = torch.as_tensor(np.asarray(self.secondary))
            self.secondary = self.secondary.double()
            if tuple(self.secondary.shape) != tuple(self.scores.shape):
                raise ValueError(f"NeuronScores.secondary has shape {tuple(self.secondary.shape)}, not the scores' "
                                 f"{tuple(self.scores.shape)}: give one tie-break value per neuron")
            if not self.secondary_name:
                raise ValueError("NeuronScores.secondary needs a secondary_name saying what it measures")
        if not isinstance(self.tie_seed, int | np.integer):
            raise ValueError(f"NeuronScores.tie_seed must be an integer, got {self.tie_seed!r}")

    @property
    def n_layers(self) -> int:
        return int(self.scores.shape[0])

    @property
    def d_mlp(self) -> int:
        return int(self.scores.shape[1])

    @property
    def tie_break(self) -> str:
        """The declared tie-break, in words."""
        second = f"{self.secondary_name}, then " if self.secondary is not None else ""
        return f"{second}a random draw (seed {self.tie_seed})"

    def _keys(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(primary, secondary, random) sort keys, each ascending = pruned first; non-finite primary last."""
        flat = self.scores.detach().double().flatten().cpu().numpy()
        key = np.where(np.isfinite(flat), -flat, np.inf)
        if self.secondary is not None:
            sec = self.secondary.detach().double().flatten().cpu().numpy()
            sec_key = np.where(np.isfinite(sec), -sec, np.inf)
        else:
            sec_key = np.zeros_like(key)
        rand = np.random.default_rng(int(self.tie_seed)).permutation(flat.size)
        return key, sec_key, rand

    def _order(self) -> np.ndarray:
        """Flat indices, best first: by score, then secondary, then the seeded random draw; non-finite last."""
        key, sec_key, rand = self._keys()
        # lexsort: last key is primary.
        return np.lexsort((rand, sec_key, key))

    def rank(self) -> Int[Tensor, "layer neuron"]:
        """Rank of every neuron: 0 for the one pruned first; unscored neurons after all scored ones."""
        order = self._order()
        ranks = np.empty(order.size, dtype=np.int64)
        ranks[order] = np.arange(order.size)
        return torch.from_numpy(ranks).view(self.n_layers, self.d_mlp)

    def top_k(self, k: int, select: str = "global") -> list[NeuronId]:
        """The ``k`` best-scored neurons, best first; only neurons with a score.

        ``select="global"``: the k best overall. ``select="per-layer"``: ``k // n_layers`` best in every
        layer, and the ``k % n_layers`` left over to the layers whose next neuron ranks best overall, so
        that every layer loses the same number of neurons (give or take one) and an exported model can be
        compacted fully (a Hugging Face config holds one MLP width for all layers).
        """
        if select not in SELECTIONS:
            raise ValueError(f"unknown selection {select!r}; choose 'global' (k best overall) or 'per-layer' "
                             "(k/L best in each layer)")
        n_scored = int(torch.isfinite(self.scores).sum())
        if not isinstance(k, int | np.integer) or k < 0:
            raise ValueError(f"k must be a non-negative number of neurons, got {k!r}")
        if k > n_scored:
            raise ValueError(f"k={k} but method {self.method!r} scored only {n_scored} of "
                             f"{self.scores.numel()} neurons (the rest have no explanation); lower k")
        order = self._order()
        if select == "global":
            chosen = order[:k]
        else:
            chosen = self._per_layer(order, int(k))
        return [NeuronId(int(i) // self.d_mlp, int(i) % self.d_mlp) for i in chosen]

    def _per_layer(self, order: np.ndarray, k: int) -> np.ndarray:
        base, extra = divmod(k, self.n_layers)
        finite = np.isfinite(self.scores.detach().double().flatten().cpu().numpy())
        per_layer = finite.reshape(self.n_layers, self.d_mlp).sum(1)
        short = [layer for layer in range(self.n_layers) if per_layer[layer] < base]
        if short or int((per_layer > base).sum()) < extra:
            raise ValueError(f"per-layer selection of k={k} needs {base} scored neurons in every layer (and one more "
                             f"in {extra} layers), but method {self.method!r} scored only "
                             f"{', '.join(f'L{layer}: {int(per_layer[layer])}' for layer in short[:8]) or 'fewer'}; "
                             "lower k or use select='global'")
        layer_of = order // self.d_mlp
        # position of each neuron within its own layer, in the global order
        by_layer = np.argsort(layer_of, kind="stable")
        counts = np.bincount(layer_of, minlength=self.n_layers)
        pos = np.empty(order.size, dtype=np.int64)
        pos[by_layer] = np.arange(order.size) - np.repeat(np.cumsum(counts) - counts, counts)
        ok = finite[order]
        take = ok & (pos < base)
        if extra:
            next_up = np.flatnonzero(ok & (pos == base))[:extra]
            take[next_up] = True
        return order[take]

    def cut_ties(self, k: int, select: str = "global") -> CutTies:
        """How many neurons were tied at the cut of ``top_k(k, select)`` (per layer for ``per-layer``)."""
        chosen = self.top_k(k, select)
        if not chosen:
            return CutTies()
        key, sec_key, _ = self._keys()
        sel = np.zeros(key.size, dtype=bool)
        sel[[n.layer * self.d_mlp + n.index for n in chosen]] = True
        pools = [np.arange(key.size)] if select == "global" else [
            np.arange(layer * self.d_mlp, (layer + 1) * self.d_mlp) for layer in range(self.n_layers)]
        out = CutTies()
        for pool in pools:
            inside = pool[sel[pool]]
            if inside.size == 0:
                continue
            last = inside[np.lexsort((sec_key[inside], key[inside]))[-1]]  # the worst selected neuron
            group = pool[key[pool] == key[last]]
            n_in = int(sel[group].sum())
            if group.size > n_in:  # the tie straddles the cut: the tie-break decided
                out.tied += int(group.size)
                out.selected += n_in
                both = group[sec_key[group] == sec_key[last]]
                if both.size > int(sel[both].sum()):  # the secondary did not decide either: the draw did
                    out.tied_after_secondary += int(both.size)
        return out

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``path`` (safetensors, the scores) and ``path`` with suffix ``.json`` (method, labels).

        A path without the ``.safetensors`` suffix gets it. Both writes are atomic. Returns the path.
        """
        from safetensors.torch import save_file

        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_name(path.name + ".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"method": self.method, "model_name": self.model_name,
                "shape": [self.n_layers, self.d_mlp], "missing_score": "-inf",
                "secondary_name": self.secondary_name if self.secondary is not None else "",
                "tie_seed": int(self.tie_seed), "score_name": self.score_name,
                "labels": [{"layer": n.layer, "index": n.index, "label": lab}
                           for n, lab in sorted(self.labels.items())]}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            tensors = {"scores": self.scores.detach().cpu().contiguous()}
            if self.secondary is not None:
                tensors["secondary"] = self.secondary.detach().cpu().contiguous()
            save_file(tensors, tmp,
                      metadata={"method": self.method, "model_name": self.model_name})
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=1, ensure_ascii=False))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, n_layers: int | None = None,
             d_mlp: int | None = None) -> "NeuronScores":
        """Read what :meth:`save` wrote; with ``n_layers``/``d_mlp``, check they fit that model."""
        from safetensors import safe_open

        path = Path(path)
        if path.suffix != ".safetensors" and not path.exists():
            path = path.with_name(path.name + ".safetensors")
        if not path.is_file():
            raise FileNotFoundError(f"no scores file {path}; write one with `snip score --out {path}`")
        with safe_open(str(path), framework="pt") as f:
            if "scores" not in f.keys():
                raise ValueError(f"{path} holds no 'scores' tensor (keys: {list(f.keys())}); not a NeuronScores file")
            scores = f.get_tensor("scores")
            secondary = f.get_tensor("secondary") if "secondary" in f.keys() else None
            st_meta = f.metadata() or {}
        meta_path = path.with_suffix(".json")
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        out = cls(scores=scores, method=meta.get("method", st_meta.get("method", "")),
                  labels={NeuronId(int(d["layer"]), int(d["index"])): d["label"] for d in meta.get("labels", [])},
                  model_name=meta.get("model_name", st_meta.get("model_name", "")), secondary=secondary,
                  secondary_name=meta.get("secondary_name", "") or ("secondary" if secondary is not None else ""),
                  tie_seed=int(meta.get("tie_seed", 0)), score_name=str(meta.get("score_name", "")))
        want = (n_layers if n_layers is not None else out.n_layers, d_mlp if d_mlp is not None else out.d_mlp)
        if (out.n_layers, out.d_mlp) != want:
            raise ValueError(f"{path} scores a model of {out.n_layers} layers x {out.d_mlp} neurons "
                             f"({out.model_name or 'unknown model'}), not {want[0]} x {want[1]}: "
                             "it was made for another model; recompute the scores for this one")
        return out



def max_cosine_reference(neuron_vecs: Float[np.ndarray, "n d"], concept_vecs: Float[np.ndarray, "c d"]
                         ) -> tuple[Float[np.ndarray, " n"], Int[np.ndarray, " n"]]:
    """Brute force: for each row of ``neuron_vecs`` the max cosine to any concept, and which concept."""
    a = np.asarray(neuron_vecs, dtype=np.float64)
    b = np.asarray(concept_vecs, dtype=np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-300)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-300)
    sims = a @ b.T  # (n, c)
    idx = sims.argmax(axis=1)
    return sims[np.arange(len(a)), idx], idx


def max_cosine(neuron_vecs: Float[np.ndarray, "n d"], concept_vecs: Float[np.ndarray, "c d"], *,
               chunk: int = 262_144, threads: int | None = None
               ) -> tuple[Float[np.ndarray, " n"], Int[np.ndarray, " n"]]:
    """For each neuron vector the max cosine to any concept and its index: FAISS ``IndexFlatIP``, k=1.

    Both inputs are L2-normalised here (float32), so inner products are cosines. Neurons are searched in
    chunks to bound the ``[chunk, n_concepts]`` similarity block FAISS computes. ``threads`` sets FAISS's
    OpenMP threads for this call (restored after); 1 is faster when other processes share the cores,
    because OpenMP threads spin while they wait.
    """
    import faiss

    from .embed import normalize_rows

    q = normalize_rows(neuron_vecs)
    c = normalize_rows(concept_vecs)
    if q.shape[1] != c.shape[1]:
        raise ValueError(f"neuron vectors have width {q.shape[1]} but concept vectors {c.shape[1]}: "
                         "embed both with the same embedder")
    if len(c) == 0:
        raise ValueError("no concept vectors to compare with; give at least one concept")
    index = faiss.IndexFlatIP(c.shape[1])
    index.add(np.ascontiguousarray(c))
    sims = np.empty(len(q), dtype=np.float32)
    idx = np.empty(len(q), dtype=np.int64)
    before = faiss.omp_get_max_threads()
    if threads is not None:
        faiss.omp_set_num_threads(max(1, int(threads)))
    try:
        for s in range(0, len(q), chunk):
            d, i = index.search(np.ascontiguousarray(q[s:s + chunk]), 1)
            sims[s:s + chunk], idx[s:s + chunk] = d[:, 0], i[:, 0]
    finally:
        faiss.omp_set_num_threads(before)
    return sims, idx


def _usable(explanations: list[NeuronExplanation], n_layers: int, d_mlp: int) -> list[NeuronExplanation]:
    """The explanations that can be scored, checked against the model's shape (last one wins per neuron)."""
    if n_layers < 1 or d_mlp < 1:
        raise ValueError(f"n_layers and d_mlp must be >= 1, got {n_layers} and {d_mlp}")
    by_neuron: dict[NeuronId, NeuronExplanation] = {}
    n_dup = 0
    for e in explanations:
        if not isinstance(e, NeuronExplanation):
            raise ValueError(f"expected NeuronExplanation items, got {type(e).__name__}: {e!r:.80}")
        if not (0 <= e.neuron.layer < n_layers and 0 <= e.neuron.index < d_mlp):
            raise ValueError(f"explanation for neuron {e.neuron} is outside the model's shape ({n_layers} layers "
                             f"x {d_mlp} neurons): were the explanations made for another model?")
        if e.ok:
            n_dup += e.neuron in by_neuron
            by_neuron[e.neuron] = e
    if n_dup:
        logger.warning("%d neurons have more than one explanation; the last one of each is used", n_dup)
    return [by_neuron[n] for n in sorted(by_neuron)]


MATCHES = ("evidence", "embedding", "both")
"""How :func:`score_neurons` matches explanations with concepts (see the module doc)."""

EVIDENCE_OUTPUT_TOKENS = 12
"""Promoted tokens of output evidence that the evidence match reads."""


def _term_weight(token: str, terms: dict[str, float], cache: dict[str, float],
                 token_terms: dict[str, float] | None = None) -> float:
    """A token's weight: the larger of its two readings, as words (the largest weight among its word terms;
    a token such as '):' holds two) and as itself among ``token_terms`` (the model's tokens counted; a token
    written without a leading space also as its word-initial form, since input evidence merges the two);
    either reading alone where the other has none; 0 for a token with no known term (whitespace, a term
    neither corpus used twice).

    Each reading sees what the other misses: word terms pool a word's forms (' self', 'self', 'Self') into
    one steadier count but give a word piece (a suffix, a stem) nothing; token terms weigh the pieces.
    """
    hit = cache.get(token)
    if hit is None:
        from .concepts import term_pieces

        words = [terms[t] for t in term_pieces(token) if t in terms]
        known = [max(words)] if words else []
        if token_terms:
            # Input evidence keys a token without its leading space (' The' and 'The' are one entry there),
            # so such a key reads as either model token: written as it is, or word-initial.
            forms = (token,) if token.startswith(" ") else (token, " " + token)
            known += [token_terms[f] for f in forms if f in token_terms]
        hit = cache[token] = max(known) if known else 0.0
    return hit


def _quoted(text: str) -> list[str]:
    import re

    return re.findall(r"'([^']{1,40})'|\"([^\"]{1,40})\"", text)


def _evidence_items(explanation: NeuronExplanation) -> list[list[tuple[str, float]]]:
    """The (token, weight) lists the evidence match reads, one per kind of evidence (see evidence_score)."""
    ev = explanation.evidence
    sources: list[list[tuple[str, float]]] = []
    if ev is not None and ev.input is not None:
        sources.append([(t.token, t.weight) for t in (ev.input.peaks or ev.input.top_tokens)])
        if ev.input.active:
            sources.append([(t.token, t.weight) for t in ev.input.active])
    if ev is not None and ev.output is not None:
        sources.append([(t.token, 1.0) for t in ev.output.promoted[:EVIDENCE_OUTPUT_TOKENS]])
    if not sources:
        text = explanation.explanation or ""
        quoted = [a or b for a, b in _quoted(text)]
        sources.append([(q, 1.0) for q in quoted] or [(w, 1.0) for w in text.split()])
    return sources


def evidence_score(explanation: NeuronExplanation, terms: dict[str, float], cache: dict[str, float] | None = None,
                   token_terms: dict[str, float] | None = None) -> tuple[float, str]:
    """(evidence score, the evidence token that weighs most) of one explanation against the term weights.

    Each reading is a share-weighted mean of token weights: the peak tokens of its top windows (the
    strongest tokens when an older file has no peaks), the tokens carrying its activity on typical text
    (``InputEvidence.active``, when present), the first :data:`EVIDENCE_OUTPUT_TOKENS` promoted tokens of
    its output evidence (each alike); the score is the mean of the readings its explanation has (input: the
    first two, output: the third, both: all three). An explanation without
    typed evidence (imported, or text only) is read by the tokens it quotes ('X' or "X"), else by its words.
    A token's weight is the larger of its word-term and its ``token_terms`` weight (:func:`_term_weight`);
    ``cache`` must be used with one pair of weight maps only.
    """
    cache = {} if cache is None else cache
    parts: list[float] = []
    best: tuple[float, str] = (float("-inf"), "")
    for items in _evidence_items(explanation):
        total = sum(w for _, w in items)
        if not items or total <= 0:
            continue
        vals = [(_term_weight(tok, terms, cache, token_terms), tok, w) for tok, w in items]
        parts.append(sum(v * w for v, _, w in vals) / total)
        top = max(vals, key=lambda x: x[0] * x[2])
        if top[0] * top[2] > best[0]:
            best = (top[0] * top[2], f"{top[1].strip() or top[1]!r} (term weight {top[0]:+.1f})")
    if not parts:
        return 0.0, ""
    return float(sum(parts) / len(parts)), best[1]


SECONDARY_SIGNAL = "mean cosine to all concepts"
"""SNIP's declared tie-break: among neurons with the same max cosine, the one closer to the forget set's
concepts on average ranks first (then a seeded random draw, in :class:`NeuronScores`)."""


EVIDENCE_SECONDARY = "max cosine to any concept"
"""Tie-break of the evidence match: the paper's score (with an embedder), else :data:`EVIDENCE_SPREAD`."""

EVIDENCE_SPREAD = "largest term weight among the evidence"


def score_neurons(explanations: list[NeuronExplanation], concepts: DatasetConcepts, embedder: Any, *,
                  n_layers: int, d_mlp: int, model_name: str = "", quality: str | None = None,
                  tie_seed: int = 0, match: str = "embedding") -> NeuronScores:
    """SNIP importance per neuron (step 3): how well its explanation matches the forget set's concepts.

    ``match="embedding"`` (the paper): the max cosine between its explanation's embedding and any concept's.
    ``match="evidence"``: :func:`evidence_score` against ``concepts.terms`` and ``concepts.token_terms``
    (``embedder`` may be None; with
    one, the max cosine breaks ties). ``match="both"``: the two standardised and added. The sweep and the
    CLI default to ``"evidence"``; this function keeps the paper's score as its default.

    Neurons without a usable explanation (failed, empty) score ``-inf``. ``labels`` holds, per scored
    neuron, the concept that gave its score. Ties are broken by :data:`SECONDARY_SIGNAL` (the scores'
    ``secondary``), then by a random draw seeded with ``tie_seed``. A concept equal to an explanation
    raises (circular scoring; see :func:`snip_lens.concepts.check_concepts_independent`).

    ``quality`` names an explanation quality score (``"embedding"``, ``"simulator"``; see
    :mod:`snip_lens.quality`) to weight by: ``score = max cosine x weight``, the weight being the quality
    rescaled so that chance is 0 and perfect 1 (clipped to [0, 1]); explanations without that score get
    weight 0 (score 0), so they rank after every explanation with a useful one.
    """
    from .concepts import check_concepts_independent

    if match not in MATCHES:
        raise ValueError(f"match must be one of {', '.join(MATCHES)}, got {match!r} (CLI --match evidence)")
    usable = _usable(list(explanations), n_layers, d_mlp)
    if not usable:
        raise ValueError(f"none of the {len(list(explanations))} explanations is usable (all failed or empty); "
                         "explain the neurons first (snip explain) or import explanations")
    if not concepts.concepts:
        raise ValueError("no concepts to score against; extract them first (snip concepts)")
    check_concepts_independent(concepts, usable)
    if match != "embedding" and not concepts.terms:
        raise ValueError(f"match={match!r} needs the forget set's term weights, and these concepts "
                         f"({concepts.source or 'no source'}) have none (a concepts file written before format "
                         "version 2): extract them again (snip concepts), or use --match embedding")
    if match != "evidence" and embedder is None:
        raise ValueError(f"match={match!r} compares embeddings: give an embedder (CLI --embedder local)")
    ev_labels: list[str] = []
    if match != "embedding":
        cache: dict[str, float] = {}  # token -> weight, shared by the score and its tie-break
        pairs = [evidence_score(e, concepts.terms, cache, concepts.token_terms) for e in usable]
        ev_values = np.array([v for v, _ in pairs], dtype=np.float64)
        ev_labels = [lab for _, lab in pairs]
    if embedder is not None:
        concept_vecs = embedder.embed(list(concepts.concepts))
        neuron_vecs = embedder.embed([e.explanation for e in usable])
        sims, idx = max_cosine(neuron_vecs, concept_vecs)
        from .embed import normalize_rows

        mean_sim = (normalize_rows(neuron_vecs) @ normalize_rows(concept_vecs).mean(axis=0)).astype(np.float64)
    if match == "embedding":
        values = sims.astype(np.float64)
        secondary_values, secondary_name = mean_sim, SECONDARY_SIGNAL
        labels_list = [concepts.concepts[int(i)] for i in idx]
    elif match == "evidence":
        values = ev_values
        if embedder is not None:
            secondary_values, secondary_name = sims.astype(np.float64), EVIDENCE_SECONDARY
        else:
            secondary_values = np.array([_evidence_spread(e, concepts, cache) for e in usable])
            secondary_name = EVIDENCE_SPREAD
        labels_list = ev_labels
    else:
        values = _zscore(ev_values) + _zscore(sims.astype(np.float64))
        secondary_values, secondary_name = ev_values, "evidence score"
        labels_list = [f"{lab}; concept {concepts.concepts[int(i)]!r}" for lab, i in zip(ev_labels, idx)]
    if quality is not None:
        from .quality import quality_weight

        w = np.array([quality_weight(quality, e.quality.get(quality)) for e in usable])
        n_missing = sum(quality not in e.quality for e in usable)
        if n_missing == len(usable):
            raise ValueError(f"no explanation has a {quality!r} quality score; score them first "
                             "(snip_lens.quality.score_explanations) or drop the quality weight")
        if n_missing:
            logger.info("%d of %d explanations have no %r quality score: weight 0", n_missing, len(usable), quality)
        values = values * w
    scores = torch.full((n_layers, d_mlp), MISSING_SCORE, dtype=torch.float64)
    secondary = torch.full((n_layers, d_mlp), MISSING_SCORE, dtype=torch.float64)
    layers = torch.tensor([e.neuron.layer for e in usable])
    index = torch.tensor([e.neuron.index for e in usable])
    scores[layers, index] = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64))
    secondary[layers, index] = torch.from_numpy(np.ascontiguousarray(secondary_values, dtype=np.float64))
    labels = {e.neuron: lab for e, lab in zip(usable, labels_list)}
    logger.info("scored %d of %d neurons against %d concepts by %s match (max %.3f)", len(usable),
                n_layers * d_mlp, len(concepts.concepts), match, float(values.max()))
    return NeuronScores(scores=scores, method="snip", labels=labels, model_name=model_name,
                        secondary=secondary, secondary_name=secondary_name, tie_seed=tie_seed,
                        score_name=SCORE_NAMES[match])


SCORE_NAMES = {"embedding": "cosine", "evidence": "evidence score", "both": "evidence + cosine (standardised)"}
"""``NeuronScores.score_name`` of each match."""


def _zscore(x: np.ndarray) -> np.ndarray:
    sd = float(x.std())
    return (x - x.mean()) / sd if sd > 0 else x - x.mean()


def _evidence_spread(explanation: NeuronExplanation, concepts: DatasetConcepts, cache: dict[str, float]) -> float:
    return max((_term_weight(tok, concepts.terms, cache, concepts.token_terms)
                for items in _evidence_items(explanation) for tok, _ in items), default=0.0)


IndexKind = Literal["auto", "flat", "hnsw", "ivf"]


IVF_TRAIN_PER_LIST = 64
"""Training vectors per IVF list: k-means cost grows with the sample, and faiss asks for >= 39 per list."""


def build_faiss_index(vecs: Float[np.ndarray, "n d"], kind: IndexKind = "auto", *,
                      approximate_above: int = 1_000_000, hnsw_m: int = 32, ivf_lists: int | None = None,
                      seed: int = 0) -> tuple[Any, str]:
    """An inner-product FAISS index over unit rows ``vecs``, chosen by size; returns ``(index, kind)``.

    ``"auto"``: exact ``IndexFlatIP`` up to ``approximate_above`` rows, IVF beyond: at 2.3M x 384 on two
    cores (``benchmarks/score.py``) a flat query took 2.9 s, IVF built in 55 s and HNSW (``hnsw_m``
    links) in 41 minutes, both answering in about 1 ms.
    ``"ivf"``: ``4 sqrt(n)`` lists (at most 4096) trained on a seeded sample of ``IVF_TRAIN_PER_LIST``
    rows per list, searched with ``nprobe`` 16. ``benchmarks/score.py`` measures all three at 2.3M rows.
    """
    import faiss

    if kind not in ("auto", "flat", "hnsw", "ivf"):
        raise ValueError(f"index kind must be 'auto', 'flat', 'hnsw' or 'ivf', got {kind!r}")
    vecs = np.ascontiguousarray(vecs, dtype=np.float32)
    n, d = vecs.shape
    if kind == "auto":
        kind = "flat" if n <= approximate_above else "ivf"
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = 64
    else:
        nlist = ivf_lists or max(1, min(4096, int(4 * np.sqrt(n))))
        nlist = min(nlist, n)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        n_train = min(n, IVF_TRAIN_PER_LIST * nlist)
        sample = np.sort(np.random.default_rng(seed).choice(n, n_train, replace=False)) if n_train < n else None
        index.train(vecs if sample is None else vecs[sample])
        index.nprobe = min(nlist, 16)
    index.add(vecs)
    return index, kind


def explanations_digest(explanations: list[NeuronExplanation]) -> str:
    """sha256 of what a ``NeuronIndex`` is built from: every usable (neuron, explanation), last one per neuron."""
    import hashlib

    by_neuron = {e.neuron: e.explanation for e in explanations if e.ok}
    payload = json.dumps([[n.layer, n.index, by_neuron[n]] for n in sorted(by_neuron)], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class NeuronIndex:
    """Neurons searchable by what their explanations say: a FAISS inner-product index over their vectors."""

    def __init__(self, index: Any, neurons: list[NeuronId], explanations: list[str], embedder: Any = None, *,
                 embedder_name: str = "", kind: str = "flat", digest: str = "") -> None:
        if index.ntotal != len(neurons) or len(neurons) != len(explanations):
            raise ValueError(f"index holds {index.ntotal} vectors for {len(neurons)} neurons and "
                             f"{len(explanations)} explanations; they must match")
        self.index = index
        self.neurons = neurons
        self.explanations = explanations
        self.embedder = embedder
        self.embedder_name = embedder_name or getattr(embedder, "name", "")
        self.kind = kind
        self.digest = digest
        """``explanations_digest`` of the explanations it was built from ('' for an index saved without one)."""

    def __len__(self) -> int:
        return len(self.neurons)

    @classmethod
    def build(cls, explanations: list[NeuronExplanation], embedder: Any, *, kind: IndexKind = "auto",
              approximate_above: int = 1_000_000, hnsw_m: int = 32, ivf_lists: int | None = None) -> "NeuronIndex":
        """Embed the usable explanations and index them.

        ``kind="auto"`` is an exact flat index up to ``approximate_above`` neurons, IVF beyond
        (:func:`build_faiss_index`).
        """
        from .embed import normalize_rows

        if kind not in ("auto", "flat", "hnsw", "ivf"):
            raise ValueError(f"index kind must be 'auto', 'flat', 'hnsw' or 'ivf', got {kind!r}")
        usable = [e for e in explanations if e.ok]
        if not usable:
            raise ValueError(f"none of the {len(explanations)} explanations is usable; nothing to search")
        by_neuron = {e.neuron: e for e in usable}
        neurons = sorted(by_neuron)
        texts = [by_neuron[n].explanation for n in neurons]
        vecs = normalize_rows(embedder.embed(texts))
        index, kind = build_faiss_index(vecs, kind, approximate_above=approximate_above, hnsw_m=hnsw_m,
                                        ivf_lists=ivf_lists)
        logger.info("indexed %d neurons (%s, dim %d)", len(neurons), kind, index.d)
        return cls(index, neurons, texts, embedder, kind=kind, digest=explanations_digest(usable))

    def search(self, query: str, k: int = 10) -> list[tuple[NeuronId, float, str]]:
        """The ``k`` neurons whose explanations are most similar to ``query``: (neuron, cosine, explanation)."""
        if not isinstance(query, str) or not query.strip():
            raise ValueError(f"search query must be non-empty text, got {query!r}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if self.embedder is None:
            raise ValueError("this index has no embedder to embed the query; load it with NeuronIndex.load(path, "
                             "embedder)")
        q = self.embedder.embed([query])
        if q.shape[1] != self.index.d:
            raise ValueError(f"query vector has width {q.shape[1]} but the index holds width {self.index.d}: "
                             f"use the embedder the index was built with ({self.embedder_name!r})")
        sims, ids = self.index.search(np.ascontiguousarray(q, dtype=np.float32), min(k, len(self.neurons)))
        return [(self.neurons[int(i)], float(s), self.explanations[int(i)])
                for s, i in zip(sims[0], ids[0]) if i >= 0]

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``index.faiss`` and ``neurons.json`` (neurons, explanations, embedder name) atomically."""
        import faiss

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".index.", suffix=".tmp")
        os.close(fd)
        try:
            faiss.write_index(self.index, tmp)
            os.replace(tmp, directory / "index.faiss")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        meta = {"embedder": self.embedder_name, "kind": self.kind, "dim": int(self.index.d),
                "neurons": [[n.layer, n.index] for n in self.neurons], "explanations": self.explanations,
                "explanations_sha256": self.digest}
        atomic_write_text(directory / "neurons.json", json.dumps(meta, ensure_ascii=False))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike[str], embedder: Any = None) -> "NeuronIndex":
        """Read what :meth:`save` wrote; ``embedder`` must be the one it was built with (checked by name)."""
        import faiss

        directory = Path(directory)
        if not (directory / "index.faiss").is_file() or not (directory / "neurons.json").is_file():
            raise FileNotFoundError(f"{directory} holds no neuron index (index.faiss + neurons.json); build one "
                                    "with NeuronIndex.build(...).save(dir) or `snip search --index DIR`")
        meta = json.loads((directory / "neurons.json").read_text(encoding="utf-8"))
        if embedder is not None and meta.get("embedder") and embedder.name != meta["embedder"]:
            raise ValueError(f"index {directory} was built with embedder {meta['embedder']!r}, not {embedder.name!r}; "
                             "use the same embedder or rebuild the index")
        index = faiss.read_index(str(directory / "index.faiss"))
        return cls(index, [NeuronId(int(a), int(b)) for a, b in meta["neurons"]], meta["explanations"], embedder,
                   embedder_name=meta.get("embedder", ""), kind=meta.get("kind", "flat"),
                   digest=meta.get("explanations_sha256", ""))

    def built_from(self, explanations: list[NeuronExplanation]) -> bool:
        """Whether this index was built from exactly these explanations (False when it recorded no digest)."""
        return bool(self.digest) and self.digest == explanations_digest(explanations)
