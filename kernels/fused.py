"""One-pass CPU kernels (numba) that reduce a batch of activations for collection (SNIP step 1).

On the CPU the torch path of ``snip_lens.collect`` reads each ``[tokens, neurons]`` batch many times: one
pass per statistic, a comparison and a ``nonzero`` for the top-k candidates, a transposed copy for the
contexts, and a dozen small operators on the candidates. ``reduce_batch`` does all of it in one pass over
the batch in its own row-major layout, window by window:

- per column (neuron) the shifted sums of the statistics (float32 over row chunks, added in float64, then
  merged with Chan's formula: the arithmetic of ``_State.update_stats``);
- the exact top-k: a row whose values reach any column's threshold (strictly above the column's current
  k-th value, so a later token that ties it loses; and at least the batch's group bound while the list is
  not full, ``group_bound`` = ``kernels.topk._group_bound``) is merged value by value, in row order, into
  that column's running list (values descending, ties by the lower index, as ``kernels.topk`` keeps them);
  the threshold rises as the list improves, so few values beyond the new entries are ever touched;
- each rank of a list carries a storage slot; a new entry takes the slot of the one it evicts, and at the
  end of each window the entries it brought in get their context written into their slots while the
  window's rows are still in cache (an entry evicted later hands its slot on, and the newcomer's context
  overwrites it at the end of its own window);
- the random candidates (seeded keys) are merged the same way (``merge_rows``) and their contexts written
  with the window's.

Exactness: the lists equal ``kernels.topk.update_topk`` (and so ``merge_topk_reference`` over
``topk_desc_reference``), whatever the batch cut; statistics equal the torch path's within float32
rounding of the chunk sums. Rows marked ``skip`` (a prepended BOS) are in no statistic and no list, and
read as ``-inf`` in a context (the torch path sets them to ``-inf``; the records turn that into NaN).
The kernels walk one column's list at a time, so the collector stores those (rank, column) arrays column
by column (``_State._relayout``); any layout gives the same result.

``AVAILABLE`` is False when numba cannot be imported: the collector then keeps the torch path (also used
off the CPU). Compiled on first use (a few seconds), cached on disk (``cache=True``), GIL released.
"""

from __future__ import annotations

import numpy as np

try:  # numba is a dependency, but the collector keeps a torch path for platforms without a wheel
    from numba import njit
    AVAILABLE = True
except ImportError:  # pragma: no cover - exercised only where numba is missing
    AVAILABLE = False

    def njit(*args, **kwargs):  # type: ignore[no-redef]
        """Stand-in decorator: the plain functions stay importable (and slow) without numba."""
        if args and callable(args[0]):
            return args[0]
        return lambda f: f

NO_INDEX = np.iinfo(np.int64).max
"""Index of an empty slot (as ``kernels.topk.NO_INDEX``)."""
BOUND_GROUPS_PER_K = 4
"""As ``kernels.topk.BOUND_GROUPS_PER_K``: at least this many row groups per top-k entry."""
TILE = 16
"""Columns per block of the context copies (one 64-byte cache line of float32)."""


@njit(cache=True, nogil=True)
def _threshold(kth, bound):
    """Smallest float32 a candidate may have: strictly above the k-th value and at least the bound."""
    t = np.nextafter(kth, np.float32(np.inf))
    return t if t > bound else bound


@njit(cache=True, nogil=True)
def group_bound(x, skip, k, out):
    """Per column of ``x`` (rows, cols) a value at least ``k`` of its entries reach; False when too short.

    Exactly ``kernels.topk._group_bound`` on ``x`` with the ``skip`` rows set to ``-inf``: the k-th largest
    maximum of ``rows // size`` groups of ``size = rows // (4 k)`` consecutive rows.
    """
    rows, cols = x.shape
    size = rows // (BOUND_GROUPS_PER_K * k)
    if size < 2:
        return False
    n_groups = rows // size
    gmax = np.full((n_groups, cols), -np.inf, dtype=np.float32)
    for g in range(n_groups):
        for r in range(g * size, (g + 1) * size):
            if skip[r]:
                continue
            for j in range(cols):
                v = x[r, j]
                if v > gmax[g, j]:
                    gmax[g, j] = v
    # The k-th largest group maximum of every column (duplicates counted): k rounds that each take out
    # one largest value per column, all columns at once (a loop over columns that vectorises).
    best = np.empty(cols, dtype=np.float32)
    arg = np.zeros(cols, dtype=np.int64)
    for _ in range(k):
        for j in range(cols):
            best[j] = -np.inf
            arg[j] = 0
        for g in range(n_groups):
            for j in range(cols):
                v = gmax[g, j]
                if v > best[j]:
                    best[j] = v
                    arg[j] = g
        for j in range(cols):
            gmax[arg[j], j] = -np.inf
    for j in range(cols):
        out[j] = best[j]
    return True


@njit(cache=True, nogil=True)
def _insert(values, index, slots, fill, j, v, rid):
    """Merge value ``v`` of index ``rid`` (larger than every index in the list) into column ``j``'s list.

    The caller checked that ``v`` is above the column's k-th value: it enters after every entry >= it
    (those have lower indices), the last entry drops out and hands its storage slot to the new one.
    ``fill[j]`` counts the column's filled entries (the empty ones, -inf, are all at the end).
    """
    k = values.shape[0]
    p = fill[j] if fill[j] < k else k - 1  # the first empty entry, or the last one
    s = slots[p, j]
    while p > 0 and values[p - 1, j] < v:
        values[p, j] = values[p - 1, j]
        index[p, j] = index[p - 1, j]
        slots[p, j] = slots[p - 1, j]
        p -= 1
    values[p, j] = v
    index[p, j] = rid
    slots[p, j] = s
    if fill[j] < k:
        fill[j] += 1


@njit(cache=True, nogil=True)
def _fill(index):
    """Filled entries of every column's list (those with an index; the empty ones are at the end)."""
    k, cols = index.shape
    fill = np.full(cols, k, dtype=np.int64)
    for j in range(cols):
        if index[k - 1, j] == NO_INDEX:
            n = 0
            while n < k and index[n, j] != NO_INDEX:
                n += 1
            fill[j] = n
    return fill


@njit(cache=True, nogil=True)
def _merge_row(xr, hits, cols, rid, thr, bound, values, index, slots, fill, seen, mark):
    """Merge the entries of row ``xr`` flagged in ``hits`` (uint8, zero-padded to whole uint64 words).

    Every flagged value is >= its column's threshold ``thr``, which is raised after the insertion; the
    column's ``seen`` is set to ``mark``.
    """
    k = values.shape[0]
    words = hits.view(np.uint64)
    for w in range(words.shape[0]):
        if words[w] == 0:
            continue
        for j in range(w * 8, min(w * 8 + 8, cols)):
            if hits[j] == 0:
                continue
            _insert(values, index, slots, fill, j, xr[j], rid)
            thr[j] = _threshold(values[k - 1, j], bound[j])
            seen[j] = mark


@njit(cache=True, nogil=True)
def _write_context(x, skip, row, j, s, n_pos, before, after, store):
    """``store[s, j]`` = column ``j``'s activations from ``before`` rows before ``row`` to ``after`` after,
    inside its window of ``n_pos`` rows: NaN beyond the window, ``-inf`` on a ``skip`` row."""
    pos = row % n_pos
    w0 = row - pos
    for c in range(before + 1 + after):
        q = pos - before + c
        if q < 0 or q >= n_pos:
            store[s, j, c] = np.float32(np.nan)
        elif skip[w0 + q]:
            store[s, j, c] = np.float32(-np.inf)
        else:
            store[s, j, c] = x[w0 + q, j]


@njit(cache=True, nogil=True)
def merge_rows(values, index, slots, keys, row_index):
    """Merge every row of ``keys`` (rows, cols) into the running top-k ``values`` / ``index`` / ``slots``
    (k, cols) in place; row ``r`` has index ``row_index[r]`` (ascending, larger than every index already
    there). No statistics, no bound: ``kernels.topk.update_topk`` for short batches (the random keys)."""
    rows, cols = keys.shape
    k = values.shape[0]
    bound = np.full(cols, -np.inf, dtype=np.float32)
    thr = np.empty(cols, dtype=np.float32)
    for j in range(cols):
        thr[j] = _threshold(values[k - 1, j], bound[j])
    hits = np.zeros((cols + 7) // 8 * 8, dtype=np.uint8)
    seen = np.zeros(cols, dtype=np.int64)
    fill = _fill(index)
    for r in range(rows):
        kr = keys[r]
        any_hit = np.uint8(0)
        for j in range(cols):
            h = np.uint8(kr[j] >= thr[j])
            hits[j] = h
            any_hit |= h
        if any_hit:
            _merge_row(kr, hits, cols, row_index[r], thr, bound, values, index, slots, fill, seen, 1)


@njit(cache=True, nogil=True)
def reduce_batch(x, skip, n_pos, before, after, n_seen, mean, m2, sum_abs, n_pos_count, mx, records, values, index,
                 slots, bound, base, store, rkeys, rrows, rvalues, rindex, rslots, rvstore, rctx, chunk=128,
                 tile_min=16):
    """One pass over an activation batch ``x`` (rows, cols) float32: statistics, top-k records, contexts.

    Statistics, over the rows not in ``skip``: the running float64 (cols,) ``mean``, ``m2`` (sum of squared
    deviations), ``sum_abs``, ``n_pos_count`` (count > 0) and ``mx`` of ``n_seen`` earlier tokens are updated
    in place, as ``snip_lens.collect._State.update_stats`` does: sums of ``x - shift`` (the running mean, or
    the first counted row for the first batch) in float32 over ``chunk`` rows, added in float64, the batch
    then merged with Chan's formula.

    With ``records``: every entry is merged into the running top-k ``values`` / ``index`` / ``slots``
    (k, cols), in place; row ``r`` has index ``base + r`` (larger than every index already there); ``bound``
    (cols,) float32 is the group bound (``-inf`` where none). ``store`` (slot, cols, ctx) receives the
    context of every entry new from this batch (``_write_context``; the rows are whole windows of ``n_pos``). The
    random candidates ``rkeys`` (cand, cols) at rows ``rrows`` (ascending, inside the batch) are merged by
    key into ``rvalues`` / ``rindex`` / ``rslots``; new ones get their activation in ``rvstore`` (slot, cols)
    and their context in ``rctx`` (slot, cols, ctx).

    Contexts are written at the end of each window, while its rows are still in cache, for the entries that
    window brought in: one evicted later in the batch hands its slot to the entry that evicts it, whose
    context overwrites it at the end of its own window. Returns the number of rows counted.
    """
    rows, cols = x.shape
    if rows % n_pos:
        raise ValueError("reduce_batch needs whole windows: rows must be a multiple of n_pos")
    k = values.shape[0]
    thr = np.empty(cols, dtype=np.float32)
    for j in range(cols):
        thr[j] = _threshold(values[k - 1, j], bound[j]) if records else np.float32(np.inf)
    # Random candidates first (their keys do not depend on x): the new ones, grouped by window.
    n_win = (rows + n_pos - 1) // n_pos
    win_start = np.zeros(n_win + 1, dtype=np.int64)
    r_row = np.empty(0, dtype=np.int64)
    r_col = np.empty(0, dtype=np.int64)
    r_slot = np.empty(0, dtype=np.int64)
    if records and rkeys.shape[0] > 0:
        merge_rows(rvalues, rindex, rslots, rkeys, rrows + base)
        kr = rindex.shape[0]
        n_new = 0
        for j in range(cols):
            for p in range(kr):
                i = rindex[p, j]
                if i >= base and i != NO_INDEX:
                    win_start[(i - base) // n_pos + 1] += 1
                    n_new += 1
        for w in range(n_win):
            win_start[w + 1] += win_start[w]
        next_e = win_start[:n_win].copy()
        r_row = np.empty(n_new, dtype=np.int64)
        r_col = np.empty(n_new, dtype=np.int64)
        r_slot = np.empty(n_new, dtype=np.int64)
        for j in range(cols):
            for p in range(kr):
                i = rindex[p, j]
                if i >= base and i != NO_INDEX:
                    w = (i - base) // n_pos
                    e = next_e[w]
                    next_e[w] += 1
                    r_row[e], r_col[e], r_slot[e] = i - base, j, rslots[p, j]
    sh = np.zeros(cols, dtype=np.float32)
    if n_seen > 0:
        for j in range(cols):
            sh[j] = mean[j]
    else:
        for r in range(rows):
            if not skip[r]:
                for j in range(cols):
                    sh[j] = x[r, j]
                break
    c1 = np.zeros(cols, dtype=np.float32)
    c2 = np.zeros(cols, dtype=np.float32)
    ca = np.zeros(cols, dtype=np.float32)
    cp = np.zeros(cols, dtype=np.float32)
    cm = np.full(cols, -np.inf, dtype=np.float32)
    s1 = np.zeros(cols)
    s2 = np.zeros(cols)
    sa = np.zeros(cols)
    sp = np.zeros(cols)
    hits = np.zeros((cols + 7) // 8 * 8, dtype=np.uint8)
    seen = np.full(cols, -1, dtype=np.int64)  # the last window whose rows entered each column's list
    fill = _fill(index)
    ctx = before + 1 + after
    tile = np.full((before + n_pos + after, TILE), np.nan, dtype=np.float32)  # NaN beyond the window's edges
    counted = 0
    in_chunk = 0
    for w in range(n_win):
        w0 = w * n_pos
        w1 = min(w0 + n_pos, rows)
        for r in range(w0, w1):
            if not skip[r]:
                counted += 1
                in_chunk += 1
                xr = x[r]
                any_hit = np.uint8(0)
                for j in range(cols):  # vectorised: no branch, every store unconditional
                    v = xr[j]
                    d = v - sh[j]
                    c1[j] += d
                    c2[j] += d * d
                    ca[j] += abs(v)
                    cp[j] += np.float32(v > 0)
                    m = cm[j]
                    cm[j] = v if v > m else m
                    h = np.uint8(v >= thr[j])
                    hits[j] = h
                    any_hit |= h
                if any_hit and records:
                    _merge_row(xr, hits, cols, base + r, thr, bound, values, index, slots, fill, seen, w)
            if in_chunk == chunk or r == rows - 1:
                for j in range(cols):
                    s1[j] += c1[j]
                    s2[j] += c2[j]
                    sa[j] += ca[j]
                    sp[j] += cp[j]
                    c1[j] = 0.0
                    c2[j] = 0.0
                    ca[j] = 0.0
                    cp[j] = 0.0
                in_chunk = 0
        if not records:
            continue
        lo, hi = base + w0, base + w1
        for j0 in range(0, cols, TILE):  # entries this window brought in (and still holds), a block of columns
            j1 = min(j0 + TILE, cols)   # at a time: neighbours share the cache lines of the window's rows
            n_e = 0
            for j in range(j0, j1):
                if seen[j] == w:
                    for p in range(k):
                        if lo <= index[p, j] < hi:
                            n_e += 1
            if n_e == 0:
                continue
            if n_e >= tile_min:  # many: copy the block's rows into a small buffer that stays in L1
                for r in range(w1 - w0):
                    if skip[w0 + r]:
                        for jj in range(j1 - j0):
                            tile[before + r, jj] = np.float32(-np.inf)
                    else:
                        for jj in range(j1 - j0):
                            tile[before + r, jj] = x[w0 + r, j0 + jj]
            for j in range(j0, j1):
                if seen[j] != w:
                    continue
                for p in range(k):
                    i = index[p, j]
                    if lo <= i < hi:
                        s = slots[p, j]
                        if n_e >= tile_min:
                            q0 = i - lo
                            for c in range(ctx):
                                store[s, j, c] = tile[q0 + c, j - j0]
                        else:
                            _write_context(x, skip, i - base, j, s, n_pos, before, after, store)
        for e in range(win_start[w], win_start[w + 1]):
            row, j, s = r_row[e], r_col[e], r_slot[e]
            rvstore[s, j] = x[row, j]
            _write_context(x, skip, row, j, s, n_pos, before, after, rctx)
    if counted:
        m_b = np.float64(counted)
        n_t = n_seen + m_b
        for j in range(cols):
            mean_b = np.float64(sh[j]) + s1[j] / m_b
            m2_b = max(s2[j] - s1[j] * s1[j] / m_b, 0.0)
            delta = mean_b - mean[j]
            mean[j] += delta * (m_b / n_t)
            m2[j] += m2_b + delta * delta * (n_seen * m_b / n_t)
            sum_abs[j] += sa[j]
            n_pos_count[j] += sp[j]
            mx[j] = max(mx[j], np.float64(cm[j]))
    return counted


__all__ = ["AVAILABLE", "NO_INDEX", "group_bound", "merge_rows", "reduce_batch"]
