"""Bad input, tried as a new user would, on every stage: each ends with exit code 2 and ONE line
``rtcodetr <stage>: error: ...`` naming the file / field (and the fix where there is one), never a traceback.

Cases marked ``sub`` run the real command line in a fresh interpreter (``python -m rtcodetr ...``); the others call
the same dispatcher in-process (``rtcodetr.cli.main``), where a traceback would surface as an exception. Already
clear before (kept): a COCO file that is not JSON or has no ``images``, an unknown config key, a model directory
without ``config.json``, a missing prepared dataset, ``--device cuda`` without CUDA. Record-level COCO defects
(unknown ``category_id``, NaN box, path traversal, truncated JPEG, EXIF mismatch) are in ``test_data_taco.py``."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TRAIN_COMMON = ["batch_size=2", "num_workers=0", "image_size=[128, 128]", "log_with=[]", "max_steps=1", "eval_every=0"]
CACHE_WORDS = ["samples_per_shard=4", "batch_size=4", "num_workers=0", "progress=false", "dtype=float32",
               "geometry.size_hw=[128,128]"]  # the settings of the small_cache fixture


@dataclass
class Paths:
    tmp: Path
    data: Path
    model: Path
    cache: Path
    damaged: Path
    other_teacher: Path


@pytest.fixture(scope="module")
def paths(tmp_path_factory, synthetic_data, tiny_model_dir, small_cache) -> Paths:
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    tmp = tmp_path_factory.mktemp("hostile")
    model = tiny_model_dir("rtdetr-tiny")
    cache = tmp / "cache"
    shutil.copytree(small_cache, cache)
    damaged = tmp / "damaged"
    shutil.copytree(small_cache, damaged)
    shard = damaged / "encoder" / "c" / "1" / "0" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:100])  # a copy that stopped early
    other = tmp / "other_teacher"  # same architecture and labels, other weights
    net = AutoModelForObjectDetection.from_pretrained(model)
    with torch.no_grad():
        next(net.parameters()).add_(0.01)
    net.save_pretrained(other)
    AutoImageProcessor.from_pretrained(model).save_pretrained(other)
    (tmp / "bogus.pt").write_bytes(b"not a checkpoint at all")
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp / "other_framework.pt")
    (tmp / "not_json.json").write_text("{not json")
    (tmp / "no_images.json").write_text(json.dumps({"annotations": [], "categories": []}))
    (tmp / "empty_dir").mkdir()
    from rtcodetr.cache_teacher.storage import export_hdf5

    h5 = export_hdf5(small_cache, tmp / "cache.h5", progress=False)
    (tmp / "cut.h5").write_bytes(h5.read_bytes()[: h5.stat().st_size // 2])  # a download that stopped halfway
    return Paths(tmp, synthetic_data.root, model, cache, damaged, other)


@dataclass
class Case:
    argv: Callable[[Paths], list[str]]
    expect: str  # regex on the one error line (names the file / field)
    sub: bool = False  # run as `python -m rtcodetr ...` in a subprocess


CASES: dict[str, Case] = {
    # ---- train
    "train: cache does not exist": Case(
        lambda p: ["train", f"data={p.data}", f"model={p.model}", "cache=/does/not/exist", "loss.feature_weight=1",
                   f"out={p.tmp / 'r1'}", *TRAIN_COMMON],
        r"rtcodetr train: error: no teacher cache at /does/not/exist", sub=True),
    "train: truncated cache shard": Case(
        lambda p: ["train", f"data={p.data}", f"model={p.model}", f"cache={p.damaged}", "loss.feature_weight=1",
                   f"out={p.tmp / 'r2'}", *TRAIN_COMMON],
        r"damaged: 1 shard\(s\) cannot be read: shard 1 \(samples 4-7, image ids .*encoder: ValueError.*"
        r"--redo-shards 1"),
    "train: cache of another split": Case(
        lambda p: ["train", f"data={p.data}", f"model={p.model}", f"cache={p.cache}", "train_split=val",
                   "loss.feature_weight=1", f"out={p.tmp / 'r3'}", *TRAIN_COMMON],
        r"manifest field 'dataset.split' differs"),
    "train: data directory does not exist": Case(
        lambda p: ["train", f"data={p.tmp / 'nope'}", f"model={p.model}", f"out={p.tmp / 'r4'}", *TRAIN_COMMON],
        r"rtcodetr train: error: .*nope"),
    "train: model directory does not exist": Case(
        lambda p: ["train", f"data={p.data}", f"model={p.tmp / 'no_model'}", f"out={p.tmp / 'r5'}", *TRAIN_COMMON],
        r"rtcodetr train: error: .*no_model"),
    "train: unknown config key (kept)": Case(
        lambda p: ["train", f"data={p.data}", f"model={p.model}", "optim.lrr=1"],
        r"unknown config key 'optim.lrr'.*did you mean 'optim.lr'"),
    # ---- cache-teacher
    "cache-teacher verify: truncated shard": Case(
        lambda p: ["cache-teacher", "verify", str(p.damaged)],
        r"cache-teacher verify: error: .*shard 1 \(samples 4-7.*Fix: recompute only these shards with: "
        r"rtcodetr cache-teacher .*--redo-shards 1", sub=True),
    "cache-teacher verify --full: truncated shard": Case(
        lambda p: ["cache-teacher", "verify", str(p.damaged), "--full"],
        r"shard 1 \(samples 4-7.*--redo-shards 1"),
    "cache-teacher verify: truncated HDF5 export": Case(
        lambda p: ["cache-teacher", "verify", str(p.tmp / "cut.h5")],
        r"cut\.h5 cannot be opened as an HDF5 export .*truncated.*export it again"),
    "train: truncated HDF5 export": Case(
        lambda p: ["train", f"data={p.data}", f"model={p.model}", f"cache={p.tmp / 'cut.h5'}", "loss.feature_weight=1",
                   f"out={p.tmp / 'r6'}", *TRAIN_COMMON],
        r"cut\.h5 cannot be opened as an HDF5 export"),
    "cache-teacher: another teacher into an existing cache": Case(
        lambda p: ["cache-teacher", "--data", str(p.data), "--teacher", str(p.other_teacher), "--out", str(p.cache),
                   *CACHE_WORDS],
        r"refusing to write into the existing cache .* \(use --overwrite to replace it\): manifest field "
        r"'teacher.weights_sha256' differs", sub=True),
    "cache-teacher: teacher does not exist": Case(
        lambda p: ["cache-teacher", "--data", str(p.data), "--teacher", str(p.tmp / "no_teacher"), "--out",
                   str(p.tmp / "c2"), *CACHE_WORDS],
        r"no_teacher"),
    "cache-teacher: --redo-shards out of range": Case(
        lambda p: ["cache-teacher", "--data", str(p.data), "--teacher", str(p.model), "--out", str(p.cache),
                   "--redo-shards", "7", *CACHE_WORDS],
        r"redo_shards=\[7\]: the cache has shards 0\.\.3"),
    "cache-teacher info: no cache there": Case(
        lambda p: ["cache-teacher", "info", str(p.tmp / "nowhere")], r"no teacher cache at .*nowhere", sub=True),
    "cache-teacher export: no cache there": Case(
        lambda p: ["cache-teacher", "export", str(p.tmp / "nowhere"), "--to", str(p.tmp / "x.h5")],
        r"no teacher cache at .*nowhere"),
    # ---- evaluate / yolo
    "evaluate: .pt that is not a YOLO checkpoint": Case(
        lambda p: ["evaluate", "--data", str(p.data), "--out", str(p.tmp / "e1"), "--model", f"x={p.tmp / 'bogus.pt'}"],
        r"bogus\.pt: not an ultralytics YOLO checkpoint", sub=True),
    "evaluate: .pt of another framework": Case(
        lambda p: ["evaluate", "--data", str(p.data), "--out", str(p.tmp / "e2"),
                   "--model", f"x={p.tmp / 'other_framework.pt'}"],
        r"other_framework\.pt: not an ultralytics YOLO checkpoint"),
    "evaluate: directory without config.json (kept)": Case(
        lambda p: ["evaluate", "--data", str(p.data), "--out", str(p.tmp / "e3"), "--model", f"x={p.tmp / 'empty_dir'}"],
        r"empty_dir: a directory without config.json"),
    "yolo train: .pt that is not a YOLO checkpoint": Case(
        lambda p: ["yolo", "train", "--data", str(p.data), "--model", str(p.tmp / "bogus.pt"), "--out", str(p.tmp / "y")],
        r"bogus\.pt: not an ultralytics YOLO checkpoint"),
    # ---- data / init-model (kept, now exit 2 instead of 1)
    "data taco: annotations not JSON (kept)": Case(
        lambda p: ["data", "taco", "--annotations", str(p.tmp / "not_json.json"), "--images", str(p.tmp),
                   "--out", str(p.tmp / "d1")],
        r"not_json\.json: not valid JSON", sub=True),
    "data taco: no 'images' (kept)": Case(
        lambda p: ["data", "taco", "--annotations", str(p.tmp / "no_images.json"), "--images", str(p.tmp),
                   "--out", str(p.tmp / "d2")],
        r"no_images\.json: field 'images' must be a list"),
    "init-model: no prepared dataset (kept)": Case(
        lambda p: ["init-model", "--preset", "rtdetr-tiny", "--data", str(p.tmp / "nope"), "--out", str(p.tmp / "m")],
        r"init-model: error: .*nope.*prepared dataset"),
    # ---- demo / sweep
    "demo: unknown config key": Case(lambda p: ["demo", "student_stepz=3"], r"unknown config key 'student_stepz'",
                                     sub=True),
    "sweep: unknown config key": Case(
        lambda p: ["sweep", "--config", str(REPO / "configs" / "ablation.yaml"), "seedz=[0]"],
        r"unknown config key 'seedz'", sub=True),
    "sweep: config file does not exist": Case(
        lambda p: ["sweep", "--config", str(p.tmp / "nope.yaml")], r"config file not found: .*nope\.yaml"),
}
if not torch.cuda.is_available():
    CASES["evaluate: --device cuda without CUDA (kept)"] = Case(
        lambda p: ["evaluate", "--data", str(p.data), "--out", str(p.tmp / "e4"), "--device", "cuda",
                   "--model", f"x={p.model}"],
        r"CUDA is not available")


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_2_with_one_line(name, paths, capsys):
    case = CASES[name]
    argv = case.argv(paths)
    if case.sub:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
               "TQDM_DISABLE": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run([sys.executable, "-m", "rtcodetr", *argv], cwd=paths.tmp, env=env, capture_output=True,
                              text=True, timeout=300)
        rc, err = proc.returncode, proc.stderr
    else:
        from rtcodetr.cli import main

        rc = main(argv)
        err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert rc == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert len(errors) == 1, err[-3000:]
    assert re.search(case.expect, errors[0]), errors[0]
