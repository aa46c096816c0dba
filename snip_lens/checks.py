"""Checks on what users feed the pipeline: binary files posing as text, degenerate explanation sets.

Neither check knows any language or domain: binary input is told by bytes that never occur in text (NUL,
other C0 controls, undecodable bytes), and a degenerate explanation set by how little its explanations vary.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

logger = logging.getLogger(__name__)

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f\ufffd]")
"""Characters that text files do not hold: C0 controls except tab/newlines/form feed, DEL, and U+FFFD (what an
undecodable byte becomes when read with ``errors="replace"``)."""


def non_text_share(text: str, sample: int = 65536) -> float:
    """Share of characters in the first ``sample`` of ``text`` that no text file holds (see ``_CONTROL``)."""
    head = text[:sample]
    return len(_CONTROL.findall(head)) / len(head) if head else 0.0


def looks_binary(text: str, *, threshold: float = 0.05) -> bool:
    """Whether ``text`` is the decoding of a binary file: a NUL, or more than ``threshold`` non-text characters."""
    return "\x00" in text[:65536] or non_text_share(text) > threshold


def check_not_binary(texts: Sequence[str], source: str, flag: str = "--forget") -> None:
    """Raise ``ValueError`` naming ``source`` when any document of it looks like a binary file."""
    bad = [i for i, t in enumerate(texts) if looks_binary(t)]
    if bad:
        share = non_text_share(texts[bad[0]])
        raise ValueError(f"{flag} {source!r} looks like binary data, not text: {len(bad)} of {len(texts)} "
                         f"documents hold NUL or other non-text bytes (first: document {bad[0]}, {share:.0%} "
                         "non-text characters); give text files (.txt, .jsonl, source code)")


@dataclass
class ExplanationStats:
    """How varied a set of explanations is (a weak or misconfigured explainer answers the same for all)."""

    n: int
    """Explanations in the set, failures included."""
    n_ok: int
    """Usable explanations."""
    n_distinct: int
    """Distinct usable explanations (case and surrounding space ignored)."""
    top_share: float
    """Share of the usable explanations taken by the most frequent one."""
    top_explanation: str
    """The most frequent explanation."""
    n_repetitive: int
    """Usable explanations that are one short fragment repeated (e.g. "the the the the")."""
    degenerate: bool
    """True when the set carries little information: see :func:`explanation_stats`."""
    reasons: list[str]
    """Why it was flagged, in words (empty when not degenerate)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _repetitive(text: str) -> bool:
    words = text.lower().split()
    if len(words) >= 4 and len(set(words)) <= max(1, len(words) // 4):
        return True
    compact = re.sub(r"\s+", "", text.lower())
    # one fragment of up to 8 characters repeated over the whole answer ("ababab...")
    return len(compact) >= 12 and any(compact == (compact[:n] * (len(compact) // n + 1))[:len(compact)]
                                      for n in range(1, 9))


def explanation_stats(explanations: Iterable[Any], *, max_top_share: float = 0.5,
                      min_distinct_share: float = 0.05, max_repetitive_share: float = 0.2) -> ExplanationStats:
    """Variety of ``explanations`` (``NeuronExplanation``s), flagged degenerate when, with at least 10 usable:
    one explanation covers more than ``max_top_share`` of them, fewer than ``min_distinct_share`` are
    distinct, or more than ``max_repetitive_share`` are a repeated fragment."""
    items = list(explanations)
    texts = [" ".join(e.explanation.split()).lower() for e in items if e.ok]
    counts = Counter(texts)
    top, top_n = counts.most_common(1)[0] if counts else ("", 0)
    n_ok = len(texts)
    n_rep = sum(_repetitive(t) for t in texts)
    reasons = []
    if n_ok >= 10:
        if top_n / n_ok > max_top_share:
            reasons.append(f"{top_n} of {n_ok} explanations are the same sentence {top!r}")
        if len(counts) / n_ok < min_distinct_share:
            reasons.append(f"only {len(counts)} distinct explanations for {n_ok} neurons")
        if n_rep / n_ok > max_repetitive_share:
            reasons.append(f"{n_rep} of {n_ok} explanations are one fragment repeated")
    return ExplanationStats(n=len(items), n_ok=n_ok, n_distinct=len(counts), top_share=top_n / n_ok if n_ok else 0.0,
                            top_explanation=top, n_repetitive=n_rep, degenerate=bool(reasons), reasons=reasons)


def warn_if_degenerate(stats: ExplanationStats, where: str) -> None:
    """Log a warning saying why the explanations of ``where`` look degenerate and what to check."""
    if stats.degenerate:
        logger.warning("the explanations of %s look degenerate (%s): a weak or misconfigured explainer? SNIP "
                       "scores built on them say little; check the explainer's answers, try a stronger "
                       "--llm-model or another --explainer", where, "; ".join(stats.reasons))
