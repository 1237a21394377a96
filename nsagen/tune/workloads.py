"""What the tuner, the benchmark and the cross-compiler run: random inputs for a spec (never
zeros; block choices then follow real importance), and the module's forward, backward and
decode step as callables that take launch configs."""
from __future__ import annotations

import torch

from ..launch import direct_launches, pack
from ..layout import build_layout
from ..spec import Spec


def random_inputs(spec: Spec, T: int, batch: int, device, dtype, seed: int | None = None) -> dict:
    """Inputs of one call: q, k, v, gates, and k_cmp/v_cmp (learned compression) and
    k_win/v_win (separate window k/v) where the spec takes them. Drawn on the device (large
    lengths would take seconds on the host), from a generator seeded by `seed` (default T)."""
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(T if seed is None else seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=dev, dtype=torch.float32).to(dtype)

    x = dict(q=rnd(batch, T, spec.heads_q, spec.dim_qk), k=rnd(batch, T, spec.heads_kv, spec.dim_qk),
             v=rnd(batch, T, spec.heads_kv, spec.dim_v),
             gates=torch.rand(batch, T, spec.heads_q, 3, generator=g, device=dev).to(dtype))
    if spec.learned_compression:
        nc = spec.num_cmp(T)
        x.update(k_cmp=rnd(batch, nc, spec.heads_kv, spec.dim_qk),
                 v_cmp=rnd(batch, nc, spec.heads_kv, spec.dim_v))
    if spec.kv_per_branch == "separate" and spec.has("win"):
        x.update(k_win=rnd(batch, T, spec.heads_kv, spec.dim_qk),
                 v_win=rnd(batch, T, spec.heads_kv, spec.dim_v))
    return x


def packed_args(op, x: dict):
    """The module-level arguments of a forward over `x` (packed, with its layout)."""
    B, T = x["q"].shape[:2]
    lay = build_layout(op.spec, (T,) * B, x["q"].device)
    args = [pack(x.get(n)) for n in ("q", "k", "v", "gates", "k_cmp", "v_cmp")]
    return args, lay, pack(x.get("k_win")), pack(x.get("v_win"))


def forward_pass(op, x: dict, save: bool = False):
    """The forward with any configs: inference, or (`save`) keeping what the backward needs."""
    args, lay, kw, vw = packed_args(op, x)

    def make(cfg):
        def run():
            with torch.no_grad(), direct_launches():
                return op.module.forward(*args, lay, kw, vw, configs=cfg, save=save)
        return run
    return make


def backward_pass(op, x: dict, fwd_cfg: dict):
    """The backward alone, from one forward's saved tensors (which it does not change)."""
    args, lay, kw, vw = packed_args(op, x)
    with torch.no_grad(), direct_launches():
        o, idx, saved = op.module.forward(*args, lay, kw, vw, configs=fwd_cfg, save=True)
    do = torch.randn_like(o)
    q, k, v, gates = args[:4]

    def make(cfg):
        def run():
            with torch.no_grad(), direct_launches():
                return op.module.backward(do, q, k, v, gates, idx, saved, lay, kw, vw,
                                          configs=cfg)
        return run
    return make


class DecodeSetup:
    """A full decode cache (random contents, every row at capacity - 1) and one step's q and
    gates, launched straight through the module's decode_step with any configs and splits."""

    def __init__(self, op, batch: int, max_len: int, device, dtype):
        spec = op.spec
        dev = torch.device(device)
        g = torch.Generator(device=dev).manual_seed(batch * 7 + max_len)
        H, HQ, Dk, Dv = spec.heads_kv, spec.heads_q, spec.dim_qk, spec.dim_v

        def rnd(*shape):
            return torch.randn(*shape, generator=g, device=dev, dtype=torch.float32).to(dtype)

        self.op, self.batch, self.max_len, self.device = op, batch, max_len, dev
        self.k, self.v = rnd(batch, max_len, H, Dk), rnd(batch, max_len, H, Dv)
        nc = max(1, spec.num_cmp(max_len))
        self.k_cmp, self.v_cmp = rnd(batch, nc, H, Dk), rnd(batch, nc, H, Dv)
        sep = spec.kv_per_branch == "separate" and spec.has("win")
        self.kw = rnd(batch, max_len, H, Dk) if sep else None
        self.vw = rnd(batch, max_len, H, Dv) if sep else None
        self.lens = torch.full((batch,), max_len - 1, dtype=torch.int32, device=dev)
        self.q = rnd(batch, HQ, Dk)
        self.gates = torch.rand(batch, HQ, 3, generator=g, device=dev).to(dtype)
        self._work: dict = {}

    def work(self, splits: dict):
        key = tuple(sorted(splits.items()))
        if key not in self._work:
            self._work[key] = self.op.module.decode_workspace(self.batch, self.max_len, splits,
                                                              self.device)
        return self._work[key]

    def make(self, splits: dict):
        work = self.work(splits)

        def make_run(cfg):
            def run():
                with direct_launches():
                    return self.op.module.decode_step(
                        self.q, self.gates, self.k, self.v, self.k_cmp, self.v_cmp, self.lens,
                        splits, work, self.kw, self.vw, configs=cfg)
            return run
        return make_run
