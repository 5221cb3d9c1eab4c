"""Detection transforms that record their geometry.

Every transform is ``(image, target) -> (image, target)`` and pure: it never mutates its inputs (new image, new
target dict, new tensors). ``image`` is a PIL image or a ``[C, H, W]`` tensor (geometric ops accept both, through
``torchvision.transforms.v2.functional``). Geometric transforms

* move ``target["boxes"]`` (absolute float32 ``xyxy`` in the current image),
* set ``target["size"]`` (int64 ``[2]``, h, w of the new image),
* left-multiply their own ``[3, 3]`` matrix onto ``target["affine"]`` (float64, original-image pixels ->
  current-image pixels, homogeneous ``(x, y, 1)`` columns),
* then clip boxes into the image and drop empty ones.

So for every surviving box ``clip(affine_boxes(original_box, target["affine"]), size) == target["boxes"]``, and the
trainer can move cached teacher boxes and resample cached teacher feature maps with exactly the same geometry.
Pixel coordinates are continuous (an image of width W spans ``[0, W]``): a resize W -> W' maps x -> x W'/W, a
horizontal flip maps x -> W - x, padding by (left, top) adds (left, top), cropping at (left, top) subtracts it.

The training recipe is the official RT-DETR one (``rtdetr_pytorch/configs/rtdetr/include/dataloader.yml``):
RandomPhotometricDistort(p=0.5), RandomZoomOut(fill=0, side range 1-4, p=0.5), RandomIoUCrop(p=0.8),
SanitizeBoxes(min_size=1), RandomHorizontalFlip, Resize to the model size, SanitizeBoxes, ToTensor (float [0, 1]);
the first three are switched off from ``stop_epoch`` on (RT-DETR's ``stop_epoch`` policy), and multi-scale training
resizes whole batches (``resize_batch``), as RT-DETR's batch collate function does.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import box_iou
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from rtcodetr.data.boxes import affine_boxes, box_area, clip_boxes

Target = dict[str, Any]
PER_BOX_KEYS = ("boxes", "labels", "area", "iscrowd")

# RT-DETR's multi-scale training sizes for a 640 model (BatchImageCollateFuncion): 480..800 step 32, 640 thrice
RTDETR_MULTISCALE_640 = (480, 512, 544, 576, 608, 640, 640, 640, 672, 704, 736, 768, 800)


@dataclass
class AugmentConfig:
    """Training augmentation settings (RT-DETR defaults). Usable as a nested field of a stage config.

    ``stop_epoch``: from this epoch on photometric distort, zoom-out and IoU crop are skipped (None: never).
    ``multiscale``: square side lengths drawn per batch by ``pick_multiscale_size`` (empty: off); they stop at
    ``stop_epoch`` as well. Set a probability to 0 to remove that step (e.g. flip-only training: all 0 but
    ``flip_p``).
    """

    photometric_p: float = 0.5
    zoom_out_p: float = 0.5
    zoom_out_side_range: tuple[float, float] = (1.0, 4.0)
    zoom_out_fill: int = 0
    iou_crop_p: float = 0.8
    flip_p: float = 0.5
    min_box_size: float = 1.0
    stop_epoch: int | None = None
    multiscale: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("photometric_p", "zoom_out_p", "iou_crop_p", "flip_p"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"AugmentConfig.{name} must be a probability in [0, 1], got {v}")
        lo, hi = self.zoom_out_side_range
        if not 1.0 <= lo <= hi:
            raise ValueError(f"AugmentConfig.zoom_out_side_range must satisfy 1 <= lo <= hi, got {self.zoom_out_side_range}")


# ----------------------------------------------------------------------------------------------------- helpers
def image_size_hw(image: Image.Image | torch.Tensor) -> tuple[int, int]:
    """(h, w) of a PIL image or a ``[..., H, W]`` tensor."""
    if isinstance(image, Image.Image):
        return image.size[1], image.size[0]
    return int(image.shape[-2]), int(image.shape[-1])


def _copy_target(target: Target) -> Target:
    """Shallow copy of the dict; tensors are replaced (never written in place) by every transform."""
    return dict(target)


def _affine_of(target: Target) -> torch.Tensor:
    a = target.get("affine")
    return torch.eye(3, dtype=torch.float64) if a is None else torch.as_tensor(a, dtype=torch.float64)


def _apply_step(target: Target, step: torch.Tensor, new_hw: tuple[int, int], min_size: float = 0.0) -> Target:
    """Move boxes by the axis-aligned ``step`` (float64 ``[3, 3]``), update size/affine, clip, drop empty boxes.

    Boxes are moved in float64 and only then rounded to float32, so repeated steps do not accumulate float32 error
    beyond one rounding per step. ``area`` follows the boxes: scaled by the step's determinant, then by the fraction
    of each box that survives clipping.
    """
    out = _copy_target(target)
    prev = _affine_of(target)
    out["affine"] = step.to(prev.device) @ prev  # targets may live on the accelerator (resize_batch)
    old_size = target.get("size")
    size_device = old_size.device if isinstance(old_size, torch.Tensor) else None
    out["size"] = torch.tensor(new_hw, dtype=torch.int64, device=size_device)
    if "boxes" not in target:
        return out
    b = torch.as_tensor(target["boxes"]).to(torch.float64).reshape(-1, 4)
    sx, sy, tx, ty = (float(step[0, 0]), float(step[1, 1]), float(step[0, 2]), float(step[1, 2]))
    xs = b[:, 0::2] * sx + tx
    ys = b[:, 1::2] * sy + ty
    moved = torch.stack([xs.amin(1), ys.amin(1), xs.amax(1), ys.amax(1)], dim=1)
    clipped = clip_boxes(moved, new_hw)
    if "area" in target:
        full = box_area(moved)
        frac = torch.where(full > 0, box_area(clipped) / full.clamp(min=1e-12), torch.zeros_like(full))
        area = torch.as_tensor(target["area"]).to(device=frac.device, dtype=torch.float64)
        out["area"] = (area * abs(sx * sy) * frac).to(torch.float32)
    out["boxes"] = clipped.to(torch.float32)
    return sanitize_target(out, min_size)


def sanitize_target(target: Target, min_size: float = 0.0, keep: torch.Tensor | None = None) -> Target:
    """Drop boxes whose width or height is <= ``min_size`` (strictly positive required when 0) or not in ``keep``."""
    if "boxes" not in target:
        return target
    b = torch.as_tensor(target["boxes"]).reshape(-1, 4)
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    ok = (w > 0) & (h > 0) & (w >= min_size) & (h >= min_size) & torch.isfinite(b).all(dim=1)
    if keep is not None:
        ok = ok & keep
    if bool(ok.all()):
        return target
    out = _copy_target(target)
    for k in PER_BOX_KEYS:
        if k in target:
            out[k] = torch.as_tensor(target[k])[ok]
    return out


def _translate(tx: float, ty: float) -> torch.Tensor:
    return torch.tensor([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]], dtype=torch.float64)


def _scale(sx: float, sy: float) -> torch.Tensor:
    return torch.tensor([[sx, 0.0, 0.0], [0.0, sy, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


# -------------------------------------------------------------------------------------------------- transforms
class Transform:
    """Base: ``augmentation = True`` marks steps that ``Compose`` skips from ``stop_epoch`` on."""

    augmentation: bool = False

    def __call__(self, image: Any, target: Target) -> tuple[Any, Target]:  # pragma: no cover - interface
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class Compose:
    """Apply transforms in order; skip augmentation steps once ``set_epoch(e)`` reaches ``stop_epoch``."""

    def __init__(self, transforms: Sequence[Callable], stop_epoch: int | None = None) -> None:
        self.transforms = list(transforms)
        self.stop_epoch = stop_epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def augmenting(self) -> bool:
        return self.stop_epoch is None or self.epoch < self.stop_epoch

    def __call__(self, image: Any, target: Target) -> tuple[Any, Target]:
        for t in self.transforms:
            if getattr(t, "augmentation", False) and not self.augmenting:
                continue
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        inner = "\n".join(f"  {t!r}" for t in self.transforms)
        return f"Compose(stop_epoch={self.stop_epoch}, [\n{inner}\n])"


class RandomPhotometricDistort(Transform):
    """torchvision's RandomPhotometricDistort (brightness, contrast, saturation, hue, channel permutation, each
    with probability ``p``). Photometric only: target unchanged (and never moves teacher targets)."""

    augmentation = True

    def __init__(self, p: float = 0.5) -> None:
        self.p = p
        self._t = T.RandomPhotometricDistort(p=p)

    def __call__(self, image: Any, target: Target) -> tuple[Any, Target]:
        return self._t(image), _copy_target(target)


class RandomZoomOut(Transform):
    """Place the image at a random spot of a ``r`` times larger canvas filled with ``fill`` (r ~ U(side_range)),
    with probability ``p``. Affine: translate by (left, top). Same sampling as torchvision's RandomZoomOut."""

    augmentation = True

    def __init__(self, fill: int = 0, side_range: tuple[float, float] = (1.0, 4.0), p: float = 0.5) -> None:
        if side_range[0] < 1.0 or side_range[0] > side_range[1]:
            raise ValueError(f"invalid side_range {side_range}")
        self.fill, self.side_range, self.p = fill, tuple(side_range), p

    def __call__(self, image: Any, target: Target) -> tuple[Any, Target]:
        if torch.rand(1).item() >= self.p:
            return image, _copy_target(target)
        h, w = image_size_hw(image)
        r = self.side_range[0] + torch.rand(1).item() * (self.side_range[1] - self.side_range[0])
        cw, ch = int(w * r), int(h * r)
        u = torch.rand(2)
        left, top = int((cw - w) * u[0]), int((ch - h) * u[1])
        right, bottom = cw - (left + w), ch - (top + h)
        out = TF.pad(image, [left, top, right, bottom], fill=self.fill)
        return out, _apply_step(target, _translate(left, top), (ch, cw))


class RandomIoUCrop(Transform):
    """SSD-style crop (torchvision RandomIoUCrop sampling), applied with probability ``p`` (RT-DETR: 0.8).

    A crop keeps the boxes whose centre lies strictly inside it (clipped to it) and needs IoU >= a sampled threshold
    with at least one of them. An image without boxes is returned uncropped (torchvision would loop until it drew
    the "no crop" option, with the same result). Affine: translate by (-left, -top).
    """

    augmentation = True

    def __init__(
        self,
        min_scale: float = 0.3,
        max_scale: float = 1.0,
        min_aspect_ratio: float = 0.5,
        max_aspect_ratio: float = 2.0,
        sampler_options: Sequence[float] = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0),
        trials: int = 40,
        p: float = 0.8,
    ) -> None:
        self.min_scale, self.max_scale = min_scale, max_scale
        self.min_aspect_ratio, self.max_aspect_ratio = min_aspect_ratio, max_aspect_ratio
        self.options = list(sampler_options)
        self.trials, self.p = trials, p

    def _sample(self, h: int, w: int, boxes: torch.Tensor) -> tuple[int, int, int, int, torch.Tensor] | None:
        cx = 0.5 * (boxes[:, 0] + boxes[:, 2])  # box centres do not change between trials
        cy = 0.5 * (boxes[:, 1] + boxes[:, 3])
        while True:  # terminates: option 1.0 (no crop) is drawn with probability 1/len(options) per round
            idx = int(torch.randint(len(self.options), (1,)))
            min_iou = self.options[idx]
            if min_iou >= 1.0:
                return None
            for _ in range(self.trials):
                r = self.min_scale + (self.max_scale - self.min_scale) * torch.rand(2)
                new_w, new_h = int(w * r[0]), int(h * r[1])
                if new_h == 0 or not self.min_aspect_ratio <= new_w / new_h <= self.max_aspect_ratio:
                    continue
                r = torch.rand(2)
                left, top = int((w - new_w) * r[0]), int((h - new_h) * r[1])
                right, bottom = left + new_w, top + new_h
                if left == right or top == bottom:
                    continue
                inside = (left < cx) & (cx < right) & (top < cy) & (cy < bottom)
                if not bool(inside.any()):
                    continue
                crop = torch.tensor([[left, top, right, bottom]], dtype=boxes.dtype)
                if box_iou(boxes[inside], crop).max() < min_iou:
                    continue
                return left, top, new_w, new_h, inside

    def __call__(self, image: Any, target: Target) -> tuple[Any, Target]:
        boxes = torch.as_tensor(target.get("boxes", torch.zeros(0, 4))).reshape(-1, 4).to(torch.float32)
        if torch.rand(1).item() >= self.p or len(boxes) == 0:
            return image, _copy_target(target)
        h, w = image_size_hw(image)
        found = self._sample(h, w, boxes)
        if found is None:
            return image, _copy_target(target)
        left, top, new_w, new_h, inside = found
        out = TF.crop(image, top, left, new_h, new_w)
        moved = _apply_step(sanitize_target(target, 0.0, keep=inside), _translate(-left, -top), (new_h, new_w))
        return out, moved


class RandomHorizontalFlip(Transform):
    """Mirror left-right with probability ``p``. Affine: x -> W - x."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: Any, target: Target) -> tuple[Any, Target]:
        if torch.rand(1).item() >= self.p:
            return image, _copy_target(target)
        h, w = image_size_hw(image)
        return TF.horizontal_flip(image), _apply_step(target, hflip_affine(w), (h, w))


def hflip_affine(width: float) -> torch.Tensor:
    """float64 ``[3, 3]``: the left-right mirror of an image ``width`` pixels wide (``x -> width - x``), its own inverse."""
    return torch.tensor([[-1.0, 0.0, float(width)], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


def shortest_edge_size(h: int, w: int, shortest_edge: int, longest_edge: int | None = None) -> tuple[int, int]:
    """DETR-style output size (h, w): shortest side -> ``shortest_edge`` unless the longest would exceed
    ``longest_edge``; the same arithmetic as ``transformers.image_transforms.get_size_with_aspect_ratio``, so the
    geometry equals what the model's own image processor does."""
    size = shortest_edge
    raw = None
    if longest_edge is not None:
        lo, hi = float(min(h, w)), float(max(h, w))
        if hi / lo * size > longest_edge:
            raw = longest_edge * lo / hi
            size = int(round(raw))
    if (h <= w and h == size) or (w <= h and w == size):
        return h, w
    if w < h:
        return int((raw if raw is not None else size) * h / w), size
    return size, int((raw if raw is not None else size) * w / h)


class Resize(Transform):
    """Resize to a fixed ``size_hw`` (RT-DETR: 640x640, aspect not kept) or, with ``shortest_edge`` (and
    optionally ``longest_edge``), keep the aspect ratio the DETR way (Conditional DETR: 800 / 1333).

    Affine: diag(W'/W, H'/H). Bilinear with antialiasing (torchvision v2 default for tensors and PIL).
    """

    def __init__(
        self,
        size_hw: Sequence[int] | int | None = None,
        *,
        shortest_edge: int | None = None,
        longest_edge: int | None = None,
    ) -> None:
        if (size_hw is None) == (shortest_edge is None):
            raise ValueError("Resize needs exactly one of size_hw or shortest_edge")
        if isinstance(size_hw, int):
            size_hw = (size_hw, size_hw)
        self.size_hw = tuple(int(s) for s in size_hw) if size_hw is not None else None
        self.shortest_edge, self.longest_edge = shortest_edge, longest_edge

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        if self.size_hw is not None:
            return self.size_hw  # type: ignore[return-value]
        return shortest_edge_size(h, w, int(self.shortest_edge), self.longest_edge)  # type: ignore[arg-type]

    def __call__(self, image: Any, target: Target) -> tuple[Any, Target]:
        h, w = image_size_hw(image)
        nh, nw = self.output_size(h, w)
        if (nh, nw) == (h, w):
            return image, _apply_step(target, torch.eye(3, dtype=torch.float64), (h, w))
        out = TF.resize(image, [nh, nw], interpolation=T.InterpolationMode.BILINEAR, antialias=True)
        return out, _apply_step(target, _scale(nw / w, nh / h), (nh, nw))


class SanitizeBoxes(Transform):
    """Drop boxes narrower or lower than ``min_size`` pixels (with their labels, area, iscrowd)."""

    def __init__(self, min_size: float = 1.0) -> None:
        self.min_size = min_size

    def __call__(self, image: Any, target: Target) -> tuple[Any, Target]:
        return image, sanitize_target(_copy_target(target), self.min_size)


class ToTensor(Transform):
    """PIL / uint8 tensor -> float32 ``[3, H, W]`` in ``[0, 1]``."""

    def __call__(self, image: Any, target: Target) -> tuple[Any, Target]:
        if isinstance(image, Image.Image):
            # one copy of the pixels (pil_to_tensor); convert() would add another even for an RGB image
            t = TF.pil_to_tensor(image if image.mode == "RGB" else image.convert("RGB"))
        else:
            t = torch.as_tensor(image)
        if t.is_floating_point():
            return t.to(torch.float32).contiguous(), _copy_target(target)
        # the HWC -> CHW permute is undone while casting, so scaling is one in-place pass on a contiguous tensor
        t = t.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)
        return t, _copy_target(target)


class Normalize(Transform):
    """``(x - mean) / std`` per channel on a float ``[3, H, W]`` tensor (mean/std from the model's processor)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def __call__(self, image: Any, target: Target) -> tuple[Any, Target]:
        if not isinstance(image, torch.Tensor) or not image.is_floating_point():
            raise TypeError("Normalize expects a float tensor: put ToTensor before it")
        mean = torch.tensor(self.mean, dtype=image.dtype).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=image.dtype).view(-1, 1, 1)
        return (image - mean) / std, _copy_target(target)


# ------------------------------------------------------------------------------------------------------ builders
def build_transforms(
    train: bool,
    image_size: tuple[int, int] | dict,
    aug: AugmentConfig | None = None,
    normalize: tuple[Sequence[float], Sequence[float]] | None = None,
) -> Compose:
    """The RT-DETR pipeline for training (``train=True``) or plain resize for evaluation.

    ``image_size``: ``(h, w)`` for a fixed-size model, or a processor geometry dict
    ``{"mode": "shortest_edge", "shortest_edge": s, "longest_edge": l}`` / ``{"mode": "fixed", "size_hw": (h, w)}``.
    ``normalize``: ``(mean, std)`` from the model's image processor, or None (RT-DETR takes plain [0, 1]).
    """
    if isinstance(image_size, dict):
        if image_size.get("mode") == "shortest_edge":
            resize = Resize(shortest_edge=int(image_size["shortest_edge"]), longest_edge=image_size.get("longest_edge"))
        else:
            resize = Resize(tuple(image_size["size_hw"]))
    else:
        resize = Resize(tuple(image_size))
    steps: list[Callable] = []
    stop_epoch = None
    if train:
        aug = aug or AugmentConfig()
        stop_epoch = aug.stop_epoch
        if aug.photometric_p > 0:
            steps.append(RandomPhotometricDistort(p=aug.photometric_p))
        if aug.zoom_out_p > 0:
            steps.append(RandomZoomOut(fill=aug.zoom_out_fill, side_range=aug.zoom_out_side_range, p=aug.zoom_out_p))
        if aug.iou_crop_p > 0:
            steps.append(RandomIoUCrop(p=aug.iou_crop_p))
        steps.append(SanitizeBoxes(min_size=aug.min_box_size))
        if aug.flip_p > 0:
            steps.append(RandomHorizontalFlip(p=aug.flip_p))
        steps += [resize, SanitizeBoxes(min_size=aug.min_box_size)]
    else:
        steps.append(resize)
    steps.append(ToTensor())
    if normalize is not None:
        steps.append(Normalize(*normalize))
    return Compose(steps, stop_epoch=stop_epoch)


def pick_multiscale_size(aug: AugmentConfig, epoch: int, rng: random.Random | None = None) -> tuple[int, int] | None:
    """A random square ``(s, s)`` from ``aug.multiscale`` for this batch, or None when multi-scale is off or
    ``epoch >= aug.stop_epoch`` (then batches keep the model size, like RT-DETR's collate function)."""
    if not aug.multiscale or (aug.stop_epoch is not None and epoch >= aug.stop_epoch):
        return None
    s = (rng or random).choice(list(aug.multiscale))
    return int(s), int(s)


def resize_batch(
    images: torch.Tensor, targets: Sequence[Target], size_hw: Sequence[int]
) -> tuple[torch.Tensor, list[Target]]:
    """Resize a collated batch ``[B, C, H, W]`` (float) to ``size_hw`` and update every target.

    Bilinear, ``align_corners=False`` (pixel centres at +0.5, consistent with the continuous-coordinate convention),
    no antialiasing (the multi-scale factors are within 0.75-1.25). Each target's boxes, size and affine get the
    scale step diag(W'/W, H'/H). Returns new objects; inputs are not modified.
    """
    if images.ndim != 4:
        raise ValueError(f"resize_batch expects images [B, C, H, W], got shape {tuple(images.shape)}")
    h, w = int(images.shape[-2]), int(images.shape[-1])
    nh, nw = int(size_hw[0]), int(size_hw[1])
    if (nh, nw) == (h, w):
        return images, [_copy_target(t) for t in targets]
    out = F.interpolate(images, size=(nh, nw), mode="bilinear", align_corners=False)
    step = _scale(nw / w, nh / h)
    return out, [_apply_step(t, step, (nh, nw)) for t in targets]


def boxes_to_original(boxes_xyxy: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """Map absolute ``xyxy`` boxes from the current (network) frame back to original-image pixels with the inverse
    of ``target["affine"]`` (e.g. to report predictions in original pixels). float32 ``[N, 4]`` in and out."""
    inv = torch.linalg.inv(torch.as_tensor(affine, dtype=torch.float64))
    return affine_boxes(boxes_xyxy.to(torch.float64), inv).to(torch.float32)


__all__ = [
    "AugmentConfig",
    "Compose",
    "Normalize",
    "RandomHorizontalFlip",
    "RandomIoUCrop",
    "RandomPhotometricDistort",
    "RandomZoomOut",
    "Resize",
    "SanitizeBoxes",
    "ToTensor",
    "build_transforms",
    "pick_multiscale_size",
    "resize_batch",
    "sanitize_target",
    "shortest_edge_size",
    "boxes_to_original",
]
