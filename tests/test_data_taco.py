"""The data stage on real TACO (the 80-photo sample and the official 1500-image file) and on hand-made bad inputs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rtcodetr.data.cli import main as data_main
from rtcodetr.data.coco import DatasetError, PrepareConfig, build_label_map, read_coco, run, split_ids
from rtcodetr.data.dataset import CocoDetection
from rtcodetr.data.prepared import PreparedData
from rtcodetr.data.yolo import export_yolo, yolo_file_stem


# ------------------------------------------------------------------------------------------------ real TACO
@pytest.fixture(scope="module")
def taco_prepared(taco_sample, tmp_path_factory) -> PreparedData:
    out = tmp_path_factory.mktemp("taco_sample")
    return run(PrepareConfig(annotations=taco_sample["annotations"], images=taco_sample["images"], out=out,
                             progress=False))


@pytest.fixture(scope="module")
def taco_official(taco_sample, tmp_path_factory) -> Path:
    """The official annotation file against the 80 sample photos, through the real command line."""
    out = tmp_path_factory.mktemp("taco_official")
    rc = data_main(["taco", "--annotations", str(taco_sample["official"]), "--images", str(taco_sample["images"]),
                    "--out", str(out), "--skip-missing", "--val-ids", str(taco_sample["seed_val_ids"])])
    assert rc == 0
    return out


def test_sample_prepared_with_stable_label_map(taco_prepared, taco_sample):
    d = taco_prepared
    report = json.loads((d.root / "report.json").read_text())
    assert d.label_map.num_labels == 60  # all categories keep a label, 6 of them unused in the sample
    assert d.label_map.original_ids == [[i] for i in range(60)]
    assert d.label_map.names[35] == "Plastified paper bag"
    assert report["counts"] == {"images_in_file": 80, "annotations_in_file": 246, "categories_in_file": 60,
                                "images_kept": 80, "annotations_kept": 246}
    assert report["fixes"]["category_ids_remapped"] == 60 and report["fixes"]["boxes_clamped"] == 0
    assert len(report["labels_without_annotations"]) == 6
    assert {s: v["num_images"] for s, v in d.info["splits"].items()} == {"train": 64, "val": 8, "test": 8}
    # every source box is written once, unchanged (no clamping needed in the sample), with category id + 1
    src = read_coco(taco_sample["annotations"])
    by_src = {a["id"]: a for a in src["annotations"]}
    written = [a for s in d.splits for a in d.coco(s)["annotations"]]
    assert len(written) == 246
    for a in written:
        s = by_src[a["source_id"]]
        assert a["category_id"] == s["category_id"] + 1
        np.testing.assert_allclose(a["bbox"], s["bbox"], atol=1e-4)
    for s in d.splits:
        assert [a["id"] for a in d.coco(s)["annotations"]] == list(range(1, d.info["splits"][s]["num_annotations"] + 1))
        assert all(im["orientation"] == "raw" for im in d.coco(s)["images"])  # no EXIF tag in these 80


def test_sample_loads_in_the_dataset_with_draft_mode(taco_prepared):
    ds = CocoDetection(taco_prepared, "val", draft_size=320)
    img, t = ds.load(0)
    oh, ow = t["orig_size"].tolist()
    s = t["affine"][0, 0].item()
    assert s in (0.5, 0.25) and img.size == (int(np.ceil(ow * s)), int(np.ceil(oh * s))) and min(img.size) >= 320


def test_official_file_fixes_are_counted(taco_official, taco_sample):
    d = PreparedData.load(taco_official)
    report = json.loads((d.root / "report.json").read_text())
    fixes = report["fixes"]
    assert fixes["duplicate_annotation_ids"] == 2 and fixes["duplicate_annotation_id_values"] == [309, 4040]
    assert fixes["boxes_clamped"] == 7
    assert fixes["zero_area_boxes_dropped"] == 0
    assert fixes["category_ids_remapped"] == 60  # 0-based ids 0..59 -> category ids 1..60
    assert fixes["missing_images_dropped"] == 1420
    assert fixes["annotations_of_dropped_images"] == 4784 - 246
    assert report["counts"]["images_in_file"] == 1500 and report["counts"]["annotations_in_file"] == 4784
    assert report["unused_labels_in_file"] == ["Plastified paper bag"]
    assert report["file_name_extensions"] == {".jpg": 833, ".JPG": 667}
    assert d.label_map.num_labels == 60
    # the pinned validation split is the seed benchmark's ids that exist among the sample photos
    pinned = {int(x) for x in taco_sample["seed_val_ids"].read_text().split()}
    present = {im["id"] for s in d.splits for im in d.coco(s)["images"]}
    assert len(pinned) == 225 and len(present) == 80
    assert set(d.image_ids("val")) == pinned & present
    assert report["split"]["val_pinned_ids_dropped"] == 225 - len(pinned & present)
    assert not set(d.image_ids("train")) & pinned and not set(d.image_ids("test")) & pinned
    assert d.info["sources"]["val_ids"]["sha256"]
    # every written annotation of every split lies inside its image
    for s in d.splits:
        coco = d.coco(s)
        size = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
        for a in coco["annotations"]:
            x, y, w, h = a["bbox"]
            assert x >= 0 and y >= 0 and w > 0 and h > 0
            assert x + w <= size[a["image_id"]][0] + 1e-6 and y + h <= size[a["image_id"]][1] + 1e-6


def test_official_file_supercategories():
    taco = Path(__file__).resolve().parents[2] / "shared/data/taco/annotations.json"
    if not taco.is_file():
        pytest.skip("no TACO")
    cats = read_coco(taco)["categories"]
    lm, label_of = build_label_map(taco, cats, "supercategories")
    assert lm.num_labels == 28
    assert sorted(i for ids in lm.original_ids for i in ids) == list(range(60))
    for cid, label in label_of.items():
        assert lm.names[label] == cats[[c["id"] for c in cats].index(cid)]["supercategory"]


def test_official_file_without_skip_missing_fails_with_count(taco_sample, tmp_path, capsys):
    rc = data_main(["taco", "--annotations", str(taco_sample["official"]), "--images", str(taco_sample["images"]),
                    "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "1420 of 1500 images" in err and "batch_1/000006.jpg" in err and "--skip-missing" in err
    assert not (tmp_path / "o" / "dataset.json").exists()


def test_split_is_seeded_reproducible_and_disjoint():
    ids = list(range(1500))
    a, _ = split_ids(ids, val_fraction=0.1, test_fraction=0.1, seed=0)
    b, _ = split_ids(list(reversed(ids)), val_fraction=0.1, test_fraction=0.1, seed=0)
    c, _ = split_ids(ids, val_fraction=0.1, test_fraction=0.1, seed=1)
    assert a == b and a != c
    assert [len(a[s]) for s in ("train", "val", "test")] == [1200, 150, 150]
    assert set(a["train"]) | set(a["val"]) | set(a["test"]) == set(ids)
    assert not set(a["train"]) & set(a["val"]) and not set(a["val"]) & set(a["test"])
    p, info = split_ids(ids, val_fraction=0.1, test_fraction=0.1, seed=0, val_ids=[5, 7], test_ids=[9])
    assert p["val"] == [5, 7] and p["test"] == [9] and len(p["train"]) == 1497
    with pytest.raises(DatasetError, match="--val-ids.*not image ids"):
        split_ids(ids, val_fraction=0.1, test_fraction=0.1, seed=0, val_ids=[99999])
    with pytest.raises(DatasetError, match="share image ids"):
        split_ids(ids, val_fraction=0.1, test_fraction=0.1, seed=0, val_ids=[1], test_ids=[1])


def test_sample_split_is_reproducible_through_run(taco_prepared):
    ids = sorted(im for s in taco_prepared.splits for im in taco_prepared.image_ids(s))
    expected, _ = split_ids(ids, val_fraction=0.1, test_fraction=0.1, seed=0)
    assert {s: taco_prepared.image_ids(s) for s in ("train", "val", "test")} == expected


def test_yolo_export_labels_match_coco_boxes(taco_official, tmp_path):
    d = PreparedData.load(taco_official)
    yaml_path = export_yolo(d, tmp_path / "yolo")
    import yaml

    cfg = yaml.safe_load(yaml_path.read_text())
    assert cfg["names"] == {i: n for i, n in enumerate(d.label_map.names)} and cfg["nc"] == 60
    assert cfg["val"] == "images/val"
    total = 0
    for s in d.splits:
        coco = d.coco(s)
        anns: dict[int, list] = {}
        for a in coco["annotations"]:
            anns.setdefault(a["image_id"], []).append(a)
        for im in coco["images"]:
            img = tmp_path / "yolo" / "images" / s / yolo_file_stem(im["file_name"])
            assert img.is_symlink() and img.resolve() == (d.image_root / im["file_name"]).resolve()
            rows = [r.split() for r in (tmp_path / "yolo" / "labels" / s / (img.stem + ".txt")).read_text().splitlines()]
            got = np.array([[float(v) for v in r[1:]] for r in rows]).reshape(-1, 4)
            W, H = im["width"], im["height"]
            exp = np.array([[(x + w / 2) / W, (y + h / 2) / H, w / W, h / H] for x, y, w, h in
                            (a["bbox"] for a in anns.get(im["id"], []))]).reshape(-1, 4)
            assert [int(r[0]) for r in rows] == [a["category_id"] - 1 for a in anns.get(im["id"], [])]
            np.testing.assert_allclose(got, exp, atol=1e-6)
            total += len(rows)
    assert total == 246


# --------------------------------------------------------------------------------------- hand-made inputs
def _jpeg(path: Path, w: int, h: int, orientation: int | None = None, seed: int = 0) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    kw = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    Image.fromarray(arr).save(path, quality=90, **kw)
    return path.read_bytes()


def _coco(tmp_path: Path, images: list[dict], annotations: list[dict], categories=None) -> Path:
    cats = categories if categories is not None else [
        {"id": 0, "name": "can", "supercategory": "metal"},
        {"id": 1, "name": "cap", "supercategory": "metal"},
        {"id": 2, "name": "bag", "supercategory": "plastic"},  # never annotated
    ]
    p = tmp_path / "ann.json"
    p.write_text(json.dumps({"images": images, "annotations": annotations, "categories": cats}))
    return p


def _prep(tmp_path: Path, ann: Path, *extra: str) -> tuple[int, PreparedData | None]:
    out = tmp_path / "out"
    rc = data_main(["taco", "--annotations", str(ann), "--images", str(tmp_path / "img"), "--out", str(out), *extra])
    return rc, (PreparedData.load(out) if rc == 0 else None)


@pytest.fixture
def small(tmp_path):
    """Four images exercising every fix: EXIF rotated, EXIF ignored, extension case, plain."""
    img = tmp_path / "img"
    _jpeg(img / "a" / "rot.jpg", 40, 20, orientation=6)  # stored 40x20, shown 20x40
    _jpeg(img / "a" / "raw.jpg", 40, 20, orientation=8)  # annotated in the stored frame
    _jpeg(img / "b" / "case.JPG", 30, 30, orientation=3)  # 180 degrees: same size either way
    _jpeg(img / "b" / "plain.jpg", 32, 24)
    images = [
        {"id": 0, "file_name": "a/rot.jpg", "width": 20, "height": 40},
        {"id": 1, "file_name": "a/raw.jpg", "width": 40, "height": 20},
        {"id": 2, "file_name": "b/case.jpg", "width": 30, "height": 30},
        {"id": 3, "file_name": "b/plain.jpg", "width": 32, "height": 24},
    ]
    annotations = [
        {"id": 1, "image_id": 0, "category_id": 0, "bbox": [2, 3, 10, 20], "area": 150.0, "iscrowd": 0},
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [-1.5, 2, 10, 5], "area": 50.0, "iscrowd": 0},  # dup id, clamp
        {"id": 2, "image_id": 2, "category_id": 1, "bbox": [25, 25, 10, 10], "area": 100.0, "iscrowd": 0},  # clamp
        {"id": 3, "image_id": 3, "category_id": 0, "bbox": [32, 5, 4, 4], "area": 16.0, "iscrowd": 0},  # zero area
        {"id": 4, "image_id": 3, "category_id": 0, "bbox": [1, 1, 5, 5], "iscrowd": 0},  # no area field
    ]
    return tmp_path, images, annotations


def test_every_fix_on_a_small_file(small, capsys):
    tmp_path, images, annotations = small
    rc, d = _prep(tmp_path, _coco(tmp_path, images, annotations), "--val-fraction", "0.25", "--test-fraction", "0.25")
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((d.root / "report.json").read_text())
    f = rep["fixes"]
    assert f["duplicate_annotation_ids"] == 1 and f["duplicate_annotation_id_values"] == [1]
    assert f["boxes_clamped"] == 3 and f["zero_area_boxes_dropped"] == 1
    assert f["extension_case_fixed"] == 1 and f["exif_rotated"] == 1 and f["exif_tag_ignored"] == 1
    assert f["exif_applied_same_size"] == 1
    assert f["category_ids_remapped"] == 3
    assert d.label_map.names == ["can", "cap", "bag"] and rep["unused_labels_in_file"] == ["bag"]
    recs = {im["id"]: im for s in d.splits for im in d.coco(s)["images"]}
    assert recs[0]["orientation"] == "exif" and recs[1]["orientation"] == "raw" and recs[2]["orientation"] == "exif"
    assert recs[3]["orientation"] == "raw" and "exif_orientation_tag" not in recs[3]
    assert recs[2]["file_name"] == "b/case.JPG"
    anns = {a["source_id"]: a for s in d.splits for a in d.coco(s)["annotations"] if a["image_id"] in (1, 2)}
    assert anns[1]["bbox"] == [0.0, 2.0, 8.5, 5.0] and anns[2]["bbox"] == [25.0, 25.0, 5.0, 5.0]
    assert sorted(len(d.image_ids(s)) for s in d.splits) == [1, 1, 2]
    # the dataset decodes each image in its recorded orientation, at the annotated size
    for s in d.splits:
        ds = CocoDetection(d, s)
        for i in range(len(ds)):
            img, t = ds.load(i)
            assert img.size == (recs[t["image_id"]]["width"], recs[t["image_id"]]["height"])
    # YOLO: the raw image with a rotating tag is re-encoded without EXIF, the others are linked
    export_yolo(d, tmp_path / "yolo", link=False)
    exported = {p.name: p for p in (tmp_path / "yolo" / "images").rglob("*.*")}
    with Image.open(exported["a__raw.jpg"]) as im:
        assert im.getexif().get(0x0112) is None and im.size == (40, 20)
    assert not exported["a__rot.jpg"].is_symlink()
    rep_y = json.loads((tmp_path / "yolo" / "yolo_export.json").read_text())
    assert rep_y["reencoded_without_exif"] == 1


def test_supercategory_mode(small):
    tmp_path, images, annotations = small
    rc, d = _prep(tmp_path, _coco(tmp_path, images, annotations), "--classes", "supercategories")
    assert rc == 0
    assert d.label_map.names == ["metal", "plastic"] and d.label_map.original_ids == [[0, 1], [2]]
    cats = {a["category_id"] for s in d.splits for a in d.coco(s)["annotations"]}
    assert cats == {1}


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda ims, anns: ims[0].update(file_name="/etc/passwd"), r"images\[0\] \(id 0\).*file_name.*absolute"),
        (lambda ims, anns: ims[1].update(file_name="../img/a/raw.jpg"), r"images\[1\] \(id 1\).*'\.\.'"),
        (lambda ims, anns: ims[1].update(id=0), r"images\[1\] \(id 0\).*'id' 0 is repeated"),
        (lambda ims, anns: ims[2].update(width=0), r"images\[2\] \(id 2\).*'width' must be positive"),
        (lambda ims, anns: anns[0].update(category_id=7), r"annotations\[0\] \(id 1\).*'category_id' 7"),
        (lambda ims, anns: anns[2].update(image_id=99), r"annotations\[2\] \(id 2\).*'image_id' 99"),
        (lambda ims, anns: anns[4].update(bbox=[1, 2, 3]), r"annotations\[4\] \(id 4\).*'bbox'"),
        (lambda ims, anns: anns[4].update(bbox=[1, 2, float("nan"), 3]), r"annotations\[4\].*'bbox'"),
        (lambda ims, anns: anns[4].pop("image_id"), r"annotations\[4\] \(id 4\).*missing field 'image_id'"),
    ],
)
def test_bad_records_name_file_record_and_field(small, mutate, match, capsys):
    tmp_path, images, annotations = small
    mutate(images, annotations)
    ann = _coco(tmp_path, images, annotations)
    rc, _ = _prep(tmp_path, ann)
    err = capsys.readouterr().err
    assert rc == 2
    assert str(ann) in err
    import re

    assert re.search(match, err), err


def test_bad_files(small, capsys):
    tmp_path, images, annotations = small
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert data_main(["taco", "--annotations", str(bad), "--images", str(tmp_path / "img"),
                      "--out", str(tmp_path / "o")]) == 2
    assert f"{bad}: not valid JSON" in capsys.readouterr().err
    ann = _coco(tmp_path, images, annotations, categories=[{"id": 0, "name": "x"}, {"id": 0, "name": "y"}])
    assert _prep(tmp_path, ann)[0] == 2
    assert "categories[1]: field 'id' 0 is repeated" in capsys.readouterr().err


def test_truncated_and_corrupt_images_are_named(small, capsys):
    tmp_path, images, annotations = small
    ann = _coco(tmp_path, images, annotations)
    p = tmp_path / "img" / "b" / "plain.jpg"
    full = p.read_bytes()
    p.write_bytes(full[: len(full) // 2])
    assert _prep(tmp_path, ann)[0] == 2
    err = capsys.readouterr().err
    assert "b/plain.jpg" in err and "image id 3" in err and "truncated" in err
    p.write_bytes(b"\x00garbage" * 10)
    assert _prep(tmp_path, ann, "--skip-missing")[0] == 2  # unreadable is never skipped silently
    assert "b/plain.jpg" in capsys.readouterr().err


def test_missing_images_and_size_mismatch(small, capsys):
    tmp_path, images, annotations = small
    images.append({"id": 9, "file_name": "gone/x.jpg", "width": 5, "height": 5})
    annotations.append({"id": 9, "image_id": 9, "category_id": 0, "bbox": [0, 0, 2, 2]})
    images[3]["width"] = 33  # plain.jpg is 32x24 in either orientation
    ann = _coco(tmp_path, images, annotations)
    assert _prep(tmp_path, ann)[0] == 2
    err = capsys.readouterr().err
    assert "1 of 5 images" in err and "gone/x.jpg" in err
    (tmp_path / "img" / "gone").mkdir()
    _jpeg(tmp_path / "img" / "gone" / "x.jpg", 5, 5)
    assert _prep(tmp_path, ann)[0] == 2
    err = capsys.readouterr().err
    assert "b/plain.jpg (image id 3)" in err and "annotated size 33x24 matches neither" in err
    (tmp_path / "img" / "gone" / "x.jpg").unlink()
    rc, d = _prep(tmp_path, ann, "--skip-missing")
    assert rc == 0
    f = json.loads((d.root / "report.json").read_text())["fixes"]
    assert f["missing_images_dropped"] == 1 and f["size_mismatch_images_dropped"] == 1
    # image 9's box and both of plain.jpg's (at width 33 its box at x=32 is 1 px wide after clamping, not empty)
    assert f["annotations_of_dropped_images"] == 3 and f["zero_area_boxes_dropped"] == 0
    assert sorted(i for s in d.splits for i in d.image_ids(s)) == [0, 1, 2]


def test_check_command_reports_and_writes_nothing(small, capsys):
    tmp_path, images, annotations = small
    ann = _coco(tmp_path, images, annotations)
    assert data_main(["check", "--annotations", str(ann), "--images", str(tmp_path / "img")]) == 0
    out = capsys.readouterr().out
    assert "no problems found" in out and '"boxes_clamped": 3' in out
    images.append({"id": 9, "file_name": "gone/x.jpg", "width": 5, "height": 5})
    p = tmp_path / "img" / "b" / "plain.jpg"
    p.write_bytes(p.read_bytes()[:200])
    ann = _coco(tmp_path, images, annotations)
    before = sorted(tmp_path.rglob("*"))
    assert data_main(["check", "--annotations", str(ann), "--images", str(tmp_path / "img")]) == 2
    out = capsys.readouterr().out
    assert "missing:" in out and "gone/x.jpg" in out and "b/plain.jpg" in out and "2 problem(s)" in out
    assert sorted(tmp_path.rglob("*")) == before


def test_synthetic_command(tmp_path, capsys):
    assert data_main(["synthetic", "--out", str(tmp_path / "s"), "--train", "2", "--val", "1", "--test", "1",
                      "--size", "64", "--seed", "3"]) == 0
    d = PreparedData.load(tmp_path / "s")
    assert d.info["settings"] == {"train": 2, "val": 1, "test": 1, "size": 64, "seed": 3}
    assert "train 2 images" in capsys.readouterr().out


def test_data_taco_takes_a_config_file_and_key_value_words(taco_sample, taco_prepared, tmp_path, capsys):
    """Like the other stages: a YAML of PrepareConfig keys, flags and key=value words on top; an unknown key is one
    line naming the closest valid one (exit 2); the same settings give the same dataset as the flags."""
    cfg = tmp_path / "taco.yaml"
    cfg.write_text(f"annotations: {taco_sample['annotations']}\nimages: {taco_sample['images']}\nseed: 0\n")
    out = tmp_path / "via_config"
    assert data_main(["taco", "--config", str(cfg), "--out", str(out), "name=via-config", "val_fraction=0.1"]) == 0
    made = PreparedData.load(out)
    assert made.info["name"] == "via-config"
    for split in ("train", "val", "test"):
        assert made.image_ids(split) == taco_prepared.image_ids(split)
    capsys.readouterr()
    assert data_main(["taco", "--config", str(cfg), "--out", str(tmp_path / "x"), "val_fraktion=0.2"]) == 2
    err = capsys.readouterr().err
    assert "val_fraktion" in err and "val_fraction" in err and "Traceback" not in err
    assert data_main(["taco", "--out", str(tmp_path / "y")]) == 2
    assert "'annotations' is required" in capsys.readouterr().err
