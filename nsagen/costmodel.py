"""The cost model: NSA's index arithmetic, FLOPs and bytes as exact sympy expressions.

Everything here is a function of the sequence length ``T`` and batch ``B`` (or of a query
position ``t``), derived from docs/algorithm.md. ``nsagen bench`` evaluates them to report
achieved TFLOP/s and TB/s against the floors, and ``nsagen info`` prints them. (Launch configs
are pruned by the Target's shared memory and registers, nsagen.configspace; not by this model.)

Counting conventions:

- A multiply-add is 2 FLOPs. Only matrix-product work is counted (scores ``q.k`` and ``p @ v``),
  plus the importance map below; softmax exponentials, gates and masking are not.
- The compressed scores ``q . k_cmp`` are computed once per query and serve both the compression
  branch and the importance pass, so they are counted when either ``cmp`` or ``slc`` is a branch;
  ``p_cmp @ v_cmp`` only when ``cmp`` is.
- The importance map (``p_slc = p_cmp @ W``) costs 2 FLOPs for each of the at most
  ``1 + ceil((l/d - 1) / (l'/d))`` selection blocks a compressed token's window can touch.
- Compression itself (``phi``) is not counted: mean pooling is negligible and learned compression
  is a GEMM in the PyTorch module, outside the kernels.
- The backward pass is 2.5x the forward attention-matmul FLOPs, FlashAttention's convention
  (5 matmuls against 2; exact when ``Dk == Dv``). Selection is not differentiated, so a compressed
  score used only for importance adds nothing to the backward.
- Bytes are compulsory HBM traffic: every input read once, every output written once, in the
  spec's dtype; block indices are int32 (written by the top-n pass, read by the selection pass)
  and the backward reads one float32 log-sum-exp per query head and branch.
- Selected keys per query are exact when ``selection.local >= 1`` (the query's own block is then
  always selected, so the count does not depend on the scores); otherwise the bound
  ``min(n*l', t + 1)`` is used.
"""
from __future__ import annotations

from typing import Any

import sympy as sp

from .spec import Spec
from .target import Target

T = sp.Symbol("T", integer=True, positive=True)
"""Sequence length (prefill) or cache length (decode)."""
B = sp.Symbol("B", integer=True, positive=True)
"""Batch size."""
t = sp.Symbol("t", integer=True, nonnegative=True)
"""Query position, 0-indexed."""
W = sp.Symbol("W", integer=True, positive=True)
"""Ranks of a context-parallel group."""
i = sp.Symbol("i", integer=True)
"""Compressed token index."""
j = sp.Symbol("j", integer=True, nonnegative=True)
"""Selection block index."""

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
INDEX_BYTES = 4   # int32 block indices
LSE_BYTES = 4     # float32 log-sum-exp saved for the backward
BWD_FACTOR = sp.Rational(5, 2)
_SYMBOLS = {"T": T, "B": B, "t": t, "W": W}


# ---------------------------------------------------------------------------- index arithmetic
def num_cmp_expr(spec: Spec, seq_len: sp.Expr = T) -> sp.Expr:
    """Nc(T) = floor((T - l) / d) + 1 compressed tokens, 0 when T < l."""
    return sp.Max(0, sp.floor((seq_len - spec.cmp_block) / sp.Integer(spec.cmp_stride)) + 1)


def num_blocks_expr(spec: Spec, seq_len: sp.Expr = T) -> sp.Expr:
    """Selection blocks covering T tokens: ceil(T / l')."""
    return sp.ceiling(seq_len / sp.Integer(spec.slc_block))


def cmp_visible(spec: Spec, pos: sp.Expr = t) -> sp.Expr:
    """Compressed tokens query ``pos`` sees: all i with i*d + l - 1 <= pos, i.e. Nc(pos + 1)."""
    return sp.Max(0, sp.floor((pos - spec.cmp_block + 1) / sp.Integer(spec.cmp_stride)) + 1)


def slc_visible(spec: Spec, pos: sp.Expr = t) -> sp.Expr:
    """Tokens of the selected blocks at or before query ``pos``.

    Exact when selection.local >= 1: while jt + 1 <= n every token 0..pos is selected; later the
    query's own block contributes pos mod l' + 1 tokens and n - 1 earlier blocks are whole.
    Otherwise the bound min(n*l', pos + 1).
    """
    n, lb = spec.slc_count, spec.slc_block
    if spec.slc_local >= 1:
        return sp.Min(pos + 1, (n - 1) * lb + sp.Mod(pos, lb) + 1)
    return sp.Min(pos + 1, n * lb)


def win_visible(spec: Spec, pos: sp.Expr = t) -> sp.Expr:
    """Sliding-window keys of query ``pos``: max(0, pos - w + 1) .. pos, i.e. min(w, pos + 1)."""
    if spec.window is None:
        return sp.Integer(0)
    return sp.Min(spec.window, pos + 1)


def keys_per_query(spec: Spec, pos: sp.Expr = t) -> dict[str, sp.Expr]:
    """Keys each present branch attends to for query ``pos``, plus their ``total``."""
    fns = {"cmp": cmp_visible, "slc": slc_visible, "win": win_visible}
    out = {b: fns[b](spec, pos) for b in spec.branches}
    out["total"] = sp.Add(*out.values())
    return out


def block_weight_expr(spec: Spec) -> sp.Expr:
    """W[i, j] = |window_i ∩ block_j| / d as an expression of the symbols ``i`` and ``j``.

    In stride-sized chunks window i covers chunks i .. i + l/d - 1 and block j covers
    j*l'/d .. (j+1)*l'/d - 1; each shared chunk contributes one.
    """
    r1 = spec.cmp_block // spec.cmp_stride
    r2 = spec.slc_block // spec.cmp_stride
    return sp.Max(0, sp.Min(i + r1 - 1, (j + 1) * r2 - 1) - sp.Max(i, j * r2) + 1)


def block_weight_span(spec: Spec) -> tuple[sp.Expr, sp.Expr]:
    """First and last compressed token (in ``j``) whose window overlaps selection block ``j``."""
    r1 = spec.cmp_block // spec.cmp_stride
    r2 = spec.slc_block // spec.cmp_stride
    return j * r2 - r1 + 1, (j + 1) * r2 - 1


def block_weights(spec: Spec) -> sp.Matrix:
    """The weights mapping compressed tokens onto one selection block, as a 1 x k integer Matrix.

    Entry m is W[first + m, j] for the tokens first .. last of :func:`block_weight_span`;
    e.g. (1, 2, 2, 2, 1) on tokens 4j-1 .. 4j+3 for l=32, d=16, l'=64, and (1,) for l = d = l'.
    Evaluated at a block far enough from the start that every overlapping token exists.
    """
    first, last = block_weight_span(spec)
    j0 = spec.cmp_block // spec.cmp_stride  # any j with first >= 0
    lo, hi = int(first.subs(j, j0)), int(last.subs(j, j0))
    w = block_weight_expr(spec).subs(j, j0)
    return sp.Matrix([[int(w.subs(i, k)) for k in range(lo, hi + 1)]])


def blocks_per_cmp_token(spec: Spec) -> int:
    """Most selection blocks one compressed token's window can overlap: 1 + ceil((l/d-1)/(l'/d))."""
    r1 = spec.cmp_block // spec.cmp_stride
    r2 = spec.slc_block // spec.cmp_stride
    return 1 + -(-(r1 - 1) // r2)


# ---------------------------------------------------------------------------- causal sums
def _floor_sum(count: sp.Expr, m: int) -> sp.Expr:
    """sum_{u=0}^{count-1} floor(u / m) in closed form (count >= 0)."""
    q = sp.floor(count / sp.Integer(m))
    r = count - m * q
    return m * q * (q - 1) / 2 + r * q


def causal_keys(spec: Spec, branch: str, seq_len: sp.Expr = T) -> sp.Expr:
    """Sum over queries t = 0 .. T-1 of the keys ``branch`` attends to, in closed form."""
    if branch == "cmp":
        # sum_{u=0}^{N-1} (floor(u/d) + 1) with u = t - l + 1
        count = sp.Max(0, seq_len - spec.cmp_block + 1)
        return count + _floor_sum(count, spec.cmp_stride)
    if branch == "slc":
        n, lb = spec.slc_count, spec.slc_block
        full = sp.Min(seq_len, n * lb)           # queries that see every earlier token
        rest = seq_len - full
        head = full * (full + 1) / 2
        if spec.slc_local < 1:
            return head + rest * n * lb
        # rest starts at a block boundary, so sum of (t mod l') over it is a floor-sum identity
        q = sp.floor(rest / sp.Integer(lb))
        r = rest - lb * q
        mods = q * lb * (lb - 1) / 2 + r * (r - 1) / 2
        return head + rest * ((n - 1) * lb + 1) + mods
    if branch == "win":
        if spec.window is None:
            return sp.Integer(0)
        m = sp.Min(seq_len, spec.window)
        return m * (m + 1) / 2 + (seq_len - m) * spec.window
    raise ValueError(f"unknown branch {branch!r}; one of cmp, slc, win")


# ---------------------------------------------------------------------------- FLOPs and bytes
def _elem(spec: Spec) -> int:
    return DTYPE_BYTES[spec.dtype]


def _uses_cmp_scores(spec: Spec) -> bool:
    return spec.has("cmp") or spec.has("slc")


def _flops(spec: Spec, keys: dict[str, sp.Expr], with_importance: bool) -> sp.Expr:
    """FLOPs per query head given the (summed) key counts of each branch."""
    dk, dv = spec.dim_qk, spec.dim_v
    f = sp.Integer(0)
    if _uses_cmp_scores(spec):
        f += 2 * dk * keys["cmp"]
    if spec.has("cmp"):
        f += 2 * dv * keys["cmp"]
    if spec.has("slc"):
        if with_importance:
            f += 2 * blocks_per_cmp_token(spec) * keys["cmp"]
        f += 2 * (dk + dv) * keys["slc"]
    if spec.has("win"):
        f += 2 * (dk + dv) * keys["win"]
    return f


def _summed_keys(spec: Spec, seq_len: sp.Expr) -> dict[str, sp.Expr]:
    return {b: causal_keys(spec, b, seq_len) for b in ("cmp", "slc", "win")}


def key_sum(branch: str) -> sp.Expr:
    """The unevaluated causal key sum K_<branch>(T), to print FLOPs compactly."""
    return sp.Function(f"K_{branch}")(T)


def _keys_for(spec: Spec, compact: bool) -> dict[str, sp.Expr]:
    if compact:
        return {b: key_sum(b) for b in ("cmp", "slc", "win")}
    return _summed_keys(spec, T)


def fwd_flops(spec: Spec, compact: bool = False) -> sp.Expr:
    """Prefill forward FLOPs of B sequences of length T (attention matmuls + importance map).

    With ``compact`` the causal key sums stay unevaluated as K_cmp(T), K_slc(T), K_win(T)
    (closed forms: :func:`causal_keys`).
    """
    return B * spec.heads_q * _flops(spec, _keys_for(spec, compact), with_importance=True)


def bwd_flops(spec: Spec, compact: bool = False) -> sp.Expr:
    """Backward FLOPs: 2.5x the forward attention matmuls of the differentiated branches."""
    keys = _keys_for(spec, compact)
    dk, dv = spec.dim_qk, spec.dim_v
    f = sp.Integer(0)
    for b in spec.branches:
        f += 2 * (dk + dv) * keys[b]
    return BWD_FACTOR * B * spec.heads_q * f


def dense_fwd_flops(spec: Spec) -> sp.Expr:
    """Forward FLOPs of full causal attention with the same heads, for comparison."""
    return B * spec.heads_q * 2 * (spec.dim_qk + spec.dim_v) * T * (T + 1) / 2


def _kv_sets(spec: Spec) -> int:
    """How many full-length K/V pairs the kernels read (k_win, v_win too when separate)."""
    if not (spec.has("slc") or spec.has("win")):
        return 0
    return 2 if spec.kv_per_branch == "separate" and spec.has("slc") and spec.has("win") else 1


def _tensor_elems(spec: Spec, seq_len: sp.Expr) -> dict[str, sp.Expr]:
    """Elements of each tensor the op touches, per sequence."""
    hq, h, dk, dv = spec.heads_q, spec.heads_kv, spec.dim_qk, spec.dim_v
    nc = num_cmp_expr(spec, seq_len)
    return {
        "q": seq_len * hq * dk,
        "kv": _kv_sets(spec) * seq_len * h * (dk + dv),
        "k_cmp": nc * h * dk if _uses_cmp_scores(spec) else sp.Integer(0),
        "v_cmp": nc * h * dv if spec.has("cmp") else sp.Integer(0),
        "gates": seq_len * hq * 3,
        "o": seq_len * hq * dv,
        "idx": seq_len * h * spec.slc_count if spec.has("slc") else sp.Integer(0),
    }


def fwd_bytes(spec: Spec) -> sp.Expr:
    """Compulsory HBM bytes of the prefill forward: read q, k, v, compressed k/v and gates,
    write o; block indices written once and read once."""
    x = _tensor_elems(spec, T)
    e = _elem(spec)
    io = x["q"] + x["kv"] + x["k_cmp"] + x["v_cmp"] + x["gates"] + x["o"]
    return B * (e * io + 2 * INDEX_BYTES * x["idx"])


def bwd_bytes(spec: Spec) -> sp.Expr:
    """Compulsory HBM bytes of the backward: read the inputs, o, dO, the log-sum-exps and the
    block indices; write one gradient per input."""
    x = _tensor_elems(spec, T)
    e = _elem(spec)
    inputs = x["q"] + x["kv"] + x["k_cmp"] + x["v_cmp"] + x["gates"]
    lse = T * spec.heads_q * len(spec.branches)
    return B * (e * (2 * inputs + 2 * x["o"]) + LSE_BYTES * lse + INDEX_BYTES * x["idx"])


def decode_keys(spec: Spec) -> dict[str, sp.Expr]:
    """Tokens one decode step reads per KV head and branch, cache length T (query at T - 1)."""
    return keys_per_query(spec, T - 1)


def decode_tokens(spec: Spec) -> sp.Expr:
    """Tokens of K/V one decode step reads per KV head: at most Nc + n*l' + w."""
    return decode_keys(spec)["total"]


def decode_flops(spec: Spec) -> sp.Expr:
    """FLOPs of one decode step of B sequences with cache length T."""
    k = keys_per_query(spec, T - 1)
    keys = {b: k.get(b, sp.Integer(0)) for b in ("cmp", "slc", "win")}
    if "cmp" not in spec.branches and spec.has("slc"):
        keys["cmp"] = cmp_visible(spec, T - 1)
    return B * spec.heads_q * _flops(spec, keys, with_importance=True)


def decode_bytes(spec: Spec) -> sp.Expr:
    """Bytes of one decode step: the visible K/V of each branch per KV head, plus q, gates, o."""
    hq, h, dk, dv = spec.heads_q, spec.heads_kv, spec.dim_qk, spec.dim_v
    pos = T - 1
    kv = sp.Integer(0)
    if _uses_cmp_scores(spec):
        kv += cmp_visible(spec, pos) * (dk + (dv if spec.has("cmp") else 0))
    if spec.has("slc"):
        kv += slc_visible(spec, pos) * (dk + dv)
    if spec.has("win"):
        kv += win_visible(spec, pos) * (dk + dv)
    e = _elem(spec)
    return B * (e * (h * kv + hq * (dk + dv + 3)))


def dense_decode_bytes(spec: Spec) -> sp.Expr:
    """Bytes of one dense decode step over the whole cache, for comparison."""
    hq, h, dk, dv = spec.heads_q, spec.heads_kv, spec.dim_qk, spec.dim_v
    return B * _elem(spec) * (h * T * (dk + dv) + hq * (dk + dv))


# ---------------------------------------------------------------------------- evaluation
BLOCK_TILE_BYTES = 64 * 1024   # K and V of one selected block held by a block-outer program


def slc_loop_costs(spec: Spec, target: Target) -> dict[str, float]:
    """Estimated seconds per (token, KV head) of the selected attention in each loop order.

    ``query``: a program per (token, KV head) walks its n blocks; the G heads are the rows of a
    tile padded to 16, so every query head pays n * l' keys of K and V read through L2 (shared
    by the tokens that chose the same blocks) divided by G. ``block``: a program per selected
    block attends every free pick of it; per free pick and head it reads q, writes a partial
    output and its LSE and the merge reads them back, and bucketing reads the picks twice and
    writes and reads one (token, slot) pair: scattered traffic, at the Target's
    scatter_efficiency of its memory bandwidth. The forced blocks (initial and local), shared by
    neighbouring tokens, are attended as dense tiles: one more partial per head. The larger of
    traffic time and tensor-core time counts. ``block`` is infinite when a block's K and V do
    not fit one program's tile (BLOCK_TILE_BYTES)."""
    e = _elem(spec)
    n, lb, G = spec.slc_count, spec.slc_block, spec.group
    nf = n - spec.slc_initial - spec.slc_local
    dk, dv = spec.dim_qk, spec.dim_v
    l2 = target.l2_bandwidth or 2 * target.mem_bandwidth
    flops = target.bf16_flops if e == 2 else target.bf16_flops / 16
    rows = max(16, G)
    query = max(n * lb * (dk + dv) * e / l2, 2 * rows * n * lb * (dk + dv) / flops)
    scattered = target.scatter_efficiency * target.mem_bandwidth
    partial = G * ((dk + 2 * dv) * e + 8)        # per head: q read, partial written and read
    block = max((nf * (partial + 24) + partial) / scattered, 2 * G * n * lb * (dk + dv) / flops)
    if lb * (dk + dv) * e > BLOCK_TILE_BYTES:
        block = float("inf")
    return {"query": query, "block": block}


# ---------------------------------------------------------------------------- context parallel
def cp_bytes(spec: Spec) -> dict[str, sp.Expr]:
    """Bytes each of W ranks receives in one layer's training step over B sequences of T
    tokens split zig-zag across the ranks (all-gather-KV context parallelism): the forward's
    all-gather of k, v (the window's own k, v too; a learned compression's k_cmp, v_cmp) and
    the backward's reduce-scatter of their gradients, both in the spec's dtype."""
    x = _tensor_elems(spec, T)
    kv = x["kv"]
    if spec.learned_compression and _uses_cmp_scores(spec):
        kv = kv + x["k_cmp"] + x["v_cmp"]
    moved = B * (W - 1) / W * _elem(spec) * kv
    return {"all_gather": moved, "reduce_scatter": moved}


def cp_memory_bytes(spec: Spec) -> sp.Expr:
    """What one layer keeps per rank between its forward and backward under all-gather-KV
    context parallelism: its share of q, gates, o, the per-branch outputs and LSEs and the
    block indices, and the gathered k, v and compressed k/v of the whole sequence."""
    x = _tensor_elems(spec, T)
    e = _elem(spec)
    local = (x["q"] + x["gates"] + (1 + len(spec.branches)) * x["o"]) * e \
        + LSE_BYTES * T * spec.heads_q * len(spec.branches) + INDEX_BYTES * x["idx"]
    full = (x["kv"] + x["k_cmp"] + x["v_cmp"]) * e
    return B * (local / W + full)


def evaluate(expr: sp.Expr, T: int | None = None, B: int | None = None,
             t: int | None = None, W: int | None = None) -> int | float:
    """Substitute concrete values for T, B, t and W; an int when the result is integral, else a
    float."""
    given = {"T": T, "B": B, "t": t, "W": W}
    subs = {_SYMBOLS[name]: sp.Integer(val) for name, val in given.items() if val is not None}
    v = sp.sympify(expr).subs(subs)
    if not v.is_number:
        raise ValueError(f"free symbols remain in {v}: give values for "
                         f"{', '.join(sorted(map(str, v.free_symbols)))}")
    return int(v) if v.is_Integer else float(v)


def summary(spec: Spec, seq_len: int, batch: int = 1) -> dict[str, Any]:
    """Derived sizes and cost-model figures of one layer at one sequence length and batch."""
    ev = {"T": seq_len, "B": batch}
    kpq = {b: evaluate(e, t=seq_len - 1) for b, e in keys_per_query(spec).items()}
    tokens = evaluate(decode_tokens(spec), **ev)
    fwd = evaluate(fwd_flops(spec), **ev)
    dense = evaluate(dense_fwd_flops(spec), **ev)
    return {
        "seq_len": seq_len,
        "batch": batch,
        "num_cmp": evaluate(num_cmp_expr(spec), T=seq_len),
        "num_blocks": evaluate(num_blocks_expr(spec), T=seq_len),
        "keys_per_query_last": kpq,
        "fwd_flops": fwd,
        "fwd_bytes": evaluate(fwd_bytes(spec), **ev),
        "bwd_flops": evaluate(bwd_flops(spec), **ev),
        "bwd_bytes": evaluate(bwd_bytes(spec), **ev),
        "dense_fwd_flops": dense,
        "fwd_flops_fraction_of_dense": fwd / dense,
        "decode_tokens_per_kv_head": tokens,
        "decode_flops": evaluate(decode_flops(spec), **ev),
        "decode_bytes": evaluate(decode_bytes(spec), **ev),
        "dense_decode_bytes": evaluate(dense_decode_bytes(spec), **ev),
        "decode_speedup_bound": seq_len / tokens,
    }
