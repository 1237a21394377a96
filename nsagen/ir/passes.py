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

from ..costmodel import slc_loop_costs
from ..kernels import DECODE_SELECT_TILE, KERNELS, decode_tiles
from ..spec import Spec
from ..target import Target, current
from .graph import OPS, build_graph


class Decision(str):
    """One choice the compiler made, in words with its numbers, and the pass that made it."""

    pass_name: str

    def __new__(cls, text: str, pass_name: str) -> "Decision":
        obj = super().__new__(cls, text)
        obj.pass_name = pass_name
        return obj


class Decisions(list):
    """A lowering's decisions in order; `during(name)` attributes the next ones to a pass."""

    def __init__(self):
        super().__init__()
        self.pass_name = ""

    def during(self, name: str) -> "Decisions":
        self.pass_name = name
        return self

    def append(self, text: str) -> None:
        super().append(Decision(text, self.pass_name))


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
class Launch:
    """One launch of a length plan: a kernel of the module, the op-graph nodes it computes there,
    and the launch-time values that give it that role (e.g. the window kernel as the selected
    branch: `window`, the gate column `branch`, whether it initialises o, which keys it reads)."""

    kernel: str
    nodes: tuple[str, ...]
    args: dict = field(default_factory=dict)


@dataclass
class LengthPlan:
    """The launches for the calls whose every sequence holds at most `max_len` tokens, in place
    of the plan's kernels: a choice the IR makes per length bucket. `graph` is the op graph as
    this plan computes it."""

    max_len: int
    graph: nx.DiGraph
    forward: list[Launch]
    backward: list[Launch]


@dataclass
class Plan:
    """The lowered forward of a spec: kernels in launch order plus the reasons for each choice."""

    spec: Spec
    graph: nx.DiGraph
    kernels: list[KernelPlan]
    decisions: list[Decision]
    backward: list[KernelPlan] = field(default_factory=list)
    decode: "DecodePlan | None" = None
    target: Target | None = None
    short: LengthPlan | None = None     # the plan for short calls, when one differs

    def kernel(self, name: str) -> KernelPlan:
        return next(k for k in self.kernels if k.name == name)

    @property
    def rendered(self) -> list[KernelPlan]:
        """Every kernel the module holds: the forward's and backward's, then any that only the
        length plan launches (in the order it first launches them)."""
        out = self.kernels + self.backward
        have = {k.name for k in out}
        for step in (self.short.forward + self.short.backward) if self.short else []:
            if step.kernel not in have:
                have.add(step.kernel)
                kd = KERNELS[step.kernel]
                out.append(KernelPlan(step.kernel, kd.template, step.nodes,
                                      config=kd.default(self.spec, self.target, [])))
        return out


def _slc_loop_order(spec: Spec, target: Target, why: list[str]) -> str:
    """Query-outer (a token's G heads walk its blocks) or block-outer (a selected block is
    attended once by all the picks of it), whichever the cost model estimates cheaper."""
    cost = slc_loop_costs(spec, target)
    order = "block" if cost["block"] < cost["query"] else "query"
    ns = {k: f"{v * 1e9:.0f} ns" if v != float("inf") else "does not fit" for k, v in cost.items()}
    why.append(
        f"slc_attn loop order: {order}-outer. Estimated per "
        f"(token, KV head) on {target.name}: query-outer {ns['query']} (n={spec.slc_count} "
        f"blocks of K/V through L2 for G={spec.group} head rows, padded to {max(16, spec.group)}),"
        f" block-outer {ns['block']} (per free pick and head: q read, partial output written "
        "and merged, through memory; the forced blocks as dense tiles)")
    return order


def _kernel_graph(g: nx.DiGraph) -> nx.DiGraph:
    """The graph the partition rewrites: one group per computing node of the op graph (inputs,
    the output and `combine` are not kernels), with the op graph's dependencies between them.
    A group's `members` are the op nodes one kernel will compute."""
    kg = nx.DiGraph()
    for n, attrs in g.nodes(data=True):
        if attrs["op"] not in ("input", "output", "combine"):
            kg.add_node(n, members=(n,))
    kg.add_edges_from((a, b) for a, b in g.edges if a in kg and b in kg)
    return kg


def _fuse(kg: nx.DiGraph, keep: str, absorb: str) -> None:
    """Rewrite: the group of `absorb` joins the group of `keep` (one kernel computes both); the
    dependencies of both become the fused group's."""
    members = kg.nodes[keep]["members"] + kg.nodes[absorb]["members"]
    nx.contracted_nodes(kg, keep, absorb, self_loops=False, copy=False)
    kg.nodes[keep].clear()
    kg.nodes[keep]["members"] = members
    assert nx.is_directed_acyclic_graph(kg), f"fusing {absorb} into {keep} made a cycle"


def _kernel_for(group: tuple[str, ...], chosen: str | None) -> str:
    """The forward kernel that computes a group: the one the passes chose, else the one whose
    definition implements the group with the group's first node as its own first node."""
    if chosen:
        return chosen
    fits = [kd.name for kd in KERNELS.values() if kd.phase == "forward"
            and kd.implements[:1] == group[:1] and set(group) <= set(kd.implements)]
    assert len(fits) == 1, f"no single kernel implements {group}: {fits}"
    return fits[0]


def _partition(g: nx.DiGraph, spec: Spec, why: list[str], target: Target) -> list[KernelPlan]:
    """Partition the op graph into kernels by rewriting a graph of node groups: each fusion
    contracts two groups (and records why); the kernels are the remaining groups, in dependency
    order (ties in the op graph's canonical order)."""
    kg = _kernel_graph(g)
    if "compress" in kg:
        why.append("compress: mean pooling is parameter-free, so it is a kernel of its own "
                   "(one pass over K and V, output Nc = T/d rows)")
    if "importance" in kg:
        _fuse(kg, "cmp_attn", "importance")
        why.append("cmp_attn+importance fused: the probabilities p_cmp [T, HQ, Nc] never leave "
                   "registers; only group-summed block scores [T, H, NB] are written")
    if "cmp_attn" in kg and not spec.has("cmp"):
        why.append("cmp is not a branch: the compressed attention computes importance only "
                   "(no P@V, no output)")
    if "topk" in kg:
        why.append("topk is its own kernel: it needs every block score of a row, which the "
                   "compressed-attention tiles produce piecewise")
    if "slc_attn" in kg:
        order = _slc_loop_order(spec, target, why)
        if order == "query" and "win_attn" in kg and spec.window <= spec.slc_block:
            _fuse(kg, "slc_attn", "win_attn")
            why.append(f"win_attn fused into slc_attn: w={spec.window} <= l'={spec.slc_block}, "
                       "a per-token window loop is one key tile")
        # both loop orders implement slc_attn: the choice names the kernel
        kg.nodes["slc_attn"]["kernel"] = "slc_attention_kb" if order == "block" else "slc_attention"
    if "win_attn" in kg:
        why.append(f"win_attn in its own tiled kernel: w={spec.window} keys are shared by the "
                   "tokens of a tile, so tiles of tokens x heads beat per-token programs")
    kernels = []
    for lead in nx.lexicographical_topological_sort(kg, key=lambda n: OPS.index(g.nodes[n]["op"])):
        group = kg.nodes[lead]["members"]
        name = _kernel_for(group, kg.nodes[lead].get("kernel"))
        kernels.append(KernelPlan(name, KERNELS[name].template, group))
        for n in group:
            g.nodes[n]["kernel"] = name
    for k in kernels:
        if k.name == "cmp_attention":
            k.params.update(with_output=spec.has("cmp"), with_importance=spec.has("slc"))
        if k.name == "slc_attention":
            k.params["fuse_window"] = "win_attn" in k.nodes
    # combine is distributed: every kernel with an output edge into it folds its gated output
    # into o, the first one in launch order initialising it
    writers = [k for k in kernels if any(g.has_edge(n, "combine") for n in k.nodes)]
    for i, k in enumerate(writers):
        k.params["first"] = i == 0
    if writers:
        why.append(f"combine folded into the branch kernels: {writers[0].name} initialises o, "
                   + (", ".join(k.name for k in writers[1:]) or "nothing") + " accumulate(s)")
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


def _tiles(spec: Spec, kernels: list[KernelPlan], why: list[str], target: Target) -> None:
    """Default launch configs, each from its kernel's definition (the tuner may replace them)."""
    bdk = triton.next_power_of_2(spec.dim_qk)
    bdv = triton.next_power_of_2(spec.dim_v)
    if bdk != spec.dim_qk or bdv != spec.dim_v:
        why.append(f"head dims padded in registers: Dk {spec.dim_qk}->{bdk}, Dv {spec.dim_v}->{bdv}")
    for k in kernels:
        k.config = KERNELS[k.name].default(spec, target, why)


BACKWARD_OF = {kd.implements[0]: kd.name for kd in KERNELS.values()
               if kd.phase == "backward" and kd.implements[0] != "combine"}


def _backward(g: nx.DiGraph, spec: Spec, why: list[str], target: Target) -> list[KernelPlan]:
    """Backward kernels, read off the graph: the gate/delta prologue for `combine`, then one
    kernel (dq and dk/dv) per attention node whose output reaches `combine`. The selection path
    (importance -> topk) feeds no gradient, so a compressed attention that only scores blocks
    gets no backward kernel."""
    diff = [n for n in BACKWARD_OF if g.has_edge(n, "combine")]
    names = [("gate_delta", ("combine",))] + [(BACKWARD_OF[n], (n,)) for n in diff]
    if "compress" in g and g.has_edge("cmp_attn", "combine"):
        # mean pooling inside the op: its gradient goes on to k and v, after the compressed
        # branch's dk_cmp/dv_cmp are complete
        names.insert(names.index(("cmp_attention_bwd", ("cmp_attn",))) + 1,
                     (BACKWARD_OF["compress"], ("compress",)))
    for name, nodes in names:
        for n in nodes:
            g.nodes[n]["backward_kernel"] = name
    return [KernelPlan(n, KERNELS[n].template, nodes,
                       config=KERNELS[n].default(spec, target, why)) for n, nodes in names]


def _short_plan(g: nx.DiGraph, spec: Spec, kernels: list[KernelPlan], why: list[str],
                target: Target) -> LengthPlan | None:
    """Rewrite for short calls: while t < n*l' every candidate block of a query is chosen (section
    4 of docs/algorithm.md), so below that length the selected branch is dense causal attention.
    The graph loses `importance` and `topk`, and `slc_attn` becomes the window kernel with
    W = n*l' (tiles of tokens x heads instead of per-token gathers). The block indices are then
    not computed, so calls that ask for them take the full plan."""
    if "slc_attn" not in g:
        return None
    max_len = spec.slc_count * spec.slc_block
    gs = g.copy()
    # without the compressed branch its attention and the compression fed only the scores
    unused = ("importance", "topk") + (() if spec.has("cmp") else ("cmp_attn", "compress"))
    gs.remove_nodes_from([n for n in unused if n in gs])
    gs.nodes["slc_attn"]["dense"] = True
    names = {k.name for k in kernels}
    fwd: list[Launch] = []
    if "mean_compress" in names and spec.has("cmp"):
        fwd.append(Launch("mean_compress", ("compress",)))
    if spec.has("cmp"):
        fwd.append(Launch("cmp_attention", ("cmp_attn",), dict(scores=False)))
    fwd.append(Launch("win_attention", ("slc_attn",),
                      dict(window=max_len, branch=1, keys="slc", first=not spec.has("cmp"))))
    if spec.has("win"):
        fwd.append(Launch("win_attention", ("win_attn",),
                          dict(window=spec.window, branch=2, keys="win", first=False)))
    for step in fwd:
        for n in step.nodes:
            gs.nodes[n]["kernel"] = step.kernel
    gs.nodes["combine"]["kernel"] = ",".join(
        dict.fromkeys(st.kernel for st in fwd if st.kernel != "mean_compress"))
    tile = KERNELS["win_attention"].default(spec, target, [])
    bwd = [Launch("gate_delta", ("combine",))]
    if spec.has("cmp"):
        bwd.append(Launch("cmp_attention_bwd", ("cmp_attn",)))
        if "compress" in gs:
            bwd.append(Launch("mean_compress_bwd", ("compress",)))
    bwd.append(Launch("win_attention_bwd", ("slc_attn",), dict(window=max_len, branch=1, keys="slc")))
    if spec.has("win"):
        bwd.append(Launch("win_attention_bwd", ("win_attn",),
                          dict(window=spec.window, branch=2, keys="win")))
    for step in bwd:
        for n in step.nodes:
            gs.nodes[n]["backward_kernel"] = step.kernel
    why.append(f"calls of at most n*l' = {spec.slc_count}*{spec.slc_block} = {max_len} tokens: "
               "every query's candidate blocks all fit in its n, so the selected branch is dense "
               "causal attention; the short plan drops the block scores and the top-n and runs "
               "the selected branch as the window kernel with w = " + str(max_len)
               + f" (tiles of {tile['BT']} token(s) x {spec.group} heads instead of one token "
               "per program), forward and backward. "
               "Calls that ask for the block indices take the full plan")
    return LengthPlan(max_len=max_len, graph=gs, forward=fwd, backward=bwd)


def lower_nsa(spec: Spec, target: Target | None = None) -> Plan:
    """Run every pass on the spec's forward graph and return the kernel plan, for `target`
    (default: the GPU at hand, else the default preset; nsagen.target)."""
    target = target or current()
    g = build_graph(spec)
    why = Decisions().during("target")
    why.append(f"target {target.name} (sm_{target.arch}): {target.sm_count} SMs, "
               f"{target.smem_per_block // 1024} KiB shared memory per program, "
               f"{target.smem_per_sm // 1024} KiB per SM")
    kernels = _partition(g, spec, why.during("partition"), target)
    _lower_importance(spec, kernels, why.during("importance"))
    _tiles(spec, kernels, why.during("tiles"), target)
    backward = _backward(g, spec, why.during("backward"), target)
    short = _short_plan(g, spec, kernels, why.during("length"), target)
    return Plan(spec=spec, graph=g, kernels=kernels, decisions=why, backward=backward,
                decode=lower_decode(spec, target), target=target, short=short)


# ---------------------------------------------------------------------------- decoding
PROGRAM_OVERHEAD_KEYS = 64   # a program's fixed cost (q, partial writes, prologue) in keys read
MERGE_KEYS_PER_PARTIAL = 4   # merging one more partial per (sequence, KV head), in keys read


@dataclass
class DecodePlan:
    """The lowered decode step of a spec: kernels in launch order, the graph annotated with them,
    and the reasons. Split counts depend on the batch and the cache capacity, so the plan keeps
    the rule (`splits`) rather than numbers."""

    spec: Spec
    graph: nx.DiGraph
    kernels: list[KernelPlan]
    decisions: list[Decision]
    target: Target | None = None
    append: KernelPlan | None = None    # the cache append, launched by DecodeCache.append

    def kernel(self, name: str) -> KernelPlan:
        return next(k for k in self.kernels if k.name == name)

    def splits(self, batch: int, max_len: int) -> dict[str, int]:
        return decode_splits(self.spec, batch, max_len, self.target)


def _cheapest(cands: list[tuple], rows: int, slots: int):
    """The candidate (value, programs per row, keys per program) whose launch takes the fewest
    waves x keys per program (a program's fixed cost included) plus the merge of its partials
    (each program's partial is read again by the merging program of its row: on an H100 at
    B=1, 64k, 72 partials a row took 2.2 us longer than 40); ties go to fewer programs."""
    def cost(c):
        _, per_row, keys = c
        waves = -(-rows * per_row // slots)
        return waves * (keys + PROGRAM_OVERHEAD_KEYS) + per_row * MERGE_KEYS_PER_PARTIAL, per_row
    return min(cands, key=cost)[0]


def _window_in_cmp(spec: Spec) -> bool:
    """The window's chunks ride in the compressed pass's launch whenever there is one: the window
    does not depend on the selection, so it leaves the path after the top-n."""
    return spec.has("win") and (spec.has("cmp") or spec.has("slc"))


def decode_splits(spec: Spec, batch: int, max_len: int, target: Target | None = None,
                  resident: dict[str, int] | None = None) -> dict[str, int]:
    """How a decode step of `batch` sequences (cache capacity `max_len`) splits its keys.

    cmp: programs per (sequence, KV head) over the visible compressed keys; each takes a chunk
    of whole selection blocks, a multiple of cmp_quantum blocks (the chunk size follows each
    sequence's length on the device, so the grid is fixed and a step can be graph-captured).
    win_keys: window keys per program (in the compressed pass's launch when there is one, so
    cmp and win_keys are chosen together); slc_blocks: selected blocks per program.
    Each is the cheapest by a small cost model at full length: waves of resident programs
    (B*H*splits over SMs x programs per SM) times the keys each program reads, plus the merge
    of each row's partials, so small batches split finely (but not past what the merge
    repays) and large ones hardly at all. `resident` ({"cmp": n, "slc": n}, from the
    compiled kernels: nsagen.occupancy) replaces the shared-memory estimate of programs per SM.
    """
    target = target or current()
    sm_count = target.sm_count
    t = dict(decode_tiles(spec, target))
    for branch, n in (resident or {}).items():
        t[f"{branch}_resident"] = n
    rows = max(1, batch * spec.heads_kv)
    r2 = spec.slc_block // spec.cmp_stride
    out = dict(cmp=1, cmp_quantum=t["BJ"], slc_blocks=spec.slc_count, win_keys=t["BW"])
    w_pad = -(-(spec.window or 0) // t["BW"]) * t["BW"]
    wks = list(range(t["BW"], w_pad + 1, t["BW"])) if spec.has("win") else [t["BW"]]

    def n_win(wk):
        return -(-spec.window // wk) if spec.has("win") else 0

    if spec.has("cmp") or spec.has("slc"):
        nbo = max(1, -(-spec.num_cmp(max_len) // r2))          # blocks holding compressed keys
        cands = []
        for n in range(1, -(-nbo // t["BJ"]) + 1):
            cb = -(-(-(-nbo // n)) // t["BJ"]) * t["BJ"]        # blocks per chunk (whole tiles)
            for wk in (wks if _window_in_cmp(spec) else [t["BW"]]):
                nw = n_win(wk) if _window_in_cmp(spec) else 0
                keys = max(cb * r2, wk if nw else 0)
                cands.append(((n, wk), -(-nbo // cb) + nw, keys))
        out["cmp"], wk = _cheapest(cands, rows, sm_count * t["cmp_resident"])
        if _window_in_cmp(spec):
            out["win_keys"] = wk
    if spec.has("slc"):
        cands = []
        for spb in range(1, spec.slc_count + 1):
            n_slc = -(-spec.slc_count // spb)
            spb = -(-spec.slc_count // n_slc)                   # balanced: counts differ by <= 1
            cands.append((spb, n_slc, spb * spec.slc_block))
        out["slc_blocks"] = _cheapest(cands, rows, sm_count * t["slc_resident"])
    elif spec.has("win") and not _window_in_cmp(spec):         # window only: chunks of BW .. w
        out["win_keys"] = _cheapest([(wk, n_win(wk), wk) for wk in wks], rows,
                                    sm_count * t["slc_resident"])
    return out


def decode_programs(spec: Spec, batch: int, max_len: int, splits: dict[str, int],
                    target: Target | None = None) -> dict[str, int]:
    """Programs each decode kernel launches for `splits` (for --explain and the tests)."""
    t = decode_tiles(spec, target or current())
    rows = batch * spec.heads_kv
    nbp = max(16, triton.next_power_of_2(spec.num_blocks(max_len)))
    n_slc = -(-spec.slc_count // splits["slc_blocks"]) if spec.has("slc") else 0
    n_win = -(-spec.window // splits["win_keys"]) if spec.has("win") else 0
    out = {}
    if spec.has("cmp") or spec.has("slc"):
        out["decode_cmp"] = rows * (splits["cmp"] + n_win)
    if spec.has("slc"):
        out["decode_select"] = rows * max(1, nbp // DECODE_SELECT_TILE)
        out["decode_slc"] = rows * n_slc
    elif spec.has("win") and not _window_in_cmp(spec):
        out["decode_win"] = rows * n_win
    out["decode_combine"] = rows * (-(-spec.group // t["RB"])) * (
        -(-triton.next_power_of_2(spec.dim_v) // t["BDVC"]))      # unless decode_slc merges
    return out


def lower_decode(spec: Spec, target: Target | None = None) -> DecodePlan:
    """Lower a one-token decode step: flash-decoding style kernels split over the keys read."""
    target = target or current()
    g = build_graph(spec)
    g.graph["direction"] = "decode"
    why = Decisions().during("decode")
    t = decode_tiles(spec, target)
    G, gp = spec.group, t["GP"]
    r1 = spec.cmp_block // spec.cmp_stride
    r2 = spec.slc_block // spec.cmp_stride
    win_in_cmp = _window_in_cmp(spec)
    kernels: list[KernelPlan] = []
    why.append(f"decode: one query per sequence, so a program takes the G={G} query heads of one "
               f"(sequence, KV head) as rows ({gp} rows{', padded for tensor-core tiles' if gp > G else ''}) "
               "and the keys are split across programs (flash-decoding); every split writes a "
               "float32 partial (max, sum, P@V) into one buffer per (sequence, KV head): "
               "compressed chunks, then window chunks, then selected-block groups")
    if spec.has("cmp") or spec.has("slc"):
        nodes = ["cmp_attn"] + (["importance"] if spec.has("slc") else []) + (
            ["win_attn"] if win_in_cmp else [])
        imap = "identity" if r1 == 1 and r2 == 1 else "overlap"
        parts = 1 + (r1 + r2 - 2) // r2   # blocks one window reaches: its own and the next ones
        kernels.append(KernelPlan(
            "decode_cmp", KERNELS["decode_cmp"].template, tuple(nodes),
            params=dict(with_output=spec.has("cmp"), with_importance=spec.has("slc"),
                        with_win=win_in_cmp, importance_map=imap, spill=parts > 1, parts=parts),
            config=KERNELS["decode_cmp"].default(spec, target, why)))
        why.append(f"decode_cmp: each program takes a chunk of whole selection blocks of the "
                   f"visible compressed keys, {t['BC']} keys ({t['BJ']} blocks) per step, "
                   f"{t['stages']} stages; it writes a partial (max, sum"
                   + (", P@V" if spec.has("cmp") else "") + ") per chunk")
        if win_in_cmp:
            why.append("decode_cmp: the window's chunks are extra programs of the same launch "
                       "(the window does not depend on the selection): one stream over "
                       "compressed and window keys fills the GPU, and only the selected blocks "
                       "are read after the top-n")
        if spec.has("slc"):
            why.append("decode_cmp: block importance in the same pass, per head against the "
                       "tile's running max (stored with it), so once the LSE is known the scores "
                       "need no second read of the compressed keys"
                       + (f"; the keys of a block write {parts} parts (own block and the "
                          f"{parts - 1} after it, where windows reach) and decode_select adds "
                          "them, so chunk edges need no halo and no two programs write a value"
                          if parts > 1 else "")
                       + ("; weights per key offset (a reshape and a sum): a [keys, blocks] "
                          "tensor-core map costs twice the registers" if imap == "overlap" else ""))
    if spec.has("slc"):
        kernels.append(KernelPlan("decode_select", KERNELS["decode_select"].template,
                                  ("importance", "topk"),
                                  config=KERNELS["decode_select"].default(spec, target, why)))
        why.append(f"decode_select: a grid over tiles of {DECODE_SELECT_TILE} selection blocks "
                   "x KV heads x sequences merges the split maxima and sums into each head's "
                   "LSE, normalises the importance parts, sums them over the group and keeps the tile's best "
                   "free candidates (a 64-bit key per block: score bits above, reversed block "
                   "index below, so ties go to the lower block; up to RANK_MAX=128 keys, each "
                   "key's rank from one all-pairs comparison instead of n sequential maxima); "
                   "the last tile program of a "
                   "(sequence, KV head) to finish (an atomic counter) merges the tiles' "
                   "candidates with the forced blocks: one launch, and the sequential picks run "
                   "over tiles x n candidates instead of every block")
        kernels.append(KernelPlan(
            "decode_slc", KERNELS["decode_slc"].template, ("slc_attn",),
            params=dict(with_slc=True, with_win=False, merge=True, branches=tuple(spec.branches)),
            config=KERNELS["decode_slc"].default(spec, target, why)))
        why.append(f"decode_slc: each program takes a group of selected blocks and gathers "
                   f"their keys {t['BKS']} at a time (block index per key), so a group's "
                   "blocks are in flight together; it writes a partial (max, sum, P@V). With "
                   "MERGE=1 the last program of a (sequence, KV head) to finish (an atomic "
                   "counter) merges every branch's partials into o, saving decode_combine's "
                   "launch; off by default: the serial merge in one program measured slower "
                   "than the separate launch (results/h200/NOTES.md); the tuner may turn it on")
    elif spec.has("win") and not win_in_cmp:
        kernels.append(KernelPlan(
            "decode_win", KERNELS["decode_win"].template, ("win_attn",),
            params=dict(with_slc=False, with_win=True, merge=False),
            config=KERNELS["decode_win"].default(spec, target, why)))
        why.append(f"decode_win: chunks of the {spec.window}-key window, {t['BW']}-key steps; "
                   "each program writes a partial (max, sum, P@V)")
    kernels.append(KernelPlan("decode_combine", KERNELS["decode_combine"].template, ("combine",),
                              params=dict(branches=tuple(spec.branches)),
                              config=KERNELS["decode_combine"].default(spec, target, why)))
    why.append(f"decode_combine: merges each branch's partials (separate softmaxes) and folds "
               "them with the gates into o: the branch maxima, sums and gates become one weight "
               f"per partial and head, so o is one weighted sum; a program takes {t['RB']} "
               f"heads x {t['BDVC']} of the Dv columns and loads the partials of every branch "
               "at once (up to 64)" + ("; skipped when decode_slc's MERGE is on"
                                       if spec.has("slc") else ""))
    for k in kernels:
        for n in k.nodes:
            g.nodes[n]["kernel"] = k.name
    append = KernelPlan("decode_append", KERNELS["decode_append"].template, ("compress",),
                        params=dict(has_cmp=spec.has("cmp") or spec.has("slc")))
    why.append("decode_append: the token's k and v (and the window's own, when separate) are "
               "written at lens[b], the compressed token its new length completes is emitted "
               "(the mean of the last l keys and values, or the given learned one) and lens "
               "advances, in one launch of one program per sequence before the step's kernels")
    if "compress" in g:
        g.nodes["compress"]["kernel"] = "decode_append"
    for batch in (1, 8, 64):
        sp = decode_splits(spec, batch, 65536, target)
        progs = decode_programs(spec, batch, 65536, sp, target)
        why.append(f"splits at B={batch}, 64k cache, {target.sm_count} SMs of {target.name}: "
                   f"{sp} -> programs " + ", ".join(f"{k} {v}" for k, v in progs.items()))
    return DecodePlan(spec=spec, graph=g, kernels=kernels, decisions=why, target=target,
                      append=append)
