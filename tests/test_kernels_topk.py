"""The fast top-k kernels equal their plain per-column references, ties included."""

import pytest
import torch

from snip_lens.kernels.topk import (NO_INDEX, merge_topk, merge_topk_reference, topk_desc,
                                    topk_desc_reference)


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
