"""CocoEvaluator on hand-made ground truth whose AP is known, checked against pycocotools run directly."""
from __future__ import annotations

import contextlib
import copy
import io
import math

import numpy as np
import pytest
import torch

from rtcodetr.data.prepared import LabelMap
from rtcodetr.evaluate.coco_eval import CocoEvaluator

# Two categories, three images; boxes chosen to land in all three COCO area ranges (small < 32², large > 96²).
GT = {
    "images": [
        {"id": 1, "file_name": "a.jpg", "width": 200, "height": 200},
        {"id": 2, "file_name": "b.jpg", "width": 200, "height": 200},
        {"id": 3, "file_name": "c.jpg", "width": 200, "height": 200},
    ],
    "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50, 50, 100, 120], "area": 12000, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [0, 0, 60, 50], "area": 3000, "iscrowd": 0},
        {"id": 4, "image_id": 2, "category_id": 1, "bbox": [100, 100, 40, 40], "area": 1600, "iscrowd": 0},
        {"id": 5, "image_id": 3, "category_id": 2, "bbox": [20, 30, 150, 160], "area": 24000, "iscrowd": 0},
    ],
}
LABELS = LabelMap(["cat", "dog"])


def perfect_predictions(gt: dict) -> list[dict]:
    """One exact xyxy box per ground-truth annotation, grouped by image."""
    out = []
    for img in gt["images"]:
        anns = [a for a in gt["annotations"] if a["image_id"] == img["id"]]
        boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns]
        out.append({
            "image_id": img["id"],
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.linspace(0.9, 0.5, len(anns)),
            "labels": torch.tensor([a["category_id"] - 1 for a in anns], dtype=torch.int64),
        })
    return out


def pycocotools_reference(gt: dict, results: list[dict]) -> np.ndarray:
    """COCOeval stats computed straight from pycocotools on a COCO results list (the independent reference)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(copy.deepcopy(results)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def test_perfect_predictions_give_one():
    gt = copy.deepcopy(GT)
    ev = CocoEvaluator(gt, LABELS)
    ev.update(perfect_predictions(GT))
    ev.synchronize()
    ev.accumulate()
    m = ev.summarize()
    for key in ("mAP", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large", "AR100"):
        assert m[key] == pytest.approx(1.0), key
    assert m["per_class_AP"] == {"cat": pytest.approx(1.0), "dog": pytest.approx(1.0)}
    assert m["num_images"] == 3 and m["num_detections"] == 5
    assert gt == GT, "the caller's ground truth was mutated"


def test_known_misses_and_false_positives_match_pycocotools_and_hand_value():
    # Image 1: the cat is found exactly (0.9), a confident false positive (0.95) elsewhere, the dog is missed.
    # Image 2: one cat found at IoU ~0.68 (counts only for thresholds <= .65), the other missed.
    # Image 3: the dog found exactly, but with the wrong label (a cat false positive) at a lower score.
    preds = [
        {"image_id": 1, "boxes": np.array([[10, 10, 30, 30], [150, 150, 190, 190]], np.float32),
         "scores": np.array([0.9, 0.95]), "labels": np.array([0, 0])},
        {"image_id": 2, "boxes": np.array([[0, 0, 60, 35]], np.float32), "scores": np.array([0.8]),
         "labels": np.array([0])},
        {"image_id": 3, "boxes": np.array([[20, 30, 170, 190], [20, 30, 170, 190]], np.float32),
         "scores": np.array([0.7, 0.6]), "labels": np.array([1, 0])},
    ]
    ev = CocoEvaluator(GT, LABELS)
    ev.update(preds)
    m = ev.summarize()

    results = [
        {"image_id": p["image_id"], "category_id": int(c) + 1, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
         "score": float(s)}
        for p in preds for b, s, c in zip(p["boxes"].tolist(), p["scores"], p["labels"])
    ]
    ref = pycocotools_reference(GT, results)
    names = ["mAP", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large", "AR1", "AR10", "AR100"]
    for i, key in enumerate(names):
        expected = ref[i] if ref[i] >= 0 else math.nan
        assert m[key] == pytest.approx(expected, nan_ok=True), key
    # Hand value for "dog": one of two dogs found exactly and ranked first -> precision 1 up to recall 0.5:
    # 51 of COCO's 101 recall points at every IoU threshold.
    assert m["per_class_AP"]["dog"] == pytest.approx(51 / 101)
    assert 0 < m["mAP"] < m["mAP50"] < 1


def test_label_to_category_mapping_uses_label_map():
    # Category ids that are not label + 1 (a ground truth written by another tool): the map decides.
    gt = copy.deepcopy(GT)
    for c in gt["categories"]:
        c["id"] += 10
    for a in gt["annotations"]:
        a["category_id"] += 10

    class ShiftedMap:
        names = ["cat", "dog"]
        category_ids = np.array([11, 12])

    ev = CocoEvaluator(gt, ShiftedMap())
    ev.update(perfect_predictions(GT))
    assert ev.summarize()["mAP"] == pytest.approx(1.0)
    assert {r["category_id"] for r in ev.results()} == {11, 12}


def test_annotation_id_zero_is_renumbered_not_miscounted():
    gt = copy.deepcopy(GT)
    for a in gt["annotations"]:
        a["id"] -= 1  # ids 0..4: pycocotools would count the detection matched to id 0 as a false positive
    ev = CocoEvaluator(gt, LABELS)
    ev.update(perfect_predictions(GT))
    m = ev.summarize()
    assert m["mAP"] == pytest.approx(1.0)
    assert m["notes"] and "renumbered" in m["notes"][0]
    assert gt["annotations"][0]["id"] == 0, "the caller's ground truth was mutated"


def test_empty_predictions_do_not_crash():
    ev = CocoEvaluator(GT, LABELS)
    m = ev.summarize()  # nothing at all
    assert m["num_images"] == 0 and math.isnan(m["mAP"])

    ev = CocoEvaluator(GT, LABELS)
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    ev.update([{"image_id": i, **empty} for i in (1, 2, 3)])
    m = ev.summarize()
    assert m["num_images"] == 3 and m["mAP"] == 0.0 and m["AR100"] == 0.0

    ev = CocoEvaluator(GT, LABELS)
    ev.update([{"image_id": 1, **empty}] + perfect_predictions(GT)[1:])  # one image without detections
    m = ev.summarize()
    assert 0 < m["mAP"] < 1


def test_synchronize_drops_padded_duplicates():
    ev = CocoEvaluator(GT, LABELS)
    preds = perfect_predictions(GT)
    ev.update(preds + preds[:2])  # a padded last batch repeats images 1 and 2
    ev.synchronize()
    assert ev.num_images == 3
    assert ev.summarize()["num_detections"] == 5


def test_bad_predictions_name_the_field():
    ev = CocoEvaluator(GT, LABELS)
    with pytest.raises(ValueError, match="image_id"):
        ev.update([{"image_id": 99, "boxes": np.zeros((0, 4)), "scores": [], "labels": []}])
    with pytest.raises(ValueError, match="labels"):
        ev.update([{"image_id": 1, "boxes": np.zeros((1, 4)), "scores": [0.5], "labels": [2]}])
    with pytest.raises(ValueError, match="boxes"):
        ev.update([{"image_id": 1, "scores": [0.5], "labels": [0]}])
