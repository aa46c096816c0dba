"""Running the explainers over many neurons: chunks, concurrency, the per-neuron answer cache, files.

LLM answers are cached per neuron on disk (sha256 over prompt version, model, sampling parameters,
neuron and a digest of its records): a rerun re-asks only what is missing. An answer that fails or does
not parse is returned with ``error`` set and is never cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..llm import ChatClient, DiskCache, LLMError, OpenAIChatClient, run_all
from ..types import NeuronEvidence, NeuronExplanation, NeuronId, NeuronRecords
from .both import OfflineCombinedExplainer
from .config import ExplainConfig
from .importers import import_explanations
from .input import OfflineInputExplainer, input_evidence
from .local import LocalChatClient
from .output import OfflineOutputExplainer
from .prompts import (
    BOTH_PROMPT_VERSION,
    OUTPUT_PROMPT_VERSION,
    PROMPT_VERSION,
    build_both_prompt,
    build_explanation_prompt,
    build_output_prompt,
    parse_explanation,
)
from .vocabproj import VocabProjection, activation_signs, vocab_projection

logger = logging.getLogger(__name__)


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
                               temperature=config.local_temperature, seed=config.seed,
                               device=config.local_device, dtype=config.local_dtype)
    raise ValueError(f"explainer kind {config.kind!r} does not use a chat client")


def _cache_identity(config: ExplainConfig) -> dict[str, Any]:
    if config.kind == "openai":
        assert config.llm is not None
        return {"explainer": "openai", **config.llm.sampling}
    ident = {"explainer": "local", "model": config.local_model, "max_new_tokens": config.local_max_new_tokens,
             "temperature": config.local_temperature, "seed": config.seed}
    if config.local_dtype != "float32":  # lower precision decodes other answers (float32 keys stay as they were)
        ident["dtype"] = config.local_dtype
    return ident


def output_projection(model: Any, config: ExplainConfig, records: Any = None, *,
                      layers: list[int] | None = None, progress: bool = False) -> VocabProjection:
    """VocabProj of ``layers`` (default: the records' layers, else all), signs from the records' statistics.

    Without collected statistics every neuron is read with sign +1 (a warning names the consequence for
    gated MLPs, whose activations can be negative).
    """
    if layers is None:
        layers = list(records.layers) if records is not None and hasattr(records, "layers") else None
    signs = None
    if records is not None and hasattr(records, "stats") and getattr(records, "stats", None):
        all_signs = activation_signs(records)
        rows = [list(records.layers).index(lay) for lay in (layers or list(records.layers))]
        signs = all_signs[rows]
    else:
        logger.warning("no activation statistics: VocabProj reads every neuron with sign +1 (a gated-MLP "
                       "neuron whose strong activations are negative gets its promoted/suppressed lists swapped)")
    return vocab_projection(model, layers=layers, k=config.vocab_top, signs=signs, progress=progress)


def _all_neurons(model: Any) -> list[NeuronId]:
    from .. import models as M

    return [NeuronId(lay, i) for lay in range(M.n_layers(model)) for i in range(M.d_mlp(model))]


def explain(records: Any, config: ExplainConfig, *, neurons: Sequence[NeuronId] | None = None,
            cache_dir: str | os.PathLike[str] | None = None, progress: bool = True,
            client: ChatClient | None = None, model: Any = None,
            projection: VocabProjection | None = None) -> list[NeuronExplanation]:
    """Explain each neuron; one :class:`NeuronExplanation` per neuron, failures included (``error`` set).

    ``records``: an iterable of :class:`NeuronRecords`, or an object with ``neurons()`` and
    ``neuron_records(neuron)``. ``neurons`` restricts the run to those neurons. ``cache_dir`` (or
    ``config.cache_dir``) keeps one file per successfully explained neuron, so a rerun asks the LLM only
    for the rest. ``client`` overrides the chat client built from ``config`` (tests, custom servers); cache
    keys still name the model of ``config``. A call that raises is recorded as that neuron's failure.

    ``config.explanations`` "output" and "both" read VocabProj evidence: pass ``model`` (its weights are
    projected, signs taken from the records' statistics) or a ready ``projection``. "output" needs no
    records: with ``records=None`` every neuron of the model (or ``neurons``) is explained.
    """
    kind = config.explanations
    if kind in ("output", "both") and projection is None:
        if model is None:
            raise ValueError(f"explanations={kind!r} reads the model's weights (VocabProj): pass model=... "
                             "(CLI: --model NAME) or projection=...")
        projection = output_projection(model, config, records, progress=progress)
    if kind == "output":
        if records is None:
            todo = list(neurons) if neurons is not None else (_all_neurons(model) if model is not None else
                                                               [NeuronId(lay, i) for lay in projection.layers
                                                                for i in range(projection.promoted_ids.shape[1])])
        else:
            todo = [r.neuron for r in _iter_records(records, neurons)] if not hasattr(records, "neurons") \
                else list(neurons if neurons is not None else records.neurons())
    if records is None and kind != "output":
        raise ValueError(f"explanations={kind!r} reads activation records: pass records (collect them first)")
    it = _iter_records(records, neurons) if kind != "output" else iter(())
    if config.kind == "heuristic":
        if kind == "input":
            return OfflineInputExplainer(max_records=config.max_records)(it, progress=progress)
        if kind == "output":
            assert projection is not None
            return OfflineOutputExplainer(projection)(todo, progress=progress)
        assert projection is not None
        return OfflineCombinedExplainer(projection, max_records=config.max_records)(it, progress=progress)
    if kind == "output":
        it = iter([NeuronRecords(n, []) for n in todo])

    chat = client if client is not None else make_client(config)
    root = cache_dir if cache_dir is not None else config.cache_dir
    cache = DiskCache(root) if root is not None else None
    ident = _cache_identity(config)
    source = config.source

    version = {"input": PROMPT_VERSION, "output": OUTPUT_PROMPT_VERSION, "both": BOTH_PROMPT_VERSION}[kind]

    async def one(rec: NeuronRecords) -> NeuronExplanation:
        out_ev = projection.evidence(rec.neuron) if projection is not None else None
        in_ev = input_evidence(rec, max_records=config.max_records) if kind != "output" else None
        evidence = NeuronEvidence(input=in_ev, output=out_ev)

        def result(text: str | None, error: str | None = None) -> NeuronExplanation:
            return NeuronExplanation(rec.neuron, text, source=source, error=error, kind=kind, evidence=evidence)

        key = None
        if cache is not None:
            parts: dict[str, Any] = dict(prompt_version=version, few_shot=config.few_shot,
                                         max_records=config.max_records, neuron=[rec.neuron.layer, rec.neuron.index],
                                         records=records_digest(rec, config.max_records), **ident)
            if out_ev is not None:
                parts["output_evidence"] = out_ev.to_json()
            if kind == "input":  # keys of input explanations stay what they were
                parts.pop("output_evidence", None)
            key = DiskCache.key(**parts)
            hit = cache.get(key)
            if isinstance(hit, dict) and isinstance(hit.get("explanation"), str) and hit["explanation"]:
                return result(hit["explanation"])
        try:
            if kind == "input":
                messages = build_explanation_prompt(rec, few_shot=config.few_shot, max_records=config.max_records)
            elif kind == "output":
                assert out_ev is not None
                messages = build_output_prompt(out_ev)
            else:
                assert out_ev is not None
                messages = build_both_prompt(rec, out_ev, max_records=config.max_records)
        except ValueError as exc:
            return result(None, str(exc))
        try:
            answer = await chat.generate(messages)
        except LLMError as exc:
            return result(None, f"LLM call failed: {exc}")
        except Exception as exc:  # noqa: BLE001 - any client (local model, user's own) fails per neuron
            logger.debug("explaining %s failed", rec.neuron, exc_info=True)
            return result(None, f"LLM call failed: {type(exc).__name__}: {exc}")
        try:
            text = parse_explanation(answer, max_chars=config.max_explanation_chars)
        except ValueError as exc:
            return result(None, f"unparseable answer: {exc}")
        if cache is not None and key is not None:
            cache.put(key, {"explanation": text, "neuron": [rec.neuron.layer, rec.neuron.index],
                            "prompt_version": version})
        return result(text)

    from tqdm.auto import tqdm

    out: list[NeuronExplanation] = []
    total = len(neurons) if neurons is not None else (len(records) if hasattr(records, "__len__") else None)
    if kind == "output":
        total = len(todo)
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
                 where: str = "the previous run", model: Any = None) -> tuple[list[NeuronExplanation], int]:
    """Explain again exactly the neurons of ``explanations`` that failed, plus those of ``neurons`` it lacks.

    Successes are kept as they are. Returns the merged list (the old order, then the neurons that were
    missing) and how many neurons were asked again; ``(explanations, 0)`` when nothing failed. The offline
    explainers are deterministic, so their failures are kept rather than recomputed. Says what it retries.
    ``model`` is needed for output-centric evidence.
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
                                          client=client, model=model)}
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
                    progress: bool = True, model: Any = None) -> list[NeuronExplanation]:
    """Explain (or import) and write ``out`` (JSONL) plus ``<out>.config.json`` (the resolved config, no secrets).

    With ``import_path`` the published explanations are read instead, checked against the model shape of
    ``n_layers``/``d_mlp`` (default: taken from ``records`` when it has ``layers``/``d_mlp``).
    ``cache_dir`` defaults to ``<out>.cache/``. When ``out`` exists, the same call again (same explainer
    config and records) retries exactly the neurons that failed, keeping the rest (``retry_failed``);
    ``out`` from another call is refused unless ``overwrite``. ``model`` is needed for output-centric evidence.
    """
    outp = Path(out)
    cfg_path = outp.with_name(outp.name + ".config.json")
    if outp.exists() and not overwrite:
        # The same command again retries what failed (what explain() advises); anything else is refused.
        config = config or ExplainConfig()
        if import_path is not None:
            meta: dict[str, Any] = {"import": str(import_path), "min_score": min_score}
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
                                         progress=progress, where=str(outp), model=model)
        if not n_retried:
            logger.info("%s already holds these explanations and none failed; nothing to do", outp)
            return result
    elif import_path is not None:
        if records is not None and hasattr(records, "layers") and hasattr(records, "d_mlp"):
            n_layers = n_layers if n_layers is not None else max(records.layers) + 1
            d_mlp = d_mlp if d_mlp is not None else int(records.d_mlp)
        result = import_explanations(import_path, min_score=min_score, n_layers=n_layers, d_mlp=d_mlp)
        meta = {"import": str(import_path), "min_score": min_score}
    else:
        config = config or ExplainConfig()
        if records is None and not (config.explanations == "output" and model is not None):
            raise ValueError("nothing to explain: pass records (CLI: --records DIR) or an import file (--import FILE)")
        root = Path(cache_dir) if cache_dir is not None else outp.with_name(outp.name + ".cache")
        result = explain(records, config, neurons=neurons, cache_dir=root, progress=progress, model=model)
        meta = {"explain": config.to_json(), "prompt_version": PROMPT_VERSION,
                "records": getattr(records, "config_hash", None)}
    save_explanations(outp, result, overwrite=True)
    fd, tmp = tempfile.mkstemp(dir=cfg_path.parent, prefix=f".{cfg_path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({**meta, "n_explanations": len(result), "n_failed": sum(not e.ok for e in result)}, f, indent=2)
    os.replace(tmp, cfg_path)
    return result
