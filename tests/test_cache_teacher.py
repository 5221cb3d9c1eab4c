"""The teacher-cache job end to end on tiny teachers: fidelity to a direct forward, resume, refusals, corrupt input,
HDF5 export, reader laziness, info/verify CLI."""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from rtcodetr.cache_teacher import CacheConfig, CacheMismatchError, TeacherCache, run
from rtcodetr.cache_teacher.cli import main as cli_main
from rtcodetr.cache_teacher.codecs import cosine
from rtcodetr.cache_teacher.geometry import PadCollate, TeacherInputs
from rtcodetr.cache_teacher.storage import DONE_ARRAY, finished_shards, open_group
from rtcodetr.config import load_config

ARRAYS = ("backbone", "encoder", "logits", "boxes", "valid", "input_hw", "image_id")
# Small teacher inputs keep every forward cheap; sizes that are not multiples of 32 exercise padding and the box
# conversion from the padded input frame.
RT_GEOMETRY = ["geometry.size_hw=[90,120]"]
CD_GEOMETRY = ["geometry.shortest_edge=96", "geometry.longest_edge=160", "geometry.pad_hw=[128,128]"]


def _cfg(data, teacher, out, *extra: str) -> CacheConfig:
    words = [f"data={data}", f"teacher={teacher}", f"out={out}", "samples_per_shard=4", "batch_size=3",
             "num_workers=0", "progress=false", *extra]
    return load_config(CacheConfig, None, words)


def _raw(path) -> dict[str, np.ndarray]:
    g = open_group(str(path), "r")
    return {name: np.asarray(g[name][:]) for name in g.array_keys()}


def _trained_scale_teacher(src: Path, dst: Path) -> Path:
    """A tiny teacher with the activation scale of a trained network.

    At random init (transformers' std-0.01 conv weights, BatchNorm running stats 0/1) RT-DETR's stride-32 encoder
    map is ~1e-10, which no 16-bit format holds. He-initialised convs and BatchNorm statistics calibrated on a few
    inputs give O(0.01..1) maps, like the trained teachers the cache is for.
    """
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    from rtcodetr.models import calibrate_activation_scale

    model = AutoModelForObjectDetection.from_pretrained(src)
    calibrate_activation_scale(model, (128, 128)).save_pretrained(dst)
    AutoImageProcessor.from_pretrained(src).save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def rt_teacher(tiny_model_dir, tmp_path_factory):
    return _trained_scale_teacher(tiny_model_dir("rtdetr-tiny"), tmp_path_factory.mktemp("rt_teacher"))


@pytest.fixture(scope="module")
def cd_teacher(tiny_model_dir, tmp_path_factory):
    return _trained_scale_teacher(tiny_model_dir("conditional-detr-tiny"), tmp_path_factory.mktemp("cd_teacher"))


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the teacher in this process on ``n`` intra-op threads (as ``OMP_NUM_THREADS=n`` does for a fresh one).

    The thread count decides how fp32 reductions (convolutions, matmuls) are split, hence their rounding: a cache
    is byte-reproducible only between runs with the same thread settings (see docs/CACHE.md)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def rt_cache(tmp_path_factory, synthetic_data, rt_teacher):
    """Reference cache: RT-DETR teacher, 16 images, 4 shards of 4, batches of 3 (straddling shard ends in the
    sampler's view), two DataLoader workers. One teacher thread, whatever the machine or OMP_NUM_THREADS, so the
    byte comparisons below compare runs with the same thread settings."""
    out = tmp_path_factory.mktemp("rt_cache") / "cache"
    with torch_threads(1):
        result = run(_cfg(synthetic_data.root, rt_teacher, out, "num_workers=2", *RT_GEOMETRY))
    assert result["finished"] and result["shards_written"] == [0, 1, 2, 3]
    return out


def _direct_forward(model, inputs: TeacherInputs, input_hw, i: int) -> dict[str, torch.Tensor]:
    """The teacher on sample i's preprocessed image padded like the cache, as a batch of one."""
    from rtcodetr.features import FeatureTap

    batch = PadCollate(input_hw)([inputs[i]])
    with torch.no_grad(), FeatureTap(model) as tap:
        out = model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"])
    return {"backbone": tap.features["backbone"][0], "encoder": tap.features["encoder"][0], "logits": out.logits[0],
            "pred_boxes": out.pred_boxes[0], "input_hw": batch["input_hw"][0], "orig_hw": batch["orig_hw"][0],
            "affine": batch["affine"][0]}


def _check_against_direct(model_dir, cache_path, data, indices, split="train"):
    from transformers import AutoModelForObjectDetection

    from rtcodetr.data.dataset import CocoDetection

    cache = TeacherCache(cache_path, data=data, split=split)
    g = cache.manifest["geometry"]
    hp, wp = g["input_hw"]
    model = AutoModelForObjectDetection.from_pretrained(model_dir).eval()  # loaded on its own, not via the job
    inputs = TeacherInputs(CocoDetection(data, split), g, draft=g["draft"])
    for i in indices:
        ref = _direct_forward(model, inputs, g["input_hw"], i)
        got = cache[i]
        for name in ("backbone", "encoder"):  # float16 storage: within half precision of the map's range
            r = ref[name].numpy()
            assert got[name].shape == r.shape
            assert np.abs(got[name] - r).max() <= 2e-3 * np.abs(r).max() + 1e-6, name
            assert cosine(got[name], r) > 0.9999
        np.testing.assert_allclose(got["logits"], ref["logits"].numpy(), rtol=1e-4, atol=1e-4)
        # boxes: fractions of the reference input (padded, or the unpadded resized image) -> fractions of the
        # original image. The input is the original image scaled by (ax, ay) (= nw / w0, nh / h0 without draft
        # decoding; a JPEG draft adds the DCT's partial block), so a fraction of the reference width becomes
        # * ref_w / (ax * w0).
        nh, nw = (int(x) for x in ref["input_hw"])
        h0, w0 = (int(x) for x in ref["orig_hw"])
        ax, ay = float(ref["affine"][0, 0]), float(ref["affine"][1, 1])
        ref_h, ref_w = (hp, wp) if g["box_reference"] == "padded" else (nh, nw)
        fx, fy = ref_w / (ax * w0), ref_h / (ay * h0)
        expect = ref["pred_boxes"].double().numpy() * np.array([fx, fy, fx, fy])
        np.testing.assert_allclose(got["boxes"], expect, rtol=1e-4, atol=1e-4)
        assert got["input_hw"].tolist() == [nh, nw]
        assert got["valid"].tolist() == [-(-nh // 32), -(-nw // 32)]
        assert int(got["image_id"]) == int(cache.image_ids[i])


def test_rtdetr_cache_equals_direct_forward(rt_cache, rt_teacher, synthetic_data):
    m = TeacherCache(rt_cache).manifest
    assert m["geometry"]["input_hw"] == [96, 128] and m["geometry"]["normalize"] is None
    assert m["tensors"]["backbone"]["shape"] == [128, 3, 4] and m["tensors"]["logits"]["shape"] == [100, 4]
    assert m["precision"]["mixed_precision"] == "no" and m["teacher"]["family"] == "rtdetr"
    assert m["dataset"]["image_ids"] == synthetic_data.image_ids("train")
    _check_against_direct(rt_teacher, rt_cache, synthetic_data, [0, 5, 15])


def test_conditional_detr_cache_equals_direct_forward(tmp_path, cd_teacher, synthetic_data):
    out = tmp_path / "cd"
    run(_cfg(synthetic_data.root, cd_teacher, out, "samples_per_shard=8", "batch_size=4", *CD_GEOMETRY))
    cache = TeacherCache(out)
    g = cache.manifest["geometry"]
    # Conditional DETR keeps the aspect ratio and normalises with ImageNet statistics (its own processor config)
    assert g["mode"] == "shortest_edge" and g["normalize"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert g["input_hw"] == [128, 128] and cache[0]["valid"].tolist() == [3, 3]  # 96 px of 128 are real
    _check_against_direct(cd_teacher, out, synthetic_data, [1, 10])


def test_taco_photos_keep_aspect_with_padding_and_boxes_in_original_frame(tmp_path, taco_sample, cd_teacher):
    """Real TACO photos (portrait and landscape, 2-8 MP JPEGs, draft-decoded) through the data stage."""
    from rtcodetr.data.coco import PrepareConfig
    from rtcodetr.data.coco import run as prepare

    data = prepare(PrepareConfig(annotations=taco_sample["annotations"], images=taco_sample["images"],
                                 out=tmp_path / "taco", progress=False))
    out = tmp_path / "cache"
    run(_cfg(data.root, cd_teacher, out, "split=val", "samples_per_shard=8", "batch_size=4",
             "geometry.shortest_edge=96", "geometry.longest_edge=160"))
    cache = TeacherCache(out, data=data, split="val")
    assert cache.manifest["geometry"]["input_hw"] == [128, 128]
    assert not cache.label_map_matches(data.label_map)  # tiny synthetic teacher: 4 labels, TACO has 60
    coco = data.coco("val")
    for i, im in enumerate(coco["images"]):
        portrait = im["height"] > im["width"]
        assert cache[i]["valid"].tolist() == ([4, 3] if portrait else [3, 4])
    landscape = next(i for i, im in enumerate(coco["images"]) if im["width"] > im["height"])
    _check_against_direct(cd_teacher, out, data, [0, landscape], split="val")


def test_preprocessing_matches_the_teachers_own_image_processor(tiny_model_dir, synthetic_data):
    """Default geometry (no overrides) reproduces what the HF processor feeds the model."""
    from transformers import AutoImageProcessor

    from rtcodetr.cache_teacher.config import GeometryConfig
    from rtcodetr.cache_teacher.geometry import resolve_geometry
    from rtcodetr.data.dataset import CocoDetection
    from rtcodetr.models import processor_geometry

    base = CocoDetection(synthetic_data, "val")
    for preset in ("rtdetr-tiny", "conditional-detr-tiny"):
        proc = AutoImageProcessor.from_pretrained(tiny_model_dir(preset))
        geom = resolve_geometry(processor_geometry(proc), GeometryConfig(), np.stack([base.heights, base.widths], 1))
        ours, _ = TeacherInputs(base, geom, draft=False)[0]
        image, _ = base.load(0)
        theirs = proc(images=image, return_tensors="pt")["pixel_values"][0]
        assert ours.shape == theirs.shape, preset
        assert (ours - theirs).abs().mean() < 0.02, preset  # PIL vs tensor antialiasing differ slightly


def test_resume_after_crash_skips_finished_shards_and_matches(tmp_path, rt_cache, rt_teacher, synthetic_data):
    out = tmp_path / "cache"
    cfg = _cfg(synthetic_data.root, rt_teacher, out, *RT_GEOMETRY)
    written: list[int] = []

    def crash_after_two(k: int) -> None:
        written.append(k)
        if len(written) == 2:
            raise KeyboardInterrupt("simulated kill")  # the job must stop like on a signal

    with pytest.raises((RuntimeError, KeyboardInterrupt)), torch_threads(1):  # rt_cache's thread settings
        run(cfg, on_shard_written=crash_after_two)
    group = open_group(str(out), "r")
    assert finished_shards(group).tolist() == [True, True, False, False]
    # a kill between shard 1's data and its marker: the data objects exist, the marker does not
    (out / DONE_ARRAY / "c" / "1").unlink()
    shard0 = out / "backbone" / "c" / "0" / "0" / "0" / "0"
    mtime = shard0.stat().st_mtime_ns
    with torch_threads(1):
        result = run(cfg)
    assert result["shards_written"] == [1, 2, 3] and result["shards_skipped"] == 1 and result["finished"]
    assert shard0.stat().st_mtime_ns == mtime  # finished shard not recomputed
    ref, got = _raw(rt_cache), _raw(out)
    assert set(ref) == set(got)
    for name in ref:
        assert np.array_equal(ref[name], got[name]), name  # byte-identical to the uninterrupted run


def _perturbed_teacher(src: Path, dst: Path) -> Path:
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    model = AutoModelForObjectDetection.from_pretrained(src)
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    model.save_pretrained(dst)
    AutoImageProcessor.from_pretrained(src).save_pretrained(dst)
    return dst


def test_refuses_other_teacher_dataset_geometry_and_overwrites_on_request(tmp_path, rt_cache, rt_teacher,
                                                                        cd_teacher, synthetic_data):
    before = _raw(rt_cache)
    other = _perturbed_teacher(rt_teacher, tmp_path / "other_teacher")
    cases = [
        ((other, "train", RT_GEOMETRY), "teacher.weights_sha256"),
        ((cd_teacher, "train", RT_GEOMETRY), "teacher.family"),
        ((rt_teacher, "val", RT_GEOMETRY), "dataset.split"),
        ((rt_teacher, "train", ["geometry.size_hw=[96,96]"]), "geometry.size_hw"),
        ((rt_teacher, "train", [*RT_GEOMETRY, "dtype=bfloat16"]), "tensors.backbone.dtype"),
    ]
    for (teacher, split, extra), field in cases:
        with pytest.raises(CacheMismatchError) as e:
            run(_cfg(synthetic_data.root, teacher, rt_cache, f"split={split}", *extra))
        assert e.value.field.startswith(field) and f"'{e.value.field}'" in str(e.value)
        assert "--overwrite" in str(e.value)
    after = _raw(rt_cache)
    assert all(np.array_equal(before[k], after[k]) for k in before)  # nothing was touched
    # --overwrite replaces the cache (on a copy, the reference stays)
    copy = tmp_path / "copy"
    shutil.copytree(rt_cache, copy)
    result = run(_cfg(synthetic_data.root, rt_teacher, copy, "split=val", "overwrite=true", *RT_GEOMETRY))
    assert result["finished"] and TeacherCache(copy).manifest["dataset"]["split"] == "val"


def test_reader_refuses_other_dataset_and_label_map(tmp_path, rt_cache, synthetic_data):
    with pytest.raises(CacheMismatchError) as e:
        TeacherCache(rt_cache, data=synthetic_data, split="val")
    assert e.value.field == "dataset.split"
    # same split name and image ids, different annotation file
    changed = tmp_path / "data"
    shutil.copytree(synthetic_data.root, changed)
    coco = json.loads((changed / "train.json").read_text())
    coco["annotations"] = coco["annotations"][:-1]
    (changed / "train.json").write_text(json.dumps(coco))
    with pytest.raises(CacheMismatchError) as e:
        TeacherCache(rt_cache, data=changed, split="train")
    assert e.value.field == "dataset.annotations_sha256"
    cache = TeacherCache(rt_cache, data=synthetic_data, split="train", label_map=synthetic_data.label_map)
    assert cache.label_map_matches(synthetic_data.label_map)
    wrong = list(synthetic_data.label_map.names)[::-1]
    assert not cache.label_map_matches(wrong)
    with pytest.raises(CacheMismatchError) as e:
        TeacherCache(rt_cache, label_map=wrong)
    assert e.value.field.startswith("teacher.label_map[0]") and "student" in str(e.value)
    with pytest.raises(CacheMismatchError, match="'masks' is not in the cache"):
        TeacherCache(rt_cache, tensors=["masks"])


def test_corrupt_image_names_the_file_and_keeps_finished_shards(tmp_path, rt_teacher, synthetic_data):
    data = tmp_path / "data"
    shutil.copytree(synthetic_data.root, data)
    info = json.loads((data / "dataset.json").read_text())
    info["image_root"] = str(data / "images")
    (data / "dataset.json").write_text(json.dumps(info))
    coco = json.loads((data / "train.json").read_text())
    victim = data / "images" / coco["images"][9]["file_name"]  # sample 9: shard 2 of 4
    good = victim.read_bytes()
    victim.write_bytes(good[: len(good) // 3])
    out = tmp_path / "cache"
    cfg = _cfg(data, rt_teacher, out, *RT_GEOMETRY)
    with pytest.raises(OSError) as e:
        run(cfg)
    assert str(victim) in str(e.value)
    assert finished_shards(open_group(str(out), "r")).tolist() == [True, True, False, False]
    victim.write_bytes(good)
    result = run(cfg)
    assert result["shards_written"] == [2, 3] and result["finished"]


def test_reader_is_lazy_reads_only_requested_tensors_and_works_in_workers(rt_cache):
    cache = TeacherCache(rt_cache, tensors=["encoder"])
    assert cache._source._pid is None  # nothing opened in the parent before workers fork
    loader = torch.utils.data.DataLoader(cache, batch_size=None, num_workers=2, shuffle=False)
    rows = list(loader)
    assert len(rows) == 16 and set(rows[3]) == {"encoder", "valid", "input_hw", "image_id"}
    full = TeacherCache(rt_cache)
    for i in (0, 7, 15):
        assert np.array_equal(rows[i]["encoder"].numpy(), full[i]["encoder"])
        assert int(rows[i]["image_id"]) == int(full.image_ids[i])
    assert full.index_of(int(full.image_ids[7])) == 7
    cache[2]
    opened = set(cache._source._arrays)
    assert "encoder" in opened  # the handle cache is in use, so the absences below mean something
    assert not opened & {"backbone", "backbone_scale", "logits", "boxes"}, opened
    with pytest.raises(KeyError, match="image id -1"):
        cache.index_of(-1)


def test_int8_and_bfloat16_caches_stay_close_to_float(tmp_path, rt_cache, rt_teacher, synthetic_data):
    out = tmp_path / "q"
    run(_cfg(synthetic_data.root, rt_teacher, out, "dtype=int8", "prediction_dtype=bfloat16",
             "samples_per_shard=8", "batch_size=8", "compressor=zstd", *RT_GEOMETRY))
    raw = _raw(out)
    assert raw["backbone"].dtype == np.int8 and raw["backbone_scale"].shape == (16, 128)
    assert raw["logits"].dtype == np.uint16  # bfloat16 bit patterns
    q, ref = TeacherCache(out), TeacherCache(rt_cache)
    for i in (0, 9):
        a, b = q[i], ref[i]
        for name in ("backbone", "encoder"):
            assert cosine(a[name], b[name]) > 0.999, name
        np.testing.assert_allclose(a["logits"], b["logits"], rtol=2 ** -7, atol=1e-3)
        np.testing.assert_allclose(a["boxes"], b["boxes"], rtol=2 ** -7, atol=1e-3)


def test_cli_info_export_verify(tmp_path, rt_cache, rt_teacher, capsys):
    assert cli_main(["info", str(rt_cache)]) == 0
    text = capsys.readouterr().out
    assert "4/4 shards" in text and "backbone" in text and "per image" in text
    h5 = tmp_path / "cache.h5"
    assert cli_main(["export", str(rt_cache), "--to", str(h5)]) == 0
    a, b = TeacherCache(rt_cache), TeacherCache(h5)
    assert a.manifest == b.manifest and len(b) == 16
    for i in range(16):
        x, y = a[i], b[i]
        assert all(np.array_equal(x[k], y[k]) for k in x)
    import h5py

    raw = _raw(rt_cache)
    with h5py.File(h5, "r") as f:
        for name in ARRAYS:
            assert np.array_equal(f[name][:], raw[name]), name
    capsys.readouterr()
    assert cli_main(["verify", str(h5), "--teacher", str(rt_teacher), "--samples", "2"]) == 0
    out = capsys.readouterr().out
    assert "verify: OK" in out and "encoder" in out
    other = _perturbed_teacher(rt_teacher, tmp_path / "other")
    assert cli_main(["verify", str(rt_cache), "--teacher", str(other), "--samples", "1"]) == 1
    assert "weights_sha256: DIFFERS" in capsys.readouterr().out


@pytest.mark.slow
def test_two_processes_write_the_same_cache_as_one(tmp_path, rt_cache, rt_teacher, synthetic_data):
    """Two CPU processes under `accelerate launch` (gloo): rank r writes shards k % 2 == r, same bytes as one
    process (batches never straddle shards and every input is padded to the cache's one size).

    Same bytes under the same thread settings: the reference was made on one teacher thread and so are the two
    launched processes (OMP_NUM_THREADS=1). With other thread counts fp32 reductions round differently, and the
    promise is the tolerance of the next test, not equal bytes.

    `--cpu --num_processes 2` would start ONE process in accelerate 1.x (its CPU multi-process path needs mpirun);
    `--multi_gpu` with no visible GPU starts two with torchrun and the job joins them with gloo."""
    import os
    import subprocess
    import sys

    out = tmp_path / "cache2"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "rtcodetr.cache_teacher", "--data", str(synthetic_data.root), "--teacher", str(rt_teacher),
           "--out", str(out), "samples_per_shard=4", "batch_size=3", "num_workers=0", *RT_GEOMETRY]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TQDM_DISABLE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 process(es)" in proc.stderr and "this process wrote 2 shard(s)" in proc.stderr
    ref, got = _raw(rt_cache), _raw(out)
    assert set(ref) == set(got)
    for name in ref:
        assert np.array_equal(ref[name], got[name]), name


def test_unlabelled_split_from_an_outside_folder_caches_resumes_verifies_and_exports(tmp_path, rt_teacher,
                                                                                     synthetic_data, capsys):
    """An ``add-images`` split (no annotations; images outside the dataset's image root, one with an EXIF rotation)
    goes through the job like any split: resume, reader rows with the right image ids, verify (dataset taken from
    the manifest), HDF5 export; re-adding changed pixels under the same names makes the reader refuse the cache."""
    from PIL import Image

    from rtcodetr.data.cli import main as data_main
    from rtcodetr.data.prepared import PreparedData
    from rtcodetr.data.synthetic import render_image

    data_dir = tmp_path / "data"
    shutil.copytree(synthetic_data.root, data_dir)  # dataset.json keeps pointing at the fixture's images
    photos = tmp_path / "photos"
    photos.mkdir()
    for k in range(6):
        image, _ = render_image(np.random.default_rng([99, k]), 128)
        if k == 4:  # stored 128x96 landscape with "rotate 90": a 96x128 portrait as shown
            exif = Image.Exif()
            exif[0x0112] = 6
            image.crop((0, 0, 128, 96)).save(photos / f"p{k}.jpg", quality=95, exif=exif.tobytes())
        else:
            image.save(photos / f"p{k}.jpg", quality=95)
    assert data_main(["add-images", "--data", str(data_dir), "--images", str(photos)]) == 0
    data = PreparedData.load(data_dir)
    assert data.image_root_of("unlabeled") == photos.resolve() and not data.is_labelled("unlabeled")

    out = tmp_path / "cache"
    cfg = _cfg(data_dir, rt_teacher, out, "split=unlabeled", *RT_GEOMETRY)  # 6 images: shards of 4 and 2

    def crash(k: int) -> None:
        raise KeyboardInterrupt("simulated kill after the first shard")

    with pytest.raises((RuntimeError, KeyboardInterrupt)):
        run(cfg, on_shard_written=crash)
    result = run(cfg)
    assert result["shards_skipped"] == 1 and result["shards_written"] == [1] and result["finished"]

    cache = TeacherCache(out, data=data, split="unlabeled", label_map=data.label_map)
    m = cache.manifest["dataset"]
    assert m["split"] == "unlabeled" and m["labelled"] is False and m["num_images"] == 6
    ids = data.image_ids("unlabeled")
    assert m["image_ids"] == ids and min(ids) > max(i for s in data.labelled_splits for i in data.image_ids(s))
    assert [int(cache[i]["image_id"]) for i in range(len(cache))] == ids
    rotated = next(i for i, im in enumerate(data.coco("unlabeled")["images"]) if im["orientation"] == "exif")
    assert cache[rotated]["input_hw"].tolist() == [90, 120]  # fixed geometry; the upright 96x128 went in
    _check_against_direct(rt_teacher, out, data, [0, rotated, 5], split="unlabeled")

    assert cli_main(["info", str(out)]) == 0
    assert "split 'unlabeled' (unlabelled), 6 images" in capsys.readouterr().out
    assert cli_main(["verify", str(out), "--teacher", str(rt_teacher), "--samples", "6"]) == 0
    assert "verify: OK" in capsys.readouterr().out
    h5 = tmp_path / "unlabeled.h5"
    assert cli_main(["export", str(out), "--to", str(h5)]) == 0
    exported = TeacherCache(h5, data=data, split="unlabeled")
    for i in range(6):
        a, b = cache[i], exported[i]
        assert all(np.array_equal(a[k], b[k]) for k in a)

    # the split file carries every image's sha256: new pixels under the same file names change the fingerprint
    image, _ = render_image(np.random.default_rng([99, 100]), 128)
    image.save(photos / "p0.jpg", quality=95)
    assert data_main(["add-images", "--data", str(data_dir), "--images", str(photos), "--overwrite"]) == 0
    assert PreparedData.load(data_dir).image_ids("unlabeled") == ids  # same names, same ids
    with pytest.raises(CacheMismatchError) as e:
        TeacherCache(out, data=data_dir, split="unlabeled")
    assert e.value.field == "dataset.annotations_sha256"


# fp32 reduction-order noise allowed between runs with different thread settings, as a fraction of a sample's
# largest |value| in that tensor. Measured between 1 and 2 threads on this teacher: <= 1.5e-6 (~25 float32 ulps;
# encoder 9e-7, logits 1.5e-6, backbone 0). 2^-14 = 6.1e-5 leaves 40x margin and is still 8x below float16's own
# half step at that maximum (2^-11), so values of another sample, shard or padding cannot pass. Derivation:
# docs/CACHE.md, "Reproducibility".
FP32_REDUCTION_NOISE = 2.0 ** -14


def assert_within_storage_rounding(ref: np.ndarray, got: np.ndarray, name: str) -> int:
    """Assert ``|got - ref| <= spacing_s(max(|ref|, |got|)) + FP32_REDUCTION_NOISE * max|ref of that sample|``
    element-wise, where ``spacing_s`` is the gap between adjacent values of the storage dtype at that magnitude
    (float16: <= 2^-10 |x| for normal values, 2^-24 below 6.1e-5; float32: <= 2^-23 |x|).

    Why: run a and b compute x_a, x_b in fp32 with |x_a - x_b| <= delta (reduction order); each stores its value
    rounded to nearest, |q - x| <= spacing / 2, so |q_a - q_b| <= spacing + delta. Returns how many values differ.
    """
    a, b = ref.astype(np.float64), got.astype(np.float64)
    spacing = np.spacing(np.maximum(np.abs(ref), np.abs(got)).astype(ref.dtype)).astype(np.float64)
    scale = np.abs(a).reshape(len(a), -1).max(axis=1).reshape(-1, *[1] * (a.ndim - 1))
    excess = np.abs(a - b) - (spacing + FP32_REDUCTION_NOISE * scale)
    assert (excess <= 0).all(), (f"{name}: {int((excess > 0).sum())} values beyond storage rounding + fp32 noise, "
                                 f"worst by {excess.max():.3g}")
    return int((a != b).sum())


def test_other_thread_count_stays_within_storage_rounding(tmp_path, rt_cache, rt_teacher, synthetic_data):
    """The user-facing promise for N processes vs 1 on machines with other thread settings: every float value
    within one storage step plus fp32 reduction noise (above), every integer array equal. The process count itself
    changes no byte (previous test); the thread count changes how fp32 sums are split, so this test runs the
    teacher on two threads against the one-thread reference."""
    out = tmp_path / "two_threads"
    with torch_threads(2):
        run(_cfg(synthetic_data.root, rt_teacher, out, "num_workers=0", *RT_GEOMETRY))
    ref, got = _raw(rt_cache), _raw(out)
    assert set(ref) == set(got)
    differing = {}
    for name in ref:
        if ref[name].dtype.kind == "f":
            differing[name] = assert_within_storage_rounding(ref[name], got[name], name)
        else:
            assert np.array_equal(ref[name], got[name]), name
    print("values that differ between 1 and 2 teacher threads:", differing)  # machine-dependent, may be all 0
    # the tolerance is tight enough to notice a sample in the wrong place
    swapped = got["encoder"].copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    with pytest.raises(AssertionError, match="beyond storage rounding"):
        assert_within_storage_rounding(ref["encoder"], swapped, "encoder")


def test_mirror_cache_gives_flipped_views_the_teachers_own_map(tmp_path, synthetic_data, tiny_model_dir, small_cache):
    """A feature map is not flip-equivariant, so a flipped view's target must be the teacher's map of the mirrored
    image. A cache made with geometry.hflip=true feeds the teacher the mirrored input (its boxes still go back to the
    original frame), and the trainer's dataset reads it for flipped views in that map's own frame: the resampled
    target of a flipped view is the mirror cache's map as stored, not the plain cache's map mirrored."""
    from rtcodetr.cache_teacher import CacheConfig, TeacherCache, run
    from rtcodetr.config import load_config
    from rtcodetr.data.dataset import CocoDetection
    from rtcodetr.data.transforms import AugmentConfig, build_transforms
    from rtcodetr.train_student.distill_data import DistillDataset, collate
    from rtcodetr.train_student.resample import resample_teacher_features

    mirror_dir = tmp_path / "mirror"
    run(load_config(CacheConfig, None, [
        f"data={synthetic_data.root}", f"teacher={tiny_model_dir('rtdetr-tiny')}", f"out={mirror_dir}",
        "samples_per_shard=4", "batch_size=4", "num_workers=0", "progress=false", "dtype=float32",
        "geometry.size_hw=[128,128]", "geometry.hflip=true"]))
    plain = TeacherCache(small_cache, data=synthetic_data, split="train", tensors=["encoder", "boxes"])
    mirror = TeacherCache(mirror_dir, data=synthetic_data, split="train", tensors=["encoder", "boxes"])
    assert mirror.mirrored and not plain.mirrored

    # the teacher's input of the mirror cache is the plain input mirrored; the recorded affine says so
    geometry = dict(plain.manifest["geometry"])
    base = CocoDetection(synthetic_data, "train", None)
    px, meta = TeacherInputs(base, geometry, draft=False)[3]
    mpx, mmeta = TeacherInputs(base, {**geometry, "hflip": True}, draft=False)[3]
    assert torch.equal(mpx, px.flip(-1))
    w = float(meta["input_hw"][1])
    assert torch.allclose(mmeta["affine"], torch.tensor([[-1.0, 0, w], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)
                          @ meta["affine"])

    aug = AugmentConfig(stop_epoch=None, photometric_p=0.0, zoom_out_p=0.0, iou_crop_p=0.0, flip_p=1.0)

    def targets(mirror_cache):
        ds = DistillDataset(CocoDetection(synthetic_data, "train", build_transforms(True, (128, 128), aug)), plain,
                            features=("encoder",), mirror_cache=mirror_cache)
        batch = collate([ds[i] for i in range(4)])
        maps, mask = resample_teacher_features(batch["teacher_encoder"], batch.get("teacher_affine", batch["affine"]),
                                               batch["orig_size"], batch["teacher_input_hw"], batch["teacher_valid"],
                                               batch["size"], (4, 4))
        return maps, mask

    from_mirror, mask = targets(mirror)
    from_plain, _ = targets(None)
    stored_mirror = torch.stack([torch.from_numpy(np.asarray(mirror[i]["encoder"], dtype=np.float32)) for i in range(4)])
    stored_plain = torch.stack([torch.from_numpy(np.asarray(plain[i]["encoder"], dtype=np.float32)) for i in range(4)])
    assert bool(mask.all())
    torch.testing.assert_close(from_mirror, stored_mirror, atol=1e-9, rtol=1e-4)  # as stored: same frame as the view
    torch.testing.assert_close(from_plain, stored_plain.flip(-1), atol=1e-9, rtol=1e-4)  # the mirrored plain map
    assert np.isfinite(mirror[0]["boxes"]).all() and mirror[0]["boxes"].shape == plain[0]["boxes"].shape


def test_trainer_refuses_a_mirror_cache_as_the_plain_one(tmp_path, synthetic_data, tiny_model_dir, small_cache):
    from rtcodetr.config import ConfigError
    from rtcodetr.train_student.config import TrainConfig
    from rtcodetr.train_student.teachers import open_teachers

    cfg = TrainConfig(data=str(synthetic_data.root), mirror_cache=str(small_cache), out=str(tmp_path / "run"))
    cfg.loss.feature_weight = 1.0
    with pytest.raises(ConfigError, match="needs cache="):
        open_teachers(cfg, synthetic_data, torch.device("cpu"), None, lambda m: None)
    cfg.cache = str(small_cache)
    with pytest.raises(ConfigError, match="was not made on mirrored images"):
        open_teachers(cfg, synthetic_data, torch.device("cpu"), None, lambda m: None)
