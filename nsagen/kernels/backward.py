"""The backward kernels: the gate/delta prologue and one kernel per branch (dq and dk/dv halves
in each). Each is defined once: template, default launch config (with its reason) and tunable
config space."""
from __future__ import annotations

import itertools

import triton

from ..spec import Spec
from ..target import Target
from .base import (Dims, KernelDef, dkdv_regs, dkdv_smem_bytes, interleave, nearest, regs,
                   smem_bytes, token_rows)
from .signature import (DIMS, HEADS, WARPS, cfg, consts, options, ptrs, scalars, signature,
                        strides, tma_descs, values)



def _bwd_strides(k: str = "k", v: str = "v") -> tuple:
    """The strides every branch's dq and dk/dv halves take (dO's are named as the output's)."""
    return (strides("q", "qt", "qh"), strides(k, "kt", "kh"), strides(v, "vt", "vh"),
            strides("do", "ot", "oh"), strides("g", "gt", "gh"))


_BWD_SCALES = consts(qk_scale="QK_SCALE", sm_scale="SM_SCALE")
_KV_OPTIONS = options(num_warps='cfg["WARPS_KV"]', num_stages='cfg["STAGES_KV"]')


def _gate_launch(spec: Spec, flags: dict) -> dict:
    return dict(main=signature(
        ptrs("do", "ob", "g", "dg=dgates", "delta"), scalars("n_rows"),
        consts(HAS_GATES="gates is not None", DV="DIM_V", BDV="BLOCK_DV"), cfg("BR"),
        options=WARPS))


def _cmp_bwd_launch(spec: Spec, flags: dict) -> dict:
    common = (_BWD_SCALES, HEADS, cfg("GP"), DIMS,
              values(L=spec.cmp_block, STRIDE=spec.cmp_stride),
              consts(HAS_GATES="gates is not None", PREC="prec"))
    return dict(
        dq=signature(
            ptrs("q", "kc", "vc", "g", "do", "lse", "delta", "dq", "tile_tok", "tile_len",
                 "tok_pos=lay.tok_pos", "tok_cstart=lay.tok_cstart", "tok_ncmp=lay.tok_ncmp"),
            tma_descs("kc", "vc", "BC"),
            *_bwd_strides("kc", "vc"), *common, cfg("BT", "BC"), consts(TMA="bool(tma)"),
            options=WARPS),
        dkdv=signature(
            ptrs("q", "kc", "vc", "g", "do", "lse", "delta", "dkc", "dvc", "ctile_row=ct[0]",
                 "ctile_c0=ct[1]", "ctile_qzero=ct[2]", "ctile_len=ct[3]", "ctile_nc=ct[4]",
                 "ctile_qfirst=ct[5]"),
            scalars("q_chunk"), *_bwd_strides("kc", "vc"), *common, cfg("BT=BT_KV", "BC=BC_KV"),
            options=_KV_OPTIONS))


def dkdv_tile(spec: Spec, gp: int, target: Target) -> tuple[dict, int]:
    """The dk/dv step of the compressed and window backward kernels, whose products take the keys
    as rows (_bwd_dkdv_step): (BT_KV, WARPS_KV, STAGES_KV) and the keys per tile. 128 keys (64
    rows for each of two warpgroups) by 64 query rows a step, 3 stages: on an H100 at 64k
    (nsa-d128) the compressed dk/dv took 20.6 ms and the window's 7.5 ms, against 26.5 / 8.8 ms
    with 32-row steps and 41.4 / 13.6 ms with 64 keys by 128 rows (a later run on another H100
    timed these defaults at 21.6 / 10.1 ms; docs/benchmarks.md). 64 keys where the head dims
    pad past 256 together (the two fp32 accumulators would not fit the registers); fewer stages,
    then fewer rows, where a program's shared memory is short."""
    keys, rows, stages = (128 if dkdv_regs(spec, 128, 8) <= 128 else 64), 64, 3
    while dkdv_smem_bytes(spec, rows, keys, stages) > target.smem_per_block:
        if stages > 2:
            stages -= 1
        elif rows > 16:
            rows //= 2
        elif keys > 32:
            keys //= 2
        else:
            break
    return dict(BT_KV=max(1, rows // gp), WARPS_KV=8, STAGES_KV=stages), keys


def _dkdv_space(spec: Spec, default: dict, gp: int, keys_name: str, smem: int) -> list[dict]:
    """The dk/dv half of a backward kernel: query rows a step, keys a tile, warps, stages,
    inside shared memory and with the accumulators leaving room in the registers."""
    out = []
    for rows, keys, nw, ns in itertools.product([32, 64, 128], [64, 128], [4, 8], [2, 3]):
        if (rows >= gp and dkdv_smem_bytes(spec, rows, keys, ns) <= smem
                and dkdv_regs(spec, keys, nw) <= 128):
            out.append(dict(default, BT_KV=rows // gp, **{keys_name: keys}, WARPS_KV=nw,
                            STAGES_KV=ns))
    return nearest(out, default)


def _tiled_space(keys: str):
    """The space of a tiled backward kernel (the compressed or the window branch): its dq half in
    tiles of 64 or 128 head rows by 32 to 128 keys, interleaved with its dk/dv steps; `keys` names
    the dq key-tile parameter (`keys` + "_KV" the dk/dv one)."""
    def space(spec: Spec, default: dict, target: Target, smem: int):
        d = Dims.of(spec)
        dq = [dict(default, BT=bt, **{keys: bk}, num_warps=nw)
              for bt, bk, nw in itertools.product(token_rows(d.gp, 64, 128), [32, 64, 128], [4, 8])
              if smem_bytes(bt * d.gp, bk, d.bdk, d.bdv, 2) <= smem
              and regs(bt * d.gp, bk, d.bdk, d.bdv, nw) <= target.reg_limit]
        return interleave(_dkdv_space(spec, default, d.gp, keys + "_KV", smem),
                          nearest(dq, default)), []
    return space


# ---------------------------------------------------------------------------- mean_compress_bwd
def _mean_bwd_default(spec: Spec, target: Target, why: list) -> dict:
    why.append("backward compress: each key row gathers the gradients of the (at most "
               f"{spec.cmp_block // spec.cmp_stride}) windows that hold it into dk/dv in "
               "place: keys and values in one launch, deterministic")
    return dict(BI=64, num_warps=4)


def _mean_bwd_space(spec: Spec, default: dict, target: Target, smem: int):
    return [dict(default, BI=bi, num_warps=nw)
            for bi, nw in itertools.product([32, 64, 128], [4, 8])], []


def _mean_bwd_launch(spec: Spec, flags: dict) -> dict:
    return dict(main=signature(
        ptrs("dkc", "dvc", "dk", "dv", "key_pos=lay.key_pos", "key_len=lay.key_len",
             "key_cstart=lay.key_cstart"), scalars("n_rows"),
        strides("dkc", "ct", "ch"), strides("dvc", "dt", "dh"), strides("dk", "kt", "kh"),
        strides("dv", "vt", "vh"),
        consts(DK="dkc.shape[2]", BDK="triton.next_power_of_2(dkc.shape[2])",
               DV="dvc.shape[2]", BDV="triton.next_power_of_2(dvc.shape[2])"),
        values(L=spec.cmp_block, STRIDE=spec.cmp_stride,
               R1=spec.cmp_block // spec.cmp_stride), cfg("BI"), options=WARPS))


# ---------------------------------------------------------------------------- gate_delta
def _gate_default(spec: Spec, target: Target, why: list) -> dict:
    why.append("backward prologue: gate gradients and every branch's delta in one pass over dO")
    return dict(BR=max(1, 4096 // triton.next_power_of_2(spec.dim_v)), num_warps=4)


def _gate_space(spec: Spec, default: dict, target: Target, smem: int):
    return [dict(default, BR=br, num_warps=nw)
            for br, nw in itertools.product([8, 16, 32, 64], [2, 4, 8])], []


# ---------------------------------------------------------------------------- cmp_attention_bwd
def _cmp_bwd_default(spec: Spec, target: Target, why: list) -> dict:
    gp = Dims.of(spec).gp
    why.append("backward cmp: recompute P from the saved LSE; dq per token tile, dk_cmp/dv_cmp "
               "per (compressed tile, chunk of at most QC queries that see it), added "
               "atomically; no gradient through importance")
    kv, keys = dkdv_tile(spec, gp, target)
    if target.has_tma:
        why.append("backward cmp dq: compressed K/V tiles through TMA descriptors (on an H100 "
                   "at 64k, 14.0 ms against 17.1 by pointers)")
    return dict(BT=max(1, 64 // gp), GP=gp, BC=64, num_warps=4, BC_KV=keys, QC=2048,
                TMA=int(target.has_tma), **kv)


# ---------------------------------------------------------------------------- slc_attention_bwd
def _slc_bwd_default(spec: Spec, target: Target, why: list) -> dict:
    gps = max(16, Dims.of(spec).gp)
    why.append("backward slc: dk/dv per (block, KV head) over an inverse map of the tokens "
               "that chose it, so the cost follows the selected pairs; each block's tokens "
               "in chunks of 64 tiles, added atomically (the initial block is chosen by every "
               "token and would otherwise serialise the launch)")
    if target.has_tma:
        why.append("backward slc dq: the chosen blocks' K/V tiles through TMA descriptors (on an "
                   "H100 at 64k, 17.4 ms against 19.3 by pointers)")
    # dq from the dk/dv pass (FUSE_DQ: added atomically, no dq kernel) pays where a token's
    # fp32 dq rows are at most 1/8 of the bytes of the key tile the dq kernel would load for
    # them and the group fills at least half of the 16 tile rows; it is on only as far as that
    # was measured (rows of up to 2 KB: 8 heads x 64, docs/benchmarks.md)
    tile, rows = spec.slc_block * (spec.dim_qk + spec.dim_v) * 2, spec.group * spec.dim_qk * 4
    fuse = spec.group >= 8 and tile >= 8 * rows and rows <= 2048
    how = "from the dk/dv pass, added atomically" if fuse else "a kernel of its own"
    why.append(f"backward slc dq: {how} (a token's fp32 dq rows are {rows} bytes against the "
               f"{tile}-byte key tile a dq kernel loads for them; G={spec.group} of {gps} rows)")
    return dict(GP=gps, BK=min(spec.slc_block, 64), BT_BWD=max(1, 64 // gps), CHUNK_ITERS=64,
                num_warps=4, TMA=int(target.has_tma), FUSE_DQ=int(fuse))


def _slc_bwd_space(spec: Spec, default: dict, target: Target, smem: int):
    d = Dims.of(spec)
    gps = default["GP"]
    out = [dict(default, BT_BWD=bt, CHUNK_ITERS=it, num_warps=nw)
           for bt, it, nw in itertools.product(token_rows(gps, 32, 64, 128), [16, 64], [4, 8])
           if smem_bytes(bt * gps, spec.slc_block, d.bdk, d.bdv, 2) <= smem
           and regs(bt * gps, spec.slc_block, d.bdk, d.bdv, nw) <= target.reg_limit]
    # (its dk/dv's keys are one selection block: with 64 of them, 8 warps split each product
    # across two warpgroups, and on an H100 64-row steps over 4 warps measured fastest)
    return nearest(out, default), []


# ---------------------------------------------------------------------------- win_attention_bwd
def _win_bwd_default(spec: Spec, target: Target, why: list) -> dict:
    gp = Dims.of(spec).gp
    why.append("backward win: dq per token tile; dk/dv per key tile over the queries whose "
               "window holds it, unmasked where the whole tile is visible; when key tiles are "
               f"fewer than two waves of the {target.sm_count} SMs, each tile's queries are "
               "split over programs that add atomically")
    kv, keys = dkdv_tile(spec, gp, target)
    if target.has_tma:
        why.append("backward win dq: K/V tiles through TMA descriptors (on an H100 at 64k, "
                   "5.7 ms against 6.7 by pointers)")
    return dict(BT=max(1, 64 // gp), GP=gp, BK=64, num_warps=4, BK_KV=keys,
                TMA=int(target.has_tma), **kv)


def _slc_bwd_launch(spec: Spec, flags: dict) -> dict:
    common = (_BWD_SCALES, HEADS, cfg("GP"), DIMS, values(LB=spec.slc_block),
              consts(HAS_GATES="gates is not None", PREC="prec"))
    return dict(
        dq=signature(
            ptrs("q", "k", "v", "g", "do", "lse", "delta", "dq", "idx", "tok_pos=lay.tok_pos",
                 "tok_kbase=lay.tok_kbase"),
            tma_descs("k", "v", "BK"),
            *_bwd_strides(), strides("idx", "it", "ih"), *common,
            values(N=spec.slc_count, NP=triton.next_power_of_2(spec.slc_count)), cfg("BK"),
            consts(TMA="bool(tma)"), options=WARPS),
        dkdv=signature(
            ptrs("q", "k", "v", "g", "do", "lse", "delta", "dq", "dk", "dv",
                 'blk_tok0=inv["blk_tok0"]', 'blk_nkeys=inv["blk_nkeys"]',
                 'blk_pos0=inv["blk_pos0"]', 'inv_off=inv["offsets"]', 'inv_cnt=inv["counts"]',
                 'inv_tok=inv["tokens"]', "tok_pos=lay.tok_pos", 'chunk_hb=inv["chunk_hb"]',
                 'chunk_i0=inv["chunk_i0"]'), scalars('n_blocks=inv["n_blocks"]'),
            *_bwd_strides(), *common, cfg("BT=BT_BWD"), consts(CHUNK="chunk", FUSE_DQ="fuse"),
            options=WARPS))


def _win_bwd_launch(spec: Spec, flags: dict) -> dict:
    common = (_BWD_SCALES, HEADS, cfg("GP"), DIMS,
              consts(W="window", BRANCH="branch", HAS_GATES="gates is not None", PREC="prec"))
    return dict(
        dq=signature(
            ptrs("q", "k", "v", "g", "do", "lse", "delta", "dq", "tile_tok", "tile_len",
                 "tok_pos=lay.tok_pos", "tok_kbase=lay.tok_kbase"),
            tma_descs("k", "v", "BK"),
            *_bwd_strides(), *common, cfg("BT", "BK"), consts(TMA="bool(tma)"), options=WARPS),
        dkdv=signature(
            ptrs("q", "k", "v", "g", "do", "lse", "delta", "dk", "dv", "tile_tok=ktile_tok",
                 "tile_len=ktile_len", "key_pos=lay.key_pos", "key_len=lay.key_len",
                 "key_qzero=lay.key_qzero", "key_qfirst=lay.key_qfirst"), scalars("q_chunk"),
            *_bwd_strides(), *common, cfg("BT=BT_KV", "BK=BK_KV"),
            consts(SPLIT="bool(splits > 1)"), options=_KV_OPTIONS))


BACKWARD = (
    KernelDef("mean_compress_bwd", "mean_compress_bwd.py.jinja", "backward", _mean_bwd_default,
              _mean_bwd_space, _mean_bwd_launch, ("compress",)),
    KernelDef("gate_delta", "gate_delta.py.jinja", "backward", _gate_default, _gate_space,
              _gate_launch, ("combine",)),
    KernelDef("cmp_attention_bwd", "cmp_attention_bwd.py.jinja", "backward", _cmp_bwd_default,
              _tiled_space("BC"), _cmp_bwd_launch, ("cmp_attn",)),
    KernelDef("slc_attention_bwd", "slc_attention_bwd.py.jinja", "backward", _slc_bwd_default,
              _slc_bwd_space, _slc_bwd_launch, ("slc_attn",)),
    KernelDef("win_attention_bwd", "win_attention_bwd.py.jinja", "backward", _win_bwd_default,
              _tiled_space("BK"), _win_bwd_launch, ("win_attn",)),
)
