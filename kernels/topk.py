"""Exact per-column top-k and top-k merging: the hot path of activation collection (SNIP step 1).

For every neuron (a column) collection keeps the k largest activations seen so far (rows are token
positions). Each batch of activations ``[tokens, neurons]`` is reduced to its own top-k, then merged with
the running top-k. Ties are broken by the lower index (the earlier token), so the result does not depend
on how the tokens were cut into batches; this is what lets a resumed run equal an uninterrupted one.

``update_topk`` is the per-batch hot path. ``torch.topk`` over a ``[1024, 1536]`` batch costs about as much
as one of the layer's matmuls on CPU, so it keeps only the batch values that can enter: strictly above the
column's current k-th value (a later token that merely ties it loses the tie) and at least the batch's
*group bound*, the k-th largest maximum of >= 4k row groups, which k entries of the column reach (this
filters the first batches too, before the running lists are full). That leaves a few values per column
beyond the ones that enter; they are ordered by one stable sort on a (column, value) integer key and
merged with the running lists by one stable sort per column. ``update_topk_t`` does the same from the
batch transposed (column, row): there ``nonzero`` hands the candidates out grouped by column in index
order, so no sort over all candidates is needed (collection transposes early batches anyway, for the
records' contexts). ``topk_desc`` / ``merge_topk`` are the
vectorised building blocks (``torch.topk`` with an exact fallback for columns whose tie straddles the cut);
``topk_desc_reference`` / ``merge_topk_reference`` are plain per-column loops that define the expected
result.

On an accelerator every data-dependent branch above (``nonzero``, ``.any()``, ``unique``) waits for the
device. ``update_topk_sync_free`` gives the same result with a fixed sequence of kernels and no host
sync: a stable sort of the batch (exact tie order) and a merge; that is what collection uses off the CPU.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float, Int
from torch import Tensor

NO_INDEX = torch.iinfo(torch.long).max
"""Index of an empty slot (sorts after every real index)."""
SHORT_BATCH_ROWS = 64
"""Batches of at most this many rows are ordered by a full stable sort instead of ``torch.topk``."""
BOUND_GROUPS_PER_K = 4
"""``_group_bound`` cuts a batch into at least this many groups per top-k entry."""


def _lexsort_desc(values: Tensor, index: Tensor) -> Tensor:
    """Per column, the permutation ordering rows by value descending, then by index ascending."""
    # Sorting along the contiguous last dimension is several times faster than along dim 0.
    vt, it = values.t().contiguous(), index.t().contiguous()  # (col, row)
    by_index = torch.sort(it, dim=1, stable=True).indices
    v = torch.gather(vt, 1, by_index)
    by_value = torch.sort(v, dim=1, descending=True, stable=True).indices
    return torch.gather(by_index, 1, by_value).t()


def topk_desc(x: Float[Tensor, "row col"], k: int) -> tuple[Float[Tensor, "k col"], Int[Tensor, "k col"]]:
    """The ``k`` largest values of every column and their row numbers, largest first, ties by lower row.

    ``k`` larger than the number of rows returns all rows.
    """
    if k <= 0:
        raise ValueError(f"top-k needs k >= 1; got {k}")
    rows, cols = x.shape
    if k >= rows:
        vals, idx = torch.sort(x, dim=0, descending=True, stable=True)
        return vals, idx
    vals, idx = torch.topk(x, k + 1, dim=0, largest=True, sorted=True)  # (k+1, col)
    tie = vals[k - 1] == vals[k]  # (col,) a tie across the cut: the kept set is ambiguous
    vals, idx = vals[:k], idx[:k]
    order = _lexsort_desc(vals, idx)  # topk's order among equal values is unspecified
    vals, idx = torch.gather(vals, 0, order), torch.gather(idx, 0, order)
    if bool(tie.any()):
        tcols = tie.nonzero().squeeze(1)
        tv, ti = torch.sort(x[:, tcols], dim=0, descending=True, stable=True)
        vals[:, tcols] = tv[:k]
        idx[:, tcols] = ti[:k]
    return vals, idx


def merge_topk(values_a: Float[Tensor, "ka col"], index_a: Int[Tensor, "ka col"],
               values_b: Float[Tensor, "kb col"], index_b: Int[Tensor, "kb col"], k: int,
               ) -> tuple[Float[Tensor, "k col"], Int[Tensor, "k col"], Int[Tensor, "k col"]]:
    """Merge two per-column candidate lists into the top ``k`` (value descending, then index ascending).

    Returns ``(values, index, source)``; ``source`` is each kept entry's row in ``cat([a, b])``, which
    lets the caller carry along per-entry payloads (such as the activations around the token).
    """
    if k <= 0:
        raise ValueError(f"top-k needs k >= 1; got {k}")
    values = torch.cat([values_a, values_b], dim=0)
    index = torch.cat([index_a, index_b], dim=0)
    source = _lexsort_desc(values, index)[:k]
    return torch.gather(values, 0, source), torch.gather(index, 0, source), source


def _group_bound(x: Float[Tensor, "row col"], k: int) -> Tensor | None:
    """Per column a value that at least ``k`` entries of ``x`` reach (None when ``x`` is too short).

    The rows are cut into at least ``4 k`` groups; the k-th largest group maximum is such a value (the k
    groups' maxima are themselves entries), so every entry of the column's top-k is >= it. On activations
    only a few entries per column beyond the top-k reach it: a cheap filter for the batches in which the
    running top-k is not yet full or the batch is large against what has been seen.
    """
    rows, cols = x.shape
    size = rows // (BOUND_GROUPS_PER_K * k)
    if size < 2:
        return None
    n_groups = rows // size
    if x.stride(0) == 1 and x.stride(1) == rows:  # the transpose of a contiguous (col, row) batch
        gmax = x.t()[:, :n_groups * size].reshape(cols, n_groups, size).amax(2)  # (col, group)
        return torch.topk(gmax, k, dim=1, sorted=False).values.amin(1)
    gmax = x[:n_groups * size].view(n_groups, size, cols).amax(1)  # (group, col)
    return torch.topk(gmax, k, dim=0, sorted=False).values.amin(0)  # (col,)


def _sortable_desc(values: Tensor) -> Tensor:
    """int64 keys in [0, 2^32) whose ascending order is the float32 ``values``' descending order."""
    b = (values + 0.0).view(torch.int32).long()  # + 0.0: -0.0 becomes +0.0 (they compare equal)
    asc = torch.where(b >= 0, b, b ^ 0x7FFFFFFF)  # two's-complement order == float order
    return 0x7FFFFFFF - asc


def _merge_later(values: Float[Tensor, "k col"], index: Int[Tensor, "k col"], cand_v: Float[Tensor, "d col"],
                 cand_i: Int[Tensor, "d col"], k: int) -> tuple[Tensor, Tensor]:
    """``merge_topk(values, index, cand_v, cand_i, k)[:2]`` when both lists are sorted (value descending,
    then index ascending) and every candidate index is larger than every index in ``index``.

    One stable sort by value then suffices: among equal values the older entries come first in the
    concatenation, and each list is already in index order.
    """
    v = torch.cat([values, cand_v], 0).t().contiguous()  # (col, k + d): sort along the contiguous dim
    i = torch.cat([index, cand_i], 0).t()
    order = torch.sort(v, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.gather(v, 1, order).t().contiguous(), torch.gather(i, 1, order).t().contiguous()


def update_topk(values: Float[Tensor, "k col"], index: Int[Tensor, "k col"], x: Float[Tensor, "row col"],
                row_index: Int[Tensor, " row"], *, max_sparse: float = 0.125, mask_out: Tensor | None = None,
                ) -> tuple[Float[Tensor, "k col"], Int[Tensor, "k col"]]:
    """Merge the rows of ``x`` into a running top-k; row ``r`` of ``x`` has index ``row_index[r]``.

    ``row_index`` must be ascending and larger than every index already in ``index`` (the batch comes
    after everything seen so far). Returns new ``(values, index)``; the inputs are not modified (they are
    handed back as they are when nothing changes). Equal to
    ``merge_topk(values, index, *topk_desc(x, k) with indices mapped, k)[:2]``. Candidates are the entries
    above the column's current k-th value that also reach the batch's group bound (``_group_bound``);
    when more than ``max_sparse`` of the batch's values are candidates, the dense path (``topk_desc``) is
    used. ``mask_out``: optional bool scratch tensor shaped like ``x`` (saves an allocation per call).
    """
    k, cols = values.shape
    rows = x.shape[0]
    if rows == 0:
        return values, index
    # A later entry equal to the current k-th loses the tie: candidates are strictly above it.
    thr = torch.nextafter(values[k - 1], values.new_tensor(math.inf))
    if bool((index[k - 1] == NO_INDEX).any()):  # a column not yet full: only the group bound filters
        # (Once every column is full, its k-th value is the tighter filter: the bound is not computed.)
        bound = _group_bound(x, k) if x.dtype == torch.float32 else None
        if bound is None:
            return _dense_update(values, index, x, row_index, k)
        thr = torch.maximum(thr, bound)
    above = torch.ge(x, thr, out=mask_out) if mask_out is not None else x >= thr
    flat = above.view(-1).nonzero().squeeze(1)  # candidates in row-major order: rows ascending
    n_cand = flat.shape[0]
    if n_cand == 0:
        return values, index
    if n_cand > x.numel() * max_sparse or x.dtype != torch.float32:  # many candidates: dense is cheaper
        return _dense_update(values, index, x, row_index, k)
    r, c = torch.div(flat, cols, rounding_mode="floor"), flat % cols
    vals = x.reshape(-1).index_select(0, flat)
    # One stable sort by (column, value descending); row-major input keeps rows ascending within ties.
    order = torch.sort((c << 32) | _sortable_desc(vals), stable=True).indices
    r, c, vals = r[order], c[order], vals[order]
    counts = torch.bincount(c, minlength=cols)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n_cand, device=x.device) - starts[c]  # rank of each candidate inside its column
    keep = rank < k
    depth = min(k, int(counts.max()))
    ucols = (counts > 0).nonzero().squeeze(1)
    slot = torch.zeros(cols, dtype=torch.long, device=x.device)
    slot[ucols] = torch.arange(ucols.numel(), device=x.device)
    cand_v = torch.full((depth, ucols.numel()), -math.inf, dtype=values.dtype, device=x.device)
    cand_i = torch.full((depth, ucols.numel()), NO_INDEX, dtype=torch.long, device=x.device)
    rk, ck = rank[keep], slot[c[keep]]
    cand_v[rk, ck] = vals[keep]
    cand_i[rk, ck] = row_index[r[keep]]
    v, i = _merge_later(values[:, ucols], index[:, ucols], cand_v, cand_i, k)
    if ucols.numel() == cols:
        return v, i
    out_v, out_i = values.clone(), index.clone()
    out_v[:, ucols] = v
    out_i[:, ucols] = i
    return out_v, out_i


def update_topk_t(values: Float[Tensor, "k col"], index: Int[Tensor, "k col"], xt: Float[Tensor, "col row"],
                  row_index: Int[Tensor, " row"], *, max_sparse: float = 0.125,
                  ) -> tuple[Float[Tensor, "k col"], Int[Tensor, "k col"]]:
    """``update_topk(values, index, xt.t(), row_index)`` from the batch transposed, ``xt`` (col, row) contiguous.

    In this layout the candidates come out of ``nonzero`` grouped by column, rows ascending: each column's
    candidates fill one row of a small (column, depth) matrix in index order, and a single stable sort of
    each column's running list followed by its candidates merges them (no sort over all candidates). A
    caller that transposes the batch anyway (``collect`` does, for the records' contexts) saves that work.
    """
    k, cols = values.shape
    rows = xt.shape[1]
    if rows == 0:
        return values, index
    if xt.dtype != torch.float32 or not xt.is_contiguous():
        return update_topk(values, index, xt.t(), row_index, max_sparse=max_sparse)
    thr = torch.nextafter(values[k - 1], values.new_tensor(math.inf))
    if bool((index[k - 1] == NO_INDEX).any()):  # a column not yet full: only the group bound filters
        bound = _group_bound(xt.t(), k)
        if bound is None:
            return _dense_update(values, index, xt.t(), row_index, k)
        thr = torch.maximum(thr, bound)
    flat = (xt >= thr.unsqueeze(1)).view(-1).nonzero().squeeze(1)  # column-major: rows ascending per column
    n_cand = flat.shape[0]
    if n_cand == 0:
        return values, index
    c = torch.div(flat, rows, rounding_mode="floor")
    counts = torch.bincount(c, minlength=cols)
    depth = int(counts.max())
    if n_cand > xt.numel() * max_sparse or depth > rows * max_sparse:  # ties or early batches: dense
        return _dense_update(values, index, xt.t(), row_index, k)
    ucols = (counts > 0).nonzero().squeeze(1)
    n_u = ucols.numel()
    slot = torch.zeros(cols, dtype=torch.long, device=xt.device)
    slot[ucols] = torch.arange(n_u, device=xt.device)
    starts = torch.cumsum(counts, 0) - counts
    where = slot[c] * depth + (torch.arange(n_cand, device=xt.device) - starts[c])  # (cand,) in (u, depth)
    cand_v = torch.full((n_u * depth,), -math.inf, dtype=values.dtype, device=xt.device)
    cand_i = torch.full((n_u * depth,), NO_INDEX, dtype=torch.long, device=xt.device)
    cand_v.index_copy_(0, where, xt.view(-1).index_select(0, flat))
    cand_i.index_copy_(0, where, row_index.index_select(0, flat - c * rows))
    # One stable sort per column of [running list, candidates in index order] keeps (value desc, index asc).
    v = torch.cat([values.t()[ucols], cand_v.view(n_u, depth)], 1)  # (u, k + depth)
    i = torch.cat([index.t()[ucols], cand_i.view(n_u, depth)], 1)
    order = torch.sort(v, dim=1, descending=True, stable=True).indices[:, :k]
    nv, ni = torch.gather(v, 1, order).t(), torch.gather(i, 1, order).t()
    if n_u == cols:
        return nv.contiguous(), ni.contiguous()
    out_v, out_i = values.clone(), index.clone()
    out_v[:, ucols] = nv
    out_i[:, ucols] = ni
    return out_v, out_i


def _dense_update(values: Tensor, index: Tensor, x: Tensor, row_index: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Every row of ``x`` a candidate: the batch's own top-k (a stable sort for short batches), then merged."""
    if x.shape[0] <= SHORT_BATCH_ROWS:
        # Short batches (the random candidates' keys): one stable sort along the contiguous dimension keeps
        # equal values in row order, exactly the tie rule.
        order = torch.sort(x.t().contiguous(), dim=1, descending=True, stable=True).indices[:, :k].t()
        bv, bi = torch.gather(x, 0, order), order
    else:
        bv, bi = topk_desc(x, k)
    return _merge_later(values, index, bv, row_index[bi], k)


def update_topk_sync_free(values: Float[Tensor, "k col"], index: Int[Tensor, "k col"], x: Float[Tensor, "row col"],
                          row_index: Int[Tensor, " row"]) -> tuple[Float[Tensor, "k col"], Int[Tensor, "k col"]]:
    """``update_topk`` without any host synchronisation (for CUDA): same inputs, same result."""
    k = values.shape[0]
    if x.shape[0] == 0:
        return values, index
    # A stable descending sort keeps equal values in row order: exactly the tie rule, no fallback needed.
    bv, bi = torch.sort(x, dim=0, descending=True, stable=True)
    v, i, _ = merge_topk(values, index, bv[:k], row_index[bi[:k]], k)
    return v, i


# ---- references -------------------------------------------------------------------------------------


def topk_desc_reference(x: Float[Tensor, "row col"], k: int) -> tuple[Tensor, Tensor]:
    """Plain per-column loop equivalent of ``topk_desc``."""
    rows, cols = x.shape
    kk = min(k, rows)
    vals = torch.empty(kk, cols, dtype=x.dtype)
    idx = torch.empty(kk, cols, dtype=torch.long)
    for c in range(cols):
        col = x[:, c].tolist()
        order = sorted(range(rows), key=lambda r: (-col[r], r))[:kk]
        for j, r in enumerate(order):
            vals[j, c] = col[r]
            idx[j, c] = r
    return vals, idx


def merge_topk_reference(values_a: Tensor, index_a: Tensor, values_b: Tensor, index_b: Tensor,
                         k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Plain per-column loop equivalent of ``merge_topk``."""
    values = torch.cat([values_a, values_b], dim=0)
    index = torch.cat([index_a, index_b], dim=0)
    n, cols = values.shape
    kk = min(k, n)
    out_v = torch.empty(kk, cols, dtype=values.dtype)
    out_i = torch.empty(kk, cols, dtype=torch.long)
    out_s = torch.empty(kk, cols, dtype=torch.long)
    for c in range(cols):
        order = sorted(range(n), key=lambda r: (-float(values[r, c]), int(index[r, c])))[:kk]
        for j, r in enumerate(order):
            out_v[j, c], out_i[j, c], out_s[j, c] = values[r, c], index[r, c], r
    return out_v, out_i, out_s
