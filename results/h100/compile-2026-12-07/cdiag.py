"""cdiag.py OUT: the op under torch.compile past the short-length plan: forward + backward of
op(...).float().square().sum() compiled (inductor, then aot_eager) against eager, per spec and T."""
import os, sys, traceback, glob, shutil
import torch
import nsagen
out = sys.argv[1]
BF = torch.bfloat16
def inputs(spec, B, T, learned):
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: (torch.randn(*s, device="cuda", generator=g) * 0.5).to(BF).requires_grad_(True)
    x = dict(q=r(B, T, spec.heads_q, spec.dim_qk), k=r(B, T, spec.heads_kv, spec.dim_qk),
             v=r(B, T, spec.heads_kv, spec.dim_v),
             gates=torch.rand(B, T, spec.heads_q, 3, device="cuda", generator=g).to(BF).requires_grad_(True))
    if learned:
        nc = spec.num_cmp(T)
        x.update(k_cmp=r(B, nc, spec.heads_kv, spec.dim_qk), v_cmp=r(B, nc, spec.heads_kv, spec.dim_v))
    return x
def run(op, x, fn):
    for t in x.values():
        t.grad = None
    loss = fn(op, x)
    loss.backward()
    return [loss.detach()] + [t.grad.clone() for t in x.values()]
def f(op, x):
    return op(**x).float().square().sum()
for name, B, T in [(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))]:
    spec = nsagen.load_spec(name)
    op = nsagen.build(spec)
    x = inputs(spec, B, T, spec.learned_compression)
    ref = run(op, x, f)
    for backend in sys.argv[5].split(","):
        torch._dynamo.reset()
        try:
            c = torch.compile(f, fullgraph=True, backend=backend)
            got = run(op, x, c)
            torch.cuda.synchronize()
            errs = [((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-9)).item() for a, b in zip(got, ref)]
            print(f"{name} B={B} T={T} {backend}: ok, rel errors {['%.2e' % e for e in errs]}", flush=True)
        except Exception as e:
            print(f"{name} B={B} T={T} {backend}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            traceback.print_exc()
            break
os.makedirs(out + "/ind", exist_ok=True)
for p in glob.glob("/tmp/torchinductor_*/**/*.py", recursive=True):
    if "inverse_map" in open(p).read():
        shutil.copy(p, out + "/ind/")
