"""What the two protocol selections share (``select_settings.py``: protocol v1, ``select_settings_v2.py``: protocol v2):
the context every stage is given, the table of stages that dispatches them by name, the tasks of a profile and the
paper's settings as ``icm_helpers/profiles/paper.yaml`` holds them.

A selection's budget is TIME: ``--budget-factor`` x the smoke run's seconds (``StageContext.time_budget_seconds``),
not the fraction of training steps that a profile's ``budget_fractions`` / ``Experiment.budget_steps`` mean."""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from icm_helpers.config import load_profile
from icm_helpers.io import atomic_write_json


def profile_tasks(profile: str) -> list[str]:
    """The tasks of ``profile``, in the order it lists them (``Experiment.tasks()``)."""
    return list(load_profile(profile)["tasks"])


def paper_task_settings(task: str) -> dict[str, Any]:
    """The paper's settings of ``task`` (Sec. 4.1 / 4.2), read from the paper profile: ``lr`` (the Adam rate of its
    ICM training), ``lambdas`` (its R-D sweep) and ``ablation_lambda`` (its branch-position ablation)."""
    tc = load_profile("paper")["tasks"][task]
    return {"lr": tc["train"]["lr"], "lambdas": list(tc["lambdas"]), "ablation_lambda": tc["ablation_lambda"]}


@dataclass
class StageContext:
    """What every stage gets: the profile's name, the command line (``args``), the outcome logged so far (a dict,
    written to ``outcome_path`` by ``save``), the tasks it selects for (from the profile), the time budget
    (``budget_factor`` x ``smoke_seconds``) and a log function."""
    profile: str
    args: argparse.Namespace
    outcome: dict[str, Any]
    outcome_path: Path
    tasks: list[str]
    budget_factor: float
    smoke_seconds: float
    log: Callable[..., None] = print

    @property
    def time_budget_seconds(self) -> float:
        """Wall seconds the profile's run may take: ``budget_factor`` x the smoke run's seconds."""
        return self.budget_factor * self.smoke_seconds

    def save(self) -> None:
        atomic_write_json(self.outcome_path, self.outcome)


Stage = Callable[[StageContext], Any]


class StageTable:
    """Stages by name, in the order they were registered (the order ``--stage all`` runs them)."""

    def __init__(self) -> None:
        self._stages: dict[str, Stage] = {}

    def register(self, name: str) -> Callable[[Stage], Stage]:
        """Decorator: the function becomes the stage ``name``; a name registered twice is refused."""

        def add(fn: Stage) -> Stage:
            if name in self._stages:
                raise ValueError(f"stage {name!r} is registered twice ({self._stages[name].__name__}, {fn.__name__})")
            self._stages[name] = fn
            return fn

        return add

    def names(self) -> tuple[str, ...]:
        return tuple(self._stages)

    def run(self, name: str, ctx: StageContext) -> Any:
        """Run the stage ``name`` on ``ctx``; an unknown name is refused with the valid ones listed."""
        if name not in self._stages:
            raise ValueError(f"unknown stage {name!r}; valid stages: {', '.join(self._stages)}")
        return self._stages[name](ctx)

    def run_logged(self, which: str, ctx: StageContext, redo: bool = False,
                   hidden: tuple[str, ...] = ()) -> None:
        """Run ``which`` (a stage name, or "all": every stage in order), each unless logged already (``redo``: again),
        logging its result with its seconds in the outcome and saving it after each stage; ``hidden``: result keys
        left out of the printed line."""
        for stage in self.names() if which == "all" else (which,):
            if stage in ctx.outcome["stages"] and not redo:
                print(f"{stage}: logged already")
                continue
            t0 = time.time()
            result = self.run(stage, ctx)
            ctx.outcome["stages"][stage] = {**result, "seconds": round(time.time() - t0, 1)}
            ctx.save()
            shown = {k: v for k, v in result.items() if k not in hidden}
            print(f"{stage}: {json.dumps(shown)[:600]}", flush=True)
