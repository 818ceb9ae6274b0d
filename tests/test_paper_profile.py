"""The paper profile's data path through the Experiment: COCO 2017 on the real coco_tiny fixture, Pascal-Context-59
on a generated MMSeg-layout fixture. (Backends: tests/test_backend_*.py.)"""
from pathlib import Path

import pytest
import torch

from icm_helpers.experiment import Experiment
from icm_helpers.pascal_context import make_fixture
from icm_helpers.training import epoch_loader

COCO_TINY = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_tiny"
pytestmark = pytest.mark.skipif(not (COCO_TINY / "annotations" / "instances_val2017.json").is_file(),
                                reason=f"real-data fixture {COCO_TINY} not available")


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    voc = make_fixture(tmp_path_factory.mktemp("voc") / "VOC2010", n_train=3, n_val=2, seed=0)
    return Experiment(
        "paper",
        run_dir=tmp_path_factory.mktemp("run"),
        log=None,
        overrides={"data.coco_root": str(COCO_TINY), "data.pascal_context_root": str(voc), "data.val_images": 5},
    )


def test_prepare_data_verifies_both_datasets(paper):
    counts = paper.prepare_data()
    assert counts["detection"] == {"train": 80, "val": 5, "test": 80}
    assert counts["segmentation"] == {"train": 3, "val": 2, "test": 2}


def test_splits_follow_the_paper(paper):
    det = paper.dataset("test", "detection")[0]
    assert min(det["image"].shape[-2:]) == 800  # Sec. 4.1: shorter edge 800 (padding to 64 happens in evaluate)
    assert det["roi"].shape == det["image"].shape[-2:] and det["roi"].any()
    seg = paper.dataset("test", "segmentation")[0]
    assert tuple(seg["image"].shape[-2:]) == (520, 520)  # Sec. 4.1: 520x520
    voc = Path(paper.cfg["data"]["pascal_context_root"])
    from PIL import Image
    stem = (voc / "ImageSets" / "SegmentationContext" / "val.txt").read_text().split()[0]
    w, h = Image.open(voc / "SegmentationClassContext" / f"{stem}.png").size
    assert tuple(seg["semantic"].shape) == (h, w)  # evaluated on the ORIGINAL label map (MMSeg), logits resized to it
    assert tuple(paper.dataset("train", "segmentation")[0]["semantic"].shape) == (520, 520)
    with pytest.raises(ValueError, match="one dataset per task"):
        paper.dataset("train")
    assert paper.num_classes("detection") == 90 and paper.num_classes("segmentation") == 59


def test_coco_training_batches_are_256_crops(paper):
    """COCO images differ in size: the loader takes one 256x256 window per image (Sec. 4.1), deterministically."""
    train = paper.dataset("train", "detection")
    sub = torch.utils.data.Subset(train, range(4))
    batches = list(epoch_loader(sub, 2, seed=0, epoch=0, crop_size=256))
    assert [tuple(b["image"].shape) for b in batches] == [(2, 3, 256, 256)] * 2
    for b in batches:
        for boxes in b["boxes"]:
            assert ((boxes >= 0) & (boxes <= 256)).all()


def test_missing_dataset_gives_the_fix(tmp_path):
    ex = Experiment(
        "paper",
        run_dir=tmp_path / "run",
        log=None,
        overrides={"data.coco_root": str(tmp_path / "nowhere"), "data.pascal_context_root": str(tmp_path / "nothing")},
    )
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ex.prepare_data()


@pytest.mark.parametrize("task,backend,cfg", [
    ("detection", "torchvision", {"pretrained": False, "score_threshold": 0.0}),
    ("segmentation", "deeplabv3plus", {"pretrained": False}),
])
def test_pip_only_backends_behind_the_recognizer_protocol(task, backend, cfg):
    """A paper backend (random weights, no download) in the ICM training path: pseudo-labels, task loss, the
    aux-task branch fed by the backend's own stages, and where the gradient goes."""
    from icm_helpers.aux_branches import build_aux_branch
    from icm_helpers.codec import build_codec
    from icm_helpers.recognizers import build_recognizer
    from icm_helpers.training import IcmSpec, icm_terms

    torch.manual_seed(0)
    rec = build_recognizer(task, backend, 90 if task == "detection" else 59, **cfg).freeze()
    assert set(rec.feature_channels()) == {"conv2", "conv3", "conv4", "conv5"}
    codec = build_codec(N=16).train()
    aux_cfg = (
        {"width": 0.125, "rpn_post_nms": (50, 50), "box_batch_per_image": 32}
        if task == "detection"
        else {"width": 0.125}
    )
    aux = build_aux_branch(
        task, "task", 16, rec.num_outputs if task == "segmentation" else 90, recognizer=rec, **aux_cfg
    )
    x = torch.rand(2, 3, 128, 128)
    terms = icm_terms(IcmSpec(task, 1.0, "task", 0.5, add_mse=task == "segmentation"), codec, rec, aux, x)
    assert all(torch.isfinite(v) for v in terms.values())
    terms["loss"].backward()
    last = f"g_s.{len(codec.g_s) - 1}."
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in codec.named_parameters() if n.startswith(last))
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for n, p in codec.named_parameters() if n.startswith("g_a.")
    )
    assert all(p.grad is None for p in rec.parameters())


def test_evaluate_on_real_coco_images_end_to_end():
    """The one evaluation path on real COCO images at the paper's evaluation size (shorter edge 800, padded to a
    multiple of 64 inside evaluate): real bitstream, ROI from the GT masks, mAP against the original annotations."""
    from icm_helpers.codec import build_codec, update_entropy_tables
    from icm_helpers.coco import CocoDetection
    from icm_helpers.evaluation import evaluate
    from icm_helpers.recognizers import build_recognizer

    torch.manual_seed(0)
    ds = CocoDetection(COCO_TINY, "val2017", mode="eval", short_edge=800)
    rec = build_recognizer("detection", "torchvision", 90, pretrained=False, score_threshold=0.0).freeze()
    codec = build_codec(N=16).eval()
    update_entropy_tables(codec)
    res = evaluate(codec, rec, ds, max_images=1, roi_qf=1.4, roi_decoder="rescale")
    rec0 = res["per_image"][0]
    assert rec0["bpp_bitstream"] > rec0["bpp_side_info"] > 0 and 0 < rec0["roi_latent_fraction"] < 1
    assert res["metric_name"] == "mAP" and 0.0 <= res["metric"] <= 1.0
