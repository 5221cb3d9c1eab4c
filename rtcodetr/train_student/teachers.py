"""Where a run's distillation targets come from: the labelled split's cache, the unlabelled split's cache, or the
teacher run online (the reference arm), and the few facts the student side needs about them (which losses can run,
the teacher map's channels and stride). Every refusal about teachers is made here, once."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from rtcodetr.cache_teacher import TeacherCache
from rtcodetr.config import ConfigError
from rtcodetr.features import STRIDE
from rtcodetr.train_student.config import TrainConfig
from rtcodetr.train_student.online_teacher import OnlineTeacher


@dataclass
class TeacherSources:
    """What the run distils from. ``channels``/``stride`` describe the teacher feature map (``None``/32 without)."""

    use_features: bool
    use_predictions: bool
    cache: TeacherCache | None = None  # the labelled split's
    unlabeled_cache: TeacherCache | None = None
    mirror_cache: TeacherCache | None = None  # the labelled split's, teacher on mirrored images (feature targets)
    online: OnlineTeacher | None = None
    channels: int | None = None
    stride: float = STRIDE

    def caches(self) -> list[tuple[str, TeacherCache]]:
        """(name, cache) of every cache this run reads, for the pre-flight integrity check."""
        return [(str(c.path), c) for c in (self.cache, self.unlabeled_cache, self.mirror_cache) if c is not None]


def _refuse_predictions(what: str, diff: str) -> ConfigError:
    return ConfigError(f"{what}: its teacher label map differs from the student's ({diff}); the prediction loss would "
                       "compare unrelated classes and is refused. Fine-tune the teacher on this dataset first, or set "
                       "loss.prediction_weight=0 (feature distillation is still allowed)")


def _check_unlabeled(cfg: TrainConfig, data: Any, distills: bool) -> None:
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


def _open_cache(path: str, data: Any, split: str, cfg: TrainConfig, sources: TeacherSources) -> TeacherCache:
    """The teacher cache of ``split``, reading only the tensors the active losses need."""
    lcfg = cfg.loss
    tensors = (["logits", "boxes"] if sources.use_predictions else []) + \
        ([lcfg.teacher_feature] if sources.use_features else [])
    cache = TeacherCache(path, data=data, split=split, tensors=tensors)
    diff = data.label_map.differences(cache.teacher_label_names)
    if sources.use_predictions and diff is not None:
        raise _refuse_predictions(f"cache {path}", diff)
    return cache


def open_teachers(cfg: TrainConfig, data: Any, device: torch.device, student_normalize: tuple | None,
                  log: Callable[[str], None]) -> TeacherSources:
    """Open what ``cfg`` distils from (nothing for the baseline and the teacher fine-tune)."""
    lcfg = cfg.loss
    if cfg.cache and cfg.teacher:
        raise ConfigError("train: give either cache=CACHE (the cached teacher) or teacher=MODEL_DIR (the online "
                          "reference arm), not both")
    if cfg.mirror_cache and not cfg.cache:
        raise ConfigError("mirror_cache= serves the flipped views of the labelled split: it needs cache= too")
    source = cfg.cache or cfg.unlabeled_cache or cfg.teacher
    sources = TeacherSources(use_features=bool(source) and lcfg.feature_weight > 0,
                             use_predictions=bool(source) and lcfg.prediction_weight > 0)
    distills = sources.use_features or sources.use_predictions
    if not source and (lcfg.prediction_weight > 0 or lcfg.feature_weight > 0):
        log("no teacher cache given: distillation losses are off (plain training on ground truth)")
    elif source and not distills:
        log(f"teacher {source} is not used: loss.prediction_weight and loss.feature_weight are 0")
    if cfg.unlabeled_split:
        _check_unlabeled(cfg, data, distills)
    if not distills:
        return sources
    if cfg.teacher:
        sources.online = OnlineTeacher(
            cfg.teacher, device, features=(lcfg.teacher_feature,) if sources.use_features else (),
            predictions=sources.use_predictions, topk=lcfg.topk, student_normalize=student_normalize,
            mixed_precision=cfg.mixed_precision)
        diff = data.label_map.differences(sources.online.label_names)
        if sources.use_predictions and diff is not None:
            raise _refuse_predictions(f"teacher {cfg.teacher}", diff)
        if sources.use_features:
            sources.channels = sources.online.channels(lcfg.teacher_feature)
        log(f"online teacher {cfg.teacher} ({sources.online.teacher.family}) runs on every batch (reference arm)")
        return sources
    if cfg.cache:
        sources.cache = _open_cache(cfg.cache, data, cfg.train_split, cfg, sources)
        if sources.cache.mirrored:
            raise ConfigError(f"cache {cfg.cache} holds the teacher on mirrored images (geometry.hflip): pass it as "
                              "mirror_cache=, beside the plain cache=")
    if cfg.mirror_cache and sources.use_features:
        mirror = TeacherCache(cfg.mirror_cache, data=data, split=cfg.train_split, tensors=[lcfg.teacher_feature])
        if not mirror.mirrored:
            raise ConfigError(f"mirror_cache {cfg.mirror_cache} was not made on mirrored images: cache the split "
                              "again with geometry.hflip=true")
        plain = {k: v for k, v in sources.cache.manifest.get("geometry", {}).items() if k not in ("hflip", "source")}
        other = {k: v for k, v in mirror.manifest.get("geometry", {}).items() if k not in ("hflip", "source")}
        if plain != other or mirror.channels(lcfg.teacher_feature) != sources.cache.channels(lcfg.teacher_feature):
            raise ConfigError(f"mirror_cache {cfg.mirror_cache} and cache {cfg.cache} differ in geometry or "
                              "feature channels: make both with the same teacher and settings")
        sources.mirror_cache = mirror
        log(f"flipped views take their feature targets from {cfg.mirror_cache}")
    if cfg.unlabeled_split and cfg.unlabeled_cache:
        sources.unlabeled_cache = _open_cache(cfg.unlabeled_cache, data, cfg.unlabeled_split, cfg, sources)
    first = sources.cache or sources.unlabeled_cache
    if sources.use_features:
        sources.channels = first.channels(lcfg.teacher_feature)
    sources.stride = first.stride
    return sources
