"""What a run will do, before anything is executed: the options, the parameters, the notebooks and, per notebook,
whether it runs; ``--list`` shows that plan and writes nothing."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from .common import DEFAULT_NOTEBOOKS_DIR, DEFAULT_OUT_DIR, DEFAULT_PARAMS_DIR, RunnerError, rel, say
from .notebooks import NOTEBOOK_GLOB, discover_notebooks, profile_notebooks, select_notebooks, source_sha256
from .params import params_for, params_profiles, params_sha256, profile_definition, resolve_profile
from .status import Decision, decide, load_status, profile_dir_for


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
    check: bool = False


@dataclass
class RunSetup:
    """The run's profile and notebooks: ``params`` injected into every notebook (sha256 ``p_hash``), the profile
    ``name`` (its folder ``profile_dir`` under the out dir), every notebook, the ``selected`` ones and the profile's
    own list (``in_profile``; None: every notebook)."""

    params: dict[str, Any]
    p_hash: str
    profile: str
    profile_dir: Path
    notebooks_dir: Path
    notebooks: list[Path]
    selected: list[Path]
    in_profile: Optional[list[Path]] = None


@dataclass
class NotebookPlan:
    notebook: Path
    executed_copy: Path
    s_hash: str
    decision: Decision


def prepare(opts: Options) -> RunSetup:
    """Resolve the profile and its parameters, find and select the notebooks; usage errors raise RunnerError."""
    params_dir = Path(opts.params_dir)
    choice = resolve_profile(opts.profile, params_dir)
    params = params_for(choice, params_dir, opts.params, opts.sets)
    notebooks_dir = Path(opts.notebooks_dir).resolve()
    notebooks = discover_notebooks(notebooks_dir)
    if not notebooks:
        raise RunnerError(f"no notebooks matching {NOTEBOOK_GLOB} in {rel(notebooks_dir)}")
    default = profile_notebooks(profile_definition(choice))
    selected = select_notebooks(notebooks, opts.only, opts.start, default)
    return RunSetup(
        params=params,
        p_hash=params_sha256(params),
        profile=choice.name,
        profile_dir=profile_dir_for(Path(opts.out_dir), choice.name),
        notebooks_dir=notebooks_dir,
        notebooks=notebooks,
        selected=selected,
        in_profile=None if default is None else select_notebooks(notebooks, default=default),
    )


def plan_notebooks(setup: RunSetup, status: dict[str, Any], force: bool) -> list[NotebookPlan]:
    """For each selected notebook: its executed copy, its source hash and whether it runs (see ``decide``)."""
    plans = []
    for nb in setup.selected:
        executed_copy = setup.profile_dir / nb.name
        s_hash = source_sha256(nb)
        entry = status["notebooks"].get(nb.stem)
        decision = decide(entry, setup.params, setup.p_hash, s_hash, executed_copy, force)
        plans.append(NotebookPlan(nb, executed_copy, s_hash, decision))
    return plans


def show_plan(setup: RunSetup, params_dir: Path, force: bool) -> None:
    """``--list``: the profiles with a params file, then every notebook with its status and what would happen."""
    status = load_status(setup.profile_dir)
    plans = {plan.notebook: plan for plan in plan_notebooks(setup, status, force)}
    say(f"profiles in {rel(params_dir)}: {', '.join(params_profiles(params_dir)) or 'none'}")
    if setup.in_profile is not None:
        say(f"profile {setup.profile} runs {', '.join(p.stem[:2] for p in setup.in_profile)} (its notebooks: list); "
            "the others run only when named with --only")
    say(f"notebooks in {rel(setup.notebooks_dir)} (executed copies in {rel(setup.profile_dir)}):")
    width = max(len(p.stem) for p in setup.notebooks)
    for nb in setup.notebooks:
        entry = status["notebooks"].get(nb.stem) or {}
        plan = plans.get(nb)
        if plan is None and setup.in_profile is not None and nb not in setup.in_profile:
            what = "not in the profile's notebooks (run it with --only)"
        elif plan is None:
            what = "not selected"
        elif plan.decision.run:
            what = f"would run ({plan.decision.reason})"
        else:
            what = "would skip (complete)"
        say(f"  {nb.stem:<{width}}  {entry.get('status', '-'):<9} {what}")
