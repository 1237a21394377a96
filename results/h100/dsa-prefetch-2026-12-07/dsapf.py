"""dsapf.py SPEC MODE T...: the DSA attention kernels alone (profiler, median of 3 passes of
3 calls) with the L2 prefetch distance PF varied, alternating, two rounds; outputs compared
with PF=0 (must be equal: a prefetch changes no value). MODE fwd: the forward kernel; bwd: the
backward's kernels (forward + backward through the op)."""
import statistics, sys, time, torch, nsagen
from nsagen.specfile import load_spec
from nsagen.dsa_bench import _inputs
from nsagen.bench import kernel_breakdown
spec = load_spec(sys.argv[1]); mode = sys.argv[2]
op = nsagen.build(spec)
kern = "dsa_attention" if mode == "fwd" else "dsa_attention_bwd"
base = dict(op.module.CONFIGS[kern])
print("default", base, flush=True)
pfs = (0, 1, 2, 3, 4) if mode == "fwd" else (0, 2, 3)
for T in map(int, sys.argv[3:]):
    x = _inputs(spec, 1, T, "cuda", torch.bfloat16)
    if mode == "fwd":
        def f():
            with torch.no_grad():
                return op(**x)
    else:
        leaves = [x[n].requires_grad_(True) for n in ("q", "k") ]
        do = torch.randn(1, T, spec.heads_q, spec.dim_v, dtype=torch.bfloat16, device="cuda")
        def f():
            return torch.autograd.grad(op(**x), leaves, do)[0]
    ref = None
    for rnd in range(2):
        for pf in pfs:
            op.configs = {kern: dict(base, PF=pf)}
            t0 = time.time()
            o = f(); torch.cuda.synchronize()
            if ref is None:
                ref = o.clone()
            diff = (o.float() - ref.float()).abs().max().item()
            parts = [kernel_breakdown(f, 3) for _ in range(3)]
            ms = statistics.median(sum(v for n, v in p.items() if n.startswith(kern)
                                       and (mode == "bwd" or not n.startswith(kern + "_")))
                                   for p in parts)
            top = {n[len(kern):] or "main": round(v, 2) for n, v in parts[-1].items()
                   if n.startswith(kern)}
            print(f"{mode} T={T} round {rnd} PF={pf}: {ms:.3f} ms maxdiff {diff:.1e} {top} "
                  f"[{time.time() - t0:.0f}s]", flush=True)
    del x, ref
