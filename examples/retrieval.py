#!/usr/bin/env python
"""Long-context retrieval from scratch: the nsagen SparseAttention layer against full attention.

Two small decoder-only models that differ only in their attention layer (nsagen's NSA layer, or
causal full attention through PyTorch's SDPA with the same heads, GQA grouping and RoPE) are
trained from scratch with the same budget (steps, tokens, schedule, seed, data) on multi-query
associative recall in a haystack, then evaluated at every context length:

    filler ... k1 v1 ... filler ... k2 v2 ... filler ... | k7 v7 k2 v2 k13 v13 ...

A sequence of length T is filler tokens with P key/value pairs at random places; its last 2P
tokens ask for every key once, in a random order, and the model must predict each key's value
(the loss and the accuracy count only these answers; chance is 1 / values).

Both models put a width-2 causal token shift before attention (every position also sees its
predecessor, as in many recall baselines), so recall needs one attention hop instead of an
induction circuit. Recall is still learned abruptly: the loss stays at chance (ln values) for up to
a few hundred steps at 256 tokens before it drops, and far longer when training starts at 4k+
tokens. So training starts with a curriculum (by default 300 steps at 256 tokens, then 300 at 1024)
and then cycles through the evaluated lengths (4k, 8k, 16k) with a constant number of tokens per
step (1800 steps of 32768 tokens in all). The plateau also lengthens once the learning rate passes
a value that shrinks about as 1 / --hidden (about 2e-3 at hidden 128, 5e-4 at the default 512,
where 2e-3 keeps the model at chance).

The script prints, and writes to a JSON file, the answer accuracy per context length and the
training tokens per second of both models (overall, and per length with the ratio of the two;
measured after a warm-up pass over every length, which also compiles the Triton kernels and is
reported on its own). The first model listed (nsagen) sets the step count: if it stops at
--time-limit, the next model trains exactly as many steps, on the same learning-rate schedule.

    python examples/retrieval.py results/retrieval.json     # CUDA defaults (about 4-5 min, H200)
    python examples/retrieval.py /tmp/smoke.json --smoke    # tiny CPU run, a few seconds

Every --log-every steps the NSA model is probed on a fixed batch at --probe-len tokens (0: off;
outside the timed training): per layer, how often the block holding each query's needle is
selected, against the share of the context that the same number of random blocks and the window
would cover (a selection that learned nothing scores that); the needle block's rank among the
block scores; the scores of near blocks over far ones; the compressed branch's probability on
the needle's windows, against a uniform spread; the window's reach; the gates' means; and the
accuracy split by whether any branch could reach the needle.

    python examples/retrieval.py results/arm2.json --rope no-cmp --curriculum 256,1024,2048
    python examples/retrieval.py results/arm4.json --rope no-cmp --selection-grad straight-through
    python examples/retrieval.py results/arm5.json --rope no-cmp --selection-grad distill

On CUDA the models train under bf16 autocast (fp32 master weights); on the CPU in float32, where
the NSA op runs nsagen's PyTorch reference (or the kernels under TRITON_INTERPRET=1, slowly).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import nsagen
from nsagen.nn import SparseAttention, apply_rope, rope_tables

IGNORE = -100


# ------------------------------------------------------------------------------------ task
class Task:
    """Token layout: [0, filler) filler, then keys, then values."""

    def __init__(self, filler: int, keys: int, values: int, pairs: int):
        if pairs > keys:
            raise ValueError(f"--pairs {pairs} needs at least as many keys (--keys {keys})")
        self.filler, self.keys, self.values, self.pairs = filler, keys, values, pairs
        self.key0, self.val0 = filler, filler + keys
        self.vocab = filler + keys + values

    def batch(self, n: int, T: int, gen: torch.Generator,
              device) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [n, T] and targets [n, T] (IGNORE except at the query keys, whose target is
        the value that followed the key in the context)."""
        P = self.pairs
        ctx = T - 2 * P
        if ctx < 2 * P:
            raise ValueError(f"context {T} too short for {P} pairs")
        tok = torch.randint(0, self.filler, (n, T), generator=gen)
        slot = torch.rand(n, ctx // 2, generator=gen).argsort(1)[:, :P] * 2     # pair starts
        key = torch.rand(n, self.keys, generator=gen).argsort(1)[:, :P] + self.key0
        val = torch.randint(0, self.values, (n, P), generator=gen) + self.val0
        tok.scatter_(1, slot, key)
        tok.scatter_(1, slot + 1, val)
        order = torch.rand(n, P, generator=gen).argsort(1)
        tok[:, ctx::2] = key.gather(1, order)
        tok[:, ctx + 1::2] = val.gather(1, order)
        tgt = torch.full((n, T), IGNORE, dtype=torch.long)
        tgt[:, ctx::2] = val.gather(1, order)
        return tok.to(device), tgt.to(device)

    def needles(self, tok: torch.Tensor) -> torch.Tensor:
        """[n, P] position of the value that answers each query key (ctx + 2j), in the
        context: the token the query's attention must reach."""
        P = self.pairs
        ctx = tok.shape[1] - 2 * P
        asked = tok[:, ctx::2]                                          # [n, P]
        hit = tok[:, None, :ctx] == asked[:, :, None]                   # [n, P, ctx]
        return hit.float().argmax(-1) + 1


# ------------------------------------------------------------------------------------ model
class FullAttention(nn.Module):
    """Causal full attention (SDPA) with the same projections, GQA heads and RoPE as the NSA
    layer (its compression, gates and sparsity aside)."""

    def __init__(self, hidden: int, heads_q: int, heads_kv: int, dim: int, rope_theta: float,
                 rope: bool = True):
        super().__init__()
        self.hq, self.hkv, self.dim, self.theta = heads_q, heads_kv, dim, rope_theta
        self.rope = rope
        self._tables: dict = {}
        self.q_proj = nn.Linear(hidden, heads_q * dim, bias=False)
        self.k_proj = nn.Linear(hidden, heads_kv * dim, bias=False)
        self.v_proj = nn.Linear(hidden, heads_kv * dim, bias=False)
        self.o_proj = nn.Linear(heads_q * dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        pos = torch.arange(T, device=x.device)
        q = self.q_proj(x).unflatten(-1, (self.hq, self.dim))
        k = self.k_proj(x).unflatten(-1, (self.hkv, self.dim))
        if self.rope:     # tables kept per length, as the NSA layer keeps them
            key = (T, q.dtype, x.device, torch.is_inference_mode_enabled())
            if key not in self._tables:
                self._tables[key] = rope_tables(pos, self.dim, self.theta, q.dtype)
            q, k = (apply_rope(t, pos, tables=self._tables[key]) for t in (q, k))
        v = self.v_proj(x).unflatten(-1, (self.hkv, self.dim))
        g = self.hq // self.hkv
        k, v = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)    # GQA heads expanded
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True)
        return self.o_proj(o.transpose(1, 2).flatten(-2))


class TokenShift(nn.Module):
    """h_t + w * h_{t-1} per channel (a causal depthwise convolution of width 2): every position
    also carries its predecessor, so associative recall needs one attention hop, not two."""

    def __init__(self, hidden: int):
        super().__init__()
        self.w = nn.Parameter(torch.ones(hidden))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + F.pad(h, (0, 0, 1, 0))[:, :-1] * self.w


class Block(nn.Module):
    def __init__(self, hidden: int, attn: nn.Module):
        super().__init__()
        self.norm1, self.shift, self.attn = nn.RMSNorm(hidden), TokenShift(hidden), attn
        self.norm2 = nn.RMSNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden, bias=False), nn.GELU(),
                                 nn.Linear(4 * hidden, hidden, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.shift(self.norm1(x)))
        return x + self.mlp(self.norm2(x))


class Model(nn.Module):
    def __init__(self, vocab: int, hidden: int, layers: int, make_attn):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(Block(hidden, make_attn()) for _ in range(layers))
        self.norm = nn.RMSNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)
        for b in self.blocks:   # residual branches start small
            nn.init.normal_(b.mlp[2].weight, std=0.02 / math.sqrt(2 * layers))
            nn.init.normal_(b.attn.o_proj.weight, std=0.02 / math.sqrt(2 * layers))

    def forward(self, tok: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean cross-entropy, number of correct answers) over the positions with a target."""
        x = self.embed(tok)
        for b in self.blocks:
            x = b(x)
        sel = tgt != IGNORE
        logits = self.head(self.norm(x[sel])).float()
        y = tgt[sel]
        return F.cross_entropy(logits, y), (logits.argmax(-1) == y).sum()


def nsa_spec(a) -> nsagen.Spec:
    """The NSA layer of the experiment: paper block sizes unless --smoke."""
    d = dict(name="retrieval", heads={"q": a.heads, "kv": a.kv_heads},
             head_dim={"qk": a.hidden // a.heads, "v": a.hidden // a.heads}, dtype="bfloat16",
             compression={"block": a.cmp_block, "stride": a.cmp_stride, "kind": a.cmp_kind},
             selection={"block": a.slc_block, "count": a.slc_count, "initial": 1, "local": 2},
             window=a.window, kv_per_branch=a.kv_per_branch)
    return nsagen.Spec.from_dict(d)


def build_model(kind: str, a, vocab: int, device) -> Model:
    dim = a.hidden // a.heads
    if kind == "nsagen":
        spec = nsa_spec(a)

        rope = {"all": True, "none": False, "no-cmp": ("slc", "win")}[a.rope]
        bias = None if a.gate_bias_cmp is None else {"cmp": a.gate_bias_cmp}

        def make():
            return SparseAttention(spec, a.hidden, rope_theta=a.rope_theta, rope=rope,
                                   gate_bias=bias, selection_grad=a.selection_grad,
                                   selection_weight=a.selection_weight)
    else:
        def make():
            return FullAttention(a.hidden, a.heads, a.kv_heads, dim, a.rope_theta,
                                 rope=a.rope != "none")
    torch.manual_seed(a.seed)
    return Model(vocab, a.hidden, a.layers, make).to(device)


# ------------------------------------------------------------------------------------ loop
def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _autocast(device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def schedule(step: int, total: int, warmup: int, lr: float) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def length_at(step: int, a) -> int:
    """The context length of a training step: the curriculum's stages first (each
    `curriculum_steps` long), then the evaluated lengths in turn."""
    stage = step // a.curriculum_steps if a.curriculum_steps else len(a.curriculum)
    if stage < len(a.curriculum):
        return a.curriculum[stage]
    rest = step - len(a.curriculum) * a.curriculum_steps
    return a.lengths[rest % len(a.lengths)]


def probe(model: Model, a, task: Task, device, T: int) -> dict | None:
    """Selection diagnostics of every NSA layer on a fixed batch of length T: how often the
    block holding the needle is selected (against the share of the context a random choice of
    the same blocks and window would cover), how often the window reaches it, the gates' means,
    and the answers' accuracy split by whether any branch could reach the needle."""
    attns = [b.attn for b in model.blocks]
    if not isinstance(attns[0], SparseAttention):
        return None
    spec = attns[0].spec
    tok, tgt = task.batch(a.probe_seqs, T, torch.Generator().manual_seed(a.seed + 777), device)
    need = task.needles(tok).to(device)                                 # [n, P]
    P = task.pairs
    qpos = torch.arange(T - 2 * P, T, 2, device=device)                 # query key positions
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda m, args: inputs.append(args[0])) for m in attns]
    try:
        with torch.no_grad(), _autocast(device):
            x = model.embed(tok)
            for blk in model.blocks:
                x = blk(x)
            pred = model.head(model.norm(x[:, qpos])).argmax(-1)
    finally:
        for h in hooks:
            h.remove()
    right = pred == tgt[:, qpos]
    dist = qpos[None, :] - need                                         # query minus needle
    in_win = dist < spec.window if spec.has("win") else torch.zeros_like(dist, dtype=torch.bool)
    random = ((spec.slc_count * spec.slc_block + (spec.window or 0)) / (qpos + 1.0)).clamp(max=1)
    layers, reach_any = [], in_win.clone()
    for attn, xin in zip(attns, inputs):
        with torch.no_grad(), _autocast(device):
            p = attn.project(xin)
            kw = {} if p["q_cmp"] is None else {"q_cmp": p["q_cmp"]}
            _, idx = attn._op()(p["q"], p["k"], p["v"], p["gates"], p["k_cmp"], p["v_cmp"],
                                return_indices=True, k_win=p["k_win"], v_win=p["v_win"], **kw)
        blocks = idx[:, qpos]                                           # [n, P, H, n_sel]
        nb = need // spec.slc_block                                     # the needle's block
        hit = (blocks == nb[:, :, None, None]).flatten(2).any(-1)
        reach_any |= hit
        g = p["gates"].float().mean((0, 1, 2))
        rank, near_far, mass, uniform = _block_scores(spec, p, qpos, nb, need)
        layers.append({"needle_selected": round(hit.float().mean().item(), 4),
                       "needle_block_rank": round(rank, 2), "score_near_over_far": near_far,
                       "cmp_mass_on_needle": round(mass, 4), "cmp_mass_uniform": round(uniform, 4),
                       "random_coverage": round(random.mean().item(), 4),
                       "window_reaches": round(in_win.float().mean().item(), 4),
                       "gate_cmp": round(g[0].item(), 4), "gate_slc": round(g[1].item(), 4),
                       "gate_win": round(g[2].item(), 4)})
        if attn.last_selection_loss is not None:    # "distill": its last training step's loss
            layers[-1]["selection_loss"] = round(attn.last_selection_loss.item(), 4)

    def acc(mask):
        return round(right[mask].float().mean().item(), 4) if mask.any() else None

    return {"T": T, "layers": layers, "reachable": round(reach_any.float().mean().item(), 4),
            "acc_reachable": acc(reach_any), "acc_unreachable": acc(~reach_any)}


def _block_scores(spec, p: dict, qpos: torch.Tensor, nb: torch.Tensor,
                  need: torch.Tensor) -> tuple[float, float, float, float]:
    """From one layer's op inputs, the block importance of the query positions (the compressed
    branch's probabilities mapped to selection blocks, summed over a KV head's query heads, as
    docs/algorithm.md section 4): the needle block's mean rank (0 = best); the mean score of
    the 4 blocks nearest the query over that of the blocks further away (a score that follows
    distance is well above 1); the compressed probability mass on the windows that hold the
    needle, and the mass a uniform distribution over the visible windows would put there."""
    q = (p["q_cmp"] if p["q_cmp"] is not None else p["q"])[:, qpos].double()   # [n, P, HQ, D]
    kc = p["k_cmp"] if p["k_cmp"] is not None else nsagen.reference.mean_compress(p["k"], spec)
    n, P, HQ, D = q.shape
    H, nc = spec.heads_kv, kc.shape[1]
    s = torch.einsum("nphgd,nchd->nphgc", q.view(n, P, H, HQ // H, D), kc.double())
    vis = (torch.arange(nc, device=q.device) * spec.cmp_stride + spec.cmp_block - 1
           <= qpos[:, None])                                            # [P, nc]
    prob = torch.softmax(s * spec.softmax_scale + torch.where(vis, 0.0, -torch.inf)[None, :, None,
                                                                                     None], -1)
    prob = torch.nan_to_num(prob)
    T = p["k"].shape[1]
    score = torch.einsum("nphgc,cj->nphj", prob,
                         nsagen.reference.block_weights(spec, nc, spec.num_blocks(T), q.device))
    own = score.gather(-1, nb[:, :, None, None].expand(n, P, H, 1))
    rank = (score > own).sum(-1).float().mean().item()
    dist = qpos[:, None] // spec.slc_block - torch.arange(score.shape[-1], device=q.device)
    near = (dist >= 0) & (dist < 4)
    far = dist >= 4
    by_pos = score.transpose(1, 2)                                      # [n, H, P, NB]
    ratio = by_pos[..., near].mean() / by_pos[..., far].mean().clamp_min(1e-30) \
        if far.any() else torch.tensor(float("nan"))
    start = torch.arange(nc, device=q.device) * spec.cmp_stride
    holds = (start <= need[:, :, None]) & (need[:, :, None] < start + spec.cmp_block)  # [n, P, nc]
    holds = holds & vis[None]
    mass = (prob * holds[:, :, None, None, :]).sum(-1).mean().item()
    uniform = (holds.sum(-1) / vis.sum(-1).clamp(min=1)[None]).float().mean().item()
    return rank, round(ratio.item(), 3), mass, uniform


def _compiled(model: Model, mode: str = "default") -> nn.Module:
    """The model under torch.compile, one graph per shape (the warm-up pass compiles every
    training and evaluation shape before the timed loop). `mode` "reduce-overhead" also
    replays each graph from a CUDA graph, so the host's launches stop costing GPU time."""
    cfg = torch._dynamo.config
    limit = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, limit, max(getattr(cfg, limit), 64))
    return torch.compile(model, dynamic=False, mode=mode)


def run_model(kind: str, a, task: Task, device, steps: int, time_limit: float | None) -> dict:
    """Warm up (compile), train `steps` steps (stopping early at `time_limit` seconds), eval.

    The learning-rate schedule always spans `a.steps`, so a model stopped early by the time
    limit and a model given that many steps train identically step for step."""
    raw = build_model(kind, a, task.vocab, device)
    model = _compiled(raw, a.compile_mode) if a.compile else raw
    n_params = sum(p.numel() for p in raw.parameters())
    decay = [p for p in raw.parameters() if p.dim() >= 2]
    rest = [p for p in raw.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=a.lr, betas=(0.9, 0.95))

    def batch_of(T):
        return max(1, a.tokens_per_step // T)

    # warm-up: a forward/backward per training length and a no-grad forward per evaluated
    # length, so Triton compiles here and not inside the timed loop; nothing is updated
    t0 = time.perf_counter()
    wgen = torch.Generator().manual_seed(a.seed + 999)
    for T in sorted(set(a.curriculum + a.lengths)):
        tok, tgt = task.batch(batch_of(T), T, wgen, device)
        with _autocast(device):
            loss, _ = model(tok, tgt)
        loss.backward()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad(), _autocast(device):
        for T in a.lengths:
            model(*task.batch(1, T, wgen, device))
    _sync(device)
    warmup_s = time.perf_counter() - t0

    gen = torch.Generator().manual_seed(a.seed)    # the same data for both models
    model.train()
    curve, probes, done, probe_s = [], [], 0, 0.0
    per_len: dict[int, list[float]] = {}           # T -> [tokens, seconds]
    t_start = time.perf_counter()
    for step in range(steps):
        t_step = time.perf_counter()
        T = length_at(step, a)
        tok, tgt = task.batch(batch_of(T), T, gen, device)
        for g in opt.param_groups:
            g["lr"] = schedule(step, a.steps, a.warmup_steps, a.lr)
        with _autocast(device):
            loss, correct = model(tok, tgt)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(raw.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        acc_len = per_len.setdefault(T, [0, 0.0])
        acc_len[0] += tok.numel()
        acc_len[1] += time.perf_counter() - t_step
        done = step + 1
        elapsed = time.perf_counter() - t_start - probe_s
        if step % a.log_every == 0 or done == steps:
            acc = correct.item() / (tgt != IGNORE).sum().item()
            curve.append({"step": step, "T": T, "loss": round(loss.item(), 4),
                          "acc": round(acc, 4)})
            print(f"  [{kind}] step {step:4d}  T={T:5d}  loss {loss.item():.3f}  "
                  f"acc {acc:.3f}  {elapsed:6.1f}s", flush=True)
            if a.probe_len:      # diagnostics, outside the timed training
                t_p = time.perf_counter()
                model.eval()
                pr = probe(raw, a, task, device, a.probe_len)
                model.train()
                probe_s += time.perf_counter() - t_p
                if pr is not None:
                    probes.append(dict(step=step, **pr))
                    sel = ", ".join(f"{x['needle_selected']:.2f}" for x in pr["layers"])
                    print(f"  [{kind}]   probe T={pr['T']}: needle selected per layer {sel} "
                          f"(random {pr['layers'][0]['random_coverage']:.2f}); reachable "
                          f"{pr['reachable']:.2f}, acc there {pr['acc_reachable']}", flush=True)
        if time_limit is not None and elapsed > time_limit and done < steps:
            print(f"  [{kind}] time limit {time_limit:.0f}s reached after {done} steps", flush=True)
            break
    train_s = time.perf_counter() - t_start - probe_s
    tokens = sum(v[0] for v in per_len.values())

    model.eval()
    egen = torch.Generator().manual_seed(a.seed + 12345)   # held-out data, same for both
    evals = {}
    t0 = time.perf_counter()
    with torch.no_grad():
        for T in a.lengths:
            right = total = 0
            left = a.eval_seqs
            while left > 0:
                n = min(left, batch_of(T))
                tok, tgt = task.batch(n, T, egen, device)
                with _autocast(device):
                    _, c = model(tok, tgt)
                right += c.item()
                total += (tgt != IGNORE).sum().item()
                left -= n
            evals[str(T)] = {"accuracy": right / total, "answers": total}
    _sync(device)
    return {"params": n_params, "steps": done, "tokens": tokens, "warmup_s": round(warmup_s, 2),
            "train_s": round(train_s, 2), "train_tokens_per_s": tokens / train_s,
            "train_tokens_per_s_by_length": {str(T): v[0] / v[1]
                                             for T, v in sorted(per_len.items())},
            "eval_s": round(time.perf_counter() - t0, 2), "eval": evals, "curve": curve,
            "probe": probes}


# ------------------------------------------------------------------------------------ main
GPU_DEFAULTS = dict(hidden=512, layers=4, heads=8, kv_heads=1, lengths="4096,8192,16384",
                    curriculum="256,1024", curriculum_steps=300, tokens_per_step=32768,
                    steps=1800, eval_seqs=32, pairs=32, keys=256, values=64, filler=16, lr=5e-4,
                    warmup_steps=50, time_limit=120.0, cmp_block=32, cmp_stride=16,
                    slc_block=64, slc_count=16, window=512, log_every=100, probe_len=4096,
                    probe_seqs=4)
SMOKE = dict(hidden=64, layers=2, heads=4, kv_heads=1, lengths="128", curriculum="64",
             curriculum_steps=1, tokens_per_step=256, steps=3, eval_seqs=2, pairs=4, keys=8,
             values=8, filler=8, lr=1e-3, warmup_steps=1, time_limit=None, cmp_block=16,
             cmp_stride=8, slc_block=16, slc_count=4, window=32, log_every=1, probe_len=128,
             probe_seqs=2)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="path of the JSON results file")
    p.add_argument("--smoke", action="store_true",
                   help="tiny CPU configuration (context 128, 3 steps, float32)")
    p.add_argument("--models", default="nsagen,full",
                   help="comma list of nsagen, full (default both; the first sets the step count)")
    p.add_argument("--device", default=None, help="default: cuda if available (cpu with --smoke)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cmp-kind", default="mlp", choices=["mean", "linear", "mlp"])
    p.add_argument("--kv-per-branch", default="shared", choices=["shared", "separate"])
    p.add_argument("--rope-theta", type=float, default=100000.0)
    p.add_argument("--rope", default="all", choices=["all", "none", "no-cmp"],
                   help="where RoPE goes: every branch (default), none (both models), or the "
                        "NSA model's selected and window branches only (no-cmp: the compressed "
                        "branch and the block scores un-rotated; full attention keeps RoPE)")
    p.add_argument("--gate-bias-cmp", type=float, default=None,
                   help="initial logit of the NSA model's compressed gate (default 0: 0.5)")
    p.add_argument("--selection-grad", default="none",
                   choices=["none", "straight-through", "distill"],
                   help="the NSA layer's selection_grad, beyond the paper: straight-through "
                        "(the selected branch's gate gradient reaches the chosen blocks' scores) "
                        "or distill (the learned compression learns to make the block scores "
                        "rank the chosen blocks as the selected branch's attention does)")
    p.add_argument("--selection-weight", type=float, default=1.0,
                   help="the NSA layer's selection_weight (the distill loss's weight)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--compile", action="store_true",
                   help="train and evaluate both models under torch.compile (the warm-up pass "
                        "compiles them; the NSA op runs as one call inside the graph)")
    p.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead"],
                   help="torch.compile's mode with --compile; reduce-overhead replays the "
                        "compiled graphs from CUDA graphs (both models)")
    for k, v in GPU_DEFAULTS.items():
        flag = "--" + k.replace("_", "-")
        if k in ("lengths", "curriculum"):
            typ = str
        else:
            typ = float if isinstance(v, float) or v is None else int
        p.add_argument(flag, type=typ, default=None, help=f"default {v} (smoke: {SMOKE[k]})")
    a = p.parse_args(argv)
    base = SMOKE if a.smoke else GPU_DEFAULTS
    for k, v in base.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.time_limit is not None and a.time_limit <= 0:
        a.time_limit = None
    a.lengths = [int(x) for x in str(a.lengths).split(",")]
    a.curriculum = [int(x) for x in str(a.curriculum).split(",") if x.strip()]
    a.models = [m.strip() for m in a.models.split(",") if m.strip()]
    for m in a.models:
        if m not in ("nsagen", "full"):
            p.error(f"--models: unknown model {m!r} (nsagen, full)")
    if a.hidden % a.heads:
        p.error(f"--hidden {a.hidden} must be a multiple of --heads {a.heads}")
    shortest = min(a.curriculum + a.lengths)
    if shortest < 4 * a.pairs:
        p.error(f"context {shortest} is too short for --pairs {a.pairs} (needs >= 4 * pairs)")
    if a.pairs > a.keys:
        p.error(f"--pairs {a.pairs} needs at least as many --keys (got {a.keys})")
    return a


def speed_ratio(results: dict) -> dict:
    """nsagen's training tokens/s over full attention's, per length both trained at ({} unless
    both models ran)."""
    if "nsagen" not in results or "full" not in results:
        return {}
    a, b = (results[k]["train_tokens_per_s_by_length"] for k in ("nsagen", "full"))
    return {T: a[T] / b[T] for T in a if T in b and b[T] > 0}


def main(argv=None) -> dict:
    a = parse(argv)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() and not a.smoke
                                       else "cpu"))
    task = Task(a.filler, a.keys, a.values, a.pairs)
    t_start = time.perf_counter()
    mode = f" (compiled, {a.compile_mode})" if a.compile else ""
    print(f"retrieval: {', '.join(a.models)} on {device}{mode}; hidden {a.hidden}, "
          f"{a.layers} layers, heads {a.heads}/{a.kv_heads}; lengths {a.lengths}; "
          f"{a.steps} steps x {a.tokens_per_step} tokens; {a.pairs} pairs per sequence, chance "
          f"{1 / a.values:.3f}", flush=True)
    results, steps = {}, a.steps
    for i, kind in enumerate(a.models):
        print(f"{kind}:", flush=True)
        r = run_model(kind, a, task, device, steps, a.time_limit)
        if i == 0:
            steps = r["steps"]    # the next model trains exactly as many steps (same budget)
        results[kind] = r
        accs = ", ".join(f"{T}: {e['accuracy']:.3f}" for T, e in r["eval"].items())
        print(f"{kind}: {r['steps']} steps, {r['train_tokens_per_s']:,.0f} train tokens/s "
              f"(warm-up {r['warmup_s']:.1f}s); accuracy {accs}", flush=True)
        by_len = ", ".join(f"{T}: {v:,.0f}" for T, v in r["train_tokens_per_s_by_length"].items())
        print(f"{kind}: train tokens/s by length: {by_len}", flush=True)
    ratio = speed_ratio(results)
    if ratio:
        print("nsagen / full train tokens/s by length: "
              + ", ".join(f"{T}: {x:.2f}x" for T, x in ratio.items()), flush=True)
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
           platform.processor() or "cpu", "torch": torch.__version__,
           "nsagen": nsagen.__version__, "python": platform.python_version(),
           "date": time.strftime("%Y-%m-%d")}
    cfg = {k: v for k, v in vars(a).items() if k != "out"}
    cfg["spec"] = nsa_spec(a).to_dict()
    out = {"task": "multi-query associative recall in a haystack", "chance": 1 / a.values,
           "config": cfg, "environment": env, "models": results,
           "speed_ratio_by_length": ratio,
           "wall_s": round(time.perf_counter() - t_start, 1)}
    path = Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path} ({out['wall_s']}s)", flush=True)
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
