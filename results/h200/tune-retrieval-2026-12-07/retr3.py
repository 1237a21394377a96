"""retr3.py OUTDIR TAG: the retrieval example's training step at 16k (2 x 16384 tokens,
forward + backward + clip + AdamW), NSA layer and SDPA, median ms of 10 steps, 2 rounds."""
import importlib.util, json, sys, time
import torch
import nsagen
spec = importlib.util.spec_from_file_location("retrieval", "examples/retrieval.py")
R = importlib.util.module_from_spec(spec); sys.modules["retrieval"] = R; spec.loader.exec_module(R)
out, tag = sys.argv[1], sys.argv[2]
print("nsagen from", nsagen.__file__)
a = R.parse([out + "/x.json"])
dev = torch.device("cuda")
task = R.Task(a.filler, a.keys, a.values, a.pairs)
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
T = 16384
tok, tgt = task.batch(a.tokens_per_step // T, T, gen, dev)
res = {}
for rnd in range(2):
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
        res.setdefault(kind, []).append(ts[5])
        print(f"[{tag}] round {rnd} {kind}: median {ts[5]:.2f} ms/step, min {ts[0]:.2f}, "
              f"{a.tokens_per_step / ts[5] * 1e3:,.0f} tokens/s", flush=True)
json.dump(res, open(f"{out}/retr3-{tag}.json", "w"), indent=1)
