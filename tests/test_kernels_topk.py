"""The fast top-k kernels equal their plain per-column references, ties included."""

import pytest
import torch

from snip_lens.kernels.topk import (NO_INDEX, merge_topk, merge_topk_reference, topk_desc,
                                    topk_desc_reference, update_topk, update_topk_sync_free)


@pytest.mark.parametrize("rows,cols,k", [(50, 7, 5), (5, 3, 5), (3, 4, 6), (200, 16, 20), (1, 2, 1)])
def test_topk_desc_equals_reference_on_random_inputs(rows, cols, k):
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows * cols + k))
    got_v, got_i = topk_desc(x, k)
    ref_v, ref_i = topk_desc_reference(x, k)
    assert torch.equal(got_i, ref_i)
    assert torch.equal(got_v, ref_v)


def test_topk_desc_breaks_ties_by_lower_row_including_across_the_cut():
    g = torch.Generator().manual_seed(1)
    # ReLU-like data: many exact zeros and repeated values, so ties straddle the cut and sit inside it.
    x = torch.randint(-3, 3, (60, 9), generator=g).float().clamp(min=0)
    x[:, 0] = 0.0  # a whole column of ties
    x[:, 1] = 1.0
    for k in (1, 4, 10):
        got_v, got_i = topk_desc(x, k)
        ref_v, ref_i = topk_desc_reference(x, k)
        assert torch.equal(got_i, ref_i), k
        assert torch.equal(got_v, ref_v), k
    assert topk_desc(x, 3)[1][:, 0].tolist() == [0, 1, 2]


def test_merge_topk_equals_reference_and_reports_sources():
    g = torch.Generator().manual_seed(2)
    va = torch.sort(torch.randint(0, 5, (6, 11), generator=g).float(), dim=0, descending=True).values
    ia = torch.randint(0, 100, (6, 11), generator=g)
    ia[-1, :3] = NO_INDEX
    va[-1, :3] = -float("inf")
    vb = torch.randint(0, 5, (9, 11), generator=g).float()
    ib = torch.randint(100, 200, (9, 11), generator=g)
    got = merge_topk(va, ia, vb, ib, 6)
    ref = merge_topk_reference(va, ia, vb, ib, 6)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    cat_v = torch.cat([va, vb])
    assert torch.equal(torch.gather(cat_v, 0, got[2]), got[0])


def test_incremental_merge_equals_one_global_topk():
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 6, (97, 13), generator=g).float()  # heavy ties
    k = 7
    run_v = torch.full((k, 13), -float("inf"))
    run_i = torch.full((k, 13), NO_INDEX)
    for start in range(0, 97, 10):
        bv, bi = topk_desc(x[start:start + 10], k)
        run_v, run_i, _ = merge_topk(run_v, run_i, bv, bi + start, k)
    ref_v, ref_i = topk_desc_reference(x, k)
    assert torch.equal(run_i, ref_i)
    assert torch.equal(run_v, ref_v)


def test_bad_k_raises():
    with pytest.raises(ValueError, match="k >= 1"):
        topk_desc(torch.zeros(3, 2), 0)


@pytest.mark.parametrize("max_sparse", [0.0, 0.125, 1.0])
@pytest.mark.parametrize("levels", [None, 4])
def test_update_topk_equals_reference_stream(levels, max_sparse):
    """Streaming update_topk over batches equals one reference top-k of all rows (sparse and dense paths)."""
    g = torch.Generator().manual_seed(7 + (levels or 0))
    rows, cols, k = 300, 17, 6
    x = torch.randn(rows, cols, generator=g) if levels is None else torch.randint(
        0, levels, (rows, cols), generator=g).float()
    x[:, 3] = 0.0  # a column of ties
    vals = torch.full((k, cols), -float("inf"))
    idx = torch.full((k, cols), NO_INDEX)
    for start, size in [(0, 2), (2, 40), (42, 8), (50, 1), (51, 100), (151, 149)]:
        # Indices need only be ascending and later than all earlier ones: leave gaps between batches.
        row_index = torch.arange(size) * 3 + 1000 * start
        vals, idx = update_topk(vals, idx, x[start:start + size], row_index, max_sparse=max_sparse)
    ref_v, ref_i = topk_desc_reference(x, k)
    starts = [0, 2, 42, 50, 51, 151]
    sizes = [2, 40, 8, 1, 100, 149]
    mapping = torch.cat([torch.arange(n) * 3 + 1000 * s for s, n in zip(starts, sizes)])
    assert torch.equal(vals, ref_v)
    assert torch.equal(idx, mapping[ref_i])


def test_update_topk_does_not_modify_inputs_and_handles_empty_batches():
    x = torch.randn(30, 5, generator=torch.Generator().manual_seed(9))
    v, i = update_topk(torch.full((3, 5), -float("inf")), torch.full((3, 5), NO_INDEX), x[:20], torch.arange(20))
    v0, i0 = v.clone(), i.clone()
    v2, i2 = update_topk(v, i, x[20:], torch.arange(20, 30))
    assert torch.equal(v, v0) and torch.equal(i, i0)
    assert update_topk(v2, i2, x[:0], torch.arange(0))[0] is v2
    ref_v, ref_i = topk_desc_reference(x, 3)
    assert torch.equal(v2, ref_v) and torch.equal(i2, ref_i)


@pytest.mark.parametrize("levels", [None, 4])
def test_update_topk_sync_free_equals_reference_stream(levels):
    """The accelerator path (stable sort + merge, no host sync) gives the same stream result, ties included."""
    g = torch.Generator().manual_seed(11 + (levels or 0))
    rows, cols, k = 300, 17, 6
    x = torch.randn(rows, cols, generator=g) if levels is None else torch.randint(
        0, levels, (rows, cols), generator=g).float()
    x[:, 3] = 0.0
    vals = torch.full((k, cols), -float("inf"))
    idx = torch.full((k, cols), NO_INDEX)
    v_fast, i_fast = vals, idx
    for start, size in [(0, 2), (2, 40), (42, 8), (50, 1), (51, 100), (151, 149)]:
        row_index = torch.arange(size) * 3 + 1000 * start
        vals, idx = update_topk_sync_free(vals, idx, x[start:start + size], row_index)
        v_fast, i_fast = update_topk(v_fast, i_fast, x[start:start + size], row_index)
        assert torch.equal(vals, v_fast) and torch.equal(idx, i_fast)
    ref_v, ref_i = topk_desc_reference(x, k)
    assert torch.equal(vals, ref_v)


def _hard_batch(seed: int, rows: int, cols: int, levels: int | None) -> torch.Tensor:
    """Activations that stress a top-k merge: continuous values or few levels (many ties), one column where
    every row ties, -0.0 against 0.0, and -inf rows (a prepended BOS)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) if levels is None else torch.randint(
        -levels, levels, (rows, cols), generator=g).float() / 4
    x[:, 2] = 1.0  # every row ties
    x[::7, 4] = -0.0
    x[::3, 4] = 0.0
    x[::128] = -float("inf")
    return x


@pytest.mark.parametrize("levels", [None, 3, 50])
def test_update_topk_group_bound_path_equals_reference_stream(levels):
    """Batches long enough for the group bound (the first, not-yet-full one included) equal the reference,
    with exact ties, -0.0 against 0.0, -inf rows (a prepended BOS) and a column of one repeated value."""
    k, cols = 5, 23
    x = _hard_batch(21 + (levels or 0), 1200, cols, levels)
    vals = torch.full((k, cols), -float("inf"))
    idx = torch.full((k, cols), NO_INDEX)
    for start, size in [(0, 400), (400, 100), (500, 300), (800, 400)]:
        vals, idx = update_topk(vals, idx, x[start:start + size], torch.arange(start, start + size))
    ref_v, ref_i = topk_desc_reference(x, k)
    assert torch.equal(idx, ref_i)
    assert torch.equal(vals, ref_v)


def test_group_bound_is_reached_by_k_entries_of_every_column():
    from snip_lens.kernels.topk import _group_bound

    x = torch.randn(500, 9, generator=torch.Generator().manual_seed(4))
    bound = _group_bound(x, 6)
    assert bound is not None and ((x >= bound).sum(0) >= 6).all()
    assert torch.equal(_group_bound(x.t().contiguous().t(), 6), bound)  # the transposed layout's own path
    assert _group_bound(x[:40], 6) is None  # too few rows for 4 groups per entry


def test_sortable_desc_orders_like_the_floats():
    from snip_lens.kernels.topk import _sortable_desc

    v = torch.tensor([3.0, -0.0, 0.0, -2.5, float("inf"), -float("inf"), 1e-38, -1e-38, 7.0])
    keys = _sortable_desc(v)
    assert ((keys >= 0) & (keys < 2**32)).all()
    order = torch.sort(keys, stable=True).indices
    assert torch.equal(v[order], torch.sort(v, descending=True, stable=True).values)
    assert keys[1] == keys[2]  # -0.0 == 0.0: a tie, broken by index like any other


@pytest.mark.parametrize("levels", [None, 3, 50])
def test_update_topk_t_from_the_transposed_batch_equals_update_topk_and_the_reference(levels):
    """The transposed-layout update gives update_topk's result after every batch (early, tied, short and long
    batches alike), and the stream equals one reference top-k."""
    from snip_lens.kernels.topk import update_topk_t

    k, cols = 5, 19
    x = _hard_batch(31 + (levels or 0), 1500, cols, levels)
    v_t = v_ref = torch.full((k, cols), -float("inf"))
    i_t = i_ref = torch.full((k, cols), NO_INDEX)
    for start, size in [(0, 400), (400, 3), (403, 97), (500, 300), (800, 12), (812, 688)]:
        row_index = torch.arange(size) * 2 + 10 * start
        xb = x[start:start + size]
        v_t, i_t = update_topk_t(v_t, i_t, xb.t().contiguous(), row_index)
        v_ref, i_ref = update_topk(v_ref, i_ref, xb, row_index)
        assert torch.equal(i_t, i_ref) and torch.equal(v_t, v_ref), start
    mapping = torch.cat([torch.arange(n) * 2 + 10 * s for s, n in
                         [(0, 400), (400, 3), (403, 97), (500, 300), (800, 12), (812, 688)]])
    ref_v, ref_i = topk_desc_reference(x, k)
    assert torch.equal(i_t, mapping[ref_i]) and torch.equal(v_t, ref_v)


def test_update_topk_t_on_few_changed_columns_keeps_the_others():
    from snip_lens.kernels.topk import update_topk_t

    k, cols = 3, 6
    vals = torch.tensor([[9.0] * cols, [8.0] * cols, [7.0] * cols])
    idx = torch.arange(k * cols).view(k, cols)
    x = torch.zeros(50, cols)
    x[10, 1], x[20, 4], x[30, 4] = 7.5, 100.0, 7.0  # column 4's 7.0 ties the k-th value: the later one loses
    v, i = update_topk_t(vals, idx, x.t().contiguous(), torch.arange(100, 150))
    assert v[:, 1].tolist() == [9.0, 8.0, 7.5] and i[:, 1].tolist() == [1, 7, 110]
    assert v[:, 4].tolist() == [100.0, 9.0, 8.0] and i[:, 4].tolist() == [120, 4, 10]
    for c in (0, 2, 3, 5):
        assert torch.equal(v[:, c], vals[:, c]) and torch.equal(i[:, c], idx[:, c])
