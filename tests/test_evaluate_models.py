"""The evaluate stage end to end: every model kind on the synthetic set and the real TACO sample, report files,
latency/complexity structure, draft-decoding geometry, two processes under ``accelerate launch``."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rtcodetr.evaluate.api import SANITY_RATIO_RANGE, _ratio_flag, evaluate_models, predict_split
from rtcodetr.evaluate.cli import main as evaluate_main
from rtcodetr.evaluate.complexity import count_flops
from rtcodetr.evaluate.detectors import Detector
from rtcodetr.evaluate.latency import time_callable

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STATS_KEYS = {"median_ms", "p90_ms", "mean_ms", "std_ms", "min_ms", "max_ms", "warmup", "iterations", "timer"}


def _strict_json(path: Path) -> dict:
    """Parse refusing NaN/Infinity (strict JSON, what non-Python readers accept)."""
    def bad(token):
        raise ValueError(f"{path}: non-standard JSON token {token}")
    return json.loads(path.read_text(), parse_constant=bad)


def write_oracle_results(data, split: str, path: Path, extra_splits: tuple[str, ...] = ()) -> Path:
    """A COCO results file holding exactly the ground truth (score 1): a perfect outside detector."""
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for s in (split, *extra_splits) for a in data.coco(s)["annotations"]]
    path.write_text(json.dumps(results))
    return path


@pytest.fixture(scope="module")
def taco_data(tmp_path_factory, taco_sample):
    """The 80-photo TACO sample prepared through the data stage (supercategories, 8 val images)."""
    from rtcodetr.data.coco import PrepareConfig, run

    out = tmp_path_factory.mktemp("taco") / "prepared"
    return run(PrepareConfig(annotations=taco_sample["annotations"], images=taco_sample["images"], out=out,
                             classes="supercategories", val_fraction=0.1, test_fraction=0.1, progress=False))


# ----------------------------------------------------------------------------------------------- complexity, latency
def test_complexity_counts_two_flops_per_mac_and_names_uncounted_ops():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 5))
    x = torch.rand(1, 3, 4, 4)
    c = count_flops(lambda: model(x), model, (4, 4))
    conv_macs = 8 * 4 * 4 * 3 * 3 * 3  # out elements x (in_ch x k x k)
    linear_macs = 8 * 4 * 4 * 5
    assert c.macs == conv_macs + linear_macs
    assert c.flops == 2 * c.macs and c.gflops == pytest.approx(2 * c.gmacs)
    assert c.params == 8 * 3 * 3 * 3 + 8 * 4 * 4 * 5 + 5
    assert "relu" in c.uncounted_ops and "flatten" not in c.uncounted_ops


def test_latency_on_cpu_returns_stated_structure():
    stats = time_callable(lambda: torch.ones(64, 64) @ torch.ones(64, 64), device="cpu", warmup=2, iterations=5)
    d = stats.to_dict()
    assert set(d) == STATS_KEYS
    assert d["iterations"] == 5 and d["warmup"] == 2 and d["timer"] == "perf_counter"
    assert d["min_ms"] <= d["median_ms"] <= d["p90_ms"] <= d["max_ms"]


def test_sanity_flag_range():
    assert _ratio_flag({"mAP": 0.50, "mAP50": 0.595})["flag"]          # the seed's 1.19
    assert not _ratio_flag({"mAP": 0.531, "mAP50": 0.713})["flag"]     # RT-DETR-R50 on COCO, 1.34
    assert _ratio_flag({"mAP": 0.02, "mAP50": 0.09})["mAP50_over_mAP"] is None  # too weak to judge
    assert SANITY_RATIO_RANGE[0] < 1.34 < SANITY_RATIO_RANGE[1]


# ------------------------------------------------------------------------------------------------ synthetic, CLI
def test_cli_every_model_kind_on_synthetic(synthetic_data, tiny_model_dir, tmp_path, capsys):
    oracle = write_oracle_results(synthetic_data, "val", tmp_path / "oracle.json")
    out = tmp_path / "report"
    rc = evaluate_main([
        "--data", str(synthetic_data.root), "--split", "val", "--out", str(out), "--latency", "--imgsz", "128",
        "--model", f"rtdetr={tiny_model_dir('rtdetr-tiny')}",
        "--model", f"cdetr={tiny_model_dir('conditional-detr-tiny')}",
        "--model", "yolo=yolo11n.yaml",
        "--predictions", f"oracle={oracle}",
        "warmup=1", "iterations=2", "batch_size=8",
    ])
    assert rc == 0, capsys.readouterr().err
    report = _strict_json(out / "report.json")
    by_name = {e["name"]: e for e in report["models"]}
    assert list(by_name) == ["rtdetr", "cdetr", "yolo", "oracle"]
    n_val = synthetic_data.info["splits"]["val"]["num_images"]
    for name in ("rtdetr", "cdetr", "yolo"):
        e = by_name[name]
        assert e["num_images"] == n_val
        assert 0.0 <= e["mAP"] <= e["mAP50"] <= 1.0
        assert e["params"] > 0 and e["gflops"] == pytest.approx(2 * e["gmacs"]) and e["input_hw"] == [128, 128]
        assert set(e["latency"]) == {"forward", "end_to_end"}
        assert set(e["latency"]["forward"]) == STATS_KEYS and e["latency_ms"] > 0
        assert set(e["per_class_AP"]) == set(synthetic_data.label_map.names)
    assert by_name["yolo"]["kind"] == "ultralytics" and by_name["rtdetr"]["kind"] == "transformers"
    # RT-DETR's deformable attention samples with grid_sample, which flop_counter does not count: it must be named
    assert any(op.startswith("grid_sampler") for op in by_name["rtdetr"]["complexity"]["uncounted_ops"])
    oracle_e = by_name["oracle"]
    assert oracle_e["mAP"] == pytest.approx(1.0)
    assert oracle_e["params"] is None and oracle_e["latency_ms"] is None and "latency" not in oracle_e
    assert report["environment"]["versions"]["pycocotools"] and report["environment"]["device"] == "cpu"
    md = (out / "report.md").read_text()
    assert "| model | runtime | mAP@.50:.95 | mAP@.50 |" in md and all(f"| {n}" in md for n in by_name)
    assert [by_name[n]["runtime"] for n in by_name] == ["pytorch", "pytorch", "pytorch", None]
    assert "GFLOPs = 2 x GMACs" in md and "conf 0.001, IoU 0.7, max_det 300" in md
    png = (out / "plot.png").read_bytes()
    assert png.startswith(PNG_MAGIC)
    import matplotlib.pyplot as plt

    assert plt.imread(out / "plot.png").ndim == 3


def test_cli_refuses_bad_arguments(synthetic_data, tmp_path, capsys):
    assert evaluate_main(["--data", str(synthetic_data.root), "--out", str(tmp_path), "--model", "nopath"]) == 2
    assert "NAME=PATH" in capsys.readouterr().err
    assert evaluate_main(["--data", str(synthetic_data.root), "--out", str(tmp_path), "--model",
                          f"x={tmp_path / 'preds.json'}"]) == 2
    assert "--predictions" in capsys.readouterr().err
    assert evaluate_main(["--data", str(synthetic_data.root), "--out", str(tmp_path), "--model", "x=y.yaml",
                          "no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- TACO sample
def test_every_model_kind_on_taco_sample(taco_data, tmp_path):
    from rtcodetr.models import init_model

    models = {p: init_model(p, taco_data.root, tmp_path / p) for p in ("rtdetr-tiny", "conditional-detr-tiny")}
    models["yolo11n"] = "yolo11n.yaml"
    # the file also holds the train split's boxes: they must be ignored, and said so
    oracle = write_oracle_results(taco_data, "val", tmp_path / "oracle.json", extra_splits=("train",))
    report = evaluate_models(taco_data.root, models, tmp_path / "report", predictions={"oracle": oracle},
                             imgsz=320, draft_size=320, complexity=False, batch_size=4)
    n_val = taco_data.info["splits"]["val"]["num_images"]
    for e in report["models"]:
        assert e["num_images"] == n_val, e["name"]
        assert 0.0 <= e["mAP"] <= 1.0 and not math.isnan(e["mAP"])
    oracle_e = report["models"][-1]
    # real TACO category ids, EXIF-rotated photos: the ground truth itself must score exactly 1
    assert oracle_e["name"] == "oracle" and oracle_e["mAP"] == pytest.approx(1.0)
    assert any("outside the evaluated images were ignored" in note for note in oracle_e["notes"])
    assert _strict_json(tmp_path / "report" / "report.json")["dataset"]["num_labels"] == taco_data.label_map.num_labels
    assert (tmp_path / "report" / "plot.png").read_bytes().startswith(PNG_MAGIC)


class _WholeImage(Detector):
    """Predicts one box covering exactly the image it is given (to check the frame mapping)."""

    kind = "stub"

    def __init__(self):
        super().__init__("whole", ".", "cpu", False)
        self.seen_sizes = []

    def predict(self, images):
        self.seen_sizes += [im.size for im in images]
        return [{"boxes": torch.tensor([[0.0, 0.0, im.width, im.height]]), "scores": torch.ones(1),
                 "labels": torch.zeros(1, dtype=torch.int64)} for im in images]


def test_draft_decoded_predictions_are_mapped_back_to_original_pixels(taco_data):
    from rtcodetr.data.dataset import CocoDetection

    ds = CocoDetection(taco_data, "val", draft_size=320)
    det = _WholeImage()
    preds = predict_split(det, ds, list(range(3)), batch_size=2, progress=False)
    sizes = {im["id"]: (im["width"], im["height"]) for im in taco_data.coco("val")["images"]}
    for p, seen in zip(preds, det.seen_sizes):
        w, h = sizes[p["image_id"]]
        assert seen[0] < w / 2, "draft decoding did not shrink the photo; the test would prove nothing"
        np.testing.assert_allclose(p["boxes"].numpy(), [[0, 0, w, h]], atol=1e-3)


def test_model_with_other_classes_is_refused(taco_data, tiny_model_dir):
    from rtcodetr.evaluate.detectors import load_detector

    with pytest.raises(ValueError, match="label order"):
        load_detector(tiny_model_dir("rtdetr-tiny"), label_map=taco_data.label_map)  # synthetic classes


# --------------------------------------------------------------------------------------------- accelerate launch
def test_accelerate_launch_two_processes_gathers_without_duplicates(synthetic_data, tiny_model_dir, tmp_path):
    oracle = write_oracle_results(synthetic_data, "val", tmp_path / "oracle.json")
    out = tmp_path / "report"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    # `--cpu` alone would need mpirun for two processes; `--multi_gpu` starts them with torchrun and the evaluator
    # (device cpu) joins them with gloo.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "rtcodetr.evaluate", "--data", str(synthetic_data.root), "--out", str(out),
           "--model", f"rtdetr={tiny_model_dir('rtdetr-tiny')}", "--predictions", f"oracle={oracle}",
           "complexity=false", "batch_size=8"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = _strict_json(out / "report.json")
    assert report["environment"]["num_processes"] == 2
    n_val = synthetic_data.info["splits"]["val"]["num_images"]
    by_name = {e["name"]: e for e in report["models"]}
    assert by_name["rtdetr"]["num_images"] == n_val
    assert by_name["oracle"]["num_images"] == n_val and by_name["oracle"]["mAP"] == pytest.approx(1.0)
    # each image predicted once: the tiny RT-DETR keeps 100 queries per image
    assert by_name["rtdetr"]["num_detections"] == 100 * n_val


def test_shortest_edge_detector_batch_equals_one_image_at_a_time(synthetic_data, tiny_model_dir):
    """Conditional DETR pads a batch to its largest image, and its post-processor would then scale boxes by each
    image's own size as if unpadded: a batch of differently shaped images must give each image's unpadded result."""
    from PIL import Image

    from rtcodetr.evaluate.detectors import load_detector

    det = load_detector(tiny_model_dir("conditional-detr-tiny"), label_map=synthetic_data.label_map)
    assert det.geometry["mode"] == "shortest_edge"
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((96, 160), (160, 96))]
    batched = det.predict(images)
    for im, got in zip(images, batched):
        (alone,) = det.predict([im])
        assert len(got["scores"]) > 0
        torch.testing.assert_close(got["boxes"], alone["boxes"])
        torch.testing.assert_close(got["scores"], alone["scores"])
        assert torch.equal(got["labels"], alone["labels"])
        assert (got["boxes"][:, 2] <= im.width + 1e-3).all() and (got["boxes"][:, 3] <= im.height + 1e-3).all()
