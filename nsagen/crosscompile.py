"""Compile a module's kernels for a CUDA architecture on a machine without that GPU.

The forward, the backward and a decode step run on CPU tensors with every Triton launch recorded
instead of executed (nothing is computed); each distinct launch is then compiled by the installed
Triton for the target (its bundled ptxas included). This checks, before any GPU time is spent,
that every kernel a spec generates compiles with the configs it launches with, on this Triton.
Needs Triton's NVIDIA backend and a process where TRITON_INTERPRET is off.

The same recorded launches also go through torch's analysis of which tensors each kernel
writes (`written_tensors`), which torch.library and torch.compile trust.
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

try:   # torch's analysis of what a Triton kernel writes (torch.library's triton ops use it)
    from torch._higher_order_ops.triton_kernel_wrap import identify_accessed_tensors
except ImportError:    # older torch
    identify_accessed_tensors = None

from .cache import interpreting
from .ir.passes import decode_splits
from .layout import build_layout
from .target import Target
from .tune.compile import is_descriptor, recording, variant_key
from .tune.workloads import DecodeSetup, packed_args, random_inputs

_PTR_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
              torch.float64: "fp64", torch.int32: "i32", torch.int64: "i64",
              torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1",
              torch.float8_e4m3fn: "fp8e4nv"}


@dataclass
class Compiled:
    """One compiled launch variant: the kernel, its constexprs, the compile time and what one
    program of it holds: shared memory (bytes), registers a thread and bytes a thread spills
    to local memory (None where the bundled cuobjdump is missing)."""

    kernel: str
    constexprs: dict
    seconds: float
    shared: int = 0
    registers: int | None = None
    spilled: int | None = None

    def resources(self) -> str:
        """'221.4 KB shared, 255 registers, 448 B spilled' (what is known of it)."""
        out = [f"{self.shared / 1024:.1f} KB shared"]
        if self.registers is not None:
            out.append(f"{self.registers} registers")
        if self.spilled:
            out.append(f"{self.spilled} B spilled")
        return ", ".join(out)


def _registers(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers a thread, bytes of stack a thread: spills) of a cubin, read by the cuobjdump
    that Triton's NVIDIA backend bundles; (None, None) without it."""
    from triton.backends.nvidia import compiler as nv

    tool = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, timeout=60).stdout
    reg, stack = re.search(r"REG:(\d+)", out), re.search(r"STACK:(\d+)", out)
    return (int(reg.group(1)) if reg else None), (int(stack.group(1)) if stack else None)


def record_launches(op, seq_len: int = 300, dtype=torch.bfloat16, decode_batch: int = 2,
                    decode_len: int = 1000, configs: dict | None = None) -> list[tuple]:
    """The distinct (kernel, args, kwargs) launches of a forward, a backward and a decode step
    at `seq_len` on CPU tensors, with `configs` (default: the module's defaults)."""
    if interpreting():
        raise RuntimeError("cross-compiling needs TRITON_INTERPRET off: under the interpreter "
                           "kernels are not compiled")
    spec = op.spec
    cfg = dict(op.module.CONFIGS, **(configs or {}))
    calls: list = []
    if spec.family == "dsa":
        with recording(calls), torch.no_grad():
            _record_dsa(op, seq_len, dtype, cfg)
        return _distinct(calls)
    x = random_inputs(spec, seq_len, 1, "cpu", dtype)
    with recording(calls), torch.no_grad():
        args, lay, kw, vw = packed_args(op, x)
        if hasattr(op.module, "SHORT_LEN"):     # the short-length plan's launches too
            op.module.forward(*args, lay, kw, vw, configs=cfg, short=True)
            o, _, saved = op.module.forward(*args, lay, kw, vw, configs=cfg, save=True, short=True)
            op.module.backward(torch.randn_like(o), *args[:4], None, saved, lay, kw, vw,
                               configs=cfg)
        op.module.forward(*args, lay, kw, vw, configs=cfg, short=False)
        o, idx, saved = op.module.forward(*args, lay, kw, vw, configs=cfg, save=True, short=False)
        if idx is not None:
            # recorded launches compute nothing: give the backward's host side (the inverse map
            # of the block choice) a valid choice, the first blocks up to each token's own
            t = torch.arange(idx.shape[0])[:, None, None]
            i = torch.arange(idx.shape[2])[None, None, :]
            idx = torch.where(i <= t // spec.slc_block, i, -1).to(idx.dtype).expand_as(idx)
            idx = idx.contiguous()
        op.module.backward(torch.randn_like(o), *args[:4], idx, saved, lay, kw, vw, configs=cfg)
        if hasattr(op.module, "decode_step"):
            splits = decode_splits(spec, decode_batch, decode_len)
            DecodeSetup(op, decode_batch, decode_len, "cpu", dtype).make(splits)(configs or {})()
            if not (spec.kv_per_branch == "separate" and spec.has("win")):
                _record_paged(op, decode_batch, decode_len, dtype, splits, configs or {})
    return _distinct(calls)


def _record_paged(op, B: int, max_len: int, dtype: torch.dtype, splits: dict, cfg: dict,
                  page: int = 64) -> None:
    """A paged append and decode step (the engines' path: page tables, PAGE constexpr) over
    pools of shuffled pages, launches recorded."""
    spec, mod = op.spec, op.module
    H, n_raw = spec.heads_kv, -(-max_len // page)
    n_cmp = -(-max(1, spec.num_cmp(n_raw * page)) // page)
    n_pages = B * (n_raw + n_cmp)
    table = torch.randperm(n_pages).to(torch.int32)
    pages = mod.decode_pages(table[:B * n_raw].view(B, n_raw),
                             table[B * n_raw:].view(B, n_cmp), page)
    pools = [mod.pool_view(torch.zeros(n_pages, page, H, d, dtype=dtype), B)
             for d in (spec.dim_qk, spec.dim_v, spec.dim_qk, spec.dim_v)]
    lens = torch.full((B,), max_len // 2, dtype=torch.int32)
    uses_cmp = spec.has("cmp") or spec.has("slc")
    kc, vc = (pools[2], pools[3]) if uses_cmp else (None, None)
    learned = dict(k_cmp_t=torch.randn(B, H, spec.dim_qk).to(dtype),
                   v_cmp_t=torch.randn(B, H, spec.dim_v).to(dtype)) \
        if spec.learned_compression else {}
    mod.launch_decode_append(torch.randn(B, H, spec.dim_qk).to(dtype),
                             torch.randn(B, H, spec.dim_v).to(dtype), pools[0], pools[1], kc, vc,
                             lens, pages=pages, counted=True, **learned)
    mod.decode_step(torch.randn(B, spec.heads_q, spec.dim_qk).to(dtype),
                    torch.rand(B, spec.heads_q, 3).to(dtype), pools[0], pools[1], kc, vc, lens,
                    splits, mod.decode_workspace(B, max_len, splits, "cpu"), configs=cfg,
                    pages=pages)


def _distinct(calls: list) -> list[tuple]:
    seen: dict = {}
    for fn, a, _grid, kwargs in calls:
        seen.setdefault(variant_key(fn, a, kwargs), (fn, a, kwargs))
    return list(seen.values())


def _record_dsa(op, seq_len: int, dtype: torch.dtype, cfg: dict) -> None:
    """A DSA forward and backward, a decode cache's append and the indexer loss's forward and
    backward on random packed CPU tensors (launches recorded, nothing computed; v read from k's
    first columns when Dv <= Dk, as MLA's layers call it)."""
    spec = op.spec
    n = seq_len

    def r(*shape):
        return torch.randn(*shape).to(dtype)

    q, k = r(n, spec.heads_q, spec.dim_qk), r(n, spec.heads_kv, spec.dim_qk)
    v = None if spec.dim_v <= spec.dim_qk else r(n, spec.heads_kv, spec.dim_v)
    lay = build_layout(spec, (n,), "cpu")
    vv = k[..., :spec.dim_v] if v is None else v
    qi, ki, wi = (r(n, spec.indexer_heads, spec.indexer_dim), r(n, spec.indexer_dim),
                  r(n, spec.indexer_heads))
    o, idx, lse = op.module.forward(q, k, v, qi, ki, wi, lay, configs=cfg)
    op.module.forward(q, k, vv, qi, ki, wi, lay, configs=cfg)     # v passed as a view of k
    # rows longer than topk: the indexer folds each row's extremes and the top-k reads
    # candidate lists (a sequence of topk + 1 tokens)
    m = spec.topk + 1
    long = build_layout(spec, (m,), "cpu")
    bt = cfg["dsa_indexer"]["BT"]
    tiles = long.tiles(bt)[0].shape[0]
    score, ext = torch.zeros(tiles * bt, m), torch.zeros(tiles * bt, 2, dtype=torch.int32)
    long_ki, long_ks = r(m, spec.indexer_dim), None
    if spec.fp8_keys:
        long_ki, long_ks = op.module.quantize_keys(long_ki)
    op.module.launch_dsa_indexer(r(m, spec.indexer_heads, spec.indexer_dim), long_ki, long_ks,
                                 r(m, spec.indexer_heads), score,
                                 long, 0, tiles, cfg["dsa_indexer"], "tf32", ext=ext)
    op.module.launch_dsa_topk(score, torch.empty(m, spec.topk, dtype=torch.int32), long, 0,
                              tiles, bt, cfg["dsa_topk"], ext=ext)
    # a decode step splits its few rows (top-k) and its picks (attention) across programs:
    # short segments and an unreachable program count force both here
    split = dict(cfg, dsa_topk=dict(cfg["dsa_topk"], SEG=32, SPLIT_BELOW=1 << 30),
                 dsa_attention=dict(cfg["dsa_attention"], SMS=1 << 30))
    op.module.forward(q, k, vv, qi, ki, wi, lay, configs=split)
    op.module.backward(torch.randn_like(o), q, k, v, idx, o, lse, lay, configs=cfg)
    if v is None:
        op.module.backward(torch.randn_like(o), q, k, vv, idx, o, lse, lay, configs=cfg)
    cache = op.new_cache(2, 64, device="cpu", dtype=dtype)     # a decode step's append
    cache.append(r(2, spec.heads_kv, spec.dim_qk),
                 None if cache.v is None else r(2, spec.heads_kv, spec.dim_v),
                 r(2, spec.indexer_dim))
    for dense in (False, True):
        if dense:
            lse = op.module.dense_lse(q, k, lay, configs=cfg)
        loss, saved = op.module.indexer_loss(q, k, qi, ki, wi, idx, lse, lay, configs=cfg,
                                             dense=dense)
        op.module.indexer_loss_backward(loss, q, k, qi, ki, wi, idx, lse, saved, lay,
                                        configs=cfg, dense=dense)


def _signature(fn, args: tuple, kwargs: dict) -> tuple[dict, dict, dict, dict]:
    """Triton's (signature, constexprs, options, attrs) of one recorded launch. attrs carries
    the 16-divisibility the launcher would find (pointers on 16-byte boundaries, integers that
    are multiples of 16): without it the compiler cannot vectorize the loads, and a pipelined
    load it cannot vectorize stays synchronous, so the compiled code would not be the GPU's."""
    names = fn.arg_names
    values = dict(zip(names, args))
    options = {}
    for k, v in kwargs.items():
        if k in names:
            values[k] = v
        else:
            options[k] = v          # num_warps, num_stages, ...
    sig, consts, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(names, fn.params)):
        v = values.get(name, param.default)
        if param.is_constexpr or v is None:
            sig[name] = "constexpr"
            consts[(i,)] = v
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + _PTR_TYPES[v.dtype]
            if v.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif is_descriptor(v):
            shape = ", ".join(str(n) for n in v.block_shape)
            sig[name] = f"tensordesc<{_PTR_TYPES[v.base.dtype]}[{shape}]>"
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            sig[name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
            if v % 16 == 0 and i not in getattr(fn, "do_not_specialize", ()):
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name} of type {type(v).__name__}")
    return sig, consts, options, attrs


def compile_for(op, arch: int = 90, seq_len: int = 300, dtype=torch.bfloat16,
                workers: int | None = None, progress=print,
                configs: dict | None = None) -> list[Compiled]:
    """Compile every launch variant of `op` (see record_launches; `configs` as there) for
    sm_`arch`, in parallel threads, and read what each program holds. Raises on the first
    kernel that does not compile, or that needs more shared memory than a program of sm_`arch`
    may have (it would compile and then fail to launch), naming it and its constexprs."""
    target = GPUTarget("cuda", arch, 32)
    limit = Target.for_arch(arch).smem_per_block
    launches = record_launches(op, seq_len, dtype, configs=configs)
    progress(f"{op.spec.name}: {len(launches)} kernel variants to compile for sm_{arch} "
             f"(Triton {triton.__version__})")

    def one(launch):
        fn, args, kwargs = launch
        if arch >= 90 and "PDL" in kwargs and op.module.DECODE_PDL:
            # recorded on the CPU; on the GPU the decode kernels chain with dependent launches
            kwargs = dict(kwargs, PDL=True, launch_pdl=True)
        sig, consts, options, attrs = _signature(fn, args, kwargs)
        named = {fn.arg_names[i[0]]: v for i, v in consts.items() if v is not None}
        t0 = time.perf_counter()
        try:
            ck = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs),
                                target=target, options=options)
        except Exception as err:
            raise RuntimeError(f"{fn.__name__} {named} does not compile for sm_{arch}: "
                               f"{str(err)[:2000]}") from err
        seconds = time.perf_counter() - t0
        shared = int(ck.metadata.shared)
        if shared > limit:
            raise RuntimeError(f"{fn.__name__} {named} {options} needs {shared} bytes of shared "
                               f"memory a program; sm_{arch} allows {limit}: it would not "
                               f"launch")
        regs, spilled = _registers(ck.asm["cubin"])
        return Compiled(fn.__name__, named, seconds, shared, regs, spilled)

    out = []
    pool = ThreadPoolExecutor(workers or max(1, min(8, os.cpu_count() or 1)))
    try:
        for done in pool.map(one, launches):    # in launch order, as they finish
            progress(f"  {done.kernel}: {done.seconds:.1f} s, {done.resources()}")
            out.append(done)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)    # the first failure ends the build
        raise
    pool.shutdown()
    return out


@contextlib.contextmanager
def _reporting(target: GPUTarget):
    """Triton's active driver reports `target` while inside (torch's analysis asks it for the
    target to build TTIR for); the real driver is restored after."""
    class _TargetOnly:
        def get_current_target(self):
            return target

    config = triton.runtime.driver
    before = config._active         # None on a machine without a GPU: reset_active would fail
    config.set_active(_TargetOnly())
    try:
        yield
    finally:
        config._active = before


def written_tensors(op, arch: int = 90, seq_len: int = 200) -> dict[str, set[str]]:
    """The pointer arguments each recorded kernel of `op` writes, by torch's TTIR analysis.
    torch.library's triton ops functionalize by it: a kernel said to write an input it only
    reads makes that input look mutated, and opcheck and torch.compile(fullgraph=True) fail.
    The analysis follows a store's address back through helper calls (loads in the kernel
    body stop it), so an index computed inside a helper that loads counts the loaded tensor."""
    if identify_accessed_tensors is None:
        raise RuntimeError("this torch lacks identify_accessed_tensors, the write analysis "
                           "that recent torch releases have")
    out: dict[str, set[str]] = {}
    with _reporting(GPUTarget("cuda", arch, 32)):
        for fn, args, kwargs in record_launches(op, seq_len):
            named = dict(zip(fn.arg_names, args))
            named.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
            found = identify_accessed_tensors(fn, named, {})
            out.setdefault(fn.__name__, set()).update(d.name for d in found.read_writes.writes)
    return out
