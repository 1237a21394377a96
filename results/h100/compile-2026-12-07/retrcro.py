"""retrcro.py OUTDIR: as retrc.py with torch.compile(mode="reduce-overhead") (CUDA graphs), compiled models only;
 the retrieval example's training step at 16k (2 x 16384 tokens, forward +
backward + clip + AdamW under bf16 autocast), NSA layer and SDPA, eager and with the models
under torch.compile (default mode): median ms of 10 steps, alternating, 2 rounds."""
import importlib.util, json, sys, time, traceback
import torch
spec = importlib.util.spec_from_file_location("retrieval", "examples/retrieval.py")
R = importlib.util.module_from_spec(spec); sys.modules["retrieval"] = R; spec.loader.exec_module(R)
out = sys.argv[1]
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
        run[f"{kind}-compiled"] = torch.compile(models[kind], dynamic=False, mode="reduce-overhead")
        for _ in range(3):
            loss = step(f"{kind}-compiled", tok, tgt)
        torch.cuda.synchronize()
        print(f"{kind}: compiled in {time.perf_counter() - t0:.1f} s, loss {loss.item():.4f}", flush=True)
    except Exception:
        traceback.print_exc()
        run.pop(f"{kind}-compiled", None)
res = {}
for rnd in range(2):
    for name in [n for n in run if n.endswith("compiled")]:
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
json.dump(res, open(f"{out}/retrcro.json", "w"), indent=1)
