"""Offline explanation quality in the manner of EleutherAI's delphi embedding scorer.

An explanation is good when it is closer, in embedding space, to the windows where its neuron fires than
to windows where it does not. Per neuron: embed the explanation, its top-activating windows (positives)
and its random windows (negatives), and report the AUROC of ``cos(explanation, window)`` separating the
two (0.5 = chance, 1 = every top window closer than every random one). Window texts are embedded once
for all neurons (and cached by the embedder when it caches).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..types import ActivationRecord, NeuronExplanation
from .base import QualityResult, iter_neuron_records

logger = logging.getLogger(__name__)


def auroc(pos: Sequence[float], neg: Sequence[float]) -> float:
    """Area under the ROC curve of scores ``pos`` (label 1) against ``neg`` (label 0); ties count half."""
    p = np.asarray(pos, dtype=np.float64)
    n = np.asarray(neg, dtype=np.float64)
    if len(p) == 0 or len(n) == 0:
        raise ValueError(f"AUROC needs positives and negatives, got {len(p)} and {len(n)}")
    greater = (p[:, None] > n[None, :]).sum()
    ties = (p[:, None] == n[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(p) * len(n)))


def window_text(record: ActivationRecord) -> str:
    """A record's window as plain text."""
    return "".join(record.tokens)


class EmbeddingScorer:
    """AUROC of explanation-to-window cosine, top windows against random windows (delphi's embedding scorer)."""

    name = "embedding"
    chance = 0.5

    def __init__(self, embedder: Any, *, n_top: int = 5, n_random: int = 5) -> None:
        if n_top < 1 or n_random < 1:
            raise ValueError(f"n_top and n_random must be >= 1, got {n_top} and {n_random}")
        self.embedder = embedder
        """Any object with ``embed(texts) -> [n, d]``."""
        self.n_top = n_top
        """Top windows per neuron (positives)."""
        self.n_random = n_random
        """Random windows per neuron (negatives)."""

    def __call__(self, explanations: Sequence[NeuronExplanation], records: Any) -> list[QualityResult]:
        from ..embed import normalize_rows

        usable = [e for e in explanations if e.ok]
        recs = iter_neuron_records(records, [e.neuron for e in usable])
        texts: dict[str, int] = {}
        plan = []
        for e in usable:
            r = recs.get(e.neuron)
            pos = [window_text(x) for x in (r.top if r else [])[: self.n_top] if x.tokens]
            neg = [window_text(x) for x in (r.random if r else [])[: self.n_random] if x.tokens]
            for t in pos + neg:
                texts.setdefault(t, len(texts))
            plan.append((e, pos, neg))
        out = [QualityResult(e.neuron, self.name, None, error=f"no usable explanation: {e.error or 'empty'}")
               for e in explanations if not e.ok]
        if not plan:
            return out
        expl_vecs = normalize_rows(self.embedder.embed([e.explanation for e, _, _ in plan]))
        win_vecs = normalize_rows(self.embedder.embed(list(texts))) if texts else np.zeros((0, expl_vecs.shape[1]))
        for (e, pos, neg), v in zip(plan, expl_vecs):
            if not pos or not neg:
                out.append(QualityResult(e.neuron, self.name, None,
                                         error=f"needs top and random windows, has {len(pos)} and {len(neg)} "
                                               "(collect with n_random > 0)"))
                continue
            sp = win_vecs[[texts[t] for t in pos]] @ v
            sn = win_vecs[[texts[t] for t in neg]] @ v
            out.append(QualityResult(e.neuron, self.name, auroc(sp, sn),
                                     details={"n_top": len(pos), "n_random": len(neg),
                                              "mean_cos_top": round(float(sp.mean()), 6),
                                              "mean_cos_random": round(float(sn.mean()), 6)}))
        return out
