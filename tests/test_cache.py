"""Cache hygiene: per-URI locks that die with their process, concurrent builds, list and clear."""
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

import pytest

import nsagen
from nsagen import cache, codegen
from nsagen.cli import main


def _build_in_child(cache_dir, q):
    os.environ["NSAGEN_CACHE_DIR"] = cache_dir
    import nsagen as n

    spec = n.load_spec("nsa-g4").replace(name="concurrent", window=320)
    op = n.build(spec)
    q.put(str(op.path))


def test_two_processes_build_the_same_spec(tmp_path):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(str(tmp_path), q)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    paths = {q.get(timeout=5), q.get(timeout=5)}
    assert len(paths) == 1
    files = sorted(p.name for p in (tmp_path / "modules").iterdir())
    assert files == [os.path.basename(paths.pop())]  # one module, no temp files


def test_lock_of_a_killed_process_does_not_hang(tmp_path, monkeypatch):
    monkeypatch.setenv("NSAGEN_CACHE_DIR", str(tmp_path))
    code = ("import os, time, nsagen.cache as c\n"
            f"os.environ['NSAGEN_CACHE_DIR'] = {str(tmp_path)!r}\n"
            "with c.uri_lock('x'):\n    print('locked', flush=True)\n    time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "NSAGEN_CACHE_DIR": str(tmp_path)})
    assert child.stdout.readline().strip() == "locked"
    with pytest.raises(TimeoutError):
        with cache.uri_lock("x", timeout=0.3):
            pass
    child.send_signal(signal.SIGKILL)
    child.wait()
    t0 = time.monotonic()
    with cache.uri_lock("x", timeout=5):
        pass
    assert time.monotonic() - t0 < 2


def test_cache_list_and_clear(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NSAGEN_CACHE_DIR", str(tmp_path))
    specs = [nsagen.load_spec("nsa-g2").replace(name="a", window=200),
             nsagen.load_spec("nsa-g8").replace(name="b", window=200)]
    for s in specs:
        cache.load_module(codegen.module_name(s), codegen.render(s))
    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert all(codegen.module_name(s) in out for s in specs)
    spec_file = tmp_path / "a.yaml"
    import yaml

    spec_file.write_text(yaml.safe_dump(specs[0].to_dict()))
    assert main(["cache", "clear", "--spec", str(spec_file)]) == 0
    left = [e["name"] for e in cache.entries()]
    assert left == [codegen.module_name(specs[1])]
    assert main(["cache", "clear"]) == 0
    assert cache.entries() == []
