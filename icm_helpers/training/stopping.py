"""Stopping rules for ``fit(stop_when=...)``: functions of the epoch history, so a resumed run decides as the
uninterrupted run would."""
from __future__ import annotations

from typing import Any, Callable


def plateau(key: str = "val_aux", rel: float = 0.01, patience: int = 2,
            max_epochs: int | None = None) -> Callable[[list[dict[str, Any]]], bool]:
    """Protocol v2, R6v2: stop once ``patience`` epochs in a row have not lowered ``key`` by at least ``rel``
    (relative) below the best value of the epochs before each of them. ``max_epochs``: stop there in any case (the
    cap also bounds the job's ``epochs``)."""
    if not 0 <= rel < 1 or patience < 1:
        raise ValueError(f"plateau needs 0 <= rel < 1 and patience >= 1, got rel={rel}, patience={patience}")

    def stop(history: list[dict[str, Any]]) -> bool:
        if max_epochs is not None and len(history) >= max_epochs:
            return True
        values = [h[key] for h in history]
        if any(v is None for v in values):
            raise KeyError(f"plateau: the history has no {key!r}; validate every epoch to use this rule")
        flat = 0
        for i in range(1, len(values)):
            best_before = min(values[:i])
            flat = flat + 1 if values[i] > best_before * (1 - rel) else 0
        return flat >= patience

    return stop
