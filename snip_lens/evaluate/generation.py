"""Generation-level forgetting: does the pruned model still *produce* the forgotten domain?

A lower next-token accuracy on held-out forget text can hide a model that still writes the domain when it
is asked to continue it. This evaluation cuts ``n_prompts`` prompts from held-out forget documents and as
many from held-out retain documents, lets the (masked) model continue each one, and scores every
continuation with a **domain detector** chosen for the forget set:

- ``"python"``: the continuation parses as Python (``ast`` through ``compile(..., PyCF_ONLY_AST)``), as a
  fragment: the last line, cut by the token budget, is dropped; the text may start on any of its first
  three lines (the first one continues the prompt's line); an indented fragment is put inside synthetic
  ``if 1:`` blocks at the indentation levels it returns to; input that is only incomplete (an open
  bracket or block at the end) counts as Python, any other syntax error does not. Empty text does not.
- ``"language:XX"``: ``py3langid`` (the langid.py model, shipped inside the package; no network) names
  the ISO 639-1 language ``XX`` for the continuation. Text without a letter is never in the language.
- ``"classifier"``: a character n-gram logistic regression (scikit-learn) trained to tell forget from
  retain text on chunks of the *selection* documents (never the held-out ones); its accuracy on selection
  documents it was not trained on is reported.
- ``"auto"`` picks by declared rules on the selection documents (``choose_detector``): ``python`` when at
  least 80% of forget documents parse as Python and at most 20% of retain documents do; otherwise
  ``language:XX`` when py3langid gives one language to at least 80% of forget documents and to at most 20% of
  retain documents; otherwise ``classifier``.

Reported, per decoding: ``forget_in_domain`` (share of forget prompts whose continuation the detector
places in the forgotten domain: the number that should fall), ``retain_in_domain`` (the same share for
retain prompts: the detector's false alarms and any leak of the domain into retain text) and
``retain_fluency`` (mean per-token loss, nats, of the retain continuations under the *unpruned* model:
the number that should not rise; greedy text that loops scores low, so read it next to the sampled one).
Every detector is also checked on the documents' *true* continuations of the same prompts
(``reference_forget_in_domain`` should be high, ``reference_retain_in_domain`` low): a detector that fails
that check makes the shares meaningless.

Prompts: documents are taken in a seeded order; of a long document, a span of ``16 x (prompt_tokens +
max_new_tokens)`` characters from a seeded line start is tokenised; each prompt is ``prompt_tokens``
consecutive tokens at a seeded random offset of that text, which must also hold ``max_new_tokens`` more (the
reference continuation); when there are fewer such documents than prompts, documents are reused at other offsets.
All prompts have the same length, so batches need no padding; BOS comes first when ``prepends_bos(model)``.

Decoding (``GenerationConfig``), through the HF model under the bridge so that mask hooks act on every
generated token, with a complete ``GenerationConfig`` so nothing is inherited from the model's defaults:
``greedy`` is argmax decoding; ``sampled`` is ancestral sampling with ``temperature`` 1.0, ``top_k`` 50 and
``top_p`` 1.0. Both use no repetition penalty, stop at EOS, and generate ``max_new_tokens`` tokens. Before
batch ``b`` the torch RNG is seeded with ``seed + b`` inside ``fork_rng`` (the caller's RNG is untouched).
"""

from __future__ import annotations

import ast
import codeop
import logging
import random
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig as HFGenerationConfig

from ..models import encode, prepends_bos
from ._common import kv_cache_fix, masked

logger = logging.getLogger(__name__)

DECODINGS = ("greedy", "sampled")
"""The decoding modes ``GenerationConfig.decodings`` chooses from."""

AUTO_SHARE = 0.8
"""``choose_detector``: the share of forget documents a rule must hold for."""
AUTO_MAX_RETAIN = 0.2
"""``choose_detector``: the largest share of retain documents the same rule may hold for."""
_AUTO_DOCS = 50  # documents per side the auto rules look at
_AUTO_CHARS = 2000  # characters of each document identified by py3langid


@dataclass
class GenerationConfig:
    """How prompts are cut, continued and scored (see the module docstring)."""

    n_prompts: int = 16
    """Prompts per side (forget and retain), from the held-out documents."""
    prompt_tokens: int = 32
    """Tokens per prompt."""
    max_new_tokens: int = 32
    """Tokens generated per continuation (fewer when the model stops at EOS)."""
    decodings: list[str] = field(default_factory=lambda: list(DECODINGS))
    """Decoding modes to run: "greedy" and/or "sampled"."""
    temperature: float = 1.0
    """Softmax temperature of sampled decoding."""
    top_k: int = 50
    """Sampled decoding draws among the k most likely tokens (0: no cut)."""
    top_p: float = 1.0
    """Nucleus mass of sampled decoding (1.0: no cut)."""
    seed: int = 0
    """Seed of the prompt cuts and of sampling (batch ``b`` uses ``seed + b``)."""
    detector: str = "auto"
    """Domain detector: "auto", "python", "language:XX" (ISO 639-1 code, e.g. "language:de") or "classifier"."""
    batch_size: int = 16
    """Prompts continued in one batch."""
    n_examples: int = 3
    """Continuations per side kept in the results for the report."""

    def __post_init__(self) -> None:
        for name in ("n_prompts", "prompt_tokens", "max_new_tokens", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"GenerationConfig.{name} must be a positive integer, got {v!r}")
        if isinstance(self.decodings, str):
            self.decodings = [d.strip() for d in self.decodings.split(",") if d.strip()]
        bad = [d for d in self.decodings if d not in DECODINGS]
        if bad or not self.decodings:
            raise ValueError(f"GenerationConfig.decodings {self.decodings!r} must be a non-empty subset of "
                             f"{list(DECODINGS)}")
        if not self.temperature > 0:
            raise ValueError(f"GenerationConfig.temperature must be > 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"GenerationConfig.top_k must be a non-negative integer (0 = no cut), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"GenerationConfig.top_p must be in (0, 1], got {self.top_p!r}")
        if self.n_examples < 0:
            raise ValueError(f"GenerationConfig.n_examples must be >= 0, got {self.n_examples!r}")
        parse_detector(self.detector)

    def to_json(self) -> dict:
        return asdict(self)


def parse_detector(spec: str) -> tuple[str, str | None]:
    """(kind, language) of a detector spec; raises ``ValueError`` naming the spec and the choices."""
    if spec in ("auto", "python", "classifier"):
        return spec, None
    m = re.fullmatch(r"language:([a-z]{2,3})", spec or "")
    if m:
        return "language", m.group(1)
    raise ValueError(f"unknown detector {spec!r}; choose auto, python, classifier or language:XX with an ISO 639-1 "
                     "code such as language:de")


# ---- detectors ---------------------------------------------------------------------------------------


class Detector(Protocol):
    """Says, for each text, whether it is in the forgotten domain."""

    name: str

    def __call__(self, texts: list[str]) -> list[bool]: ...

    def describe(self) -> dict: ...


_ALLOW_INCOMPLETE = getattr(codeop, "PyCF_ALLOW_INCOMPLETE_INPUT", 0)
_FLAGS = ast.PyCF_ONLY_AST | getattr(codeop, "PyCF_DONT_IMPLY_DEDENT", 0) | _ALLOW_INCOMPLETE
# Python < 3.11 has no incomplete-input flag: these messages then mean "the input stopped too early".
_INCOMPLETE = re.compile(r"incomplete input|was never closed|unexpected EOF|expected an indented block|"
                         r"unterminated triple-quoted")


def _parses_as_python_prefix(src: str) -> bool:
    try:
        compile(src, "<continuation>", "exec", _FLAGS)
        return True
    except SyntaxError as exc:  # IndentationError included
        return bool(_INCOMPLETE.search(str(exc.msg or "")))
    except (ValueError, MemoryError, RecursionError):  # NUL bytes, absurd nesting
        return False


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _inside_blocks(lines: list[str]) -> str:
    """An indented fragment put inside ``if 1:`` blocks at every indentation level it returns to."""
    body = [ln for ln in lines if ln.strip()]
    first = _indent(body[0])
    levels = sorted({0} | {_indent(ln) for ln in body if _indent(ln) < first})
    bodies = levels[1:] + [first]
    header = [" " * lv + "if 1:" for lv, nxt in zip(levels, bodies) if nxt > lv]
    return "\n".join(header + lines) + "\n"


def is_python(text: str) -> bool:
    """Whether ``text`` reads as a fragment of Python source (see the module docstring for the repairs)."""
    if not text or not text.strip():
        return False
    lines = text.expandtabs(8).split("\n")
    if len(lines) > 1 and not text.endswith("\n"):
        lines = lines[:-1]  # the last line was cut by the token budget
    for skip in range(min(3, len(lines))):
        rest = lines[skip:]
        if not any(ln.strip() for ln in rest):
            continue
        first = next(ln for ln in rest if ln.strip())
        src = "\n".join(rest) + "\n" if _indent(first) == 0 else _inside_blocks(rest)
        if _parses_as_python_prefix(src):
            return True
    return False


class PythonDetector:
    """In the domain when the text parses as (a fragment of) Python."""

    name = "python"

    def __call__(self, texts: list[str]) -> list[bool]:
        return [is_python(t) for t in texts]

    def describe(self) -> dict:
        return {"name": self.name, "how": "parses as a Python fragment (compile with PyCF_ONLY_AST)"}


def _langid() -> Any:
    try:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
    except ImportError as exc:
        raise ImportError("the language detector needs py3langid: pip install py3langid") from exc
    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


_LETTER = re.compile(r"[^\W\d_]")


class LanguageDetector:
    """In the domain when py3langid identifies the text as ``language`` (ISO 639-1)."""

    def __init__(self, language: str) -> None:
        self.language = language
        self.name = f"language:{language}"
        self._ident = _langid()
        if language not in self._ident.nb_classes:
            raise ValueError(f"py3langid does not know the language {language!r}; it knows "
                             f"{', '.join(sorted(self._ident.nb_classes))}")

    def identify(self, text: str) -> str | None:
        """The language py3langid names for ``text``, None for text without a letter."""
        if not _LETTER.search(text):
            return None
        return str(self._ident.classify(text)[0])

    def __call__(self, texts: list[str]) -> list[bool]:
        return [self.identify(t) == self.language for t in texts]

    def describe(self) -> dict:
        return {"name": self.name, "how": f"py3langid names the language {self.language!r}"}


def _chunks(model: Any, texts: list[str], n_tokens: int, max_chunks: int, seed: int) -> list[str]:
    """Up to ``max_chunks`` decoded chunks of ``n_tokens`` tokens, a few from each document in a seeded order."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    out: list[str] = []
    for i in order:
        ids = encode(model, texts[i][:20 * n_tokens * 8])
        for start in range(0, max(0, len(ids) - n_tokens + 1), n_tokens)[:4]:
            out.append(model.tokenizer.decode(ids[start:start + n_tokens]))
        if len(out) >= max_chunks:
            break
    return out[:max_chunks]


class ClassifierDetector:
    """A forget-vs-retain text classifier (character 1-4-grams, TF-IDF, logistic regression).

    Trained on chunks of the selection documents, the size of a continuation; 20% of the documents of each
    side (by document) are held out to measure its accuracy (``accuracy``).
    """

    name = "classifier"

    def __init__(self, model: Any, forget_texts: list[str], retain_texts: list[str], *, n_tokens: int = 32,
                 max_chunks: int = 400, seed: int = 0) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        def split(texts: list[str], side: str) -> tuple[list[str], list[str]]:
            if len(texts) < 2:
                raise ValueError(f"the classifier detector needs at least 2 {side} selection documents, got "
                                 f"{len(texts)}; give more documents or name a detector (--detector python|language:XX)")
            order = list(range(len(texts)))
            random.Random(seed).shuffle(order)
            n_test = max(1, round(0.2 * len(texts)))
            return [texts[i] for i in order[n_test:]], [texts[i] for i in order[:n_test]]

        f_train, f_test = split(forget_texts, "forget")
        r_train, r_test = split(retain_texts, "retain")
        data = {}
        for key, texts in (("f_train", f_train), ("f_test", f_test), ("r_train", r_train), ("r_test", r_test)):
            data[key] = _chunks(model, texts, n_tokens, max_chunks, seed)
            if not data[key]:
                raise ValueError(f"the classifier detector found no text chunk of {n_tokens} tokens in the "
                                 f"{key[0] == 'f' and 'forget' or 'retain'} selection documents; give longer documents")
        self._clf = make_pipeline(TfidfVectorizer(analyzer="char", ngram_range=(1, 4), lowercase=False, sublinear_tf=True,
                                                  max_features=100_000),
                                  LogisticRegression(max_iter=2000, class_weight="balanced"))
        self._clf.fit(data["f_train"] + data["r_train"], [1] * len(data["f_train"]) + [0] * len(data["r_train"]))
        test = data["f_test"] + data["r_test"]
        labels = [1] * len(data["f_test"]) + [0] * len(data["r_test"])
        pred = self._clf.predict(test)
        self.accuracy = float(sum(int(p) == y for p, y in zip(pred, labels)) / len(labels))
        self.n_train = len(data["f_train"]) + len(data["r_train"])
        self.n_test = len(labels)
        logger.info("classifier detector: held-out accuracy %.3f on %d chunks", self.accuracy, self.n_test)

    def __call__(self, texts: list[str]) -> list[bool]:
        if not texts:
            return []
        pred = self._clf.predict(list(texts))
        return [bool(p) and bool(t.strip()) for p, t in zip(pred, texts)]  # blank text is in no domain

    def describe(self) -> dict:
        return {"name": self.name, "how": "character 1-4-gram TF-IDF + logistic regression, forget vs retain selection "
                "documents", "heldout_accuracy": self.accuracy, "n_train_chunks": self.n_train,
                "n_heldout_chunks": self.n_test}


def choose_detector(forget_texts: list[str], retain_texts: list[str], seed: int = 0) -> tuple[str, dict]:
    """The detector spec the declared ``auto`` rules give for these selection documents, and the evidence."""
    rng = random.Random(seed)
    f = rng.sample(forget_texts, min(_AUTO_DOCS, len(forget_texts)))
    r = rng.sample(retain_texts, min(_AUTO_DOCS, len(retain_texts)))
    f = [t for t in f if t.strip()] or f
    r = [t for t in r if t.strip()] or r

    def parses(t: str) -> bool:
        try:
            ast.parse(t)
            return True
        except (SyntaxError, ValueError, MemoryError, RecursionError):
            return False

    evidence: dict[str, Any] = {"forget_docs": len(f), "retain_docs": len(r)}
    f_py = sum(map(parses, f)) / max(1, len(f))
    r_py = sum(map(parses, r)) / max(1, len(r))
    evidence.update(forget_python_share=f_py, retain_python_share=r_py)
    if f_py >= AUTO_SHARE and r_py <= AUTO_MAX_RETAIN:
        return "python", evidence
    try:
        lid = LanguageDetector("en")
    except ImportError:
        logger.warning("py3langid is not installed: the auto detector skips its language rule")
    else:
        f_lang = [lid.identify(t[:_AUTO_CHARS]) for t in f]
        r_lang = [lid.identify(t[:_AUTO_CHARS]) for t in r]
        counts: dict[str, int] = {}
        for lang in f_lang:
            if lang:
                counts[lang] = counts.get(lang, 0) + 1
        if counts:
            top = max(sorted(counts), key=counts.__getitem__)
            share = counts[top] / max(1, len(f_lang))
            r_share = sum(lang == top for lang in r_lang) / max(1, len(r_lang))
            evidence.update(forget_language=top, forget_language_share=share, retain_language_share=r_share)
            if share >= AUTO_SHARE and r_share <= AUTO_MAX_RETAIN:
                return f"language:{top}", evidence
    return "classifier", evidence


def make_detector(spec: str, model: Any, forget_sel: list[str], retain_sel: list[str], *, n_tokens: int = 32,
                  seed: int = 0) -> Detector:
    """The detector ``spec`` names; ``auto`` is resolved by ``choose_detector`` on the selection documents."""
    kind, lang = parse_detector(spec)
    evidence: dict | None = None
    if kind == "auto":
        spec, evidence = choose_detector(forget_sel, retain_sel, seed=seed)
        kind, lang = parse_detector(spec)
        logger.info("auto detector: %s (%s)", spec, evidence)
    det: Detector
    if kind == "python":
        det = PythonDetector()
    elif kind == "language":
        assert lang is not None
        det = LanguageDetector(lang)
    else:
        det = ClassifierDetector(model, forget_sel, retain_sel, n_tokens=n_tokens, seed=seed)
    if evidence is not None:
        det.auto_evidence = evidence  # type: ignore[attr-defined]
    return det


# ---- prompts and generation --------------------------------------------------------------------------


@dataclass
class GenerationPrompt:
    """One prompt cut from a held-out document, with the document's own continuation."""

    side: str
    """"forget" or "retain"."""
    document: int
    """Index of its document in the list of held-out documents of that side."""
    offset: int
    """Token offset of the prompt in the tokenised span of the document."""
    tokens: list[int]
    """Prompt token ids (BOS first when the model wants it)."""
    reference: list[int]
    """The ``max_new_tokens`` tokens that follow the prompt in the document."""
    char_start: int = 0
    """Character offset in the document where the tokenised span starts."""


def make_prompts(model: Any, texts: list[str], *, n: int, prompt_tokens: int, continuation_tokens: int,
                 seed: int = 0, side: str = "forget") -> list[GenerationPrompt]:
    """``n`` prompts of ``prompt_tokens`` tokens from ``texts`` (see the module docstring)."""
    need = prompt_tokens + continuation_tokens
    rng = random.Random(seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    bos = [model.tokenizer.bos_token_id] if prepends_bos(model) else []
    eligible: list[tuple[int, list[int], int]] = []
    span = need * 16  # characters tokenised per document: a 5,000-line module needs no full pass
    for i in order:
        text, start = texts[i], 0
        if len(text) > span:
            # A seeded line start anywhere in the document, not only its head (a module's head is its docstring).
            start = rng.randrange(0, len(text) - span + 1)
            nl = text.rfind("\n", 0, start)
            start = nl + 1 if nl >= 0 else 0
            text = text[start:start + span]
        ids = encode(model, text)
        if len(ids) >= need:
            eligible.append((i, ids, start))
        if len(eligible) >= n:
            break
    if not eligible:
        raise ValueError(f"no held-out {side} document has the {need} tokens a prompt ({prompt_tokens}) and its "
                         "continuation need; use fewer prompt_tokens / max_new_tokens or longer documents")
    prompts: list[GenerationPrompt] = []
    used: set[tuple[int, int]] = set()
    j = 0
    while len(prompts) < n:
        doc, ids, char_start = eligible[j % len(eligible)]
        j += 1
        offset = rng.randrange(0, len(ids) - need + 1)
        if (doc, offset) in used and j < 20 * n:
            continue
        used.add((doc, offset))
        prompts.append(GenerationPrompt(side, doc, offset, bos + ids[offset:offset + prompt_tokens],
                                        ids[offset + prompt_tokens:offset + need], char_start))
    if len(eligible) < n:
        logger.warning("only %d held-out %s documents are long enough for a prompt; %d prompts reuse them at other "
                       "offsets", len(eligible), side, n - len(eligible))
    return prompts


def _cut_at_eos(ids: list[int], eos: int | None) -> list[int]:
    return ids[:ids.index(eos)] if eos is not None and eos in ids else ids


def generate(model: Any, prompts: list[GenerationPrompt], config: GenerationConfig, decoding: str, *,
             mask: Any | None = None, progress: bool = False) -> list[list[int]]:
    """The new token ids of each prompt's continuation (cut at EOS), with ``mask`` applied if given."""
    if decoding not in DECODINGS:
        raise ValueError(f"unknown decoding {decoding!r}; choose one of {list(DECODINGS)}")
    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    sample = decoding == "sampled"
    gen = HFGenerationConfig(do_sample=sample, temperature=config.temperature if sample else 1.0,
                             top_k=config.top_k if sample else 50, top_p=config.top_p if sample else 1.0,
                             max_new_tokens=config.max_new_tokens, repetition_penalty=1.0, num_beams=1,
                             pad_token_id=pad, eos_token_id=tok.eos_token_id, use_cache=True)
    hf = model.original_model
    device = model.cfg.device
    out: list[list[int]] = []
    with masked(model, mask), kv_cache_fix(model), torch.no_grad():
        for b, start in enumerate(tqdm(range(0, len(prompts), config.batch_size), desc=f"generate ({decoding})",
                                       disable=not progress)):
            batch = prompts[start:start + config.batch_size]
            ids = torch.tensor([p.tokens for p in batch], device=device)  # (B, P): equal lengths, no padding
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed + b)
                res = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen)
            out += [_cut_at_eos(row, tok.eos_token_id) for row in res[:, ids.shape[1]:].tolist()]
    return out


def continuation_loss(model: Any, prompts: list[GenerationPrompt], continuations: list[list[int]], *,
                      batch_size: int = 16) -> float:
    """Mean per-token loss (nats) of ``continuations`` given their prompts, under ``model`` as it is."""
    total, n = 0.0, 0
    device = model.cfg.device
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            rows = [(p.tokens, c) for p, c in zip(prompts[start:start + batch_size],
                                                  continuations[start:start + batch_size]) if c]
            if not rows:
                continue
            width = max(len(p) + len(c) for p, c in rows)
            pad = model.tokenizer.pad_token_id or 0
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            for i, (p, c) in enumerate(rows):
                ids[i, :len(p) + len(c)] = torch.tensor(p + c)  # right padding: causal, so never attended to
            logprobs = torch.log_softmax(model(ids.to(device), return_type="logits").float(), dim=-1)
            for i, (p, c) in enumerate(rows):
                pos = torch.arange(len(p) - 1, len(p) + len(c) - 1)
                target = torch.tensor(c, device=logprobs.device)
                total += float(-logprobs[i, pos, target].double().sum())
                n += len(c)
    return total / n if n else float("nan")


class GenerationEvaluator:
    """Generation-level forgetting of one model for any number of masks, sharing prompts and the detector."""

    def __init__(self, model: Any, forget_eval: list[str], retain_eval: list[str], forget_sel: list[str],
                 retain_sel: list[str], config: GenerationConfig | None = None, *, detector: Detector | None = None,
                 progress: bool = False) -> None:
        self.model, self.config, self.progress = model, config or GenerationConfig(), progress
        c = self.config
        self.detector = detector or make_detector(c.detector, model, forget_sel, retain_sel,
                                                  n_tokens=c.max_new_tokens, seed=c.seed)
        self.prompts = {
            "forget": make_prompts(model, forget_eval, n=c.n_prompts, prompt_tokens=c.prompt_tokens,
                                   continuation_tokens=c.max_new_tokens, seed=c.seed, side="forget"),
            "retain": make_prompts(model, retain_eval, n=c.n_prompts, prompt_tokens=c.prompt_tokens,
                                   continuation_tokens=c.max_new_tokens, seed=c.seed + 1, side="retain"),
        }
        ref = {side: self.detector([self._decode(p.reference) for p in ps]) for side, ps in self.prompts.items()}
        self.reference = {"forget_in_domain": sum(ref["forget"]) / len(ref["forget"]),
                          "retain_in_domain": sum(ref["retain"]) / len(ref["retain"])}
        if self.reference["forget_in_domain"] - self.reference["retain_in_domain"] < 0.5:
            logger.warning("the %s detector barely separates the documents' own continuations (forget %.2f vs "
                           "retain %.2f in the domain): its shares say little; name another --detector",
                           self.detector.name, self.reference["forget_in_domain"], self.reference["retain_in_domain"])

    def _decode(self, ids: list[int]) -> str:
        return self.model.tokenizer.decode(ids, skip_special_tokens=True)

    def describe(self) -> dict:
        """Detector, its check on the true continuations, the config and the example prompts (for results)."""
        d = dict(self.detector.describe())
        evidence = getattr(self.detector, "auto_evidence", None)
        if evidence is not None:
            d["auto_evidence"] = evidence
        n = self.config.n_examples
        return {"config": self.config.to_json(), "detector": d,
                "reference_forget_in_domain": self.reference["forget_in_domain"],
                "reference_retain_in_domain": self.reference["retain_in_domain"],
                "examples": {side: [{"prompt": self._decode(p.tokens), "reference": self._decode(p.reference)}
                                    for p in ps[:n]] for side, ps in self.prompts.items()}}

    def run(self, mask: Any | None = None) -> dict:
        """Per decoding: ``forget_in_domain``, ``retain_in_domain``, ``retain_fluency``, ``n`` and examples."""
        out: dict[str, Any] = {}
        n = self.config.n_examples
        for decoding in self.config.decodings:
            res: dict[str, Any] = {}
            texts: dict[str, list[str]] = {}
            for side, prompts in self.prompts.items():
                ids = generate(self.model, prompts, self.config, decoding, mask=mask, progress=self.progress)
                texts[side] = [self._decode(c) for c in ids]
                hits = self.detector(texts[side])
                res[f"{side}_in_domain"] = sum(hits) / len(hits)
                res[f"{side}_examples"] = [{"text": t, "in_domain": h} for t, h in list(zip(texts[side], hits))[:n]]
                if side == "retain":  # fluency under the unpruned model: no mask here
                    res["retain_fluency"] = continuation_loss(self.model, prompts, ids,
                                                              batch_size=self.config.batch_size)
            res["n"] = len(self.prompts["forget"])
            out[decoding] = res
        return out


def flat_metrics(result: dict) -> dict[str, float]:
    """The numeric generation metrics of ``GenerationEvaluator.run`` as flat ``generation_<decoding>_<metric>``."""
    return {f"generation_{dec}_{k}": float(v) for dec, res in result.items() for k, v in res.items()
            if k in ("forget_in_domain", "retain_in_domain", "retain_fluency")}


def generation_table(results: dict) -> list[list[str]]:
    """Rows (method, k, then forget in-domain / retain in-domain / retain fluency per decoding) as strings."""
    decodings = list(results["baseline"]["generation"])
    head = ["method", "k"]
    for d in decodings:
        head += [f"{d}: forget in-domain", f"{d}: retain in-domain", f"{d}: retain fluency (nats)"]
    rows = [head]
    entries = [("(none)", 0, results["baseline"])] + [(r["method"], r["k"], r) for r in
                                                      sorted(results["runs"], key=lambda r: (r["k"], r["method"]))]
    for method, k, r in entries:
        row = [method, str(k)]
        for d in decodings:
            g = r["generation"][d]
            row += [f"{g['forget_in_domain']:.2f}", f"{g['retain_in_domain']:.2f}", f"{g['retain_fluency']:.3f}"]
        rows.append(row)
    return rows


def report_section(results: dict) -> tuple[str, str]:
    """(markdown, html) of generation-level forgetting for the sweep report: shares, then examples side by side."""
    import html as _html

    info = results["generation"]
    det = info["detector"]
    rows = generation_table(results)
    intro = (f"Generation-level forgetting: {info['config']['n_prompts']} prompts per side of "
             f"{info['config']['prompt_tokens']} tokens from held-out documents, {info['config']['max_new_tokens']} "
             f"new tokens, detector {det['name']} ({det['how']}"
             + (f"; held-out accuracy {det['heldout_accuracy']:.3f}" if "heldout_accuracy" in det else "") +
             f"). On the documents' own continuations the detector says in-domain for "
             f"{info['reference_forget_in_domain']:.2f} of forget and {info['reference_retain_in_domain']:.2f} of "
             "retain prompts. Retain fluency is the loss of the retain continuations under the unpruned model.")
    top_k = max((r["k"] for r in results["runs"]), default=0)
    shown = [("(none)", results["baseline"])] + [(f"{r['method']} k={r['k']}", r) for r in results["runs"]
                                                  if r["k"] == top_k]
    decoding = "greedy" if "greedy" in results["baseline"]["generation"] else next(iter(results["baseline"]["generation"]))
    e = _html.escape

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "⏎")

    md = ["## Generation-level forgetting", "", intro, "", "| " + " | ".join(rows[0]) + " |",
          "|" + "---|" * len(rows[0])] + ["| " + " | ".join(r) + " |" for r in rows[1:]] + [""]
    h = ["<h2>Generation-level forgetting</h2>", f"<p>{e(intro)}</p><table>",
         "<tr>" + "".join(f"<th>{e(x)}</th>" for x in rows[0]) + "</tr>"]
    h += ["<tr>" + "".join(f"<td>{e(x)}</td>" for x in r) + "</tr>" for r in rows[1:]] + ["</table>"]
    for side in ("forget", "retain"):
        examples = info["examples"][side]
        if not examples:
            continue
        head = ["prompt", "document's own continuation"] + [name for name, _ in shown]
        md += [f"### {side} prompts, {decoding} continuations (before / after pruning; ✓ = in the domain)", "",
               "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        h += [f"<h3>{e(side)} prompts, {e(decoding)} continuations (before / after pruning; ✓ = in the domain)</h3>",
              "<table><tr>" + "".join(f"<th>{e(x)}</th>" for x in head) + "</tr>"]
        for i, ex in enumerate(examples):
            conts = []
            for _, r in shown:
                got = r["generation"][decoding][f"{side}_examples"]
                conts.append(("✓ " if got[i]["in_domain"] else "✗ ") + got[i]["text"] if i < len(got) else "")
            cells = [ex["prompt"], ex["reference"]] + conts
            md.append("| " + " | ".join(cell(c) for c in cells) + " |")
            h.append("<tr>" + "".join(f"<td><pre style='white-space:pre-wrap;margin:0'>{e(c)}</pre></td>"
                                      for c in cells) + "</tr>")
        md.append("")
        h.append("</table>")
    return "\n".join(md), "\n".join(h)
