"""Reliability of training and its files: SIGKILL at any moment + rerun = the uninterrupted result (bitwise),
a full disk, truncated checkpoints, NaN/Inf losses, and a write killed half-way never leave a partial or corrupt
file under a final name, and never make a rerun silently start over.

The stress test (``-m stress``) runs tests/kill_resume_job.py as a subprocess and SIGKILLs it repeatedly."""
from __future__ import annotations

import errno
import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import icm_helpers.io
from icm_helpers.codec import build_codec, load_codec, load_state, save_codec
from icm_helpers.io import atomic_torch_save, atomic_write_bytes
from icm_helpers.training import Callback, NonFiniteLossError, Validation, fit

from conftest import StopAfterEpoch

HERE = Path(__file__).resolve().parent
JOB = HERE / "kill_resume_job.py"
TMP_RE = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")  # atomic_write_bytes' temp names: .<final name>.<random>.tmp


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _temps(d: Path) -> list[str]:
    return sorted(n for n in os.listdir(d) if TMP_RE.match(n))


# --------------------------------------------------------------------------------------------------------------
# a tiny fit() job (a linear model): fast, deterministic, and exercises the same checkpoint/resume code as train_icm


def _tiny_fit(ckpt: Path, epochs: int = 4, steps: int = 2, step_hook=None, **kw):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def loader(epoch):
        g = torch.Generator().manual_seed(epoch)
        for _ in range(steps):
            yield torch.randn(3, 4, generator=g)

    def step_fn(x, step):
        loss = model(x + 0.01 * torch.randn_like(x)).pow(2).mean()  # uses the global RNG (saved in the checkpoint)
        opt.zero_grad()
        loss.backward()
        opt.step()
        value = float(loss.detach())
        return {"loss": step_hook(step, value, model) if step_hook else value}

    res = fit(
        modules={"m": model},
        optimizers={"main": opt},
        step_fn=step_fn,
        loader_fn=loader,
        epochs=epochs,
        steps_per_epoch=steps,
        lr_lambda=lambda s: 1.0,
        checkpoint_path=ckpt,
        meta={"job": "tiny"},
        log=None,
        **kw,
    )
    return model, res


def _params(model):
    return [p.detach().clone() for p in model.state_dict().values()]


# --------------------------------------------------------------------------------------------------------------
# 1. SIGKILL at random moments, rerun the same command until it finishes: same final weights as uninterrupted


def _launch(out: Path, world: Path, log):
    return subprocess.Popen(
        [sys.executable, str(JOB), str(out), "--world", str(world)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=HERE.parent,
    )


def _state_key(p: Path):
    try:
        st = os.stat(p)
        return st.st_mtime_ns, st.st_ino, st.st_size
    except FileNotFoundError:
        return None


def _disk_epoch(out: Path) -> int:
    """Epoch of the checkpoint under its final name; it must ALWAYS load (never partial)."""
    p = out / "state.pt"
    if not p.exists():
        return 0
    ckpt = load_state(p)  # raises on a truncated/partial file
    assert ckpt["meta"]["job"] == "icm"
    return int(ckpt["epoch"])


def _check_final_names(out: Path, epochs: int) -> int:
    names = set(os.listdir(out))
    assert names <= {"state.pt", "final.sha256"} | set(_temps(out)), f"unexpected files {sorted(names)}"
    if "final.sha256" in names:
        assert re.fullmatch(r"[0-9a-f]{64}\n", (out / "final.sha256").read_text()), "partial final.sha256"
    e = _disk_epoch(out)
    assert 0 <= e <= epochs
    return e


def _watch(proc, out: Path, rng: random.Random, mode: str, delay: float | None = None, nth: int = 1):
    """Poll the job every ms; SIGKILL it when ``mode`` says so. Returns (exit code, checkpoint write times)."""
    temps_before, state = set(_temps(out)) if out.exists() else set(), _state_key(out / "state.pt")
    new_temps: set[str] = set()
    writes: list[float] = []
    t_launch = time.time()
    while proc.poll() is None:
        now = time.time() - t_launch
        if out.exists():
            new_temps |= set(_temps(out)) - temps_before
        key = _state_key(out / "state.pt")
        if key != state:
            state = key
            writes.append(now)
        if mode == "mid_write" and len(new_temps) >= nth:  # inside atomic_write_bytes of this attempt's nth checkpoint
            break
        if mode == "after_rename" and len(writes) >= nth and delay is None:  # nth checkpoint renamed into place
            delay = now + rng.uniform(0.0, 0.03)
        if delay is not None and now >= delay:
            break
        time.sleep(0.001)
    if mode != "none" and proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    return proc.wait(timeout=120), writes


@pytest.mark.stress
@pytest.mark.slow
def test_sigkill_at_random_times_then_rerun_gives_bitwise_same_result(tmp_path):
    """Kills: during start-up, inside a checkpoint write (temp file present), a few ms after a checkpoint's rename,
    at random moments, and during the final phase (quantile fit, hash write); each attempt gets at most ~2 epochs
    further, so the kills are spread over the whole run. Every state between attempts must be valid."""
    epochs, target_kills = 8, 12
    world, log_path = tmp_path / "world", tmp_path / "job.log"
    rng = random.Random(20240611)
    t_start = time.time()
    with open(log_path, "ab") as log:
        rc, writes = _watch(_launch(tmp_path / "ref", world, log), tmp_path / "ref", rng, "none")
        assert rc == 0 and len(writes) == epochs, (writes, log_path.read_text()[-3000:])
    t_ref = time.time() - t_start
    t_first, t_epoch = writes[0], (writes[-1] - writes[0]) / (epochs - 1)
    reference = (tmp_path / "ref" / "final.sha256").read_text().strip()

    out = tmp_path / "killed"
    out.mkdir()
    kills: list[dict] = []
    attempts = 0
    last_epoch = 0
    with open(log_path, "ab") as log:
        while True:
            attempts += 1
            assert attempts < 60, f"no completion after {attempts} attempts: {kills}"
            disk = _check_final_names(out, epochs)
            assert disk >= last_epoch, "the checkpoint went back in time"
            last_epoch = disk
            done_final_phase = any(k["disk_epoch_before"] == epochs for k in kills)
            if len(kills) >= target_kills and (done_final_phase or len(kills) >= target_kills + 4):  # let it finish
                rc, _ = _watch(_launch(out, world, log), out, rng, "none")
                assert rc == 0, log_path.read_text()[-3000:]
                break
            delay, nth = None, rng.choice([1, 2])
            if disk >= epochs:  # all epochs done: kill during start-up or during the final quantile fit / hash write
                mode = rng.choice(["early", "late"])
            else:
                mode = rng.choices(["mid_write", "after_rename", "random", "early"], weights=[3, 3, 2.5, 1.5])[0]
            if mode == "early":
                delay = rng.uniform(0.05, t_first * 0.8)
            elif mode == "random":
                delay = rng.uniform(0.0, t_first + 2 * t_epoch)
            elif mode == "late":
                delay = rng.uniform(t_first * 0.8, t_first + 3.0)
            temps_before = set(_temps(out))
            t_launch = time.time()
            rc, _ = _watch(_launch(out, world, log), out, rng, mode, delay, nth)
            if rc == -signal.SIGKILL:  # counts only kills of a live process
                kills.append({"mode": mode if delay is None or mode == "after_rename" else f"{mode} {delay:.2f}s",
                              "at_s": round(time.time() - t_launch, 3), "disk_epoch_before": disk,
                              "orphan_temp": bool(set(_temps(out)) - temps_before)})
            else:  # it finished before the kill: fine (later attempts kill during start-up or the final phase)
                assert rc == 0, log_path.read_text()[-3000:]

    final = (out / "final.sha256").read_text().strip()
    total = time.time() - t_start
    _check_final_names(out, epochs)
    summary = (
        f"survived {len(kills)} SIGKILLs in {attempts} attempts; reference run {t_ref:.1f}s; total {total:.1f}s; "
        f"killed mid-write (orphan temp left, final name intact) {sum(k['orphan_temp'] for k in kills)} times; "
        f"checkpoint epochs at kill time {sorted({k['disk_epoch_before'] for k in kills})}"
    )
    print("\n" + summary)
    for k in kills:
        print("  ", k)
    assert len(kills) >= 10, summary
    assert final == reference, f"final weights differ from the uninterrupted run ({summary})"
    assert sum(k["orphan_temp"] for k in kills) >= 1, f"no kill landed inside a checkpoint write ({summary})"
    assert len({k["disk_epoch_before"] for k in kills}) >= 3, f"kills not spread over the run ({summary})"


# --------------------------------------------------------------------------------------------------------------
# 2. disk full while saving


class _DiskFull:
    """A file object that writes half of what it is given, then fails like a full disk."""

    def __init__(self, fh):
        self.fh = fh

    def write(self, data):
        mv = memoryview(data)
        self.fh.write(mv[: len(mv) // 2])
        self.fh.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_disk_full_during_checkpoint_keeps_previous_and_resumes(tmp_path, monkeypatch, where):
    ckpt = tmp_path / "state.pt"
    _tiny_fit(ckpt, callbacks=[StopAfterEpoch(1)])
    before = _sha(ckpt)
    real_fdopen, real_fsync = os.fdopen, os.fsync
    if where == "write":
        monkeypatch.setattr(
            icm_helpers.io.os, "fdopen", lambda fd, mode="r", *a, **k: _DiskFull(real_fdopen(fd, mode, *a, **k))
        )
    else:  # delayed allocation: the write "succeeds", the fsync reports the full disk
        def fsync(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(icm_helpers.io.os, "fsync", fsync)
    with pytest.raises(OSError) as info:
        _tiny_fit(ckpt)  # resumes from epoch 1, trains epoch 2, its save fails
    monkeypatch.undo()
    assert os.fdopen is real_fdopen and os.fsync is real_fsync
    err = info.value
    assert err.errno == errno.ENOSPC
    assert str(ckpt) in str(err) and "No space left on device" in str(err) and "intact" in str(err), str(err)
    assert _sha(ckpt) == before, "the previous checkpoint was changed"
    assert load_state(ckpt)["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == ["state.pt"], "a temp file was left behind"
    # space is back: the same command resumes from epoch 1 and ends exactly like an uninterrupted run
    model, res = _tiny_fit(ckpt)
    assert res.resumed_from_epoch == 1
    ref, _ = _tiny_fit(tmp_path / "ref" / "state.pt")
    assert all(torch.equal(a, b) for a, b in zip(_params(model), _params(ref)))


def test_disk_full_in_atomic_torch_save_names_the_path(tmp_path, monkeypatch):
    path = tmp_path / "codec.pt"
    save_codec(path, build_codec(N=16))
    before = _sha(path)
    real_fdopen = os.fdopen
    monkeypatch.setattr(
        icm_helpers.io.os, "fdopen", lambda fd, mode="r", *a, **k: _DiskFull(real_fdopen(fd, mode, *a, **k))
    )
    with pytest.raises(OSError, match=re.escape(f"could not write {path}: No space left on device")) as info:
        atomic_torch_save({"x": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC and isinstance(info.value.__cause__, OSError)
    assert _sha(path) == before and sorted(os.listdir(tmp_path)) == ["codec.pt"]
    load_codec(path)


# --------------------------------------------------------------------------------------------------------------
# 3. truncated checkpoints


@pytest.mark.parametrize("keep", [0.0, 0.5, -1])
def test_truncated_codec_file_raises_clear_error(tmp_path, keep):
    path = tmp_path / "codec.pt"
    save_codec(path, build_codec(N=16))
    data = path.read_bytes()
    n = len(data) - 1 if keep == -1 else int(len(data) * keep)
    path.write_bytes(data[:n])
    for load in (load_state, load_codec):
        with pytest.raises(ValueError, match=re.escape(str(path))) as info:
            load(path)
        assert "truncated or corrupt" in str(info.value) and "delete it" in str(info.value)


def test_fit_refuses_a_truncated_resume_checkpoint(tmp_path):
    ckpt = tmp_path / "state.pt"
    _tiny_fit(ckpt, callbacks=[StopAfterEpoch(2)])
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    truncated = _sha(ckpt)
    with pytest.raises(ValueError) as info:
        _tiny_fit(ckpt)  # must NOT start over silently from epoch 0
    msg = str(info.value)
    assert str(ckpt) in msg and "truncated or corrupt" in msg and "delete it to start this training over" in msg, msg
    assert _sha(ckpt) == truncated, "fit overwrote the (truncated) checkpoint"
    ckpt.unlink()  # the documented way out: start over
    _, res = _tiny_fit(ckpt)
    assert res.resumed_from_epoch == 0 and len(res.history) == 4


# --------------------------------------------------------------------------------------------------------------
# 4. NaN / Inf in the loss


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, bad):
    ckpt = tmp_path / "state.pt"
    k = 5  # epoch 2 (0-based), second step; checkpoints of epochs 1 and 2 exist
    seen = {}

    def hook(step, value, model):
        if step == k:
            seen["sha"] = _sha(ckpt)
            with torch.no_grad():  # the update of a non-finite loss has already poisoned the weights in memory
                for p in model.parameters():
                    p.fill_(bad)
            return bad
        return value

    with pytest.raises(NonFiniteLossError, match=rf"\bstep {k}\b") as info:
        _tiny_fit(ckpt, step_hook=hook)
    assert str(ckpt) in str(info.value)
    assert _sha(ckpt) == seen["sha"], "the last good checkpoint was rewritten"
    state = load_state(ckpt)
    assert state["epoch"] == 2 and all(torch.isfinite(v).all() for v in state["modules"]["m"].values())
    assert sorted(os.listdir(tmp_path)) == ["state.pt"]
    model, res = _tiny_fit(ckpt)  # fault gone: resume from the last good epoch, same result as uninterrupted
    ref, _ = _tiny_fit(tmp_path / "ref" / "state.pt")
    assert res.resumed_from_epoch == 2 and all(torch.equal(a, b) for a, b in zip(_params(model), _params(ref)))


def test_non_finite_icm_loss_keeps_checkpoint(tmp_path, train_set, monkeypatch):
    """The same through train_icm: the Eq. 5 loss turns NaN at step 3 (second epoch)."""
    from icm_helpers.training import objective
    from test_training_eval import _job

    real, calls = objective.icm_loss, {"n": 0}

    def icm_loss(*a, **kw):
        terms = real(*a, **kw)
        calls["n"] += 1
        if calls["n"] == 4:  # global step 3
            calls["sha"] = _sha(tmp_path / "state.pt")
            terms = {**terms, "loss": terms["loss"] * float("nan")}
        return terms

    monkeypatch.setattr(objective, "icm_loss", icm_loss)
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 3\b"):
        _job(tmp_path, train_set)
    assert _sha(tmp_path / "state.pt") == calls["sha"] and load_state(tmp_path / "state.pt")["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == ["state.pt"]


# --------------------------------------------------------------------------------------------------------------
# 5. a process killed inside atomic_write_bytes never leaves a half-written file under the final name

_WRITER = r"""
import os, sys, time
import icm_helpers.io as io_
path, size, slow = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
if slow:  # write in 4 MiB chunks with a pause after each: the kill lands mid-write
    real = os.fdopen
    class Slow:
        def __init__(s, fh): s.fh = fh
        def write(s, b):
            mv = memoryview(b)
            for i in range(0, len(mv), 4 << 20):
                s.fh.write(mv[i:i + (4 << 20)]); s.fh.flush(); time.sleep(0.01)
            return len(mv)
        def __getattr__(s, n): return getattr(s.fh, n)
        def __enter__(s): return s
        def __exit__(s, *e): s.fh.close()
    io_.os.fdopen = lambda fd, mode="r", *a, **k: Slow(real(fd, mode, *a, **k))
data = b"\x5a" * size
print("writing", flush=True)
io_.atomic_write_bytes(path, data)
print("done", flush=True)
"""

SIZE = 200 * 2**20


def _start_writer(path: Path, slow: bool):
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(SIZE), "1" if slow else "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=HERE.parent)
    assert proc.stdout.readline().strip() == b"writing", proc.stderr.read().decode()
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("previous", [False, True])
def test_kill_inside_atomic_write_leaves_old_or_nothing(tmp_path, previous):
    path = tmp_path / "big.bin"
    old = os.urandom(1 << 20)
    if previous:
        atomic_write_bytes(path, old)
    rng = random.Random(7)
    try:
        for trial in range(3):  # slowed writer: kill when 10-90% of the payload is in the temp file
            proc = _start_writer(path, slow=True)
            frac = rng.uniform(0.1, 0.9)
            deadline = time.time() + 120
            while proc.poll() is None and time.time() < deadline:
                # bytes written so far (in the temp file; a broken writer would grow the final name itself)
                sizes = [
                    os.stat(tmp_path / n).st_size for n in _temps(tmp_path) + ["big.bin"] if (tmp_path / n).exists()
                ]
                if sizes and max(sizes) >= frac * SIZE:
                    break
                time.sleep(0.002)
            assert proc.poll() is None, "the writer finished before the kill"
            proc.send_signal(signal.SIGKILL)
            assert proc.wait() == -signal.SIGKILL
            if previous:
                assert path.read_bytes() == old, "the final name does not hold the complete previous content"
            else:
                assert not path.exists(), "a half-written file appeared under the final name"
            partial = [tmp_path / n for n in _temps(tmp_path)]
            assert partial and all(p.stat().st_size < SIZE for p in partial)  # the kill did land mid-write
            for p in partial:
                p.unlink()
        # unslowed writer, killed at random moments across write + fsync + rename: old content or complete new
        new_sha = hashlib.sha256(b"\x5a" * SIZE).hexdigest()
        outcomes = []
        for trial in range(4):
            if previous:
                atomic_write_bytes(path, old)
            elif path.exists():
                path.unlink()
            proc = _start_writer(path, slow=False)
            time.sleep(rng.uniform(0.0, 1.0))
            proc.send_signal(signal.SIGKILL)
            rc = proc.wait()
            if path.exists():
                got = _sha(path)
                assert got in ({new_sha, hashlib.sha256(old).hexdigest()} if previous else {new_sha}), "partial file"
                outcomes.append("new" if got == new_sha else "old")
            else:
                assert not previous
                outcomes.append("none")
            outcomes[-1] += "" if rc == -signal.SIGKILL else " (finished)"
            for n in _temps(tmp_path):
                (tmp_path / n).unlink()
        print(f"\nunslowed kills: {outcomes}")
    finally:
        for n in os.listdir(tmp_path):
            (tmp_path / n).unlink()


def test_fit_removes_temp_files_of_a_killed_write_and_resumes(tmp_path):
    ckpt = tmp_path / "state.pt"
    _tiny_fit(ckpt, callbacks=[StopAfterEpoch(1)])
    stale = tmp_path / ".state.pt.k1ll3d.tmp"
    stale.write_bytes(b"half a checkpoint")
    other = tmp_path / ".other.pt.x.tmp"  # not ours: left alone
    other.write_bytes(b"x")
    model, res = _tiny_fit(ckpt)
    assert not stale.exists() and other.exists() and res.resumed_from_epoch == 1


def test_fit_stops_on_a_non_finite_side_loss(tmp_path):
    """Any non-finite logged value (e.g. CompressAI's quantile loss, whose NaN would poison the saved quantiles)
    stops the run with its name and step; the last good checkpoint is untouched."""
    import math

    from icm_helpers.training import NonFiniteLossError, fit

    ckpt = tmp_path / "state.pt"
    _tiny_fit(ckpt, epochs=2)
    before = _sha(ckpt)
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def step_fn(x, step):
        return {"loss": 1.0, "quantile_loss": math.nan if step == 5 else 0.5}

    with pytest.raises(NonFiniteLossError, match=r"non-finite quantile_loss .* step 5"):
        fit(
            modules={"m": model},
            optimizers={"main": opt},
            step_fn=step_fn,
            loader_fn=lambda e: iter([torch.zeros(1)] * 2),
            epochs=4,
            steps_per_epoch=2,
            lr_lambda=lambda s: 1.0,
            checkpoint_path=ckpt,
            meta={"job": "tiny"},
            log=None,
        )
    assert _sha(ckpt) == before


# --------------------------------------------------------------------------------------------------------------
# 6. callbacks: when fit calls them


class _Recorder(Callback):
    """A callback that records each hook fit calls, with the epoch of the checkpoint on disk at that moment."""

    def __init__(self, ckpt: Path, calls: list, name: str = "rec"):
        self.ckpt, self.calls, self.name = ckpt, calls, name

    def _disk(self) -> int:
        return int(load_state(self.ckpt)["epoch"]) if self.ckpt.exists() else 0

    def before_train(self, state):
        self.calls.append((self.name, "before_train", state.epoch, self._disk()))

    def before_epoch(self, state):
        self.calls.append((self.name, "before_epoch", state.epoch, self._disk()))

    def after_step(self, state, step, logs):
        self.calls.append((self.name, "after_step", step, self._disk()))

    def after_epoch(self, state, record):
        assert state.history[-1] is record
        self.calls.append((self.name, "after_epoch", dict(record), self._disk()))

    def should_stop(self, state):
        self.calls.append((self.name, "should_stop", len(state.history), self._disk()))
        return False

    def after_train(self, state):
        self.calls.append((self.name, "after_train", len(state.history), self._disk()))


def test_fit_calls_the_callbacks_in_this_order_over_a_two_epoch_run_and_on_resume(tmp_path):
    """Two epochs of two steps: each hook of each callback, in the list's order, with the epoch on disk when it is
    called: after_epoch sees the validated record before the epoch's checkpoint, should_stop after it; a resumed run
    is asked should_stop before before_train."""
    ckpt = tmp_path / "state.pt"
    calls = []
    validation = Validation(lambda epoch: {"aux": 10.0 + epoch})
    a, b = _Recorder(ckpt, calls, "a"), _Recorder(ckpt, calls, "b")
    _, res = _tiny_fit(ckpt, epochs=2, callbacks=[validation, a, b])
    trained = [(h["epoch"], h["val_aux"]) for h in res.history]
    assert trained == [(1, 10.0), (2, 11.0)]

    def both(hook, arg, disk):
        return [("a", hook, arg, disk), ("b", hook, arg, disk)]

    expected = both("before_train", 0, 0)
    for epoch in (0, 1):
        expected += both("before_epoch", epoch, epoch)
        for step in (2 * epoch, 2 * epoch + 1):
            expected += both("after_step", step, epoch)
        expected += both("after_epoch", res.history[epoch], epoch)  # validated, not yet saved
        expected += both("should_stop", epoch + 1, epoch + 1)
    expected += both("after_train", 2, 2)
    assert calls == expected
    assert list(res.history[0]) == ["epoch", "train_loss", "lr", "val_aux"]

    calls.clear()  # the same job with 3 epochs resumes after epoch 2
    _, res = _tiny_fit(ckpt, epochs=3, callbacks=[validation, a])
    assert res.resumed_from_epoch == 2
    assert [c[1] for c in calls] == ["should_stop", "before_train", "before_epoch", "after_step", "after_step",
                                     "after_epoch", "should_stop", "after_train"]
    assert calls[1] == ("a", "before_train", 2, 2) and calls[5][2]["epoch"] == 3 and calls[5][3] == 2


def test_an_after_epoch_hook_runs_between_validation_and_the_checkpoint_and_a_rerun_redoes_it(tmp_path):
    """A callback that raises in after_epoch of epoch 2 (after the validation callback before it in the list) leaves
    epoch 1's checkpoint untouched; the rerun redoes epoch 2, calls the hook again and ends bitwise like a run that
    never failed."""

    class FailOnce(Callback):
        def __init__(self):
            self.seen = []

        def after_epoch(self, state, record):
            self.seen.append(dict(record))
            if record["epoch"] == 2 and len(self.seen) == 2:
                raise RuntimeError("hook failed")

    ckpt = tmp_path / "state.pt"
    hook = FailOnce()
    callbacks = [Validation(lambda epoch: {"aux": float(epoch)}), hook]
    with pytest.raises(RuntimeError, match="hook failed"):
        _tiny_fit(ckpt, epochs=3, callbacks=callbacks)
    assert [r["epoch"] for r in hook.seen] == [1, 2] and all("val_aux" in r for r in hook.seen)
    assert load_state(ckpt)["epoch"] == 1, "the epoch whose hook raised was saved"
    model, res = _tiny_fit(ckpt, epochs=3, callbacks=callbacks)
    assert res.resumed_from_epoch == 1 and [r["epoch"] for r in hook.seen] == [1, 2, 2, 3]
    assert hook.seen[1] == hook.seen[2]  # the redone epoch 2 has the same record
    ref, ref_res = _tiny_fit(tmp_path / "ref" / "state.pt", epochs=3, callbacks=callbacks[:1])
    assert ref_res.history == res.history
    assert all(torch.equal(p, q) for p, q in zip(_params(model), _params(ref)))
