"""Which Jupyter kernel executes the notebooks: by default one that runs the interpreter running the runner."""
from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from .common import RunnerError

# name under which this interpreter's built-in kernel spec is used (see resolve_kernel)
THIS_INTERPRETER_KERNEL = "icm-aux-this-python"


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
    from jupyter_client.kernelspec import KernelSpec  # imported late: --list and usage errors stay fast
    from jupyter_client.manager import AsyncKernelManager  # imported late: as above

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
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel  # imported late: --list stays fast

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
