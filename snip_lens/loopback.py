"""A loopback OpenAI-compatible HTTP server (stdlib only) for tests and benchmarks of the LLM stages.

It answers ``POST /v1/chat/completions`` and ``POST /v1/embeddings`` on 127.0.0.1 with a fixed latency,
the Batch API's ``POST /v1/files``, ``GET /v1/files/{id}/content``, ``POST /v1/batches`` and
``GET /v1/batches/{id}`` (a batch completes after ``batch_polls`` status checks; each line is answered as
a chat request would be, injected faults becoming error lines), and, optionally, a seeded fault injector that returns 429s, 500s, hangs past the client's timeout, or
garbage (bodies that are not JSON, JSON without choices, answers that are not a sentence). It lets the
real ``openai`` client be exercised over real HTTP without any network access.

Run standalone (e.g. in its own process for benchmarks): ``python -m snip_lens.loopback --latency 0.05``
prints ``PORT <n>`` on its first line and serves until killed.
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import hashlib
import json
import logging
import random
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

logger = logging.getLogger(__name__)

FAULT_KINDS = ("429", "500", "timeout", "garbage")
"""The kinds of injected faults, drawn uniformly when a request is chosen to fail."""

GARBAGE_ANSWERS = (
    "",
    "   \n\t ",
    "#### ??? !!! ////",
    "\u2603\u2603\u2603 \u2620\u2620",
    "<start>\nthe\t10\n<end>",
    "x" * 3000,
    "12 34 56 78 90",
)
"""Chat answers that are syntactically valid responses but carry no explanation."""


def default_answer(messages: list[dict]) -> str:
    """A plausible explanation naming the strongest token of the last neuron in the prompt (deterministic).

    Reads the ``token<tab>activation`` lines of the last message and answers
    ``" the token '<strongest token>' in text."`` (first of the highest); used to check that answers
    reach the right neuron.
    """
    text = str(messages[-1].get("content", "")) if messages else ""
    pairs = re.findall(r"^(.*)\t(\d+)$", text, flags=re.M)
    if not pairs:
        return " words in sentences."
    best = max(int(a) for _, a in pairs)
    tok = next(t for t, a in pairs if int(a) == best)
    return f" the token '{tok.strip()}' in text."


@dataclass
class LoopbackStats:
    """What the server saw (thread-safe counters)."""

    requests: int = 0
    """All POST requests received."""
    faults: dict[str, int] = field(default_factory=dict)
    """Injected faults by kind."""
    chat_prompts: list[str] = field(default_factory=list)
    """Last message content of every chat request, in arrival order."""
    embed_inputs: list[list[str]] = field(default_factory=list)
    """Inputs of every embedding request."""
    auth_headers: set[str] = field(default_factory=set)
    """Distinct Authorization headers seen."""
    in_flight: int = 0
    """Requests being handled right now."""
    max_in_flight: int = 0
    """Most requests handled at once so far."""
    files_uploaded: int = 0
    """Files received by ``POST /v1/files``."""
    batches_created: int = 0
    """Batches created by ``POST /v1/batches``."""
    batch_lines: list[str] = field(default_factory=list)
    """``custom_id`` of every request line of every batch created, in order."""


class LoopbackServer:
    """An OpenAI-compatible server on 127.0.0.1 in a background thread; use as a context manager.

    ``base_url`` is what to put in ``LLMConfig.base_url``.
    """

    def __init__(self, *, latency: float = 0.0, fault_rate: float = 0.0, seed: int = 0,
                 hang_seconds: float = 2.0, answer: Callable[[list[dict]], str] = default_answer,
                 embed_dim: int = 16, api_key: str | None = None,
                 fault_kinds: tuple[str, ...] = FAULT_KINDS, batch_polls: int = 2,
                 logprobs: Callable[[list[dict]], list[dict]] | None = None, fail_after: int | None = None,
                 fail_status: int = 400) -> None:
        bad = [k for k in fault_kinds if k not in FAULT_KINDS]
        if bad or not fault_kinds:
            raise ValueError(f"fault_kinds must be a non-empty subset of {FAULT_KINDS}, got {fault_kinds!r}")
        self.fault_kinds = tuple(fault_kinds)
        self.fail_after = fail_after
        """After this many answered requests, every later one gets HTTP ``fail_status`` (a server gone bad)."""
        self.fail_status = fail_status
        self._answered = 0
        if not 0.0 <= fault_rate <= 1.0:
            raise ValueError(f"fault_rate must be in [0, 1], got {fault_rate}")
        if latency < 0:
            raise ValueError(f"latency must be >= 0 seconds, got {latency}")
        self.latency = latency
        self.fault_rate = fault_rate
        self.hang_seconds = hang_seconds
        self.answer = answer
        self.logprobs = logprobs
        """For requests with ``logprobs: true``: messages -> the answer's ``logprobs.content`` (a list of
        ``{"token", "logprob", "top_logprobs"}``; the answer text is their tokens joined). None: the answer of
        ``answer`` split into characters, each certain."""
        self.embed_dim = embed_dim
        self.api_key = api_key
        self.batch_polls = batch_polls
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.stats = LoopbackStats()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _draw_fault(self) -> str | None:
        with self._lock:
            if self._rng.random() < self.fault_rate:
                kind = self._rng.choice(self.fault_kinds)
                self.stats.faults[kind] = self.stats.faults.get(kind, 0) + 1
                return kind
            return None

    def _draw_garbage(self) -> int:
        with self._lock:
            return self._rng.randrange(len(GARBAGE_ANSWERS) + 2)

    def _public(self, bid: str) -> dict:
        return {k: v for k, v in self.batches[bid].items() if not k.startswith("_")}

    def _poll_batch(self, bid: str) -> dict:
        """One status check: validating -> in_progress -> ... -> completed after ``batch_polls`` checks."""
        with self._lock:
            b = self.batches[bid]
            b["_polls"] += 1
            if b["status"] != "completed":
                b["status"] = "completed" if b["_polls"] >= self.batch_polls else "in_progress"
            if b["status"] != "completed" or b.get("_done"):
                return self._public(bid)
            b["_done"] = True
        out, err = [], []
        for i, line in enumerate(b["_lines"]):
            rid = f"batch_req_{bid}_{i}"
            if self._draw_fault() is not None:
                err.append({"id": rid, "custom_id": line["custom_id"], "error": None,
                            "response": {"status_code": 500, "request_id": rid,
                                         "body": {"error": {"message": "internal error", "type": "server_error"}}}})
                continue
            body = line["body"]
            out.append({"id": rid, "custom_id": line["custom_id"], "error": None, "response": {
                "status_code": 200, "request_id": rid, "body": {
                    "id": f"chatcmpl-{rid}", "object": "chat.completion", "created": int(time.time()),
                    "model": body.get("model", "loopback"),
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": self.answer(body.get("messages") or [])}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}}})
        with self._lock:
            for key, rows in (("output_file_id", out), ("error_file_id", err)):
                if rows:
                    fid = f"file-{len(self.files):06d}"
                    self.files[fid] = "".join(json.dumps(r) + "\n" for r in rows).encode()
                    b[key] = fid
            b["request_counts"] = {"total": len(b["_lines"]), "completed": len(out), "failed": len(err)}
            return self._public(bid)

    def start(self) -> "LoopbackServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
                logger.debug("loopback: " + format, *args)

            def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout); nothing to do

            def _json(self, status: int, obj: object) -> None:
                self._send(status, json.dumps(obj).encode())

            def do_POST(self) -> None:  # noqa: N802 - stdlib name
                with server._lock:
                    server.stats.in_flight += 1
                    server.stats.max_in_flight = max(server.stats.max_in_flight, server.stats.in_flight)
                try:
                    self._post()
                finally:
                    with server._lock:
                        server.stats.in_flight -= 1

            def do_GET(self) -> None:  # noqa: N802 - stdlib name
                if not self._authorised():
                    return
                m = re.fullmatch(r"/v1/files/([\w-]+)/content", self.path)
                if m and m.group(1) in server.files:
                    self._send(200, server.files[m.group(1)], "application/octet-stream")
                    return
                m = re.fullmatch(r"/v1/batches/([\w-]+)", self.path)
                if m and m.group(1) in server.batches:
                    self._json(200, server._poll_batch(m.group(1)))
                    return
                self._json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

            def _authorised(self) -> bool:
                if server.api_key is not None and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    self._json(401, {"error": {"message": "Incorrect API key provided.",
                                               "type": "invalid_request_error"}})
                    return False
                return True

            def _post(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n)
                if self.path.rstrip("/") == "/v1/files":
                    if self._authorised():
                        self._upload(raw)
                    return
                try:
                    payload = json.loads(raw or b"{}")
                except ValueError:
                    self._json(400, {"error": {"message": "body is not JSON", "type": "invalid_request_error"}})
                    return
                with server._lock:
                    server.stats.requests += 1
                    server.stats.auth_headers.add(self.headers.get("Authorization", ""))
                if server.api_key is not None and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    # Like api.openai.com, echo the key that was sent (clients must not write it anywhere).
                    sent = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
                    self._json(401, {"error": {"message": f"Incorrect API key provided: {sent}.",
                                               "type": "invalid_request_error"}})
                    return
                path = self.path.rstrip("/")
                if path == "/v1/batches":
                    self._create_batch(payload)
                    return
                if path.endswith("/chat/completions"):
                    with server._lock:
                        msgs = payload.get("messages") or []
                        server.stats.chat_prompts.append(str(msgs[-1].get("content", "")) if msgs else "")
                elif path.endswith("/embeddings"):
                    with server._lock:
                        inp = payload.get("input")
                        server.stats.embed_inputs.append([inp] if isinstance(inp, str) else list(inp or []))
                else:
                    self._json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                    return
                if server.latency:
                    time.sleep(server.latency)
                if server.fail_after is not None:
                    with server._lock:
                        server._answered += 1
                        gone_bad = server._answered > server.fail_after
                    if gone_bad:
                        self._json(server.fail_status, {"error": {"message": "model went away",
                                                                   "type": "invalid_request_error"}})
                        return
                fault = server._draw_fault()
                if fault == "429":
                    self._json(429, {"error": {"message": "rate limited", "type": "rate_limit_exceeded"}})
                    return
                if fault == "500":
                    self._json(500, {"error": {"message": "internal error", "type": "server_error"}})
                    return
                if fault == "timeout":
                    time.sleep(server.hang_seconds)
                    self._json(500, {"error": {"message": "too late", "type": "server_error"}})
                    return
                if path.endswith("/embeddings"):
                    self._embeddings(payload, garbage=fault == "garbage")
                else:
                    self._chat(payload, garbage=fault == "garbage")

            def _upload(self, raw: bytes) -> None:
                msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                    b"Content-Type: " + self.headers.get("Content-Type", "").encode() + b"\r\n\r\n" + raw)
                fields = {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
                          for part in msg.iter_parts()} if msg.is_multipart() else {}
                if fields.get("purpose") != b"batch" or "file" not in fields:
                    self._json(400, {"error": {"message": "need multipart fields purpose=batch and file",
                                               "type": "invalid_request_error"}})
                    return
                with server._lock:
                    fid = f"file-{len(server.files):06d}"
                    server.files[fid] = fields["file"]
                    server.stats.files_uploaded += 1
                self._json(200, {"id": fid, "object": "file", "bytes": len(fields["file"]), "purpose": "batch",
                                 "created_at": int(time.time()), "filename": "input.jsonl", "status": "processed"})

            def _create_batch(self, payload: dict) -> None:
                fid = payload.get("input_file_id")
                if fid not in server.files or payload.get("endpoint") != "/v1/chat/completions":
                    self._json(400, {"error": {"message": f"unknown input_file_id {fid!r} or endpoint "
                                               f"{payload.get('endpoint')!r}", "type": "invalid_request_error"}})
                    return
                lines = [json.loads(x) for x in server.files[fid].decode().splitlines() if x.strip()]
                bad = [x for x in lines if x.get("method") != "POST" or x.get("url") != "/v1/chat/completions"
                       or not isinstance(x.get("custom_id"), str) or not isinstance(x.get("body"), dict)]
                ids = [x["custom_id"] for x in lines]
                if bad or len(set(ids)) != len(ids):
                    self._json(400, {"error": {"message": "malformed request lines or repeated custom_id",
                                               "type": "invalid_request_error"}})
                    return
                with server._lock:
                    bid = f"batch_{len(server.batches):06d}"
                    server.batches[bid] = {
                        "id": bid, "object": "batch", "endpoint": payload["endpoint"], "input_file_id": fid,
                        "completion_window": payload.get("completion_window", "24h"), "status": "validating",
                        "output_file_id": None, "error_file_id": None, "created_at": int(time.time()),
                        "metadata": payload.get("metadata"), "_polls": 0, "_lines": lines,
                        "request_counts": {"total": len(lines), "completed": 0, "failed": 0}}
                    server.stats.batches_created += 1
                    server.stats.batch_lines.extend(ids)
                self._json(200, server._public(bid))

            def _chat(self, payload: dict, garbage: bool) -> None:
                if garbage:
                    g = server._draw_garbage()
                    if g == len(GARBAGE_ANSWERS):
                        self._send(200, b"<html>502 Bad Gateway</html>", "application/json")
                        return
                    if g == len(GARBAGE_ANSWERS) + 1:
                        self._json(200, {"id": "x", "object": "chat.completion", "nonsense": True})
                        return
                    content = GARBAGE_ANSWERS[g]
                else:
                    content = server.answer(payload.get("messages") or [])
                choice: dict = {"index": 0, "finish_reason": "stop",
                                "message": {"role": "assistant", "content": content}}
                if payload.get("logprobs") and not garbage:
                    if server.logprobs is not None:
                        lp = server.logprobs(payload.get("messages") or [])
                    else:
                        lp = [{"token": c, "logprob": 0.0, "top_logprobs": [{"token": c, "logprob": 0.0}]}
                              for c in content]
                    choice["logprobs"] = {"content": lp}
                    choice["message"]["content"] = "".join(t["token"] for t in lp)
                self._json(200, {
                    "id": "chatcmpl-loopback", "object": "chat.completion", "created": int(time.time()),
                    "model": payload.get("model", "loopback"),
                    "choices": [choice],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                })

            def _embeddings(self, payload: dict, garbage: bool) -> None:
                if garbage:
                    self._send(200, b"not json at all", "application/json")
                    return
                inp = payload.get("input")
                texts = [inp] if isinstance(inp, str) else list(inp or [])
                data = []
                for i, t in enumerate(texts):
                    h = hashlib.sha256(str(t).encode()).digest()
                    vec = [(h[j % len(h)] - 127.5) / 127.5 for j in range(server.embed_dim)]
                    data.append({"object": "embedding", "index": i, "embedding": vec})
                self._json(200, {"object": "list", "data": data, "model": payload.get("model", "loopback"),
                                 "usage": {"prompt_tokens": 1, "total_tokens": 1}})

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._httpd.request_queue_size = 256
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="loopback-llm", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "LoopbackServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def refusing_url() -> str:
    """The ``base_url`` of a loopback port where nothing listens (connections are refused at once)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def silent_server(hang_seconds: float = 60.0) -> LoopbackServer:
    """A loopback server that accepts every request and never answers in time (hangs ``hang_seconds``)."""
    return LoopbackServer(fault_rate=1.0, fault_kinds=("timeout",), hang_seconds=hang_seconds)


def main(argv: list[str] | None = None) -> int:
    """Serve until killed; first line of stdout is ``PORT <n>``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latency", type=float, default=0.05)
    p.add_argument("--fault-rate", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    srv = LoopbackServer(latency=a.latency, fault_rate=a.fault_rate, seed=a.seed).start()
    sys.stdout.write(f"PORT {srv.port}\n")
    sys.stdout.flush()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
