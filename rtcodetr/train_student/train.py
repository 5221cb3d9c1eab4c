"""Train an RT-DETR student (or fine-tune a Conditional DETR teacher) with Accelerate, streaming the teacher cache.

    accelerate launch -m rtcodetr.train_student --config configs/distill.yaml data=DATA model=MODEL cache=CACHE out=RUN

Read top to bottom, ``run`` is the whole story: data -> model (+ 1x1 adapters: one module) -> criterion -> optimizer
-> an explicit loop (forward, weighted loss sum, backward, clip, step, EMA) with checkpoints, validation and logs.
Without a cache (or with every distillation weight 0) it is plain training: the baseline, and the teacher fine-tune.

Run directory: ``config.yaml`` (resolved), ``metrics.jsonl`` (one JSON object per logged step / evaluation),
``tensorboard/``, ``checkpoints/step_N/`` (``accelerator.save_state`` + ``train_state.json`` + ``ema.safetensors``),
``best/`` and ``final/`` (the student alone: ``save_pretrained`` + image-processor config), ``results.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from torch import nn

from rtcodetr.config import ConfigError, config_to_dict, load_config, save_config, split_overrides
from rtcodetr.data.transforms import AugmentConfig
from rtcodetr.errors import BAD_INPUT, report_bad_input

# ----------------------------------------------------------------------------------------------------------- config


@dataclass
class OptimConfig:
    """Official RT-DETR recipe by default: AdamW 1e-4 (backbone 1e-5), wd 1e-4 (none on norms/biases), linear warm-up,
    grad-norm clip 0.1, EMA 0.9999 with warm-up."""

    lr: float = 1e-4
    backbone_lr: float = 1e-5
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 2000
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of the peak
    clip_grad_norm: float = 0.1  # 0 disables clipping
    ema: bool = True
    ema_decay: float = 0.9999
    ema_warmup: int = 2000  # decay_t = decay * (1 - exp(-t / ema_warmup)), as in RT-DETR's ModelEMA


@dataclass
class FreezeConfig:
    """What trains in the backbone (everything else always trains). RT-DETR's official recipe trains the backbone
    with frozen BatchNorm; a from-scratch model (or the Conditional DETR fine-tune) needs trainable BatchNorm."""

    backbone: bool = True
    backbone_batchnorm: bool = False


@dataclass
class LossConfig:
    """One weight per loss; a weight of 0 removes that loss (and its cache reads) entirely."""

    detection_weight: float = 1.0  # the model's own DETR loss against ground truth (already internally weighted)
    feature_weight: float = 0.0
    feature_source: Literal["encoder", "backbone"] = "encoder"  # which student map at stride 32
    teacher_feature: Literal["encoder", "backbone"] = "encoder"  # which cached teacher map
    feature_loss: Literal["mse", "pkd", "cosine"] = "mse"
    feature_fg_weight: float = 0.0  # extra weight on cells whose centre lies in a GT box (0: uniform)
    prediction_weight: float = 0.0  # multiplies the three parts below
    pred_class_weight: float = 1.0
    pred_l1_weight: float = 5.0
    pred_giou_weight: float = 2.0
    match_class_cost: float = 2.0
    match_l1_cost: float = 5.0
    match_giou_cost: float = 2.0
    topk: int = 100  # teacher predictions per image (by confidence) read from the cache
    # "gt": a teacher prediction that detects a GT box is distilled into the query the student's GT loss trains for
    # that box; confident ones that detect none go to queries the GT loss leaves free. "hungarian": independent match.
    pred_assignment: Literal["gt", "hungarian"] = "gt"
    pred_min_confidence: float = 0.5  # teacher predictions below this (max class probability) are not distilled
    pred_nms_iou: float = 0.5  # one teacher prediction per object where the annotation is silent (1: no NMS)
    pred_gt_iou: float = 0.5  # a teacher prediction detects a GT box when their IoU is at least this
    # what the teacher teaches the queries trained for annotated boxes (gt assignment): "none" (the annotation
    # wins; the teacher teaches objects it lacks and unlabelled images), "class" (+ class distribution), "all"
    pred_annotated: Literal["none", "class", "all"] = "none"


@dataclass
class TrainConfig:
    data: str = ""  # prepared dataset directory (rtcodetr data ...)
    model: str = ""  # save_pretrained model directory (rtcodetr init-model, or a fine-tuned run's best/)
    cache: str | None = None  # teacher cache (zarr path / fsspec URL); None: no distillation
    # Online teacher (model directory) instead of a cache: the same losses with the teacher run on each augmented
    # batch. The reference arm that shows what the cache costs; slower, not for production runs.
    teacher: str | None = None
    # Images without annotations (`rtcodetr data add-images`): they get the distillation losses only, from their own
    # cache (or the online teacher); `unlabeled_ratio` of every batch comes from them. `cache` stays the labelled
    # split's cache and is optional here (without it labelled images get the detection loss only).
    unlabeled_split: str | None = None
    unlabeled_cache: str | None = None
    unlabeled_ratio: float = 0.5
    out: str = "runs/train"
    train_split: str = "train"
    val_split: str = "val"
    epochs: int = 72
    max_steps: int | None = None  # optimizer steps; wins over epochs
    batch_size: int = 4  # per process
    grad_accum_steps: int = 1
    num_workers: int = 2
    seed: int = 0
    image_size: tuple[int, int] | None = None  # (h, w); None: the model's own processor geometry
    draft_size: int | None = None  # JPEG draft decoding (faster loading of large photos)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    cpu: bool = False
    eval_every: int = 1  # epochs between validations (0: only at the end)
    eval_every_steps: int = 0  # steps between validations (0: off)
    eval_batch_size: int | None = None
    max_detections: int = 100
    checkpoint_every: int = 0  # steps between checkpoints; 0: only at epoch ends (if enabled) and on stopping
    checkpoint_epoch_end: bool = True  # also checkpoint at every epoch end (off for tiny sets: one step per epoch)
    keep_checkpoints: int = 2
    resume: str | None = None  # "auto" (latest checkpoint in out/, if any) or a checkpoint directory
    stop_after_steps: int | None = None  # stop (checkpointed) after this many steps without changing the schedule
    log_every: int = 10
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])
    find_unused_parameters: bool = False
    # A non-finite loss: "stop" (with the step, image ids and loss parts), or "skip" the step (no update; counted in
    # metrics.jsonl and results.json). "auto": skip under fp16, whose overflow past 65504 happens now and then in a
    # healthy run, stop under fp32/bf16, where it means a bug or divergence.
    nonfinite: Literal["auto", "stop", "skip"] = "auto"
    max_nonfinite_steps: int = 5  # with skipping: stop anyway once this many steps in a row were non-finite
    optim: OptimConfig = field(default_factory=OptimConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    aug: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)


# ------------------------------------------------------------------------------------------ model + adapters, EMA


class StudentWithAdapters(nn.Module):
    """The trainable thing: the HF student plus the 1x1 feature adapter, one module for ``accelerator.prepare``.

    ``forward`` returns (HF outputs, adapted student map ``[B, Ct, Hs, Ws]`` or None). The adapter maps the student's
    stride-32 map (``feature_source``) to the teacher's channel count; it is not part of the saved student.
    """

    def __init__(self, student: nn.Module, feature_source: str | None = None, teacher_channels: int | None = None,
                 seed: int = 0):
        super().__init__()
        self.student = student
        self.feature_source = feature_source
        self.adapter: nn.Module | None = None
        if feature_source is not None:
            from rtcodetr.features import feature_channels

            cin = feature_channels(student)[feature_source]
            # Drawn from its own seeded stream, not the global RNG: otherwise an arm with an adapter would start the
            # loop from another RNG state than its baseline twin (other denoising noise, other dropout), and arms
            # would differ in more than their losses.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.adapter = nn.Conv2d(cin, int(teacher_channels), kernel_size=1)

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None, labels=None):
        if self.adapter is None:
            return self.student(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels), None
        from rtcodetr.features import FeatureTap

        with FeatureTap(self.student, names=(self.feature_source,)) as tap:
            outputs = self.student(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels)
        return outputs, self.adapter(tap.features[self.feature_source])


class ModelEMA:
    """Exponential moving average of the student's weights (RT-DETR ``ModelEMA``): ``decay_t = decay (1 - e^{-t/w})``.

    Floating-point parameters and buffers are averaged; integer buffers are copied. Saved as safetensors.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: int):
        import copy

        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.warmup, self.updates = decay, warmup, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model`` (same architecture). The tensor pairs are collected once (state-dict
        tensors share storage with the live parameters and buffers), each storage once, so a tensor registered under
        two names is not averaged twice; the floating ones are updated with one fused ``_foreach_lerp_``."""
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / max(self.warmup, 1)))
        if getattr(self, "_pairs_of", None) is not model:
            src, seen = model.state_dict(), set()
            self._float, self._other = ([], []), ([], [])
            for k, v in self.module.state_dict().items():
                if v.numel() and v.data_ptr() in seen:
                    continue
                seen.add(v.data_ptr())
                bucket = self._float if v.dtype.is_floating_point else self._other
                bucket[0].append(v)
                bucket[1].append(src[k].detach())
            self._pairs_of = model
        ema_t, src_t = self._float
        if ema_t:
            torch._foreach_lerp_(ema_t, [s.to(e.dtype) for e, s in zip(ema_t, src_t)], 1 - d)
        for e, s in zip(*self._other):
            e.copy_(s)

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous().cpu() for k, v in self.module.state_dict().items()}
        # tied / shared tensors must not be saved twice by safetensors
        seen, unique = {}, {}
        for k, v in state.items():
            key = (v.data_ptr(), v.shape, v.dtype) if v.numel() else (k,)
            if key not in seen:
                seen[key] = k
                unique[k] = v
        save_file(unique, str(path), metadata={"updates": str(self.updates)})

    def load(self, path: Path) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file

        state = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            self.updates = int(f.metadata()["updates"])
        missing = self.module.load_state_dict(state, strict=False).missing_keys
        own = self.module.state_dict()
        for k in missing:  # shared tensors stored once: nothing to do unless truly absent
            if not any(own[k].data_ptr() == own[j].data_ptr() for j in state):
                raise RuntimeError(f"EMA checkpoint {path} lacks tensor '{k}'")


# ------------------------------------------------------------------------------------------------------ criterion


class DistillCriterion(nn.Module):
    """Named, unweighted losses: ``detection`` (the model's own), ``feature``, ``pred_class``/``pred_l1``/``pred_giou``.

    The teacher side comes from the batch (cache rows), never requires grad, and is moved to the student's frame
    here: boxes were moved by the affine in the workers, feature maps are resampled now, on the device.
    """

    def __init__(self, cfg: LossConfig, use_features: bool, use_predictions: bool, teacher_stride: float = 32.0,
                 student_stride: float = 32.0, student_config=None):
        super().__init__()
        from rtcodetr.train_student.losses import DistillMatcher, FeatureDistillLoss, PredictionDistillLoss, gt_matcher_for

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

    def forward(self, outputs, student_map: torch.Tensor | None, batch: dict[str, Any],
                detection: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``detection``: the detection loss when it is not ``outputs.loss`` (batches with unlabelled images)."""
        from rtcodetr.train_student.losses import PredictionTargets, foreground_weights, split_denoising
        from rtcodetr.train_student.resample import resample_teacher_features

        losses = {"detection": outputs.loss if detection is None else detection}
        if self.use_features:
            # the frame the teacher saw: the original image (cache), or the current view itself (online teacher)
            teacher_map, mask = resample_teacher_features(
                batch[f"teacher_{self.cfg.teacher_feature}"], batch.get("teacher_affine", batch["affine"]),
                batch.get("teacher_orig_size", batch["orig_size"]),
                batch["teacher_input_hw"], batch["teacher_valid"], batch["size"], tuple(student_map.shape[-2:]),
                self.teacher_stride, self.student_stride)
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


# ------------------------------------------------------------------------------------------------- post-processor


class PostProcess:
    """Model outputs -> detections in original-image pixels for the evaluator (sigmoid top-k over queries x classes,
    as RT-DETR and Conditional DETR both score with sigmoids).

    logits ``[B, Q, K]``, boxes ``[B, Q, 4]`` normalized cxcywh of each unpadded current image ``size`` ``[B, 2]``
    (h, w); ``affine`` ``[B, 3, 3]`` original -> current. Output boxes: float32 xyxy, original pixels.
    """

    def __init__(self, max_detections: int = 100):
        self.max_detections = max_detections

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, boxes: torch.Tensor, size: torch.Tensor, affine: torch.Tensor,
                 image_ids: Sequence[int]) -> list[dict[str, Any]]:
        from rtcodetr.data.boxes import cxcywh_normalized_to_xyxy
        from rtcodetr.data.transforms import boxes_to_original

        b, q, k = logits.shape
        scores = logits.float().sigmoid().flatten(1)
        n = min(self.max_detections, q * k)
        top_scores, top_idx = scores.topk(n, dim=1)
        # batched gather on the device, then one host copy per tensor (not three per image)
        top_boxes = boxes.float().gather(1, (top_idx // k).unsqueeze(-1).expand(-1, -1, 4))
        top_scores, labels = top_scores.cpu(), (top_idx % k).cpu()
        top_boxes, size, affine = top_boxes.cpu(), size.cpu(), affine.cpu()
        out = []
        for i in range(b):
            xyxy = cxcywh_normalized_to_xyxy(top_boxes[i], (int(size[i, 0]), int(size[i, 1])))
            out.append({"image_id": int(image_ids[i]), "boxes": boxes_to_original(xyxy, affine[i]),
                        "scores": top_scores[i], "labels": labels[i]})
        return out


# ------------------------------------------------------------------------------------------------------ data order


class EpochBatchSampler(torch.utils.data.Sampler):
    """This process's batches of a seeded per-epoch permutation, optionally starting mid-epoch.

    The permutation depends only on ``(seed, epoch)``; batch ``j`` of the epoch goes to process ``j % world``. With
    ``start_batch`` the first global batches are skipped, so a resumed run sees exactly the batches the
    uninterrupted one would have seen (``accelerator.skip_first_batches`` cannot promise that once the prepared
    loader's own epoch counter and RNG synchronisation are involved). Incomplete last batches are dropped.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 shuffle: bool = True):
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world, self.shuffle = rank, world, shuffle
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def batches_per_process(self) -> int:
        return (self.num_samples // self.batch_size) // self.world

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        n = self.batches_per_process() * self.world
        for j in range(self.start_batch * self.world, n):
            if j % self.world == self.rank:
                yield order[j * self.batch_size:(j + 1) * self.batch_size]

    def __len__(self) -> int:
        return self.batches_per_process() - self.start_batch


class MixedBatchSampler(EpochBatchSampler):
    """Batches of ``labelled_per_batch`` labelled images (indices ``0..num_labelled-1``, in the epoch's seeded
    permutation, exactly as ``EpochBatchSampler``) plus ``unlabelled_per_batch`` unlabelled ones (indices
    ``num_labelled..num_labelled+num_unlabelled-1``).

    Epochs are counted in labelled images. The unlabelled images come from one endless stream of seeded
    permutations (a new one each time the stream has used every image), indexed by the global batch number, so
    which unlabelled images a batch gets depends only on ``(seed, epoch, batch)``: resuming mid-epoch and the process
    count do not change it.
    """

    def __init__(self, num_labelled: int, num_unlabelled: int, labelled_per_batch: int, unlabelled_per_batch: int,
                 seed: int, rank: int = 0, world: int = 1):
        super().__init__(num_labelled, labelled_per_batch, seed, rank, world)
        self.num_unlabelled, self.unlabelled_per_batch = num_unlabelled, unlabelled_per_batch

    def _unlabelled(self, global_batch: int) -> list[int]:
        out = []
        for k in range(self.unlabelled_per_batch):
            cycle, i = divmod(global_batch * self.unlabelled_per_batch + k, self.num_unlabelled)
            if getattr(self, "_cycle", None) != cycle:
                g = torch.Generator().manual_seed((self.seed * 100_003 + cycle) * 2 + 1)
                self._cycle, self._perm = cycle, torch.randperm(self.num_unlabelled, generator=g).tolist()
            out.append(self.num_samples + self._perm[i])
        return out

    def __iter__(self):
        per_epoch = self.batches_per_process() * self.world
        for j, labelled in zip(range(self.start_batch * self.world + self.rank, per_epoch, self.world),
                               super().__iter__()):
            yield labelled + self._unlabelled(self.epoch * per_epoch + j)


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """Validation images for this process: a strided shard, no padding (the evaluator gathers them)."""
    return list(range(rank, n, world))


# ---------------------------------------------------------------------------------------------------- optimizer


def param_groups(net: StudentWithAdapters, cfg: OptimConfig) -> list[dict[str, Any]]:
    """AdamW groups: backbone / rest x decay / no-decay (no weight decay on norms, biases and embeddings' norms)."""
    backbone_ids = {id(p) for p in net.student.model.backbone.parameters()}
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    norm_types = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
    no_decay_ids = set()
    for module in net.modules():
        if isinstance(module, norm_types) or "Norm" in type(module).__name__:
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = id(p) in no_decay_ids or name.endswith(".bias") or p.ndim <= 1
        groups.setdefault((id(p) in backbone_ids, no_decay), []).append(p)
    out = []
    for (is_backbone, no_decay), params in sorted(groups.items()):
        out.append({"params": params, "lr": cfg.backbone_lr if is_backbone else cfg.lr,
                    "weight_decay": 0.0 if no_decay else cfg.weight_decay,
                    "name": f"{'backbone' if is_backbone else 'rest'}{'/no_decay' if no_decay else ''}"})
    return out


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    """Multiplier of each group's peak lr at optimizer step ``step`` (0-based): linear warm-up, then constant/cosine."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        t = (step - cfg.warmup_steps) / max(total - cfg.warmup_steps, 1)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return 1.0


# --------------------------------------------------------------------------------------------------- checkpoints


@dataclass
class TrainState:
    """Where the loop is; written as JSON next to ``accelerator.save_state``."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # this process's micro-batches done in ``epoch``
    best_map: float = -1.0
    best_step: int = -1
    nonfinite_skipped: int = 0  # steps skipped for a non-finite loss (nonfinite=skip)
    nonfinite_streak: int = 0  # of which in a row, up to now


def publish_checkpoint(tmp: Path, path: Path) -> None:
    """Give a completely written checkpoint directory its final name. ``checkpoint()`` writes ``.step_N.partial``
    first, so a run killed while saving leaves a directory that ``resume=auto`` (which looks at ``step_*``) never
    picks; the rename is atomic on a local or network POSIX file system."""
    shutil.rmtree(path, ignore_errors=True)  # a re-save of the same step (never the case for a fresh step)
    tmp.rename(path)


def find_checkpoint(out: Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from: ``resume=DIR``, or with ``resume=auto`` the newest complete ``step_N`` in
    ``out/checkpoints`` (half-written ones carry a ``.step_N.partial`` name until they are complete)."""
    if not resume:
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / "train_state.json").is_file():
            raise ConfigError(f"resume={resume}: not a checkpoint directory (no train_state.json)")
        return path
    ckpts = sorted((p for p in (out / "checkpoints").glob("step_*") if (p / "train_state.json").is_file()),
                   key=lambda p: int(p.name.split("_")[1]))
    return ckpts[-1] if ckpts else None


class NonFiniteLossError(FloatingPointError):
    """A loss part is NaN/inf; the message names the step, the batch's image ids and every loss part."""


def nonfinite_policy(setting: str, mixed_precision: str) -> str:
    """``"stop"`` or ``"skip"`` for ``TrainConfig.nonfinite`` under the precision the run actually uses (``auto``:
    skip under fp16 only, like GradScaler skips a step whose gradients overflow)."""
    if setting != "auto":
        return setting
    return "skip" if mixed_precision == "fp16" else "stop"


# -------------------------------------------------------------------------------------------------------- helpers


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    from accelerate.utils import send_to_device

    return send_to_device(batch, device, non_blocking=True)


def _apply_multiscale(batch: dict[str, Any], size_hw: tuple[int, int]) -> None:
    """Resize the batch on the device; normalized boxes are unchanged, sizes and affines follow the resize."""
    from rtcodetr.data.transforms import resize_batch

    images, targets = resize_batch(batch["pixel_values"], batch["targets"], size_hw)
    batch["pixel_values"] = images
    # Padded batches (shortest-edge geometry) keep their padding masked: resize the mask with the images.
    batch["pixel_mask"] = torch.nn.functional.interpolate(batch["pixel_mask"][:, None].float(),
                                                          size=tuple(images.shape[-2:]), mode="nearest")[:, 0].long()
    for old, new in zip(batch["targets"], targets):
        for key in ("teacher_boxes_cxcywh", "teacher_probs", "teacher_weight"):
            if key in old:
                new[key] = old[key]
    batch["targets"] = targets
    batch["affine"] = torch.stack([torch.as_tensor(t["affine"], dtype=torch.float64, device=images.device)
                                   for t in targets])
    batch["size"] = torch.stack([torch.as_tensor(t["size"], device=images.device).long() for t in targets])


def _check_label_maps(model, data, where: str) -> None:
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    names = [id2label.get(i) for i in range(len(id2label))]
    if len(names) != data.label_map.num_labels or names != list(data.label_map.names):
        raise ConfigError(
            f"{where}: the model's id2label ({len(names)} labels: {names[:5]}...) does not match the dataset's "
            f"label_map.json ({data.label_map.num_labels} labels: {list(data.label_map.names)[:5]}...); build the "
            f"model for this dataset with `rtcodetr init-model --data {data.root}`")


def _open_cache(path: str, data, split: str, lcfg: LossConfig, use_pred: bool, use_feat: bool):
    """The teacher cache of ``split``, reading only the tensors the active losses need; a cache whose teacher label
    map differs from the dataset's is refused for the prediction loss."""
    from rtcodetr.cache_teacher import TeacherCache

    tensors = (["logits", "boxes"] if use_pred else []) + ([lcfg.teacher_feature] if use_feat else [])
    cache = TeacherCache(path, data=data, split=split, tensors=tensors)
    if use_pred and not cache.label_map_matches(data.label_map):
        raise ConfigError(
            f"cache {path}: its teacher label map differs from the student's (dataset {data.root}); the "
            "prediction loss would compare unrelated classes and is refused. Fine-tune the teacher on this "
            "dataset first, or set loss.prediction_weight=0 (feature distillation is still allowed)")
    return cache


def _check_unlabeled(cfg: TrainConfig, data, distills: bool) -> None:
    """An unlabelled split needs teacher targets (its images have nothing else to learn from) and must really be
    unlabelled; the splits the detection loss and validation use must be labelled."""
    if data.is_labelled(cfg.unlabeled_split):
        raise ConfigError(f"unlabeled_split='{cfg.unlabeled_split}' has annotations; train on it with train_split, "
                          "or add images without annotations with `rtcodetr data add-images`")
    for key in ("train_split", "val_split"):
        if not data.is_labelled(getattr(cfg, key)):
            raise ConfigError(f"{key}='{getattr(cfg, key)}' is an unlabelled split: it has no ground truth")
    if not (cfg.unlabeled_cache or cfg.teacher):
        raise ConfigError(f"unlabeled_split='{cfg.unlabeled_split}' needs its teacher cache: unlabeled_cache=PATH "
                          f"(rtcodetr cache-teacher --split {cfg.unlabeled_split} ...), or teacher=MODEL_DIR")
    if not distills:
        raise ConfigError(f"unlabeled_split='{cfg.unlabeled_split}' is used only by the distillation losses, but "
                          "loss.feature_weight and loss.prediction_weight are 0")


def _labelled_detection_loss(model: nn.Module, outputs, labels: list[dict], labelled: list[bool]) -> torch.Tensor:
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


def _json_safe(x: Any) -> Any:
    """NaN/inf (e.g. the AP of an absent size class) -> None, so the JSON files stay strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _scalar(v: torch.Tensor | float) -> float:
    return float(v.detach().float().item()) if torch.is_tensor(v) else float(v)


# ---------------------------------------------------------------------------------------------------------- run


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train; return ``{"final", "best", "best_map", "best_step", "steps", "metrics", "val_history", "run_dir"}``."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, gather_object, set_seed
    from tqdm.auto import tqdm

    from rtcodetr.data.prepared import PreparedData
    from rtcodetr.data.dataset import CocoDetection
    from rtcodetr.data.transforms import build_transforms, pick_multiscale_size
    from rtcodetr.evaluate.coco_eval import CocoEvaluator
    from rtcodetr.models import processor_geometry, load_model, set_trainable
    from rtcodetr.train_student.distill_data import DistillDataset, collate

    if not cfg.data or not cfg.model:
        raise ConfigError("train: both data=DATA_DIR and model=MODEL_DIR are required")
    out = Path(cfg.out)
    lcfg = cfg.loss
    if cfg.cache and cfg.teacher:
        raise ConfigError("train: give either cache=CACHE (the cached teacher) or teacher=MODEL_DIR (the online "
                          "reference arm), not both")
    source = cfg.cache or cfg.unlabeled_cache or cfg.teacher  # where distillation targets come from
    use_pred = bool(source) and lcfg.prediction_weight > 0
    use_feat = bool(source) and lcfg.feature_weight > 0
    if cfg.mixed_precision == "fp16" and (cfg.cpu or not torch.cuda.is_available()):
        print("[train] mixed_precision=fp16 needs a CUDA device; training in float32 on the CPU", flush=True)
        cfg = replace(cfg, mixed_precision="no")

    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision, cpu=cfg.cpu, log_with=list(cfg.log_with) or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "tensorboard")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.find_unused_parameters)],
    )
    main = accelerator.is_main_process
    log = (lambda msg: print(msg, flush=True)) if main else (lambda msg: None)
    set_seed(cfg.seed)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")

    # ---- data, model
    data = PreparedData.load(cfg.data)
    model, processor = load_model(cfg.model)
    _check_label_maps(model, data, f"model {cfg.model}")
    for line in set_trainable(model, backbone=cfg.freeze.backbone, backbone_batchnorm=cfg.freeze.backbone_batchnorm):
        log(f"[train] {line}")
    geometry = processor_geometry(processor)
    image_size: Any = tuple(cfg.image_size) if cfg.image_size else {k: v for k, v in geometry.items()
                                                                    if k in ("mode", "size_hw", "shortest_edge",
                                                                             "longest_edge")}
    normalize = geometry["normalize"]
    if cfg.image_size:
        # The saved best/ and final/ must be served at the size they were trained at, not the preset's default.
        processor.size = {"height": int(cfg.image_size[0]), "width": int(cfg.image_size[1])}
        log(f"[train] input size {tuple(cfg.image_size)} (h, w); written into the saved image-processor config")

    if not source and (lcfg.prediction_weight > 0 or lcfg.feature_weight > 0):
        log("[train] no teacher cache given: distillation losses are off (plain training on ground truth)")
    elif source and not (use_pred or use_feat):
        log(f"[train] teacher {source} is not used: loss.prediction_weight and loss.feature_weight are 0")
    cache = None
    online = None
    teacher_channels = None
    teacher_stride = 32.0
    if cfg.teacher and (use_pred or use_feat):
        from rtcodetr.train_student.online_teacher import OnlineTeacher

        online = OnlineTeacher(cfg.teacher, accelerator.device, features=(lcfg.teacher_feature,) if use_feat else (),
                               predictions=use_pred, topk=lcfg.topk, student_normalize=normalize,
                               mixed_precision=cfg.mixed_precision)
        if use_pred and online.label_names != list(data.label_map.names):
            raise ConfigError(
                f"teacher {cfg.teacher}: its label map differs from the student's (dataset {data.root}); the "
                "prediction loss would compare unrelated classes and is refused. Fine-tune the teacher on this "
                "dataset first, or set loss.prediction_weight=0 (feature distillation is still allowed)")
        if use_feat:
            teacher_channels = online.channels(lcfg.teacher_feature)
        log(f"[train] online teacher {cfg.teacher} ({online.teacher.family}) runs on every batch (reference arm)")
    unl_cache = None
    if cfg.unlabeled_split:
        _check_unlabeled(cfg, data, use_pred or use_feat)
    if (use_pred or use_feat) and online is None:
        cache = _open_cache(cfg.cache, data, cfg.train_split, lcfg, use_pred, use_feat) if cfg.cache else None
        if cfg.unlabeled_split and cfg.unlabeled_cache:
            unl_cache = _open_cache(cfg.unlabeled_cache, data, cfg.unlabeled_split, lcfg, use_pred, use_feat)
        first = cache or unl_cache
        if use_feat:
            shape = first.manifest["tensors"][lcfg.teacher_feature]["shape"]
            teacher_channels = int(shape[-3])  # manifest shapes are per sample: [C, Hf, Wf]
        teacher_stride = float(first.manifest.get("geometry", {}).get("stride", 32))

    def distill_set(split: str, split_cache, stream: int) -> DistillDataset:
        base = CocoDetection(data, split, build_transforms(True, image_size, cfg.aug, normalize),
                             draft_size=cfg.draft_size)
        return DistillDataset(base, split_cache, predictions=use_pred and split_cache is not None,
                              features=(lcfg.teacher_feature,) if use_feat and split_cache is not None else (),
                              topk=lcfg.topk, seed=cfg.seed + stream * 1_000_003)

    val_base = CocoDetection(data, cfg.val_split, build_transforms(False, image_size, None, normalize),
                             draft_size=cfg.draft_size)
    train_set = distill_set(cfg.train_split, cache, 0)
    epoch_sets = [train_set]
    if cfg.unlabeled_split:
        unl_set = distill_set(cfg.unlabeled_split, unl_cache, 1)
        epoch_sets.append(unl_set)
        n_unl = int(round(cfg.batch_size * cfg.unlabeled_ratio))
        if not 1 <= n_unl <= cfg.batch_size - 1:
            raise ConfigError(f"unlabeled_ratio={cfg.unlabeled_ratio} with batch_size={cfg.batch_size} gives "
                              f"{n_unl} unlabelled images per batch; it must leave at least one of each kind")
        sampler = MixedBatchSampler(len(train_set), len(unl_set), cfg.batch_size - n_unl, n_unl, cfg.seed,
                                    accelerator.process_index, accelerator.num_processes)
        train_data = torch.utils.data.ConcatDataset([train_set, unl_set])
        log(f"[train] {len(unl_set)} unlabelled images ('{cfg.unlabeled_split}'): {n_unl} of each batch of "
            f"{cfg.batch_size}, distillation losses only")
    else:
        sampler = EpochBatchSampler(len(train_set), cfg.batch_size, cfg.seed, accelerator.process_index,
                                    accelerator.num_processes)
        train_data = train_set
    if sampler.batches_per_process() < cfg.grad_accum_steps:
        raise ConfigError(f"train split '{cfg.train_split}' has {len(train_set)} images: too few for batch_size="
                          f"{cfg.batch_size} x grad_accum_steps={cfg.grad_accum_steps} x {accelerator.num_processes} "
                          "processes")
    loader_kwargs = dict(num_workers=cfg.num_workers, collate_fn=collate, pin_memory=accelerator.device.type == "cuda")
    # Own generators: a DataLoader without one draws its worker base seed from the global RNG at every epoch, which
    # would shift the model's denoising noise between an uninterrupted and a resumed run.
    train_loader = torch.utils.data.DataLoader(train_data, batch_sampler=sampler,
                                               generator=torch.Generator().manual_seed(cfg.seed), **loader_kwargs)
    val_subset = torch.utils.data.Subset(
        DistillDataset(val_base), shard_indices(len(val_base), accelerator.process_index, accelerator.num_processes))
    val_loader = torch.utils.data.DataLoader(val_subset, batch_size=cfg.eval_batch_size or cfg.batch_size,
                                             shuffle=False, generator=torch.Generator().manual_seed(cfg.seed),
                                             **loader_kwargs)

    # ---- the trainable module, criterion, optimizer
    net = StudentWithAdapters(model, lcfg.feature_source if use_feat else None, teacher_channels, seed=cfg.seed)
    net.train()
    criterion = DistillCriterion(lcfg, use_feat, use_pred, teacher_stride=teacher_stride, student_config=model.config)
    weight_dict = build_weight_dict(lcfg)
    active = [k for k, w in weight_dict.items() if w != 0 and (k == "detection" or (k == "feature" and use_feat)
                                                               or (k.startswith("pred_") and use_pred))]
    log(f"[train] losses: {', '.join(f'{k} x {weight_dict[k]:g}' for k in active)}")
    groups = param_groups(net, cfg.optim)
    for g in groups:
        log(f"[train] param group {g['name']}: {sum(p.numel() for p in g['params']) / 1e6:.3f}M params, "
            f"lr {g['lr']:g}, weight decay {g['weight_decay']:g}")
    frozen = sum(p.numel() for p in net.parameters() if not p.requires_grad)
    log(f"[train] frozen parameters: {frozen / 1e6:.3f}M")
    for g in groups:
        g["initial_lr"] = g["lr"]
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    net, optimizer = accelerator.prepare(net, optimizer)
    unwrapped: StudentWithAdapters = accelerator.unwrap_model(net)
    ema = ModelEMA(unwrapped.student, cfg.optim.ema_decay, cfg.optim.ema_warmup) if cfg.optim.ema else None
    postprocess = PostProcess(cfg.max_detections)

    steps_per_epoch = sampler.batches_per_process() // cfg.grad_accum_steps
    total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    state = TrainState()

    # ---- resume
    ckpt = find_checkpoint(out, cfg.resume)
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        state = TrainState(**json.loads((ckpt / "train_state.json").read_text()))
        if ema is not None and (ckpt / "ema.safetensors").is_file():
            ema.load(ckpt / "ema.safetensors")
        log(f"[train] resumed from {ckpt}: step {state.step}, epoch {state.epoch}, batch {state.batch_in_epoch}")

    metrics_file = out / "metrics.jsonl"
    if main and ckpt is not None and metrics_file.is_file():
        # A crash after the last checkpoint logged steps that will now be redone: drop them so each step appears once.
        kept = [line for line in metrics_file.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= state.step]
        metrics_file.write_text("".join(line + "\n" for line in kept))
    if main:
        accelerator.init_trackers("train", config={k: v for k, v in _flat(config_to_dict(cfg)).items()})

    def write_metrics(record: dict[str, Any]) -> None:
        if main:
            with open(metrics_file, "a") as f:
                f.write(json.dumps(_json_safe(record)) + "\n")

    # ---- validation, saving
    @torch.no_grad()
    def evaluate() -> dict[str, Any]:
        eval_model = ema.module if ema is not None else unwrapped.student
        was_training = eval_model.training
        eval_model.eval()
        evaluator = CocoEvaluator(data.split_file(cfg.val_split), data.label_map)
        for batch in val_loader:
            batch = _to_device(batch, accelerator.device)
            with accelerator.autocast():
                outputs = eval_model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"])
            evaluator.update(postprocess(outputs.logits, outputs.pred_boxes, batch["size"], batch["affine"],
                                         batch["image_ids"]))
        evaluator.synchronize(accelerator)
        evaluator.accumulate()
        summary = evaluator.summarize()
        eval_model.train(was_training)
        return summary

    def save_model(dirname: str) -> Path:
        target = out / dirname
        if main:
            tmp = out / f".{dirname}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            src = ema.module if ema is not None else unwrapped.student
            src.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
        accelerator.wait_for_everyone()
        return target

    def checkpoint() -> Path:
        path = out / "checkpoints" / f"step_{state.step}"
        tmp = path.with_name(f".{path.name}.partial")  # renamed to step_N once every process has written its part
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        if main:
            if ema is not None:
                ema.save(tmp / "ema.safetensors")
            (tmp / "train_state.json").write_text(json.dumps(asdict(state)))
        accelerator.wait_for_everyone()
        if main:
            publish_checkpoint(tmp, path)
            for stale in (out / "checkpoints").glob(".step_*.partial"):  # left by runs killed while saving
                shutil.rmtree(stale, ignore_errors=True)
            ckpts = sorted((p for p in (out / "checkpoints").glob("step_*")), key=lambda p: int(p.name.split("_")[1]))
            for old in ckpts[:-max(cfg.keep_checkpoints, 1)]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return path

    val_history: list[dict[str, Any]] = []
    last_eval_step = -1

    def validate() -> None:
        nonlocal last_eval_step
        metrics = evaluate()
        last_eval_step = state.step
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        record = {"type": "val", "step": state.step, "epoch": state.epoch, **scalars}
        val_history.append(record)
        write_metrics(record)
        accelerator.log({f"val/{k}": v for k, v in scalars.items()}, step=state.step)
        log(f"[train] step {state.step} val mAP {metrics['mAP']:.4f} mAP50 {metrics['mAP50']:.4f}")
        if metrics["mAP"] > state.best_map:
            state.best_map, state.best_step = float(metrics["mAP"]), state.step
            save_model("best")

    # ---- pre-flight: a damaged cache stops here with the shards to recompute, not mid-epoch in a DataLoader worker
    for path, checked in ((cfg.cache, cache), (cfg.unlabeled_cache, unl_cache)):
        if checked is None:
            continue
        t_check = time.time()
        checked.check_integrity()
        log(f"[train] cache {path}: all {checked.manifest['storage']['num_shards']} shards finished, their objects "
            f"present and indexes intact for {checked.tensors} ({time.time() - t_check:.1f} s; a full read: "
            f"`rtcodetr cache-teacher verify {path} --full`)")
    policy = nonfinite_policy(cfg.nonfinite, accelerator.mixed_precision)
    # Under DDP every trainable parameter must get a gradient on every rank in every step, else the ranks' gradient
    # buckets disagree and the all-reduce hangs or fails: RT-DETR leaves its denoising embedding out of the graph when
    # a rank's batch has no boxes (lyuwenyu/RT-DETR#672). A zero-weighted sum of the parameters keeps them in.
    trainable = [p for p in net.parameters() if p.requires_grad] if accelerator.num_processes > 1 else []

    # ---- the loop
    log(f"[train] {len(train_set)} train images, {len(val_base)} val images, {accelerator.num_processes} process(es), "
        f"batch {cfg.batch_size} x accum {cfg.grad_accum_steps}, {steps_per_epoch} steps/epoch, {total_steps} steps")
    bar = tqdm(total=total_steps, initial=state.step, disable=not main, desc="train", dynamic_ncols=True)
    stop_at = min(total_steps, cfg.stop_after_steps) if cfg.stop_after_steps is not None else total_steps
    ms_rng = random.Random()
    t_last, images_since = time.time(), 0
    running: dict[str, float] = {}
    skipped_parts: dict[str, float] | None = None  # loss parts of a non-finite micro-batch in the current window
    net.train()
    while state.step < stop_at:
        for dataset in epoch_sets:
            dataset.set_epoch(state.epoch)
        sampler.set_epoch(state.epoch, start_batch=state.batch_in_epoch)
        for batch in train_loader:
            if state.batch_in_epoch >= steps_per_epoch * cfg.grad_accum_steps:
                break  # trailing micro-batches that cannot fill an accumulation window
            batch = _to_device(batch, accelerator.device)
            ms_rng.seed(cfg.seed * 1_000_003 + state.step)
            size_hw = pick_multiscale_size(cfg.aug, state.epoch, ms_rng)
            if size_hw is not None:
                _apply_multiscale(batch, size_hw)
            if online is not None:
                online(batch)  # the teacher's targets for exactly this view
            sync = (state.batch_in_epoch + 1) % cfg.grad_accum_steps == 0
            ctx = accelerator.no_sync(net) if not sync else contextlib.nullcontext()
            with ctx:
                with accelerator.autocast():
                    outputs, student_map = net(batch["pixel_values"], batch["pixel_mask"], labels=batch["labels"])
                    detection = None
                    if not all(batch["labelled"]):
                        detection = _labelled_detection_loss(unwrapped.student, outputs, batch["labels"],
                                                             batch["labelled"])
                    losses = criterion(outputs, student_map, batch, detection)
                loss = sum(losses[k] * weight_dict[k] for k in losses)
                if trainable:
                    loss = loss + 0.0 * torch.stack([p.sum() for p in trainable]).sum()
                # One host copy per micro-batch for the finiteness check and every logged value (not one per part).
                logged = {**losses, **{f"det/{k}": v for k, v in (getattr(outputs, "loss_dict", None) or {}).items()}}
                values = torch.stack([torch.as_tensor(v, device=accelerator.device).detach().float().reshape(())
                                      for v in logged.values()])
                finite = torch.isfinite(loss.detach()).all().float().reshape(1)
                if accelerator.num_processes > 1:
                    finite = accelerator.gather(finite).min().reshape(1)  # every process stops together
                finite, *host = torch.cat([finite, values]).tolist()
                if not finite:
                    parts = {k: v for k, v in zip(logged, host) if not k.startswith("det/")}
                    streak = state.nonfinite_streak + 1
                    if policy == "stop" or streak >= cfg.max_nonfinite_steps:
                        bar.close()
                        raise NonFiniteLossError(
                            f"non-finite loss at step {state.step} (epoch {state.epoch}, micro-batch "
                            f"{state.batch_in_epoch}) on process {accelerator.process_index}: image ids "
                            f"{batch['image_ids']}, loss parts {parts}, weights {weight_dict}"
                            + (f"; {streak} steps in a row were non-finite (max_nonfinite_steps="
                               f"{cfg.max_nonfinite_steps})" if policy == "skip" else ""))
                    skipped_parts = parts  # every process agrees (gathered above): the whole step is skipped
                else:
                    accelerator.backward(loss / cfg.grad_accum_steps)
            state.batch_in_epoch += 1
            images_since += batch["pixel_values"].shape[0] * accelerator.num_processes
            for k, v in zip(logged, host):
                running[k] = running.get(k, 0.0) + v / cfg.grad_accum_steps
            if not sync:
                continue
            if skipped_parts is not None:
                # -- a skipped step: no update, but it counts as a step (schedule, data order and checkpoints stay
                # those of a run without the overflow)
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.nonfinite_skipped += 1
                state.nonfinite_streak += 1
                bar.update(1)
                log(f"[train] step {state.step}: non-finite loss (parts {skipped_parts}, image ids "
                    f"{batch['image_ids']}); step skipped ({state.nonfinite_skipped} so far, "
                    f"{state.nonfinite_streak} in a row)")
                write_metrics({"type": "skipped", "step": state.step, "epoch": state.epoch,
                               "reason": "non-finite loss", "loss_parts": skipped_parts,
                               "nonfinite_skipped": state.nonfinite_skipped})
                accelerator.log({"train/nonfinite_skipped": state.nonfinite_skipped}, step=state.step)
                running, skipped_parts = {}, None
                if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                    checkpoint()
                if cfg.eval_every_steps and state.step % cfg.eval_every_steps == 0:
                    validate()
                if state.step >= stop_at:
                    break
                continue
            state.nonfinite_streak = 0

            # -- optimizer step
            factor = lr_factor(state.step, total_steps, cfg.optim)
            for g in optimizer.param_groups:
                g["lr"] = g["initial_lr"] * factor
            grad_norm = None
            if cfg.optim.clip_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(net.parameters(), cfg.optim.clip_grad_norm)
            optimizer.step()
            # fp16: GradScaler skipped the update itself (inf/NaN gradients from a finite loss) and lowered its scale
            scaler_skipped = accelerator.optimizer_step_was_skipped
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(unwrapped.student)
            state.step += 1
            bar.update(1)

            # -- logs: raw and weighted loss parts (mean over processes), learning rates, throughput
            if accelerator.num_processes > 1:
                # Mean of each part over the processes that have it: a rank whose batch has no boxes logs no
                # denoising parts, and a collective over lists of different lengths would fail.
                keys = sorted(set().union(*gather_object([sorted(running)])))
                sums = accelerator.reduce(torch.tensor([[running.get(k, 0.0), float(k in running)] for k in keys],
                                                       device=accelerator.device), reduction="sum")
                running = {k: s / c for k, (s, c) in zip(keys, sums.tolist()) if c > 0}
            record: dict[str, Any] = {"type": "train", "step": state.step, "epoch": state.epoch}
            for k, v in running.items():
                record[f"loss/{k}"] = v
                if k in weight_dict:
                    record[f"weighted/{k}"] = v * weight_dict[k]
            record["loss/total"] = sum(record.get(f"weighted/{k}", 0.0) for k in weight_dict)
            for g in optimizer.param_groups:
                record[f"lr/{g['name']}"] = g["lr"]
            if grad_norm is not None:
                record["grad_norm"] = _scalar(grad_norm)
            if state.nonfinite_skipped:
                record["nonfinite_skipped"] = state.nonfinite_skipped
            if scaler_skipped:
                record["scaler_skipped"] = True
            running = {}
            if state.step % max(cfg.log_every, 1) == 0 or state.step == 1 or state.step == stop_at:
                now = time.time()
                record["images_per_s"] = images_since / max(now - t_last, 1e-9)
                t_last, images_since = now, 0
                accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "type"},
                                step=state.step)
                bar.set_postfix(loss=f"{record['loss/total']:.3f}")
            write_metrics(record)

            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                checkpoint()
            if cfg.eval_every_steps and state.step % cfg.eval_every_steps == 0:
                validate()
            if state.step >= stop_at:
                break
        if state.batch_in_epoch >= steps_per_epoch * cfg.grad_accum_steps:  # the epoch is complete
            state.epoch += 1
            state.batch_in_epoch = 0
            if cfg.eval_every and state.epoch % cfg.eval_every == 0 and state.step != last_eval_step:
                validate()
            if cfg.checkpoint_epoch_end:
                checkpoint()
    bar.close()

    interrupted = state.step < total_steps
    if interrupted:
        path = out / "checkpoints" / f"step_{state.step}"
        if not (path / "train_state.json").is_file():
            path = checkpoint()
        log(f"[train] stopped at step {state.step} of {total_steps} (stop_after_steps); resume with resume=auto "
            f"(checkpoint {path})")
        accelerator.end_training()
        return {"run_dir": str(out), "steps": state.step, "interrupted": True, "checkpoint": str(path),
                "final": None, "best": None, "best_map": state.best_map, "best_step": state.best_step}

    if last_eval_step != state.step:
        validate()
    final = save_model("final")
    best = out / "best"
    result = {
        "run_dir": str(out), "steps": state.step, "epochs": state.epoch, "interrupted": False,
        "final": str(final), "best": str(best) if best.is_dir() else None,
        "best_map": state.best_map, "best_step": state.best_step,
        "metrics": val_history[-1] if val_history else {}, "val_history": val_history,
        "losses": active, "weight_dict": weight_dict, "num_processes": accelerator.num_processes,
        "nonfinite_skipped_steps": state.nonfinite_skipped,
    }
    if main:
        (out / "results.json").write_text(json.dumps(_json_safe(result), indent=2))
    log(f"[train] done: best mAP {state.best_map:.4f} at step {state.best_step}; final -> {final}")
    accelerator.end_training()
    return result


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flat scalar view of a nested config for TensorBoard's hparams (lists become strings)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)):
            out[f"{prefix}{k}"] = v
        else:
            out[f"{prefix}{k}"] = str(v)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    flags, overrides = split_overrides(argv)
    parser = argparse.ArgumentParser(
        prog="rtcodetr train",
        description="Train a student (or fine-tune the teacher); key=value words override the config, e.g. "
                    "data=DIR model=DIR cache=CACHE out=RUN max_steps=200 loss.feature_weight=0")
    parser.add_argument("--config", help="YAML config (configs/baseline.yaml, configs/distill.yaml, ...)")
    args = parser.parse_args(flags)
    try:
        cfg = load_config(TrainConfig, args.config, overrides)
        result = run(cfg)
    except BAD_INPUT as e:  # a config key, the data, the model, the cache (missing, other dataset, damaged shard)
        return report_bad_input("rtcodetr train", e)
    except NonFiniteLossError as e:  # not bad input: the run diverged; the message has the step, ids and parts
        print(f"rtcodetr train: error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0 if result.get("final") or result.get("interrupted") else 1


if __name__ == "__main__":
    raise SystemExit(main())
