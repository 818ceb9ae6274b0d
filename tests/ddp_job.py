"""A tiny ICM training + evaluation job for tests/test_distributed.py, run as one process or under torchrun.

Usage: ``torchrun --standalone --nproc_per_node=2 tests/ddp_job.py WORLD_DIR OUT_DIR`` (gloo, CPU) or
``python tests/ddp_job.py WORLD_DIR OUT_DIR`` (single process). Global batch 4 in both cases.

For an EXACT comparison of N ranks x B/N with one process x B, the only randomness inside the step is made a
function of the data: CompressAI's training noise becomes a fixed function of the latent value, dropout is off
(``deterministic_patches``) and the aux branch has no BatchNorm (``no_batchnorm``). Everything else (data order, crops,
per-image-mean losses, DDP's gradient average) is what the real runs use. The job trains in float64 (``DTYPE``): the
two computations sum the same per-image gradients in a different order, and in float32 Adam turns that rounding into
whole learning-rate steps on coordinates whose gradient is near zero; in float64 the rounding is ~1e-16 relative, far
below Adam's eps, so the two runs agree to ~1e-12 on any CPU (see ``test_distributed``). Every write through
``icm_helpers.io`` is recorded per rank in OUT_DIR/writes_rank<r>.txt.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

SEG_CFG = dict(width=8, head_channels=16, low_channels=8)
AUX_SEG_CFG = dict(width=0.125, aspp_dilations=(1, 2, 4, 6))


def deterministic_patches() -> list:
    """Make the step's random draws a function of the data (returns undo callables)."""
    from compressai.entropy_models import EntropyModel

    orig = EntropyModel.quantize

    def quantize(self, inputs, mode, means=None):
        if mode == "noise":  # "uniform noise" that is the same for an image wherever it is computed
            return inputs + (0.5 * torch.sin(997.0 * inputs)).detach()
        return orig(self, inputs, mode, means)

    EntropyModel.quantize = quantize
    return [lambda: setattr(EntropyModel, "quantize", orig)]


def no_dropout(*modules) -> None:
    for m in modules:
        for sub in m.modules():
            if isinstance(sub, (torch.nn.Dropout, torch.nn.Dropout2d)):
                sub.p = 0.0


def no_batchnorm(module) -> None:
    """BatchNorm layers -> Identity (in place). The aux branch trains its BatchNorm in train mode, whose batch
    statistics over B/N images per rank differ from those over B images: on CUDA ``wrap_trainables`` converts them to
    SyncBatchNorm (statistics over the global batch), which PyTorch does not offer on CPU / gloo."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
            setattr(module, name, torch.nn.Identity())
        else:
            no_batchnorm(child)


def record_writes(out_dir: Path, rank: int) -> None:
    """Log every atomic write of this process (rank, path) to OUT_DIR/writes_rank<r>.txt."""
    import icm_helpers.io as io_

    real = io_.atomic_write_bytes
    log = out_dir / f"writes_rank{rank}.txt"

    def atomic_write_bytes(path, data):
        with open(log, "a") as fh:
            fh.write(f"{path}\n")
        return real(path, data)

    io_.atomic_write_bytes = atomic_write_bytes
    import icm_helpers.figures as fig_

    fig_.atomic_write_bytes = atomic_write_bytes


DTYPE = torch.float64


def start_modules(dtype: torch.dtype = DTYPE):
    """The codec and aux branch before training (fixed seed), in ``dtype``."""
    from icm_helpers.aux_branches import build_aux_branch
    from icm_helpers.codec import build_codec

    torch.manual_seed(1)
    codec = build_codec(N=16)
    aux = build_aux_branch("segmentation", "enc", 16, 3, **AUX_SEG_CFG)
    no_batchnorm(aux)
    return codec.to(dtype), aux.to(dtype)


def train(world: Path, checkpoint: Path, device: str = "cpu", dtype: torch.dtype = DTYPE):
    """Tiny segmentation ICM job (codec N=16, aux-enc): 2 epochs x 2 steps, global batch 4, 64x64 crops of 64x64,
    every tensor (images, recognizer, codec, branch) in ``dtype``."""
    from icm_helpers.data import IcmDataset
    from icm_helpers.recognizers import build_recognizer
    from icm_helpers.training import IcmSpec, InMemory, TrainConfig, train_icm

    train_set = InMemory(IcmDataset(world / "train"))
    for item in train_set.items:
        item["image"] = item["image"].to(dtype)
    torch.manual_seed(0)
    rec = build_recognizer("segmentation", "suite", 3, **SEG_CFG).freeze().to(dtype)
    codec, aux = start_modules(dtype)
    no_dropout(aux, rec)
    spec = IcmSpec("segmentation", 2.0, "enc", 0.5, add_mse=True)
    cfg = TrainConfig(epochs=2, batch_size=4, lr=1e-3, crop_size=64, steps_per_epoch=2, poly_start_frac=0.5)
    res = train_icm(spec, codec, rec, aux, train_set, cfg, checkpoint, log=None, device=device)
    return codec, aux, res


def evaluate_both(world: Path, codec) -> dict:
    """Sharded (under torchrun) evaluation of ``codec`` with a tiny detector and segmenter (random weights)."""
    from icm_helpers.data import IcmDataset
    from icm_helpers.evaluation import evaluate
    from icm_helpers.recognizers import build_recognizer

    from conftest import DET_CFG

    test_set = IcmDataset(world / "test")
    torch.manual_seed(0)
    det = build_recognizer("detection", "suite", 3, **DET_CFG).freeze()
    torch.manual_seed(0)
    seg = build_recognizer("segmentation", "suite", 3, **SEG_CFG).freeze()
    out = {}
    for name, rec in (("detection", det), ("segmentation", seg)):
        ev = evaluate(codec, rec, test_set, bitstream=True)
        ev.pop("seconds")
        out[name] = ev
    return out


def main(world: Path, out: Path) -> None:
    from icm_helpers import distributed as dist_lib
    from icm_helpers.io import atomic_torch_save, atomic_write_json

    torch.set_num_threads(1)
    info = dist_lib.init_from_env()
    r = info["rank"]
    out.mkdir(parents=True, exist_ok=True)
    record_writes(out, r)
    deterministic_patches()
    if (
        os.environ.get("ICM_DDP_JOB_FAULT") == "no_gradient_average"
    ):  # negative control: each rank keeps its own gradient
        dist_lib.wrap_trainables = lambda codec, aux_branch, device: (codec, aux_branch)
    codec, aux, res = train(world, out / "train_state.pt")
    # every rank's trained weights must agree (DDP keeps them in sync)
    flat = torch.cat([p.detach().flatten() for p in codec.parameters()])
    sums = dist_lib.all_gather_object((float(flat.sum()), float(flat.abs().sum())))
    # evaluation runs in float32 on the codec rebuilt from the saved weights, exactly as the single-process side of
    # test_sharded_evaluation_equals_single_process rebuilds it
    from icm_helpers.codec import build_codec, load_codec_state

    eval_codec = build_codec(N=16)
    load_codec_state(eval_codec, {k: v.float() if v.is_floating_point() else v for k, v in codec.state_dict().items()})
    ev = evaluate_both(world, eval_codec)
    from matplotlib.figure import Figure

    from icm_helpers.figures import save_figure

    fig = Figure()
    fig.add_subplot().plot([0, 1])
    save_figure(fig, "ddp_probe", {"x": [0, 1]}, "test", figures_dir=out / "figures")
    if dist_lib.is_main():
        atomic_torch_save({"codec": codec.state_dict(), "aux": aux.state_dict()}, out / "weights.pt")
        atomic_write_json(
            out / "result.json",
            {"world_size": info["world_size"], "rank_sums": sums, "history": res.history, "eval": ev},
        )
    dist_lib.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
