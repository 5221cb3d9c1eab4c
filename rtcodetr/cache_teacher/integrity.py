"""Is every finished shard of a cache readable? And if not: which shards, which samples, and the command that fixes it.

A damaged cache shows up as a truncated or missing shard object (a copy cut short, a full disk while copying, a
partial rsync) or as bytes that no longer decompress. zarr stores each shard's chunk index with a crc32c checksum,
so reading any sample of a shard checks that the index is intact; a missing shard object reads silently as zeros
(zarr's fill value), so its existence is checked explicitly. Two depths:

- ``full=False`` (the trainer's pre-flight check; cheap): every shard object of the arrays that will be read exists,
  and one sample per shard and array reads (which verifies the shard index). Costs one sample read per shard and
  array (1/``samples_per_shard`` of the data) plus an existence query per object. Finds truncation, missing
  objects and overwritten indexes; not a flipped bit inside a chunk.
- ``full=True`` (``rtcodetr cache-teacher verify CACHE --full``): every sample of every array is read and decoded,
  i.e. the whole cache is read once. Also finds chunks that no longer decompress.

The repair is ``--redo-shards``: rerun the command that made the cache with the damaged shard numbers; only those
shards are recomputed (their markers and objects are removed first, then the job writes them whole like any
unfinished shard).
An HDF5 export cannot be repaired in place: copy it again or export it again from the zarr cache.
"""
from __future__ import annotations

import json
import shlex
from typing import Any, Iterable, Sequence

import numpy as np

from rtcodetr.cache_teacher.manifest import CacheCorruptError, CacheMismatchError
from rtcodetr.cache_teacher.storage import ShardPlan, array_specs, is_hdf5, shard_object_key

MAX_IDS_LISTED = 6
MAX_SHARDS_LISTED = 10


def _object_exists(array: Any, k: int) -> bool | None:
    """Whether the store object holding shard ``k`` of a zarr ``array`` exists (None when it cannot be asked: an
    HDF5 dataset, or a zarr version without the calls used here)."""
    try:
        from zarr.core.sync import sync

        return bool(sync(array.store.exists(shard_object_key(array, k))))
    except (AttributeError, ImportError, TypeError):
        return None


def scan_shards(source, manifest: dict, *, arrays: Iterable[str] | None = None, shards: Iterable[int] | None = None,
                full: bool = False, progress: bool = False) -> dict[int, list[str]]:
    """Problems of each damaged shard: ``{k: ["encoder: <what>", ...]}`` (empty dict: nothing found).

    ``source``: the cache's ``ZarrSource`` / ``HDF5Source``; ``arrays``: array names to check (default: every array
    of the cache; the small per-sample arrays are always included); ``shards``: which shards (default: the finished
    ones -- unfinished shards are not damaged, only not written yet).
    """
    from tqdm.auto import tqdm

    specs = array_specs(manifest)
    names = list(specs) if arrays is None else [n for n in specs if n in set(arrays) or not specs[n][2]]
    plan = ShardPlan.of(manifest)
    if shards is None:
        shards = np.flatnonzero(source.finished()).tolist()
    problems: dict[int, list[str]] = {}
    for k in tqdm(list(shards), desc="scan shards", unit="shard", disable=not progress):
        start, end = plan.bounds(k)
        for name in names:
            try:
                array = source.array(name)
                if _object_exists(array, k) is False:
                    problems.setdefault(k, []).append(f"{name}: object missing")
                    continue
                np.asarray(array[start:end] if full else array[start])
            except Exception as e:  # noqa: BLE001 -- any failure to read is what this scan reports
                problems.setdefault(k, []).append(f"{name}: {type(e).__name__}: {' '.join(str(e).split())}")
    return problems


def redo_command(manifest: dict, url: str, shards: Sequence[int]) -> str:
    """The ``rtcodetr cache-teacher`` command that recomputes ``shards`` of the cache at ``url``: the settings
    recorded in its manifest (every key that differs from the defaults) plus ``--redo-shards``."""
    from rtcodetr.cache_teacher.config import CacheConfig
    from rtcodetr.config import config_to_dict

    recorded = dict(manifest.get("config") or {})
    words = ["rtcodetr", "cache-teacher"]
    for key in ("data", "split", "teacher"):
        if recorded.get(key):
            words += [f"--{key}", str(recorded[key])]
    words += ["--out", str(url)]

    def flat(d: dict, prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            if isinstance(v, dict) and k != "storage_options":
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    defaults = flat(config_to_dict(CacheConfig()))
    skip = {"data", "split", "teacher", "out", "overwrite", "progress", "redo_shards", "storage_options"}
    for key, value in flat(recorded).items():
        if key not in skip and key in defaults and value != defaults[key]:
            text = value if isinstance(value, str) else json.dumps(value)
            words.append(f"{key}={text}")
    words += ["--redo-shards", ",".join(str(int(k)) for k in sorted(shards))]
    return " ".join(shlex.quote(w) for w in words)


def corrupt_cache_error(url: str, manifest: dict, problems: dict[int, list[str]]) -> CacheCorruptError:
    """One message for damaged shards: which shards, their samples and image ids, what failed, and the fix."""
    plan = ShardPlan.of(manifest)
    ids = manifest["dataset"]["image_ids"]
    parts = []
    for k in sorted(problems)[:MAX_SHARDS_LISTED]:
        start, end = plan.bounds(k)
        shown = ", ".join(str(i) for i in ids[start:end][:MAX_IDS_LISTED]) + (", ..." if end - start > MAX_IDS_LISTED
                                                                             else "")
        parts.append(f"shard {k} (samples {start}-{end - 1}, image ids {shown}): {'; '.join(problems[k][:3])}")
    more = f"; and {len(problems) - MAX_SHARDS_LISTED} more shards" if len(problems) > MAX_SHARDS_LISTED else ""
    if is_hdf5(url):
        fix = ("this HDF5 export is damaged: copy it again, or export it again from the zarr cache with "
               f"`rtcodetr cache-teacher export ZARR_CACHE --to {url}`")
    else:
        fix = f"recompute only these shards with: {redo_command(manifest, url, sorted(problems))}"
    return CacheCorruptError(f"teacher cache {url} is damaged: {len(problems)} shard(s) cannot be read: "
                             f"{' | '.join(parts)}{more}. Fix: {fix}", shards=sorted(problems))


def check_cache_integrity(url: str, source, manifest: dict, *, arrays: Iterable[str] | None = None,
                          full: bool = False, progress: bool = False) -> None:
    """Raise ``CacheMismatchError`` (field ``shard_done``) if a shard is unfinished, ``CacheCorruptError`` if a
    finished one cannot be read (see the module docstring for what ``full`` adds)."""
    done = source.finished()
    if not done.all():
        missing = np.flatnonzero(~done).tolist()
        raise CacheMismatchError(
            f"teacher cache {url}: {len(missing)} of {done.size} shards are not finished (first: {missing[0]}); "
            "rerun the cache-teacher command that made it to complete it", field="shard_done")
    problems = scan_shards(source, manifest, arrays=arrays, full=full, progress=progress)
    if problems:
        raise corrupt_cache_error(url, manifest, problems)


__all__ = ["CacheCorruptError", "scan_shards", "redo_command", "corrupt_cache_error", "check_cache_integrity"]
