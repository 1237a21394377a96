"""bwdsweep.py SPEC T OUT.json '[[label, {kernel: {cfg}}], ...]': fwd+bwd per-kernel times per
config override set (per-kernel from the torch profiler, total median)."""
import json, sys, time
import torch
import nsagen
from nsagen.tune.timing import median_ms, profile_kernels
from nsagen.tune.workloads import random_inputs

spec = nsagen.load_spec(sys.argv[1]); T = int(sys.argv[2]); out = sys.argv[3]
variants = json.loads(sys.argv[4])
op = nsagen.build(spec)
print("module", op.name, op.path, flush=True)
torch.manual_seed(0)
x = random_inputs(spec, T, 1, "cuda", torch.bfloat16)
do = torch.randn(1, T, spec.heads_q, spec.dim_v, dtype=torch.bfloat16, device="cuda")
leaves = [t.requires_grad_(True) for t in x.values()]
def f():
    o = op(**x)
    torch.autograd.grad(o, leaves, do)
res = []
for label, ov in variants:
    op.configs = ov
    t0 = time.time()
    try:
        f(); torch.cuda.synchronize()
    except Exception as e:
        print(label, "FAILED", str(e)[:300], flush=True); res.append(dict(label=label, error=str(e)[:300])); continue
    kt = profile_kernels(f, 3)
    tot = median_ms(f, warmup=5, rep=50)
    short = {k: round(v, 3) for k, v in kt.items() if "attention_bwd" in k or "cmp_attention" == k}
    print(f"{label}: total {tot:.2f} ms  ({time.time()-t0:.0f}s) ", short, flush=True)
    res.append(dict(label=label, overrides=ov, total_ms=tot, kernels_ms=kt))
    json.dump(dict(spec=spec.name, T=T, gpu=torch.cuda.get_device_name(), rows=res), open(out, "w"), indent=1)
