"""Neuron selection methods: rank every MLP neuron for pruning, then keep the top k (SNIP step 4).

Every method returns a ``NeuronScores`` (higher = prune first); ``mask_from_scores`` turns the top k into a
``NeuronMask`` (the k best overall, or with ``select="per-layer"`` k/L in each layer). Equal scores are
ordered by each method's declared secondary signal, then by a seeded random draw (``NeuronScores``).
Methods:

- ``snip``: max cosine similarity between the neuron's explanation and any forget-set concept.
- ``random``: a seeded random permutation (the floor any method must beat).
- ``keyword``: neurons whose explanation contains one of the given keywords, ranked by explanation score.
- ``llm-judge``: an LLM rates each neuron of a shortlist (``judge_shortlist``) 0-10 from forget samples and
  the neuron's explanation.
- ``activation``: Pochinkov & Schoots (2024) selective pruning, mean |act| on forget divided by mean |act|
  on retain (+eps); ``activation-freq`` uses the frequency of act > 0 instead.
- ``hybrid``: concept and activation evidence together, see ``hybrid_scores``.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any, Iterable, Sequence

import torch

from .score import NeuronScores
from .types import NeuronExplanation, NeuronId

logger = logging.getLogger(__name__)

METHODS = ("snip", "random", "keyword", "llm-judge", "activation", "activation-freq", "hybrid")


def parse_k(k: int | float | str, n_total: int) -> int:
    """A neuron count from ``k``: an int count, or a percentage such as ``"2%"`` / ``"2.5%"`` of all neurons."""
    if isinstance(k, str):
        text = k.strip()
        if text.endswith("%"):
            try:
                pct = float(text[:-1])
            except ValueError:
                raise ValueError(f"cannot read k={k!r}: write a count like 500 or a percentage like '2%'") from None
            if not 0 <= pct <= 100:
                raise ValueError(f"k={k!r} is not a percentage between 0% and 100%")
            return int(round(pct / 100 * n_total))
        try:
            k = int(text)
        except ValueError:
            raise ValueError(f"cannot read k={k!r}: write a count like 500 or a percentage like '2%'") from None
    if isinstance(k, float):
        if not k.is_integer():
            raise ValueError(f"k={k!r} is fractional: give a whole count, or a percentage string like '2%'")
        k = int(k)
    if k < 0:
        raise ValueError(f"k={k} is negative: give a count between 0 and {n_total}")
    if k > n_total:
        raise ValueError(f"k={k} is larger than the model's {n_total} MLP neurons: give at most {n_total}, "
                         "or a percentage like '2%'")
    return int(k)


def explanation_quality(explanations: Iterable[NeuronExplanation], n_layers: int, d_mlp: int
                        ) -> torch.Tensor | None:
    """Each neuron's explanation score (e.g. OpenAI's simulation correlation), -inf where unknown; None if none
    is known. SNIP's declared secondary signal: among equal cosines, the better-explained neuron first."""
    out = _empty(n_layers, d_mlp)
    known = False
    for nid, e in _explanation_grid(explanations, n_layers, d_mlp).items():
        if e.score is not None and math.isfinite(e.score):
            out[nid.layer, nid.index] = float(e.score)
            known = True
    return out if known else None


def _empty(n_layers: int, d_mlp: int) -> torch.Tensor:
    return torch.full((n_layers, d_mlp), float("-inf"), dtype=torch.float64)


def _explanation_grid(explanations: Iterable[NeuronExplanation], n_layers: int, d_mlp: int
                      ) -> dict[NeuronId, NeuronExplanation]:
    out: dict[NeuronId, NeuronExplanation] = {}
    for e in explanations:
        if not (0 <= e.neuron.layer < n_layers and 0 <= e.neuron.index < d_mlp):
            raise ValueError(f"explanation for neuron {e.neuron} is outside the model's shape "
                             f"({n_layers} layers x {d_mlp} neurons): were they made for another model?")
        if e.ok:
            out[e.neuron] = e
    return out


def random_scores(n_layers: int, d_mlp: int, *, seed: int = 0, model_name: str = "") -> NeuronScores:
    """Uniform random scores from a seeded generator: the top k is a uniform random set of k neurons."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand((n_layers, d_mlp), generator=g, dtype=torch.float64)
    return NeuronScores(scores=scores, method="random", labels={}, model_name=model_name, tie_seed=seed)


def keyword_scores(explanations: Iterable[NeuronExplanation], keywords: Sequence[str], *, n_layers: int,
                   d_mlp: int, model_name: str = "", seed: int = 0) -> NeuronScores:
    """Neurons whose explanation contains a keyword (whole word, case-insensitive), ranked by explanation score.

    As in the paper's keyword baseline, selection is by keyword: every matched neuron scores 1 and every
    unmatched one has no score (never chosen). Among the matched ones the declared secondary signal, the
    explanation's own quality score, decides (those without one come after those with one), then a random
    draw seeded with ``seed``.
    """
    kws = [k.strip() for k in keywords if k and k.strip()]
    if not kws:
        raise ValueError("keyword selection needs at least one non-empty keyword, e.g. --keywords python,code")
    pattern = re.compile(r"\b(" + "|".join(re.escape(k) for k in kws) + r")\b", re.IGNORECASE)
    grid = _explanation_grid(explanations, n_layers, d_mlp)
    scores = _empty(n_layers, d_mlp)
    quality = _empty(n_layers, d_mlp)
    labels: dict[NeuronId, str] = {}
    for nid, e in grid.items():
        m = pattern.search(e.explanation or "")
        if m:
            scores[nid.layer, nid.index] = 1.0
            if e.score is not None and math.isfinite(e.score):
                quality[nid.layer, nid.index] = float(e.score)
            labels[nid] = m.group(0).lower()
    if not labels:
        logger.warning("no explanation contains any of the keywords %s", kws)
    return NeuronScores(scores=scores, method="keyword", labels=labels, model_name=model_name, secondary=quality,
                        secondary_name="explanation score", tie_seed=seed)


def activation_scores(records: Any, *, forget: str = "forget", retain: str = "retain", eps: float = 1e-6,
                      statistic: str = "mean_abs", model_name: str = "", seed: int = 0) -> NeuronScores:
    """Pochinkov & Schoots (2024): importance on forget data relative to retain data, per neuron.

    ``statistic="mean_abs"``: mean |activation| on forget / (mean |activation| on retain + eps).
    ``statistic="freq_pos"``: the frequency of act > 0 instead (their frequency variant).
    ``records`` is an ``ActivationRecords`` collected on both corpora under the names given. Equal ratios
    (e.g. neurons silent on both corpora) are ordered by the declared secondary signal, the statistic on the
    forget corpus alone (the neuron that does more on the forget data first), then by a draw seeded with ``seed``.
    """
    stats = getattr(records, "stats", None) or {}
    missing = [n for n in (forget, retain) if n not in stats]
    if missing:
        raise ValueError(f"activation selection needs statistics for corpora {forget!r} and {retain!r}; these "
                         f"records have {sorted(stats)}: collect with corpus={{'{forget}': ..., '{retain}': ...}}")
    if statistic not in ("mean_abs", "freq_pos"):
        raise ValueError(f"unknown activation statistic {statistic!r}; use 'mean_abs' or 'freq_pos'")
    f = getattr(stats[forget], statistic).double()
    r = getattr(stats[retain], statistic).double()
    ratio = f / (r + eps)
    layers = list(records.layers)
    n_layers = int(getattr(records, "n_layers", 0) or (max(layers) + 1))
    scores = _empty(n_layers, f.shape[-1])
    forget_stat = _empty(n_layers, f.shape[-1])
    for i, layer in enumerate(layers):
        scores[layer] = ratio[i]
        forget_stat[layer] = f[i]
    method = "activation" if statistic == "mean_abs" else "activation-freq"
    return NeuronScores(scores=scores, method=method, labels={}, model_name=model_name or records.model_name,
                        secondary=forget_stat, secondary_name=f"{statistic} on {forget}", tie_seed=seed)


def _standardise(scores: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over the finite entries; non-finite entries become 0 (no evidence either way)."""
    out = torch.zeros_like(scores, dtype=torch.float64)
    finite = torch.isfinite(scores)
    if finite.sum() > 1:
        x = scores[finite].double()
        std = x.std()
        out[finite] = (x - x.mean()) / (std if std > 0 else 1.0)
    return out


def hybrid_scores(snip: NeuronScores, activation: NeuronScores, *, weight: float = 0.05,
                  eps: float = 1e-6) -> NeuronScores:
    """Activation evidence first, concept evidence as a correction:

        hybrid = log(activation ratio + eps) + weight * z(concept similarity)

    ``activation ratio`` is the Pochinkov & Schoots importance (mean |act| on forget / on retain) and
    ``z(concept similarity)`` the SNIP score standardised over all neurons (mean 0, std 1). The log makes the
    ratio additive, so ``weight`` is the log-ratio a one-standard-deviation better concept match is worth:
    at the default 0.05, a neuron whose explanation matches a forget concept 2 std better than another
    overtakes it when its activation ratio is within about 10%. Neurons that fire for the forget data keep
    their lead; among neurons of similar activation evidence, those whose explanation names a forget-set
    concept go first. ``weight=0`` is the activation method; neurons without a concept score get z = 0.
    """
    if weight < 0:
        raise ValueError(f"hybrid weight={weight} must be >= 0 (0 is the activation method)")
    if snip.scores.shape != activation.scores.shape:
        raise ValueError(f"cannot combine scores of shapes {tuple(snip.scores.shape)} and "
                         f"{tuple(activation.scores.shape)}: they come from different models or layer sets")
    ratio = activation.scores.double()
    combined = torch.log(ratio.clamp_min(0) + eps) + weight * _standardise(snip.scores)
    combined[~torch.isfinite(ratio)] = float("-inf")
    return NeuronScores(scores=combined, method="hybrid", labels=dict(snip.labels),
                        model_name=snip.model_name or activation.model_name, tie_seed=activation.tie_seed)


JUDGE_PROMPT_VERSION = "judge-v1"


def build_judge_prompt(explanation: str, samples: Sequence[str]) -> list[dict]:
    """The LLM-judge baseline: rate 0-10 how important a neuron with this explanation is for the samples."""
    shown = "\n\n".join(f"sample{i + 1}: {s}" for i, s in enumerate(samples))
    user = (
        "We're studying neurons in a neural network. Each neuron looks for some particular thing in a short "
        "document. We want to remove the model's ability to process the text samples below by removing the "
        "neurons most important for them.\n\n"
        f"{shown}\n\n"
        f"A neuron's behavior: the main thing this neuron does is find {explanation}\n\n"
        "On a scale from 0 (irrelevant) to 10 (essential), how important is this neuron for a language model "
        "to process the samples above? Answer with a single integer from 0 to 10."
    )
    return [{"role": "user", "content": user}]


def parse_judge_score(text: str) -> float:
    """The first integer 0-10 in the answer; anything else is a parse failure (ValueError)."""
    m = re.search(r"\b(10|[0-9])\b", text or "")
    if not m:
        raise ValueError(f"judge answer has no score from 0 to 10: {text[:80]!r}")
    return float(m.group(1))


JUDGE_SHORTLISTS = ("snip+activation", "snip", "activation", "random")
"""How the LLM judge's shortlist is chosen (see ``judge_shortlist``)."""


def judge_shortlist(n: int, explanations: Iterable[NeuronExplanation], *, how: str = "snip+activation",
                    snip: NeuronScores | None = None, activation: NeuronScores | None = None, seed: int = 0,
                    n_layers: int, d_mlp: int) -> list[NeuronId]:
    """The ``n`` neurons the LLM judge rates, in shortlist order (the judge's declared tie-break).

    Rating every neuron costs one LLM call each, so the judge rates a shortlist of neurons that have an
    explanation (the judge reads it):

    - ``"snip+activation"`` (default): the top of the SNIP ranking and the top of the activation ranking
      taken in turn (duplicates once), so the shortlist does not depend on SNIP's ranking only;
    - ``"snip"``: the top of the SNIP ranking (the judge then only re-orders SNIP's choice);
    - ``"activation"``: the top of the activation ranking (Pochinkov & Schoots);
    - ``"random"``: a seeded random draw (independent of every other method, but most calls are spent on
      neurons no method would prune).
    """
    if how not in JUDGE_SHORTLISTS:
        raise ValueError(f"unknown judge shortlist {how!r}; choose one of {', '.join(JUDGE_SHORTLISTS)}")
    explained = sorted(_explanation_grid(explanations, n_layers, d_mlp))
    if n < 1 or n > len(explained):
        raise ValueError(f"the LLM judge's shortlist of {n} neurons must be between 1 and the {len(explained)} neurons "
                         "with an explanation; lower --judge-candidates (or k)")
    if how == "random":
        g = torch.Generator().manual_seed(seed)
        return [explained[int(i)] for i in torch.randperm(len(explained), generator=g)[:n]]
    need = {"snip": [snip], "activation": [activation], "snip+activation": [snip, activation]}[how]
    if any(x is None for x in need):
        raise ValueError(f"judge shortlist {how!r} needs the {how.replace('+', ' and ')} scores")
    has_expl = torch.zeros((n_layers, d_mlp), dtype=torch.bool)
    for nid in explained:
        has_expl[nid.layer, nid.index] = True
    rankings = []
    for sc in need:
        ranked = sc.top_k(int(torch.isfinite(sc.scores).sum()))
        rankings.append([nid for nid in ranked if has_expl[nid.layer, nid.index]])
    out: list[NeuronId] = []
    seen: set[NeuronId] = set()
    pos = [0] * len(rankings)
    while len(out) < n and any(p < len(r) for p, r in zip(pos, rankings)):
        for j, r in enumerate(rankings):
            while pos[j] < len(r) and r[pos[j]] in seen:
                pos[j] += 1
            if pos[j] < len(r) and len(out) < n:
                out.append(r[pos[j]])
                seen.add(r[pos[j]])
                pos[j] += 1
    if len(out) < n:
        raise ValueError(f"judge shortlist {how!r} found only {len(out)} ranked neurons with an explanation, not {n}; "
                         "lower --judge-candidates or use --judge-shortlist random")
    return out


def llm_judge_scores(explanations: Iterable[NeuronExplanation], samples: Sequence[str], client: Any, *,
                     n_layers: int, d_mlp: int, model_name: str = "", candidates: Iterable[NeuronId] | None = None,
                     cache_dir: Any = None, progress: bool = True, seed: int = 0,
                     shortlist_name: str = "shortlist") -> NeuronScores:
    """LLM-judge baseline: ask ``client`` (with ``async generate(messages)``) for a 0-10 rating per neuron.

    Rating all neurons of a model costs one call per neuron; ``candidates`` limits the calls to a shortlist
    (see ``judge_shortlist``). Neurons not rated, or whose answer could not be parsed, get -inf and are never
    pruned by this method. Answers are cached per neuron/explanation/samples. The ratings are integers, so
    many neurons tie: ties go to the neuron earlier in ``candidates`` (the declared secondary signal,
    ``"<shortlist_name> position"``), then to a draw seeded with ``seed``.
    """
    from .llm import DiskCache, run_all

    if not samples:
        raise ValueError("the LLM judge needs forget samples to show the model; got none")
    grid = _explanation_grid(explanations, n_layers, d_mlp)
    listed = list(candidates) if candidates is not None else None
    todo = [n for n in (listed if listed is not None else grid) if n in grid]
    cache = DiskCache(cache_dir) if cache_dir is not None else None
    scores = _empty(n_layers, d_mlp)
    samples = list(samples)

    async def one(nid: NeuronId) -> tuple[NeuronId, float | None]:
        messages = build_judge_prompt(grid[nid].explanation or "", samples)
        key = None
        if cache is not None:
            key = cache.key(kind="judge", version=JUDGE_PROMPT_VERSION, model=getattr(client, "model", ""),
                            messages=messages)
            hit = cache.get(key)
            if hit is not None:
                return nid, float(hit["score"])
        try:
            value = parse_judge_score(await client.generate(messages))
        except Exception as exc:  # noqa: BLE001 - a failed rating is recorded, never guessed
            logger.warning("judge failed for %s: %s", nid, exc)
            return nid, None
        if cache is not None and key is not None:
            cache.put(key, {"score": value})
        return nid, value

    results = run_all([one(n) for n in todo], desc="llm-judge", progress=progress)
    for nid, value in results:
        if value is not None:
            scores[nid.layer, nid.index] = value
    secondary = None
    if listed is not None:
        secondary = _empty(n_layers, d_mlp)
        for pos, nid in enumerate(listed):  # earlier in the shortlist = higher
            secondary[nid.layer, nid.index] = float(len(listed) - pos)
    return NeuronScores(scores=scores, method="llm-judge", labels={}, model_name=model_name, secondary=secondary,
                        secondary_name=f"{shortlist_name} position" if listed is not None else "", tie_seed=seed)


def mask_from_scores(model: Any, scores: NeuronScores, k: int | str, *, mode: str = "zero",
                     values: Any = None, select: str = "global") -> Any:
    """The ``NeuronMask`` of the top-k neurons of ``scores`` (k a count or a percentage like ``"2%"``).

    ``select="per-layer"`` takes k/L neurons from each of the L layers (see ``NeuronScores.top_k``), whose
    mask an export can compact fully; ``"global"`` the k best overall.
    """
    from .mask import NeuronMask

    n_total = int(scores.scores.numel())
    count = parse_k(k, n_total)
    n_finite = int(torch.isfinite(scores.scores).sum())
    if count > n_finite:
        raise ValueError(f"k={k} asks for {count} neurons but method {scores.method!r} ranked only {n_finite} "
                         "(the rest have no score, e.g. no explanation or no keyword match); lower k")
    return NeuronMask.from_neurons(model, scores.top_k(count, select), mode=mode, values=values)
