"""The online-teacher arm: the same distillation losses with the teacher run on the student's own augmented batch.

It is the reference for the cache (``teacher=MODEL_DIR`` instead of ``cache=...``): the cache runs the teacher once on
the un-augmented image and moves its outputs through each sample's affine, the online arm asks the teacher about the
very view the student sees. Equal accuracy of the two arms says the cache costs nothing; a gap separates cache
errors from method errors. It is slower (one teacher forward per step, the teacher in memory) and is not meant for
production runs.

The teacher sees each student image (un-normalised back to ``[0, 1]``, cropped to its unpadded size) resized to the
teacher's own geometry and normalised with the teacher's own mean/std, exactly as the cache job would present an
original image; the outputs are written into the batch under the same keys the cache path fills, with the student's
current image as the teacher's "original" frame (identity affine), so ``DistillCriterion`` needs no second code path.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from rtcodetr.cache_teacher.geometry import resize_hw, valid_cells
from rtcodetr.cache_teacher.teacher import Teacher
from rtcodetr.features import STRIDE, feature_channels
from rtcodetr.data.boxes import clip_boxes, cxcywh_normalized_to_xyxy, xyxy_to_cxcywh_normalized
from rtcodetr.train_student.distill_data import select_teacher_predictions


class OnlineTeacher:
    """A frozen teacher that fills a collated training batch with distillation targets for its current view.

    Args:
        path: teacher model directory (``save_pretrained``) or hub id.
        device: where the teacher runs (the student's device).
        features: cached-tensor names to produce (``"backbone"`` / ``"encoder"``); predictions: whether to produce
            ``teacher_probs`` / ``teacher_boxes_cxcywh`` / ``teacher_weight`` per target.
        topk: teacher predictions kept per image (by confidence), as ``DistillDataset`` does with the cache.
        student_normalize: the student's ``(mean, std)`` (its pixels are un-normalised before the teacher's own
            normalisation), or None for plain ``[0, 1]`` students (RT-DETR).
        mixed_precision: the teacher's precision (``no`` / ``fp16`` / ``bf16``; fp32 on CPU).
    """

    def __init__(self, path: str, device: torch.device, *, features: Sequence[str] = (), predictions: bool = False,
                 topk: int = 100, student_normalize: tuple | None = None, mixed_precision: str = "no"):
        self.teacher = Teacher(path, device, mixed_precision)
        self.features, self.predictions, self.topk = tuple(features), predictions, topk
        self.device = torch.device(device)
        geometry = dict(self.teacher.processor_geometry)
        self.geometry = geometry
        norm = geometry.get("normalize")
        self.teacher_norm = None if norm is None else tuple(torch.tensor(v, device=self.device).view(3, 1, 1)
                                                            for v in norm)
        self.student_norm = None if student_normalize is None else tuple(
            torch.tensor(v, device=self.device).view(3, 1, 1) for v in student_normalize)

    @property
    def label_names(self) -> list[str]:
        return self.teacher.label_names

    def channels(self, name: str) -> int:
        """Channels of the teacher's ``name`` map (for the student's 1x1 adapter), from its config."""
        return int(feature_channels(self.teacher.model)[name])

    def _teacher_batch(self, pixel_values: torch.Tensor, sizes: torch.Tensor) -> dict[str, Any]:
        """The student's images as the teacher takes them: ``[0, 1]``, resized to the teacher geometry, normalised,
        padded bottom/right to a multiple of the stride."""
        images, input_hw = [], []
        for img, (h, w) in zip(pixel_values, sizes.tolist()):
            img = img[:, :h, :w].float()
            if self.student_norm is not None:
                img = img * self.student_norm[1] + self.student_norm[0]
            th, tw = resize_hw(self.geometry, h, w)
            if (th, tw) != (h, w):
                img = F.interpolate(img[None], size=(th, tw), mode="bilinear", align_corners=False,
                                    antialias=True)[0]
            if self.teacher_norm is not None:
                img = (img - self.teacher_norm[0]) / self.teacher_norm[1]
            images.append(img)
            input_hw.append((th, tw))
        hp = -(-max(h for h, _ in input_hw) // STRIDE) * STRIDE
        wp = -(-max(w for _, w in input_hw) // STRIDE) * STRIDE
        pixels = pixel_values.new_zeros(len(images), 3, hp, wp, dtype=torch.float32)
        mask = torch.zeros(len(images), hp, wp, dtype=torch.int64, device=pixel_values.device)
        for j, img in enumerate(images):
            pixels[j, :, :img.shape[1], :img.shape[2]] = img
            mask[j, :img.shape[1], :img.shape[2]] = 1
        input_hw_t = torch.tensor(input_hw, dtype=torch.int64)
        sizes_cpu = sizes.cpu().to(torch.float64)
        affine = torch.zeros(len(images), 3, 3, dtype=torch.float64)  # current student image -> teacher input
        affine[:, 0, 0] = input_hw_t[:, 1] / sizes_cpu[:, 1]
        affine[:, 1, 1] = input_hw_t[:, 0] / sizes_cpu[:, 0]
        affine[:, 2, 2] = 1
        return {"pixel_values": pixels, "pixel_mask": mask, "input_hw": input_hw_t, "affine": affine,
                "orig_hw": sizes.cpu(), "padded_hw": (hp, wp)}

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> None:
        """Add the teacher's targets for this exact batch (after augmentation and multi-scale) to ``batch``."""
        sizes = batch["size"]
        tb = self._teacher_batch(batch["pixel_values"], sizes)
        tensors = list(self.features) + (["logits", "boxes"] if self.predictions else [])
        out = self.teacher.forward(tb, tensors, tb["padded_hw"], box_reference="unpadded")
        if self.features:
            for name in self.features:
                batch[f"teacher_{name}"] = out[name].to(self.device)
            batch["teacher_valid"] = torch.tensor([valid_cells(hw) for hw in tb["input_hw"].tolist()],
                                                  dtype=torch.int64, device=self.device)
            batch["teacher_input_hw"] = tb["input_hw"].to(self.device)
            # the teacher saw the current image itself: identity frame for the resampler
            batch["teacher_affine"] = torch.eye(3, dtype=torch.float64, device=self.device).expand(len(sizes), 3, 3)
            batch["teacher_orig_size"] = sizes
        if self.predictions:
            for j, target in enumerate(batch["targets"]):
                hw = tuple(int(x) for x in sizes[j].tolist())
                probs, weight, boxes = select_teacher_predictions(out["logits"][j].numpy(), out["boxes"][j].numpy(),
                                                                  self.topk)
                xyxy = clip_boxes(cxcywh_normalized_to_xyxy(torch.from_numpy(boxes), hw), hw)
                keep = ((xyxy[:, 2] - xyxy[:, 0]) >= 1) & ((xyxy[:, 3] - xyxy[:, 1]) >= 1)
                target["teacher_probs"] = torch.from_numpy(probs)[keep].to(self.device)
                target["teacher_weight"] = torch.from_numpy(weight)[keep].to(self.device)
                target["teacher_boxes_cxcywh"] = xyxy_to_cxcywh_normalized(xyxy[keep], hw).float().to(self.device)
