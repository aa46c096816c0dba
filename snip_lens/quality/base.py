"""The one interface of explanation quality scorers and their typed result."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..types import NeuronExplanation, NeuronId


@dataclass
class QualityResult:
    """How well one explanation predicts its neuron's activations, by one scorer."""

    neuron: NeuronId
    """Which neuron."""
    scorer: str
    """Which scorer (``"embedding"``, ``"simulator"``)."""
    score: float | None
    """The score (AUROC for ``embedding``, correlation for ``simulator``); None when it failed."""
    details: dict[str, Any] = field(default_factory=dict)
    """What the score was computed from (counts of windows, per-token predictions, ...)."""
    error: str | None = None
    """Why no score exists; None on success."""

    @property
    def ok(self) -> bool:
        return self.error is None and self.score is not None and math.isfinite(self.score)


class QualityScorer(Protocol):
    """Scores explanations against the neurons' activation records."""

    name: str
    """Key under which results are stored in ``NeuronExplanation.quality``."""
    chance: float
    """The score of an explanation that carries no information (0.5 for AUROC, 0 for a correlation)."""

    def __call__(self, explanations: Sequence[NeuronExplanation], records: Any) -> list[QualityResult]:
        ...


CHANCE = {"embedding": 0.5, "simulator": 0.0}
"""Chance level of each built-in scorer."""


def quality_weight(scorer: str, value: float | None) -> float:
    """A quality score as a weight in [0, 1]: 0 at (or below) chance, 1 for a perfect score; None gives 0."""
    if scorer not in CHANCE:
        raise ValueError(f"unknown quality scorer {scorer!r}; choose from {sorted(CHANCE)}")
    if value is None or not math.isfinite(value):
        return 0.0
    c = CHANCE[scorer]
    return max(0.0, min(1.0, (float(value) - c) / (1.0 - c)))


def attach(explanations: Sequence[NeuronExplanation], results: Sequence[QualityResult]) -> int:
    """Store each successful result in its explanation's ``quality`` dict; returns how many were stored."""
    by = {e.neuron: e for e in explanations}
    n = 0
    for r in results:
        if r.ok and r.neuron in by:
            by[r.neuron].quality[r.scorer] = float(r.score)  # type: ignore[arg-type]
            n += 1
    return n


def iter_neuron_records(records: Any, neurons: Sequence[NeuronId]) -> dict[NeuronId, Any]:
    """The :class:`NeuronRecords` of ``neurons`` from a records store or an iterable of NeuronRecords."""
    if hasattr(records, "neuron_records"):
        return {n: records.neuron_records(n) for n in neurons}
    wanted = set(neurons)
    return {r.neuron: r for r in records if r.neuron in wanted}
