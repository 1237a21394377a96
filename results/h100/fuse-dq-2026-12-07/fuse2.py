"""fuse2.py: where FUSE_DQ stops paying: the selected backward's kernels with the switch off and
forced on (the L2 rule lifted), over dq buffers of 32-128 MiB, for the retrieval layer (8/1
heads, D=64) and nsa-d128; profiler means of 5, two rounds."""
import torch, nsagen
from torch._library.triton import set_wrap_triton_enabled
_direct = set_wrap_triton_enabled(False); _direct.__enter__()
from nsagen.specfile import load_spec
from nsagen.tune.workloads import random_inputs, packed_args
from nsagen.bench import kernel_breakdown
RETR = nsagen.Spec.from_dict(dict(
    name="retrieval", heads={"q": 8, "kv": 1}, head_dim={"qk": 64, "v": 64}, dtype="bfloat16",
    compression={"block": 32, "stride": 16, "kind": "mlp"},
    selection={"block": 64, "count": 16, "initial": 1, "local": 2}, window=512))
CASES = [(RETR, 2, 16384), (RETR, 4, 16384), (RETR, 8, 16384),
         (load_spec("nsa-d128"), 1, 2048), (load_spec("nsa-d128"), 1, 4096)]
for spec, B, T in CASES:
    op = nsagen.build(spec)
    op.module.L2_BYTES = 1 << 40
    base = dict(op.module.CONFIGS["slc_attention_bwd"])
    x = random_inputs(spec, T, B, "cuda", torch.bfloat16, seed=0)
    args, lay, kw, vw = packed_args(op, x)
    with torch.no_grad():
        o, idx, saved = op.module.forward(*args, lay, kw, vw, save=True, short=False)
    do = torch.randn_like(o)
    for rep in range(2):
        for fz in (0, 1):
            c = {"slc_attention_bwd": dict(base, FUSE_DQ=fz)}

            def b():
                with torch.no_grad():
                    op.module.backward(do, *args[:4], idx, saved, lay, kw, vw, configs=c)
            ks = kernel_breakdown(b, iters=5)
            slc = {k[len("slc_attention_bwd_"):]: round(t, 3) for k, t in ks.items()
                   if k.startswith("slc_attention_bwd")}
            dq_mib = B * T * spec.heads_q * max(64, spec.dim_qk) * 4 / 2 ** 20
            print(f"{spec.name} B={B} T={T} dq {dq_mib:.0f} MiB FUSE_DQ={fz}: backward kernels "
                  f"{sum(ks.values()):.3f} ms, slc {sum(slc.values()):.3f} {slc}", flush=True)
    op.module.L2_BYTES = 50 * 2 ** 20
    del op, x, saved
    torch.cuda.empty_cache()
