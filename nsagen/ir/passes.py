"""Passes over the op graph: partition into kernels, lower importance, order, pick tile shapes.

Each pass records *why* it decided what it did (`plan.decisions`), so `nsagen generate --explain`
can show it. The decisions depend on the spec: a spec without the window branch has no window
kernel, l = d = l' makes the importance map the identity, a small window fuses into the
selection kernel, G sets how many tokens share a tile, Dk != Dv pads the two dims separately.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import triton

from ..spec import Spec
from .graph import build_graph


@dataclass
class KernelPlan:
    """One generated kernel: which template renders it, its structural flags, default config."""

    name: str
    template: str
    nodes: tuple[str, ...]
    params: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    def __getattr__(self, key: str):
        # templates read structural flags as attributes (k.fuse_window); a missing one is an error
        params = self.__dict__.get("params", {})
        if key in params:
            return params[key]
        raise AttributeError(f"kernel {self.__dict__.get('name')!r} has no parameter {key!r}")


@dataclass
class Plan:
    """The lowered forward of a spec: kernels in launch order plus the reasons for each choice."""

    spec: Spec
    graph: nx.DiGraph
    kernels: list[KernelPlan]
    decisions: list[str]
    backward: list[KernelPlan] = field(default_factory=list)

    def kernel(self, name: str) -> KernelPlan:
        return next(k for k in self.kernels if k.name == name)


def _partition(g: nx.DiGraph, spec: Spec, why: list[str]) -> list[KernelPlan]:
    """Fuse graph nodes into kernels."""
    kernels: list[KernelPlan] = []
    if "compress" in g:
        kernels.append(KernelPlan("mean_compress", "mean_compress.py.jinja", ("compress",)))
        why.append("compress: mean pooling is parameter-free, so it is a kernel of its own "
                   "(one pass over K and V, output Nc = T/d rows)")
    if "cmp_attn" in g:
        nodes = ["cmp_attn"] + (["importance"] if "importance" in g else [])
        kernels.append(KernelPlan("cmp_attention", "cmp_attention.py.jinja", tuple(nodes),
                                  params=dict(with_output=spec.has("cmp"),
                                              with_importance=spec.has("slc"))))
        if spec.has("slc"):
            why.append("cmp_attn+importance fused: the probabilities p_cmp [T, HQ, Nc] never leave "
                       "registers; only group-summed block scores [T, H, NB] are written")
        if not spec.has("cmp"):
            why.append("cmp is not a branch: the compressed attention computes importance only "
                       "(no P@V, no output)")
    if "topk" in g:
        kernels.append(KernelPlan("select_blocks", "select_blocks.py.jinja", ("topk",)))
        why.append("topk is its own kernel: it needs every block score of a row, which the "
                   "compressed-attention tiles produce piecewise")
    if "slc_attn" in g:
        fuse = spec.has("win") and spec.window <= spec.slc_block
        nodes = ("slc_attn", "win_attn") if fuse else ("slc_attn",)
        kernels.append(KernelPlan("slc_attention", "slc_attention.py.jinja", nodes,
                                  params=dict(fuse_window=fuse)))
        if fuse:
            why.append(f"win_attn fused into slc_attn: w={spec.window} <= l'={spec.slc_block}, a "
                       "per-token window loop is one key tile")
    if "win_attn" in g and not any("win_attn" in k.nodes for k in kernels):
        kernels.append(KernelPlan("win_attention", "win_attention.py.jinja", ("win_attn",)))
        why.append(f"win_attn in its own tiled kernel: w={spec.window} keys are shared by the "
                   "tokens of a tile, so tiles of tokens x heads beat per-token programs")
    # combine is distributed: every branch kernel folds its gated output into o
    writers = [k for k in kernels if k.name in ("cmp_attention", "slc_attention", "win_attention")
               and (k.name != "cmp_attention" or spec.has("cmp"))]
    for i, k in enumerate(writers):
        k.params["first"] = i == 0
    if writers:
        why.append(f"combine folded into the branch kernels: {writers[0].name} initialises o, "
                   + (", ".join(k.name for k in writers[1:]) or "nothing") + " accumulate(s)")
    for k in kernels:
        for n in k.nodes:
            g.nodes[n]["kernel"] = k.name
    g.nodes["combine"]["kernel"] = ",".join(k.name for k in writers)
    return kernels


def _lower_importance(spec: Spec, kernels: list[KernelPlan], why: list[str]) -> None:
    r1 = spec.cmp_block // spec.cmp_stride
    r2 = spec.slc_block // spec.cmp_stride
    for k in kernels:
        if k.name != "cmp_attention":
            continue
        if r1 == 1 and r2 == 1:
            k.params.update(importance_map="identity", spill=False)
            if spec.has("slc"):
                why.append("importance: l = d = l', the block map is the identity (no mapping GEMM)")
        else:
            k.params.update(importance_map="overlap", spill=r1 > 1)
            if spec.has("slc"):
                why.append(f"importance: overlap map with l/d={r1}, l'/d={r2} as a [BC, BC/{r2}] "
                           f"matrix product" + (f"; windows spill {r1 - 1} chunk(s) into the next "
                                                "tile, carried in registers" if r1 > 1 else ""))


SMEM_BUDGET = 224 * 1024  # Hopper allows 227 KB per block; the estimate is slightly high


def smem_bytes(rows: int, keys: int, dk: int, dv: int, stages: int, elem: int = 2) -> int:
    """Rough shared memory of a pipelined attention loop: K and V tiles per stage plus Q."""
    return stages * keys * (dk + dv) * elem + rows * dk * elem


def _tiles(spec: Spec, kernels: list[KernelPlan], why: list[str]) -> None:
    """Default launch configs (the autotuner may replace them per GPU)."""
    G = spec.group
    gp = triton.next_power_of_2(G)
    r2 = spec.slc_block // spec.cmp_stride
    bdk = triton.next_power_of_2(spec.dim_qk)
    bdv = triton.next_power_of_2(spec.dim_v)
    if bdk != spec.dim_qk or bdv != spec.dim_v:
        why.append(f"head dims padded in registers: Dk {spec.dim_qk}->{bdk}, Dv {spec.dim_v}->{bdv}")
    for k in kernels:
        if k.name == "mean_compress":
            k.config = dict(BI=32, num_warps=4)
        elif k.name == "cmp_attention":
            bt, bc, stages = max(1, 128 // gp), max(128, 16 * r2), 3
            bc_min = max(64, 16 * r2)
            while smem_bytes(bt * gp, bc, bdk, bdv, stages) > SMEM_BUDGET:
                if stages > 2:
                    stages -= 1
                elif bc > bc_min:
                    bc //= 2
                elif bt > 1:
                    bt //= 2
                else:
                    break
            k.config = dict(BT=bt, GP=gp, BC=bc, num_warps=8 if bt * gp >= 128 else 4,
                            num_stages=stages)
            why.append(f"cmp_attention tile: {bt} token(s) x {gp} head rows (G={G}) = {bt * gp} "
                       f"rows, {bc} compressed keys per step, {stages} stages "
                       f"(~{smem_bytes(bt * gp, bc, bdk, bdv, stages) // 1024} KB shared memory)")
        elif k.name == "select_blocks":
            k.config = dict(BT=1, num_warps=2)
        elif k.name == "slc_attention":
            gps = max(16, gp)
            k.config = dict(GP=gps, BK=min(spec.slc_block, 64), num_warps=2, num_stages=2)
            why.append(f"slc_attention: one token x {G} heads per program, rows padded to {gps} "
                       "for tensor-core tiles" + (" (small group: padded)" if gps > G else ""))
        elif k.name == "win_attention":
            bt = max(1, 128 // gp)
            k.config = dict(BT=bt, GP=gp, BK=32, num_warps=4, num_stages=3)
            why.append(f"win_attention tile: {bt} token(s) x {gp} head rows, 32-key steps")


def _backward(spec: Spec, why: list[str]) -> list[KernelPlan]:
    """Backward kernels, one template per branch (dq and dk/dv kernels in each)."""
    gp = triton.next_power_of_2(spec.group)
    out = [KernelPlan("gate_delta", "gate_delta.py.jinja", ("combine",),
                      config=dict(BR=max(1, 4096 // triton.next_power_of_2(spec.dim_v)),
                                  num_warps=4))]
    why.append("backward prologue: gate gradients and every branch's delta in one pass over dO")
    if spec.has("cmp"):
        out.append(KernelPlan("cmp_attention_bwd", "cmp_attention_bwd.py.jinja", ("cmp_attn",),
                              config=dict(BT=max(1, 64 // gp), GP=gp, BC=64, num_warps=4)))
        why.append("backward cmp: recompute P from the saved LSE; dq per token tile, dk_cmp/dv_cmp "
                   "per compressed tile over the queries that see it; no gradient through importance")
    if spec.has("slc"):
        gps = max(16, gp)
        out.append(KernelPlan("slc_attention_bwd", "slc_attention_bwd.py.jinja", ("slc_attn",),
                              config=dict(GP=gps, BK=min(spec.slc_block, 64),
                                          BT_BWD=max(1, 64 // gps), CHUNK_ITERS=64, num_warps=4)))
        why.append("backward slc: dk/dv per (block, KV head) over an inverse map of the tokens "
                   "that chose it, so the cost follows the selected pairs; each block's tokens "
                   "in chunks of 64 tiles, added atomically (the initial block is chosen by every "
                   "token and would otherwise serialise the launch)")
    if spec.has("win"):
        out.append(KernelPlan("win_attention_bwd", "win_attention_bwd.py.jinja", ("win_attn",),
                              config=dict(BT=max(1, 64 // gp), GP=gp, BK=64, num_warps=4)))
    return out


def lower(spec: Spec) -> Plan:
    """Run every pass on the spec's forward graph and return the kernel plan."""
    g = build_graph(spec)
    why: list[str] = []
    kernels = _partition(g, spec, why)
    _lower_importance(spec, kernels, why)
    _tiles(spec, kernels, why)
    backward = _backward(spec, why)
    return Plan(spec=spec, graph=g, kernels=kernels, decisions=why, backward=backward)
