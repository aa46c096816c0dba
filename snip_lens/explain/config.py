"""Configuration of SNIP step 1 (explaining neurons)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..llm import LLMConfig
from ..types import EXPLANATION_KINDS, ExplanationKind


@dataclass
class ExplainConfig:
    """How to explain neurons (SNIP step 1)."""

    kind: Literal["openai", "local", "heuristic"] = "heuristic"
    """Who writes the sentence: an OpenAI-compatible server, an in-process chat model, or the offline
    (no-LLM) explainers ("heuristic", the historical name)."""
    explanations: ExplanationKind = "input"
    """Which evidence: "input" (top-activating windows), "output" (VocabProj: promoted and suppressed tokens,
    needs the model's weights) or "both"."""
    vocab_top: int = 12
    """Promoted and suppressed tokens kept per neuron for output-centric evidence."""
    llm: LLMConfig | None = None
    """Server, model and sampling for ``kind="openai"`` (required there)."""
    local_model: str = "smollm2-135m"
    """Chat model for ``kind="local"``: a built-in name, a saved HF directory, or a hub name."""
    local_device: str = "cpu"
    """Where the local chat model runs: cpu, cuda, cuda:N, mps or auto (CLI ``--device``)."""
    local_dtype: str = "float32"
    """The local chat model's dtype: float32, bfloat16 or float16, or fp32, bf16, fp16 (CLI ``--dtype``)."""
    local_max_new_tokens: int = 40
    """Tokens generated per explanation by the local model."""
    local_temperature: float = 0.0
    """0 = greedy decoding for the local model; > 0 samples with ``seed``."""
    seed: int = 0
    """Seed for sampled local decoding and for retry jitter."""
    max_records: int = 10
    """Top-activating windows shown per neuron in the prompt (and read by the heuristic)."""
    few_shot: bool = True
    """Prepend OpenAI's three ORIGINAL few-shot examples (turn off for small-context local models)."""
    max_explanation_chars: int = 300
    """Longer answers are rejected as failures."""
    cache_dir: str | None = None
    """Per-neuron answer cache for the LLM explainers (None: no cache)."""
    chunk_size: int = 2048
    """Neurons handled per batch of concurrent calls (bounds memory on 46k-neuron runs)."""

    def __post_init__(self) -> None:
        if self.kind not in ("openai", "local", "heuristic"):
            raise ValueError(f"ExplainConfig.kind must be 'openai', 'local' or 'heuristic', got {self.kind!r}")
        if self.explanations not in EXPLANATION_KINDS:
            raise ValueError(f"ExplainConfig.explanations must be one of {', '.join(EXPLANATION_KINDS)}, "
                             f"got {self.explanations!r}")
        if self.vocab_top < 1:
            raise ValueError(f"ExplainConfig.vocab_top must be >= 1, got {self.vocab_top}")
        if self.kind == "openai" and self.llm is None:
            raise ValueError("ExplainConfig(kind='openai') needs llm=LLMConfig(model=...) (e.g. model='gpt-4o-mini')")
        if self.max_records < 1:
            raise ValueError(f"ExplainConfig.max_records must be >= 1, got {self.max_records}")
        if self.max_explanation_chars < 10:
            raise ValueError(f"ExplainConfig.max_explanation_chars must be >= 10, got {self.max_explanation_chars}")
        from ..config import normalise_device, normalise_dtype

        self.local_device = normalise_device(self.local_device)
        self.local_dtype = normalise_dtype(self.local_dtype)
        if self.local_max_new_tokens < 1:
            raise ValueError(f"ExplainConfig.local_max_new_tokens must be >= 1, got {self.local_max_new_tokens}")
        if self.local_temperature < 0:
            raise ValueError(f"ExplainConfig.local_temperature must be >= 0, got {self.local_temperature}")
        if self.chunk_size < 1:
            raise ValueError(f"ExplainConfig.chunk_size must be >= 1, got {self.chunk_size}")

    @property
    def source(self) -> str:
        """The ``source`` written on each explanation."""
        if self.kind == "openai":
            assert self.llm is not None
            return f"openai:{self.llm.model}"
        if self.kind == "local":
            return f"local:{Path(self.local_model).name}"
        return f"offline-{self.explanations}"

    @property
    def needs_model(self) -> bool:
        """Output-centric evidence is read from the model's weights."""
        return self.explanations in ("output", "both")

    def to_json(self) -> dict[str, Any]:
        """Resolved config as JSON (no secrets: the LLM config holds only the key variable's name)."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "llm"}
        d["llm"] = self.llm.to_json() if self.llm is not None else None
        return d

