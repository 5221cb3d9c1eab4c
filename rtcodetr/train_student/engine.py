"""The training loop's parts (detr's ``engine.py``): one epoch of steps, and validation.

A step: the batch goes to the device, is resized for multi-scale, gets its online-teacher targets (reference arm
only); the student runs forward with the GT labels (denoising on), the criterion returns named unweighted losses,
their weighted sum is checked for finiteness on every process at once and backpropagated; at the end of an
accumulation window the optimizer steps (clip, AdamW, EMA) and the step is logged, checkpointed and validated as the
config says. ``run`` (``train.py``) builds everything a ``Loop`` holds and calls ``train_one_epoch`` per epoch.
"""
from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from accelerate.utils import gather_object, send_to_device
from torch import nn

from rtcodetr.data.dataset import CocoDetection
from rtcodetr.data.transforms import pick_multiscale_size, resize_batch
from rtcodetr.evaluate.api import predict_split
from rtcodetr.evaluate.coco_eval import CocoEvaluator
from rtcodetr.evaluate.detectors import TransformersDetector
from rtcodetr.train_student.checkpoints import ModelEMA, RunDir, TrainState
from rtcodetr.train_student.config import TrainConfig
from rtcodetr.train_student.losses import DistillCriterion, labelled_detection_loss
from rtcodetr.train_student.optim import lr_factor
from rtcodetr.train_student.sampling import shard_indices


class NonFiniteLossError(FloatingPointError):
    """A loss part is NaN/inf; the message names the step, the batch's image ids and every loss part."""


def nonfinite_policy(setting: str, mixed_precision: str) -> str:
    """``stop`` or ``skip`` for a non-finite loss. ``auto``: skip under fp16, whose loss scaler makes an occasional
    overflow normal (the public RT-DETR clamps its fp16 decoder for the same reason), stop under fp32/bf16, where a
    non-finite loss means the run diverged."""
    if setting != "auto":
        return setting
    return "skip" if mixed_precision == "fp16" else "stop"


def apply_multiscale(batch: dict[str, Any], size_hw: tuple[int, int]) -> None:
    """Resize the batch on the device; normalized boxes are unchanged, sizes and affines follow the resize."""
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


class Validator:
    """Validation under the evaluator's protocol: the model about to be saved, wrapped as the
    :class:`TransformersDetector` that ``rtcodetr evaluate`` makes of the saved copy (same image processor, same
    post-processing), on this process's shard of the split; detections gathered over processes, COCO metrics."""

    def __init__(self, data: Any, split: str, processor: Any, accelerator: Any, batch_size: int,
                 draft_size: int | None = None):
        self.data, self.split, self.processor, self.accelerator = data, split, processor, accelerator
        self.dataset = CocoDetection(data, split, draft_size=draft_size)  # decoded as the evaluator decodes
        self.indices = shard_indices(len(self.dataset), accelerator.process_index, accelerator.num_processes)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return len(self.dataset)

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> dict[str, Any]:
        was_training = model.training
        model.eval()
        detector = TransformersDetector.from_model(model, self.processor, label_map=self.data.label_map,
                                                   device=self.accelerator.device)
        evaluator = CocoEvaluator(self.data.split_file(self.split), self.data.label_map)
        evaluator.update(predict_split(detector, self.dataset, self.indices, self.batch_size, progress=False))
        evaluator.synchronize(self.accelerator)
        evaluator.accumulate()
        model.train(was_training)
        return evaluator.summarize()


@dataclass
class Loop:
    """Everything the loop uses, built once by ``run``; ``state`` is what a checkpoint restores."""

    cfg: TrainConfig
    accelerator: Any
    net: nn.Module  # the prepared StudentWithAdapters
    student: nn.Module  # the HF student inside it
    criterion: DistillCriterion
    weight_dict: dict[str, float]
    optimizer: Any
    ema: ModelEMA | None
    online: Any  # OnlineTeacher | None: the reference arm fills the batch's teacher targets itself
    run_dir: RunDir
    validator: Validator
    state: TrainState
    total_steps: int
    steps_per_epoch: int
    stop_at: int
    log: Callable[[str], None]
    bar: Any
    policy: str = "stop"
    # Under DDP every trainable parameter must get a gradient on every rank in every step, else the ranks' gradient
    # buckets disagree and the all-reduce hangs or fails: RT-DETR leaves its denoising embedding out of the graph
    # when a rank's batch has no boxes (lyuwenyu/RT-DETR#672). A zero-weighted sum of these keeps them in.
    trainable: list = field(default_factory=list)
    val_history: list = field(default_factory=list)
    last_eval_step: int = -1
    t_last: float = field(default_factory=time.time)
    images_since: int = 0

    @property
    def eval_model(self) -> nn.Module:
        """What is validated and saved: the EMA weights when there is an EMA, else the student."""
        return self.ema.module if self.ema is not None else self.student

    def checkpoint(self):
        return self.run_dir.checkpoint(self.state, self.ema)


def validate(loop: Loop) -> None:
    """Validate, log, and save ``best/`` when the mAP improved."""
    state = loop.state
    metrics = loop.validator(loop.eval_model)
    loop.last_eval_step = state.step
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    record = {"type": "val", "step": state.step, "epoch": state.epoch, **scalars}
    loop.val_history.append(record)
    loop.run_dir.write_metrics(record)
    loop.accelerator.log({f"val/{k}": v for k, v in scalars.items()}, step=state.step)
    loop.log(f"step {state.step} val mAP {metrics['mAP']:.4f} mAP50 {metrics['mAP50']:.4f}")
    if metrics["mAP"] > state.best_map:
        state.best_map, state.best_step = float(metrics["mAP"]), state.step
        loop.run_dir.save_model("best", loop.eval_model)


def _prepare(loop: Loop, batch: dict[str, Any], ms_rng: random.Random) -> dict[str, Any]:
    batch = send_to_device(batch, loop.accelerator.device, non_blocking=True)
    ms_rng.seed(loop.cfg.seed * 1_000_003 + loop.state.step)
    size_hw = pick_multiscale_size(loop.cfg.aug, loop.state.epoch, ms_rng)
    if size_hw is not None:
        apply_multiscale(batch, size_hw)
    if loop.online is not None:
        loop.online(batch)  # the teacher's targets for exactly this view
    return batch


def _forward_backward(loop: Loop, batch: dict[str, Any], sync: bool) -> tuple[dict[str, float], dict | None]:
    """Forward, losses and (when finite) backward of one micro-batch. Returns (every logged loss part as a float,
    the parts of a non-finite loss to skip, or None). One host copy per micro-batch for the finiteness check and
    every logged value (not one per part); every process learns whether any of them was non-finite."""
    acc, cfg, state = loop.accelerator, loop.cfg, loop.state
    with acc.no_sync(loop.net) if not sync else contextlib.nullcontext():
        with acc.autocast():
            outputs, student_map = loop.net(batch["pixel_values"], batch["pixel_mask"], labels=batch["labels"])
            detection = None
            if not all(batch["labelled"]):
                detection = labelled_detection_loss(loop.student, outputs, batch["labels"], batch["labelled"])
            losses = loop.criterion(outputs, student_map, batch, detection)
        loss = sum(losses[k] * loop.weight_dict[k] for k in losses)
        if loop.trainable:
            loss = loss + 0.0 * torch.stack([p.sum() for p in loop.trainable]).sum()
        logged = {**losses, **{f"det/{k}": v for k, v in (getattr(outputs, "loss_dict", None) or {}).items()}}
        values = torch.stack([torch.as_tensor(v, device=acc.device).detach().float().reshape(())
                              for v in logged.values()])
        finite = torch.isfinite(loss.detach()).all().float().reshape(1)
        if acc.num_processes > 1:
            finite = acc.gather(finite).min().reshape(1)  # every process stops (or skips) together
        finite, *host = torch.cat([finite, values]).tolist()
        parts = dict(zip(logged, host))
        if finite:
            acc.backward(loss / cfg.grad_accum_steps)
            return parts, None
    skipped = {k: v for k, v in parts.items() if not k.startswith("det/")}
    streak = state.nonfinite_streak + 1
    if loop.policy == "stop" or streak >= cfg.max_nonfinite_steps:
        loop.bar.close()
        raise NonFiniteLossError(
            f"non-finite loss at step {state.step} (epoch {state.epoch}, micro-batch {state.batch_in_epoch}) on "
            f"process {acc.process_index}: image ids {batch['image_ids']}, loss parts {skipped}, weights "
            f"{loop.weight_dict}" + (f"; {streak} steps in a row were non-finite (max_nonfinite_steps="
                                     f"{cfg.max_nonfinite_steps})" if loop.policy == "skip" else ""))
    return parts, skipped


def _skip_step(loop: Loop, parts: dict[str, float], image_ids: list[int]) -> None:
    """A skipped step: no update, but it counts as a step (schedule, data order and checkpoints stay those of a run
    without the overflow)."""
    state = loop.state
    loop.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.nonfinite_skipped += 1
    state.nonfinite_streak += 1
    loop.bar.update(1)
    loop.log(f"step {state.step}: non-finite loss (parts {parts}, image ids {image_ids}); step skipped "
             f"({state.nonfinite_skipped} so far, {state.nonfinite_streak} in a row)")
    loop.run_dir.write_metrics({"type": "skipped", "step": state.step, "epoch": state.epoch,
                                "reason": "non-finite loss", "loss_parts": parts,
                                "nonfinite_skipped": state.nonfinite_skipped})
    loop.accelerator.log({"train/nonfinite_skipped": state.nonfinite_skipped}, step=state.step)


def _optimizer_step(loop: Loop) -> tuple[float | None, bool]:
    """lr schedule, gradient clipping, AdamW, EMA; returns (grad norm, whether fp16's scaler skipped the update)."""
    acc, cfg, state = loop.accelerator, loop.cfg, loop.state
    factor = lr_factor(state.step, loop.total_steps, cfg.optim)
    for g in loop.optimizer.param_groups:
        g["lr"] = g["initial_lr"] * factor
    grad_norm = None
    if cfg.optim.clip_grad_norm > 0:
        grad_norm = float(acc.clip_grad_norm_(loop.net.parameters(), cfg.optim.clip_grad_norm).detach().float().item())
    loop.optimizer.step()
    scaler_skipped = acc.optimizer_step_was_skipped  # fp16: inf/NaN gradients from a finite loss; scale lowered
    loop.optimizer.zero_grad(set_to_none=True)
    if loop.ema is not None:
        loop.ema.update(loop.student)
    state.step += 1
    state.nonfinite_streak = 0
    loop.bar.update(1)
    return grad_norm, scaler_skipped


def _log_step(loop: Loop, running: dict[str, float], grad_norm: float | None, scaler_skipped: bool) -> None:
    """Raw and weighted loss parts (mean over the processes that have each part), learning rates, throughput."""
    acc, state, weight_dict = loop.accelerator, loop.state, loop.weight_dict
    if acc.num_processes > 1:
        # a rank whose batch has no boxes logs no denoising parts: a collective over lists of different lengths
        # would fail, so every part is averaged over the ranks that have it
        keys = sorted(set().union(*gather_object([sorted(running)])))
        sums = acc.reduce(torch.tensor([[running.get(k, 0.0), float(k in running)] for k in keys],
                                       device=acc.device), reduction="sum")
        running = {k: s / c for k, (s, c) in zip(keys, sums.tolist()) if c > 0}
    record: dict[str, Any] = {"type": "train", "step": state.step, "epoch": state.epoch}
    for k, v in running.items():
        record[f"loss/{k}"] = v
        if k in weight_dict:
            record[f"weighted/{k}"] = v * weight_dict[k]
    record["loss/total"] = sum(record.get(f"weighted/{k}", 0.0) for k in weight_dict)
    for g in loop.optimizer.param_groups:
        record[f"lr/{g['name']}"] = g["lr"]
    if grad_norm is not None:
        record["grad_norm"] = grad_norm
    if state.nonfinite_skipped:
        record["nonfinite_skipped"] = state.nonfinite_skipped
    if scaler_skipped:
        record["scaler_skipped"] = True
    if state.step % max(loop.cfg.log_every, 1) == 0 or state.step == 1 or state.step == loop.stop_at:
        now = time.time()
        record["images_per_s"] = loop.images_since / max(now - loop.t_last, 1e-9)
        loop.t_last, loop.images_since = now, 0
        acc.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "type"}, step=state.step)
        loop.bar.set_postfix(loss=f"{record['loss/total']:.3f}")
    loop.run_dir.write_metrics(record)


def train_one_epoch(loop: Loop, loader: Any) -> None:
    """Steps over ``loader`` (this epoch's batches, from ``state.batch_in_epoch`` on) until the epoch's last full
    accumulation window or ``stop_at``; checkpoints and validates every N steps as configured."""
    cfg, state = loop.cfg, loop.state
    ms_rng = random.Random()
    window = cfg.grad_accum_steps
    running: dict[str, float] = {}
    skipped: dict[str, float] | None = None  # loss parts of a non-finite micro-batch in the current window
    for batch in loader:
        if state.batch_in_epoch >= loop.steps_per_epoch * window:
            break  # trailing micro-batches that cannot fill an accumulation window
        batch = _prepare(loop, batch, ms_rng)
        sync = (state.batch_in_epoch + 1) % window == 0
        parts, nonfinite = _forward_backward(loop, batch, sync)
        skipped = nonfinite or skipped
        state.batch_in_epoch += 1
        loop.images_since += batch["pixel_values"].shape[0] * loop.accelerator.num_processes
        for k, v in parts.items():
            running[k] = running.get(k, 0.0) + v / window
        if not sync:
            continue
        if skipped is not None:
            _skip_step(loop, skipped, batch["image_ids"])
        else:
            _log_step(loop, running, *_optimizer_step(loop))
        running, skipped = {}, None
        if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
            loop.checkpoint()
        if cfg.eval_every_steps and state.step % cfg.eval_every_steps == 0:
            validate(loop)
        if state.step >= loop.stop_at:
            break


def end_epoch(loop: Loop) -> None:
    """When the epoch is complete: count it, validate and checkpoint as configured."""
    cfg, state = loop.cfg, loop.state
    if state.batch_in_epoch < loop.steps_per_epoch * cfg.grad_accum_steps:
        return  # stopped mid-epoch (stop_at)
    state.epoch += 1
    state.batch_in_epoch = 0
    if cfg.eval_every and state.epoch % cfg.eval_every == 0 and state.step != loop.last_eval_step:
        validate(loop)
    if cfg.checkpoint_epoch_end:
        loop.checkpoint()
