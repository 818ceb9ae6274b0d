"""Pre-flight check of a profile before a long run: ``papermill_runs/run.py --profile paper --check``.

Nothing is trained or downloaded; on the paper profile it takes well under a minute (it builds the pretrained models
once on the CPU). One line per check, OK or FAIL, and under a FAIL the fix:

- ``data...``: the data source's own verification (``datasources``: ``verify()``): layout and image count per split;
- ``backend/<task>``: the recognition backend's packages import;
- ``checkpoint/...``: every checkpoint the run starts from is there and loads with ``weights_only=True`` (the paper
  profile's pretrained recognizers and codec; the suite's trained or shipped start models), and the checkpoints
  already in the run directory are complete files;
- ``disk``: free space where the run writes, against an estimate of its checkpoints and records;
- ``gpu``: a CUDA GPU when the profile's parameters ask for one, and its memory against an estimate of one training
  step at each task's batch size (activations measured on a 64x64 image, scaled to the training crop and batch).
"""
from __future__ import annotations

import importlib
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from compressai.zoo.image import model_urls

from . import codec as codec_lib
from .assets import find_shipped
from .backends import detectron2_det, hub_checkpoint_dir, mmseg_seg
from .config import resolve_data_path
from .experiment import Experiment
from .recognizers import build_recognizer, load_recognizer
from .training import TrainConfig
from .training.objective import icm_terms

GIB = 1024 ** 3

#: The packages each recognition backend imports, and how to get them.
BACKEND_PACKAGES: dict[str, tuple[tuple[str, ...], str]] = {
    "suite": ((), ""),
    "deeplabv3plus": ((), ""),
    "torchvision": (("torchvision",), "pip install -e . (torchvision is one of the suite's dependencies)"),
    "detectron2": (("detectron2",), f"{detectron2_det.INSTALL_HINT}; or the pip-only backend: torchvision"),
    "mmseg": (("mmcv", "mmengine", "mmseg"), f"{mmseg_seg.INSTALL}; or the pip-only backend: deeplabv3plus"),
}

# where the messages of the suite's errors start their fix
_FIX_MARKERS = ("Either ", "Install it with: ", "Fix: ", "See ")


@dataclass
class Check:
    """One line of the report: ``name``, OK or FAIL, what was found, and for a FAIL how to fix it."""

    name: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"{'OK  ' if self.ok else 'FAIL'} {self.name}: {self.detail}"
        return text if self.ok or not self.fix else f"{text}\n     fix: {self.fix}"


def _split_fix(exc: BaseException, default: str) -> tuple[str, str]:
    """(what is wrong, the fix) of a suite error whose message ends with its fix; ``default`` when it has none."""
    text = str(exc.args[0]) if exc.args else str(exc)
    for marker in _FIX_MARKERS:
        what, found, fix = text.partition(marker)
        if found and what.strip():
            return what.strip(), (marker if marker in ("Either ", "See ") else "") + fix.strip()
    return text, default


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


# ----------------------------------------------------------------------------------------------- backends
def check_backends(ex: Experiment) -> list[Check]:
    out = []
    for task in ex.tasks():
        backend = ex.cfg["recognizers"][task]["backend"]
        packages, install = BACKEND_PACKAGES.get(backend, ((), ""))
        broken = []
        for package in packages:
            try:
                importlib.import_module(package)
            except Exception as exc:  # ImportError, or a compiled extension that fails to load
                broken.append(f"{package} ({type(exc).__name__}: {exc})")
        detail = f"{backend}: " + (f"imports {', '.join(packages)}" if packages else "built into the suite")
        out.append(Check(f"backend/{task}", not broken,
                         detail if not broken else f"{backend}: cannot import {'; '.join(broken)}", install))
    return out


# ----------------------------------------------------------------------------------------------- checkpoints
def _trained_start_model(name: str, path: Path, load: Callable[[Path], Any], shipped: Path | None, trains: str
                         ) -> tuple[Check, Any]:
    """A start model the suite trains: the run directory's file, else the matching shipped file, else trained by
    notebook 01; a file must load."""
    for where, candidate in (("", path), ("shipped, notebook 01 installs it: ", shipped)):
        if candidate is None or not candidate.exists():
            continue
        try:
            model = load(candidate)
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            return Check(name, False, f"{candidate} does not load: {exc}",
                         f"delete {candidate}; notebook 01 then {trains}"), None
        return Check(name, True, f"{where}{candidate} loads (weights_only=True)"), model
    return Check(name, True, f"not there yet: notebook 01 {trains}"), None


def check_start_codec(ex: Experiment, built: dict[str, Any]) -> Check:
    cc, name = ex.cfg["codec"], "checkpoint/codec_start"
    path = ex.layout.start_codec_path
    if not path.exists() and (cc.get("weights") or cc.get("pretrained")):
        quality = cc.get("quality")
        url = model_urls["cheng2020-attn"]["mse"].get(quality, "") if quality else ""
        weights = str(resolve_data_path(cc["weights"])) if cc.get("weights") else None
        fix = ("set codec.weights to the checkpoint file" if weights else
               f"wget -P {hub_checkpoint_dir()} {url}, or set codec.download: true to let the suite fetch it, or "
               "codec.weights: /path/to/file")
        try:
            codec = codec_lib.build_codec(pretrained=True, quality=quality, weights=weights, download=False)
        except FileNotFoundError as exc:
            return Check(name, False, _split_fix(exc, fix)[0], fix)
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            return Check(name, False, f"the CompressAI cheng2020-attn checkpoint does not load: {exc}", fix)
        built["codec"] = codec
        source = weights or str(hub_checkpoint_dir() / url.rsplit("/", 1)[-1])
        return Check(name, True, f"{source} loads (weights_only=True), N={codec_lib.codec_N(codec)}")
    shipped, _ = find_shipped(ex.cfg, "codec_start", ex.provenance("codec")) if ex.use_assets else (None, "")
    trains = ("writes it from CompressAI's pretrained cheng2020-attn" if cc.get("weights") or cc.get("pretrained")
              else f"trains it (Eq. 2, {(cc.get('train') or {}).get('epochs')} epochs)")
    check, codec = _trained_start_model(name, path, codec_lib.load_codec, shipped, trains)
    if codec is not None:
        built["codec"] = codec
    return check


def check_recognizer(ex: Experiment, task: str, built: dict[str, Any]) -> Check:
    rc, name = ex.cfg["recognizers"][task], f"checkpoint/recognizer_{task}"
    if rc.get("train") is not None:
        path = ex.recognizer_path(task)
        shipped, _ = (find_shipped(ex.cfg, f"recognizer_{task}", ex.provenance("recognizer", task))
                      if ex.use_assets else (None, ""))
        check, rec = _trained_start_model(name, path, lambda p: load_recognizer(p, expect_task=task), shipped,
                                          f"trains it on the ground truth ({rc['train'].get('epochs')} epochs)")
        built[f"recognizer/{task}"] = rec
        return check
    model = {**rc.get("model", {}), "download": False}
    fix = (f"place the checkpoint where the message says, set recognizers.{task}.model.download: true to let the "
           f"suite fetch it, or recognizers.{task}.model.weights: /path/to/file")
    try:
        rec = build_recognizer(task, rc["backend"], ex.num_classes(task), **model).freeze()
    except FileNotFoundError as exc:
        return Check(name, False, *_split_fix(exc, fix))
    except ImportError as exc:
        return Check(name, False, f"not checked: {_split_fix(exc, '')[0]}", "see backend/" + task)
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        return Check(name, False, f"the {rc['backend']} checkpoint does not load: {exc}", fix)
    built[f"recognizer/{task}"] = rec
    weights = model.get("weights") or "official"
    return Check(name, True, f"{rc['backend']} with {weights} weights: loads (weights_only=True)")


def check_run_checkpoints(ex: Experiment) -> Check:
    """The checkpoints already in the run directory are whole files (their zip directory reads; not loaded: the
    paper's are many GB)."""
    layout = ex.layout
    files = sorted(p for d in (layout.models_dir, layout.icm_root, layout.aux_warm_root) for p in d.rglob("*.pt"))
    bad = []
    for path in files:
        try:
            with zipfile.ZipFile(path) as archive:
                archive.namelist()
        except (OSError, zipfile.BadZipFile) as exc:
            bad.append(f"{path.relative_to(ex.run_dir)} ({exc})")
    if bad:
        return Check("checkpoint/run_dir", False, f"{len(bad)} of {len(files)} checkpoints are truncated or corrupt: "
                     + ", ".join(bad[:5]), "delete them: the run retrains those models (or resumes from an epoch)")
    return Check("checkpoint/run_dir", True, f"{len(files)} checkpoints in {ex.run_dir}, all complete files")


# ----------------------------------------------------------------------------------------------- disk
def evaluation_counts(ex: Experiment) -> dict[str, dict[str, int]]:
    """Per task, how many evaluations of the test split notebooks 01-07 of the profile run, by kind: ``trained`` (ICM
    models: every lambda x arm x seed, plus the MSE arm's lambdas), ``ablation`` (the other branch positions at the
    ablation lambda), ``roi`` (the ROI baseline: w/o-aux models x decoder readings), ``start`` (the start codec) -
    each codes every test image with the learned codec - and ``anchors`` (conventional-codec rate points, counted
    whether or not their binaries are installed here) and ``reference`` (the uncompressed images)."""
    seeds = len(ex.train_seeds())
    positions = (ex.cfg.get("ablation") or {}).get("positions") or []
    n_anchor = sum(len(ex.anchor_qualities(name)) for name in ex.anchor_names())
    out = {}
    for task in ex.tasks():
        tc = ex.task_cfg(task)
        lambdas = len(tc["lambdas"])
        out[task] = {
            "trained": seeds * (lambdas * (1 + len(ex.aux_inits(task))) + len(tc.get("mse_lambdas") or [])),
            "ablation": seeds * len([p for p in positions if p not in (None, "enc")]),
            "roi": seeds * lambdas * len(tc.get("roi_decoders") or [None]) if tc.get("roi_qf") else 0,
            "start": 1, "anchors": n_anchor, "reference": 1}
    return out


def estimate_disk_bytes(ex: Experiment, codec_params: int) -> tuple[int, int]:
    """(bytes, models): an estimate of what the run writes: per ICM model its codec, its resumable training state
    (weights and Adam's two moments) and budget snapshots, x1.5 for the branch and histories; per evaluation record
    (``evaluation_counts``) its per-image lists."""
    n_images = ex.max_images() or 5000  # the paper's test splits: 5000 (COCO val2017) and 5105 (Pascal-Context val)
    total = models = 0
    for task, counts in evaluation_counts(ex).items():
        tc = ex.task_cfg(task)
        n = counts["trained"] + counts["ablation"]
        snapshots = len(tc.get("budget_fractions") or []) + len(tc.get("snapshot_steps") or [])
        records = sum(counts.values())
        total += int(n * 4 * codec_params * (1 + 3 + snapshots) * 1.5) + records * (4096 + 512 * n_images)
        models += n
    return total, models


def check_disk(ex: Experiment, built: dict[str, Any]) -> Check:
    codec = built.get("codec") or codec_lib.build_codec(N=int(ex.cfg["codec"].get("N") or 192))
    need, models = estimate_disk_bytes(ex, sum(p.numel() for p in codec.parameters()))
    where = next(p for p in (ex.run_dir, *ex.run_dir.parents) if p.exists())
    free = shutil.disk_usage(where).free
    return Check("disk", free >= need, f"{_gib(free)} free at {where}; the run writes about {_gib(need)} "
                 f"({models} ICM models with their training states, and the records)",
                 "free space there, or put the run on a larger disk (ICM_RUNS_DIR, or the notebooks' run_dir)")


# ----------------------------------------------------------------------------------------------- GPU
def _train_size(ex: Experiment, task: str, cfg: TrainConfig) -> int:
    """The side of the training images, padded to a multiple of 64: the crop, else the data's image size."""
    dc = ex.cfg["data"]
    side = cfg.crop_size or (dc.get("seg_size") if task == "segmentation" else None) \
        or (dc.get("world") or {}).get("image_size") or dc.get("eval_short_edge") or 512
    return -(-int(side) // 64) * 64


def training_step_bytes(ex: Experiment, task: str, built: dict[str, Any]) -> tuple[int, str] | None:
    """Estimated GPU memory of one aux-enc training step of ``task`` at its batch size (fp32): the tensors autograd
    saves for the backward pass, measured on two 64x64 images and scaled to the batch's pixels, plus the trainable
    weights with their gradients and Adam states and the frozen recognizer. None when its models are not built."""
    rec = built.get(f"recognizer/{task}")
    if rec is None:
        return None
    codec = built.get("codec") or codec_lib.build_codec(N=int(ex.cfg["codec"].get("N") or 192))
    cfg = TrainConfig.from_dict(ex.task_cfg(task)["train"])
    aux = ex.build_branch(task, "enc", ex.seed, codec, rec)
    spec = ex.spec(task, ex.task_cfg(task)["lambdas"][0], "enc")
    saved: dict[int, int] = {}
    weights = {t.untyped_storage().data_ptr() for m in (codec, aux, rec) for t in (*m.parameters(), *m.buffers())}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        try:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in weights:  # weights are saved too, but do not grow with the batch
                saved[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # a tensor without a plain storage: count its own elements
            saved[id(tensor)] = tensor.nelement() * tensor.element_size()
        return tensor

    codec.train()
    aux.train()
    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):  # 2 images: BatchNorm needs 2
        icm_terms(spec, codec, rec, aux, torch.rand(2, 3, 64, 64))
    side = _train_size(ex, task, cfg)
    trainable = sum(p.numel() for m in (codec, aux) for p in m.parameters())
    frozen = sum(p.numel() for p in rec.parameters())
    need = sum(saved.values()) / 2 * cfg.batch_size * side * side / 64 ** 2 + 16 * trainable + 4 * frozen
    return int(need), f"{task} at batch {cfg.batch_size} of {side}x{side}"


def check_gpu(ex: Experiment, device: str, built: dict[str, Any]) -> Check:
    device = str(device)
    if not device.startswith("cuda"):
        return Check("gpu", True, f"device {device}: the profile's parameters need no GPU")
    if not torch.cuda.is_available():
        return Check("gpu", False, f"the profile's parameters ask for device={device}, but no CUDA GPU is visible "
                     f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none, a CPU-only build'})",
                     "run on a machine with an NVIDIA GPU and a CUDA build of torch (environment.yml), or pass "
                     "--param device=cpu (far slower)")
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    props = torch.cuda.get_device_properties(index)
    needs = {task: training_step_bytes(ex, task, built) for task in ex.tasks()}
    known = {t: n for t, n in needs.items() if n is not None}
    have = f"{props.name}, {_gib(props.total_memory)}"
    if not known:
        return Check("gpu", True, f"{have}; memory not estimated (the recognizers did not build: see above)")
    task, (need, what) = max(known.items(), key=lambda kv: kv[1][0])
    detail = (f"{have}; one training step needs about {_gib(need)} ({what}; estimate: fp32 activations measured at "
              "64x64 and scaled, weights, gradients and Adam states; bf16 autocast needs less)")
    return Check("gpu", props.total_memory >= need, detail,
                 f"lower tasks.{task}.train.batch_size, spread the batch over several GPUs "
                 "(papermill_runs/train_ddp.py: batch_size is the global batch), or use a GPU with more memory")


# ----------------------------------------------------------------------------------------------- all together
def run_checks(profile: str, overrides: dict[str, Any] | None = None, device: str = "cpu",
               run_dir: str | Path | None = None) -> list[Check]:
    """Every check of ``profile`` (a name or a profile file, with dotted ``overrides``) for a run on ``device``."""
    ex = Experiment(profile, run_dir=run_dir, overrides=overrides, device="cpu", log=None)
    checks = [Check(name, ok, detail, fix) for name, ok, detail, fix in ex.source.verify(ex.tasks())]
    checks += check_backends(ex)
    built: dict[str, Any] = {}
    checks.append(check_start_codec(ex, built))
    checks += [check_recognizer(ex, task, built) for task in ex.tasks()]
    checks.append(check_run_checkpoints(ex))
    checks.append(check_disk(ex, built))
    checks.append(check_gpu(ex, device, built))
    return checks


def report(checks: list[Check], say: Callable[[str], None] = print) -> bool:
    """Print one line per check and a summary; True when every check is OK."""
    for check in checks:
        say(check.line())
    failed = [c.name for c in checks if not c.ok]
    say(f"pre-flight: {len(checks) - len(failed)} OK, {len(failed)} FAIL" + (f" ({', '.join(failed)})" if failed
                                                                              else ""))
    return not failed
