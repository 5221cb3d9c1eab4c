"""Train an RT-DETR student (or fine-tune a Conditional DETR teacher) with Accelerate, streaming the teacher cache.

    accelerate launch -m rtcodetr.train_student --config configs/distill.yaml data=DATA model=MODEL cache=CACHE out=RUN

``run`` is the whole story, top to bottom: data -> model (+ 1x1 adapter: one module) -> teachers -> criterion ->
optimizer -> resume -> the loop (``engine.train_one_epoch``) -> final model and results. Without a teacher (or with
every distillation weight 0) it is plain training: the baseline, and the teacher fine-tune. The run directory is
described in ``checkpoints.py``; the settings in ``config.py``.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from rtcodetr.config import ConfigError, config_to_dict, load_config, save_config, split_overrides
from rtcodetr.data.prepared import PreparedData
from rtcodetr.errors import BAD_INPUT, report_bad_input
from rtcodetr.models import load_model, processor_geometry, set_trainable
from rtcodetr.train_student.checkpoints import ModelEMA, RunDir
from rtcodetr.train_student.config import TrainConfig
from rtcodetr.train_student.distill_data import build_train_loader
from rtcodetr.train_student.engine import (
    Loop,
    NonFiniteLossError,
    Validator,
    end_epoch,
    nonfinite_policy,
    train_one_epoch,
    validate,
)
from rtcodetr.train_student.losses import DistillCriterion, build_weight_dict
from rtcodetr.train_student.optim import build_optimizer
from rtcodetr.train_student.student import StudentWithAdapters
from rtcodetr.train_student.teachers import open_teachers


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train; return ``{"final", "best", "best_map", "best_step", "steps", "metrics", "val_history", "run_dir"}``."""
    if not cfg.data or not cfg.model:
        raise ConfigError("train: both data=DATA_DIR and model=MODEL_DIR are required")
    if cfg.mixed_precision == "fp16" and (cfg.cpu or not torch.cuda.is_available()):
        print("[train] mixed_precision=fp16 needs a CUDA device; training in float32 on the CPU", flush=True)
        cfg = replace(cfg, mixed_precision="no")
    out = Path(cfg.out)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision, cpu=cfg.cpu, log_with=list(cfg.log_with) or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "tensorboard")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.find_unused_parameters)],
    )
    main = accelerator.is_main_process
    log = (lambda msg: print(f"[train] {msg}", flush=True)) if main else (lambda msg: None)
    set_seed(cfg.seed)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")

    # ---- data and the student
    data = PreparedData.load(cfg.data)
    model, processor = load_model(cfg.model)
    data.label_map.check([model.config.id2label[i] for i in range(len(model.config.id2label))], f"model {cfg.model}",
                         fix=f"build the model for this dataset with `rtcodetr init-model --data {data.root}`")
    for line in set_trainable(model, backbone=cfg.freeze.backbone, backbone_batchnorm=cfg.freeze.backbone_batchnorm):
        log(line)
    image_size, normalize = _input_geometry(cfg, processor, log)

    # ---- teachers, data loaders
    teachers = open_teachers(cfg, data, accelerator.device, normalize, log)
    train_loader, sampler, epoch_sets = build_train_loader(
        cfg, data, teachers, image_size, normalize, accelerator.process_index, accelerator.num_processes,
        pin_memory=accelerator.device.type == "cuda", log=log)
    validator = Validator(data, cfg.val_split, processor, accelerator, cfg.eval_batch_size or cfg.batch_size,
                          cfg.draft_size)

    # ---- the trainable module, criterion, optimizer
    net = StudentWithAdapters(model, cfg.loss.feature_source if teachers.use_features else None, teachers.channels,
                              seed=cfg.seed)
    net.train()
    criterion = DistillCriterion(cfg.loss, teachers.use_features, teachers.use_predictions,
                                 teacher_stride=teachers.stride, student_config=model.config)
    weight_dict = build_weight_dict(cfg.loss)
    active = [k for k, w in weight_dict.items() if w != 0 and (k == "detection" or criterion.computes(k))]
    log(f"losses: {', '.join(f'{k} x {weight_dict[k]:g}' for k in active)}")
    optimizer, lines = build_optimizer(net, cfg.optim)
    for line in lines:
        log(line)
    net, optimizer = accelerator.prepare(net, optimizer)
    student = accelerator.unwrap_model(net).student
    ema = ModelEMA(student, cfg.optim.ema_decay, cfg.optim.ema_warmup) if cfg.optim.ema else None

    # ---- resume, pre-flight
    run_dir = RunDir(out, accelerator, processor, cfg.keep_checkpoints)
    state, ckpt = run_dir.restore(cfg.resume, ema)
    if ckpt is not None:
        log(f"resumed from {ckpt}: step {state.step}, epoch {state.epoch}, batch {state.batch_in_epoch}")
    if main:
        accelerator.init_trackers("train", config=_flat(config_to_dict(cfg)))
    for path, cache in teachers.caches():  # a damaged cache stops here with the shards to recompute, not mid-epoch
        cache.check_integrity()
        log(f"cache {path}: all {cache.manifest['storage']['num_shards']} shards finished, their objects present "
            f"and indexes intact for {cache.tensors} (a full read: `rtcodetr cache-teacher verify {path} --full`)")

    # ---- the loop
    steps_per_epoch = sampler.batches_per_process() // cfg.grad_accum_steps
    total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    stop_at = min(total_steps, cfg.stop_after_steps) if cfg.stop_after_steps is not None else total_steps
    log(f"{len(epoch_sets[0])} train images, {len(validator)} val images, {accelerator.num_processes} process(es), "
        f"batch {cfg.batch_size} x accum {cfg.grad_accum_steps}, {steps_per_epoch} steps/epoch, {total_steps} steps")
    loop = Loop(cfg=cfg, accelerator=accelerator, net=net, student=student, criterion=criterion,
                weight_dict=weight_dict, optimizer=optimizer, ema=ema, online=teachers.online, run_dir=run_dir,
                validator=validator, state=state, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                stop_at=stop_at, log=log, policy=nonfinite_policy(cfg.nonfinite, accelerator.mixed_precision),
                bar=tqdm(total=total_steps, initial=state.step, disable=not main, desc="train", dynamic_ncols=True),
                trainable=[p for p in net.parameters() if p.requires_grad] if accelerator.num_processes > 1 else [])
    net.train()
    while state.step < stop_at:
        for dataset in epoch_sets:
            dataset.set_epoch(state.epoch)
        sampler.set_epoch(state.epoch, start_batch=state.batch_in_epoch)
        train_one_epoch(loop, train_loader)
        end_epoch(loop)
    loop.bar.close()

    # ---- the end: a checkpoint to resume from, or the final model and the results
    if state.step < total_steps:
        path = out / "checkpoints" / f"step_{state.step}"
        if not (path / "train_state.json").is_file():
            path = loop.checkpoint()
        log(f"stopped at step {state.step} of {total_steps} (stop_after_steps); resume with resume=auto "
            f"(checkpoint {path})")
        accelerator.end_training()
        return {"run_dir": str(out), "steps": state.step, "interrupted": True, "checkpoint": str(path),
                "final": None, "best": None, "best_map": state.best_map, "best_step": state.best_step}
    if loop.last_eval_step != state.step:
        validate(loop)
    final = run_dir.save_model("final", loop.eval_model)
    best = out / "best"
    result = {
        "run_dir": str(out), "steps": state.step, "epochs": state.epoch, "interrupted": False,
        "final": str(final), "best": str(best) if best.is_dir() else None,
        "best_map": state.best_map, "best_step": state.best_step,
        "metrics": loop.val_history[-1] if loop.val_history else {}, "val_history": loop.val_history,
        "losses": active, "weight_dict": weight_dict, "num_processes": accelerator.num_processes,
        "nonfinite_skipped_steps": state.nonfinite_skipped,
    }
    run_dir.write_results(result)
    log(f"done: best mAP {state.best_map:.4f} at step {state.best_step}; final -> {final}")
    accelerator.end_training()
    return result


def _input_geometry(cfg: TrainConfig, processor: Any, log) -> tuple[Any, tuple | None]:
    """(the training transforms' image size: ``image_size`` or the processor's own geometry, the normalisation).
    An ``image_size`` override is written into the processor, so ``best/`` and ``final/`` are served (and validated)
    at the size they were trained at, not the preset's default."""
    geometry = processor_geometry(processor)
    if not cfg.image_size:
        return {k: v for k, v in geometry.items() if k in ("mode", "size_hw", "shortest_edge", "longest_edge")}, \
            geometry["normalize"]
    processor.size = {"height": int(cfg.image_size[0]), "width": int(cfg.image_size[1])}
    log(f"input size {tuple(cfg.image_size)} (h, w); written into the saved image-processor config")
    return tuple(cfg.image_size), geometry["normalize"]


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flat scalar view of a nested config for TensorBoard's hparams (lists become strings)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    flags, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    parser = argparse.ArgumentParser(
        prog="rtcodetr train",
        description="Train a student (or fine-tune the teacher); key=value words override the config, e.g. "
                    "data=DIR model=DIR cache=CACHE out=RUN max_steps=200 loss.feature_weight=0")
    parser.add_argument("--config", help="YAML config (configs/baseline.yaml, configs/distill.yaml, ...)")
    args = parser.parse_args(flags)
    try:
        result = run(load_config(TrainConfig, args.config, overrides))
    except BAD_INPUT as e:  # a config key, the data, the model, the cache (missing, other dataset, damaged shard)
        return report_bad_input("rtcodetr train", e)
    except NonFiniteLossError as e:  # not bad input: the run diverged; the message has the step, ids and parts
        print(f"rtcodetr train: error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0 if result.get("final") or result.get("interrupted") else 1


if __name__ == "__main__":
    raise SystemExit(main())
