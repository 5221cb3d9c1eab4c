"""Cached vs online teacher feature targets for the same augmented batch: where the cache is exact and where not.

Builds one training batch with the trainer's own dataset (cache rows resampled into each view's frame) and gives the
same batch to the online teacher (the teacher run on the view itself), then prints the per-sample cosine between the
two stride-32 targets on the student's grid, split by whether the view is mirrored.

    .venv/bin/python benchmarks/bench_cache_vs_online.py --data runs/demo/data --cache runs/demo/cache/train.zarr \
        --teacher runs/demo/teacher/best [--mirror-cache runs/demo/cache/train_mirror.zarr]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F


def main() -> None:
    from rtcodetr.cache_teacher import TeacherCache
    from rtcodetr.data.dataset import CocoDetection
    from rtcodetr.data.prepared import PreparedData
    from rtcodetr.data.transforms import AugmentConfig, build_transforms
    from rtcodetr.train_student.distill_data import DistillDataset, collate
    from rtcodetr.train_student.losses import mirrored_views
    from rtcodetr.train_student.online_teacher import OnlineTeacher
    from rtcodetr.train_student.resample import resample_teacher_features

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--mirror-cache", default=None, help="the same split cached with geometry.hflip=true")
    ap.add_argument("--feature", default="encoder", choices=["encoder", "backbone"])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--images", type=int, default=16)
    args = ap.parse_args()
    data = PreparedData.load(args.data)
    cache = TeacherCache(args.cache, data=data, split="train", tensors=[args.feature])
    mirror = TeacherCache(args.mirror_cache, data=data, split="train", tensors=[args.feature]) \
        if args.mirror_cache else None
    online = OnlineTeacher(args.teacher, torch.device("cpu"), features=(args.feature,))
    grid = (args.size // 32, args.size // 32)
    for name, train in (("no augmentation", False), ("flip p=0.5", True)):
        torch.manual_seed(0)
        aug = AugmentConfig(stop_epoch=None, photometric_p=0.0, zoom_out_p=0.0, iou_crop_p=0.0, flip_p=0.5)
        base = CocoDetection(data, "train", build_transforms(train, (args.size, args.size), aug))
        ds = DistillDataset(base, cache, predictions=False, features=(args.feature,), topk=100, mirror_cache=mirror)
        batch = collate([ds[i] for i in range(min(args.images, len(ds)))])
        key = f"teacher_{args.feature}"
        cached, _ = resample_teacher_features(batch[key], batch.get("teacher_affine", batch["affine"]), batch["orig_size"],
                                              batch["teacher_input_hw"], batch["teacher_valid"], batch["size"], grid)
        live = dict(batch)
        online(live)
        fresh, _ = resample_teacher_features(live[key], live["teacher_affine"], live["teacher_orig_size"],
                                             live["teacher_input_hw"], live["teacher_valid"], batch["size"], grid)
        cos = F.cosine_similarity(cached.flatten(1), fresh.flatten(1))
        mirrored = mirrored_views(batch["affine"])
        for label, sel in (("views as cached", ~mirrored), ("mirrored views", mirrored)):
            if sel.any():
                c = cos[sel]
                print(f"{name:16s} {label:16s} n={int(sel.sum()):2d}  cosine min {float(c.min()):.3f} "
                      f"mean {float(c.mean()):.3f} max {float(c.max()):.3f}")


if __name__ == "__main__":
    main()
