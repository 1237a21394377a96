"""The op graph of one layer (NSA, or DSA): typed nodes, edges carrying symbolic shapes.

`build_graph(spec)` states *what* is computed (docs/algorithm.md), independent of how it is split
into kernels; the passes in `nsagen.ir.passes` decide that.
"""
from __future__ import annotations

import networkx as nx
import sympy

from ..dsa_spec import DSASpec
from ..spec import Spec

T, B = sympy.symbols("T B", integer=True, positive=True)

OPS = ("input", "compress", "cmp_attn", "importance", "topk", "slc_attn", "win_attn", "combine",
       "indexer", "topk_tokens", "sparse_attn", "indexer_loss", "output")


def _nc(spec: Spec):
    return sympy.floor((T - spec.cmp_block) / spec.cmp_stride) + 1


def build_graph(spec: Spec | DSASpec) -> nx.DiGraph:
    """The forward graph of the spec: only the branches it lists, only the inputs it needs (a DSA
    spec: `dsa_graph`)."""
    if spec.family == "dsa":
        return dsa_graph(spec)
    g = nx.DiGraph(spec=spec, direction="forward")
    HQ, H, Dk, Dv = spec.heads_q, spec.heads_kv, spec.dim_qk, spec.dim_v
    nc = _nc(spec)
    nb = sympy.ceiling(T / spec.slc_block)

    def node(name, op, **attrs):
        assert op in OPS, op
        g.add_node(name, op=op, **attrs)

    def edge(a, b, tensor, shape):
        if g.has_edge(a, b):  # one producer handing two tensors to one consumer (k_cmp, v_cmp)
            e = g.edges[a, b]
            e["tensor"] += f", {tensor}"
            e["shape"] = e["shape"] if tuple(shape) == e["shape"] else (*e["shape"], "|", *shape)
            return
        g.add_edge(a, b, tensor=tensor, shape=tuple(shape))

    for name, shape in (("q", (B, T, HQ, Dk)), ("k", (B, T, H, Dk)), ("v", (B, T, H, Dv)),
                        ("gates", (B, T, HQ, 3))):
        node(name, "input", shape=shape)
    if spec.kv_per_branch == "separate" and spec.has("win"):
        node("k_win", "input", shape=(B, T, H, Dk))
        node("v_win", "input", shape=(B, T, H, Dv))
    node("combine", "combine", branches=spec.branches)
    node("o", "output", shape=(B, T, HQ, Dv))
    edge("combine", "o", "o", (B, T, HQ, Dv))
    edge("gates", "combine", "gates", (B, T, HQ, 3))

    if spec.has("cmp") or spec.has("slc"):
        if spec.learned_compression:
            node("k_cmp", "input", shape=(B, nc, H, Dk))
            node("v_cmp", "input", shape=(B, nc, H, Dv))
            kc, vc = "k_cmp", "v_cmp"
        else:
            node("compress", "compress", kind=spec.cmp_kind, block=spec.cmp_block,
                 stride=spec.cmp_stride)
            edge("k", "compress", "k", (B, T, H, Dk))
            edge("v", "compress", "v", (B, T, H, Dv))
            kc = vc = "compress"
        node("cmp_attn", "cmp_attn", branch="cmp")
        edge("q", "cmp_attn", "q", (B, T, HQ, Dk))
        edge(kc, "cmp_attn", "k_cmp", (B, nc, H, Dk))
        edge(vc, "cmp_attn", "v_cmp", (B, nc, H, Dv))
        if spec.has("cmp"):
            edge("cmp_attn", "combine", "o_cmp", (B, T, HQ, Dv))
    if spec.has("slc"):
        node("importance", "importance", block=spec.slc_block, stride=spec.cmp_stride,
             window=spec.cmp_block)
        node("topk", "topk", count=spec.slc_count, initial=spec.slc_initial, local=spec.slc_local)
        node("slc_attn", "slc_attn", branch="slc", block=spec.slc_block)
        edge("cmp_attn", "importance", "p_cmp", (B, T, HQ, nc))
        edge("importance", "topk", "score", (B, T, H, nb))
        edge("topk", "slc_attn", "indices", (B, T, H, spec.slc_count))
        edge("q", "slc_attn", "q", (B, T, HQ, Dk))
        edge("k", "slc_attn", "k", (B, T, H, Dk))
        edge("v", "slc_attn", "v", (B, T, H, Dv))
        edge("slc_attn", "combine", "o_slc", (B, T, HQ, Dv))
    if spec.has("win"):
        node("win_attn", "win_attn", branch="win", window=spec.window)
        src = "k_win" if "k_win" in g else "k"
        edge("q", "win_attn", "q", (B, T, HQ, Dk))
        edge(src, "win_attn", "k", (B, T, H, Dk))
        edge("v_win" if src == "k_win" else "v", "win_attn", "v", (B, T, H, Dv))
        edge("win_attn", "combine", "o_win", (B, T, HQ, Dv))
    return g


def dsa_graph(spec: DSASpec) -> nx.DiGraph:
    """The graph of a DSA layer (docs/algorithm.md section 8): the indexer scores every earlier
    token, the top-k keeps `topk` of them, the sparse attention runs over those; the indexer
    loss (training) compares the indexer's distribution with the attention's, from the
    attention's saved LSE. With no `v` the value is the key's first Dv columns."""
    g = nx.DiGraph(spec=spec, direction="forward")
    HQ, H, Dk, Dv = spec.heads_q, spec.heads_kv, spec.dim_qk, spec.dim_v
    HI, DI, K = spec.indexer_heads, spec.indexer_dim, spec.topk
    for name, shape in (("q", (B, T, HQ, Dk)), ("k", (B, T, H, Dk)), ("v", (B, T, H, Dv)),
                        ("q_idx", (B, T, HI, DI)), ("k_idx", (B, T, DI)), ("w_idx", (B, T, HI))):
        g.add_node(name, op="input", shape=shape)
    g.add_node("indexer", op="indexer", heads=HI, dim=DI, key_dtype=spec.key_dtype)
    g.add_node("topk_tokens", op="topk_tokens", topk=K)
    g.add_node("sparse_attn", op="sparse_attn", group=spec.group)
    g.add_node("indexer_loss", op="indexer_loss")
    g.add_node("o", op="output", shape=(B, T, HQ, Dv))
    g.add_node("loss", op="output", shape=())
    for a, b, tensor, shape in (
            ("q_idx", "indexer", "q_idx", (B, T, HI, DI)), ("k_idx", "indexer", "k_idx", (B, T, DI)),
            ("w_idx", "indexer", "w_idx", (B, T, HI)),
            ("indexer", "topk_tokens", "scores (one chunk of queries at a time)", (B, T, T)),
            ("topk_tokens", "sparse_attn", "indices", (B, T, K)),
            ("q", "sparse_attn", "q", (B, T, HQ, Dk)), ("k", "sparse_attn", "k", (B, T, H, Dk)),
            ("v", "sparse_attn", "v (or k[..., :Dv])", (B, T, H, Dv)),
            ("sparse_attn", "o", "o", (B, T, HQ, Dv)),
            ("indexer", "indexer_loss", "scores on the indices", (B, T, K)),
            ("sparse_attn", "indexer_loss", "lse", (B, T, HQ)),
            ("indexer_loss", "loss", "loss", ())):
        g.add_edge(a, b, tensor=tensor, shape=shape)
    return g


def describe(g: nx.DiGraph) -> str:
    """A readable listing of the graph: nodes in topological order with their edges and kernels."""
    lines = []
    for name in nx.topological_sort(g):
        attrs = g.nodes[name]
        extra = {k: v for k, v in attrs.items() if k not in ("op", "kernel", "shape")}
        kern = f"  -> kernel {attrs['kernel']}" if "kernel" in attrs else ""
        lines.append(f"  {name} [{attrs['op']}]{' ' + str(extra) if extra else ''}{kern}")
        for _, dst, e in g.out_edges(name, data=True):
            shape = ", ".join(str(s) for s in e["shape"])
            lines.append(f"      {e['tensor']}: [{shape}] -> {dst}")
    return "\n".join(lines)
