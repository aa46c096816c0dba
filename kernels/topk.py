"""Exact per-column top-k and top-k merging: the hot path of activation collection (SNIP step 1).

For every neuron (a column) collection keeps the k largest activations seen so far (rows are token
positions). Each batch of activations ``[tokens, neurons]`` is reduced to its own top-k, then merged with
the running top-k. Ties are broken by the lower index (the earlier token), so the result does not depend
on how the tokens were cut into batches; this is what lets a resumed run equal an uninterrupted one.

``topk_desc`` / ``merge_topk`` are the fast, vectorised versions (``torch.topk`` over all neurons at once,
with an exact fallback for the rare columns whose tie straddles the cut); ``topk_desc_reference`` /
``merge_topk_reference`` are plain per-column loops that define the expected result.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

NO_INDEX = torch.iinfo(torch.long).max
"""Index of an empty slot (sorts after every real index)."""


def _lexsort_desc(values: Tensor, index: Tensor) -> Tensor:
    """Per column, the permutation ordering rows by value descending, then by index ascending."""
    by_index = torch.sort(index, dim=0, stable=True).indices
    v = torch.gather(values, 0, by_index)
    by_value = torch.sort(v, dim=0, descending=True, stable=True).indices
    return torch.gather(by_index, 0, by_value)


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
