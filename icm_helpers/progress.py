"""Progress bars for training steps and evaluated images (``tqdm``).

Where the code runs decides the form (environment variable ``ICM_PROGRESS``):

- unset / ``auto``: ``tqdm.auto``, i.e. a widget bar in JupyterLab and a text bar in a terminal;
- ``log`` (the papermill runner sets it for its kernels): plain ASCII lines on stdout, at most one every 30 s, so a
  10-minute notebook shows in the runner's log how far it is, without flooding it;
- ``off``: nothing (the unit tests).

The bars only report; they never change what is computed.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Iterable

from tqdm import tqdm as tqdm_plain
from tqdm.auto import tqdm as tqdm_auto

MODES = ("auto", "log", "off")
LOG_INTERVAL_S = 30.0


def progress_mode() -> str:
    mode = os.environ.get("ICM_PROGRESS", "auto")
    if mode not in MODES:
        raise ValueError(f"ICM_PROGRESS={mode!r}; valid: {', '.join(MODES)}")
    return mode


class _Silent:
    """The no-op bar of ``ICM_PROGRESS=off``."""

    def __init__(self, iterable: Iterable | None = None, **_: Any):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str = "", unit: str = "it",
             initial: int = 0):
    """A progress bar over ``iterable`` (or a manual one: ``update(n)``, ``close()``), in the form ``ICM_PROGRESS``
    asks."""
    mode = progress_mode()
    if mode == "off":
        return _Silent(iterable)
    if mode == "log":
        return tqdm_plain(
            iterable,
            total=total,
            desc=desc,
            unit=unit,
            initial=initial,
            file=sys.stdout,
            ascii=True,
            ncols=100,
            mininterval=LOG_INTERVAL_S,
            maxinterval=2 * LOG_INTERVAL_S,
        )

    return tqdm_auto(iterable, total=total, desc=desc, unit=unit, initial=initial, mininterval=1.0)
