"""Explanation quality: how well an explanation predicts its neuron's activations (issue: SNIP step 1's check).

One interface (:class:`~snip_lens.quality.base.QualityScorer`: ``scorer(explanations, records) ->
[QualityResult]``), one file per scorer:

- :mod:`.simulator`: OpenAI's all-at-once simulator through any OpenAI-compatible server (expected value
  over the logprobs of "0".."10", correlation with the true activations);
- :mod:`.embedding`: offline, delphi-style (AUROC of explanation-to-window cosine, top vs random windows).

:func:`score_explanations` runs a scorer and stores each score in ``NeuronExplanation.quality[name]``,
which is saved with the explanations, shown in the report and usable by SNIP as a weight
(``score_neurons(..., quality=name)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..types import NeuronExplanation, NeuronId
from .base import CHANCE, QualityResult, QualityScorer, attach, quality_weight
from .embedding import EmbeddingScorer, auroc
from .simulator import SimulatorScorer, build_simulation_prompt, expected_values


def score_explanations(explanations: Sequence[NeuronExplanation], records: Any, scorer: QualityScorer, *,
                       neurons: Sequence[NeuronId] | None = None) -> list[QualityResult]:
    """Score ``explanations`` (only those of ``neurons`` when given) and attach the scores to them."""
    todo = list(explanations) if neurons is None else [e for e in explanations if e.neuron in set(neurons)]
    results = scorer(todo, records)
    attach(explanations, results)
    return results


__all__ = ["QualityResult", "QualityScorer", "EmbeddingScorer", "SimulatorScorer", "score_explanations",
           "quality_weight", "attach", "auroc", "build_simulation_prompt", "expected_values", "CHANCE"]
