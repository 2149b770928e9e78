"""Any machine: checkpoints across devices, no Unix-only calls on the training path, GPU-aware timing
and memory metrics, and a suite that stays on the CPU. All simulated on a CPU."""
import json
import os
import random
import subprocess
import sys

import pytest
import torch

import train
from engine import runfiles, runlog

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------
# Checkpoints resume across devices
# ----------------------------------------------------------------------------------------------
def simulate_cuda(monkeypatch, visible):
    """`visible` CUDA GPUs as far as the RNG restore can tell; returns the list set_rng_state fills."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: visible > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": calls.append((device, state)))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: [calls.append((i, s)) for i, s in
                                                                          enumerate(states)])
    return calls


def cuda_states(n):
    return [torch.full((16,), i + 1, dtype=torch.uint8) for i in range(n)]     # what get_rng_state_all holds


@pytest.mark.parametrize("saved,visible", [(2, 1), (2, 2), (2, 4), (1, 2), (2, 0), (0, 1)])
def test_cuda_rng_restore_takes_what_fits(monkeypatch, saved, visible):
    calls = simulate_cuda(monkeypatch, visible)
    runfiles.set_rng_state({"python": random.getstate(), "torch": torch.get_rng_state(),
                         "cuda": cuda_states(saved) if saved else None})
    n = min(saved, visible)
    assert [d for d, _ in calls] == list(range(n))
    assert all(torch.equal(s, want) for (_, s), want in zip(calls, cuda_states(n)))


def write_gpu_checkpoint(folder, optimizer, scaler, cuda_rng):
    """A state.pt as runfiles.save_checkpoint writes it on a GPU: every tensor's storage tagged cuda:0."""
    import torch.serialization as ser
    os.makedirs(folder)
    real = ser.location_tag
    ser.location_tag = lambda storage: "cuda:0"
    try:
        torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                    "rng": {"python": random.getstate(), "torch": torch.get_rng_state(), "cuda": cuda_rng},
                    "step": 3, "epoch": 0, "pos": 12, "skipped_updates": 0}, os.path.join(folder, "state.pt"))
    finally:
        ser.location_tag = real


def test_checkpoint_saved_on_a_gpu_resumes_on_a_cpu(tmp_path, monkeypatch):
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    opt = torch.optim.AdamW(params, lr=1e-2, fused=True)
    sum(p.sum() for p in params).backward()
    opt.step()
    saved = {k: v.clone() for k, v in opt.state[params[0]].items()}
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    ckpt = str(tmp_path / "checkpoint")
    write_gpu_checkpoint(ckpt, opt, scaler, cuda_states(2))
    with pytest.raises(RuntimeError, match="CUDA"):              # the file really claims a GPU
        torch.load(os.path.join(ckpt, "state.pt"), weights_only=True)
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = torch.optim.AdamW(fresh, lr=1e-2, fused=True)
    for visible in (0, 1):                          # a CPU-only machine, and one with a single GPU
        calls = simulate_cuda(monkeypatch, visible)
        out = str(tmp_path / f"run{visible}")
        os.makedirs(out)
        state = runfiles.restore(ckpt, out, opt2, torch.amp.GradScaler("cpu", enabled=False), train.State)
        assert (state.step, state.pos) == (3, 12)
        assert [d for d, _ in calls] == list(range(visible))     # min(saved 2, visible) CUDA generators
        # load_state_dict puts every optimizer state tensor on its parameter's device (and dtype)
        for k, v in opt2.state[fresh[0]].items():
            assert v.device == fresh[0].device and torch.equal(v, saved[k]), k


# ----------------------------------------------------------------------------------------------
# Windows and macOS: nothing Unix-only at import time or on the training path
# ----------------------------------------------------------------------------------------------
NOT_UNIX = '''
# The project's own code sees a Python without Unix-only parts (libraries keep theirs: psutil's Linux
# backend, for one, needs them on Linux and has its own Windows backend).
import builtins, io, os, sys
ROOT = {root!r}
def _ours(depth):
    f = sys._getframe(depth).f_code.co_filename
    return f.startswith(os.path.join(ROOT, "")) and "site-packages" not in f or f == "<string>"
_import = builtins.__import__
def _no_resource(name, *a, **k):                  # `import resource` fails, as on Windows
    if name == "resource" and _ours(2):
        raise ImportError("No module named 'resource'")
    return _import(name, *a, **k)
builtins.__import__ = _no_resource
if hasattr(os, "sched_getaffinity"):              # Linux only
    del os.sched_getaffinity
_open = builtins.open
def _no_proc(file, *a, **k):                      # no /proc (Windows, macOS)
    if isinstance(file, str) and file.startswith("/proc/") and _ours(2):
        raise FileNotFoundError(file)
    return _open(file, *a, **k)
builtins.open = io.open = _no_proc
'''


def test_scripts_run_without_unix_only_modules(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NOT_UNIX.format(root=ROOT))   # every Python started below, bench's too
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    env.pop("OMP_NUM_THREADS", None)                          # set_threads must find the cores without affinity

    def run(*args):
        p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
        assert p.returncode == 0, f"{args}\n{p.stderr[-3000:]}"
        return p
    probe = run("-c", "import os, train, eval, memory, gpu_check; from engine import bench, models, runlog; "
                      "assert not hasattr(os, 'sched_getaffinity'); print(models.set_threads(0), runlog.peak_mem_gb())")
    assert probe.stdout.split() == [str(os.cpu_count()), "None"]
    assert "--dtype" in run("train.py", "--help").stdout
    run("train.py", "--model", "tiny", "--max_steps", "1", "--eval_limit", "2", "--threads", "1",
        "--output_dir", str(tmp_path / "t"))
    row = json.loads(open(tmp_path / "t" / "metrics.jsonl").readline())
    assert row["peak_mem_gb"] is None and "eval/accuracy" in row            # "not available", not a crash
    run("eval.py", "--model", "tiny", "--dataset", "tiny", "--limit", "2", "--max_completion_length", "8",
        "--threads", "1", "--output_dir", str(tmp_path / "e"))
    p = run("-m", "engine.bench", "--model", "tiny", "--dataset", "tiny", "--steps", "1", "--threads", "1",
            "--output_dir", str(tmp_path / "b"))
    assert json.load(open(tmp_path / "b" / "bench.json"))["peak_mem_gb"] is None
    assert "not available" in p.stdout


def test_peak_memory_metrics(monkeypatch):
    # CPU: peak RSS; no reserved peak. CUDA (simulated): allocated and reserved, each its own peak
    assert runlog.peak_mem_gb() > 0 and runlog.peak_mem_reserved_gb() is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3e9)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 4.5e9)
    resets = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: resets.append(True))
    runlog.reset_peak_mem()
    assert resets == [True] and runlog.peak_mem_gb() == 3.0 and runlog.peak_mem_reserved_gb() == 4.5


# ----------------------------------------------------------------------------------------------
# Timings on a GPU: the clock is read after the queued kernels ran
# ----------------------------------------------------------------------------------------------
def test_timed_synchronizes_on_cuda(monkeypatch):
    events = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))
    times = {}
    assert runlog.timed(times, "x", lambda a: events.append("fn") or a + 1, 1) == 2
    assert events == ["sync", "fn", "sync"] and times["x"] >= 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    events.clear()
    runlog.timed(times, "x", lambda: events.append("fn"))
    assert events == ["fn"]                                   # on a CPU there is nothing to wait for


# ----------------------------------------------------------------------------------------------
# The suite itself stays on the CPU
# ----------------------------------------------------------------------------------------------
def test_suite_hides_cuda():
    # tests/conftest.py hides CUDA before torch looks (and the scripts a test starts inherit it);
    # on a GPU machine `CEGPPO_GPU_TESTS=1 pytest` runs the tests marked gpu instead
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == "" and not torch.cuda.is_available()
    p = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                       capture_output=True, text=True)
    assert p.stdout.strip() == "False"


# ----------------------------------------------------------------------------------------------
# A bare CUDA image (docs/gpu.md): the training path needs no datasets, pandas, pyarrow, matplotlib, trl
# ----------------------------------------------------------------------------------------------
BARE_IMAGE = '''
# As if never installed: the finder sees none of these (the libraries' own availability checks agree)
import importlib.machinery
from engine import bench, models, runfiles, runlog
BLOCKED = {"datasets", "pyarrow", "pandas", "matplotlib", "trl", "dill", "multiprocess", "xxhash"}
_find = importlib.machinery.PathFinder.find_spec.__func__
def _find_spec(cls, name, path=None, target=None):
    if name.split(".")[0] in BLOCKED:
        return None
    return _find(cls, name, path, target)
importlib.machinery.PathFinder.find_spec = classmethod(_find_spec)
'''


def test_training_path_on_a_bare_image(tmp_path):
    """docs/gpu.md's wheels (bitsandbytes, math-verify and its parser) are all train.py, eval.py, engine/bench.py
    and gpu_check.py need beside torch, transformers, peft and accelerate; Hub datasets, curves.png and
    the TRL comparison need the optional ones."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BARE_IMAGE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))

    def run(*args):
        return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    p = run("-c", "import train, eval, gpu_check, memory\nfrom engine import bench\ntry:\n    import datasets\n"
                  "except ImportError:\n    print('no datasets')")
    assert p.returncode == 0 and p.stdout.strip() == "no datasets", p.stderr[-2000:]
    p = run("train.py", "--model", "tiny", "--max_steps", "2", "--output_dir", str(tmp_path / "t"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "matplotlib is not installed: no curves.png" in p.stderr and not (tmp_path / "t" / "curves.png").exists()
    assert [json.loads(line)["step"] for line in open(tmp_path / "t" / "metrics.jsonl")] == [1, 2]
    (tmp_path / "x.jsonl").write_text('{"question": "1+1?", "answer": "2"}\n' * 8)
    p = run("train.py", "--model", "tiny", "--dataset", str(tmp_path / "x.jsonl"), "--output_dir", str(tmp_path / "u"))
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == (      # a local file does need it
        f"error: --dataset {tmp_path / 'x.jsonl'}: reading it needs the datasets package (pip install datasets)")
