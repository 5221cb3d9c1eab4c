"""COCO box metrics with a visible lifecycle: ``update`` -> ``synchronize`` -> ``accumulate`` -> ``summarize``.

Built only on public pycocotools calls (``COCO``, ``COCO.loadRes``, ``COCO.createIndex``, ``COCOeval``), the same
shape as torchvision's ``references/detection/coco_eval.py``. The trainer reuses this class for validation, so it
knows nothing about command lines, models or files other than the ground truth.

Boxes enter as absolute-pixel float32 ``xyxy`` in the original (annotated) image frame, with contiguous labels
``0..K-1``; they become COCO ``xywh`` with dataset category ids only at :meth:`CocoEvaluator._coco_results`, the
evaluator boundary.

Two pycocotools pitfalls this class guards against:

* ``COCO(dict)`` keeps a reference to the dict and ``COCOeval`` writes an ``ignore`` flag into every ground-truth
  annotation, and ``loadRes`` writes ``id``/``area``/``segmentation`` into every result: the caller's ground truth
  is deep-copied first and results are built fresh, so nothing the caller owns is mutated.
* ``COCOeval.evaluateImg`` records matches as ``gtm[...] = dt['id']`` / ``dtm[...] = gt['id']`` and treats 0 as
  "unmatched", so a ground-truth annotation with id 0 is matched but its detection is then counted as a false
  positive (and ``loadRes`` numbers results from 1, so result ids are fine). Ground truth whose annotation ids are
  not unique integers >= 1 is renumbered 1..N *in the private copy* and the fact is recorded in
  :attr:`CocoEvaluator.notes`; ids carry no meaning for box metrics.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from rtcodetr.data.boxes import xyxy_to_coco_xywh

# COCOeval.stats order for iouType="bbox" (pycocotools/cocoeval.py, summarize._summarizeDets).
STAT_NAMES: tuple[str, ...] = (
    "mAP", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large", "AR1", "AR10", "AR100",
    "AR_small", "AR_medium", "AR_large",
)


def _to_numpy(x: Any, dtype: type) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu")
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


def _prepare_ground_truth(coco_gt: str | Path | Mapping) -> tuple[dict, list[str]]:
    """Load (or deep-copy) a COCO ground truth and make it safe for pycocotools; returns (copy, notes)."""
    if isinstance(coco_gt, (str, Path)):
        path = Path(coco_gt)
        try:
            with open(path) as f:
                gt = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read COCO ground truth {path}: {e}") from e
        source = str(path)
    elif isinstance(coco_gt, Mapping):
        gt = copy.deepcopy(dict(coco_gt))  # COCOeval writes into annotations; never touch the caller's dict
        source = "<dict>"
    else:
        raise TypeError(f"coco_gt must be a path or a COCO dict, got {type(coco_gt).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(gt.get(key), list):
            raise ValueError(f"COCO ground truth {source}: field '{key}' is missing or not a list")
    notes: list[str] = []
    image_ids = set()
    for i, img in enumerate(gt["images"]):
        if "id" not in img:
            raise ValueError(f"COCO ground truth {source}: images[{i}] has no 'id'")
        image_ids.add(img["id"])
    ids = [a.get("id") for a in gt["annotations"]]
    if any(not isinstance(i, int) or isinstance(i, bool) or i < 1 for i in ids) or len(set(ids)) != len(ids):
        for new_id, ann in enumerate(gt["annotations"], start=1):
            ann["id"] = new_id
        notes.append(
            f"annotation ids in {source} were not unique integers >= 1 (pycocotools treats id 0 as 'unmatched'); "
            "they were renumbered 1..N in the evaluator's private copy"
        )
    for i, ann in enumerate(gt["annotations"]):
        for key in ("image_id", "category_id", "bbox"):
            if key not in ann:
                raise ValueError(f"COCO ground truth {source}: annotations[{i}] (id {ann['id']}) has no '{key}'")
        if ann["image_id"] not in image_ids:
            raise ValueError(
                f"COCO ground truth {source}: annotations[{i}] (id {ann['id']}) field 'image_id' = "
                f"{ann['image_id']} is not in 'images'"
            )
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
    return gt, notes


class CocoEvaluator:
    """Accumulates per-image detections and computes COCO box metrics with pycocotools.

    Args:
        coco_gt: a COCO json path or an already parsed dict (deep-copied; never mutated).
        label_map: the dataset's :class:`rtcodetr.data.LabelMap`; ``label_map.category_ids[label]`` is the category
            id written into COCO results.

    Lifecycle::

        ev = CocoEvaluator(data.split_file("val"), data.label_map)
        for batch in loader:
            ev.update(predictions)          # this process's images
        ev.synchronize(accelerator)         # all processes' images, duplicates dropped
        ev.accumulate()
        metrics = ev.summarize()            # {"mAP": ..., "per_class_AP": {...}, ...}
    """

    def __init__(self, coco_gt: str | Path | Mapping, label_map: Any) -> None:
        from pycocotools.coco import COCO

        self.label_map = label_map
        self.category_ids = np.asarray(label_map.category_ids, dtype=np.int64)
        self.names: list[str] = list(label_map.names)
        gt, self.notes = _prepare_ground_truth(coco_gt)
        gt_cats = {c["id"] for c in gt["categories"]}
        missing = [int(c) for c in self.category_ids if int(c) not in gt_cats]
        if missing:
            raise ValueError(f"label map category ids {missing} are not categories of the ground truth")
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            self.coco_gt = COCO()
            self.coco_gt.dataset = gt
            self.coco_gt.createIndex()
        self.image_ids: set[int] = set(self.coco_gt.getImgIds())
        self._predictions: list[dict[str, Any]] = []
        self._eval = None
        self._accumulated = False

    # ---------------------------------------------------------------- update
    def update(self, predictions: Sequence[Mapping[str, Any]]) -> None:
        """Add detections for some images.

        Each item: ``image_id`` (int, an id of the ground truth), ``boxes`` float ``[N, 4]`` absolute-pixel ``xyxy``
        in the original image frame, ``scores`` float ``[N]``, ``labels`` int ``[N]`` in ``0..K-1``. Tensors or
        numpy; an image with ``N == 0`` still counts as evaluated.
        """
        k = len(self.category_ids)
        for j, p in enumerate(predictions):
            try:
                image_id = int(p["image_id"])
                boxes = _to_numpy(p["boxes"], np.float64).reshape(-1, 4)
                scores = _to_numpy(p["scores"], np.float64).reshape(-1)
                labels = _to_numpy(p["labels"], np.int64).reshape(-1)
            except KeyError as e:
                raise ValueError(f"prediction {j}: missing field {e}") from None
            if image_id not in self.image_ids:
                raise ValueError(f"prediction {j}: field 'image_id' = {image_id} is not an image of the ground truth")
            if not (len(boxes) == len(scores) == len(labels)):
                raise ValueError(
                    f"prediction {j} (image_id {image_id}): boxes/scores/labels lengths differ "
                    f"({len(boxes)}, {len(scores)}, {len(labels)})"
                )
            if len(labels) and (labels.min() < 0 or labels.max() >= k):
                raise ValueError(
                    f"prediction {j} (image_id {image_id}): field 'labels' has values outside 0..{k - 1}"
                )
            if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
                raise ValueError(f"prediction {j} (image_id {image_id}): non-finite boxes or scores")
            self._predictions.append({"image_id": image_id, "boxes": boxes, "scores": scores, "labels": labels})
        self._eval, self._accumulated = None, False

    # ----------------------------------------------------------- synchronize
    def synchronize(self, accelerator: Any = None) -> None:
        """Gather every process's predictions onto every process and drop duplicates by ``image_id``.

        Distributed samplers pad the last batch by repeating images, so an image can arrive from two processes; the
        first copy is kept (both copies are identical predictions of the same image). Without an accelerator (or
        with one process) only the de-duplication runs.
        """
        preds = self._predictions
        if accelerator is not None and getattr(accelerator, "num_processes", 1) > 1:
            from accelerate.utils import gather_object

            preds = gather_object(preds)  # list concatenated over ranks, rank order
        seen: set[int] = set()
        unique = []
        for p in preds:
            if p["image_id"] not in seen:
                seen.add(p["image_id"])
                unique.append(p)
        self.num_duplicates = len(preds) - len(unique)  # images predicted more than once (by several processes)
        self._predictions = unique
        self._eval, self._accumulated = None, False

    @property
    def num_images(self) -> int:
        """Number of distinct images with a prediction entry (possibly empty)."""
        return len({p["image_id"] for p in self._predictions})

    def _coco_results(self) -> list[dict[str, Any]]:
        """The evaluator boundary: xyxy + label -> COCO ``{"image_id", "category_id", "bbox" xywh, "score"}``."""
        out: list[dict[str, Any]] = []
        for p in self._predictions:
            xywh = xyxy_to_coco_xywh(p["boxes"])
            cats = self.category_ids[p["labels"]]
            for box, score, cat in zip(xywh.tolist(), p["scores"].tolist(), cats.tolist()):
                out.append({"image_id": p["image_id"], "category_id": int(cat), "bbox": box, "score": float(score)})
        return out

    def results(self) -> list[dict[str, Any]]:
        """The current predictions as a COCO detection-results list (what ``--predictions`` files contain)."""
        return self._coco_results()

    # ------------------------------------------------------------ accumulate
    def accumulate(self) -> None:
        """Run ``COCOeval.evaluate`` + ``accumulate`` over the images that received predictions.

        Images of the ground truth without any ``update`` entry are left out of ``imgIds`` (a partial evaluation, as
        in torchvision); an image updated with zero boxes is evaluated (its ground truth counts as missed).
        """
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        self._accumulated = True
        if not self._predictions:
            # pycocotools reads an empty imgIds as "every image"; with no image evaluated there is nothing to score
            self._eval = None
            return
        results = self._coco_results()
        with contextlib.redirect_stdout(io.StringIO()):
            if results:
                coco_dt = self.coco_gt.loadRes(results)
            else:
                # loadRes cannot take an empty list (it inspects anns[0]); an empty result set is still valid
                coco_dt = COCO()
                coco_dt.dataset = {
                    "images": list(self.coco_gt.dataset["images"]),
                    "categories": copy.deepcopy(self.coco_gt.dataset["categories"]),
                    "annotations": [],
                }
                coco_dt.createIndex()
            ev = COCOeval(self.coco_gt, coco_dt, iouType="bbox")
            ev.params.imgIds = sorted({p["image_id"] for p in self._predictions})
            ev.params.catIds = sorted(int(c) for c in self.category_ids)
            ev.evaluate()
            ev.accumulate()
        self._eval = ev

    # ------------------------------------------------------------- summarize
    def summarize(self) -> dict[str, Any]:
        """Named metrics in [0, 1] (pycocotools' -1 "no ground truth" becomes ``nan``).

        Returns ``mAP`` (IoU .50:.95), ``mAP50``, ``mAP75``, ``mAP_small/medium/large``, ``AR1``, ``AR10``,
        ``AR100``, ``AR_small/medium/large``, ``per_class_AP`` / ``per_class_AP50`` ({class name: AP or nan when the
        class has no ground truth among the evaluated images}), ``num_images``, ``num_detections`` and ``notes``.
        """
        if not self._accumulated:
            self.accumulate()
        ev = self._eval
        if ev is None:
            stats = np.full(len(STAT_NAMES), -1.0)
        else:
            with contextlib.redirect_stdout(io.StringIO()):
                ev.summarize()
            stats = np.asarray(ev.stats, dtype=np.float64)
        out: dict[str, Any] = {
            name: (float(v) if v >= 0 else math.nan) for name, v in zip(STAT_NAMES, stats)
        }
        # precision: [T IoU thresholds, R recall points, K categories, A area ranges, M max-dets]; area "all" = 0,
        # maxDets 100 = last; -1 marks "no ground truth" exactly as COCOeval.summarize treats it.
        precision = ev.eval["precision"] if ev is not None else None
        cat_index = {c: i for i, c in enumerate(sorted(int(c) for c in self.category_ids))}
        per_class, per_class50 = {}, {}
        for label, (name, cat) in enumerate(zip(self.names, self.category_ids.tolist())):
            ap = ap50 = math.nan
            if precision is not None:
                p = precision[:, :, cat_index[cat], 0, -1]
                if (p > -1).any():
                    ap = float(p[p > -1].mean())
                p50 = precision[0, :, cat_index[cat], 0, -1]
                if (p50 > -1).any():
                    ap50 = float(p50[p50 > -1].mean())
            per_class[name] = ap
            per_class50[name] = ap50
        out["per_class_AP"] = per_class
        out["per_class_AP50"] = per_class50
        out["num_images"] = len(ev.params.imgIds) if ev is not None else 0
        out["num_duplicates"] = getattr(self, "num_duplicates", 0)
        out["num_detections"] = int(sum(len(p["scores"]) for p in self._predictions))
        out["notes"] = list(self.notes)
        return out
