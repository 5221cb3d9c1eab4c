"""Teacher-cache figures: job throughput vs forward alone, bytes per image and fidelity per dtype, read throughput.

    .venv/bin/python benchmarks/bench_cache.py                       # TACO sample, rtdetr-small teacher, CPU
    .venv/bin/python benchmarks/bench_cache.py --teacher conditional-detr-tiny --batch-size 8 --workers 4

1. Throughput: the caching job (DataLoader workers decode + preprocess, main thread runs the teacher, writer thread
   encodes + compresses + writes) vs the teacher's forward pass alone on the same, already preprocessed, batches.
2. Bytes per image per tensor for float32 / float16 / bfloat16 / int8 feature maps, at the teacher's native geometry
   and at 640x640, with cosine similarity to the float32 cache (mean / min over samples).
3. Random-sample read throughput of ``TeacherCache`` with 0 and 2 DataLoader workers (all tensors, encoder only).

The teacher is a preset at random init with He-initialised convs and calibrated BatchNorm statistics, so activations
have a trained network's scale (raw random init gives ~1e-10 encoder maps that no 16-bit format holds). Compression
ratios of such features are not those of a trained teacher; raw sizes and the dtype fidelity ordering are.
Prints figures only (no assertions).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TACO = REPO.parent / "shared" / "data" / "taco" / "sample"


def trained_scale_teacher(preset: str, data_dir: Path, out: Path) -> Path:
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    from rtcodetr.models import calibrate_activation_scale, init_model

    raw = init_model(preset, data_dir, out / "raw")
    model = AutoModelForObjectDetection.from_pretrained(raw)
    calibrate_activation_scale(model, (256, 256)).save_pretrained(out / "teacher")
    AutoImageProcessor.from_pretrained(raw).save_pretrained(out / "teacher")
    return out / "teacher"


def prepare_data(kind: str, out: Path):
    if kind == "taco":
        from rtcodetr.data.coco import PrepareConfig, run

        return run(PrepareConfig(annotations=TACO / "annotations.json", images=TACO / "images", out=out / "data",
                                 progress=False))
    from rtcodetr.data.synthetic import make_synthetic

    return make_synthetic(out / "data", train=64, val=8, test=8, size=640, seed=0)


def cfg_for(data, teacher, out, *words: str):
    from rtcodetr.cache_teacher import CacheConfig
    from rtcodetr.config import load_config

    return load_config(CacheConfig, None, [f"data={data.root}", f"teacher={teacher}", f"out={out}", "overwrite=true",
                                           "progress=false", *words])


def forward_only(data, split: str, teacher_dir: Path, manifest: dict, batch_size: int, device: str = "cpu",
                 mixed_precision: str = "no") -> float:
    """img/s of the teacher alone on the job's batches, preprocessed beforehand (same batches as the job).

    Each distinct image file is preprocessed once (a split that lists the same photo several times, as
    ``gpu_check`` uses to make a short list long enough to time, reuses it); batches are assembled before the clock
    starts, moved to the device inside the timed loop as the job does, and CUDA is synchronised at the end.
    """
    from rtcodetr.cache_teacher.geometry import PadCollate, TeacherInputs
    from rtcodetr.cache_teacher.storage import ShardPlan
    from rtcodetr.cache_teacher.teacher import Teacher
    from rtcodetr.data.dataset import CocoDetection

    g = manifest["geometry"]
    teacher = Teacher(str(teacher_dir), device, mixed_precision)
    base = CocoDetection(data, split)
    inputs = TeacherInputs(base, g, draft=g["draft"])
    plan = ShardPlan(len(inputs), manifest["storage"]["samples_per_shard"])
    collate = PadCollate(g["input_hw"])
    done: dict[str, tuple] = {}

    def sample(i: int):
        key = str(base.file_names[i])
        if key not in done:
            done[key] = inputs[i]
        pixels, meta = done[key]
        return pixels, {**meta, "index": int(i), "image_id": int(base.image_ids[i])}

    batches = [collate([sample(i) for i in range(s, min(s + batch_size, plan.bounds(k)[1]))])
               for k in range(plan.num_shards) for s in range(plan.bounds(k)[0], plan.bounds(k)[1], batch_size)]
    tensors = list(manifest["tensors"])
    teacher.forward(batches[0], tensors, g["input_hw"], g["box_reference"])  # warm-up (lazy imports, allocator)
    sync = torch.cuda.synchronize if teacher.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for b in batches:
        teacher.forward(b, tensors, g["input_hw"], g["box_reference"])
    sync()
    return sum(len(b["index"]) for b in batches) / (time.perf_counter() - t0)


def job_plan(data, teacher_dir: Path, samples_per_shard: int) -> dict:
    """The parts of the train job's manifest that fix its batches: geometry (default config), shards, tensors."""
    from rtcodetr.cache_teacher.config import GeometryConfig
    from rtcodetr.cache_teacher.geometry import resolve_geometry
    from rtcodetr.data.dataset import CocoDetection
    from rtcodetr.models import load_model, processor_geometry

    base = CocoDetection(data, "train")
    geometry = resolve_geometry(processor_geometry(load_model(teacher_dir)[1]), GeometryConfig(),
                                np.stack([base.heights, base.widths], 1))
    return {"geometry": {**geometry, "draft": True}, "storage": {"samples_per_shard": samples_per_shard},
            "tensors": {n: {} for n in ("backbone", "encoder", "logits", "boxes")}}


def read_throughput(path: Path, workers: int, tensors, n: int) -> float:
    from rtcodetr.cache_teacher import TeacherCache

    cache = TeacherCache(path, tensors=tensors)
    order = np.random.default_rng(0).permutation(len(cache))
    order = np.resize(order, n)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(cache, order.tolist()), batch_size=None,
                                         num_workers=workers, shuffle=False,
                                         persistent_workers=False, prefetch_factor=4 if workers else None)
    t0 = time.perf_counter()
    count = sum(1 for _ in loader)
    return count / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="rtdetr-small", help="model preset")
    p.add_argument("--data", default="taco" if TACO.is_dir() else "synthetic", choices=["taco", "synthetic"])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--fidelity-split", default="val", help="split used for the bytes/fidelity table")
    p.add_argument("--reads", type=int, default=256, help="random samples read per read-throughput figure")
    p.add_argument("--out", type=Path, default=None, help="work directory (default: a temp dir)")
    args = p.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    from rtcodetr.cache_teacher import run
    from rtcodetr.cache_teacher.codecs import cosine
    from rtcodetr.cache_teacher.tools import cache_info

    work = args.out or Path(tempfile.mkdtemp(prefix="bench_cache_"))
    data = prepare_data(args.data, work)
    teacher = trained_scale_teacher(args.teacher, data.root, work)
    print(f"# bench_cache: teacher {args.teacher}, data {args.data} ({data.root}), torch threads "
          f"{torch.get_num_threads()}, cpu count {os.cpu_count()}")

    # 1. throughput ------------------------------------------------------------------------------------------------
    # The forward-alone figure is taken right before and right after the job and averaged: on a shared machine the
    # available CPU drifts between runs, and bracketing keeps the ratio honest.
    cache = work / "cache_train"
    words = [f"batch_size={args.batch_size}", f"num_workers={args.workers}", "samples_per_shard=16"]
    fwd_before = forward_only(data, "train", teacher, job_plan(data, teacher, 16), args.batch_size)
    res = run(cfg_for(data, teacher, cache, *words))
    fwd_after = forward_only(data, "train", teacher, res["manifest"], args.batch_size)
    fwd = (fwd_before + fwd_after) / 2
    job = res["images_per_second"]
    g = res["manifest"]["geometry"]
    print(f"\n## 1. throughput ({res['images']} train images, batch {args.batch_size}, {args.workers} workers, "
          f"input {g['input_hw']})")
    print(f"teacher forward alone : {fwd:8.2f} img/s   (before the job {fwd_before:.2f}, after {fwd_after:.2f})")
    print(f"caching job           : {job:8.2f} img/s   (ratio job/forward = {job / fwd:.2f})")

    # 2. bytes per image and fidelity --------------------------------------------------------------------------------
    print(f"\n## 2. bytes per image and cosine to float32 ({args.fidelity_split} split, compressor blosc-zstd-3)")
    print(f"{'geometry':<22}{'dtype':<10}{'tensor':<10}{'shape':<18}{'raw B/img':>12}{'stored B/img':>14}"
          f"{'1-cos mean':>12}{'1-cos max':>12}")
    geometries = [("native", []), ("640x640", ["geometry.mode=fixed", "geometry.size_hw=[640,640]"])]
    for gname, gwords in geometries:
        ref_path = work / f"fid_{gname}_float32"
        caches = {}
        for dtype in ("float32", "float16", "bfloat16", "int8"):
            path = work / f"fid_{gname}_{dtype}"
            pred = "float32" if dtype in ("float32", "int8") else dtype
            r = run(cfg_for(data, teacher, path, f"split={args.fidelity_split}", f"dtype={dtype}",
                            f"prediction_dtype={pred}", f"batch_size={args.batch_size}", "num_workers=0",
                            *gwords))
            caches[dtype] = path
            geom = r["manifest"]["geometry"]
            info = cache_info(str(path))
            from rtcodetr.cache_teacher import TeacherCache

            ref, got = TeacherCache(ref_path), TeacherCache(path)
            label = f"{gname} {geom['input_hw'][0]}x{geom['input_hw'][1]}" if gname == "native" else gname
            for name in ("backbone", "encoder", "logits", "boxes"):
                a = info["arrays"][name]
                stored = a["bytes_per_image"]
                if name + "_scale" in info["arrays"]:
                    stored += info["arrays"][name + "_scale"]["bytes_per_image"]
                cos = [cosine(ref[i][name], got[i][name]) for i in range(len(got))]
                print(f"{label:<22}{a['dtype']:<10}{name:<10}{str(a['shape']):<18}{a['raw_bytes_per_image']:>12,}"
                      f"{stored:>14,.0f}{1 - np.mean(cos):>12.2e}{1 - np.min(cos):>12.2e}")
            print(f"{label:<22}{dtype:<10}{'total':<10}{'':<18}{'':>12}{info['bytes_per_image']:>14,.0f}")

    # 3. read throughput ---------------------------------------------------------------------------------------------
    print(f"\n## 3. random-sample reads from the float16 train cache ({args.reads} reads)")
    for tensors, label in ((None, "all tensors"), (["encoder"], "encoder only")):
        for w in (0, 2):
            rate = read_throughput(cache, w, tensors, args.reads)
            print(f"{label:<14} workers={w}: {rate:8.1f} samples/s")
    print(f"\nwork dir: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
