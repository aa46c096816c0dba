"""The Batch API mode: request-file format, a round trip through the loopback server's files and batches
endpoints, resuming a run whose driver stopped while its batch ran, and the per-neuron cache."""

import json

import pytest

from snip_lens.explain import ExplainConfig, explain
from snip_lens.llm import LLMConfig
from snip_lens.llm_batch import (BatchConfig, BatchPending, BatchRunner, custom_id, parse_result_line,
                                 request_body, request_line, run_batched)
from snip_lens.loopback import LoopbackServer
from snip_lens.types import ActivationRecord, NeuronId, NeuronRecords


def _records(n=6):
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    return [NeuronRecords(NeuronId(0, i), [ActivationRecord(["x", f" {words[i]}", "y"], [0.0, 5.0 + i, 1.0])])
            for i in range(n)]


def _config(server, tmp_path):
    llm = LLMConfig(model="gpt-4o-mini", base_url=server.base_url, api_key_env=None, max_retries=0)
    return ExplainConfig(kind="openai", llm=llm, cache_dir=str(tmp_path / "cache"), few_shot=False)


def test_request_line_is_the_batch_api_format():
    llm = LLMConfig(model="gpt-4o-mini", temperature=0.5, max_tokens=40)
    msgs = [{"role": "user", "content": "hi"}]
    line = json.loads(request_line(request_body(llm, msgs)))
    assert line == {"custom_id": custom_id(request_body(llm, msgs)), "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": "gpt-4o-mini", "messages": msgs, "temperature": 0.5, "top_p": 1.0,
                             "max_tokens": 40}}
    assert line["custom_id"].startswith("snip-") and len(line["custom_id"]) == 45
    assert custom_id(request_body(llm, msgs)) != custom_id(request_body(LLMConfig(model="gpt-4o"), msgs))


def test_result_lines_parse_to_answer_or_error():
    ok = {"id": "r", "custom_id": "a", "error": None, "response": {"status_code": 200, "body": {
        "choices": [{"message": {"role": "assistant", "content": " words"}}]}}}
    assert parse_result_line(json.dumps(ok)) == ("a", " words", None)
    bad = {"custom_id": "b", "error": None, "response": {"status_code": 500, "body": {"error": {"message": "boom"}}}}
    assert parse_result_line(json.dumps(bad)) == ("b", None, "HTTP 500: boom")
    expired = {"custom_id": "c", "response": None, "error": {"code": "batch_expired", "message": "late"}}
    assert parse_result_line(json.dumps(expired)) == ("c", None, "batch_expired: late")
    with pytest.raises(ValueError, match="custom_id"):
        parse_result_line("{}")


def test_batch_round_trip_equals_live_calls_and_skips_cached_neurons(tmp_path):
    recs = _records()
    with LoopbackServer(batch_polls=3) as server:
        cfg = _config(server, tmp_path)
        # Two neurons explained live first: their answers are in the per-neuron cache.
        live = explain(recs[:2], cfg, progress=False)
        assert all(e.ok for e in live) and server.stats.requests == 2
        polls = []
        batch = BatchConfig(str(tmp_path / "batch"), poll_interval=7)
        runner = BatchRunner(cfg.llm, batch, sleep=polls.append)
        out = run_batched(lambda c: explain(recs, cfg, client=c, progress=False), cfg.llm, batch, runner=runner)
        assert len(server.stats.chat_prompts) == 2  # no live chat request from the batch run
        assert (server.stats.files_uploaded, server.stats.batches_created) == (1, 1)
        assert len(server.stats.batch_lines) == 4  # only the neurons the cache did not hold
        assert polls == [7, 7]  # validating -> in_progress -> completed on the third check
        assert [e.neuron for e in out] == [r.neuron for r in recs] and all(e.ok for e in out)
        direct = explain(recs, ExplainConfig(kind="openai", llm=cfg.llm, few_shot=False), progress=False)
        assert len(server.stats.chat_prompts) == 2 + len(recs)
        assert [e.explanation for e in out] == [e.explanation for e in direct]
        assert "'gamma'" in out[2].explanation  # each answer reached its own neuron
        req = (tmp_path / "batch" / "requests-0000.jsonl").read_text().splitlines()
        assert [json.loads(x)["custom_id"] for x in req] == server.stats.batch_lines
        # Everything is cached now: a rerun submits nothing.
        again = run_batched(lambda c: explain(recs, cfg, client=c, progress=False), cfg.llm, batch, runner=runner)
        assert [e.explanation for e in again] == [e.explanation for e in out]
        assert server.stats.batches_created == 1


def test_a_restarted_run_finds_its_batch_and_continues(tmp_path):
    recs = _records(4)
    with LoopbackServer(batch_polls=4) as server:
        cfg = _config(server, tmp_path)
        step = lambda c: explain(recs, cfg, client=c, progress=False)  # noqa: E731
        stopped = BatchConfig(str(tmp_path / "batch"), poll_interval=0, max_wait=0)
        with pytest.raises(BatchPending, match="run again"):
            run_batched(step, cfg.llm, stopped, runner=BatchRunner(cfg.llm, stopped))
        state = json.loads((tmp_path / "batch" / "batches.json").read_text())
        assert [b["status"] for b in state["batches"]] == ["in_progress"]
        resumed = BatchConfig(str(tmp_path / "batch"), poll_interval=0)
        out = run_batched(step, cfg.llm, resumed, runner=BatchRunner(cfg.llm, resumed))
        assert all(e.ok for e in out)
        assert (server.stats.files_uploaded, server.stats.batches_created) == (1, 1)  # nothing submitted twice
        assert len(server.stats.batch_lines) == 4


def test_failed_batch_lines_are_failures_and_only_they_are_resubmitted(tmp_path):
    recs = _records(8)
    with LoopbackServer(batch_polls=1, fault_rate=0.4, seed=3) as server:
        cfg = _config(server, tmp_path)
        step = lambda c: explain(recs, cfg, client=c, progress=False)  # noqa: E731
        batch = BatchConfig(str(tmp_path / "batch"), poll_interval=0)
        out = run_batched(step, cfg.llm, batch, runner=BatchRunner(cfg.llm, batch))
        failed = [e for e in out if not e.ok]
        assert 0 < len(failed) < len(recs)
        assert all("batch request" in e.error and "HTTP 500" in e.error for e in failed)
        server.fault_rate = 0.0
        out2 = run_batched(step, cfg.llm, batch, runner=BatchRunner(cfg.llm, batch))
        assert all(e.ok for e in out2)
        assert server.stats.batches_created == 2
        assert len(server.stats.batch_lines) == len(recs) + len(failed)


def test_batch_config_refuses_bad_values():
    with pytest.raises(ValueError, match="max_requests"):
        BatchConfig("x", max_requests=60_000)
    with pytest.raises(ValueError, match="poll_interval"):
        BatchConfig("x", poll_interval=-1)
