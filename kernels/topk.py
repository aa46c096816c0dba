"""Exact per-column top-k and top-k merging: the hot path of activation collection (SNIP step 1).

For every neuron (a column) collection keeps the k largest activations seen so far (rows are token
positions). Each batch of activations ``[tokens, neurons]`` is reduced to its own top-k, then merged with
the running top-k. Ties are broken by the lower index (the earlier token), so the result does not depend
on how the tokens were cut into batches; this is what lets a resumed run equal an uninterrupted one.

``update_topk`` is the per-batch hot path. ``torch.topk`` over a ``[1024, 1536]`` batch costs about as much
as one of the layer's matmuls on CPU, so once every column holds k entries it keeps only the batch values
strictly above the column's current k-th value (a later token that merely ties it loses the tie), which
after the first batches is a handful per column, and merges those. ``topk_desc`` / ``merge_topk`` are the
vectorised building blocks (``torch.topk`` with an exact fallback for columns whose tie straddles the cut);
``topk_desc_reference`` / ``merge_topk_reference`` are plain per-column loops that define the expected
result.

On an accelerator every data-dependent branch above (``nonzero``, ``.any()``, ``unique``) waits for the
device. ``update_topk_sync_free`` gives the same result with a fixed sequence of kernels and no host
sync: a stable sort of the batch (exact tie order) and a merge; that is what collection uses off the CPU.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

NO_INDEX = torch.iinfo(torch.long).max
"""Index of an empty slot (sorts after every real index)."""


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


def update_topk(values: Float[Tensor, "k col"], index: Int[Tensor, "k col"], x: Float[Tensor, "row col"],
                row_index: Int[Tensor, " row"], *, max_sparse: float = 0.125, mask_out: Tensor | None = None,
                ) -> tuple[Float[Tensor, "k col"], Int[Tensor, "k col"]]:
    """Merge the rows of ``x`` into a running top-k; row ``r`` of ``x`` has index ``row_index[r]``.

    ``row_index`` must be ascending and larger than every index already in ``index`` (the batch comes
    after everything seen so far). Returns new ``(values, index)``; the inputs are not modified. Equal to
    ``merge_topk(values, index, *topk_desc(x, k) with indices mapped, k)[:2]``. When more than
    ``max_sparse`` of the batch's values pass the threshold, the dense path (``topk_desc``) is used.
    ``mask_out``: optional bool scratch tensor shaped like ``x`` (saves an allocation per call).
    """
    k, cols = values.shape
    if x.shape[0] == 0:
        return values, index
    if bool((index[k - 1] == NO_INDEX).any()):  # some column not yet full: every value is a candidate
        bv, bi = topk_desc(x, k)
        v, i, _ = merge_topk(values, index, bv, row_index[bi], k)
        return v, i
    above = torch.gt(x, values[k - 1], out=mask_out) if mask_out is not None else x > values[k - 1]
    nz = above.nonzero()  # (cand, 2) in row-major order: rows ascending
    n_cand = nz.shape[0]
    if n_cand == 0:
        return values, index
    if n_cand > x.numel() * max_sparse:  # many candidates (early batches): the dense path is cheaper
        bv, bi = topk_desc(x, k)
        v, i, _ = merge_topk(values, index, bv, row_index[bi], k)
        return v, i
    rows, cc = nz[:, 0], nz[:, 1]
    vals = x[rows, cc]
    ucols, inv = torch.unique(cc, sorted=True, return_inverse=True)
    # Order candidates by (column, value descending, row ascending): stable sorts, last key first.
    order = torch.sort(vals, descending=True, stable=True).indices
    order = order[torch.sort(inv[order], stable=True).indices]
    counts = torch.bincount(inv, minlength=ucols.numel())
    starts = torch.cumsum(counts, 0) - counts
    g = inv[order]
    rank = torch.arange(n_cand, device=x.device) - starts[g]  # rank of each candidate inside its column
    keep = rank < k
    depth = int(min(k, int(counts.max())))
    cand_v = torch.full((depth, ucols.numel()), -torch.inf, dtype=values.dtype, device=x.device)
    cand_i = torch.full((depth, ucols.numel()), NO_INDEX, dtype=torch.long, device=x.device)
    cand_v[rank[keep], g[keep]] = vals[order[keep]]
    cand_i[rank[keep], g[keep]] = row_index[rows[order[keep]]]
    v, i, _ = merge_topk(values[:, ucols], index[:, ucols], cand_v, cand_i, k)
    out_v, out_i = values.clone(), index.clone()
    out_v[:, ucols] = v
    out_i[:, ucols] = i
    return out_v, out_i


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
