"""``CocoDetection``: a torch Dataset over one split of a prepared dataset directory.

The whole index lives in a handful of numpy arrays (ids, sizes, orientation flags, one flat box array with
per-image offsets, file names as one fixed-width string array). Forked DataLoader workers then share those pages
instead of touching (and so copying, through refcount writes) millions of small Python objects, which is what makes
a per-image list of dicts blow up memory with many workers (lyuwenyu/RT-DETR issue #93).

Big JPEGs (TACO photos are 8-12 MP) are decoded in draft mode when ``draft_size`` is given: libjpeg scales by
1/2, 1/4 or 1/8 in the DCT, keeping both sides >= ``draft_size``, several times faster than a full decode followed
by a resize. The draft scale is recorded as the first step of ``target["affine"]``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, ImageOps

from rtcodetr.data.boxes import coco_xywh_to_xyxy
from rtcodetr.data.prepared import PreparedData, safe_relative_path
from rtcodetr.errors import InputError


EXIF_ORIENTATION = 0x0112


class ImageDecodeError(OSError, InputError):
    """An image file cannot be opened or fully decoded; the message names the file (and image id)."""


def decode_image(
    path: str | Path, orientation: str = "raw", draft_size: int | None = None, what: str = ""
) -> tuple[Image.Image, float]:
    """Decode ``path`` to an RGB PIL image; return it and the draft scale applied (1.0 when none).

    ``orientation="exif"`` applies the EXIF orientation tag (rotation/mirroring) after decoding; ``"raw"`` ignores
    it, because then the annotations refer to the stored pixel grid. With ``draft_size`` a JPEG is decoded at the
    largest DCT downscale (1/2, 1/4, 1/8) whose both sides stay >= ``draft_size``; the exact scale (the DCT maps
    original pixel ``x`` to ``x / s``) is returned. A corrupt or truncated file raises ImageDecodeError naming it.
    """
    scale = 1.0
    try:
        with Image.open(path) as im:
            if draft_size is not None and im.format == "JPEG":
                w, h = im.size
                # PIL picks s in {8,4,2,1} with s <= min(w // size, h // size): both sides stay >= draft_size
                res = im.draft("RGB", (int(draft_size), int(draft_size)))
                if res is not None:
                    scale = res[1][2] / w  # == 1 / s exactly
            im.load()  # decodes every byte: a truncated file fails here, not later in a worker
            if orientation == "exif" and im.getexif().get(EXIF_ORIENTATION, 1) not in (None, 1):
                im = ImageOps.exif_transpose(im)  # (skipped without a tag: it would copy the whole image)
            # convert() copies even when the mode already matches: skip it for RGB (every JPEG, draft or not);
            # the decoded pixels outlive the `with` (it only closes the file)
            out = im if im.mode == "RGB" else im.convert("RGB")
    except FileNotFoundError:
        raise ImageDecodeError(f"image file not found: {path}{what}") from None
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as err:
        raise ImageDecodeError(f"cannot decode image {path}{what}: {err}") from None
    return out, scale


class CocoDetection(torch.utils.data.Dataset):
    """One split of a prepared dataset.

    ``__getitem__(i) -> (image, target)``; without transforms ``image`` is a PIL RGB image. ``target``:
    ``image_id`` int, ``boxes`` float32 ``[N, 4]`` absolute xyxy in the current image, ``labels`` int64 ``[N]``
    (0..K-1), ``area`` float32 ``[N]``, ``iscrowd`` int64 ``[N]``, ``orig_size`` int64 ``[2]`` (h, w of the annotated
    image), ``size`` int64 ``[2]`` (h, w of the current image), ``affine`` float64 ``[3, 3]`` (annotated-image pixels
    -> current-image pixels).

    An unlabelled split (``data add-images``) yields the same keys with ``boxes`` ``[0, 4]``, ``labels``/``area``/
    ``iscrowd`` ``[0]``; ``labelled`` says which kind the split is, so a trainer can keep its images out of the
    detection loss.
    """

    def __init__(
        self,
        data: PreparedData | str | Path,
        split: str,
        transforms: Callable | None = None,
        draft_size: int | None = None,
    ) -> None:
        self.data = data if isinstance(data, PreparedData) else PreparedData.load(data)
        self.split = split
        self.transforms = transforms
        self.draft_size = draft_size
        self.labelled = self.data.is_labelled(split)
        self.image_root = str(self.data.image_root_of(split))
        src = self.data.split_file(split)
        # parsed here and dropped after indexing (not through PreparedData.coco's cache): the dicts must not outlive
        # __init__, or forked workers would copy them page by page as the garbage collector walks them
        with open(src) as f:
            coco = json.load(f)
        images = coco["images"]
        n = len(images)
        self.image_ids = np.fromiter((im["id"] for im in images), dtype=np.int64, count=n)
        self.widths = np.fromiter((im["width"] for im in images), dtype=np.int64, count=n)
        self.heights = np.fromiter((im["height"] for im in images), dtype=np.int64, count=n)
        self.exif = np.fromiter((im.get("orientation", "raw") == "exif" for im in images), dtype=bool, count=n)
        for im in images:
            try:
                safe_relative_path(im["file_name"])
            except ValueError as e:
                raise ValueError(f"{src}: image id {im['id']}: field 'file_name': {e}") from None
        self.file_names = np.array([im["file_name"] for im in images], dtype=np.str_)
        row_of = {int(iid): r for r, iid in enumerate(self.image_ids)}
        anns = coco["annotations"]
        m = len(anns)
        rows = np.empty(m, dtype=np.int64)
        for j, a in enumerate(anns):
            r = row_of.get(int(a["image_id"]))
            if r is None:
                raise ValueError(f"{src}: annotation id {a.get('id')}: field 'image_id' {a['image_id']} not in images")
            rows[j] = r
        bbox = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(m, 4)
        labels = np.fromiter((self.data.label_map.label_of_category(a["category_id"]) for a in anns), np.int64, m)
        area = np.fromiter((a.get("area", 0.0) for a in anns), np.float32, m)
        crowd = np.fromiter((a.get("iscrowd", 0) for a in anns), np.int64, m)
        order = np.argsort(rows, kind="stable")  # group by image, keep file order within an image
        self.boxes = coco_xywh_to_xyxy(bbox[order]).astype(np.float32)
        self.labels = labels[order]
        self.areas = area[order]
        self.iscrowd = crowd[order]
        counts = np.bincount(rows, minlength=n)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # image r: [off[r], off[r+1])

    def __len__(self) -> int:
        return len(self.image_ids)

    def set_epoch(self, epoch: int) -> None:
        """Forward the epoch to the transforms (augmentations switch off from their ``stop_epoch``)."""
        if self.transforms is not None and hasattr(self.transforms, "set_epoch"):
            self.transforms.set_epoch(epoch)

    def image_path(self, i: int) -> Path:
        return Path(self.image_root) / str(self.file_names[i])

    def target(self, i: int) -> dict[str, Any]:
        """The annotation target of sample ``i`` in the annotated (original) frame; identity affine."""
        lo, hi = self.offsets[i], self.offsets[i + 1]
        h, w = int(self.heights[i]), int(self.widths[i])
        return {
            "image_id": int(self.image_ids[i]),
            "boxes": torch.from_numpy(self.boxes[lo:hi].copy()),
            "labels": torch.from_numpy(self.labels[lo:hi].copy()),
            "area": torch.from_numpy(self.areas[lo:hi].copy()),
            "iscrowd": torch.from_numpy(self.iscrowd[lo:hi].copy()),
            "orig_size": torch.tensor([h, w], dtype=torch.int64),
            "size": torch.tensor([h, w], dtype=torch.int64),
            "affine": torch.eye(3, dtype=torch.float64),
        }

    def load(self, i: int) -> tuple[Image.Image, dict[str, Any]]:
        """Decode sample ``i`` (draft mode when ``draft_size``) with its target, before transforms."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} images in split '{self.split}'")
        target = self.target(i)
        orientation = "exif" if self.exif[i] else "raw"
        path = self.image_path(i)
        image, scale = decode_image(path, orientation, self.draft_size, what=f" (image id {target['image_id']})")
        h, w = int(self.heights[i]), int(self.widths[i])
        exp_w, exp_h = (w, h) if scale == 1.0 else (int(np.ceil(w * scale)), int(np.ceil(h * scale)))
        if image.size != (exp_w, exp_h):
            raise ImageDecodeError(
                f"{path} (image id {target['image_id']}): decoded size {image.size[0]}x"
                f"{image.size[1]} does not match the annotated width x height {w}x{h} (orientation {orientation}); "
                "re-run `rtcodetr data taco` on the current files"
            )
        if scale != 1.0:
            # the DCT downscale maps every original coordinate x -> x * scale, in both axes
            target["boxes"] = target["boxes"] * scale
            target["area"] = target["area"] * scale * scale
            target["size"] = torch.tensor([image.size[1], image.size[0]], dtype=torch.int64)
            target["affine"] = torch.diag(torch.tensor([scale, scale, 1.0], dtype=torch.float64))
        return image, target

    def __getitem__(self, i: int) -> tuple[Any, dict[str, Any]]:
        image, target = self.load(i)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target
