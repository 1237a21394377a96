"""The NSA layer a model uses: projections, learned compression, gates and rotary embeddings
around the generated op, for training (`forward(x)`) and decoding (`forward(x, cache=...)`).

Placement of the rotary embedding (RoPE) relative to compression, fixed here and in
docs/layer.md:

- Queries, and the keys of the selection and window branches, are rotated at their own
  positions (positions restart at every sequence of a `cu_seqlens` batch).
- Learned compression (`linear`, `mlp`) sees un-rotated keys: phi maps the l raw keys of window
  i to one key, which is then rotated at the window's last position `i*d + l - 1`, the first
  position whose query can see it. The intra-block position encoding of `mlp` therefore carries
  the order inside a window, and RoPE carries the distance between query and window.
- `mean` compression is computed by the op itself from the keys it is given, i.e. from rotated
  keys (so the fused compression kernel and the decode cache's own compression are used).
- Values are never rotated.

`rope` may also name the branches whose queries and keys are rotated, e.g.
`rope=("slc", "win")`: the compressed branch and the block scores then read an un-rotated query
(`q_cmp`) and un-rotated compressed keys (their mean, or phi's output), so the scores that pick
blocks follow content rather than distance (docs/layer.md). The selected and window branches
share one query, so they are rotated together.
"""
from __future__ import annotations

import os
from functools import partial
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import reference
from .distributed import gather, share_positions
from .rope import apply_rope, rope_tables
from .selection_grad import DISTILL_STRIDE, chosen_block_score, distill_loss, with_loss
from .spec import Spec
from .ops import build
from .specfile import load_spec

__all__ = ["SparseAttention", "SparseAttentionCache", "Compression", "reference_op",
           "apply_rope", "rope_tables"]


# ---------------------------------------------------------------------------------- phi
class Compression(nn.Module):
    """phi: the l keys (or values) of a compression window -> one compressed token.

    Shared by all KV heads. Kinds (the spec's `compression.kind`):

    - `mean`: the average of the window (no parameters).
    - `linear`: one linear map of the flattened window [l*D] -> [D]; initialised to the mean.
    - `mlp`: the paper's MLP with an intra-block position encoding: a learned [l, D] encoding is
      added to the window, which is flattened and passed through Linear -> SiLU -> Linear; the
      result is added to the window mean. The output layer starts at zero, so phi starts as the
      mean and learns a correction.
    """

    def __init__(self, kind: str, block: int, stride: int, dim: int, hidden: int | None = None,
                 device=None, dtype=None):
        super().__init__()
        self.kind, self.block, self.stride, self.dim = kind, block, stride, dim
        fk = dict(device=device, dtype=dtype)
        if kind == "linear":
            self.proj = nn.Linear(block * dim, dim, **fk)
        elif kind == "mlp":
            hidden = 2 * dim if hidden is None else hidden
            self.pos = nn.Parameter(torch.empty(block, dim, **fk))
            self.fc1 = nn.Linear(block * dim, hidden, **fk)
            self.fc2 = nn.Linear(hidden, dim, **fk)
        elif kind != "mean":
            raise ValueError(f"compression.kind: {kind!r}: choose from mean, linear, mlp")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Linear: exactly the mean. MLP: mean plus a zero correction, small position encoding."""
        with torch.no_grad():
            if self.kind == "linear":
                eye = torch.eye(self.dim, device=self.proj.weight.device)
                self.proj.weight.copy_(eye.repeat(1, self.block) / self.block)
                self.proj.bias.zero_()
            elif self.kind == "mlp":
                nn.init.normal_(self.pos, std=0.02)
                self.fc1.reset_parameters()
                self.fc2.weight.zero_()
                self.fc2.bias.zero_()

    def reduce(self, w: torch.Tensor) -> torch.Tensor:
        """Windows [..., l, D] -> compressed tokens [..., D]."""
        if self.kind == "linear":
            return self.proj(w.flatten(-2))
        mean = w.mean(-2)
        if self.kind == "mean":
            return mean
        h = F.silu(self.fc1((w + self.pos.to(w.dtype)).flatten(-2)))
        return mean + self.fc2(h)

    def forward(self, x: torch.Tensor, seqlens: Optional[list[int]] = None) -> torch.Tensor:
        """x [B, T, H, D] -> [B, Nc(T), H, D]; with `seqlens` (a packed B == 1 batch) every
        sequence is compressed on its own and the results are packed in order."""
        if seqlens is None:
            return self._one(x)
        parts, t0 = [], 0
        for n in seqlens:
            parts.append(self._one(x[:, t0:t0 + n]))
            t0 += n
        return torch.cat(parts, 1)

    def _one(self, x: torch.Tensor) -> torch.Tensor:
        B, T, H, D = x.shape
        if T < self.block:
            return x.new_zeros(B, 0, H, D) + 0 * x[:, :0].sum()  # keeps x in the graph
        w = x.unfold(1, self.block, self.stride).transpose(-1, -2)   # [B, Nc, H, l, D]
        return self.reduce(w)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, block={self.block}, stride={self.stride}, dim={self.dim}"


# ---------------------------------------------------------------------------------- the op
def reference_op(spec: Spec) -> Callable:
    """A callable with the op's signature that runs nsagen.reference.nsa: wire it into
    SparseAttention(op=...) to check or debug the layer against the PyTorch oracle."""

    def run(q, k, v, gates=None, k_cmp=None, v_cmp=None, cu_seqlens=None,
            return_indices=False, k_win=None, v_win=None, q_cmp=None, cu_seqlens_k=None,
            return_branches=False):
        return reference.nsa(q, k, v, gates, spec, k_cmp, v_cmp, cu_seqlens, return_indices,
                             k_win=k_win, v_win=v_win, q_cmp=q_cmp, cu_seqlens_k=cu_seqlens_k,
                             return_branches=return_branches)

    run.spec = spec
    return run


def _check_positive_int(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: {value!r}: must be a positive integer")


# ---------------------------------------------------------------------------------- layer
class SparseAttention(nn.Module):
    """Native Sparse Attention layer: x [B, T, hidden_size] -> [B, T, hidden_size].

    Args:
        spec: the layer's Spec (or a path / shipped spec name).
        hidden_size: model width. With `match_width` (default) it must equal
            heads.q * head_dim.v, as in a usual transformer block; pass `match_width=False` to
            project between different widths (e.g. the paper's Dk=192, Dv=128 heads).
        rope: rotate queries and keys (see the module docstring for the placement): True, False,
            or the branches to rotate (e.g. ("slc", "win"): the compressed branch and the block
            scores un-rotated); `rope_theta` is the base.
        gate_bias: initial gate logits per branch, e.g. {"cmp": 2.0} starts the compressed
            gate at sigmoid(2) = 0.88 instead of 0.5 (default 0 for every branch).
        gate_hidden: width of the gate MLP (Linear -> SiLU -> Linear -> sigmoid), default
            max(16, hidden_size // 8); one gate per query head and branch.
        cmp_hidden: hidden width of the `mlp` compression (default 2 * head dim).
        bias: bias in the q/k/v/o projections.
        op: the attention op; default `nsagen.build(spec)`. Any callable with the op's
            signature works (e.g. `reference_op(spec)`); decoding needs `op.new_cache`.
        selection_grad: "none" (the paper: the block choice gets no gradient), or beyond the
            paper "straight-through" (the selected branch's gate gradient also reaches the
            chosen blocks' scores) or "distill" (a loss of weight `selection_weight` trains
            the learned compression, and only it, so that the block scores rank the chosen
            blocks as the selected branch's attention does; its gradient joins the backward
            unscaled by a GradScaler or an accumulation factor). nsagen.selection_grad says
            how; training without cu_seqlens or cp_group. After a "distill" training call,
            `last_selection_loss` holds the loss (detached).
        cp_group: context parallelism over this torch.distributed group: x is then this rank's
            zig-zag share [B, T / W, hidden] (`nsagen.distributed.shard`), and so is the
            output (docs/distributed.md); training and prefill only.

    With `kv_per_branch: separate` the selection branch uses k_proj/v_proj, the window branch
    k_win_proj/v_win_proj and a learned compression k_cmp_proj/v_cmp_proj; with `mean`
    compression the compressed tokens are the op's mean of the selection keys.
    """

    def __init__(self, spec: Spec | str | os.PathLike, hidden_size: int, *,
                 rope: bool | tuple[str, ...] = True, rope_theta: float = 10000.0,
                 gate_hidden: int | None = None, cmp_hidden: int | None = None,
                 bias: bool = False, match_width: bool = True, op=None,
                 gate_bias: dict[str, float] | None = None, cp_group=None,
                 selection_grad: str = "none", selection_weight: float = 1.0, device=None,
                 dtype=None):
        super().__init__()
        if isinstance(spec, (str, os.PathLike)):
            spec = load_spec(spec)
        if not isinstance(spec, Spec):
            raise TypeError(f"spec: expected an nsagen.Spec, a spec path or a shipped spec name, "
                            f"got {type(spec).__name__}")
        _check_positive_int("hidden_size", hidden_size)
        HQ, H, Dk, Dv = spec.heads_q, spec.heads_kv, spec.dim_qk, spec.dim_v
        if match_width:
            if hidden_size % HQ:
                raise ValueError(
                    f"hidden_size: {hidden_size}: not divisible by the spec's heads.q ({HQ}); "
                    f"with match_width=True it must equal heads.q * head_dim.v = {HQ * Dv}")
            if hidden_size != HQ * Dv:
                raise ValueError(
                    f"hidden_size: {hidden_size}: does not match the spec's heads.q * head_dim.v "
                    f"= {HQ} * {Dv} = {HQ * Dv} (use a spec with head_dim.v = "
                    f"{hidden_size // HQ}, or pass match_width=False to project between widths)")
        rope_cmp, rope_main = _rope_branches(rope)
        if rope_cmp or rope_main:
            if Dk % 2:
                raise ValueError(f"head_dim.qk: {Dk}: rotary embeddings need an even head dim "
                                 f"(or pass rope=False)")
            if not (isinstance(rope_theta, (int, float)) and rope_theta > 0):
                raise ValueError(f"rope_theta: {rope_theta!r}: must be a positive number")
        _check_positive_int("gate_hidden", gate_hidden, allow_none=True)
        _check_positive_int("cmp_hidden", cmp_hidden, allow_none=True)

        self.spec, self.hidden_size = spec, hidden_size
        self.rope, self.rope_theta = rope, float(rope_theta)
        self.rope_cmp, self.rope_main = rope_cmp, rope_main
        if selection_grad not in ("none", "straight-through", "distill"):
            raise ValueError(f"selection_grad: expected 'none', 'straight-through' or 'distill', "
                             f"got {str(selection_grad)[:40]!r}")
        if (isinstance(selection_weight, bool) or not isinstance(selection_weight, (int, float))
                or not 0 < selection_weight < float("inf")):
            raise ValueError(f"selection_weight: expected a positive number, got "
                             f"{str(selection_weight)[:40]!r}")
        self.selection_weight = float(selection_weight)
        self.last_selection_loss: torch.Tensor | None = None
        self.op = op
        self._rope_cache: dict = {}
        self.cp_group = cp_group
        self.selection_grad = selection_grad
        fk = dict(device=device, dtype=dtype)
        self.uses_cmp = spec.has("cmp") or spec.has("slc")
        self.learned = self.uses_cmp and spec.learned_compression
        # the layer makes the compressed tokens itself: learned phi, or a mean of keys rotated
        # differently from the selected branch's (which the op's own mean would read)
        self.own_cmp = self.learned or (self.uses_cmp and rope_cmp != rope_main)
        if selection_grad == "distill" and not self.learned:
            raise ValueError("selection_grad='distill' trains the learned compression: needs a "
                             "spec with a compressed branch and cmp_kind linear or mlp")
        self.separate = spec.kv_per_branch == "separate"
        self.q_proj = nn.Linear(hidden_size, HQ * Dk, bias=bias, **fk)
        self.k_proj = nn.Linear(hidden_size, H * Dk, bias=bias, **fk)
        self.v_proj = nn.Linear(hidden_size, H * Dv, bias=bias, **fk)
        if self.separate and self.learned:
            self.k_cmp_proj = nn.Linear(hidden_size, H * Dk, bias=bias, **fk)
            self.v_cmp_proj = nn.Linear(hidden_size, H * Dv, bias=bias, **fk)
        if self.separate and spec.has("win"):
            self.k_win_proj = nn.Linear(hidden_size, H * Dk, bias=bias, **fk)
            self.v_win_proj = nn.Linear(hidden_size, H * Dv, bias=bias, **fk)
        self.o_proj = nn.Linear(HQ * Dv, hidden_size, bias=bias, **fk)
        if self.own_cmp:
            kw = dict(kind=spec.cmp_kind, block=spec.cmp_block, stride=spec.cmp_stride,
                      hidden=cmp_hidden, **fk)
            self.phi_k = Compression(dim=Dk, **kw)
            self.phi_v = Compression(dim=Dv, **kw)
        self.gate_cols = [i for i, b in enumerate(("cmp", "slc", "win")) if spec.has(b)]
        gh = max(16, hidden_size // 8) if gate_hidden is None else gate_hidden
        self.gate = nn.Sequential(nn.Linear(hidden_size, gh, **fk), nn.SiLU(),
                                  nn.Linear(gh, HQ * len(self.gate_cols), **fk))
        bias0 = _gate_bias(gate_bias, spec, self.gate_cols)
        with torch.no_grad():  # gates start at sigmoid(bias), 0.5 unless gate_bias says
            self.gate[2].weight.zero_()
            self.gate[2].bias.copy_(torch.tensor(bias0).repeat(HQ).to(self.gate[2].bias))

    # ------------------------------------------------------------------ pieces
    def _op(self):
        if self.op is None:
            self.op = build(self.spec)
        return self.op

    def extra_repr(self) -> str:
        s = self.spec
        return (f"spec={s.name!r}, hidden_size={self.hidden_size}, heads={s.heads_q}/"
                f"{s.heads_kv}, dims={s.dim_qk}/{s.dim_v}, compression={s.cmp_kind}, "
                f"branches={'+'.join(s.branches)}, kv_per_branch={s.kv_per_branch}, "
                f"rope={self.rope}")

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """Sigmoid gates [..., HQ, 3] (cmp, slc, win) from x [..., hidden]; absent branches 0."""
        g = torch.sigmoid(self.gate(x)).unflatten(-1, (self.spec.heads_q, len(self.gate_cols)))
        if len(self.gate_cols) == 3:
            return g
        cols = [g.new_zeros(g.shape[:-1])] * 3
        for j, c in enumerate(self.gate_cols):
            cols[c] = g[..., j]
        return torch.stack(cols, -1)

    def _rot(self, x: torch.Tensor, pos: torch.Tensor | Callable[[], torch.Tensor],
             on: bool | None = None, key: tuple | None = None) -> torch.Tensor:
        """x rotated at `pos` (or a function giving it, called when its tables are not kept)
        if `on` (default: the selected and window branches' choice). `key` names positions that
        recur from step to step (the lengths they come from): their tables are kept."""
        if not (self.rope_main if on is None else on):
            return x
        return apply_rope(x, None, tables=self._rope_tables(pos, key, x.dtype, x.device))

    def _rope_tables(self, pos, key: tuple | None, dtype: torch.dtype, device):
        """rope_tables for `pos` (as _rot takes it), from a small per-layer cache when `key`
        names them (never while tracing, whose tensors must not outlive the trace, and kept
        apart for inference mode, whose tensors autograd cannot save)."""
        make = lambda: rope_tables(pos() if callable(pos) else pos,  # noqa: E731
                                   self.spec.dim_qk, self.rope_theta, dtype)
        if key is None or torch.compiler.is_compiling():
            return make()
        full = (key, dtype, device, torch.is_inference_mode_enabled())
        tables = self._rope_cache.get(full)
        if tables is None:
            if len(self._rope_cache) >= 8:
                self._rope_cache.clear()
            tables = self._rope_cache[full] = make()
        return tables

    def _cmp_source(self, k_raw: torch.Tensor, pos: torch.Tensor,
                    key: tuple | None = None) -> torch.Tensor:
        """The keys the layer's compression reads: un-rotated for learned phi (the output is
        rotated at the window's end), the compressed branch's rotation for a mean."""
        return k_raw if self.learned else self._rot(k_raw, pos, self.rope_cmp, key)

    def _heads(self, lin: nn.Linear, x: torch.Tensor, dim: int) -> torch.Tensor:
        return lin(x).unflatten(-1, (-1, dim))

    def _out(self, o: torch.Tensor) -> torch.Tensor:
        """o [..., HQ, Dv] -> o_proj; casts to the weights' dtype unless autocast does it."""
        if not torch.is_autocast_enabled(o.device.type):
            o = o.to(self.o_proj.weight.dtype)
        return self.o_proj(o.flatten(-2))

    def _check_x(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.hidden_size:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected [B, T, hidden_size={self.hidden_size}], got {shape}")
        if x.shape[1] < 1:
            raise ValueError(f"x: sequence length must be >= 1, got shape {tuple(x.shape)}")

    def project(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> dict:
        """The op's inputs for x [B, T, hidden]: q, k, v, gates, k_cmp, v_cmp, k_win, v_win and
        q_cmp (None unless the compressed branch is rotated differently), rotated as described
        in the module docstring, plus the keys/values the layer's compression read (`k_src`,
        `v_src`), which decoding keeps."""
        s = self.spec
        B, T, _ = x.shape
        cp = self.cp_group
        if cp is not None:   # x is this rank's share: positions and compression see the whole
            T = T * dist.get_world_size(cp)
        if cu_seqlens is None:
            lens = None
            pos = torch.arange(T, device=x.device)
            key = ("T", T)          # what the positions (and window ends) follow from
        else:
            if B != 1:
                raise ValueError(f"cu_seqlens: requires batch size 1 (packed sequences), got B={B}")
            offs = [int(c) for c in cu_seqlens.tolist()]
            lens = [b - a for a, b in zip(offs[:-1], offs[1:])]
            if offs[0] != 0 or offs[-1] != T or any(n <= 0 for n in lens):
                raise ValueError(f"cu_seqlens: expected increasing offsets from 0 to T={T}, "
                                 f"got {len(offs)} offsets from {offs[0]} to {offs[-1]}")
            pos = torch.cat([torch.arange(n, device=x.device) for n in lens])
            key = ("lens", tuple(lens))
        if cp is not None:
            pos = share_positions(pos, cp)
        pkey = None if cp is not None else key      # a share's positions depend on the rank
        q = self._heads(self.q_proj, x, s.dim_qk)
        k = self._heads(self.k_proj, x, s.dim_qk)
        v = self._heads(self.v_proj, x, s.dim_v)
        out = dict(gates=self.gates(x), k_cmp=None, v_cmp=None, k_win=None, v_win=None,
                   k_src=None, v_src=None, q_cmp=None)
        if self.own_cmp:
            if self.separate and self.learned:
                ks = self._heads(self.k_cmp_proj, x, s.dim_qk)
                vs = self._heads(self.v_cmp_proj, x, s.dim_v)
            else:
                ks, vs = self._cmp_source(k, pos, pkey), v
            if cp is not None:   # every rank compresses the whole sequence
                ks, vs = gather(ks, cp), gather(vs, cp)
            kc, vc = self._cmp_keys(ks, lens, T, key), self.phi_v(vs, lens)
            out.update(k_cmp=kc, v_cmp=vc, k_src=ks, v_src=vs)
        if self.uses_cmp and self.rope_cmp != self.rope_main:
            out["q_cmp"] = self._rot(q, pos, self.rope_cmp, pkey)
        if self.separate and s.has("win"):
            out["k_win"] = self._rot(self._heads(self.k_win_proj, x, s.dim_qk), pos, key=pkey)
            out["v_win"] = self._heads(self.v_win_proj, x, s.dim_v)
        out.update(q=self._rot(q, pos, key=pkey), k=self._rot(k, pos, key=pkey), v=v)
        # the op takes one dtype for all inputs; under autocast a piece may come out in another
        dt = out["q"].dtype
        for name in ("k", "v", "gates", "k_cmp", "v_cmp", "k_win", "v_win", "q_cmp"):
            if out[name] is not None and out[name].dtype != dt:
                out[name] = out[name].to(dt)
        return out

    def _cmp_keys(self, ks: torch.Tensor, lens, T: int, key: tuple) -> torch.Tensor:
        """phi_k of the source keys ks, rotated at the windows' ends if learned (and rotated)."""
        kc = self.phi_k(ks, lens)
        if self.learned:
            ends = partial(_window_ends, self.spec, [T] if lens is None else lens, ks.device)
            kc = self._rot(kc, ends, self.rope_cmp, ("ends",) + key)
        return kc

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                cache: "SparseAttentionCache | None" = None) -> torch.Tensor:
        """Training / prefill: x [B, T, hidden] -> [B, T, hidden] (`cu_seqlens` packs
        variable-length sequences into B == 1, as FlashAttention does).

        Decoding: with `cache` (from `new_cache`), x holds the next tokens of every row: an empty
        cache is prefilled with all of x (the output is the training forward's); otherwise the
        tokens are decoded one at a time, appending to the cache."""
        self._check_x(x)
        if cache is not None:
            if self.cp_group is not None:
                raise ValueError("cache: decoding runs on one device; this layer has a cp_group")
            if cu_seqlens is not None:
                raise ValueError("cu_seqlens: not supported with a decode cache (rows are the "
                                 "batch)")
            return self._decode(x, cache)
        p = self.project(x, cu_seqlens)
        if (self.selection_grad != "none" and self.spec.has("slc") and self.training
                and torch.is_grad_enabled()):
            return self._out(self._with_selection_grad(p, cu_seqlens))
        cp = {} if self.cp_group is None else {"cp_group": self.cp_group}
        o = self._op()(p["q"], p["k"], p["v"], p["gates"], p["k_cmp"], p["v_cmp"],
                       cu_seqlens=cu_seqlens, k_win=p["k_win"], v_win=p["v_win"],
                       **_q_cmp_arg(p), **cp)
        return self._out(o)

    def _with_selection_grad(self, p: dict, cu_seqlens) -> torch.Tensor:
        """The op's output, with the block scores given the selection_grad signal: a term zero
        in value ("straight-through") or a loss whose gradient joins the backward ("distill");
        nsagen.selection_grad says how."""
        if cu_seqlens is not None or self.cp_group is not None:
            raise ValueError(f"selection_grad={self.selection_grad!r}: not supported with "
                             f"cu_seqlens or cp_group")
        s = self.spec
        straight = self.selection_grad == "straight-through"
        out = self._op()(p["q"], p["k"], p["v"], p["gates"], p["k_cmp"], p["v_cmp"],
                         k_win=p["k_win"], v_win=p["v_win"], return_indices=True,
                         return_branches=straight, **_q_cmp_arg(p))
        o, idx = out[0], out[1]
        q_sc = p["q"] if p["q_cmp"] is None else p["q_cmp"]
        if not straight:    # trains the compression only: queries and source keys detached
            k_sc = self._cmp_keys(p["k_src"].detach(), None, o.shape[1], ("T", o.shape[1]))
            loss = distill_loss(s, p["q"], p["k"], q_sc.detach(), k_sc, idx, DISTILL_STRIDE)
            self.last_selection_loss = loss.detach()
            return with_loss(o, loss * self.selection_weight)
        k_sc = p["k_cmp"] if p["k_cmp"] is not None else reference.mean_compress(p["k"], s)
        pos = torch.arange(o.shape[1], device=o.device)
        w = chosen_block_score(s, q_sc, k_sc, idx, pos)
        g_slc = p["gates"][..., 1].detach()
        zero = (w - w.detach()).repeat_interleave(s.group, -1) * g_slc   # 0, with w's gradient
        return o + zero[..., None].to(o.dtype) * out[2][1]

    # ------------------------------------------------------------------ decoding
    def new_cache(self, batch: int, max_len: int, device=None,
                  dtype: torch.dtype | None = None) -> "SparseAttentionCache":
        """Decode state for `batch` rows of up to `max_len` tokens (dtype defaults to the
        layer's parameter dtype; use the dtype the attention runs in, e.g. bfloat16)."""
        op = self._op()
        if not hasattr(op, "new_cache"):
            raise TypeError("op: decoding needs an op with new_cache (an nsagen.NSAOp)")
        p = next(self.parameters())
        return SparseAttentionCache(self, batch, max_len, p.device if device is None else device,
                                    p.dtype if dtype is None else dtype)

    def _decode(self, x: torch.Tensor, cache: "SparseAttentionCache") -> torch.Tensor:
        if cache.layer is not self:
            raise ValueError("cache: was made by another layer (each layer needs its own)")
        B, T, _ = x.shape
        if B != cache.batch:
            raise ValueError(f"x: batch {B} does not match the cache's {cache.batch}")
        if cache.length + T > cache.max_len:
            raise ValueError(f"cache full: {cache.length} + {T} tokens > max_len={cache.max_len}")
        if cache.length == 0 and T > 1:
            return self._prefill(x, cache)
        return torch.cat([self._step(x[:, t], cache) for t in range(T)], 1)

    def _prefill(self, x: torch.Tensor, cache: "SparseAttentionCache") -> torch.Tensor:
        p = self.project(x)
        o = self._op()(p["q"], p["k"], p["v"], p["gates"], p["k_cmp"], p["v_cmp"],
                       k_win=p["k_win"], v_win=p["v_win"], **_q_cmp_arg(p))
        dt = cache.dtype
        c = lambda t: None if t is None else t.to(dt)  # noqa: E731
        T = x.shape[1]
        cache.kv.prefill(c(p["k"]), c(p["v"]), k_cmp=c(p["k_cmp"]), v_cmp=c(p["v_cmp"]),
                         k_win=c(p["k_win"]), v_win=c(p["v_win"]))
        if self.own_cmp:
            l = self.spec.cmp_block
            keep = torch.arange(max(0, T - l), T, device=x.device)
            cache.ring_k[:, keep % l] = p["k_src"][:, keep].to(dt)
            cache.ring_v[:, keep % l] = p["v_src"][:, keep].to(dt)
        cache.length = T
        return self._out(o)

    def _step(self, x_t: torch.Tensor, cache: "SparseAttentionCache") -> torch.Tensor:
        """One token per row: x_t [B, hidden] -> [B, 1, hidden]. Positions, ring slots and
        emissions come from the cache's device lengths: no device value is read on the host."""
        s, dt = self.spec, cache.dtype
        B = x_t.shape[0]
        pos = cache.kv.lens.long()                 # position of the new token, per row
        rows = torch.arange(B, device=x_t.device)
        q_raw = self._heads(self.q_proj, x_t, s.dim_qk)
        q = self._rot(q_raw, pos)
        k_raw = self._heads(self.k_proj, x_t, s.dim_qk)
        v = self._heads(self.v_proj, x_t, s.dim_v)
        gates = self.gates(x_t)
        extra = {}
        if self.own_cmp:
            l = s.cmp_block
            if self.separate and self.learned:
                ks = self._heads(self.k_cmp_proj, x_t, s.dim_qk)
                vs = self._heads(self.v_cmp_proj, x_t, s.dim_v)
            else:
                ks, vs = self._cmp_source(k_raw, pos), v
            cache.ring_k[rows, pos % l] = ks.to(dt)
            cache.ring_v[rows, pos % l] = vs.to(dt)
            # the window that ends at this token (used only by the rows that emit now)
            slots = (pos[:, None] - l + 1 + torch.arange(l, device=pos.device)) % l
            wk = cache.ring_k[rows[:, None], slots].transpose(1, 2)      # [B, H, l, Dk]
            wv = cache.ring_v[rows[:, None], slots].transpose(1, 2)
            kc = self.phi_k.reduce(wk.to(ks.dtype))
            if self.learned:
                kc = self._rot(kc, pos, self.rope_cmp)
            vc = self.phi_v.reduce(wv.to(vs.dtype))
            extra.update(k_cmp_t=kc.to(dt), v_cmp_t=vc.to(dt))
        if self.separate and s.has("win"):
            extra.update(k_win_t=self._rot(self._heads(self.k_win_proj, x_t, s.dim_qk),
                                           pos).to(dt),
                         v_win_t=self._heads(self.v_win_proj, x_t, s.dim_v).to(dt))
        cache.kv.append(self._rot(k_raw, pos).to(dt), v.to(dt), **extra)
        q_cmp = None
        if self.uses_cmp and self.rope_cmp != self.rope_main:
            q_cmp = self._rot(q_raw, pos, self.rope_cmp).to(dt)
        o = cache.kv.step(q.to(dt), gates.to(dt), q_cmp=q_cmp)
        cache.length += 1
        return self._out(o)[:, None]


def _rope_branches(rope) -> tuple[bool, bool]:
    """(rotate the compressed path, rotate the selected and window branches) from `rope`."""
    if isinstance(rope, bool):
        return rope, rope
    names = tuple(rope) if isinstance(rope, (tuple, list, set, frozenset)) else None
    if names is None or not all(n in ("cmp", "slc", "win") for n in names):
        raise ValueError(f"rope: expected True, False or branch names from cmp, slc, win, got "
                         f"{str(rope)[:60]}")
    if ("slc" in names) != ("win" in names):
        raise ValueError("rope: the selected and window branches share one query: rotate both "
                         "(slc and win) or neither")
    return "cmp" in names, "slc" in names


def _gate_bias(gate_bias, spec: Spec, cols: list[int]) -> list[float]:
    """Initial gate logits of the spec's branches (in gate column order), 0 by default."""
    names = ("cmp", "slc", "win")
    if gate_bias is None:
        return [0.0] * len(cols)
    if not isinstance(gate_bias, dict):
        raise ValueError(f"gate_bias: expected a dict of branch -> logit, got "
                         f"{type(gate_bias).__name__}")
    for key, val in gate_bias.items():
        if key not in names or not spec.has(key):
            raise ValueError(f"gate_bias: {str(key)[:20]!r} is not a branch of this spec "
                             f"({', '.join(spec.branches)})")
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not abs(val) < 1e4:
            raise ValueError(f"gate_bias[{key}]: expected a finite number, got {str(val)[:20]}")
    return [float(gate_bias.get(names[c], 0.0)) for c in cols]


def _q_cmp_arg(p: dict) -> dict:
    """The op's q_cmp keyword when the layer has one (ops without it keep their signature)."""
    return {} if p["q_cmp"] is None else {"q_cmp": p["q_cmp"]}


def _window_ends(spec: Spec, lens: list[int], device) -> torch.Tensor:
    """Position of the last token of every compression window, packed over sequences."""
    ends = [torch.arange(spec.num_cmp(n), device=device) * spec.cmp_stride + spec.cmp_block - 1
            for n in lens]
    return torch.cat(ends)


class SparseAttentionCache:
    """Decode state of one SparseAttention layer: the op's DecodeCache (rotated keys, values,
    compressed tokens) plus, for learned compression, the last l un-rotated keys/values of every
    row in a ring buffer, from which phi makes each new compressed token."""

    def __init__(self, layer: SparseAttention, batch: int, max_len: int, device, dtype):
        _check_positive_int("batch", batch)
        _check_positive_int("max_len", max_len)
        s = layer.spec
        self.layer, self.batch, self.max_len, self.dtype = layer, batch, max_len, dtype
        self.kv = layer._op().new_cache(batch, max_len, device=device, dtype=dtype)
        self.length = 0   # tokens held per row (host-side; every row has the same length)
        if layer.own_cmp:
            self.ring_k = torch.zeros(batch, s.cmp_block, s.heads_kv, s.dim_qk, device=device,
                                      dtype=dtype)
            self.ring_v = torch.zeros(batch, s.cmp_block, s.heads_kv, s.dim_v, device=device,
                                      dtype=dtype)

    def __repr__(self) -> str:
        return (f"SparseAttentionCache(batch={self.batch}, length={self.length}, "
                f"max_len={self.max_len}, dtype={self.dtype})")
