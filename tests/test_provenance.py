"""icm_helpers.provenance: every field is checked against an independent source (git run by the test, importlib
metadata, torch, /proc/cpuinfo, a hash computed here), so a provenance that lied would fail."""
import datetime as dt
import hashlib
import importlib.metadata
import json
import platform
import shutil
import subprocess

import pytest
import torch

from icm_helpers import provenance as prov
from icm_helpers.config import REPO_ROOT, load_profile

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
# a fixed identity and no signing, whatever the machine's git configuration says
GIT_ID = ["-c", "user.name=test", "-c", "user.email=test@example.invalid", "-c", "commit.gpgsign=false"]


def git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *GIT_ID, *args], check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.fixture
def tmp_repo(tmp_path):
    """A fresh git repository with one committed file, ``tracked.txt``."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "tracked.txt").write_text("one\n")
    git(repo, "add", "tracked.txt")
    git(repo, "commit", "-q", "-m", "first")
    return repo


@needs_git
def test_commit_is_the_repositorys_head():
    head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("REPO_ROOT is not a git checkout here (installed package)")
    state = prov.result_provenance()["git"]  # default repo: REPO_ROOT
    assert state["commit"] == head.stdout.strip() and len(state["commit"]) == 40
    assert isinstance(state["dirty"], bool) and state["reason"] is None


@needs_git
def test_dirty_flag_follows_tracked_files_only(tmp_repo):
    clean = prov.git_state(tmp_repo)
    assert clean == {"commit": git(tmp_repo, "rev-parse", "HEAD"), "dirty": False, "reason": None}
    (tmp_repo / "untracked.txt").write_text("new result\n")  # untracked files do not count
    assert prov.git_state(tmp_repo)["dirty"] is False
    (tmp_repo / "tracked.txt").write_text("two\n")  # a tracked file edited in the work tree
    assert prov.git_state(tmp_repo)["dirty"] is True
    git(tmp_repo, "add", "tracked.txt")  # the same change staged
    assert prov.git_state(tmp_repo)["dirty"] is True
    git(tmp_repo, "commit", "-q", "-m", "second")
    after = prov.git_state(tmp_repo)  # the git state is not cached: the new commit is seen
    assert after["commit"] == git(tmp_repo, "rev-parse", "HEAD") != clean["commit"]
    assert after["dirty"] is False
    (tmp_repo / "tracked.txt").unlink()  # a deleted tracked file counts
    assert prov.git_state(tmp_repo)["dirty"] is True


@needs_git
def test_the_suites_own_figures_do_not_make_the_checkout_dirty(tmp_repo):
    (tmp_repo / "figures" / "demo").mkdir(parents=True)
    (tmp_repo / "figures" / "demo" / "table.json").write_text("{}\n")
    git(tmp_repo, "add", "figures")
    git(tmp_repo, "commit", "-q", "-m", "figures")
    (tmp_repo / "figures" / "demo" / "table.json").write_text('{"rerun": 1}\n')  # a run rewrote a committed figure
    assert prov.git_state(tmp_repo)["dirty"] is False
    (tmp_repo / "tracked.txt").write_text("code change\n")
    assert prov.git_state(tmp_repo)["dirty"] is True
    assert prov.result_provenance(repo=tmp_repo)["git"]["dirty"] is True  # the parameter reaches git_state


@needs_git
def test_no_commit_without_a_checkout_never_raises(tmp_path, tmp_repo, monkeypatch):
    plain = tmp_path / "plain"
    plain.mkdir()
    for where in (plain, tmp_repo / "sub", tmp_path / "missing"):
        if where.name == "sub":
            where.mkdir()  # inside a repository but not its top level (like an installed package in a venv)
        state = prov.git_state(where)
        assert state["commit"] is None and state["dirty"] is None and state["reason"], where
    assert "top level" in prov.git_state(tmp_repo / "sub")["reason"]
    empty = tmp_path / "empty"
    empty.mkdir()
    git(empty, "init", "-q")
    assert "no commit" in prov.git_state(empty)["reason"]
    monkeypatch.setenv("PATH", str(plain))  # no git executable at all
    state = prov.result_provenance(repo=tmp_repo)["git"]
    assert state["commit"] is None and "not installed" in state["reason"]


def test_versions_are_the_installed_ones(monkeypatch):
    versions = prov.result_provenance()["versions"]
    assert versions["python"] == platform.python_version()
    for name in ("torch", "torchvision", "compressai", "numpy", "pycocotools", "Pillow", "scipy"):
        assert versions[name] == importlib.metadata.version(name), name
    prov._package_versions.cache_clear()
    try:
        monkeypatch.setattr(prov, "PACKAGES", ("numpy", "no-such-distribution-icm"))
        assert prov.package_versions() == {"python": platform.python_version(),
                                           "numpy": importlib.metadata.version("numpy"),
                                           "no-such-distribution-icm": None}
    finally:
        prov._package_versions.cache_clear()


def test_profile_hash_is_canonical_and_follows_every_setting():
    base = load_profile("smoke")
    record = prov.result_provenance(base)["profile"]
    expected = hashlib.sha256(json.dumps(base, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
                              .encode("utf-8")).hexdigest()
    assert record == {"name": "smoke", "sha256": expected}

    def reverse_keys(node):
        return {k: reverse_keys(v) for k, v in reversed(node.items())} if isinstance(node, dict) else node

    shuffled = reverse_keys(base)
    assert list(shuffled) != list(base)
    assert prov.profile_sha256(shuffled) == expected
    changed = load_profile("smoke", {"tasks.detection.alpha": 0.25})  # one nested setting, through an override
    assert prov.profile_sha256(changed) != expected
    assert prov.profile_sha256(load_profile("smoke", {"tasks.detection.alpha": 0.5})) == expected  # same value
    assert prov.profile_sha256({**base, "seed": 1}) != expected
    assert prov.result_provenance(base, profile_name="other")["profile"]["name"] == "other"


def test_threads_follow_torch():
    before = torch.get_num_threads()
    try:
        assert prov.result_provenance()["torch_num_threads"] == before
        torch.set_num_threads(1)
        assert prov.result_provenance()["torch_num_threads"] == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_device_names():
    rec = prov.result_provenance(device="cpu")
    assert rec["device"]["type"] == "cpu" and rec["device"]["name"] == rec["cpu"] == prov.cpu_name()
    assert rec["cpu"].strip()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            models = [ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")]
    except OSError:
        models = []
    if models:
        assert rec["cpu"] == models[0]
    cuda = prov.device_info("cuda:0")
    if torch.cuda.is_available():
        assert cuda["name"] == torch.cuda.get_device_name(0)
    else:  # recorded, not raised
        assert cuda["type"] == "cuda" and cuda["name"] is None and cuda["error"]


def test_times_and_json():
    t0 = dt.datetime(2024, 5, 1, 12, 0, 0, 250000, tzinfo=dt.timezone.utc)
    t1 = t0 + dt.timedelta(seconds=90.5)
    rec = prov.result_provenance({"name": "p", "x": 1}, seed=7, started=t0, ended=t1)
    assert rec["started_utc"] == "2024-05-01T12:00:00.250Z" and rec["ended_utc"] == "2024-05-01T12:01:30.750Z"
    assert dt.datetime.fromisoformat(rec["ended_utc"].replace("Z", "+00:00")) == t1
    assert rec["wall_seconds"] == pytest.approx(90.5) and rec["seed"] == 7
    assert prov.result_provenance(seconds=3.0, started=t0.timestamp())["wall_seconds"] == 3.0
    with pytest.raises(ValueError, match="naive"):
        prov.result_provenance(started=dt.datetime(2024, 5, 1))
    text = json.dumps(rec, allow_nan=False)
    assert json.loads(text) == rec

    def strings(node):
        if isinstance(node, dict):
            return [s for v in node.values() for s in strings(v)] + list(node)
        return [node] if isinstance(node, str) else []

    assert platform.node() not in strings(rec) and "hostname" not in strings(rec)  # no host name recorded
