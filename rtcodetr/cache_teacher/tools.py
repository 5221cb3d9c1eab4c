"""``info`` / ``verify`` / ``export`` on an existing teacher cache."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from rtcodetr.cache_teacher.codecs import cosine
from rtcodetr.cache_teacher.manifest import CacheMismatchError
from rtcodetr.cache_teacher.storage import ShardPlan, array_specs, open_source, require_manifest


def cache_info(url: str, storage_options: dict | None = None) -> dict[str, Any]:
    """Manifest, finished shards/samples and, per array, bytes on disk, bytes per image and compression ratio.

    Returns ``{"manifest", "num_samples", "num_shards", "finished_shards", "finished_samples", "arrays": {name:
    {"dtype", "shape", "stored_bytes", "bytes_per_image", "raw_bytes_per_image", "compression_ratio"}},
    "total_stored_bytes", "bytes_per_image"}``. Per-image figures are over finished samples.
    """
    manifest = require_manifest(url, storage_options)
    src = open_source(url, storage_options)
    plan = ShardPlan.of(manifest)
    done = src.finished()
    finished_samples = int(sum(plan.bounds(k)[1] - plan.bounds(k)[0] for k in np.flatnonzero(done)))
    arrays = {}
    for name, (shape, dtype, _) in array_specs(manifest).items():
        stored = src.nbytes_stored(name)
        raw = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        per_image = stored / finished_samples if finished_samples else float("nan")
        arrays[name] = {"dtype": manifest["tensors"].get(name, {}).get("dtype", str(dtype)), "shape": list(shape),
                        "stored_bytes": stored, "bytes_per_image": per_image, "raw_bytes_per_image": raw,
                        "compression_ratio": raw / per_image if finished_samples and per_image else float("nan")}
    total = sum(a["stored_bytes"] for a in arrays.values())
    return {
        "manifest": manifest,
        "num_samples": plan.num_samples,
        "num_shards": plan.num_shards,
        "finished_shards": int(done.sum()),
        "finished_samples": finished_samples,
        "arrays": arrays,
        "total_stored_bytes": total,
        "bytes_per_image": total / finished_samples if finished_samples else float("nan"),
    }


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n}"


def format_info(info: dict[str, Any]) -> str:
    m = info["manifest"]
    t, d, g = m["teacher"], m["dataset"], m["geometry"]
    lines = [
        f"format        {m['format']} v{m['format_version']} (rtcodetr {m.get('package_version')}, {m.get('created')})",
        f"teacher       {t['id']} ({t['family']}, {t.get('num_parameters', '?')} params, {t['num_queries']} queries, "
        f"{len(t['label_map'])} labels)",
        f"              config sha256 {t['config_sha256'][:16]}  weights sha256 {t['weights_sha256'][:16]}",
        f"dataset       {d.get('name')} split '{d['split']}'{'' if d.get('labelled', True) else ' (unlabelled)'}, "
        f"{d['num_images']} images, annotations sha256 "
        f"{d['annotations_sha256'][:16]}",
        f"geometry      {g['mode']} "
        + (f"{g['size_hw']}" if g["mode"] == "fixed" else f"shortest {g['shortest_edge']} longest {g['longest_edge']}")
        + f", padded input {g['input_hw']}, stride {g['stride']}, normalize "
        + ("none" if not g.get("normalize") else f"mean {g['normalize']['mean']} std {g['normalize']['std']}")
        + f", boxes relative to {g['box_reference']} input, draft {g.get('draft')}",
        f"precision     {m['precision']['mixed_precision']} on {m['precision']['device_type']}",
        f"storage       {m['storage']['compressor']['name']} level {m['storage']['compressor']['level']}, "
        f"{m['storage']['samples_per_shard']} samples/shard, {m['storage']['num_shards']} shards",
        f"finished      {info['finished_shards']}/{info['num_shards']} shards, "
        f"{info['finished_samples']}/{info['num_samples']} samples",
        "",
        f"{'array':<16}{'dtype':<10}{'shape':<22}{'on disk':>12}{'per image':>12}{'raw/image':>12}{'ratio':>8}",
    ]
    for name, a in info["arrays"].items():
        lines.append(f"{name:<16}{a['dtype']:<10}{str(a['shape']):<22}{_human(a['stored_bytes']):>12}"
                     f"{_human(a['bytes_per_image']):>12}{_human(a['raw_bytes_per_image']):>12}"
                     f"{a['compression_ratio']:>8.2f}")
    lines.append(f"{'total':<48}{_human(info['total_stored_bytes']):>12}{_human(info['bytes_per_image']):>12}")
    return "\n".join(lines)


def verify(url: str, teacher: str, *, samples: int = 8, data: str | None = None, device: str | None = None,
           storage_options: dict | None = None) -> dict[str, Any]:
    """Recompute ``samples`` cached samples (evenly spaced) with ``teacher`` and compare with the cache.

    The inputs are rebuilt exactly as the job did (manifest geometry, normalisation, draft decode) from the dataset
    ``data`` (default: the directory recorded in the manifest), which must match the manifest's fingerprint.
    The teacher runs in fp32. Returns ``{"indices", "teacher_matches": {field: bool}, "tensors": {name:
    {"dtype", "max_abs_diff", "max_abs_ref", "min_cosine", "mean_cosine"}}}``.
    """
    from rtcodetr.cache_teacher.geometry import PadCollate, TeacherInputs
    from rtcodetr.cache_teacher.reader import TeacherCache
    from rtcodetr.cache_teacher.teacher import Teacher
    from rtcodetr.data.dataset import CocoDetection

    cache = TeacherCache(url, storage_options=storage_options)
    m = cache.manifest
    data = data or m["config"].get("data")
    if not data:
        from rtcodetr.config import ConfigError

        raise ConfigError(f"{url}: the manifest records no dataset directory; pass --data")
    cache.check_dataset(data, m["dataset"]["split"])
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t = Teacher(teacher, dev, "no")
    ident = t.identity()
    matches = {f: ident[f] == m["teacher"][f] for f in ("config_sha256", "weights_sha256", "label_map")}
    base = CocoDetection(data, m["dataset"]["split"])
    geometry = m["geometry"]
    inputs = TeacherInputs(base, geometry, draft=bool(geometry.get("draft", False)))
    n = len(cache)
    idx = sorted({int(round(x)) for x in np.linspace(0, n - 1, num=min(samples, n))})
    collate = PadCollate(geometry["input_hw"])
    stats: dict[str, dict[str, Any]] = {
        name: {"dtype": m["tensors"][name]["dtype"], "max_abs_diff": 0.0, "max_abs_ref": 0.0, "cosines": []}
        for name in cache.tensors}
    for i in idx:
        batch = collate([inputs[i]])
        fresh = t.forward(batch, cache.tensors, geometry["input_hw"], geometry["box_reference"])
        stored = cache[i]
        for name in cache.tensors:
            ref = fresh[name][0].numpy()
            got = stored[name]
            s = stats[name]
            s["max_abs_diff"] = max(s["max_abs_diff"], float(np.abs(ref - got).max()))
            s["max_abs_ref"] = max(s["max_abs_ref"], float(np.abs(ref).max()))
            s["cosines"].append(cosine(ref, got))
    for s in stats.values():
        cos = s.pop("cosines")
        s["min_cosine"], s["mean_cosine"] = float(min(cos)), float(np.mean(cos))
    return {"indices": idx, "teacher_matches": matches, "tensors": stats}


def format_verify(result: dict[str, Any]) -> str:
    lines = [f"recomputed samples {result['indices']}"]
    for f, ok in result["teacher_matches"].items():
        lines.append(f"teacher {f}: {'matches the manifest' if ok else 'DIFFERS from the manifest'}")
    lines.append(f"{'tensor':<10}{'dtype':<10}{'max |diff|':>14}{'max |ref|':>14}{'min cos':>12}{'mean cos':>12}")
    for name, s in result["tensors"].items():
        lines.append(f"{name:<10}{s['dtype']:<10}{s['max_abs_diff']:>14.6g}{s['max_abs_ref']:>14.6g}"
                     f"{s['min_cosine']:>12.6f}{s['mean_cosine']:>12.6f}")
    return "\n".join(lines)


def verify_passed(result: dict[str, Any], min_cosine: float) -> bool:
    return all(result["teacher_matches"].values()) and all(
        s["min_cosine"] >= min_cosine for s in result["tensors"].values())


__all__ = ["cache_info", "format_info", "verify", "format_verify", "verify_passed", "CacheMismatchError"]
