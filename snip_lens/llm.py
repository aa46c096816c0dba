"""LLM access for the SNIP pipeline: an async chat/embedding client, a batch runner, a per-item disk cache.

Used by step 1 (explaining neurons, :mod:`snip_lens.explain`) and step 2 (asking for the concepts of
the forget set, and embedding explanations and concepts). The client speaks to any OpenAI-compatible
server through the ``openai`` package (``base_url``), bounds concurrency with an ``asyncio.Semaphore``
and retries with exponential backoff and jitter on 429, 5xx, timeouts and connection errors, never on
other 4xx (the policy of openai/automated-interpretability's ``api_client.py``).

The API key is read from an environment variable when a client is built, kept in memory only, and never
written to any file or log; the cache stores only successful outputs under sha256 keys.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import tempfile
import threading
import weakref
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

POOL_SIZE = 8
"""Connections per HTTP pool; a client with higher concurrency spreads its requests over several pools."""

DUMMY_API_KEY = "EMPTY"
_KEY_LIKE = re.compile(r"\bsk-[A-Za-z0-9_\-*]{6,}")
"""Key sent to local servers that need none (``LLMConfig(api_key_env=None)``)."""


@dataclass
class LLMConfig:
    """How to reach an OpenAI-compatible chat/embedding server and how to sample from it.

    Holds the *name* of the environment variable with the key, never the key itself, so it can be
    written next to results.
    """

    model: str
    """Model name as the server knows it, e.g. ``"gpt-4o-mini"``."""
    base_url: str | None = None
    """Server root such as ``"http://127.0.0.1:8000/v1"``; None for api.openai.com."""
    api_key_env: str | None = "OPENAI_API_KEY"
    """Environment variable read for the API key when the client is built; None sends a dummy key
    (for local servers that need none)."""
    temperature: float = 1.0
    """Sampling temperature, in [0, 2]."""
    max_tokens: int = 60
    """Upper bound on generated tokens per answer."""
    top_p: float = 1.0
    """Nucleus sampling mass, in (0, 1]."""
    concurrency: int = 16
    """Requests in flight at once (per client)."""
    max_retries: int = 5
    """Retries after the first attempt on 429/5xx/timeouts/connection errors (0 = try once)."""
    timeout: float = 60.0
    """Seconds before one request is abandoned (then retried)."""
    backoff_base: float = 1.0
    """First retry waits about this many seconds; each further retry doubles it."""
    backoff_max: float = 60.0
    """Cap on one wait between retries, in seconds."""
    breaker_failures: int | None = 8
    """After this many requests in a row failed for good the same way, the client stops sending and fails
    every further call at once (:class:`CircuitOpen`); None never stops."""

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"LLMConfig.model must be a non-empty model name, got {self.model!r}")
        if self.api_key_env is not None and (not isinstance(self.api_key_env, str) or not self.api_key_env):
            raise ValueError(
                f"LLMConfig.api_key_env must name an environment variable (e.g. 'OPENAI_API_KEY') or be None "
                f"for servers that need no key, got {self.api_key_env!r}"
            )
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"LLMConfig.temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"LLMConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"LLMConfig.max_tokens must be >= 1, got {self.max_tokens}")
        if self.concurrency < 1:
            raise ValueError(f"LLMConfig.concurrency must be >= 1, got {self.concurrency}")
        if self.max_retries < 0:
            raise ValueError(f"LLMConfig.max_retries must be >= 0, got {self.max_retries}")
        if not self.timeout > 0:
            raise ValueError(f"LLMConfig.timeout must be > 0 seconds, got {self.timeout}")
        if self.breaker_failures is not None and self.breaker_failures < 1:
            raise ValueError(f"LLMConfig.breaker_failures must be >= 1 or None, got {self.breaker_failures}")
        if self.backoff_base < 0 or self.backoff_max < 0:
            raise ValueError(
                f"LLMConfig.backoff_base and backoff_max must be >= 0, got {self.backoff_base}, {self.backoff_max}"
            )

    @property
    def sampling(self) -> dict[str, Any]:
        """Everything about the request that determines the answer (goes into cache keys; the server URL
        does not: the same model behind another port gives the same answers)."""
        return {"model": self.model, "temperature": self.temperature,
                "top_p": self.top_p, "max_tokens": self.max_tokens}

    def to_json(self) -> dict[str, Any]:
        """The config as plain JSON (it holds no secret: only the variable's name)."""
        return dataclasses.asdict(self)


class LLMError(RuntimeError):
    """A request that failed for good (after retries, or at once on a non-retryable error)."""

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = False,
                 attempts: int = 1) -> None:
        super().__init__(message)
        self.status = status
        """HTTP status of the last failure, if there was one."""
        self.retryable = retryable
        """Whether the last failure was of a kind that is retried (429/5xx/timeout/connection)."""
        self.attempts = attempts
        """How many attempts were made."""


class CircuitOpen(LLMError):
    """Raised without sending anything once a client's circuit breaker has tripped."""


@runtime_checkable
class ChatClient(Protocol):
    """Anything that turns chat messages into one answer."""

    async def generate(self, messages: list[dict]) -> str:
        """Return the assistant's answer to ``messages`` (``[{"role": ..., "content": ...}, ...]``)."""
        ...


def _classify(exc: BaseException) -> tuple[bool, int | None]:
    """(retryable, status) for an exception raised by the openai package."""
    import openai

    if isinstance(exc, openai.APITimeoutError | asyncio.TimeoutError):
        return True, None
    if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
        return True, None
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        return (status == 429 or status >= 500), status
    if isinstance(exc, openai.APIResponseValidationError | json.JSONDecodeError | _MalformedResponse):
        # A body that is not the JSON the API promises: usually a transient proxy/server glitch.
        return True, getattr(exc, "status_code", None)
    return False, None


class _MalformedResponse(ValueError):
    """A 200 response without the fields the API promises."""


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based): exponential with "equal jitter".

    The wait is uniform in ``[d/2, d]`` with ``d = min(cap, base * 2**attempt)``, so clients that failed
    together do not retry together.
    """
    d = min(cap, base * (2 ** attempt))
    return d * (0.5 + 0.5 * (rng or random).random())


_LIVE_CLIENTS: "weakref.WeakSet[OpenAIChatClient]" = weakref.WeakSet()


async def _close_clients_of_this_loop() -> None:
    # An httpx pool must be closed on the loop that opened it; asyncio.run() closes the loop right after.
    loop = asyncio.get_running_loop()
    for c in list(_LIVE_CLIENTS):
        if c._loop is loop:
            await c.aclose()


class OpenAIChatClient:
    """Chat and embedding calls to an OpenAI-compatible server, with our own concurrency and retry policy.

    The key is read from ``config.api_key_env`` here (a missing variable raises at once, naming it). The
    ``openai`` client is built with ``max_retries=0`` so that every retry goes through the policy below.
    """

    def __init__(self, config: LLMConfig, *, seed: int | None = None) -> None:
        self.config = config
        if config.api_key_env is None:
            key = DUMMY_API_KEY
        else:
            key = os.environ.get(config.api_key_env, "")
            if not key:
                raise ValueError(
                    f"environment variable {config.api_key_env} is not set: export {config.api_key_env}=<your key> "
                    "(or, for a local server that needs no key, use api_key_env=None / --api-key-env none)"
                )
        self.__key = key  # name-mangled; never logged, never in repr
        self._rng = random.Random(seed)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clients: list[Any] = []
        self._next = 0
        self._sem: asyncio.Semaphore | None = None
        self.n_requests = 0
        """Attempts sent so far (retries included)."""
        self.n_ok = 0
        """Calls that succeeded."""
        self._fail_streak: list[str] = []
        self.breaker: LLMError | None = None
        """The failure that tripped the circuit breaker (None while closed)."""

    def __repr__(self) -> str:
        return f"OpenAIChatClient(model={self.config.model!r}, base_url={self.config.base_url!r})"

    def _state(self) -> tuple[Any, asyncio.Semaphore]:
        # asyncio primitives and httpx pools belong to one event loop; run_all() starts a fresh loop per
        # call, so rebuild them whenever the running loop changes.
        loop = asyncio.get_running_loop()
        if self._loop is not loop or not self._clients or self._sem is None:
            import openai

            # httpcore scans every connection of a pool on each request and response, so one pool of 64
            # connections costs O(64) per event; several small pools used in turn keep that scan short.
            n_pools = -(-self.config.concurrency // POOL_SIZE)
            self._clients = [openai.AsyncOpenAI(base_url=self.config.base_url, api_key=self.__key,
                                                max_retries=0, timeout=self.config.timeout)
                             for _ in range(n_pools)]
            self._sem = asyncio.Semaphore(self.config.concurrency)
            self._loop = loop
            _LIVE_CLIENTS.add(self)
        self._next = (self._next + 1) % len(self._clients)
        return self._clients[self._next], self._sem

    def _scrub(self, text: str) -> str:
        """``text`` with the key (and anything shaped like an OpenAI key) masked: error texts reach files."""
        if self.__key and self.__key != DUMMY_API_KEY:
            text = text.replace(self.__key, "***")
        return _KEY_LIKE.sub("sk-***", text)

    async def aclose(self) -> None:
        """Close the HTTP connections (``run_all`` does this for you at the end of its event loop)."""
        clients, self._clients, self._loop, self._sem = self._clients, [], None, None
        for client in clients:
            await client.close()

    def _record(self, error: LLMError | None) -> None:
        """Count a finished call for the circuit breaker: a success resets it, a failure extends the streak."""
        if error is None:
            self.n_ok += 1
            self._fail_streak.clear()
            return
        # Failures "the same way": same HTTP status (or none) and same exception kind.
        sig = f"{error.status}:{str(error).split(': ', 1)[-1].split(':', 1)[0]}"
        if self._fail_streak and self._fail_streak[-1] != sig:
            self._fail_streak.clear()
        self._fail_streak.append(sig)
        n = self.config.breaker_failures
        if n is not None and len(self._fail_streak) >= n and self.breaker is None:
            self.breaker = error
            logger.warning("stopping LLM requests to %s: the last %d failed the same way (%s)",
                           self.config.base_url or "api.openai.com", n, error)

    async def _with_retries(self, what: str, call: Callable[[Any], Awaitable[T]]) -> T:
        if self.breaker is not None:
            raise CircuitOpen(f"circuit breaker open, request not sent: {self.breaker}",
                              status=self.breaker.status, retryable=False, attempts=0)
        try:
            result = await self._with_retries_inner(what, call)
        except CircuitOpen:
            raise
        except LLMError as exc:
            self._record(exc)
            raise
        self._record(None)
        return result

    async def _with_retries_inner(self, what: str, call: Callable[[Any], Awaitable[T]]) -> T:
        cfg = self.config
        last: BaseException | None = None
        status: int | None = None
        for attempt in range(cfg.max_retries + 1):
            client, sem = self._state()
            async with sem:
                if self.breaker is not None:  # tripped while this call waited for a slot
                    raise CircuitOpen(f"circuit breaker open, request not sent: {self.breaker}",
                                      status=self.breaker.status, retryable=False, attempts=attempt)
                self.n_requests += 1
                try:
                    # wait_for guards against servers that trickle bytes past the httpx timeout
                    return await asyncio.wait_for(call(client), timeout=cfg.timeout * 1.5)
                except Exception as exc:  # noqa: BLE001 - classified below, re-raised as LLMError
                    retryable, status = _classify(exc)
                    last = exc
            if not retryable:
                # from None: the SDK's exception may quote the key (servers echo it on 401)
                raise LLMError(self._scrub(f"{what} failed (HTTP {status}, not retried): {_describe(last)}"),
                               status=status, retryable=False, attempts=attempt + 1) from None
            if attempt < cfg.max_retries:
                delay = backoff_delay(attempt, cfg.backoff_base, cfg.backoff_max, self._rng)
                logger.debug("%s: attempt %d failed (%s); retrying in %.2fs", what, attempt + 1,
                             self._scrub(_describe(last)), delay)
                await asyncio.sleep(delay)  # outside the semaphore: waiting must not block other requests
        raise LLMError(self._scrub(f"{what} failed after {cfg.max_retries + 1} attempts: {_describe(last)}"),
                       status=status, retryable=True, attempts=cfg.max_retries + 1) from None

    async def generate(self, messages: list[dict]) -> str:
        """Return the first choice's text for ``messages``; raises :class:`LLMError` when it fails."""
        cfg = self.config

        async def call(client: Any) -> str:
            # client.post skips the SDK's per-call recursive type transform of the (long, plain-dict)
            # messages and its pydantic response model, which cost milliseconds per request; auth,
            # timeouts and error types are the SDK's. The body is read as text and checked here.
            body = await client.post("/chat/completions", cast_to=str, body={
                "model": cfg.model, "messages": messages, "temperature": cfg.temperature, "top_p": cfg.top_p,
                "max_tokens": cfg.max_tokens})
            data = json.loads(body)
            try:
                content = data["choices"][0]["message"]["content"]
            except (KeyError, IndexError, TypeError):
                raise _MalformedResponse(f"response has no choices[0].message.content: {body[:200]!r}") from None
            if not isinstance(content, str):
                raise _MalformedResponse(f"choice has no text content: {body[:200]!r}")
            return content

        return await self._with_retries(f"chat completion ({cfg.model})", call)

    async def embed(self, texts: list[str], model: str) -> list[list[float]]:
        """Embed ``texts`` with embedding ``model`` (e.g. ``"text-embedding-3-small"``), in input order."""
        if not texts:
            return []

        async def call(client: Any) -> list[list[float]]:
            resp = await client.embeddings.create(model=model, input=list(texts))
            data = getattr(resp, "data", None)
            if not data or len(data) != len(texts):
                raise _MalformedResponse(
                    f"expected {len(texts)} embeddings, got {0 if not data else len(data)}")
            rows = sorted(data, key=lambda d: d.index)
            return [list(map(float, d.embedding)) for d in rows]

        return await self._with_retries(f"embedding ({model})", call)


PROBE_PROMPT = "Say OK."
"""The one message :func:`probe_server` sends (servers and test doubles can tell it from real work)."""


def probe_server(config: LLMConfig, *, timeout: float = 5.0, embedding_model: str | None = None) -> None:
    """Check once, in at most about ``1.5 * timeout`` seconds, that the server of ``config`` answers.

    Sends one one-token chat completion (or, with ``embedding_model``, one embedding of one word) with no
    retry, so an unreachable server, a wrong key or an unknown model fails in seconds, before a stage sends
    thousands of requests. Raises :class:`LLMError` naming the URL, the error and what to check.
    """
    url = config.base_url or "https://api.openai.com/v1"
    quick = dataclasses.replace(config, max_retries=0, timeout=timeout, max_tokens=1, concurrency=1,
                                breaker_failures=None)
    client = OpenAIChatClient(quick)
    if embedding_model is not None:
        aw: Awaitable[Any] = client.embed(["probe"], embedding_model)
        what = f"embedding model {embedding_model!r}"
    else:
        aw = client.generate([{"role": "user", "content": PROBE_PROMPT}])
        what = f"chat model {config.model!r}"
    try:
        run_all([aw], progress=False)
    except LLMError as exc:
        detail = re.split(r"(?:attempts?|not retried\)): ", str(exc), maxsplit=1)[-1].rstrip(".")
        if exc.status in (401, 403):
            key = f"the key in ${config.api_key_env}" if config.api_key_env else "the dummy key (--api-key-env none)"
            hint = (f"the server refused {key}; export the right key, or use --api-key-env none for a local "
                    "server that needs none")
        elif exc.status == 404:
            hint = (f"the server does not know {what} or the path; check --llm-model / --embedder and that "
                    "--base-url ends where the API starts (usually /v1)")
        elif exc.status is None:
            hint = ("check that the server is running and reachable from here, and that --base-url is right "
                    "(e.g. http://localhost:8000/v1)")
        else:
            hint = "check the server's log; it failed a one-token request"
        raise LLMError(f"the LLM server at {url} failed a test request for {what} (timeout {timeout:g} s): "
                       f"{detail}. {hint[0].upper() + hint[1:]}", status=exc.status, retryable=exc.retryable,
                       attempts=1) from None


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    text = str(exc).strip().replace("\n", " ")
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def run_all(items: Iterable[Any], fn: Callable[[Any], Awaitable[R]] | None = None, *,
            desc: str | None = None, progress: bool = True, return_exceptions: bool = False,
            bar: Any = None) -> list[Any]:
    """Run many async calls from sync code, with a tqdm bar; results in input order.

    ``items`` are awaitables, or (with ``fn``) inputs passed to ``fn`` to make them. Concurrency is bounded
    by the clients themselves (their semaphores). With ``return_exceptions=True`` a failed call's
    exception takes its place in the result list instead of cancelling the others. ``bar``: an open tqdm
    bar to advance instead of a new one (for work split over several calls); it is left open. Works
    also when an event loop is already running (e.g. in a notebook): the calls then run on a worker thread.
    """
    items = list(items)

    async def main() -> list[Any]:
        from tqdm.auto import tqdm

        aws = [fn(x) for x in items] if fn is not None else items
        results: list[Any] = [None] * len(aws)
        pbar = bar if bar is not None else tqdm(total=len(aws), desc=desc, disable=not progress, leave=False)

        async def one(i: int, aw: Awaitable[Any]) -> None:
            try:
                results[i] = await aw
            except Exception as exc:
                if not return_exceptions:
                    raise
                results[i] = exc
            finally:
                pbar.update(1)

        try:
            await asyncio.gather(*(one(i, aw) for i, aw in enumerate(aws)))
        finally:
            if bar is None:
                pbar.close()
            await _close_clients_of_this_loop()
        return results

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(main())
    box: dict[str, Any] = {}

    def worker() -> None:
        try:
            box["out"] = asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["err"] = exc

    t = threading.Thread(target=worker, name="snip-run-all")
    t.start()
    t.join()
    if "err" in box:
        raise box["err"]
    return box["out"]


_SECRET_PART_NAMES = ("api_key", "apikey", "secret", "password", "token_key")


def _canonical(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"__type__": type(obj).__name__, **{k: _canonical(v) for k, v in dataclasses.asdict(obj).items()}}
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_canonical(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    raise TypeError(f"cache key part {obj!r} of type {type(obj).__name__} is not JSON-like; "
                    "pass str/int/float/bool/None, lists, dicts or dataclasses")


class DiskCache:
    """One JSON file per item under ``root`` (``root/ab/abcdef....json``), keyed by sha256.

    Only successes belong here: callers store an answer after it parsed, never an error. Writes are
    atomic (temp file + ``os.replace``), so an interrupted run leaves either the old file or the new one.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        """Directory holding the shards."""

    def __repr__(self) -> str:
        return f"DiskCache({str(self.root)!r})"

    @staticmethod
    def key(**parts: Any) -> str:
        """sha256 hex over a canonical JSON of ``parts`` (everything that determines the output)."""
        for name in parts:
            if any(s in name.lower() for s in _SECRET_PART_NAMES):
                raise ValueError(f"cache key part {name!r} looks like a secret; secrets must not determine "
                                 "cache keys or be written to disk - leave it out")
        blob = json.dumps(_canonical(parts), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def path(self, key: str) -> Path:
        """Where the item for ``key`` lives."""
        if len(key) < 3 or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"cache key must be a lowercase hex digest from DiskCache.key(), got {key!r}")
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> Any | None:
        """The stored value, or None when absent (or unreadable: then it is logged and recomputed)."""
        p = self.path(key)
        try:
            with open(p, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable cache entry %s (%s); it will be recomputed", p, exc)
            return None

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    def put(self, key: str, value: Any) -> None:
        """Store ``value`` (JSON-serialisable) atomically under ``key``."""
        p = self.path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps(value, ensure_ascii=False, allow_nan=False)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{key[:8]}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(data)
            os.replace(tmp, p)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("??/*.json")) if self.root.is_dir() else 0
