"""Prompts of the LLM explainers (pure functions; golden-string tested).

The input-centric prompt is OpenAI's neuron explainer (``TokenActivationPairExplainer`` with the
``ORIGINAL`` few-shot examples; paper appendix A.1). Answers are parsed by :func:`parse_explanation`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any

from ..types import ActivationRecord, NeuronRecords

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
    for prefix in (EXPLANATION_PREFIX, "the main thing this neuron does is"):  # echoed prompt endings
        if text.lower().startswith(prefix):
            text = text[len(prefix):].strip()
            break
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
# Output-centric and combined prompts
# --------------------------------------------------------------------------------------------------

OUTPUT_PROMPT_VERSION = "vocabproj-tokens/v1"
"""Identifies the output-centric prompt; part of every cache key."""

BOTH_PROMPT_VERSION = "activations+vocabproj/v1"
"""Identifies the combined prompt; part of every cache key."""

OUTPUT_PREFIX = "the main thing this neuron does is"
"""Output-centric and combined explanations complete this phrase."""

OUTPUT_SYSTEM_PROMPT = (
    "We're studying neurons in a neural network. When a neuron activates, it changes which token the model "
    "predicts next: it raises the logits of some tokens and lowers others. Look at the tokens the neuron "
    "promotes and suppresses and summarize in a single sentence what the neuron does. Don't list examples "
    "of words.\n\nThe format is token<tab>logit weight: the change of that token's logit per unit of the "
    "neuron's activation."
)
"""System message of the output-centric prompt (VocabProj evidence only)."""

BOTH_SYSTEM_PROMPT = (
    "We're studying neurons in a neural network. Each neuron looks for some particular thing in a short "
    "document, and when it activates it changes which token the model predicts next. Look at the parts of "
    "the document the neuron activates for, and at the tokens it promotes and suppresses, and summarize in "
    "a single sentence what the neuron looks for and what it does. Don't list examples of words.\n\n"
    "The activation format is token<tab>activation. Activation values range from 0 to 10. A neuron finding "
    "what it's looking for is represented by a non-zero activation value. The higher the activation value, "
    "the stronger the match. The promoted and suppressed tokens are listed as token<tab>logit weight: the "
    "change of that token's logit per unit of the neuron's activation."
)
"""System message of the combined prompt (activation records and VocabProj evidence)."""


def _token_weights(items: Sequence[Any], n: int) -> str:
    return "".join(f"{_token_text(t.token)}\t{t.weight:.3g}\n" for t in list(items)[:n])


def _output_section(evidence: Any, n: int) -> str:
    return (f"Promoted tokens:\n<start>\n{_token_weights(evidence.promoted, n)}<end>\n"
            f"Suppressed tokens:\n<start>\n{_token_weights(evidence.suppressed, n)}<end>\n")


def build_output_prompt(evidence: Any, *, n_tokens: int = 12) -> list[dict]:
    """Chat messages asking for an output-centric explanation from VocabProj evidence (no few-shot examples).

    ``evidence`` is an :class:`~snip_lens.types.OutputEvidence`. The user message lists the top ``n_tokens``
    promoted and suppressed tokens with their logit weights (three significant digits) and ends with
    "the main thing this neuron does is".
    """
    if not evidence.promoted and not evidence.suppressed:
        raise ValueError("output evidence has no promoted or suppressed tokens; compute VocabProj first")
    text = f"\n\nNeuron 1\n{_output_section(evidence, n_tokens)}\nExplanation of neuron 1 behavior: {OUTPUT_PREFIX}"
    return [{"role": "system", "content": OUTPUT_SYSTEM_PROMPT}, {"role": "user", "content": text}]


def build_both_prompt(records: NeuronRecords | Sequence[ActivationRecord], evidence: Any, *,
                      max_records: int | None = None, n_tokens: int = 12) -> list[dict]:
    """Chat messages showing both kinds of evidence: the activation records (OpenAI's format, zeros-filtered
    repeat when sparse) then the promoted and suppressed tokens; ends with "the main thing this neuron does is".
    """
    recs = list(records.top if isinstance(records, NeuronRecords) else records)
    if max_records is not None:
        recs = recs[:max_records]
    if not recs or not any(r.tokens for r in recs):
        name = f" for neuron {records.neuron}" if isinstance(records, NeuronRecords) else ""
        raise ValueError(f"no activation records{name}: the combined prompt needs at least one top window")
    mx = max_activation_of(recs)
    scaled = [scale_activations(r.activations, mx) for r in recs]
    text = f"\n\nNeuron 1\nActivations:{_format_scaled(recs, scaled, False)}"
    if _nonzero_share(scaled) < REPEAT_NONZERO_BELOW:
        text += f"\nSame activations, but with all zeros filtered out:{_format_scaled(recs, scaled, True)}"
    text += f"\n{_output_section(evidence, n_tokens)}\nExplanation of neuron 1 behavior: {OUTPUT_PREFIX}"
    return [{"role": "system", "content": BOTH_SYSTEM_PROMPT}, {"role": "user", "content": text}]
