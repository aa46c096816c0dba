"""A new user's first hour through the CLI: fail fast on bad input and dead servers, one meaning per flag,
clean interrupts, reruns that resume without --overwrite, nothing reused or accepted silently."""

from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path

import pytest
import torch

from snip_lens.cli import build_parser, main
from snip_lens.loopback import LoopbackServer, refusing_url, silent_server

SMALL = ["--forget", "code", "--retain", "prose", "--n-ctx", "32", "--select-windows", "8", "--eval-windows", "4",
         "--max-docs", "40"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from snip_lens.testing import tiny_hf_model, tiny_tokenizer

    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_hf_model("llama", n_layers=2, d_mlp=32).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def _run(model_dir, out, *extra):
    return main(["run", "--model", str(model_dir), *SMALL, "--out", str(out), *extra])


def _err_first_line(capsys) -> str:
    """The first line of the CLI's own message on stderr (progress bars of model loading aside)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("snip ")]
    _err_first_line.last = lines[0] if lines else ""
    return _err_first_line.last


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if anything loads a model (arguments must be checked first)."""
    from snip_lens import models

    def refuse(*a, **kw):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(models, "load_model", refuse)


# ---- item 1: an unreachable server fails in seconds, naming the URL --------------------------------


def test_unreachable_server_fails_in_seconds_with_url_and_fix(model_dir, tmp_path, capsys, no_model_load):
    url = refusing_url()
    t = time.perf_counter()
    rc = _run(model_dir, tmp_path / "a", "--explainer", "openai", "--llm-model", "m", "--base-url", url,
              "--api-key-env", "none", "--methods", "snip")
    assert rc == 2 and time.perf_counter() - t < 10
    err = _err_first_line(capsys)
    assert url in err and "APIConnectionError" in err and "check that the server is running" in err.lower()
    assert not (tmp_path / "a" / "config.json").exists()


def test_server_that_never_answers_fails_within_the_probe_timeout(model_dir, tmp_path, capsys, no_model_load):
    with silent_server(hang_seconds=30) as srv:
        url = srv.base_url
        t = time.perf_counter()
        rc = _run(model_dir, tmp_path / "a", "--explainer", "openai", "--llm-model", "m", "--base-url",
                  url, "--api-key-env", "none", "--methods", "snip", "--probe-timeout", "2")
        assert rc == 2 and time.perf_counter() - t < 10
    err = _err_first_line(capsys)
    assert url in err and "Timeout" in err


def test_circuit_breaker_stops_the_stage_keeps_successes_and_the_rerun_resumes(model_dir, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    # answers the probe and 9 neurons, then fails every request the same way
    with LoopbackServer(fail_after=10) as bad:
        rc = _run(model_dir, out, "--explainer", "openai", "--llm-model", "m", "--base-url", bad.base_url,
                  "--api-key-env", "none", "--methods", "snip,random", "--k", "5%", "--breaker-failures", "4",
                  "--concepts", "distinctive")
        sent = bad.stats.requests
    assert rc == 2
    err = _err_first_line(capsys)
    assert "explaining stopped early" in err and "explanations that succeeded are cached" in err
    n_ok = int(err.split("; the ")[1].split(" explanations")[0])
    assert n_ok == len(list((out / "cache" / "explain").rglob("*.json"))) == 9
    assert sent < 1 + 64  # stopped: not one request per neuron
    assert not (out / "explanations.jsonl").exists()
    with LoopbackServer() as good, caplog.at_level("WARNING", logger="snip_lens.sweep"):
        rc = _run(model_dir, out, "--explainer", "openai", "--llm-model", "m", "--base-url", good.base_url,
                  "--api-key-env", "none", "--methods", "snip,random", "--k", "5%", "--breaker-failures", "4",
                  "--concepts", "distinctive")
        assert rc == 0, capsys.readouterr().err
        assert len(good.stats.chat_prompts) == 1 + 64 - n_ok  # the probe and only the neurons not cached
    assert f"resuming explanations: {n_ok} of 64 neurons already answered" in caplog.text


def test_client_breaker_opens_after_identical_failures_and_sends_nothing_more():
    from snip_lens.llm import CircuitOpen, LLMConfig, LLMError, OpenAIChatClient, run_all

    with LoopbackServer(fail_after=0) as srv:
        client = OpenAIChatClient(LLMConfig("m", base_url=srv.base_url, api_key_env=None, breaker_failures=3,
                                            concurrency=1))
        res = run_all([client.generate([{"role": "user", "content": "x"}]) for _ in range(10)],
                      return_exceptions=True, progress=False)
        assert srv.stats.requests == 3
    assert all(isinstance(r, LLMError) for r in res) and sum(isinstance(r, CircuitOpen) for r in res) == 7


# ---- item 2: --api-key-env none everywhere -----------------------------------------------------------


def test_api_key_env_none_works_in_run_and_concepts(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    def answer(messages):
        return "1. loops\n2. functions" if "List a comprehensive list" in messages[-1]["content"] else " code tokens."

    with LoopbackServer(answer=answer) as srv:
        assert _run(model_dir, tmp_path / "r", "--explainer", "openai", "--llm-model", "m", "--base-url",
                    srv.base_url, "--api-key-env", "none", "--methods", "snip", "--k", "5%") == 0
        assert main(["concepts", "--forget", "code", "--max-docs", "5", "--llm-model", "m", "--base-url",
                     srv.base_url, "--api-key-env", "none", "--out", str(tmp_path / "c.json")]) == 0
        assert srv.stats.auth_headers == {"Bearer EMPTY"}
    assert "not set" not in capsys.readouterr().err
    for cmd in (["score", "--explanations", "x", "--concepts", "y"], ["search", "q"]):
        args = build_parser().parse_args([*cmd, "--api-key-env", "none"])
        assert args.llm__api_key_env is None  # accepted: no key is sent


# ---- item 3: one name per meaning ---------------------------------------------------------------------


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sp in action.choices.items():
                yield name, sp
                for sub_name, sub in _subparsers(sp):
                    yield f"{name} {sub_name}", sub


def test_model_means_the_subject_model_and_llm_model_the_llm_in_every_subcommand():
    for name, sp in _subparsers(build_parser()):
        for a in sp._actions:
            if "--model" in a.option_strings:
                assert a.dest in ("model__name", "model", "deprecated_model"), (name, a.dest)
                if a.dest == "deprecated_model":
                    assert "deprecated" in a.help
            if "--llm-model" in a.option_strings:
                assert a.dest == "llm__model", (name, a.dest)


def test_explain_llm_model_works_and_model_is_a_deprecated_alias(tmp_path, capsys):
    from snip_lens.collect import collect
    from snip_lens.corpus import make_windows
    from snip_lens.testing import tiny_model

    model = tiny_model("llama", n_layers=1, d_mlp=8)
    rec = tmp_path / "rec"
    collect(model, make_windows(model, ["some words here and there"] * 4, n_ctx=8), top_k=2, context=(3, 1),
            out_dir=rec, progress=False)
    with LoopbackServer() as srv:
        base = ["explain", "--records", str(rec), "--explainer", "openai", "--base-url", srv.base_url,
                "--api-key-env", "none", "--neurons", "0:1"]
        assert main([*base, "--llm-model", "m", "--out", str(tmp_path / "a.jsonl")]) == 0
        assert "deprecated" not in capsys.readouterr().err
        assert main([*base, "--model", "m", "--out", str(tmp_path / "b.jsonl")]) == 0
    assert "--model is deprecated here" in capsys.readouterr().err


# ---- item 4: validate before loading; the corrected rerun needs no --overwrite -------------------------


@pytest.mark.parametrize("bad, needle", [
    (["--k", "150%"], "150%"),
    (["--k", "x"], "'x'"),
    (["--methods", "snip,magic"], "magic"),
    (["--methods", "keyword"], "keywords"),
    (["--methods", "llm-judge"], "--llm-model"),
    (["--forget", "no/such/dir"], "no/such/dir"),
    (["--import-explanations", "missing.jsonl"], "missing.jsonl"),
    (["--cbt", "Q"], "'Q'"),
    (["--dtype", "int8"], "int8"),
    (["--device", "gpu"], "gpu"),
    (["--batch-size", "0"], "batch size"),
    (["--retain", "code"], "identical"),
    (["--base-url", "localhost:8000"], "localhost:8000"),
])
def test_bad_arguments_fail_before_the_model_loads(model_dir, tmp_path, capsys, no_model_load, bad, needle):
    out = tmp_path / "o"
    assert _run(model_dir, out, "--methods", "random", *bad) == 2
    err = _err_first_line(capsys)
    assert needle in err, err
    assert not (out / "config.json").exists()


def test_failed_run_does_not_block_the_corrected_rerun(model_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert _run(model_dir, out, "--methods", "random", "--k", "150%") == 2
    assert _run(model_dir, out, "--methods", "random", "--k", "5%") == 0


def test_config_differing_only_in_stages_never_computed_needs_no_overwrite(model_dir, tmp_path, capsys,
                                                                         monkeypatch):
    out = tmp_path / "o"
    E = importlib.import_module("snip_lens.explain")  # the package re-exports a function of that name

    real = E.explain

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(E, "explain", interrupted)
    assert _run(model_dir, out, "--methods", "snip", "--k", "5%") == 130
    assert (out / "records").is_dir() and not (out / "explanations.jsonl").exists()
    monkeypatch.setattr(E, "explain", real)
    # other explainer, methods and k: none of them was computed yet, so the records are reused
    assert _run(model_dir, out, "--methods", "snip,random", "--k", "10%", "--hybrid-weight", "0.1") == 0
    # other windows: the saved records (and results) are of another config
    capsys.readouterr()
    assert _run(model_dir, out, "--methods", "random", "--k", "10%", "--n-ctx", "24") == 2
    err = _err_first_line(capsys)
    assert "records" in err and "--overwrite" in err


# ---- item 6: Ctrl-C is one line; the rerun says where it resumes -------------------------------------------


def test_ctrl_c_prints_one_line_saying_what_is_kept(model_dir, tmp_path, capsys, monkeypatch):
    C = importlib.import_module("snip_lens.collect")

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(C, "collect", interrupted)
    assert _run(model_dir, tmp_path / "o", "--methods", "random") == 130
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(err) == 1 and "interrupted" in err[0] and "same command" in err[0] and "Traceback" not in err[0]


def test_collect_interrupt_and_resume_message(model_dir, tmp_path, capsys, monkeypatch, caplog):
    C = importlib.import_module("snip_lens.collect")

    real = C._save_checkpoint
    calls = {"n": 0}

    def save_then_stop(*a, **kw):
        real(*a, **kw)
        calls["n"] += 1
        raise KeyboardInterrupt

    monkeypatch.setattr(C, "_save_checkpoint", save_then_stop)
    argv = ["collect", "--model", str(model_dir), "--corpus", "prose", "--windows", "6", "--n-ctx", "16",
            "--shard-windows", "2", "--batch-size", "2", "--no-progress", "--out", str(tmp_path / "rec")]
    assert main(argv) == 130
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(err) == 1 and "checkpoint" in err[0] and "resume" in err[0]
    monkeypatch.setattr(C, "_save_checkpoint", real)
    with caplog.at_level("WARNING", logger="snip_lens.collect"):
        assert main(argv) == 0
    assert "resuming from 2 of 6 windows" in caplog.text


# ---- item 7: binary input and degenerate explanations ------------------------------------------------


def test_binary_file_named_txt_is_refused_as_concept_and_corpus_input(model_dir, tmp_path, capsys, no_model_load):
    b = tmp_path / "data.txt"
    b.write_bytes(bytes(range(256)) * 64)
    assert main(["concepts", "--forget", str(b), "--out", str(tmp_path / "c.json")]) == 2
    assert "binary" in _err_first_line(capsys) and str(b) in _err_first_line.last
    assert not (tmp_path / "c.json").exists()
    assert _run(model_dir, tmp_path / "o", "--methods", "random", "--forget", str(b)) == 2
    assert "binary" in _err_first_line(capsys)
    # no NUL byte, but control characters throughout (what corpus reading lets through as text)
    c = tmp_path / "ctrl.txt"
    c.write_text("".join(chr(1 + i % 8) + "ab" for i in range(3000)))
    assert main(["concepts", "--forget", str(c), "--out", str(tmp_path / "c.json")]) == 2
    assert "looks like binary data" in _err_first_line(capsys)


def test_degenerate_explanations_are_flagged_and_counted_in_results(model_dir, tmp_path, capsys):
    with LoopbackServer(answer=lambda m: " the the the the the.") as srv:
        assert _run(model_dir, tmp_path / "o", "--explainer", "openai", "--llm-model", "m", "--base-url",
                    srv.base_url, "--api-key-env", "none", "--methods", "snip", "--k", "5%",
                    "--concepts", "distinctive") == 0
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    ex = res["explanations"]
    assert ex["degenerate"] and ex["n_ok"] == 64 and ex["n_distinct"] == 1 and ex["n_repetitive"] == 64
    assert "look degenerate" in capsys.readouterr().out


def test_explanation_stats_of_varied_and_degenerate_sets():
    from snip_lens.checks import explanation_stats
    from snip_lens.types import NeuronExplanation, NeuronId

    def ex(texts):
        return [NeuronExplanation(NeuronId(0, i), t) for i, t in enumerate(texts)]

    varied = explanation_stats(ex([f"the word number {i} in lists" for i in range(20)]))
    assert not varied.degenerate and varied.n_distinct == 20
    same = explanation_stats(ex(["numbers in tables"] * 15 + [f"word {i}" for i in range(5)]))
    assert same.degenerate and "15 of 20" in same.reasons[0]
    frag = explanation_stats(ex([("ab" * 10) if i % 2 else f"token {i} here" for i in range(20)]))
    assert frag.degenerate and frag.n_repetitive == 10


# ---- item 8: errors name the value and the fix ----------------------------------------------------------


def test_out_naming_a_file(model_dir, tmp_path, capsys, no_model_load):
    f = tmp_path / "a_file"
    f.write_text("x")
    assert main(["run", "--model", str(model_dir), *SMALL, "--methods", "random", "--out", str(f)]) == 2
    err = _err_first_line(capsys)
    assert "is an existing file" in err and "Errno" not in err
    assert main(["collect", "--model", str(model_dir), "--out", str(f)]) == 2
    assert "is an existing file" in _err_first_line(capsys)


def test_n_ctx_longer_than_the_model_context(model_dir, tmp_path, capsys):
    assert _run(model_dir, tmp_path / "o", "--methods", "random", "--n-ctx", "20000") == 2
    err = _err_first_line(capsys)
    assert "--n-ctx 20000 is longer than the context" in err and "at most --n-ctx 256" in err
    assert main(["collect", "--model", str(model_dir), "--n-ctx", "20000", "--out", str(tmp_path / "c")]) == 2
    assert "longer than the context" in _err_first_line(capsys)


def test_to_tokens_of_a_non_string():
    from snip_lens.models import to_tokens
    from snip_lens.testing import tiny_model

    with pytest.raises(TypeError, match="string or a list of strings, got 42"):
        to_tokens(tiny_model("llama", n_layers=1, d_mlp=8), 42)


def test_one_document_side_is_named(model_dir, tmp_path, capsys):
    one = tmp_path / "one.txt"
    one.write_text("a single paragraph of text without blank lines " * 20)
    assert _run(model_dir, tmp_path / "o", "--methods", "random", "--forget", str(one)) == 2
    err = _err_first_line(capsys)
    assert "forget" in err and str(one) in err and "1 document" in err


def test_jsonl_without_the_text_field_names_the_flag(model_dir, tmp_path, capsys):
    j = tmp_path / "docs.jsonl"
    j.write_text('{"body": "x"}\n{"body": "y"}\n')
    assert _run(model_dir, tmp_path / "o", "--methods", "random", "--forget", str(j)) == 2
    err = _err_first_line(capsys)
    assert "--text-field" in err and "'body'" in err


# ---- item 9: help on every option, an example in snip run --help -----------------------------------------


def test_every_option_of_every_subcommand_has_help():
    missing = [(name, a.option_strings) for name, sp in _subparsers(build_parser()) for a in sp._actions
               if a.option_strings and not (a.help and a.help.strip())]
    assert not missing


def test_run_help_shows_an_example_and_explains_a_directory(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    assert "example" in out and "snip run --model" in out
    assert "a DIR (every text file under it is one document)" in " ".join(out.split())
    for flag in ("--batch-size", "--seed", "--explainer", "--hybrid-weight"):
        assert flag in out


# ---- device and dtype reach load_model in every model-running command ------------------------------------


def test_every_model_running_command_accepts_device_and_dtype(model_dir, tmp_path, monkeypatch):
    from snip_lens import models
    from snip_lens.mask import NeuronMask
    from snip_lens.testing import tiny_model

    seen = []
    real = models.load_model

    def spy(name, **kw):
        seen.append(kw)
        return real(name, **kw)

    monkeypatch.setattr(models, "load_model", spy)
    mask = tmp_path / "m.safetensors"
    NeuronMask.from_neurons(tiny_model("llama", n_layers=2, d_mlp=32), [(0, 1)]).save(mask)
    text = tmp_path / "t.txt"
    text.write_text("Some words of text. " * 40)
    expl = tmp_path / "e.jsonl"
    expl.write_text(json.dumps({"layer": 0, "index": 1, "explanation": "numbers", "score": None, "source": "",
                                "error": None}) + "\n")
    concepts = tmp_path / "c.json"
    concepts.write_text('{"concepts": ["tables of figures"]}')
    dev = ["--device", "cpu", "--dtype", "bf16"]
    m = ["--model", str(model_dir)]
    commands = [
        ["run", *m, *SMALL, "--methods", "random", "--k", "5%", "--out", str(tmp_path / "r"), *dev],
        ["demo", *m, *SMALL[4:], "--methods", "random", "--k", "5%", "--out", str(tmp_path / "d"), *dev],
        ["collect", *m, "--corpus", str(text), "--windows", "2", "--n-ctx", "16", "--no-progress",
         "--out", str(tmp_path / "c"), *dev],
        ["evaluate", "lm", *m, "--corpus", str(text), "--windows", "2", "--n-ctx", "16", *dev],
        ["evaluate", "toxicity", *m, "--n", "2", "--max-new-tokens", "2", "--scorer", "profanity", *dev],
        ["export", *m, "--mask", str(mask), "--out", str(tmp_path / "e"), *dev],
        ["evaluate", "cbt", *m, "--source", str(Path(__file__).parent / "fixtures" / "cbt_sample.jsonl"), *dev],
        ["score", "--explanations", str(expl), "--concepts", str(concepts), *m, "--match", "embedding",
         "--out", str(tmp_path / "s"), *dev],
        ["relearn", *m, "--mask", str(mask), "--forget", "code", "--retain", "prose", "--max-docs", "8",
         "--steps", "1", "--forms", "masked", "--relearn-windows", "2", "--batch-size", "1", "--n-ctx", "16",
         "--eval-windows", "1", "--out", str(tmp_path / "rl"), *dev],
    ]
    for argv in commands:
        assert main(argv) == 0, argv
    assert len(seen) == len(commands)
    assert all(kw["device"] == "cpu" and kw["dtype"] == torch.bfloat16 for kw in seen)


# ---- snip explain --explainer local: the chat model honours --device and --dtype ----------------------------


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    """A tiny chat model directory (random weights, a plain chat template), as --local-model takes it."""
    from snip_lens.testing import tiny_hf_model, tiny_tokenizer

    d = tmp_path_factory.mktemp("tiny-chat")
    tiny_hf_model("llama", n_layers=1, d_mlp=32, n_ctx=1024).save_pretrained(d)
    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    tok.save_pretrained(d)
    return d


def test_explain_local_runs_its_chat_model_on_the_device_and_dtype_asked_for(model_dir, chat_dir, tmp_path,
                                                                             monkeypatch):
    from snip_lens.collect import collect
    from snip_lens.explain import local as local_mod
    from snip_lens.models import load_model

    records = tmp_path / "records"
    collect(load_model(str(model_dir)), ["Some words of text, and some more words. " * 8] * 2, n_ctx=16,
            layers=[0], top_k=2, context=(2, 1), n_random=0, progress=False, out_dir=records)
    clients = []
    real_init = local_mod.LocalChatClient.__init__

    def spy(self, *a, **kw):
        real_init(self, *a, **kw)
        clients.append(self)

    monkeypatch.setattr(local_mod.LocalChatClient, "__init__", spy)
    out = tmp_path / "e.jsonl"
    argv = ["explain", "--explainer", "local", "--local-model", str(chat_dir), "--records", str(records),
            "--neurons", "L0/N0,L0/N1", "--no-few-shot", "--max-records", "2", "--out", str(out),
            "--device", "cpu", "--dtype", "bf16"]
    assert main(argv) in (0, 1)  # 1: a random tiny model's answers may all be unparseable; they are recorded
    assert len(clients) == 1
    chat = clients[0]
    assert chat.dtype == torch.bfloat16 and chat.device.type == "cpu"
    assert all(p.dtype == torch.bfloat16 for p in chat.model.parameters())
    assert len(out.read_text().splitlines()) == 2  # both neurons went through the bf16 model


def test_local_chat_client_refuses_a_bad_device_or_dtype_before_loading(chat_dir):
    from snip_lens.explain import ExplainConfig, LocalChatClient

    with pytest.raises(ValueError, match="'int8'.*--dtype"):
        LocalChatClient(str(chat_dir), dtype="int8")
    with pytest.raises(ValueError, match="'gpu'.*--device"):
        LocalChatClient(str(chat_dir), device="gpu")
    with pytest.raises(ValueError, match="'fp8'"):
        ExplainConfig(kind="local", local_dtype="fp8")
    assert ExplainConfig(kind="local", local_dtype="bf16").local_dtype == "bfloat16"


def test_local_explanations_in_another_dtype_are_cached_apart():
    from snip_lens.explain import ExplainConfig
    from snip_lens.explain.runner import _cache_identity

    fp32 = _cache_identity(ExplainConfig(kind="local"))
    assert "dtype" not in fp32  # float32 answers keep the keys they were cached under
    assert _cache_identity(ExplainConfig(kind="local", local_dtype="bf16"))["dtype"] == "bfloat16"


def test_explain_cli_refuses_a_bad_dtype_for_the_local_model(chat_dir, tmp_path, capsys):
    argv = ["explain", "--explainer", "local", "--local-model", str(chat_dir), "--import", str(tmp_path / "x"),
            "--out", str(tmp_path / "e.jsonl"), "--dtype", "int8"]
    assert main(argv) == 2
    assert "'int8'" in _err_first_line(capsys)
