"""Prepared directory, synthetic generator and the CocoDetection dataset (numpy index, draft mode, EXIF)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from rtcodetr.data.dataset import CocoDetection, ImageDecodeError
from rtcodetr.data.prepared import LabelMap, PreparedData, PreparedDataError, SplitRecords, write_prepared
from rtcodetr.data.synthetic import make_synthetic
from rtcodetr.data.transforms import build_transforms


def test_synthetic_fixture_is_a_complete_prepared_dir(synthetic_data):
    d = synthetic_data
    assert isinstance(d, PreparedData)
    for f in ("dataset.json", "label_map.json", "train.json", "val.json", "test.json", "report.json"):
        assert (d.root / f).is_file(), f
    assert d.image_root.is_absolute() and d.image_root.is_relative_to(d.root)
    assert d.label_map.num_labels == 4 and d.label_map.names[0] == "bottle_cap"
    assert {s: v["num_images"] for s, v in d.info["splits"].items()} == {"train": 16, "val": 8, "test": 8}
    ids = [set(d.image_ids(s)) for s in ("train", "val", "test")]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    for split in ("train", "val", "test"):
        coco = d.coco(split)
        ann_ids = [a["id"] for a in coco["annotations"]]
        assert ann_ids == list(range(1, len(ann_ids) + 1))
        assert {c["id"] for c in coco["categories"]} == {1, 2, 3, 4}
        sizes = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
        n_per_image = np.bincount([a["image_id"] for a in coco["annotations"]])
        assert n_per_image.max() <= 4
        assert all(im["orientation"] == "raw" for im in coco["images"])
        for a in coco["annotations"]:
            x, y, w, h = a["bbox"]
            iw, ih = sizes[a["image_id"]]
            assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= iw and y + h <= ih
            assert 24 * 128 / 256 - 1 <= max(w, h) <= 120 * 128 / 256 + 1  # object sizes scale with the image
    fp = d.fingerprint("val")
    assert fp["image_ids"] == d.image_ids("val") and len(fp["annotations_sha256"]) == 64


def test_synthetic_is_deterministic_and_seeded(tmp_path, synthetic_data):
    a = make_synthetic(tmp_path / "a", train=3, val=2, test=1, size=64, seed=5)
    b = make_synthetic(tmp_path / "b", train=3, val=2, test=1, size=64, seed=5)
    c = make_synthetic(tmp_path / "c", train=3, val=2, test=1, size=64, seed=6)
    for split in ("train", "val", "test"):
        assert a.info["splits"][split]["sha256"] == b.info["splits"][split]["sha256"]
    assert (a.image_root / "train/000000.jpg").read_bytes() == (b.image_root / "train/000000.jpg").read_bytes()
    assert (a.image_root / "train/000000.jpg").read_bytes() != (c.image_root / "train/000000.jpg").read_bytes()
    # more training images do not change the validation images
    d = make_synthetic(tmp_path / "d", train=5, val=2, test=1, size=64, seed=5)
    assert (a.image_root / "val/000001.jpg").read_bytes() == (d.image_root / "val/000001.jpg").read_bytes()


def test_synthetic_objects_are_where_the_boxes_say(synthetic_data):
    """Inside each box the object colour dominates; the box is tight (object pixels touch all four sides)."""
    ds = CocoDetection(synthetic_data, "train")
    for i in range(4):
        img, t = ds.load(i)
        arr = np.asarray(img, dtype=np.float32)
        for box in t["boxes"].numpy().astype(int):
            x1, y1, x2, y2 = box
            patch = arr[y1:y2, x1:x2]
            sat = patch.max(-1) - patch.min(-1)  # objects are saturated colours, the ground is not
            obj = sat > 60
            assert obj.mean() > 0.3
            assert obj[:, 0].any() and obj[:, -1].any() and obj[0].any() and obj[-1].any()


def test_dataset_index_is_numpy_and_targets_follow_the_contract(synthetic_data):
    ds = CocoDetection(synthetic_data.root, "val", transforms=build_transforms(False, (64, 64)))
    assert isinstance(ds.image_ids, np.ndarray) and ds.image_ids.dtype == np.int64
    assert ds.image_ids.tolist() == synthetic_data.image_ids("val")
    for arr in (ds.boxes, ds.labels, ds.offsets, ds.file_names, ds.widths):
        assert isinstance(arr, np.ndarray) and arr.dtype != object
    coco = synthetic_data.coco("val")
    img, t = ds[0]
    assert img.shape == (3, 64, 64) and img.dtype == torch.float32
    assert t["image_id"] == coco["images"][0]["id"]
    assert t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64
    assert t["orig_size"].tolist() == [128, 128] and t["size"].tolist() == [64, 64]
    raw = [a for a in coco["annotations"] if a["image_id"] == t["image_id"]]
    exp = np.array([[x / 2, y / 2, (x + w) / 2, (y + h) / 2] for x, y, w, h in (a["bbox"] for a in raw)])
    np.testing.assert_allclose(t["boxes"].numpy(), exp, atol=1e-4)
    assert t["labels"].tolist() == [a["category_id"] - 1 for a in raw]
    with pytest.raises(IndexError):
        ds.load(len(ds))


def test_label_map_roundtrip_and_errors(tmp_path):
    lm = LabelMap(["a", "b"], ["s", "s"], [[0], [5, 7]])
    again = LabelMap.from_json(json.loads(json.dumps(lm.to_json())))
    assert again == lm and again.original_ids == [[0], [5, 7]] and again.fingerprint() == lm.fingerprint()
    assert lm.category_ids.tolist() == [1, 2] and lm.id2label == {0: "a", 1: "b"} and lm.label2id["b"] == 1
    assert lm.label_of_category(2) == 1
    with pytest.raises(KeyError, match="category_id 3"):
        lm.label_of_category(3)
    assert LabelMap(["b", "a"]).fingerprint() != lm.fingerprint()
    with pytest.raises(PreparedDataError, match="unique"):
        LabelMap(["a", "a"])
    with pytest.raises(PreparedDataError, match="dataset.json not found"):
        PreparedData.load(tmp_path)


def _tiny_prepared(tmp_path, images: list[dict], boxes: list[tuple[int, list[float]]]) -> PreparedData:
    recs = SplitRecords(images=images,
                        annotations=[{"image_id": i, "label": 0, "box_xyxy": b} for i, b in boxes])
    return write_prepared(tmp_path / "prep", name="tiny", image_root=tmp_path / "img", label_map=LabelMap(["x"]),
                          splits={"train": recs}, report={}, sources={}, settings={})


def test_exif_orientation_is_applied_when_recorded(tmp_path):
    """A 64x32 stored JPEG with EXIF orientation 6 (rotate 90 deg clockwise) is a 32x64 upright image."""
    (tmp_path / "img").mkdir()
    raw = np.zeros((32, 64, 3), dtype=np.uint8)
    raw[0:8, 0:8] = 255  # marker at the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(raw).save(tmp_path / "img" / "r.jpg", exif=exif.tobytes(), quality=95)
    data = _tiny_prepared(
        tmp_path,
        [{"id": 1, "file_name": "r.jpg", "width": 32, "height": 64, "orientation": "exif"},
         {"id": 2, "file_name": "r.jpg", "width": 64, "height": 32, "orientation": "raw"}],
        [(1, [24, 0, 32, 8])],
    )
    ds = CocoDetection(data, "train")
    up, t = ds.load(0)
    assert up.size == (32, 64) and t["size"].tolist() == [64, 32]
    arr = np.asarray(up).mean(-1)
    assert arr[:8, 24:].mean() > 200 and arr[:8, :8].mean() < 50  # the marker is now at the top-right
    stored, t2 = ds.load(1)
    assert stored.size == (64, 32) and len(t2["boxes"]) == 0


def test_draft_mode_scales_by_the_exact_dct_factor(tmp_path):
    (tmp_path / "img").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (250, 330, 3), dtype=np.uint8)).save(tmp_path / "img" / "a.jpg")
    data = _tiny_prepared(tmp_path, [{"id": 3, "file_name": "a.jpg", "width": 330, "height": 250,
                                      "orientation": "raw"}], [(3, [10, 20, 110, 220])])
    img, t = CocoDetection(data, "train", draft_size=60).load(0)
    # min(330 // 60, 250 // 60) = 4 -> scale 1/4, size ceil(330 / 4) x ceil(250 / 4)
    assert img.size == (83, 63) and t["size"].tolist() == [63, 83] and t["orig_size"].tolist() == [250, 330]
    np.testing.assert_allclose(t["affine"].numpy(), np.diag([0.25, 0.25, 1.0]))
    np.testing.assert_allclose(t["boxes"].numpy(), [[2.5, 5, 27.5, 55]])
    img_full, t_full = CocoDetection(data, "train", draft_size=300).load(0)
    assert img_full.size == (330, 250) and torch.equal(t_full["affine"], torch.eye(3, dtype=torch.float64))
    # a resize after draft decoding composes onto the draft scale. The 83 px draft row covers 332 original px
    # (the DCT decodes the last partial block whole), so original x maps to x / 4 * 64 / 83, not x * 64 / 330
    _, tr = CocoDetection(data, "train", transforms=build_transforms(False, (64, 64)), draft_size=60)[0]
    np.testing.assert_allclose(tr["affine"].numpy(), np.diag([64 / 332, 64 / 252, 1.0]), rtol=1e-12)


def test_draft_pixels_sit_where_the_affine_says(tmp_path):
    """Near the far edge of an image whose width is not a multiple of the DCT factor, a marker lands at x / 4
    (the recorded affine), not at x * draft_w / w."""
    (tmp_path / "img").mkdir()
    arr = np.full((250, 330, 3), 30, np.uint8)
    arr[100:140, 296:320] = 230  # columns 296..319 -> draft columns 74..79 exactly at scale 1/4
    Image.fromarray(arr).save(tmp_path / "img" / "m.jpg", quality=98)
    data = _tiny_prepared(tmp_path, [{"id": 1, "file_name": "m.jpg", "width": 330, "height": 250,
                                      "orientation": "raw"}], [(1, [296, 100, 320, 140])])
    img, t = CocoDetection(data, "train", draft_size=60).load(0)
    cols = np.nonzero(np.asarray(img, dtype=np.float32).mean(-1)[30] > 130)[0]
    assert (cols.min(), cols.max() + 1) == (74, 80)
    np.testing.assert_allclose(t["boxes"].numpy(), [[74, 25, 80, 35]])


def test_truncated_image_error_names_the_file(tmp_path):
    (tmp_path / "img").mkdir()
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(tmp_path / "img" / "t.jpg")
    data = _tiny_prepared(tmp_path, [{"id": 1, "file_name": "t.jpg", "width": 64, "height": 64,
                                      "orientation": "raw"}], [])
    full = (tmp_path / "img" / "t.jpg").read_bytes()
    (tmp_path / "img" / "t.jpg").write_bytes(full[: len(full) // 2])
    with pytest.raises(ImageDecodeError, match=r"t\.jpg.*image id 1"):
        CocoDetection(data, "train").load(0)


def test_writer_rejects_records_breaking_the_contract(tmp_path):
    ok = {"id": 1, "file_name": "a.jpg", "width": 10, "height": 10, "orientation": "raw"}
    with pytest.raises(PreparedDataError, match="image id 1.*bbox"):
        _tiny_prepared(tmp_path, [ok], [(1, [0, 0, 11, 5])])
    with pytest.raises(PreparedDataError, match="file_name.*'\\.\\.'"):
        _tiny_prepared(tmp_path, [dict(ok, file_name="../a.jpg")], [])
    with pytest.raises(PreparedDataError, match="orientation"):
        _tiny_prepared(tmp_path, [dict(ok, orientation="rot90")], [])


def test_non_rgb_files_decode_to_rgb(tmp_path):
    """Greyscale JPEG and palette PNG come out as RGB with the same pixels (RGB files skip the conversion copy)."""
    (tmp_path / "img").mkdir()
    grey = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (16, 1))  # 16 x 32
    Image.fromarray(grey).save(tmp_path / "img" / "g.png")
    Image.fromarray(grey).convert("P").save(tmp_path / "img" / "p.png")
    Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "img" / "c.png")
    data = _tiny_prepared(tmp_path, [{"id": k + 1, "file_name": f, "width": 32, "height": 16, "orientation": "raw"}
                                     for k, f in enumerate(("g.png", "p.png", "c.png"))], [])
    ds = CocoDetection(data, "train")
    for i in range(3):
        img, _ = ds.load(i)
        assert img.mode == "RGB" and img.size == (32, 16)
        np.testing.assert_array_equal(np.asarray(img), np.stack([grey] * 3, -1))
