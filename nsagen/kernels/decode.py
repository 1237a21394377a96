"""The decode kernels: the compressed pass (with block importance and the window's chunks),
the top-n, the selected blocks (or the window alone), and the merge. Each is defined once:
template, default launch config and tunable config space. Their reasons are written by the
decode lowering (nsagen.ir.passes.lower_decode), which also owns the split rule."""
from __future__ import annotations

import itertools

import triton

from ..spec import Spec
from ..target import Target
from .base import KernelDef
from .forward import cmp_values, topn_values
from .signature import (DIMS, HEADS, cfg, consts, options, ptrs, scalars, signature, strides,
                        values)

# every split kernel writes into the step's partial buffers and may launch dependent
_PARTIALS = ptrs('mp=work["part_m"]', 'lp=work["part_l"]', 'accp=work["part_acc"]')
_PDL = consts(PDL="pdl")
_ROWS = consts(GP="DECODE_ROWS")
DECODE_SELECT_TILE = 64     # decode_select: selection blocks per tile of the default config


def _decode_smem(rows: int, keys: int, bdk: int, bdv: int, stages: int, loops: int = 1) -> int:
    """Shared memory of a pipelined decode loop (Triton keeps stages - 1 K/V tiles in flight per
    loop) plus the query tile and scratch."""
    return loops * max(1, stages - 1) * keys * (bdk + bdv) * 2 + rows * bdk * 2 + 4096


def decode_tiles(spec: Spec, target: Target) -> dict[str, int]:
    """Tile sizes of the decode kernels (independent of the batch) and how many programs of the
    two streaming kernels fit on one SM."""
    gp = max(16, triton.next_power_of_2(spec.group))
    r2 = spec.slc_block // spec.cmp_stride
    bdk = triton.next_power_of_2(spec.dim_qk)
    bdv = triton.next_power_of_2(spec.dim_v)
    bc, stages = max(64, r2), 3     # 64 compressed keys (whole selection blocks) per step
    # the compressed pass is a stream over K/V: keep three programs per SM resident
    while target.smem_per_sm // _decode_smem(gp, bc, bdk, bdv, stages) < 3 and stages > 2:
        stages -= 1
    # selected blocks: 128 gathered keys per step (two 64-token blocks in one round trip) while
    # a K+V tile stays within 64 KiB
    bks = 128 if bdk + bdv <= 256 else 64
    return dict(GP=gp, BC=bc, BJ=bc // r2, stages=stages, BW=64, BKS=bks,
                BDVC=min(bdv, 32), RB=min(4, triton.next_power_of_2(spec.group)),
                # the merge in decode_slc's last program takes all GP heads: 16 columns a step
                # keeps its [partials, heads, columns] tile (up to 32 partials) in registers
                BDVC_MERGE=min(bdv, 16),
                cmp_resident=max(1, target.smem_per_sm // _decode_smem(gp, bc, bdk, bdv, stages)),
                slc_resident=max(1, target.smem_per_sm // _decode_smem(gp, bks, bdk, bdv, 2)))


def _space(spec: Spec, default: dict, target: Target, smem: int):
    """Read off the default config: only parameters whose meaning is known are varied (warps,
    pipeline stages, the merge's column tile and width, where the merge runs, how the top-n
    picks and over how many blocks a top-n tile runs); one change, then two."""
    bdv = triton.next_power_of_2(spec.dim_v)
    axes: list[tuple[str, list]] = []
    if "num_warps" in default:
        axes.append(("num_warps", [2, 4, 8]))
    if "num_stages" in default:
        axes.append(("num_stages", [2, 3, 4]))
    if "BDVC" in default:
        axes.append(("BDVC", [c for c in (16, 32, 64) if c <= bdv and bdv % c == 0]))
    if "SB" in default:
        axes.append(("SB", [4, 8, 16]))
    if "MERGE" in default:          # decode_slc's last programs merge, or decode_combine does
        axes.append(("MERGE", [0, 1]))
    if "RANK_MAX" in default:       # decode_select: rank picks, or sequential maxima
        axes.append(("RANK_MAX", [0, 128]))
    if "BNB" in default:            # decode_select: blocks per tile (fewer tiles, shorter merge)
        axes.append(("BNB", [64, 128, 256, 512]))
    out = [dict(default, **{name: v}) for name, vals in axes for v in vals]      # one change
    for (a, va), (b, vb) in itertools.combinations(axes, 2):                     # then two
        out += [dict(default, **{a: x, b: y}) for x in va for y in vb]
    return out, []


def _cmp_default(spec: Spec, target: Target, why: list) -> dict:
    t = decode_tiles(spec, target)
    return dict(BC=t["BC"], BW=t["BW"], num_warps=4, num_stages=t["stages"])


def _select_default(spec: Spec, target: Target, why: list) -> dict:
    # tiles of 64 blocks: on an H100 (nsa-d128, 64k cache, kernels alone) 12.5 against 14.3 us
    # at B=8 and 8.2 against 10.9 us at B=1 for tiles of 128; the H200's tuned table chose 64
    # too. One program per row with a bisection for the picks took 69 and 40 us
    # (results/h100/decode-select-2026-12-06/NOTES.md)
    return dict(BNB=DECODE_SELECT_TILE, RANK_MAX=128, num_warps=4)


def _slc_default(spec: Spec, target: Target, why: list) -> dict:
    t = decode_tiles(spec, target)
    return dict(BK=t["BKS"], num_warps=4, num_stages=2, MERGE=0, BDVC=t["BDVC_MERGE"], SB=32)


def _win_default(spec: Spec, target: Target, why: list) -> dict:
    return dict(BK=decode_tiles(spec, target)["BW"], num_warps=4, num_stages=2)


def _combine_default(spec: Spec, target: Target, why: list) -> dict:
    # two warps: each program merges a few rows of partials, too little work for four (the
    # tuner chose two at B=8 and B=64 on the H200; on an H100, nsa-d128 at a 64k cache, the
    # merge took 14.7 against 28.7 us at B=64 and 6.8 against 6.0 us at B=1)
    t = decode_tiles(spec, target)
    return dict(BDVC=t["BDVC"], RB=t["RB"], SB=64, num_warps=2)


def _append_default(spec: Spec, target: Target, why: list) -> dict:
    return {}


def _append_space(spec: Spec, default: dict, target: Target, smem: int):
    return [], []        # one small launch per step: nothing to tune


# a paged cache's page tables (raw and compressed tokens) and page size; a contiguous cache
# passes page size 0 and tables that are never read (nsa_module's _decode_pages)
_PAGES = (ptrs('ktab=pg["table"]', 'ctab=pg["cmp_table"]')
          + scalars('stride_ktab=pg["table"].stride(0)', 'stride_ctab=pg["cmp_table"].stride(0)')
          + consts(PAGE='pg["size"]', CPAGE='pg["cmp_size"]'))


def _append_launch(spec: Spec, flags: dict) -> dict:
    return dict(main=signature(
        ptrs("kt=k_t", "vt=v_t", "k", "v", "kc", "vc", "kct", "vct", "kwt", "vwt", "kw", "vw",
             "lens"), _PAGES, consts(COUNTED="counted"),
        strides("k_t", "ktb", "kth", prefix="s_"), strides("v_t", "vtb", "vth", prefix="s_"),
        strides("k", "kb", "kt", "kh", prefix="s_"), strides("v", "vb", "vt", "vh", prefix="s_"),
        strides("kc", "kcb", "kct", "kch", prefix="s_"),
        strides("vc", "vcb", "vct", "vch", prefix="s_"),
        consts(H="H_KV"), DIMS, values(L=spec.cmp_block, STRIDE=spec.cmp_stride,
                                       BL=triton.next_power_of_2(spec.cmp_block)),
        consts(HAS_CMP="k_cmp is not None", LEARNED="learned", SEP="sep",
               BH="triton.next_power_of_2(bh)"),
        options=options(num_warps="4")))


def _cmp_launch(spec: Spec, flags: dict) -> dict:
    return dict(main=signature(
        ptrs("q", "qc", "kc=k_cmp", "vc=v_cmp", "kw", "vw", "lens"), _PARTIALS, _PAGES,
        ptrs('imp=work["imp"]', 'impm=work["imp_m"]'),
        strides("q", "qb", "qh"), strides("k_cmp", "kb", "kt", "kh"),
        strides("v_cmp", "vb", "vt", "vh"), strides("kw", "wkb", "wkt", "wkh"),
        strides("vw", "wvb", "wvt", "wvh"),
        scalars("qk_scale=QK_SCALE", "n_split", 'n_part=work["n_part"]',
                'win_keys=splits["win_keys"]'),
        HEADS, _ROWS, DIMS, cmp_values(spec),
        consts(CQ='splits["cmp_quantum"]', NBP='work["nbp"]', NPART="DECODE_PARTS", PREC="prec"),
        cfg("BC"), values(W=spec.window or 1), cfg("BW"), _PDL,
        options=options(num_warps='cfg["num_warps"]', num_stages='cfg["num_stages"]',
                        launch_pdl="pdl")))


def _select_launch(spec: Spec, flags: dict) -> dict:
    return dict(main=signature(
        ptrs("lens", 'mp=work["part_m"]', 'lp=work["part_l"]', 'imp=work["imp"]',
             'impm=work["imp_m"]', 'cand=work["cand"]', 'count=work["count"]', "idx"),
        strides("idx", "ib", "ih"), scalars("n_split", 'n_part=work["n_part"]'),
        HEADS, _ROWS, values(L=spec.cmp_block, STRIDE=spec.cmp_stride,
                             R2=spec.slc_block // spec.cmp_stride),
        consts(CQ='splits["cmp_quantum"]', BJ="bj", NPART="DECODE_PARTS", NBP="nbp",
               SP="max(2, triton.next_power_of_2(n_split))", BNB="bnb"),
        topn_values(spec), values(N_INIT=spec.slc_initial, N_LOCAL=spec.slc_local),
        cfg("RANK_MAX"), _PDL,
        options=options(num_warps='cfg["num_warps"]', launch_pdl="pdl")))


def _slc_launch(spec: Spec, flags: dict) -> dict:
    """decode_slc and decode_win (one template); with `merge` the last program can merge every
    branch into o, so it also takes the gates, o and the merge's sizes."""
    merge = flags.get("merge", False)
    return dict(main=signature(
        ptrs("q", "k", "v", "lens", "idx=ix"), _PARTIALS, _PAGES,
        strides("q", "qb", "qh"), strides("k", "kb", "kt", "kh"), strides("v", "vb", "vt", "vh"),
        scalars("stride_ib=six[0]", "stride_ih=six[1]", "qk_scale=QK_SCALE", "part0",
                'n_part=work["n_part"]', 'win_keys=splits["win_keys"]'),
        (ptrs("g", "o", 'count=work["count_merge"]') + strides("g", "gb", "gh")
         + strides("o", "ob", "oh")
         + scalars('n_cmp_split=work["n_cmp"]', 'n_win=work["n_win"]')) if merge else (),
        HEADS, _ROWS, DIMS, values(LB=spec.slc_block, N=spec.slc_count, W=spec.window or 1),
        consts(SPB="spb", PREC="prec", BK="bk"), _PDL,
        (consts(MERGE='bool(cfg["MERGE"])')
         + values(L=spec.cmp_block, STRIDE=spec.cmp_stride, R2=spec.slc_block // spec.cmp_stride)
         + consts(CQ='splits["cmp_quantum"]', HAS_GATES="gates is not None",
                  BDVC='min(cfg["BDVC"], BLOCK_DV)', SB="sb", ONE="one")) if merge else (),
        options=options(num_warps='cfg["num_warps"]', num_stages='cfg["num_stages"]',
                        launch_pdl="pdl")))


def _combine_launch(spec: Spec, flags: dict) -> dict:
    return dict(main=signature(
        ptrs("g", "o", "lens"), _PARTIALS, strides("g", "gb", "gh"), strides("o", "ob", "oh"),
        scalars('n_cmp_split=work["n_cmp"]', 'n_win=work["n_win"]', 'n_part=work["n_part"]'),
        HEADS, _ROWS, consts(DV="DIM_V", BDV="BLOCK_DV", RB="rb"), cfg("BDVC"),
        values(L=spec.cmp_block, STRIDE=spec.cmp_stride, R2=spec.slc_block // spec.cmp_stride),
        consts(CQ='splits["cmp_quantum"]', HAS_GATES="gates is not None", SB="sb", ONE="one"),
        _PDL, options=options(num_warps='cfg["num_warps"]', launch_pdl="pdl")))


DECODE = (
    KernelDef("decode_append", "decode_append.py.jinja", "decode", _append_default,
              _append_space, _append_launch, ("compress",)),
    KernelDef("decode_cmp", "decode_cmp.py.jinja", "decode", _cmp_default, _space, _cmp_launch),
    KernelDef("decode_select", "decode_select.py.jinja", "decode", _select_default, _space,
              _select_launch),
    KernelDef("decode_slc", "decode_slc.py.jinja", "decode", _slc_default, _space, _slc_launch),
    KernelDef("decode_win", "decode_slc.py.jinja", "decode", _win_default, _space, _slc_launch),
    KernelDef("decode_combine", "decode_combine.py.jinja", "decode", _combine_default, _space,
              _combine_launch),
)
