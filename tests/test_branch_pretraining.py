"""The aux branch's pre-training block (``tasks.<task>.aux_warm_start``): one rule splits it into its training
settings and its own keys (plateau, seed, name), for the pre-training and for the shipped branch's timing alike."""
from __future__ import annotations

import pytest

from icm_helpers.branch_pretraining import BLOCK_KEYS, PretrainingBlock, warm_aux_branch, warm_config
from icm_helpers.experiment import Experiment
from icm_helpers.training import TrainConfig


def test_a_block_splits_into_training_settings_and_its_own_keys():
    block = {"epochs": 3, "steps_per_epoch": 2, "batch_size": 4, "lr": 1e-3, "crop_size": None, "cache_labels": True,
             "plateau": {"rel": 0.01, "patience": 2}, "seed": "1", "name": "b"}
    parsed = PretrainingBlock.parse(block)
    assert parsed.train == TrainConfig(epochs=3, steps_per_epoch=2, batch_size=4, lr=1e-3, crop_size=None,
                                       cache_labels=True)  # the speed knobs stay: they decide how it runs
    assert (parsed.plateau, parsed.seed, parsed.name) == ({"rel": 0.01, "patience": 2}, 1, "b")
    assert BLOCK_KEYS == ("plateau", "seed", "name")
    bare = PretrainingBlock.parse({"epochs": 1})
    assert (bare.plateau, bare.seed, bare.name) == (None, None, None)
    with pytest.raises(ValueError, match="unknown training settings"):
        PretrainingBlock.parse({"epochs": 1, "patience": 2})  # a plateau key outside its block


def test_the_identity_drops_the_speed_knobs_and_a_missing_block_names_the_setting(tmp_path):
    ex = Experiment("smoke", run_dir=tmp_path, log=None)
    block = ex.cfg["tasks"]["detection"]["aux_warm_start"]
    ex.cfg["tasks"]["detection"]["aux_warm_start"] = {**block, "cache_labels": False, "num_workers": 2}
    assert warm_config(ex, "detection") == block  # speed knobs are no part of the identity
    ex.cfg["tasks"]["detection"]["aux_warm_start"] = None
    with pytest.raises(ValueError, match=r"tasks.detection.aux_warm_start"):
        warm_aux_branch(ex, "detection", "enc", 0)
