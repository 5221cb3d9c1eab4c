"""Images joined with their teacher-cache rows, and the collate function that forms the model's inputs.

Workers do only cheap work: decode + augment the image (the data stage's transforms, which record the per-sample
``affine``), read the cache row, and move the teacher's *boxes* through that affine exactly like the GT boxes (a few
numpy ops on ``[T, 4]``). Teacher *feature maps* leave the workers as cached (``[C, Hf, Wf]``) and are warped onto
the student's grid on the device (``resample.resample_teacher_features``).

Box formats: ``target["boxes"]`` and ``target["teacher_boxes"]`` are absolute float32 xyxy in the current image frame;
the cache holds normalized cxcywh in the original frame; the model's labels get normalized cxcywh of the current
(unpadded) image, converted in ``collate`` (the one boundary).
"""
from __future__ import annotations

import random
import zlib
from typing import Any, Sequence

import numpy as np
import torch
from scipy.special import expit

from rtcodetr.config import ConfigError
from rtcodetr.data.boxes import affine_boxes, clip_boxes, cxcywh_normalized_to_xyxy, xyxy_to_cxcywh_normalized
from rtcodetr.data.dataset import CocoDetection
from rtcodetr.data.transforms import build_transforms, hflip_affine
from rtcodetr.train_student.sampling import EpochBatchSampler, MixedBatchSampler

FEATURE_TENSORS = ("backbone", "encoder")


def teacher_boxes_to_current(
    boxes_cxcywh: np.ndarray, orig_hw: Sequence[int], affine: np.ndarray, current_hw: Sequence[int], min_size: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Move cached teacher boxes into the sample's current frame, like the GT boxes.

    boxes_cxcywh: float ``[T, 4]`` normalized cxcywh of the original image ``orig_hw = (h, w)``; affine: ``[3, 3]``
    original -> current pixels. Returns (float32 ``[T', 4]`` absolute xyxy clipped to ``current_hw``, bool ``[T]``
    keep mask): a box is dropped when less than ``min_size`` pixels of width or height remain inside the image
    (e.g. cropped away), so callers must index the teacher's probabilities with the same mask.
    """
    xyxy = cxcywh_normalized_to_xyxy(np.asarray(boxes_cxcywh, dtype=np.float64), orig_hw)
    moved = clip_boxes(affine_boxes(xyxy, np.asarray(affine, dtype=np.float64)), current_hw)
    keep = ((moved[:, 2] - moved[:, 0]) >= min_size) & ((moved[:, 3] - moved[:, 1]) >= min_size)
    return moved[keep].astype(np.float32), keep


def select_teacher_predictions(logits: np.ndarray, boxes: np.ndarray, topk: int
                               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The teacher's ``topk`` most confident predictions of one image, most confident first.

    logits float ``[Q, K]`` (pre-sigmoid), boxes ``[Q, 4]`` -> (probs float32 ``[T, K]`` (sigmoid), weight float32
    ``[T]`` (max class probability), boxes ``[T, 4]`` as given), T = min(topk, Q).
    """
    probs = expit(np.asarray(logits, dtype=np.float32))  # scipy's: no overflow warning for very negative logits
    weight = probs.max(-1)
    top = np.argsort(-weight, kind="stable")[:min(topk, len(weight))]
    return probs[top].astype(np.float32), weight[top].astype(np.float32), np.asarray(boxes)[top]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed for one sample's augmentation, independent of worker count, order and resumption."""
    return zlib.crc32(f"{seed}/{epoch}/{index}".encode()) & 0x7FFFFFFF


class DistillDataset(torch.utils.data.Dataset):
    """``CocoDetection`` + optional ``TeacherCache`` rows matched by image id.

    Each item is ``(image float32 [3, H, W], target)`` with the data stage's target keys plus, when asked:
    - ``teacher_probs`` float32 ``[T, K]``, ``teacher_boxes`` float32 ``[T, 4]`` (abs xyxy, current frame),
      ``teacher_weight`` float32 ``[T]`` (max probability): the teacher's top-``topk`` predictions that survive the
      augmentation;
    - ``teacher_<name>`` float32 ``[C, Hf, Wf]`` for each feature tensor, with ``teacher_valid`` int64 ``[2]`` and
      ``teacher_input_hw`` int64 ``[2]``; with a ``mirror_cache`` (the teacher on mirrored images) a flipped view
      takes its maps from it, and every sample gets ``teacher_affine`` float64 ``[3, 3]``: the map's frame -> current.
    Augmentation randomness is seeded per ``(seed, epoch, index)`` so a resumed run sees the same views.
    """

    def __init__(self, base, cache=None, *, predictions: bool = False, features: Sequence[str] = (), topk: int = 100,
                 seed: int = 0, mirror_cache=None):
        self.base = base
        self.cache = cache
        self.mirror_cache = mirror_cache if features else None
        self.predictions = predictions
        self.features = tuple(features)
        self.topk = topk
        self.seed = seed
        self.epoch = 0
        if cache is None and (predictions or self.features):
            raise ValueError("distillation targets were requested but no teacher cache was given (set cache=...)")
        self._rows: np.ndarray | None = None
        if cache is not None:
            # the reader checked the cache against this split (image ids and their order) when it was opened; this
            # only maps ids to rows, and names the first id a cache opened without that check lacks
            try:
                self._rows = np.asarray([cache.index_of(int(i)) for i in base.image_ids], dtype=np.int64)
            except KeyError as e:
                raise ValueError(f"{e.args[0]} (split '{getattr(base, 'split', '?')}'); rebuild the cache for this "
                                 "dataset") from None

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def _augment(self, i: int):
        # Seed python / numpy / torch for this sample only, then restore, so that the main process's RNG (denoising
        # noise, dropout) is untouched when num_workers=0.
        s = sample_seed(self.seed, self.epoch, i)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(s)
            np.random.seed(s)
            torch.manual_seed(s)
            try:
                return self.base[i]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image, target = self._augment(i)
        if not getattr(self.base, "labelled", True):
            target = {**target, "labelled": False}  # images without annotations: no detection loss
        if self.cache is None or not (self.predictions or self.features):
            return image, target
        r = int(self._rows[i])
        affine = np.asarray(target["affine"], dtype=np.float64)
        # a flipped view takes its maps from the mirror cache (the teacher on the mirrored image): read them there only
        mirrored = self.mirror_cache is not None and np.linalg.det(affine[:2, :2]) < 0
        own = (["logits", "boxes"] if self.predictions else []) + ([] if mirrored else list(self.features))
        row = self.cache.read(r, own)  # the reader checks the row's stored image id against its manifest
        target = dict(target)
        if self.predictions:
            probs, weight, boxes = select_teacher_predictions(row["logits"], row["boxes"], self.topk)
            boxes, keep = teacher_boxes_to_current(boxes, _hw(target["orig_size"]), affine, _hw(target["size"]))
            target["teacher_boxes"] = torch.from_numpy(boxes)
            target["teacher_probs"] = torch.from_numpy(probs[keep])
            target["teacher_weight"] = torch.from_numpy(weight[keep])
        if mirrored:
            row = self.mirror_cache.read(r, list(self.features))
            # the map's frame is the mirrored original: mirrored original -> original -> current
            target["teacher_affine"] = torch.from_numpy(affine) @ hflip_affine(_hw(target["orig_size"])[1])
        elif self.mirror_cache is not None:
            target["teacher_affine"] = torch.from_numpy(affine)
        for name in self.features:
            target[f"teacher_{name}"] = torch.from_numpy(np.ascontiguousarray(row[name], dtype=np.float32))
        if self.features:
            target["teacher_valid"] = torch.as_tensor(np.asarray(row["valid"]), dtype=torch.int64)
            target["teacher_input_hw"] = torch.as_tensor(np.asarray(row["input_hw"]), dtype=torch.int64)
        return image, target


def _hw(x) -> tuple[int, int]:
    x = np.asarray(x.tolist() if torch.is_tensor(x) else x)
    return int(x[0]), int(x[1])


def pad_stack(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``[C, H_i, W_i]`` tensors into ``[B, C, H, W]`` zero-padded bottom/right, with a ``[B, H, W]`` int64 mask
    (1 = real pixel)."""
    c = tensors[0].shape[0]
    h = max(t.shape[1] for t in tensors)
    w = max(t.shape[2] for t in tensors)
    out = tensors[0].new_zeros(len(tensors), c, h, w)
    mask = torch.zeros(len(tensors), h, w, dtype=torch.int64)
    for i, t in enumerate(tensors):
        out[i, :, : t.shape[1], : t.shape[2]] = t
        mask[i, : t.shape[1], : t.shape[2]] = 1
    return out, mask


def collate(batch: Sequence[tuple[torch.Tensor, dict]]) -> dict[str, Any]:
    """Batch for the loop: ``pixel_values`` float32 ``[B, 3, H, W]``, ``pixel_mask`` int64 ``[B, H, W]``, ``labels``
    (HF format: ``class_labels`` int64 ``[N]``, ``boxes`` float32 ``[N, 4]`` normalized cxcywh of the unpadded current
    image), ``targets`` (the per-sample dicts, xyxy; with teacher predictions also ``teacher_boxes_cxcywh`` float32
    ``[T, 4]`` normalized cxcywh of the unpadded current image), and stacked teacher tensors when present."""
    images = [b[0] for b in batch]
    targets = [b[1] for b in batch]
    pixel_values, pixel_mask = pad_stack(images)
    labels = [
        {"class_labels": t["labels"].long(), "boxes": xyxy_to_cxcywh_normalized(t["boxes"].float(), _hw(t["size"])).float()}
        for t in targets
    ]
    # The teacher boxes cross the same model boundary as the labels, here in the workers rather than per sample in
    # the training step (a later multi-scale resize leaves normalized boxes unchanged).
    for t in targets:
        if "teacher_boxes" in t:
            t["teacher_boxes_cxcywh"] = xyxy_to_cxcywh_normalized(t["teacher_boxes"].float(), _hw(t["size"])).float()
    _fill_missing_teacher_targets(targets)
    out: dict[str, Any] = {"pixel_values": pixel_values, "pixel_mask": pixel_mask, "labels": labels, "targets": targets}
    for name in FEATURE_TENSORS:
        key = f"teacher_{name}"
        if key in targets[0]:
            out[key] = pad_stack([t[key] for t in targets])[0]
    for key in ("affine",):
        out[key] = torch.stack([torch.as_tensor(np.asarray(t[key]), dtype=torch.float64) for t in targets])
    if any("teacher_affine" in t for t in targets):  # a mirror cache: each map's own frame (else the sample's)
        out["teacher_affine"] = torch.stack([torch.as_tensor(np.asarray(t.get("teacher_affine", t["affine"])),
                                                             dtype=torch.float64) for t in targets])
    for key in ("orig_size", "size", "teacher_valid", "teacher_input_hw"):
        if key in targets[0]:
            out[key] = torch.stack([torch.as_tensor(np.asarray(t[key]), dtype=torch.int64) for t in targets])
    out["image_ids"] = [int(t["image_id"]) for t in targets]
    out["labelled"] = [bool(t.get("labelled", True)) for t in targets]
    return out


def _fill_missing_teacher_targets(targets: list[dict[str, Any]]) -> None:
    """Give every sample the teacher keys that some sample of the batch has (labelled images without a cache beside
    unlabelled ones with theirs): an empty prediction set, and a zero map with no valid cell (masked out)."""
    for key in [k for k in ("teacher_probs", *(f"teacher_{n}" for n in FEATURE_TENSORS))
                if any(k in t for t in targets)]:
        ref = next(t for t in targets if key in t)
        for t in targets:
            if key in t:
                continue
            if key == "teacher_probs":
                k = ref["teacher_probs"].shape[1]
                t.update(teacher_probs=torch.zeros(0, k), teacher_weight=torch.zeros(0),
                         teacher_boxes=torch.zeros(0, 4), teacher_boxes_cxcywh=torch.zeros(0, 4))
            else:
                t[key] = torch.zeros_like(ref[key])
                t["teacher_valid"] = torch.zeros(2, dtype=torch.int64)
                t["teacher_input_hw"] = torch.as_tensor(ref["teacher_input_hw"], dtype=torch.int64)


def build_train_loader(cfg: Any, data: Any, teachers: Any, image_size: Any, normalize: tuple | None,
                       rank: int, world: int, pin_memory: bool,
                       log: Any = print) -> tuple[torch.utils.data.DataLoader, Any, list[DistillDataset]]:
    """The training loader: the train split (with its cache rows, when distilling from a cache) and, with
    ``cfg.unlabeled_split``, mixed batches with the unlabelled split. Returns (loader, its batch sampler, the datasets
    whose augmentation follows the epoch: ``set_epoch`` each of them and the sampler at every epoch)."""
    lcfg = cfg.loss

    def distill_set(split: str, split_cache: Any, stream: int, mirror_cache: Any = None) -> DistillDataset:
        base = CocoDetection(data, split, build_transforms(True, image_size, cfg.aug, normalize),
                             draft_size=cfg.draft_size)
        return DistillDataset(base, split_cache, predictions=teachers.use_predictions and split_cache is not None,
                              features=(lcfg.teacher_feature,) if teachers.use_features and split_cache is not None
                              else (), topk=lcfg.topk, seed=cfg.seed + stream * 1_000_003,
                              mirror_cache=mirror_cache)

    train_set = distill_set(cfg.train_split, teachers.cache, 0, teachers.mirror_cache)
    epoch_sets = [train_set]
    if cfg.unlabeled_split:
        unl_set = distill_set(cfg.unlabeled_split, teachers.unlabeled_cache, 1)
        epoch_sets.append(unl_set)
        n_unl = int(round(cfg.batch_size * cfg.unlabeled_ratio))
        if not 1 <= n_unl <= cfg.batch_size - 1:
            raise ConfigError(f"unlabeled_ratio={cfg.unlabeled_ratio} with batch_size={cfg.batch_size} gives "
                              f"{n_unl} unlabelled images per batch; it must leave at least one of each kind")
        sampler = MixedBatchSampler(len(train_set), len(unl_set), cfg.batch_size - n_unl, n_unl, cfg.seed, rank,
                                    world)
        dataset: torch.utils.data.Dataset = torch.utils.data.ConcatDataset([train_set, unl_set])
        log(f"{len(unl_set)} unlabelled images ('{cfg.unlabeled_split}'): {n_unl} of each batch of "
            f"{cfg.batch_size}, distillation losses only")
    else:
        sampler = EpochBatchSampler(len(train_set), cfg.batch_size, cfg.seed, rank, world)
        dataset = train_set
    if sampler.batches_per_process() < cfg.grad_accum_steps:
        raise ConfigError(f"train split '{cfg.train_split}' has {len(train_set)} images: too few for batch_size="
                          f"{cfg.batch_size} x grad_accum_steps={cfg.grad_accum_steps} x {world} processes")
    # Own generator: a DataLoader without one draws its worker base seed from the global RNG at every epoch, which
    # would shift the model's denoising noise between an uninterrupted and a resumed run.
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers,
                                         collate_fn=collate, pin_memory=pin_memory,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    return loader, sampler, epoch_sets
