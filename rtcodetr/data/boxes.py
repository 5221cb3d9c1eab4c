"""Box format conversions: the only places where boxes change format.

Inside the code boxes are absolute-pixel ``xyxy`` (float32). Pixel coordinates are continuous: an image of width W
spans ``[0, W]``. Every function accepts a numpy array or a torch tensor of shape ``[N, 4]`` (or ``[4]``) and returns
the same kind (torch in -> torch out, numpy in -> numpy out), keeping the input's floating dtype.
"""
from __future__ import annotations

from typing import Sequence, TypeVar

import numpy as np
import torch

Boxes = TypeVar("Boxes", np.ndarray, torch.Tensor)


def _cat(parts: Sequence, like):
    if isinstance(like, torch.Tensor):
        return torch.stack(list(parts), dim=-1)
    return np.stack(list(parts), axis=-1)


def _float(boxes):
    """Floating view of the input (integers are promoted to float32; float64 stays float64)."""
    if isinstance(boxes, torch.Tensor):
        return boxes if boxes.is_floating_point() else boxes.to(torch.float32)
    boxes = np.asarray(boxes)
    return boxes if np.issubdtype(boxes.dtype, np.floating) else boxes.astype(np.float32)


def coco_xywh_to_xyxy(boxes: Boxes) -> Boxes:
    """COCO ``[x, y, w, h]`` (absolute pixels, top-left corner) -> absolute ``[x1, y1, x2, y2]``."""
    b = _float(boxes)
    x, y, w, h = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
    return _cat([x, y, x + w, y + h], b)


def xyxy_to_coco_xywh(boxes: Boxes) -> Boxes:
    """Absolute ``[x1, y1, x2, y2]`` -> COCO ``[x, y, w, h]`` (absolute pixels)."""
    b = _float(boxes)
    x1, y1, x2, y2 = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
    return _cat([x1, y1, x2 - x1, y2 - y1], b)


def xyxy_to_cxcywh_normalized(boxes: Boxes, size_hw: Sequence[int]) -> Boxes:
    """Absolute ``xyxy`` in an image of ``size_hw = (h, w)`` -> ``[cx, cy, w, h]`` divided by ``(w, h, w, h)``.

    This is the format HF DETR-family models take as ``labels[i]["boxes"]`` and predict as ``pred_boxes``.
    """
    b = _float(boxes)
    h, w = float(size_hw[0]), float(size_hw[1])
    x1, y1, x2, y2 = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
    return _cat([(x1 + x2) / (2 * w), (y1 + y2) / (2 * h), (x2 - x1) / w, (y2 - y1) / h], b)


def cxcywh_normalized_to_xyxy(boxes: Boxes, size_hw: Sequence[int]) -> Boxes:
    """Normalized ``[cx, cy, w, h]`` (fractions of ``size_hw = (h, w)``) -> absolute ``xyxy`` in that image."""
    b = _float(boxes)
    h, w = float(size_hw[0]), float(size_hw[1])
    cx, cy, bw, bh = b[..., 0] * w, b[..., 1] * h, b[..., 2] * w, b[..., 3] * h
    return _cat([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], b)


def affine_points(points: Boxes, affine3x3) -> Boxes:
    """Apply a homogeneous ``[3, 3]`` affine to points ``[..., 2]`` (x, y); returns ``[..., 2]`` like the input."""
    p = _float(points)
    if isinstance(p, torch.Tensor):
        a = torch.as_tensor(affine3x3, dtype=torch.float64)
        q = p.to(torch.float64) @ a[:2, :2].T + a[:2, 2]
        return q.to(p.dtype)
    a = np.asarray(affine3x3, dtype=np.float64)
    q = p.astype(np.float64) @ a[:2, :2].T + a[:2, 2]
    return q.astype(p.dtype)


def affine_boxes(boxes_xyxy: Boxes, affine3x3) -> Boxes:
    """Move absolute ``xyxy`` boxes ``[N, 4]`` by a ``[3, 3]`` affine: map the 4 corners, take their min/max.

    For the axis-aligned affines the transforms produce (scale, flip, translate) this is exact; for a rotation it is
    the enclosing axis-aligned box. Computed in float64, returned in the input's dtype.
    """
    b = _float(boxes_xyxy)
    x1, y1, x2, y2 = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
    if isinstance(b, torch.Tensor):
        corners = torch.stack(
            [torch.stack([x1, y1], -1), torch.stack([x2, y1], -1), torch.stack([x1, y2], -1), torch.stack([x2, y2], -1)],
            dim=-2,
        )  # [..., 4 corners, 2]
        moved = affine_points(corners, affine3x3)
        lo, hi = moved.amin(dim=-2), moved.amax(dim=-2)
        return torch.cat([lo, hi], dim=-1)
    corners = np.stack(
        [np.stack([x1, y1], -1), np.stack([x2, y1], -1), np.stack([x1, y2], -1), np.stack([x2, y2], -1)], axis=-2
    )
    moved = affine_points(corners, affine3x3)
    return np.concatenate([moved.min(axis=-2), moved.max(axis=-2)], axis=-1)


def clip_boxes(boxes: Boxes, size_hw: Sequence[int]) -> Boxes:
    """Clamp absolute ``xyxy`` boxes into an image of ``size_hw = (h, w)``, i.e. x into ``[0, w]``, y into ``[0, h]``."""
    b = _float(boxes)
    h, w = float(size_hw[0]), float(size_hw[1])
    if isinstance(b, torch.Tensor):
        out = b.clone()
        out[..., 0::2] = out[..., 0::2].clamp(0.0, w)
        out[..., 1::2] = out[..., 1::2].clamp(0.0, h)
        return out
    out = b.copy()
    out[..., 0::2] = np.clip(out[..., 0::2], 0.0, w)
    out[..., 1::2] = np.clip(out[..., 1::2], 0.0, h)
    return out


def box_area(boxes: Boxes) -> Boxes:
    """Area of absolute ``xyxy`` boxes ``[N, 4]`` -> ``[N]`` (negative widths count as 0)."""
    b = _float(boxes)
    if isinstance(b, torch.Tensor):
        return (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    return np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)
