"""Teacher input geometry and the preprocessing that runs in DataLoader workers.

The geometry is resolved once per cache from the teacher's image-processor config (``processor_geometry``) with the
cache config's overrides, and recorded in the manifest. Every sample is resized (``fixed`` size or DETR
``shortest_edge``), turned into ``[0, 1]`` float pixels, normalised with the teacher's own mean/std (if it has any)
and padded bottom/right with zeros to the cache's one padded input size ``input_hw``, exactly what transformers'
DETR processors do (pad after normalising, fill 0). One padded size per cache gives every sample the same feature
map size, so a shard is a dense block and a sample's features do not depend on which images share its batch.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from rtcodetr.cache_teacher.config import GeometryConfig
from rtcodetr.features import STRIDE  # both tapped maps (backbone, encoder) are at stride 32 of the padded input
from rtcodetr.config import ConfigError



def _round_up(x: int, m: int) -> int:
    return int(math.ceil(x / m) * m)


def resize_hw(geometry: dict, h: int, w: int) -> tuple[int, int]:
    """Resized (h, w) of an original ``h x w`` image under ``geometry`` (before padding)."""
    if geometry["mode"] == "fixed":
        return int(geometry["size_hw"][0]), int(geometry["size_hw"][1])
    from rtcodetr.data.transforms import shortest_edge_size

    return shortest_edge_size(int(h), int(w), int(geometry["shortest_edge"]), geometry.get("longest_edge"))


def resolve_geometry(processor_geom: dict, cfg: GeometryConfig, sizes_hw: np.ndarray) -> dict[str, Any]:
    """The manifest's ``geometry`` section.

    Args:
        processor_geom: ``rtcodetr.models.processor_geometry(processor)`` of the teacher.
        cfg: overrides from the cache config.
        sizes_hw: int ``[N, 2]`` original (annotated, upright) image sizes of the split, in sample order.
    Returns:
        ``{"mode", "size_hw" | "shortest_edge"/"longest_edge", "input_hw": [Hp, Wp], "pad_multiple", "stride",
        "normalize": {"mean", "std"} | None, "rescale_factor", "box_reference", "source"}``.
    """
    mode = processor_geom["mode"] if cfg.mode == "auto" else cfg.mode
    if mode not in ("fixed", "shortest_edge"):
        raise ConfigError(f"geometry.mode must be auto, fixed or shortest_edge, got '{cfg.mode}'")
    if cfg.box_reference not in ("padded", "unpadded"):
        raise ConfigError(f"geometry.box_reference must be 'padded' or 'unpadded', got '{cfg.box_reference}'")
    overridden = cfg.mode != "auto" or any(
        v is not None for v in (cfg.size_hw, cfg.shortest_edge, cfg.longest_edge, cfg.pad_hw))
    geom: dict[str, Any] = {"mode": mode}
    if mode == "fixed":
        size = cfg.size_hw or processor_geom.get("size_hw")
        if size is None:
            raise ConfigError("geometry.mode=fixed needs geometry.size_hw (the teacher's processor has no fixed size)")
        geom["size_hw"] = [int(size[0]), int(size[1])]
    else:
        s = cfg.shortest_edge or processor_geom.get("shortest_edge")
        if s is None:
            raise ConfigError("geometry.mode=shortest_edge needs geometry.shortest_edge (the processor has none)")
        l = cfg.longest_edge if cfg.longest_edge is not None else processor_geom.get("longest_edge")
        geom["shortest_edge"], geom["longest_edge"] = int(s), (int(l) if l else None)
    resized = np.array([resize_hw(geom, h, w) for h, w in np.asarray(sizes_hw).reshape(-1, 2)], dtype=np.int64)
    if len(resized) == 0:
        raise ConfigError("the split has no images")
    max_h, max_w = int(resized[:, 0].max()), int(resized[:, 1].max())
    m = int(cfg.pad_multiple)
    if cfg.pad_hw is not None:
        pad = [int(cfg.pad_hw[0]), int(cfg.pad_hw[1])]
        if pad[0] < max_h or pad[1] < max_w:
            raise ConfigError(f"geometry.pad_hw {pad} is smaller than the largest resized image {[max_h, max_w]}")
    else:
        pad = [_round_up(max_h, m), _round_up(max_w, m)]
    geom["input_hw"] = pad
    geom["pad_multiple"] = m
    geom["stride"] = STRIDE
    norm = processor_geom.get("normalize")
    geom["normalize"] = None if norm is None else {"mean": [float(x) for x in norm[0]],
                                                   "std": [float(x) for x in norm[1]]}
    geom["rescale_factor"] = float(processor_geom.get("rescale_factor", 1 / 255))
    geom["box_reference"] = cfg.box_reference
    geom["interpolation"] = "bilinear, antialias"
    if cfg.hflip:
        geom["hflip"] = True  # absent (not False) otherwise: manifests of plain caches stay as they were
    geom["source"] = "config" if overridden else "processor"  # informative; last so a diff names the setting
    return geom


def valid_cells(input_hw: Sequence[int], stride: int = STRIDE) -> tuple[int, int]:
    """Feature rows/cols covering an unpadded input of ``input_hw`` (a cell is valid if it sees any real pixel)."""
    return int(math.ceil(int(input_hw[0]) / stride)), int(math.ceil(int(input_hw[1]) / stride))


class TeacherInputs(torch.utils.data.Dataset):
    """Sample ``i`` of a split as the teacher sees it (runs in DataLoader workers).

    ``__getitem__(i) -> (pixels, meta)``: ``pixels`` float32 ``[3, h, w]`` (resized, rescaled, normalised, not yet
    padded); ``meta``: ``index`` (int), ``image_id`` (int), ``orig_hw`` int64 ``[2]``, ``input_hw`` int64 ``[2]``
    (= ``(h, w)``), ``affine`` float64 ``[3, 3]`` (original pixels -> input pixels, draft decode included).
    """

    def __init__(self, base, geometry: dict, draft: bool = True):
        from rtcodetr.data.transforms import Normalize, ToTensor

        self.base = base  # CocoDetection without transforms
        self.geometry = geometry
        self.to_tensor = ToTensor()
        norm = geometry.get("normalize")
        self.normalize = Normalize(norm["mean"], norm["std"]) if norm else None
        if draft:
            # draft keeps both sides >= draft_size; the largest resized side is enough for every image
            sizes = [resize_hw(geometry, h, w) for h, w in zip(base.heights, base.widths)]
            base.draft_size = int(max(max(s) for s in sizes)) if sizes else None
        else:
            base.draft_size = None

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        from rtcodetr.data.transforms import Resize, hflip_affine

        image, target = self.base.load(i)
        h0, w0 = (int(x) for x in target["orig_size"])
        nh, nw = resize_hw(self.geometry, h0, w0)  # from the annotated size, not the draft-decoded one
        image, target = Resize((nh, nw))(image, target)
        image, target = self.to_tensor(image, target)
        if self.normalize is not None:
            image, target = self.normalize(image, target)
        affine = torch.as_tensor(target["affine"], dtype=torch.float64)
        if self.geometry.get("hflip"):
            image = image.flip(-1)
            affine = hflip_affine(nw) @ affine  # original -> mirrored input: boxes still go back to the original frame
        meta = {
            "index": int(i),
            "image_id": int(target["image_id"]),
            "orig_hw": torch.as_tensor([h0, w0], dtype=torch.int64),
            "input_hw": torch.as_tensor([nh, nw], dtype=torch.int64),
            "affine": affine,
        }
        return image, meta


class PadCollate:
    """Collate ``TeacherInputs`` samples into the padded batch the teacher takes.

    Returns ``{"pixel_values": float32 [B, 3, Hp, Wp], "pixel_mask": int64 [B, Hp, Wp] (1 = real pixel),
    "index", "image_id": int64 [B], "orig_hw", "input_hw": int64 [B, 2], "affine": float64 [B, 3, 3]}``.
    """

    def __init__(self, input_hw: Sequence[int]):
        self.hp, self.wp = int(input_hw[0]), int(input_hw[1])

    def __call__(self, batch: list[tuple[torch.Tensor, dict]]) -> dict[str, torch.Tensor]:
        b = len(batch)
        pixels = torch.zeros((b, 3, self.hp, self.wp), dtype=torch.float32)
        mask = torch.zeros((b, self.hp, self.wp), dtype=torch.int64)
        for j, (img, meta) in enumerate(batch):
            h, w = img.shape[-2:]
            if h > self.hp or w > self.wp:
                raise ValueError(f"image id {meta['image_id']}: input {h}x{w} exceeds the padded size "
                                 f"{self.hp}x{self.wp}")
            pixels[j, :, :h, :w] = img
            mask[j, :h, :w] = 1
        return {
            "pixel_values": pixels,
            "pixel_mask": mask,
            "index": torch.as_tensor([m["index"] for _, m in batch], dtype=torch.int64),
            "image_id": torch.as_tensor([m["image_id"] for _, m in batch], dtype=torch.int64),
            "orig_hw": torch.stack([m["orig_hw"] for _, m in batch]),
            "input_hw": torch.stack([m["input_hw"] for _, m in batch]),
            "affine": torch.stack([m["affine"] for _, m in batch]),
        }


def boxes_to_original_frame(pred_boxes: torch.Tensor, input_hw: torch.Tensor, affine: torch.Tensor,
                            orig_hw: torch.Tensor, padded_hw: Sequence[int], box_reference: str) -> torch.Tensor:
    """Teacher ``pred_boxes`` -> normalized cxcywh in the original image frame.

    Args:
        pred_boxes: float ``[B, Q, 4]`` normalized cxcywh as the model outputs them, fractions of the padded input
            ``padded_hw`` (``box_reference="padded"``) or of the unpadded input ``input_hw``
            (``"unpadded"``).
        input_hw: int ``[B, 2]`` unpadded input (h, w); affine: float64 ``[B, 3, 3]`` original -> input pixels;
        orig_hw: int ``[B, 2]`` original (h, w); padded_hw: (Hp, Wp).
    Returns:
        float32 ``[B, Q, 4]`` normalized cxcywh, fractions of the original image (not clipped: a box the teacher
        extends into the padding maps outside ``[0, 1]``).
    """
    from rtcodetr.data.boxes import affine_boxes, cxcywh_normalized_to_xyxy, xyxy_to_cxcywh_normalized

    out = torch.empty(pred_boxes.shape, dtype=torch.float32)
    boxes = pred_boxes.detach().to("cpu", torch.float64)
    for j in range(boxes.shape[0]):
        ref = padded_hw if box_reference == "padded" else input_hw[j].tolist()
        xyxy_input = cxcywh_normalized_to_xyxy(boxes[j], ref)  # absolute pixels of the network input
        inv = torch.linalg.inv(affine[j].to(torch.float64))
        xyxy_orig = affine_boxes(xyxy_input, inv)  # absolute pixels of the original image
        out[j] = xyxy_to_cxcywh_normalized(xyxy_orig, orig_hw[j].tolist()).to(torch.float32)
    return out
