"""The caching job: run the teacher once over a split and write its outputs into a sharded zarr v3 cache.

Pipeline per process (``accelerate launch`` gives one process per device; plain ``python`` gives one)::

    DataLoader workers: decode (JPEG draft mode) -> resize -> [0,1] -> normalise        (CPU, parallel)
    main thread:        pad batch -> teacher forward (Accelerate's mixed precision)     (accelerator)
    writer thread:      encode to storage dtype -> compress -> write whole shards -> marker

Work is split by whole shards (shard ``k`` -> rank ``k % world_size``) and batches never straddle shards, so a
shard's content depends only on its own images: the same cache comes out of 1 or N processes and out of a resumed
run, and finished shards (those with a marker) are skipped when the same command runs again.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Any, Callable

import numpy as np
import torch

from rtcodetr.cache_teacher.codecs import STORAGE_DTYPES, check_dtype
from rtcodetr.cache_teacher.config import CacheConfig
from rtcodetr.cache_teacher.geometry import PadCollate, TeacherInputs, resolve_geometry, valid_cells
from rtcodetr.features import STRIDE
from rtcodetr.cache_teacher.manifest import (
    FORMAT,
    FORMAT_VERSION,
    WRITE_CHECKED,
    CacheMismatchError,
    check_fields,
    label_map_sha256,
)
from rtcodetr.cache_teacher.storage import (
    DONE_ARRAY,
    ShardPlan,
    ShardWriter,
    compressor_spec,
    create_cache,
    delete_shard_objects,
    finished_shards,
    is_hdf5,
    open_group,
    read_manifest,
)
from rtcodetr.cache_teacher.teacher import FEATURE_NAMES, TENSOR_NAMES, Teacher
from rtcodetr.config import ConfigError


def _log(msg: str, main: bool) -> None:
    if main:
        print(f"[cache-teacher] {msg}", file=sys.stderr, flush=True)


def check_config(cfg: CacheConfig) -> None:
    """Reject an unusable config before anything is loaded (``ConfigError`` naming the key)."""
    for key in ("data", "teacher", "out"):
        if not getattr(cfg, key):
            raise ConfigError(f"config key '{key}' is required (--{key} or {key}=...)")
    if is_hdf5(cfg.out):
        raise ConfigError(f"out={cfg.out}: the job writes zarr; make an HDF5 copy afterwards with "
                          "`rtcodetr cache-teacher export CACHE --to FILE.h5`")
    unknown = [t for t in cfg.tensors if t not in TENSOR_NAMES]
    if unknown or not cfg.tensors or len(set(cfg.tensors)) != len(cfg.tensors):
        raise ConfigError(f"config key 'tensors': {list(cfg.tensors)} must be distinct names from "
                          f"{list(TENSOR_NAMES)}")
    try:
        for name in cfg.tensors:
            is_map = name in FEATURE_NAMES
            check_dtype(name, cfg.dtype if is_map else cfg.prediction_dtype, is_map=is_map)
        compressor_spec(cfg.compressor, cfg.compression_level)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for key in ("samples_per_shard", "batch_size"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"config key '{key}' must be >= 1, got {getattr(cfg, key)}")
    if cfg.redo_shards and cfg.overwrite:
        raise ConfigError("redo_shards and overwrite exclude each other (overwrite recomputes every shard)")


def probe_shapes(teacher: Teacher, tensors: list[str], geometry: dict) -> dict[str, list[int]]:
    """Per-sample shapes of ``tensors``, from one forward of a blank padded input (no guessing per family)."""
    hp, wp = geometry["input_hw"]
    batch = {
        "pixel_values": torch.zeros(1, 3, hp, wp),
        "pixel_mask": torch.ones(1, hp, wp, dtype=torch.int64),
        "input_hw": torch.tensor([[hp, wp]]),
        "orig_hw": torch.tensor([[hp, wp]]),
        "affine": torch.eye(3, dtype=torch.float64)[None],
    }
    out = teacher.forward(batch, tensors, (hp, wp), geometry["box_reference"])
    shapes = {name: list(out[name].shape[1:]) for name in tensors}
    for name in tensors:
        if name in FEATURE_NAMES:
            hf, wf = shapes[name][-2:]
            want = (math.ceil(hp / STRIDE), math.ceil(wp / STRIDE))
            if (hf, wf) != want:
                raise RuntimeError(f"teacher '{name}' map is {hf}x{wf} for a {hp}x{wp} input, expected stride "
                                   f"{STRIDE} ({want[0]}x{want[1]})")
    return shapes


def build_manifest(cfg: CacheConfig, teacher: Teacher, data, geometry: dict, shapes: dict[str, list[int]],
                   mixed_precision: str, device_type: str) -> dict[str, Any]:
    """The manifest of a cache this config writes (see ``manifest.py`` for the sections)."""
    import datetime

    from rtcodetr import __version__
    from rtcodetr.config import config_to_dict

    fingerprint = data.fingerprint(cfg.split)
    num_samples = len(fingerprint["image_ids"])
    plan = ShardPlan(num_samples, cfg.samples_per_shard)
    tensors = {}
    for name in cfg.tensors:
        dtype = cfg.dtype if name in FEATURE_NAMES else cfg.prediction_dtype
        tensors[name] = {
            "shape": shapes[name],
            "dtype": dtype,
            "storage_dtype": str(STORAGE_DTYPES[dtype]),
            "scale": f"{name}_scale" if dtype == "int8" else None,
            "kind": "map" if name in FEATURE_NAMES else "prediction",
        }
    maps = [n for n in cfg.tensors if n in FEATURE_NAMES]
    geometry = dict(geometry)
    if maps:
        geometry["feature_hw"] = shapes[maps[0]][-2:]
    recorded = config_to_dict(cfg)
    recorded.pop("storage_options", None)  # may hold credentials
    recorded.pop("redo_shards", None)  # a repair of one run, not a property of the cache
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "teacher": teacher.identity(),
        "dataset": {
            "name": data.info.get("name", ""),
            "split": cfg.split,
            "labelled": data.is_labelled(cfg.split),  # informative: an unlabelled split's cache has no GT beside it
            "annotations_sha256": fingerprint["annotations_sha256"],
            "image_ids": [int(i) for i in fingerprint["image_ids"]],
            "num_images": num_samples,
            "label_map_sha256": label_map_sha256(list(data.label_map.names)),
        },
        "geometry": geometry,
        "precision": {"mixed_precision": mixed_precision, "device_type": device_type},
        "storage": {
            "samples_per_shard": cfg.samples_per_shard,
            "num_shards": plan.num_shards,
            "compressor": compressor_spec(cfg.compressor, cfg.compression_level),
            "chunking": "one chunk per sample, one shard object per samples_per_shard samples",
            "finished_marker": "shard_done/c/<k>",
        },
        "tensors": tensors,
        "config": recorded,
    }


def run(cfg: CacheConfig, *, on_shard_written: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Cache the teacher's outputs over ``cfg.split`` of ``cfg.data`` into ``cfg.out``.

    Safe to rerun: finished shards are kept, unfinished ones are (re)written. Refuses an existing cache made from a
    different teacher / dataset / geometry / storage settings (``CacheMismatchError`` naming the manifest field)
    unless ``cfg.overwrite``. ``on_shard_written(k)`` is called from the writer thread after shard ``k``'s marker
    is stored (an exception there stops the job like a crash would).

    Returns ``{"out", "num_samples", "num_shards", "shards_written", "shards_skipped", "finished", "images",
    "seconds", "images_per_second", "manifest"}`` (counts for this process; ``finished`` for the whole cache).
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from rtcodetr.data.dataset import CocoDetection
    from rtcodetr.data.prepared import PreparedData

    check_config(cfg)
    # Without an accelerator, say cpu=True: only then does Accelerate join `accelerate launch --cpu` processes into
    # one gloo group (otherwise each process believes it is alone and writes every shard).
    has_accel = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    accelerator = Accelerator(cpu=not has_accel)
    main = accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    data = PreparedData.load(cfg.data)
    base = CocoDetection(data, cfg.split)
    teacher = Teacher(cfg.teacher, accelerator.device, accelerator.mixed_precision)
    sizes = np.stack([base.heights, base.widths], axis=1)
    geometry = resolve_geometry(teacher.processor_geometry, cfg.geometry, sizes)
    geometry["draft"] = bool(cfg.draft)
    shapes = probe_shapes(teacher, list(cfg.tensors), geometry)
    manifest = build_manifest(cfg, teacher, data, geometry, shapes, teacher.mixed_precision,
                              accelerator.device.type)
    diff = data.label_map.differences(teacher.label_names)
    if diff is not None:
        _log(f"warning: the teacher's label map differs from the dataset's ({diff}); its logits/boxes cannot serve "
             "a prediction loss for this dataset (feature distillation still works)", main)

    # Only the main process inspects/creates the store; the others open it after the barrier (no half-made group).
    out, so = cfg.out, (cfg.storage_options or None)
    if main:
        existing = read_manifest(out, so)
        if existing is not None and not cfg.overwrite:
            check_fields(existing, manifest, WRITE_CHECKED,
                         what=f"refusing to write into the existing cache {out} (use --overwrite to replace it)",
                         existing_name="the cache", expected_name="this run")
        if cfg.redo_shards:
            redo = sorted(set(cfg.redo_shards))
            num_shards = manifest["storage"]["num_shards"]
            if existing is None:
                raise ConfigError(f"redo_shards={redo}: there is no cache at {out} to repair")
            if redo[0] < 0 or redo[-1] >= num_shards:
                raise ConfigError(f"redo_shards={redo}: the cache has shards 0..{num_shards - 1}")
            # Marker first (a kill in between leaves an unfinished shard, never a finished one with missing data),
            # then the damaged objects, which zarr would read back even to overwrite them whole. The loop below
            # rewrites unfinished shards whole; every object touched here belongs to shard k alone.
            repair = open_group(out, "r+", so)
            for k in redo:
                repair[DONE_ARRAY][k] = 0
                delete_shard_objects(repair, existing, k)
            _log(f"--redo-shards: shards {redo} are recomputed", main)
        if existing is None or cfg.overwrite:
            if existing is not None:
                _log(f"--overwrite: replacing the cache at {out}", main)
            create_cache(out, manifest, overwrite=cfg.overwrite, storage_options=so)
    accelerator.wait_for_everyone()
    group = open_group(out, "r+", so)
    stored_manifest = dict(group.attrs["manifest"])
    check_fields(stored_manifest, manifest, WRITE_CHECKED, what=f"cache {out} changed under this process")
    plan = ShardPlan(len(base), cfg.samples_per_shard)
    done = finished_shards(group)
    owned = plan.owned(rank, world)
    todo = [k for k in owned if not done[k]]
    skipped = len(owned) - len(todo)
    batches = [list(range(s, min(s + cfg.batch_size, plan.bounds(k)[1])))
               for k in todo for s in range(plan.bounds(k)[0], plan.bounds(k)[1], cfg.batch_size)]
    n_images = sum(len(b) for b in batches)
    _log(f"{plan.num_samples} images, {plan.num_shards} shards of {plan.samples_per_shard}; "
         f"{int(done.sum())} already finished; {world} process(es); teacher {teacher.family} on "
         f"{accelerator.device} ({teacher.mixed_precision}); input {geometry['input_hw']}", main)

    inputs = TeacherInputs(base, geometry, draft=cfg.draft)
    loader = torch.utils.data.DataLoader(
        inputs, batch_sampler=batches, num_workers=cfg.num_workers, collate_fn=PadCollate(geometry["input_hw"]),
        pin_memory=accelerator.device.type == "cuda",
        multiprocessing_context="fork" if cfg.num_workers > 0 and sys.platform == "linux" else None,
    )
    writer = ShardWriter(group, manifest, max_pending=cfg.writer_queue, on_shard_written=on_shard_written,
                         url=str(out))
    t0 = time.perf_counter()
    bar = tqdm(total=n_images, unit="img", desc=f"cache {cfg.split}", disable=not (main and cfg.progress))
    try:
        for batch in loader:
            outs = teacher.forward(batch, list(cfg.tensors), geometry["input_hw"], geometry["box_reference"])
            input_hw = batch["input_hw"].numpy()
            meta = {
                "valid": np.array([valid_cells(hw) for hw in input_hw], dtype=np.int32).reshape(-1, 2),
                "input_hw": input_hw.astype(np.int32),
                "image_id": batch["image_id"].numpy(),
            }
            writer.submit(batch["index"].numpy(), {k: v.numpy() for k, v in outs.items()}, meta)
            bar.update(len(batch["index"]))
        writer.close()
    except BaseException:
        writer.close(abort=True)  # shards completed before the failure still get written and marked
        bar.close()
        kept = int(finished_shards(group).sum())
        _log(f"stopped: {kept}/{plan.num_shards} shards are finished and kept; run the same command again to "
             "resume", True)
        raise
    bar.close()
    seconds = time.perf_counter() - t0
    accelerator.wait_for_everyone()
    done = finished_shards(group)
    result = {
        "out": str(out),
        "num_samples": plan.num_samples,
        "num_shards": plan.num_shards,
        "shards_written": sorted(writer.shards_written),
        "shards_skipped": skipped,
        "finished": bool(done.all()),
        "images": n_images,
        "seconds": seconds,
        "images_per_second": n_images / seconds if seconds > 0 else float("nan"),
        "manifest": manifest,
    }
    _log(f"done: {int(done.sum())}/{plan.num_shards} shards finished; this process wrote "
         f"{len(writer.shards_written)} shard(s), {n_images} images in {seconds:.1f} s "
         f"({result['images_per_second']:.1f} img/s)", main)
    return result


__all__ = ["run", "check_config", "build_manifest", "probe_shapes", "CacheMismatchError"]
