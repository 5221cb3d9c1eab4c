"""Unlabelled splits: ``rtcodetr data add-images`` (what it records, what it refuses), ``data synthetic --unlabeled``,
and the stages around them (dataset targets, YOLO export, evaluate)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rtcodetr.data.cli import main as data_main
from rtcodetr.data.dataset import CocoDetection
from rtcodetr.data.prepared import PreparedData, PreparedDataError, add_unlabelled_split
from rtcodetr.data.synthetic import make_synthetic
from rtcodetr.data.transforms import build_transforms
from test_data_taco import _jpeg  # (path, w, h, orientation=None, seed=0) -> the written bytes


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def labelled(tmp_path) -> PreparedData:
    """A labelled synthetic set: train 4 / val 2 / test 2 at 64 px (ids 1..8)."""
    return make_synthetic(tmp_path / "data", train=4, val=2, test=2, size=64, seed=0)


def _snapshot(root: Path) -> dict[str, str]:
    """Every file of a prepared directory (not the images) -> its sha256: "nothing was written" is this unchanged."""
    return {p.name: _sha(p) for p in sorted(Path(root).iterdir()) if p.is_file()}


def _add(data, images, *extra) -> int:
    return data_main(["add-images", "--data", str(data.root if hasattr(data, "root") else data), "--images",
                      str(images), *extra])


def test_add_images_records_upright_sizes_new_ids_hashes_and_source(tmp_path, labelled, capsys):
    ext = tmp_path / "extra"  # outside the dataset's image_root
    _jpeg(ext / "a.jpg", 40, 30, seed=1)
    _jpeg(ext / "b_rot.jpg", 48, 20, orientation=6, seed=2)  # stored 48x20, shown (and annotated) 20x48
    Image.fromarray(np.full((24, 36, 3), 90, np.uint8)).save(ext / "c.png")
    _jpeg(ext / "deeper" / "d.jpg", 32, 32, seed=3)  # only with --recursive
    (ext / "notes.txt").write_text("not an image")
    (ext / "._a.jpg").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")  # hidden: never read as an image
    before = {s: _sha(labelled.split_file(s)) for s in labelled.splits}

    assert _add(labelled, ext, "--name", "extra") == 0
    assert "added unlabelled split 'extra'" in capsys.readouterr().out
    data = PreparedData.load(labelled.root)
    assert data.unlabelled_splits == ["extra"] and data.labelled_splits == ["train", "val", "test"]
    assert not data.is_labelled("extra") and data.is_labelled("train")
    assert data.image_root_of("extra") == ext.resolve() and data.image_root_of("train") == data.image_root
    assert {s: _sha(data.split_file(s)) for s in ("train", "val", "test")} == before  # labelled files untouched
    coco = data.coco("extra")
    assert coco["annotations"] == [] and coco["categories"] == data.coco("train")["categories"]
    recs = {im["file_name"]: im for im in coco["images"]}
    assert sorted(recs) == ["a.jpg", "b_rot.jpg", "c.png"]
    labelled_ids = {i for s in ("train", "val", "test") for i in data.image_ids(s)}
    assert [im["id"] for im in coco["images"]] == [max(labelled_ids) + k for k in (1, 2, 3)]
    assert (recs["b_rot.jpg"]["width"], recs["b_rot.jpg"]["height"], recs["b_rot.jpg"]["orientation"]) == (20, 48, "exif")
    assert recs["b_rot.jpg"]["exif_orientation_tag"] == 6
    assert (recs["a.jpg"]["width"], recs["a.jpg"]["height"], recs["a.jpg"]["orientation"]) == (40, 30, "raw")
    assert all(im["sha256"] == _sha(ext / name) for name, im in recs.items())
    entry = data.info["splits"]["extra"]
    assert entry["labelled"] is False and entry["num_images"] == 3 and entry["num_annotations"] == 0
    assert entry["sha256"] == _sha(data.split_file("extra"))
    src = entry["source"]
    assert (src["dir"], src["found"], src["count"], src["skipped"]) == (str(ext.resolve()), 3, 3, 0)
    assert src["other_files_ignored"] == 2 and src["exif_orientation_applied"] == 1 and not src["recursive"]

    # the dataset yields every image upright with an empty target, also through the training augmentations
    ds = CocoDetection(data, "extra")
    assert ds.labelled is False and CocoDetection(data, "train").labelled is True
    for i in range(len(ds)):
        image, t = ds.load(i)  # load() checks the decoded size against the recorded width x height
        assert image.size == (int(ds.widths[i]), int(ds.heights[i]))
        assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,) and t["image_id"] == int(ds.image_ids[i])
    aug = CocoDetection(data, "extra", build_transforms(True, (32, 32)))
    for i in range(len(aug)):
        image, t = aug[i]
        assert tuple(image.shape) == (3, 32, 32) and t["boxes"].shape == (0, 4) and t["labels"].shape == (0,)

    # --recursive into a folder inside the image root: names relative to the dataset's image_root, no own root
    inner = data.image_root / "more"
    shutil.copytree(ext, inner)
    assert _add(data, inner, "--name", "inner", "--recursive") == 0
    data = PreparedData.load(labelled.root)
    assert "image_root" not in data.info["splits"]["inner"] and data.image_root_of("inner") == data.image_root
    names = [im["file_name"] for im in data.coco("inner")["images"]]
    assert names == ["more/a.jpg", "more/b_rot.jpg", "more/c.png", "more/deeper/d.jpg"]
    assert all(data.image_path(n, "inner").is_file() for n in names)
    assert data.info["splits"]["inner"]["source"]["recursive"] is True


def test_ids_never_collide_with_any_split(tmp_path, labelled):
    ext = tmp_path / "extra"
    for k in range(3):
        _jpeg(ext / f"{k}.jpg", 32, 32, seed=10 + k)
    assert _add(labelled, ext, "--name", "u1") == 0
    other = tmp_path / "other"
    for k in range(2):
        _jpeg(other / f"{k}.jpg", 32, 32, seed=20 + k)
    assert _add(labelled, other, "--name", "u2") == 0
    assert _add(labelled, ext, "--name", "u1", "--overwrite") == 0  # replaced: new ids above u2's too
    data = PreparedData.load(labelled.root)
    ids = {s: set(data.image_ids(s)) for s in data.splits}
    flat = [i for s in ids.values() for i in s]
    assert len(flat) == len(set(flat)) == 8 + 3 + 2
    assert min(ids["u1"]) > max(ids["u2"]) > max(ids["test"])
    # the writer itself refuses a record whose id another split uses (whatever the caller computed)
    rec = dict(data.coco("u2")["images"][0], id=int(data.image_ids("train")[0]))
    with pytest.raises(PreparedDataError, match=r"field 'id' is already used by split 'train'"):
        add_unlabelled_split(data, "u3", [rec], source={})
    assert "u3" not in PreparedData.load(labelled.root).splits


def test_files_escaping_the_folder_are_refused_and_nothing_is_written(tmp_path, labelled, capsys):
    outside = tmp_path / "secret" / "s.jpg"
    _jpeg(outside, 32, 32, seed=5)
    ext = tmp_path / "extra"
    _jpeg(ext / "ok.jpg", 32, 32, seed=6)
    before = _snapshot(labelled.root)

    (ext / "link.jpg").symlink_to(outside)  # a file symlink pointing outside
    assert _add(labelled, ext) == 2
    err = capsys.readouterr().err
    assert "link.jpg" in err and str(outside.resolve()) in err and "outside" in err and "Traceback" not in err
    (ext / "link.jpg").unlink()

    (ext / "up").symlink_to("..")  # a folder symlink to the parent: with --recursive it would reach secret/
    assert _add(labelled, ext, "--recursive") == 2
    err = capsys.readouterr().err
    assert str(ext / "up") in err and "outside" in err

    lst = tmp_path / "list.txt"
    lst.write_text("# extra images\nok.jpg\n../secret/s.jpg\n")
    assert _add(labelled, ext, "--files", str(lst)) == 2
    err = capsys.readouterr().err
    assert "line 3" in err and "../secret/s.jpg" in err and "'..'" in err
    lst.write_text(f"{outside}\n")
    assert _add(labelled, ext, "--files", str(lst)) == 2
    assert "absolute path" in capsys.readouterr().err
    (ext / "sub").mkdir()
    (ext / "sub" / "hop.jpg").symlink_to("../../secret/s.jpg")  # a relative link climbing out with ..
    lst.write_text("sub/hop.jpg\n")
    assert _add(labelled, ext, "--files", str(lst)) == 2
    assert "hop.jpg" in capsys.readouterr().err
    assert _snapshot(labelled.root) == before and not (labelled.root / "unlabeled.json").exists()

    # without --recursive, folders (the `up` link included) are not entered; a link that stays inside is fine
    # (its content repeats ok.jpg, so it is kept once)
    (ext / "same.jpg").symlink_to("ok.jpg")
    assert _add(labelled, ext) == 0
    data = PreparedData.load(labelled.root)
    assert [im["file_name"] for im in data.coco("unlabeled")["images"]] == ["ok.jpg"]
    src = data.info["splits"]["unlabeled"]["source"]
    assert src["count"] == 1 and src["skipped_by_reason"]["duplicate_within"] == 1


def test_unreadable_images_are_refused_or_skipped_by_name(tmp_path, labelled, capsys):
    ext = tmp_path / "extra"
    _jpeg(ext / "good.jpg", 64, 48, seed=1)
    whole = _jpeg(ext / "cut.jpg", 64, 48, seed=2)
    (ext / "cut.jpg").write_bytes(whole[: len(whole) * 2 // 3])  # header fine, entropy-coded data truncated
    (ext / "empty.jpg").write_bytes(b"")
    (ext / "text.png").write_text("not a png")
    before = _snapshot(labelled.root)

    assert _add(labelled, ext) == 2
    err = capsys.readouterr().err
    assert "3 of 4 image(s)" in err and all(n in err for n in ("cut.jpg", "empty.jpg", "text.png"))
    assert "--skip-bad" in err and "Traceback" not in err
    assert _snapshot(labelled.root) == before

    assert _add(labelled, ext, "--skip-bad") == 0
    out = capsys.readouterr().out
    assert "skipped 3" in out and all(f"skipped: {n}" in out for n in ("cut.jpg", "empty.jpg", "text.png"))
    data = PreparedData.load(labelled.root)
    assert [im["file_name"] for im in data.coco("unlabeled")["images"]] == ["good.jpg"]
    src = data.info["splits"]["unlabeled"]["source"]
    assert src["skipped"] == 3 and src["skipped_by_reason"]["unreadable"] == 3
    assert sorted(s["file"] for s in src["skipped_files"]) == ["cut.jpg", "empty.jpg", "text.png"]

    bad_only = tmp_path / "bad"
    bad_only.mkdir()
    (bad_only / "x.jpg").write_bytes(b"junk")
    assert _add(labelled, bad_only, "--name", "b", "--skip-bad") == 2  # nothing left: refused, not an empty split
    assert "nothing to add" in capsys.readouterr().err


def test_duplicates_of_labelled_images_are_refused_naming_the_pair(tmp_path, labelled, capsys):
    ext = tmp_path / "extra"
    _jpeg(ext / "new.jpg", 64, 64, seed=1)
    test_rec = labelled.coco("test")["images"][1]
    shutil.copy(labelled.image_path(test_rec["file_name"], "test"), ext / "looks_new.jpg")
    before = _snapshot(labelled.root)

    assert _add(labelled, ext) == 2
    err = capsys.readouterr().err
    assert "looks_new.jpg" in err and test_rec["file_name"] in err and "split 'test'" in err
    assert f"image id {test_rec['id']}" in err and "--skip-duplicates" in err
    assert _snapshot(labelled.root) == before

    assert _add(labelled, ext, "--skip-duplicates") == 0
    assert "skipped: looks_new.jpg: same bytes as image id" in capsys.readouterr().out
    data = PreparedData.load(labelled.root)
    assert [im["file_name"] for im in data.coco("unlabeled")["images"]] == ["new.jpg"]
    assert data.info["splits"]["unlabeled"]["source"]["skipped_by_reason"]["duplicate_of_labelled"] == 1


def test_cli_error_is_exit_2_without_traceback(tmp_path, labelled):
    """Through the real command line: a duplicate of a test image gives exit 2 and one message, no traceback."""
    ext = tmp_path / "extra"
    ext.mkdir()
    shutil.copy(labelled.image_path(labelled.coco("test")["images"][0]["file_name"], "test"), ext / "x.jpg")
    proc = subprocess.run([sys.executable, "-m", "rtcodetr", "data", "add-images", "--data", str(labelled.root),
                           "--images", str(ext)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("error:") == 1 and "x.jpg" in proc.stderr


def test_rerun_refused_unless_overwrite_and_labelled_or_reserved_names_never(tmp_path, labelled, capsys):
    ext = tmp_path / "extra"
    _jpeg(ext / "a.jpg", 32, 32, seed=1)
    assert _add(labelled, ext) == 0
    first = _snapshot(labelled.root)
    assert _add(labelled, ext) == 2
    assert "exists already" in capsys.readouterr().err and _snapshot(labelled.root) == first
    _jpeg(ext / "b.jpg", 32, 32, seed=2)
    assert _add(labelled, ext, "--overwrite") == 0
    assert PreparedData.load(labelled.root).info["splits"]["unlabeled"]["num_images"] == 2
    for name, msg in (("test", "labelled split"), ("dataset", "not allowed"), ("label_map", "not allowed"),
                      ("../x", "not allowed")):
        assert _add(labelled, ext, "--name", name, "--overwrite") == 2
        assert msg in capsys.readouterr().err
    (labelled.root / "stray.json").write_text("{}")  # e.g. left behind by re-preparing the directory
    assert _add(labelled, ext, "--name", "stray") == 2
    assert "not a split of dataset.json" in capsys.readouterr().err


def test_synthetic_unlabeled_leaves_labelled_outputs_byte_identical(tmp_path):
    a = make_synthetic(tmp_path / "a", train=3, val=2, test=2, size=64, seed=3)
    b = make_synthetic(tmp_path / "b", train=3, val=2, test=2, size=64, seed=3, unlabeled=4)
    for name in ("train.json", "val.json", "test.json", "label_map.json", "report.json"):
        assert (a.root / name).read_bytes() == (b.root / name).read_bytes(), name
    for s in a.splits:
        for im in a.coco(s)["images"]:
            assert _sha(a.image_path(im["file_name"], s)) == _sha(b.image_path(im["file_name"], s))
    assert a.unlabelled_splits == [] and "unlabeled" not in a.info["settings"]
    assert b.unlabelled_splits == ["unlabeled"] and b.info["settings"]["unlabeled"] == 4
    ul = b.coco("unlabeled")
    assert ul["annotations"] == [] and [im["id"] for im in ul["images"]] == [8, 9, 10, 11]  # after test's 7
    assert all(im["sha256"] == _sha(b.image_path(im["file_name"], "unlabeled")) for im in ul["images"])
    labelled_hashes = {_sha(b.image_path(im["file_name"], s)) for s in b.labelled_splits for im in b.coco(s)["images"]}
    assert not labelled_hashes & {im["sha256"] for im in ul["images"]}  # own stream: new images
    ds = CocoDetection(b, "unlabeled")
    assert len(ds) == 4 and not ds.labelled and all(ds.target(i)["boxes"].shape == (0, 4) for i in range(4))
    # its own seeded stream: more unlabelled images keep the first ones, the same seed repeats them exactly
    c = make_synthetic(tmp_path / "c", train=3, val=2, test=2, size=64, seed=3, unlabeled=6)
    assert [im["sha256"] for im in c.coco("unlabeled")["images"]][:4] == [im["sha256"] for im in ul["images"]]
    b2 = make_synthetic(tmp_path / "b", train=3, val=2, test=2, size=64, seed=3, unlabeled=4)  # rewrite in place
    assert b2.info["splits"]["unlabeled"]["sha256"] == b.info["splits"]["unlabeled"]["sha256"]
    assert data_main(["synthetic", "--out", str(tmp_path / "d"), "--train", "1", "--val", "1", "--test", "1",
                      "--size", "64", "--unlabeled", "2"]) == 0
    assert PreparedData.load(tmp_path / "d").info["splits"]["unlabeled"]["num_images"] == 2


def test_yolo_export_and_evaluate_leave_unlabelled_splits_out(tmp_path, capsys):
    from rtcodetr.data.yolo import export_yolo
    from rtcodetr.evaluate.cli import main as eval_main

    data = make_synthetic(tmp_path / "d", train=2, val=1, test=1, size=64, unlabeled=2)
    yaml_path = export_yolo(data, tmp_path / "yolo")
    assert "unlabeled" not in yaml_path.read_text() and not (tmp_path / "yolo" / "images" / "unlabeled").exists()
    assert json.loads((tmp_path / "yolo" / "yolo_export.json").read_text())["unlabelled_splits_left_out"] == ["unlabeled"]
    preds = tmp_path / "p.json"
    preds.write_text("[]")
    rc = eval_main(["--data", str(data.root), "--split", "unlabeled", "--predictions", f"x={preds}",
                    "--out", str(tmp_path / "rep")])
    assert rc == 2 and "unlabelled" in capsys.readouterr().err


def test_old_prepared_dirs_without_the_key_are_labelled(synthetic_data):
    assert synthetic_data.labelled_splits == synthetic_data.splits and synthetic_data.unlabelled_splits == []
    assert all("labelled" not in v for v in synthetic_data.info["splits"].values())
    with pytest.raises(PreparedDataError, match="no split 'nope'"):
        synthetic_data.is_labelled("nope")
