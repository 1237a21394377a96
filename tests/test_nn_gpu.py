"""The SparseAttention layer on a CUDA GPU in bfloat16: a small decoder built from it compiles
with torch.compile(fullgraph=True) (no graph break) and gives the eager forward and gradients;
decoding with the cache gives the training forward's rows. Skipped without a GPU."""
import pytest
import torch
from torch import nn

import nsagen
from nsagen.nn import SparseAttention

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
BF16 = torch.bfloat16


def _spec(kind="mlp", kv="shared"):
    """A small paper-style layer: 8 query heads over 2 KV heads of 64 dims."""
    return nsagen.load_spec("nsa-paper").replace(
        name=f"nn-gpu-{kind}-{kv}", heads_q=8, heads_kv=2, dim_qk=64, dim_v=64, cmp_kind=kind,
        kv_per_branch=kv)


class Block(nn.Module):
    def __init__(self, spec, hidden):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.attn = SparseAttention(spec, hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(),
                                 nn.Linear(4 * hidden, hidden))

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        return x + self.mlp(self.n2(x))


class Decoder(nn.Module):
    def __init__(self, spec, vocab=64, layers=2):
        super().__init__()
        hidden = spec.heads_q * spec.dim_v
        self.emb = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(Block(spec, hidden) for _ in range(layers))
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids):
        x = self.emb(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("kind,kv,T", [("mlp", "shared", 1000), ("mean", "separate", 1000),
                                       ("mlp", "shared", 3000)])
def test_compiled_decoder_fullgraph(kind, kv, T):
    """T = 1000 runs the short-length plan (every block selected), 3000 the block choice."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = Decoder(_spec(kind, kv)).cuda().to(BF16)
    ids = torch.randint(0, 64, (2, T), device="cuda")
    eager_logits = model(ids)
    eager_grads = torch.autograd.grad(eager_logits.float().square().mean(),
                                      list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True)      # raises on any graph break
    logits = compiled(ids)
    grads = torch.autograd.grad(logits.float().square().mean(), list(model.parameters()))
    assert torch.isfinite(logits).all()
    assert _rel(logits, eager_logits) < 2e-2
    for g, e in zip(grads, eager_grads):
        assert torch.isfinite(g).all()
        assert _rel(g, e) < 5e-2


def test_decode_equals_training_forward_bf16():
    torch.manual_seed(1)
    spec = _spec("mlp", "shared")
    hidden = spec.heads_q * spec.dim_v
    layer = SparseAttention(spec, hidden).cuda().to(BF16)
    with torch.no_grad():
        for p in layer.parameters():      # every path carries signal (gates and phi included)
            p.normal_(0, 0.05)
        x = torch.randn(2, 700, hidden, device="cuda", dtype=BF16)
        full = layer(x)
        cache = layer.new_cache(2, 800, device="cuda", dtype=BF16)
        prompt = layer(x[:, :650], cache=cache)
        steps = [layer(x[:, t:t + 1], cache=cache) for t in range(650, 700)]
    got = torch.cat([prompt] + steps, dim=1)
    assert torch.isfinite(got).all()
    assert _rel(got, full) < 3e-2


@pytest.mark.parametrize("mode", ["distill", "straight-through"])
def test_selection_grad_keeps_the_plain_gradients_bf16(mode):
    """In bf16 at a length where the selection is sparse (2048 tokens, 16 of 32 blocks), a
    selection_grad mode gives the plain layer's output and the same gradients for every
    parameter it does not train; "distill" adds its loss's gradient (weighted 50, so that it
    shows above bf16 noise) to phi_k alone, and "straight-through" changes only what feeds the
    block scores."""
    from nsagen.selection_grad import DISTILL_STRIDE, distill_loss

    torch.manual_seed(2)
    spec = _spec("mlp", "shared")
    hidden = spec.heads_q * spec.dim_v
    x = torch.randn(2, 2048, hidden, device="cuda", dtype=BF16)
    dy = torch.randn_like(x)
    runs = []
    for m in ("none", mode):
        torch.manual_seed(3)
        layer = SparseAttention(spec, hidden, selection_grad=m, rope=("slc", "win"),
                                selection_weight=50.0).cuda().to(BF16)
        with torch.no_grad():
            for p in layer.parameters():
                p.normal_(0, 0.05)
        y = layer(x)
        y.backward(dy)
        runs.append((y.detach(), {n: p.grad.float() for n, p in layer.named_parameters()}, layer))
    (y0, g0, _), (y1, g1, layer) = runs
    assert torch.isfinite(y1).all() and _rel(y1, y0) < 1e-2
    changed = {n for n in g0 if _rel(g1[n], g0[n]) > 2e-2}
    for n in g0:
        assert torch.isfinite(g1[n]).all(), n
    if mode == "straight-through":
        assert changed and all(n.startswith(("q_proj", "k_proj", "phi_k")) for n in changed)
        return
    assert changed and all(n.startswith("phi_k") for n in changed), changed
    p = layer.project(x)
    with torch.no_grad():
        _, idx = layer._op()(p["q"], p["k"], p["v"], p["gates"], p["k_cmp"], p["v_cmp"],
                             q_cmp=p["q_cmp"], return_indices=True)
    kc = layer._cmp_keys(p["k_src"].detach(), None, x.shape[1], ("T", x.shape[1]))
    loss = distill_loss(spec, p["q"], p["k"], p["q_cmp"].detach(), kc, idx, DISTILL_STRIDE)
    assert torch.allclose(layer.last_selection_loss.float(), loss.detach().float(), rtol=2e-2)
    names = [n for n, _ in layer.named_parameters()]
    extra = torch.autograd.grad(loss * 50.0, list(layer.parameters()), allow_unused=True)
    for n, e in zip(names, extra):
        if n.startswith("phi_k"):
            err = (g1[n] - g0[n] - e.float()).norm()
            assert err <= 2e-2 * g0[n].norm() + 5e-2 * e.float().norm(), n
