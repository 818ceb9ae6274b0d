"""Executing the planned notebooks with papermill, in order, under the profile's lock: each one's status entry,
its executed copy, and the first failure stopping the run; then the summary table."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import papermill as pm

from .common import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, fmt_seconds, now, rel, say
from .failures import describe_failure, report_failure
from .kernel import KernelChoice
from .plan import NotebookPlan, Options, RunSetup, plan_notebooks
from .status import STATUS_FILE, load_status, profile_lock, save_status


@dataclass
class Row:
    """One notebook's line in the summary table."""

    name: str
    status: str = "not run"
    seconds: Optional[float] = None
    note: str = ""


def finalise_copy(partial: Path, final: Path) -> bool:
    """Move papermill's output into place; True if a (new) executed copy exists."""
    if partial.is_file():
        os.replace(partial, final)
        return True
    # nothing was executed (e.g. the kernel did not start): do not leave an older copy around that
    # could be mistaken for the output of this failed run
    if final.exists():
        final.unlink()
    return False


def print_summary(rows: list[Row], profile: str, status_path: Path) -> None:
    width = max([len(r.name) for r in rows] + [8])
    say(f"\nsummary: profile {profile} ({rel(status_path)})")
    say(f"  {'notebook':<{width}}  {'status':<9} {'time':>9}  note")
    for r in rows:
        say(f"  {r.name:<{width}}  {r.status:<9} {fmt_seconds(r.seconds):>9}  {r.note}".rstrip())
    total = sum(r.seconds or 0.0 for r in rows if r.status in ("complete", "FAILED", "interrupted"))
    say(f"  executed time: {fmt_seconds(total)}")


@dataclass
class Executor:
    """Runs the notebooks of ``setup`` with ``kernel``; ``status`` is the status file's content while it runs."""

    setup: RunSetup
    kernel: KernelChoice
    opts: Options
    status: Optional[dict[str, Any]] = None

    def run_all(self) -> int:
        """Execute (or skip) every planned notebook, stop at the first failure, print the summary; the exit code."""
        profile_dir = self.setup.profile_dir
        profile_dir.mkdir(parents=True, exist_ok=True)
        # the kernels inherit this: progress bars as plain lines every 30 s in this log (icm_helpers.progress)
        os.environ.setdefault("ICM_PROGRESS", "log")
        exit_code = EXIT_OK
        with profile_lock(profile_dir):
            self.status = load_status(profile_dir)
            plans = plan_notebooks(self.setup, self.status, self.opts.force)
            rows = [Row(p.notebook.stem) for p in plans]
            for plan, row in zip(plans, rows):
                if not plan.decision.run:
                    say(f"skip {row.name} ({plan.decision.reason})")
                    row.status, row.note = "skipped", "complete, unchanged"
                    continue
                exit_code = self.run_one(plan, row)
                if exit_code != EXIT_OK:
                    break
        print_summary(rows, self.setup.profile, profile_dir / STATUS_FILE)
        return exit_code

    def run_one(self, plan: NotebookPlan, row: Row) -> int:
        """Execute one notebook into its executed copy, recording it in the status file; EXIT_OK or why it stopped."""
        nb, name = plan.notebook, plan.notebook.stem
        verb = "rerun" if self.status["notebooks"].get(name) else "run"
        say(f"\n{verb} {name} ({plan.decision.reason})")
        entry = {
            "status": "running",
            "notebook": nb.name,
            "executed_copy": nb.name,
            "params_sha256": self.setup.p_hash,
            "source_sha256": plan.s_hash,
            "params": self.setup.params,
            "kernel": self.kernel.name,
            "started_at": now(),
            "finished_at": None,
            "seconds": None,
        }
        self.status["notebooks"][name] = entry
        self._save()
        partial = self.setup.profile_dir / f".{name}.partial.ipynb"
        if partial.exists():
            partial.unlink()
        t0 = time.monotonic()
        failure = self._papermill(nb, partial)
        seconds = round(time.monotonic() - t0, 2)
        entry.update(finished_at=now(), seconds=seconds)
        row.seconds = seconds
        executed_copy = plan.executed_copy if finalise_copy(partial, plan.executed_copy) else None
        if failure is None:
            entry["status"] = "complete"
            self._save()
            row.status = "complete"
            say(f"done {name} in {fmt_seconds(seconds)}")
            return EXIT_OK
        interrupted = isinstance(failure, KeyboardInterrupt)
        info = describe_failure(failure, executed_copy)
        if interrupted:
            info["summary"] = "interrupted (KeyboardInterrupt)"
        entry["status"] = "failed"
        entry["error"] = info
        self._save()
        row.status = "interrupted" if interrupted else "FAILED"
        row.note = info["summary"]
        say(f"{'INTERRUPTED' if interrupted else 'FAILED'} {name} after {fmt_seconds(seconds)}")
        report_failure(nb, executed_copy, info, interrupted)
        return EXIT_INTERRUPTED if interrupted else EXIT_FAILED

    def _papermill(self, nb: Path, output: Path) -> Optional[BaseException]:
        """Execute ``nb`` into ``output``; what stopped it (an exception or a KeyboardInterrupt), or None."""
        try:
            pm.execute_notebook(
                str(nb),
                str(output),
                parameters=self.setup.params,
                kernel_name=self.kernel.name,
                language="python",
                cwd=str(self.setup.notebooks_dir),
                log_output=True,
                progress_bar=False,
                execution_timeout=self.opts.timeout,
                start_timeout=self.opts.start_timeout,
                **self.kernel.engine_kwargs(),
            )
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 -- any failure of a notebook stops the run
            return exc
        return None

    def _save(self) -> None:
        save_status(self.setup.profile_dir, self.status)
