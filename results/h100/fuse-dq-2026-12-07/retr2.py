"""retr2.py: the retrieval example's training step at 16k (2 x 16k tokens), NSA layer with the
selected dq from the dk/dv pass (default) against the dq kernel (L2 rule set to 0), and SDPA;
median ms/step of 10, three rounds alternating."""
import importlib.util, sys, time
import torch
spec = importlib.util.spec_from_file_location("retrieval", "examples/retrieval.py")
R = importlib.util.module_from_spec(spec); sys.modules["retrieval"] = R; spec.loader.exec_module(R)
a = R.parse(["/tmp/x.json"])
dev = torch.device("cuda")
task = R.Task(a.filler, a.keys, a.values, a.pairs)
models = {k: R.build_model(k, a, task.vocab, dev) for k in ("nsagen", "full")}
opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
gen = torch.Generator().manual_seed(0)
mod = models["nsagen"].blocks[0].attn._op().module
def step(kind, tok, tgt):
    m, opt = models[kind], opts[kind]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _ = m(tok, tgt)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    opt.step(); opt.zero_grad(set_to_none=True)
for T in (16384,):
    tok, tgt = task.batch(a.tokens_per_step // T, T, gen, dev)
    for rep in range(3):
        for name, kind, l2 in (("fused", "nsagen", 50 * 2 ** 20), ("dq-kernel", "nsagen", 0),
                               ("sdpa", "full", None)):
            if l2 is not None:
                mod.L2_BYTES = l2
            for _ in range(2):
                step(kind, tok, tgt)
            torch.cuda.synchronize()
            ts = []
            for _ in range(10):
                t0 = time.perf_counter(); step(kind, tok, tgt); torch.cuda.synchronize()
                ts.append((time.perf_counter() - t0) * 1e3)
            ts.sort()
            print(f"T={T} {name:9s} median {ts[5]:.2f} ms/step ({a.tokens_per_step / ts[5] * 1e3:,.0f} "
                  f"tokens/s)", flush=True)
