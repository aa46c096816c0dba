"""Importing published neuron explanations: OpenAI's neuron-explainer JSONL, DeepDecipher pages, Neuronpedia exports."""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from ..types import NeuronExplanation, NeuronId
from .prompts import EXPLANATION_PREFIX

logger = logging.getLogger(__name__)


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


NEURONPEDIA_NEURON_SOURCES = frozenset({"", "mlp", "mlp-neurons", "neurons"})
"""Neuronpedia source names (after ``<layer>-``) that hold a model's own MLP neurons; every other source
(``res-jb``, ``mlp_128k-oai``, ``gemmascope-...``) is a dictionary of SAE or transcoder latents."""


def _parse_neuronpedia(loc: str, e: dict) -> list[tuple[NeuronId, str, float | None]]:
    m = _NP_LAYER.match(str(e.get("layer", "")).strip())
    if not m:
        raise ValueError(f"{loc}: Neuronpedia layer {e.get('layer')!r} is not '<layer>-<source>' (e.g. '5-mlp')")
    kind = m.group(2) or ""
    if kind.lower() not in NEURONPEDIA_NEURON_SOURCES:
        raise ValueError(
            f"{loc}: Neuronpedia source {e.get('layer')!r} holds SAE/transcoder latents, not MLP neurons: its "
            f"index {e.get('index')!r} is a latent of that dictionary, not a neuron of blocks.N.mlp.hook_post. "
            f"Import the explanations of the model's MLP neurons (layer '<layer>-mlp') instead")
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
                    rows = _parse_neuronpedia(eloc, entry)
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

