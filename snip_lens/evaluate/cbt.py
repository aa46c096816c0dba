"""Children's Book Test (CBT) cloze accuracy (SNIP evaluation of general capability), with KV-cache reuse.

An item is 20 context sentences, a question sentence with one word blanked as ``XXXXX``, 10 candidate
words and the answer. As in the paper, each candidate is substituted into the question and the candidate
whose sentence the model finds most probable wins.

Scoring, precisely. The text fed to the model is the context sentences joined by spaces, then a space,
then the question with the candidate in place of ``XXXXX``. It is tokenised in three pieces whose ids are
concatenated (no special tokens; BOS first when ``prepends_bos(model)``):

- ``context``: the context sentences joined by spaces;
- ``stem``: a space and the question up to the blank, without the space before the blank;
- ``completion``: the space before the blank (when there is one), the candidate and the rest of the question.

The score of a candidate is ``exp(-mean token loss)`` over the tokens of the question sentence (stem +
completion; context tokens are conditioning only), the CBT convention of scoring the whole question
sentence. When nothing precedes the question (an item without context on a model without BOS, such as
SmolLM2), its first token has no prediction and is conditioning only: the score is over the rest.
Both paths below score exactly this same token sequence, so they must give the same argmax:

- naive: one full forward per candidate over context + stem + completion;
- KV cache (default): context + stem run once with ``use_cache=True``; the stem's token losses come from
  that pass, and the 10 completions are then run as one batch on top of the cached keys/values.

The HF model underneath the bridge (``model.original_model``) is called directly: its submodules are the
bridge's components, so hooks (neuron masks) fire on the cached and the new tokens alike. The KV cache is
filled through ``kv_cache_fix`` (TransformerLens 4.3's attention bridges miss the cache under the name
transformers 5 passes it).

Long items are truncated from the left of the context so that every candidate sequence fits ``n_ctx``.

CBT-P / CBT-V style items can be built from any prose with ``build_cloze_items``: the blanked words and
the distractors come from the fixed lists ``PREPOSITIONS`` and ``VERBS``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from .._io import iter_jsonl
from ..models import encode, prepends_bos
from ._common import cache_kwarg, kv_cache_fix, masked, output_cache

logger = logging.getLogger(__name__)

BLANK = "XXXXX"
"""The placeholder of the missing word in a CBT question."""

CBT_CONFIGS = ("CN", "NE", "P", "V")
"""CBT configurations: common nouns, named entities, prepositions, verbs."""

HF_DATASET = "cam-cst/cbt"
"""The Hugging Face dataset id of CBT (its configs are ``CN``, ``NE``, ``P``, ``V``)."""

PREPOSITIONS: tuple[str, ...] = (
    "about", "above", "across", "after", "against", "along", "among", "around", "at", "before", "behind",
    "below", "beneath", "beside", "between", "beyond", "by", "down", "during", "for", "from", "in", "inside",
    "into", "near", "of", "off", "on", "onto", "out", "over", "through", "to", "toward", "under", "until",
    "up", "upon", "with", "within", "without",
)
"""Words blanked in CBT-P style items built from prose, and their distractors (41 common prepositions)."""

VERBS: tuple[str, ...] = (
    "is", "are", "was", "were", "be", "been", "has", "have", "had", "do", "does", "did", "make", "makes",
    "made", "take", "takes", "took", "give", "gives", "gave", "get", "gets", "got", "see", "sees", "saw",
    "use", "uses", "used", "return", "returns", "returned", "call", "calls", "called", "find", "finds",
    "found", "say", "says", "said", "go", "goes", "went", "come", "comes", "came", "know", "knows", "knew",
    "think", "thinks", "thought", "look", "looks", "looked", "want", "wants", "wanted", "become",
    "becomes", "became", "contain", "contains", "contained", "create", "creates", "created", "raise",
    "raises", "raised", "define", "defines", "defined", "keep", "keeps", "kept",
)
"""Words blanked in CBT-V style items built from prose, and their distractors: common English verbs in
their frequent inflected forms (auxiliaries included), lower case."""


@dataclass
class CBTItem:
    """One cloze question: which of ``options`` fills the ``XXXXX`` in ``question``."""

    context: list[str]
    """The sentences before the question (20 in CBT), in order."""
    question: str
    """The question sentence, with the missing word written ``XXXXX`` exactly once."""
    options: list[str]
    """The candidate words (10 in CBT), the answer among them."""
    answer: str
    """The missing word."""

    def __post_init__(self) -> None:
        if self.question.count(BLANK) != 1:
            raise ValueError(
                f"a CBT question must contain {BLANK!r} exactly once, got {self.question.count(BLANK)} in "
                f"{self.question[:120]!r}"
            )
        if len(self.options) < 2:
            raise ValueError(f"a CBT item needs at least 2 options, got {self.options!r}")
        if self.answer not in self.options:
            raise ValueError(
                f"the answer {self.answer!r} is not among the options {self.options!r}; every item needs "
                "its answer listed as one of the options"
            )

    @property
    def label(self) -> int:
        """Index of the answer in ``options``."""
        return self.options.index(self.answer)


# ---- loading ----------------------------------------------------------------------------------------


_FIELDS: dict[str, type] = {"sentences": list, "question": str, "answer": str, "options": list}


def _item_from_record(rec: Any, where: str) -> CBTItem:
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object with fields {list(_FIELDS)}, got {type(rec).__name__}")
    for name, kind in _FIELDS.items():
        if name not in rec:
            raise ValueError(
                f"{where}: missing field {name!r}; each CBT record needs the fields {list(_FIELDS)} "
                "(the schema of the Hugging Face 'cbt' dataset)"
            )
        if not isinstance(rec[name], kind):
            raise ValueError(f"{where}: field {name!r} must be a {kind.__name__}, got {type(rec[name]).__name__}")
    for name in ("sentences", "options"):
        if not all(isinstance(x, str) for x in rec[name]):
            raise ValueError(f"{where}: field {name!r} must be a list of strings")
    try:
        return CBTItem(context=list(rec["sentences"]), question=rec["question"], options=list(rec["options"]),
                       answer=rec["answer"])
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _load_jsonl(path: Path, max_items: int | None) -> list[CBTItem]:
    if not path.is_file():
        raise FileNotFoundError(
            f"CBT file {str(path)!r} does not exist; give a JSONL file with one item per line "
            f"(fields {list(_FIELDS)}), or source='hf' to download CBT"
        )
    items: list[CBTItem] = []
    for lineno, rec in iter_jsonl(path):
        items.append(_item_from_record(rec, f"{path}:{lineno}"))
        if max_items is not None and len(items) >= max_items:
            break
    if not items:
        raise ValueError(
            f"CBT file {str(path)!r} holds no items; write one JSON object per line with fields {list(_FIELDS)}"
        )
    return items


def load_cbt(source: str | Path = "hf", config: Literal["P", "V", "NE", "CN"] = "P", *, split: str = "test",
             max_items: int | None = None) -> list[CBTItem]:
    """CBT items from the Hugging Face hub (``source="hf"``) or a local JSONL file of the same schema.

    A JSONL line is ``{"sentences": [...], "question": "... XXXXX ...", "answer": "w", "options": [...]}``;
    blank lines are skipped. ``config`` selects the CBT configuration on the hub (ignored for files).
    """
    if config not in CBT_CONFIGS:
        raise ValueError(f"unknown CBT config {config!r}; choose one of {', '.join(CBT_CONFIGS)}")
    if max_items is not None and (not isinstance(max_items, int) or max_items < 1):
        raise ValueError(f"max_items must be a positive integer or None, got {max_items!r}")
    if str(source) != "hf":
        return _load_jsonl(Path(source).expanduser(), max_items)
    try:
        import datasets

        sel = split if max_items is None else f"{split}[:{max_items}]"
        ds = datasets.load_dataset(HF_DATASET, config, split=sel)
    except Exception as exc:  # noqa: BLE001 - offline, unknown split, hub errors: one clear message
        raise ConnectionError(
            f"could not load CBT config {config!r} split {split!r} from the Hugging Face hub "
            f"({HF_DATASET}): {type(exc).__name__}: {exc}. Offline, pass a local JSONL file in the same "
            "schema as source=..., or build CBT-P/CBT-V style items from any prose with build_cloze_items"
        ) from exc
    return [_item_from_record(dict(rec), f"{HF_DATASET}/{config}/{split}[{i}]") for i, rec in enumerate(ds)]


def save_cbt_jsonl(items: list[CBTItem], path: str | Path) -> None:
    """Write items as JSONL in the schema ``load_cbt`` reads (atomically)."""
    import os
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for it in items:
                f.write(json.dumps({"sentences": it.context, "question": it.question, "answer": it.answer,
                                    "options": it.options}) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ---- building items from prose ----------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_WORD = re.compile(r"[A-Za-z]+")


def split_sentences(text: str) -> list[str]:
    """Split prose into sentences at ``.``/``!``/``?`` followed by space and a capital; whitespace collapsed."""
    text = re.sub(r"\s+", " ", text).strip()
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def build_cloze_items(texts: list[str], kind: Literal["P", "V"] = "P", n_items: int = 100, seed: int = 0,
                      n_context: int = 20, n_options: int = 10) -> list[CBTItem]:
    """CBT-P / CBT-V style items from any prose.

    Each text is split into sentences. A candidate is a sentence preceded by at least ``n_context``
    sentences of the same text that contains, as a whole lower-case word, a word of the class list
    (``PREPOSITIONS`` for ``"P"``, ``VERBS`` for ``"V"``). One such occurrence is blanked; the options are
    the answer and ``n_options - 1`` other words of the same list, shuffled. ``n_items`` candidates are
    drawn without replacement with ``seed``.
    """
    if kind not in ("P", "V"):
        raise ValueError(f"kind must be 'P' (prepositions) or 'V' (verbs), got {kind!r}")
    if isinstance(texts, str):
        raise ValueError("texts must be a list of documents, got a single string; wrap it in a list")
    words = PREPOSITIONS if kind == "P" else VERBS
    if not 2 <= n_options <= len(words):
        raise ValueError(f"n_options must be between 2 and {len(words)} for kind {kind!r}, got {n_options!r}")
    if not isinstance(n_items, int) or n_items < 1:
        raise ValueError(f"n_items must be a positive integer, got {n_items!r}")
    if not isinstance(n_context, int) or n_context < 0:
        raise ValueError(f"n_context must be a non-negative integer, got {n_context!r}")
    vocab = set(words)
    candidates: list[tuple[list[str], str, list[re.Match]]] = []
    for text in texts:
        sents = split_sentences(text)
        for i in range(n_context, len(sents)):
            hits = [m for m in _WORD.finditer(sents[i]) if m.group(0) in vocab]
            if hits and BLANK not in sents[i]:
                candidates.append((sents[i - n_context:i], sents[i], hits))
    if len(candidates) < n_items:
        raise ValueError(
            f"the texts give only {len(candidates)} sentences with a {'preposition' if kind == 'P' else 'verb'} "
            f"after {n_context} context sentences, fewer than n_items={n_items}; give more or longer texts, "
            "or ask for fewer items"
        )
    rng = random.Random(seed)
    items = []
    for context, sentence, hits in rng.sample(candidates, n_items):
        m = rng.choice(hits)
        answer = m.group(0)
        question = sentence[:m.start()] + BLANK + sentence[m.end():]
        options = [answer] + rng.sample([w for w in words if w != answer], n_options - 1)
        rng.shuffle(options)
        items.append(CBTItem(context=list(context), question=question, options=options, answer=answer))
    return items


# ---- scoring ----------------------------------------------------------------------------------------


@dataclass
class _Encoded:
    prefix: list[int]  # BOS? + context + stem
    n_stem: int  # how many of the prefix's last tokens belong to the question (scored)
    completions: list[list[int]]  # one per option

    @property
    def stem(self) -> list[int]:
        return self.prefix[len(self.prefix) - self.n_stem:]


def _encode_item(model: Any, item: CBTItem, n_ctx: int) -> _Encoded:
    before, after = item.question.split(BLANK)
    space = ""
    if before.endswith(" "):
        before, space = before[:-1], " "
    stem_text = (" " if item.context else "") + before
    context = encode(model, " ".join(item.context)) if item.context else []
    stem = encode(model, stem_text) if stem_text else []
    completions = [encode(model, space + opt + after) for opt in item.options]
    bos = [model.tokenizer.bos_token_id] if prepends_bos(model) else []
    budget = n_ctx - len(bos) - len(stem) - max(len(c) for c in completions)
    if budget < 0:
        raise ValueError(
            f"the question {item.question[:80]!r} with its longest option does not fit the model's context "
            f"of {n_ctx} tokens even without any context sentence; shorten the question or its options"
        )
    if len(context) > budget:
        logger.debug("truncating a CBT context from %d to %d tokens (n_ctx=%d)", len(context), budget, n_ctx)
        context = context[len(context) - budget:]
    if not bos and not context and not stem:
        raise ValueError(
            f"CBT item with question {item.question[:80]!r} leaves no token before the blank, so the first "
            "option token cannot be predicted; give context sentences or a shorter question"
        )
    prefix = bos + context + stem
    # Every scored token needs a token before it: with no BOS and no context the first stem token has none.
    n_stem = min(len(stem), len(prefix) - 1)
    return _Encoded(prefix=prefix, n_stem=n_stem, completions=completions)


def _stem_loss(preds: Float[Tensor, "n_stem vocab"], stem: list[int]) -> float:
    """Summed loss of the ``stem`` tokens given the logits that predict them (one row per token)."""
    if not stem:
        return 0.0
    target = torch.tensor(stem, device=preds.device)
    logprobs = torch.log_softmax(preds.float(), dim=-1)
    return float(-logprobs.gather(-1, target[:, None]).sum())


def _completion_losses(logits: Float[Tensor, "n comp vocab"], first_logits: Float[Tensor, " vocab"],
                       completions: list[list[int]]) -> list[float]:
    """Summed loss of each completion.

    ``logits`` (n, C, vocab): logits at the completion positions (padded on the right); ``first_logits``
    (vocab,): the prediction of each completion's first token (from the last prefix position).
    """
    out = []
    for i, comp in enumerate(completions):
        c = len(comp)
        target = torch.tensor(comp, device=logits.device)
        preds = torch.cat([first_logits[None], logits[i, :c - 1]]).float()  # (c, vocab)
        out.append(float(-torch.log_softmax(preds, dim=-1).gather(-1, target[:, None]).sum()))
    return out


def _pad(seqs: list[list[int]], pad: int) -> Int[Tensor, "n width"]:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [pad] * (width - len(s)) for s in seqs], dtype=torch.long)


def _scores_kv(hf: Any, enc: _Encoded, pad: int, batch_size: int, device: Any) -> list[float]:
    prefix = torch.tensor([enc.prefix], device=device)
    # Only the logits predicting the stem tokens and the first completion token are needed.
    keep = {"logits_to_keep": enc.n_stem + 1} if _accepts(hf, "logits_to_keep") else {}
    out = hf(input_ids=prefix, use_cache=True, **keep)
    prefix_cache = output_cache(out)
    assert prefix_cache is not None and prefix_cache.get_seq_length() == len(enc.prefix), "KV cache not filled"
    kw = cache_kwarg(hf)
    kept = out.logits[0, -(enc.n_stem + 1):]  # (n_stem + 1, vocab)
    stem_loss = _stem_loss(kept[:-1], enc.stem)
    first = kept[-1]
    losses: list[float] = []
    for start in range(0, len(enc.completions), batch_size):
        comps = enc.completions[start:start + batch_size]
        cache = _repeat_cache(prefix_cache, len(comps))
        ids = _pad(comps, pad).to(device)  # (n, C); right padding never reaches a real token (causal)
        logits = hf(input_ids=ids, use_cache=True, **{kw: cache}).logits  # (n, C, vocab)
        losses += _completion_losses(logits, first, comps)
    return [math.exp(-(stem_loss + l) / (enc.n_stem + len(c))) for l, c in zip(losses, enc.completions)]


def _accepts(fn_owner: Any, name: str) -> bool:
    import inspect

    return name in inspect.signature(fn_owner.forward).parameters


def _repeat_cache(cache: Any, n: int) -> Any:
    """A fresh copy of a batch-1 HF cache repeated ``n`` times (the forward extends caches in place)."""
    import copy

    new = copy.deepcopy(cache)
    new.batch_repeat_interleave(n)
    return new


def _scores_naive(hf: Any, enc: _Encoded, pad: int, batch_size: int, device: Any) -> list[float]:
    scores: list[float] = []
    p = len(enc.prefix)
    for start in range(0, len(enc.completions), batch_size):
        comps = enc.completions[start:start + batch_size]
        ids = _pad([enc.prefix + c for c in comps], pad).to(device)  # (n, P + C)
        # Logits only from the position predicting the first stem token on (as the KV path).
        n_keep = ids.shape[1] - (p - enc.n_stem - 1)
        keep = {"logits_to_keep": n_keep} if _accepts(hf, "logits_to_keep") else {}
        logits = hf(input_ids=ids, use_cache=False, **keep).logits
        off = ids.shape[1] - logits.shape[1]  # position j of ids is row j - off of logits
        for i, comp in enumerate(comps):
            stem_loss = _stem_loss(logits[i, p - enc.n_stem - 1 - off:p - 1 - off], enc.stem)
            comp_loss = _completion_losses(logits[i:i + 1, p - off:], logits[i, p - 1 - off], [comp])[0]
            scores.append(math.exp(-(stem_loss + comp_loss) / (enc.n_stem + len(comp))))
    return scores


def cbt_scores(model: Any, items: list[CBTItem], *, mask: Any | None = None, batch_size: int = 10,
               use_kv_cache: bool = True, progress: bool = False) -> list[list[float]]:
    """``exp(-mean token loss)`` of the question sentence with each option substituted, per item.

    ``batch_size`` is how many options run in one forward. See the module docstring for the exact tokens
    scored; ``use_kv_cache=False`` runs the naive full forward per option on the same token split.
    """
    if not items:
        raise ValueError("no CBT items to score; load some with load_cbt or build_cloze_items")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    hf = model.original_model
    n_ctx = int(model.cfg.n_ctx)
    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    device = model.cfg.device
    score = _scores_kv if use_kv_cache else _scores_naive
    out = []
    with masked(model, mask), kv_cache_fix(model), torch.no_grad():
        for item in tqdm(items, desc="CBT" + (" (kv cache)" if use_kv_cache else ""), disable=not progress):
            out.append(score(hf, _encode_item(model, item, n_ctx), pad, batch_size, device))
    return out


def cbt_accuracy(model: Any, items: list[CBTItem], *, mask: Any | None = None, batch_size: int = 10,
                 use_kv_cache: bool = True, progress: bool = False) -> dict[str, Any]:
    """Cloze accuracy: the fraction of items whose highest-scoring option is the answer.

    Returns ``accuracy``, ``n_items``, ``n_correct`` and ``predictions`` (the chosen option index per item;
    ties go to the first option).
    """
    scores = cbt_scores(model, items, mask=mask, batch_size=batch_size, use_kv_cache=use_kv_cache,
                        progress=progress)
    preds = [max(range(len(s)), key=s.__getitem__) for s in scores]
    correct = sum(p == it.label for p, it in zip(preds, items))
    return {"accuracy": correct / len(items), "n_items": len(items), "n_correct": correct, "predictions": preds}

