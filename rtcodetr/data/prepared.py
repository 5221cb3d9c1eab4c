"""The prepared dataset directory: label map, COCO split files, dataset.json, report.json.

Every later stage (teacher cache, trainer, evaluator, YOLO export) takes a prepared directory, never a raw COCO
file, so the defects of a source file are fixed once, in one place, and the label map is shared by all of them.

Layout (``format_version`` 1)::

    dataset.json    {"format_version", "name", "image_root" (absolute), "num_labels",
                     "splits": {split: {"file", "num_images", "num_annotations", "sha256"
                                        [, "labelled": false, "image_root", "source"]}},
                     "sources": {...hashes of what it was made from...}, "settings": {...how...}}
    label_map.json  {"labels": [{"label", "category_id", "name", "supercategory", "original_ids"}, ...]}
    train.json / val.json / test.json   COCO; images carry "orientation": "raw" | "exif";
                                        annotation ids unique from 1; category_id = label + 1; bbox xywh in-image
    <name>.json     an unlabelled split (``rtcodetr data add-images``, ``data synthetic --unlabeled``): COCO with
                    ``images`` (each also with its file's ``sha256``) and empty ``annotations``
    report.json     every fix applied, with counts

Unlabelled splits are marked ``"labelled": false`` in their ``dataset.json`` entry (a split without the key is
labelled, so directories written before unlabelled splits existed load unchanged). Their image ids never collide with
any other split's. When their images live outside the dataset's ``image_root`` the entry carries its own absolute
``"image_root"``; :meth:`PreparedData.image_root_of` is the one place that resolves it.

``write_prepared`` is the one writer of labelled splits: the TACO path and the synthetic generator both go through it,
so their output formats cannot drift apart; ``add_unlabelled_split`` adds an unlabelled split to a written directory
through the same record checks.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from rtcodetr.errors import InputError

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
ORIENTATIONS = ("raw", "exif")
# a split name is also a file stem in the prepared directory: it must not name one of the directory's own files
SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
RESERVED_SPLIT_NAMES = ("dataset", "label_map", "report")


class PreparedDataError(ValueError, InputError):
    """A prepared dataset directory is missing, incomplete or inconsistent; the message names the file and field."""


class LabelMapMismatch(PreparedDataError):
    """A model, teacher or export does not use the dataset's labels in label order (``LabelMap.check``)."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class LabelMap:
    """Contiguous labels ``0..K-1`` <-> written category ids (``label + 1``) <-> names <-> source category ids.

    ``original_ids[label]`` lists the source file's category ids merged into that label (one id per label in
    ``categories`` mode, all member categories in ``supercategories`` mode).
    """

    def __init__(
        self,
        names: Sequence[str],
        supercategories: Sequence[str] | None = None,
        original_ids: Sequence[Sequence[int]] | None = None,
    ) -> None:
        if len(names) == 0:
            raise PreparedDataError("a label map needs at least one label")
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if list(names).count(n) > 1})
            raise PreparedDataError(f"label names must be unique; repeated: {dup}")
        self.names: list[str] = [str(n) for n in names]
        self.supercategories: list[str] = [str(s) for s in (supercategories or self.names)]
        self.original_ids: list[list[int]] = [list(map(int, ids)) for ids in (original_ids or [[] for _ in names])]
        if len(self.supercategories) != len(self.names) or len(self.original_ids) != len(self.names):
            raise PreparedDataError("label map: names, supercategories and original_ids must have the same length")
        self.num_labels: int = len(self.names)
        self.category_ids: np.ndarray = np.arange(1, self.num_labels + 1, dtype=np.int64)
        self.id2label: dict[int, str] = {i: n for i, n in enumerate(self.names)}
        self.label2id: dict[str, int] = {n: i for i, n in enumerate(self.names)}

    def differences(self, names: Sequence[str]) -> str | None:
        """None when ``names`` are exactly this map's labels in label order, else what differs, in a few words.

        The one comparison of label maps in the project: models, teachers, caches and YOLO exports are all held
        against a dataset's label map by name and order (label ``i`` must mean the same class on both sides).
        """
        names = [str(n) for n in names]
        if names == self.names:
            return None
        if len(names) != self.num_labels:
            return f"{len(names)} labels, not {self.num_labels}"
        i = next(i for i, (a, b) in enumerate(zip(names, self.names)) if a != b)
        return f"label {i} is '{names[i]}', not '{self.names[i]}'"

    def matches(self, names: Sequence[str]) -> bool:
        return self.differences(names) is None

    def check(self, names: Sequence[str], what: str, fix: str = "") -> None:
        """Raise :class:`LabelMapMismatch` naming ``what`` (a file, a model) when ``names`` differ from this map."""
        diff = self.differences(names)
        if diff is not None:
            shown = ", ".join(self.names[:6]) + (", ..." if self.num_labels > 6 else "")
            raise LabelMapMismatch(f"{what}: its classes do not match the dataset's label map ({self.num_labels} "
                                   f"labels: {shown}): {diff}" + (f"; {fix}" if fix else ""))

    def label_of_category(self, category_id: int) -> int:
        """Written COCO ``category_id`` (1..K) -> label (0..K-1)."""
        label = int(category_id) - 1
        if not 0 <= label < self.num_labels:
            raise KeyError(f"category_id {category_id} is not in this label map (valid: 1..{self.num_labels})")
        return label

    def to_json(self) -> dict:
        return {
            "labels": [
                {
                    "label": i,
                    "category_id": int(self.category_ids[i]),
                    "name": self.names[i],
                    "supercategory": self.supercategories[i],
                    "original_ids": self.original_ids[i],
                }
                for i in range(self.num_labels)
            ]
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any], source: str = "label map") -> "LabelMap":
        try:
            entries = sorted(d["labels"], key=lambda e: int(e["label"]))
            labels = [int(e["label"]) for e in entries]
            if labels != list(range(len(labels))):
                raise PreparedDataError(f"{source}: labels must be contiguous 0..K-1, got {labels}")
            for e in entries:
                if int(e.get("category_id", e["label"] + 1)) != int(e["label"]) + 1:
                    raise PreparedDataError(
                        f"{source}: label {e['label']} has category_id {e['category_id']}, expected label + 1"
                    )
            return cls(
                [e["name"] for e in entries],
                [e.get("supercategory", e["name"]) for e in entries],
                [e.get("original_ids", []) for e in entries],
            )
        except (KeyError, TypeError) as err:
            raise PreparedDataError(f"{source}: malformed label map ({err!r})") from err

    @classmethod
    def load(cls, path: str | Path) -> "LabelMap":
        path = Path(path)
        if path.is_dir():
            path = path / "label_map.json"
        if not path.is_file():
            raise PreparedDataError(f"label map not found: {path}")
        with open(path) as f:
            return cls.from_json(json.load(f), source=str(path))

    def coco_categories(self) -> list[dict]:
        """The ``categories`` list written into every split file."""
        return [
            {"id": int(self.category_ids[i]), "name": self.names[i], "supercategory": self.supercategories[i]}
            for i in range(self.num_labels)
        ]

    def fingerprint(self) -> str:
        """sha256 of the canonical ``[(label, name), ...]`` list: equal iff the label spaces are the same."""
        canon = json.dumps([[i, n] for i, n in enumerate(self.names)], separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(canon.encode()).hexdigest()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelMap) and self.names == other.names

    def __repr__(self) -> str:
        return f"LabelMap(num_labels={self.num_labels}, names={self.names[:5]}{'...' if self.num_labels > 5 else ''})"


class PreparedData:
    """A prepared dataset directory, loaded (see module docstring for the layout)."""

    def __init__(self, root: Path, image_root: Path, label_map: LabelMap, info: dict) -> None:
        self.root = root
        self.image_root = image_root
        self.label_map = label_map
        self.info = info
        self._coco: dict[str, dict] = {}

    @classmethod
    def load(cls, path: str | Path) -> "PreparedData":
        if isinstance(path, PreparedData):
            return path
        root = Path(path).resolve()
        ds_file = root / "dataset.json"
        if not ds_file.is_file():
            hint = ""
            if root.is_file() and root.suffix == ".json":
                hint = " (this is a COCO file; run `rtcodetr data taco --annotations FILE --images DIR --out DIR` first)"
            raise PreparedDataError(f"{root} is not a prepared dataset directory: dataset.json not found{hint}")
        with open(ds_file) as f:
            info = json.load(f)
        for key in ("format_version", "image_root", "num_labels", "splits"):
            if key not in info:
                raise PreparedDataError(f"{ds_file}: missing field '{key}'")
        if info["format_version"] != FORMAT_VERSION:
            raise PreparedDataError(
                f"{ds_file}: field 'format_version' is {info['format_version']}, this code reads {FORMAT_VERSION}"
            )
        label_map = LabelMap.load(root / "label_map.json")
        if label_map.num_labels != info["num_labels"]:
            raise PreparedDataError(
                f"{ds_file}: field 'num_labels' is {info['num_labels']} but label_map.json has {label_map.num_labels}"
            )
        image_root = Path(info["image_root"])
        if not image_root.is_absolute():
            image_root = root / image_root
        for split, entry in info["splits"].items():
            if not entry.get("labelled", True) and entry.get("num_annotations", 0) != 0:
                raise PreparedDataError(f"{ds_file}: split '{split}' is marked 'labelled': false but field "
                                        f"'num_annotations' is {entry['num_annotations']}")
        return cls(root, image_root, label_map, info)

    @property
    def splits(self) -> list[str]:
        return list(self.info["splits"])

    def is_labelled(self, split: str) -> bool:
        """Whether ``split`` has ground truth (``False`` for splits added by ``data add-images`` / ``--unlabeled``)."""
        self.split_file(split)  # unknown split -> PreparedDataError naming the ones there are
        return bool(self.info["splits"][split].get("labelled", True))

    @property
    def labelled_splits(self) -> list[str]:
        return [s for s in self.splits if self.is_labelled(s)]

    @property
    def unlabelled_splits(self) -> list[str]:
        return [s for s in self.splits if not self.is_labelled(s)]

    def image_root_of(self, split: str) -> Path:
        """The directory ``split``'s ``file_name``s are relative to: its own ``image_root`` when ``dataset.json``
        records one (an unlabelled split whose images live elsewhere), else the dataset's ``image_root``."""
        self.split_file(split)
        own = self.info["splits"][split].get("image_root")
        if own is None:
            return self.image_root
        own = Path(own)
        return own if own.is_absolute() else self.root / own

    def split_file(self, split: str) -> Path:
        if split not in self.info["splits"]:
            raise PreparedDataError(f"{self.root}: no split '{split}' (have: {', '.join(self.info['splits'])})")
        return self.root / self.info["splits"][split]["file"]

    def coco(self, split: str) -> dict:
        """The parsed COCO dict of a split (cached; treat as read-only)."""
        if split not in self._coco:
            path = self.split_file(split)
            if not path.is_file():
                raise PreparedDataError(f"{self.root}: split file {path.name} listed in dataset.json is missing")
            with open(path) as f:
                self._coco[split] = json.load(f)
        return self._coco[split]

    def image_ids(self, split: str) -> list[int]:
        """Image ids of a split in file order (the order every stage indexes samples in)."""
        return [int(im["id"]) for im in self.coco(split)["images"]]

    def fingerprint(self, split: str) -> dict:
        """What a cache built on this split must match: the split file's hash and its ordered image ids."""
        return {"annotations_sha256": sha256_file(self.split_file(split)), "image_ids": self.image_ids(split)}

    def image_path(self, file_name: str, split: str | None = None) -> Path:
        """Path of an image file of ``split`` (``None``: a split that uses the dataset's ``image_root``)."""
        root = self.image_root if split is None else self.image_root_of(split)
        return root / safe_relative_path(file_name, "file_name")

    def __repr__(self) -> str:
        counts = {s: v["num_images"] for s, v in self.info["splits"].items()}
        return f"PreparedData({self.root}, num_labels={self.label_map.num_labels}, images={counts})"


def safe_relative_path(file_name: str, what: str = "file_name") -> Path:
    """Return ``file_name`` as a relative path that cannot leave its root; raise ValueError otherwise.

    Rejects absolute paths (POSIX or Windows drive), ``..`` components and empty names, so an annotation file cannot
    make any stage read or link a file outside the image root.
    """
    if not isinstance(file_name, str) or not file_name.strip():
        raise ValueError(f"{what} {file_name!r} is empty or not a string")
    norm = file_name.replace("\\", "/")
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        raise ValueError(f"{what} {file_name!r} is an absolute path; it must be relative to the image root")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"{what} {file_name!r} contains '..' and could escape the image root")
    return Path(*parts)


@dataclass
class SplitRecords:
    """One split before writing. Boxes are absolute ``xyxy`` float (already clamped and non-degenerate).

    ``images``: dicts with ``id``, ``file_name``, ``width``, ``height``, ``orientation`` (+ optional extra fields kept
    as-is, e.g. ``source_id``). ``annotations``: dicts with ``image_id``, ``label``, ``box_xyxy``, ``area``,
    ``iscrowd`` (+ optional ``source_id``).
    """

    images: list[dict] = field(default_factory=list)
    annotations: list[dict] = field(default_factory=list)


def _coco_number(v: float) -> float:
    # 4 decimals keep sub-pixel precision while keeping files and hashes stable across platforms
    r = round(float(v), 4)
    return 0.0 if r == 0 else r


def write_prepared(
    out: str | Path,
    *,
    name: str,
    image_root: str | Path,
    label_map: LabelMap,
    splits: Mapping[str, SplitRecords],
    report: dict,
    sources: dict,
    settings: dict,
) -> "PreparedData":
    """Write a prepared dataset directory and return it loaded.

    Annotation ids are renumbered from 1 per split in (image order, input order); ``category_id = label + 1``;
    ``bbox`` is COCO xywh. Raises PreparedDataError when a record violates the contract (box outside its image,
    unknown label, bad orientation, unsafe file name), naming the split, the image and the field.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    image_root = Path(image_root).resolve()
    categories = label_map.coco_categories()
    split_info = {}
    for split, recs in splits.items():
        ann_by_image: dict[int, list[dict]] = {}
        for a in recs.annotations:
            ann_by_image.setdefault(int(a["image_id"]), []).append(a)
        images, annotations = [], []
        seen_ids: set[int] = set()
        for im in recs.images:
            rec = _image_record(split, im, seen_ids)
            iid, w, h = rec["id"], rec["width"], rec["height"]
            where = f"split '{split}', image id {iid}"
            images.append(rec)
            for a in ann_by_image.pop(iid, []):
                x1, y1, x2, y2 = (float(v) for v in a["box_xyxy"])
                label = int(a["label"])
                if not 0 <= label < label_map.num_labels:
                    raise PreparedDataError(f"{where}: annotation field 'label' {label} outside 0..{label_map.num_labels - 1}")
                if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h) or not all(map(math.isfinite, (x1, y1, x2, y2))):
                    raise PreparedDataError(f"{where}: annotation field 'bbox' {[x1, y1, x2, y2]} (xyxy) is not inside {w}x{h}")
                ann = {
                    "id": len(annotations) + 1,
                    "image_id": iid,
                    "category_id": label + 1,
                    "bbox": [_coco_number(x1), _coco_number(y1), _coco_number(x2 - x1), _coco_number(y2 - y1)],
                    "area": _coco_number(a.get("area", (x2 - x1) * (y2 - y1))),
                    "iscrowd": int(a.get("iscrowd", 0)),
                }
                if "source_id" in a:
                    ann["source_id"] = a["source_id"]
                annotations.append(ann)
        if ann_by_image:
            raise PreparedDataError(
                f"split '{split}': annotations refer to image ids not in the split: {sorted(ann_by_image)[:5]}"
            )
        split_info[split] = _write_split(out, name, split, images, annotations, categories)
    _write_json(out / "label_map.json", label_map.to_json())
    _write_json(out / "report.json", report)
    _write_json(
        out / "dataset.json",
        {
            "format_version": FORMAT_VERSION,
            "name": name,
            "image_root": str(image_root),
            "num_labels": label_map.num_labels,
            "splits": split_info,
            "sources": sources,
            "settings": settings,
        },
    )
    return PreparedData.load(out)


def _image_record(split: str, im: Mapping[str, Any], seen_ids: set[int]) -> dict:
    """One image record of a split file, checked against the contract (the error names the split, image and field);
    extra fields (``source_id``, ``exif_orientation_tag``, ``sha256``) are kept after the required ones."""
    iid = int(im["id"])
    where = f"split '{split}', image id {iid}"
    if iid in seen_ids:
        raise PreparedDataError(f"{where}: field 'id' is repeated")
    seen_ids.add(iid)
    try:
        safe_relative_path(im["file_name"])
    except ValueError as e:
        raise PreparedDataError(f"{where}: field 'file_name': {e}") from None
    if im.get("orientation") not in ORIENTATIONS:
        raise PreparedDataError(f"{where}: field 'orientation' must be one of {ORIENTATIONS}")
    w, h = int(im["width"]), int(im["height"])
    if w <= 0 or h <= 0:
        raise PreparedDataError(f"{where}: fields 'width'/'height' must be positive, got {w}x{h}")
    rec = {"id": iid, "file_name": str(im["file_name"]), "width": w, "height": h, "orientation": im["orientation"]}
    rec.update({k: v for k, v in im.items() if k not in rec})
    return rec


def _write_split(out: Path, name: str, split: str, images: list[dict], annotations: list[dict],
                 categories: list[dict]) -> dict:
    """Write ``<split>.json`` (COCO) and return its ``dataset.json`` entry."""
    coco = {
        "info": {"description": f"{name} {split} (rtcodetr prepared, format {FORMAT_VERSION})"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    path = out / f"{split}.json"
    _write_json(path, coco, indent=None)
    return {"file": path.name, "num_images": len(images), "num_annotations": len(annotations),
            "sha256": sha256_file(path)}


def check_new_split(data: PreparedData, split: str, overwrite: bool = False) -> None:
    """Raise PreparedDataError unless an unlabelled split named ``split`` may be written into ``data``.

    The name must be a plain file stem that is not one of the directory's own files; a labelled split is never
    replaced; an existing unlabelled split (or a stray ``<split>.json``, e.g. left by re-preparing the directory)
    is replaced only with ``overwrite``.
    """
    if not SPLIT_NAME.fullmatch(split) or split in RESERVED_SPLIT_NAMES:
        raise PreparedDataError(
            f"split name {split!r} is not allowed: use letters, digits, '_' or '-' (at most 64), not one of "
            f"{', '.join(RESERVED_SPLIT_NAMES)}")
    if split in data.info["splits"]:
        if data.is_labelled(split):
            raise PreparedDataError(f"{data.root}: split '{split}' is a labelled split; choose another --name")
        if not overwrite:
            raise PreparedDataError(f"{data.root}: split '{split}' exists already "
                                    f"({data.info['splits'][split]['num_images']} images); pass --overwrite to "
                                    "replace it (a teacher cache made from it will then be refused)")
    elif (data.root / f"{split}.json").exists() and not overwrite:
        raise PreparedDataError(f"{data.root / f'{split}.json'} exists but is not a split of dataset.json; pass "
                                "--overwrite to replace it")


def add_unlabelled_split(
    data: PreparedData | str | Path,
    split: str,
    images: Sequence[Mapping[str, Any]],
    *,
    source: dict,
    image_root: str | Path | None = None,
    overwrite: bool = False,
) -> PreparedData:
    """Write ``<split>.json`` (COCO, empty ``annotations``) and record it in ``dataset.json``; return the reloaded dir.

    Args:
        images: records like ``SplitRecords.images`` (``id``, ``file_name``, ``width``, ``height`` upright,
            ``orientation``; extra fields such as ``sha256`` are kept). Ids must not be used by any other split.
        source: where the images came from, stored as the entry's ``"source"``.
        image_root: the directory ``file_name``s are relative to when it is not the dataset's ``image_root``
            (stored absolute as the entry's ``"image_root"``).
    The split file is written before ``dataset.json`` (each atomically), so a killed run leaves the old
    ``dataset.json`` in force.
    """
    data = PreparedData.load(data)
    check_new_split(data, split, overwrite)
    if not images:
        raise PreparedDataError(f"split '{split}': no images to write")
    taken: dict[int, str] = {}
    for other in data.splits:
        if other != split:
            taken.update({i: other for i in data.image_ids(other)})
    seen: set[int] = set()
    recs = []
    for im in images:
        rec = _image_record(split, im, seen)
        if rec["id"] in taken:
            raise PreparedDataError(f"split '{split}', image id {rec['id']}: field 'id' is already used by split "
                                    f"'{taken[rec['id']]}'")
        recs.append(rec)
    entry = _write_split(data.root, data.info.get("name", ""), split, recs, [], data.label_map.coco_categories())
    entry["labelled"] = False
    if image_root is not None:
        entry["image_root"] = str(Path(image_root).resolve())
    entry["source"] = source
    info = dict(data.info)
    info["splits"] = {**{k: v for k, v in data.info["splits"].items() if k != split}, split: entry}
    _write_json(data.root / "dataset.json", info)
    return PreparedData.load(data.root)


def next_image_id(data: PreparedData, exclude: Sequence[str] = ()) -> int:
    """One more than the largest image id of every split except ``exclude`` (1 for none): ids from here on cannot
    collide with any split's."""
    ids = [i for s in data.splits if s not in exclude for i in data.image_ids(s)]
    return max(ids, default=0) + 1


def _write_json(path: Path, obj: Any, indent: int | None = 2) -> None:
    """Write atomically (temp file + rename) so a killed run never leaves a half-written json behind."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent, separators=(",", ": ") if indent else (",", ":"), ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)

