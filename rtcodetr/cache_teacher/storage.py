"""Cache storage: zarr v3 group layout, sharded arrays, finished-shard markers, background shard writer, HDF5 export.

Layout of a cache (any path or fsspec URL zarr accepts)::

    CACHE/zarr.json                 group metadata; attributes {"manifest": {...}} (see manifest.py)
    CACHE/backbone   [N, Cb, Hf, Wf]  chunk = 1 sample, shard = S samples (zarr ShardingCodec)
    CACHE/encoder    [N, Ce, Hf, Wf]  idem
    CACHE/logits     [N, Q, K]        idem
    CACHE/boxes      [N, Q, 4]        idem
    CACHE/<map>_scale [N, C] float32  only for int8 maps; chunk = S samples (one small object per shard)
    CACHE/valid      [N, 2] int32     unpadded feature rows, cols; chunk = S samples
    CACHE/input_hw   [N, 2] int32     teacher input h, w before padding; chunk = S samples
    CACHE/image_id   [N] int64        chunk = S samples
    CACHE/shard_done [num_shards] uint8, chunk = 1: one tiny object per finished shard

Shard ``k`` holds samples ``[k*S, min((k+1)*S, N))`` of every array, so one process writes whole objects and never
touches another's: the zarr v3 sharding codec rewrites a whole shard object on any write, and a partial write
would need a read-modify-write that races with other writers.

Finished-shard markers: after every array of shard ``k`` is written (each write returns only once the object is in
the store; LocalStore writes through a temporary file and a rename), the writer stores chunk ``k`` of
``shard_done`` -- its own object (``shard_done/c/k``). Nothing is ever read-modified-written, so several
processes on one file system or on an object store (where a PUT of one object is atomic) cannot lose each other's
markers, which a shared JSON list of finished shards would. A killed run leaves at worst a shard whose data objects
are (partly) written but whose marker is missing; the next run rewrites that shard whole.
"""
from __future__ import annotations

import json
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rtcodetr.cache_teacher.codecs import STORAGE_DTYPES, decode, encode
from rtcodetr.cache_teacher.manifest import CacheCorruptError, CacheMismatchError, CacheNotFoundError
from rtcodetr.config import ConfigError
from rtcodetr.errors import InputError

META_ARRAYS: dict[str, tuple[tuple[int, ...], np.dtype]] = {
    "valid": ((2,), np.dtype(np.int32)),
    "input_hw": ((2,), np.dtype(np.int32)),
    "image_id": ((), np.dtype(np.int64)),
}
DONE_ARRAY = "shard_done"
F16_MAX = float(np.finfo(np.float16).max)  # 65504
F16_TINY = float(np.finfo(np.float16).tiny)  # 6.1e-05, smallest normal float16
COMPRESSORS = ("blosc", "zstd", "gzip", "none")
HDF5_SUFFIXES = (".h5", ".hdf5")


def is_hdf5(path_or_url: str | os.PathLike) -> bool:
    """Whether a cache location is an HDF5 export (by suffix, or by the HDF5 signature of an existing file)."""
    s = str(path_or_url)
    if s.lower().endswith(HDF5_SUFFIXES):
        return True
    p = Path(s)
    if "://" not in s and p.is_file():
        with open(p, "rb") as f:
            return f.read(8) == b"\x89HDF\r\n\x1a\n"
    return False


def compressor_spec(name: str, level: int) -> dict[str, Any]:
    """The manifest record of a compressor choice (validated)."""
    if name not in COMPRESSORS:
        raise ValueError(f"unknown compressor '{name}' (choose from {', '.join(COMPRESSORS)})")
    return {"name": name, "level": int(level)}


def _zarr_compressors(spec: dict[str, Any], itemsize: int) -> Any:
    from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec

    name, level = spec["name"], spec["level"]
    if name == "blosc":
        # byte shuffle groups the exponent bytes of float16/float32 together, which is where the redundancy is
        return [BloscCodec(cname="zstd", clevel=level, shuffle="shuffle" if itemsize > 1 else "bitshuffle",
                           typesize=itemsize)]
    if name == "zstd":
        return [ZstdCodec(level=level)]
    if name == "gzip":
        return [GzipCodec(level=level)]
    return None


@dataclass(frozen=True)
class ShardPlan:
    """Sample ranges of the shards of a cache with ``num_samples`` samples and ``samples_per_shard`` per shard."""

    num_samples: int
    samples_per_shard: int

    @classmethod
    def of(cls, manifest: dict) -> "ShardPlan":
        """The plan a cache's manifest records."""
        return cls(len(manifest["dataset"]["image_ids"]), int(manifest["storage"]["samples_per_shard"]))

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.samples_per_shard)

    def bounds(self, k: int) -> tuple[int, int]:
        start = k * self.samples_per_shard
        return start, min(start + self.samples_per_shard, self.num_samples)

    def shard_of(self, i: int) -> int:
        return i // self.samples_per_shard

    def owned(self, rank: int, world_size: int) -> list[int]:
        """Shards written by process ``rank``: ``k % world_size == rank`` (round robin keeps ranks balanced)."""
        return [k for k in range(self.num_shards) if k % world_size == rank]


def array_specs(manifest: dict) -> dict[str, tuple[tuple[int, ...], np.dtype, bool]]:
    """``{array name: (per-sample shape, numpy dtype, sharded per sample)}`` for every array of a cache."""
    specs: dict[str, tuple[tuple[int, ...], np.dtype, bool]] = {}
    for name, t in manifest["tensors"].items():
        specs[name] = (tuple(t["shape"]), STORAGE_DTYPES[t["dtype"]], True)
        if t.get("scale"):
            specs[t["scale"]] = ((int(t["shape"][0]),), np.dtype(np.float32), False)
    for name, (shape, dtype) in META_ARRAYS.items():
        specs[name] = (shape, dtype, False)
    return specs


# --------------------------------------------------------------------------------------------------------------- zarr
def open_group(url: str, mode: str, storage_options: dict | None = None):
    """Open the zarr v3 group at ``url`` (a path or an fsspec URL)."""
    import zarr

    kwargs: dict[str, Any] = {"mode": mode, "zarr_format": 3, "use_consolidated": False}
    if storage_options and "://" in str(url):
        kwargs["storage_options"] = storage_options
    return zarr.open_group(store=str(url), **kwargs)


def require_manifest(url: str, storage_options: dict | None = None) -> dict:
    """The manifest of the cache at ``url``; ``CacheNotFoundError`` naming ``url`` when there is none."""
    manifest = read_manifest(url, storage_options)
    if manifest is None:
        raise CacheNotFoundError(str(url))
    return manifest


def read_manifest(url: str, storage_options: dict | None = None) -> dict | None:
    """The manifest of the cache at ``url``, or None if there is no zarr group there."""
    if is_hdf5(url):
        import h5py

        if not Path(url).is_file():
            return None
        try:
            with h5py.File(url, "r") as f:
                return json.loads(f.attrs["manifest"])
        except (OSError, KeyError) as e:  # truncated (a copy cut short), or not an export
            raise CacheCorruptError(
                f"teacher cache {url} cannot be opened as an HDF5 export ({e}): copy it again, or export it again "
                f"from the zarr cache with `rtcodetr cache-teacher export ZARR_CACHE --to {url}`") from e
    try:
        group = open_group(url, "r", storage_options)
    except (FileNotFoundError, KeyError, ValueError) as e:  # zarr raises these for "no group here"
        if "://" not in str(url) and Path(url).exists() and any(Path(url).iterdir()):
            raise CacheMismatchError(f"{url} exists but is not a zarr v3 group ({e})", field="format") from e
        return None
    manifest = group.attrs.get("manifest")
    if manifest is None:
        raise CacheMismatchError(f"{url} is a zarr group without a teacher-cache manifest; refusing to use it",
                                 field="manifest")
    return dict(manifest)


def create_cache(url: str, manifest: dict, *, overwrite: bool, storage_options: dict | None = None):
    """Create the group, every array (empty) and the marker array; returns the group.

    With ``overwrite`` an existing group at ``url`` is deleted first.
    """
    group = open_group(url, "w" if overwrite else "w-", storage_options)
    plan = ShardPlan.of(manifest)
    n, s = plan.num_samples, plan.samples_per_shard
    comp = manifest["storage"]["compressor"]
    for name, (shape, dtype, per_sample) in array_specs(manifest).items():
        group.create_array(
            name,
            shape=(n, *shape),
            dtype=dtype,
            chunks=(1, *shape) if per_sample else (s, *shape),
            shards=(s, *shape) if per_sample else None,
            compressors=_zarr_compressors(comp, dtype.itemsize),
            fill_value=0,
        )
    group.create_array(DONE_ARRAY, shape=(plan.num_shards,), dtype=np.uint8, chunks=(1,), compressors=None,
                       fill_value=0)
    group.attrs["manifest"] = manifest
    return group


def shard_object_key(array, k: int) -> str:
    """Store key of the object that holds shard ``k`` (samples ``[k*S, (k+1)*S)``) of a zarr ``array``: one object
    per shard for the sharded per-sample arrays, one chunk of S samples for the small ones."""
    key = array.metadata.encode_chunk_key((k,) + (0,) * (array.ndim - 1))
    return f"{array.store_path.path}/{key}" if array.store_path.path else key


def delete_shard_objects(group, manifest: dict, k: int) -> None:
    """Remove shard ``k``'s object from every array (before recomputing a damaged shard: zarr reads an existing
    shard object even to overwrite it whole, and a truncated one fails its checksum)."""
    from zarr.core.sync import sync

    for name in array_specs(manifest):
        array = group[name]
        sync(array.store.delete(shard_object_key(array, k)))


def finished_shards(group) -> np.ndarray:
    """bool ``[num_shards]``: which shards carry a finished marker."""
    return np.asarray(group[DONE_ARRAY][:]).astype(bool)


class CacheWriteError(OSError):
    """Storing a shard failed (disk full, object store error); ``shard`` is the shard that was being written. Not
    bad input: finished shards keep their markers and rerunning the same command resumes."""

    def __init__(self, message: str, shard: int):
        super().__init__(message)
        self.shard = shard


class ShardWriter:
    """Encodes teacher outputs and writes whole shards from a background thread.

    The main thread ``submit``s batches (float32 numpy, in any order within a shard); the thread encodes them to
    their storage dtype into a per-shard buffer and, once every sample of a shard has arrived, writes all arrays of
    that shard and then its marker. The queue is bounded so a slow store throttles the teacher rather than memory.
    An exception in the thread is re-raised in the main thread by the next ``submit`` or by ``close``.
    """

    _STOP = object()

    def __init__(self, group, manifest: dict, *, max_pending: int = 4,
                 on_shard_written: Callable[[int], None] | None = None, url: str = "the cache"):
        self.manifest = manifest
        self.plan = ShardPlan.of(manifest)
        self.specs = array_specs(manifest)
        self.arrays = {name: group[name] for name in self.specs}
        self.url = url
        self.done = group[DONE_ARRAY]
        self.on_shard_written = on_shard_written
        self.shards_written: list[int] = []
        self._buffers: dict[int, tuple[dict[str, np.ndarray], np.ndarray]] = {}
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._warned: set[str] = set()
        self._thread = threading.Thread(target=self._loop, name="teacher-cache-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ main thread
    def submit(self, indices: np.ndarray, tensors: dict[str, np.ndarray], meta: dict[str, np.ndarray]) -> None:
        """Queue one batch.

        Args:
            indices: int64 ``[B]`` sample indices (manifest order).
            tensors: ``{name: float32 [B, *shape]}`` for every tensor of the manifest.
            meta: ``{"valid": int [B, 2], "input_hw": int [B, 2], "image_id": int [B]}``.
        """
        self._raise_if_failed()
        item = (np.asarray(indices, dtype=np.int64), tensors, meta)
        while True:
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                self._raise_if_failed()

    def close(self, *, abort: bool = False) -> None:
        """Finish: write everything queued (``abort``: still write complete shards, drop partial ones), join."""
        if self._thread.is_alive():
            self._queue.put(self._STOP)
            self._thread.join()
        if not abort:
            self._raise_if_failed()
            if self._buffers:
                raise RuntimeError(f"cache writer closed with incomplete shards {sorted(self._buffers)}")

    def _raise_if_failed(self) -> None:
        if isinstance(self._error, (CacheWriteError, InputError)):  # already names the shard / the setting to change
            raise self._error
        if self._error is not None:
            raise RuntimeError(f"teacher-cache writer thread failed: {self._error!r}") from self._error

    # ------------------------------------------------------------------ writer thread
    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is self._STOP:
                return
            if self._error is not None:
                continue  # keep draining so the producer never blocks on a dead writer
            try:
                self._add(*item)
            except BaseException as e:  # noqa: BLE001 - surfaced in the main thread
                self._error = e

    def _add(self, indices: np.ndarray, tensors: dict[str, np.ndarray], meta: dict[str, np.ndarray]) -> None:
        encoded: dict[str, np.ndarray] = {}
        for name, t in self.manifest["tensors"].items():
            if name not in tensors:
                raise KeyError(f"batch is missing tensor '{name}'")
            self._check_range(name, t["dtype"], tensors[name], meta["image_id"])
            stored, scale = encode(tensors[name], t["dtype"])
            want = tuple(t["shape"])
            if stored.shape[1:] != want:
                raise ValueError(f"tensor '{name}': batch shape {list(stored.shape[1:])} != manifest {list(want)}")
            encoded[name] = stored
            if t.get("scale"):
                encoded[t["scale"]] = scale
        for name in META_ARRAYS:
            encoded[name] = np.asarray(meta[name], dtype=META_ARRAYS[name][1])
        for row, i in enumerate(indices):
            k = self.plan.shard_of(int(i))
            start, end = self.plan.bounds(k)
            if k not in self._buffers:
                bufs = {name: np.zeros((end - start, *shape), dtype=dtype)
                        for name, (shape, dtype, _) in self.specs.items()}
                self._buffers[k] = (bufs, np.zeros(end - start, dtype=bool))
            bufs, seen = self._buffers[k]
            for name, arr in encoded.items():
                bufs[name][i - start] = arr[row]
            seen[i - start] = True
            if seen.all():
                self._write_shard(k)

    def _check_range(self, name: str, dtype: str, x: np.ndarray, image_ids: np.ndarray) -> None:
        """Non-finite teacher outputs are an error; float16 overflow is an error (it would store inf); a sample
        whose whole map sits below float16's normal range (e.g. an untrained teacher) is warned about once."""
        x = np.asarray(x)
        flat = np.abs(x.reshape(len(x), -1))
        if not np.isfinite(flat).all():
            bad = int(np.asarray(image_ids)[np.flatnonzero(~np.isfinite(flat).all(axis=1))[0]])
            raise FloatingPointError(f"teacher output '{name}' of image id {bad} is not finite")
        if dtype != "float16":
            return
        amax = flat.max(axis=1)
        if (amax > F16_MAX).any():
            j = int(np.argmax(amax))
            raise ConfigError(f"teacher output '{name}' of image id {int(np.asarray(image_ids)[j])} reaches "
                              f"{amax[j]:.3g}, beyond float16 ({F16_MAX:.0f}); use dtype=bfloat16 or int8")
        tiny = (amax > 0) & (amax < F16_TINY)
        if tiny.any() and name not in self._warned:
            import warnings

            self._warned.add(name)
            j = int(np.flatnonzero(tiny)[0])
            warnings.warn(f"teacher output '{name}' of image id {int(np.asarray(image_ids)[j])} has max |x| = "
                          f"{amax[j]:.3g}, below float16's normal range ({F16_TINY:.3g}): stored as subnormals or "
                          "zeros. Untrained teachers do this; otherwise use dtype=bfloat16 or int8", stacklevel=2)

    def _write_shard(self, k: int) -> None:
        bufs, _ = self._buffers.pop(k)
        start, end = self.plan.bounds(k)
        for name, buf in bufs.items():
            try:
                self.arrays[name][start:end] = buf
            except Exception as e:  # noqa: BLE001 -- a full disk, a failed PUT: say which shard, keep the rest
                raise CacheWriteError(
                    f"writing shard {k} (samples {start}-{end - 1}) of array '{name}' to {self.url} failed: "
                    f"{type(e).__name__}: {e}", shard=k) from e
        self.done[k] = 1  # only after every array of the shard is in the store
        self.shards_written.append(k)
        if self.on_shard_written is not None:
            self.on_shard_written(k)


# --------------------------------------------------------------------------------------------------------------- read
class _Source:
    """Per-process reading of a cache's arrays. The store handle is opened on first use in each process (a forked
    DataLoader worker must not reuse the parent's handles; h5py is not fork-safe), and pickles without it (workers
    under spawn get a fresh, unopened source). Subclasses open the handle and look arrays up in it."""

    def __init__(self) -> None:
        self._pid: int | None = None
        self._handle: Any = None
        self._arrays: dict[str, Any] = {}
        self._meta: dict[str, np.ndarray] | None = None

    def _open_handle(self) -> Any:
        raise NotImplementedError

    def _open(self) -> Any:
        if self._pid != os.getpid():
            self._handle = self._open_handle()
            self._arrays = {}
            self._meta = None
            self._pid = os.getpid()
        return self._handle

    def array(self, name: str) -> Any:
        """The (cached) array handle ``name``: a zarr array or an h5py dataset."""
        handle = self._open()
        if name not in self._arrays:
            self._arrays[name] = handle[name]
        return self._arrays[name]

    def meta(self) -> dict[str, np.ndarray]:
        """``valid`` / ``input_hw`` / ``image_id`` of every sample, read once per process: they are 20 bytes a
        sample (2.4 MB for COCO train), so one read beats three store round trips per sample."""
        self._open()
        if self._meta is None:
            self._meta = {name: self.read(name, slice(None)) for name in META_ARRAYS}
        return self._meta

    def read(self, name: str, i: int | slice) -> np.ndarray:
        return np.asarray(self.array(name)[i])

    def finished(self) -> np.ndarray:
        """bool ``[num_shards]``, read from the store on every call (writers may still be adding markers)."""
        return self.read(DONE_ARRAY, slice(None)).astype(bool)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_pid=None, _handle=None, _arrays={}, _meta=None)
        return state


class ZarrSource(_Source):
    """Reads samples from a zarr cache (a path or an fsspec URL)."""

    def __init__(self, url: str, storage_options: dict | None = None):
        super().__init__()
        self.url = str(url)
        self.storage_options = storage_options

    def _open_handle(self) -> Any:
        return open_group(self.url, "r", self.storage_options)

    def names(self) -> list[str]:
        return sorted(self._open().array_keys())

    def nbytes_stored(self, name: str) -> int:
        return int(self.array(name).nbytes_stored())


class HDF5Source(_Source):
    """Reads samples from an HDF5 export."""

    def __init__(self, path: str):
        super().__init__()
        self.path = str(path)

    def _open_handle(self) -> Any:
        import h5py

        return h5py.File(self.path, "r")

    def names(self) -> list[str]:
        return sorted(self._open().keys())

    def nbytes_stored(self, name: str) -> int:
        return int(self.array(name).id.get_storage_size())


def open_source(url: str, storage_options: dict | None = None) -> ZarrSource | HDF5Source:
    return HDF5Source(url) if is_hdf5(url) else ZarrSource(url, storage_options)


def read_sample(source, manifest: dict, i: int, tensors: list[str]) -> dict[str, np.ndarray]:
    """One sample: ``{name: float32 [*shape]}`` for ``tensors`` (dequantised) plus ``valid``, ``input_hw``,
    ``image_id``."""
    out: dict[str, np.ndarray] = {}
    for name in tensors:
        t = manifest["tensors"][name]
        scale = source.read(t["scale"], i) if t.get("scale") else None
        out[name] = decode(source.read(name, i), t["dtype"], scale)
    meta = source.meta()
    out["valid"] = meta["valid"][i].astype(np.int64)
    out["input_hw"] = meta["input_hw"][i].astype(np.int64)
    out["image_id"] = np.int64(meta["image_id"][i])
    return out


# --------------------------------------------------------------------------------------------------------------- hdf5
def export_hdf5(url: str, out: str | os.PathLike, *, storage_options: dict | None = None,
                compression: str | None = "gzip", level: int = 4, progress: bool = True) -> Path:
    """Copy a finished zarr cache into one HDF5 file with the same arrays (same stored dtypes) and manifest.

    Copies shard by shard so memory stays at one shard. Datasets keep one chunk per sample (byte shuffle + gzip).
    Refuses an unfinished cache (its missing shards would silently read as zeros).
    """
    import h5py
    from tqdm.auto import tqdm

    out = Path(out)
    manifest = require_manifest(url, storage_options)
    src = ZarrSource(url, storage_options)
    done = src.finished()
    if not done.all():
        raise CacheMismatchError(
            f"{url}: {int((~done).sum())} of {done.size} shards are not finished (first: {int(np.argmin(done))}); "
            "finish the cache (rerun the same cache-teacher command) before exporting", field="shard_done")
    plan = ShardPlan.of(manifest)
    specs = array_specs(manifest)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    with h5py.File(tmp, "w") as f:
        f.attrs["manifest"] = json.dumps(manifest)
        dsets = {}
        for name, (shape, dtype, per_sample) in specs.items():
            chunks = (1, *shape) if per_sample else (min(plan.samples_per_shard, plan.num_samples), *shape)
            dsets[name] = f.create_dataset(
                name, shape=(plan.num_samples, *shape), dtype=dtype, chunks=chunks,
                compression=compression, compression_opts=level if compression == "gzip" else None,
                shuffle=compression is not None and dtype.itemsize > 1)
        f.create_dataset(DONE_ARRAY, data=np.ones(plan.num_shards, dtype=np.uint8))
        for k in tqdm(range(plan.num_shards), desc="export", unit="shard", disable=not progress):
            start, end = plan.bounds(k)
            for name in specs:
                dsets[name][start:end] = src.read(name, slice(start, end))
    os.replace(tmp, out)  # a half-written export never carries the final name
    return out
