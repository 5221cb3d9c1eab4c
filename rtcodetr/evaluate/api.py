"""The evaluation stage as Python calls: ``run(EvalConfig)``, ``evaluate_models(...)``, ``evaluate_checkpoint(...)``.

For every model: predictions on one split (sharded across processes under ``accelerate launch``, gathered with
:meth:`CocoEvaluator.synchronize`), COCO metrics, parameters and FLOPs at a stated input size and, on request,
latency. The main process writes ``report.md``, ``report.json`` and ``plot.png``.
"""
from __future__ import annotations

import datetime as _dt
import math
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from rtcodetr.evaluate.coco_eval import CocoEvaluator
from rtcodetr.evaluate.detectors import YOLO_SETTINGS, Detector, PredictionsFile, load_detector
from rtcodetr.evaluate.latency import time_callable

# mAP50 / mAP of published COCO detectors: RT-DETR-R50 71.3/53.1 = 1.34, YOLO11l 1.37 (ultralytics val), DETR-R50
# 62.4/42.0 = 1.49, Faster R-CNN R50-FPN 58.1/37.4 = 1.55 (torchvision). Weak or small-object models sit higher (the
# CPU synthetic students reach 2.0-2.7), so the band is wide upwards; a ratio near 1 means every matched box is
# near-perfect at IoU .95, which on real data points at a broken protocol (the seed table's 1.19).
SANITY_RATIO_RANGE: tuple[float, float] = (1.25, 3.0)
SANITY_MIN_MAP50 = 0.10  # below this the ratio is noise


@dataclass
class EvalConfig:
    """Settings of ``rtcodetr evaluate`` (flags map onto these; the rest are ``key=value`` words)."""

    data: str = ""                                   # prepared dataset directory
    split: str = "val"
    models: dict[str, str] = field(default_factory=dict)       # name -> save_pretrained dir | .onnx | .pt | .yaml
    predictions: dict[str, str] = field(default_factory=dict)  # name -> COCO results json (accuracy only)
    out: str = ""                                    # report directory
    device: str = "cpu"
    half: bool = False                               # fp16 (CUDA only; ONNX graphs: TensorRT fp16 kernels)
    onnx_provider: str = "auto"                      # .onnx graphs: auto | tensorrt | cuda | cpu (see onnx_providers)
    imgsz: int | None = None                         # see TransformersDetector / UltralyticsDetector
    batch_size: int = 4
    draft_size: int | None = None                    # JPEG draft decoding (faster on 10 MP photos); boxes mapped back
    max_images: int | None = None                    # first N images of the split (quick looks; stated in report)
    latency: bool = False
    threads: int | None = None                       # torch intra-op threads (CPU latency); None = torch default
    warmup: int = 10
    iterations: int = 50
    complexity: bool = True
    yolo_conf: float = YOLO_SETTINGS["conf"]
    yolo_iou: float = YOLO_SETTINGS["iou"]
    yolo_max_det: int = YOLO_SETTINGS["max_det"]
    plot: bool = True


def _distributed_state(device: str):
    """Accelerate's process state. ``cpu=True`` for a CPU run: without it accelerate ignores ``WORLD_SIZE`` on a
    GPU-less host and every launched process would evaluate everything alone (gloo is used across CPU processes)."""
    from accelerate import PartialState

    return PartialState(cpu=torch.device(device).type == "cpu")


def _device_for(cfg_device: str, state: Any) -> str:
    if torch.device(cfg_device).type == "cuda" and state.num_processes > 1 and torch.device(cfg_device).index is None:
        return f"cuda:{state.local_process_index}"
    return cfg_device


def _environment(device: str) -> dict[str, Any]:
    import importlib.metadata as md

    versions = {}
    for pkg in ("rtcodetr", "torch", "torchvision", "transformers", "accelerate", "ultralytics", "pycocotools",
                "numpy", "onnx", "onnxruntime", "onnxruntime-gpu"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    dev = torch.device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        name = platform.processor() or platform.machine()
    return {
        "versions": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": name,
        "torch_threads": torch.get_num_threads(),
    }


def _ratio_flag(metrics: Mapping[str, Any]) -> dict[str, Any]:
    m, m50 = metrics.get("mAP"), metrics.get("mAP50")
    lo, hi = SANITY_RATIO_RANGE
    if m is None or m50 is None or not (m > 0) or math.isnan(m50) or m50 < SANITY_MIN_MAP50:
        return {"mAP50_over_mAP": None, "flag": False, "range": [lo, hi], "reason": "mAP50 too low to judge"}
    ratio = m50 / m
    flag = not (lo <= ratio <= hi)
    reason = ""
    if ratio < lo:
        reason = (f"mAP50/mAP = {ratio:.2f} < {lo}: boxes are almost all perfect at IoU .95, unusual on real data; "
                  "check the protocol (IoU thresholds, box format, duplicate GT/predictions)")
    elif ratio > hi:
        reason = (f"mAP50/mAP = {ratio:.2f} > {hi}: boxes are found but badly localised; check box conversion "
                  "(xyxy vs xywh, normalised vs pixels, resize/letterbox mapping)")
    return {"mAP50_over_mAP": ratio, "flag": flag, "range": [lo, hi], "reason": reason}


def predict_split(detector: Detector, dataset: Any, indices: Sequence[int], batch_size: int,
                  progress: bool = True) -> list[dict[str, Any]]:
    """Detections for ``dataset`` samples ``indices``: ``[{"image_id", "boxes" xyxy original px, "scores", "labels"}]``.

    Images are decoded upright through :class:`~rtcodetr.data.CocoDetection` (EXIF handled there); with draft
    decoding the boxes are mapped back to the original frame through the inverse of ``target["affine"]``.
    """
    from rtcodetr.data.boxes import affine_boxes, clip_boxes

    out: list[dict[str, Any]] = []
    if isinstance(detector, PredictionsFile):
        for i in indices:
            image_id = int(dataset.image_ids[i])
            out.append({"image_id": image_id, **detector.predictions_for(image_id)})
        return out
    bar = tqdm(total=len(indices), desc=f"predict {detector.name}", disable=not progress, leave=False)
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        images, targets = zip(*(dataset.load(i) for i in chunk))
        preds = detector.predict(list(images))
        for target, pred in zip(targets, preds):
            boxes = pred["boxes"]
            affine = target.get("affine")
            if affine is not None and not torch.equal(affine, torch.eye(3, dtype=affine.dtype)):
                boxes = affine_boxes(boxes.double(), torch.linalg.inv(affine)).float()
                # JPEG draft decoding rounds the size up to whole DCT blocks, so the decoded frame reaches up to one
                # block past the original edge; clip back into the annotated image.
                boxes = clip_boxes(boxes, [int(v) for v in target["orig_size"]])
            out.append({"image_id": int(target["image_id"]), "boxes": boxes, "scores": pred["scores"],
                        "labels": pred["labels"]})
        bar.update(len(chunk))
    bar.close()
    return out


def measure_model(detector: Detector, image: Any, cfg: EvalConfig) -> dict[str, Any]:
    """Params/FLOPs (and latency when ``cfg.latency``) of one detector at its fixed latency size, batch 1."""
    size = detector.latency_size(cfg.imgsz)
    result: dict[str, Any] = {"input_hw": list(size)}
    inputs = detector.forward_input(image, size)
    if cfg.complexity:
        result["complexity"] = detector.complexity(inputs, size)
    if cfg.latency:
        dev = detector.device
        result["latency"] = {
            # CUDA events time torch's stream; ONNX Runtime runs on its own and returns when done: wall clock
            "forward": time_callable(lambda: detector.forward(inputs), device=dev, warmup=cfg.warmup,
                                     iterations=cfg.iterations, cuda_events=detector.runtime == "pytorch").to_dict(),
            "end_to_end": time_callable(lambda: detector.predict_at([image], size), device=dev, warmup=cfg.warmup,
                                        iterations=cfg.iterations).to_dict(),
        }
    return result


def protocol_text(cfg: EvalConfig) -> dict[str, str]:
    """The measurement protocol, in words, as stated in the report."""
    return {
        "accuracy": (
            "COCO box metrics with pycocotools (COCOeval, iouType bbox, maxDets 1/10/100, IoU .50:.05:.95) on "
            f"split '{cfg.split}'; predictions in original-image pixels mapped to the dataset's category ids; "
            "transformers models: own image processor + post_process_object_detection (threshold 0, own top-k); "
            f"ultralytics: letterbox + NMS conf {cfg.yolo_conf}, IoU {cfg.yolo_iou}, max_det {cfg.yolo_max_det}"
            + (f"; first {cfg.max_images} images only" if cfg.max_images else "")
            + (f"; JPEG draft decoding to >= {cfg.draft_size} px" if cfg.draft_size else "")
        ),
        "latency": (
            f"batch 1, fixed input size per model (column 'input'), {cfg.warmup} warm-up then {cfg.iterations} "
            "timed iterations; median, p90, mean ± std in ms; 'forward' = network only on a ready input tensor "
            "(CUDA events on GPU); 'end-to-end' = image processor / letterbox from a decoded PIL image + forward + "
            "post-processing / NMS (wall clock, CUDA synchronised on GPU); image decoding excluded; "
            f"device {cfg.device}, {'fp16' if cfg.half else 'fp32'}, torch threads {torch.get_num_threads()}; "
            "ONNX graphs (runtime onnxruntime / tensorrt): the same processor and post-processor, the network run "
            "by ONNX Runtime with as many intra-op threads as torch, input bound in place on the device, forward "
            "timed by wall clock (the run returns when its outputs are ready)"
        ) if cfg.latency else "not measured (pass --latency)",
        "complexity": (
            "torch.utils.flop_counter.FlopCounterMode on one batch-1 forward at the 'input' size: counts 2 FLOPs "
            "per multiply-accumulate (GFLOPs = 2 x GMACs), only matmul/conv/attention kernels; not counted: "
            "normalisation, activations, element-wise ops, softmax, pooling, interpolation and deformable-attention "
            "sampling (grid_sample) — see each model's 'uncounted_ops'. YOLO params/FLOPs are of the fused "
            "network ultralytics runs."
        ),
        "sanity": (
            f"flag when mAP50/mAP is outside {SANITY_RATIO_RANGE[0]}–{SANITY_RATIO_RANGE[1]} and mAP50 >= "
            f"{SANITY_MIN_MAP50} (published COCO detectors: 1.34 RT-DETR-R50, 1.37 YOLO11l, 1.49 DETR-R50, 1.55 "
            "Faster R-CNN R50-FPN)"
        ),
    }


def run(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate every model of ``cfg`` and (on the main process) write the report; returns the report dict."""
    from rtcodetr.data.dataset import CocoDetection
    from rtcodetr.data.prepared import PreparedData

    if not cfg.data:
        raise ValueError("evaluate: 'data' (a prepared dataset directory) is required")
    if not cfg.models and not cfg.predictions:
        raise ValueError("evaluate: give at least one --model NAME=PATH or --predictions NAME=RESULTS.json")
    clash = set(cfg.models) & set(cfg.predictions)
    if clash:
        raise ValueError(f"evaluate: names used twice (--model and --predictions): {sorted(clash)}")
    if cfg.threads is not None:
        if cfg.threads < 1:
            raise ValueError(f"evaluate: 'threads' must be >= 1, got {cfg.threads}")
        torch.set_num_threads(cfg.threads)
    state = _distributed_state(cfg.device)
    device = _device_for(cfg.device, state)
    data = PreparedData.load(cfg.data)
    if not data.is_labelled(cfg.split):
        raise ValueError(f"evaluate: split '{cfg.split}' of {data.root} is unlabelled (no ground truth to score "
                         f"against); labelled splits: {', '.join(data.labelled_splits)}")
    dataset = CocoDetection(data, cfg.split, draft_size=cfg.draft_size)
    n = len(dataset) if cfg.max_images is None else min(cfg.max_images, len(dataset))
    # strided shards: every process gets whole images, none is padded; synchronize() still de-duplicates
    my_indices = list(range(state.process_index, n, state.num_processes))
    coco_gt = data.coco(cfg.split)
    if cfg.max_images is not None:
        keep = {int(i) for i in dataset.image_ids[:n]}
        coco_gt = {**coco_gt, "images": [im for im in coco_gt["images"] if int(im["id"]) in keep],
                   "annotations": [a for a in coco_gt["annotations"] if int(a["image_id"]) in keep]}
    yolo_settings = {"conf": cfg.yolo_conf, "iou": cfg.yolo_iou, "max_det": cfg.yolo_max_det}
    main = state.is_main_process

    entries: list[dict[str, Any]] = []
    todo = [(name, path, "model") for name, path in cfg.models.items()]
    todo += [(name, path, "predictions") for name, path in cfg.predictions.items()]
    sample_image = dataset.load(0)[0] if n else None
    for name, path, source in todo:
        if source == "predictions":
            det: Detector = PredictionsFile(name, path, data.label_map)
        else:
            det = load_detector(path, device, cfg.half, label_map=data.label_map, name=name, imgsz=cfg.imgsz,
                                yolo_settings=yolo_settings, provider=cfg.onnx_provider)
        evaluator = CocoEvaluator(coco_gt, data.label_map)
        evaluator.update(predict_split(det, dataset, my_indices, cfg.batch_size, progress=main))
        evaluator.synchronize(state)
        metrics = evaluator.summarize()
        entry: dict[str, Any] = {"name": name, "path": str(path), "kind": det.kind, "runtime": det.runtime,
                                 "protocol": det.protocol(), **metrics}
        entry["sanity"] = _ratio_flag(metrics)
        if isinstance(det, PredictionsFile):
            outside = det.image_ids() - {int(i) for i in dataset.image_ids[:n]}
            if outside:
                entry["notes"] = entry["notes"] + [
                    f"{path}: detections for {len(outside)} image ids outside the evaluated images were ignored "
                    f"(e.g. {sorted(outside)[:5]}); was the file made for another split?"]
        if det.can_time and main and sample_image is not None and (cfg.complexity or cfg.latency):
            entry.update(measure_model(det, sample_image, cfg))
        comp = entry.get("complexity") or {}
        entry["params"] = comp.get("params")
        entry["gflops"] = comp.get("gflops")
        entry["gmacs"] = comp.get("gmacs")
        lat = entry.get("latency") or {}
        entry["latency_ms"] = (lat.get("end_to_end") or {}).get("median_ms")
        entries.append(entry)
        if main:
            tqdm.write(f"evaluate: {name}: mAP {metrics['mAP']:.4f} mAP50 {metrics['mAP50']:.4f} "
                       f"on {metrics['num_images']} images")
        del det
    report = {
        "format_version": 1,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "dataset": {"root": str(data.root), "name": data.info.get("name"), "split": cfg.split,
                    "num_images": n, "num_labels": data.label_map.num_labels, "labels": list(data.label_map.names),
                    "fingerprint": {k: v for k, v in data.fingerprint(cfg.split).items() if k != "image_ids"}},
        "protocol": protocol_text(cfg),
        "environment": {**_environment(device), "num_processes": state.num_processes},
        "config": _config_dict(cfg),
        "models": entries,
    }
    if cfg.out and main:
        from rtcodetr.evaluate.report import write_report

        report["files"] = write_report(report, cfg.out, plot=cfg.plot)
    state.wait_for_everyone()
    return report


def _config_dict(cfg: EvalConfig) -> dict[str, Any]:
    from rtcodetr.config import config_to_dict

    return config_to_dict(cfg)


def evaluate_models(data: str | Path, models: Mapping[str, str | Path], out: str | Path | None = None, *,
                    split: str = "val", predictions: Mapping[str, str | Path] | None = None, latency: bool = False,
                    device: str = "cpu", imgsz: int | None = None, half: bool = False,
                    **overrides: Any) -> dict[str, Any]:
    """Python entry point for the demo and the sweep: evaluate ``{name: path}`` and write the report to ``out``.

    Extra keyword arguments are :class:`EvalConfig` fields (``batch_size``, ``iterations``, ``max_images`` …).
    Returns the report dict; ``report["models"]`` has one entry per model with ``mAP``, ``mAP50``, ``params``,
    ``gflops``, ``latency_ms`` (end-to-end median, None without ``latency``) and everything else.
    """
    cfg = EvalConfig(data=str(data), split=split, models={k: str(v) for k, v in models.items()},
                     predictions={k: str(v) for k, v in (predictions or {}).items()}, out=str(out or ""),
                     latency=latency, device=device, imgsz=imgsz, half=half)
    for key, value in overrides.items():
        if not hasattr(cfg, key):
            raise TypeError(f"evaluate_models: unknown setting '{key}'")
        setattr(cfg, key, value)
    return run(cfg)


def evaluate_checkpoint(path: str | Path, data: str | Path, *, split: str = "val", device: str = "cpu",
                        **overrides: Any) -> dict[str, Any]:
    """COCO metrics of one model (no files written, no latency): the ``summarize()`` dict plus ``params``/``gflops``."""
    report = evaluate_models(data, {Path(path).name: path}, None, split=split, device=device, latency=False,
                             **{"complexity": False, **overrides})
    entry = report["models"][0]
    keep = ("protocol", "path", "kind", "sanity", "complexity", "latency")
    return {k: v for k, v in entry.items() if k not in keep}
