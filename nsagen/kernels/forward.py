"""The forward kernels: mean compression, compressed attention (+ block importance), the top-n,
selected-block attention, sliding-window attention. Each is defined once: template, default
launch config (with its reason) and tunable config space."""
from __future__ import annotations

import itertools

import triton

from ..spec import Spec
from ..target import Target
from .base import Dims, KernelDef, interleave, regs, smem_bytes
from .signature import (DIMS, HEADS, WARPS, WARPS_STAGES, Signature, cfg, consts, options, ptrs,
                        scalars, signature, strides, tma_descs, values)


def cmp_values(spec: Spec) -> list:
    """The compression geometry as constexprs: l, d, l/d and l'/d."""
    return values(L=spec.cmp_block, STRIDE=spec.cmp_stride, R1=spec.cmp_block // spec.cmp_stride,
                  R2=spec.slc_block // spec.cmp_stride)


def topn_values(spec: Spec) -> list:
    """The selection's counts as constexprs: block size l', n and n padded to a power of two."""
    return values(LB=spec.slc_block, N=spec.slc_count,
                  NP=triton.next_power_of_2(spec.slc_count))


# ---------------------------------------------------------------------------- mean_compress
def _mean_default(spec: Spec, target: Target, why: list) -> dict:
    return dict(BI=32, num_warps=4)


def _mean_space(spec: Spec, default: dict, target: Target, smem: int):
    return [dict(default, BI=bi, num_warps=nw)
            for bi, nw in itertools.product([16, 32, 64], [2, 4])], []


def _mean_launch(spec: Spec, flags: dict) -> dict:
    return dict(main=signature(
        ptrs("k", "v", "kc=k_cmp", "vc=v_cmp", "src=lay.cmp_src"), scalars("n_rows"),
        strides("k", "kt", "kh"), strides("v", "vt", "vh"), strides("k_cmp", "ct", "ch"),
        strides("v_cmp", "dt", "dh"),
        consts(DK="k.shape[2]", BDK="triton.next_power_of_2(k.shape[2])", DV="v.shape[2]",
               BDV="triton.next_power_of_2(v.shape[2])"),
        values(L=spec.cmp_block), cfg("BI"), options=WARPS))


# ---------------------------------------------------------------------------- cmp_attention
def _cmp_default(spec: Spec, target: Target, why: list) -> dict:
    d = Dims.of(spec)
    gp, r2, bdk, bdv = d.gp, d.r2, d.bdk, d.bdv
    bt, bc, stages = max(1, 128 // gp), max(128, 16 * r2), 3
    bc_min = max(64, 16 * r2)
    while smem_bytes(bt * gp, bc, bdk, bdv, stages) > target.smem_budget:
        if stages > 2:
            stages -= 1
        elif bc > bc_min:
            bc //= 2
        elif bt > 1:
            bt //= 2
        elif stages > 1:        # small shared memory: no software pipelining
            stages -= 1
        else:
            break
    why.append(f"cmp_attention tile: {bt} token(s) x {gp} head rows (G={spec.group}) = "
               f"{bt * gp} rows, {bc} compressed keys per step, {stages} stages "
               f"(~{smem_bytes(bt * gp, bc, bdk, bdv, stages) // 1024} KB shared memory)")
    # TMA (1: the compressed tiles through tensor-memory descriptors) stays off: this kernel is
    # bound by its products and exp2, and on an H100 at 64k the switch measured no gain
    return dict(BT=bt, GP=gp, BC=bc, num_warps=8 if bt * gp >= 128 else 4, num_stages=stages,
                TMA=0)


def _cmp_space(spec: Spec, default: dict, target: Target, smem: int):
    d = Dims.of(spec)
    out = []
    for bt, bc, nw, ns in itertools.product([max(1, 64 // d.gp), max(1, 128 // d.gp)],
                                            [default["BC"], 2 * default["BC"]], [4, 8], [2, 3]):
        if (bc % d.r2 or bc // d.r2 < 16 or smem_bytes(bt * d.gp, bc, d.bdk, d.bdv, ns) > smem
                or regs(bt * d.gp, bc, d.bdk, d.bdv, nw) > target.reg_limit):
            continue
        out.append(dict(default, BT=bt, BC=bc, num_warps=nw, num_stages=ns))
    return out, []


def _cmp_launch(spec: Spec, flags: dict) -> dict:
    return dict(main=signature(
        ptrs("q", "kc", "vc", "g", "o", "ob=ob if save else o", "lse=lse if save else score",
             "score", "tile_tok", "tile_len", "tok_pos=lay.tok_pos", "tok_cstart=lay.tok_cstart",
             "tok_ncmp=lay.tok_ncmp"),
        tma_descs("kc", "vc", "BC"),
        strides("q", "qt", "qh"), strides("kc", "kt", "kh"), strides("vc", "vt", "vh"),
        strides("o", "ot", "oh"), strides("g", "gt", "gh"), strides("score", "st", "sh"),
        consts(qk_scale="QK_SCALE"), HEADS, cfg("GP"), DIMS, cmp_values(spec),
        consts(NBP="score.shape[-1]", HAS_GATES="gates is not None", PREC="prec", SAVE="save",
               SCORES="scores"),
        cfg("BT", "BC"),
        consts(BTS='max(16, cfg["BT"])',
               SHIFT='0 if prec == "ieee" else 16 - cfg["GP"].bit_length()', TMA="bool(tma)"),
        options=WARPS_STAGES))


# ---------------------------------------------------------------------------- select_blocks
def _select_default(spec: Spec, target: Target, why: list) -> dict:
    why.append("select_blocks: 8 tokens per program over 2 warps; one pass over the causal "
               "chunks (256 blocks each) keeps the best score of each segment of 32 blocks, "
               "and each pick re-reads only the picked segment")
    return dict(BT=8, SEG=32, CH=256, num_warps=2)


def _select_space(spec: Spec, default: dict, target: Target, smem: int):
    grid = itertools.product([1, 2, 4, 8, 16], [16, 32, 64], [128, 256, 1024], [1, 2, 4])
    return [dict(default, BT=bt, SEG=seg, CH=ch, num_warps=nw) for bt, seg, ch, nw in grid], []


def _select_launch(spec: Spec, flags: dict) -> dict:
    nf = spec.slc_count - spec.slc_initial - spec.slc_local
    return dict(main=signature(
        ptrs("score", "idx", "tok_pos=lay.tok_pos", "tok_ncmp=lay.tok_ncmp"), scalars("n_tok"),
        strides("score", "st", "sh"), strides("idx", "it", "ih"),
        values(L=spec.cmp_block, STRIDE=spec.cmp_stride), topn_values(spec),
        forced_values(spec), values(NFP=triton.next_power_of_2(max(1, nf))),
        consts(NBP="score.shape[2]", SEG='min(cfg["SEG"], score.shape[2])',
               CH='min(max(cfg["CH"], cfg["SEG"]), score.shape[2])'), cfg("BT"),
        options=WARPS))


# ---------------------------------------------------------------------------- forced blocks
# Both selected-attention kernels attend the blocks every token takes (initial, local) as dense
# tiles of consecutive tokens first (templates/_slc_forced.py.jinja), then only the free picks.
def forced_values(spec: Spec) -> list:
    """The selection's forced blocks as constexprs: n_init, n_local and the free picks."""
    return values(N_INIT=spec.slc_initial, N_LOCAL=spec.slc_local,
                  NF=spec.slc_count - spec.slc_initial - spec.slc_local)


def forced_default(spec: Spec, why: list) -> dict:
    """Tokens per forced tile (64 rows of heads), 32 keys a step (the best of an H100 sweep
    on four specs), 4 warps."""
    fbt = max(1, 64 // Dims.of(spec).gp)
    why.append(f"forced blocks (initial {spec.slc_initial}, local {spec.slc_local}): dense tiles "
               f"of {fbt} tokens, shared by the tile; the selected kernel walks the "
               f"{spec.slc_count - spec.slc_initial - spec.slc_local} free picks only")
    return dict(FBT=fbt, FBK=min(spec.slc_block, 32), FORCED_WARPS=4)


def forced_space(spec: Spec, default: dict, target: Target) -> list:
    """The forced tiles' configs: 64 or 128 rows, 32 or 64 keys a step, 4 or 8 warps."""
    d = Dims.of(spec)
    out = []
    for rows, fbk, fw in itertools.product([64, 128], [32, 64], [4, 8]):
        fbt = max(1, rows // d.gp)
        if fbt * d.gp < 16 or regs(fbt * d.gp, fbk, d.bdk, d.bdv, fw) > target.reg_limit:
            continue
        out.append(dict(default, FBT=fbt, FBK=fbk, FORCED_WARPS=fw))
    return out


def forced_signature(spec: Spec) -> Signature:
    """The forced-tile kernel's launch, declared once for both selected-attention templates."""
    return signature(
        ptrs("q", "k", "v", "fo", "fl", "tile_tok", "tile_len", "tok_pos=lay.tok_pos",
             "tok_kbase=lay.tok_kbase"),
        strides("q", "qt", "qh"), strides("k", "kt", "kh"), strides("v", "vt", "vh"),
        consts(qk_scale="QK_SCALE"), HEADS, values(GP=Dims.of(spec).gp), DIMS,
        values(LB=spec.slc_block), forced_values(spec), consts(PREC="prec"), cfg("FBT", "FBK"),
        options=options(num_warps='cfg["FORCED_WARPS"]'))


# ---------------------------------------------------------------------------- slc_attention
def _slc_default(spec: Spec, target: Target, why: list) -> dict:
    gps = max(16, Dims.of(spec).gp)
    why.append(f"slc_attention: one token x {spec.group} heads per program, rows padded to {gps} "
               "for tensor-core tiles" + (" (small group: padded)" if gps > spec.group else ""))
    if target.has_tma:
        why.append("slc_attention: the free picks' K/V tiles through TMA descriptors (on an H100 "
                   "at 64k, 14.5 ms against 15.2 by pointers)")
    return dict(GP=gps, BK=min(spec.slc_block, 64), num_warps=2, num_stages=2,
                TMA=int(target.has_tma), **forced_default(spec, why))


def _slc_space(spec: Spec, default: dict, target: Target, smem: int):
    d = Dims.of(spec)
    out = []
    for bk, nw, ns in itertools.product(sorted({min(spec.slc_block, 64), min(spec.slc_block, 32)}),
                                        [2, 4, 8], [1, 2, 3, 4]):
        if (spec.slc_block % bk or smem_bytes(default["GP"], bk, d.bdk, d.bdv, ns) > smem
                or regs(default["GP"], bk, d.bdk, d.bdv, nw) > target.reg_limit):
            continue
        out.append(dict(default, BK=bk, num_warps=nw, num_stages=ns))
    return interleave(out, forced_space(spec, default, target)), []


def _slc_launch(spec: Spec, flags: dict) -> dict:
    return dict(forced=forced_signature(spec), main=signature(
        ptrs("q", "k", "v", "kw", "vw", "g", "o", "ob=ob if save else o",
             "lse=lse if save else o", "idx", "fo", "fl", "tok_pos=lay.tok_pos",
             "tok_kbase=lay.tok_kbase"),
        tma_descs("k", "v", "BK"),
        strides("q", "qt", "qh"), strides("k", "kt", "kh"), strides("v", "vt", "vh"),
        strides("o", "ot", "oh"), strides("g", "gt", "gh"), strides("idx", "it", "ih"),
        consts(qk_scale="QK_SCALE"), scalars("N_TOK=q.shape[0]"),
        consts(G="GROUP"), cfg("GP"), DIMS, topn_values(spec), forced_values(spec),
        values(W=spec.window or 1),
        consts(HAS_GATES="gates is not None", PREC="prec", SAVE="save", TMA="bool(tma)"),
        cfg("BK"), options=WARPS_STAGES))


# ---------------------------------------------------------------------------- slc_attention_kb
def _slc_kb_default(spec: Spec, target: Target, why: list) -> dict:
    gp = Dims.of(spec).gp
    bt = max(1, 64 // gp)
    why.append(f"slc_attention_kb tile: {bt} picks x {gp} head rows = {bt * gp} rows against one "
               f"block of {spec.slc_block} keys, up to {16 * bt} picks per program")
    return dict(GP=gp, BT=bt, CHUNK_ITERS=16, num_warps=4, num_stages=2, BR=16, MERGE_WARPS=8,
                **forced_default(spec, why))


def _slc_kb_space(spec: Spec, default: dict, target: Target, smem: int):
    d = Dims.of(spec)
    out = []
    for rows, ci, nw, ns in itertools.product([32, 64, 128], [8, 16, 32], [4, 8], [2, 3]):
        bt = max(1, rows // d.gp)
        if (bt * d.gp < 16 or regs(bt * d.gp, spec.slc_block, d.bdk, d.bdv, nw) > target.reg_limit
                or smem_bytes(bt * d.gp, spec.slc_block, d.bdk, d.bdv, 1) > smem):
            continue
        out.append(dict(default, BT=bt, CHUNK_ITERS=ci, num_warps=nw, num_stages=ns))
    merge = [dict(default, BR=br, MERGE_WARPS=mw)
             for br, mw in itertools.product([16, 32, 64], [2, 4, 8])]
    return interleave(out, merge, forced_space(spec, default, target)), []


def _slc_kb_launch(spec: Spec, flags: dict) -> dict:
    n = values(N=spec.slc_count)
    forced = values(LB=spec.slc_block) + forced_values(spec)
    return dict(
        forced=forced_signature(spec),
        attend=signature(
            ptrs("q", "k", "v", "op", "lp", 'blk_tok0=inv["blk_tok0"]',
                 'blk_nkeys=inv["blk_nkeys"]', 'blk_pos0=inv["blk_pos0"]',
                 'offsets=inv["offsets"]', 'counts=inv["counts"]', 'inv_tok=inv["tokens"]',
                 'inv_slot=inv["slots"]', "tok_pos", "chunk_hb", 'chunk_i0=inv["chunk_i0"]'),
            scalars("n_blocks"), strides("q", "qt", "qh"), strides("k", "kt", "kh"),
            strides("v", "vt", "vh"), consts(qk_scale="QK_SCALE"), HEADS, cfg("GP"), DIMS,
            forced, n, consts(PREC="prec"), cfg("BT"), consts(CHUNK="chunk"),
            options=WARPS_STAGES),
        merge=signature(
            ptrs("op", "lp", "fo", "fl", "idx", "tok_pos", "g", "o", "ob=ob if save else o",
                 "lse=lse if save else lp"),
            scalars("n_rows"), strides("o", "ot", "oh"), strides("g", "gt", "gh"),
            strides("idx", "it", "ih"), HEADS, consts(DV="DIM_V", BDV="BLOCK_DV"), n, forced,
            consts(HAS_GATES="gates is not None", SAVE="save"), cfg("BR"),
            options=options(num_warps='cfg["MERGE_WARPS"]')))


def inverse_map_launch(spec: Spec) -> dict[str, Signature]:
    """The selected branch's inverse map (templates/_inverse_map.py.jinja), shared by the
    block-outer forward and the dk/dv backward: its counting and placing kernels, each a tile
    of BT tokens x HNS columns (KV head x slot) per program."""
    entries = (consts(H="H_KV", S0="s0", NS="ns", FREE="free"),
               values(N_INIT=spec.slc_initial, N_LOCAL=spec.slc_local, LB=spec.slc_block))
    tile = consts(CHUNK="chunk", BT="bt", HNS="hns")
    return dict(
        count=signature(
            ptrs("idx", "tok_seq", "tok_pos", "seq_first", "count=counts", "offset=offsets",
                 "cursor", "end"), scalars("n_tok", "n_blocks"),
            strides("idx", "it", "ih"), *entries, tile, consts(BG="1024"),
            options=options(num_warps="4")),
        place=signature(
            ptrs("idx", "tok_seq", "tok_pos", "seq_first", "count=counts", "cursor", "end",
                 "inv_tok=tokens", "inv_slot=slot", "chunk_hb", "chunk_i0"),
            scalars("n_tok", "n_blocks", "n_chunks", "n_search=n_groups.bit_length()"),
            strides("idx", "it", "ih"), *entries, consts(SLOT="slots"), tile,
            options=options(num_warps="4")))


# ---------------------------------------------------------------------------- win_attention
def _win_default(spec: Spec, target: Target, why: list) -> dict:
    gp = Dims.of(spec).gp
    bt = max(1, 128 // gp)
    why.append(f"win_attention tile: {bt} token(s) x {gp} head rows, 32-key steps"
               + (", K/V tiles through TMA descriptors (on an H100 at 64k, 3.3 ms against 3.5 "
                  "by pointers)" if target.has_tma else ""))
    return dict(BT=bt, GP=gp, BK=32, num_warps=4, num_stages=3, TMA=int(target.has_tma))


def _win_space(spec: Spec, default: dict, target: Target, smem: int):
    d = Dims.of(spec)
    out = []
    for bt, bk, nw, ns in itertools.product([max(1, 64 // d.gp), max(1, 128 // d.gp)],
                                            [32, 64, 128], [4, 8], [2, 3]):
        if (smem_bytes(bt * d.gp, bk, d.bdk, d.bdv, ns) > smem
                or regs(bt * d.gp, bk, d.bdk, d.bdv, nw) > target.reg_limit):
            continue
        out.append(dict(default, BT=bt, BK=bk, num_warps=nw, num_stages=ns))
    return out, []


def _win_launch(spec: Spec, flags: dict) -> dict:
    return dict(main=signature(
        ptrs("q", "k=kw", "v=vw", "g", "o", "ob=ob if save else o", "lse=lse if save else o",
             "tile_tok", "tile_len", "tok_pos=lay.tok_pos", "tok_kbase=lay.tok_kbase"),
        tma_descs("kw", "vw", "BK"),
        strides("q", "qt", "qh"), strides("kw", "kt", "kh"), strides("vw", "vt", "vh"),
        strides("o", "ot", "oh"), strides("g", "gt", "gh"),
        consts(qk_scale="QK_SCALE", G="GROUP"), cfg("GP"), DIMS,
        consts(W="window", BRANCH="branch", FIRST="first", HAS_GATES="gates is not None",
               PREC="prec", SAVE="save", TMA="bool(tma)"), cfg("BT", "BK"),
        options=WARPS_STAGES))


FORWARD = (
    KernelDef("mean_compress", "mean_compress.py.jinja", "forward", _mean_default, _mean_space,
              _mean_launch, ("compress",)),
    KernelDef("cmp_attention", "cmp_attention.py.jinja", "forward", _cmp_default, _cmp_space,
              _cmp_launch, ("cmp_attn", "importance")),
    KernelDef("select_blocks", "select_blocks.py.jinja", "forward", _select_default, _select_space,
              _select_launch, ("topk",)),
    KernelDef("slc_attention", "slc_attention.py.jinja", "forward", _slc_default, _slc_space,
              _slc_launch, ("slc_attn", "win_attn")),
    KernelDef("slc_attention_kb", "slc_attention_kb.py.jinja", "forward", _slc_kb_default,
              _slc_kb_space, _slc_kb_launch, ("slc_attn",)),
    KernelDef("win_attention", "win_attention.py.jinja", "forward", _win_default, _win_space,
              _win_launch, ("win_attn",)),
)
