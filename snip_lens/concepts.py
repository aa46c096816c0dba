"""The concepts of a forget dataset (SNIP step 2), from an LLM or, offline, from distinctive words.

With an LLM, the prompt of the paper's appendix A.2 is sent with ``n_samples`` *distinct* documents drawn
at random from the forget set (each cut to ``max_sample_chars``), and the numbered list it answers is
parsed, trimmed and de-duplicated. Answers are cached under a sha256 key over the prompt and the sampling
parameters; only answers that parsed are cached.

Without an LLM, :func:`distinctive_concepts` compares the forget set with a reference corpus: the
log-odds ratio with an informative Dirichlet prior (Monroe, Colaresi & Quinn 2008, "Fightin' Words")
ranks words (of any script), symbols and bigrams by how much more the forget set uses them. A concept is
text copied from the forget set (a distinctive word, a bigram as written, a typical line), never a phrase
in the explainers' words: the offline concepts share no template, vocabulary or code path with the
offline explainers, and :func:`check_concepts_independent` fails a run where a concept equals an
explanation.
"""

from __future__ import annotations

import logging
import math
import random
import re
from collections import Counter
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


def _forget_docs(forget_texts: list[str] | None) -> list[str]:
    """The forget documents with text, or an error that says there are none."""
    texts = [t for t in (forget_texts or []) if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError(f"the forget set is empty ({len(forget_texts or [])} documents, none with text); "
                         "give documents to forget (e.g. --forget code or a .txt/.jsonl file)")
    return texts


def extract_concepts(forget_texts: list[str], *, client: Any = None, n_samples: int = 10,
                     max_sample_chars: int = 1000, seed: int = 0, reference_texts: list[str] | None = None,
                     n_concepts: int = 30, cache_dir: Any = None) -> DatasetConcepts:
    """The concepts of the forget set: from an LLM when ``client`` is given, else offline.

    ``client`` is an ``LLMConfig`` (an ``OpenAIChatClient`` is built from it), any object with an async
    ``generate(messages) -> str``, or None for :func:`distinctive_concepts` against ``reference_texts``.
    With ``cache_dir``, a parsed LLM answer is stored there and reused.
    """
    texts = _forget_docs(forget_texts)
    if client is None:
        concepts, terms = distinctive_concepts_and_terms(texts, _reference(reference_texts), n=n_concepts)
        return DatasetConcepts(concepts, source="distinctive-words (log-odds vs reference)", terms=terms)

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
            return DatasetConcepts(list(hit["concepts"]), source=source,
                                   terms=concept_terms(texts, reference_texts))
    answer = run_all([client.generate(messages)], desc="concepts", progress=False)[0]
    concepts = parse_concepts(answer)
    if cache is not None:
        cache.put(key, {"concepts": concepts, "answer": answer})
    logger.info("%d concepts from %s", len(concepts), source)
    # The LLM names the concepts; the term weights of the evidence match still come from the data.
    return DatasetConcepts(concepts, source=source, terms=concept_terms(texts, reference_texts))


# -- offline fallback ---------------------------------------------------------------------------------------
#
# The offline concepts share nothing with the offline explainers: neither how text is split (a Unicode regex over
# the raw text here, the model's own tokens there), nor the statistic, nor a sentence template (a concept is
# text copied from the forget set; an explanation is a sentence about a neuron's evidence). No rule names a
# language, script or domain. :func:`check_concepts_independent` guards every scoring run.

_TOKEN = re.compile(r"\w+|[^\w\s]")
"""Words (any script: ``\\w`` is Unicode-aware) and single non-space symbols."""


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


def _is_word(tok: str) -> bool:
    return tok[:1].isalnum() or tok[:1] == "_"


def _counts(texts: list[str], desc: str) -> tuple[Counter, Counter, dict[str, Counter]]:
    """(counts of unigrams and bigrams, document frequencies, surface forms) over case-folded tokens.

    A bigram is two adjacent tokens of which at least one is a word; its surface form is the text span
    as written, whitespace collapsed.
    """
    from tqdm.auto import tqdm

    counts: Counter = Counter()
    doc_freq: Counter = Counter()
    surface: dict[str, Counter] = {}
    for t in tqdm(texts, desc=desc, disable=len(texts) < 500, leave=False):
        seen: set[str] = set()
        prev: tuple[str, int] | None = None
        for m in _TOKEN.finditer(t):
            raw = m.group(0)
            key = raw.casefold()
            counts[key] += 1
            surface.setdefault(key, Counter())[raw] += 1
            seen.add(key)
            if prev is not None and (_is_word(prev[0]) or _is_word(key)):
                bi = f"{prev[0]}\x00{key}"
                counts[bi] += 1
                seen.add(bi)
                surface.setdefault(bi, Counter())[" ".join(t[prev[1]:m.end()].split())] += 1
            prev = (key, m.start())
        doc_freq.update(seen)
    return counts, doc_freq, surface


def _default_reference() -> list[str]:
    import pydoc_data.topics

    logger.info("no reference corpus given: using the help topics of pydoc_data as reference")
    topics = pydoc_data.topics.topics
    return [topics[k] for k in sorted(topics)]


def _reference(reference_texts: list[str] | None) -> list[str]:
    """The reference documents with text: the built-in reference for None, an error for an empty corpus."""
    if reference_texts is None:
        return _default_reference()
    reference = [t for t in reference_texts if isinstance(t, str) and t.strip()]
    if not reference:
        raise ValueError("the reference corpus is empty; give reference documents (e.g. --reference prose) "
                         "or none at all to use the built-in reference")
    return reference


def _typical_lines(texts: list[str], z: dict[str, float], n: int, *, min_tokens: int = 3,
                   max_chars: int = 100) -> list[str]:
    """The ``n`` lines of ``texts`` whose words are on average most distinctive (whole lines, as written)."""
    scored: list[tuple[float, str]] = []
    seen: set[str] = set()
    for t in texts:
        for line in t.splitlines():
            s = " ".join(line.split())
            if not s or len(s) > max_chars or s in seen:
                continue
            toks = [m.group(0).casefold() for m in _TOKEN.finditer(s) if _is_word(m.group(0))]
            if len(set(toks)) < min_tokens:
                continue
            seen.add(s)
            scored.append((sum(max(z.get(x, 0.0), 0.0) for x in toks) / len(toks), s))
    scored.sort(key=lambda x: (-x[0], x[1]))
    return [s for _, s in scored[:n]]


MAX_TERMS = 5000
"""Terms kept by :func:`concept_terms`: the largest |z| (forget-like and reference-like alike)."""


def distinctive_concepts(forget_texts: list[str], reference_texts: list[str] | None = None, n: int = 30, *,
                         prior_strength: float = 500.0, n_lines: int = 3) -> list[str]:
    """What sets ``forget_texts`` apart from ``reference_texts``, as text copied from the forget set (step 2).

    Unigrams (words of any script, symbols) and bigrams are ranked by the log-odds z-score of
    :func:`log_odds_dirichlet`; those used in at least two forget documents (when there are four or more)
    are kept in their commonest written form. The list opens with the ``n_lines`` forget-set lines whose
    tokens are most distinctive on average, then interleaves three unigrams per bigram. Every concept is a
    substring of the forget set (whitespace collapsed). With no reference, the ``pydoc_data`` help topics
    serve as one.
    """
    forget = _forget_docs(forget_texts)
    if n < 1:
        raise ValueError(f"n (number of concepts) must be >= 1, got {n}")
    concepts, _ = distinctive_concepts_and_terms(forget, _reference(reference_texts), n, prior_strength=prior_strength,
                                                 n_lines=n_lines)
    return concepts


def distinctive_concepts_and_terms(forget: list[str], reference: list[str], n: int = 30, *,
                                   prior_strength: float = 500.0, n_lines: int = 3, max_terms: int = MAX_TERMS
                                   ) -> tuple[list[str], dict[str, float]]:
    """:func:`distinctive_concepts` and :func:`concept_terms` from one count of both corpora."""
    f_counts, f_df, surface = _counts(forget, "counting forget-set tokens")
    r_counts, _, _ = _counts(reference, "counting reference tokens")
    z = log_odds_dirichlet(f_counts, r_counts, prior_strength=prior_strength)
    terms = _terms_from(z, f_counts, r_counts, max_terms)
    min_df = 2 if len(forget) >= 4 else 1
    min_count = 3 if len(forget) >= 4 else 2
    uni: list[str] = []
    bi: list[str] = []
    # Bigrams must be spread over more documents: one file's repeated phrase is not a concept.
    bigram_df = max(min_df, math.ceil(0.02 * len(forget)))
    for key, score in sorted(z.items(), key=lambda x: (-x[1], x[0])):
        if score <= 0:
            break
        is_bi = "\x00" in key
        if f_df.get(key, 0) < (bigram_df if is_bi else min_df) or f_counts.get(key, 0) < min_count:
            continue
        (bi if is_bi else uni).append(surface[key].most_common(1)[0][0])
    rest: list[str] = []
    wi = bj = 0
    while wi < len(uni) or bj < len(bi):
        for _ in range(3):
            if wi < len(uni):
                rest.append(uni[wi])
                wi += 1
        if bj < len(bi):
            rest.append(bi[bj])
            bj += 1
    lines = _typical_lines(forget, {k: v for k, v in z.items() if "\x00" not in k}, n_lines)
    out = list(dict.fromkeys(lines + rest))[:n]
    if not out:
        raise ValueError("found no concept that distinguishes the forget set from the reference corpus; "
                         "give a larger forget set or a different reference")
    return out, terms


def term_pieces(text: str) -> list[str]:
    """The case-folded terms of ``text`` as the concept statistics count them: words (any script) and single
    non-space symbols. Tokenizer display markers (byte-level BPE, SentencePiece) are read as the text they
    stand for, so a model token and the same text written out give the same terms."""
    return [m.group(0).casefold() for m in _TOKEN.finditer(text.translate(_DISPLAY_MARKERS))]


_DISPLAY_MARKERS = str.maketrans({"\u0120": " ", "\u2581": " ", "\u010a": "\n", "\u0109": "\t"})


def _terms_from(z: dict[str, float], f_counts: Counter, r_counts: Counter, max_terms: int, *,
                keep: Any = lambda w: "\x00" not in w) -> dict[str, float]:
    """The ``max_terms`` items of largest |z| that ``keep`` accepts (by default unigrams, not bigrams) and
    that both corpora together use at least twice; the rest carry no usable statistic."""
    kept = [(w, v) for w, v in z.items() if keep(w) and f_counts.get(w, 0) + r_counts.get(w, 0) >= 2]
    kept.sort(key=lambda x: (-abs(x[1]), x[0]))
    return {w: round(float(v), 4) for w, v in kept[:max_terms]}


def concept_terms(forget_texts: list[str], reference_texts: list[str] | None = None, *,
                  prior_strength: float = 500.0, max_terms: int = MAX_TERMS) -> dict[str, float]:
    """Each term's log-odds z-score, forget set vs reference (:func:`log_odds_dirichlet`): positive where the
    forget set uses it more, negative where the reference does.

    These weights are the forget set's concept vocabulary for SNIP's evidence match
    (:func:`snip_lens.score.evidence_score`): they come from the raw text alone (the same regex and counts
    as the offline concepts), never from an explainer. With no reference, the ``pydoc_data`` help topics.
    """
    forget = _forget_docs(forget_texts)
    f_counts, _, _ = _counts(forget, "counting forget-set tokens")
    r_counts, _, _ = _counts(_reference(reference_texts), "counting reference tokens")
    return _terms_from(log_odds_dirichlet(f_counts, r_counts, prior_strength=prior_strength), f_counts,
                       r_counts, max_terms)


MAX_TOKEN_TERMS = 20000
"""Tokens kept by :func:`token_terms` (a vocabulary of 49k tokens leaves 10-20k seen twice in a benchmark's
selection documents)."""


def token_terms(forget_texts: list[str], reference_texts: list[str] | None, tokenizer: Any, *,
                prior_strength: float = 500.0, max_terms: int = MAX_TOKEN_TERMS, batch: int = 256
                ) -> dict[str, float]:
    """Each model token's log-odds z-score, forget set vs reference (:func:`log_odds_dirichlet`), keyed by
    its decoded text (leading space and case kept, as explanations record their evidence tokens).

    :func:`concept_terms` counts words; a neuron's evidence is in the model's own tokens, and many of those
    are word pieces that no word count weighs (a suffix, a stem, a byte of a multi-byte character). Counting
    model tokens directly weighs every piece by how much more the forget set uses it, whatever the language
    or script: the same statistic over the units the evidence is written in. A token is counted each time it
    occurs in the text, so the weight of a promoted token is also how much more often the forget set needs it
    as the next token. ``tokenizer`` is a Hugging Face tokenizer (``model.tokenizer``); whitespace-only tokens
    and tokens seen fewer than twice over both corpora are left out, then the ``max_terms`` largest |z| kept.
    The evidence match reads a token by the larger of this weight and its word terms'
    (:func:`snip_lens.score.evidence_score`).
    """
    forget = _forget_docs(forget_texts)
    if not callable(getattr(tokenizer, "decode", None)):
        raise ValueError(f"token_terms needs a Hugging Face tokenizer (with .decode), got {type(tokenizer).__name__}; "
                         "pass model.tokenizer")
    counts = [_token_counts(forget, tokenizer, batch), _token_counts(_reference(reference_texts), tokenizer, batch)]
    text_of: dict[int, str] = {}
    decoded: list[Counter] = []
    for c in counts:  # several ids can decode to one text (bytes of a character): counted as that text
        out: Counter = Counter()
        for i, n in c.items():
            if i not in text_of:
                text_of[i] = tokenizer.decode([i])
            out[text_of[i]] += n
        decoded.append(out)
    f_counts, r_counts = decoded
    z = log_odds_dirichlet(f_counts, r_counts, prior_strength=prior_strength)
    # whitespace carries no term here either (as in the word counts)
    return _terms_from(z, f_counts, r_counts, max_terms, keep=str.strip)


def with_evidence_terms(concepts: DatasetConcepts, forget_texts: list[str], reference_texts: list[str] | None,
                        model: Any) -> DatasetConcepts:
    """``concepts`` with the evidence match's weights filled in from these documents where it has none: word
    terms (:func:`concept_terms`; absent from files before format 2) and ``model``'s token terms
    (:func:`token_terms`). Weights it already has are kept, and so is the name of their tokenizer."""
    if concepts.terms and concepts.token_terms:
        return concepts
    import dataclasses

    from . import models

    if concepts.token_terms:
        tokens, name = concepts.token_terms, concepts.tokenizer
    else:
        tokens, name = token_terms(forget_texts, reference_texts, models.tokenizer(model)), models.model_name(model)
    return dataclasses.replace(concepts, terms=concepts.terms or concept_terms(forget_texts, reference_texts),
                               token_terms=tokens, tokenizer=name)


def _token_counts(texts: list[str], tokenizer: Any, batch: int) -> Counter:
    counts: Counter = Counter()
    for b in range(0, len(texts), batch):
        for ids in tokenizer(texts[b:b + batch], add_special_tokens=False)["input_ids"]:
            counts.update(ids)
    return counts


def _norm_text(s: str) -> str:
    return " ".join(s.split()).casefold()


def check_concepts_independent(concepts: Any, explanations: Any) -> None:
    """Raise ``ValueError`` when any concept string equals any explanation string (case and spacing aside).

    SNIP scores a neuron by how close its explanation is to a concept; a concept that *is* an explanation
    scores 1.0 by construction (circular evaluation: the ranking then says nothing about the forget set).
    ``concepts``: a :class:`DatasetConcepts` or strings; ``explanations``: NeuronExplanations or strings.
    """
    texts = concepts.concepts if isinstance(concepts, DatasetConcepts) else list(concepts)
    by_text = {_norm_text(c): c for c in texts}
    for e in explanations:
        text = e if isinstance(e, str) else getattr(e, "explanation", None)
        if not text:
            continue
        hit = by_text.get(_norm_text(text))
        if hit is not None:
            who = f" (neuron {e.neuron})" if not isinstance(e, str) and hasattr(e, "neuron") else ""
            raise ValueError(
                f"concept {hit!r} equals an explanation{who}: concepts and explanations must come from "
                "independent sources, or the score is circular (cosine 1.0 by construction). Extract concepts "
                "from the forget set (snip concepts) rather than from explanations, or drop that concept")
