"""AdamW parameter groups and the learning-rate schedule (RT-DETR's recipe: backbone at its own rate, no weight decay
on norms and biases, linear warm-up, then constant or cosine)."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from rtcodetr.train_student.config import OptimConfig
from rtcodetr.train_student.student import StudentWithAdapters


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


def build_optimizer(net: StudentWithAdapters, cfg: OptimConfig) -> tuple[torch.optim.Optimizer, list[str]]:
    """AdamW over ``param_groups`` (each remembers its peak ``initial_lr`` for ``lr_factor``) and log lines."""
    groups = param_groups(net, cfg)
    lines = [f"param group {g['name']}: {sum(p.numel() for p in g['params']) / 1e6:.3f}M params, lr {g['lr']:g}, "
             f"weight decay {g['weight_decay']:g}" for g in groups]
    lines.append(f"frozen parameters: {sum(p.numel() for p in net.parameters() if not p.requires_grad) / 1e6:.3f}M")
    for g in groups:
        g["initial_lr"] = g["lr"]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas)), lines
