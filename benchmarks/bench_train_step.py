"""What does distillation from the cache cost per training step? Prints figures; not a test.

Same student, same batch, three step kinds (forward + losses + backward + clipped AdamW step):
- ``baseline``: ground-truth detection loss only;
- ``cached``: + feature and prediction distillation with the teacher targets read from the cache (feature maps
  resampled on the device, Hungarian matching on every decoder layer) — what ``rtcodetr train`` runs;
- ``online``: the same losses with the teacher run inside the step (no_grad forward of the teacher on the batch).
Each kind runs in its own subprocess so that its peak memory is its own (CUDA: ``max_memory_allocated``; CPU: peak
RSS of the process). Then the loader: images + cache rows vs images alone, same workers.

    .venv/bin/python benchmarks/bench_train_step.py [--student rtdetr-tiny] [--teacher rtdetr-small]
        [--size 256] [--batch 4] [--steps 10] [--workers 2] [--device cpu] [--threads 1]
"""
from __future__ import annotations

import argparse
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
    from rtcodetr.train_student.train import LossConfig

    return LossConfig(feature_weight=1.0 if distill else 0.0, prediction_weight=1.0 if distill else 0.0,
                      feature_loss="pkd", feature_source="encoder", teacher_feature="backbone")


def step_bench(mode: str, paths: dict[str, str], args) -> dict:
    """Time ``args.steps`` training steps of one kind on one fixed batch (after warm-up)."""
    from rtcodetr.cache_teacher import TeacherCache
    from rtcodetr.data.dataset import CocoDetection
    from rtcodetr.data.prepared import PreparedData
    from rtcodetr.data.transforms import AugmentConfig, build_transforms
    from rtcodetr.features import FeatureTap
    from rtcodetr.models import load_model, set_trainable
    from rtcodetr.train_student.distill_data import DistillDataset, collate
    from rtcodetr.train_student.train import (DistillCriterion, OptimConfig, StudentWithAdapters,
                                              _to_device, build_weight_dict, param_groups)

    torch.manual_seed(0)
    device = torch.device(args.device)
    data = PreparedData.load(paths["data"])
    distill = mode != "baseline"
    cache = TeacherCache(paths["cache"], data=data, split="train", tensors=["logits", "boxes", "backbone"])
    base = CocoDetection(data, "train", build_transforms(True, (args.size, args.size), AugmentConfig(stop_epoch=None)))
    ds = DistillDataset(base, cache if mode == "cached" else None, predictions=mode == "cached",
                        features=("backbone",) if mode == "cached" else (), topk=100)
    batch = _to_device(collate([ds[i] for i in range(args.batch)]), device)

    student, _ = load_model(paths["student"])
    set_trainable(student, backbone=True, backbone_batchnorm=True)
    teacher_channels = int(cache.manifest["tensors"]["backbone"]["shape"][0])
    net = StudentWithAdapters(student, "encoder" if distill else None, teacher_channels).to(device).train()
    lcfg = _loss_cfg(distill)
    criterion = DistillCriterion(lcfg, distill, distill)
    weights = build_weight_dict(lcfg)
    opt = torch.optim.AdamW(param_groups(net, OptimConfig()), lr=1e-4)
    teacher = None
    if mode == "online":
        teacher, _ = load_model(paths["teacher"])
        teacher = teacher.to(device).eval()

    def online_targets() -> None:
        # The teacher sees the student's (augmented) batch itself: targets are already in the current frame.
        with torch.no_grad(), FeatureTap(teacher, names=("backbone",)) as tap:
            out = teacher(pixel_values=batch["pixel_values"])
        probs = out.logits.float().sigmoid()
        conf = probs.amax(-1)
        top = conf.topk(min(100, conf.shape[1]), dim=1).indices
        for i, t in enumerate(batch["targets"]):
            t["teacher_probs"], t["teacher_weight"] = probs[i, top[i]], conf[i, top[i]]
            t["teacher_boxes_cxcywh"] = out.pred_boxes[i, top[i]].float()
        fmap = tap.features["backbone"]
        b = fmap.shape[0]
        hw = torch.tensor(batch["pixel_values"].shape[-2:], device=device)
        batch["teacher_backbone"] = fmap
        batch["affine"] = torch.eye(3, dtype=torch.float64, device=device).expand(b, 3, 3)
        batch["orig_size"] = batch["size"] = batch["teacher_input_hw"] = hw.expand(b, 2)
        batch["teacher_valid"] = torch.tensor(fmap.shape[-2:], device=device).expand(b, 2)

    def one_step() -> None:
        if teacher is not None:
            online_targets()
        outputs, fmap = net(batch["pixel_values"], batch["pixel_mask"], labels=batch["labels"])
        losses = criterion(outputs, fmap, batch)
        loss = sum(losses[k] * weights[k] for k in losses)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 0.1)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        one_step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        one_step()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"mode": mode, "median_s": times[len(times) // 2], "mean_s": sum(times) / len(times),
            "peak_mb": peak, "peak_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS"}


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
    p.add_argument("--work", default=None, help="where to keep the synthetic set, models and cache")
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)  # internal: one step kind in a subprocess
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work or Path(tempfile.gettempdir()) / f"rtcodetr-bench-train-{args.size}")
    paths = prepare(work, args)
    if args.mode:
        print(json.dumps(step_bench(args.mode, paths, args)))
        return 0

    print(f"student {args.student}, teacher {args.teacher}, {args.size} px, batch {args.batch}, device {args.device}, "
          f"{args.steps} timed steps after {args.warmup} warm-up, best of {args.rounds} rounds, "
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
