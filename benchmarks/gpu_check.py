"""One GPU check: every figure only a GPU can give, in one short run that was written and tested on a CPU.

    python3 benchmarks/gpu_check.py --out DIR              # the real run: CUDA, full-size presets, < 8 min on one H200
    python3 benchmarks/gpu_check.py --out DIR --dry-run    # every section on the CPU with tiny presets, < 3 min
    python3 benchmarks/gpu_check.py --make-bundle .gpu_check  # here, before a device run: wheels + TACO photos

Writes ``DIR/gpu_check.json`` (everything), ``DIR/gpu_check.md`` (the tables) and ``DIR/gpu_check.log`` (every
section's output), and prints the table. Models, data and caches go to ``--work`` (default a temp dir), never under
``--out``: the device tool brings back at most 8 files from its output folder.

Each section runs in its own subprocess with its own timeout (its process group is killed when the time is up) and
records ``ok`` / ``failed`` / ``timeout`` / ``skipped`` with the error; what a section measured before it failed or
timed out is kept, because a section rewrites its result file after every figure. A global deadline caps the whole
run: a section never gets more time than is left, and one that cannot start in time is skipped and says so.
Pretrained weights are not needed: the full-size presets are built from their configs (``rtcodetr.models``, with the
BatchNorm reset) and the teacher gets trained-scale activations (``bench_cache.trained_scale_teacher``); speed and
memory do not depend on the weights.

Sections (run in the order 2, 1, 4, 3, 5; budget = expected time on one H200, timeout = its hard limit):

====  ===========  ============================================================================  ======  =======
 #    name         real run                                                                      budget  timeout
====  ===========  ============================================================================  ======  =======
 2    cache_job    conditional-detr-r50 teacher (800/1333, padded), bf16, TACO photos repeated     80 s   150 s
                   to >= 200 train images: job images/s vs teacher forward alone (goal >= 0.9),
                   the job's loader alone, decode only (PIL draft vs torchvision nvJPEG), bytes
                   per image float16 / int8 of the train split's cache
 1    train_step   rtdetr-r50vd student at 640, batch 8; baseline / cached / online teacher at     90 s   180 s
                   its own geometry; fp16 and bf16; 3 warm-up + 10 timed steps; median step time
                   and peak CUDA memory, ratio to baseline (goals: cached <= 1.05x both)
 4    stability    rtdetr-r18vd at 640, batch 8, fp16, 200 steps distilled from the section-2      90 s   180 s
                   cache; straight run vs stop at 100 + resume=auto: finite, loss goes down,
                   resume matches (exactly, or within the GPU's run-to-run noise)
 3    latency      batch 1 at 640: rtdetr-r18vd / r50vd / l, YOLO11n / l (yaml, NMS inside         80 s   150 s
                   end-to-end), fp32 and fp16 eager, 10 warm-up + 50 iterations; ONNX Runtime
                   CUDA / TensorRT when ``rtcodetr.export`` and such a provider are present
 5    multi_gpu    only with >= 2 GPUs: 2-process cache job == 1-process cache, 2-process         0 s    150 s
                   training (20 steps); one GPU: skipped
====  ===========  ============================================================================  ======  =======

Expected total on one H200: about 6 minutes including the pre-flight, model builds and data preparation (the
budgets are estimates written before any GPU run: the first run's figures replace them); the deadline is 460 s.
The dry run uses rtdetr-tiny / conditional-detr-tiny at 128-320 px, 12 TACO photos, a few steps each, fp32/fp16/bf16
autocast on the CPU, and section 5 as two gloo processes on the CPU.

On the device machine nothing can be downloaded and the project's ``.venv`` (6.5 GB) cannot travel (the tool
carries 64 MiB). Its ``python3`` already has torch, torchvision, transformers, accelerate, timm, h5py...; the few
packages ``make venv`` installs that it lacks (zarr and its codecs, pycocotools, ultralytics; transformers at this
project's version) travel as wheels in the bundle, with a subset of the TACO sample photos (``../shared`` beside the
checkout does not travel). ``--make-bundle`` writes that folder here; on the device this script finds it, installs
the wheels into the work dir (``pip --no-index --target``) and puts them first on ``PYTHONPATH``. See
``benchmarks/README.md`` for the exact device call.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
BUNDLE = REPO / ".gpu_check"
FORMAT = "rtcodetr-gpu-check"
FORMAT_VERSION = 1

# Packages `make venv` installs that the device image lacks (or has at another version); carried as wheels. Versions
# are those of the environment that runs --make-bundle, i.e. what `make venv` installed here. regex: transformers
# checks its version at import (>= 2025.10.22 for 5.24) and the device image's is not known.
BUNDLE_PACKAGES = ("transformers", "regex", "zarr", "numcodecs", "donfig", "google-crc32c", "pycocotools",
                   "ultralytics", "ultralytics-thop")
REQUIRED_MODULES = ("torch", "torchvision", "transformers", "accelerate", "zarr", "numcodecs", "pycocotools",
                    "safetensors", "PIL", "yaml", "tqdm", "scipy", "h5py")
DEVICE_PYTHON = "3.12"  # the device image's python3 (KINDS.md)
BUNDLE_BYTES = 58 * 2**20  # wheels + photos; the tool carries 64 MiB with the working tree


# --------------------------------------------------------------------------------------------------------------------
# What runs: one plan for the GPU, one for the CPU dry run
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """Sizes of every section for one kind of run. ``None`` workers mean "from the CPU count"."""

    name: str
    device: str
    deadline_s: int
    timeouts: dict[str, int]
    budgets: dict[str, int]
    # data
    taco_photos: int | None                       # None: every photo found
    synthetic_size: int                           # fallback when no TACO photos are found
    # 1. training step
    student: str
    student_size: int
    batch: int
    teacher: str
    step_precisions: tuple[str, ...]
    step_warmup: int
    step_steps: int
    # 2. caching job
    cache_min_images: int                         # repeat the train photos until the split has this many
    cache_batch: int
    cache_workers: int | None
    cache_precision: str
    samples_per_shard: int
    decode_files: int
    # 3. latency
    latency_presets: tuple[str, ...]
    latency_yolo: tuple[str, ...]
    latency_size: int
    latency_precisions: tuple[str, ...]
    latency_warmup: int
    latency_iterations: int
    # 4. stability
    stab_student: str
    stab_size: int | None                         # None: the preset's own geometry
    stab_batch: int
    stab_steps: int
    stab_stop: int
    stab_precision: str
    stab_workers: int | None
    stab_words: tuple[str, ...] = ()
    # 5. several GPUs
    multi_train_steps: int = 20
    notes: tuple[str, ...] = field(default_factory=tuple)


SECTIONS: dict[str, tuple[str, str]] = {
    "1": ("train_step", "Training step, full size: baseline vs cached vs online teacher"),
    "2": ("cache_job", "Caching job: throughput vs teacher forward, decode, bytes per image"),
    "3": ("latency", "Latency, batch 1: RT-DETR and YOLO11, eager and ONNX Runtime"),
    "4": ("stability", "Stability: fp16 distillation run, loss, exact resume"),
    "5": ("multi_gpu", "Several GPUs: 2-process cache job and training"),
}
ORDER = ("2", "1", "4", "3", "5")  # the cache first (1 and 4 read it), latency late (it needs nothing else)

REAL = Plan(
    name="real", device="cuda", deadline_s=460,
    timeouts={"2": 150, "1": 180, "4": 180, "3": 150, "5": 150},
    budgets={"2": 80, "1": 90, "4": 90, "3": 80, "5": 0},
    taco_photos=None, synthetic_size=640,
    student="rtdetr-r50vd", student_size=640, batch=8, teacher="conditional-detr-r50",
    step_precisions=("fp16", "bf16"), step_warmup=3, step_steps=10,
    cache_min_images=200, cache_batch=8, cache_workers=None, cache_precision="bf16", samples_per_shard=32,
    decode_files=16,
    latency_presets=("rtdetr-r18vd", "rtdetr-r50vd", "rtdetr-l"), latency_yolo=("yolo11n.yaml", "yolo11l.yaml"),
    latency_size=640, latency_precisions=("fp32", "fp16"), latency_warmup=10, latency_iterations=50,
    stab_student="rtdetr-r18vd", stab_size=None, stab_batch=8, stab_steps=200, stab_stop=100,
    stab_precision="fp16", stab_workers=None, stab_words=("optim.warmup_steps=20",),
    multi_train_steps=20,
)

DRY = Plan(
    name="dry-run", device="cpu", deadline_s=175,
    timeouts={"2": 90, "1": 90, "4": 90, "3": 90, "5": 120},
    budgets={"2": 25, "1": 25, "4": 35, "3": 20, "5": 50},
    taco_photos=12, synthetic_size=192,
    student="rtdetr-tiny", student_size=128, batch=2, teacher="conditional-detr-tiny",
    step_precisions=("fp16", "bf16"), step_warmup=1, step_steps=2,
    cache_min_images=16, cache_batch=4, cache_workers=2, cache_precision="bf16", samples_per_shard=8,
    decode_files=2,
    latency_presets=("rtdetr-tiny",), latency_yolo=("yolo11n.yaml",), latency_size=160,
    latency_precisions=("fp32",), latency_warmup=1, latency_iterations=3,
    stab_student="rtdetr-tiny", stab_size=128, stab_batch=2, stab_steps=12, stab_stop=6, stab_precision="fp16",
    stab_workers=0, stab_words=("optim.warmup_steps=1", "optim.lr=1e-3", "optim.ema=false"),
    multi_train_steps=2,
    notes=("dry run: CPU, tiny presets; times are not GPU figures. fp16 / bf16 in section 1 are CPU autocast; the "
           "trainer (section 4) trains fp16 runs in fp32 on a CPU.",),
)


# --------------------------------------------------------------------------------------------------------------------
# Child side: one section in its own process
# --------------------------------------------------------------------------------------------------------------------
class SectionSkipped(Exception):
    """The section does not apply on this machine (e.g. one GPU for the multi-GPU checks)."""


class Recorder:
    """A section's result file, rewritten atomically after every change so a timeout keeps what was measured.

    ``result``: free-form figures; ``checks``: ``{"name", "value", "goal", "met", "kind"}`` where ``kind`` is
    ``"goal"`` (a target: reported, a miss is not a failure) or ``"required"`` (a correctness check: a miss fails
    the section).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"status": "running", "result": {}, "checks": [], "notes": [], "error": None}
        self.flush()

    def set(self, key: str, value: Any) -> None:
        self.data["result"][key] = value
        self.flush()

    def check(self, name: str, value: Any, goal: str, met: bool | None, kind: str = "goal") -> None:
        self.data["checks"].append({"name": name, "value": value, "goal": goal, "met": met, "kind": kind})
        self.flush()

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        print(f"[gpu-check] note: {text}", flush=True)
        self.flush()

    def finish(self, status: str, error: str | None = None, tb: str | None = None) -> None:
        self.data.update(status=status, error=error)
        if tb:
            self.data["traceback"] = tb
        self.flush()

    def flush(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=_json_default))
        os.replace(tmp, self.path)


def _json_default(x: Any) -> Any:
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "tolist"):
        return x.tolist()
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def _cpu_workers(limit: int) -> int:
    """DataLoader workers: the CPUs minus two (main process, writer thread), at most ``limit``."""
    return max(1, min(limit, (os.cpu_count() or 2) - 2))


def cache_words(plan: Plan, data_root: Path, teacher: Path, out: Path, *extra: str) -> list[str]:
    """``key=value`` words of the caching job (``CacheConfig``) for the train split of ``data_root``."""
    workers = plan.cache_workers if plan.cache_workers is not None else _cpu_workers(12)
    return [f"data={data_root}", f"teacher={teacher}", f"out={out}", "split=train", "progress=false",
            f"batch_size={plan.cache_batch}", f"num_workers={workers}", f"samples_per_shard={plan.samples_per_shard}",
            *extra]


def stability_words(plan: Plan, data_root: Path, student: Path, cache: Path) -> list[str]:
    """``TrainConfig`` words of the stability runs (without ``out`` / ``stop_after_steps`` / ``resume``)."""
    workers = plan.stab_workers if plan.stab_workers is not None else _cpu_workers(8)
    size = plan.stab_size or plan.student_size
    return [f"data={data_root}", f"model={student}", f"cache={cache}", f"max_steps={plan.stab_steps}",
            f"batch_size={plan.stab_batch}", f"num_workers={workers}", f"mixed_precision={plan.stab_precision}",
            f"draft_size={size}", "eval_every=0", "checkpoint_epoch_end=false", "keep_checkpoints=1",
            "log_every=10", "log_with=[]", "loss.feature_weight=1", "loss.prediction_weight=1",
            "loss.feature_loss=pkd", "loss.feature_source=encoder", "loss.teacher_feature=encoder",
            "freeze.backbone_batchnorm=true", *plan.stab_words,
            *([f"image_size=[{plan.stab_size},{plan.stab_size}]"] if plan.stab_size else [])]


def multi_train_words(plan: Plan, data_root: Path, student: Path, cache: Path, out: Path, on_cuda: bool) -> list[str]:
    """``TrainConfig`` words of the 2-process training run. The default ``mixed_precision`` ("no") is left implicit:
    the config parser reads a bare ``no`` as YAML false."""
    size = plan.stab_size or plan.student_size
    return [f"data={data_root}", f"model={student}", f"cache={cache}", f"out={out}",
            f"max_steps={plan.multi_train_steps}", f"batch_size={plan.stab_batch}",
            f"num_workers={2 if on_cuda else 0}", *(["mixed_precision=fp16"] if on_cuda else []), "eval_every=0",
            "checkpoint_epoch_end=false", "log_with=[]", "loss.feature_weight=1", "loss.prediction_weight=1",
            "freeze.backbone_batchnorm=true",
            *(["cpu=true", f"image_size=[{size},{size}]"] if not on_cuda else [])]


class Work:
    """The shared, idempotent preparation: data, models, teacher, the train split's cache, under one work dir.

    Every product is written in place and marked complete last (a ``.complete`` file), so a section killed halfway
    leaves something the next section rebuilds instead of trusting.
    """

    def __init__(self, root: Path, plan: Plan, taco: Path | None) -> None:
        self.root, self.plan, self.taco = root, plan, taco
        root.mkdir(parents=True, exist_ok=True)

    def _build(self, target: Path, build: Callable[[Path], Any]) -> Path:
        marker = target / ".complete"
        if not marker.is_file():
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            build(target)
            marker.write_text(datetime.datetime.now().isoformat())
        return target

    # ---- data
    def data(self):
        """The base prepared dataset: the TACO sample photos (or a synthetic set when none are found)."""
        from rtcodetr.data.prepared import PreparedData

        def build(out: Path) -> None:
            if self.taco is None:
                from rtcodetr.data.synthetic import make_synthetic

                make_synthetic(out, train=24, val=4, test=2, size=self.plan.synthetic_size, seed=0)
                return
            from rtcodetr.data.coco import PrepareConfig, run

            src = json.loads((self.taco / "annotations.json").read_text())
            images = sorted(src["images"], key=lambda im: im["id"])[:self.plan.taco_photos]
            keep = {im["id"] for im in images}
            subset = {**src, "images": images, "annotations": [a for a in src["annotations"] if a["image_id"] in keep]}
            ann = self.root / "taco_subset.json"
            ann.write_text(json.dumps(subset))
            run(PrepareConfig(annotations=ann, images=self.taco / "images", out=out, val_fraction=0.15,
                              test_fraction=0.05, seed=0, name="taco-sample", progress=False))

        return PreparedData.load(self._build(self.root / "data", build))

    def repeated(self, min_images: int):
        """The base set with its train split listed ``r`` times (new image ids, same files) so that it holds at
        least ``min_images``: a throughput measured over a few dozen photos is mostly start-up."""
        from rtcodetr.data.prepared import PreparedData, SplitRecords, write_prepared

        data = self.data()
        n_train = len(data.image_ids("train"))
        repeats = max(1, math.ceil(min_images / max(n_train, 1)))

        def build(out: Path) -> None:
            stride = 10 ** len(str(max(max(data.image_ids(s), default=0) for s in ("train", "val", "test"))))
            splits = {}
            for split in ("train", "val", "test"):
                coco = data.coco(split)
                reps = repeats if split == "train" else 1
                sizes = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
                images, anns = [], []
                for k in range(reps):
                    images += [{**im, "id": im["id"] + k * stride} for im in coco["images"]]
                    for a in coco["annotations"]:
                        x, y, w, h = a["bbox"]
                        iw, ih = sizes[a["image_id"]]
                        anns.append({"image_id": a["image_id"] + k * stride,
                                     "label": data.label_map.label_of_category(a["category_id"]),
                                     "box_xyxy": [x, y, min(x + w, iw), min(y + h, ih)], "area": a["area"],
                                     "iscrowd": a.get("iscrowd", 0)})
                splits[split] = SplitRecords(images=images, annotations=anns)
            write_prepared(out, name=f"{data.info.get('name', 'data')}-train-x{repeats}", image_root=data.image_root,
                           label_map=data.label_map, splits=splits, report={"repeated_train": repeats},
                           sources={"base": str(data.root)}, settings={"repeats": repeats})

        return PreparedData.load(self._build(self.root / f"data_train_x{repeats}", build))

    # ---- models
    def model(self, preset: str) -> Path:
        """``preset`` at random init (seeded) for the base set's label map."""
        from rtcodetr.models import init_model

        data = self.data()
        self._build(self.root / "models" / preset, lambda out: init_model(preset, data.root, out / "model"))
        return self.root / "models" / preset / "model"

    def teacher(self) -> Path:
        """The teacher preset with trained-scale activations (He-initialised convs, calibrated BatchNorm)."""
        import bench_cache

        data = self.data()
        target = self.root / "teacher"
        self._build(target, lambda out: bench_cache.trained_scale_teacher(self.plan.teacher, data.root, out))
        return target / "teacher"

    # ---- the train split's teacher cache (sections 1, 4, 5 read it; section 2 writes and measures it)
    def cache_words(self, data, out: Path, *extra: str) -> list[str]:
        return cache_words(self.plan, data.root, self.teacher(), out, *extra)

    @property
    def cache_path(self) -> Path:
        return self.root / "cache_train.zarr"

    def cache(self) -> Path:
        """The float16 cache of the base train split; made by section 2, else here in a subprocess (its own
        Accelerate state: the caller may already hold one with another mixed precision)."""
        from rtcodetr.cache_teacher.tools import cache_info

        try:
            info = cache_info(str(self.cache_path))
            if info["finished_shards"] == info["num_shards"]:
                return self.cache_path
        except (FileNotFoundError, OSError, KeyError, ValueError):
            pass
        cmd = [sys.executable, "-m", "rtcodetr.cache_teacher", *self.cache_words(self.data(), self.cache_path)]
        env = {**os.environ, "ACCELERATE_MIXED_PRECISION": cache_precision(self.plan)}
        print(f"[gpu-check] making the train cache: {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True, env=env)
        return self.cache_path


def native_bf16() -> bool:
    """Whether the GPU computes in bf16 itself (sm >= 8.0); T4-class GPUs only emulate it, slowly."""
    import torch

    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # older torch: no emulation argument
        return torch.cuda.is_bf16_supported()


def cache_precision(plan: Plan) -> str:
    """The plan's precision for the teacher, or fp16 on a GPU without bf16."""
    import torch

    if plan.cache_precision != "bf16" or not torch.cuda.is_available():
        return plan.cache_precision
    return "bf16" if native_bf16() else "fp16"


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- section 1 ------------------------------------------------------------------------------------------------------
def section_train_step(plan: Plan, work: Work, rec: Recorder) -> None:
    """Median step time and peak memory of baseline / cached / online-teacher steps per precision (``step_bench``)."""
    import torch

    import bench_train_step as bts

    device = _device()
    data = work.data()
    paths = {"data": str(data.root), "student": str(work.model(plan.student)), "teacher": str(work.teacher()),
             "cache": str(work.cache())}
    rec.set("setup", {"student": plan.student, "size": plan.student_size, "batch": plan.batch,
                      "teacher": plan.teacher, "teacher_geometry": "own (processor geometry, padded per batch)",
                      "warmup": plan.step_warmup, "steps": plan.step_steps, "device": str(device),
                      "data": str(data.root)})
    rows: list[dict] = []
    errors = []
    for precision in plan.step_precisions:
        if device.type == "cuda" and precision == "bf16" and not native_bf16():
            rec.note("bf16 is not supported by this GPU: bf16 steps skipped")
            continue
        for mode in ("baseline", "cached", "online"):
            print(f"[gpu-check] train step: {precision} {mode}", flush=True)
            try:
                r = bts.step_bench(mode, paths, size=plan.student_size, batch=plan.batch, steps=plan.step_steps,
                                   warmup=plan.step_warmup, device=device, precision=precision,
                                   teacher_geometry="own", draft_size=plan.student_size)
            except Exception as e:  # an OOM or a bug in one kind must not hide the others
                r = {"mode": mode, "precision": precision, "error": f"{type(e).__name__}: {e}"[:2000]}
                errors.append(f"{precision} {mode}: {r['error'][:300]}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(r)
            rec.set("steps", rows)
    for precision in plan.step_precisions:
        by_mode = {r["mode"]: r for r in rows if r["precision"] == precision and "error" not in r}
        base = by_mode.get("baseline")
        if not base:
            continue
        for r in by_mode.values():
            r["time_x_baseline"] = r["median_s"] / base["median_s"]
            used, base_used = r["peak_mb"] - r["start_mb"], base["peak_mb"] - base["start_mb"]
            r["memory_x_baseline"] = used / base_used if base_used > 0 else None
        rec.set("steps", rows)
        if "cached" in by_mode:
            c = by_mode["cached"]
            rec.check(f"cached / baseline step time ({precision})", round(c["time_x_baseline"], 3), "<= 1.05",
                      c["time_x_baseline"] <= 1.05)
            if c["memory_x_baseline"] is not None:
                rec.check(f"cached / baseline peak memory ({precision})", round(c["memory_x_baseline"], 3),
                          "<= 1.05", c["memory_x_baseline"] <= 1.05)
    if errors:
        raise RuntimeError("some step kinds failed: " + "; ".join(errors))


# ---- section 2 ------------------------------------------------------------------------------------------------------
def loader_rate(data, split: str, geometry: dict, batch: int, workers: int) -> float:
    """images/s of the cache job's input pipeline alone (decode in draft mode, resize, normalise, pad), no teacher."""
    import torch

    from rtcodetr.cache_teacher.geometry import PadCollate, TeacherInputs
    from rtcodetr.data.dataset import CocoDetection

    inputs = TeacherInputs(CocoDetection(data, split), geometry, draft=True)
    loader = torch.utils.data.DataLoader(
        inputs, batch_size=batch, num_workers=workers, collate_fn=PadCollate(geometry["input_hw"]),
        multiprocessing_context="fork" if workers > 0 and sys.platform == "linux" else None)
    t0 = time.perf_counter()
    n = sum(len(b["index"]) for b in loader)
    return n / (time.perf_counter() - t0)


def decode_rates(data, split: str, geometry: dict, n_files: int, device) -> dict[str, Any]:
    """Decode + resize to the teacher input, one image at a time in this process: PIL with JPEG draft mode (what
    each DataLoader worker does) vs ``torchvision.io.decode_jpeg`` on ``device`` (nvJPEG on CUDA), batched.

    The GPU path decodes the full-resolution image (nvJPEG has no DCT downscaling) and resizes on the device with
    antialiasing. TACO's sample photos carry no EXIF rotation; a GPU loader would have to apply it itself.
    """
    import torch
    import torch.nn.functional as F
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    from rtcodetr.cache_teacher.geometry import TeacherInputs, resize_hw
    from rtcodetr.data.dataset import CocoDetection

    base = CocoDetection(data, split)
    seen, idx = set(), []
    for i, name in enumerate(base.file_names):
        if str(name) not in seen:
            seen.add(str(name))
            idx.append(i)
    idx = idx[:n_files]
    inputs = TeacherInputs(base, geometry, draft=True)
    inputs[idx[0]]  # warm the page cache and the codec
    t0 = time.perf_counter()
    for i in idx:
        inputs[i]
    pil = len(idx) / (time.perf_counter() - t0)

    blobs = [read_file(str(base.image_path(i))) for i in idx]
    sizes = [resize_hw(geometry, int(base.heights[i]), int(base.widths[i])) for i in idx]
    mean = std = None
    if geometry.get("normalize"):
        mean = torch.tensor(geometry["normalize"]["mean"], device=device).view(3, 1, 1)
        std = torch.tensor(geometry["normalize"]["std"], device=device).view(3, 1, 1)

    def gpu_pass() -> None:
        decoded = decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device)
        for img, (h, w) in zip(decoded, sizes):
            x = F.interpolate(img[None].float() / 255.0, size=(h, w), mode="bilinear", antialias=True,
                              align_corners=False)[0]
            if mean is not None:
                x = (x - mean) / std

    gpu_pass()  # warm-up: nvJPEG handles, allocator
    _sync(device)
    t0 = time.perf_counter()
    gpu_pass()
    _sync(device)
    tv = len(idx) / (time.perf_counter() - t0)
    mp = float((base.heights[idx] * base.widths[idx]).mean() / 1e6)
    return {"files": len(idx), "mean_megapixels": mp, "pil_draft_images_per_s_one_process": pil,
            "torchvision_decode_jpeg_device": str(device), "torchvision_decode_jpeg_images_per_s": tv}


def section_cache_job(plan: Plan, work: Work, rec: Recorder) -> None:
    """The caching job's images/s against the teacher's forward alone, what bounds it, and bytes per image."""
    import bench_cache

    from rtcodetr.cache_teacher import run as cache_run
    from rtcodetr.cache_teacher.config import CacheConfig
    from rtcodetr.cache_teacher.tools import cache_info
    from rtcodetr.config import load_config
    from rtcodetr.data.dataset import CocoDetection

    # The job takes its mixed precision from Accelerate (what `accelerate launch --mixed_precision bf16` sets).
    precision = cache_precision(plan)
    os.environ["ACCELERATE_MIXED_PRECISION"] = precision
    device = _device()
    data = work.data()
    teacher = work.teacher()
    rep = work.repeated(plan.cache_min_images)
    workers = plan.cache_workers if plan.cache_workers is not None else _cpu_workers(12)
    n_photos = len(set(map(str, CocoDetection(rep, "train").file_names)))
    rec.set("setup", {"teacher": plan.teacher, "precision": precision, "device": str(device),
                      "batch": plan.cache_batch, "workers": workers, "cpu_count": os.cpu_count(),
                      "train_images": len(rep.image_ids("train")), "distinct_photos": n_photos})

    # 1. throughput: forward alone before and after the job (bracketing, as bench_cache), the job twice (the first
    # run pays cuDNN/allocator warm-up and the page cache; the second is the steady state a long job sees).
    job_out = work.root / "cache_repeated.zarr"
    cfg = load_config(CacheConfig, None, work.cache_words(rep, job_out, "overwrite=true"))
    manifest = bench_cache.job_plan(rep, teacher, plan.samples_per_shard)
    fwd_before = bench_cache.forward_only(rep, "train", teacher, manifest, plan.cache_batch, str(device), precision)
    rec.set("forward_images_per_s_before", fwd_before)
    jobs = []
    for _ in range(2):
        res = cache_run(cfg)
        jobs.append(res["images_per_second"])
        rec.set("job_images_per_s", jobs)
    geometry = res["manifest"]["geometry"]
    rec.set("input_hw", geometry["input_hw"])
    rec.set("effective_precision", res["manifest"]["precision"])
    fwd_after = bench_cache.forward_only(rep, "train", teacher, res["manifest"], plan.cache_batch, str(device),
                                         precision)
    fwd = (fwd_before + fwd_after) / 2
    rec.set("forward_images_per_s_after", fwd_after)
    ratio = jobs[-1] / fwd
    rec.set("job_over_forward", ratio)
    rec.check("cache job / teacher forward (images/s)", round(ratio, 3), ">= 0.9", ratio >= 0.9)

    # 2. what bounds the job: its input pipeline alone (the job's workers, no teacher)
    loader = loader_rate(rep, "train", geometry, plan.cache_batch, workers)
    rec.set("loader_alone_images_per_s", loader)
    rec.set("bound_by", "decode/preprocess (CPU)" if loader < fwd else "teacher forward")

    # 3. bytes per image of the base train split's cache, float16 (the one sections 1/4/5 read) and int8
    sizes = {}
    for dtype, path in (("float16", work.cache_path), ("int8", work.root / "cache_train_int8.zarr")):
        words = work.cache_words(data, path, "overwrite=true", f"dtype={dtype}")
        cache_run(load_config(CacheConfig, None, words))
        info = cache_info(str(path))
        sizes[dtype] = {"bytes_per_image": info["bytes_per_image"],
                        "arrays": {k: {"shape": a["shape"], "bytes_per_image": a["bytes_per_image"],
                                       "raw_bytes_per_image": a["raw_bytes_per_image"]}
                                   for k, a in info["arrays"].items()}}
        rec.set("bytes_per_image", sizes)

    # 4. decode alone, CPU draft vs torchvision on the device: last and guarded, since it is a what-if (the job does
    # not decode on the GPU) and a decoder missing from this torchvision build must not cost the figures above
    try:
        rec.set("decode", decode_rates(rep, "train", geometry, plan.decode_files, device))
    except Exception as e:
        rec.set("decode", {"error": f"{type(e).__name__}: {e}"[:1000]})
        rec.note(f"decode comparison failed: {type(e).__name__}: {str(e)[:200]}")


# ---- section 3 ------------------------------------------------------------------------------------------------------
def _latency_row(name: str, runtime: str, precision: str, report: dict) -> dict:
    entry = report["models"][0]
    lat = entry["latency"]
    return {"model": name, "runtime": runtime, "precision": precision, "input_hw": entry.get("input_hw"),
            "forward_median_ms": lat["forward"]["median_ms"], "forward_p90_ms": lat["forward"]["p90_ms"],
            "end_to_end_median_ms": lat["end_to_end"]["median_ms"], "end_to_end_p90_ms": lat["end_to_end"]["p90_ms"],
            "timer": lat["forward"]["timer"]}


def section_latency(plan: Plan, work: Work, rec: Recorder) -> None:
    """Batch-1 latency through the evaluator (``rtcodetr evaluate --latency``), one model per call."""
    import bench_latency

    from rtcodetr.evaluate.api import evaluate_models

    device = _device()
    data_root, models = bench_latency.prepare_models(list(plan.latency_presets), list(plan.latency_yolo),
                                                     plan.latency_size, work.root / "latency")
    rec.set("setup", {"size": plan.latency_size, "warmup": plan.latency_warmup,
                      "iterations": plan.latency_iterations, "device": str(device), "models": list(models)})
    common = dict(latency=True, device=str(device), imgsz=plan.latency_size, warmup=plan.latency_warmup,
                  iterations=plan.latency_iterations, complexity=False, max_images=1, plot=False, batch_size=1)
    rows, errors = [], []
    for precision in plan.latency_precisions:
        if precision == "fp16" and device.type != "cuda":
            rec.note("fp16 eager latency needs CUDA: skipped on the CPU")
            continue
        for name, path in models.items():
            print(f"[gpu-check] latency: {name} {precision}", flush=True)
            try:
                report = evaluate_models(data_root, {name: path}, None, half=precision == "fp16", **common)
                rows.append(_latency_row(name, "pytorch eager", precision, report))
            except Exception as e:
                rows.append({"model": name, "runtime": "pytorch eager", "precision": precision,
                             "error": f"{type(e).__name__}: {e}"[:2000]})
                errors.append(f"{name} {precision}: {type(e).__name__}: {str(e)[:300]}")
            rec.set("rows", rows)
    rec.set("onnx", onnx_latency(plan, models, data_root, device, common, rows, rec))
    if errors:
        raise RuntimeError("some models failed: " + "; ".join(errors))


def onnx_latency(plan: Plan, models: dict[str, str], data_root: Path, device, common: dict, rows: list,
                 rec: Recorder) -> dict[str, Any]:
    """ONNX Runtime latency of the RT-DETR presets when ``rtcodetr.export`` and a fitting provider are present.

    Guarded so this file works before and after the export lands: each missing piece is a "skipped" with the reason,
    and a failure here is recorded without failing the section (eager latency is what the section must deliver).
    """
    try:
        from rtcodetr.export import export_onnx
    except ImportError as e:
        return {"status": "skipped", "reason": f"rtcodetr.export not available ({e})"}
    try:
        import onnxruntime as ort
    except ImportError:
        return {"status": "skipped", "reason": "onnxruntime is not installed"}
    providers = list(ort.get_available_providers())
    if device.type == "cuda" and "CUDAExecutionProvider" not in providers:
        return {"status": "skipped", "providers": providers,
                "reason": f"onnxruntime has no CUDA provider (available: {', '.join(providers)})"}
    from rtcodetr.evaluate.api import evaluate_models

    out: dict[str, Any] = {"status": "ok", "providers": providers, "errors": []}
    for precision in plan.latency_precisions:
        if precision == "fp16" and device.type != "cuda":
            continue
        for name, path in models.items():
            if not Path(path).is_dir():  # YOLO yamls: ultralytics exports them itself, not this path
                continue
            try:
                # its own folder: the export writes the graph's preprocessor_config.json beside it
                onnx_path = Path(path).parent / f"{name}-onnx-{precision}" / "model.onnx"
                # random weights: an untrained RT-DETR's encoder scores tie within float32 rounding, so the parity
                # figures are recorded by the export but not enforced (bench_export_parity.py checks a trained one)
                export_onnx(path, onnx_path, opset=17, image_size=(plan.latency_size, plan.latency_size),
                            half=precision == "fp16", tolerance=float("inf"), verbose=False)
                report = evaluate_models(data_root, {f"{name}-onnx": str(onnx_path)}, None,
                                         half=precision == "fp16", **common)
                provider = "cuda" if device.type == "cuda" else "cpu"
                runtime = report["models"][0].get("runtime", "onnxruntime")  # tensorrt when that provider ran
                rows.append(_latency_row(name, f"{runtime} {provider}", precision, report))
                rec.set("rows", rows)
            except Exception as e:
                out["errors"].append(f"{name} {precision}: {type(e).__name__}: {str(e)[:500]}")
    if "TensorrtExecutionProvider" in providers:
        out["tensorrt"] = "provider present: load_detector prefers it on CUDA (the rows' runtime says which ran)"
    if out["errors"]:
        out["status"] = "failed"
        rec.note(f"ONNX latency: {len(out['errors'])} failure(s), see result.onnx.errors")
    return out


# ---- section 4 ------------------------------------------------------------------------------------------------------
def _train_records(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("type") == "train"]


def _weights_diff(a: Path, b: Path) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    exact = set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
    rel = max(((wa[k].float() - wb[k].float()).abs().max() / wa[k].float().abs().max().clamp_min(1e-12)).item()
              for k in wa if wa[k].is_floating_point() and wa[k].numel())
    return {"exact": exact, "max_rel_diff": rel}


def compare_runs(a: list[dict], b: list[dict], stop: int, window: int = 10) -> dict[str, Any]:
    """Loss sequences of a straight run ``a`` and a stopped-and-resumed run ``b`` (``stop`` = the resume step).

    ``noise_before``: median relative difference of the total loss over the ``window`` steps up to ``stop``, where
    both runs were fresh processes with the same seed (0 on a deterministic device; on a GPU, run-to-run
    nondeterminism such as atomic adds in ``grid_sample``'s backward). ``after``: the same over the ``window`` steps
    after the resume. A resume that restored everything continues the same trajectory, so ``after`` stays of the
    order of ``noise_before``; a lost optimizer state or a skipped / repeated batch makes it jump.
    """
    import numpy as np

    la = {r["step"]: r["loss/total"] for r in a}
    lb = {r["step"]: r["loss/total"] for r in b}
    steps_b = [r["step"] for r in b]
    lr_a = {r["step"]: {k: v for k, v in r.items() if k.startswith("lr/")} for r in a}
    lr_b = {r["step"]: {k: v for k, v in r.items() if k.startswith("lr/")} for r in b}

    def rel(s: int) -> float:
        return abs(la[s] - lb[s]) / max(abs(la[s]), 1e-12)

    before = [rel(s) for s in range(max(1, stop - window + 1), stop + 1) if s in la and s in lb]
    after = [rel(s) for s in range(stop + 1, stop + window + 1) if s in la and s in lb]
    return {
        "steps_logged_once": steps_b == sorted(set(steps_b)) == sorted(la),
        "losses_exact": all(la.get(s) == lb.get(s) for s in la),
        "lr_exact": lr_a == lr_b,
        "noise_before": float(np.median(before)) if before else None,
        "after": float(np.median(after)) if after else None,
        "max_rel_diff": max((rel(s) for s in la if s in lb), default=None),
    }


def section_stability(plan: Plan, work: Work, rec: Recorder) -> None:
    """The real trainer, fp16, distilled from the section-2 cache: a straight run and a stop + resume=auto run."""
    import numpy as np

    from rtcodetr.config import load_config
    from rtcodetr.train_student.train import run
    from rtcodetr.train_student.config import TrainConfig

    device = _device()
    data = work.data()
    cache = work.cache()
    student = work.model(plan.stab_student)
    words = stability_words(plan, data.root, student, cache)
    rec.set("setup", {"student": plan.stab_student, "steps": plan.stab_steps, "stop_at": plan.stab_stop,
                      "precision": plan.stab_precision, "device": str(device), "words": words})
    a_dir, b_dir = work.root / "stability_straight", work.root / "stability_resumed"
    for d in (a_dir, b_dir):
        shutil.rmtree(d, ignore_errors=True)
    timings = {}
    for label, out, extra in (("straight", a_dir, []), ("first_part", b_dir, [f"stop_after_steps={plan.stab_stop}"]),
                              ("resumed", b_dir, ["resume=auto"])):
        print(f"[gpu-check] stability: {label} run", flush=True)
        t0 = time.perf_counter()
        result = run(load_config(TrainConfig, None, [*words, f"out={out}", *extra]))
        timings[label] = time.perf_counter() - t0
        rec.set("seconds", timings)
        if label == "first_part" and not result.get("interrupted"):
            raise RuntimeError(f"stop_after_steps={plan.stab_stop} did not stop the run: {result}")
    a, b = _train_records(a_dir), _train_records(b_dir)
    losses = np.array([r["loss/total"] for r in a], dtype=np.float64)
    k = max(1, len(losses) // 4)
    first, last = float(losses[:k].mean()), float(losses[-k:].mean())
    finite = bool(np.isfinite(losses).all() and np.isfinite([r["loss/total"] for r in b]).all())
    steps_s = plan.stab_steps / max(timings["straight"], 1e-9)
    rec.set("loss", {"first_quarter_mean": first, "last_quarter_mean": last, "steps": len(losses),
                     "curve_every_10": [round(float(x), 4) for x in losses[::10]]})
    rec.set("straight_run_steps_per_s_incl_startup", steps_s)
    cmp = compare_runs(a, b, plan.stab_stop)
    cmp["weights"] = _weights_diff(a_dir / "final", b_dir / "final")
    rec.set("resume", cmp)
    rec.check("every loss finite (both runs)", finite, "true", finite, kind="required")
    rec.check("loss goes down (last quarter / first quarter, mean total loss)", round(last / first, 3), "< 1",
              last < first, kind="required")
    exact = cmp["losses_exact"] and cmp["weights"]["exact"]
    noise = cmp["noise_before"] or 0.0
    # Exact on a deterministic device; elsewhere the losses after the resume must stay within a few times the
    # run-to-run noise both fresh runs showed just before the stop (plus a float floor).
    within = cmp["after"] is not None and cmp["after"] <= 5 * noise + 1e-6
    resumed_ok = cmp["steps_logged_once"] and cmp["lr_exact"] and (exact or (device.type == "cuda" and within))
    rec.check("resume = uninterrupted run (steps, lr, losses, weights)",
              "exact" if exact else f"after/noise {cmp['after']:.2e}/{noise:.2e}",
              "exact (CPU) or within 5x the pre-stop run-to-run noise (GPU)", resumed_ok, kind="required")


# ---- section 5 ------------------------------------------------------------------------------------------------------
def _cache_arrays(path: Path) -> dict[str, Any]:
    import numpy as np

    from rtcodetr.cache_teacher.storage import open_group

    group = open_group(str(path), "r")
    return {name: np.asarray(arr[...]) for name, arr in group.arrays() if not name.startswith("shard_done")}


def _launch_error(proc: subprocess.CompletedProcess) -> str:
    """The lines that say what went wrong in an ``accelerate launch`` output (not torchrun's own traceback)."""
    text = f"{proc.stdout or ''}\n{proc.stderr or ''}"
    said = [line for line in text.splitlines() if "error" in line.lower() and "error_file" not in line
            and "elastic" not in line and "ChildFailedError" not in line]
    return "\n".join(said[:8]) or text[-2000:]


def section_multi_gpu(plan: Plan, work: Work, rec: Recorder) -> None:
    """Two processes: the cache job equals one process; the trainer runs and counts both processes."""
    import numpy as np
    import torch

    on_cuda = torch.cuda.is_available()
    n_gpu = torch.cuda.device_count() if on_cuda else 0
    if on_cuda and n_gpu < 2:
        raise SectionSkipped(f"one GPU ({torch.cuda.get_device_name(0)}): two processes on one GPU measure nothing "
                             "the single-process sections do not")
    env = {**os.environ, "TQDM_DISABLE": "1"}
    if not on_cuda:
        # accelerate's --cpu launcher starts ONE process; --multi_gpu with no visible GPU starts two under torchrun
        # and they join with gloo (what the tests do)
        env["CUDA_VISIBLE_DEVICES"] = ""
    rec.set("setup", {"processes": 2, "gpus": n_gpu, "backend": "nccl" if on_cuda else "gloo (CPU)"})
    data = work.data()
    ref = work.cache()
    student = work.model(plan.stab_student)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--dynamo_backend", "no"]

    out = work.root / "cache_train_2proc.zarr"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.run([*launch, "--mixed_precision", cache_precision(plan), "-m", "rtcodetr.cache_teacher",
                           *work.cache_words(data, out)], env=env, capture_output=True, text=True)
    rec.set("cache_seconds", time.perf_counter() - t0)
    if proc.returncode != 0:
        raise RuntimeError(f"2-process cache job failed (exit {proc.returncode}): {_launch_error(proc)}")
    a, b = _cache_arrays(ref), _cache_arrays(out)
    diffs, exact = {}, set(a) == set(b)
    for name in a:
        x, y = a[name].astype(np.float64), b.get(name, np.zeros_like(a[name])).astype(np.float64)
        exact &= bool(np.array_equal(x, y))
        diffs[name] = float(np.abs(x - y).max() / max(np.abs(x).max(), 1e-12)) if x.size else 0.0
    rec.set("cache_max_rel_diff", diffs)
    # float16 storage rounds at 2^-11 relative: a reduction order that differs between devices may flip one step
    close = set(a) == set(b) and max(diffs.values()) <= 2 ** -9
    rec.check("2-process cache = 1-process cache", "exact" if exact else f"max rel diff {max(diffs.values()):.2e}",
              "exact, or within float16 rounding (2^-9 relative)", exact or close, kind="required")

    run_dir = work.root / "train_2proc"
    shutil.rmtree(run_dir, ignore_errors=True)
    words = multi_train_words(plan, data.root, student, ref, run_dir, on_cuda)
    t0 = time.perf_counter()
    proc = subprocess.run([*launch, "--mixed_precision", "no", "-m", "rtcodetr.train_student", *words], env=env,
                          capture_output=True, text=True, cwd=REPO)
    rec.set("train_seconds", time.perf_counter() - t0)
    if proc.returncode != 0:
        raise RuntimeError(f"2-process training failed (exit {proc.returncode}): {_launch_error(proc)}")
    results = json.loads((run_dir / "results.json").read_text())
    recs = _train_records(run_dir)
    rec.set("train", {"num_processes": results.get("num_processes"), "steps": results.get("steps"),
                      "images_per_s_last": recs[-1].get("images_per_s") if recs else None})
    ok = results.get("num_processes") == 2 and results.get("steps") == plan.multi_train_steps
    rec.check("2-process training ran every step on 2 processes",
              f"{results.get('num_processes')} processes, {results.get('steps')} steps",
              f"2 processes, {plan.multi_train_steps} steps", ok, kind="required")


SECTION_FUNCS: dict[str, Callable[[Plan, Work, Recorder], None]] = {
    "1": section_train_step, "2": section_cache_job, "3": section_latency, "4": section_stability,
    "5": section_multi_gpu,
}


# ---- pre-flight (also a child: it imports torch and touches CUDA, which the parent never does) --------------------
def preflight() -> dict[str, Any]:
    """Device, versions, what is importable; never raises."""
    import importlib
    import importlib.metadata as md
    import platform

    info: dict[str, Any] = {"python": sys.version.split()[0], "executable": sys.executable,
                            "platform": platform.platform(), "cpu_count": os.cpu_count(), "missing": []}
    for mod in REQUIRED_MODULES:
        try:
            importlib.import_module(mod)
        except Exception as e:
            info["missing"].append(f"{mod} ({type(e).__name__}: {e})")
    versions = {}
    for dist in ("torch", "torchvision", "transformers", "accelerate", "zarr", "numcodecs", "pycocotools",
                 "ultralytics", "onnxruntime", "onnxruntime-gpu", "numpy", "pillow", "timm"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    info["versions"] = versions
    try:
        import torch

        info["torch_cuda"] = torch.version.cuda
        info["cuda_available"] = torch.cuda.is_available()
        info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        info["gpus"] = []
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                info["gpus"].append({"name": p.name, "capability": f"{p.major}.{p.minor}",
                                     "memory_gib": round(p.total_memory / 2**30, 1),
                                     "multiprocessors": p.multi_processor_count})
            info["bf16_supported"] = torch.cuda.is_bf16_supported()
        info["torch_threads"] = torch.get_num_threads()
    except Exception as e:
        info["torch_error"] = f"{type(e).__name__}: {e}"
    try:
        import onnxruntime as ort

        info["onnxruntime_providers"] = list(ort.get_available_providers())
    except Exception:
        info["onnxruntime_providers"] = None
    try:
        import rtcodetr

        info["rtcodetr"] = {"version": rtcodetr.__version__, "path": str(Path(rtcodetr.__file__).parent)}
        importlib.import_module("rtcodetr.export")
        info["rtcodetr_export"] = True
    except ImportError:
        info["rtcodetr_export"] = False
    except Exception as e:
        info["rtcodetr_error"] = f"{type(e).__name__}: {e}"
    return info


def child_main(args: argparse.Namespace) -> int:
    plan = DRY if args.dry_run else REAL
    rec = Recorder(Path(args.result))
    sys.path.insert(0, str(BENCH))
    try:
        if args.section == "preflight":
            rec.data["result"] = preflight()
            rec.finish("ok")
            return 0
        work = Work(Path(args.work), plan, Path(args.taco) if args.taco else None)
        SECTION_FUNCS[args.section](plan, work, rec)
    except SectionSkipped as e:
        rec.finish("skipped", str(e))
        return 0
    except BaseException as e:  # noqa: BLE001 -- the parent reads the error from here, whatever it was
        rec.finish("failed", f"{type(e).__name__}: {e}"[:4000], traceback.format_exc()[-8000:])
        traceback.print_exc()
        return 1
    failed = [c["name"] for c in rec.data["checks"] if c["kind"] == "required" and not c["met"]]
    if failed:
        rec.finish("failed", "required check(s) failed: " + "; ".join(failed))
        return 1
    rec.finish("ok")
    return 0


# --------------------------------------------------------------------------------------------------------------------
# Parent side: environment, bundle, the section loop, the report
# --------------------------------------------------------------------------------------------------------------------
def find_taco(explicit: str | None) -> Path | None:
    """The TACO sample folder (``annotations.json`` + ``images/``): --taco, the bundle, a ``shared/`` inside the
    checkout (what the device tool carries), then the ``../shared`` beside it (the development layout).
    ``--taco none``: synthetic images (what a checkout without the sample gets)."""
    if explicit == "none":
        return None
    candidates = [Path(explicit)] if explicit else [BUNDLE / "taco", REPO / "shared" / "data" / "taco" / "sample",
                                                    REPO.parent / "shared" / "data" / "taco" / "sample"]
    for c in candidates:
        if (c / "annotations.json").is_file() and (c / "images").is_dir():
            return c.resolve()
    if explicit:
        raise SystemExit(_usage_error(f"--taco {explicit}: no annotations.json + images/ there"))
    return None


def reuse_work(work: Path, stamp: dict) -> None:
    """Keep a work dir made by the same plan and data (its models and caches are reused); empty one made by another.

    Only a folder this script stamped is ever emptied: a ``--work`` pointing at anything else with content is an
    error, so a typo cannot delete someone's files.
    """
    path = work / "gpu_check_work.json"
    if path.is_file():
        if json.loads(path.read_text()) == json.loads(json.dumps(stamp)):
            return
        print(f"[gpu-check] {work} was made by another plan or data: emptying it", flush=True)
        shutil.rmtree(work)
    elif work.is_dir() and any(work.iterdir()):
        raise SystemExit(_usage_error(f"--work {work} exists, is not empty and was not made by gpu_check"))
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stamp))


def _usage_error(msg: str) -> int:
    print(f"gpu_check: error: {msg}", file=sys.stderr)
    return 2


def _wheel_dist(path: Path) -> tuple[str, str, str]:
    """(distribution name, version, python tag) from a wheel file name."""
    parts = path.name[:-4].split("-")
    return parts[0].replace("_", "-").lower(), parts[1], parts[-3]


def install_bundle(site: Path) -> list[str]:
    """Install the bundle's wheels whose version differs from what this interpreter has, into ``site``.

    Returns the installed wheel names (empty where the environment already matches, e.g. the development venv).
    A wheel built for another Python is skipped: it is meant for the device image's python3.
    """
    import importlib.metadata as md

    wheels = sorted((BUNDLE / "whl").glob("*.whl"))
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    todo = []
    for w in wheels:
        name, version, pytag = _wheel_dist(w)
        if pytag.startswith("cp") and pytag != tag and "abi3" not in w.name:
            continue
        try:
            have = md.version(name)
        except md.PackageNotFoundError:
            have = None
        if have != version:
            todo.append(w)
    if not todo:
        return []
    marker = site / ".installed"
    if marker.is_file() and marker.read_text().split() == [w.name for w in todo]:
        return [w.name for w in todo]
    shutil.rmtree(site, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--disable-pip-version-check", "--target", str(site), *map(str, todo)]
    print(f"[gpu-check] installing {len(todo)} bundled wheel(s) into {site}", flush=True)
    subprocess.run(cmd, check=True)
    marker.write_text("\n".join(w.name for w in todo))
    return [w.name for w in todo]


def make_bundle(dest: Path, photos: int, taco: Path | None) -> int:
    """Write the device bundle: wheels of ``BUNDLE_PACKAGES`` (this environment's versions, for the device's
    Python) and the first ``photos`` TACO sample photos with their annotations. Run it where pip can reach PyPI."""
    import importlib.metadata as md

    dest = dest.resolve()
    whl = dest / "whl"
    shutil.rmtree(whl, ignore_errors=True)  # two versions of one package would stop the whole install there
    whl.mkdir(parents=True)
    platforms = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                 "manylinux1_x86_64"]
    for name in BUNDLE_PACKAGES:
        version = md.version(name)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
               DEVICE_PYTHON, "--implementation", "cp", *[a for p in platforms for a in ("--platform", p)],
               "-d", str(whl), f"{name}=={version}"]
        print(f"[gpu-check] bundle: {name}=={version}", flush=True)
        subprocess.run(cmd, check=True)
    used = sum(p.stat().st_size for p in whl.glob("*.whl"))
    if taco is None:
        print("[gpu-check] bundle: no TACO sample found; the device run will use synthetic images", flush=True)
    else:
        src = json.loads((taco / "annotations.json").read_text())
        images = sorted(src["images"], key=lambda im: im["id"])
        keep = []
        out_images = dest / "taco" / "images"
        shutil.rmtree(dest / "taco", ignore_errors=True)
        for im in images:
            f = taco / "images" / im["file_name"]
            if len(keep) >= photos or used + f.stat().st_size > BUNDLE_BYTES:
                break
            (out_images / im["file_name"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, out_images / im["file_name"])
            used += f.stat().st_size
            keep.append(im)
        ids = {im["id"] for im in keep}
        subset = {**src, "images": keep, "annotations": [a for a in src["annotations"] if a["image_id"] in ids]}
        (dest / "taco" / "annotations.json").write_text(json.dumps(subset))
        print(f"[gpu-check] bundle: {len(keep)} TACO photos", flush=True)
    total = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(f"[gpu-check] bundle: {dest} holds {total / 2**20:.1f} MiB", flush=True)
    if dest != BUNDLE.resolve():
        print(f"[gpu-check] the device run looks for it at {BUNDLE}: move it there", flush=True)
    print("[gpu-check] device call: run(command=\"python3 benchmarks/gpu_check.py --out $OUT/gpu_check\", "
          "carry=[\".gpu_check\"], timeout_s=560)", flush=True)
    return 0


def child_env(plan: Plan, site: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    paths = ([str(site)] if site else []) + [str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "False",
                "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    env.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="rtcodetr-yolo-cfg-"))
    if plan.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # a dry run is a CPU run, also on a GPU machine
        env.setdefault("OMP_NUM_THREADS", "1")  # small shared CPUs: more threads make OpenMP spin
    return env


def run_child(section: str, args: argparse.Namespace, env: dict[str, str], work: Path, taco: Path | None,
              timeout: float, log: Path) -> tuple[dict[str, Any], str, float]:
    """Run one section in a new process group; returns (its result file, status, seconds)."""
    result = work / "results" / f"{section}.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", section, "--work", str(work),
           "--result", str(result)] + (["--dry-run"] if args.dry_run else []) + (["--taco", str(taco)] if taco else [])
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            rc = proc.returncode
    seconds = time.perf_counter() - t0
    try:
        data = json.loads(result.read_text())
    except (OSError, json.JSONDecodeError):
        data = {"result": {}, "checks": [], "notes": [], "error": None}
    if timed_out:
        status = "timeout"
        data["error"] = f"timed out after {timeout:.0f} s (process group killed); figures above were measured first"
    elif data.get("status") in ("ok", "skipped", "failed") and rc in (0, 1):
        status = data["status"]
    else:
        status = "failed"
        data["error"] = data.get("error") or f"exit code {rc} without a result; log tail:\n{_tail(log, 40)}"
    if status == "failed" and not data.get("error"):
        data["error"] = _tail(log, 40)
    return data, status, seconds


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def plan_lines(plan: Plan, sections: list[str], taco: Path | None) -> list[str]:
    lines = [f"plan: {plan.name} on {plan.device}; deadline {plan.deadline_s} s; data: "
             + (f"TACO photos from {taco}" + (f" (first {plan.taco_photos})" if plan.taco_photos else "")
                if taco else "synthetic images (no TACO sample found)")]
    what = {
        "2": f"{plan.teacher} teacher, {plan.cache_precision}, >= {plan.cache_min_images} train images, batch "
             f"{plan.cache_batch}; forward alone vs job; loader; decode; float16/int8 bytes",
        "1": f"{plan.student} @ {plan.student_size}, batch {plan.batch}; teacher {plan.teacher}; "
             f"{'/'.join(plan.step_precisions)}; {plan.step_warmup}+{plan.step_steps} steps per kind",
        "4": f"{plan.stab_student}, {plan.stab_precision}, {plan.stab_steps} steps straight vs stop at "
             f"{plan.stab_stop} + resume, distilled from the cache",
        "3": f"{', '.join(plan.latency_presets + plan.latency_yolo)} @ {plan.latency_size}, "
             f"{'/'.join(plan.latency_precisions)}, {plan.latency_warmup}+{plan.latency_iterations} iterations; ONNX "
             "when available",
        "5": f"2 processes: cache job equality and {plan.multi_train_steps} training steps (>= 2 GPUs; gloo on CPU)",
    }
    for s in sections:
        lines.append(f"  {s}. {SECTIONS[s][0]:<11} budget {plan.budgets[s]:>3} s, timeout {plan.timeouts[s]:>3} s: "
                     f"{what[s]}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="See the module docstring and benchmarks/README.md.")
    p.add_argument("--out", help="folder for gpu_check.json / .md / .log")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny presets, every section (< 3 min on 2 cores)")
    p.add_argument("--work", help="models, data, caches (default: a folder under the temp dir, kept for reruns)")
    p.add_argument("--sections", help="comma-separated subset, e.g. 2,1 (default: all)")
    p.add_argument("--taco", help="TACO sample folder (annotations.json + images/); default: the bundle, shared/; "
                                  "'none': synthetic images")
    p.add_argument("--deadline", type=float, help="seconds for the whole run (default: the plan's)")
    p.add_argument("--make-bundle", metavar="DIR", help="write the device bundle (wheels + TACO photos) and exit")
    p.add_argument("--photos", type=int, default=32, help="TACO photos in the bundle (size-capped)")
    p.add_argument("--section", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.section:
        return child_main(args)
    if args.make_bundle:
        return make_bundle(Path(args.make_bundle), args.photos, find_taco(args.taco))
    if not args.out:
        return _usage_error("--out DIR is required")
    plan = DRY if args.dry_run else REAL
    sections = [s.strip() for s in args.sections.split(",")] if args.sections else list(ORDER)
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        return _usage_error(f"--sections: unknown {unknown} (known: {', '.join(SECTIONS)})")
    sections = [s for s in ORDER if s in sections]
    t_start = time.perf_counter()
    deadline = args.deadline or plan.deadline_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or Path(tempfile.gettempdir()) / f"rtcodetr-gpu-check-{plan.name}").resolve()
    taco = find_taco(args.taco)
    reuse_work(work, {"format_version": FORMAT_VERSION, "plan": asdict(plan), "taco": str(taco)})
    (work / "logs").mkdir(parents=True, exist_ok=True)

    site = None
    installed: list[str] = []
    if (BUNDLE / "whl").is_dir():
        site = work / "site"
        try:
            installed = install_bundle(site)
        except subprocess.CalledProcessError as e:
            return _usage_error(f"installing the bundled wheels failed ({e}); rebuild the bundle with --make-bundle")
        site = site if installed else None
    env = child_env(plan, site)

    print(f"[gpu-check] {plan.name} run, out {out.resolve()}, work {work}", flush=True)
    pre, status, _ = run_child("preflight", args, env, work, taco, 180, work / "logs" / "preflight.log")
    env_info = pre.get("result", {})
    env_info["bundle_installed"] = installed
    for line in _preflight_lines(env_info) + plan_lines(plan, sections, taco):
        print(f"[gpu-check] {line}", flush=True)
    if status != "ok" or env_info.get("missing"):
        print(f"[gpu-check] pre-flight failed: {pre.get('error') or env_info.get('missing')}", file=sys.stderr)
        print("[gpu-check] on a machine without the project's venv, carry the bundle (--make-bundle) "
              "and run again", file=sys.stderr)
        return 2
    if plan.device == "cuda" and not env_info.get("cuda_available"):
        return _usage_error("no CUDA device visible: the real run needs one (use --dry-run to check on a CPU)")

    report: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "mode": plan.name,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv] if argv is None else ["gpu_check.py", *argv],
        "work": str(work), "taco": str(taco) if taco else None, "environment": env_info,
        "plan": {k: v for k, v in asdict(plan).items()}, "deadline_s": deadline, "sections": [],
    }
    log_all = out / "gpu_check.log"
    log_all.write_text(_tail(work / "logs" / "preflight.log", 200) + "\n")
    for sid in sections:
        name, title = SECTIONS[sid]
        left = deadline - (time.perf_counter() - t_start) - 10  # keep 10 s to write the report
        timeout = min(plan.timeouts[sid], left)
        entry: dict[str, Any] = {"id": sid, "name": name, "title": title, "budget_s": plan.budgets[sid],
                                 "timeout_s": round(timeout)}
        if timeout < 20:
            entry.update(status="skipped", seconds=0.0, error=f"not started: {max(left, 0):.0f} s left of the "
                         f"{deadline:.0f} s deadline", result={}, checks=[], notes=[])
            report["sections"].append(entry)
            print(f"[gpu-check] section {sid} {name}: skipped (deadline)", flush=True)
            continue
        print(f"[gpu-check] section {sid} {name}: running (timeout {timeout:.0f} s)", flush=True)
        log = work / "logs" / f"section_{sid}.log"
        data, status, seconds = run_child(sid, args, env, work, taco, timeout, log)
        entry.update(status=status, seconds=round(seconds, 1), error=data.get("error"), result=data.get("result", {}),
                     checks=data.get("checks", []), notes=data.get("notes", []))
        if data.get("traceback"):
            entry["traceback"] = data["traceback"]
        report["sections"].append(entry)
        with open(log_all, "a") as f:
            f.write(f"\n===== section {sid} {name}: {status} in {seconds:.1f} s =====\n{_tail(log, 400)}\n")
        print(f"[gpu-check] section {sid} {name}: {status} in {seconds:.1f} s"
              + (f" -- {str(entry['error']).splitlines()[0][:200]}" if entry["error"] else ""), flush=True)
        _write(out, report, t_start)
    report["sections"].sort(key=lambda e: e["id"])
    _write(out, report, t_start)
    print(markdown(report, compact=True), flush=True)
    bad = [e for e in report["sections"] if e["status"] in ("failed", "timeout")]
    return 1 if bad else 0


def _write(out: Path, report: dict, t_start: float) -> None:
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    report["summary"] = {s: sum(e["status"] == s for e in report["sections"])
                         for s in ("ok", "failed", "timeout", "skipped")}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=_json_default))
    try:
        md = markdown(report)
    except Exception:  # the JSON above holds everything; a rendering bug must not end the run
        md = f"# GPU check: the tables could not be rendered\n\n```\n{traceback.format_exc()}```\n"
    (out / "gpu_check.md").write_text(md)


def _preflight_lines(info: dict) -> list[str]:
    v = info.get("versions", {})
    gpus = info.get("gpus") or []
    lines = [f"python {info.get('python')} ({info.get('executable')}), {info.get('cpu_count')} CPUs, "
             f"torch {v.get('torch')} (CUDA {info.get('torch_cuda')}, cuDNN {info.get('cudnn')})",
             "device: " + ("; ".join(f"{g['name']} (sm {g['capability']}, {g['memory_gib']} GiB)" for g in gpus)
                           if gpus else "no CUDA device (CPU)"),
             "packages: " + ", ".join(f"{k} {val}" for k, val in v.items() if k != "torch"),
             f"onnxruntime providers: {info.get('onnxruntime_providers')}; rtcodetr.export: "
             f"{'yes' if info.get('rtcodetr_export') else 'no'}"]
    if info.get("bundle_installed"):
        lines.append(f"bundle installed: {', '.join(info['bundle_installed'])}")
    if info.get("missing"):
        lines.append(f"MISSING: {'; '.join(info['missing'])}")
    return lines


# --------------------------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------------------------
def _f(x: Any, fmt: str = ".3f") -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def _key_figures(e: dict) -> str:
    r = e.get("result", {})
    if e["name"] == "train_step":
        parts = [f"{s['precision']} {s['mode']} {_f(s.get('time_x_baseline'), '.2f')}x"
                 for s in r.get("steps", []) if s.get("mode") != "baseline" and "error" not in s]
        return ", ".join(parts)
    if e["name"] == "cache_job":
        return (f"job/forward {_f(r.get('job_over_forward'), '.2f')}, bound by {r.get('bound_by', '–')}"
                if "job_over_forward" in r else "")
    if e["name"] == "latency":
        rows = [x for x in r.get("rows", []) if "error" not in x]
        return f"{len(rows)} timings" + (f"; ONNX {r['onnx'].get('status')}" if "onnx" in r else "")
    if e["name"] == "stability":
        loss, res = r.get("loss", {}), r.get("resume", {})
        return (f"loss {_f(loss.get('first_quarter_mean'), '.2f')} -> {_f(loss.get('last_quarter_mean'), '.2f')}, "
                f"resume {'exact' if res.get('losses_exact') else _f(res.get('after'), '.1e')}") if loss else ""
    if e["name"] == "multi_gpu":
        return "; ".join(f"{c['name']}: {'met' if c['met'] else 'MISSED'}" for c in e.get("checks", []))
    return ""


def markdown(report: dict, compact: bool = False) -> str:
    """``gpu_check.md``; ``compact``: the status table and goals only (what the command prints at the end)."""
    env = report["environment"]
    gpus = env.get("gpus") or []
    lines = [f"# GPU check ({report['mode']}) — {report['created_utc']}", "",
             f"Device: {', '.join(g['name'] for g in gpus) if gpus else 'CPU only'}; torch "
             f"{env.get('versions', {}).get('torch')} (CUDA {env.get('torch_cuda')}); {env.get('cpu_count')} CPUs; "
             f"total {report.get('seconds', 0):.0f} s (deadline {report['deadline_s']:.0f} s).", "",
             "| # | section | status | s | timeout s | key figures | error |", "|---|---|---|---:|---:|---|---|"]
    for e in sorted(report["sections"], key=lambda e: e["id"]):
        err = (str(e.get("error") or "").splitlines() or [""])[0][:160].replace("|", "/")
        lines.append(f"| {e['id']} | {e['name']} | {e['status']} | {e.get('seconds', 0):.0f} | {e['timeout_s']} | "
                     f"{_key_figures(e)} | {err} |")
    checks = [(e["id"], c) for e in report["sections"] for c in e.get("checks", [])]
    if checks:
        lines += ["", "| # | check | value | goal | met |", "|---|---|---|---|---|"]
        for sid, c in checks:
            met = "yes" if c["met"] else ("**no**" if c["kind"] == "required" else "no")
            lines.append(f"| {sid} | {c['name']} ({c['kind']}) | {c['value']} | {c['goal']} | {met} |")
    if compact:
        return "\n".join(lines) + "\n"
    for note in report["plan"].get("notes", []):
        lines += ["", f"Note: {note}"]
    by_id = {e["id"]: e for e in report["sections"]}
    if "1" in by_id and by_id["1"]["result"].get("steps"):
        r = by_id["1"]["result"]
        s = r.get("setup", {})
        lines += ["", f"## 1. Training step ({s.get('student')} @ {s.get('size')}, batch {s.get('batch')}, teacher "
                      f"{s.get('teacher')} at its own geometry; median of {s.get('steps')} steps after "
                      f"{s.get('warmup')} warm-up)", "",
                  "| precision | step | median s | x baseline | peak MiB | x baseline (memory) |",
                  "|---|---|---:|---:|---:|---:|"]
        for x in r["steps"]:
            if "error" in x:
                lines.append(f"| {x['precision']} | {x['mode']} | failed: {x['error'][:100]} | | | |")
                continue
            lines.append(f"| {x['precision']} | {x['mode']} | {x['median_s']:.4f} | {_f(x.get('time_x_baseline'))} "
                         f"| {x['peak_mb'] - x['start_mb']:.0f} | {_f(x.get('memory_x_baseline'))} |")
    if "2" in by_id and by_id["2"]["result"].get("setup"):
        r = by_id["2"]["result"]
        s = r["setup"]
        d = r.get("decode", {})
        lines += ["", f"## 2. Caching job ({s['teacher']}, {s['precision']}, input {r.get('input_hw')}, batch "
                      f"{s['batch']}, {s['workers']} workers, {s['train_images']} images from "
                      f"{s['distinct_photos']} photos)", "",
                  f"- teacher forward alone: {_f(r.get('forward_images_per_s_before'), '.1f')} / "
                  f"{_f(r.get('forward_images_per_s_after'), '.1f')} images/s (before / after the job)",
                  f"- caching job: {', '.join(_f(x, '.1f') for x in r.get('job_images_per_s', []))} images/s (cold, "
                  f"warm); warm / forward = **{_f(r.get('job_over_forward'), '.2f')}** (goal >= 0.9)",
                  f"- the job's loader alone (decode + resize + normalise, {s['workers']} workers): "
                  f"{_f(r.get('loader_alone_images_per_s'), '.1f')} images/s; bound by: {r.get('bound_by', '–')}"]
        if d.get("error"):
            lines.append(f"- decode comparison failed: {d['error']}")
        elif d:
            lines.append(f"- decode + resize of {d['files']} photos ({d['mean_megapixels']:.1f} MP), one process: "
                         f"PIL draft {d['pil_draft_images_per_s_one_process']:.1f} images/s; torchvision decode_jpeg "
                         f"on {d['torchvision_decode_jpeg_device']} {d['torchvision_decode_jpeg_images_per_s']:.1f} "
                         "images/s (batched, full-resolution decode, antialiased resize on the device)")
        for dtype, v in r.get("bytes_per_image", {}).items():
            per = ", ".join(f"{k} {a['bytes_per_image'] / 1024:.0f} KiB (raw {a['raw_bytes_per_image'] / 1024:.0f})"
                            for k, a in v["arrays"].items() if not k.endswith("_scale") and k in
                            ("backbone", "encoder", "logits", "boxes"))
            lines.append(f"- bytes per image, {dtype}: **{v['bytes_per_image'] / 2**20:.2f} MiB** ({per})")
    if "3" in by_id and by_id["3"]["result"].get("rows"):
        r = by_id["3"]["result"]
        lines += ["", f"## 3. Latency, batch 1 at {r['setup']['size']} ({r['setup']['warmup']} warm-up + "
                      f"{r['setup']['iterations']} iterations; ms)", "",
                  "| model | runtime | precision | forward median | forward p90 | end-to-end median | end-to-end p90 |",
                  "|---|---|---|---:|---:|---:|---:|"]
        for x in r["rows"]:
            if "error" in x:
                lines.append(f"| {x['model']} | {x['runtime']} | {x['precision']} | failed: {x['error'][:80]} | | | |")
            else:
                lines.append(f"| {x['model']} | {x['runtime']} | {x['precision']} | {x['forward_median_ms']:.2f} | "
                             f"{x['forward_p90_ms']:.2f} | {x['end_to_end_median_ms']:.2f} | "
                             f"{x['end_to_end_p90_ms']:.2f} |")
        onnx = r.get("onnx", {})
        lines.append(f"\nONNX Runtime: {onnx.get('status', '–')}"
                     + (f" — {onnx['reason']}" if onnx.get("reason") else "")
                     + (f"; errors: {'; '.join(onnx['errors'])}" if onnx.get("errors") else ""))
    if "4" in by_id and by_id["4"]["result"].get("loss"):
        r = by_id["4"]["result"]
        s, loss, res = r["setup"], r["loss"], r.get("resume", {})
        lines += ["", f"## 4. Stability ({s['student']}, {s['precision']}, {s['steps']} steps, stop at {s['stop_at']} "
                      "+ resume=auto)", "",
                  f"- loss (total, weighted): first quarter {loss['first_quarter_mean']:.3f} -> last quarter "
                  f"{loss['last_quarter_mean']:.3f}; every 10th step: {loss['curve_every_10']}",
                  f"- resume: steps logged once {res.get('steps_logged_once')}, lr identical {res.get('lr_exact')}, "
                  f"losses identical {res.get('losses_exact')} (max rel diff {_f(res.get('max_rel_diff'), '.1e')}; "
                  f"median rel diff {_f(res.get('noise_before'), '.1e')} before the stop, {_f(res.get('after'), '.1e')}"
                  f" after), final weights identical {res.get('weights', {}).get('exact')} (max rel diff "
                  f"{_f(res.get('weights', {}).get('max_rel_diff'), '.1e')})",
                  f"- run times (s, incl. start-up and the final validation): "
                  f"{', '.join(f'{k} {v:.1f}' for k, v in r.get('seconds', {}).items())}"]
    if "5" in by_id:
        e = by_id["5"]
        err = "\n  ".join(str(e.get("error") or "").splitlines()[:4])
        lines += ["", "## 5. Several GPUs", "", f"- {e['status']}: {err}".rstrip(": ")]
        if e["result"].get("train"):
            lines.append(f"- 2-process cache {_f(e['result'].get('cache_seconds'), '.1f')} s; training "
                         f"{e['result']['train']} in {_f(e['result'].get('train_seconds'), '.1f')} s")
    notes = [(e["id"], n) for e in report["sections"] for n in e.get("notes", [])]
    if notes:
        lines += ["", "## Notes", ""] + [f"- section {sid}: {n}" for sid, n in notes]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
