"""cmpab.py TAG SPEC T [cfg-json ...]: GPU time of the forward's kernels (torch profiler, mean of
5 calls) with each cmp_attention config ('{}' = the default), one line per config."""
import json
import sys
import torch
import nsagen
from nsagen.specfile import load_spec
from nsagen.tune.workloads import random_inputs, packed_args
from nsagen.bench import kernel_breakdown

tag, spec = sys.argv[1], load_spec(sys.argv[2])
T = int(sys.argv[3])
op = nsagen.build(spec)
x = random_inputs(spec, T, 1, "cuda", torch.bfloat16, seed=0)
args, lay, kw, vw = packed_args(op, x)
for c in sys.argv[4:] or ["{}"]:
    cfg = dict(op.module.CONFIGS)
    cfg["cmp_attention"] = dict(cfg["cmp_attention"], **json.loads(c))

    def f():
        with torch.no_grad():
            op.module.forward(*args, lay, kw, vw, configs=cfg, short=False)
    try:
        ks = kernel_breakdown(f, iters=5)
    except Exception as e:   # a config that does not compile or launch
        print(tag, spec.name, T, c, "FAILED", str(e)[:200], flush=True)
        continue
    short = {k[:24]: round(v, 2) for k, v in ks.items() if v > 0.05}
    print(tag, spec.name, T, c, "sum %.2f" % sum(ks.values()), short, flush=True)
