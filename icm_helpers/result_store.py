"""The evaluation records of a run directory (``results/<task>/<name>.json``, paths from ``run_layout.RunLayout``):
written, read back, reused when their evaluation key still holds, and queried by method, lambda, training seed and
budget.

A record's training seed is its own ``seed`` field: every record of a trained codec written by this suite carries
it. Records without one are either older records of a trained codec or records of something nothing was trained for
(the uncompressed reference, the start codec, the conventional anchors); :func:`record_seed` is the one place that
decides which seed those belong to.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable

from .io import atomic_write_json, read_json
from .run_layout import RunLayout


class _EverySeed:
    """The seed of a record made without training (see :func:`record_seed`): it belongs to every training seed."""

    def __repr__(self) -> str:
        return "EVERY_SEED"


EVERY_SEED = _EverySeed()


def record_seed(record: dict[str, Any], profile_seed: int) -> Any:
    """The training seed a record belongs to.

    - The record's own ``seed`` field when it has one.
    - Without one, a record with a ``codec_path`` is of a trained codec written before records carried their seed:
      it belongs to the profile's seed, ``profile_seed`` (only the profile's seed was trained then).
    - Without either, nothing was trained for the record (reference, start codec, conventional anchors):
      :data:`EVERY_SEED`, it belongs to every training seed (e.g. an anchor of the BD-rates of every seed).
    """
    if "seed" in record:
        return record["seed"]
    return profile_seed if "codec_path" in record else EVERY_SEED


def belongs_to_seed(record: dict[str, Any], seed: int, profile_seed: int) -> bool:
    """Whether ``record`` counts for training seed ``seed`` (:func:`record_seed`)."""
    own = record_seed(record, profile_seed)
    return own is EVERY_SEED or own == seed


def _short(value: Any, limit: int = 90) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ResultStore:
    """The evaluation records of the run directory of ``layout``; ``log`` gets the line saying why a stored record
    is not reused."""

    def __init__(self, layout: RunLayout, log: Callable[[str], Any] | None = None):
        self.layout = layout
        self.log = log or (lambda *_: None)

    @property
    def profile_seed(self) -> int:
        return self.layout.seed

    # ------------------------------------------------------------------ one record
    def path(self, task: str, name: str) -> Path:
        return self.layout.result_path(task, name)

    @staticmethod
    def read(path: Path) -> dict[str, Any]:
        return read_json(path)

    @staticmethod
    def write(path: Path, record: dict[str, Any]) -> Path:
        """Write ``record`` to ``path`` atomically (a reader never sees half a record)."""
        return atomic_write_json(path, record)

    def reusable(self, path: Path, key: dict[str, Any], force: bool) -> dict[str, Any] | None:
        """The record at ``path`` when it was evaluated with ``key`` (its ``eval_key``); otherwise None, with a log
        line saying why it is re-evaluated (no record there, or ``force``: None without a line)."""
        if force or not path.exists():
            return None
        record = read_json(path)
        stored = record.get("eval_key")
        if stored == key:
            return record
        label = f"{record.get('task', path.parent.name)}/{path.stem}"
        if not isinstance(stored, dict):
            why = ("it has no evaluation key: it was written before records were keyed by the settings they depend "
                   "on, so it cannot be checked")
        else:
            changed = sorted(k for k in {*stored, *key} if stored.get(k) != key.get(k))
            why = "it was made with other " + "; ".join(
                f"{k}: {_short(stored.get(k))} -> {_short(key.get(k))}" for k in changed)
        self.log(f"re-evaluating {label} ({path}): {why}")
        return None

    # ------------------------------------------------------------------ queries
    def paths(self, task: str, budgets: bool = False) -> list[Path]:
        """The stored records of ``task`` (JSON files, with their per-image lists), sorted by file name; the budget
        snapshots' only with ``budgets=True``."""
        paths = sorted(self.layout.results_dir(task).glob("*.json"))
        return [p for p in paths if budgets or read_json(p).get("budget") is None]

    def records(self, task: str | None = None, budgets: bool = False) -> list[dict[str, Any]]:
        """Every stored record (optionally of one task, not checked: an unknown task has none), without per-image
        lists; the budget snapshots' records only with ``budgets=True``."""
        root = self.layout.results_root
        paths = sorted((root / task).glob("*.json")) if task else sorted(root.glob("*/*.json"))
        recs = [{k: v for k, v in read_json(p).items() if k != "per_image"} for p in paths]
        return [r for r in recs if budgets or r.get("budget") is None]

    def full_records(self, task: str, method: str, seed: int | None = None,
                     budget: float | None = None) -> list[dict[str, Any]]:
        """Stored records (with per-image lists) of one method of ``task`` with a lambda, of training ``seed`` (None:
        the profile's seed; :func:`belongs_to_seed`) and training ``budget`` fraction (None: the final models),
        sorted by lambda."""
        seed = self.profile_seed if seed is None else seed
        recs = [read_json(p) for p in sorted(self.layout.results_dir(task).glob("*.json"))]
        keep = [r for r in recs if r.get("method") == method and r.get("lambda_") is not None
                and belongs_to_seed(r, seed, self.profile_seed) and r.get("budget") == budget]
        return sorted(keep, key=lambda r: r["lambda_"])

    def records_by_seed(self, task: str, methods: Iterable[str], seeds: Iterable[int],
                        budget: float | None = None) -> dict[int, dict[str, list[dict[str, Any]]]]:
        """``{seed: {method: full_records(task, method, seed, budget)}}``: the input of
        ``bootstrap.bd_rate_table``."""
        methods = list(methods)
        return {s: {m: self.full_records(task, m, seed=s, budget=budget) for m in methods} for s in seeds}
