"""Offline combined explainer: what a neuron reads and what it writes, in one sentence.

Gur-Arieh et al. (2025) found an ensemble of input- and output-centric descriptions best on both input
and output evaluations. Offline, the combination is the two descriptions joined: "the tokens 'X' and 'Y'
after 'A', in text with 'p'; raises the next tokens 'P' and 'Q' and lowers 'S'", with both kinds of
evidence kept.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..types import InputEvidence, NeuronEvidence, NeuronExplanation, NeuronRecords, OutputEvidence
from .input import describe_input, input_evidence
from .output import describe_output
from .vocabproj import VocabProjection

SOURCE = "offline-both"


def describe_both(inp: InputEvidence, out: OutputEvidence) -> str:
    """The input description, then the output description, separated by a semicolon."""
    return f"{describe_input(inp)}; {describe_output(out)}"


class OfflineCombinedExplainer:
    """Input- and output-centric evidence in one explanation (no LLM)."""

    def __init__(self, projection: VocabProjection, *, max_records: int = 10) -> None:
        self.projection = projection
        self.max_records = max_records
        """Top records read per neuron."""

    def explain_one(self, records: NeuronRecords) -> NeuronExplanation:
        out = self.projection.evidence(records.neuron)
        inp = input_evidence(records, max_records=self.max_records)
        if inp is None or not inp.top_tokens:
            # Without records the output evidence alone still describes the neuron.
            return NeuronExplanation(records.neuron, describe_output(out), source=SOURCE, kind="both",
                                     evidence=NeuronEvidence(output=out))
        return NeuronExplanation(records.neuron, describe_both(inp, out), source=SOURCE, kind="both",
                                 evidence=NeuronEvidence(input=inp, output=out))

    def __call__(self, records: Iterable[NeuronRecords], *, progress: bool = True) -> list[NeuronExplanation]:
        from tqdm.auto import tqdm

        return [self.explain_one(r) for r in tqdm(records, desc="explaining (offline both)", disable=not progress)]
