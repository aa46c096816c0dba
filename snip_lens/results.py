"""The typed schema of a sweep's ``results.json``: one :class:`SweepResults` holding one :class:`RunResult` per
(method, k), with a format version.

The JSON keys are those the report and the plots read (``model``, ``n_neurons``, ``baseline``, ``runs`` with
``method``, ``k``, ``k_percent``, ``forget``, ``retain``, ``extra``; ``timings_s``), plus ``version`` and
``explanations`` (how varied the explanations were). Keys a newer writer adds to a run are kept in
:attr:`RunResult.more` and written back unchanged, so reading and saving never drops a number.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._io import atomic_write_json

RESULTS_VERSION = 2
"""Version of the results layout (1: the untyped dict before it had a version)."""


@dataclass
class RunResult:
    """The metrics of one pruned model (or of the unpruned baseline, with ``method`` "baseline", ``k`` 0)."""

    method: str
    """Selection method (``snip_lens.select.METHODS``) or "baseline"."""
    k: int
    """Neurons pruned."""
    k_percent: float
    """``k`` as a percentage of all MLP neurons."""
    forget: dict[str, float]
    """Held-out forget-side metrics: ``loss``, ``top1``, ``top10``."""
    retain: dict[str, float]
    """Held-out retain-side metrics, same keys."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Further evaluations (``cbt_P_accuracy``, ``pct_toxic``, ...)."""
    more: dict[str, Any] = field(default_factory=dict)
    """Keys this schema does not name (kept so that no number is lost on a round trip)."""

    _KEYS = ("method", "k", "k_percent", "forget", "retain", "extra")

    def __post_init__(self) -> None:
        for side in ("forget", "retain"):
            m = getattr(self, side)
            if not isinstance(m, dict):
                raise ValueError(f"RunResult.{side} must be a dict of metrics, got {type(m).__name__}")
        if self.k < 0:
            raise ValueError(f"RunResult.k must be >= 0, got {self.k}")

    def to_json(self) -> dict[str, Any]:
        d = {"method": self.method, "k": self.k, "k_percent": self.k_percent, "forget": self.forget,
             "retain": self.retain, "extra": self.extra}
        return {**d, **{k: v for k, v in self.more.items() if k not in d}}

    @classmethod
    def from_json(cls, d: dict[str, Any], *, baseline: bool = False) -> "RunResult":
        if baseline:
            d = {"method": "baseline", "k": 0, "k_percent": 0.0, **d}
        missing = [k for k in ("forget", "retain") if k not in d]
        if missing:
            raise ValueError(f"a results run lacks {missing}; it has {sorted(d)}")
        return cls(method=str(d["method"]), k=int(d["k"]), k_percent=float(d.get("k_percent", 0.0)),
                   forget=dict(d["forget"]), retain=dict(d["retain"]), extra=dict(d.get("extra") or {}),
                   more={k: v for k, v in d.items() if k not in cls._KEYS})


@dataclass
class SweepResults:
    """Everything a sweep measured: the baseline and every (method, k) run."""

    model: str
    """Name of the subject model."""
    n_neurons: int
    """MLP neurons of the model (what percentages of k are of)."""
    baseline: RunResult
    """The unpruned model."""
    runs: list[RunResult] = field(default_factory=list)
    """One per (method, k), in the order they ran."""
    timings_s: dict[str, float] = field(default_factory=dict)
    """Seconds per stage."""
    explanations: dict[str, Any] | None = None
    """Variety of the explanations (``checks.ExplanationStats``), None when no method used explanations."""
    more: dict[str, Any] = field(default_factory=dict)
    """Top-level keys this schema does not name (kept on a round trip)."""
    version: int = RESULTS_VERSION
    """Layout version."""

    _KEYS = ("version", "model", "n_neurons", "baseline", "runs", "timings_s", "explanations")

    def to_json(self) -> dict[str, Any]:
        base = self.baseline.to_json()
        base = {k: v for k, v in base.items() if k not in ("method", "k", "k_percent")}
        d: dict[str, Any] = {"version": self.version, "model": self.model, "n_neurons": self.n_neurons,
                             "baseline": base, "runs": [r.to_json() for r in self.runs], "timings_s": self.timings_s}
        if self.explanations is not None:
            d["explanations"] = self.explanations
        return {**d, **{k: v for k, v in self.more.items() if k not in d}}

    @classmethod
    def from_json(cls, d: dict[str, Any], *, where: str = "results") -> "SweepResults":
        if not isinstance(d, dict) or "runs" not in d or "baseline" not in d:
            raise ValueError(f"{where} is not a sweep results file: expected an object with 'baseline' and 'runs'")
        version = int(d.get("version", 1))
        if version > RESULTS_VERSION:
            raise ValueError(f"{where} has results version {version}; this snip_lens reads up to "
                             f"{RESULTS_VERSION}: upgrade snip_lens")
        return cls(model=str(d.get("model", "")), n_neurons=int(d.get("n_neurons", 0)),
                   baseline=RunResult.from_json(d["baseline"], baseline=True),
                   runs=[RunResult.from_json(r) for r in d["runs"]], timings_s=dict(d.get("timings_s") or {}),
                   explanations=d.get("explanations"), version=RESULTS_VERSION,
                   more={k: v for k, v in d.items() if k not in cls._KEYS})

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``results.json`` atomically."""
        return atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "SweepResults":
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"results file {p} does not exist; run `snip run --out {p.parent}` first")
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ValueError(f"{p} is not JSON ({exc})") from None
        return cls.from_json(d, where=str(p))
