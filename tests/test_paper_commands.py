"""The README's paper commands (GPT-2 CBT, toxicity) end to end through ``cli.main``, offline.

Each command is read from README.md and run as written, with only what needs the internet replaced: the
model by a tiny GPT-2-style directory, OpenAI by the loopback OpenAI-compatible server, the hub datasets by
local files in their own schemas (CBT, WikiText, Civil Comments), detoxify by the profanity scorer. Every k
the command asks for must run (the 6% run used to fail after every judge call was paid for).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from snip_lens.cli import main
from snip_lens.loopback import LoopbackServer, default_answer
from snip_lens.select import parse_k

README = Path(__file__).parent.parent / "README.md"
N_LAYERS, D_MLP = 2, 64


def readme_command(marker: str) -> list[str]:
    """The arguments after ``snip`` of the README's ``snip run`` command that contains ``marker``."""
    text = README.read_text(encoding="utf-8")
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            if "snip run" in line and marker in line:
                words = shlex.split(line)
                return words[words.index("snip") + 1:]
    raise AssertionError(f"README.md has no `snip run` command with {marker!r}")


def _replace(argv: list[str], flag: str, value: str) -> list[str]:
    assert flag in argv, f"the README command has no {flag}"
    out = list(argv)
    out[out.index(flag) + 1] = value
    return out


def _answer(messages: list[dict]) -> str:
    text = messages[-1]["content"]
    if "List a comprehensive list" in text:
        return "1. prepositions in stories\n2. insults and hostile remarks\n3. animals in fairy tales"
    if "scale from 0" in text:  # the judge: a coarse integer rating, so many ties
        return "8" if re.search(r"'(in|on|at|of|to)'", text) else "3"
    answer = default_answer(messages)
    m = re.search(r"'(in|on|at|of|to|with|by|for|from)'", answer)
    return f" prepositions such as {m.group(0)} in stories." if m else answer


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny GPT-2 directory and local files in the CBT, WikiText and Civil Comments schemas."""
    import pydoc_data.topics

    from snip_lens.evaluate import build_cloze_items, save_cbt_jsonl
    from snip_lens.testing import tiny_hf_model, tiny_tokenizer

    root = tmp_path_factory.mktemp("paper")
    model_dir = root / "gpt2-tiny"
    tiny_hf_model("gpt2", n_layers=N_LAYERS, d_mlp=D_MLP).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    prose = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    # short sentences keep the cloze items (ten forwards each, at every k) cheap on a tiny model
    story = [" ".join(f"The {a} sat {p} the {b} ." for a, p, b in zip(
        ["cat", "dog", "hen", "fox", "king", "duck"], ["on", "in", "by", "at", "under", "with"],
        ["mat", "barn", "road", "gate", "hill", "pond"][i:] + ["mat", "barn", "road", "gate", "hill", "pond"][:i]))
        for i in range(6)] * 4
    save_cbt_jsonl(build_cloze_items(story, "P", n_items=40, seed=0, n_context=2), root / "cbt_train_P.jsonl")
    save_cbt_jsonl(build_cloze_items(story, "P", n_items=4, seed=1, n_context=2), root / "cbt_test.jsonl")
    # WikiText rows are lines of articles: headings, paragraphs and blank lines
    wiki = [{"text": ""}, {"text": " = Python Documentation = \n"}]
    wiki += [{"text": " " + p.strip().replace("\n", " ") + " \n"} for t in prose[:60] for p in t.split("\n\n")[:2]
             if p.strip()]
    (root / "wikitext.jsonl").write_text("\n".join(json.dumps(r) for r in wiki), encoding="utf-8")
    civil = [{"text": f"you are a stupid worthless idiot, comment {i}, and everyone hates you", "toxicity": 0.93}
             for i in range(30)]
    civil += [{"text": f"thanks for the kind and helpful answer {i}", "toxicity": 0.02} for i in range(10)]
    (root / "civil.jsonl").write_text("\n".join(json.dumps(r) for r in civil), encoding="utf-8")
    return root


def _offline(argv: list[str], assets: Path, server: LoopbackServer, out: Path) -> list[str]:
    argv = _replace(argv, "--model", str(assets / "gpt2-tiny"))
    argv = _replace(argv, "--retain", str(assets / "wikitext.jsonl"))
    argv = _replace(argv, "--out", str(out))
    return argv + ["--base-url", server.base_url, "--api-key-env", "SNIP_PAPER_KEY", "--n-ctx", "32",
                   "--select-windows", "8", "--eval-windows", "4"]


def _check_every_k(argv: list[str], res: dict) -> None:
    """Every (method, k) of the command ran; only keyword runs beyond its matches may be skipped, saying so."""
    ks = [parse_k(k, N_LAYERS * D_MLP) for k in argv[argv.index("--k") + 1].split(",")]
    methods = argv[argv.index("--methods") + 1].split(",")
    ran = {(r["method"], r["k"]) for r in res["runs"]}
    skipped = {(r["method"], r["k"]) for r in res["skipped"]}
    assert ran | skipped == {(m, k) for m in methods for k in ks} and not ran & skipped
    for r in res["skipped"]:
        assert r["method"] == "keyword" and "ranked only" in r["reason"]
    for r in res["runs"]:
        assert set(r["ties_at_cut"]) == {"tied", "selected", "tied_after_secondary"}


def test_readme_gpt2_cbt_command_runs_at_every_k(assets, tmp_path, monkeypatch, capsys):
    argv = readme_command("--cbt P,V")
    assert "6%" in argv[argv.index("--k") + 1] and "llm-judge" in argv[argv.index("--methods") + 1]
    monkeypatch.setenv("SNIP_PAPER_KEY", "sk-paper-test")
    with LoopbackServer(answer=_answer, embed_dim=1536) as server:
        argv = _offline(argv, assets, server, tmp_path / "gpt2-cbt")
        argv = _replace(argv, "--forget", f"cbt:P:{assets / 'cbt_train_P.jsonl'}")
        argv += ["--cbt-source", str(assets / "cbt_test.jsonl"), "--cbt-items", "1"]
        assert main(argv) == 0, capsys.readouterr().err
        n_requests = server.stats.requests
    res = json.loads((tmp_path / "gpt2-cbt" / "results.json").read_text())
    _check_every_k(argv, res)
    ks = sorted({r["k"] for r in res["runs"]})
    # the judge rated exactly enough neurons for the largest k, and a tie-break decided among its ratings
    assert res["judge"] == {"candidates": max(ks), "shortlist": "snip+activation"}
    assert n_requests >= N_LAYERS * D_MLP + max(ks)  # every neuron explained, every shortlisted one judged
    for r in [res["baseline"], *res["runs"]]:
        assert set(r["extra"]) == {"cbt_P_accuracy", "cbt_V_accuracy"}
    assert "llm-judge" in capsys.readouterr().out


def test_readme_toxicity_command_runs_at_every_k(assets, tmp_path, monkeypatch, capsys):
    argv = readme_command("--toxicity")
    monkeypatch.setenv("SNIP_PAPER_KEY", "sk-paper-test")
    with LoopbackServer(answer=_answer, embed_dim=1536) as server:
        argv = _offline(argv, assets, server, tmp_path / "gpt2-toxicity")
        argv = _replace(argv, "--forget", f"civil-toxic:{assets / 'civil.jsonl'}")
        argv += ["--toxicity-scorer", "profanity", "--toxicity-n", "8"]
        assert main(argv) == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "gpt2-toxicity" / "results.json").read_text())
    _check_every_k(argv, res)
    for r in [res["baseline"], *res["runs"]]:
        assert 0.0 <= r["extra"]["pct_toxic"] <= 100.0
    for path in (tmp_path / "gpt2-toxicity").rglob("*"):
        if path.is_file():
            assert b"sk-paper-test" not in path.read_bytes(), f"API key written to {path}"


def test_judge_shortlist_smaller_than_the_largest_k_fails_before_any_llm_call(assets, tmp_path, monkeypatch,
                                                                                capsys):
    argv = readme_command("--cbt P,V")
    monkeypatch.setenv("SNIP_PAPER_KEY", "sk-paper-test")
    with LoopbackServer(answer=_answer, embed_dim=1536) as server:
        argv = _offline(argv, assets, server, tmp_path / "small-shortlist")
        argv = _replace(argv, "--forget", f"cbt:P:{assets / 'cbt_train_P.jsonl'}")
        argv += ["--cbt-source", str(assets / "cbt_test.jsonl"), "--judge-candidates", "5"]
        assert main(argv) == 2
        # refused before a single explanation or judge call was paid for (only the one-request server checks)
        from snip_lens.llm import PROBE_PROMPT

        assert server.stats.chat_prompts == [PROBE_PROMPT] and server.stats.embed_inputs == [["probe"]]
    err = capsys.readouterr().err
    assert "judge_candidates=5 is smaller than the largest k=13" in err and "--judge-candidates" in err
