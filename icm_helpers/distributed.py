"""Multi-GPU / multi-node training and evaluation with PyTorch's own engine (``torchrun`` + DistributedDataParallel).

One process per GPU (or per CPU slot with gloo), started by ``torchrun``; this module reads the environment
torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and everything else in the
suite asks it who it is. Without torchrun (``WORLD_SIZE`` unset or 1) every helper is a no-op for a single
process, so library code calls them unconditionally.

What is distributed, and how it stays equal to one process:

- **training** (``training.train_icm``): the trainable modules (codec + auxiliary branch) are wrapped in
  ``DistributedDataParallel`` (gradients averaged over ranks); each epoch's deterministic global batch of
  ``batch_size`` images is split into ``world_size`` contiguous slices (``training.EpochLoader``), so N ranks with
  ``batch_size / N`` images each compute the gradient of the same global batch as one process (every loss term is a
  per-image mean). Random draws inside the step (CompressAI's quantisation noise, Faster R-CNN's RoI sampling,
  dropout) come from per-rank streams, so results agree with one process statistically, not bit for bit.
  CompressAI's quantiles (trained by their own data-independent loss) are left out of DDP: identical on every rank.
- **writes**: only rank 0 writes checkpoints, histories, results and figures (``is_main()``).
- **evaluation** (``evaluation.evaluate``): images are sharded round-robin over the ranks; per-image records, COCO
  detections and segmentation confusion matrices are gathered, so the metrics equal the single-process ones.

Notebook use: ``launch_torchrun`` starts ``papermill_runs/train_ddp.py`` (or any script) under torchrun as a
subprocess, streams its log and raises with the failing rank's error.
"""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

__all__ = ["init_from_env", "is_distributed", "rank", "world_size", "local_rank", "is_main", "barrier",
           "broadcast_object", "all_gather_object", "all_reduce", "device_for_rank", "shard", "DistributedView",
           "wrap_trainables", "launch_torchrun", "shutdown"]


# ---------------------------------------------------------------------------------------------------- who am I
def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0)) if is_distributed() else 0


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one process that writes files."""
    return rank() == 0


def device_for_rank(device: str | None = None) -> str:
    """This rank's device: ``cuda:<LOCAL_RANK>`` when CUDA is there (or asked for), else ``cpu``."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda"):
        return f"cuda:{local_rank()}" if is_distributed() or os.environ.get("LOCAL_RANK") else str(device)
    return str(device)


def init_from_env(backend: str | None = None, timeout_s: float = 3600.0, device: str | None = None) -> dict[str, Any]:
    """Join the process group torchrun set up (NCCL on GPU, gloo on CPU). Without torchrun (no ``WORLD_SIZE`` or
    ``WORLD_SIZE=1``) nothing is initialised. Returns {"rank", "world_size", "local_rank", "device", "backend"}.
    ``timeout_s``: how long a rank waits in a collective (rank 0 prepares data / recognizers / the start codec
    while the others wait at a barrier; make it longer than that preparation)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
        backend = backend or ("nccl" if use_cuda else "gloo")
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    dev = device_for_rank(device)
    return {"rank": rank(), "world_size": world_size(), "local_rank": local_rank(), "device": dev,
            "backend": dist.get_backend() if is_distributed() else None}


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------- collectives
def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (e.g. a decision only rank 0 may take: "does this result exist?")."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


_OPS = {"sum": "SUM", "min": "MIN", "max": "MAX"}


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduced copy of ``tensor`` over ranks (``op``: sum, mean, min, max); ``tensor`` itself when not distributed.
    The collective runs on the backend's device (NCCL: this rank's GPU, gloo: CPU); the result is on the input's."""
    if not is_distributed():
        return tensor
    if op not in (*_OPS, "mean"):
        raise ValueError(f"unknown reduction {op!r}; valid: sum, mean, min, max")
    comm_device = (
        torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    )
    t = tensor.detach().to(comm_device).clone()
    dist.all_reduce(t, op=getattr(dist.ReduceOp, _OPS.get(op, "SUM")))
    if op == "mean":
        t = t / world_size()
    return t.to(tensor.device)


def shard(n: int) -> range:
    """This rank's items of ``n`` (round-robin: rank r gets r, r + W, r + 2W, ...; ``unshard`` restores the order)."""
    return range(rank(), n, world_size())


def unshard(per_rank: Sequence[Sequence[Any]]) -> list[Any]:
    """Inverse of ``shard``: the lists each rank produced (in ``shard`` order) merged back into item order."""
    out = []
    w = len(per_rank)
    n = sum(len(p) for p in per_rank)
    for i in range(n):
        out.append(per_rank[i % w][i // w])
    return out


# ---------------------------------------------------------------------------------------------------- DDP
class _Through(nn.Module):
    """DDP needs the computation that produces the gradients to run inside its ``forward``; this adapter makes any
    call on the wrapped module (``forward``, a method such as the aux branch's ``loss``, or a function of the
    module such as ``codec.mixed_forward``) a DDP forward."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, fn: str | Callable, *args: Any, **kwargs: Any) -> Any:
        if fn == "__call__":
            return self.module(*args, **kwargs)
        if isinstance(fn, str):
            return getattr(self.module, fn)(*args, **kwargs)
        return fn(self.module, *args, **kwargs)


class DistributedView:
    """A DDP-wrapped module that still looks like the module: calling it, ``loss(...)`` and ``run(fn, ...)`` go
    through DistributedDataParallel (gradients all-reduced in backward); every other attribute (``g_s``,
    ``aux_loss``, ``inputs``, ``named_parameters``, ...) is the module's own. ``unwrap()`` gives the module (whose
    state dict, without DDP's ``module.`` prefix, is what checkpoints hold)."""

    def __init__(self, module: nn.Module, ddp: nn.Module):
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_ddp", ddp)

    def unwrap(self) -> nn.Module:
        return self._module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._ddp("__call__", *args, **kwargs)

    def loss(self, *args: Any, **kwargs: Any) -> Any:
        return self._ddp("loss", *args, **kwargs)

    def run(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        return self._ddp(fn, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._module, name, value)

    def __repr__(self) -> str:
        return f"DistributedView({self._module.__class__.__name__})"


def wrap_ddp(module: nn.Module, device: str | torch.device = "cpu", ignore: Iterable[str] = (),
             find_unused_parameters: bool | None = None) -> DistributedView:
    """``module`` inside DistributedDataParallel (params and buffers broadcast from rank 0 once; gradients averaged).
    ``ignore``: parameter names left out of DDP (updated locally, e.g. CompressAI's quantiles).
    ``find_unused_parameters``: default from ``$ICM_DDP_FIND_UNUSED`` (0); set it when a configuration leaves some
    parameter without gradient in a step (DDP then says so in its error)."""

    if find_unused_parameters is None:
        find_unused_parameters = os.environ.get("ICM_DDP_FIND_UNUSED", "0") not in ("0", "", "false")
    adapter = _Through(module)
    names = [f"module.{n}" for n in ignore]
    if names:
        DDP._set_params_and_buffers_to_ignore_for_model(adapter, names)
    device = torch.device(device)
    ddp = DDP(adapter, device_ids=[device.index if device.index is not None else torch.cuda.current_device()]
              if device.type == "cuda" else None, broadcast_buffers=False,
              find_unused_parameters=find_unused_parameters, gradient_as_bucket_view=True)
    return DistributedView(module, ddp)


def wrap_trainables(
    codec: nn.Module, aux_branch: nn.Module | None, device: str = "cpu", sync_batchnorm: bool | None = None
):
    """(codec, aux_branch) as DDP views when distributed, unchanged otherwise. The codec's quantiles stay out of
    DDP (they get gradients only from CompressAI's data-independent quantile loss, identical on every rank).
    ``sync_batchnorm`` (default: on CUDA): the aux branch's BatchNorm layers (trained in train mode) become
    SyncBatchNorm in place, so their batch statistics are over the GLOBAL batch as in one process (same parameters
    and state-dict keys). PyTorch has no SyncBatchNorm on CPU: with gloo each rank normalises over its own slice."""
    if not is_distributed():
        return codec, aux_branch
    if sync_batchnorm is None:
        sync_batchnorm = str(device).startswith("cuda")
    if sync_batchnorm and aux_branch is not None:
        _sync_batchnorm_in_place(aux_branch)
    quantiles = [n for n, _ in codec.named_parameters() if n.endswith(".quantiles")]
    codec_view = wrap_ddp(codec, device, ignore=quantiles)
    aux_view = wrap_ddp(aux_branch, device) if aux_branch is not None else None
    return codec_view, aux_view


def _sync_batchnorm_in_place(module: nn.Module) -> None:
    """Replace the BatchNorm children of ``module`` by SyncBatchNorm (sharing their parameters and buffers, so the
    optimizer and the checkpoints keep pointing at the same tensors)."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
            setattr(module, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
        else:
            _sync_batchnorm_in_place(child)


# ---------------------------------------------------------------------------------------------------- launching
def launch_torchrun(script: str | Path, args: Sequence[str] = (), nproc_per_node: int | str = "gpu", nnodes: int = 1,
                    node_rank: int = 0, master_addr: str = "127.0.0.1", master_port: int | None = None,
                    rdzv_endpoint: str | None = None, log: Callable[[str], None] | None = print,
                    env: dict[str, str] | None = None, cwd: str | Path | None = None, log_dir: str | Path | None = None,
                    python: str = sys.executable, threads_per_proc: int | None = None) -> int:
    """Run ``script`` under ``torchrun`` as a subprocess (e.g. from a notebook), stream its output line by line to
    ``log`` and return 0; on failure raise ``RuntimeError`` with the failing rank's error (its traceback tail).

    ``nproc_per_node``: processes on this node ("gpu" = one per visible GPU; an int on CPU, e.g. 2).
    Single node (default): ``--standalone`` (a free port is chosen). Multi-node: the same call on every node with
    ``nnodes``, its ``node_rank`` and the address/port of node 0 (``master_addr``/``master_port``), or
    ``rdzv_endpoint="host:port"`` for c10d rendezvous.
    ``threads_per_proc``: OMP_NUM_THREADS for each process (CPU runs: cores / processes)."""

    log = log or (lambda *_: None)
    log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="icm_torchrun_"))
    cmd = [python, "-m", "torch.distributed.run", f"--nproc_per_node={nproc_per_node}", f"--nnodes={nnodes}",
           f"--log_dir={log_dir}", "--redirects=3", "--tee=3"]
    if rdzv_endpoint:
        cmd += ["--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv_endpoint}", f"--node_rank={node_rank}"]
    elif nnodes == 1 and master_port is None:
        cmd += ["--standalone"]  # single node: torchrun picks a free port
    else:
        cmd += [f"--node_rank={node_rank}", f"--master_addr={master_addr}", f"--master_port={master_port or 29500}"]
    cmd += [str(script), *map(str, args)]
    full_env = {**os.environ, **(env or {})}
    if threads_per_proc:
        full_env["OMP_NUM_THREADS"] = str(threads_per_proc)
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    tail: deque[str] = deque(maxlen=60)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env,
                            cwd=str(cwd) if cwd else None, bufsize=1)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            log(line)
        rc = proc.wait()
    except BaseException:  # KeyboardInterrupt in a notebook: stop every rank
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    if rc != 0:
        failed_rank, message = _failing_rank(log_dir)
        where = f"rank {failed_rank}" if failed_rank is not None else "a rank"
        detail = message or "\n".join(tail)
        raise RuntimeError(f"torchrun {Path(script).name} failed (exit code {rc}); {where} failed with:\n{detail}\n"
                           f"(per-rank logs: {log_dir})")
    return 0


def _failing_rank(log_dir: Path) -> tuple[int | None, str]:
    """The first rank (by error time) whose error file or stderr log holds a traceback, and that message."""
    candidates = []
    for err in sorted(log_dir.rglob("error.json")):
        try:
            data = json.loads(err.read_text())
            msg = data.get("message", {})
            text = msg.get("message", "") if isinstance(msg, dict) else str(msg)
            trace = msg.get("extraInfo", {}).get("py_callstack", "") if isinstance(msg, dict) else ""
            ts = int(msg.get("extraInfo", {}).get("timestamp", 0)) if isinstance(msg, dict) else 0
            candidates.append((ts, _rank_of(err), (trace or text).strip()))
        except (OSError, ValueError):
            continue
    if candidates:
        ts, r, text = min(candidates, key=lambda c: (c[0], c[1] if c[1] is not None else 1 << 30))
        return r, "\n".join(text.splitlines()[-30:])
    for err in sorted(log_dir.rglob("stderr.log")):
        text = err.read_text(errors="replace")
        if "Traceback" in text:
            return _rank_of(err), "\n".join(text[text.rindex("Traceback"):].splitlines()[-30:])
    return None, ""


def _rank_of(path: Path) -> int | None:
    """torchrun's per-rank log layout ends in .../attempt_<k>/<local_rank>/<file>."""
    try:
        return int(path.parent.name)
    except ValueError:
        return None
