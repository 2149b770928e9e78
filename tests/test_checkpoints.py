"""Checkpoints and resume (engine/runfiles.py) against a crash or a power cut at any moment: torn rows, a
damaged config.json, a cut at every point of a save, a run stopped before its first checkpoint, what
reaches the disk (fsync spied on) and where it cannot (Windows), and a loss scale that comes back."""
import dataclasses
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from engine.errors import UserError
from engine import runfiles

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class State:
    step: int = 0
    pos: int = 0


@dataclasses.dataclass
class Cfg:
    """The flags check_resume reads, as train.Config spells them."""
    output_dir: str
    resume: bool = True
    algo: str = "cegppo"
    save_steps: int = 2
    max_steps: int = 6


MAY_CHANGE = {"resume", "output_dir", "max_steps", "save_steps"}


class Adapter:
    """What save_checkpoint needs of a peft model: save_pretrained writing an adapter's files."""
    def save_pretrained(self, folder):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "adapter_config.json"), "w") as f:
            json.dump({"r": 8}, f)
        save_file({"lora_A": torch.ones(2, 2)}, os.path.join(folder, "adapter_model.safetensors"))


def save(out, step):
    p = torch.nn.Parameter(torch.ones(3))
    runfiles.save_checkpoint(out, Adapter(), torch.optim.AdamW([p]), torch.amp.GradScaler("cpu", enabled=False),
                            State(step=step))


def step_of(folder):
    return None if folder is None else torch.load(os.path.join(folder, "state.pt"), weights_only=True)["step"]


def checkpoints(out):
    return sorted(n for n in os.listdir(out) if n.startswith("checkpoint"))


def run_folder(tmp_path, rows=(1, 2, 3), name="run", **flags):
    """A run folder as train.py leaves it: config.json (written plainly) and metrics rows."""
    out = str(tmp_path / name)
    os.makedirs(out)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(Cfg(out, **flags)), f)
    write_rows(out, rows)
    return out


def write_rows(out, steps, name="metrics.jsonl", tail=b""):
    with open(os.path.join(out, name), "ab") as f:
        for s in steps:
            f.write((json.dumps({"step": s, "reward": 0.5}) + "\n").encode())
        f.write(tail)


def steps_in(out, name):
    data = open(os.path.join(out, name), "rb").read()
    assert b"\0" not in data and (not data or data.endswith(b"\n"))
    return [json.loads(line)["step"] for line in data.splitlines()]


class DiskSpy:
    """Records what os.fsync flushed (each file or folder by its identity, which a rename keeps) and
    each rename, in order."""
    def __init__(self, monkeypatch):
        self.events = []
        real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

        def fsync(fd):
            st = os.fstat(fd)
            self.events.append(("fsync", (st.st_dev, st.st_ino)))
            real_fsync(fd)

        def rename(real, kind):
            def op(src, dst):
                self.events.append((kind, identity(src)))
                real(src, dst)
            return op
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "rename", rename(real_rename, "rename"))
        monkeypatch.setattr(os, "replace", rename(real_replace, "replace"))

    def synced(self):
        return {what for kind, what in self.events if kind == "fsync"}

    def first(self, kind, what=None):
        at = [i for i, (k, w) in enumerate(self.events) if k == kind and what in (None, w)]
        assert at, f"no {kind} of {what}"
        return at[0]

    def last(self, kind, what=None):
        return max(i for i, (k, w) in enumerate(self.events) if k == kind and what in (None, w))


def identity(path):
    st = os.stat(path)
    return st.st_dev, st.st_ino


# ----------------------------------------------------------------------------------------------
# 1. Torn rows: a cut during an append
# ----------------------------------------------------------------------------------------------
def test_restore_drops_torn_rows_and_nul_tails(tmp_path):
    out = run_folder(tmp_path, rows=())
    write_rows(out, [1, 2, 3], tail=b'{"step": 4, "rew')                     # a partial last line
    write_rows(out, [1], "samples.jsonl", tail=b'{"step": 2, "reward": 1.0}')   # complete, its newline lost
    # NULs: the file's size reached the disk and its data did not (a cut after it was extended)
    write_rows(out, [1, 2, 3], "tokens.jsonl", tail=b'{"step": 4, "to' + b"\0" * 300 + b"\n" + b"\0" * 4096)
    save(out, 2)
    p = torch.nn.Parameter(torch.ones(3))
    state = runfiles.restore(runfiles.find_checkpoint(out), out, torch.optim.AdamW([p]),
                            torch.amp.GradScaler("cpu", enabled=False), State)
    assert state.step == 2
    assert steps_in(out, "metrics.jsonl") == [1, 2]
    assert steps_in(out, "samples.jsonl") == [1, 2]
    assert steps_in(out, "tokens.jsonl") == [1, 2]


def test_rewritten_rows_reach_the_disk_before_they_replace_the_file(tmp_path, monkeypatch):
    out = run_folder(tmp_path, rows=[1, 2, 3])
    write_rows(out, [2, 3], "samples.jsonl")
    spy = DiskSpy(monkeypatch)
    runfiles.keep_rows(out, 2)
    assert steps_in(out, "metrics.jsonl") == [1, 2] and steps_in(out, "samples.jsonl") == [2]
    for name in ("metrics.jsonl", "samples.jsonl"):
        new = identity(os.path.join(out, name))              # the temp file, renamed over the old one
        assert spy.first("fsync", new) < spy.first("replace", new)
    assert identity(out) in spy.synced()                     # and the renames
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


# ----------------------------------------------------------------------------------------------
# 2. config.json: damaged is one clear line; written whole or not at all
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content", [b"", b'{"algo": "ceg', b"\0" * 64, b"[1, 2]", b"\xff\xfe"])
def test_a_damaged_config_json_is_one_clear_line(tmp_path, content):
    out = run_folder(tmp_path)
    save(out, 2)
    path = os.path.join(out, "config.json")
    with open(path, "wb") as f:
        f.write(content)
    with pytest.raises(UserError) as e:
        runfiles.check_resume(Cfg(out), MAY_CHANGE)
    assert path in str(e.value) and "damaged" in str(e.value) and "\n" not in str(e.value)


def test_without_config_json_a_resume_goes_on_unchecked_and_says_so(tmp_path, capsys):
    out = run_folder(tmp_path)
    save(out, 2)
    os.remove(os.path.join(out, "config.json"))
    assert runfiles.check_resume(Cfg(out, algo="grpo"), MAY_CHANGE) == os.path.join(out, "checkpoint")
    assert "unchecked" in capsys.readouterr().err


def test_write_json_is_atomic_and_durable(tmp_path, monkeypatch):
    path = str(tmp_path / "config.json")
    runfiles.write_json(path, {"algo": "cegppo"})
    spy = DiskSpy(monkeypatch)
    runfiles.write_json(path, {"algo": "grpo", "beta1": 0.5})
    assert json.load(open(path)) == {"algo": "grpo", "beta1": 0.5}
    assert open(path).read() == json.dumps({"algo": "grpo", "beta1": 0.5}, indent=2)   # as train.py wrote it
    assert spy.first("fsync", identity(path)) < spy.first("replace", identity(path)) < \
        spy.first("fsync", identity(str(tmp_path)))
    assert os.listdir(tmp_path) == ["config.json"]

    def cut(src, dst):
        raise KeyboardInterrupt                              # a crash before the rename
    monkeypatch.setattr(os, "replace", cut)
    with pytest.raises(KeyboardInterrupt):
        runfiles.write_json(path, {"algo": "dapo"})
    assert json.load(open(path)) == {"algo": "grpo", "beta1": 0.5}     # the old one, whole


# ----------------------------------------------------------------------------------------------
# 3. A cut at every point of a save leaves the newest complete checkpoint
# ----------------------------------------------------------------------------------------------
def make(out, name, step, kind="complete"):
    """A checkpoint folder `name` in `out` at `step`, as a save or a cut leaves it: complete; partial
    (its adapter written, state.pt not yet); unmarked (every file, no COMPLETE: written but not yet
    flushed, or written before the marker existed); empty_state (renamed before its data reached the
    disk); half_removed (a removal cut off)."""
    scratch = os.path.join(out, "..", f"scratch-{name}")
    save(scratch, step)
    shutil.move(os.path.join(scratch, "checkpoint"), os.path.join(out, name))
    shutil.rmtree(scratch)
    folder = os.path.join(out, name)
    if kind in ("partial", "unmarked", "half_removed"):
        os.remove(os.path.join(folder, runfiles.COMPLETE))
    if kind in ("partial", "half_removed"):
        os.remove(os.path.join(folder, "state.pt"))
    if kind == "empty_state":
        open(os.path.join(folder, "state.pt"), "wb").close()


# (what a cut left, the folders then, the one --resume takes: None = none, the run starts again)
CUT_STATES = [
    ("a save cut while writing checkpoint.tmp", {"checkpoint": 4, "checkpoint.tmp": (6, "partial")}, "checkpoint"),
    ("checkpoint.tmp written, not yet flushed", {"checkpoint": 4, "checkpoint.tmp": (6, "unmarked")}, "checkpoint"),
    ("checkpoint.tmp complete", {"checkpoint": 4, "checkpoint.tmp": 6}, "checkpoint.tmp"),
    ("after checkpoint -> checkpoint.old", {"checkpoint.old": 4, "checkpoint.tmp": 6}, "checkpoint.tmp"),
    ("after checkpoint.tmp -> checkpoint", {"checkpoint": 6, "checkpoint.old": 4}, "checkpoint"),
    ("during the removal of checkpoint.old", {"checkpoint": 6, "checkpoint.old": (4, "half_removed")}, "checkpoint"),
    ("checkpoint renamed before its data reached the disk", {"checkpoint": (6, "empty_state"), "checkpoint.old": 4},
     "checkpoint.old"),
    ("a checkpoint from before the COMPLETE marker", {"checkpoint": (4, "unmarked")}, "checkpoint"),
    ("the first save, cut while writing", {"checkpoint.tmp": (2, "partial")}, None),
    ("the first save, unflushed", {"checkpoint.tmp": (2, "unmarked")}, None),
    ("the first save, complete before its rename", {"checkpoint.tmp": 2}, "checkpoint.tmp"),
]


@pytest.mark.parametrize("what,folders,taken", CUT_STATES, ids=[c[0] for c in CUT_STATES])
def test_resume_takes_the_newest_complete_checkpoint_a_cut_left(tmp_path, what, folders, taken):
    out = run_folder(tmp_path, rows=[1, 2] if taken is None else [1, 2, 3, 4, 5, 6, 7])
    for name, spec in folders.items():
        make(out, name, *(spec if isinstance(spec, tuple) else (spec,)))
    want = taken and os.path.join(out, taken)
    assert runfiles.find_checkpoint(out) == want
    assert runfiles.check_resume(Cfg(out), MAY_CHANGE) == want           # None: again from step 0
    if want:
        step = step_of(want)
        p = torch.nn.Parameter(torch.ones(3))
        assert runfiles.restore(want, out, torch.optim.AdamW([p]), torch.amp.GradScaler("cpu", enabled=False),
                               State).step == step
        assert steps_in(out, "metrics.jsonl") == list(range(1, step + 1))
    save(out, 8)                                             # the resumed run's next save tidies up
    assert checkpoints(out) == ["checkpoint"] and step_of(runfiles.find_checkpoint(out)) == 8


class Cut(Exception):
    """A crash: the process stops here; what is on disk stays."""


def cut_at(monkeypatch, k):
    """Make the k-th step on disk of what follows (an rmtree, a rename, an fsync, a torch.save) the
    moment of a crash. A cut rmtree has removed one file first: a removal half done."""
    count = [0]

    def wrap(name, real):
        def op(*args, **kwargs):
            count[0] += 1
            if count[0] - 1 == k:
                if name == "rmtree":
                    files = [os.path.join(r, n) for r, _, ns in os.walk(args[0]) for n in ns]
                    if files:
                        os.remove(sorted(files)[0])
                raise Cut(name)
            return real(*args, **kwargs)
        return op
    for module, name in ((shutil, "rmtree"), (os, "rename"), (os, "replace"), (os, "fsync"), (torch, "save")):
        monkeypatch.setattr(module, name, wrap(name, getattr(module, name)))


START_STATES = [
    ("after a save", {"checkpoint": 4}),
    ("checkpoint incomplete, checkpoint.old complete", {"checkpoint": (6, "empty_state"), "checkpoint.old": 4}),
    ("checkpoint.tmp complete, resumed from", {"checkpoint": 2, "checkpoint.tmp": 4}),
    ("a checkpoint from before the COMPLETE marker", {"checkpoint": (4, "unmarked")}),
    ("the first save", {}),
    ("the first save after a cut one", {"checkpoint.tmp": (2, "partial")}),
]


@pytest.mark.parametrize("what,folders", START_STATES, ids=[s[0] for s in START_STATES])
def test_a_cut_at_any_point_of_a_save_leaves_the_newest_complete_checkpoint(tmp_path, monkeypatch, what, folders):
    template = run_folder(tmp_path, rows=[1, 2, 3, 4, 5, 6], name="template")
    for name, spec in folders.items():
        make(template, name, *(spec if isinstance(spec, tuple) else (spec,)))
    before = step_of(runfiles.find_checkpoint(template))
    out, found, k = str(tmp_path / "run"), [], 0
    while True:
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(template, out)
        with monkeypatch.context() as m:
            cut_at(m, k)
            try:
                save(out, 10)
            except Cut:
                pass
            else:
                break
        found.append(step_of(runfiles.find_checkpoint(out)))
        save(out, 12)                                        # the resumed run's next save, from this state
        assert checkpoints(out) == ["checkpoint"] and step_of(runfiles.find_checkpoint(out)) == 12, (k, found)
        k += 1
    assert step_of(runfiles.find_checkpoint(out)) == 10 and checkpoints(out) == ["checkpoint"]
    assert k > 5 and found[0] == before and found[-1] == 10, found
    # the one taken is never lost and never goes back: the one before, until the new one is complete
    assert all(s in (before, 10) for s in found), found
    assert found == sorted(found, key=lambda s: -1 if s is None else s), found


# ----------------------------------------------------------------------------------------------
# 4. A run stopped before its first checkpoint: --resume starts it again
# ----------------------------------------------------------------------------------------------
def test_resume_before_the_first_checkpoint_starts_again_from_step_0(tmp_path, capsys):
    out = run_folder(tmp_path, rows=[1], name="run")                   # save_steps 2: no checkpoint yet
    write_rows(out, [], tail=b'{"step": 2, "rew')
    write_rows(out, [1], "samples.jsonl")
    make(out, "checkpoint.tmp", 2, "partial")                           # the first save, cut off
    assert runfiles.check_resume(Cfg(out), MAY_CHANGE) is None          # its rows dropped (start_over)
    assert steps_in(out, "metrics.jsonl") == [] and steps_in(out, "samples.jsonl") == []
    assert not os.path.exists(os.path.join(out, "tokens.jsonl"))
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"--resume: no checkpoint in {out} (the run stopped before its first one): starting it again from step 0"
    save(out, 2)
    assert checkpoints(out) == ["checkpoint"]
    # the same run again: other flags are refused, as for any resume
    with pytest.raises(UserError, match="--algo is 'grpo' here but 'cegppo'"):
        runfiles.check_resume(Cfg(run_folder(tmp_path, rows=[1], name="again"), algo="grpo"), MAY_CHANGE)


@pytest.mark.parametrize("rows", [[1, 2, 3], None])
def test_resume_without_a_checkpoint_to_go_back_to_is_refused(tmp_path, rows):
    # rows past the first save (step 2): the run had a checkpoint, since lost; no rows: nothing ran
    out = run_folder(tmp_path, rows=rows or [])
    if rows is None:
        os.remove(os.path.join(out, "metrics.jsonl"))
    with pytest.raises(UserError) as e:
        runfiles.check_resume(Cfg(out), MAY_CHANGE)
    assert str(e.value) == f"--resume: no checkpoint in {out}"


@pytest.mark.parametrize("rows,again", [([1, 2, 3], True), ([1, 2, 3, 4], False)])
def test_the_first_save_is_at_max_steps_when_sooner(tmp_path, rows, again):
    # the run's config.json: save_steps 5, max_steps 3, so its first checkpoint came at step 3 (a row 4:
    # that run was resumed further, from a checkpoint since lost)
    out = run_folder(tmp_path, rows=rows, save_steps=5, max_steps=3)
    if again:
        assert runfiles.check_resume(Cfg(out, max_steps=6), MAY_CHANGE) is None
    else:
        with pytest.raises(UserError, match="no checkpoint"):
            runfiles.check_resume(Cfg(out, max_steps=6), MAY_CHANGE)


def script(*args, check=True):
    p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=os.environ.copy())
    if check and p.returncode != 0:
        raise AssertionError(f"{args} exited {p.returncode}:\n{p.stderr[-3000:]}")
    return p


def test_a_run_killed_before_its_first_checkpoint_resumes_as_the_same_run(tmp_path):
    """End to end through train.py: a run stopped at step 1 of 2 (before its first save, at step 2),
    its last row torn, is started again by --resume and gives the uninterrupted run's rows."""
    args = ["train.py", "--model", "tiny", "--dataset", "tiny", "--max_steps", "2"]
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    script(*args, "--output_dir", whole)
    shutil.copytree(whole, cut)
    shutil.rmtree(os.path.join(cut, "checkpoint"))                      # killed before its first save
    for name in ("adapter_model.safetensors", "adapter_config.json"):    # (the final adapter: not yet)
        os.remove(os.path.join(cut, name))
    lines = open(os.path.join(whole, "metrics.jsonl"), "rb").read().splitlines(keepends=True)
    with open(os.path.join(cut, "metrics.jsonl"), "wb") as f:
        f.write(lines[0] + lines[1][:20] + b"\0" * 100)          # step 1, then step 2 torn
    assert script(*args, "--output_dir", cut, check=False).returncode == 2      # a run is there already
    p = script(*args, "--output_dir", cut, "--resume")
    assert "starting it again from step 0" in p.stderr and "Traceback" not in p.stderr
    a = [json.loads(line) for line in open(os.path.join(whole, "metrics.jsonl"))]
    b = [json.loads(line) for line in open(os.path.join(cut, "metrics.jsonl"))]
    assert [r["step"] for r in b] == [1, 2]
    assert steps_in(cut, "tokens.jsonl") == steps_in(whole, "tokens.jsonl")    # written afresh, not appended to
    for x, y in zip(a, b):
        for k in ("reward", "entropy", "loss", "completions/mean_length"):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), (x["step"], k)
    assert checkpoints(cut) == ["checkpoint"]


# ----------------------------------------------------------------------------------------------
# 5-6. What a save flushes, where it cannot flush folders, and a loss scale that comes back
# ----------------------------------------------------------------------------------------------
def test_a_save_flushes_every_file_its_folders_and_the_rows_before_its_renames(tmp_path, monkeypatch):
    out = run_folder(tmp_path)
    write_rows(out, [2], "samples.jsonl")
    write_rows(out, [2], "tokens.jsonl")
    save(out, 2)
    spy = DiskSpy(monkeypatch)
    save(out, 4)
    for name in ("metrics.jsonl", "samples.jsonl", "tokens.jsonl"):   # the rows up to the step saved
        assert spy.first("fsync", identity(os.path.join(out, name))) < spy.first("rename"), name
    ckpt = os.path.join(out, "checkpoint")
    files = [os.path.join(r, n) for r, _, ns in os.walk(ckpt) for n in ns]
    assert {os.path.relpath(f, ckpt) for f in files} >= {*runfiles.CHECKPOINT_FILES, runfiles.COMPLETE}
    synced = spy.synced()
    missing = [f for f in files if identity(f) not in synced]
    assert not missing, missing
    marker = spy.first("fsync", identity(os.path.join(ckpt, runfiles.COMPLETE)))
    # the data, then the marker that vouches for it, then the renames
    assert all(spy.first("fsync", identity(f)) < marker for f in files if not f.endswith(runfiles.COMPLETE))
    for name in runfiles.ROWS:
        assert spy.first("fsync", identity(os.path.join(out, name))) < marker, name
    assert marker < spy.first("rename")
    if os.name != "nt":                                      # folders: POSIX only
        for folder in (ckpt, os.path.join(ckpt, "adapter"), out):
            assert identity(folder) in synced, folder
        assert spy.last("fsync", identity(out)) > spy.last("rename")          # the renames reach the disk


@pytest.mark.parametrize("refusal", ["open", "fsync"])
def test_a_save_succeeds_where_folders_cannot_be_flushed(tmp_path, monkeypatch, refusal):
    # Windows: os.open refuses a folder (PermissionError); some file systems refuse to fsync one (EINVAL)
    real_open, real_fsync = os.open, os.fsync

    def no_folder_open(path, flags, *args, **kwargs):
        if os.path.isdir(path):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *args, **kwargs)

    def no_folder_fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(22, "Invalid argument")
        real_fsync(fd)
    if refusal == "open":
        monkeypatch.setattr(os, "open", no_folder_open)
        monkeypatch.setattr(shutil, "_use_fd_functions", False, raising=False)   # rmtree as on Windows
    else:
        monkeypatch.setattr(os, "fsync", no_folder_fsync)
    out = run_folder(tmp_path)
    save(out, 2)
    save(out, 4)
    runfiles.write_json(os.path.join(out, "config.json"), dataclasses.asdict(Cfg(out)))
    assert runfiles.check_resume(Cfg(out), MAY_CHANGE) == os.path.join(out, "checkpoint")
    assert step_of(runfiles.find_checkpoint(out)) == 4 and checkpoints(out) == ["checkpoint"]
    runfiles.keep_rows(out, 2)
    assert steps_in(out, "metrics.jsonl") == [1, 2]


def test_loss_scale_and_fused_adamw_come_back_through_weights_only(tiny_policy, tmp_path):
    model, tok = tiny_policy
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    ids = tok("What is 1+1?", return_tensors="pt").input_ids

    def step(overflow=False):
        scaler.scale(model(input_ids=ids, labels=ids).loss).backward()
        if overflow:                                         # an fp16 overflow: the step is skipped, the scale halved
            params[0].grad.view(-1)[0] = float("inf")
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    step()
    step(overflow=True)
    assert scaler.get_scale() == 2.0 ** 15                   # not the default 2 ** 16
    out = str(tmp_path / "run")
    os.makedirs(out)
    runfiles.save_checkpoint(out, model, opt, scaler, State(step=7, pos=3))
    opt2 = torch.optim.AdamW(params, lr=1e-3, fused=True)
    scaler2 = torch.amp.GradScaler("cpu", enabled=True)
    state = runfiles.restore(runfiles.find_checkpoint(out), out, opt2, scaler2, State)   # torch.load(weights_only=True)
    assert state == State(step=7, pos=3)
    assert scaler2.get_scale() == 2.0 ** 15 and scaler2.state_dict() == scaler.state_dict()
    assert opt2.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    for p in params:
        assert opt2.state[p].keys() == opt.state[p].keys() and opt.state[p]
        for k, v in opt.state[p].items():
            assert torch.equal(opt2.state[p][k], v), k
