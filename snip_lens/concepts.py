"""The concepts of a forget dataset (SNIP step 2), from an LLM or, offline, from distinctive words.

With an LLM, the prompt of the paper's appendix A.2 is sent with ``n_samples`` *distinct* documents drawn
at random from the forget set (each cut to ``max_sample_chars``), and the numbered list it answers is
parsed, trimmed and de-duplicated. Answers are cached under a sha256 key over the prompt and the sampling
parameters; only answers that parsed are cached.

Without an LLM, :func:`distinctive_concepts` compares the forget set with a reference corpus: the
log-odds ratio with an informative Dirichlet prior (Monroe, Colaresi & Quinn 2008, "Fightin' Words")
ranks words, identifiers, symbols and frequent bigrams by how much more the forget set uses them, and
each is turned into a phrase written like a neuron explanation ("the Python keyword 'def' in Python
source code", "code identifiers with underscores like 'file_name'"). A few domain-level concepts
("Python source code", "indentation and newlines in source code", "English prose") are added when the
character statistics of the forget set say so (share of symbols, indented lines, identifiers).
"""

from __future__ import annotations

import keyword
import logging
import math
import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from .types import DatasetConcepts

logger = logging.getLogger(__name__)

CONCEPTS_PROMPT_VERSION = "a2-v1"
"""Version of the concepts prompt; part of every cache key (bump it when the prompt text changes)."""

_PROMPT_HEAD = """We're studying how neurons in a neural network affect the model's performance on specific tasks. \
Each neuron looks for some particular thing in a short document. To measure how neurons are related to the \
given task, we want to know what concepts are important for the task.

Neuron concepts examples:
1. the past and present tense of the verb "to be" (was, were, is).
2. variations of the verb 'be'.
3. modal verbs, especially "would" and "were".
4. action verbs related to starting or beginning.
5. future tense verbs and words related to commitment.
6. the usage of the verb "to be" and its conjugations.
7. the verb 'use' and its variations.
8. the word "could" and similar auxiliary verbs indicating possibility.
9. the word "like" and its variations, as well as other verbs expressing desire or interest.
10. verbs related to posting and sharing information.

Given the input samples below:
"""

_PROMPT_TAIL = """List a comprehensive list of categories of concepts that are important for language models to \
comprehend the given texts. Output in the following format:
1. concept1
2. concept2
..."""

CONCEPTS_MAX_TOKENS = 800
"""Answer budget for the concept list; an ``LLMConfig`` with a smaller ``max_tokens`` is raised to this."""


def build_concepts_prompt(samples: list[str]) -> list[dict]:
    """The appendix A.2 prompt as chat messages, with one ``sampleN: ...`` paragraph per sample."""
    if not samples:
        raise ValueError("build_concepts_prompt needs at least one sample of the forget set; got none")
    lines = [f"sample{i}: {s.strip()}" for i, s in enumerate(samples, start=1)]
    content = _PROMPT_HEAD + "\n" + "\n\n".join(lines) + "\n\n" + _PROMPT_TAIL
    return [{"role": "user", "content": content}]


_ITEM = re.compile(r"^\s*(?:\(?\d{1,3}[.):]|[-*\u2022])\s+(.+?)\s*$")
_PLACEHOLDER = re.compile(r"^(?:concept\s*\d*|\.\.\.|…|etc\.?)$", re.IGNORECASE)


def parse_concepts(text: str) -> list[str]:
    """The concepts of a numbered or bulleted list: trimmed, de-duplicated case-insensitively, in order.

    Markdown emphasis, surrounding quotes and a trailing full stop are removed; the format's own
    placeholders ("concept1", "...") are dropped. Raises ``ValueError`` quoting the answer when no
    concept can be found (an empty or malformed answer).
    """
    if not isinstance(text, str):
        raise ValueError(f"expected the LLM's answer as a string, got {type(text).__name__}: {text!r:.200}")
    out: list[str] = []
    seen: set[str] = set()
    for line in text.splitlines():
        m = _ITEM.match(line)
        if not m:
            continue
        item = m.group(1).replace("**", "").replace("__", "").strip()
        item = item.strip("\"'`“”").strip().rstrip(".;,").strip()
        if not item or _PLACEHOLDER.match(item) or not re.search(r"\w", item):
            continue
        key = " ".join(item.lower().split())
        if key not in seen:
            seen.add(key)
            out.append(item)
    if not out:
        excerpt = " ".join(text.split())[:300]
        raise ValueError(
            f"the LLM's answer holds no numbered list of concepts (expected lines like '1. concept'); "
            f"answer: {excerpt!r}. Retry, use a stronger model, or use the offline fallback (no LLM)"
        )
    return out


def sample_documents(texts: list[str], n: int, *, max_chars: int, seed: int = 0) -> list[str]:
    """``n`` distinct documents drawn at random (by ``seed``), each cut to a random ``max_chars`` window.

    Duplicates (after stripping) are removed before drawing, so no document is sent twice; fewer than
    ``n`` distinct documents give all of them (with a warning).
    """
    if n < 1:
        raise ValueError(f"n_samples must be >= 1, got {n}")
    if max_chars < 20:
        raise ValueError(f"max_sample_chars must be at least 20 characters, got {max_chars}")
    unique = list(dict.fromkeys(t.strip() for t in texts if t and t.strip()))
    if not unique:
        raise ValueError("the forget set is empty (no non-blank document); give a forget set with text")
    rng = random.Random(seed)
    if len(unique) < n:
        logger.warning("the forget set has only %d distinct documents; sending all of them instead of %d",
                       len(unique), n)
        picked = unique[:]
        rng.shuffle(picked)
    else:
        picked = rng.sample(unique, n)
    out = []
    for doc in picked:
        if len(doc) > max_chars:
            # A random window starting at a line start: the start of a file is often boilerplate.
            starts = [0] + [m.end() for m in re.finditer(r"\n", doc[: len(doc) - max_chars])]
            start = rng.choice(starts)
            doc = doc[start:start + max_chars].strip()
        out.append(doc)
    return out


def extract_concepts(forget_texts: list[str], *, client: Any = None, n_samples: int = 10,
                     max_sample_chars: int = 1000, seed: int = 0, reference_texts: list[str] | None = None,
                     n_concepts: int = 30, cache_dir: Any = None) -> DatasetConcepts:
    """The concepts of the forget set: from an LLM when ``client`` is given, else offline.

    ``client`` is an ``LLMConfig`` (an ``OpenAIChatClient`` is built from it), any object with an async
    ``generate(messages) -> str``, or None for :func:`distinctive_concepts` against ``reference_texts``.
    With ``cache_dir``, a parsed LLM answer is stored there and reused.
    """
    texts = [t for t in (forget_texts or []) if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError(f"the forget set is empty ({len(forget_texts or [])} documents, none with text); "
                         "give documents to forget (e.g. --forget code or a .txt/.jsonl file)")
    if client is None:
        concepts = distinctive_concepts(texts, reference_texts, n=n_concepts)
        return DatasetConcepts(concepts, source="distinctive-words (log-odds vs reference)")

    from .llm import DiskCache, LLMConfig, OpenAIChatClient, run_all

    if isinstance(client, LLMConfig):
        if client.max_tokens < CONCEPTS_MAX_TOKENS:
            import dataclasses

            logger.info("raising max_tokens from %d to %d for the concept list", client.max_tokens,
                        CONCEPTS_MAX_TOKENS)
            client = dataclasses.replace(client, max_tokens=CONCEPTS_MAX_TOKENS)
        client = OpenAIChatClient(client)
    if not callable(getattr(client, "generate", None)):
        raise ValueError(f"client must be an LLMConfig or have an async generate(messages) method; "
                         f"got {type(client).__name__}")
    samples = sample_documents(texts, n_samples, max_chars=max_sample_chars, seed=seed)
    messages = build_concepts_prompt(samples)
    config = getattr(client, "config", None)
    sampling = getattr(config, "sampling", None) or {"client": type(client).__name__}
    cache = DiskCache(cache_dir) if cache_dir is not None else None
    key = DiskCache.key(kind="concepts", prompt_version=CONCEPTS_PROMPT_VERSION, messages=messages,
                        sampling=sampling)
    source = f"llm:{sampling.get('model', type(client).__name__)}"
    if cache is not None:
        hit = cache.get(key)
        if isinstance(hit, dict) and hit.get("concepts"):
            logger.info("concepts read from cache %s", cache.path(key))
            return DatasetConcepts(list(hit["concepts"]), source=source)
    answer = run_all([client.generate(messages)], desc="concepts", progress=False)[0]
    concepts = parse_concepts(answer)
    if cache is not None:
        cache.put(key, {"concepts": concepts, "answer": answer})
    logger.info("%d concepts from %s", len(concepts), source)
    return DatasetConcepts(concepts, source=source)


# -- offline fallback ---------------------------------------------------------------------------------------

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+(?:\.\d+)?|[^\sA-Za-z0-9_]")
_ENGLISH = frozenset(
    "the of and to a in is it that for on as with was be by this are or from at an not but which have "
    "has can if will its they their one all were there been also more when would what so".split())
_PY_KEYWORDS = frozenset(keyword.kwlist) | frozenset(getattr(keyword, "softkwlist", []))
_PY_TOPICS = {
    "def": "function definitions", "class": "class definitions", "import": "import statements",
    "from": "import statements", "return": "return statements", "self": "attribute access on self",
    "if": "control flow statements", "elif": "control flow statements", "else": "control flow statements",
    "for": "loops", "while": "loops", "break": "loops", "continue": "loops", "try": "exception handling",
    "except": "exception handling", "raise": "exception handling", "finally": "exception handling",
    "lambda": "lambda expressions", "yield": "generators", "with": "context managers", "assert": "assertions",
    "async": "asynchronous code", "await": "asynchronous code",
}
"""The construct a Python keyword or name introduces (named in its concept phrase)."""


@dataclass
class TextStats:
    """Character and line statistics that tell source code from prose."""

    symbol_frac: float
    """Share of non-space characters that are neither letters nor digits."""
    indent_frac: float
    """Share of non-blank lines that start with spaces or a tab."""
    identifier_frac: float
    """Share of word tokens that look like code identifiers (underscores, dots between names, camelCase)."""
    english_frac: float
    """Share of word tokens that are common English function words."""
    py_keyword_frac: float
    """Share of word tokens that are Python keywords."""
    comment_frac: float
    """Share of non-blank lines that start with ``#``."""

    @property
    def is_code(self) -> bool:
        """Source code: many symbols, indented lines and identifiers, few English function words."""
        votes = (self.symbol_frac > 0.12) + (self.indent_frac > 0.25) + (self.identifier_frac > 0.08) \
            + (self.english_frac < 0.15)
        return votes >= 3

    @property
    def is_python(self) -> bool:
        """Python in particular: code where Python keywords are frequent."""
        return self.is_code and self.py_keyword_frac > 0.06


def text_stats(texts: list[str]) -> TextStats:
    """:class:`TextStats` over all of ``texts``."""
    n_chars = n_sym = n_lines = n_ind = n_comment = 0
    n_words = n_ident = n_eng = n_kw = 0
    for t in texts:
        for line in t.splitlines():
            s = line.strip()
            if not s:
                continue
            n_lines += 1
            n_ind += line[:1] in (" ", "\t")
            n_comment += s.startswith("#")
        compact = re.sub(r"\s+", "", t)
        n_chars += len(compact)
        n_sym += sum(1 for c in compact if not c.isalnum())
        for w in _WORD.findall(t):
            n_words += 1
            n_ident += ("_" in w.strip("_")) or w.startswith("__") or bool(re.search(r"[a-z][A-Z]", w))
            n_eng += w.lower() in _ENGLISH
            n_kw += w in _PY_KEYWORDS
        n_ident += len(re.findall(r"\b[A-Za-z_]\w*\.[A-Za-z_]\w*\(", t))
    return TextStats(symbol_frac=n_sym / max(n_chars, 1), indent_frac=n_ind / max(n_lines, 1),
                     identifier_frac=n_ident / max(n_words, 1), english_frac=n_eng / max(n_words, 1),
                     py_keyword_frac=n_kw / max(n_words, 1), comment_frac=n_comment / max(n_lines, 1))


def log_odds_dirichlet(counts_a: Counter, counts_b: Counter, *, prior_strength: float = 500.0
                       ) -> dict[str, float]:
    """z-scores of the log-odds ratio of each item in A vs B with an informative Dirichlet prior.

    The prior is the pooled frequency of the item times ``prior_strength`` (Monroe et al. 2008, eq. 22):
    ``delta = log((y_a+a)/(n_a+a0-y_a-a)) - log((y_b+a)/(n_b+a0-y_b-a))``, ``var = 1/(y_a+a) + 1/(y_b+a)``,
    ``z = delta / sqrt(var)``. Positive z: used more in A.
    """
    pooled = counts_a + counts_b
    total = sum(pooled.values())
    if total == 0:
        return {}
    n_a, n_b = sum(counts_a.values()), sum(counts_b.values())
    a0 = prior_strength
    out = {}
    for w, c in pooled.items():
        a = a0 * c / total
        ya, yb = counts_a.get(w, 0), counts_b.get(w, 0)
        delta = math.log((ya + a) / (n_a + a0 - ya - a)) - math.log((yb + a) / (n_b + a0 - yb - a))
        out[w] = delta / math.sqrt(1.0 / (ya + a) + 1.0 / (yb + a))
    return out


def _token_counts(texts: list[str], desc: str = "counting tokens"
                  ) -> tuple[Counter, Counter, Counter, dict[str, Counter]]:
    """(token counts, bigram counts, document frequencies, surface forms) over lower-cased tokens."""
    from tqdm.auto import tqdm

    tokens: Counter = Counter()
    bigrams: Counter = Counter()
    doc_freq: Counter = Counter()
    surface: dict[str, Counter] = {}
    for t in tqdm(texts, desc=desc, disable=len(texts) < 500, leave=False):
        seen: set[str] = set()
        prev: str | None = None
        prev_start = 0
        for m in _TOKEN.finditer(t):
            raw = m.group(0)
            key = raw.lower() if raw[0].isalpha() or raw[0] == "_" else raw
            tokens[key] += 1
            surface.setdefault(key, Counter())[raw] += 1
            seen.add(key)
            if key[0].isalpha() or key[0] == "_":
                if prev is not None:
                    bi = f"{prev} {key}"
                    bigrams[bi] += 1
                    seen.add(bi)
                    # the bigram as written ('self.assertEqual', 'if not'), whitespace collapsed
                    surface.setdefault(bi, Counter())[" ".join(t[prev_start:m.end()].split())] += 1
                prev, prev_start = key, m.start()
            elif key not in (".", "_"):
                prev = None  # bigrams of words only, not across punctuation (a dot keeps 'os.path' together)
        doc_freq.update(seen)
    return tokens, bigrams, doc_freq, surface


def _default_reference() -> list[str]:
    import pydoc_data.topics

    logger.info("no reference corpus given: using the English help topics of pydoc_data as reference")
    topics = pydoc_data.topics.topics
    return [topics[k] for k in sorted(topics)]


def distinctive_concepts(forget_texts: list[str], reference_texts: list[str] | None = None, n: int = 30, *,
                         prior_strength: float = 500.0) -> list[str]:
    """Concept phrases for what sets ``forget_texts`` apart from ``reference_texts`` (offline step 2).

    Tokens (words, identifiers, numbers, symbols) and word bigrams are ranked by the log-odds z-score of
    :func:`log_odds_dirichlet`; those used by at least two forget documents (or often, when there are
    few) become phrases in the style of neuron explanations, suffixed by the detected domain
    ("in Python source code", "in English prose"). Domain-level concepts come first. With no reference,
    the English help topics of ``pydoc_data`` serve as one.
    """
    forget = [t for t in (forget_texts or []) if isinstance(t, str) and t.strip()]
    if not forget:
        raise ValueError(f"the forget set is empty ({len(forget_texts or [])} documents, none with text); "
                         "give documents to forget")
    if n < 1:
        raise ValueError(f"n (number of concepts) must be >= 1, got {n}")
    reference = [t for t in (reference_texts or []) if isinstance(t, str) and t.strip()]
    if reference_texts is None:
        reference = _default_reference()
    elif not reference:
        raise ValueError("the reference corpus is empty; give reference documents (e.g. --reference prose) "
                         "or none at all to use the built-in English reference")
    stats = text_stats(forget)
    ref_stats = text_stats(reference)
    logger.info("forget set stats: %s (code=%s, python=%s)", stats, stats.is_code, stats.is_python)
    f_tok, f_bi, f_df, surface = _token_counts(forget, "counting forget-set tokens")
    r_tok, r_bi, _, _ = _token_counts(reference, "counting reference tokens")
    z_tok = log_odds_dirichlet(f_tok, r_tok, prior_strength=prior_strength)
    z_bi = log_odds_dirichlet(f_bi, r_bi, prior_strength=prior_strength)
    min_df = 2 if len(forget) >= 4 else 1
    min_count = 3 if len(forget) >= 4 else 2

    def form(key: str) -> str:
        return surface[key].most_common(1)[0][0] if key in surface else key

    if stats.is_python:
        where, lang = "in Python source code", "Python"
    elif stats.is_code:
        where, lang = "in source code", ""
    elif stats.english_frac > 0.2:
        where, lang = "in English prose", ""
    else:
        where, lang = "in text", ""

    domain: list[str] = []
    if stats.is_code:
        domain.append("Python source code" if stats.is_python else "source code of computer programs")
        domain.append("programming syntax and identifiers")
        if stats.indent_frac > max(0.25, ref_stats.indent_frac * 1.5):
            domain.append(f"indentation and newlines {where}")
        if stats.comment_frac > 0.03 or f_tok.get('"', 0) > 0:
            domain.append(f"comments and docstrings {where}")
    elif stats.english_frac > 0.2:
        domain.append("English prose")
        domain.append("common English function words such as 'the', 'of' and 'and'")
    else:
        domain.append("natural language text")

    candidates = [(z, k) for k, z in z_tok.items()
                  if z > 0 and f_df.get(k, 0) >= min_df and f_tok.get(k, 0) >= min_count]
    candidates.sort(key=lambda x: (-x[0], x[1]))
    # Bigrams must be spread over more documents: one file's repeated phrase is not a concept.
    bigram_df = max(min_df, math.ceil(0.02 * len(forget)))
    bigram_cands = [(z, k) for k, z in z_bi.items()
                    if z > 0 and f_df.get(k, 0) >= bigram_df and f_bi.get(k, 0) >= max(min_count, 5)]
    bigram_cands.sort(key=lambda x: (-x[0], x[1]))

    groups: dict[str, list[str]] = {"underscore": [], "dunder": [], "camel": [], "constant": [],
                                    "symbol": [], "number": [], "letter": []}
    singles: list[str] = []
    for z, key in candidates:
        w = form(key)
        if not (w[0].isalpha() or w[0] == "_"):
            groups["number" if w[0].isdigit() else "symbol"].append(w)
        elif w.startswith("__") and w.endswith("__") and len(w) > 4:
            groups["dunder"].append(w)
        elif len(w) == 1:
            groups["letter"].append(w)
        elif len(w) > 1 and w.isupper() and ("_" in w or stats.is_code):
            groups["constant"].append(w)
        elif "_" in w.strip("_"):
            groups["underscore"].append(w)
        elif re.search(r"[a-z][A-Z]", w) and not w[0].isupper():
            groups["camel"].append(w)
        else:
            singles.append(w)

    def examples(ws: list[str], k: int = 3) -> str:
        return ", ".join(f"'{w}'" for w in ws[:k])

    grouped: list[str] = []
    if groups["symbol"]:
        syms = groups["symbol"][:5]
        quotes = [c for c in syms if c in "'\"`"]
        shown = examples([c for c in syms if c not in quotes], 4)
        extra = (" and quote marks" if shown else "quote marks") if quotes else ""
        grouped.append(f"punctuation and operators like {shown}{extra} {where}".replace("  ", " "))
    if len(groups["underscore"]) >= 2:
        grouped.append(f"code identifiers with underscores like {examples(groups['underscore'])}")
    if groups["dunder"]:
        grouped.append(f"special double-underscore names like {examples(groups['dunder'])} {where}")
    if len(groups["camel"]) >= 2:
        grouped.append(f"camelCase names like {examples(groups['camel'])} {where}")
    if len(groups["constant"]) >= 2:
        grouped.append(f"upper-case constant names like {examples(groups['constant'])}")
    if len(groups["letter"]) >= 2:
        kind = "single-letter variable names" if stats.is_code else "single letters"
        grouped.append(f"{kind} like {examples(groups['letter'])} {where}")
    if len(groups["number"]) >= 2:
        grouped.append(f"numbers like {examples(groups['number'])} {where}")

    def phrase(w: str) -> str:
        if lang == "Python":
            topic = _PY_TOPICS.get(w)
            kind = "keyword" if w in _PY_KEYWORDS else "name"
            return f"the Python {kind} '{w}' and {topic} {where}" if topic else f"the Python {kind} '{w}' {where}"
        if stats.is_code:
            return f"the name '{w}' {where}"
        return f"the word '{w}' {where}"

    word_phrases = [phrase(w) for w in singles]
    bigram_phrases = []
    for _, key in bigram_cands:
        bigram_phrases.append(f"the sequence '{form(key)}' {where}")
    # Interleave: mostly single tokens (neurons are mostly token detectors), some bigrams.
    rest: list[str] = []
    wi = bi = 0
    while wi < len(word_phrases) or bi < len(bigram_phrases):
        for _ in range(3):
            if wi < len(word_phrases):
                rest.append(word_phrases[wi])
                wi += 1
        if bi < len(bigram_phrases):
            rest.append(bigram_phrases[bi])
            bi += 1
    out = list(dict.fromkeys(domain + grouped + rest))[:n]
    if not out:
        raise ValueError("found no concept that distinguishes the forget set from the reference corpus; "
                         "give a larger forget set or a different reference")
    return out
