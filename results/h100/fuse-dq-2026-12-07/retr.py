"""retr.py OUTDIR: the retrieval example's training step (forward + backward + AdamW), NSA layer
against SDPA, ms per step at 4k / 8k / 16k (32k tokens a step), then a profiler table of one
16k step of each (CUDA time per op, and the CPU side)."""
import importlib.util, json, sys, time
import torch

spec = importlib.util.spec_from_file_location("retrieval", "examples/retrieval.py")
R = importlib.util.module_from_spec(spec)
sys.modules["retrieval"] = R
spec.loader.exec_module(R)
out = sys.argv[1]
a = R.parse([out + "/x.json"])
dev = torch.device("cuda")
task = R.Task(a.filler, a.keys, a.values, a.pairs)
res = {}
models = {k: R.build_model(k, a, task.vocab, dev) for k in ("nsagen", "full")}
opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
gen = torch.Generator().manual_seed(0)


def step(kind, tok, tgt):
    m, opt = models[kind], opts[kind]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _ = m(tok, tgt)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


for T in (4096, 8192, 16384):
    batch = a.tokens_per_step // T
    tok, tgt = task.batch(batch, T, gen, dev)
    for kind in ("nsagen", "full"):
        for _ in range(3):
            step(kind, tok, tgt)
        torch.cuda.synchronize()
        ts = []
        for _ in range(10):
            t0 = time.perf_counter()
            step(kind, tok, tgt)
            torch.cuda.synchronize()
            ts.append((time.perf_counter() - t0) * 1e3)
        ts.sort()
        res[f"{kind}_{T}"] = ts[len(ts) // 2]
        print(f"T={T} {kind}: median {ts[len(ts)//2]:.2f} ms/step, min {ts[0]:.2f}, "
              f"{a.tokens_per_step / ts[len(ts)//2] * 1e3:,.0f} tokens/s", flush=True)
json.dump(res, open(out + "/retr.json", "w"), indent=1)

from torch.profiler import profile, ProfilerActivity
T = 16384
tok, tgt = task.batch(a.tokens_per_step // T, T, gen, dev)
for kind in ("nsagen", "full"):
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step(kind, tok, tgt)
        torch.cuda.synchronize()
    ka = prof.key_averages()
    with open(f"{out}/prof-{kind}.txt", "w") as f:
        f.write(ka.table(sort_by="cuda_time_total", row_limit=60, max_name_column_width=60))
        f.write("\n\nCPU\n")
        f.write(ka.table(sort_by="cpu_time_total", row_limit=40, max_name_column_width=60))
    tot = sum(e.self_device_time_total for e in ka) / 2e3
    print(f"{kind}: profiled GPU self time {tot:.2f} ms/step", flush=True)
    print(ka.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=50), flush=True)
