"""layer.py OUTDIR: the retrieval example's attention layer alone (hidden 512, 8/1 heads, D=64,
mlp compression, RoPE), NSA against SDPA, x [2, 16384, 512] under bf16 autocast with fp32
weights: wall ms per forward+backward, host ms to issue it (GPU held by a sleep kernel), GPU
kernel time per kernel name, and CUDA time per source line (profiler stacks)."""
import importlib.util, json, sys, time, collections
import torch

spec = importlib.util.spec_from_file_location("retrieval", "examples/retrieval.py")
R = importlib.util.module_from_spec(spec)
sys.modules["retrieval"] = R
spec.loader.exec_module(R)
out = sys.argv[1]
T = int(sys.argv[2]) if len(sys.argv) > 2 else 16384
a = R.parse([out + "/x.json"])
dev = torch.device("cuda")
torch.manual_seed(0)
from nsagen.nn import SparseAttention
layers = {"nsagen": SparseAttention(R.nsa_spec(a), a.hidden, rope_theta=a.rope_theta).to(dev),
          "full": R.FullAttention(a.hidden, a.heads, a.kv_heads, a.hidden // a.heads,
                                  a.rope_theta).to(dev)}
B = a.tokens_per_step // T
x = torch.randn(B, T, a.hidden, device=dev, requires_grad=True)
g = torch.randn(B, T, a.hidden, device=dev, dtype=torch.bfloat16)
res = {}


def fb(m):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = m(x)
    y.backward(g)


for kind, m in layers.items():
    for _ in range(5):
        fb(m)
    torch.cuda.synchronize()
    ts, hs = [], []
    for _ in range(20):
        t0 = time.perf_counter()
        fb(m)
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e3)
    for _ in range(10):
        torch.cuda._sleep(200_000_000)     # ~0.1 s: the host issues everything before the GPU runs
        t0 = time.perf_counter()
        fb(m)
        hs.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
    ts.sort(); hs.sort()
    res[kind] = dict(wall_ms=ts[len(ts) // 2], host_ms=hs[len(hs) // 2])
    print(f"{kind}: fwd+bwd wall {ts[len(ts)//2]:.3f} ms (min {ts[0]:.3f}), host issue "
          f"{hs[len(hs)//2]:.3f} ms", flush=True)

from torch.profiler import profile, ProfilerActivity
for kind, m in layers.items():
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=False) as prof:
        for _ in range(4):
            fb(m)
        torch.cuda.synchronize()
    kern = collections.defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type.name == "CUDA" and e.device_time_total > 0:
            kern[e.name][0] += 1
            kern[e.name][1] += e.device_time_total
    tot = sum(v[1] for v in kern.values()) / 4e3
    res[kind]["gpu_ms"] = tot
    print(f"== {kind}: GPU kernels {tot:.3f} ms per fwd+bwd, {sum(v[0] for v in kern.values())/4:.0f} launches", flush=True)
    for name, (n, t) in sorted(kern.items(), key=lambda kv: -kv[1][1])[:40]:
        print(f"{t/4e3:8.3f} ms {n/4:5.1f}x  {name[:110]}")
json.dump(res, open(out + "/layer.json", "w"), indent=1)
