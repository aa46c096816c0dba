"""Corpora: built-in and local sources, packing into windows, reproducible shuffles and splits, errors."""

import json

import pytest
import torch

from snip_lens import models
from snip_lens.corpus import TokenWindows, load_corpus, load_texts, make_windows
from snip_lens.testing import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", n_layers=1, d_model=16, d_mlp=16)


def test_builtin_sources_are_deterministic():
    import pydoc_data.topics

    prose = load_texts("prose")
    assert prose == [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    code = load_texts("code", max_docs=5, seed=1)
    assert len(code) == 5 and code == load_texts("code", max_docs=5, seed=1)
    assert code != load_texts("code", max_docs=5, seed=2)
    assert any("def " in c or "import " in c for c in code)


def test_local_txt_jsonl_and_directory(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph\nstill first\n\n\nsecond one\n")
    assert load_texts(str(tmp_path / "a.txt")) == ["first paragraph\nstill first", "second one"]
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "x y"}) + "\n\n" + json.dumps({"text": "z"}) + "\n")
    assert load_texts(str(tmp_path / "b.jsonl")) == ["x y", "z"]
    (tmp_path / "c.py").write_text("print(1)\n")
    (tmp_path / "ignored.bin").write_bytes(b"\x00")
    # In a directory each text file is one document; .jsonl gives one per line.
    assert load_texts(str(tmp_path)) == ["first paragraph\nstill first\n\n\nsecond one\n", "x y", "z", "print(1)\n"]
    (tmp_path / "bad.jsonl").write_text('{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"line 1 has no field 'text'"):
        load_texts(str(tmp_path / "bad.jsonl"))
    assert load_texts(str(tmp_path / "bad.jsonl"), text_field="body") == ["no text"]


def _source_tree(root):
    """A folder of the files a user has: no extensions, C, JS, HTML, reST, TeX, a binary, a .git folder."""
    files = {"README": "plain words, no extension", "notes/LICENSE": "permission is granted",
             "src/main.c": "int main(void) { return 0; }", "web/app.js": "console.log('hi');",
             "web/index.html": "<p>hello</p>", "docs/intro.rst": "Intro\n=====", "paper/main.tex": "\\section{A}"}
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "web" / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main")
    return files


def test_directory_reads_every_text_file_skips_binary_and_narrows_by_glob(tmp_path, caplog):
    files = _source_tree(tmp_path)
    by_path = sorted(files)  # documents come in sorted relative-path order
    with caplog.at_level("WARNING", logger="snip_lens.corpus"):
        assert load_texts(str(tmp_path)) == [files[p] for p in by_path]
    assert "skipped 1 binary file(s): web/logo.png" in caplog.text
    assert load_texts(str(tmp_path), glob="*.c") == [files["src/main.c"]]
    assert load_texts(str(tmp_path), glob="web/*") == [files["web/app.js"], files["web/index.html"]]
    assert load_texts(str(tmp_path), glob="**/*.rst") == [files["docs/intro.rst"]]
    with pytest.raises(ValueError, match=r"holds no text files matching '\*\.py'.*another --glob"):
        load_texts(str(tmp_path), glob="*.py")
    with pytest.raises(ValueError, match=r"holds no text files matching '\*\.png' \(1 binary file\(s\) skipped\)"):
        load_texts(str(tmp_path), glob="*.png")
    with pytest.raises(ValueError, match="is not a directory"):
        load_texts(str(tmp_path / "README"), glob="*.c")
    with pytest.raises(ValueError, match="logo.png' is binary"):
        load_texts(str(tmp_path / "web" / "logo.png"))


def test_bad_sources_raise_naming_the_source(tmp_path):
    with pytest.raises(ValueError, match="unknown corpus source 'nope'"):
        load_texts("nope")
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(ValueError, match="holds no text"):
        load_texts(str(tmp_path / "empty.txt"))
    locked = tmp_path / "locked.txt"
    locked.write_text("secret")
    locked.chmod(0)
    try:
        with open(locked):  # root can read anyway; then there is nothing to test here
            pass
    except PermissionError:
        with pytest.raises(ValueError, match="cannot read corpus file"):
            load_texts(str(locked))
    finally:
        locked.chmod(0o644)
    # An I/O error while reading (here simulated, since root reads mode-000 files) names the file.
    def refuse(self, *a, **k):
        raise PermissionError(13, "Permission denied")

    import pathlib

    real = pathlib.Path.read_text
    pathlib.Path.read_text = refuse
    try:
        with pytest.raises(ValueError, match=r"cannot read corpus file '.*locked.txt': Permission denied"):
            load_texts(str(locked))
    finally:
        pathlib.Path.read_text = real
    with pytest.raises(ValueError, match="unsupported corpus file"):
        (tmp_path / "x.csv").write_text("a,b")
        load_texts(str(tmp_path / "x.csv"))
    with pytest.raises(ValueError, match="max_docs"):
        load_texts("prose", max_docs=0)


def test_hf_source_fails_clearly_offline(monkeypatch):
    import sys
    import types

    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        raise ConnectionError("Couldn't reach 'no-such/dataset-xyz' on the Hub (offline mode is enabled)")

    # A stand-in for `datasets` that fails as it does offline (importing the real one costs seconds).
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(ValueError, match=r"Hugging Face dataset 'no-such/dataset-xyz' \(config 'cfg', split 'test'\)"
                       r".*needs network access"):
        load_texts("hf:no-such/dataset-xyz:cfg", split="test")
    assert calls == [("no-such/dataset-xyz", "cfg", "test")]


def test_windows_pack_documents_and_match_the_tokenizer(model):
    texts = ["alpha beta gamma", "", "delta epsilon", "zeta eta theta iota kappa lambda mu"]
    tw = make_windows(model, texts, n_ctx=5, seed=0, name="t")
    assert models.prepends_bos(model)
    bos = model.tokenizer.bos_token_id
    assert tw.tokens.shape[1] == 5 and (tw.tokens[:, 0] == bos).all()
    # Rebuild the packed stream by hand in the same seeded document order.
    import random

    order = list(range(len(texts)))
    random.Random(0).shuffle(order)
    sep = models.encode(model, "\n\n")
    stream, owner = [], []
    for i in order:
        ids = models.encode(model, texts[i])
        if not ids:
            continue
        if stream:
            stream += sep
            owner += [owner[-1]] * len(sep)
        stream += ids
        owner += [i] * len(ids)
    n = len(stream) // 4
    expect = {tuple([bos] + stream[4 * w: 4 * w + 4]): owner[4 * w] for w in range(n)}
    got = {tuple(row): d for row, d in zip(tw.tokens.tolist(), tw.documents)}
    assert got == expect and len(tw) == n


def test_windows_reproducible_capped_split_and_take(model):
    texts = load_texts("prose", max_docs=10)
    a = make_windows(model, texts, n_ctx=16, seed=3, max_windows=20)
    b = make_windows(model, texts, n_ctx=16, seed=3, max_windows=20)
    c = make_windows(model, texts, n_ctx=16, seed=4, max_windows=20)
    assert len(a) == 20 and torch.equal(a.tokens, b.tokens) and a.documents == b.documents
    assert not torch.equal(a.tokens, c.tokens)
    first, second = a.split(0.25, seed=1)
    assert len(first) == 5 and len(second) == 15
    rows = {tuple(r) for r in a.tokens.tolist()}
    f_rows, s_rows = [tuple(r) for r in first.tokens.tolist()], [tuple(r) for r in second.tokens.tolist()]
    assert set(f_rows) | set(s_rows) == rows and not set(f_rows) & set(s_rows)
    again = a.split(0.25, seed=1)[0]
    assert torch.equal(again.tokens, first.tokens)
    assert torch.equal(a.take(3).tokens, a.tokens[:3]) and len(a.take(100)) == 20
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        a.split(1.0)
    tw = load_corpus(model, "prose", n_ctx=16, max_windows=4, name="p")
    assert tw.name == "p" and tw.tokens.shape == (4, 16)
    # Capping each document's tokens spreads a small corpus over more documents.
    wide = make_windows(model, texts, n_ctx=16, seed=3, max_windows=20, max_doc_tokens=30)
    assert len(set(wide.documents)) > len(set(a.documents))
    assert max(wide.documents.count(d) for d in set(wide.documents)) <= 3


def test_windows_bad_inputs(model):
    with pytest.raises(ValueError, match="corpus 'e' is empty"):
        make_windows(model, [], name="e")
    with pytest.raises(ValueError, match="shorter than one token"):
        make_windows(model, ["", ""], name="blank")
    with pytest.raises(ValueError, match="n_ctx"):
        make_windows(model, ["abc"], n_ctx=1)
    # A corpus shorter than a window becomes one short window.
    tw = make_windows(model, ["a b"], n_ctx=64)
    assert len(tw) == 1 and tw.tokens.shape[1] == 1 + len(models.encode(model, "a b"))
    with pytest.raises(ValueError, match="one document index per window"):
        TokenWindows(torch.zeros(2, 3, dtype=torch.long), [0], "x")
