"""The fused CPU kernels equal the torch kernels and the plain references: records exactly, statistics within
float32 rounding; and collection through them equals the torch path (ties, BOS, resume across the paths)."""

import importlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from snip_lens.collect import ActivationRecords, collect
from snip_lens.corpus import make_windows
from snip_lens.kernels import fused
from snip_lens.kernels.topk import NO_INDEX, _group_bound, topk_desc_reference, update_topk
from snip_lens.testing import tiny_model

collect_mod = importlib.import_module("snip_lens.collect")

pytestmark = [pytest.mark.skipif(not fused.AVAILABLE, reason="numba is not installed"),
              pytest.mark.usefixtures("one_torch_thread")]

_RECORD_FIELDS = ("top_values", "top_window", "top_pos", "random_values", "random_window", "random_pos")


def _lists(k: int, cols: int, layout: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Empty running lists (k, cols): values -inf, no index, slot = rank; C or F (column by column) layout."""
    vals = np.full((k, cols), -np.inf, dtype=np.float32)
    idx = np.full((k, cols), NO_INDEX, dtype=np.int64)
    slots = np.repeat(np.arange(k, dtype=np.int64)[:, None], cols, axis=1)
    if layout == "F":
        vals, idx, slots = (np.asfortranarray(a) for a in (vals, idx, slots))
    return vals, idx, slots


def _data(rows: int, cols: int, seed: int, kind: str) -> np.ndarray:
    g = np.random.default_rng(seed)
    if kind == "ties":  # ReLU-like levels: many exact zeros, repeated values, one constant column
        x = np.maximum(g.integers(-3, 4, (rows, cols)), 0).astype(np.float32) * np.float32(0.5)
        x[:, 0] = 0.0
        return x
    return g.standard_normal((rows, cols)).astype(np.float32)


def _reference_topk(x: np.ndarray, keep: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain per-column top-k of the kept rows (values descending, ties by the lower row)."""
    rows = np.flatnonzero(keep)
    v, i = topk_desc_reference(torch.from_numpy(x[rows]), k)
    return v, torch.from_numpy(rows)[i]


def _expected_context(x: np.ndarray, skip: np.ndarray, row: int, col: int, n_pos: int, before: int,
                      after: int) -> np.ndarray:
    pos, w0 = row % n_pos, row - row % n_pos
    out = []
    for q in range(pos - before, pos + after + 1):
        out.append(math.nan if not 0 <= q < n_pos else (-math.inf if skip[w0 + q] else float(x[w0 + q, col])))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("layout", ["F", "C"])
@pytest.mark.parametrize("kind", ["ties", "normal"])
@pytest.mark.parametrize("tile_min", [1, 10**9])
def test_reduce_batch_stream_equals_the_reference_topk_contexts_and_moments(layout, kind, tile_min):
    """Batches of whole windows with BOS-like skipped rows: after every batch the lists equal the reference
    top-k of everything seen, every entry's context equals its window's activations, and the moments equal
    float64 numpy; the same whether contexts are copied through the block buffer or read directly."""
    k, cols, n_pos, before, after = 5, 21, 12, 3, 2  # 21 columns: the hit mask has a padded last word
    batches = [2, 1, 14, 3, 9]  # windows per batch: short ones (no group bound) and long ones
    n_rows = sum(batches) * n_pos
    x = _data(n_rows, cols, 7, kind)
    skip = np.zeros(n_rows, dtype=np.bool_)
    skip[::n_pos] = True  # position 0 of every window, as a prepended BOS
    skip[5 * n_pos + 4] = True  # and one more row inside a window
    vals, idx, slots = _lists(k, cols, layout)
    store = np.full((k, cols, before + 1 + after), np.nan, dtype=np.float32)
    mean, m2, sum_abs, n_posc = (np.zeros(cols) for _ in range(4))
    mx = np.full(cols, -np.inf)
    empty_k, empty_r = np.empty((0, cols), dtype=np.float32), np.empty(0, dtype=np.int64)
    rl = _lists(0, cols, layout)
    n_seen, base = 0.0, 0
    for n_win in batches:
        xb, sb = x[base:base + n_win * n_pos], skip[base:base + n_win * n_pos]
        bound = np.full(cols, -np.inf, dtype=np.float32)
        if (idx[k - 1] == NO_INDEX).any():
            fused.group_bound(xb, sb, k, bound)
        counted = fused.reduce_batch(xb, sb, n_pos, before, after, n_seen, mean, m2, sum_abs, n_posc, mx, True,
                                     vals, idx, slots, bound, base, store, empty_k, empty_r, *rl,
                                     np.empty((0, cols), dtype=np.float32),
                                     np.empty((0, cols, before + 1 + after), dtype=np.float32), 128, tile_min)
        assert counted == int((~sb).sum())
        n_seen += counted
        base += n_win * n_pos
        keep = ~skip[:base]
        ref_v, ref_i = _reference_topk(x[:base], keep, k)
        assert torch.equal(torch.from_numpy(idx.copy()), ref_i)
        assert torch.equal(torch.from_numpy(vals.copy()), ref_v)
        for p in range(k):
            for j in range(cols):
                want = _expected_context(x, skip, int(idx[p, j]), j, n_pos, before, after)
                np.testing.assert_array_equal(store[slots[p, j], j], want)
        for j in range(cols):  # every slot is held by exactly one rank
            assert sorted(slots[:, j].tolist()) == list(range(k))
        seen = x[:base][keep].astype(np.float64)
        np.testing.assert_allclose(mean, seen.mean(0), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(m2 / n_seen, seen.var(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(sum_abs, np.abs(seen).sum(0), rtol=1e-6)
        np.testing.assert_array_equal(n_posc, (seen > 0).sum(0))
        np.testing.assert_array_equal(mx, seen.max(0))


def test_reduce_batch_refuses_a_partial_window():
    cols = 4
    vals, idx, slots = _lists(2, cols, "F")
    rl = _lists(0, cols, "F")
    with pytest.raises(ValueError, match="whole windows"):
        fused.reduce_batch(np.zeros((10, cols), np.float32), np.zeros(10, np.bool_), 4, 1, 1, 0.0,
                           *(np.zeros(cols) for _ in range(5)), True, vals, idx, slots,
                           np.full(cols, -np.inf, np.float32), 0, np.zeros((2, cols, 3), np.float32),
                           np.empty((0, cols), np.float32), np.empty(0, np.int64), *rl,
                           np.empty((0, cols), np.float32), np.empty((0, cols, 3), np.float32))


@pytest.mark.parametrize("rows,k", [(400, 5), (1024, 20), (50, 20), (160, 20)])
def test_group_bound_equals_the_torch_bound_with_skipped_rows_at_minus_inf(rows, k):
    x = _data(rows, 37, rows + k, "ties" if rows == 400 else "normal")
    skip = np.zeros(rows, dtype=np.bool_)
    skip[::13] = True
    out = np.full(37, -np.inf, dtype=np.float32)
    got = fused.group_bound(x, skip, k, out)
    xt = torch.from_numpy(x.copy())
    xt[torch.from_numpy(skip)] = -math.inf
    ref = _group_bound(xt, k)
    assert got == (ref is not None)
    if ref is not None:
        assert torch.equal(torch.from_numpy(out), ref)


def test_merge_rows_equals_update_topk_on_short_key_batches():
    """The random candidates' keys: short batches, ascending sparse row indices, ties included."""
    g = np.random.default_rng(3)
    k, cols = 7, 19
    vals, idx, slots = _lists(k, cols, "F")
    ref_v, ref_i = torch.full((k, cols), -math.inf), torch.full((k, cols), NO_INDEX)
    row = 0
    for n in (3, 0, 16, 5, 16, 1):
        keys = (g.integers(0, 8, (n, cols)) / 8).astype(np.float32)  # coarse keys: ties
        rows = row + np.sort(g.choice(40, n, replace=False)).astype(np.int64)
        row += 40
        fused.merge_rows(vals, idx, slots, keys, rows)
        ref_v, ref_i = update_topk(ref_v, ref_i, torch.from_numpy(keys), torch.from_numpy(rows))
        assert torch.equal(torch.from_numpy(vals.copy()), ref_v)
        assert torch.equal(torch.from_numpy(idx.copy()), ref_i)


# ---- collection through the kernels equals the torch path ------------------------------------------


def _texts():
    import pydoc_data.topics

    t = pydoc_data.topics.topics
    return [t[key] for key in sorted(t)[:12]]


@pytest.fixture(scope="module")
def model():
    # 37 neurons: not a multiple of the kernels' 8-column mask words.
    return tiny_model("llama", n_layers=3, d_model=32, d_mlp=37, seed=1)


@pytest.fixture(scope="module")
def windows(model):
    return make_windows(model, _texts(), n_ctx=24, max_windows=13, seed=0, name="records")


def _assert_records_equal(a: ActivationRecords, b: ActivationRecords, stats_rtol: float = 1e-6) -> None:
    for name in _RECORD_FIELDS + ("top_context", "random_context"):  # NaN: no record / beyond the window
        va, vb = getattr(a, name), getattr(b, name)
        if va.is_floating_point():
            va, vb = va.nan_to_num(7.0), vb.nan_to_num(7.0)
        assert torch.equal(va, vb), name
    assert list(a.stats) == list(b.stats)
    for corpus in a.stats:
        for f in ("count", "mean", "mean_abs", "std", "max", "freq_pos"):
            torch.testing.assert_close(getattr(a.stats[corpus], f), getattr(b.stats[corpus], f), rtol=stats_rtol,
                                       atol=1e-6, msg=f"{corpus}.{f}")


def _run(model, corpus, fused_on: bool, monkeypatch, **kw) -> ActivationRecords:
    monkeypatch.setattr(collect_mod, "FUSED_KERNEL", fused_on)
    return collect(model, corpus, progress=False, **kw)


@pytest.mark.parametrize("batch_size,top_k", [(1, 4), (3, 20), (13, 6)])
def test_collect_through_the_kernels_equals_the_torch_path(model, windows, batch_size, top_k, monkeypatch):
    """Identical records (BOS windows, ties of a tiny model's activations, random records) and equal
    statistics, with a second corpus that only has statistics."""
    corpora = {"records": windows, "retain": windows.take(4)}
    kw = dict(top_k=top_k, context=(4, 2), n_random=3, batch_size=batch_size)
    torch_path = _run(model, corpora, False, monkeypatch, **kw)
    kernels = _run(model, corpora, True, monkeypatch, **kw)
    _assert_records_equal(kernels, torch_path)
    assert bool((kernels.top_pos != 0).all())  # BOS is in no record


def test_collect_uses_the_kernels_on_the_cpu_and_not_the_torch_updates(model, windows, monkeypatch):
    calls = {"fused": 0, "torch": 0}
    real = collect_mod._State.update_batch

    def counting(self, *a, **kw):
        calls["fused"] += 1
        return real(self, *a, **kw)

    def refuse(*a, **kw):
        calls["torch"] += 1
        raise AssertionError("the torch path ran although the fused kernels are available")

    monkeypatch.setattr(collect_mod._State, "update_batch", counting)
    monkeypatch.setattr(collect_mod._State, "update_stats", refuse)
    monkeypatch.setattr(collect_mod._State, "update_records", refuse)
    collect(model, windows, top_k=3, context=(2, 1), n_random=2, batch_size=5, progress=False)
    assert calls == {"fused": 3 * 3, "torch": 0}  # three layers x three batches


@pytest.mark.parametrize("first,second", [(True, False), (False, True), (True, True)])
def test_a_run_resumed_on_the_other_path_equals_an_uninterrupted_one(model, windows, tmp_path, monkeypatch,
                                                                      first, second):
    """A checkpoint written by one path (kernels or torch) resumes on the other with the same records."""
    corpora = {"records": windows, "retain": windows.take(5)}
    kw = dict(layers=[0, 2], top_k=4, context=(3, 2), n_random=2, batch_size=2, shard_windows=3)
    full = _run(model, corpora, True, monkeypatch, **kw)
    out = tmp_path / "ck"
    real_save = collect_mod.save_file
    writes = []

    def dies_on_the_third(tensors, path, metadata=None):
        writes.append(metadata)
        if len(writes) == 3:
            raise OSError("disk full")
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(collect_mod, "save_file", dies_on_the_third)
    with pytest.raises(OSError, match="disk full"):
        _run(model, corpora, first, monkeypatch, out_dir=out, **kw)
    monkeypatch.setattr(collect_mod, "save_file", real_save)
    assert Path(out / collect_mod.CHECKPOINT).exists()
    resumed = _run(model, corpora, second, monkeypatch, out_dir=out, **kw)
    _assert_records_equal(resumed, full)
    if first and second:  # the same arithmetic all along: the statistics are bit-identical too
        for corpus in full.stats:
            for f in ("mean", "std", "max", "mean_abs", "freq_pos"):
                assert torch.equal(getattr(resumed.stats[corpus], f), getattr(full.stats[corpus], f))


def test_without_numba_collection_takes_the_torch_path_and_an_explicit_request_says_why(model, windows,
                                                                                     monkeypatch):
    expected = _run(model, windows, True, monkeypatch, top_k=3, context=(2, 1), n_random=2, batch_size=4)
    monkeypatch.setattr(collect_mod, "_fused_kernels", lambda: None)  # as where numba cannot be imported
    cfg = collect_mod.CollectConfig(layers=(0,))
    assert not collect_mod._State(cfg, 8, ["c"]).fused
    with pytest.raises(ValueError, match="needs numba"):
        collect_mod._State(cfg, 8, ["c"], use_fused=True)
    got = collect(model, windows, top_k=3, context=(2, 1), n_random=2, batch_size=4, progress=False)
    _assert_records_equal(got, expected)


def test_collect_of_a_wider_model_with_missing_random_records_equals_the_torch_path(monkeypatch):
    """300 neurons (hit-mask words full and partial) and few windows, so some neurons lack random records."""
    wide = tiny_model("llama", n_layers=2, d_model=32, d_mlp=300, seed=2)
    tw = make_windows(wide, _texts(), n_ctx=24, max_windows=9, seed=0, name="records")
    kw = dict(top_k=5, context=(3, 2), n_random=3, batch_size=4)
    expected = _run(wide, tw, False, monkeypatch, **kw)
    got = _run(wide, tw, True, monkeypatch, **kw)
    assert bool(torch.isnan(got.random_values).any())  # the case this test is about
    _assert_records_equal(got, expected)
