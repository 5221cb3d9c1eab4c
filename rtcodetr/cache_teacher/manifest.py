"""The cache manifest: what produced a cache, and the check that a cache fits a dataset, teacher or label map.

The manifest is a JSON dict stored in the zarr group attributes under ``"manifest"`` (and as the ``manifest``
attribute of an HDF5 export). Sections:

- ``format``, ``format_version``, ``package_version``, ``created`` (UTC ISO time, informative)
- ``teacher``: ``id`` (as given), ``family``, ``config_sha256`` (model config without paths/versions),
  ``weights_sha256`` (all state-dict tensors in name order), ``num_queries``, ``label_map`` ([{label, name}] in label
  order, from the teacher's ``id2label``), ``label_map_sha256``
- ``dataset``: ``name``, ``split``, ``labelled`` (false for an unlabelled split; absent in caches made before it
  existed), ``annotations_sha256`` (sha256 of the split file; an unlabelled split's file lists every image's own
  sha256, so it covers the pixels too), ``image_ids`` (manifest order = sample order), ``num_images``,
  ``label_map_sha256`` (the prepared dataset's label map)
- ``geometry``: how teacher inputs were made (``mode``, resize parameters, ``input_hw`` padded input size,
  ``feature_hw``, ``stride``, ``normalize`` {mean, std} or null, ``box_reference``, ``draft``)
- ``precision``: ``mixed_precision`` the teacher ran under, ``device_type``
- ``storage``: ``samples_per_shard``, ``num_shards``, ``compressor``
- ``tensors``: ``{name: {"shape": per-sample shape, "dtype": logical dtype, "storage_dtype": numpy dtype,
  "scale": "<name>_scale" | null}}``
- ``config``: the resolved cache config (informative)
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable

from rtcodetr.errors import InputError

FORMAT = "rtcodetr-teacher-cache"
FORMAT_VERSION = 1

# Fields that must agree before a run may add shards to an existing cache (anything that changes the numbers).
WRITE_CHECKED: tuple[str, ...] = (
    "format_version",
    "teacher.family",
    "teacher.config_sha256",
    "teacher.weights_sha256",
    "teacher.label_map",
    "dataset.split",
    "dataset.annotations_sha256",
    "dataset.image_ids",
    "geometry",
    "precision.mixed_precision",
    "storage.samples_per_shard",
    "storage.compressor",
    "tensors",
)


class CacheMismatchError(ValueError, InputError):
    """A cache does not fit what it is used with; ``field`` is the dotted manifest field that differs."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class CacheCorruptError(ValueError, InputError):
    """Finished shards of a cache cannot be read; ``shards`` lists them, the message names their samples, image ids
    and the command that recomputes them (see ``integrity.py``)."""

    def __init__(self, message: str, shards: Iterable[int] = ()):
        super().__init__(message)
        self.shards = [int(k) for k in shards]


class CacheNotFoundError(FileNotFoundError, InputError):
    """There is no teacher cache at the given path / URL."""

    def __init__(self, url: str):
        super().__init__(f"no teacher cache at {url} (no zarr group or HDF5 export there); make one with "
                         f"`rtcodetr cache-teacher --data DATA --teacher MODEL --out {url}`")
        self.url = url


def sha256_json(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys, no whitespace)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def _get(d: dict, dotted: str) -> Any:
    node: Any = d
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


def _short(v: Any, limit: int = 80) -> str:
    s = repr(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def first_difference(a: Any, b: Any, path: str) -> tuple[str, Any, Any] | None:
    """The first dotted path (list positions as ``[i]``) where JSON-like ``a`` and ``b`` differ, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        # the expected side's key order (the manifest is built most-telling field first), then keys only in a
        for key in [*b, *(k for k in a if k not in b)]:
            d = first_difference(a.get(key, _MISSING), b.get(key, _MISSING), f"{path}.{key}")
            if d is not None:
                return d
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return (f"{path} (length)", len(a), len(b))
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_difference(x, y, f"{path}[{i}]")
            if d is not None:
                return d
        return None
    if isinstance(a, float) or isinstance(b, float):
        try:
            if float(a) == float(b):  # 32 and 32.0 after a JSON round trip
                return None
        except (TypeError, ValueError):
            pass
    return None if a == b else (path, a, b)


def check_fields(
    existing: dict, expected: dict, fields: Iterable[str], *, what: str, existing_name: str = "cache",
    expected_name: str = "this run",
) -> None:
    """Raise ``CacheMismatchError`` naming the first of ``fields`` where ``existing`` and ``expected`` differ."""
    for field in fields:
        d = first_difference(_get(existing, field), _get(expected, field), field)
        if d is not None:
            path, a, b = d
            raise CacheMismatchError(
                f"{what}: manifest field '{path}' differs: {existing_name} has {_short(a)}, "
                f"{expected_name} has {_short(b)}",
                field=path,
            )


def label_map_entries(names: list[str]) -> list[dict[str, Any]]:
    """``[{"label": i, "name": name}]`` in label order (the comparable part of a label map)."""
    return [{"label": i, "name": str(n)} for i, n in enumerate(names)]


def label_map_sha256(names: list[str]) -> str:
    return sha256_json(label_map_entries(names))
