"""retrc.py OUTDIR [MODE [profile]]: the retrieval example's training step at 16k (2 x 16384
tokens, forward + backward + clip + AdamW under bf16 autocast), NSA layer and SDPA, eager and
with the models under torch.compile: median ms of 10 steps, alternating, 2 rounds (retrc.log).
MODE (default "default") is torch.compile's mode; with "reduce-overhead" only the compiled
models are timed (retrcro.log). "profile": instead of timing, the compiled steps under the torch
profiler, GPU time per kernel (prof-compiled-step.log)."""
import importlib.util, json, sys, time, traceback
import torch
spec = importlib.util.spec_from_file_location("retrieval", "examples/retrieval.py")
R = importlib.util.module_from_spec(spec); sys.modules["retrieval"] = R; spec.loader.exec_module(R)
out = sys.argv[1]
MODE = sys.argv[2] if len(sys.argv) > 2 else "default"
PROFILE = len(sys.argv) > 3 and sys.argv[3] == "profile"
a = R.parse([out + "/x.json"])
dev = torch.device("cuda")
task = R.Task(a.filler, a.keys, a.values, a.pairs)
models = {k: R.build_model(k, a, task.vocab, dev) for k in ("nsagen", "full")}
opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
run = {f"{k}-eager": m for k, m in models.items()}
gen = torch.Generator().manual_seed(0)
T = 16384
tok, tgt = task.batch(a.tokens_per_step // T, T, gen, dev)
def step(name, tok, tgt):
    kind = name.split("-")[0]
    m, opt = run[name], opts[kind]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _ = m(tok, tgt)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(models[kind].parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss
for kind in ("nsagen", "full"):
    step(f"{kind}-eager", tok, tgt)      # builds the op outside the compiled region
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    try:
        run[f"{kind}-compiled"] = torch.compile(models[kind], dynamic=False, mode=MODE)
        for _ in range(3):
            loss = step(f"{kind}-compiled", tok, tgt)
        torch.cuda.synchronize()
        print(f"{kind}: compiled in {time.perf_counter() - t0:.1f} s, loss {loss.item():.4f}", flush=True)
    except Exception:
        traceback.print_exc()
        run.pop(f"{kind}-compiled", None)

if PROFILE:
    from torch.profiler import profile, ProfilerActivity
    for name in [n for n in run if n.endswith("compiled")]:
        for _ in range(3):
            step(name, tok, tgt)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step(name, tok, tgt)
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3 / 3
        ks = {}
        for ev in prof.key_averages():
            t = getattr(ev, "device_time_total", 0) or 0
            if t:
                ks[ev.key] = (ks.get(ev.key, (0, 0))[0] + t / 1e3 / 3, ev.count / 3)
        print(f"== {name}: wall {wall:.2f} ms/step (profiled), GPU kernels "
              f"{sum(v[0] for v in ks.values()):.2f} ms/step, "
              f"{sum(v[1] for v in ks.values()):.0f} launches", flush=True)
        for k, (ms, n) in sorted(ks.items(), key=lambda kv: -kv[1][0])[:45]:
            print(f"   {ms:7.3f} ms {n:5.1f}x  {k[:110]}", flush=True)
    sys.exit(0)
res = {}
for rnd in range(2):
    for name in [n for n in run if MODE == "default" or n.endswith("compiled")]:
        for _ in range(2):
            step(name, tok, tgt)
        torch.cuda.synchronize()
        ts = []
        for _ in range(10):
            t0 = time.perf_counter()
            step(name, tok, tgt)
            torch.cuda.synchronize()
            ts.append((time.perf_counter() - t0) * 1e3)
        ts.sort()
        res.setdefault(name, []).append(ts[5])
        print(f"round {rnd} {name}: median {ts[5]:.2f} ms/step, min {ts[0]:.2f}, "
              f"{a.tokens_per_step / ts[5] * 1e3:,.0f} tokens/s", flush=True)
json.dump(res, open(f"{out}/retrc{'ro' if MODE != 'default' else ''}.json", "w"), indent=1)
