"""The DSA kernels (docs/algorithm.md section 8): the indexer's scores, the token top-k, the
sparse attention over the selected tokens (forward and backward) and the indexer's loss (forward
and backward). Each is defined once: template, default launch config
(with its reason), tunable config space and launch signature."""
from __future__ import annotations

import itertools

import triton

from ..dsa_spec import DSASpec
from ..target import Target
from .base import KernelDef
from .signature import (WARPS, WARPS_STAGES, cfg, consts, options, ptrs, scalars, signature,
                        strides, values)


def dim_split(d: int) -> tuple[int, int]:
    """A head dim as two power-of-two tiles: the largest power of two <= d, and the rest padded
    to a power of two (0 when d is one). 576 = 512 + 64 (MLA's c_kv and rope parts), 192 = 128
    + 64, 128 = 128 + 0: a key row never pads to the next power of two (1024 for 576)."""
    a = 1 << (d.bit_length() - 1)
    return a, (triton.next_power_of_2(d - a) if d > a else 0)


def values_from_keys(spec: DSASpec) -> bool:
    """Whether the attention kernels can take the value tile from the key tile they gathered
    when v is the key's first Dv columns (MLA): the key's first tile (dim_split) is exactly the
    padded value width, so one gather a step serves both products."""
    return spec.dim_v <= spec.dim_qk and dim_split(spec.dim_qk)[0] == triton.next_power_of_2(
        spec.dim_v)


def column_chunks(spec: DSASpec) -> tuple[int, int, int]:
    """(CW, chunks of DKA, chunks of the padded Dv): the column chunk of the backward's
    keys-as-rows form, at most 256 wide and dividing both tiles (576/512: 256, 2, 2)."""
    dka = dim_split(spec.dim_qk)[0]
    bdv = triton.next_power_of_2(spec.dim_v)
    cw = min(256, dka, bdv)
    return cw, dka // cw, bdv // cw


def key_step_heads(spec: DSASpec) -> int:
    """Query heads per step of the backward's dK kernel (stored-dS form, its default): all of a
    KV head's heads up to 128 (padded to at least 16), so each key's gradient is summed over
    them before its atomic add."""
    return max(16, min(128, triton.next_power_of_2(spec.group)))


def index_rows(spec: DSASpec) -> int:
    """Indexer heads padded to a power of two (rows per token of the indexer tile)."""
    return triton.next_power_of_2(spec.indexer_heads)


def head_rows(spec: DSASpec) -> int:
    """Query heads per attention program: the KV head's G heads, padded to at least 16 rows
    (tensor-core tiles) and split in blocks of at most 64."""
    return max(16, min(64, triton.next_power_of_2(spec.group)))


# ---------------------------------------------------------------------------- dsa_indexer
def _indexer_default(spec: DSASpec, target: Target, why: list) -> dict:
    hip = index_rows(spec)
    bt = max(1, 128 // hip)
    kb = 64 if spec.fp8_keys else 16
    why.append(f"dsa_indexer tile: {bt} token(s) x {hip} indexer heads = {bt * hip} query rows, "
               f"loaded {'and quantized to FP8 ' if spec.fp8_keys else ''}once for {kb} blocks of "
               f"128 keys (fewer blocks would repeat that prologue more often); the "
               f"keys are the product's rows and the heads its columns, so the ReLU, the head "
               f"weights and the head sum stay within threads (with heads as rows the sum would "
               f"cross warps through shared memory), and only [tokens, keys] scores are written "
               f"(one chunk of query tiles at a time); a grid under one program per SM (a "
               f"decode step) takes fewer key blocks per program")
    # FP8 ran best with one warpgroup and 4 stages, bf16 with two and 2 (results/h200/dsa-sweep.md)
    return dict(BT=bt, BK=128, KB=kb, KROWS=1, num_warps=4 if spec.fp8_keys else 8,
                num_stages=4 if spec.fp8_keys else 2, SMS=target.sm_count)


def _indexer_space(spec: DSASpec, default: dict, target: Target, smem: int):
    hip = index_rows(spec)
    return [dict(default, BT=bt, BK=bk, KB=kb, KROWS=kr, num_warps=nw, num_stages=ns)
            for bt, bk, kb, kr, nw, ns in itertools.product(
                sorted({max(1, 64 // hip), max(1, 128 // hip), max(1, 256 // hip)}),
                [64, 128], [16, 64], [0, 1], [4, 8], [2, 3, 4])], []


def _indexer_launch(spec: DSASpec, flags: dict) -> dict:
    # FP8 products take k in steps of 32 on the tensor cores
    bdi = max(32 if spec.fp8_keys else 16, triton.next_power_of_2(spec.indexer_dim))
    return dict(main=signature(
        ptrs("qi=q_idx", "ki=k_idx", "ks=k_scale", "w=w_idx", "score", "ext", "tile_tok",
             "tile_len", "tok_pos=lay.tok_pos", "tok_kbase=lay.tok_kbase"),
        scalars("tile0"), strides("q_idx", "qit", "qih"), strides("k_idx", "kit"),
        strides("w_idx", "wt"), strides("score", "sr"),
        values(HI=spec.indexer_heads, HIP=index_rows(spec), DI=spec.indexer_dim, BDI=bdi,
               FP8=spec.fp8_keys),
        consts(PREC="prec", KB="kb", EXT="use_ext"), cfg("BT", "BK", "KROWS"),
        options=WARPS_STAGES))


# ---------------------------------------------------------------------------- dsa_topk
def _topk_default(spec: DSASpec, target: Target, why: list) -> dict:
    # 8-bit digits: 11 bits ran 4x slower on the H200, and 6-bit digits hit an illegal address
    # there (Triton 3.6, not yet understood), so the space starts at 8
    rb = 8
    why.append(f"dsa_topk: one program per token finds the {spec.topk}-th largest score by a "
               f"radix select (at most {-(-32 // rb)} histogram passes of {rb}-bit digits over "
               f"the row, stopping once every key sharing the digits found is needed; a "
               f"histogram's cost per score grows with its bins, so digits stay narrow), then "
               f"keeps, in position order, the scores above it and the first ones equal to it "
               f"(ties to the lower position): the picks come out ascending, with no sort")
    cap = 2 * spec.topk
    why.append(f"dsa_topk: rows longer than {spec.topk} first find the bucket of the "
               f"{spec.topk}-th largest score among {1 << rb} equal-width buckets between the "
               f"row's extremes (which the indexer folds as it writes the scores); when at "
               f"most {cap} scores are in it or above, they are copied (in position order) and "
               f"the select reads only them: two passes over the row instead of about four")
    why.append(f"dsa_topk: fewer than {target.sm_count} rows (a decode step) over rows longer "
               f"than 2 x 2048 scores: each row is split in segments of 2048 scores, one program "
               f"each, every radix pass its own launch")
    # 2048-score segments: 42.5-46.8 us against 47.7-54.3 for 4096 at B=8, 64k (H100,
    # results/h100/dsa-2026-12-06b/NOTES.md)
    return dict(RB=rb, CH=1024, num_warps=4, CAP=cap, SEG=2048, SPLIT_BELOW=target.sm_count)


def _topk_space(spec: DSASpec, default: dict, target: Target, smem: int):
    return [dict(default, RB=rb, CH=ch, num_warps=nw, CAP=cap)
            for rb, ch, nw, cap in itertools.product((8, 11), (1024, 2048, 4096), (4, 8),
                                                     (0, 2 * spec.topk))], []


def _topk_launch(spec: DSASpec, flags: dict) -> dict:
    rows = ("tile_tok", "tile_len", "tok_pos=lay.tok_pos")
    split = (scalars("tile0", "seg"), strides("score", "sr"))
    return dict(
        main=signature(ptrs("score", "idx", "cand", "ext", *rows), scalars("tile0"),
                       strides("score", "sr"), strides("idx", "it"), values(K=spec.topk),
                       consts(BT="bt", CAP="cap"), cfg("RB", "CH"), options=WARPS),
        hist=signature(ptrs("score", "hist", *rows), *split, values(K=spec.topk),
                       consts(BT="bt", LEVELS="levels", LVL="lvl"), cfg("RB", "CH"),
                       options=WARPS),
        select=signature(ptrs("score", "idx", "hist", "cnt", *rows), *split,
                         strides("idx", "it"), values(K=spec.topk),
                         consts(BT="bt", LEVELS="levels", MAXP="TOPK_MAXP", EMIT="emit"),
                         cfg("RB", "CH"), options=WARPS))


# ---------------------------------------------------------------------------- dsa_attention
def attention_smem(spec: DSASpec, bk: int, stages: int, keys_as_values: bool) -> int:
    """Shared memory of the attention forward's tiles (bytes, 2-byte inputs): the block's
    query rows, resident, and `stages` buffers of the gathered key tile (and of the value tile
    when v is its own tensor). The compiler's scratch is what Target.smem_budget leaves."""
    dka, dkb = dim_split(spec.dim_qk)
    row = dka + dkb + (0 if keys_as_values else triton.next_power_of_2(spec.dim_v))
    return 2 * (head_rows(spec) * (dka + dkb) + stages * bk * row)


def _attention_tile(spec: DSASpec, target: Target, stages: int, keys_as_values: bool) -> int:
    """The most picks per step (64 at most: measured best on H100 for MLA's 576/512 dims,
    results/h100/dsa-2026-12-06b/NOTES.md) whose tiles fit the target's shared memory."""
    for bk in (64, 32):
        if attention_smem(spec, bk, stages, keys_as_values) <= target.smem_budget:
            return bk
    return 16


def _attention_default(spec: DSASpec, target: Target, why: list) -> dict:
    bh = head_rows(spec)
    dka, dkb = dim_split(spec.dim_qk)
    stages = 2
    bk = _attention_tile(spec, target, stages, values_from_keys(spec))
    bkv = _attention_tile(spec, target, stages, False)
    why.append(f"dsa_attention: one program per token x KV head x block of {bh} of its "
               f"{spec.group} query heads ({'padded' if bh > spec.group else 'rows'}); the "
               f"selected keys are gathered {bk} at a time ({bkv} when v is its own tensor: "
               f"as many as {stages} buffers of the tiles fit in shared memory) and shared by "
               f"the block's heads; the {spec.dim_qk}-wide key is read as {dka}"
               + (f" + {dkb}" if dkb else "") + " columns")
    why.append("dsa_attention: with fewer programs than SMs (a decode step), each token's "
               "picks are split in up to 16 runs, one program each, until there is one per SM; "
               "the partials are combined one (token, head) per program, all runs loaded at once")
    warps = 4 if bh <= 16 else 8
    # Two warpgroups on a 64-row tile: the scores' product split between them (SPLIT_S), and
    # tokens, not a token's head blocks, adjacent in launch order. H100, dsa-v32, attention
    # alone: 152.9 ms at 64k against 157.8 with both warpgroups computing all of S and a
    # token's head blocks adjacent (HFAST=1), 33.3 against 34.7 ms at 16k; S split with HFAST=1
    # took 185.6 ms (results/h100/dsa-2026-12-06d/NOTES.md). With the key's two tiles as
    # separate products (_scores): 28.0 ms at 16k; HFAST=1 28.8, SPLIT_S=0 35.3, 32 picks in
    # three buffers 40.5 (results/h100/dsa-2026-12-06f/NOTES.md).
    split = warps == 8 and bh == 64
    if split:
        why.append("dsa_attention: the scores' product is split between the two warpgroups "
                   "(each forms half of a step's keys; P reaches both through shared memory), "
                   "and neighbouring tokens, not a token's head blocks, are neighbours in "
                   "launch order")
    elif spec.group > bh:
        why.append(f"dsa_attention: a token's {triton.cdiv(spec.group, bh)} head blocks are "
                   "neighbours in launch order, so the later ones find its gathered keys in L2")
    return dict(BK=bk, BKV=bkv, num_warps=warps, num_stages=stages, HFAST=0 if split else 1,
                SPLIT_S=int(split), SMS=target.sm_count)


def _attention_space(spec: DSASpec, default: dict, target: Target, smem: int):
    # one warpgroup would hold a wide accumulator ([64, 512] fp32) in 256 registers a thread
    wide = head_rows(spec) * triton.next_power_of_2(spec.dim_v) > 64 * 256
    budget = min(smem, target.smem_budget) if smem else target.smem_budget
    out = []
    for bk, nw, ns, hf, sp in itertools.product([16, 32, 64], [8] if wide else [4, 8],
                                                [1, 2, 3], [0, 1], [0, 1]):
        bkv = min(bk, _attention_tile(spec, target, ns, False))
        if sp and not (nw == 8 and head_rows(spec) == 64):
            continue
        if attention_smem(spec, bk, ns, values_from_keys(spec)) <= budget:
            out.append(dict(default, BK=bk, BKV=bkv, num_warps=nw, num_stages=ns, HFAST=hf,
                            SPLIT_S=sp))
    return out, []


def _attention_launch(spec: DSASpec, flags: dict) -> dict:
    dka, dkb = dim_split(spec.dim_qk)
    bdv = triton.next_power_of_2(spec.dim_v)
    return dict(
        main=signature(
            ptrs("q", "k", "v", "idx", "o", "lse", "po", "plse", "tok_pos=lay.tok_pos",
                 "tok_kbase=lay.tok_kbase"),
            strides("q", "qt", "qh"), strides("k", "kt", "kh"), strides("v", "vt", "vh"),
            strides("idx", "it"), strides("o", "ot", "oh"),
            consts(qk_scale="QK_SCALE", H="H_KV", G="GROUP"),
            values(BH=head_rows(spec), DK=spec.dim_qk, DKA=dka, DKB=dkb, DV=spec.dim_v,
                   BDV=bdv, K=spec.topk),
            consts(PREC="prec", DENSE="dense", NS="ns", NHB="nhb", VK="vk",
                   HFAST='cfg.get("HFAST", 1)', BK="bk",
                   SPLIT_S='cfg.get("SPLIT_S", 0)'), options=WARPS_STAGES),
        combine=signature(
            ptrs("po", "plse", "o", "lse"), strides("o", "ot", "oh"),
            consts(H="H_KV", G="GROUP", NS="ns"), values(DV=spec.dim_v, BDV=bdv),
            options=options(num_warps="4")))


# ---------------------------------------------------------------------------- dsa_attention_bwd
def _attention_bwd_default(spec: DSASpec, target: Target, why: list) -> dict:
    wide = spec.dim_qk + spec.dim_v > 512
    bh = head_rows(spec)
    why.append(f"dsa_attention_bwd: the forward's programs again (token x KV head x {bh} "
               f"heads), dq in registers, dK and dV of each step's gathered keys added "
               f"atomically into fp32 buffers" if not wide else
               f"dsa_attention_bwd: a wide head in three kernels per chunk of tokens (stored "
               f"dS): P and dS of {bh} heads x 64 picks a step written to a workspace, dq = dS K "
               f"from the keys gathered again, and dK = dS^T q + P^T dO of 128 picks x 64 "
               f"columns a step over {key_step_heads(spec)} heads of the KV head, one atomic "
               f"add per key, token and column; no kernel holds two accumulators")
    # Wide heads, H100, dsa-v32 at 16k, kernels alone: 126.0 ms stored-dS with 64 picks a step
    # in one buffer (143.0 with 32 in two, 160.5 with 64 picks x 128 columns in the dK
    # kernel, 126.2 with the first kernel on 4 warps) against 192.4 for the keys-as-rows form
    # (KT), whose 4 blocks of 32 heads each add every picked key's gradient
    # (results/h100/dsa-2026-12-06e/NOTES.md)
    if wide:
        return dict(BH=bh, BK=64, num_warps=8, num_stages=1, KT=0, STORE_DS=1, BP=128, BC=64,
                    BHK=key_step_heads(spec), WARPS_DS=8)
    warps = 4 if bh <= 16 else 8
    return dict(BH=bh, BK=32, num_warps=warps, num_stages=1, KT=0, STORE_DS=0, BP=128, BC=64,
                BHK=key_step_heads(spec), WARPS_DS=warps)


def _attention_bwd_space(spec: DSASpec, default: dict, target: Target, smem: int):
    rows = [b for b in (16, 32, 64) if b <= head_rows(spec)]
    out = [dict(default, BH=bh, BK=bk, num_warps=nw, num_stages=ns, KT=kt, STORE_DS=0)
           for bh, bk, nw, ns, kt in itertools.product(rows, [16, 32, 64], [4, 8], [1, 2],
                                                       [0, 1])]
    # the stored-dS form: its products take 64 rows a warpgroup, so 8 warps and 64 heads;
    # two buffers of 64 picks, or 128 picks x 128 columns in the dK kernel, pass the shared
    # memory with MLA's 576/512 dims
    out += [dict(default, BH=64, BK=bk, num_warps=8, num_stages=ns, KT=0, STORE_DS=1, BP=bp,
                 BC=bc, WARPS_DS=wd)
            for bk, ns, bp, bc, wd in itertools.product([32, 64], [1, 2], [64, 128], [64, 128],
                                                        [4, 8])
            if head_rows(spec) == 64 and bk * ns <= 64 and bp * bc <= 128 * 64]
    return out, []


def _attention_bwd_launch(spec: DSASpec, flags: dict) -> dict:
    dka, dkb = dim_split(spec.dim_qk)
    dims = values(DK=spec.dim_qk, DKA=dka, DKB=dkb, DV=spec.dim_v,
                  BDV=triton.next_power_of_2(spec.dim_v), K=spec.topk)

    def form(*extra):
        return signature(
            ptrs("q", "k", "v", "idx", "do", "lse", "delta", "dq", "dk", "dv",
                 "tok_pos=lay.tok_pos", "tok_kbase=lay.tok_kbase"),
            strides("q", "qt", "qh"), strides("k", "kt", "kh"), strides("v", "vt", "vh"),
            strides("idx", "it"), strides("do", "ot", "oh"), strides("dq", "dqt", "dqh"),
            strides("dk", "dkt", "dkh"), strides("dv", "dvt", "dvh"),
            consts(qk_scale="QK_SCALE", sm_scale="SM_SCALE", H="H_KV", G="GROUP"),
            dims, *extra, consts(PREC="prec", VK="vk"), cfg("BH", "BK"), options=WARPS_STAGES)
    tables = ("tok_pos=lay.tok_pos", "tok_kbase=lay.tok_kbase")
    ws = strides("ws_ds", "wt", "wh")
    return dict(
        main=form(), kt=form(values(CW=column_chunks(spec)[0])),
        ds=signature(
            ptrs("q", "k", "v", "idx", "do", "o", "lse", "ds=ws_ds", "pw=ws_p", *tables),
            scalars("tok0"), strides("q", "qt", "qh"), strides("k", "kt", "kh"),
            strides("v", "vt", "vh"), strides("idx", "it"), strides("do", "ot", "oh"), ws,
            consts(qk_scale="QK_SCALE", H="H_KV", G="GROUP"), dims,
            consts(PREC="prec", VK="vk"), cfg("BH", "BK"),
            # with v its own tensor a step gathers two tiles: one buffer of each (MLA's 576/512
            # dims would not fit twice beside the resident q and dO)
            options=options(num_warps='cfg["WARPS_DS"]',
                            num_stages='cfg["num_stages"] if vk else 1')),
        dq=signature(
            ptrs("k", "idx", "ds=ws_ds", "dq", *tables), scalars("tok0"),
            strides("k", "kt", "kh"), strides("idx", "it"), ws, strides("dq", "dqt", "dqh"),
            consts(sm_scale="SM_SCALE", H="H_KV", G="GROUP"), dims, consts(PREC="prec"),
            cfg("BH", "BK"), options=WARPS_STAGES),
        dkv=signature(
            ptrs("q", "do", "idx", "ds=ws_ds", "pw=ws_p", "dk", "dv", *tables),
            scalars("tok0"), strides("q", "qt", "qh"), strides("do", "ot", "oh"),
            strides("idx", "it"), ws, strides("dk", "dkt", "dkh"), strides("dv", "dvt", "dvh"),
            consts(sm_scale="SM_SCALE", H="H_KV", G="GROUP"), dims,
            consts(PREC="prec", VK="vk"), cfg("BP", "BC", "BHK"),
            options=options(num_warps='cfg["num_warps"]', num_stages="2")))


# ---------------------------------------------------------------------------- dsa_indexer_loss
def _loss_default(spec: DSASpec, target: Target, why: list) -> dict:
    why.append("dsa_indexer_loss: one program per token over its picks, 32 at a time: the "
               "attention target recomputed from q, k and the saved LSE for every query head, "
               "the index scores recomputed; forward and backward store only two numbers per "
               "token (Z and the index scores' LSE), never [T, topk]")
    return dict(BK=32, num_warps=4, num_stages=1)


def _loss_space(spec: DSASpec, default: dict, target: Target, smem: int):
    return [dict(default, BK=bk, num_warps=nw) for bk, nw in itertools.product([16, 32, 64],
                                                                               [4, 8])], []


def _loss_launch(spec: DSASpec, flags: dict) -> dict:
    dka, dkb = dim_split(spec.dim_qk)
    common = (strides("q", "qt", "qh"), strides("k", "kt", "kh"),
              strides("q_idx", "qit", "qih"), strides("k_idx", "kit"), strides("w_idx", "wt"),
              strides("idx", "it"), strides("saved", "sv"),
              consts(qk_scale="QK_SCALE", H="H_KV", G="GROUP"),
              values(BH=head_rows(spec), DK=spec.dim_qk, DKA=dka, DKB=dkb,
                     DI=spec.indexer_dim, BDI=max(16, triton.next_power_of_2(spec.indexer_dim)),
                     HI=spec.indexer_heads, HIP=max(16, index_rows(spec)), K=spec.topk),
              consts(PREC="prec", DENSE="dense"), cfg("BK"))
    inputs = ("q", "k", "qi=q_idx", "ki=k_idx", "w=w_idx", "idx", "lse")
    tables = ("tok_pos=lay.tok_pos", "tok_kbase=lay.tok_kbase")
    return dict(
        fwd=signature(ptrs(*inputs, "loss", "saved", *tables), *common, options=WARPS_STAGES),
        bwd=signature(ptrs(*inputs, "saved", "dloss", "dqi", "dki", "dw", *tables),
                      *common, strides("dqi", "dqit", "dqih"), strides("dki", "dkit"),
                      strides("dw", "dwt"), options=WARPS_STAGES))


# ---------------------------------------------------------------------------- dsa_append
def _append_default(spec: DSASpec, target: Target, why: list) -> dict:
    why.append("dsa_append: a decode step's new token per sequence is written (key, value, "
               "indexer key" + (" quantized to FP8 with its scale" if spec.fp8_keys else "")
               + ") and the length advanced in one launch, one program per sequence")
    return dict(num_warps=4)


def _append_space(spec: DSASpec, default: dict, target: Target, smem: int):
    return [dict(default, num_warps=nw) for nw in (1, 2, 4)], []


def _append_launch(spec: DSASpec, flags: dict) -> dict:
    p2 = triton.next_power_of_2
    return dict(main=signature(
        ptrs("k", "v", "ki=k_idx", "ks=k_scale", "kt=k_t", "vt=v_t", "kit=k_idx_t", "lens"),
        strides("k", "kr", "kh"), strides("v", "vr", "vh"), strides("k_idx", "kir"),
        strides("k_t", "ktb", "kth"), strides("v_t", "vtb", "vth"), strides("k_idx_t", "kitb"),
        consts(MAX_LEN="max_len", HAS_V="has_v"),
        values(H=spec.heads_kv, DK=spec.dim_qk, BDK=p2(spec.dim_qk), DV=spec.dim_v,
               BDV=p2(spec.dim_v), DI=spec.indexer_dim, BDI=p2(spec.indexer_dim),
               FP8=spec.fp8_keys),
        options=WARPS))


DSA = (
    KernelDef("dsa_indexer", "dsa_indexer.py.jinja", "forward", _indexer_default,
              _indexer_space, _indexer_launch, ("indexer",)),
    KernelDef("dsa_topk", "dsa_topk.py.jinja", "forward", _topk_default, _topk_space,
              _topk_launch, ("topk_tokens",)),
    KernelDef("dsa_attention", "dsa_attention.py.jinja", "forward", _attention_default,
              _attention_space, _attention_launch, ("sparse_attn",)),
    KernelDef("dsa_indexer_loss", "dsa_indexer_loss.py.jinja", "forward", _loss_default,
              _loss_space, _loss_launch, ("indexer_loss",)),
    KernelDef("dsa_append", "dsa_append.py.jinja", "decode", _append_default, _append_space,
              _append_launch, ("append",)),
    KernelDef("dsa_attention_bwd", "dsa_attention_bwd.py.jinja", "backward",
              _attention_bwd_default, _attention_bwd_space, _attention_bwd_launch,
              ("sparse_attn",)),
)
