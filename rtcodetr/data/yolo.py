"""Export a prepared dataset as an ultralytics (YOLO) dataset with the same class order as ``label_map.json``.

Layout::

    OUT/data.yaml                       path, train/val/test image dirs, names {label: name} in label order
    OUT/images/{split}/<name>.<ext>     symlinks to the prepared images (or copies)
    OUT/labels/{split}/<name>.txt       one line per box: "label cx cy w h", normalized by the upright image size

``<name>`` is the prepared ``file_name`` with ``/`` replaced by ``__`` (TACO repeats file names across
``batch_N/`` folders, and ultralytics finds a label by replacing the last ``/images/`` of the image path, which a
nested ``images/`` folder in a file name would break).

EXIF: ultralytics (OpenCV) always applies the EXIF orientation when it reads an image. Images prepared with
``orientation: exif`` are therefore linked as they are (their labels are in the upright frame). Images prepared
with ``orientation: raw`` that still carry a rotating EXIF tag would be turned by ultralytics under their labels,
so they are re-encoded without EXIF (JPEG quality 95) instead of linked; the number is printed and returned in
``yolo_export.json``.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from rtcodetr.data.boxes import coco_xywh_to_xyxy, xyxy_to_cxcywh_normalized
from rtcodetr.data.prepared import PreparedData, safe_relative_path


def yolo_file_stem(file_name: str) -> str:
    """Flat, collision-checked name for a prepared ``file_name`` (``batch_1/000006.jpg`` -> ``batch_1__000006.jpg``)."""
    return safe_relative_path(file_name).as_posix().replace("/", "__")


def _place(src: Path, dst: Path, link: bool) -> None:
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    if link:
        os.symlink(src.resolve(), dst)
    else:
        shutil.copy2(src, dst)


def export_yolo(data: PreparedData | str | Path, out: str | Path, link: bool = True) -> Path:
    """Write an ultralytics dataset for every labelled split of ``data`` under ``out``; return the ``data.yaml`` path.

    Unlabelled splits are left out (listed in ``yolo_export.json``): ultralytics would train on them as background
    images, teaching the detector that their objects are not there.

    Labels: ``label cx cy w h`` with coordinates normalized by the image's (upright) width/height, 6 decimals;
    crowd boxes are skipped (YOLO has no ignore regions). Images without boxes get an empty label file
    (ultralytics counts them as backgrounds).
    """
    data = data if isinstance(data, PreparedData) else PreparedData.load(data)
    out = Path(out).resolve()
    counts: dict[str, dict[str, int]] = {}
    reencoded = 0
    for split in data.labelled_splits:  # unlabelled splits would become "background" images with no boxes
        coco = data.coco(split)
        img_dir, lab_dir = out / "images" / split, out / "labels" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        lab_dir.mkdir(parents=True, exist_ok=True)
        by_image: dict[int, list[dict]] = {}
        for a in coco["annotations"]:
            by_image.setdefault(int(a["image_id"]), []).append(a)
        seen: dict[str, str] = {}
        n_boxes = 0
        for im in coco["images"]:
            flat = yolo_file_stem(im["file_name"])
            if flat in seen:
                raise ValueError(
                    f"{data.split_file(split)}: image id {im['id']}: field 'file_name' {im['file_name']!r} flattens to "
                    f"{flat!r} like {seen[flat]!r}"
                )
            seen[flat] = im["file_name"]
            src = data.image_path(im["file_name"], split)
            if not src.is_file():
                raise FileNotFoundError(f"{src} (image id {im['id']} of {data.split_file(split)}) does not exist")
            dst = img_dir / flat
            if im.get("orientation") == "raw" and int(im.get("exif_orientation_tag", 1)) != 1:
                with Image.open(src) as pil:  # raw pixels are the annotated frame: drop the tag ultralytics would apply
                    pil.convert("RGB").save(dst.with_suffix(".jpg"), quality=95)
                dst = dst.with_suffix(".jpg")
                reencoded += 1
            else:
                _place(src, dst, link)
            anns = [a for a in by_image.get(int(im["id"]), []) if not a.get("iscrowd", 0)]
            lines = []
            if anns:
                xyxy = coco_xywh_to_xyxy(np.array([a["bbox"] for a in anns], dtype=np.float64))
                norm = np.clip(xyxy_to_cxcywh_normalized(xyxy, (im["height"], im["width"])), 0.0, 1.0)
                for a, (cx, cy, w, h) in zip(anns, norm):
                    label = data.label_map.label_of_category(a["category_id"])
                    lines.append(f"{label} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
            (lab_dir / (Path(dst.name).stem + ".txt")).write_text("\n".join(lines) + ("\n" if lines else ""))
            n_boxes += len(lines)
        counts[split] = {"images": len(coco["images"]), "boxes": n_boxes}
    cfg = {
        "path": str(out),
        **{s: f"images/{s}" for s in data.labelled_splits},
        "nc": data.label_map.num_labels,
        "names": {i: n for i, n in enumerate(data.label_map.names)},
    }
    yaml_path = out / "data.yaml"
    with open(yaml_path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False, allow_unicode=True)
    with open(out / "yolo_export.json", "w") as f:
        json.dump({"source": str(data.root), "label_map_sha256": data.label_map.fingerprint(), "link": link,
                   "splits": counts, "unlabelled_splits_left_out": data.unlabelled_splits,
                   "reencoded_without_exif": reencoded}, f, indent=2)
    return yaml_path
