"""fuse.py: the selected backward's FUSE_DQ switch (dq from the dk/dv pass) and tiles, per spec:
gradients against the default (f0), and the backward kernels' times by the torch profiler (mean
of 5), two rounds alternating. Specs: nsa-d128 64k, nsa-fla 64k, the retrieval example's layer
(8/1 heads, D=64, mlp compression) at 2 x 16k, nsa-g1 64k."""
import sys, torch, nsagen
from torch._library.triton import set_wrap_triton_enabled
_direct = set_wrap_triton_enabled(False); _direct.__enter__()
from nsagen.specfile import load_spec
from nsagen.tune.workloads import random_inputs, packed_args
from nsagen.bench import kernel_breakdown

RETR = nsagen.Spec.from_dict(dict(
    name="retrieval", heads={"q": 8, "kv": 1}, head_dim={"qk": 64, "v": 64}, dtype="bfloat16",
    compression={"block": 32, "stride": 16, "kind": "mlp"},
    selection={"block": 64, "count": 16, "initial": 1, "local": 2}, window=512))
CASES = {"nsa-d128": (load_spec("nsa-d128"), 1, 65536), "nsa-fla": (load_spec("nsa-fla"), 1, 65536),
         "retrieval": (RETR, 2, 16384), "nsa-g1": (load_spec("nsa-g1"), 1, 65536)}
VARIANTS = {"f0": {}, "f1": {"FUSE_DQ": 1}, "f1w8": {"FUSE_DQ": 1, "num_warps": 8},
            "f0w8": {"num_warps": 8}, "f1b2w8": {"FUSE_DQ": 1, "num_warps": 8, "BT_BWD": "half"}}
names = sys.argv[1:] or list(CASES)
for name in names:
    spec, B, T = CASES[name]
    op = nsagen.build(spec)
    base = dict(op.module.CONFIGS["slc_attention_bwd"])
    print(name, "default", base, flush=True)

    def cfg(v):
        v = dict(v)
        if v.get("BT_BWD") == "half":
            v["BT_BWD"] = max(1, base["BT_BWD"] // 2)
        return {"slc_attention_bwd": dict(base, **v)}
    x = random_inputs(spec, T, B, "cuda", torch.bfloat16, seed=0)
    args, lay, kw, vw = packed_args(op, x)
    with torch.no_grad():
        o, idx, saved = op.module.forward(*args, lay, kw, vw, save=True, short=False)
    torch.manual_seed(0)
    do = torch.randn_like(o)
    res = {}
    for vn, v in VARIANTS.items():
        with torch.no_grad():
            g = op.module.backward(do, *args[:4], idx, saved, lay, kw, vw, configs=cfg(v))
        res[vn] = {k: t.clone() for k, t in g.items() if isinstance(t, torch.Tensor)}
    for vn in VARIANTS:
        d = {k: float((res[vn][k].double() - res["f0"][k].double()).norm()
                      / res["f0"][k].double().norm().clamp_min(1e-30)) for k in res["f0"]}
        print(f"  {vn}: rel-diff vs f0 " + ", ".join(f"{k} {e:.1e}" for k, e in d.items()),
              flush=True)
    for rep in range(2):
        for vn, v in VARIANTS.items():
            c = cfg(v)

            def b():
                with torch.no_grad():
                    op.module.backward(do, *args[:4], idx, saved, lay, kw, vw, configs=c)
            ks = kernel_breakdown(b, iters=5)
            slc = {k[len("slc_attention_bwd_"):]: round(t, 3) for k, t in ks.items()
                   if k.startswith("slc_attention_bwd")}
            print(f"  {name} B={B} T={T} {vn:7s} backward kernels {sum(ks.values()):.3f} ms, "
                  f"slc {sum(slc.values()):.3f} {slc}", flush=True)
    del op, x, saved, res
    torch.cuda.empty_cache()
