"""rtcodetr.evaluate stage: COCO metrics, detectors behind one interface, latency, complexity, report and plot.

Public names (imported lazily so ``rtcodetr.evaluate.cli`` starts without pulling in ultralytics or pycocotools):
``CocoEvaluator`` (``coco_eval``), ``Detector`` / ``load_detector`` (``detectors``), ``count_flops`` (``complexity``),
``time_callable`` (``latency``), ``EvalConfig`` / ``run`` / ``evaluate_models`` / ``evaluate_checkpoint`` (``api``),
``train_yolo`` (``yolo``).
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CocoEvaluator": "coco_eval",
    "Detector": "detectors",
    "load_detector": "detectors",
    "count_flops": "complexity",
    "count_parameters": "complexity",
    "time_callable": "latency",
    "EvalConfig": "api",
    "run": "api",
    "evaluate_models": "api",
    "evaluate_checkpoint": "api",
    "train_yolo": "yolo",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
