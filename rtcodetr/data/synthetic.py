"""A deterministic synthetic litter-like detection set that a tiny detector learns in minutes on CPU.

Each image is a textured "ground" (a base colour from a small palette of soil / asphalt / grass / sand tones,
low-frequency blotches and pixel noise) with 1-4 non-overlapping objects of four colour-coded litter classes:

====  ============  =====================================  =======
label name          shape                                  colour
====  ============  =====================================  =======
0     bottle_cap    filled disc                            red
1     carton        filled square                          blue
2     wrapper       filled triangle (random orientation)   green
3     can_ring      ring (annulus)                         yellow
====  ============  =====================================  =======

This is the recipe measured in ``CPU_RECIPES.md`` (circle / square / triangle / ring, 24-120 px at 256 px, 1-4
objects on noisy textured backgrounds), with object sizes scaled by ``size / 256``. Objects get per-object colour
jitter, a shading gradient and pixel noise so the detector must learn shape and colour rather than one exact RGB
value, while staying as learnable as the measured recipe.

Determinism: image ``i`` of split ``s`` is drawn from ``numpy.random.default_rng([seed, split_index, i])``, so
the same seed gives byte-identical files, and adding training images does not change the validation set.
Output goes through :func:`rtcodetr.data.prepared.write_prepared`, exactly like the TACO path.

``unlabeled=N`` draws N more images from the same generator on their own stream (split index 3) after the others
and writes them as the unlabelled split ``unlabeled`` (``prepared.add_unlabelled_split``, the writer behind
``data add-images``), dropping their boxes: the labelled split files and images do not change with N.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from rtcodetr.data.prepared import LabelMap, PreparedData, SplitRecords, add_unlabelled_split, sha256_file, write_prepared

CLASSES: tuple[tuple[str, str, tuple[int, int, int]], ...] = (
    # (name, supercategory, base RGB)
    ("bottle_cap", "cap", (205, 45, 40)),
    ("carton", "carton", (45, 85, 205)),
    ("wrapper", "plastic", (45, 175, 70)),
    ("can_ring", "metal", (225, 200, 45)),
)
GROUND_COLOURS = ((112, 92, 70), (96, 96, 92), (86, 110, 64), (170, 150, 112), (70, 62, 56))
SPLIT_INDEX = {"train": 0, "val": 1, "test": 2, "unlabeled": 3}
UNLABELED_SPLIT = "unlabeled"
MIN_OBJ_AT_256, MAX_OBJ_AT_256 = 24, 120
JPEG_QUALITY = 95
GENERATOR_VERSION = 1


def label_map() -> LabelMap:
    """The synthetic label map (4 labels)."""
    return LabelMap([c[0] for c in CLASSES], [c[1] for c in CLASSES], [[i] for i in range(len(CLASSES))])


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Textured ground ``[size, size, 3]`` float32 in 0..255."""
    base = np.asarray(GROUND_COLOURS[rng.integers(len(GROUND_COLOURS))], dtype=np.float32)
    base = base + rng.normal(0, 10, 3)
    img = np.broadcast_to(base, (size, size, 3)).astype(np.float32)
    # low-frequency blotches (two octaves, bilinear-upsampled random grids): uneven ground, shadows
    for cells, amp in ((4, 28.0), (12, 14.0)):
        grid = rng.normal(0, 1, (cells, cells, 1)).astype(np.float32)
        up = np.asarray(
            Image.fromarray(grid[..., 0]).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32
        )
        img += amp * up[..., None] * (1 + 0.15 * rng.normal(0, 1, 3)).astype(np.float32)
    img += rng.normal(0, 7, (size, size, 3)).astype(np.float32)  # grain
    return img


def _shape_mask(rng: np.random.Generator, label: int, d: int) -> np.ndarray:
    """Boolean mask ``[d, d]`` of one object of class ``label`` with extent ``d`` pixels."""
    m = Image.new("L", (d, d), 0)
    draw = ImageDraw.Draw(m)
    if label == 0:  # disc
        draw.ellipse([0, 0, d - 1, d - 1], fill=255)
    elif label == 1:  # square
        draw.rectangle([0, 0, d - 1, d - 1], fill=255)
    elif label == 2:  # triangle pointing in one of 4 directions, apex jittered
        t = float(rng.uniform(0.25, 0.75)) * (d - 1)
        pts = [(0, d - 1), (d - 1, d - 1), (t, 0)]
        k = int(rng.integers(4))
        for _ in range(k):  # rotate by 90 degrees about the mask centre
            pts = [(d - 1 - y, x) for x, y in pts]
        draw.polygon(pts, fill=255)
    else:  # ring
        draw.ellipse([0, 0, d - 1, d - 1], fill=255)
        th = max(2, int(round(d * float(rng.uniform(0.18, 0.28)))))
        draw.ellipse([th, th, d - 1 - th, d - 1 - th], fill=0)
    return np.asarray(m) > 127


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def render_image(rng: np.random.Generator, size: int) -> tuple[Image.Image, list[tuple[int, np.ndarray]]]:
    """One synthetic image (RGB, ``size`` x ``size``) and its objects as ``(label, xyxy float64 [4])``.

    Boxes are the exact pixel extent of each drawn mask: columns ``x0..x1-1`` covered -> ``[x0, x1]``.
    """
    img = _background(rng, size)
    scale = size / 256.0
    lo = max(4, int(round(MIN_OBJ_AT_256 * scale)))
    hi = max(lo + 1, int(round(MAX_OBJ_AT_256 * scale)))
    objects: list[tuple[int, np.ndarray]] = []
    n_obj = int(rng.integers(1, 5))
    for _ in range(n_obj):
        label = int(rng.integers(len(CLASSES)))
        d = int(rng.integers(lo, hi + 1))
        d = min(d, size)
        for _attempt in range(50):
            x0 = int(rng.integers(0, size - d + 1))
            y0 = int(rng.integers(0, size - d + 1))
            mask = _shape_mask(rng, label, d)
            ys, xs = np.nonzero(mask)
            box = np.array([x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1], dtype=np.float64)
            if all(_iou(box, b) == 0.0 for _, b in objects):
                break
        else:
            continue  # no free spot: fewer objects in this image
        colour = np.asarray(CLASSES[label][2], dtype=np.float32) + rng.normal(0, 14, 3).astype(np.float32)
        # shading: a linear brightness ramp across the object (lit from a random side)
        ang = float(rng.uniform(0, 2 * np.pi))
        yy, xx = np.mgrid[0:d, 0:d].astype(np.float32) / max(d - 1, 1) - 0.5
        shade = 1.0 + 0.35 * (np.cos(ang) * xx + np.sin(ang) * yy)
        patch = colour[None, None, :] * shade[..., None] + rng.normal(0, 6, (d, d, 3)).astype(np.float32)
        region = img[y0 : y0 + d, x0 : x0 + d]
        region[mask] = patch[mask]
        objects.append((label, box))
    pil = Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8), "RGB")
    return pil, objects


def make_synthetic(
    out: str | Path, train: int = 64, val: int = 16, test: int = 16, size: int = 320, seed: int = 0,
    unlabeled: int = 0,
) -> PreparedData:
    """Write a synthetic prepared dataset directory at ``out`` (images under ``out/images``) and return it.

    Args:
        out: output directory (created; existing files of the same names are overwritten).
        train, val, test: number of images per split (a split with 0 images is written empty).
        size: square image side in pixels (objects are 24-120 px at 256, scaled proportionally).
        seed: the only source of randomness.
        unlabeled: number of extra images written as the unlabelled split ``unlabeled`` (ids after the test
            split's; none and no split entry when 0).
    """
    if size < 32:
        raise ValueError(f"synthetic size must be at least 32 px, got {size}")
    for name, n in (("train", train), ("val", val), ("test", test), ("unlabeled", unlabeled)):
        if n < 0:
            raise ValueError(f"synthetic {name} count must be >= 0, got {n}")
    out = Path(out)
    image_root = out / "images"
    splits: dict[str, SplitRecords] = {}
    next_id = 1
    per_label = np.zeros(len(CLASSES), dtype=np.int64)
    for split, count in (("train", train), ("val", val), ("test", test)):
        (image_root / split).mkdir(parents=True, exist_ok=True)
        recs = SplitRecords()
        for i in range(count):
            rng = np.random.default_rng([seed, SPLIT_INDEX[split], i])
            pil, objects = render_image(rng, size)
            file_name = f"{split}/{i:06d}.jpg"
            pil.save(image_root / file_name, quality=JPEG_QUALITY, subsampling=0)
            recs.images.append({"id": next_id, "file_name": file_name, "width": size, "height": size,
                                "orientation": "raw"})
            for label, box in objects:
                per_label[label] += 1
                recs.annotations.append({"image_id": next_id, "label": label, "box_xyxy": box.tolist(),
                                         "area": float((box[2] - box[0]) * (box[3] - box[1])), "iscrowd": 0})
            next_id += 1
        splits[split] = recs
    lm = label_map()
    settings = {"train": train, "val": val, "test": test, "size": size, "seed": seed}
    if unlabeled:
        settings["unlabeled"] = unlabeled  # only when used: dataset.json stays as before for unlabeled=0
    report = {
        "source": "synthetic",
        "fixes": {},
        "objects_per_label": {lm.names[i]: int(per_label[i]) for i in range(lm.num_labels)},
        "notes": ["generated data: nothing to fix"],
    }
    sources = {"generator": "rtcodetr.data.synthetic", "generator_version": GENERATOR_VERSION}
    data = write_prepared(out, name="synthetic", image_root=image_root, label_map=lm, splits=splits, report=report,
                          sources=sources, settings=settings)
    if not unlabeled:
        return data
    (image_root / UNLABELED_SPLIT).mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(unlabeled):
        rng = np.random.default_rng([seed, SPLIT_INDEX[UNLABELED_SPLIT], i])
        pil, _objects = render_image(rng, size)  # drawn exactly like a labelled image; the boxes are dropped
        file_name = f"{UNLABELED_SPLIT}/{i:06d}.jpg"
        pil.save(image_root / file_name, quality=JPEG_QUALITY, subsampling=0)
        images.append({"id": next_id + i, "file_name": file_name, "width": size, "height": size,
                       "orientation": "raw", "sha256": sha256_file(image_root / file_name)})
    source = dict(sources, count=unlabeled, skipped=0, seed=seed, split_index=SPLIT_INDEX[UNLABELED_SPLIT])
    return add_unlabelled_split(data, UNLABELED_SPLIT, images, source=source, overwrite=True)
