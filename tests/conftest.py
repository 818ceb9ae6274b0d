import os

os.environ.setdefault("ICM_PROGRESS", "off")  # no progress bars in the test logs (icm_helpers.progress)

import matplotlib

matplotlib.use("Agg")

import pytest
import torch

from icm_helpers.data import IcmDataset, WorldSpec, generate_world
from icm_helpers.training import Callback, InMemory
# paper_backend tests: a skip fails under ICM_REQUIRE_PAPER_BACKENDS=1; the summary lists them with their times
from paper_backends import pytest_runtest_makereport, pytest_terminal_summary  # noqa: F401

torch.set_num_threads(int(os.environ.get("ICM_TEST_THREADS", "2")))  # the tolerance audit also runs 1

SPEC = WorldSpec(image_size=64, n_classes=3, seed=0)
COUNTS = {"train": 16, "val": 4, "test": 4}
DET_CFG = dict(width=8, anchor_sizes=(16, 32, 64, 128, 256), fpn_channels=16, representation=32, box_batch_per_image=32,
               rpn_post_nms=(50, 50), score_threshold=0.0)
AUX_DET_CFG = dict(
    width=0.125,
    anchor_sizes=(16, 32, 64, 128, 256),
    fpn_channels=16,
    representation=32,
    box_batch_per_image=32,
    rpn_post_nms=(50, 50),
)


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    generate_world(root, SPEC, COUNTS)
    return root


@pytest.fixture(scope="session")
def train_set(world):
    return InMemory(IcmDataset(world / "train"))


class StopAfterEpoch(Callback):
    """Ends a run of ``fit`` after epoch ``n``'s checkpoint (1-based, counted over the whole job), as if it were
    killed there; asked only after an epoch this run trained, not on resume."""

    def __init__(self, n: int):
        self.n, self.ended = n, False

    def after_epoch(self, state, record):
        self.ended = record["epoch"] >= self.n

    def should_stop(self, state):
        return self.ended


def tiny_icm_job(checkpoint, train_set, cfg):
    """The tiny detection ICM job (codec N=16 + aux-enc branch, fixed seeds) shared by the resume test and the
    kill/resume stress script; returns (codec, aux, FitResult, (spec, recognizer))."""
    from icm_helpers.aux_branches import build_aux_branch
    from icm_helpers.codec import build_codec
    from icm_helpers.recognizers import build_recognizer
    from icm_helpers.training import IcmSpec, train_icm

    torch.manual_seed(0)
    rec = build_recognizer("detection", "suite", 3, **DET_CFG).freeze()
    torch.manual_seed(1)
    codec = build_codec(N=16)
    aux = build_aux_branch("detection", "enc", 16, 3, **AUX_DET_CFG)
    spec = IcmSpec("detection", 1.6, "enc", 0.5)
    res = train_icm(spec, codec, rec, aux, train_set, cfg, checkpoint, log=None)
    return codec, aux, res, (spec, rec)


if os.environ.get("ICM_TOLERANCE_LOG"):  # tolerance audit (tests/tolerance_audit.py); nothing is patched otherwise
    import tolerance_log

    tolerance_log.install(os.environ["ICM_TOLERANCE_LOG"])
