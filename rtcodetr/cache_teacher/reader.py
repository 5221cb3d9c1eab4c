"""``TeacherCache``: read a teacher cache (zarr directory / fsspec URL, or its HDF5 export) one sample at a time.

Made for DataLoader workers: the constructor reads only the manifest (group metadata, then the handle is dropped);
array handles are opened on the first ``__getitem__`` in each process, so nothing opened in the parent is shared by
forked workers. Reads cost only what is asked: ``tensors=["encoder"]`` never touches the backbone shards (a loss
with weight 0 should not pay for a read).
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from rtcodetr.cache_teacher.manifest import (
    FORMAT,
    CacheMismatchError,
    check_fields,
    label_map_entries,
)
from rtcodetr.cache_teacher.storage import ShardPlan, open_source, read_sample, require_manifest


def _label_names(label_map: Any) -> list[str]:
    if hasattr(label_map, "names"):
        return [str(n) for n in label_map.names]
    if isinstance(label_map, dict):  # id2label
        return [str(label_map[k]) for k in sorted(label_map, key=int)]
    return [str(n) for n in label_map]


class TeacherCache:
    """One teacher cache, validated against what it is used with.

    Args:
        path_or_url: zarr cache directory / fsspec URL, or an ``.h5`` export.
        data, split: a ``PreparedData`` (or its directory) and split name: the cache must come from that split's
            annotation file with the same image ids in the same order (else ``CacheMismatchError`` naming
            ``dataset.split``, ``dataset.annotations_sha256`` or ``dataset.image_ids``).
        label_map: a ``LabelMap`` / id2label / list of names that the teacher's label map must equal (pass it only
            when the teacher's predictions are used; feature maps do not depend on labels).
        tensors: names to read (default: every tensor in the cache); unknown names raise ``CacheMismatchError``.
        allow_incomplete: read samples of unfinished shards too (their content may be zeros or a partial write);
            by default such a sample raises ``CacheMismatchError``.
        storage_options: fsspec options for remote URLs.

    ``cache[i]`` -> ``{name: float32 array}`` for each requested tensor (dequantised: ``backbone``/``encoder``
    ``[C, Hf, Wf]``, ``logits`` ``[Q, K]`` pre-sigmoid, ``boxes`` ``[Q, 4]`` normalized cxcywh of the original image)
    plus ``valid`` int64 ``[2]`` (unpadded feature rows, cols), ``input_hw`` int64 ``[2]`` (teacher input h, w before
    padding) and ``image_id`` (int64).
    """

    def __init__(self, path_or_url: str | os.PathLike, *, data: Any = None, split: str | None = None,
                 label_map: Any = None, tensors: Sequence[str] | None = None, allow_incomplete: bool = False,
                 storage_options: dict | None = None):
        self.path = str(path_or_url)
        self.storage_options = storage_options
        manifest = require_manifest(self.path, storage_options)
        if manifest.get("format") != FORMAT:
            raise CacheMismatchError(f"{self.path}: manifest field 'format' is {manifest.get('format')!r}, "
                                     f"expected {FORMAT!r}", field="format")
        self.manifest: dict = manifest
        available = list(manifest["tensors"])
        self.tensors = list(available if tensors is None else tensors)
        for name in self.tensors:
            if name not in available:
                raise CacheMismatchError(f"{self.path}: tensor '{name}' is not in the cache (manifest field "
                                         f"'tensors' has {available})", field=f"tensors.{name}")
        self._ids = np.asarray(manifest["dataset"]["image_ids"], dtype=np.int64)
        self._row_of = {int(i): r for r, i in enumerate(self._ids)}
        self._plan = ShardPlan.of(manifest)
        self._source = open_source(self.path, storage_options)
        self._finished: np.ndarray | None = None
        self._finished_pid: int | None = None
        self.allow_incomplete = allow_incomplete
        if data is not None:
            self.check_dataset(data, split)
        elif split is not None and split != manifest["dataset"]["split"]:
            raise CacheMismatchError(f"{self.path}: manifest field 'dataset.split' is "
                                     f"{manifest['dataset']['split']!r}, expected {split!r}", field="dataset.split")
        if label_map is not None and not self.label_map_matches(label_map):
            check_fields(self.manifest, {"teacher": {"label_map": label_map_entries(_label_names(label_map))}},
                         ["teacher.label_map"], what=f"teacher cache {self.path} has another label space",
                         existing_name="the teacher", expected_name="the student")

    # ---------------------------------------------------------------------------------------------- validation
    def check_dataset(self, data: Any, split: str | None) -> None:
        """Raise ``CacheMismatchError`` unless the cache was made from ``split`` of ``data`` (hash + image ids)."""
        from rtcodetr.data.prepared import PreparedData

        data = data if isinstance(data, PreparedData) else PreparedData.load(data)
        split = split or self.manifest["dataset"]["split"]
        fp = data.fingerprint(split)
        expected = {"dataset": {"split": split, "annotations_sha256": fp["annotations_sha256"],
                                "image_ids": [int(i) for i in fp["image_ids"]]}}
        check_fields(self.manifest, expected,
                     ["dataset.split", "dataset.image_ids", "dataset.annotations_sha256"],
                     what=f"teacher cache {self.path} was made from another dataset",
                     existing_name="the cache", expected_name=f"{data.root} split '{split}'")

    @property
    def teacher_label_names(self) -> list[str]:
        """The teacher's class names in label order (from the manifest)."""
        entries = sorted(self.manifest["teacher"]["label_map"], key=lambda e: int(e["label"]))
        return [str(e["name"]) for e in entries]

    def label_map_matches(self, label_map: Any) -> bool:
        """Whether the teacher's label map (label order and names) equals ``label_map`` (a ``LabelMap``, an id2label
        dict or a list of names)."""
        if hasattr(label_map, "matches"):
            return label_map.matches(self.teacher_label_names)
        return self.teacher_label_names == _label_names(label_map)

    def channels(self, name: str) -> int:
        """Channels of the cached feature map ``name`` (``backbone`` / ``encoder``): what a student adapter maps to."""
        tensors = self.manifest["tensors"]
        if name not in tensors:
            raise CacheMismatchError(f"teacher cache {self.path} has no '{name}' map (it has "
                                     f"{', '.join(sorted(tensors))})", field="tensors")
        return int(tensors[name]["shape"][-3])  # per-sample shapes: [C, Hf, Wf]

    @property
    def mirrored(self) -> bool:
        """Whether the teacher saw the mirrored images (a cache made with ``geometry.hflip=true``)."""
        return bool(self.manifest.get("geometry", {}).get("hflip", False))

    @property
    def stride(self) -> float:
        """Stride of the cached feature maps in teacher-input pixels."""
        return float(self.manifest.get("geometry", {}).get("stride", 32))

    # ------------------------------------------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self._ids)

    @property
    def image_ids(self) -> np.ndarray:
        """int64 ``[N]`` image ids in sample order."""
        return self._ids

    def index_of(self, image_id: int) -> int:
        """Sample index of ``image_id`` (``KeyError`` if the cache has no such image)."""
        try:
            return self._row_of[int(image_id)]
        except KeyError:
            raise KeyError(f"image id {image_id} is not in teacher cache {self.path}") from None

    def finished(self) -> np.ndarray:
        """bool ``[num_shards]``: finished shards (read once per process)."""
        if self._finished is None or self._finished_pid != os.getpid():
            self._finished = self._source.finished()
            self._finished_pid = os.getpid()
        return self._finished

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return self.read(i)

    def read(self, i: int, tensors: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Sample ``i``: the opened ``tensors`` (or the given subset of them) plus ``image_id``, ``valid``,
        ``input_hw``."""
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for a cache of {len(self)}")
        i %= len(self)
        k = self._plan.shard_of(i)
        if not self.finished()[k] and not self.allow_incomplete:
            raise CacheMismatchError(
                f"{self.path}: sample {i} (image id {int(self._ids[i])}) lies in shard {k}, which is not finished; "
                "rerun the cache-teacher command to complete the cache", field="shard_done")
        try:
            names = self.tensors if tensors is None else [t for t in self.tensors if t in tensors]
            out = read_sample(self._source, self.manifest, i, names)
        except Exception as e:  # noqa: BLE001 -- a read that fails mid-epoch is a damaged shard: name it and the fix
            from rtcodetr.cache_teacher.integrity import corrupt_cache_error

            what = f"sample {i} (image id {int(self._ids[i])}): {type(e).__name__}: {' '.join(str(e).split())}"
            raise corrupt_cache_error(self.path, self.manifest, {k: [what]}) from e
        if int(out["image_id"]) != int(self._ids[i]):
            raise CacheMismatchError(f"{self.path}: sample {i} holds image id {int(out['image_id'])} but the manifest "
                                     f"says {int(self._ids[i])}", field="image_id")
        return out

    def check_integrity(self, *, full: bool = False, progress: bool = False) -> None:
        """Raise ``CacheMismatchError`` if a shard is unfinished, ``CacheCorruptError`` (naming shards, samples,
        image ids and the ``--redo-shards`` command) if a finished shard of the tensors this reader reads cannot be
        read. ``full=False`` checks each shard object and its checksummed index (one sample read per shard and
        array); ``full=True`` reads every sample. See ``rtcodetr.cache_teacher.integrity``."""
        from rtcodetr.cache_teacher.integrity import check_cache_integrity

        arrays = [*self.tensors, *(self.manifest["tensors"][t].get("scale") or t for t in self.tensors)]
        check_cache_integrity(self.path, self._source, self.manifest, arrays=arrays, full=full, progress=progress)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_finished"] = None
        return state

    def __repr__(self) -> str:
        t = self.manifest["teacher"]
        return (f"TeacherCache({self.path}, {len(self)} samples, teacher {t.get('family')} {t.get('id')}, "
                f"tensors {self.tensors})")
