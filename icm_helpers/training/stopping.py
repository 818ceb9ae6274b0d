"""Stopping rules for ``fit(stop_when=...)``: functions of the epoch history, so a resumed run decides as the
uninterrupted run would."""
from __future__ import annotations

from typing import Any, Callable


def plateau(key: str = "val_aux", rel: float = 0.01, patience: int = 2, min_epochs: int = 0,
            max_epochs: int | None = None) -> Callable[[list[dict[str, Any]]], bool]:
    """Protocol v2, R6v2: stop once the best of the last ``patience`` epochs is not at least ``rel`` (relative) below
    the best of the epochs before them, and at least ``min_epochs`` epochs have run (a noisy round neither starts nor
    ends a plateau: only the best of a window counts). ``max_epochs``: stop there in any case (the cap also bounds
    the job's ``epochs``)."""
    if not 0 <= rel < 1 or patience < 1 or min_epochs < 0:
        raise ValueError(f"plateau needs 0 <= rel < 1, patience >= 1 and min_epochs >= 0, got rel={rel}, "
                         f"patience={patience}, min_epochs={min_epochs}")

    def stop(history: list[dict[str, Any]]) -> bool:
        if max_epochs is not None and len(history) >= max_epochs:
            return True
        values = [h.get(key) for h in history]
        if any(v is None for v in values):
            raise KeyError(f"plateau: the history has no {key!r}; validate every epoch to use this rule")
        if len(values) < max(min_epochs, patience + 1):
            return False
        return min(values[-patience:]) > min(values[:-patience]) * (1 - rel)

    return stop
