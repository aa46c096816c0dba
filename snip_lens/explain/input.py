"""Offline input-centric explainer: a description of what a neuron reads, from its activation records only.

No LLM and no knowledge of any language, script or domain: every word it quotes comes from the neuron's
own records. It reads

- the tokens where the neuron activates strongly (at least half of each top window's peak), weighted by
  their share of that activation mass;
- the tokens right before and right after the peaks, when most top windows share them;
- the context tokens that set its top windows apart from its random windows (a smoothed log ratio of the
  share of windows holding each token), i.e. what kind of text it fires in, whatever that text is;
- for the evidence (not the sentence): the peak token of every top window, weighted by its activation, and
  the tokens that carry its activity on typical text (every token of its random windows, weighted by
  |activation|), which the evidence match of :mod:`snip_lens.score` reads;

and writes them into one sentence ("the tokens 'X' and 'Y' after 'A', in text with 'p', 'q' and 'r'") plus
the typed :class:`~snip_lens.types.InputEvidence` it was written from.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Iterable

from ..types import ActivationRecord, InputEvidence, NeuronEvidence, NeuronExplanation, NeuronRecords, TokenWeight

_BPE_MARKERS = str.maketrans({"Ġ": " ", "▁": " ", "Ċ": "\n", "ĉ": "\t"})
"""Byte-level BPE and SentencePiece display markers (tokenizer conventions, not text)."""

SOURCE = "offline-input"
"""``source`` of the explanations this explainer writes."""


def clean_token(token: str) -> str:
    """A token as text: tokenizer display markers decoded, surrounding whitespace removed."""
    return token.translate(_BPE_MARKERS).strip()


def show_token(token: str) -> str:
    """A token quoted for a sentence; line breaks, tabs and other unprintable characters are shown escaped
    ('\\n', '\\t', '\\x1f'), spaces of a whitespace-only token as '␣'."""
    t = clean_token(token)
    if not t:
        raw = token.translate(_BPE_MARKERS)
        t = raw.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "␣") or "␣"
    # an explanation is one printable line: control characters and line separators are shown escaped
    return "'" + "".join(c if c.isprintable() else repr(c)[1:-1] for c in t) + "'"


@functools.lru_cache(maxsize=1 << 17)
def _key(token: str) -> str:
    # Case and surrounding whitespace are kept apart from identity only for display: ' The' and 'The'
    # are one token for the description.
    t = clean_token(token)
    return t if t else token.translate(_BPE_MARKERS)


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


ACTIVE_TOKENS = 64
"""Tokens kept in ``InputEvidence.active`` (the largest shares of a neuron's activity on typical text)."""


def _peak(r: ActivationRecord) -> int:
    """Index of a window's largest activation (the first, on ties)."""
    return max(range(len(r.activations)), key=r.activations.__getitem__)


def _shares(mass: dict[str, float], limit: int | None = None) -> list[TokenWeight]:
    """``mass`` as shares of its total, largest first (ties by token), the first ``limit``; [] without mass."""
    total = sum(mass.values())
    if total <= 0:
        return []
    items = sorted(mass.items(), key=lambda x: (-x[1], x[0]))[:limit]
    return [TokenWeight(t, w / total) for t, w in items]


def peak_shares(records: NeuronRecords) -> list[TokenWeight]:
    """The peak token of every top window, weight = its share of the windows' summed |peak activation|
    (each window alike when every peak is 0)."""
    mass: Counter[str] = Counter()
    recs = [r for r in records.top if r.tokens]
    for r in recs:
        mass[_key(r.tokens[_peak(r)])] += abs(max(r.activations))
    return _shares(mass) or _shares(Counter(_key(r.tokens[_peak(r)]) for r in recs))


def active_shares(records: NeuronRecords, limit: int = ACTIVE_TOKENS) -> list[TokenWeight]:
    """The tokens carrying a neuron's activity on typical text: every token of its random windows, weight =
    its share of the |activation| summed over them (the largest ``limit``). Magnitude, not sign: a gated
    neuron's strong negative activations move the output as much as positive ones."""
    mass: Counter[str] = Counter()
    for r in records.random:
        for t, a in zip(r.tokens, r.activations):
            mass[_key(t)] += abs(a)
    return _shares(mass, limit)


def input_evidence(records: NeuronRecords, *, max_records: int = 10, n_tokens: int = 3, n_context: int = 3,
                   strong: float = 0.5, min_share: float = 0.5, n_contexts: int = 3) -> InputEvidence | None:
    """The :class:`InputEvidence` of one neuron, or None when it has no non-empty top record.

    The sentence's fields read the first ``max_records`` top windows; ``peaks`` reads all of them and
    ``active`` all random windows (:func:`peak_shares`, :func:`active_shares`)."""
    recs = [r for r in records.top[:max_records] if r.tokens]
    if not recs:
        return None
    mass: Counter[str] = Counter()
    before: Counter[str] = Counter()
    after: Counter[str] = Counter()
    contexts: list[str] = []
    top_df: Counter[str] = Counter()
    for r in recs:
        acts = r.activations
        p = _peak(r)
        peak = acts[p]
        for t, a in zip(r.tokens, acts):
            if a > 0 and a >= strong * peak:
                mass[_key(t)] += a
        if peak <= 0:  # a neuron that never fires positively: its peak token is still what it reads
            mass[_key(r.tokens[p])] += 1.0
        if p > 0:
            before[_key(r.tokens[p - 1])] += 1
        if p + 1 < len(r.tokens):
            after[_key(r.tokens[p + 1])] += 1
        top_df.update({_key(t) for i, t in enumerate(r.tokens) if i != p})
        if len(contexts) < n_contexts:
            lo, hi = max(0, p - 8), min(len(r.tokens), p + 4)
            contexts.append("".join(r.tokens[lo:p]) + "[[" + r.tokens[p] + "]]" + "".join(r.tokens[p + 1:hi]))
    total = sum(mass.values()) or 1.0
    top_tokens = [TokenWeight(t, w / total) for t, w in sorted(mass.items(), key=lambda x: (-x[1], x[0]))
                  if w / total >= 0.05][:n_tokens]
    n = len(recs)
    preceding = [TokenWeight(t, c / n) for t, c in before.most_common(n_context) if c / n > min_share]
    following = [TokenWeight(t, c / n) for t, c in after.most_common(n_context) if c / n > min_share]
    distinctive: list[TokenWeight] = []
    rand = [r for r in records.random if r.tokens]
    if rand:
        rand_df: Counter[str] = Counter()
        for r in rand:
            rand_df.update({_key(t) for t in r.tokens})
        shown = {t.token for t in top_tokens}
        scored = []
        for t, c in top_df.items():
            if c < 2 or c < 0.3 * n or t in shown or not clean_token(t):
                continue
            # smoothed log ratio of the share of top vs random windows that hold the token
            z = math.log((c + 0.5) / (n + 1.0)) - math.log((rand_df.get(t, 0) + 0.5) / (len(rand) + 1.0))
            if z > 0.5:
                scored.append((z, c, t))
        scored.sort(key=lambda x: (-x[0], -x[1], x[2]))
        distinctive = [TokenWeight(t, z) for z, _, t in scored[:n_context]]
    return InputEvidence(top_tokens=top_tokens, preceding=preceding, following=following,
                         distinctive=distinctive, contexts=contexts, peaks=peak_shares(records),
                         active=active_shares(records))


def describe_input(ev: InputEvidence) -> str:
    """One sentence naming the evidence: "the tokens 'X' and 'Y' after 'A', in text with 'p' and 'q'"."""
    toks = [show_token(t.token) for t in ev.top_tokens]
    head = f"the token {toks[0]}" if len(toks) == 1 else f"the tokens {_join(toks)}"
    parts = [head]
    if ev.preceding:
        parts.append(f"after {_join([show_token(t.token) for t in ev.preceding])}")
    if ev.following:
        parts.append(f"before {_join([show_token(t.token) for t in ev.following])}")
    text = " ".join(parts)
    if ev.distinctive:
        text += f", in text with {_join([show_token(t.token) for t in ev.distinctive])}"
    return text


class OfflineInputExplainer:
    """Input-centric explanations with no LLM and no rule for any language or domain (see module doc)."""

    def __init__(self, *, max_records: int = 10, n_tokens: int = 3, n_context: int = 3) -> None:
        self.max_records = max_records
        """Top records read per neuron."""
        self.n_tokens = n_tokens
        """At most this many strongly activating tokens are named."""
        self.n_context = n_context
        """At most this many preceding / following / distinctive context tokens are named."""

    def explain_one(self, records: NeuronRecords) -> NeuronExplanation:
        ev = input_evidence(records, max_records=self.max_records, n_tokens=self.n_tokens,
                            n_context=self.n_context)
        if ev is None or not ev.top_tokens:
            return NeuronExplanation(records.neuron, None, source=SOURCE, kind="input",
                                     error="no activation records for this neuron")
        return NeuronExplanation(records.neuron, describe_input(ev), source=SOURCE, kind="input",
                                 evidence=NeuronEvidence(input=ev))

    def __call__(self, records: Iterable[NeuronRecords], *, progress: bool = True) -> list[NeuronExplanation]:
        from tqdm.auto import tqdm

        return [self.explain_one(r) for r in tqdm(records, desc="explaining (offline input)",
                                                  disable=not progress)]


HeuristicExplainer = OfflineInputExplainer
"""The former name of the offline explainer (kind ``"heuristic"``), kept for existing imports."""
