"""The trainer's settings: typed dataclasses with defaults, read from a YAML file plus ``key=value`` overrides
(``rtcodetr.config.load_config``), written next to every run."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rtcodetr.data.transforms import AugmentConfig

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
    # a view mirrored relative to the frame the teacher saw (a flip of a cached image): "resample" distils the mirrored
    # teacher map; "skip" leaves that sample out of the feature loss. CNN and encoder features are not flip-equivariant
    # (a left-edge channel is not a right-edge one; measured: cosine 0.59-0.72 between f(flip x) and flip f(x) for the
    # demo teacher's encoder maps), so a mirrored map is a wrong target. An online teacher sees the view itself.
    feature_mirrored: Literal["resample", "skip"] = "resample"
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
    # The same split cached with `geometry.hflip=true` (the teacher on mirrored images): flipped views take their
    # feature targets from it, so every view gets the teacher's map of what it shows (needs `cache`).
    mirror_cache: str | None = None
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
