"""What a run leaves on disk and how it comes back: the loop's state, the EMA weights, atomic checkpoints, the
metrics log, the ``best/`` / ``final/`` models and ``results.json``.

Run directory: ``config.yaml`` (resolved), ``metrics.jsonl`` (one JSON object per logged step / evaluation),
``tensorboard/``, ``checkpoints/step_N/`` (``accelerator.save_state`` + ``train_state.json`` + ``ema.safetensors``),
``best/`` and ``final/`` (the student alone: ``save_pretrained`` + image-processor config), ``results.json``.
"""
from __future__ import annotations

import copy
import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from rtcodetr.config import ConfigError


class ModelEMA:
    """Exponential moving average of the student's weights (RT-DETR ``ModelEMA``): ``decay_t = decay (1 - e^{-t/w})``.

    Floating-point parameters and buffers are averaged; integer buffers are copied. Saved as safetensors.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: int):
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
        state = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            self.updates = int(f.metadata()["updates"])
        missing = self.module.load_state_dict(state, strict=False).missing_keys
        own = self.module.state_dict()
        for k in missing:  # shared tensors stored once: nothing to do unless truly absent
            if not any(own[k].data_ptr() == own[j].data_ptr() for j in state):
                raise RuntimeError(f"EMA checkpoint {path} lacks tensor '{k}'")


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


def json_safe(x: Any) -> Any:
    """NaN/inf (e.g. the AP of an absent size class) -> None, so the JSON files stay strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


class RunDir:
    """One run's directory, written by the main process only (every other process waits at the same barriers).

    ``model()`` is what gets saved as ``best/`` / ``final/``: the EMA weights when there is an EMA, else the
    student itself, with the image processor that serves it.
    """

    def __init__(self, out: Path, accelerator: Any, processor: Any, keep_checkpoints: int):
        self.out, self.accelerator, self.processor = Path(out), accelerator, processor
        self.keep_checkpoints = max(keep_checkpoints, 1)
        self.main = accelerator.is_main_process
        self.metrics_file = self.out / "metrics.jsonl"

    def write_metrics(self, record: dict[str, Any]) -> None:
        if self.main:
            with open(self.metrics_file, "a") as f:
                f.write(json.dumps(json_safe(record)) + "\n")

    def restore(self, resume: str | None, ema: ModelEMA | None) -> tuple[TrainState, Path | None]:
        """Load the checkpoint ``resume`` names (``auto``: the newest complete one) into the prepared objects and
        ``ema``; drop metrics rows a crash after it had logged (those steps are redone, each must appear once)."""
        ckpt = find_checkpoint(self.out, resume)
        if ckpt is None:
            return TrainState(), None
        self.accelerator.load_state(str(ckpt))
        state = TrainState(**json.loads((ckpt / "train_state.json").read_text()))
        if ema is not None and (ckpt / "ema.safetensors").is_file():
            ema.load(ckpt / "ema.safetensors")
        if self.main and self.metrics_file.is_file():
            kept = [line for line in self.metrics_file.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= state.step]
            self.metrics_file.write_text("".join(line + "\n" for line in kept))
        return state, ckpt

    def checkpoint(self, state: TrainState, ema: ModelEMA | None) -> Path:
        """``checkpoints/step_N``, written under a temporary name and renamed once every process wrote its part;
        only the newest ``keep_checkpoints`` are kept."""
        acc = self.accelerator
        path = self.out / "checkpoints" / f"step_{state.step}"
        tmp = path.with_name(f".{path.name}.partial")
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        if self.main:
            if ema is not None:
                ema.save(tmp / "ema.safetensors")
            (tmp / "train_state.json").write_text(json.dumps(asdict(state)))
        acc.wait_for_everyone()
        if self.main:
            publish_checkpoint(tmp, path)
            for stale in (self.out / "checkpoints").glob(".step_*.partial"):  # left by runs killed while saving
                shutil.rmtree(stale, ignore_errors=True)
            ckpts = sorted((self.out / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
            for old in ckpts[:-self.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return path

    def save_model(self, name: str, model: nn.Module) -> Path:
        """``save_pretrained`` of ``model`` + the image processor as ``name/`` (written aside, then renamed)."""
        target = self.out / name
        if self.main:
            tmp = self.out / f".{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp)
            self.processor.save_pretrained(tmp)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
        self.accelerator.wait_for_everyone()
        return target

    def write_results(self, result: dict[str, Any]) -> None:
        if self.main:
            (self.out / "results.json").write_text(json.dumps(json_safe(result), indent=2))
