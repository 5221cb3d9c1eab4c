"""Load a raw COCO file (TACO by default), fix its known defects, split it and write a prepared directory.

What gets fixed (each counted in ``report.json["fixes"]``; measured on the official TACO file):

* duplicate annotation ids (TACO: 309 and 4040 twice): every written annotation gets a fresh id from 1, the
  source id is kept as ``source_id``;
* boxes reaching outside their image (TACO: 7, down to -1.32 px): clamped into ``[0, w] x [0, h]``;
* boxes with no area after clamping: dropped;
* 0-based / non-contiguous category ids (TACO: 0..59): mapped once to labels ``0..K-1`` and written as
  ``category_id = label + 1``; every category of the file keeps a label even when it has no annotation (TACO: id 35
  "Plastified paper bag"), so the label map is the same for every split, for the 80-photo sample and for the full
  file, and a model trained on one can be evaluated on another. Unused categories are listed in the report.
* file names whose extension case differs from the file on disk (TACO mixes ``.jpg`` and ``.JPG``): resolved to
  the file that exists;
* EXIF orientation: the annotated ``(width, height)`` is compared with the stored size and with the EXIF-rotated
  size; the one that matches decides ``orientation`` (``raw`` / ``exif``). Without a tag it is ``raw``. When a tag
  is present and both match (a 180 degree or mirror tag, or a square image) ``exif`` is used, i.e. the image as a
  viewer shows it, which is what the official TACO loader does (counted as ``exif_applied_same_size``). When neither matches the image is an error (dropped and counted with
  ``--skip-missing``).

Rejected with an error naming the file, the record and the field: malformed json / records, duplicate image or
category ids, annotations pointing to unknown images or categories, absolute or ``..`` file names, corrupt or
truncated images. Missing images are one error giving the count and the first paths, unless ``skip_missing``.

The split is image-level and seeded (``numpy.random.default_rng(seed)`` permutation of the sorted image ids), or
pinned by id lists (``val_ids`` / ``test_ids`` files, one id per line, ``#`` comments allowed). Image ids are kept
as in the source file so pinned lists (``seed_val_image_ids.txt``) keep their meaning.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from rtcodetr.config import config_to_dict
from rtcodetr.data.boxes import clip_boxes, coco_xywh_to_xyxy
from rtcodetr.data.dataset import EXIF_ORIENTATION, ImageDecodeError, decode_image
from rtcodetr.data.prepared import LabelMap, PreparedData, SplitRecords, safe_relative_path, sha256_file, write_prepared
from rtcodetr.errors import InputError

SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that transpose the image
MAX_LISTED = 5


class DatasetError(ValueError, InputError):
    """The source dataset cannot be prepared; the message names the file, the record and the field."""


@dataclass
class PrepareConfig:
    """Settings of ``rtcodetr data taco`` (any COCO file works; TACO is the default use)."""

    annotations: Path | None = None  # required: the COCO json
    images: Path | None = None  # required: the image root its file names are relative to
    out: Path = Path("data/taco")
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    classes: Literal["categories", "supercategories"] = "categories"
    skip_missing: bool = False
    val_ids: Path | None = None
    test_ids: Path | None = None
    name: str = "taco"
    progress: bool = True


@dataclass
class ImageCheck:
    """What decoding one image found. ``orientation`` is None when the annotated size matches neither frame."""

    path: Path
    file_name: str
    raw_size: tuple[int, int] | None = None  # (w, h) as stored
    exif_tag: int = 1
    orientation: str | None = None
    problem: str | None = None
    size_mismatch: bool = False  # decodable, but the annotated size matches neither orientation
    extension_fixed: bool = False


@dataclass
class SourceDataset:
    """A parsed, validated and fixed source file (before splitting). Boxes are absolute float ``xyxy``."""

    images: list[dict]
    annotations: list[dict]
    label_map: LabelMap
    report: dict = field(default_factory=dict)
    source_image_ids: set[int] = field(default_factory=set)  # every image id of the file, kept or dropped


def _err(path: Path, where: str, msg: str) -> DatasetError:
    return DatasetError(f"{path}: {where}: {msg}")


def _int_field(path: Path, where: str, rec: dict, key: str, positive: bool = False) -> int:
    if key not in rec:
        raise _err(path, where, f"missing field '{key}'")
    v = rec[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise _err(path, where, f"field '{key}' must be an integer, got {v!r}")
    if positive and v <= 0:
        raise _err(path, where, f"field '{key}' must be positive, got {v!r}")
    return int(v)


def _record_id(path: Path, section: str, k: int, rec: Any) -> tuple[int, str]:
    """``section[k]`` must be an object with an integer ``id``; return the id and ``"section[k] (id N)"``."""
    where = f"{section}[{k}]"
    if not isinstance(rec, dict):
        raise _err(path, where, "must be an object")
    rid = _int_field(path, where, rec, "id")
    return rid, f"{where} (id {rid})"


def read_coco(path: str | Path) -> dict:
    """Parse a COCO json file and check its top-level structure."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            coco = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(coco, dict):
        raise DatasetError(f"{path}: top level must be an object with 'images', 'annotations', 'categories'")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise DatasetError(f"{path}: field '{key}' must be a list (missing or {type(coco.get(key)).__name__})")
    if not coco["categories"]:
        raise DatasetError(f"{path}: field 'categories' is empty")
    return coco


def build_label_map(path: Path, categories: list[dict], classes: str) -> tuple[LabelMap, dict[int, int]]:
    """Label map from the file's categories (sorted by id) and the map ``source category id -> label``."""
    cats: dict[int, dict] = {}
    for k, c in enumerate(categories):
        cid, where = _record_id(path, "categories", k, c)
        if cid in cats:
            raise _err(path, f"categories[{k}]", f"field 'id' {cid} is repeated")
        if not isinstance(c.get("name"), str) or not c["name"]:
            raise _err(path, where, "field 'name' is missing or empty")
        cats[cid] = c
    ordered = [cats[i] for i in sorted(cats)]
    if classes == "categories":
        names = [c["name"] for c in ordered]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise DatasetError(f"{path}: categories: field 'name' is repeated: {dup}")
        lm = LabelMap(names, [c.get("supercategory", c["name"]) for c in ordered], [[int(c["id"])] for c in ordered])
        return lm, {int(c["id"]): i for i, c in enumerate(ordered)}
    if classes != "supercategories":
        raise DatasetError(f"--classes must be 'categories' or 'supercategories', got {classes!r}")
    groups: dict[str, list[int]] = {}
    for c in ordered:
        sc = c.get("supercategory")
        if not isinstance(sc, str) or not sc:
            raise _err(path, f"categories (id {c['id']})", "field 'supercategory' is missing, needed by --classes supercategories")
        groups.setdefault(sc, []).append(int(c["id"]))
    names = list(groups)  # order of first appearance in id order: stable for a given file
    lm = LabelMap(names, names, [groups[n] for n in names])
    return lm, {cid: i for i, n in enumerate(names) for cid in groups[n]}


def resolve_image(images_dir: Path, file_name: str) -> tuple[Path | None, str, bool]:
    """Find the file for ``file_name`` under ``images_dir``: exact, else a name differing only in extension case.

    Returns ``(path or None, resolved relative file name, extension_fixed)``.
    """
    rel = safe_relative_path(file_name)
    exact = images_dir / rel
    if exact.is_file():
        return exact, rel.as_posix(), False
    parent = exact.parent
    if parent.is_dir() and rel.suffix:
        want = rel.stem + rel.suffix.lower()
        for cand in (rel.stem + rel.suffix.lower(), rel.stem + rel.suffix.upper()):
            p = parent / cand
            if p.is_file() and cand != rel.name:
                return p, (rel.parent / cand).as_posix(), True
        for p in parent.iterdir():  # e.g. ".Jpg"
            if p.stem == rel.stem and (p.stem + p.suffix.lower()) == want and p.is_file():
                return p, (rel.parent / p.name).as_posix(), True
    return None, rel.as_posix(), False


def probe_image(path: Path, file_name: str, verify: bool = True) -> ImageCheck:
    """Open (and with ``verify`` fully decode, at 1/8 DCT scale) one image: its stored size and EXIF orientation tag,
    or ``problem`` when it cannot be read. Decides nothing about orientation (see ``check_image``)."""
    res = ImageCheck(path=path, file_name=file_name)
    try:
        with Image.open(path) as im:
            res.raw_size = (int(im.size[0]), int(im.size[1]))
            try:
                res.exif_tag = int(im.getexif().get(EXIF_ORIENTATION, 1) or 1)
            except Exception:  # a broken EXIF block is not a broken image; treat as no tag
                res.exif_tag = 1
        if verify:
            decode_image(path, "raw", draft_size=1)  # draft 1/8: every entropy-coded byte is still read
    except ImageDecodeError as e:
        res.problem = f"corrupt or truncated image: {e}"
    except Exception as e:  # PIL raises many types for unreadable files
        res.problem = f"corrupt or unreadable image {path}: {e}"
    return res


def upright_size(chk: ImageCheck) -> tuple[int, int]:
    """``(w, h)`` of a probed image as viewers show it (its EXIF orientation applied)."""
    w, h = chk.raw_size
    return (h, w) if chk.exif_tag in SWAPS_SIDES else (w, h)


def check_image(path: Path, file_name: str, width: int, height: int, verify: bool = True) -> ImageCheck:
    """Probe one image (``probe_image``) and decide its orientation from the annotated ``width`` x ``height``."""
    res = probe_image(path, file_name, verify)
    if res.problem is not None:
        return res
    w, h = res.raw_size
    upright = upright_size(res)
    raw_ok, exif_ok = (w, h) == (width, height), upright == (width, height)
    if res.exif_tag == 1 and raw_ok:
        res.orientation = "raw"  # no rotating tag: both frames are the same
    elif exif_ok:
        res.orientation = "exif"  # also when both match: the image as viewers (and the TACO loader) show it
    elif raw_ok:
        res.orientation = "raw"
    else:
        res.size_mismatch = True
        res.problem = (
            f"annotated size {width}x{height} matches neither the stored size {w}x{h} nor the EXIF-rotated size "
            f"{upright[0]}x{upright[1]} (EXIF orientation {res.exif_tag})"
        )
    return res


def _read_images(ann_path: Path, coco: dict) -> dict[int, dict]:
    """The ``images`` records by id: structure, unique ids, positive sizes, file names that stay under the root."""
    image_recs: dict[int, dict] = {}
    for k, im in enumerate(coco["images"]):
        iid, where = _record_id(ann_path, "images", k, im)
        if iid in image_recs:
            raise _err(ann_path, where, f"field 'id' {iid} is repeated")
        w = _int_field(ann_path, where, im, "width", positive=True)
        h = _int_field(ann_path, where, im, "height", positive=True)
        try:
            safe_relative_path(im.get("file_name"), "field 'file_name'")
        except ValueError as e:
            raise _err(ann_path, where, str(e)) from None
        image_recs[iid] = {"id": iid, "file_name": im["file_name"], "width": w, "height": h}
    return image_recs


def _read_annotations(ann_path: Path, coco: dict, image_recs: dict[int, dict], label_of: dict[int, int],
                      num_labels: int, fixes: dict[str, Any]) -> tuple[list[dict], np.ndarray]:
    """The ``annotations``: structure and references checked, boxes clamped into their image (zero-area ones
    dropped), counted in ``fixes``. Returns (annotations with ``box_xyxy`` and ``label``, annotations per label)."""
    seen_ann: set[int] = set()
    dup_values: set[int] = set()
    anns: list[dict] = []
    used_labels = np.zeros(num_labels, dtype=np.int64)
    for k, a in enumerate(coco["annotations"]):
        aid, where = _record_id(ann_path, "annotations", k, a)
        if aid in seen_ann:
            fixes["duplicate_annotation_ids"] += 1
            dup_values.add(aid)
        seen_ann.add(aid)
        iid = _int_field(ann_path, where, a, "image_id")
        if iid not in image_recs:
            raise _err(ann_path, where, f"field 'image_id' {iid} is not an image id of this file")
        cid = _int_field(ann_path, where, a, "category_id")
        if cid not in label_of:
            raise _err(ann_path, where, f"field 'category_id' {cid} is not a category id of this file")
        bbox = a.get("bbox")
        if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)):
            raise _err(ann_path, where, f"field 'bbox' must be 4 finite numbers [x, y, w, h], got {bbox!r}")
        im = image_recs[iid]
        xyxy = coco_xywh_to_xyxy(np.asarray(bbox, dtype=np.float64))
        clamped = clip_boxes(xyxy, (im["height"], im["width"]))
        if not np.array_equal(clamped, xyxy):
            fixes["boxes_clamped"] += 1
        cx1, cy1, cx2, cy2 = (float(v) for v in clamped)
        if cx2 - cx1 <= 0 or cy2 - cy1 <= 0:
            fixes["zero_area_boxes_dropped"] += 1
            continue
        area = a.get("area")
        if not isinstance(area, (int, float)) or isinstance(area, bool) or not math.isfinite(area) or area <= 0:
            area = (cx2 - cx1) * (cy2 - cy1)
        label = label_of[cid]
        used_labels[label] += 1
        anns.append({"image_id": iid, "label": label, "box_xyxy": [cx1, cy1, cx2, cy2], "area": float(area),
                     "iscrowd": int(a.get("iscrowd", 0) or 0), "source_id": aid})
    fixes["duplicate_annotation_id_values"] = sorted(dup_values)
    return anns, used_labels


def _check_image_files(ann_path: Path, images_dir: Path, image_recs: dict[int, dict], *, skip_missing: bool,
                       verify: bool, progress: bool, collect_problems: list[str] | None,
                       fixes: dict[str, Any]) -> tuple[list[dict], list[str], list[str]]:
    """The image files: existence (extension case fixed), full decode, annotated size vs upright size, EXIF
    orientation. Returns (the kept image records, missing file names, size-mismatch descriptions); unusable files
    raise (or, with ``collect_problems``, are listed there and dropped)."""
    missing: list[str] = []
    broken: list[str] = []
    mismatched: list[str] = []
    checked: dict[int, ImageCheck] = {}
    ids = sorted(image_recs)
    resolved: dict[int, tuple[Path, str, bool]] = {}
    for iid in ids:
        path, rel, ext_fixed = resolve_image(images_dir, image_recs[iid]["file_name"])
        if path is None:
            missing.append(image_recs[iid]["file_name"])
        else:
            resolved[iid] = (path, rel, ext_fixed)
    if missing and not skip_missing and collect_problems is None:  # fail before spending time decoding
        first = ", ".join(str(images_dir / m) for m in missing[:MAX_LISTED])
        raise DatasetError(
            f"{len(missing)} of {len(ids)} images listed in {ann_path} are not under {images_dir} "
            f"(first: {first}); pass --skip-missing to drop them"
        )
    for iid in tqdm(list(resolved), desc="checking images", unit="img", disable=not progress, leave=False):
        im = image_recs[iid]
        path, rel, ext_fixed = resolved[iid]
        chk = check_image(path, rel, im["width"], im["height"], verify=verify)
        chk.extension_fixed = ext_fixed
        if chk.problem is not None:
            tag = f"{path} (image id {iid}): {chk.problem}"
            (mismatched if chk.size_mismatch else broken).append(tag)
            continue
        checked[iid] = chk

    if collect_problems is not None:
        collect_problems += [f"missing: {images_dir / m}" for m in missing] + broken + mismatched
    else:
        if broken:
            raise DatasetError(f"{len(broken)} unreadable image(s) listed in {ann_path}: " + "; ".join(broken[:MAX_LISTED]))
        if mismatched and not skip_missing:
            raise DatasetError(
                f"{len(mismatched)} image(s) do not match their annotated size in either orientation: "
                + "; ".join(mismatched[:MAX_LISTED]) + " (pass --skip-missing to drop them)"
            )
    fixes["missing_images_dropped"] = len(missing)
    fixes["size_mismatch_images_dropped"] = len(mismatched)

    out_images = []
    for iid in ids:
        chk = checked.get(iid)
        if chk is None:
            continue
        im = image_recs[iid]
        fixes["extension_case_fixed"] += int(chk.extension_fixed)
        if chk.orientation == "exif":
            # a transposing tag with a matching upright size, or a same-size tag (mirror / 180 degrees) applied
            fixes["exif_rotated" if chk.exif_tag in SWAPS_SIDES and im["width"] != im["height"]
                  else "exif_applied_same_size"] += 1
        if chk.orientation == "raw" and chk.exif_tag != 1:
            fixes["exif_tag_ignored"] += 1
        rec = {"id": iid, "file_name": chk.file_name, "width": im["width"], "height": im["height"],
               "orientation": chk.orientation}
        if chk.exif_tag != 1:
            rec["exif_orientation_tag"] = chk.exif_tag
        out_images.append(rec)
    return out_images, missing, mismatched


def load_source(
    annotations: str | Path,
    images: str | Path,
    *,
    classes: str = "categories",
    skip_missing: bool = False,
    verify: bool = True,
    progress: bool = True,
    collect_problems: list[str] | None = None,
) -> SourceDataset:
    """Parse, validate and fix a COCO file against its image folder: its images, its annotations, the image files.

    With ``collect_problems`` (a list), image-level problems (missing, corrupt, size mismatch) are appended to it
    instead of raising, and the affected images are dropped: that is ``rtcodetr data check``.
    """
    ann_path, images_dir = Path(annotations), Path(images)
    if not images_dir.is_dir():
        raise DatasetError(f"image directory not found: {images_dir}")
    coco = read_coco(ann_path)
    label_map, label_of = build_label_map(ann_path, coco["categories"], classes)
    fixes: dict[str, Any] = {
        "duplicate_annotation_ids": 0,
        "boxes_clamped": 0,
        "zero_area_boxes_dropped": 0,
        "category_ids_remapped": 0,
        "extension_case_fixed": 0,
        "exif_rotated": 0,
        "exif_applied_same_size": 0,
        "exif_tag_ignored": 0,
        "missing_images_dropped": 0,
        "annotations_of_dropped_images": 0,
        "size_mismatch_images_dropped": 0,
    }
    image_recs = _read_images(ann_path, coco)
    anns, used_labels = _read_annotations(ann_path, coco, image_recs, label_of, label_map.num_labels, fixes)
    fixes["category_ids_remapped"] = sum(
        1 for cid, lab in label_of.items() if cid != int(label_map.category_ids[lab])
    )
    out_images, missing, mismatched = _check_image_files(
        ann_path, images_dir, image_recs, skip_missing=skip_missing, verify=verify, progress=progress,
        collect_problems=collect_problems, fixes=fixes)
    kept = {im["id"] for im in out_images}
    before = len(anns)
    anns = [a for a in anns if a["image_id"] in kept]
    fixes["annotations_of_dropped_images"] = before - len(anns)

    ext_counts: dict[str, int] = {}
    for im in image_recs.values():
        ext = Path(im["file_name"]).suffix
        ext_counts[ext] = ext_counts.get(ext, 0) + 1
    kept_used = np.zeros(label_map.num_labels, dtype=np.int64)
    for a in anns:
        kept_used[a["label"]] += 1
    report = {
        "source": {"annotations": str(ann_path.resolve()), "sha256": sha256_file(ann_path),
                   "images": str(images_dir.resolve())},
        "counts": {
            "images_in_file": len(image_recs),
            "annotations_in_file": len(coco["annotations"]),
            "categories_in_file": len(coco["categories"]),
            "images_kept": len(out_images),
            "annotations_kept": len(anns),
        },
        "fixes": fixes,
        "file_name_extensions": ext_counts,
        "classes": classes,
        "label_policy": (
            "every category of the source file keeps a label, used or not, so label maps agree across splits and "
            "subsets; 'unused_labels_in_file' have no annotation in the source file, 'labels_without_annotations' "
            "have none among the kept images"
        ),
        "unused_labels_in_file": [label_map.names[i] for i in np.flatnonzero(used_labels == 0)],
        "labels_without_annotations": [label_map.names[i] for i in np.flatnonzero(kept_used == 0)],
        "missing_images": [str(m) for m in missing[:50]],
        "dropped_size_mismatch": mismatched[:50],
    }
    return SourceDataset(out_images, anns, label_map, report, source_image_ids=set(image_recs))


def read_id_list(path: str | Path) -> list[int]:
    """Image ids from a text file: one per line (commas/whitespace also split), ``#`` starts a comment."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"image id list not found: {path}")
    ids: list[int] = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        for tok in line.split("#", 1)[0].replace(",", " ").split():
            try:
                ids.append(int(tok))
            except ValueError:
                raise DatasetError(f"{path}: line {n}: {tok!r} is not an integer image id") from None
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise DatasetError(f"{path}: image ids repeated: {dup[:MAX_LISTED]}")
    return ids


def split_ids(
    image_ids: list[int],
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    val_ids: list[int] | None = None,
    test_ids: list[int] | None = None,
    all_ids: set[int] | None = None,
    names: tuple[str, str] = ("--val-ids", "--test-ids"),
) -> tuple[dict[str, list[int]], dict]:
    """Seeded image-level split (or pinned by id lists). Returns sorted ids per split and a report section.

    ``all_ids``: ids of the whole source file; a pinned id that is in the file but was dropped (missing image)
    is counted instead of being an error.
    """
    for name, f in (("val fraction", val_fraction), ("test fraction", test_fraction)):
        if not 0.0 <= f < 1.0:
            raise DatasetError(f"{name} must be in [0, 1), got {f}")
    if val_fraction + test_fraction >= 1.0:
        raise DatasetError(f"val + test fractions must leave training images, got {val_fraction} + {test_fraction}")
    available = set(image_ids)
    universe = all_ids if all_ids is not None else available
    info: dict[str, Any] = {"seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction}
    pinned: dict[str, list[int]] = {}
    for split, ids, flag in (("val", val_ids, names[0]), ("test", test_ids, names[1])):
        if ids is None:
            continue
        unknown = [i for i in ids if i not in universe]
        if unknown:
            raise DatasetError(f"{flag}: {len(unknown)} id(s) are not image ids of the annotation file: {unknown[:MAX_LISTED]}")
        pinned[split] = sorted(i for i in ids if i in available)
        info[f"{split}_pinned"] = True
        info[f"{split}_pinned_ids_dropped"] = len(ids) - len(pinned[split])
    if "val" in pinned and "test" in pinned:
        both = set(pinned["val"]) & set(pinned["test"])
        if both:
            raise DatasetError(f"{names[0]} and {names[1]} share image ids: {sorted(both)[:MAX_LISTED]}")
    n = len(image_ids)
    rng = np.random.default_rng(seed)
    rest = np.array(sorted(available - set(pinned.get("val", [])) - set(pinned.get("test", []))), dtype=np.int64)
    rest = rest[rng.permutation(len(rest))]
    out: dict[str, list[int]] = {}
    pos = 0
    for split, frac in (("val", val_fraction), ("test", test_fraction)):
        if split in pinned:
            out[split] = pinned[split]
            continue
        k = min(int(round(frac * n)), len(rest) - pos)
        out[split] = sorted(int(i) for i in rest[pos: pos + k])
        pos += k
    out["train"] = sorted(int(i) for i in rest[pos:])
    return {s: out[s] for s in ("train", "val", "test")}, info


def run(cfg: PrepareConfig) -> PreparedData:
    """``rtcodetr data taco``: load + fix + split + write. Returns the prepared directory."""
    for key in ("annotations", "images"):
        if getattr(cfg, key) is None:
            raise DatasetError(f"data taco: '{key}' is required (--{key} PATH, {key}=PATH or the --config file)")
    src = load_source(cfg.annotations, cfg.images, classes=cfg.classes, skip_missing=cfg.skip_missing,
                      progress=cfg.progress)
    val_ids = read_id_list(cfg.val_ids) if cfg.val_ids is not None else None
    test_ids = read_id_list(cfg.test_ids) if cfg.test_ids is not None else None
    ids, split_info = split_ids(
        [im["id"] for im in src.images], val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
        seed=cfg.seed, val_ids=val_ids, test_ids=test_ids, all_ids=src.source_image_ids,
    )
    by_id = {im["id"]: im for im in src.images}
    splits: dict[str, SplitRecords] = {}
    for split, members in ids.items():
        keep = set(members)
        splits[split] = SplitRecords(images=[by_id[i] for i in members],
                                     annotations=[a for a in src.annotations if a["image_id"] in keep])
    report = dict(src.report)
    report["split"] = dict(split_info, **{f"{s}_images": len(v) for s, v in ids.items()})
    sources: dict[str, Any] = {"annotations": report["source"]}
    for key, p in (("val_ids", cfg.val_ids), ("test_ids", cfg.test_ids)):
        if p is not None:
            sources[key] = {"path": str(Path(p).resolve()), "sha256": sha256_file(p)}
    settings = config_to_dict(cfg)
    settings.pop("progress", None)
    return write_prepared(cfg.out, name=cfg.name, image_root=cfg.images, label_map=src.label_map, splits=splits,
                          report=report, sources=sources, settings=settings)


def check(annotations: str | Path, images: str | Path, progress: bool = True) -> tuple[list[str], dict]:
    """``rtcodetr data check``: decode every image, return (problems, report) and write nothing."""
    problems: list[str] = []
    src = load_source(annotations, images, verify=True, progress=progress, collect_problems=problems)
    return problems, src.report
