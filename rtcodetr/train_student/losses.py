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
from typing import Any, Literal, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import batched_nms, box_convert, box_iou, generalized_box_iou, generalized_box_iou_loss

from rtcodetr.features import STRIDE
from rtcodetr.train_student.config import LossConfig
from rtcodetr.train_student.resample import resample_teacher_features

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


Assignment = Literal["gt", "hungarian"]
Annotated = Literal["none", "class", "all"]


class Pairs(NamedTuple):
    """Distilled (student query, teacher prediction) pairs: int64 index arrays of one length, plus ``on_gt`` (bool):
    the pair sits on a query that the student's GT loss trains for an annotated box."""

    sample: np.ndarray
    layer: np.ndarray
    query: np.ndarray
    teacher: np.ndarray
    on_gt: np.ndarray


def teacher_to_gt(target: PredictionTargets, gt_labels: torch.Tensor, gt_boxes: torch.Tensor,
                  min_iou: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Which teacher prediction detects each ground-truth box, and which predictions cover one at all.

    One Hungarian assignment of teacher predictions to GT boxes (cost: 1 - teacher probability of the GT class +
    L1 + (1 - GIoU)); a pair counts only if its IoU is at least ``min_iou``. gt_labels int ``[G]``, gt_boxes float
    ``[G, 4]`` normalized cxcywh of the current image (as the model's labels) -> (int64 ``[G]``: the teacher index
    per GT box or -1; bool ``[T]``: the prediction overlaps some GT box by ``min_iou`` or more, i.e. it is that box's
    detection or a duplicate of it).
    """
    g, t = len(gt_boxes), len(target.boxes)
    out, covers = np.full(g, -1, dtype=np.int64), np.zeros(t, dtype=bool)
    if g == 0 or t == 0:
        return out, covers
    t_xyxy = box_convert(target.boxes.float(), "cxcywh", "xyxy")
    g_xyxy = box_convert(gt_boxes.float().to(t_xyxy.device), "cxcywh", "xyxy")
    iou = box_iou(t_xyxy, g_xyxy).cpu().numpy()
    cost = (1 - target.probs.float()[:, gt_labels.long().to(t_xyxy.device)]
            + torch.cdist(target.boxes.float(), gt_boxes.float().to(t_xyxy.device), p=1)
            + 1 - generalized_box_iou(t_xyxy, g_xyxy))
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    ok = iou[rows, cols] >= min_iou
    out[cols[ok]] = rows[ok]
    return out, iou.max(1) >= min_iou


class PredictionDistillLoss(nn.Module):
    """Distillation of class probabilities and boxes on matched (student query, teacher prediction) pairs, every
    decoder layer.

    Which student query learns from which teacher prediction (``assignment``):
    - ``"gt"`` (the trainer's default): the student's own ground-truth assignment is shared. Every teacher prediction is first
      assigned to the GT box it detects (``teacher_to_gt``, IoU >= ``gt_iou``); the student query that the GT loss
      trains as that box's positive (the student's matcher, per layer, exactly as in its detection loss) learns the
      teacher's probabilities and box for it. Teacher predictions with confidence >= ``min_confidence`` that overlap
      no GT box (objects the annotation lacks; on images without GT, every confident prediction) are matched by
      ``matcher`` to the queries the GT loss leaves unassigned, one per object (class-aware NMS at ``nms_iou``). So a query is never pulled towards an object by the
      distillation loss while the GT loss trains it as background, and the teacher's low-confidence clutter is not
      distilled (KD-DETR's "inconsistent distillation points").
    - ``"hungarian"`` (this class's default, as it needs no model): every teacher prediction with confidence >= ``min_confidence`` is matched to the student's
      queries independently of the GT assignment (DETRDistill-style).

    Each pair contributes, weighted by the teacher's confidence ``w``: ``class`` = mean_k KL(teacher_prob ||
    sigmoid(student_logit)), ``l1`` = |box_s - box_t|_1 (normalized cxcywh), ``giou`` = 1 - GIoU; each loss is the
    ``w``-weighted mean over its pairs of all layers.

    ``annotated`` says what the teacher may teach the queries that the GT loss trains for annotated boxes: ``"none"``
    (default: the teacher never contradicts the annotation, it teaches only where the annotation is silent, i.e.
    objects the annotation lacks and images without annotations), ``"class"`` (its class distribution too) or
    ``"all"`` (class and box). Measured on the toy set (2-3 seeds, val): teacher boxes on annotated objects cost
    0.03-0.07 mAP50:95 (the annotated box is exact, the teacher's is not) and its class distribution ~0.035 (its
    mass on wrong classes becomes false positives). Assignment runs on the host (scipy), with one device->host copy
    per cost matrix batch, and the losses are computed on all pairs at once.
    """

    def __init__(self, matcher: DistillMatcher | None = None, *, assignment: Assignment = "hungarian", gt_matcher=None,
                 min_confidence: float = 0.0, gt_iou: float = 0.5, annotated: Annotated = "none",
                 nms_iou: float = 1.0):
        super().__init__()
        if assignment not in ("gt", "hungarian"):
            raise ValueError(f"prediction assignment must be 'gt' or 'hungarian', got {assignment!r}")
        if assignment == "gt" and gt_matcher is None:
            raise ValueError("assignment='gt' needs the student's ground-truth matcher (gt_matcher)")
        self.matcher = matcher or DistillMatcher()
        self.assignment, self.gt_matcher = assignment, gt_matcher
        if annotated not in ("none", "class", "all"):
            raise ValueError(f"annotated must be 'none', 'class' or 'all', got {annotated!r}")
        self.min_confidence, self.gt_iou, self.annotated, self.nms_iou = min_confidence, gt_iou, annotated, nms_iou

    def _dedupe(self, target: PredictionTargets, idx: np.ndarray) -> np.ndarray:
        """Keep one teacher prediction per object among ``idx``: class-aware NMS at ``nms_iou`` by confidence. A
        one-to-one student must not learn an object twice (NMS-free teachers still leave duplicates: the toy teacher
        gives 208 predictions >= 0.5 for 163 objects)."""
        if len(idx) < 2 or self.nms_iou >= 1:
            return idx
        t = torch.as_tensor(idx, device=target.boxes.device)
        keep = batched_nms(box_convert(target.boxes[t].float(), "cxcywh", "xyxy"), target.weight[t].float(),
                           target.probs[t].argmax(-1), self.nms_iou)
        return np.sort(idx[keep.cpu().numpy()])

    @torch.no_grad()
    def assign(self, layer_logits: torch.Tensor, layer_boxes: torch.Tensor, targets: Sequence[PredictionTargets],
               gt: Sequence[dict] | None = None) -> Pairs:
        """The distilled pairs (teacher indices per sample)."""
        num_layers, num_queries = layer_logits.shape[1], layer_logits.shape[2]
        share_gt = self.assignment == "gt" and gt is not None
        pairs: list[tuple[int, int, int, int, bool]] = []
        free = np.ones((len(targets), num_layers, num_queries), dtype=bool)  # queries the GT loss leaves unassigned
        extras: list[np.ndarray] = []  # per sample: confident teacher predictions left to the KD matcher
        of_gt: list[np.ndarray] = []
        for b, t in enumerate(targets):
            confident = (t.weight >= self.min_confidence).cpu().numpy()
            if share_gt:
                assigned, covers_gt = teacher_to_gt(t, gt[b]["class_labels"], gt[b]["boxes"], self.gt_iou)
            else:
                assigned, covers_gt = np.zeros(0, dtype=np.int64), np.zeros(len(t.boxes), dtype=bool)
            of_gt.append(assigned)
            # left to the KD matcher: confident predictions of objects the annotation lacks. A duplicate of an
            # annotated object is not one (it would pull a query the GT loss trains as background onto that object).
            extras.append(self._dedupe(t, np.flatnonzero(confident & ~covers_gt)))
        if share_gt:
            for layer in range(num_layers):  # the student's own GT assignment, as its detection loss computes it
                indices = self.gt_matcher({"logits": layer_logits[:, layer].detach(),
                                           "pred_boxes": layer_boxes[:, layer].detach()}, list(gt))
                for b, (queries, gts) in enumerate(indices):
                    queries, gts = queries.numpy(), gts.numpy()
                    free[b, layer, queries] = False
                    if self.annotated == "none":
                        continue  # these queries are the annotation's: the teacher adds nothing to them
                    teacher = of_gt[b][gts]
                    pairs += [(b, layer, int(q), int(t), True)
                              for q, t in zip(queries[teacher >= 0], teacher[teacher >= 0])]
        problems = [(b, e) for b, e in enumerate(extras) if len(e)]
        if problems:  # the remaining confident teacher predictions: Hungarian-matched to free queries, every layer
            costs = [self.matcher.cost(layer_logits[b], layer_boxes[b], PredictionTargets(
                targets[b].probs[e], targets[b].boxes[e], targets[b].weight[e])) for b, e in problems]
            flat = torch.cat([c.flatten() for c in costs]).cpu().numpy()  # one device -> host copy
            start = 0
            for b, e in problems:
                size = num_layers * num_queries * len(e)
                cost = flat[start:start + size].reshape(num_layers, num_queries, len(e))
                start += size
                for layer in range(num_layers):
                    queries = np.flatnonzero(free[b, layer])
                    rows, cols = linear_sum_assignment(cost[layer][queries])
                    pairs += [(b, layer, int(queries[r]), int(e[c]), False) for r, c in zip(rows, cols)]
        if not pairs:
            empty = np.zeros(0, dtype=np.int64)
            return Pairs(empty, empty, empty, empty, np.zeros(0, dtype=bool))
        b_i, l_i, q_i, t_i, on_gt = zip(*pairs)
        as_np = lambda col: np.asarray(col, dtype=np.int64)  # noqa: E731
        return Pairs(as_np(b_i), as_np(l_i), as_np(q_i), as_np(t_i), np.asarray(on_gt, dtype=bool))

    def forward(
        self, layer_logits: torch.Tensor, layer_boxes: torch.Tensor, targets: Sequence[PredictionTargets],
        gt: Sequence[dict] | None = None,
    ) -> dict[str, torch.Tensor]:
        """layer_logits ``[B, L, Q, K]`` pre-sigmoid, layer_boxes ``[B, L, Q, 4]`` normalized cxcywh (denoising queries
        already removed); ``gt``: the model's labels (``class_labels``, ``boxes`` normalized cxcywh) per sample, needed
        by ``assignment="gt"`` -> {"pred_class", "pred_l1", "pred_giou"} scalar tensors (float32)."""
        device = layer_logits.device
        b_i, l_i, q_i, t_i, on_gt = self.assign(layer_logits, layer_boxes, targets, gt)
        if len(b_i) == 0:
            zero = layer_logits.sum() * 0.0  # keeps the graph connected when nothing is distilled
            return {"pred_class": zero, "pred_l1": zero, "pred_giou": zero}
        offsets = np.cumsum([0] + [len(t.boxes) for t in targets])[:-1]
        flat_t = torch.as_tensor(t_i + offsets[b_i], dtype=torch.long, device=device)
        as_t = lambda a: torch.as_tensor(a, dtype=torch.long, device=device)  # noqa: E731
        s_logits = layer_logits[as_t(b_i), as_t(l_i), as_t(q_i)].float()
        s_boxes = layer_boxes[as_t(b_i), as_t(l_i), as_t(q_i)].float()
        t_probs = torch.cat([t.probs for t in targets]).float().to(device)[flat_t]
        t_boxes = torch.cat([t.boxes for t in targets]).float().to(device)[flat_t]
        w = torch.cat([t.weight for t in targets]).float().to(device)[flat_t]
        # row-aligned pairs: torchvision's elementwise GIoU loss (1 - GIoU), not the [M, M] matrix
        giou_loss = generalized_box_iou_loss(box_convert(s_boxes, "cxcywh", "xyxy"),
                                             box_convert(t_boxes, "cxcywh", "xyxy"))
        # on annotated objects boxes are distilled only with annotated="all": the annotated box is exact, the
        # teacher's is not, and pulling the query that learns it towards the teacher's box costs localisation
        box_w = w if self.annotated == "all" else w * torch.as_tensor(~on_gt, dtype=w.dtype, device=device)
        scale = w.sum().clamp_min(1e-12)  # on the device: no host sync; all-zero weights have zero numerators too
        box_scale = box_w.sum().clamp_min(1e-12)
        return {
            "pred_class": (binary_kl_with_logits(s_logits, t_probs).mean(-1) * w).sum() / scale,
            "pred_l1": ((s_boxes - t_boxes).abs().sum(-1) * box_w).sum() / box_scale,
            "pred_giou": (giou_loss * box_w).sum() / box_scale,
        }


def gt_matcher_for(config):
    """The Hungarian matcher that the student's own detection loss uses (same costs, from its config), so that the
    prediction distillation can share the GT assignment: called as ``matcher({"logits", "pred_boxes"}, labels)`` ->
    per sample ``(query indices, GT indices)``."""
    model_type = getattr(config, "model_type", None)
    if model_type in ("rt_detr", "rt_detr_v2"):
        from transformers.loss.loss_rt_detr import RTDetrHungarianMatcher

        return RTDetrHungarianMatcher(config)
    if model_type in ("conditional_detr", "deformable_detr", "dab_detr"):
        from transformers.loss.loss_deformable_detr import DeformableDetrHungarianMatcher

        return DeformableDetrHungarianMatcher(class_cost=config.class_cost, bbox_cost=config.bbox_cost,
                                              giou_cost=config.giou_cost)
    raise ValueError(f"prediction distillation with assignment 'gt' does not know the matcher of '{model_type}' "
                     "students; use loss.pred_assignment=hungarian")


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


# ------------------------------------------------------------------------------------------------------ criterion


def mirrored_views(affine: torch.Tensor) -> torch.Tensor:
    """bool ``[B]``: whether each sample's original -> current affine (float ``[B, 3, 3]``) reverses orientation (a
    horizontal or vertical flip), i.e. the determinant of its linear part is negative."""
    return torch.linalg.det(affine[:, :2, :2].double()) < 0


class DistillCriterion(nn.Module):
    """Named, unweighted losses: ``detection`` (the model's own), ``feature``, ``pred_class``/``pred_l1``/``pred_giou``.

    The teacher side comes from the batch (cache rows), never requires grad, and is moved to the student's frame
    here: boxes were moved by the affine in the workers, feature maps are resampled now, on the device.
    """

    def __init__(self, cfg: LossConfig, use_features: bool, use_predictions: bool, teacher_stride: float = STRIDE,
                 student_stride: float = STRIDE, student_config=None):
        super().__init__()
        self.cfg = cfg
        self.use_features, self.use_predictions = use_features, use_predictions
        self.teacher_stride, self.student_stride = teacher_stride, student_stride
        self.feature_loss = FeatureDistillLoss(cfg.feature_loss) if use_features else None
        self.prediction_loss = None
        if use_predictions:
            gt_matcher = gt_matcher_for(student_config) if cfg.pred_assignment == "gt" else None
            self.prediction_loss = PredictionDistillLoss(
                DistillMatcher(cfg.match_class_cost, cfg.match_l1_cost, cfg.match_giou_cost),
                assignment=cfg.pred_assignment, gt_matcher=gt_matcher, min_confidence=cfg.pred_min_confidence,
                gt_iou=cfg.pred_gt_iou, annotated=cfg.pred_annotated,
                nms_iou=cfg.pred_nms_iou)

    def computes(self, name: str) -> bool:
        """Whether this criterion returns the distillation loss ``name`` (``feature``, ``pred_*``)."""
        return (name == "feature" and self.use_features) or (name.startswith("pred_") and self.use_predictions)

    def forward(self, outputs, student_map: torch.Tensor | None, batch: dict[str, Any],
                detection: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``detection``: the detection loss when it is not ``outputs.loss`` (batches with unlabelled images)."""
        losses = {"detection": outputs.loss if detection is None else detection}
        if self.use_features:
            # the frame the teacher saw: the original image (cache), or the current view itself (online teacher)
            teacher_affine = batch.get("teacher_affine", batch["affine"])
            teacher_map, mask = resample_teacher_features(
                batch[f"teacher_{self.cfg.teacher_feature}"], teacher_affine,
                batch.get("teacher_orig_size", batch["orig_size"]),
                batch["teacher_input_hw"], batch["teacher_valid"], batch["size"], tuple(student_map.shape[-2:]),
                self.teacher_stride, self.student_stride)
            if self.cfg.feature_mirrored == "skip":
                mask = mask * (~mirrored_views(teacher_affine)).to(mask.dtype).view(-1, 1, 1, 1)
            weights = None
            if self.cfg.feature_fg_weight > 0:
                weights = foreground_weights([t["boxes"] for t in batch["targets"]], tuple(student_map.shape[-2:]),
                                             self.student_stride, self.cfg.feature_fg_weight, student_map.device)
            losses["feature"] = self.feature_loss(student_map, teacher_map, mask, weights)
        if self.use_predictions:
            logits, boxes = split_denoising(outputs)
            targets = [PredictionTargets(probs=t["teacher_probs"], boxes=t["teacher_boxes_cxcywh"],
                                         weight=t["teacher_weight"]) for t in batch["targets"]]
            losses.update(self.prediction_loss(logits, boxes, targets, batch["labels"]))
        return losses


def build_weight_dict(cfg: LossConfig) -> dict[str, float]:
    """The one place where loss weights live (raw losses times these are summed)."""
    return {
        "detection": cfg.detection_weight,
        "feature": cfg.feature_weight,
        "pred_class": cfg.prediction_weight * cfg.pred_class_weight,
        "pred_l1": cfg.prediction_weight * cfg.pred_l1_weight,
        "pred_giou": cfg.prediction_weight * cfg.pred_giou_weight,
    }


def labelled_detection_loss(model: nn.Module, outputs, labels: list[dict], labelled: list[bool]) -> torch.Tensor:
    """The model's own detection loss over the labelled images of a batch only (RT-DETR family).

    Inside the model every image counts, and an image without annotations would be trained as pure background. The
    loss is recomputed on the labelled images' outputs (denoising queries included, indexed per image). A batch
    without labelled images gives a zero that is still part of the graph. (Under DDP the loop keeps every parameter
    in the graph on every rank anyway.)
    """
    keep = [i for i, flag in enumerate(labelled) if flag]
    if not keep:
        return outputs.loss * 0.0
    if len(keep) == len(labelled):
        return outputs.loss
    idx = torch.as_tensor(keep, device=outputs.logits.device)
    meta = outputs.denoising_meta_values
    if meta is not None:
        meta = {**meta, "dn_positive_idx": [meta["dn_positive_idx"][i] for i in keep]}
    pick = lambda t: None if t is None else t.index_select(0, idx)  # noqa: E731
    loss, _, _ = model.loss_function(
        pick(outputs.logits), [labels[i] for i in keep], outputs.logits.device, pick(outputs.pred_boxes), model.config,
        pick(outputs.intermediate_logits), pick(outputs.intermediate_reference_points),
        enc_topk_logits=pick(outputs.enc_topk_logits), enc_topk_bboxes=pick(outputs.enc_topk_bboxes),
        denoising_meta_values=meta)
    return loss
