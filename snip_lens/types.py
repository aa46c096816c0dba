"""Artifacts that cross stage boundaries of the SNIP pipeline.

Each is a plain dataclass; tensors travel in safetensors files and records in JSON, never pickle.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


@dataclass(frozen=True, order=True)
class NeuronId:
    """One MLP neuron: the input of the MLP's output projection at ``blocks.{layer}.mlp.hook_post``."""

    layer: int
    """Transformer block index, from 0."""
    index: int
    """Neuron index inside the block's MLP, from 0 to ``d_mlp - 1``."""

    def __str__(self) -> str:
        return f"L{self.layer}/N{self.index}"

    @classmethod
    def parse(cls, text: str) -> "NeuronId":
        """Parse ``"L3/N17"`` or ``"3:17"`` or ``"3,17"``."""
        t = text.strip()
        try:
            if t.upper().startswith("L") and "/N" in t.upper():
                layer, index = t[1:].upper().split("/N")
            else:
                sep = ":" if ":" in t else ","
                layer, index = t.split(sep)
            return cls(int(layer), int(index))
        except ValueError:
            raise ValueError(
                f"cannot parse neuron {text!r}: write it as 'L<layer>/N<index>' (e.g. 'L3/N17') or '3:17'"
            ) from None


@dataclass
class ActivationRecord:
    """One token window and the neuron's activation on each of its tokens (what an explainer reads)."""

    tokens: list[str]
    """Decoded tokens of the window, in order."""
    activations: list[float]
    """The neuron's activation on each token (raw, unscaled); same length as ``tokens``."""
    document: int = -1
    """Index of the source window/document in the corpus the record came from (-1 if unknown)."""
    position: int = -1
    """Token position, inside the document, of the activation this record was chosen for."""

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.activations):
            raise ValueError(
                f"ActivationRecord has {len(self.tokens)} tokens but {len(self.activations)} activations; "
                "they must be the same length"
            )


@dataclass
class NeuronRecords:
    """Everything the explainer sees about one neuron."""

    neuron: NeuronId
    """Which neuron."""
    top: list[ActivationRecord]
    """Windows around the neuron's highest activations, strongest first."""
    random: list[ActivationRecord] = field(default_factory=list)
    """Windows around randomly chosen non-top tokens (the OpenAI explainer shows these too)."""

    @property
    def max_activation(self) -> float:
        """The largest activation over all top records (0 if there are none)."""
        return max((max(r.activations) for r in self.top if r.activations), default=0.0)


ExplanationKind = Literal["input", "output", "both"]
"""Which evidence an explanation rests on: what the neuron reads (its top-activating inputs), what it writes
(its effect on the output vocabulary), or both."""

EXPLANATION_KINDS: tuple[str, ...] = ("input", "output", "both")


@dataclass
class TokenWeight:
    """A token and a number attached to it (an activation share, a logit weight, a log-odds z-score)."""

    token: str
    """The token as decoded (leading space kept)."""
    weight: float
    """Its weight; the meaning is given by the list holding it (rounded to 6 decimals, as saved)."""

    def __post_init__(self) -> None:
        self.weight = round(float(self.weight), 6)

    def to_json(self) -> list:
        return [self.token, self.weight]

    @classmethod
    def from_json(cls, d: list) -> "TokenWeight":
        return cls(str(d[0]), float(d[1]))


def _tw(items: list) -> list[TokenWeight]:
    return [TokenWeight.from_json(x) for x in items or []]


@dataclass
class InputEvidence:
    """What a neuron reads: read from its top-activating windows (input-centric evidence)."""

    top_tokens: list[TokenWeight]
    """Tokens where it activates strongly (>= half its top activation), weight = share of that activation mass."""
    preceding: list[TokenWeight] = field(default_factory=list)
    """Tokens just before its peak activations, weight = share of top windows."""
    following: list[TokenWeight] = field(default_factory=list)
    """Tokens just after its peak activations, weight = share of top windows."""
    distinctive: list[TokenWeight] = field(default_factory=list)
    """Context tokens over-represented in its top windows against its random windows (log-odds z-score)."""
    contexts: list[str] = field(default_factory=list)
    """Text of a few top windows around the peak (the peak token in ``[[ ]]``)."""
    peaks: list[TokenWeight] = field(default_factory=list)
    """The token at the peak of every top window, weight = its share of the windows' summed peak activation
    (all of them, largest first; the sentence names only the strongest tokens). Files written before
    ``active`` existed weigh each window alike and read only the first ten."""
    active: list[TokenWeight] = field(default_factory=list)
    """What carries its activity on typical text: the tokens of its random windows (every token of them,
    not only the sampled one), weight = share of the |activation| summed over those windows; the largest
    :data:`snip_lens.explain.input.ACTIVE_TOKENS`, largest first. Empty without random records."""

    def to_json(self) -> dict:
        return {"top_tokens": [t.to_json() for t in self.top_tokens],
                "preceding": [t.to_json() for t in self.preceding],
                "following": [t.to_json() for t in self.following],
                "distinctive": [t.to_json() for t in self.distinctive], "contexts": list(self.contexts),
                "peaks": [t.to_json() for t in self.peaks], "active": [t.to_json() for t in self.active]}

    @classmethod
    def from_json(cls, d: dict) -> "InputEvidence":
        return cls(_tw(d.get("top_tokens")), _tw(d.get("preceding")), _tw(d.get("following")),
                   _tw(d.get("distinctive")), list(d.get("contexts") or []), _tw(d.get("peaks")),
                   _tw(d.get("active")))


@dataclass
class OutputEvidence:
    """What a neuron writes: the tokens its output promotes and suppresses (output-centric evidence)."""

    promoted: list[TokenWeight]
    """Tokens whose logit its typical strong activation raises most, weight = logit change per unit."""
    suppressed: list[TokenWeight]
    """Tokens whose logit it lowers most, weight = logit change per unit (negative)."""
    sign: int = 1
    """+1, or -1 when the neuron's typical strong activation is negative (the lists are then swapped)."""
    method: str = "vocabproj"
    """How the lists were obtained (``"vocabproj"``: weights through final norm and unembedding)."""

    def to_json(self) -> dict:
        return {"promoted": [t.to_json() for t in self.promoted],
                "suppressed": [t.to_json() for t in self.suppressed], "sign": self.sign, "method": self.method}

    @classmethod
    def from_json(cls, d: dict) -> "OutputEvidence":
        return cls(_tw(d.get("promoted")), _tw(d.get("suppressed")), int(d.get("sign", 1)),
                   str(d.get("method", "vocabproj")))


@dataclass
class NeuronEvidence:
    """The evidence an explanation was written from (kept with it, so a reader can check it)."""

    input: InputEvidence | None = None
    """Input-centric evidence, when used."""
    output: OutputEvidence | None = None
    """Output-centric evidence, when used."""

    def to_json(self) -> dict:
        return {"input": self.input.to_json() if self.input else None,
                "output": self.output.to_json() if self.output else None}

    @classmethod
    def from_json(cls, d: dict) -> "NeuronEvidence":
        return cls(InputEvidence.from_json(d["input"]) if d.get("input") else None,
                   OutputEvidence.from_json(d["output"]) if d.get("output") else None)


@dataclass
class NeuronExplanation:
    """A neuron's explanation in words, or the record of why none could be produced."""

    neuron: NeuronId
    """Which neuron."""
    explanation: str | None
    """One sentence (what follows "the main thing this neuron does is find"); None when it failed."""
    score: float | None = None
    """Quality of the explanation when known (e.g. OpenAI's ``ev_correlation_score``), else None."""
    source: str = ""
    """Who produced it: explainer kind and model, or the file it was imported from."""
    error: str | None = None
    """Why no explanation exists (API failure, unparseable answer); None on success."""
    kind: str = "input"
    """Which evidence it rests on: ``"input"``, ``"output"`` or ``"both"`` (:data:`ExplanationKind`)."""
    evidence: NeuronEvidence | None = None
    """The evidence it was written from (None for imported explanations)."""
    quality: dict[str, float] = field(default_factory=dict)
    """Quality scores by scorer name (``"embedding"``: AUROC, ``"simulator"``: correlation), when computed."""

    @property
    def ok(self) -> bool:
        """True when there is a usable explanation."""
        return self.error is None and bool(self.explanation)

    def to_json(self) -> dict:
        d = {"layer": self.neuron.layer, "index": self.neuron.index, "explanation": self.explanation,
             "score": self.score, "source": self.source, "error": self.error, "kind": self.kind}
        if self.evidence is not None:
            d["evidence"] = self.evidence.to_json()
        if self.quality:
            d["quality"] = {k: round(float(v), 6) for k, v in self.quality.items()}
        return d

    @classmethod
    def from_json(cls, d: dict) -> "NeuronExplanation":
        kind = d.get("kind", "input")
        if kind not in EXPLANATION_KINDS:
            raise ValueError(f"explanation kind {kind!r} is not one of {EXPLANATION_KINDS}")
        return cls(NeuronId(int(d["layer"]), int(d["index"])), d.get("explanation"), d.get("score"),
                   d.get("source", ""), d.get("error"), kind,
                   NeuronEvidence.from_json(d["evidence"]) if d.get("evidence") else None,
                   {str(k): float(v) for k, v in (d.get("quality") or {}).items()})


@dataclass
class DatasetConcepts:
    """The concepts that matter in a forget dataset (SNIP step 2)."""

    concepts: list[str]
    """De-duplicated concept phrases."""
    source: str = ""
    """How they were obtained (LLM model name, or the offline distinctive-words fallback)."""
    terms: dict[str, float] = field(default_factory=dict)
    """The forget set's term weights: each case-folded term's log-odds z-score, forget set vs reference
    (positive: the forget set uses it more); what SNIP's evidence match scores an explanation's evidence
    against (:func:`snip_lens.concepts.concept_terms`). Empty in files written before version 2."""
    token_terms: dict[str, float] = field(default_factory=dict)
    """The same statistic over one model's tokens (as decoded, leading space and case kept): the evidence match
    weighs a token by the larger of this and its word terms, since evidence is in model tokens
    (:func:`snip_lens.concepts.token_terms`). Empty when the concepts were made without a tokenizer, and in
    files written before version 3."""
    tokenizer: str = ""
    """The model whose tokens ``token_terms`` counts (its name as loaded)."""

    FORMAT = "snip_lens.concepts"
    """Value of the ``format`` key of a saved concepts file."""
    VERSION = 3
    """Version of the saved layout."""

    def __post_init__(self) -> None:
        if not isinstance(self.concepts, list) or not all(isinstance(c, str) for c in self.concepts):
            raise ValueError(f"DatasetConcepts.concepts must be a list of strings, got {self.concepts!r:.200}")
        if not self.concepts:
            raise ValueError("DatasetConcepts needs at least one concept; got an empty list")
        bad = [c for c in self.concepts if not c.strip() or any(ord(ch) < 32 and ch not in "\t\n" for ch in c)]
        if bad:
            raise ValueError(f"concepts {bad[:5]!r} are empty or hold control characters: concepts are text "
                             "(was the forget set a binary file?)")
        for name in ("terms", "token_terms"):
            d = getattr(self, name)
            if not isinstance(d, dict) or not all(
                    isinstance(k, str) and isinstance(v, (int, float)) and math.isfinite(v) for k, v in d.items()):
                raise ValueError(f"DatasetConcepts.{name} must map strings to finite numbers, got {d!r:.200}")
        if self.token_terms and not self.tokenizer:
            raise ValueError("DatasetConcepts.token_terms are given without the tokenizer they count: set "
                             "tokenizer to the model's name")

    def to_json(self) -> dict:
        """The saved form: ``{"format", "version", "concepts", "source", "terms", "token_terms", "tokenizer"}``."""
        return {"format": self.FORMAT, "version": self.VERSION, "concepts": list(self.concepts),
                "source": self.source, "terms": dict(self.terms), "token_terms": dict(self.token_terms),
                "tokenizer": self.tokenizer}

    @classmethod
    def from_json(cls, d: object, *, where: str = "concepts") -> "DatasetConcepts":
        """Read :meth:`to_json` output (also the older ``{"concepts", "source"}`` without format/version)."""
        if not isinstance(d, dict) or not isinstance(d.get("concepts"), list):
            raise ValueError(f"{where} is not a concepts file: expected a JSON object with a 'concepts' list "
                             "(write one with `snip concepts --out FILE`)")
        if d.get("format", cls.FORMAT) != cls.FORMAT:
            raise ValueError(f"{where} is a {d.get('format')!r} file, not a concepts file ({cls.FORMAT!r})")
        if int(d.get("version", 1)) > cls.VERSION:
            raise ValueError(f"{where} has concepts format version {d.get('version')}; this snip_lens reads up to "
                             f"{cls.VERSION}: upgrade snip_lens")
        maps = {}
        for name in ("terms", "token_terms"):
            m = d.get(name, {})
            if not isinstance(m, dict):
                raise ValueError(f"{where}: {name!r} must be an object mapping terms to weights, got "
                                 f"{type(m).__name__}")
            maps[name] = {str(k): float(v) for k, v in m.items()}
        return cls(list(d["concepts"]), str(d.get("source", "")), maps["terms"], maps["token_terms"],
                   str(d.get("tokenizer", "")))

    def save(self, path: "str | os.PathLike[str]") -> "Path":
        """Write the concepts as JSON, atomically; returns the path."""
        from ._io import atomic_write_json

        return atomic_write_json(path, self.to_json(), indent=1)

    @classmethod
    def load(cls, path: "str | os.PathLike[str]") -> "DatasetConcepts":
        """Read a file written by :meth:`save` (or by older versions of ``snip concepts``)."""
        import json
        from pathlib import Path

        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"concepts file {p} does not exist; create it with `snip concepts --out {p}`")
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{p} is not a concepts file ({exc}); expected JSON with a 'concepts' list") from None
        return cls.from_json(d, where=str(p))
