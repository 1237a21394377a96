"""The ``nsagen`` command line: one ``_cmd_<name>`` function per subcommand.

Subcommands register themselves in :func:`build_parser` and dispatch through
``set_defaults(func=...)``. A spec, usage or file-system error exits with status 2 and a one-line
message on stderr, never a traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import yaml

import torch

from . import bench, cache, costmodel, dsa_bench
from .cache import cache_dir
from .codegen import explain, module_name, write_generated
from .crosscompile import compile_for
from .ops import build
from .resources import data_dir, shipped_specs
from .spec import Spec, SpecError, short_path, short_repr
from .specfile import load_spec
from .target import Target
from .tune import compile as tune_compile
from .tune.dsa import tune_dsa
from .tune.search import tune as tune_spec
from .tune.search import warm_build

DEFAULT_SEQ_LENS = (8192, 65536)
_SPEC_HELP = "a spec file, or the name of a shipped spec (e.g. nsa-paper)"
# CUDA SM versions Triton's NVIDIA backend compiles for (`build --arch`); others abort in LLVM
CUDA_ARCHS = (75, 80, 86, 87, 89, 90, 100, 103, 110, 120, 121)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{short_repr(text)} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be a positive integer")
    return value


def _non_negative_int(text: str) -> int:
    return 0 if text.strip() == "0" else _positive_int(text)


def _error(message: str) -> None:
    print(f"nsagen: error: {message}", file=sys.stderr)


def _os_error(err: OSError) -> str:
    """One line for a file-system error: the path and the reason, and for a path of the user
    cache how to choose another one."""
    if not isinstance(err.filename, (str, bytes, os.PathLike)):
        return str(err)[:200]
    path = Path(os.path.abspath(os.fsdecode(err.filename)))
    reason = err.strerror or type(err).__name__
    cache = Path(os.path.abspath(cache_dir()))
    if path == cache or cache in path.parents or path in cache.parents:
        return (f"cannot write {short_path(path)}: {reason}; set NSAGEN_CACHE_DIR to choose "
                "another cache directory")
    return f"{short_path(path)}: {reason}"


def _load_for_kernels(path: str) -> Spec:
    """A spec to generate kernels for: valid, and within what the kernels support."""
    spec = load_spec(path)
    spec.check_kernels()
    return spec


def _nsa_only(spec, command: str) -> bool:
    """Say so and return True when `command` does not handle the spec's family yet
    (`generate --bench` times NSA specs; `nsagen bench SPEC` times a DSA spec)."""
    if spec.family == "nsa":
        return False
    _error(f"{command}: {spec.name} is a {spec.family.upper()} spec; {command} handles NSA "
           "specs so far (`nsagen bench SPEC` times a DSA spec)")
    return True


# ---------------------------------------------------------------------------- validate
def _cmd_validate(args: argparse.Namespace) -> int:
    """Load and validate every spec; report all failures, not just the first."""
    status = 0
    for path in args.specs:
        try:
            spec = load_spec(path)
            spec.check_kernels()
        except SpecError as err:
            _error(str(err))
        except OSError as err:
            _error(_os_error(err))
        else:
            print(f"ok {path} {spec.uri}" + ("" if spec.family == "nsa" else
                                               " (DSA: prefill, backward, indexer loss "
                                               "and decode kernels)"))
            continue
        status = 2
    return status


# ---------------------------------------------------------------------------- info
def _si(value: float, unit: str) -> str:
    """A count with a decimal prefix, e.g. 9.54 TFLOP."""
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:g} {unit}"


def _expressions(spec: Spec) -> list[tuple[str, object]]:
    """The symbolic cost model of one spec, as (label, expression) pairs."""
    S = costmodel
    first, last = S.block_weight_span(spec)
    rows: list[tuple[str, object]] = [
        ("Nc(T)", S.num_cmp_expr(spec)),
        ("blocks(T)", S.num_blocks_expr(spec)),
    ]
    if spec.has("slc"):
        rows.append((f"block weights on cmp tokens {first} .. {last}",
                     list(S.block_weights(spec))))
    for branch, expr in S.keys_per_query(spec).items():
        rows.append((f"keys_{branch}(t)", expr))
    if spec.has("slc") and not spec.has("cmp"):
        rows.append(("cmp scores for importance(t)", S.cmp_visible(spec)))
    sums = ["cmp"] if spec.has("cmp") or spec.has("slc") else []
    sums += [b for b in ("slc", "win") if spec.has(b)]
    for branch in sums:
        rows.append((str(S.key_sum(branch)), S.causal_keys(spec, branch)))
    rows += [
        ("fwd_flops(T, B)", S.fwd_flops(spec, compact=True)),
        ("bwd_flops(T, B)", S.bwd_flops(spec, compact=True)),
        ("fwd_bytes(T, B)", S.fwd_bytes(spec)),
        ("bwd_bytes(T, B)", S.bwd_bytes(spec)),
        ("decode_tokens(T)", S.decode_tokens(spec)),
        ("decode_flops(T, B)", S.decode_flops(spec)),
        ("decode_bytes(T, B)", S.decode_bytes(spec)),
    ]
    return rows


def _figures(spec: Spec, seq_len: int, batch: int) -> list[str]:
    """Human-readable lines of costmodel.summary at one sequence length."""
    s = costmodel.summary(spec, seq_len, batch)
    kpq = s["keys_per_query_last"]
    parts = " + ".join(f"{b} {kpq[b]}" for b in spec.branches)
    tokens = s["decode_tokens_per_kv_head"]
    bound = s["decode_speedup_bound"]
    saving = (f"{bound:.1f}x fewer" if bound >= 1
              else f"{1 / bound:.1f}x more: the branches overlap at this length")
    return [
        f"at T={seq_len}, B={batch}:",
        f"  compressed tokens Nc        {s['num_cmp']}",
        f"  selection blocks            {s['num_blocks']}",
        f"  keys of the last query      {parts} = {kpq['total']}",
        f"  forward                     {_si(s['fwd_flops'], 'FLOP')}"
        f" ({100 * s['fwd_flops_fraction_of_dense']:.1f}% of dense causal), {_si(s['fwd_bytes'], 'B')}",
        f"  backward                    {_si(s['bwd_flops'], 'FLOP')}, {_si(s['bwd_bytes'], 'B')}",
        f"  decode step                 {_si(s['decode_flops'], 'FLOP')}, {_si(s['decode_bytes'], 'B')}"
        f" (dense {_si(s['dense_decode_bytes'], 'B')})",
        f"  decode step at T={seq_len}: reads {tokens} tokens per KV head of {seq_len}"
        f" ({saving})",
    ]


def _cmd_info(args: argparse.Namespace) -> int:
    """Print a spec, its derived sizes and its cost model."""
    spec = load_spec(args.spec)
    if spec.family != "nsa":
        _error(f"info: the cost model covers NSA specs; {spec.name} is a {spec.family.upper()} "
               "spec (its cost model comes with its kernels)")
        return 2
    seq_lens = args.seq_len or list(DEFAULT_SEQ_LENS)
    lines = [f"spec {spec.name} ({spec.source})"]
    dumped = yaml.safe_dump(spec.to_dict(), sort_keys=False, default_flow_style=None)
    lines += ["  " + line for line in dumped.rstrip().splitlines()]
    lines += [
        f"G = {spec.group} ({spec.heads_q} query heads over {spec.heads_kv} KV heads)",
        f"uri = {spec.uri}",
        "",
        "cost model (T: sequence or cache length, B: batch, t: query position; "
        "2 FLOPs per multiply-add, bytes in " + spec.dtype + "):",
    ]
    lines += [f"  {label} = {expr}" for label, expr in _expressions(spec)]
    where = cache_dir() / "modules" / f"{module_name(spec)}.py"     # shown, not created
    lines += ["", f"module: {module_name(spec)} (cached at {where})"]
    for seq_len in seq_lens:
        lines.append("")
        lines += _figures(spec, seq_len, args.batch)
    print("\n".join(lines))
    return 0


# ---------------------------------------------------------------------------- generate
def _cmd_generate(args: argparse.Namespace) -> int:
    """Lower, render, cache and import a spec's module (or refresh generated/ for shipped specs)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.shipped:
        specs = {name: _load_for_kernels(path) for name, path in shipped_specs("nsa").items()}
        for path in write_generated(specs, data_dir("generated")):
            print(f"wrote {path}")
        return 0
    if not args.spec:
        _error("generate: give a SPEC or --shipped")
        return 2
    spec = _load_for_kernels(args.spec)
    if args.explain:
        print(explain(spec))
        print()
    t0 = time.perf_counter()
    op = build(spec)
    print(f"{spec.name}: module {op.path} ({time.perf_counter() - t0:.2f} s)")
    if args.bench:
        if _nsa_only(spec, "nsagen generate --bench"):
            return 2
        if not torch.cuda.is_available():
            print("no CUDA GPU here: skipping the benchmark (kernels compile at first launch)")
            return 0
        return _run_bench(spec, args.seq_len or [8192, 16384, 32768, 65536], None,
                          command="nsagen generate --bench")
    return 0


# ---------------------------------------------------------------------------- bench
def _run_bench(spec: Spec, seq_lens: list[int], json_path: str | None, baselines: bool = True,
               breakdown: bool = False, backward: bool = False,
               command: str = "nsagen bench") -> int:
    bench.require_gpu(command)
    doc = bench.bench_forward(spec, seq_lens, baselines=baselines, breakdown=breakdown,
                              progress=lambda m: print(m, flush=True), backward=backward)
    return _emit(doc, json_path, f"{spec.name}-{'fwdbwd' if backward else 'forward'}")


def _cmd_bench(args: argparse.Namespace) -> int:
    """Time the generated forward side by side with the dense and sparse baselines."""
    spec = _load_for_kernels(args.spec)
    bench.require_gpu("nsagen bench")
    if spec.family == "dsa":
        return _run_dsa_bench(spec, args)
    if args.untuned:
        build(spec).use_tuned_tables(False)
    if args.decode:
        doc = bench.bench_decode(spec, args.seq_len or [8192, 16384, 32768, 65536, 131072],
                                 args.batch or [1, 8, 64], baselines=not args.no_baselines,
                                 progress=lambda m: print(m, flush=True),
                                 breakdown=args.breakdown, pdl=not args.no_pdl,
                                 page_size=args.page_size)
        return _emit(doc, args.json, f"{spec.name}-decode")
    return _run_bench(spec, args.seq_len or [8192, 16384, 32768, 65536], args.json,
                      baselines=not args.no_baselines, breakdown=args.breakdown,
                      backward=args.backward)


def _run_dsa_bench(spec, args: argparse.Namespace) -> int:
    """`nsagen bench` for a DSA spec: prefill (or prefill+backward) or decode steps."""
    say = lambda m: print(m, flush=True)  # noqa: E731
    if args.decode:
        doc = dsa_bench.bench_dsa_decode(spec, args.seq_len or [8192, 32768, 65536],
                                         args.batch or [1, 8], baselines=not args.no_baselines,
                                         progress=say, breakdown=args.breakdown)
        mode = "decode"
    else:
        doc = dsa_bench.bench_dsa(spec, args.seq_len or [8192, 16384, 32768, 65536],
                                  baselines=not args.no_baselines, breakdown=args.breakdown,
                                  progress=say, backward=args.backward)
        mode = "fwdbwd" if args.backward else "forward"
    return _emit(doc, args.json, f"{spec.name}-{mode}")


def _emit(doc: dict, json_path: str | None, default_name: str) -> int:
    """Print a results document's table and write its JSON (`json_path`, or
    bench-results/<default_name>.json)."""
    print()
    print(bench.format_table(doc))
    path = Path(json_path) if json_path else Path("bench-results") / f"{default_name}.json"
    bench.write_results(doc, path)
    print(f"results written to {path}")
    return 0


# ---------------------------------------------------------------------------- tune
DEFAULT_TUNE_LENS = (16384, 65536)
# seconds of search: the reference checks and the save that follow keep a whole `nsagen tune`
# near two minutes (on the H200 the checks took up to 19 s after a 110 s search)
DEFAULT_TUNE_BUDGET = 90.0
DEFAULT_DECODE_BATCHES = (1, 8, 64)


def format_tune_table(rows: list[dict]) -> str:
    """The tuning summary: per bucket and kernel, default and best times and the speedup."""
    out = ["| T | B | kernel | default ms | best ms | speedup | config |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        d, b = r["default_ms"], r["best_ms"]
        speed = f"{d / b:.2f}" if b and b == b and b != float("inf") and d != float("inf") else "-"
        out.append(f"| {r['T']} | {r.get('B') or ''} | {r['kernel']} | {d:.4f} | {b:.4f} | "
                   f"{speed} | {r['config']} |")
    return "\n".join(out)


def _cmd_tune(args: argparse.Namespace) -> int:
    """Search launch configs per shape bucket on this GPU and save the tuned table."""
    spec = _load_for_kernels(args.spec)
    bench.require_gpu("nsagen tune")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    t0 = time.perf_counter()
    if spec.family == "dsa":
        path, rows = tune_dsa(spec, args.seq_len or list(DEFAULT_TUNE_LENS),
                              progress=lambda m: print(m, flush=True), budget=args.budget,
                              out_dir=args.out_dir, backward=not args.no_backward,
                              kernels=args.kernel)
    else:
        decode = [] if args.no_decode else (args.decode_batch or list(DEFAULT_DECODE_BATCHES))
        path, rows = tune_spec(
            spec, args.seq_len or list(DEFAULT_TUNE_LENS), batch=args.batch,
            progress=lambda m: print(m, flush=True), decode_batches=decode,
            decode_len=args.decode_len, budget=args.budget, out_dir=args.out_dir,
            backward=not args.no_backward, kernels=args.kernel)
    print()
    print(format_tune_table(rows))
    print(f"\ntuned table written to {path} ({time.perf_counter() - t0:.0f} s)")
    return 0


# ---------------------------------------------------------------------------- build
def _arch_problem(arch: int) -> str | None:
    """Why `build --arch` cannot compile for sm_`arch` here, or None. Checked before anything is
    generated: Triton aborts inside LLVM on an architecture it does not know."""
    if arch not in CUDA_ARCHS:
        return (f"--arch {arch}: not a CUDA architecture Triton compiles for; choose from "
                f"{', '.join(map(str, CUDA_ARCHS))}")
    if os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on"):
        return ("--arch needs TRITON_INTERPRET unset: under the interpreter kernels are not "
                "compiled")
    return None


def _cmd_build(args: argparse.Namespace) -> int:
    """Generate (or reuse) the module and compile its kernels for the configs it launches with."""
    if args.arch is not None:
        problem = _arch_problem(args.arch)
        if problem:
            _error(problem)
            return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    spec = _load_for_kernels(args.spec)
    t0 = time.perf_counter()
    op = build(spec, Target.for_arch(args.arch) if args.arch is not None else None)
    t1 = time.perf_counter()
    print(f"{spec.name}: module {op.path} ({t1 - t0:.2f} s)", flush=True)
    if spec.family != "nsa" and args.arch is None and not args.no_compile:
        print("DSA kernels compile at their first launch (or check them with --arch 90)")
        return 0
    if args.arch is not None:
        done = compile_for(op, arch=args.arch, seq_len=min(args.seq_len, 1024))
        t2 = time.perf_counter()
        print(f"{spec.name}: {len(done)} kernel variants compile for sm_{args.arch} (default "
              f"configs, nothing run) in {t2 - t1:.1f} s")
        return 0
    if args.no_compile or not torch.cuda.is_available():
        if not args.no_compile:
            print("no CUDA GPU here: kernels compile at their first launch")
        return 0
    n = warm_build(op, seq_len=args.seq_len)
    t2 = time.perf_counter()
    tuned = "tuned table" if op.tuned_tables else "IR default configs (untuned)"
    print(f"{spec.name}: compiled {n} kernel variants (forward, backward, decode at T="
          f"{args.seq_len}, {tuned}) in {t2 - t1:.1f} s; total {t2 - t0:.1f} s")
    return 0


# ---------------------------------------------------------------------------- cache
def _cmd_cache(args: argparse.Namespace) -> int:
    """List or clear the user cache (generated modules, tuned tables)."""
    if args.action == "list":
        rows = cache.entries()
        print(f"cache: {cache.cache_dir()}")
        if not rows:
            print("  (empty)")
        for e in rows:
            where = f" [{e['gpu']}]" if "gpu" in e else ""
            print(f"  {e['kind']:6s} {e['bytes'] / 1024:8.1f} KB  {e['name']}{where}")
        return 0
    uri = load_spec(args.spec).uri if args.spec else None
    removed = cache.clear(uri)
    print(f"removed {len(removed)} file(s) from {cache.cache_dir()}")
    return 0


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; each subcommand sets ``func`` to its ``_cmd_<name>``."""
    parser = argparse.ArgumentParser(
        prog="nsagen",
        description="Generate Native Sparse Attention kernels (Triton) from a YAML spec.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("validate", help="check spec files",
                       description="Load and validate specs, and check that the generated "
                                   "kernels support them; print 'ok PATH URI' for each valid "
                                   "one and one error line for each other. Exit status 2 if any "
                                   "is invalid.")
    p.add_argument("specs", nargs="+", metavar="SPEC", help=_SPEC_HELP)
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("info", help="derived sizes and cost model of a spec",
                       description="Print a spec, its GQA group, URI, the symbolic cost model "
                                   "and its figures at the given sequence lengths.")
    p.add_argument("spec", metavar="SPEC", help=_SPEC_HELP)
    p.add_argument("--seq-len", type=_positive_int, nargs="+", action="extend", metavar="N",
                   help=f"sequence (or cache) lengths to evaluate; default "
                        f"{' '.join(map(str, DEFAULT_SEQ_LENS))}")
    p.add_argument("--batch", type=_positive_int, default=1, metavar="B",
                   help="batch size (default 1)")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("generate", help="generate (or reuse) the kernel module of a spec",
                       description="Lower the spec through the IR, render the Triton module, "
                                   "write it to the cache and import it.")
    p.add_argument("spec", metavar="SPEC", nargs="?", help=_SPEC_HELP)
    p.add_argument("--explain", action="store_true",
                   help="print the graph before and after the passes, the decisions and kernels")
    p.add_argument("--bench", action="store_true",
                   help="then benchmark the forward (on a CUDA GPU; skipped otherwise)")
    p.add_argument("--seq-len", type=_positive_int, nargs="+", action="extend", metavar="N",
                   help="sequence lengths for --bench (default 8192 16384 32768 65536)")
    p.add_argument("--shipped", action="store_true",
                   help="re-render generated/ for every shipped spec")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("bench", help="benchmark the generated forward on the GPU",
                       description="Time the op side by side with SDPA (flash, cuDNN), "
                                   "FlexAttention (window) and fla-core when importable; print "
                                   "a table and write JSON.")
    p.add_argument("spec", metavar="SPEC", help=_SPEC_HELP)
    p.add_argument("--seq-len", type=_positive_int, nargs="+", action="extend", metavar="N",
                   help="sequence lengths (default 8192 16384 32768 65536)")
    p.add_argument("--json", metavar="PATH",
                   help="where to write results (default bench-results/<spec>-forward.json)")
    p.add_argument("--no-baselines", action="store_true", help="time nsagen only")
    p.add_argument("--breakdown", action="store_true",
                   help="also report time per kernel (forward or --decode)")
    p.add_argument("--backward", action="store_true",
                   help="time forward+backward (all baselines likewise)")
    p.add_argument("--decode", action="store_true",
                   help="time one-token decode steps (eager and CUDA graph) at cache lengths "
                        "--seq-len (default 8k..128k) and batches --batch (default 1 8 64)")
    p.add_argument("--batch", type=_positive_int, nargs="+", action="extend", metavar="B",
                   help="batch sizes for --decode")
    p.add_argument("--no-pdl", action="store_true",
                   help="--decode: launch the decode kernels without programmatic dependent "
                        "launch (sm_90+), to compare")
    p.add_argument("--page-size", type=_non_negative_int, default=64, metavar="P",
                   help="--decode: also time the step over shuffled page pools of P tokens "
                        "(op.append_paged + op.decode_paged, as a serving engine runs it); "
                        "0 leaves it out (default 64)")
    p.add_argument("--untuned", action="store_true",
                   help="ignore tuned tables: launch with the IR's default configs and splits")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("tune", help="tune launch configs on this GPU and save them",
                       description="Time candidate configs of every forward and backward kernel "
                                   "per sequence-length bucket and of the decode kernels and "
                                   "split counts per batch bucket, check the winners against the "
                                   "reference, and save the table (user cache, or --out-dir).")
    p.add_argument("spec", metavar="SPEC", help=_SPEC_HELP)
    p.add_argument("--seq-len", type=_positive_int, nargs="+", action="extend", metavar="N",
                   help="sequence lengths to tune at, one bucket each (default "
                        f"{' '.join(map(str, DEFAULT_TUNE_LENS))})")
    p.add_argument("--batch", type=_positive_int, default=1, metavar="B", help="batch (default 1)")
    p.add_argument("--decode-batch", type=_positive_int, nargs="+", action="extend", metavar="B",
                   help="decode batch sizes, one bucket each (default "
                        f"{' '.join(map(str, DEFAULT_DECODE_BATCHES))})")
    p.add_argument("--decode-len", type=_positive_int, default=65536, metavar="N",
                   help="decode cache capacity to tune at (default 65536)")
    p.add_argument("--no-decode", action="store_true", help="skip the decode kernels")
    p.add_argument("--no-backward", action="store_true", help="skip the backward kernels")
    p.add_argument("--kernel", nargs="+", action="extend", metavar="NAME",
                   help="tune only these kernels (others keep their defaults)")
    p.add_argument("--budget", type=float, metavar="SECONDS", default=DEFAULT_TUNE_BUDGET,
                   help="stop searching after this long, keeping the best found so far "
                        f"(default {DEFAULT_TUNE_BUDGET:.0f}; 'inf' searches every candidate)")
    p.add_argument("--out-dir", metavar="DIR",
                   help="write the table to DIR/<gpu>/<module>.json (e.g. autotune) instead of "
                        "the user cache")
    p.set_defaults(func=_cmd_tune)

    p = sub.add_parser("build", help="generate a spec's module and compile its kernels",
                       description="Generate (or reuse) the module of a spec and, on a GPU, "
                                   "compile its forward, backward and decode kernels in parallel "
                                   "for the configs they launch with (tuned table or defaults).")
    p.add_argument("spec", metavar="SPEC", help=_SPEC_HELP)
    p.add_argument("--seq-len", type=_positive_int, default=4096, metavar="N",
                   help="the shape to compile for (default 4096)")
    p.add_argument("--no-compile", action="store_true", help="only generate and import")
    p.add_argument("--arch", type=_positive_int, metavar="SM",
                   help="instead, compile every kernel for sm_SM (e.g. 90) on this machine, "
                        "with no GPU needed and nothing run: checks the kernels compile with "
                        "this Triton (run with TRITON_INTERPRET unset)")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("cache", help="list or clear the user cache",
                       description="List what the user cache ($NSAGEN_CACHE_DIR or "
                                   "~/.cache/nsagen) holds, or clear it (all, or one spec's "
                                   "modules and tables).")
    p.add_argument("action", choices=["list", "clear"])
    p.add_argument("--spec", metavar="SPEC", help="with clear: only this spec's files")
    p.set_defaults(func=_cmd_cache)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nsagen`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SpecError as err:
        _error(str(err))
    except OSError as err:
        _error(_os_error(err))
    return 2


def run() -> None:
    """The ``nsagen`` command: `main`, then exit. After kernels were compiled on worker threads
    (build, tune) the process ends without the interpreter's native teardown, once its output
    is flushed: on the H200 image (Triton 3.6) about half of such processes aborted there
    ("terminate called without an active exception") after finishing their work."""
    rc = main()
    if tune_compile.Compiler.started:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":
    run()
