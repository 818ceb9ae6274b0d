"""One invocation of the runner: plan, then list (``--list``) or execute the notebooks."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .common import EXIT_FAILED, EXIT_OK, say
from .kernel import resolve_kernel, same_interpreter
from .plan import Options, prepare, show_plan


def run(opts: Options) -> int:
    """Run (or with ``opts.list_only`` only show) the notebooks for ``opts``; the exit code. Usage and configuration
    problems raise ``RunnerError`` before anything is written."""
    setup = prepare(opts)
    say(f"profile {setup.profile}: {json.dumps(setup.params, ensure_ascii=False)} (params sha256 {setup.p_hash[:12]})")
    if opts.list_only:  # reads only; writes nothing
        show_plan(setup, Path(opts.params_dir), opts.force)
        return EXIT_OK
    if opts.check:
        # the pre-flight checks import torch and build models: imported only when asked
        from icm_helpers.preflight import report, run_checks

        params = setup.params
        checks = run_checks(params["profile"], params.get("overrides"), str(params.get("device", "cpu")),
                            params.get("run_dir"))
        return EXIT_OK if report(checks, say) else EXIT_FAILED

    kernel = resolve_kernel(opts.kernel)
    say(f"kernel: {kernel.name} -> {kernel.executable} ({kernel.note})")
    if not same_interpreter(kernel.executable, sys.executable):
        say(f"warning: the kernel does not run {sys.executable}, the interpreter of this runner")

    from .execute import Executor  # imported late (it imports papermill): --list and usage errors stay fast

    return Executor(setup, kernel, opts).run_all()
