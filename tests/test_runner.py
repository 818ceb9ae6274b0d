"""Tests of the batch runner (papermill_runs.runner, started as papermill_runs/run.py) on tiny throwaway notebooks.

Every notebook execution starts a kernel (~1-3 s), so the behaviours are checked along two
scenarios (11 executions in all) plus cheap tests that execute nothing.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from papermill_runs import runner

REPO = Path(__file__).resolve().parents[1]
RUNNER_PATH = REPO / "papermill_runs" / "run.py"

PARAMS_CELL = "profile = None\nseed = -1\ndevice = '?'\nlr = None\nfail_in = ''\n"
FAIL_CELL = "if fail_in == NAME:\n    raise ValueError(f'asked to fail in {NAME}')\n"


def _body_cell(name: str) -> str:
    # cwd is the notebooks dir: the log lands next to the notebooks (and proves the cwd)
    return (
        "import json, os, sys\n"
        f"NAME = {name!r}\n"
        "record = dict(name=NAME, profile=profile, seed=seed, device=device, lr=lr,\n"
        "              exe=sys.executable, cwd=os.getcwd(), overrides=globals().get('overrides'))\n"
        "with open('log.jsonl', 'a') as fh:\n"
        "    fh.write(json.dumps(record) + '\\n')\n"
        "print('ran', NAME)\n"
    )


def write_notebook(path: Path, extra_cells=(), fail_cell: str = FAIL_CELL) -> None:
    name = path.stem
    cells = [
        new_markdown_cell(f"# {name}"),
        new_code_cell(PARAMS_CELL, metadata={"tags": ["parameters"]}),
        new_code_cell(_body_cell(name)),
        new_code_cell(fail_cell),
        *extra_cells,
    ]
    nb = new_notebook(
        cells=cells,
        metadata={
            # as if authored in `make lab`: that kernelspec need not exist where the runner runs
            "kernelspec": {"name": "icm-aux", "display_name": "Python (icm-aux)", "language": "python"},
            "language_info": {"name": "python"},
        },
    )
    nbformat.write(nb, str(path))


@pytest.fixture
def project(tmp_path):
    nbs = tmp_path / "nbs"
    params = tmp_path / "params"
    out = tmp_path / "out"
    nbs.mkdir()
    params.mkdir()
    # created out of order on purpose; 1_x and notes do not match [0-9][0-9]_*.ipynb
    for name in ("10_c", "01_a", "02_b", "1_x", "notes"):
        write_notebook(nbs / f"{name}.ipynb")
    (params / "t.yaml").write_text("# test profile\nseed: 0\ndevice: cpu\n")
    (params / "other.yaml").write_text("seed: 1\n")

    def cli(*args: str) -> int:
        return runner.main(
            ["--profile", "t", "--notebooks-dir", str(nbs), "--out-dir", str(out), "--params-dir", str(params), *args]
        )

    def log() -> list[dict]:
        path = nbs / "log.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def status() -> dict:
        return json.loads((out / "t" / "run_status.json").read_text())

    return SimpleNamespace(root=tmp_path, nbs=nbs, params=params, out=out, cli=cli, log=log, status=status)


def _only_profile_dir_written(p) -> None:
    assert sorted(x.name for x in p.out.iterdir()) == ["t"]
    assert sorted(x.name for x in p.nbs.iterdir()) == sorted(
        ["01_a.ipynb", "02_b.ipynb", "10_c.ipynb", "1_x.ipynb", "notes.ipynb", "log.jsonl"]
    )  # log.jsonl is written by the notebooks themselves
    assert not list(p.out.joinpath("t").glob(".*.partial.ipynb"))


def test_run_order_params_skip_rerun_and_force(project, capsys):
    p = project
    # 1. first run: every NN_ notebook, in numeric order, with the injected parameters
    assert p.cli() == 0
    records = p.log()
    assert [r["name"] for r in records] == ["01_a", "02_b", "10_c"]
    for r in records:
        assert r["profile"] == "t" and r["seed"] == 0 and r["device"] == "cpu" and r["lr"] is None
        assert Path(r["cwd"]) == p.nbs.resolve()
        # the default kernel runs the interpreter that runs the runner (here: the test's python)
        assert runner.same_interpreter(r["exe"], sys.executable), (r["exe"], sys.executable)
    out = capsys.readouterr().out
    assert out.index("run 01_a") < out.index("run 02_b") < out.index("run 10_c")
    assert "ran 02_b" in out  # cell output is logged while it runs
    st = p.status()
    assert set(st["notebooks"]) == {"01_a", "02_b", "10_c"}
    for name, entry in st["notebooks"].items():
        assert entry["status"] == "complete"
        assert len(entry["params_sha256"]) == 64 and len(entry["source_sha256"]) == 64
        assert entry["started_at"] and entry["finished_at"] and entry["seconds"] > 0
        assert "error" not in entry
        executed = nbformat.read(str(p.out / "t" / f"{name}.ipynb"), as_version=4)
        injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert len(injected) == 1 and 'profile = "t"' in injected[0].source
    _only_profile_dir_written(p)

    # 2. nothing changed: everything is skipped, nothing executes
    assert p.cli() == 0
    out = capsys.readouterr().out
    for name in ("01_a", "02_b", "10_c"):
        assert f"skip {name} (complete; --force to redo)" in out
    assert len(p.log()) == 3

    # 3. --param overrides (YAML-typed) on one notebook: it reruns because the params changed
    assert p.cli("--param", "seed=7", "lr=1e-3", "--only", "02") == 0
    out = capsys.readouterr().out
    assert "rerun 02_b (params changed since the last complete run" in out and "seed: 0 -> 7" in out
    assert "01_a" not in out and "10_c" not in out
    new = p.log()[3:]
    assert [r["name"] for r in new] == ["02_b"]
    assert new[0]["seed"] == 7 and new[0]["lr"] == 0.001 and new[0]["device"] == "cpu"
    assert p.status()["notebooks"]["02_b"]["params"]["lr"] == 0.001

    # 4. a changed source and a missing executed copy make their notebooks rerun
    write_notebook(p.nbs / "01_a.ipynb", extra_cells=[new_code_cell("x = 1")])
    (p.out / "t" / "10_c.ipynb").unlink()
    assert p.cli("--only", "01", "10_c") == 0
    out = capsys.readouterr().out
    assert "rerun 01_a (notebook source changed since the last complete run)" in out
    assert "rerun 10_c (executed copy" in out and "is missing)" in out
    assert [r["name"] for r in p.log()[4:]] == ["01_a", "10_c"]

    # 5. --force reruns a complete, unchanged notebook
    assert p.cli("--force", "--only", "01") == 0
    out = capsys.readouterr().out
    assert "rerun 01_a (--force" in out
    assert [r["name"] for r in p.log()[6:]] == ["01_a"]
    _only_profile_dir_written(p)


def test_failure_stops_and_rerun_continues(project, capsys, monkeypatch, tmp_path):
    p = project
    (p.nbs / "10_c.ipynb").unlink()
    write_notebook(p.nbs / "03_c.ipynb")
    # a python3 kernelspec of ANOTHER interpreter shadows the venv's one: the runner must still
    # run its own interpreter (built-in kernel spec), so this scenario also covers that fallback
    bogus = tmp_path / "jupyter" / "kernels" / "python3"
    bogus.mkdir(parents=True)
    (bogus / "kernel.json").write_text(
        json.dumps({"argv": ["/nonexistent/bin/python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                    "display_name": "elsewhere", "language": "python"})
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    assert runner.resolve_kernel().name == runner.THIS_INTERPRETER_KERNEL

    # 1. 02_b fails (made to by a parameter): the run stops there with exit code 1
    assert p.cli("--param", "fail_in=02_b") == 1
    captured = capsys.readouterr()
    assert [r["name"] for r in p.log()] == ["01_a", "02_b"]
    assert all(runner.same_interpreter(r["exe"], sys.executable) for r in p.log())
    err = captured.err
    assert "notebook 02_b failed" in err
    assert "cell 3 (0-based, in 02_b.ipynb)" in err and "In [4]" in err  # md, params, body, fail
    assert "if fail_in == NAME:" in err
    assert "ValueError: asked to fail in 02_b" in err
    assert "FAILED" in captured.out and "03_c" in captured.out  # summary lists the one not run
    executed = nbformat.read(str(p.out / "t" / "02_b.ipynb"), as_version=4)
    errors = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert len(errors) == 1 and errors[0].ename == "ValueError" and "02_b" in errors[0].evalue
    assert not (p.out / "t" / "03_c.ipynb").exists()
    st = p.status()["notebooks"]
    assert st["01_a"]["status"] == "complete" and "03_c" not in st
    assert st["02_b"]["status"] == "failed"
    assert st["02_b"]["error"]["ename"] == "ValueError" and st["02_b"]["error"]["cell_index"] == 3

    # 2. fix the notebook, rerun the same command: 01_a is skipped, 02_b reruns, 03_c runs
    write_notebook(p.nbs / "02_b.ipynb", fail_cell="pass  # fixed\n")
    assert p.cli("--param", "fail_in=02_b") == 0
    out = capsys.readouterr().out
    assert "skip 01_a (complete; --force to redo)" in out
    assert "rerun 02_b (failed last time: ValueError" in out
    assert "run 03_c (no previous run)" in out
    assert [r["name"] for r in p.log()[2:]] == ["02_b", "03_c"]
    assert {e["status"] for e in p.status()["notebooks"].values()} == {"complete"}
    assert "error" not in p.status()["notebooks"]["02_b"]


# ---------------------------------------------------------------- cheap tests: nothing executes
@pytest.mark.parametrize("bad", ["../t", "a/b", "", ".", "..", "x y", "/abs"])
def test_bad_profile_name_is_rejected(project, capsys, bad):
    assert runner.main(["--profile", bad, "--out-dir", str(project.out), "--params-dir", str(project.params),
                        "--notebooks-dir", str(project.nbs)]) == 2
    assert "invalid profile name" in capsys.readouterr().err
    assert not project.out.exists()


def test_a_yaml_profile_that_is_not_there_is_named(project, capsys):
    """``--profile x.yaml`` is a profile FILE: a missing one is named (not mistaken for a profile name)."""
    assert runner.main(["--profile", "t.yaml", "--out-dir", str(project.out), "--params-dir", str(project.params),
                        "--notebooks-dir", str(project.nbs)]) == 2
    assert "no such profile file" in capsys.readouterr().err and not project.out.exists()


def test_missing_params_file_lists_available_profiles(project, capsys):
    assert runner.main(["--profile", "nope", "--out-dir", str(project.out), "--params-dir", str(project.params),
                        "--notebooks-dir", str(project.nbs)]) == 2
    err = capsys.readouterr().err
    assert "unknown profile 'nope'" in err and "nope.yaml does not exist" in err
    assert "Available profiles" in err and "other, t" in err
    assert not project.out.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--only", "04"], "--only 04: no such notebook"),
        (["--from", "zz_nope"], "--from zz_nope: no such notebook"),
        (["--param", "seed"], "expected key=value"),
        (["--param", "1x=2"], "not a valid Python identifier"),
        (["--param", "profile=x"], "choose the profile with --profile"),
        (["--param", "when=2024-01-01"], "quote it"),
        (["--kernel", "no-such-kernel"], "no such Jupyter kernel"),
    ],
)
def test_usage_errors(project, capsys, args, message):
    assert project.cli(*args) == 2
    assert message in capsys.readouterr().err
    assert not project.out.exists()


def test_params_file_problems(project, capsys):
    (project.params / "t.yaml").write_text("- just\n- a list\n")
    assert project.cli() == 2
    assert "must be a YAML mapping" in capsys.readouterr().err
    (project.params / "t.yaml").write_text("profile: other\n")
    assert project.cli() == 2
    assert "do not set 'profile'" in capsys.readouterr().err


def test_param_values_are_yaml_not_eval():
    got = runner.parse_param_overrides(
        ["a=3", "b=1e-3", "c=0.5", "d=true", "e=[1, 2]", "f=hello", "g=", "h=__import__('os')", "i='3'", "j=a=b"]
    )
    assert got == {"a": 3, "b": 0.001, "c": 0.5, "d": True, "e": [1, 2], "f": "hello", "g": None,
                   "h": "__import__('os')", "i": "3", "j": "a=b"}


def test_build_params_and_hashes(project, tmp_path):
    params = runner.build_params("t", project.params, ["seed=3"])
    assert params == {"seed": 3, "device": "cpu", "profile": "t"}
    assert runner.params_sha256(params) == runner.params_sha256(dict(reversed(list(params.items()))))
    assert runner.params_sha256(params) != runner.params_sha256({**params, "seed": 4})
    # outputs / execution counts / metadata do not change the source hash, sources do
    nb_path = project.nbs / "01_a.ipynb"
    before = runner.source_sha256(nb_path)
    nb = nbformat.read(str(nb_path), as_version=4)
    nb.cells[2].outputs = [nbformat.v4.new_output("stream", name="stdout", text="x\n")]
    nb.cells[2].execution_count = 5
    nb.metadata["foo"] = 1
    nbformat.write(nb, str(nb_path))
    assert runner.source_sha256(nb_path) == before
    nb.cells[2].source += "\n# edited"
    nbformat.write(nb, str(nb_path))
    assert runner.source_sha256(nb_path) != before


def test_selection():
    nbs = [Path(f"{n}.ipynb") for n in ("01_a", "02_b", "03_c", "03_d", "10_e")]
    names = lambda sel: [p.stem for p in sel]  # noqa: E731
    assert names(runner.select_notebooks(nbs)) == ["01_a", "02_b", "03_c", "03_d", "10_e"]
    assert names(runner.select_notebooks(nbs, only=["10", "3"])) == ["03_c", "03_d", "10_e"]
    assert names(runner.select_notebooks(nbs, only=["02_b.ipynb"])) == ["02_b"]
    assert names(runner.select_notebooks(nbs, start="03")) == ["03_c", "03_d", "10_e"]
    assert names(runner.select_notebooks(nbs, start="03_d")) == ["03_d", "10_e"]
    assert names(runner.select_notebooks(nbs, start="05")) == ["10_e"]
    assert names(runner.select_notebooks(nbs, only=["01", "10"], start="02")) == ["10_e"]


def test_same_interpreter_tells_a_venv_from_its_base(tmp_path):
    base = tmp_path / "base" / "bin"
    venv = tmp_path / "venv" / "bin"
    base.mkdir(parents=True)
    venv.mkdir(parents=True)
    (base / "python3.11").write_text("")
    (venv / "python3").symlink_to(base / "python3.11")
    (venv / "python").symlink_to("python3")
    assert runner.same_interpreter(str(venv / "python"), str(venv / "python3"))
    assert not runner.same_interpreter(str(venv / "python"), str(base / "python3.11"))
    assert not runner.same_interpreter(None, str(venv / "python"))


def test_default_kernel_runs_this_interpreter(monkeypatch):
    monkeypatch.delenv("JUPYTER_PATH", raising=False)
    choice = runner.resolve_kernel()
    assert runner.same_interpreter(choice.executable, sys.executable)
    # python3 is used when it resolves to this interpreter (the venv's spec has argv "python")
    assert choice.name in ("python3", runner.THIS_INTERPRETER_KERNEL)


def test_cli_list_as_a_script(project):
    """The script runs on its own (``python papermill_runs/run.py``) and --list writes nothing."""
    proc = subprocess.run(
        [
            sys.executable,
            str(RUNNER_PATH),
            "--profile",
            "t",
            "--list",
            "--notebooks-dir",
            str(project.nbs),
            "--out-dir",
            str(project.out),
            "--params-dir",
            str(project.params),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=project.root,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("profiles in") and "other, t" in line for line in lines)
    listed = [line.split()[0] for line in lines if line.startswith("  ")]
    assert listed == ["01_a", "02_b", "10_c"]
    assert "would run (no previous run)" in proc.stdout
    assert not project.out.exists()


def test_profile_file_with_params_beside_it_and_set_overrides(project, capsys):
    """``--profile path/to/mine.yaml``: outputs named by the file's ``name``, notebook parameters from
    ``mine.params.yaml`` beside it; ``--set`` dotted settings reach every notebook as ``overrides`` (YAML-typed), are
    part of the parameters' hash (changing them reruns), and a typo stops the run before any notebook starts."""
    p = project
    import yaml

    from icm_helpers.config import load_profile

    cfg = load_profile("smoke")
    cfg["name"] = "mine"
    mine = p.root / "profiles" / "mine.yaml"
    mine.parent.mkdir()
    mine.write_text(yaml.safe_dump(cfg))
    (p.root / "profiles" / "mine.params.yaml").write_text("seed: 3\ndevice: cpu\n")

    def cli(*args):
        return runner.main(["--profile", str(mine), "--notebooks-dir", str(p.nbs), "--out-dir", str(p.out), *args])

    assert cli("--only", "01", "--set", "evaluation.max_images=4", "tasks.detection.lambdas=[0.4, 1.6]") == 0
    (record,) = p.log()
    assert record["profile"] == str(mine.resolve()) and record["seed"] == 3
    assert record["overrides"] == {"evaluation.max_images": 4, "tasks.detection.lambdas": [0.4, 1.6]}
    assert (p.out / "mine" / "01_a.ipynb").is_file() and not (p.out / "t").exists()
    assert cli("--only", "01", "--set", "evaluation.max_images=5") == 0  # other overrides: it reruns
    assert "params changed" in capsys.readouterr().out and p.log()[-1]["overrides"] == {"evaluation.max_images": 5}
    # without a params file beside it: the notebooks' own defaults (here: device '?'), profile = the file
    (p.root / "profiles" / "mine.params.yaml").unlink()
    assert cli("--only", "01", "--force") == 0
    assert p.log()[-1]["device"] == "?" and p.log()[-1]["overrides"] is None
    # a typo in --set and a file that is not there stop before anything runs (exit code 2)
    n = len(p.log())
    assert cli("--only", "01", "--set", "evaluation.max_imagez=4") == 2
    err = capsys.readouterr().err
    assert "max_imagez" in err and "did you mean 'max_images'" in err
    assert cli("--only", "01", "--set", "no_equals_sign") == 2
    assert (
        runner.main(["--profile", str(p.root / "nope.yaml"), "--notebooks-dir", str(p.nbs), "--out-dir", str(p.out)])
        == 2
    )
    assert "no such profile file" in capsys.readouterr().err
    assert len(p.log()) == n


def test_every_notebook_declares_exactly_the_parameters_it_uses():
    """Each notebook's parameters cell (its first code cell) declares only what the notebook reads, and every name
    the runner may inject that the notebook reads has a default there: papermill injects only what is given, so a
    notebook without ``overrides = None`` fails on a plain run, and a declared parameter nothing reads would suggest a
    knob that does nothing (the runner injects every parameter anyway; an undeclared one is an unused variable)."""
    import ast
    import json

    import yaml

    from icm_helpers.config import REPO_ROOT

    params_files = sorted((REPO_ROOT / "papermill_runs" / "params").glob("*.yaml"))
    injectable = {"profile", "task", "run_dir", "device", "seed", "overrides"}
    injectable |= {k for p in params_files for k in (yaml.safe_load(p.read_text()) or {})}
    for path in sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
        params = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(params) == 1 and params[0] is cells[0], f"{path.name}: one parameters cell, the first code cell"
        declared = {t.id for node in ast.walk(ast.parse("".join(params[0]["source"])))
                    if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)}
        read = set()
        for cell in cells[1:]:
            source = "".join(line for line in cell["source"] if not line.lstrip().startswith(("%", "!")))
            read |= {n.id for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Name)}
        assert declared <= read, f"{path.name}: {sorted(declared - read)} declared but never used"
        used = read & injectable
        assert used <= declared, f"{path.name}: {sorted(used - declared)} used but not in its parameters cell"


def test_selection_from_the_profiles_notebooks_list():
    """A profile's ``notebooks:`` list is the default selection; ``--only`` names any notebook; ``--from`` applies
    within the list; a list entry naming no notebook, or a ``--from`` beyond the list, is an error naming the fix."""
    nbs = [Path(f"{n}.ipynb") for n in ("01_a", "02_b", "03_c", "10_e")]
    names = lambda sel: [p.stem for p in sel]  # noqa: E731
    assert names(runner.select_notebooks(nbs, default=["01", "02_b"])) == ["01_a", "02_b"]
    assert names(runner.select_notebooks(nbs, only=["10"], default=["01", "02"])) == ["10_e"]
    assert names(runner.select_notebooks(nbs, start="02", default=["01", "02"])) == ["02_b"]
    with pytest.raises(runner.RunnerError, match="the profile runs only 01, 02; .* --only"):
        runner.select_notebooks(nbs, start="03", default=["01", "02"])
    with pytest.raises(runner.RunnerError, match="notebooks list: 07: no such notebook"):
        runner.select_notebooks(nbs, default=["01", "07"])


def _profile_file(p, notebooks) -> Path:
    import yaml

    from icm_helpers.config import load_profile

    cfg = {**load_profile("smoke"), "name": "listed", "notebooks": notebooks}
    path = p.root / "listed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_list_shows_the_profiles_notebooks_and_only_still_names_the_others(project, capsys):
    p = project
    path = _profile_file(p, ["01", 10])
    args = ["--profile", str(path), "--notebooks-dir", str(p.nbs), "--out-dir", str(p.out), "--list"]
    assert runner.main(args) == 0
    out = capsys.readouterr().out
    assert "profile listed runs 01, 10 (its notebooks: list)" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert "would run" in rows["01_a"] and "would run" in rows["10_c"]
    assert "not in the profile's notebooks (run it with --only)" in rows["02_b"]
    assert runner.main([*args, "--only", "02"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    assert "would run" in rows["02_b"] and "would run" not in rows["01_a"]
    _profile_file(p, "01-07")
    assert runner.main(args) == 2
    assert "'notebooks' must be a non-empty list" in capsys.readouterr().err
    assert not p.out.exists()


@pytest.mark.parametrize("profile, runs", [("paper", ["01", "02", "03", "04", "05", "06", "07"]), ("smoke", None)])
def test_packaged_profiles_list_their_notebooks(tmp_path, capsys, profile, runs):
    """``--profile paper`` runs the paper's notebooks 01-07 only (08-12 go beyond the paper: named with --only or
    their own make targets); smoke, without a list, runs every notebook (CI)."""
    from icm_helpers.config import REPO_ROOT

    every = sorted(p.stem for p in (REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert runner.main(["--profile", profile, "--out-dir", str(tmp_path / "out"), "--list"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    would_run = [name for name in every if "would run" in rows[name]]
    assert would_run == (every if runs is None else [n for n in every if n[:2] in runs])
    assert len(every) == 12 and not (tmp_path / "out").exists()


def test_notebooks_open_in_jupyterlab_as_committed():
    """The committed notebooks: kernel ``python3`` (what papermill, nbval and ``make lab``'s JupyterLab, whose
    kernels are .venv's, all start), a unique id on every cell (nbformat 4.5), no outputs, and the parameters cell
    defaulting to the demo profile (the runner injects the profile, so runs do not depend on it)."""
    from icm_helpers.config import REPO_ROOT

    for path in sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        nb = json.loads(path.read_text())
        assert nb["metadata"]["kernelspec"]["name"] == "python3", path.name
        ids = [c.get("id") for c in nb["cells"]]
        assert all(ids) and len(set(ids)) == len(ids), f"{path.name}: cell ids {ids}"
        assert (nb["nbformat"], nb["nbformat_minor"]) >= (4, 5), path.name
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert all(c["outputs"] == [] and c["execution_count"] is None for c in code), path.name
        params = next(c for c in code if "parameters" in c["metadata"].get("tags", []))
        assert "".join(params["source"]).startswith('profile = "demo" '), path.name
