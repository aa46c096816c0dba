"""Artifacts that cross stage boundaries of the SNIP pipeline.

Each is a plain dataclass; tensors travel in safetensors files and records in JSON, never pickle.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


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

    @property
    def ok(self) -> bool:
        """True when there is a usable explanation."""
        return self.error is None and bool(self.explanation)

    def to_json(self) -> dict:
        return {"layer": self.neuron.layer, "index": self.neuron.index, "explanation": self.explanation,
                "score": self.score, "source": self.source, "error": self.error}

    @classmethod
    def from_json(cls, d: dict) -> "NeuronExplanation":
        return cls(NeuronId(int(d["layer"]), int(d["index"])), d.get("explanation"), d.get("score"),
                   d.get("source", ""), d.get("error"))


@dataclass
class DatasetConcepts:
    """The concepts that matter in a forget dataset (SNIP step 2)."""

    concepts: list[str]
    """De-duplicated concept phrases."""
    source: str = ""
    """How they were obtained (LLM model name, or the offline distinctive-words fallback)."""

    FORMAT = "snip_lens.concepts"
    """Value of the ``format`` key of a saved concepts file."""
    VERSION = 1
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

    def to_json(self) -> dict:
        """The saved form: ``{"format", "version", "concepts", "source"}``."""
        return {"format": self.FORMAT, "version": self.VERSION, "concepts": list(self.concepts),
                "source": self.source}

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
        return cls(list(d["concepts"]), str(d.get("source", "")))

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
