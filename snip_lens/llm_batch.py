"""The OpenAI Batch API as a mode for very large LLM steps (explaining millions of neurons, judging them).

A step that takes a chat client (``explain(..., client=...)``, ``llm_judge_scores(..., client)``) runs
twice. The first pass gets a *recording* client: every request that reaches it (the per-item caches answer
the rest, so cached neurons are never requested) is written to a JSON Lines request file in the Batch
API's format and answered with :class:`BatchDeferred`, a failure the step records and does not cache. The
requests are uploaded (``POST /v1/files``, purpose ``batch``), submitted (``POST /v1/batches``), polled
(``GET /v1/batches/{id}``) and their output files downloaded (``GET /v1/files/{id}/content``). The second
pass gets a *replaying* client that answers each request from the downloaded results, so the step parses
and caches them exactly as it would live answers.

Everything lives in ``work_dir``: ``batches.json`` (every submitted batch: file id, batch id, status and
the request ids it carries), the request files and the downloaded results. A run started again after a
crash reads it, submits nothing twice, polls the batches it already has and continues; requests whose
batch failed or expired, or whose line came back with an error, are submitted again by the next run.
One batch holds at most ``max_requests`` requests (the API's limit is 50,000 lines and 200 MB).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ._io import atomic_write_bytes, atomic_write_text
from .llm import DUMMY_API_KEY, LLMConfig, LLMError

logger = logging.getLogger(__name__)

T = TypeVar("T")

STATE_FILE = "batches.json"
ENDPOINT = "/v1/chat/completions"
LIVE = ("validating", "in_progress", "finalizing")
"""Batch statuses that may still complete."""
DEAD = ("failed", "expired", "cancelling", "cancelled")
"""Batch statuses whose requests must be submitted again."""


@dataclass
class BatchConfig:
    """Where and how a step runs through the Batch API."""

    work_dir: str
    """Directory for the batch state, request files and downloaded results (reuse it to resume)."""
    poll_interval: float = 30.0
    """Seconds between status checks."""
    max_wait: float | None = None
    """Give up waiting after this many seconds (the batches keep running; rerun to continue); None waits."""
    completion_window: str = "24h"
    """The API's completion window (its only value today is ``"24h"``)."""
    max_requests: int = 50_000
    """Requests per batch (the API's limit)."""

    def __post_init__(self) -> None:
        if not str(self.work_dir):
            raise ValueError("BatchConfig.work_dir must name a directory, e.g. 'runs/x/batch'")
        if self.poll_interval < 0:
            raise ValueError(f"BatchConfig.poll_interval must be >= 0 seconds, got {self.poll_interval}")
        if self.max_wait is not None and self.max_wait < 0:
            raise ValueError(f"BatchConfig.max_wait must be >= 0 seconds or None, got {self.max_wait}")
        if not 1 <= self.max_requests <= 50_000:
            raise ValueError(f"BatchConfig.max_requests must be in 1..50000 (the API's limit), got {self.max_requests}")


class BatchDeferred(LLMError):
    """The request went into a batch request file; its answer arrives when the batch completes."""


class BatchPending(TimeoutError):
    """Batches still running after ``max_wait``; run the step again with the same ``work_dir`` to continue."""


def request_body(config: LLMConfig, messages: list[dict]) -> dict[str, Any]:
    """The chat-completions body for ``messages`` (the same fields a live request sends)."""
    return {"model": config.model, "messages": messages, "temperature": config.temperature,
            "top_p": config.top_p, "max_tokens": config.max_tokens}


def custom_id(body: dict[str, Any]) -> str:
    """A request's id in the batch files: sha256 over its body, so identical requests are sent once."""
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "snip-" + hashlib.sha256(blob.encode("utf-8")).hexdigest()[:40]


def request_line(body: dict[str, Any]) -> str:
    """One line of a Batch API request file."""
    return json.dumps({"custom_id": custom_id(body), "method": "POST", "url": ENDPOINT, "body": body},
                      ensure_ascii=False)


def parse_result_line(line: str) -> tuple[str, str | None, str | None]:
    """``(custom_id, answer, error)`` of one output- or error-file line; exactly one of the two is None."""
    d = json.loads(line)
    cid = d.get("custom_id")
    if not isinstance(cid, str):
        raise ValueError(f"batch result line has no custom_id: {line[:200]!r}")
    if d.get("error"):
        err = d["error"]
        return cid, None, f"{err.get('code', 'error')}: {err.get('message', '')}" if isinstance(err, dict) else str(err)
    resp = d.get("response") or {}
    status, body = resp.get("status_code"), resp.get("body") or {}
    if status != 200:
        msg = body.get("error", {}).get("message", "") if isinstance(body, dict) else ""
        return cid, None, f"HTTP {status}: {msg}"
    try:
        content = body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return cid, None, "response has no choices[0].message.content"
    if not isinstance(content, str):
        return cid, None, "choice has no text content"
    return cid, content, None


class _Recorder:
    """Pass 1: collects requests, answers each with :class:`BatchDeferred`."""

    def __init__(self, config: LLMConfig) -> None:
        self.config = config
        self.bodies: dict[str, dict[str, Any]] = {}

    async def generate(self, messages: list[dict]) -> str:
        body = request_body(self.config, messages)
        self.bodies[custom_id(body)] = body
        raise BatchDeferred("deferred to the Batch API (answered by its second pass)")


class _Replayer:
    """Pass 2: answers each request from the downloaded results."""

    def __init__(self, config: LLMConfig, answers: dict[str, tuple[str | None, str | None]]) -> None:
        self.config = config
        self.answers = answers

    async def generate(self, messages: list[dict]) -> str:
        cid = custom_id(request_body(self.config, messages))
        answer, error = self.answers.get(cid, (None, "not in any completed batch; run the step again"))
        if answer is None:
            raise LLMError(f"batch request {cid} failed: {error}")
        return answer


@dataclass
class BatchRunner:
    """Submits, polls and downloads batches for one ``work_dir``; :func:`run_batched` drives it."""

    llm: LLMConfig
    """Server (``base_url``), key variable and sampling of the requests."""
    batch: BatchConfig
    """Work directory and polling."""
    sleep: Callable[[float], None] = time.sleep
    """How to wait between polls (tests pass a no-op)."""
    client: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.dir = Path(self.batch.work_dir)
        if self.client is None:
            import openai

            key = DUMMY_API_KEY
            if self.llm.api_key_env is not None:
                key = os.environ.get(self.llm.api_key_env, "")
                if not key:
                    raise ValueError(f"environment variable {self.llm.api_key_env} is not set: export "
                                     f"{self.llm.api_key_env}=<your key> (or use api_key_env=None for a local server)")
            self.client = openai.OpenAI(base_url=self.llm.base_url, api_key=key, max_retries=self.llm.max_retries,
                                        timeout=max(self.llm.timeout, 120.0))

    # -- state --

    def state(self) -> dict[str, Any]:
        path = self.dir / STATE_FILE
        if not path.exists():
            return {"batches": []}
        return json.loads(path.read_text(encoding="utf-8"))

    def _save(self, state: dict[str, Any]) -> None:
        atomic_write_text(self.dir / STATE_FILE, json.dumps(state, indent=1))

    # -- steps --

    def submit(self, bodies: dict[str, dict[str, Any]]) -> int:
        """Submit the requests no live or completed batch covers; returns how many were submitted."""
        state = self.state()
        covered: set[str] = set()
        for b in state["batches"]:
            if b["status"] in LIVE or b["status"] == "uploaded":
                covered.update(b["ids"])
            elif b["status"] == "completed":
                covered.update(cid for cid, (ans, _) in self._results(b).items() if ans is not None)
        todo = [cid for cid in bodies if cid not in covered]
        for s in range(0, len(todo), self.batch.max_requests):
            ids = todo[s:s + self.batch.max_requests]
            n = len(state["batches"])
            req = self.dir / f"requests-{n:04d}.jsonl"
            data = "".join(request_line(bodies[cid]) + "\n" for cid in ids).encode("utf-8")
            atomic_write_bytes(req, data)
            f = self.client.files.create(file=(req.name, io.BytesIO(data)), purpose="batch")
            # Recorded before the batch is created: a crash in between leaves an uploaded file, never a
            # batch that the state does not know.
            entry = {"requests": req.name, "file_id": f.id, "batch_id": None, "status": "uploaded", "ids": ids}
            state["batches"].append(entry)
            self._save(state)
            created = self.client.batches.create(input_file_id=f.id, endpoint=ENDPOINT,
                                                 completion_window=self.batch.completion_window,
                                                 metadata={"snip_lens_requests": req.name})
            entry.update(batch_id=created.id, status=created.status)
            self._save(state)
            logger.info("submitted batch %s: %d requests (%s)", created.id, len(ids), req.name)
        for entry in state["batches"]:  # uploaded before a crash, batch never created
            if entry["status"] == "uploaded":
                created = self.client.batches.create(input_file_id=entry["file_id"], endpoint=ENDPOINT,
                                                     completion_window=self.batch.completion_window)
                entry.update(batch_id=created.id, status=created.status)
                self._save(state)
        return len(todo)

    def wait(self) -> None:
        """Poll every live batch until none is live (or ``max_wait`` passes: :class:`BatchPending`)."""
        start = time.monotonic()
        while True:
            state = self.state()
            live = [b for b in state["batches"] if b["status"] in LIVE]
            for b in live:
                got = self.client.batches.retrieve(b["batch_id"])
                b["status"] = got.status
                b["output_file_id"] = getattr(got, "output_file_id", None)
                b["error_file_id"] = getattr(got, "error_file_id", None)
                counts = getattr(got, "request_counts", None)
                if counts is not None:
                    b["counts"] = {"total": counts.total, "completed": counts.completed, "failed": counts.failed}
                if got.status == "completed":
                    self._download(b)
                elif got.status in DEAD:
                    logger.warning("batch %s ended %s; its %d requests go into the next run's batch", b["batch_id"],
                                   got.status, len(b["ids"]))
            self._save(state)
            live = [b for b in state["batches"] if b["status"] in LIVE]
            if not live:
                return
            waited = time.monotonic() - start
            if self.batch.max_wait is not None and waited >= self.batch.max_wait:
                raise BatchPending(f"{len(live)} batches still running after {waited:.0f} s "
                                   f"({', '.join(b['batch_id'] for b in live)}); run again with work_dir "
                                   f"{str(self.dir)!r} to continue")
            logger.info("%d batches running; next check in %.0f s", len(live), self.batch.poll_interval)
            self.sleep(self.batch.poll_interval)

    def _download(self, b: dict[str, Any]) -> None:
        parts = []
        for key in ("output_file_id", "error_file_id"):
            if b.get(key):
                parts.append(self.client.files.content(b[key]).text)
        text = "".join(p if p.endswith("\n") or not p else p + "\n" for p in parts)
        name = f"results-{b['requests'].removeprefix('requests-')}"
        atomic_write_text(self.dir / name, text)
        b["results"] = name

    def _results(self, b: dict[str, Any]) -> dict[str, tuple[str | None, str | None]]:
        out: dict[str, tuple[str | None, str | None]] = {}
        if not b.get("results"):
            return out
        for line in (self.dir / b["results"]).read_text(encoding="utf-8").splitlines():
            if line.strip():
                cid, ans, err = parse_result_line(line)
                out[cid] = (ans, err)
        return out

    def answers(self) -> dict[str, tuple[str | None, str | None]]:
        """Every downloaded result, later batches overriding earlier ones (a resubmitted request)."""
        out: dict[str, tuple[str | None, str | None]] = {}
        for b in self.state()["batches"]:
            if b["status"] == "completed":
                for cid, (ans, err) in self._results(b).items():
                    if ans is not None or cid not in out:
                        out[cid] = (ans, err)
        return out


def run_batched(step: Callable[[Any], T], llm: LLMConfig, batch: BatchConfig, *,
                runner: BatchRunner | None = None) -> T:
    """Run ``step(client)`` through the Batch API (see the module docstring); returns its second pass.

    ``step`` must be deterministic in the requests it makes for the same inputs and caches, e.g.
    ``lambda c: explain(records, config, client=c, cache_dir=...)``. When no request reaches the recording
    client (everything cached), the first pass is the result and nothing is submitted.
    """
    rec = _Recorder(llm)
    first = step(rec)
    if not rec.bodies:
        return first
    runner = runner if runner is not None else BatchRunner(llm, batch)
    n = runner.submit(rec.bodies)
    logger.info("first pass: %d requests deferred to the Batch API (the failures it logged are these), %d of them "
                "newly submitted", len(rec.bodies), n)
    runner.wait()
    return step(_Replayer(llm, runner.answers()))
