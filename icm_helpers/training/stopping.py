"""Stopping rules, callbacks of ``fit`` (``fit(callbacks=[rule])``): functions of the epoch history, so a resumed run
decides as the uninterrupted run would. The plateau rule with ``decays`` also sets the learning rate: it divides the
rate at a plateau instead of stopping, a given number of times (protocol v2, deviation 7: R6v2b)."""
from __future__ import annotations

from typing import Any

from .loop import Callback, FitState


class PlateauRule(Callback):
    """Protocol v2, R6v2 (deviation 5): a plateau is reached once the best of the last ``patience`` epochs is not at
    least ``rel`` (relative) below the best of the epochs before them, and at least ``min_epochs`` epochs have run (a
    noisy round neither starts nor ends a plateau: only the best of a window counts).

    ``decays`` > 0 (R6v2b, deviation 7): the first ``decays`` plateaus multiply the learning rate by ``decay_factor``
    instead of stopping; each decay starts a new phase in which the rule applies afresh, as to a new run (its own
    ``min_epochs``, its window compared with the phase's earlier epochs only). The plateau after the last decay stops.
    ``max_epochs``: stop there in any case (the cap also bounds the job's ``epochs``).

    Everything is replayed from the history, so a resumed run takes the decisions the uninterrupted run took. As a
    callback of ``fit``: ``should_stop`` after each epoch's checkpoint (and on resume); with ``decays``, the rate of
    each epoch (``before_epoch``: ``lr_scale`` of the history so far)."""

    def __init__(self, key: str = "val_aux", rel: float = 0.01, patience: int = 2, min_epochs: int = 0,
                 max_epochs: int | None = None, decays: int = 0, decay_factor: float = 0.1):
        if not 0 <= rel < 1 or patience < 1 or min_epochs < 0:
            raise ValueError(f"plateau needs 0 <= rel < 1, patience >= 1 and min_epochs >= 0, got rel={rel}, "
                             f"patience={patience}, min_epochs={min_epochs}")
        if decays < 0 or not 0 < decay_factor < 1:
            raise ValueError(f"plateau needs decays >= 0 and 0 < decay_factor < 1, got decays={decays}, "
                             f"decay_factor={decay_factor}")
        self.key, self.rel, self.patience, self.min_epochs = key, rel, patience, min_epochs
        self.max_epochs, self.decays, self.decay_factor = max_epochs, decays, decay_factor

    def _values(self, history: list[dict[str, Any]]) -> list[float]:
        values = [h.get(self.key) for h in history]
        if any(v is None for v in values):
            raise KeyError(f"plateau: the history has no {self.key!r}; validate every epoch to use this rule")
        return values

    def plateaus(self, history: list[dict[str, Any]]) -> list[int]:
        """The epochs (1-based) after which the rule found a plateau: the decays, then the stop (at most
        ``decays`` + 1 of them)."""
        values, found, start = self._values(history), [], 0
        for end in range(1, len(values) + 1):
            phase = values[start:end]
            if len(phase) < max(self.min_epochs, self.patience + 1):
                continue
            if min(phase[-self.patience:]) > min(phase[:-self.patience]) * (1 - self.rel):
                found.append(end)
                start = end
                if len(found) > self.decays:
                    break
        return found

    def lr_scale(self, history: list[dict[str, Any]]) -> float:
        """The learning-rate multiplier for the epoch after ``history``: ``decay_factor`` per decay so far."""
        return self.decay_factor ** min(self.decays, len(self.plateaus(history)))

    def __call__(self, history: list[dict[str, Any]]) -> bool:
        if self.max_epochs is not None and len(history) >= self.max_epochs:
            return True
        return len(self.plateaus(history)) > self.decays

    def before_epoch(self, state: FitState) -> None:
        if self.decays:
            state.set_lr_scale(self.lr_scale(state.history))

    def should_stop(self, state: FitState) -> bool:
        return self(state.history)


def plateau(key: str = "val_aux", rel: float = 0.01, patience: int = 2, min_epochs: int = 0,
            max_epochs: int | None = None, decays: int = 0, decay_factor: float = 0.1) -> PlateauRule:
    """The plateau rule (:class:`PlateauRule`): a callable of the history and a callback of ``fit``."""
    return PlateauRule(key, rel, patience, min_epochs, max_epochs, decays, decay_factor)
