"""Distillation losses: prediction distillation (Hungarian-matched, every decoder layer) and feature distillation.

The criterion returns a dict of *unweighted* named losses; the training loop multiplies them by one ``weight_dict``
built from the config (detr ``SetCriterion`` style). Box format at this boundary is the models' own: normalized
``cxcywh`` in the student's current input frame (the teacher's boxes have already been moved there by the sample's
affine, see ``distill_data.teacher_boxes_to_current``).

Both losses are exactly zero when the student reproduces the teacher:
- the class term is the Bernoulli KL divergence ``BCE(x, p) - H(p)`` (sigmoid BCE against the teacher's probability
  ``p`` minus the teacher's own entropy, which does not depend on the student, so gradients equal plain BCE);
- the feature term compares the adapted student map with the resampled teacher map only where the mask is 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou, generalized_box_iou_loss

_EPS = 1e-6
_PKD_REL_EPS = 1e-3  # PKD std floor, relative to the mean channel std of the sample (scale-invariant)


def binary_kl_with_logits(logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Elementwise Bernoulli KL(p || sigmoid(x)) = BCE(x, p) - H(p), for float ``logits`` and ``probs`` of one shape."""
    bce = F.binary_cross_entropy_with_logits(logits, probs, reduction="none")
    p = probs.clamp(_EPS, 1 - _EPS)
    entropy = -(p * p.log() + (1 - p) * (1 - p).log())
    return bce - entropy


def pairwise_class_cost(logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Mean-over-classes sigmoid BCE of every student query against every teacher query, without a ``[Q, T, K]`` tensor.

    ``BCE(x, p) = softplus(x) - x * p`` summed over classes is ``softplus(x).sum(-1)[q] - (x @ p.T)[q, t]``.
    logits: float ``[Q, K]`` (student, pre-sigmoid); probs: float ``[T, K]`` in [0, 1] (teacher) -> ``[Q, T]``.
    (The teacher's entropy is constant per teacher column and would not change the assignment, so it is left out.)
    """
    k = logits.shape[-1]
    return (F.softplus(logits).sum(-1, keepdim=True) - logits @ probs.transpose(0, 1)) / k


@dataclass
class PredictionTargets:
    """Teacher predictions for one sample in the student's current frame.

    probs: float32 ``[T, K]`` sigmoid probabilities; boxes: float32 ``[T, 4]`` normalized cxcywh of the student's
    current (unpadded) input; weight: float32 ``[T]`` teacher confidence (max class probability).
    """

    probs: torch.Tensor
    boxes: torch.Tensor
    weight: torch.Tensor


class DistillMatcher:
    """Hungarian matching of student queries to teacher predictions (scipy; never query i to query i).

    Cost = ``class_cost * mean_k BCE(student_logit, teacher_prob) + l1_cost * L1(cxcywh) - giou_cost * GIoU``.
    """

    def __init__(self, class_cost: float = 2.0, l1_cost: float = 5.0, giou_cost: float = 2.0):
        self.class_cost, self.l1_cost, self.giou_cost = class_cost, l1_cost, giou_cost

    @torch.no_grad()
    def cost(self, logits: torch.Tensor, boxes: torch.Tensor, target: PredictionTargets) -> torch.Tensor:
        """float32 ``[..., Q, T]`` matching cost (on the logits' device) of student queries vs teacher predictions.

        logits ``[..., Q, K]``, boxes ``[..., Q, 4]`` normalized cxcywh; leading dims (e.g. decoder layers) are
        batched, so one call covers every layer of a sample.
        """
        logits, boxes = logits.float(), boxes.float()
        t_boxes = target.boxes.float().to(boxes.device)
        cost = self.class_cost * pairwise_class_cost(logits, target.probs.float().to(logits.device))
        cost = cost + self.l1_cost * torch.cdist(boxes, t_boxes.expand(*boxes.shape[:-2], -1, -1), p=1)
        giou = generalized_box_iou(box_convert(boxes.reshape(-1, 4), "cxcywh", "xyxy"),
                                   box_convert(t_boxes, "cxcywh", "xyxy")).reshape(cost.shape)
        return cost - self.giou_cost * giou

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, boxes: torch.Tensor, target: PredictionTargets) -> tuple[np.ndarray, np.ndarray]:
        """logits ``[Q, K]``, boxes ``[Q, 4]`` normalized cxcywh -> (student indices ``[M]``, teacher indices ``[M]``)."""
        if target.boxes.shape[0] == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        rows, cols = linear_sum_assignment(self.cost(logits, boxes, target).cpu().numpy())
        return rows.astype(np.int64), cols.astype(np.int64)


class PredictionDistillLoss(nn.Module):
    """Matched-pair distillation of class probabilities and boxes on every decoder layer.

    For each layer and sample the student's (non-denoising) queries are matched to the teacher's top-k predictions;
    each matched pair contributes, weighted by the teacher's confidence ``w``:
    ``class`` = mean_k KL(teacher_prob || sigmoid(student_logit)), ``l1`` = |box_s - box_t|_1 (normalized cxcywh),
    ``giou`` = 1 - GIoU. Each is normalised by the total teacher confidence and averaged over layers.

    All cost matrices of a step go to the host in one copy (one device sync per step, not one per layer x sample),
    and the losses are computed on all matched pairs at once.
    """

    def __init__(self, matcher: DistillMatcher | None = None):
        super().__init__()
        self.matcher = matcher or DistillMatcher()

    def forward(
        self, layer_logits: torch.Tensor, layer_boxes: torch.Tensor, targets: Sequence[PredictionTargets]
    ) -> dict[str, torch.Tensor]:
        """layer_logits ``[B, L, Q, K]`` pre-sigmoid, layer_boxes ``[B, L, Q, 4]`` normalized cxcywh (denoising queries
        already removed) -> {"pred_class", "pred_l1", "pred_giou"} scalar tensors (float32)."""
        num_layers = layer_logits.shape[1]
        device = layer_logits.device
        samples = [b for b, t in enumerate(targets) if len(t.boxes)]
        if not samples:
            zero = layer_logits.sum() * 0.0  # keeps the graph connected when nothing matches
            return {"pred_class": zero, "pred_l1": zero, "pred_giou": zero}
        # one batched cost per sample over all its layers ([L, Q, T_b]), all sent to the host in one copy
        costs = [self.matcher.cost(layer_logits[b], layer_boxes[b], targets[b]) for b in samples]
        flat = torch.cat([c.flatten() for c in costs]).cpu().numpy()
        problems = [(b, layer) for b in samples for layer in range(num_layers)]  # the order of ``flat``
        offsets = np.cumsum([0] + [len(t.boxes) for t in targets])
        idx_b, idx_l, idx_q, idx_t = [], [], [], []
        start = 0
        for b, layer in problems:
            q, t = layer_logits.shape[2], len(targets[b].boxes)
            rows, cols = linear_sum_assignment(flat[start:start + q * t].reshape(q, t))
            start += q * t
            idx_b.append(np.full(len(rows), b))
            idx_l.append(np.full(len(rows), layer))
            idx_q.append(rows)
            idx_t.append(cols + offsets[b])
        as_t = lambda parts: torch.as_tensor(np.concatenate(parts), dtype=torch.long, device=device)  # noqa: E731
        b_i, l_i, q_i, t_i = as_t(idx_b), as_t(idx_l), as_t(idx_q), as_t(idx_t)
        s_logits = layer_logits[b_i, l_i, q_i].float()
        s_boxes = layer_boxes[b_i, l_i, q_i].float()
        t_probs = torch.cat([t.probs for t in targets]).float().to(device)[t_i]
        t_boxes = torch.cat([t.boxes for t in targets]).float().to(device)[t_i]
        all_w = torch.cat([t.weight for t in targets]).float().to(device)
        w = all_w[t_i]
        # row-aligned pairs: torchvision's elementwise GIoU loss (1 - GIoU), not the [M, M] matrix
        giou_loss = generalized_box_iou_loss(box_convert(s_boxes, "cxcywh", "xyxy"),
                                             box_convert(t_boxes, "cxcywh", "xyxy"))
        # the total teacher confidence stays on the device (no host sync); clamped only against all-zero weights,
        # where every numerator is 0 as well
        scale = all_w.sum().clamp_min(1e-12) * num_layers
        return {
            "pred_class": (binary_kl_with_logits(s_logits, t_probs).mean(-1) * w).sum() / scale,
            "pred_l1": ((s_boxes - t_boxes).abs().sum(-1) * w).sum() / scale,
            "pred_giou": (giou_loss * w).sum() / scale,
        }


FeatureLossKind = Literal["mse", "pkd", "cosine"]


def foreground_weights(boxes: Sequence[torch.Tensor], grid_hw: tuple[int, int], stride: float, fg_weight: float,
                       device: torch.device | None = None) -> torch.Tensor:
    """Per-cell weights ``[B, 1, Hs, Ws]``: 1 everywhere plus ``fg_weight`` on cells whose centre lies in a GT box.

    boxes: per sample float ``[N, 4]`` absolute xyxy in the student's current frame; a cell ``(i, j)`` has its
    centre at ``((j + .5) * stride, (i + .5) * stride)`` in that frame.
    """
    h, w = grid_hw
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * stride
    out = torch.ones(len(boxes), 1, h, w, device=device)
    for b, bx in enumerate(boxes):
        if len(bx) == 0:
            continue
        bx = bx.to(device=device, dtype=torch.float32)
        inside_x = (xs[None, :] >= bx[:, 0:1]) & (xs[None, :] <= bx[:, 2:3])  # [N, W]
        inside_y = (ys[None, :] >= bx[:, 1:2]) & (ys[None, :] <= bx[:, 3:4])  # [N, H]
        fg = (inside_y[:, :, None] & inside_x[:, None, :]).any(0)  # [H, W]
        out[b, 0] += fg.float() * fg_weight
    return out


class FeatureDistillLoss(nn.Module):
    """Masked feature distillation between an adapted student map and a resampled teacher map.

    kind: ``mse`` (mean over channels of squared error), ``pkd`` (each channel standardised per sample over the
    valid cells for both maps, then MSE / 2, as in PKD), ``cosine`` (1 - cosine similarity over channels per cell).
    The per-cell loss is averaged with weights ``mask * fg_weights`` (so masked-out cells cost nothing).
    """

    def __init__(self, kind: FeatureLossKind = "mse"):
        super().__init__()
        if kind not in ("mse", "pkd", "cosine"):
            raise ValueError(f"feature loss kind must be one of mse, pkd, cosine; got {kind!r}")
        self.kind = kind

    @staticmethod
    def _standardise(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per sample and channel over the masked cells: ``(x - mean) / (std + floor)``.

        The floor is relative, ``_PKD_REL_EPS`` times the sample's mean channel std, so the loss of a pair of maps
        does not depend on their overall scale: an absolute ``sqrt(var + 1e-6)`` never standardised a channel whose
        std was below ~1e-3 (a random-init teacher's maps), and PKD's absolute ``std + 1e-6`` still drifts for maps
        of std ~1e-4. Channels flatter than the floor (constant, carrying nothing) stay near zero.
        """
        n = mask.sum((2, 3), keepdim=True).clamp_min(1.0)
        mean = (x * mask).sum((2, 3), keepdim=True) / n
        var = ((x - mean) ** 2 * mask).sum((2, 3), keepdim=True) / n
        # clamp before the square root: d sqrt(var) / d var is infinite at 0 (one valid cell, a dead channel), which
        # would turn the zero gradient of a constant channel into NaN
        std = var.clamp_min(1e-24).sqrt()
        return (x - mean) / (std + _PKD_REL_EPS * std.mean(1, keepdim=True))

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor,
                weights: torch.Tensor | None = None) -> torch.Tensor:
        """student, teacher: float ``[B, C, H, W]`` (student already through its 1x1 adapter); mask: float
        ``[B, 1, H, W]`` in {0, 1}; weights: optional float ``[B, 1, H, W]`` -> scalar float32 loss."""
        student, teacher, mask = student.float(), teacher.float().detach(), mask.float()
        if self.kind == "mse":
            per_cell = ((student - teacher) ** 2).mean(1, keepdim=True)
        elif self.kind == "pkd":
            s, t = self._standardise(student, mask), self._standardise(teacher, mask)
            per_cell = ((s - t) ** 2).mean(1, keepdim=True) / 2
        else:
            per_cell = 1 - F.cosine_similarity(student, teacher, dim=1, eps=1e-6).unsqueeze(1)
        w = mask if weights is None else mask * weights.float()
        return (per_cell * w).sum() / w.sum().clamp_min(1.0)


def split_denoising(outputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer decoder predictions of a DETR-family output without the denoising queries.

    RT-DETR: ``intermediate_logits`` ``[B, L, dn + Q, K]`` and ``intermediate_reference_points`` ``[B, L, dn + Q, 4]``
    (normalized cxcywh); in training the first ``dn_num_split[0]`` queries are denoising queries and are dropped.
    Conditional DETR: the last layer ``logits``/``pred_boxes`` plus ``auxiliary_outputs`` (earlier layers).
    Returns (logits ``[B, L, Q, K]``, boxes ``[B, L, Q, 4]``).
    """
    logits = getattr(outputs, "intermediate_logits", None)
    boxes = getattr(outputs, "intermediate_reference_points", None)
    if logits is not None and boxes is not None and torch.is_tensor(logits):
        meta = getattr(outputs, "denoising_meta_values", None)
        if meta is not None and meta.get("dn_num_split") is not None:
            num_dn = int(meta["dn_num_split"][0])
            logits, boxes = logits[:, :, num_dn:], boxes[:, :, num_dn:]
        return logits, boxes
    layers_logits, layers_boxes = [], []
    for aux in getattr(outputs, "auxiliary_outputs", None) or []:
        layers_logits.append(aux["logits"])
        layers_boxes.append(aux["pred_boxes"])
    layers_logits.append(outputs.logits)
    layers_boxes.append(outputs.pred_boxes)
    return torch.stack(layers_logits, 1), torch.stack(layers_boxes, 1)
