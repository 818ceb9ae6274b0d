#!/usr/bin/env python3
"""The one batch runner of the notebook suite: executes ``notebooks/NN_*.ipynb`` with papermill.

Usage (from the repository root; ``make smoke`` / ``make demo`` call it)::

    .venv/bin/python papermill_runs/run.py --profile smoke [--force] [--only 03 05] [--from 04]
        [--param key=value ...] [--notebooks-dir notebooks] [--out-dir papermill_runs]
        [--params-dir papermill_runs/params] [--kernel NAME] [--timeout SECONDS] [--list]

* Parameters injected into every notebook: ``<params-dir>/<profile>.yaml`` (a flat YAML mapping)
  + ``profile: <profile>`` + the ``--param`` overrides (values parsed as YAML, never eval'ed).
* Notebooks ``<notebooks-dir>/[0-9][0-9]_*.ipynb`` run in numeric order, with the notebooks dir as
  working directory; executed copies go to ``<out-dir>/<profile>/<same name>.ipynb``.
* ``<out-dir>/<profile>/run_status.json`` records, per notebook, status / hashes / timings; a notebook
  that is complete with the same parameters and the same source (and whose executed copy exists) is
  skipped, so rerunning after a failure continues from the failed notebook.
* The first failure stops the run (exit code 1) naming the notebook, the failing cell and the cause;
  the executed copy with the error stays on disk.
* Nothing is written outside ``<out-dir>/<profile>/``.

Exit codes: 0 all selected notebooks complete (or skipped), 1 a notebook failed, 2 bad usage or
configuration (unknown profile, bad parameter, ...), 130 interrupted.

Importable: :func:`main` (argv list -> exit code) and the helpers below are used by
``tests/test_runner.py``.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import keyword
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

try:
    import nbformat
    import yaml
except ImportError as _exc:  # pragma: no cover - wrong interpreter
    sys.exit(
        f"error: {_exc.name} is not installed for {sys.executable}; run the runner with the project's "
        "virtualenv (.venv/bin/python papermill_runs/run.py ..., or `make smoke`)"
    )

REPO_ROOT = Path(__file__).resolve().parent.parent
try:
    from icm_helpers.io import atomic_write_text, read_json
except ImportError:  # runner started with an interpreter where the package is not installed
    sys.path.insert(0, str(REPO_ROOT))
    from icm_helpers.io import atomic_write_text, read_json

DEFAULT_NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
DEFAULT_OUT_DIR = REPO_ROOT / "papermill_runs"
DEFAULT_PARAMS_DIR = REPO_ROOT / "papermill_runs" / "params"

STATUS_FILE = "run_status.json"
LOCK_FILE = ".run.lock"
STATUS_VERSION = 1
NOTEBOOK_GLOB = "[0-9][0-9]_*.ipynb"
PROFILE_RE = re.compile(r"^[A-Za-z0-9_-]+$")
# papermill's tags for cells it adds to a notebook
INJECTED_TAG = "injected-parameters"
ERROR_MARKER_TAG = "papermill-error-cell-tag"
# name under which this interpreter's built-in kernel spec is used (see resolve_kernel)
THIS_INTERPRETER_KERNEL = "icm-aux-this-python"

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class RunnerError(Exception):
    """A usage / configuration problem: printed as ``error: ...`` and exit code 2."""


# ----------------------------------------------------------------------------------------------
# small utilities
# ----------------------------------------------------------------------------------------------
def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _say(*parts: Any) -> None:
    print(*parts, flush=True)


def _rel(path: Path) -> str:
    """``path`` relative to the current directory when it is below it (for messages)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _fmt_seconds(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{sec:02d}s" if hours else f"{minutes}m{sec:02d}s"


def _first_line(source: str, limit: int = 120) -> str:
    for line in (source or "").splitlines():
        if line.strip():
            line = line.rstrip()
            return line if len(line) <= limit else line[: limit - 3] + "..."
    return "<empty cell>"


# ----------------------------------------------------------------------------------------------
# profiles and parameters
# ----------------------------------------------------------------------------------------------
class _ParamLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-3`` as a float (plain YAML 1.1 reads it as a string)."""


_ParamLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml_value(text: str) -> Any:
    """Parse one ``--param`` value as YAML (safe loader): ``3`` -> int, ``1e-3`` -> float, ``[1, 2]``
    -> list, ``true`` -> bool, ``null`` or nothing -> None, anything else -> str."""
    return yaml.load(text, Loader=_ParamLoader)  # noqa: S506 -- a SafeLoader subclass


def validate_profile_name(profile: str) -> str:
    if not isinstance(profile, str) or not PROFILE_RE.match(profile):
        raise RunnerError(
            f"invalid profile name {profile!r}: use letters, digits, '_' and '-' only "
            "(the name becomes a file name and a directory under the out dir)"
        )
    return profile


def available_profiles(params_dir: Path) -> list[str]:
    if not Path(params_dir).is_dir():
        return []
    return sorted(
        p.stem for p in Path(params_dir).glob("*.yaml") if p.is_file() and PROFILE_RE.match(p.stem)
    )


def _check_param_key(key: Any, where: str) -> None:
    if not isinstance(key, str) or not key.isidentifier() or keyword.iskeyword(key):
        raise RunnerError(f"{where}: parameter name {key!r} is not a valid Python identifier")


def _check_param_value(value: Any, where: str) -> None:
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, list):
        for item in value:
            _check_param_value(item, where)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise RunnerError(f"{where}: mapping keys must be strings, got {k!r}")
            _check_param_value(v, where)
        return
    raise RunnerError(
        f"{where}: value {value!r} of type {type(value).__name__} is not a plain YAML scalar/list/"
        "mapping (quote it to pass it as a string)"
    )


def load_profile_params(profile: str, params_dir: Path) -> dict[str, Any]:
    """Contents of ``<params_dir>/<profile>.yaml`` (a flat mapping; an empty file is ``{}``)."""
    validate_profile_name(profile)
    params_dir = Path(params_dir)
    path = params_dir / f"{profile}.yaml"
    if not path.is_file():
        profiles = available_profiles(params_dir)
        listing = ", ".join(profiles) if profiles else "none"
        raise RunnerError(
            f"unknown profile {profile!r}: {_rel(path)} does not exist. "
            f"Available profiles (in {_rel(params_dir)}): {listing}"
        )
    return _read_params_file(path, profile)


def _read_params_file(path: Path, profile: str) -> dict[str, Any]:
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_ParamLoader)  # noqa: S506
    except yaml.YAMLError as exc:
        raise RunnerError(f"{_rel(path)}: not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RunnerError(f"{_rel(path)}: must be a YAML mapping of name: value, got {type(data).__name__}")
    for key, value in data.items():
        _check_param_key(key, _rel(path))
        _check_param_value(value, f"{_rel(path)}: {key}")
    if "profile" in data:
        raise RunnerError(
            f"{_rel(path)}: do not set 'profile' in a params file; the runner injects profile: {profile}"
        )
    return dict(data)


def parse_param_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["seed=1", "lr=1e-3"]`` -> ``{"seed": 1, "lr": 0.001}``."""
    out: dict[str, Any] = {}
    for item in items or ():
        if "=" not in item:
            raise RunnerError(f"--param {item!r}: expected key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        _check_param_key(key, f"--param {item!r}")
        if key == "profile":
            raise RunnerError("--param profile=...: choose the profile with --profile")
        try:
            value = parse_yaml_value(text)
        except yaml.YAMLError as exc:
            raise RunnerError(f"--param {item!r}: value is not valid YAML: {exc}") from exc
        _check_param_value(value, f"--param {item!r}")
        out[key] = value
    return out


def is_profile_file(profile: str) -> bool:
    """``--profile`` names a YAML file (``my.yaml``, ``path/to/study.yml``) rather than a packaged profile."""
    return str(profile).endswith((".yaml", ".yml"))


@dataclass
class ProfileChoice:
    """What ``--profile`` resolved to: the ``name`` (out-dir folder, figures/<name>/, runs/<name>/), the value the
    notebooks get as their ``profile`` parameter (a name, or the absolute path of a profile file) and the
    notebook parameter file (``None``: the notebooks' defaults)."""

    name: str
    notebook_value: str
    params_file: Optional[Path]


def resolve_profile(profile: str, params_dir: Path) -> ProfileChoice:
    """A packaged profile NAME (params from ``<params_dir>/<name>.yaml``) or a profile FILE: its ``name:`` key names
    the outputs, and the notebook parameters come from ``<stem>.params.yaml`` beside it when there (else the notebooks'
    defaults)."""
    if not is_profile_file(profile):
        validate_profile_name(profile)
        return ProfileChoice(profile, profile, Path(params_dir) / f"{profile}.yaml")
    path = Path(profile).expanduser().resolve()
    if not path.is_file():
        raise RunnerError(f"--profile {profile}: no such profile file ({path})")
    cfg = _load_profile_cfg(str(path), {})
    name = cfg.get("name")
    if not isinstance(name, str) or not PROFILE_RE.match(name):
        raise RunnerError(f"{_rel(path)}: its 'name' ({name!r}) must use letters, digits, '_' and '-' only "
                          "(it names runs/<name>/, figures/<name>/ and the executed notebooks' folder)")
    beside = path.with_name(f"{path.stem}.params.yaml")
    return ProfileChoice(name, str(path), beside if beside.is_file() else None)


def _load_profile_cfg(profile: str, overrides: dict[str, Any]) -> dict[str, Any]:
    from icm_helpers.config import load_profile

    try:
        return load_profile(profile, overrides)
    except (ValueError, KeyError) as exc:
        raise RunnerError(str(exc.args[0]) if exc.args else str(exc)) from None
    except yaml.YAMLError as exc:
        raise RunnerError(f"{profile}: not valid YAML: {exc}") from None


def parse_set_overrides(items: Sequence[str], profile: str) -> dict[str, Any]:
    """``--set tasks.detection.lambdas=[0.4]`` -> ``{"tasks.detection.lambdas": [0.4]}`` (values parsed as YAML),
    checked against ``profile`` now, so a typo stops the run before any notebook starts."""
    out: dict[str, Any] = {}
    for item in items or ():
        if "=" not in item:
            raise RunnerError(f"--set {item!r}: expected key=value with a dotted profile key, e.g. evaluation.max_images=4")
        key, text = (part.strip() for part in item.split("=", 1))
        try:
            out[key] = parse_yaml_value(text)
        except yaml.YAMLError as exc:
            raise RunnerError(f"--set {item!r}: value is not valid YAML: {exc}") from exc
        _check_param_value(out[key], f"--set {item!r}")
    if out:
        try:
            _load_profile_cfg(profile, out)
        except RunnerError as exc:
            raise RunnerError(f"--set: {exc}") from None
    return out


def build_params(profile: str, params_dir: Path, overrides: Sequence[str] = (), sets: Sequence[str] = ()) -> dict[str, Any]:
    """The parameters injected into every notebook: the profile's params file (or none) + ``profile`` + the
    ``--param`` overrides + ``overrides`` (the ``--set`` dotted profile settings, only when given)."""
    choice = resolve_profile(profile, params_dir)
    if not is_profile_file(profile):
        params = load_profile_params(choice.name, params_dir)
    else:
        params = _read_params_file(choice.params_file, choice.name) if choice.params_file is not None else {}
    params["profile"] = choice.notebook_value
    params.update(parse_param_overrides(overrides))
    profile_overrides = parse_set_overrides(sets, choice.notebook_value)
    if profile_overrides:
        params["overrides"] = profile_overrides
    return params


def params_sha256(params: dict[str, Any]) -> str:
    text = json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True)
    return _sha256_text(text)


def source_sha256(notebook: Path) -> str:
    """Hash of the notebook's cells' (type, source) only: outputs, execution counts and metadata
    do not count, so opening/saving or executing a notebook in Jupyter does not make it 'changed'."""
    nb = nbformat.read(str(notebook), as_version=4)
    payload = [[cell.get("cell_type", ""), cell.get("source", "")] for cell in nb.cells]
    return _sha256_text(json.dumps(payload, ensure_ascii=False, separators=(",", ":")))


# ----------------------------------------------------------------------------------------------
# notebooks and selection
# ----------------------------------------------------------------------------------------------
def discover_notebooks(notebooks_dir: Path) -> list[Path]:
    """``<dir>/[0-9][0-9]_*.ipynb`` sorted by their number (then name)."""
    notebooks_dir = Path(notebooks_dir)
    if not notebooks_dir.is_dir():
        raise RunnerError(f"notebooks dir {_rel(notebooks_dir)} does not exist")
    found = [p for p in notebooks_dir.glob(NOTEBOOK_GLOB) if p.is_file()]
    return sorted(found, key=lambda p: (int(p.name[:2]), p.name))


def _matches(token: str, nb: Path) -> bool:
    token = token.strip()
    if token.endswith(".ipynb"):
        token = token[: -len(".ipynb")]
    if token.isdigit():
        return int(token) == int(nb.name[:2])
    return token == nb.stem


def select_notebooks(
    notebooks: list[Path], only: Optional[Sequence[str]] = None, start: Optional[str] = None
) -> list[Path]:
    """Apply ``--only`` (numbers like ``03`` or full names) and ``--from`` (same forms) to the list."""
    names = ", ".join(p.stem for p in notebooks) or "none"
    selected = list(notebooks)
    if only:
        wanted = []
        for token in only:
            hits = [p for p in notebooks if _matches(token, p)]
            if not hits:
                raise RunnerError(f"--only {token}: no such notebook (available: {names})")
            wanted.extend(h for h in hits if h not in wanted)
        selected = [p for p in selected if p in wanted]
    if start:
        hits = [p for p in notebooks if _matches(start, p)]
        if hits:
            first = notebooks.index(hits[0])
            selected = [p for p in selected if notebooks.index(p) >= first]
        elif start.strip().isdigit():
            selected = [p for p in selected if int(p.name[:2]) >= int(start)]
        else:
            raise RunnerError(f"--from {start}: no such notebook (available: {names})")
    return selected


# ----------------------------------------------------------------------------------------------
# status file
# ----------------------------------------------------------------------------------------------
def load_status(profile_dir: Path) -> dict[str, Any]:
    path = Path(profile_dir) / STATUS_FILE
    if not path.exists():
        return {"version": STATUS_VERSION, "notebooks": {}}
    try:
        data = read_json(path)
    except (OSError, ValueError) as exc:
        _say(f"warning: cannot read {_rel(path)} ({exc}); treating every notebook as not run")
        return {"version": STATUS_VERSION, "notebooks": {}}
    if not isinstance(data, dict) or not isinstance(data.get("notebooks"), dict):
        return {"version": STATUS_VERSION, "notebooks": {}}
    return data


def save_status(profile_dir: Path, status: dict[str, Any]) -> None:
    status["version"] = STATUS_VERSION
    status["updated_at"] = _now()
    text = json.dumps(status, indent=2, ensure_ascii=False, allow_nan=True) + "\n"
    atomic_write_text(Path(profile_dir) / STATUS_FILE, text)


def _describe_param_changes(old: Any, new: dict[str, Any], limit: int = 4) -> str:
    if not isinstance(old, dict):
        return ""
    changes = []
    for key in sorted(set(old) | set(new)):
        if key not in old:
            changes.append(f"+{key}={new[key]!r}")
        elif key not in new:
            changes.append(f"-{key}")
        elif old[key] != new[key]:
            changes.append(f"{key}: {old[key]!r} -> {new[key]!r}")
    if len(changes) > limit:
        changes = changes[:limit] + [f"... {len(changes) - limit} more"]
    return ", ".join(changes)


@dataclass
class Decision:
    run: bool
    reason: str  # why it runs, or why it is skipped


def decide(
    entry: Optional[dict[str, Any]],
    params: dict[str, Any],
    p_hash: str,
    s_hash: str,
    executed_copy: Path,
    force: bool,
) -> Decision:
    """Skip a notebook iff it is complete with the same params and source and its copy exists."""
    if not entry:
        return Decision(True, "no previous run")
    state = entry.get("status")
    if force:
        return Decision(True, f"--force; was {state}")
    if state == "failed":
        err = entry.get("error") or {}
        return Decision(True, f"failed last time: {err.get('summary') or 'see the status file'}")
    if state == "running":
        return Decision(True, "the previous run did not finish (interrupted?)")
    if state != "complete":
        return Decision(True, f"previous status {state!r}")
    reasons = []
    if entry.get("params_sha256") != p_hash:
        detail = _describe_param_changes(entry.get("params"), params)
        reasons.append("params changed since the last complete run" + (f" ({detail})" if detail else ""))
    if entry.get("source_sha256") != s_hash:
        reasons.append("notebook source changed since the last complete run")
    if not executed_copy.is_file():
        reasons.append(f"executed copy {_rel(executed_copy)} is missing")
    if reasons:
        return Decision(True, "; ".join(reasons))
    return Decision(False, "complete; --force to redo")


# ----------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------
@dataclass
class KernelChoice:
    name: str
    executable: Optional[str]
    note: str
    manager_class: Any = None  # a kernel manager class for nbclient, when the name is not on disk

    def engine_kwargs(self) -> dict[str, Any]:
        return {"kernel_manager_class": self.manager_class} if self.manager_class else {}


def _effective_executable(argv: Sequence[str]) -> Optional[str]:
    """The interpreter a kernelspec's argv starts. jupyter_client replaces a bare ``python``,
    ``python3`` or ``python3.X`` (of the running version) with ``sys.executable`` of the process
    that launches the kernel, i.e. this runner."""
    if not argv:
        return None
    cmd = argv[0]
    bare = {"python", f"python{sys.version_info[0]}", "python%d.%d" % sys.version_info[:2]}
    if cmd in bare:
        return sys.executable
    if os.path.isabs(cmd):
        return cmd
    return shutil.which(cmd)


def same_interpreter(a: Optional[str], b: Optional[str]) -> bool:
    """True when ``a`` and ``b`` start the same Python *environment*. A venv's ``bin/python`` is a
    symlink to the base interpreter, so comparing resolved paths alone would confuse the venv with
    the base install: the (unresolved) directories must match too."""
    if not a or not b:
        return False
    a, b = os.path.abspath(a), os.path.abspath(b)
    if a == b:
        return True
    return os.path.dirname(a) == os.path.dirname(b) and os.path.realpath(a) == os.path.realpath(b)


def _this_interpreter_manager_class() -> Any:
    """An ``AsyncKernelManager`` (nbclient's default class) whose kernel spec is built in memory and
    starts ``sys.executable -m ipykernel_launcher``: nothing is installed or written anywhere."""
    from jupyter_client.kernelspec import KernelSpec
    from jupyter_client.manager import AsyncKernelManager

    class ThisInterpreterKernelManager(AsyncKernelManager):
        @property
        def kernel_spec(self):  # type: ignore[override]
            if self._kernel_spec is None:
                self._kernel_spec = KernelSpec(
                    argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                    display_name=f"Python ({sys.prefix})",
                    language="python",
                    resource_dir="",
                )
            return self._kernel_spec

    return ThisInterpreterKernelManager


def resolve_kernel(requested: Optional[str] = None) -> KernelChoice:
    """Which kernel executes the notebooks.

    * ``--kernel NAME`` (anything but ``auto``): that installed kernelspec, as is.
    * default (``auto``): papermill's usual ``python3`` when that kernelspec starts THIS interpreter
      (the venv's ``share/jupyter/kernels/python3`` has argv ``python``, which jupyter_client
      replaces with ``sys.executable``); otherwise (e.g. a ``~/.local/share/jupyter/kernels/python3``
      installed from another environment shadows it) a built-in in-memory spec for
      ``sys.executable``. Either way the kernel runs the interpreter that runs this script.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    ksm = KernelSpecManager()
    if requested and requested != "auto":
        try:
            spec = ksm.get_kernel_spec(requested)
        except NoSuchKernel:
            names = ", ".join(sorted(ksm.find_kernel_specs())) or "none"
            raise RunnerError(
                f"--kernel {requested}: no such Jupyter kernel (installed: {names}); "
                "leave --kernel out to use the interpreter running this script"
            ) from None
        exe = _effective_executable(spec.argv)
        same = same_interpreter(exe, sys.executable)
        return KernelChoice(requested, exe, "as requested" + ("" if same else " (NOT this interpreter)"))
    try:
        spec = ksm.get_kernel_spec("python3")
        exe = _effective_executable(spec.argv)
        if same_interpreter(exe, sys.executable):
            return KernelChoice("python3", exe, "the python3 kernelspec starts this interpreter")
        why = f"the python3 kernelspec starts {exe or spec.argv[0]!s}, not this interpreter"
    except NoSuchKernel:
        why = "no python3 kernelspec is installed"
    return KernelChoice(
        THIS_INTERPRETER_KERNEL,
        sys.executable,
        f"{why}; using a built-in kernel spec for {sys.executable}",
        _this_interpreter_manager_class(),
    )


# ----------------------------------------------------------------------------------------------
# logging of papermill's progress / cell outputs
# ----------------------------------------------------------------------------------------------
class _PrefixedStdoutHandler(logging.Handler):
    """Writes papermill's log records to the *current* ``sys.stdout``, each line prefixed."""

    prefix = "  | "

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record).rstrip("\n")
            lines = msg.splitlines() or [""]
            sys.stdout.write("".join(f"{self.prefix}{line}\n" for line in lines))
            sys.stdout.flush()
        except Exception:  # pragma: no cover
            self.handleError(record)


_LOG_HANDLER = _PrefixedStdoutHandler()
_LOG_HANDLER.setFormatter(logging.Formatter("%(message)s"))
# "Executing Cell N---" is kept as progress; its "Ending Cell N---" twin is noise
_LOG_HANDLER.addFilter(lambda record: not str(record.msg).startswith("Ending Cell"))


def _setup_logging() -> None:
    logger = logging.getLogger("papermill")
    if _LOG_HANDLER not in logger.handlers:
        logger.addHandler(_LOG_HANDLER)
    logger.setLevel(logging.INFO)
    logger.propagate = False


# ----------------------------------------------------------------------------------------------
# failures
# ----------------------------------------------------------------------------------------------
def _source_index(cells: list, executed_index: int) -> int:
    """Index in the source notebook of the executed copy's cell ``executed_index`` (papermill adds an
    injected-parameters cell and, after an error, two marker cells)."""
    skipped = 0
    for cell in cells[:executed_index]:
        tags = cell.get("metadata", {}).get("tags", [])
        if INJECTED_TAG in tags or ERROR_MARKER_TAG in tags:
            skipped += 1
    return executed_index - skipped


def describe_failure(exc: BaseException, executed_copy: Optional[Path]) -> dict[str, Any]:
    """Locate the failing cell (by execution count in the executed copy) and summarise the cause."""
    exec_count = getattr(exc, "exec_count", None)
    ename = getattr(exc, "ename", None) or type(exc).__name__
    evalue = getattr(exc, "evalue", None)
    if evalue is None:
        evalue = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    info: dict[str, Any] = {
        "ename": ename,
        "evalue": evalue,
        "execution_count": exec_count,
        "cell_index": None,
        "cell_first_line": None,
    }
    cells: list = []
    if executed_copy is not None and executed_copy.is_file():
        try:
            cells = list(nbformat.read(str(executed_copy), as_version=4).cells)
        except Exception:  # an unreadable copy: fall back on the exception's own data
            cells = []
    found = None
    if exec_count is not None:
        for i, cell in enumerate(cells):
            if cell.get("cell_type") == "code" and cell.get("execution_count") == exec_count:
                found = i
                break
    if found is None:  # e.g. a cell timeout: its error output; papermill's exception flag
        for i, cell in enumerate(cells):
            pm = cell.get("metadata", {}).get("papermill", {})
            errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
            if errors or pm.get("exception") is True:
                found = i
                break
    if found is None:  # e.g. the kernel died: the last cell that started executing
        for i, cell in enumerate(cells):
            if cell.get("metadata", {}).get("papermill", {}).get("start_time"):
                found = i
    if found is not None:
        cell = cells[found]
        tags = cell.get("metadata", {}).get("tags", [])
        info["cell_index"] = _source_index(cells, found)
        info["cell_first_line"] = _first_line(cell.get("source", ""))
        if INJECTED_TAG in tags:
            info["cell_index"] = None
            info["cell_first_line"] = "<the injected-parameters cell>"
        if exec_count is None:
            info["execution_count"] = cell.get("execution_count")
    elif getattr(exc, "source", None) is not None:
        info["cell_first_line"] = _first_line(exc.source)
    info["summary"] = f"{ename}: {evalue}" if evalue else ename
    if info["cell_first_line"] is not None:
        where = f"cell {info['cell_index']}" if info["cell_index"] is not None else "cell"
        info["summary"] += f" (in {where}: {info['cell_first_line']})"
    return info


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------
@dataclass
class Options:
    profile: str
    notebooks_dir: Path = DEFAULT_NOTEBOOKS_DIR
    out_dir: Path = DEFAULT_OUT_DIR
    params_dir: Path = DEFAULT_PARAMS_DIR
    params: Sequence[str] = ()
    sets: Sequence[str] = ()
    only: Optional[Sequence[str]] = None
    start: Optional[str] = None
    force: bool = False
    kernel: Optional[str] = None
    timeout: Optional[float] = None
    start_timeout: float = 120
    list_only: bool = False


@dataclass
class Row:
    name: str
    status: str = "not run"
    seconds: Optional[float] = None
    note: str = ""


@dataclass
class _Plan:
    notebook: Path
    executed_copy: Path
    p_hash: str
    s_hash: str
    decision: Decision


def profile_dir_for(out_dir: Path, profile: str) -> Path:
    validate_profile_name(profile)
    out_dir = Path(out_dir).resolve()
    profile_dir = (out_dir / profile).resolve()
    if profile_dir.parent != out_dir:  # belt and braces: the name check already forbids this
        raise RunnerError(f"profile {profile!r} would escape the out dir {out_dir}")
    return profile_dir


@contextlib.contextmanager
def _profile_lock(profile_dir: Path) -> Iterator[None]:
    """One runner per profile at a time (an flock, released by the OS if the process dies)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(profile_dir / LOCK_FILE, "a") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RunnerError(
                f"another runner is working on profile {profile_dir.name!r} "
                f"({_rel(profile_dir / LOCK_FILE)} is locked)"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _print_summary(rows: list[Row], profile: str, status_path: Path) -> None:
    width = max([len(r.name) for r in rows] + [8])
    _say(f"\nsummary: profile {profile} ({_rel(status_path)})")
    _say(f"  {'notebook':<{width}}  {'status':<9} {'time':>9}  note")
    for r in rows:
        _say(f"  {r.name:<{width}}  {r.status:<9} {_fmt_seconds(r.seconds):>9}  {r.note}".rstrip())
    total = sum(r.seconds or 0.0 for r in rows if r.status in ("complete", "FAILED", "interrupted"))
    _say(f"  executed time: {_fmt_seconds(total)}")


def _finalise_copy(partial: Path, final: Path) -> bool:
    """Move papermill's output into place; True if a (new) executed copy exists."""
    if partial.is_file():
        os.replace(partial, final)
        return True
    # nothing was executed (e.g. the kernel did not start): do not leave an older copy around that
    # could be mistaken for the output of this failed run
    if final.exists():
        final.unlink()
    return False


def run(opts: Options) -> int:
    params = build_params(opts.profile, Path(opts.params_dir), opts.params, opts.sets)
    profile = resolve_profile(opts.profile, Path(opts.params_dir)).name
    p_hash = params_sha256(params)
    notebooks_dir = Path(opts.notebooks_dir).resolve()
    notebooks = discover_notebooks(notebooks_dir)
    if not notebooks:
        raise RunnerError(f"no notebooks matching {NOTEBOOK_GLOB} in {_rel(notebooks_dir)}")
    selected = select_notebooks(notebooks, opts.only, opts.start)
    profile_dir = profile_dir_for(Path(opts.out_dir), profile)
    status_path = profile_dir / STATUS_FILE

    _say(f"profile {profile}: {json.dumps(params, ensure_ascii=False)} (params sha256 {p_hash[:12]})")

    def make_plans(status: dict[str, Any]) -> list[_Plan]:
        plans = []
        for nb in selected:
            executed_copy = profile_dir / nb.name
            s_hash = source_sha256(nb)
            entry = status["notebooks"].get(nb.stem)
            decision = decide(entry, params, p_hash, s_hash, executed_copy, opts.force)
            plans.append(_Plan(nb, executed_copy, p_hash, s_hash, decision))
        return plans

    if opts.list_only:  # reads only; writes nothing
        status = load_status(profile_dir)
        plans = make_plans(status)
        profiles = available_profiles(Path(opts.params_dir))
        _say(f"profiles in {_rel(Path(opts.params_dir))}: {', '.join(profiles) or 'none'}")
        _say(f"notebooks in {_rel(notebooks_dir)} (executed copies in {_rel(profile_dir)}):")
        width = max(len(p.stem) for p in notebooks)
        for nb in notebooks:
            entry = status["notebooks"].get(nb.stem) or {}
            plan = next((p for p in plans if p.notebook == nb), None)
            if plan is None:
                what = "not selected"
            elif plan.decision.run:
                what = f"would run ({plan.decision.reason})"
            else:
                what = "would skip (complete)"
            _say(f"  {nb.stem:<{width}}  {entry.get('status', '-'):<9} {what}")
        return EXIT_OK

    kernel = resolve_kernel(opts.kernel)
    _say(f"kernel: {kernel.name} -> {kernel.executable} ({kernel.note})")
    if not same_interpreter(kernel.executable, sys.executable):
        _say(f"warning: the kernel does not run {sys.executable}, the interpreter of this runner")

    import papermill as pm  # imported late: --list and the usage errors stay fast

    profile_dir.mkdir(parents=True, exist_ok=True)
    # the kernels inherit this: progress bars as plain lines every 30 s in this log (icm_helpers.progress)
    os.environ.setdefault("ICM_PROGRESS", "log")
    exit_code = EXIT_OK
    with _profile_lock(profile_dir):
        status = load_status(profile_dir)
        plans = make_plans(status)
        rows = [Row(p.notebook.stem) for p in plans]
        for plan, row in zip(plans, rows):
            nb, name = plan.notebook, plan.notebook.stem
            if not plan.decision.run:
                _say(f"skip {name} ({plan.decision.reason})")
                row.status, row.note = "skipped", "complete, unchanged"
                continue
            prev = status["notebooks"].get(name)
            verb = "rerun" if prev else "run"
            _say(f"\n{verb} {name} ({plan.decision.reason})")
            entry = {
                "status": "running",
                "notebook": nb.name,
                "executed_copy": nb.name,
                "params_sha256": plan.p_hash,
                "source_sha256": plan.s_hash,
                "params": params,
                "kernel": kernel.name,
                "started_at": _now(),
                "finished_at": None,
                "seconds": None,
            }
            status["notebooks"][name] = entry
            save_status(profile_dir, status)
            partial = profile_dir / f".{nb.stem}.partial.ipynb"
            if partial.exists():
                partial.unlink()
            t0 = time.monotonic()
            failure: Optional[BaseException] = None
            interrupted = False
            try:
                pm.execute_notebook(
                    str(nb),
                    str(partial),
                    parameters=params,
                    kernel_name=kernel.name,
                    language="python",
                    cwd=str(notebooks_dir),
                    log_output=True,
                    progress_bar=False,
                    execution_timeout=opts.timeout,
                    start_timeout=opts.start_timeout,
                    **kernel.engine_kwargs(),
                )
            except KeyboardInterrupt as exc:
                failure, interrupted = exc, True
            except Exception as exc:  # noqa: BLE001 -- any failure of a notebook stops the run
                failure = exc
            seconds = round(time.monotonic() - t0, 2)
            entry.update(finished_at=_now(), seconds=seconds)
            row.seconds = seconds
            have_copy = _finalise_copy(partial, plan.executed_copy)
            if failure is None:
                entry["status"] = "complete"
                status["notebooks"][name] = entry
                save_status(profile_dir, status)
                row.status = "complete"
                _say(f"done {name} in {_fmt_seconds(seconds)}")
                continue

            info = describe_failure(failure, plan.executed_copy if have_copy else None)
            if interrupted:
                info["summary"] = "interrupted (KeyboardInterrupt)"
            entry["status"] = "failed"
            entry["error"] = info
            save_status(profile_dir, status)
            row.status = "interrupted" if interrupted else "FAILED"
            row.note = info["summary"]
            _say(f"{'INTERRUPTED' if interrupted else 'FAILED'} {name} after {_fmt_seconds(seconds)}")
            _report_failure(nb, plan.executed_copy if have_copy else None, info, interrupted)
            exit_code = EXIT_INTERRUPTED if interrupted else EXIT_FAILED
            break
    _print_summary(rows, profile, status_path)
    return exit_code


def _report_failure(nb: Path, executed_copy: Optional[Path], info: dict[str, Any], interrupted: bool) -> None:
    lines = [f"\nerror: notebook {nb.stem} {'was interrupted' if interrupted else 'failed'} ({_rel(nb)})"]
    if info.get("cell_first_line") is not None:
        where = []
        if info.get("cell_index") is not None:
            where.append(f"cell {info['cell_index']} (0-based, in {nb.name})")
        if info.get("execution_count") is not None:
            where.append(f"In [{info['execution_count']}] in the executed copy")
        lines.append(f"  failing cell: {', '.join(where) or 'unknown index'}")
        lines.append(f"      {info['cell_first_line']}")
    if not interrupted:
        lines.append(f"  cause: {info['ename']}: {info['evalue']}" if info.get("evalue") else f"  cause: {info['ename']}")
    if executed_copy is not None:
        lines.append(f"  executed copy with the error: {_rel(executed_copy)}")
    else:
        lines.append("  no executed copy was written (the notebook did not start executing)")
    lines.append(f"  rerun the same command to continue: completed notebooks are skipped, {nb.stem} reruns.")
    print("\n".join(lines), file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="papermill_runs/run.py",
        description="Execute the NN_*.ipynb notebooks in order with papermill for one parameter profile; "
        "complete, unchanged notebooks are skipped; the first failure stops the run.",
    )
    parser.add_argument("--profile", required=True,
                        help="a profile name (params: <params-dir>/<name>.yaml) or a profile YAML file (params: <stem>.params.yaml "
                             "beside it, else the notebooks' defaults)")
    parser.add_argument("--force", action="store_true", help="rerun the selected notebooks even if complete")
    parser.add_argument("--only", nargs="+", metavar="NB", help="only these notebooks (numbers like 03, or names)")
    parser.add_argument("--from", dest="start", metavar="NB", help="start at this notebook (number or name)")
    parser.add_argument(
        "--param", action="append", default=[], nargs="+", metavar="KEY=VALUE",
        help="override/add a parameter; the value is parsed as YAML (repeatable)",
    )
    parser.add_argument(
        "--set", dest="sets", action="append", default=[], nargs="+", metavar="KEY=VALUE",
        help="dotted profile setting for every notebook's Experiment, e.g. evaluation.max_images=4 (value parsed as YAML; "
             "repeatable)",
    )
    parser.add_argument("--notebooks-dir", type=Path, default=DEFAULT_NOTEBOOKS_DIR, help="default: <repo>/notebooks")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="default: <repo>/papermill_runs")
    parser.add_argument("--params-dir", type=Path, default=DEFAULT_PARAMS_DIR, help="default: <repo>/papermill_runs/params")
    parser.add_argument(
        "--kernel", default="auto",
        help="Jupyter kernel name; default 'auto' = a kernel running the interpreter that runs this script",
    )
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="per-cell execution timeout (default: none)")
    parser.add_argument("--list", dest="list_only", action="store_true", help="show profiles, notebooks and what would run; run nothing")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    opts = Options(
        profile=args.profile,
        notebooks_dir=args.notebooks_dir,
        out_dir=args.out_dir,
        params_dir=args.params_dir,
        params=[item for group in args.param for item in group],
        sets=[item for group in args.sets for item in group],
        only=args.only,
        start=args.start,
        force=args.force,
        kernel=args.kernel,
        timeout=args.timeout,
        list_only=args.list_only,
    )
    _setup_logging()
    try:
        return run(opts)
    except RunnerError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
