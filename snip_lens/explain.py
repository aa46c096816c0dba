"""SNIP step 1: explain every MLP neuron in words.

Three explainers produce the same artifact (:class:`~snip_lens.types.NeuronExplanation`, one per neuron):

- ``openai``: any OpenAI-compatible chat server, prompted exactly as OpenAI's neuron explainer
  (``TokenActivationPairExplainer`` with the ``ORIGINAL`` few-shot examples; paper appendix A.1);
- ``local``: an in-process transformers chat model (offline default: SmolLM2-135M-Instruct), same prompt;
- ``heuristic``: no LLM; a deterministic sentence built from the neuron's top tokens and the kind of
  text around them (source code, prose, numbers...), so the whole pipeline runs offline in minutes.

LLM answers are cached per neuron on disk (sha256 over prompt version, model, sampling parameters,
neuron and a digest of its records): a rerun re-asks only what is missing. An answer that fails or does
not parse is returned with ``error`` set and is never cached.

Published explanations can be imported instead (:func:`import_explanations`): OpenAI's GPT-2
neuron-explainer JSONL, DeepDecipher's ``neuron_explainer`` pages, and Neuronpedia explanation exports.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import keyword
import logging
import math
import os
import re
import tempfile
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .llm import ChatClient, DiskCache, LLMConfig, LLMError, OpenAIChatClient, run_all
from .types import ActivationRecord, NeuronExplanation, NeuronId, NeuronRecords

logger = logging.getLogger(__name__)

PROMPT_VERSION = "oai-token-activation-pair/original-fewshot/v1"
"""Identifies the prompt template; part of every cache key, bump it whenever the prompt changes."""

EXPLANATION_PREFIX = "the main thing this neuron does is find"
"""The explanation is the completion of this phrase (OpenAI neuron explainer)."""

SYSTEM_PROMPT = (
    "We're studying neurons in a neural network. Each neuron looks for some particular "
    "thing in a short document. Look at the parts of the document the neuron activates for "
    "and summarize in a single sentence what the neuron is looking for. Don't list "
    "examples of words.\n\nThe activation format is token<tab>activation. Activation "
    "values range from 0 to 10. A neuron finding what it's looking for is represented by a "
    "non-zero activation value. The higher the activation value, the stronger the match."
)
"""System message of the explainer prompt (paper appendix A.1)."""

REPEAT_NONZERO_BELOW = 0.2
"""The zeros-filtered repeat of the records is added when fewer than this share of tokens are non-zero."""


def _rec(tokens: list[str], acts: list[float]) -> ActivationRecord:
    return ActivationRecord(tokens=tokens, activations=acts)


# OpenAI's FewShotExampleSet.ORIGINAL: (activation records, explanation) for three neurons.
FEW_SHOT_EXAMPLES: list[tuple[list[ActivationRecord], str]] = [
    ([
        _rec(["t", "urt", "ur", "ro", " is", " fab", "ulously", " funny", " and", " over", " the", " top", " as",
              " a", " '", "very", " sneaky", "'", " but", "ler", " who", " excel", "s", " in", " the", " art",
              " of", " impossible", " disappearing", "/", "re", "app", "earing", " acts"],
             [-0.71, -1.85, -2.39, -2.58, -1.34, -1.92, -1.69, -0.84, -1.25, -1.75, -1.42, -1.47, -1.51, -0.8,
              -1.89, -1.56, -1.63, 0.44, -1.87, -2.55, -2.09, -1.76, -1.33, -0.88, -1.63, -2.39, -2.63, -0.99,
              2.83, -1.11, -1.19, -1.33, 4.24, -1.51]),
        _rec(["esc", "aping", " the", " studio", " ,", " pic", "col", "i", " is", " warm", "ly", " affecting",
              " and", " so", " is", " this", " ad", "roit", "ly", " minimalist", " movie", " ."],
             [-0.69, 4.12, 1.83, -2.28, -0.28, -0.79, -2.2, -2.03, -1.77, -1.71, -2.44, 1.6, -1, -0.38, -1.93,
              -2.09, -1.63, -1.94, -1.82, -1.64, -1.32, -1.92]),
    ], "present tense verbs ending in 'ing'"),
    ([
        _rec(["as", " sac", "char", "ine", " movies", " go", " ,", " this", " is", " likely", " to", " cause",
              " massive", " cardiac", " arrest", " if", " taken", " in", " large", " doses", " ."],
             [-0.14, -1.37, -0.68, -2.27, -1.46, -1.11, -0.9, -2.48, -2.07, -3.49, -2.16, -1.79, -0.23, -0.04,
              4.46, -1.02, -2.26, -2.95, -1.49, -1.46, -0.6]),
        _rec(["shot", " perhaps", " '", "art", "istically", "'", " with", " handheld", " cameras", " and",
              " apparently", " no", " movie", " lights", " by", " jo", "aquin", " b", "aca", "-", "as", "ay", " ,",
              " the", " low", "-", "budget", " production", " swings", " annoy", "ingly", " between", " vert",
              "igo", " and", " opacity", " ."],
             [-0.09, -3.53, -0.72, -2.36, -1.05, -1.12, -2.49, -2.14, -1.98, -1.59, -2.62, -2, -2.73, -2.87,
              -3.23, -1.11, -2.23, -0.97, -2.28, -2.37, -1.5, -2.81, -1.73, -3.14, -2.61, -1.7, -3.08, -4, -0.71,
              -2.48, -1.39, -1.96, -1.09, 4.37, -0.74, -0.5, -0.62]),
    ], "words related to physical medical conditions"),
    ([
        _rec(["the", " sense", " of", " together", "ness", " in", " our", " town", " is", " strong", " ."],
             [0, 0, 0, 1, 2, 0, 0.23, 0.5, 0, 0, 0]),
        _rec(["a", " buoy", "ant", " romantic", " comedy", " about", " friendship", " ,", " love", " ,", " and",
              " the", " truth", " that", " we", "'re", " all", " in", " this", " together", " ."],
             [-0.15, -2.33, -1.4, -2.17, -2.53, -0.85, 0.23, -1.89, 0.09, -0.47, -0.5, -0.58, -0.87, 0.22, 0.58,
              1.34, 0.98, 2.21, 2.84, 1.7, -0.89]),
    ], "phrases related to community"),
]


# --------------------------------------------------------------------------------------------------
# Prompt (pure functions; golden-string tested)
# --------------------------------------------------------------------------------------------------

def max_activation_of(records: Sequence[ActivationRecord]) -> float:
    """Largest ReLU'd activation over ``records`` (negative values count as resting, as in OpenAI's code)."""
    return max(0.0, max((max(r.activations) for r in records if r.activations), default=0.0))


def scale_activations(activations: Sequence[float], max_activation: float) -> list[int]:
    """Raw activations to integers in [0, 10]: ``min(10, floor(10 * relu(a) / max_activation))``."""
    if max_activation <= 0:
        return [0 for _ in activations]
    # int() is floor for the positive values; the arithmetic is OpenAI's, so boundaries round alike.
    return [min(10, int(10 * a / max_activation)) if a > 0 else 0 for a in activations]


def _token_text(token: str) -> str:
    # A raw newline or tab inside a token would break the token<tab>activation line format.
    if "\n" in token or "\t" in token:
        return token.replace("\n", "\\n").replace("\t", "\\t")
    return token


def _format_scaled(records: Sequence[ActivationRecord], scaled: Sequence[list[int]], omit_zeros: bool) -> str:
    blocks = []
    for r, sc in zip(records, scaled):
        joined = "".join(r.tokens)
        toks = [_token_text(t) for t in r.tokens] if ("\n" in joined or "\t" in joined) else r.tokens
        if omit_zeros:
            blocks.append("\n".join([f"{t}\t{a}" for t, a in zip(toks, sc) if a]))
        else:
            blocks.append("\n".join([f"{t}\t{a}" for t, a in zip(toks, sc)]))
    return "\n<start>\n" + "\n<end>\n<start>\n".join(blocks) + "\n<end>\n"


def format_activation_records(records: Sequence[ActivationRecord], max_activation: float, *,
                              omit_zeros: bool = False) -> str:
    """``<start>``/``<end>`` blocks of ``token<tab>activation`` lines (OpenAI ``format_activation_records``)."""
    return _format_scaled(records, [scale_activations(r.activations, max_activation) for r in records],
                          omit_zeros)


def _nonzero_share(scaled: Sequence[list[int]]) -> float:
    total = sum(len(sc) for sc in scaled)
    return sum(len(sc) - sc.count(0) for sc in scaled) / total if total else 0.0


def non_zero_proportion(records: Sequence[ActivationRecord], max_activation: float) -> float:
    """Share of tokens whose scaled activation is non-zero."""
    return _nonzero_share([scale_activations(r.activations, max_activation) for r in records])


def _neuron_block(records: Sequence[ActivationRecord], number: int, mx: float | None = None) -> str:
    # OpenAI's _add_per_neuron_explanation_prompt rescales each neuron by its own records' max.
    mx = max_activation_of(records) if mx is None else mx
    scaled = [scale_activations(r.activations, mx) for r in records]  # once, for all three uses
    text = f"\n\nNeuron {number}\nActivations:{_format_scaled(records, scaled, False)}"
    if _nonzero_share(scaled) < REPEAT_NONZERO_BELOW:
        text += f"\nSame activations, but with all zeros filtered out:{_format_scaled(records, scaled, True)}"
    return text + f"\nExplanation of neuron {number} behavior: {EXPLANATION_PREFIX}"


@functools.lru_cache(maxsize=2)
def _prompt_head(few_shot: bool) -> tuple[dict, ...]:
    """System message and (optionally) the few-shot turns: the same for every neuron, so built once."""
    messages: list[dict] = [{"role": "system", "content": SYSTEM_PROMPT}]
    for i, (ex_records, explanation) in enumerate(FEW_SHOT_EXAMPLES if few_shot else []):
        messages.append({"role": "user", "content": _neuron_block(ex_records, i + 1)})
        messages.append({"role": "assistant", "content": f" {explanation}."})
    return tuple(messages)


def build_explanation_prompt(records: NeuronRecords | Sequence[ActivationRecord], *,
                             max_activation: float | None = None, few_shot: bool = True,
                             max_records: int | None = None) -> list[dict]:
    """Chat messages asking for one neuron's explanation, in OpenAI's neuron-explainer format.

    ``records`` are the neuron's top-activating windows (a :class:`NeuronRecords` contributes its ``top``).
    Activations are scaled to 0-10 by ``max_activation`` (default: the records' own ReLU'd maximum, which
    is what OpenAI's explainer uses). With ``few_shot`` the three ``ORIGINAL`` examples come first and the
    neuron is "Neuron 4"; the last user message ends with "the main thing this neuron does is find".
    """
    recs = list(records.top if isinstance(records, NeuronRecords) else records)
    if max_records is not None:
        recs = recs[:max_records]
    if not recs or not any(r.tokens for r in recs):
        name = f" for neuron {records.neuron}" if isinstance(records, NeuronRecords) else ""
        raise ValueError(f"no activation records{name}: an explanation prompt needs at least one non-empty "
                         "top-activating window (collect activations first)")
    messages = [dict(m) for m in _prompt_head(few_shot)]  # copies: callers may edit their messages
    examples = FEW_SHOT_EXAMPLES if few_shot else []
    # An explicit max_activation replaces the records' own maximum (a scale shared across calls).
    mx = None if max_activation is None else float(max_activation)
    text = _neuron_block(recs, len(examples) + 1, mx)
    messages.append({"role": "user", "content": text})
    return messages


_GARBAGE_MARKERS = ("<start>", "<end>", "\t")


def parse_explanation(answer: str | None, *, max_chars: int = 300) -> str:
    """The explanation in an LLM answer, or ``ValueError`` saying why there is none.

    Same rule as OpenAI's explainer (strip; drop the echoed "the main thing this neuron does is find";
    drop the final period), keeping only the first line, and rejecting empty, overlong or non-sentence
    answers (no words, echoed activation records, mostly symbols).
    """
    if answer is None:
        raise ValueError("empty answer (no text)")
    text = answer.strip()
    if text.lower().startswith(EXPLANATION_PREFIX):
        text = text[len(EXPLANATION_PREFIX):].strip()
    text = text.split("\n", 1)[0].strip()
    if text.endswith("."):
        text = text[:-1].rstrip()
    if not text:
        raise ValueError(f"empty answer: {answer[:80]!r}")
    if len(text) > max_chars:
        raise ValueError(f"answer too long ({len(text)} > {max_chars} characters): {text[:80]!r}...")
    if any(m in answer for m in _GARBAGE_MARKERS):
        raise ValueError(f"answer echoes activation records instead of explaining: {answer[:80]!r}")
    # Quoted examples may be symbols ("the token '===' in headings"); the rest must read as words.
    prose = re.sub(r"'[^']*'|\"[^\"]*\"", "", text)
    words = re.findall(r"[A-Za-z]{2,}", prose)
    letters = sum(c.isalpha() for c in prose)
    if not words or letters < 0.5 * len(prose.replace(" ", "")):
        raise ValueError(f"answer is not a sentence: {text[:80]!r}")
    if len(set(text.replace(" ", ""))) < 3:
        raise ValueError(f"answer is a repeated character: {text[:80]!r}")
    return text


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------

@dataclass
class ExplainConfig:
    """How to explain neurons (SNIP step 1)."""

    kind: Literal["openai", "local", "heuristic"] = "heuristic"
    """Which explainer: an OpenAI-compatible server, an in-process chat model, or the no-LLM heuristic."""
    llm: LLMConfig | None = None
    """Server, model and sampling for ``kind="openai"`` (required there)."""
    local_model: str = "smollm2-135m"
    """Chat model for ``kind="local"``: a built-in name, a saved HF directory, or a hub name."""
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
        if self.kind == "openai" and self.llm is None:
            raise ValueError("ExplainConfig(kind='openai') needs llm=LLMConfig(model=...) (e.g. model='gpt-4o-mini')")
        if self.max_records < 1:
            raise ValueError(f"ExplainConfig.max_records must be >= 1, got {self.max_records}")
        if self.max_explanation_chars < 10:
            raise ValueError(f"ExplainConfig.max_explanation_chars must be >= 10, got {self.max_explanation_chars}")
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
        return "heuristic"

    def to_json(self) -> dict[str, Any]:
        """Resolved config as JSON (no secrets: the LLM config holds only the key variable's name)."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "llm"}
        d["llm"] = self.llm.to_json() if self.llm is not None else None
        return d


# --------------------------------------------------------------------------------------------------
# Local chat model
# --------------------------------------------------------------------------------------------------

class LocalChatClient:
    """An in-process transformers chat model behind the same ``generate(messages)`` interface.

    ``model`` is a built-in name (``"smollm2-135m"``: the offline SmolLM2-135M-Instruct, converted once by
    :mod:`snip_lens.models`), a directory written by ``save_pretrained``, or a hub name. Calls run one at a
    time on a worker thread (the CPU is the bottleneck); ``temperature=0`` decodes greedily.
    """

    def __init__(self, model: str = "smollm2-135m", *, max_new_tokens: int = 40, temperature: float = 0.0,
                 seed: int = 0, hf_model: Any = None, tokenizer: Any = None) -> None:
        self.name = model
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.seed = seed
        self._lock = threading.Lock()
        if hf_model is not None and tokenizer is not None:
            self.model, self.tokenizer = hf_model, tokenizer
        else:
            self.model, self.tokenizer = self._load(model)
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError(f"local model {model!r} has no chat template; use an instruction-tuned chat model "
                             "such as 'smollm2-135m'")

    @staticmethod
    def _load(model: str) -> tuple[Any, Any]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from . import models

        if model in models.BUILTIN_MODELS:
            path: str | Path = models._convert_builtin(models.BUILTIN_MODELS[model], torch.float32)
        else:
            path = model
        logger.info("loading local chat model from %s", path)
        tok = AutoTokenizer.from_pretrained(str(path))
        hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        hf.eval()
        return hf, tok

    def _generate_sync(self, messages: list[dict]) -> str:
        import torch

        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True)
        input_ids = ids["input_ids"]
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens,
                                  "pad_token_id": self.tokenizer.pad_token_id or self.tokenizer.eos_token_id}
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=1.0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with self._lock, torch.no_grad():
            if self.temperature > 0:
                torch.manual_seed(self.seed)
            out = self.model.generate(input_ids=input_ids, attention_mask=ids.get("attention_mask"), **kwargs)
        return self.tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)

    async def generate(self, messages: list[dict]) -> str:
        return await asyncio.to_thread(self._generate_sync, messages)


# --------------------------------------------------------------------------------------------------
# Heuristic explainer (no LLM)
# --------------------------------------------------------------------------------------------------

_BPE_MARKERS = str.maketrans({"Ġ": " ", "▁": " ", "Ċ": "\n", "ĉ": "\t"})
_WORD = re.compile(r"^[A-Za-z]+(?:'[a-z]+)?$")
_NUMBER = re.compile(r"^[+-]?\d+(?:[.,]\d+)*%?$")
_IDENT_UNDERSCORE = re.compile(r"^_*[A-Za-z0-9]+(?:_[A-Za-z0-9]*)+_*$|^__\w+__$")
_CAMEL = re.compile(r"^[A-Z][a-z0-9]+(?:[A-Z][a-z0-9]*)+$|^[a-z]+(?:[A-Z][a-z0-9]*)+$")
_STOPWORDS = frozenset(
    "the of and to a in is that for it as was with be by on not this are or an from at which but have has "
    "its can if will their they there been were these more when than other such only also into may what "
    "would some any all one so no he she we you his her our them then those each must should".split())
_CONTROL = re.compile(r"^\s*(?:if|elif|else|for|while|try|except|with)\b[^\n]*:[ \t]*$", re.M)
_INDENT = re.compile(r"\n(?: {4}|\t)+\S")


def _code_signals(text: str) -> dict[str, int]:
    """Counts of Python-source signals in ``text`` (C-speed substring counts where a literal suffices)."""
    c = text.count
    return {
        "def": c("def "), "class": c("class "), "import": c("import "), "self": c("self."),
        "return": c("return"), "control": len(_CONTROL.findall(text)), "comment": c("# "),
        "string": (c('"') + c("'")) // 2, "call": c("("), "assign": c(" = ") + c("=="),
        "indent": len(_INDENT.findall(text)), "underscore": c("_"), "dotted": c(".") - c(". "),
        "brackets": c("(") + c(")") + c("[") + c("]") + c("{") + c("}"),
        "none": c("None") + c("True") + c("False"),
    }


_CODE_TOPICS = [  # (signal, phrase), most specific first
    ("def", "function definitions"), ("class", "class definitions"), ("import", "import statements"),
    ("self", "attribute access on self in methods"), ("return", "return statements"),
    ("control", "control flow statements"),
]
_SYMBOL = re.compile(r"[^\w\s]")
_WORDS = re.compile(r"[A-Za-z_]+")


_KIND_NAMES = {  # singular, plural
    "keyword": ("the Python keyword", "the Python keywords"), "name": ("the Python name", "the Python names"),
    "number": ("the number", "the numbers"), "identifier": ("the identifier", "the identifiers"),
    "camel": ("the CamelCase name", "the CamelCase names"), "word": ("the word", "the words"),
    "symbol": ("the symbol", "the symbols"), "token": ("the token", "the tokens"),
    "piece": ("the word piece", "the word pieces"),
}
_CODE_NAMES = frozenset({"self", "cls", "None", "True", "False"})
_TOKEN_TOPICS = {"def": "function definitions", "class": "class definitions", "import": "import statements",
                 "from": "import statements", "return": "return statements", "self": "attribute access on self",
                 "lambda": "lambda expressions", "yield": "generators", "raise": "exception handling",
                 "except": "exception handling", "try": "exception handling"}


def _token_kind(tok: str, code_like: bool) -> tuple[str, str]:
    """(kind, text) of one cleaned token; kind is a key of ``_KIND_NAMES`` or a whitespace phrase."""
    t = tok.strip()
    if not t:
        if "\n" in tok:
            return "newlines", ""
        return ("indentation whitespace" if code_like else "whitespace"), ""
    if code_like and keyword.iskeyword(t):
        return "keyword", t
    if code_like and t in _CODE_NAMES:
        return "name", t
    if _NUMBER.match(t):
        return "number", t
    if _IDENT_UNDERSCORE.match(t):
        return "identifier", t
    if code_like and _CAMEL.match(t):
        return "camel", t
    if _WORD.match(t):
        return ("name" if code_like and t.lower() not in _STOPWORDS else "word"), t
    if all(not c.isalnum() for c in t):
        return "symbol", t
    return "token", t


def _describe_tokens(tokens: list[str], code_like: bool, pieces: set[str] | None = None) -> str:
    """Noun phrase naming ``tokens`` grouped by kind: "the Python keywords 'def' and 'class'"."""
    groups: dict[str, list[str]] = {}
    for tok in tokens:
        kind, text = ("piece", tok.strip()) if pieces and tok in pieces else _token_kind(tok, code_like)
        items = groups.setdefault(kind, [])
        if text not in items:
            items.append(text)
    parts = []
    for kind, items in groups.items():
        if kind not in _KIND_NAMES:
            parts.append(kind)
            continue
        quoted = [f"'{x}'" for x in items]
        label = _KIND_NAMES[kind][len(items) > 1]
        parts.append(f"{label} {' and '.join(quoted)}")
    return " and ".join(parts)


_CODE_MARKERS = ('"""', "'''", "# ", "def ", "self.", "import ", "return ", "\n    ", "()", "_")


def _classify_window(local: str, wide: str) -> str:
    """Kind of text around one peak: code, docstring (prose inside source code), prose, numbers, symbols, mixed.

    ``local`` is a few tokens around the peak; ``wide`` the whole record, used to tell a docstring or
    comment (prose whose record also holds code) from prose.
    """
    n_chars = max(len(local), 1)
    words = _WORDS.findall(local)
    n_words = max(len(words), 1)
    hits = _code_signals(local)
    code_score = (3 * (hits["def"] + hits["class"] + hits["import"] + hits["self"]) + 2 * hits["indent"]
                  + hits["return"] + hits["control"] + hits["assign"] + hits["underscore"] + hits["dotted"]
                  + hits["none"] + 0.5 * hits["brackets"] + hits["call"])
    stop = sum(1 for w in words if w.lower() in _STOPWORDS) / n_words
    code_density = code_score / n_words
    if code_density > 0.25 and code_density * 2 > stop:
        return "code"
    if sum(local.count(d) for d in "0123456789") / n_chars > 0.25:
        return "numbers"
    prose_score = 10 * stop + sum(1 for w in words if len(w) > 2 and w.islower()) / n_words
    if prose_score > 1.5:
        wide_hits = sum(wide.count(m) for m in _CODE_MARKERS)
        return "docstring" if wide_hits >= 3 else "prose"
    if len(_SYMBOL.findall(local)) / n_chars > 0.3:
        return "symbols"
    return "mixed"


_KIND_ORDER = ("code", "docstring", "prose", "numbers", "symbols", "mixed")
_KIND_PHRASES = {"docstring": "comments and docstrings of Python source code", "prose": "English prose",
                 "numbers": "numbers and numeric data", "symbols": "punctuation and symbols", "mixed": "mixed text"}


def _code_topic(code_text: str, top_token: str) -> str:
    """The construct a code neuron's windows are about, from its top token or the windows' signals."""
    if top_token in _TOKEN_TOPICS:
        return f"{_TOKEN_TOPICS[top_token]} in Python source code"
    hits = _code_signals(code_text)
    best = max(_CODE_TOPICS, key=lambda sp: hits[sp[0]])
    if hits[best[0]] >= 2:
        return f"{best[1]} in Python source code"
    return "Python source code"


class HeuristicExplainer:
    """Deterministic explanations from the top tokens and the kind of text around them, with no LLM.

    The sentence names the most frequent top-activating tokens (quoted, BPE markers removed; word pieces
    marked as such) and the commonest kind of text around them, judged window by window: Python source
    code (and which construct), comments and docstrings of source code, English prose, numbers,
    punctuation. E.g. "the Python keyword 'def' and function definitions in Python source code",
    "the word 'the' in English prose". It carries enough meaning for embedding-based matching against
    dataset concepts, and runs at tens of thousands of neurons per minute.
    """

    def __init__(self, *, max_records: int = 10, context: int = 12, n_tokens: int = 2) -> None:
        self.max_records = max_records
        """Top records read per neuron."""
        self.context = context
        """Tokens on each side of a record's peak that characterise its context."""
        self.n_tokens = n_tokens
        """At most this many distinct top tokens are named."""

    def explain_one(self, records: NeuronRecords) -> NeuronExplanation:
        recs = [r for r in records.top[: self.max_records] if r.tokens]
        if not recs:
            return NeuronExplanation(records.neuron, None, source="heuristic",
                                     error="no activation records for this neuron")
        peak_tokens: Counter[str] = Counter()
        first_seen: dict[str, int] = {}
        is_piece: dict[str, bool] = {}
        kinds: Counter[str] = Counter()
        code_pieces: list[str] = []
        for r in recs:
            acts = r.activations
            p = max(range(len(acts)), key=acts.__getitem__)
            raw = r.tokens[p].translate(_BPE_MARKERS)
            # A token glued to a letter before it is a piece of a longer word ("ation" in "information").
            prev = r.tokens[p - 1].translate(_BPE_MARKERS) if p > 0 else ""
            is_piece.setdefault(raw, bool(raw[:1].isalpha() and prev[-1:].isalnum()))
            peak_tokens[raw] += 1
            first_seen.setdefault(raw, len(first_seen))
            lo, hi = max(0, p - self.context), min(len(acts), p + self.context + 1)
            local = "".join(r.tokens[lo:hi]).translate(_BPE_MARKERS)
            kind = _classify_window(local, "".join(r.tokens).translate(_BPE_MARKERS))
            kinds[kind] += 1
            if kind == "code":
                code_pieces.append(local)
        # The commonest kind of context; ties go to the more specific kind.
        kind = max(_KIND_ORDER, key=lambda k: (kinds[k], -_KIND_ORDER.index(k)))
        # Most frequent tokens first; ties broken by strength rank (records arrive strongest first).
        ranked = sorted(peak_tokens, key=lambda t: (-peak_tokens[t], first_seen[t]))[: self.n_tokens]
        subject = _describe_tokens(ranked, kind == "code", {t for t in ranked if is_piece[t]})
        if kind == "code":
            topic = _code_topic("\n".join(code_pieces), ranked[0].strip())
            sentence = f"{subject} {'in' if topic == 'Python source code' else 'and'} {topic}"
        else:
            sentence = f"{subject} in {_KIND_PHRASES[kind]}"
        return NeuronExplanation(records.neuron, sentence, source="heuristic")

    def __call__(self, records: Iterable[NeuronRecords], *, progress: bool = True) -> list[NeuronExplanation]:
        from tqdm.auto import tqdm

        return [self.explain_one(r) for r in tqdm(records, desc="explaining (heuristic)", disable=not progress)]


# --------------------------------------------------------------------------------------------------
# Running the explainers
# --------------------------------------------------------------------------------------------------

def records_digest(records: NeuronRecords, max_records: int) -> str:
    """sha256 over exactly what the explainer sees of a neuron (its first ``max_records`` top windows)."""
    payload = [[r.tokens, [round(float(a), 6) for a in r.activations]] for r in records.top[:max_records]]
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


def _iter_records(records: Any, neurons: Sequence[NeuronId] | None) -> Iterator[NeuronRecords]:
    if hasattr(records, "neuron_records") and hasattr(records, "neurons"):
        for n in (neurons if neurons is not None else records.neurons()):
            yield records.neuron_records(n)
        return
    if isinstance(records, NeuronRecords):
        records = [records]
    wanted = set(neurons) if neurons is not None else None
    for r in records:
        if not isinstance(r, NeuronRecords):
            raise TypeError(f"explain() takes NeuronRecords (or an object with neurons()/neuron_records()), "
                            f"got an item of type {type(r).__name__}")
        if wanted is None or r.neuron in wanted:
            yield r


def _chunks(it: Iterable[NeuronRecords], n: int) -> Iterator[list[NeuronRecords]]:
    buf: list[NeuronRecords] = []
    for x in it:
        buf.append(x)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


def make_client(config: ExplainConfig) -> ChatClient:
    """The chat client ``config`` asks for (reads the API key now, for ``openai``)."""
    if config.kind == "openai":
        assert config.llm is not None
        return OpenAIChatClient(config.llm, seed=config.seed)
    if config.kind == "local":
        return LocalChatClient(config.local_model, max_new_tokens=config.local_max_new_tokens,
                               temperature=config.local_temperature, seed=config.seed)
    raise ValueError(f"explainer kind {config.kind!r} does not use a chat client")


def _cache_identity(config: ExplainConfig) -> dict[str, Any]:
    if config.kind == "openai":
        assert config.llm is not None
        return {"explainer": "openai", **config.llm.sampling}
    return {"explainer": "local", "model": config.local_model, "max_new_tokens": config.local_max_new_tokens,
            "temperature": config.local_temperature, "seed": config.seed}


def explain(records: Any, config: ExplainConfig, *, neurons: Sequence[NeuronId] | None = None,
            cache_dir: str | os.PathLike[str] | None = None, progress: bool = True,
            client: ChatClient | None = None) -> list[NeuronExplanation]:
    """Explain each neuron; one :class:`NeuronExplanation` per neuron, failures included (``error`` set).

    ``records``: an iterable of :class:`NeuronRecords`, or an object with ``neurons()`` and
    ``neuron_records(neuron)``. ``neurons`` restricts the run to those neurons. ``cache_dir`` (or
    ``config.cache_dir``) keeps one file per successfully explained neuron, so a rerun asks the LLM only
    for the rest. ``client`` overrides the chat client built from ``config`` (tests, custom servers); cache
    keys still name the model of ``config``. A call that raises is recorded as that neuron's failure.
    """
    it = _iter_records(records, neurons)
    if config.kind == "heuristic":
        return HeuristicExplainer(max_records=config.max_records)(it, progress=progress)

    chat = client if client is not None else make_client(config)
    root = cache_dir if cache_dir is not None else config.cache_dir
    cache = DiskCache(root) if root is not None else None
    ident = _cache_identity(config)
    source = config.source

    async def one(rec: NeuronRecords) -> NeuronExplanation:
        key = None
        if cache is not None:
            key = DiskCache.key(prompt_version=PROMPT_VERSION, few_shot=config.few_shot,
                                max_records=config.max_records, neuron=[rec.neuron.layer, rec.neuron.index],
                                records=records_digest(rec, config.max_records), **ident)
            hit = cache.get(key)
            if isinstance(hit, dict) and isinstance(hit.get("explanation"), str) and hit["explanation"]:
                return NeuronExplanation(rec.neuron, hit["explanation"], source=source)
        try:
            messages = build_explanation_prompt(rec, few_shot=config.few_shot, max_records=config.max_records)
        except ValueError as exc:
            return NeuronExplanation(rec.neuron, None, source=source, error=str(exc))
        try:
            answer = await chat.generate(messages)
        except LLMError as exc:
            return NeuronExplanation(rec.neuron, None, source=source, error=f"LLM call failed: {exc}")
        except Exception as exc:  # noqa: BLE001 - any client (local model, user's own) fails per neuron
            logger.debug("explaining %s failed", rec.neuron, exc_info=True)
            return NeuronExplanation(rec.neuron, None, source=source,
                                     error=f"LLM call failed: {type(exc).__name__}: {exc}")
        try:
            text = parse_explanation(answer, max_chars=config.max_explanation_chars)
        except ValueError as exc:
            return NeuronExplanation(rec.neuron, None, source=source, error=f"unparseable answer: {exc}")
        if cache is not None and key is not None:
            cache.put(key, {"explanation": text, "neuron": [rec.neuron.layer, rec.neuron.index],
                            "prompt_version": PROMPT_VERSION})
        return NeuronExplanation(rec.neuron, text, source=source)

    from tqdm.auto import tqdm

    out: list[NeuronExplanation] = []
    total = len(neurons) if neurons is not None else (len(records) if hasattr(records, "__len__") else None)
    if total is None and hasattr(records, "n_neurons"):
        total = int(records.n_neurons)
    with tqdm(total=total, desc=f"explaining ({source})", disable=not progress) as bar:
        for chunk in _chunks(it, config.chunk_size):
            out.extend(run_all(chunk, one, bar=bar))
    n_fail = sum(not e.ok for e in out)
    if n_fail:
        logger.warning("%d of %d neurons could not be explained (recorded with error set); rerun the same command "
                       "to retry only them", n_fail, len(out))
    return out


def retry_failed(explanations: list[NeuronExplanation], records: Any, config: ExplainConfig, *,
                 neurons: Sequence[NeuronId] | None = None, cache_dir: str | os.PathLike[str] | None = None,
                 progress: bool = True, client: ChatClient | None = None,
                 where: str = "the previous run") -> tuple[list[NeuronExplanation], int]:
    """Explain again exactly the neurons of ``explanations`` that failed, plus those of ``neurons`` it lacks.

    Successes are kept as they are. Returns the merged list (the old order, then the neurons that were
    missing) and how many neurons were asked again; ``(explanations, 0)`` when nothing failed. The heuristic
    explainer is deterministic, so its failures are kept rather than recomputed. Says what it retries.
    """
    have = {e.neuron for e in explanations}
    missing = [n for n in (neurons or []) if n not in have]
    failed = [e.neuron for e in explanations if not e.ok] if config.kind != "heuristic" else []
    todo = failed + missing
    if not todo:
        return list(explanations), 0
    logger.warning("retrying %d failed and %d missing explanation(s) of %d from %s; the %d that succeeded are kept",
                   len(failed), len(missing), len(explanations) + len(missing), where,
                   sum(e.ok for e in explanations))
    fresh = {e.neuron: e for e in explain(records, config, neurons=todo, cache_dir=cache_dir, progress=progress,
                                          client=client)}
    merged = [fresh.get(e.neuron, e) for e in explanations] + [fresh[n] for n in missing if n in fresh]
    return merged, len(todo)


# --------------------------------------------------------------------------------------------------
# Saving, loading, importing
# --------------------------------------------------------------------------------------------------

def save_explanations(path: str | os.PathLike[str], explanations: Iterable[NeuronExplanation], *,
                      overwrite: bool = True) -> Path:
    """Write one JSON object per line, atomically (temp file + ``os.replace``).

    With ``overwrite=False`` an existing file is refused (the CLI passes that unless ``--overwrite``).
    """
    p = Path(path)
    if p.exists() and not overwrite:
        raise FileExistsError(f"{p} already exists; pass overwrite=True (CLI: --overwrite) or choose another path")
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for e in explanations:
                f.write(json.dumps(e.to_json(), ensure_ascii=False) + "\n")
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return p


def load_explanations(path: str | os.PathLike[str]) -> list[NeuronExplanation]:
    """Read a file written by :func:`save_explanations`."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"explanations file {p} does not exist; create it with `snip explain --out {p}`")
    out = []
    with open(p, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(NeuronExplanation.from_json(json.loads(line)))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{p}:{i}: not a saved explanation ({exc}); expected keys layer, index, "
                                 "explanation, score, source, error") from None
    return out


def explain_to_file(out: str | os.PathLike[str], *, records: Any = None, config: ExplainConfig | None = None,
                    import_path: str | os.PathLike[str] | None = None, min_score: float | None = None,
                    neurons: Sequence[NeuronId] | None = None, cache_dir: str | os.PathLike[str] | None = None,
                    n_layers: int | None = None, d_mlp: int | None = None, overwrite: bool = False,
                    progress: bool = True) -> list[NeuronExplanation]:
    """Explain (or import) and write ``out`` (JSONL) plus ``<out>.config.json`` (the resolved config, no secrets).

    With ``import_path`` the published explanations are read instead, checked against the model shape of
    ``n_layers``/``d_mlp`` (default: taken from ``records`` when it has ``layers``/``d_mlp``).
    ``cache_dir`` defaults to ``<out>.cache/``. When ``out`` exists, the same call again (same explainer
    config and records) retries exactly the neurons that failed, keeping the rest (``retry_failed``);
    ``out`` from another call is refused unless ``overwrite``.
    """
    outp = Path(out)
    cfg_path = outp.with_name(outp.name + ".config.json")
    if outp.exists() and not overwrite:
        # The same command again retries what failed (what explain() advises); anything else is refused.
        config = config or ExplainConfig()
        if import_path is not None:
            meta = {"import": str(import_path), "min_score": min_score}
        else:
            meta = {"explain": config.to_json(), "prompt_version": PROMPT_VERSION,
                    "records": getattr(records, "config_hash", None)}
        try:
            old_meta = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old_meta = None
        same = (isinstance(old_meta, dict) and (import_path is not None or records is not None)
                and {k: old_meta.get(k) for k in meta} == json.loads(json.dumps(meta, default=str)))
        if not same:
            raise FileExistsError(f"{outp} already exists and holds explanations of another command (see "
                                  f"{cfg_path.name}); pass --overwrite to replace it or choose another --out")
        if import_path is not None:  # an import has no per-neuron failures to retry
            logger.info("%s already holds this import; nothing to do", outp)
            return load_explanations(outp)
        root = Path(cache_dir) if cache_dir is not None else outp.with_name(outp.name + ".cache")
        result, n_retried = retry_failed(load_explanations(outp), records, config, neurons=neurons, cache_dir=root,
                                         progress=progress, where=str(outp))
        if not n_retried:
            logger.info("%s already holds these explanations and none failed; nothing to do", outp)
            return result
    elif import_path is not None:
        if records is not None and hasattr(records, "layers") and hasattr(records, "d_mlp"):
            n_layers = n_layers if n_layers is not None else max(records.layers) + 1
            d_mlp = d_mlp if d_mlp is not None else int(records.d_mlp)
        result = import_explanations(import_path, min_score=min_score, n_layers=n_layers, d_mlp=d_mlp)
        meta: dict[str, Any] = {"import": str(import_path), "min_score": min_score}
    else:
        if records is None:
            raise ValueError("nothing to explain: pass records (CLI: --records DIR) or an import file (--import FILE)")
        config = config or ExplainConfig()
        root = Path(cache_dir) if cache_dir is not None else outp.with_name(outp.name + ".cache")
        result = explain(records, config, neurons=neurons, cache_dir=root, progress=progress)
        meta = {"explain": config.to_json(), "prompt_version": PROMPT_VERSION,
                "records": getattr(records, "config_hash", None)}
    save_explanations(outp, result, overwrite=True)
    fd, tmp = tempfile.mkstemp(dir=cfg_path.parent, prefix=f".{cfg_path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({**meta, "n_explanations": len(result), "n_failed": sum(not e.ok for e in result)}, f, indent=2)
    os.replace(tmp, cfg_path)
    return result


ImportFormat = Literal["openai", "deepdecipher", "neuronpedia"]


def _read_json_items(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, JSON value) for a .json/.jsonl file or every such file under a directory."""
    files = sorted(q for q in path.rglob("*") if q.suffix in (".json", ".jsonl") and q.is_file()) \
        if path.is_dir() else [path]
    for f in files:
        text = f.read_text(encoding="utf-8")
        try:
            value = json.loads(text)
            yield str(f), value
            continue
        except ValueError:
            pass
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    yield f"{f}:{i}", json.loads(line)
                except ValueError as exc:
                    raise ValueError(f"{f}:{i}: not JSON ({exc}); expected JSON or JSON Lines") from None


def _flatten(loc: str, value: Any) -> Iterator[tuple[str, dict]]:
    if isinstance(value, list):
        for i, v in enumerate(value):
            if isinstance(v, dict):
                yield f"{loc}[{i}]", v
    elif isinstance(value, dict):
        for k in ("explanations", "data", "results"):
            if isinstance(value.get(k), list) and value[k] and isinstance(value[k][0], dict) \
                    and "scored_explanations" not in value:
                yield from _flatten(f"{loc}.{k}", value[k])
                return
        yield loc, value


def _detect(entry: dict) -> ImportFormat | None:
    if "scored_explanations" in entry:
        return "openai"
    if "neuron_explainer" in entry or ("explanation" in entry and "score" in entry
                                       and any(k in entry for k in ("neuron", "layer_index", "neuron_index"))):
        return "deepdecipher"
    if "description" in entry and "index" in entry:
        return "neuronpedia"
    if set(entry) >= {"explanation", "score"}:
        return "deepdecipher"
    return None


def _location_indices(loc: str) -> tuple[int, int] | None:
    """(layer, neuron) from a path like ``.../5/123.json`` (how OpenAI and DeepDecipher files are laid out)."""
    m = re.search(r"(\d+)[/\\](\d+)\.jsonl?(?::\d+)?$", loc)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _as_float(x: Any) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _parse_openai(loc: str, e: dict) -> list[tuple[NeuronId, str, float | None]]:
    nid = e.get("neuron_id") or {}
    layer, index = nid.get("layer_index"), nid.get("neuron_index")
    if layer is None or index is None:
        guess = _location_indices(loc)
        if guess is None:
            raise ValueError(f"{loc}: OpenAI entry has no neuron_id.layer_index/neuron_index")
        layer, index = guess
    out = []
    for se in e.get("scored_explanations") or []:
        text = se.get("explanation")
        sim = se.get("scored_simulation") or {}
        score = _as_float(sim.get("ev_correlation_score", se.get("ev_correlation_score")))
        if isinstance(text, str):
            out.append((NeuronId(int(layer), int(index)), text, score))
    return out


def _parse_deepdecipher(loc: str, e: dict) -> list[tuple[NeuronId, str, float | None]]:
    page = e.get("neuron_explainer", e)
    if isinstance(page, dict) and isinstance(page.get("data"), dict):
        page = page["data"]
    layer = e.get("layer", e.get("layer_index"))
    index = e.get("neuron", e.get("neuron_index", e.get("index")))
    if layer is None or index is None:
        guess = _location_indices(loc)
        if guess is None:
            raise ValueError(f"{loc}: DeepDecipher entry has no layer/neuron indices (and the file is not laid "
                             "out as <layer>/<neuron>.json)")
        layer, index = guess
    text = page.get("explanation") if isinstance(page, dict) else None
    if not isinstance(text, str):
        return []
    return [(NeuronId(int(layer), int(index)), text, _as_float(page.get("score")))]


_NP_LAYER = re.compile(r"^(\d+)(?:-(.+))?$")


def _parse_neuronpedia(loc: str, e: dict, warned: set[str]) -> list[tuple[NeuronId, str, float | None]]:
    m = _NP_LAYER.match(str(e.get("layer", "")).strip())
    if not m:
        raise ValueError(f"{loc}: Neuronpedia layer {e.get('layer')!r} is not '<layer>-<source>' (e.g. '5-mlp')")
    kind = m.group(2) or ""
    if kind and "mlp" not in kind.lower() and kind not in warned:
        warned.add(kind)
        logger.warning("Neuronpedia source %r is not an MLP-neuron set (e.g. SAE features); indices are read "
                       "as MLP neuron indices anyway", kind)
    scores = e.get("scores")
    vals: list[float] = []
    if isinstance(scores, list):
        for s in scores:
            v = _as_float(s.get("value", s.get("score")) if isinstance(s, dict) else s)
            if v is not None:
                vals.append(v)
    elif scores is not None and _as_float(scores) is not None:
        vals.append(float(scores))
    if _as_float(e.get("score")) is not None:
        vals.append(float(e["score"]))
    text = e.get("description")
    if not isinstance(text, str):
        return []
    return [(NeuronId(int(m.group(1)), int(e["index"])), text, max(vals) if vals else None)]


def import_explanations(path: str | os.PathLike[str], *, format: ImportFormat | None = None,  # noqa: A002
                        min_score: float | None = None, n_layers: int | None = None,
                        d_mlp: int | None = None) -> list[NeuronExplanation]:
    """Read published explanations with their scores; one per neuron (the best-scored), sorted by neuron.

    Formats (auto-detected per entry when ``format`` is None): ``openai`` (neuron-explainer JSONL:
    ``neuron_id.layer_index/neuron_index``, ``scored_explanations[].explanation`` and
    ``.scored_simulation.ev_correlation_score``), ``deepdecipher`` (``neuron_explainer`` pages
    ``{"explanation", "score"}`` with ``layer``/``neuron`` fields or laid out as ``<layer>/<neuron>.json``),
    ``neuronpedia`` (explanation exports: ``layer`` like ``"5-mlp"``, ``index``, ``description``,
    ``scores``). ``path`` may be a file or a directory of such files. Explanations scored below
    ``min_score`` (or unscored, when it is set) are dropped. With ``n_layers``/``d_mlp`` an entry outside
    the model raises, naming the entry.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"import file {p} does not exist")
    if format is not None and format not in ("openai", "deepdecipher", "neuronpedia"):
        raise ValueError(f"unknown import format {format!r}; use 'openai', 'deepdecipher' or 'neuronpedia' "
                         "(or None to auto-detect)")
    best: dict[NeuronId, tuple[str, float | None]] = {}
    warned: set[str] = set()
    n_entries = n_dropped = 0
    for loc, value in _read_json_items(p):
        for eloc, entry in _flatten(loc, value):
            fmt = format or _detect(entry)
            if fmt is None:
                raise ValueError(f"{eloc}: cannot tell the format of entry with keys {sorted(entry)[:8]}; pass "
                                 "format='openai' | 'deepdecipher' | 'neuronpedia'")
            try:
                if fmt == "openai":
                    rows = _parse_openai(eloc, entry)
                elif fmt == "deepdecipher":
                    rows = _parse_deepdecipher(eloc, entry)
                else:
                    rows = _parse_neuronpedia(eloc, entry, warned)
            except (KeyError, TypeError, ValueError) as exc:
                msg = str(exc) if str(exc).startswith(eloc) else f"{eloc}: not a {fmt} explanation entry ({exc!r})"
                raise ValueError(msg) from None
            for nid, text, score in rows:
                n_entries += 1
                if nid.layer < 0 or nid.index < 0 or (n_layers is not None and nid.layer >= n_layers) or \
                        (d_mlp is not None and nid.index >= d_mlp):
                    raise ValueError(
                        f"{eloc}: neuron layer {nid.layer}, index {nid.index} is outside the model "
                        f"(n_layers={n_layers}, d_mlp={d_mlp}); this file is for another model - import the "
                        "explanations published for your model")
                text = text.strip()
                if text.lower().startswith(EXPLANATION_PREFIX):
                    text = text[len(EXPLANATION_PREFIX):].strip()
                if not text or (min_score is not None and (score is None or score < min_score)):
                    n_dropped += 1
                    continue
                old = best.get(nid)
                if old is None or (score is not None and (old[1] is None or score > old[1])):
                    best[nid] = (text, score)
    if n_entries == 0:
        raise ValueError(f"{p}: no explanations found; expected OpenAI neuron-explainer JSONL, DeepDecipher "
                         "neuron_explainer JSON or a Neuronpedia explanation export")
    logger.info("imported %d explanations from %s (%d of %d entries dropped by min_score=%s or empty)",
                len(best), p, n_dropped, n_entries, min_score)
    source = f"import:{p.name}"
    return [NeuronExplanation(n, t, score=s, source=source) for n, (t, s) in sorted(best.items())]


__all__ = [
    "PROMPT_VERSION", "EXPLANATION_PREFIX", "SYSTEM_PROMPT", "FEW_SHOT_EXAMPLES", "ExplainConfig",
    "HeuristicExplainer", "LocalChatClient", "build_explanation_prompt", "parse_explanation",
    "format_activation_records", "scale_activations", "non_zero_proportion", "max_activation_of",
    "explain", "explain_to_file", "make_client", "records_digest", "save_explanations", "load_explanations",
    "import_explanations",
]
