"""Offline output-centric explainer: a description of what a neuron writes, from its VocabProj evidence.

The sentence names the tokens whose next-token logits the neuron raises most and those it lowers most
("raises the next tokens 'X', 'Y' and 'Z' and lowers 'A' and 'B'"), as read from the weights by
:mod:`snip_lens.explain.vocabproj`. No corpus and no rule for any language or domain.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..types import NeuronEvidence, NeuronExplanation, NeuronId, OutputEvidence
from .input import _join, clean_token, show_token
from .vocabproj import VocabProjection

SOURCE = "offline-output"


def _distinct(tokens: list[str], n: int) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for t in tokens:
        key = clean_token(t).lower() or t
        if key not in seen:
            seen.add(key)
            out.append(show_token(t))
        if len(out) == n:
            break
    return out


def describe_output(ev: OutputEvidence, *, n_promoted: int = 5, n_suppressed: int = 3) -> str:
    """One sentence: "raises the next tokens 'X', 'Y' and 'Z' and lowers 'A' and 'B'"."""
    pro = _distinct([t.token for t in ev.promoted], n_promoted)
    sup = _distinct([t.token for t in ev.suppressed], n_suppressed)
    text = f"raises the next token {pro[0]}" if len(pro) == 1 else f"raises the next tokens {_join(pro)}"
    if sup:
        text += f" and lowers {_join(sup)}"
    return text


class OfflineOutputExplainer:
    """Output-centric explanations from a :class:`VocabProjection` (weights only, no LLM)."""

    def __init__(self, projection: VocabProjection, *, n_promoted: int = 5, n_suppressed: int = 3) -> None:
        self.projection = projection
        self.n_promoted = n_promoted
        """Promoted tokens named in the sentence (all ``k`` stay in the evidence)."""
        self.n_suppressed = n_suppressed
        """Suppressed tokens named in the sentence."""

    def explain_one(self, neuron: NeuronId) -> NeuronExplanation:
        ev = self.projection.evidence(neuron)
        return NeuronExplanation(neuron, describe_output(ev, n_promoted=self.n_promoted,
                                                         n_suppressed=self.n_suppressed),
                                 source=SOURCE, kind="output", evidence=NeuronEvidence(output=ev))

    def __call__(self, neurons: Iterable[NeuronId], *, progress: bool = True) -> list[NeuronExplanation]:
        from tqdm.auto import tqdm

        return [self.explain_one(n) for n in tqdm(neurons, desc="explaining (offline output)",
                                                  disable=not progress)]
