"""Evaluation records made once and reused while their evaluation key holds.

A record (``results/<task>/<name>.json``, written by ``result_store.ResultStore``) carries ``eval_key``: everything
its numbers depend on besides its method's fields (:func:`evaluation_key`: image count, split, bitstream / decode /
amp, ROI, the codec file's and the recognizer's identity). :func:`evaluate_cached` returns the stored record when its
key equals the one the settings give now, and otherwise evaluates (``evaluation.evaluate``) and writes a new record;
the store logs what differs. ``force=True`` re-evaluates whatever is stored. Under torchrun rank 0 decides, every
rank evaluates its shard, rank 0 writes.

Every function takes the ``Experiment`` whose profile, datasets, recognizers and result store it uses; the
``Experiment.evaluate_*`` steps call them.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from . import codec as codec_lib
from . import distributed as dist_lib
from .assets import canonical, sha256
from .evaluation import EvalOptions, evaluate
from .registry import check_task

#: Version of the evaluation key (:func:`evaluation_key`); records with another version are re-evaluated.
EVAL_KEY_VERSION = 1

_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_identity(path: Path) -> dict[str, Any] | None:
    """``{"sha256", "bytes"}`` of a file, None when it is not there; each (path, size, mtime) is hashed once per
    process."""
    try:
        st = Path(path).stat()
    except FileNotFoundError:
        return None
    memo = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _FILE_HASHES:
        _FILE_HASHES[memo] = sha256(path)
    return {"sha256": _FILE_HASHES[memo], "bytes": st.st_size}


def evaluation_key(ex, task: str, codec: Path | dict[str, Any] | None, bitstream: bool,
                   roi_qf: float | None = None, roi_decoder: str = "as_is") -> dict[str, Any]:
    """Everything an evaluation record's numbers depend on besides its method's fields: the number of test images
    (``evaluation.max_images`` and the split's size), the split (data settings and seed), ``bitstream``,
    ``evaluation.decode`` / ``amp``, the ROI settings, the codec (a checkpoint file: its sha256 and size; an anchor:
    its ``describe()``; None: the uncompressed reference) and the recognizer (backend, model settings and, when the
    suite trains it, its file's sha256)."""
    ec = ex.cfg.get("evaluation", {}) or {}
    rc = ex.cfg["recognizers"][check_task(task)]
    n_test, n_max = len(ex.dataset("test", task)), ex.max_images()
    return canonical({
        "version": EVAL_KEY_VERSION,
        "test_images": n_test if n_max is None else min(n_max, n_test),
        "max_images": n_max,
        "split": {"test_split_images": n_test, "seed": ex.seed,
                  "data": {k: v for k, v in ex.cfg["data"].items() if k != "val_images"}},
        "bitstream": bool(bitstream),
        "decode": ec.get("decode", "all"),
        "amp": ec.get("amp"),
        "roi": None if not roi_qf else {"qf": float(roi_qf), "decoder": roi_decoder},
        "codec": {"file": file_identity(codec)} if isinstance(codec, Path) else codec,
        "recognizer": {"backend": rc["backend"], "model": rc.get("model", {}),
                       "file": file_identity(ex.recognizer_path(task)) if rc.get("train") is not None else None},
    })


def evaluate_cached(ex, task: str, name: str, lambda_: float | None, fields: dict[str, Any], force: bool,
                    codec_factory: Callable[[], Any], codec_key: Path | dict[str, Any] | None,
                    roi_qf: float | None = None, roi_decoder: str = "as_is",
                    bitstream: bool | None = None) -> dict[str, Any]:
    """The record ``name`` of ``task``: the stored one when its ``eval_key`` equals :func:`evaluation_key` now, else a
    new evaluation of ``codec_factory()`` (called only then) with ``fields`` (method, seed, ...) and ``lambda_`` in
    the record. ``codec_key``: the codec's checkpoint file, an anchor's description, or None (the reference);
    ``bitstream``: None = the profile's ``evaluation.bitstream`` (default True)."""
    path = ex.result_path(task, name)
    ec = ex.cfg.get("evaluation", {})
    bitstream = bool(ec.get("bitstream", True)) if bitstream is None else bitstream
    stored = None
    if dist_lib.is_main():  # torchrun: rank 0 decides for all
        stored = ex.results.reusable(path, evaluation_key(ex, task, codec_key, bitstream, roi_qf, roi_decoder), force)
    if dist_lib.broadcast_object(stored is not None):
        return stored if stored is not None else ex.results.read(path)
    started = time.time()
    options = EvalOptions.from_profile(ec, ex.device, bitstream=bitstream, roi_qf=roi_qf, roi_decoder=roi_decoder,
                                       max_images=ex.max_images(), desc=f"evaluate {task}/{name}")
    # under torchrun: sharded over the ranks, gathered (same record on every rank)
    ev = evaluate(codec_factory(), ex.recognizer(task), ex.dataset("test", task), options)
    record = {"profile": ex.profile, "task": task, "lambda_": lambda_, **fields, **ev,
              "eval_key": evaluation_key(ex, task, codec_key, bitstream, roi_qf, roi_decoder),
              "provenance": ex.run_provenance(started=started, ended=time.time())}
    if dist_lib.is_main():
        ex.results.write(path, record)
    dist_lib.barrier()
    return record


def evaluate_checkpoint(ex, task: str, name: str, lambda_: float | None, fields: dict[str, Any], path: Path,
                        force: bool = False, **options: Any) -> dict[str, Any]:
    """:func:`evaluate_cached` of the codec checkpoint ``path`` (loaded only when it is evaluated; its file's identity
    is in the key); ``options``: ``roi_qf``, ``roi_decoder``, ``bitstream``."""
    return evaluate_cached(ex, task, name, lambda_, fields, force,
                           codec_factory=lambda: codec_lib.load_codec(path).to(ex.device), codec_key=path, **options)
