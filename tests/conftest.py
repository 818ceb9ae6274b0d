import matplotlib

matplotlib.use("Agg")

import pytest
import torch

from icm_helpers.data import IcmDataset, WorldSpec, generate_world
from icm_helpers.training import InMemory

torch.set_num_threads(2)

SPEC = WorldSpec(image_size=64, n_classes=3, seed=0)
COUNTS = {"train": 16, "val": 4, "test": 4}
DET_CFG = dict(width=8, anchor_sizes=(16, 32, 64, 128, 256), fpn_channels=16, representation=32, box_batch_per_image=32,
               rpn_post_nms=(50, 50), score_threshold=0.0)
AUX_DET_CFG = dict(width=0.125, anchor_sizes=(16, 32, 64, 128, 256), fpn_channels=16, representation=32, box_batch_per_image=32,
                   rpn_post_nms=(50, 50))


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    generate_world(root, SPEC, COUNTS)
    return root


@pytest.fixture(scope="session")
def train_set(world):
    return InMemory(IcmDataset(world / "train"))
