"""Where the eager fwd+bwd at 64k loses time against its kernels: repeated timings (eager,
graph), allocator counters, sync warnings, and the largest gaps between kernels with the CUDA
runtime calls that fall in them.  usage: gap.py SPEC T OUTDIR TAG"""
import json
import sys
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

import nsagen
from nsagen.specfile import load_spec
from nsagen.tune.timing import capture_graph
from nsagen.tune.workloads import random_inputs

spec_name, T, outdir, tag = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
spec = load_spec(spec_name)
op = nsagen.build(spec)
x = random_inputs(spec, T, 1, "cuda", torch.bfloat16)
do = torch.randn(1, T, spec.heads_q, spec.dim_v, dtype=torch.bfloat16, device="cuda")
leaves = [t.requires_grad_(True) for t in x.values()]


def f():
    o = op(**x)
    torch.autograd.grad(o, leaves, do)


def times(fn, n=7):
    out = []
    for _ in range(n):
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b))
    return out


def back_to_back(fn, n=5):
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / n


f()
f()
torch.cuda.synchronize()
s0 = torch.cuda.memory_stats()
eager = times(f)
s1 = torch.cuda.memory_stats()
btb = back_to_back(f)
keys = ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams")
alloc = {k: s1.get(k, 0) - s0.get(k, 0) for k in keys}
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    f()
    torch.cuda.set_sync_debug_mode(0)
syncs = sorted({str(m.message)[:200] for m in w})
g = capture_graph(f)
graph = times(g.replay)
del g
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    f()
    torch.cuda.synchronize()
trace = f"{outdir}/trace-{tag}.json"
prof.export_chrome_trace(trace)
ev = json.load(open(trace))["traceEvents"]
kern = sorted((e for e in ev if e.get("cat") == "kernel"), key=lambda e: e["ts"])
rt = [e for e in ev if e.get("cat") == "cuda_runtime"]
ksum = sum(e["dur"] for e in kern) / 1e3
span = (kern[-1]["ts"] + kern[-1]["dur"] - kern[0]["ts"]) / 1e3
gaps = []
for a, b in zip(kern, kern[1:]):
    gap = b["ts"] - (a["ts"] + a["dur"])
    if gap > 30:
        t0, t1 = a["ts"] + a["dur"], b["ts"]
        calls = {}
        for r in rt:
            if r["ts"] < t1 and r["ts"] + r["dur"] > t0 - 20000:
                calls[r["name"]] = calls.get(r["name"], 0) + r["dur"]
        top = sorted(calls.items(), key=lambda kv: -kv[1])[:4]
        gaps.append((gap / 1e3, a["name"][:40], b["name"][:40], top))
gaps.sort(key=lambda g: -g[0])
rtsum = {}
for r in rt:
    rtsum[r["name"]] = rtsum.get(r["name"], [0, 0.0])
    rtsum[r["name"]][0] += 1
    rtsum[r["name"]][1] += r["dur"] / 1e3
print(f"== {tag} {spec_name} T={T}")
print("eager ms", [round(t, 2) for t in eager], "median", sorted(eager)[len(eager) // 2])
print("back-to-back ms/call", round(btb, 2))
print("graph ms", [round(t, 2) for t in graph], "median", sorted(graph)[len(graph) // 2])
print(f"profiled call: kernels {ksum:.2f} ms over a span of {span:.2f} ms, {len(kern)} kernels")
print("allocator over 7 eager calls:", alloc)
print("sync warnings:", syncs if syncs else "none")
print("runtime calls (count, ms):",
      sorted(((k, v[0], round(v[1], 2)) for k, v in rtsum.items()), key=lambda r: -r[2])[:10])
print(f"gaps > 30 us: {len(gaps)}, {sum(g[0] for g in gaps):.2f} ms in all; largest:")
for gp in gaps[:15]:
    print(f"  {gp[0]:.3f} ms after {gp[1]} before {gp[2]}; runtime {gp[3]}")
