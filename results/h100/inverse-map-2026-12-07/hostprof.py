"""hostprof.py OUTDIR: host time of the retrieval layer's NSA op (2 x 16384 tokens, bf16):
issue time of forward and backward with the GPU held by a sleep kernel, then cProfile of 20
layer forward+backward calls (tottime and cumulative)."""
import cProfile, importlib.util, io, pstats, sys, time
import torch
spec = importlib.util.spec_from_file_location("retrieval", "examples/retrieval.py")
R = importlib.util.module_from_spec(spec); sys.modules["retrieval"] = R; spec.loader.exec_module(R)
out = sys.argv[1]
a = R.parse([out + "/x.json"])
dev = torch.device("cuda")
from nsagen.nn import SparseAttention
layer = SparseAttention(R.nsa_spec(a), a.hidden, rope_theta=a.rope_theta).to(dev)
x = torch.randn(2, 16384, a.hidden, device=dev, requires_grad=True)
g = torch.randn(2, 16384, a.hidden, device=dev, dtype=torch.bfloat16)
def fb():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    y.backward(g)
for _ in range(5):
    fb()
torch.cuda.synchronize()
with torch.autocast("cuda", dtype=torch.bfloat16):
    p = layer.project(x)
op = layer._op()
args = {k: v.detach().requires_grad_(v.dtype.is_floating_point) if v is not None else None for k, v in p.items()}
ins = (args["q"], args["k"], args["v"], args["gates"], args["k_cmp"], args["v_cmp"])
for name in ("layer", "op"):
    for _ in range(3):
        if name == "layer":
            fb()
        else:
            o = op(*ins); o.backward(torch.ones_like(o))
    torch.cuda.synchronize()
    tf, tb = [], []
    for _ in range(10):
        torch.cuda._sleep(300_000_000)
        t0 = time.perf_counter()
        if name == "layer":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = layer(x)
        else:
            y = op(*ins)
        t1 = time.perf_counter()
        y.backward(g if name == "layer" else torch.ones_like(y))
        t2 = time.perf_counter()
        torch.cuda.synchronize()
        tf.append((t1 - t0) * 1e3); tb.append((t2 - t1) * 1e3)
    tf.sort(); tb.sort()
    print(f"{name}: host issue forward {tf[5]:.3f} ms, backward {tb[5]:.3f} ms (GPU held)", flush=True)
torch.cuda.synchronize()
pr = cProfile.Profile()
pr.enable()
for _ in range(20):
    fb()
torch.cuda.synchronize()
pr.disable()
for key in ("tottime", "cumulative"):
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats(key).print_stats(45)
    print(s.getvalue()[-9000:])
