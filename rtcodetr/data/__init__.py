"""rtcodetr.data stage: COCO/TACO preparation, synthetic set, dataset, transforms that record their geometry.

The main names are importable from here (``from rtcodetr.data import PreparedData, CocoDetection``); they are
loaded lazily so ``import rtcodetr.data`` stays cheap (no torch until a name that needs it is used).
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LabelMap": "rtcodetr.data.prepared",
    "PreparedData": "rtcodetr.data.prepared",
    "PreparedDataError": "rtcodetr.data.prepared",
    "CocoDetection": "rtcodetr.data.dataset",
    "ImageDecodeError": "rtcodetr.data.dataset",
    "AugmentConfig": "rtcodetr.data.transforms",
    "build_transforms": "rtcodetr.data.transforms",
    "resize_batch": "rtcodetr.data.transforms",
    "make_synthetic": "rtcodetr.data.synthetic",
    "AddImagesConfig": "rtcodetr.data.unlabeled",
    "add_images": "rtcodetr.data.unlabeled",
    "export_yolo": "rtcodetr.data.yolo",
    "DatasetError": "rtcodetr.data.coco",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rtcodetr.data' has no attribute '{name}'")
