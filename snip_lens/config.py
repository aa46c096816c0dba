"""One run configuration composed of the stage configurations; the CLI's flags are derived from it.

A setting is declared once, as a field of the stage that uses it, with a docstring under the field. The
``snip run`` / ``snip demo`` flags are generated from those fields (name, type, choices, default and the
docstring as help text), so a field added to a stage config is a new flag at once and the CLI cannot drift
from the API. The other subcommands take the flags of the stages they run (``--model --device --dtype
--device-map`` wherever a model runs, ``--llm-model --base-url --api-key-env`` wherever an LLM is called).

Stages (fields of :class:`RunConfig`): ``model`` (which model, where, in which dtype), ``data`` (forget and
retain corpora), ``collect`` (activation records), ``llm`` (the OpenAI-compatible server every LLM stage
talks to), ``explain`` (step 1), ``concepts`` (step 2), ``embed`` (step 3's embedding model), ``select``
(methods and k) and ``evaluate`` (CBT, toxicity).

Validation lives in each ``__post_init__`` (no I/O there); :meth:`RunConfig.check_inputs` does the checks that
need the file system (paths exist, ``--out`` is not a file), so a bad argument fails before a model loads.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import logging
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

CONFIG_VERSION = 2
"""Version of the ``config.json`` layout written next to results (1: the flat ``SweepConfig``)."""

DTYPE_ALIASES = {"float32": "float32", "fp32": "float32", "f32": "float32", "float": "float32",
                 "bfloat16": "bfloat16", "bf16": "bfloat16",
                 "float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16"}
"""Accepted spellings of the model dtype, mapped to the torch name."""


def normalise_dtype(dtype: Any, flag: str = "--dtype") -> str:
    """The torch name (``float32``, ``bfloat16``, ``float16``) of a dtype spelling; ``ValueError`` otherwise."""
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in DTYPE_ALIASES:
        raise ValueError(f"dtype {dtype!r} is not supported (CLI {flag}); choose float32, bfloat16 or "
                         "float16 (or fp32, bf16, fp16)")
    return DTYPE_ALIASES[key]


def normalise_device(device: Any, flag: str = "--device") -> str:
    """A device name (``cpu``, ``cuda``, ``cuda:N``, ``mps``, ``xpu`` or ``auto``), lower case; checked without
    touching the hardware (whether it exists here is checked when the model loads)."""
    dev = str(device).strip().lower()
    base, _, idx = dev.partition(":")
    if base not in ("cpu", "cuda", "mps", "auto", "xpu") or (idx and not idx.isdigit()) or \
            (idx and base in ("cpu", "auto")):
        raise ValueError(f"device {device!r} is not a device (CLI {flag}); write cpu, cuda, cuda:1, mps or auto")
    return dev


def resolve_device(device: str) -> str:
    """``device`` with ``auto`` replaced by the device it means on this machine (the first GPU, else cpu)."""
    if device != "auto":
        return device
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


def _cli(flag: str | None = None, *, help: str | None = None, metavar: str | None = None,  # noqa: A002
         zero_is_none: bool = False, cli: bool = True) -> dict[str, Any]:
    """Field metadata for the CLI: another flag name, a help override, ``0`` meaning None, or no flag."""
    return {"flag": flag, "help": help, "metavar": metavar, "zero_is_none": zero_is_none, "cli": cli}


# ---- stage configs ----------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """The subject model: which one, on which device, in which dtype."""

    name: str = field(default="smollm2-135m", metadata=_cli("--model"))
    """Subject model: smollm2-135m, gemma3-270m, a Hugging Face name or a local model directory."""
    device: str = "cpu"
    """Where the model runs: cpu, cuda, cuda:N, mps or auto (the first GPU when there is one, else cpu)."""
    dtype: str = "float32"
    """Weights and activations dtype: float32, bfloat16 or float16 (aliases fp32, bf16, fp16)."""
    device_map: str | None = None
    """Spread the model over devices with accelerate's device_map (e.g. auto); none keeps it on --device."""
    batch_size: int = 8
    """Windows per forward pass (collection and evaluation); lower it when memory runs out."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"model name must be a non-empty string (CLI --model), got {self.name!r}")
        self.dtype = normalise_dtype(self.dtype)
        self.device = normalise_device(self.device)
        if isinstance(self.device_map, str) and self.device_map.lower() in ("", "none"):
            self.device_map = None
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch size must be a positive number of windows (CLI --batch-size), got "
                             f"{self.batch_size!r}")

    @property
    def torch_dtype(self) -> Any:
        """The ``torch.dtype`` of :attr:`dtype`."""
        import torch

        return getattr(torch, self.dtype)

    @property
    def resolved_device(self) -> str:
        """:attr:`device` with ``auto`` replaced by the device it means on this machine."""
        return resolve_device(self.device)

    def load(self) -> Any:
        """``models.load_model`` with this config's device, dtype and device map."""
        from . import models

        kwargs: dict[str, Any] = {"device": self.resolved_device, "dtype": self.torch_dtype}
        if self.device_map is not None:
            kwargs["device_map"] = self.device_map
        return models.load_model(self.name, **kwargs)


@dataclass
class DataConfig:
    """Where the forget and retain text comes from and how much of it each stage uses."""

    forget: str = "code"
    """Forget corpus: code (Python stdlib source), prose (pydoc topics), a FILE (.txt: one document, .jsonl: one
    per line), a DIR (every text file under it is one document), hf:NAME[:CONFIG], cbt:CONFIG[:FILE] or
    civil-toxic[:FILE]."""
    retain: str = "prose"
    """Retain corpus (what must keep working), same forms as --forget."""
    n_ctx: int = 128
    """Tokens per window (at most the model's context length)."""
    select_windows: int = 32
    """Windows per side used for selection (activation statistics and records)."""
    eval_windows: int = 16
    """Held-out windows per side used for evaluation."""
    eval_fraction: float = 0.3
    """Fraction of each corpus's documents held out for evaluation."""
    max_docs: int | None = None
    """Cap on FORGET documents, a seeded random draw (none: all; the paper's "100 randomly selected CBT training
    samples" is --forget cbt:P --max-docs 100). The retain side has its own cap."""
    retain_max_docs: int | None = None
    """Cap on RETAIN documents, a seeded random draw (none: all; hf: datasets take their first rows)."""
    max_doc_tokens: int | None = field(default=512, metadata=_cli(zero_is_none=True))
    """Tokens kept from the start of each document, so that a few long files cannot fill every window (0: whole
    documents)."""
    text_field: str = "text"
    """Field holding the text in JSONL files and Hugging Face datasets."""
    glob: str | None = None
    """Read only the files matching this pattern from a --forget/--retain DIR, e.g. '*.c' or 'docs/**/*.rst'
    (default: every text file; binary files are skipped)."""
    seed: int = 0
    """Seed of every random choice (document split, window order, random baseline, sampling)."""

    def __post_init__(self) -> None:
        for name in ("n_ctx", "select_windows", "eval_windows"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"DataConfig.{name} must be a positive integer (CLI --{name.replace('_', '-')}), "
                                 f"got {v!r}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"DataConfig.eval_fraction must be in (0, 1) (CLI --eval-fraction), got "
                             f"{self.eval_fraction}")
        for name in ("max_docs", "retain_max_docs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 2):
                raise ValueError(f"DataConfig.{name}={v!r} must be None or at least 2 documents (some are held out "
                                 f"for evaluation) (CLI --{name.replace('_', '-')})")
        if self.max_doc_tokens is not None and self.max_doc_tokens <= 0:
            raise ValueError(f"DataConfig.max_doc_tokens must be positive or None (CLI --max-doc-tokens 0 for "
                             f"whole documents), got {self.max_doc_tokens}")
        for side in ("forget", "retain"):
            if not isinstance(getattr(self, side), str) or not getattr(self, side).strip():
                raise ValueError(f"DataConfig.{side} must name a corpus (CLI --{side}), got {getattr(self, side)!r}")
        if self.forget == self.retain:
            raise ValueError(f"forget and retain are identical ({self.forget!r}): unlearning needs a retain "
                             "set that differs from what should be forgotten; give another --retain")


@dataclass
class CollectionConfig:
    """Step 1's input: top-activating records of every MLP neuron."""

    top_k_records: int = 64
    """Top-activating records kept per neuron for the explainer (its sentence reads the first
    ``ExplainConfig.max_records``; the evidence match reads the peaks of all)."""
    random_records: int = 32
    """Records around random tokens kept per neuron: what it does on typical text (the explainer's random
    windows; the evidence match reads the activity over all their tokens, ``InputEvidence.active``)."""

    def __post_init__(self) -> None:
        if not isinstance(self.top_k_records, int) or self.top_k_records < 1:
            raise ValueError(f"top_k_records must be a positive integer (CLI --top-k-records), got "
                             f"{self.top_k_records!r}")
        if not isinstance(self.random_records, int) or self.random_records < 0:
            raise ValueError(f"random_records must be a non-negative integer (CLI --random-records), got "
                             f"{self.random_records!r}")


@dataclass
class LLMServerConfig:
    """The OpenAI-compatible server of every LLM stage (openai explainer, LLM concepts, llm-judge)."""

    model: str | None = field(default=None, metadata=_cli("--llm-model"))
    """Chat model the server knows, e.g. gpt-4o-mini; needed by --explainer openai, --concepts llm, llm-judge."""
    base_url: str | None = None
    """OpenAI-compatible server root, e.g. http://localhost:8000/v1 (vLLM, llama.cpp, Ollama); none: OpenAI."""
    api_key_env: str | None = "OPENAI_API_KEY"
    """Environment variable holding the API key (never written anywhere); none for a local server that needs
    no key."""
    probe_timeout: float = 5.0
    """Seconds the one-request server check before the first LLM stage may take."""
    breaker_failures: int = 8
    """Stop an LLM stage once this many requests in a row failed the same way (what succeeded is kept)."""

    def __post_init__(self) -> None:
        if isinstance(self.api_key_env, str) and self.api_key_env.strip().lower() in ("", "none"):
            self.api_key_env = None
        if self.model is not None and not str(self.model).strip():
            self.model = None
        if self.base_url is not None:
            url = str(self.base_url).strip()
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"--base-url {self.base_url!r} is not an http(s) URL; write e.g. "
                                 "http://localhost:8000/v1")
            self.base_url = url
        if not self.probe_timeout > 0:
            raise ValueError(f"probe_timeout must be > 0 seconds (CLI --probe-timeout), got {self.probe_timeout}")
        if self.breaker_failures < 1:
            raise ValueError(f"breaker_failures must be >= 1 (CLI --breaker-failures), got {self.breaker_failures}")

    def llm_config(self, **overrides: Any) -> Any:
        """The client config (:class:`snip_lens.llm.LLMConfig`) for this server."""
        from .llm import LLMConfig

        if not self.model:
            raise ValueError("no LLM named: set the LLM (CLI --llm-model gpt-4o-mini)")
        return LLMConfig(model=self.model, base_url=self.base_url, api_key_env=self.api_key_env,
                         breaker_failures=self.breaker_failures, **overrides)


@dataclass
class ExplanationConfig:
    """Step 1: neuron explanations (explained here, or imported)."""

    explainer: Literal["heuristic", "openai", "local"] = "heuristic"
    """Who explains neurons: heuristic (offline rules over the top tokens), openai (an OpenAI-compatible LLM,
    see --llm-model) or local (a small chat model in process)."""
    explanations: Literal["input", "output", "both"] = "both"
    """Evidence the explanations rest on: top-activating inputs, VocabProj output tokens, or both (default: both,
    the ensemble Gur-Arieh et al. 2025 found best on input and output evaluations)."""
    quality_weight: Literal["none", "embedding", "simulator"] = "none"
    """Weight SNIP's scores by explanation quality (offline embedding AUROC, or the LLM simulator)."""
    import_explanations: str | None = None
    """Use published explanations from this file instead of explaining (OpenAI, DeepDecipher, Neuronpedia)."""
    min_explanation_score: float | None = None
    """With --import-explanations: drop explanations scored below this."""


@dataclass
class ConceptsConfig:
    """Step 2: the concepts of the forget set."""

    mode: Literal["auto", "llm", "distinctive"] = field(default="auto", metadata=_cli("--concepts"))
    """Forget-set concepts: llm (ask --llm-model), distinctive (offline distinctive words) or auto (llm when
    --llm-model is set)."""


@dataclass
class EmbeddingConfig:
    """Step 3: the embedding model that compares explanations with concepts."""

    embedder: str = "local"
    """Embedding model: local (offline MiniLM), openai:text-embedding-3-small, or a local model directory."""
    match: Literal["evidence", "embedding", "both"] = "evidence"
    """How explanations are matched with concepts: evidence (the tokens each explanation rests on, weighted by
    the forget set's term log-odds; needs no embedding), embedding (the paper: max cosine between sentence
    embeddings of explanation and concepts), or both (the two standardised and added)."""


@dataclass
class SelectionConfig:
    """Which neurons to prune: the methods compared and the k values."""

    methods: list[str] = field(default_factory=lambda: ["snip", "hybrid", "activation", "random"])
    """Selection methods, comma-separated: snip, hybrid, activation, activation-freq, random, keyword, llm-judge."""
    ks: list[str] = field(default_factory=lambda: ["0.5%", "1%", "2%", "4%"], metadata=_cli("--k"))
    """Neurons to prune, comma-separated: counts (500) or percentages of all MLP neurons (2%)."""
    keywords: list[str] = field(default_factory=list)
    """Keywords for the keyword method, comma-separated."""
    hybrid_weight: float = 0.05
    """Weight of the concept term against the activation ratio in the hybrid method."""
    judge_candidates: int | None = None
    """Neurons the llm-judge rates, one LLM call each (a shortlist, see --judge-shortlist); at least the largest k,
    checked before any LLM call (default: the largest k)."""
    judge_shortlist: Literal["snip+activation", "snip", "activation", "random"] = "snip+activation"
    """How the judge's shortlist is chosen: by default the tops of the SNIP and activation rankings in turn, so
    that the judge's ranking does not depend on SNIP's alone."""
    selection: Literal["global", "per-layer"] = field(default="global", metadata=_cli("--select"))
    """Top-k over all neurons (global), or k/L in each of the L layers (per-layer: masks that snip export
    --compact shrinks fully)."""
    mask_mode: str = "zero"
    """How pruned neurons are masked: zero, mean (their mean activation on the retain selection windows) or
    scale:F (activation times F; negative F flips it, e.g. scale:-1)."""
    random_seed: int | None = None
    """Seed of the random baseline's draw (default: the data seed). Several random baselines on the same
    document split and windows differ only in this seed."""

    def __post_init__(self) -> None:
        from .select import METHODS, parse_k

        if self.random_seed is not None and (isinstance(self.random_seed, bool)
                                             or not isinstance(self.random_seed, int)):
            raise ValueError(f"random_seed must be an integer or None, got {self.random_seed!r} "
                             "(CLI --random-seed 1)")

        self.methods = list(self.methods)
        self.ks = [str(k).strip() for k in self.ks]
        if not self.methods:
            raise ValueError(f"no selection method given; choose from {', '.join(METHODS)} (CLI --methods snip)")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)} (CLI --methods)")
        dup = sorted({m for m in self.methods if self.methods.count(m) > 1})
        if dup:
            raise ValueError(f"method(s) {dup} given twice (CLI --methods); list each once")
        if not self.ks:
            raise ValueError("no k given; give at least one, e.g. 1% or 500 (CLI --k)")
        for k in self.ks:
            parse_k(k, 10 ** 15)  # syntax and percentage range now; the count against the model once it loads
        if "keyword" in self.methods and not self.keywords:
            raise ValueError("the keyword method needs keywords: set keywords (CLI: --keywords python,code)")
        from .select import parse_mask_mode

        parse_mask_mode(self.mask_mode)
        if not 0.0 <= self.hybrid_weight:
            raise ValueError(f"hybrid_weight must be >= 0 (CLI --hybrid-weight), got {self.hybrid_weight}")
        if self.judge_candidates is not None and (not isinstance(self.judge_candidates, int)
                                                  or self.judge_candidates < 1):
            raise ValueError(f"judge_candidates={self.judge_candidates!r} must be a positive number of neurons, or "
                             "None for the largest k (CLI --judge-candidates 5000)")


@dataclass
class EvaluationConfig:
    """Held-out evaluations run for every (method, k) besides forget/retain loss and accuracy."""

    cbt: list[str] = field(default_factory=list)
    """CBT configs to evaluate, comma-separated: P, V, NE, CN (items from --cbt-source)."""
    cbt_source: str = "hf"
    """CBT items: hf (online), a JSONL file in the HF cbt schema, or prose (CBT-P/V-style items built from
    prose)."""
    cbt_items: int = 200
    """CBT items evaluated per config."""
    toxicity: bool = False
    """Also measure the toxicity rate of generations (paper section 4)."""
    toxicity_n: int = 1000
    """Generations for the toxicity rate."""
    toxicity_scorer: Literal["detoxify", "profanity"] = "detoxify"
    """Toxicity scorer: detoxify (offline it needs --detoxify-checkpoint) or profanity (a word list)."""
    detoxify_checkpoint: str | None = None
    """Local detoxify checkpoint file, for offline use."""
    detoxify_config: str | None = None
    """Local directory with the checkpoint's transformer config and tokenizer files, e.g. bert-base-uncased's
    (with --detoxify-checkpoint: no network at all)."""
    generation: Any = field(default=None, metadata=_cli(cli=False))
    """Generation-level forgetting (a ``snip_lens.evaluate.generation.GenerationConfig``; CLI ``--eval
    generation`` with ``--detector`` and ``--generation-prompts``); None skips it."""
    relearn: Any = field(default=None, metadata=_cli(cli=False))
    """Relearning attack after the sweep (a ``snip_lens.evaluate.relearn.RelearnConfig``; CLI ``--relearn
    STEPS`` with ``--relearn-forms`` and ``--relearn-lr``); None skips it."""

    def __post_init__(self) -> None:
        if isinstance(self.generation, dict):
            from .evaluate.generation import GenerationConfig

            self.generation = GenerationConfig(**self.generation)
        if isinstance(self.relearn, dict):
            from .evaluate.relearn import RelearnConfig

            self.relearn = RelearnConfig(**self.relearn)
        self.cbt = [c.upper() for c in self.cbt]
        bad = [c for c in self.cbt if c not in ("P", "V", "NE", "CN")]
        if bad:
            raise ValueError(f"unknown CBT config(s) {bad}; choose from P, V, NE, CN (CLI --cbt P,V)")
        if self.cbt_source == "prose":
            bad = [c for c in self.cbt if c not in ("P", "V")]
            if bad:
                raise ValueError(f"--cbt-source prose builds CBT-P and CBT-V items only, not {bad}; use --cbt P,V "
                                 "or a JSONL --cbt-source")
        for name in ("cbt_items", "toxicity_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (CLI --{name.replace('_', '-')}), got {getattr(self, name)}")


STAGES: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "collect": CollectionConfig,
                           "llm": LLMServerConfig, "explain": ExplanationConfig, "concepts": ConceptsConfig,
                           "embed": EmbeddingConfig, "select": SelectionConfig, "evaluate": EvaluationConfig}
"""The stage fields of :class:`RunConfig`, in pipeline order."""

ARTIFACT_STAGES: dict[str, tuple[str, ...]] = {
    "records": ("model.name", "model.dtype", "data", "collect"),
    "explanations.jsonl": ("model.name", "model.dtype", "data", "collect", "explain", "llm.model"),
    "concepts.json": ("data", "concepts", "llm.model"),
    "results.json": ("model.name", "model.dtype", "data", "collect", "explain", "llm.model", "concepts", "embed",
                     "select", "evaluate"),
}
"""What each saved artifact of a run depends on: a rerun into the same directory must agree on these
settings for every artifact that exists there (and on nothing else: what was never computed can change)."""


@dataclass
class RunConfig:
    """One unlearning experiment, composed of the stage configs (``run_sweep``, ``snip run``, ``snip demo``)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The subject model."""
    data: DataConfig = field(default_factory=DataConfig)
    """Forget / retain data."""
    collect: CollectionConfig = field(default_factory=CollectionConfig)
    """Activation records."""
    llm: LLMServerConfig = field(default_factory=LLMServerConfig)
    """The LLM server of every LLM stage."""
    explain: ExplanationConfig = field(default_factory=ExplanationConfig)
    """Step 1: explanations."""
    concepts: ConceptsConfig = field(default_factory=ConceptsConfig)
    """Step 2: forget-set concepts."""
    embed: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    """Step 3: embeddings."""
    select: SelectionConfig = field(default_factory=SelectionConfig)
    """Methods and k values."""
    evaluate: EvaluationConfig = field(default_factory=EvaluationConfig)
    """Extra evaluations."""

    def __post_init__(self) -> None:
        for name, cls in STAGES.items():
            v = getattr(self, name)
            if isinstance(v, dict):
                setattr(self, name, _from_dict(cls, v, where=name))
            elif not isinstance(v, cls):
                raise ValueError(f"RunConfig.{name} must be a {cls.__name__}, got {type(v).__name__}")
        needs_llm = [what for what, on in (
            ("--explainer openai", self.explain.explainer == "openai" and not self.explain.import_explanations),
            ("--concepts llm", self.concepts.mode == "llm"),
            ("the llm-judge method", "llm-judge" in self.select.methods)) if on]
        if needs_llm and not self.llm.model:
            raise ValueError(f"{needs_llm[0]} needs an LLM: name it with --llm-model (e.g. --llm-model gpt-4o-mini, "
                             "plus --base-url for a local server)")

    # -- derived -----------------------------------------------------------------------------------

    @property
    def uses_llm(self) -> bool:
        """Whether some stage of this run calls the chat LLM (then the server is probed first)."""
        return bool(self.llm.model) and (
            (self.explain.explainer == "openai" and not self.explain.import_explanations)
            or self.concepts.mode in ("llm", "auto") or "llm-judge" in self.select.methods)

    @property
    def needs_explanations(self) -> bool:
        """Whether a selected method reads explanations (steps 1-3 run only then)."""
        return any(m in self.select.methods for m in ("snip", "hybrid", "keyword", "llm-judge"))

    # -- JSON --------------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The resolved config as JSON; holds the NAME of the key variable, never a key."""
        return {"version": CONFIG_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "RunConfig":
        """Read :meth:`to_json` output, or a version-1 flat ``SweepConfig`` JSON (older ``config.json`` files)."""
        if not isinstance(d, dict):
            raise ValueError(f"a run config is a JSON object, got {type(d).__name__}")
        d = dict(d)
        version = d.pop("version", 1)
        if version == 1 or isinstance(d.get("model"), str):
            return from_flat(d)
        if version != CONFIG_VERSION:
            raise ValueError(f"run config version {version} is not known to this snip_lens (it reads "
                             f"{CONFIG_VERSION}); upgrade snip_lens or rerun with --overwrite")
        return cls(**{k: v for k, v in d.items() if k in STAGES})

    def fingerprint(self, artifact: str) -> dict[str, Any]:
        """The settings ``artifact`` (a key of :data:`ARTIFACT_STAGES`) depends on."""
        full = dataclasses.asdict(self)
        out: dict[str, Any] = {}
        for key in ARTIFACT_STAGES[artifact]:
            stage, _, fname = key.partition(".")
            out[key] = full[stage][fname] if fname else full[stage]
        return out

    def check_inputs(self, out_dir: str | Path | None = None) -> None:
        """The checks that need the file system, run before any model loads: every path named exists and
        ``out_dir`` is a directory or absent. Raises ``ValueError`` naming the flag, the value and the fix."""
        for side in ("forget", "retain"):
            _check_corpus(getattr(self.data, side), f"--{side}")
        d = self.data
        if d.glob is not None and not any(Path(s).expanduser().is_dir() for s in (d.forget, d.retain)):
            raise ValueError(f"--glob {d.glob!r} narrows a directory corpus, but neither --forget {d.forget!r} nor "
                             f"--retain {d.retain!r} is a directory; drop --glob or give a directory")
        for flag, value in (("--import-explanations", self.explain.import_explanations),
                            ("--detoxify-checkpoint", self.evaluate.detoxify_checkpoint),
                            ("--detoxify-config", self.evaluate.detoxify_config)):
            if value and not Path(value).exists():
                raise ValueError(f"{flag} {value!r} does not exist; give an existing path")
        if self.evaluate.cbt and self.evaluate.cbt_source not in ("hf", "prose") \
                and not Path(self.evaluate.cbt_source).is_file():
            raise ValueError(f"--cbt-source {self.evaluate.cbt_source!r} is not a file; give a JSONL file in the "
                             "HF cbt schema, hf or prose")
        emb = self.embed.embedder
        if not (emb == "local" or emb.startswith("openai:")) and not Path(emb).is_dir():
            raise ValueError(f"--embedder {emb!r} is neither local, openai:MODEL nor an existing model directory")
        if out_dir is not None:
            check_out_dir(out_dir)

    # -- the flat view of the old SweepConfig --------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        # Code written against the flat SweepConfig (config.batch_size, config.llm_model) keeps working: a
        # flat name is looked up in FLAT_NAMES, else in the one stage that has a field of that name.
        if name.startswith("_") or name in STAGES:
            raise AttributeError(name)
        path = flat_path(name)
        if path is None:
            raise AttributeError(f"RunConfig has no setting {name!r}")
        stage, fname = path
        return getattr(object.__getattribute__(self, stage), fname)


# ---- the old flat SweepConfig -> RunConfig -----------------------------------------------------------

FLAT_NAMES: dict[str, tuple[str, str]] = {
    "model": ("model", "name"), "batch_size": ("model", "batch_size"),
    "top_k_records": ("collect", "top_k_records"),
    "llm_model": ("llm", "model"), "base_url": ("llm", "base_url"), "api_key_env": ("llm", "api_key_env"),
    "explainer": ("explain", "explainer"), "import_explanations": ("explain", "import_explanations"),
    "min_explanation_score": ("explain", "min_explanation_score"),
    "concepts": ("concepts", "mode"), "embedder": ("embed", "embedder"),
    "methods": ("select", "methods"), "ks": ("select", "ks"), "keywords": ("select", "keywords"),
    "hybrid_weight": ("select", "hybrid_weight"), "judge_candidates": ("select", "judge_candidates"),
    "judge_shortlist": ("select", "judge_shortlist"), "select": ("select", "selection"),
    "cbt": ("evaluate", "cbt"), "cbt_source": ("evaluate", "cbt_source"), "cbt_items": ("evaluate", "cbt_items"),
    "toxicity": ("evaluate", "toxicity"), "toxicity_n": ("evaluate", "toxicity_n"),
    "toxicity_scorer": ("evaluate", "toxicity_scorer"),
    "detoxify_checkpoint": ("evaluate", "detoxify_checkpoint"), "detoxify_config": ("evaluate", "detoxify_config"),
    "seed": ("data", "seed"),
}
"""Where each field of the flat ``SweepConfig`` lives now. A flat name not listed maps to the one stage config
with a field of the same name (so a field added to a stage config is found under its flat name too)."""


def flat_path(name: str) -> tuple[str, str] | None:
    """(stage, field) of the flat ``SweepConfig`` setting ``name``, or None when no stage has it."""
    if name in FLAT_NAMES:
        return FLAT_NAMES[name]
    hits = [(stage, name) for stage, cls in STAGES.items() if name in {f.name for f in dataclasses.fields(cls)}]
    if len(hits) > 1:
        raise AttributeError(f"setting {name!r} is ambiguous: it is a field of {[s for s, _ in hits]}; "
                             "write config.<stage>.<field>")
    return hits[0] if hits else None


def from_flat(flat: dict[str, Any]) -> RunConfig:
    """A :class:`RunConfig` from the fields of a flat ``SweepConfig`` (as a dict; ``data`` may be a dict).

    Unknown names raise ``ValueError``: add the setting to a stage config (it then maps by its name).
    """
    stages: dict[str, dict[str, Any]] = {name: {} for name in STAGES}
    data = flat.get("data")
    if data is not None:
        stages["data"] = dict(dataclasses.asdict(data) if dataclasses.is_dataclass(data) else data)
    for name, value in flat.items():
        if name == "data":
            continue
        if name == "seed":  # the flat config's second seed: the random baseline's (data.seed seeds the rest)
            if value != stages["data"].get("seed", 0):
                stages["select"]["random_seed"] = value
            continue
        path = flat_path(name)
        if path is None:
            raise ValueError(f"setting {name!r} of the flat config belongs to no stage config; add a field "
                             f"{name!r} to one of {', '.join(c.__name__ for c in STAGES.values())} in "
                             "snip_lens/config.py")
        stages[path[0]][path[1]] = value
    return RunConfig(**{name: _from_dict(STAGES[name], kw, where=name) for name, kw in stages.items()})


def _from_dict(cls: type, d: dict[str, Any], *, where: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {where} setting(s) {unknown}; {cls.__name__} has {sorted(names)}")
    return cls(**d)


# ---- file-system checks ---------------------------------------------------------------------------


def _check_corpus(spec: str, flag: str) -> None:
    if spec in ("code", "prose") or spec.startswith("hf:"):
        return
    if spec.startswith("cbt:"):
        parts = spec.split(":", 2)
        if len(parts) < 2 or parts[1].upper() not in ("P", "V", "NE", "CN"):
            raise ValueError(f"{flag} {spec!r}: write cbt:P, cbt:V, cbt:NE or cbt:CN, optionally :FILE")
        if len(parts) == 3 and parts[2] != "hf" and not Path(parts[2]).is_file():
            raise ValueError(f"{flag} {spec!r}: CBT file {parts[2]!r} does not exist")
        return
    if spec == "civil-toxic" or spec.startswith("civil-toxic:"):
        path = spec.split(":", 1)[1] if ":" in spec else None
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{flag} {spec!r}: Civil Comments file {path!r} does not exist")
        return
    p = Path(spec).expanduser()
    if not p.exists():
        raise ValueError(f"{flag} {spec!r} is not a built-in corpus (code, prose), not an existing file or "
                         "directory, and not hf:NAME, cbt:CONFIG[:FILE] or civil-toxic[:FILE]")


def check_out_dir(out_dir: str | Path) -> None:
    """Refuse an output path that exists but is not a directory (naming it and the fix)."""
    p = Path(out_dir)
    if p.exists() and not p.is_dir():
        raise ValueError(f"--out {str(p)!r} is an existing file, not a directory; choose another --out "
                         "(a directory that does not exist yet, or one of an earlier run)")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"--out {str(p)!r}: {str(parent)!r} is a file, so no directory can be made "
                                 "under it; choose another --out")
            break


# ---- CLI flags derived from the dataclasses ---------------------------------------------------------


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass ``cls`` (whitespace collapsed), by field name."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # no source (frozen app): fall back to metadata help
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr) \
                and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str):
            docs[a.target.id] = " ".join(b.value.value.split())
    return docs


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), len(args) < len(typing.get_args(tp))
    return tp, False


def _split_list(text: str) -> list[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()]


def flag_of(f: dataclasses.Field) -> str:
    """The CLI flag of a stage-config field (``--field-name`` unless its metadata names another)."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _none_or(conv: Any, zero_is_none: bool) -> Any:
    def parse(text: str) -> Any:
        if text.strip().lower() == "none":
            return None
        v = conv(text)
        return None if zero_is_none and v == 0 else v

    parse.__name__ = getattr(conv, "__name__", "value")
    return parse


def add_stage_flags(parser: argparse.ArgumentParser | Any, cls: type, dest_prefix: str, *,
                    only: tuple[str, ...] | None = None, defaults: dict[str, Any] | None = None,
                    required: tuple[str, ...] = (), help_overrides: dict[str, str] | None = None) -> list[str]:
    """Add one flag per field of stage config ``cls`` to ``parser``; returns the flags added.

    Each flag's value lands in ``args.<dest_prefix>__<field>``, its help is the field's docstring, its type,
    choices and default come from the field. ``only`` restricts the fields; ``defaults`` overrides defaults
    (by field name); ``required`` fields get no default.
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    added = []
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True) or (only is not None and f.name not in only):
            continue
        tp, optional = _unwrap(hints[f.name])
        flag = flag_of(f)
        help_text = (help_overrides or {}).get(f.name) or f.metadata.get("help") or docs.get(f.name)
        if not help_text:
            raise TypeError(f"{cls.__name__}.{f.name} has no docstring: every setting needs one line of help")
        kw: dict[str, Any] = {"dest": f"{dest_prefix}__{f.name}", "help": help_text}
        if defaults and f.name in defaults:
            default = defaults[f.name]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        if f.name in required:
            kw["required"] = True
        elif default is not None and tp is not bool:
            shown = ",".join(map(str, default)) if isinstance(default, list) else default
            kw["help"] += f" (default: {shown})" if shown != "" else ""
        origin = typing.get_origin(tp)
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
            kw["default"] = bool(default)
        elif origin is Literal:
            kw["choices"] = list(typing.get_args(tp))
            kw["default"] = default
        elif origin is list:
            kw["type"] = _split_list
            kw["default"] = list(default) if default is not None else []
            kw["metavar"] = "A,B,..."
        else:
            conv = tp if tp in (int, float, str) else str
            if optional or f.metadata.get("zero_is_none"):
                conv = _none_or(conv, f.metadata.get("zero_is_none", False))
            kw["type"] = conv
            kw["default"] = default
        if f.metadata.get("metavar"):
            kw["metavar"] = f.metadata["metavar"]
        elif "type" in kw and "metavar" not in kw:
            kw["metavar"] = flag.lstrip("-").replace("-", "_").upper()
        kw["help"] = kw["help"].replace("%", "%%")  # argparse formats help with %
        if "required" in kw:
            kw.pop("default", None)
        parser.add_argument(flag, **kw)
        added.append(flag)
    return added


def stage_from_args(cls: type, args: argparse.Namespace, dest_prefix: str, **fixed: Any) -> Any:
    """Build stage config ``cls`` from the flags :func:`add_stage_flags` added (plus ``fixed`` values)."""
    kw = dict(fixed)
    for f in dataclasses.fields(cls):
        key = f"{dest_prefix}__{f.name}"
        if f.name not in kw and hasattr(args, key):
            kw[f.name] = getattr(args, key)
    return cls(**kw)


def add_run_flags(parser: argparse.ArgumentParser, *, defaults: dict[str, dict[str, Any]] | None = None,
                  required: dict[str, tuple[str, ...]] | None = None) -> None:
    """Every setting of :class:`RunConfig` as a flag, one argument group per stage."""
    seen: dict[str, str] = {}
    for stage, cls in STAGES.items():
        group = parser.add_argument_group(f"{stage} ({cls.__name__})", (cls.__doc__ or "").strip().splitlines()[0])
        for flag in add_stage_flags(group, cls, stage, defaults=(defaults or {}).get(stage),
                                    required=(required or {}).get(stage, ())):
            if flag in seen:
                raise TypeError(f"flag {flag} is declared by both {seen[flag]} and {cls.__name__}")
            seen[flag] = cls.__name__


def run_config_from_args(args: argparse.Namespace) -> RunConfig:
    """The :class:`RunConfig` of the flags :func:`add_run_flags` added."""
    return RunConfig(**{stage: stage_from_args(cls, args, stage) for stage, cls in STAGES.items()})
