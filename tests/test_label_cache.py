"""Pseudo-labels cached per image (``training.label_cache``): the training is bit-identical with and without the cache,
the recognizer runs only on images it has not labelled, and a wrong cache is caught by the same comparison."""
from __future__ import annotations

import pytest
import torch
from conftest import AUX_DET_CFG, DET_CFG

from icm_helpers.aux_branches import build_aux_branch
from icm_helpers.codec import build_codec
from icm_helpers.recognizers import build_recognizer
from icm_helpers.training import IcmSpec, TrainConfig, train_aux_branch, train_icm
from icm_helpers.training import label_cache
from icm_helpers.training.label_cache import PseudoLabelCache

SEG_CFG = dict(width=8, head_channels=16, low_channels=8)
AUX_SEG_CFG = dict(width=0.125, aspp_dilations=(1, 2, 3, 4))
MODEL_CFG = {"detection": (DET_CFG, AUX_DET_CFG), "segmentation": (SEG_CFG, AUX_SEG_CFG)}


def _models(task: str):
    rec_cfg, aux_cfg = MODEL_CFG[task]
    torch.manual_seed(0)
    rec = build_recognizer(task, "suite", 3, **rec_cfg).freeze()
    torch.manual_seed(1)
    return rec, build_codec(N=16), build_aux_branch(task, "enc", 16, 3, **aux_cfg)


def _count_calls(rec) -> list[int]:
    calls = [0]
    plain = rec.pseudo_labels

    def counted(images):
        calls[0] += images.shape[0]
        return plain(images)

    rec.pseudo_labels = counted
    return calls


def _train(task: str, train_set, tmp_path, cache: bool) -> tuple[dict[str, torch.Tensor], int]:
    """Three epochs of two batches over 8 images (each image is drawn once per epoch, in another batch each time),
    with validation after steps 0 and 6 on 4 more images; returns the final states and the images labelled."""
    rec, codec, aux = _models(task)
    calls = _count_calls(rec)
    cfg = TrainConfig(epochs=3, batch_size=4, lr=1e-3, crop_size=None, warmup_steps=2, cache_labels=cache)
    data = [train_set[i] for i in range(8)]
    val = [train_set[i] for i in range(8, 12)]
    spec = IcmSpec(task, 1.6, "enc", 0.5, add_mse=task == "segmentation")
    run = tmp_path / f"{task}_{cache}"
    train_icm(spec, codec, rec, aux, data, cfg, run / "state.pt", val_set=val, log=None, val_steps=[0, 6],
              curve_path=run / "curve.json", epoch_validation=False)
    state = {k: v.clone() for k, v in {**codec.state_dict(), **aux.state_dict()}.items()}
    # CompressAI's MaskedConv2d zeroes its masked-out weights in place at each forward (a validation forward after the
    # last step differs from none); the conv never uses them
    state["context_prediction.weight"] = state["context_prediction.weight"] * codec.context_prediction.mask
    return state, calls[0]


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_training_is_bit_identical_with_cached_labels_and_labels_each_image_once(task, train_set, tmp_path):
    plain, calls_plain = _train(task, train_set, tmp_path, cache=False)
    cached, calls_cached = _train(task, train_set, tmp_path, cache=True)
    _assert_same(plain, cached)
    # uncached: 6 steps x 4 images + 2 validations x 4; cached: the 8 training and 4 validation images once each
    assert calls_plain == 6 * 4 + 2 * 4
    assert calls_cached == 8 + 4


def test_a_cache_that_returns_another_images_labels_is_caught(train_set, tmp_path, monkeypatch):
    """The comparison above can fail: a cache that hands out the labels of the batch's next image on a hit (the bug a
    wrong key would make) changes the training."""
    plain, _ = _train("detection", train_set, tmp_path, cache=False)
    join = label_cache._join
    monkeypatch.setattr(label_cache, "_join", lambda entries: join(entries[1:] + entries[:1]))
    wrong, _ = _train("detection", train_set, tmp_path / "wrong", cache=True)
    with pytest.raises(AssertionError, match="tensors differ"):
        _assert_same(plain, wrong)


def test_stored_label_maps_come_back_with_their_values_and_dtype():
    class Maps:
        def pseudo_labels(self, images):
            return (images[:, 0] * 300).long()  # values up to 300: stored as int16, returned as int64

    cache, rec = PseudoLabelCache(), Maps()
    x = torch.rand(3, 3, 8, 8)
    first = cache(rec, x)
    again = cache(rec, x[[2, 0, 1]])
    assert again.dtype == torch.int64 and torch.equal(again, first[[2, 0, 1]])
    assert (cache.misses, cache.hits, len(cache)) == (3, 3, 3)


def test_the_branch_pretraining_is_identical_with_cached_labels(train_set, tmp_path):
    states = {}
    for cache in (False, True):
        rec, codec, aux = _models("detection")
        cfg = TrainConfig(epochs=2, batch_size=4, lr=1e-3, crop_size=None, cache_labels=cache)
        train_aux_branch("enc", aux, codec, rec, [train_set[i] for i in range(8)], cfg, tmp_path / f"b{cache}.pt",
                         val_set=[train_set[i] for i in range(8, 12)], log=None)
        states[cache] = {k: v.clone() for k, v in aux.state_dict().items()}
    _assert_same(states[False], states[True])


def test_cached_labels_need_whole_images():
    with pytest.raises(ValueError, match="cache_labels needs crop_size null"):
        TrainConfig(crop_size=256, cache_labels=True)


def test_the_cache_is_a_speed_knob_outside_a_jobs_identity():
    """A run trained without the cache is found again with it (and the reverse): same weights, same identity."""
    assert "cache_labels" not in TrainConfig(crop_size=None, cache_labels=True).job_meta()
    assert TrainConfig(crop_size=None, cache_labels=True).job_meta() == TrainConfig(crop_size=None).job_meta()
    block = {"epochs": 2, "lr": 1e-3, "cache_labels": True, "plateau": {"rel": 0.01}}
    assert TrainConfig.without_speed_knobs(block) == {"epochs": 2, "lr": 1e-3, "plateau": {"rel": 0.01}}
