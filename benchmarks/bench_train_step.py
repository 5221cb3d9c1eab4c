"""What does distillation from the cache cost per training step? Prints figures; not a test.

Same student, same batch, three step kinds (forward + losses + backward + clipped AdamW step):
- ``baseline``: ground-truth detection loss only;
- ``cached``: + feature and prediction distillation with the teacher targets read from the cache (feature maps
  resampled on the device, Hungarian matching on every decoder layer) — what ``rtcodetr train`` runs;
- ``online``: the same losses with the teacher run inside the step (no_grad forward of the teacher on the batch).
Each kind runs in its own subprocess so that its peak memory is its own (CUDA: ``max_memory_allocated``; CPU: peak
RSS of the process). Then the loader: images + cache rows vs images alone, same workers.

``--precision fp16|bf16`` runs forward + losses under ``torch.autocast`` (fp16 with a ``GradScaler``), as the trainer
does under Accelerate's mixed precision. ``--teacher-geometry own`` feeds the online teacher the student's augmented
view resized to the teacher's own input geometry (Conditional DETR: shortest edge 800 / longest 1333, padded, ImageNet
normalisation) instead of the student's batch as it is. ``step_bench`` is importable: ``benchmarks/gpu_check.py``
runs it in-process for the full-size presets on a GPU.

    .venv/bin/python benchmarks/bench_train_step.py [--student rtdetr-tiny] [--teacher rtdetr-small]
        [--size 256] [--batch 4] [--steps 10] [--workers 2] [--device cpu] [--threads 1]
        [--precision no|fp16|bf16] [--teacher-geometry student|own]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402


def prepare(work: Path, args) -> dict[str, str]:
    """Synthetic set, student and teacher model dirs, and the teacher's cache (built once per work dir)."""
    from rtcodetr.cache_teacher import CacheConfig, run as cache_run
    from rtcodetr.data.synthetic import make_synthetic
    from rtcodetr.models import init_model

    paths = {"data": work / "data", "student": work / "student", "teacher": work / "teacher", "cache": work / "cache"}
    if not (paths["data"] / "dataset.json").is_file():
        make_synthetic(paths["data"], train=64, val=8, test=8, size=args.size, seed=0)
    if not (paths["student"] / "config.json").is_file():
        init_model(args.student, paths["data"], paths["student"])
    if not (paths["teacher"] / "config.json").is_file():
        init_model(args.teacher, paths["data"], paths["teacher"])
    if not (paths["cache"] / "zarr.json").exists():
        cache_run(CacheConfig(data=str(paths["data"]), teacher=str(paths["teacher"]), out=str(paths["cache"]),
                              num_workers=0, batch_size=8, progress=False, dtype="bfloat16"))
    return {k: str(v) for k, v in paths.items()}


def _loss_cfg(distill: bool):
    from rtcodetr.train_student.config import LossConfig

    return LossConfig(feature_weight=1.0 if distill else 0.0, prediction_weight=1.0 if distill else 0.0,
                      feature_loss="pkd", feature_source="encoder", teacher_feature="backbone")


PRECISIONS = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def online_teacher_inputs(pixel_values: torch.Tensor, size_hw: torch.Tensor, affine: torch.Tensor,
                          geometry: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The online teacher's own input for the student's augmented batch.

    pixel_values: float ``[B, 3, H, W]`` in ``[0, 1]`` (the student's view, batch-padded); size_hw: int ``[B, 2]``
    unpadded (h, w) of each view; affine: float64 ``[B, 3, 3]`` original -> view pixels; geometry: the teacher's
    ``rtcodetr.models.processor_geometry``. Each view is resized to the size the teacher's processor gives the image
    region it shows (that region is ``size / |diag(affine)|`` original pixels: the crop before the student's resize),
    normalised as the teacher wants, and padded bottom/right to the batch's largest such size (multiple of 32).
    Returns ``(pixels [B, 3, Ht, Wt], pixel_mask int64 [B, Ht, Wt], input_hw int64 [B, 2])``.
    """
    from rtcodetr.cache_teacher.geometry import resize_hw

    b = pixel_values.shape[0]
    region_h = size_hw[:, 0].double() / affine[:, 1, 1].abs()
    region_w = size_hw[:, 1].double() / affine[:, 0, 0].abs()
    sizes = [resize_hw(geometry, round(float(h)), round(float(w))) for h, w in zip(region_h, region_w)]
    hp = -(-max(s[0] for s in sizes) // 32) * 32
    wp = -(-max(s[1] for s in sizes) // 32) * 32
    pixels = pixel_values.new_zeros((b, 3, hp, wp))
    mask = torch.zeros((b, hp, wp), dtype=torch.int64, device=pixel_values.device)
    norm = geometry.get("normalize")
    mean = std = None
    if norm is not None:
        mean = torch.tensor(norm[0], device=pixel_values.device).view(3, 1, 1)
        std = torch.tensor(norm[1], device=pixel_values.device).view(3, 1, 1)
    for i, (h, w) in enumerate(sizes):
        view = pixel_values[i:i + 1, :, :int(size_hw[i, 0]), :int(size_hw[i, 1])]
        img = torch.nn.functional.interpolate(view, size=(h, w), mode="bilinear", align_corners=False)[0]
        pixels[i, :, :h, :w] = (img - mean) / std if mean is not None else img
        mask[i, :h, :w] = 1
    return pixels, mask, torch.tensor(sizes, dtype=torch.int64, device=pixel_values.device)


def step_bench(mode: str, paths: dict[str, str], *, size: int, batch: int, steps: int, warmup: int,
               device: str | torch.device, precision: str = "no", teacher_geometry: str = "student",
               draft_size: int | None = None) -> dict:
    """Time ``steps`` training steps of one kind on one fixed batch (after ``warmup`` untimed steps).

    ``mode``: ``baseline`` | ``cached`` | ``online``; ``paths``: ``data`` (prepared dir), ``student`` / ``teacher``
    (model dirs), ``cache`` (the teacher's cache of the train split); ``size``: student input side; ``precision``:
    ``no`` | ``fp16`` | ``bf16`` (autocast, fp16 with loss scaling); ``teacher_geometry``: ``student`` (the online
    teacher takes the student's batch) or ``own`` (see ``online_teacher_inputs``).

    Returns ``{"mode", "precision", "median_s", "mean_s", "peak_mb", "start_mb", "peak_kind"}``. On CUDA the peak is
    ``max_memory_allocated`` from the start of this call (weights, optimizer state, teacher and activations) and
    ``start_mb`` what was allocated before (left over by earlier calls in the same process); on CPU it is the
    process's peak RSS. Objects are released before returning so several calls can share a process.
    """
    from rtcodetr.cache_teacher import TeacherCache
    from rtcodetr.data.dataset import CocoDetection
    from rtcodetr.data.prepared import PreparedData
    from rtcodetr.data.transforms import AugmentConfig, build_transforms
    from rtcodetr.features import FeatureTap
    from rtcodetr.models import load_model, processor_geometry, set_trainable
    from rtcodetr.train_student.distill_data import DistillDataset, collate
    from accelerate.utils import send_to_device
    from rtcodetr.train_student.losses import DistillCriterion, build_weight_dict
    from rtcodetr.train_student.config import OptimConfig
    from rtcodetr.train_student.student import StudentWithAdapters
    from rtcodetr.train_student.optim import param_groups

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got '{precision}'")
    torch.manual_seed(0)
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    if on_cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start_mb = torch.cuda.memory_allocated(device) / 2**20 if on_cuda else 0.0
    data = PreparedData.load(paths["data"])
    distill = mode != "baseline"
    cache = TeacherCache(paths["cache"], data=data, split="train", tensors=["logits", "boxes", "backbone"])
    base = CocoDetection(data, "train", build_transforms(True, (size, size), AugmentConfig(stop_epoch=None)),
                         draft_size=draft_size)
    ds = DistillDataset(base, cache if mode == "cached" else None, predictions=mode == "cached",
                        features=("backbone",) if mode == "cached" else (), topk=100)
    batch_data = send_to_device(collate([ds[i % len(ds)] for i in range(batch)]), device)

    student, _ = load_model(paths["student"])
    set_trainable(student, backbone=True, backbone_batchnorm=True)
    teacher_channels = int(cache.manifest["tensors"]["backbone"]["shape"][0])
    net = StudentWithAdapters(student, "encoder" if distill else None, teacher_channels).to(device).train()
    lcfg = _loss_cfg(distill)
    criterion = DistillCriterion(lcfg, distill, distill, student_config=student.config)
    weights = build_weight_dict(lcfg)
    opt = torch.optim.AdamW(param_groups(net, OptimConfig()), lr=1e-4)
    amp_dtype = PRECISIONS[precision]
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    teacher = teacher_geom = None
    # online_targets() replaces the batch's frame by the view's own; the view's region must come from the original
    view_size, view_affine = batch_data["size"].clone(), batch_data["affine"].clone()
    if mode == "online":
        teacher, processor = load_model(paths["teacher"])
        teacher = teacher.to(device).eval().requires_grad_(False)
        teacher_geom = processor_geometry(processor)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    def online_targets() -> None:
        # The teacher sees the student's (augmented) view itself: its targets are already in the current frame, which
        # plays the part of the "original" image below (identity affine, original size = the view's size).
        b = batch_data["pixel_values"].shape[0]
        if teacher_geometry == "own":
            pixels, mask, input_hw = online_teacher_inputs(batch_data["pixel_values"], view_size, view_affine,
                                                           teacher_geom)
        else:
            pixels, mask = batch_data["pixel_values"], batch_data["pixel_mask"]
            input_hw = torch.tensor(pixels.shape[-2:], device=device).expand(b, 2)
        with torch.no_grad(), autocast(), FeatureTap(teacher, names=("backbone",)) as tap:
            out = teacher(pixel_values=pixels, pixel_mask=mask)
        probs = out.logits.float().sigmoid()
        conf = probs.amax(-1)
        top = conf.topk(min(100, conf.shape[1]), dim=1).indices
        for i, t in enumerate(batch_data["targets"]):
            t["teacher_probs"], t["teacher_weight"] = probs[i, top[i]], conf[i, top[i]]
            t["teacher_boxes_cxcywh"] = out.pred_boxes[i, top[i]].float()
        fmap = tap.features["backbone"]
        hw = torch.tensor(batch_data["pixel_values"].shape[-2:], device=device)
        batch_data["teacher_backbone"] = fmap
        batch_data["affine"] = torch.eye(3, dtype=torch.float64, device=device).expand(b, 3, 3)
        batch_data["orig_size"] = batch_data["size"] = hw.expand(b, 2)
        batch_data["teacher_input_hw"] = input_hw
        batch_data["teacher_valid"] = torch.div(input_hw + 31, 32, rounding_mode="floor")

    def one_step() -> None:
        if teacher is not None:
            online_targets()
        with autocast():
            outputs, fmap = net(batch_data["pixel_values"], batch_data["pixel_mask"], labels=batch_data["labels"])
            losses = criterion(outputs, fmap, batch_data)
        loss = sum(losses[k] * weights[k] for k in losses)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 0.1)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if on_cuda:
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        one_step()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        one_step()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if on_cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    result = {"mode": mode, "precision": precision, "median_s": times[len(times) // 2],
              "mean_s": sum(times) / len(times), "peak_mb": peak, "start_mb": start_mb,
              "peak_kind": "cuda max_memory_allocated" if on_cuda else "process peak RSS"}
    del net, opt, teacher, student, batch_data, criterion, scaler
    gc.collect()
    if on_cuda:
        torch.cuda.empty_cache()
    return result


def loader_bench(paths: dict[str, str], args) -> dict:
    """Images/s through the DataLoader (same workers, same transforms): images alone vs images + cache rows."""
    from rtcodetr.cache_teacher import TeacherCache
    from rtcodetr.data.dataset import CocoDetection
    from rtcodetr.data.prepared import PreparedData
    from rtcodetr.data.transforms import build_transforms
    from rtcodetr.train_student.distill_data import DistillDataset, collate

    data = PreparedData.load(paths["data"])
    out = {}
    for name, with_cache in (("images", False), ("images+cache", True)):
        base = CocoDetection(data, "train", build_transforms(True, (args.size, args.size)))
        cache = TeacherCache(paths["cache"], data=data, split="train", tensors=["logits", "boxes", "backbone"]) \
            if with_cache else None
        ds = DistillDataset(base, cache, predictions=with_cache, features=("backbone",) if with_cache else ())
        loader = torch.utils.data.DataLoader(ds, batch_size=args.batch, shuffle=False, num_workers=args.workers,
                                             collate_fn=collate, drop_last=True)
        n, t0 = 0, None
        for epoch in range(args.loader_epochs + 1):
            for batch in loader:
                n += batch["pixel_values"].shape[0] if t0 is not None else 0
            if t0 is None:
                t0, n = time.perf_counter(), 0  # epoch 0 warms workers and the page cache
        out[name] = n / (time.perf_counter() - t0)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--student", default="rtdetr-tiny")
    p.add_argument("--teacher", default="rtdetr-small")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--loader-epochs", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of the three step kinds")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on a shared machine more threads make OpenMP spin and times explode)")
    p.add_argument("--precision", default="no", choices=list(PRECISIONS),
                   help="autocast dtype (fp16 adds loss scaling)")
    p.add_argument("--teacher-geometry", default="student", choices=["student", "own"],
                   help="online teacher input: the student's batch, or its own geometry and normalisation")
    p.add_argument("--work", default=None, help="where to keep the synthetic set, models and cache")
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)  # internal: one step kind in a subprocess
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work or Path(tempfile.gettempdir()) / f"rtcodetr-bench-train-{args.size}")
    paths = prepare(work, args)
    if args.mode:
        print(json.dumps(step_bench(args.mode, paths, size=args.size, batch=args.batch, steps=args.steps,
                                    warmup=args.warmup, device=args.device, precision=args.precision,
                                    teacher_geometry=args.teacher_geometry)))
        return 0

    print(f"student {args.student}, teacher {args.teacher}, {args.size} px, batch {args.batch}, device {args.device}, "
          f"{args.steps} timed steps after {args.warmup} warm-up, best of {args.rounds} rounds, "
          f"precision {args.precision}, "
          f"torch threads {torch.get_num_threads()}")
    results: dict[str, dict] = {}
    # Rounds alternate the three kinds so that load drifting on a shared machine hits them alike; per kind the round
    # with the lowest median is kept.
    for _ in range(args.rounds):
        for mode in ("baseline", "cached", "online"):
            cmd = [sys.executable, __file__, "--mode", mode, "--work", str(work)] + _without_work(sys.argv[1:])
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            if mode not in results or r["median_s"] < results[mode]["median_s"]:
                results[mode] = r
    base = results["baseline"]
    print(f"\n{'step':<10} {'median s':>9} {'mean s':>9} {'x baseline':>11} {'peak MB':>9}   ({base['peak_kind']})")
    for mode, r in results.items():
        print(f"{mode:<10} {r['median_s']:>9.4f} {r['mean_s']:>9.4f} {r['median_s'] / base['median_s']:>11.3f} "
              f"{r['peak_mb']:>9.0f}")
    print(f"\ncached / baseline step time: {results['cached']['median_s'] / base['median_s']:.3f} (target <= 1.05)")
    print(f"online / baseline step time: {results['online']['median_s'] / base['median_s']:.3f}")
    loader = loader_bench(paths, args)
    print(f"\nloader ({args.workers} workers, batch {args.batch}, train augmentation): "
          f"images alone {loader['images']:.1f} img/s, images + cache rows {loader['images+cache']:.1f} img/s "
          f"(ratio {loader['images+cache'] / loader['images']:.3f})")
    return 0


def _without_work(argv: list[str]) -> list[str]:
    """argv minus ``--work DIR`` / ``--work=DIR`` (a prefix test would also drop ``--workers`` and leave its value)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--work":
            skip = True
        elif not a.startswith("--work="):
            out.append(a)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
