import json

import numpy as np
import pytest
import torch
from PIL import Image

from icm_helpers.data import IcmDataset, WorldSpec, collate, generate_world, load_rgb, random_crop

from conftest import COUNTS, SPEC


def test_world_is_deterministic_and_in_coco_layout(world, tmp_path):
    generate_world(tmp_path / "again", SPEC, COUNTS)
    for split in ("train", "test"):
        a = json.loads((world / split / "instances.json").read_text())
        b = json.loads((tmp_path / "again" / split / "instances.json").read_text())
        assert a == b
        assert len(a["images"]) == COUNTS[split]
        assert {c["id"] for c in a["categories"]} == {1, 2, 3}
        assert np.array_equal(np.asarray(Image.open(world / split / "images" / "000000.png")),
                              np.asarray(Image.open(tmp_path / "again" / split / "images" / "000000.png")))


def test_world_refuses_to_overwrite_other_settings(world):
    with pytest.raises(FileExistsError, match="other settings"):
        generate_world(world, WorldSpec(image_size=96, seed=0), COUNTS)


def test_dataset_items_boxes_masks_semantic_agree(world):
    ds = IcmDataset(world / "test")
    assert ds.class_names == {1: "circle", 2: "square", 3: "triangle"}
    item = ds[0]
    assert item["image"].shape == (3, 64, 64) and 0 <= item["image"].min() and item["image"].max() <= 1
    assert item["boxes"].shape[1] == 4 and len(item["boxes"]) == len(item["labels"]) >= 1
    # the ROI (union of instance masks) is exactly the non-background of the semantic map
    assert torch.equal(item["roi"], item["semantic"] > 0)
    for (x0, y0, x1, y1), lab in zip(item["boxes"].long().tolist(), item["labels"].tolist()):
        assert (item["semantic"][y0:y1, x0:x1] == lab).any()


def test_missing_split_gives_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="01_data_prep"):
        IcmDataset(tmp_path / "nope")


def test_corrupt_image_named_in_error(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match="bad.png"):
        load_rgb(bad)


def test_grayscale_and_rgba_become_rgb(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "g.png")
    Image.fromarray(np.zeros((8, 8, 4), np.uint8)).save(tmp_path / "a.png")
    assert load_rgb(tmp_path / "g.png").shape == (8, 8, 3)
    assert load_rgb(tmp_path / "a.png").shape == (8, 8, 3)


def test_random_crop_shifts_and_clips_boxes(world):
    ds = IcmDataset(world / "train")
    batch = collate([ds[0], ds[1]])
    crop = random_crop(batch, 32, torch.Generator().manual_seed(0))
    assert crop["image"].shape[-2:] == (32, 32) and crop["semantic"].shape[-2:] == (32, 32)
    for b in crop["boxes"]:
        assert (b >= 0).all() and (b <= 32).all()


def test_crop_item_pads_small_images_and_keeps_boxes_consistent():
    from icm_helpers.data import collate, crop_item

    g = torch.Generator().manual_seed(0)
    small = {
        "image": torch.rand(3, 40, 300),
        "image_id": 1,
        "boxes": torch.tensor([[10.0, 5.0, 60.0, 35.0]]),
        "labels": torch.tensor([3]),
        "roi": torch.ones(40, 300, dtype=torch.bool),
        "semantic": torch.zeros(40, 300, dtype=torch.int64),
    }
    out = crop_item(small, 64, g)
    assert out["image"].shape == (3, 64, 64) and out["roi"].shape == (64, 64) and out["semantic"].shape == (64, 64)
    assert (out["semantic"][40:] == 255).all() and not out["roi"][40:].any() and (out["image"][:, 40:] == 0).all()
    b = out["boxes"]
    assert ((b >= 0) & (b <= 64)).all() and len(b) == len(out["labels"])
    big = {
        "image": torch.rand(3, 100, 80),
        "image_id": 2,
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "roi": torch.zeros(100, 80, dtype=torch.bool),
        "semantic": torch.zeros(100, 80, dtype=torch.int64),
    }
    batch = collate([crop_item(small, 64, g), crop_item(big, 64, g)])
    assert batch["image"].shape == (2, 3, 64, 64)


def test_epoch_loader_crops_images_of_different_sizes():
    from icm_helpers.training import epoch_loader

    items = [
        {
            "image": torch.rand(3, 70 + 10 * i, 90 - 5 * i),
            "image_id": i,
            "boxes": torch.zeros(0, 4),
            "labels": torch.zeros(0, dtype=torch.int64),
            "roi": torch.zeros(70 + 10 * i, 90 - 5 * i, dtype=torch.bool),
        }
        for i in range(4)
    ]
    batches = list(epoch_loader(items, 2, seed=0, epoch=0, crop_size=64))
    assert [b["image"].shape for b in batches] == [(2, 3, 64, 64)] * 2
    again = list(epoch_loader(items, 2, seed=0, epoch=0, crop_size=64))
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(batches, again))  # deterministic given (seed, epoch)


def test_an_interrupted_generation_is_not_marked_finished_and_the_rerun_equals_an_unbroken_one(tmp_path, monkeypatch):
    """world.json is written only after every image and label file (files are written without fsync, then one
    os.sync): a generation stopped halfway leaves no world.json and no half-written file under a real name, and
    generating again gives byte for byte the files of an unbroken generation."""
    import icm_helpers.data as data

    counts = {"train": 6, "val": 2, "test": 2}
    unbroken = generate_world(tmp_path / "unbroken", SPEC, counts)
    real_render, calls = data.render_image, []

    def render_then_stop(spec, rng):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt("stopped halfway")
        return real_render(spec, rng)

    monkeypatch.setattr(data, "render_image", render_then_stop)
    with pytest.raises(KeyboardInterrupt):
        generate_world(tmp_path / "broken", SPEC, counts)
    broken = tmp_path / "broken"
    assert not (broken / "world.json").exists()
    assert not [p for p in broken.rglob("*") if p.name.endswith(".tmp")]
    monkeypatch.setattr(data, "render_image", real_render)
    synced = []
    monkeypatch.setattr(data.os, "sync", lambda: synced.append(1))
    generate_world(broken, SPEC, counts)
    assert synced == [1] and (broken / "world.json").exists()
    files = sorted(p.relative_to(unbroken) for p in unbroken.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(broken) for p in broken.rglob("*") if p.is_file())
    for rel in files:
        assert (unbroken / rel).read_bytes() == (broken / rel).read_bytes(), rel
