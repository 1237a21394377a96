"""exp16.py SPEC T [variants-json]: cmp_attention's EXP16 switch (and tile variants) at T:
the forward's output and block choices against EXP16=0, and the kernel's time by the torch
profiler (mean of 5), two rounds alternating."""
import json, sys, torch, nsagen
from torch._library.triton import set_wrap_triton_enabled
_direct = set_wrap_triton_enabled(False); _direct.__enter__()
from nsagen.specfile import load_spec
from nsagen.tune.workloads import random_inputs, packed_args
from nsagen.bench import kernel_breakdown
spec = load_spec(sys.argv[1]); T = int(sys.argv[2])
op = nsagen.build(spec)
base = dict(op.module.CONFIGS["cmp_attention"])
variants = {"e0": {}, "e1": {"EXP16": 1}, "e3": {"EXP16": 3}}
if len(sys.argv) > 3:
    variants.update(json.loads(sys.argv[3]))
x = random_inputs(spec, T, 1, "cuda", torch.bfloat16, seed=0)
args, lay, kw, vw = packed_args(op, x)
res = {}
for name, v in variants.items():
    c = {"cmp_attention": dict(base, **v)}
    with torch.no_grad():
        o, idx, _ = op.module.forward(*args, lay, kw, vw, configs=c, short=False)
    res[name] = (o.clone(), None if idx is None else idx.clone())
o0, i0 = res["e0"]
for name, (o, idx) in res.items():
    rel = float((o.double() - o0.double()).norm() / o0.double().norm())
    diff = 0.0 if idx is None else float((idx != i0).any(-1).float().mean())
    print(f"{name}: o rel-diff vs e0 {rel:.2e}, rows with other blocks {diff:.4f}", flush=True)
for rep in range(2):
    for name, v in variants.items():
        c = {"cmp_attention": dict(base, **v)}

        def f():
            with torch.no_grad():
                op.module.forward(*args, lay, kw, vw, configs=c, short=False)
        ks = kernel_breakdown(f, iters=5)
        cmp = sum(t for k, t in ks.items() if k.startswith("cmp_attention"))
        print(f"{spec.name} T={T} {name:6s} {v} cmp_attention {cmp:.3f} ms, forward kernels "
              f"{sum(ks.values()):.2f} ms", flush=True)
