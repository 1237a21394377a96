"""Lowering a DSA spec (docs/algorithm.md section 8): the passes that map its op graph onto the
DSA kernels, each recording its decisions, as `ir.passes` does for NSA."""
from __future__ import annotations

from ..dsa_spec import DSASpec
from ..kernels import KERNELS
from ..kernels.dsa import column_chunks, dim_split, head_rows, values_from_keys
from ..target import Target, current
from .graph import build_graph
from .passes import Decisions, KernelPlan, Plan

# op-graph node -> the kernel that computes it, in launch order
_PARTITION = (("indexer", "dsa_indexer"), ("topk_tokens", "dsa_topk"),
              ("sparse_attn", "dsa_attention"), ("indexer_loss", "dsa_indexer_loss"))


def lower_dsa(spec: DSASpec, target: Target | None = None) -> Plan:
    """The forward plan of a DSA layer for `target` (default: the GPU at hand, else the default
    preset): indexer scores, token top-k and sparse attention, each with its default config."""
    target = target or current()
    g = build_graph(spec)
    why = Decisions().during("target")
    why.append(f"target {target.name} (sm_{target.arch}): {target.sm_count} SMs, "
               f"{target.smem_per_block // 1024} KiB shared memory per program")
    why.during("partition")
    why.append("indexer and top-k are separate kernels: the scores of one chunk of query tiles "
               "(at most DSA_SCORE_BYTES) are written, then selected, so memory stays "
               "O(chunk x T) rather than O(T^2)")
    dka, dkb = dim_split(spec.dim_qk)
    reuse = values_from_keys(spec)
    why.append(f"sparse_attn: keys {spec.dim_qk} wide are read as {dka}"
               + (f" + {dkb} columns" if dkb else " columns")
               + ("; v is the key's first columns when no v is given (MLA)"
                  if spec.dim_v <= spec.dim_qk else "")
               + ("; then the gathered key tile is the value tile (one gather a step, and "
                  "the backward adds dV into dK's tile before its one atomic add)" if reuse else ""))
    why.append("indexer_loss: a kernel of its own, run by the op's indexer_loss after the "
               "forward has chosen S_t and saved the attention's LSE (sparse stage), or after "
               "dsa_attention has run densely for the dense attention's LSE (warm-up stage)")
    why.during("tiles")
    kernels = []
    for node, name in _PARTITION:
        params = (dict(rows=head_rows(spec), values_from_keys=reuse)
                  if name == "dsa_attention" else {})
        kernels.append(KernelPlan(name, KERNELS[name].template, (node,), params=params,
                                  config=KERNELS[name].default(spec, target, why)))
        g.nodes[node]["kernel"] = name
    # decoding appends each step's token with a kernel of its own (nsagen.dsa_decode)
    kernels.append(KernelPlan("dsa_append", KERNELS["dsa_append"].template, (),
                              config=KERNELS["dsa_append"].default(spec, target, why)))
    why.during("backward")
    why.append("backward: sparse_attn only (the selection is not differentiated); the "
               "indexer's gradient comes from the indexer loss")
    _, chunks, value_chunks = column_chunks(spec)
    backward = [KernelPlan("dsa_attention_bwd", KERNELS["dsa_attention_bwd"].template,
                           ("sparse_attn",),
                           params=dict(rows=head_rows(spec), values_from_keys=reuse,
                                       chunks=chunks, value_chunks=value_chunks),
                           config=KERNELS["dsa_attention_bwd"].default(spec, target, why))]
    return Plan(spec=spec, graph=g, kernels=kernels, decisions=why, backward=backward,
                target=target)
