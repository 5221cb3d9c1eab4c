"""``rtcodetr data add-images``: add a folder of images without annotations to a prepared dataset as an unlabelled split.

The split is an ordinary COCO split file with ``images`` and an empty ``annotations`` list, marked ``"labelled":
false`` in ``dataset.json`` (see ``prepared.py``), so every stage that takes a split (the teacher cache above all)
works on it unchanged, and the trainer can mix its images in for distillation only.

What is checked, before anything is written:

* every file must stay inside ``--images``: a symlink (file or, with ``--recursive``, directory) whose target is
  outside it, or a ``--files`` entry that is absolute or contains ``..``, is refused (exit 2, naming it);
* every image is fully decoded (1/8 DCT scale for JPEG, like ``data check``): unreadable, truncated or missing
  files are refused, naming them, or skipped and counted with ``--skip-bad``;
* an image whose file bytes (sha256) equal those of an image of a labelled split is refused, naming both, so test
  or val images cannot leak into training as "unlabelled" ones; ``--skip-duplicates`` drops such images instead
  (e.g. when ``--images`` is a folder holding both the annotated photos and the extra ones). A re-encoded or resized
  copy has other bytes and is not caught. Images repeated inside ``--images`` are kept once (counted).

Each record gets the upright size (EXIF orientation applied: ``orientation: exif`` when the file carries a
rotating/mirroring tag, the frame a viewer and the teacher should see; ``raw`` otherwise), an id above every id of
every other split (so ids never collide), and its file's ``sha256`` (which puts the image contents into the split
file's hash, the dataset fingerprint a teacher cache is checked against). File names are relative to the dataset's
``image_root`` when ``--images`` lies inside it, else to ``--images``, which is then recorded as the split's own
``image_root``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from rtcodetr.data.coco import MAX_LISTED, DatasetError, probe_image, upright_size
from rtcodetr.data.prepared import (
    PreparedData,
    add_unlabelled_split,
    check_new_split,
    next_image_id,
    safe_relative_path,
    sha256_file,
)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MAX_RECORDED = 50  # skipped files listed in dataset.json (the counts are always complete)


@dataclass
class AddImagesConfig:
    """Settings of ``rtcodetr data add-images``."""

    data: Path = Path("data/taco")
    images: Path = Path("images")
    name: str = "unlabeled"
    recursive: bool = False
    files: Path | None = None  # a list of paths relative to `images`, one per line, instead of listing the folder
    skip_bad: bool = False
    skip_duplicates: bool = False
    overwrite: bool = False
    progress: bool = True


def _inside(path: Path, root_real: Path) -> bool:
    """Whether ``path`` (following every symlink, even a dangling one's target) lies under ``root_real``."""
    return Path(os.path.realpath(path)).is_relative_to(root_real)


def _escape(path: Path, images_dir: Path) -> DatasetError:
    return DatasetError(f"{path} resolves to {os.path.realpath(path)}, outside {images_dir}: files that escape "
                        "--images are refused (nothing was written)")


def list_images(images_dir: Path, *, recursive: bool = False, files: Path | None = None) -> tuple[list[str], int]:
    """Image files to add, as sorted POSIX paths relative to ``images_dir``, and the number of other files ignored.

    Listing: files with an image suffix (case-insensitive), hidden names skipped, sub-folders only with
    ``recursive``; symlinked folders are not walked (their files are listed where they really are) and refused when
    they point outside. With ``files``: exactly the listed paths (``#`` comments, blank lines ignored). Any path
    that leaves ``images_dir`` raises DatasetError naming it.
    """
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise DatasetError(f"image directory not found: {images_dir}")
    root = Path(os.path.realpath(images_dir))
    found: set[str] = set()
    ignored = 0
    if files is not None:
        if not Path(files).is_file():
            raise DatasetError(f"file list not found: {files}")
        for n, line in enumerate(Path(files).read_text().splitlines(), 1):
            entry = line.split("#", 1)[0].strip()
            if not entry:
                continue
            try:
                rel = safe_relative_path(entry, "entry")
            except ValueError as e:
                raise DatasetError(f"{files}: line {n}: {e}; entries must stay inside {images_dir} "
                                   "(nothing was written)") from None
            if not _inside(images_dir / rel, root):
                raise _escape(images_dir / rel, images_dir)
            found.add(rel.as_posix())
        return sorted(found), ignored
    for dirpath, dirnames, filenames in os.walk(images_dir, followlinks=False):
        here = Path(dirpath)
        walk = []
        for name in sorted(dirnames):
            sub = here / name
            if name.startswith(".") or not recursive:
                continue
            if sub.is_symlink():
                if not _inside(sub, root):
                    raise _escape(sub, images_dir)
                continue  # inside: its files are reached through their real folder
            walk.append(name)
        dirnames[:] = walk
        for name in filenames:
            path = here / name
            if name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
                ignored += 1  # e.g. .DS_Store, macOS "._x.jpg" resource forks, text files
                continue
            if not _inside(path, root):
                raise _escape(path, images_dir)
            found.add(path.relative_to(images_dir).as_posix())
    return sorted(found), ignored


def _labelled_hashes(data: PreparedData, sizes: set[int], progress: bool) -> dict[str, tuple[str, dict]]:
    """sha256 -> (split, image record) for every labelled image whose file size equals one of ``sizes`` (equal
    bytes need equal sizes, so the rest are never read)."""
    todo = []
    for split in data.labelled_splits:
        for im in data.coco(split)["images"]:
            path = data.image_path(im["file_name"], split)
            try:
                size = path.stat().st_size
            except OSError as e:
                raise DatasetError(f"cannot read labelled image {path} (image id {im['id']} of split '{split}') to "
                                   f"rule out duplicates: {e}") from None
            if size in sizes:
                todo.append((split, im, path))
    out: dict[str, tuple[str, dict]] = {}
    for split, im, path in tqdm(todo, desc="hashing labelled images", unit="img", disable=not progress, leave=False):
        out.setdefault(sha256_file(path), (split, im))
    return out


def add_images(cfg: AddImagesConfig) -> PreparedData:
    """Check and add the images of ``cfg.images`` as the unlabelled split ``cfg.name``; return the reloaded dataset.

    Raises DatasetError / PreparedDataError (nothing written) on an escaping path, a bad image without
    ``skip_bad``, a duplicate of a labelled image without ``skip_duplicates``, an existing split without
    ``overwrite``, or nothing left to add. The split's ``dataset.json`` entry carries ``"source"``: ``dir``,
    ``files_list``, ``recursive``, ``found``, ``count`` (added), ``skipped`` (total) with ``skipped_by_reason`` and
    ``skipped_files`` (the first 50 ``{"file", "reason"}``), ``other_files_ignored``, ``exif_orientation_applied``.
    """
    data = PreparedData.load(cfg.data)
    check_new_split(data, cfg.name, cfg.overwrite)  # before the long part
    images_dir = Path(cfg.images)
    rels, ignored = list_images(images_dir, recursive=cfg.recursive, files=cfg.files)
    if not rels:
        hint = "" if cfg.recursive or cfg.files else " (sub-folders are listed only with --recursive)"
        raise DatasetError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {images_dir}{hint}")

    good: list[tuple[str, Any, str]] = []  # (rel, probe, sha256)
    bad: list[tuple[str, str]] = []
    for rel in tqdm(rels, desc="checking images", unit="img", disable=not cfg.progress, leave=False):
        path = images_dir / rel
        chk = probe_image(path, rel, verify=True)
        if chk.problem is None:
            try:
                good.append((rel, chk, sha256_file(path)))
                continue
            except OSError as e:
                chk.problem = f"unreadable image {path}: {e}"
        bad.append((rel, chk.problem if path.exists() else f"image file not found: {path}"))
    if bad and not cfg.skip_bad:
        raise DatasetError(f"{len(bad)} of {len(rels)} image(s) in {images_dir} cannot be read: "
                           + "; ".join(p for _, p in bad[:MAX_LISTED])
                           + " (pass --skip-bad to skip them; nothing was written)")

    labelled = _labelled_hashes(data, {os.stat(images_dir / rel).st_size for rel, _, _ in good}, cfg.progress)
    leaks = [(rel, labelled[sha]) for rel, _, sha in good if sha in labelled]
    if leaks and not cfg.skip_duplicates:
        pairs = "; ".join(f"{images_dir / rel} = image id {im['id']} {im['file_name']!r} of split '{split}'"
                          for rel, (split, im) in leaks[:MAX_LISTED])
        per_split = ", ".join(f"{s} {n}" for s in data.labelled_splits
                              if (n := sum(split == s for _, (split, _) in leaks)))
        raise DatasetError(f"{len(leaks)} image(s) in {images_dir} have the same bytes as labelled images "
                           f"({per_split}): {pairs} "
                           "(so they could leak labelled val/test images into training; pass --skip-duplicates to "
                           "drop them; nothing was written)")
    skipped = [{"file": rel, "reason": reason} for rel, reason in bad]
    skipped += [{"file": rel, "reason": f"same bytes as image id {im['id']} {im['file_name']!r} of split "
                                        f"'{split}'"} for rel, (split, im) in leaks]
    by_reason = {"unreadable": len(bad), "duplicate_of_labelled": len(leaks), "duplicate_within": 0}
    first_of: dict[str, str] = {}
    kept = []
    for rel, chk, sha in good:
        if sha in labelled:
            continue
        if sha in first_of:
            by_reason["duplicate_within"] += 1
            skipped.append({"file": rel, "reason": f"same bytes as {first_of[sha]!r}"})
            continue
        first_of[sha] = rel
        kept.append((rel, chk, sha))
    if not kept:
        raise DatasetError(f"nothing to add from {images_dir}: all {len(rels)} image(s) were skipped "
                           f"({by_reason})")

    root_real = Path(os.path.realpath(images_dir))
    image_root_real = Path(os.path.realpath(data.image_root))
    if root_real.is_relative_to(image_root_real):
        prefix, split_root = root_real.relative_to(image_root_real), None
    else:
        prefix, split_root = Path(), root_real
    start = next_image_id(data, exclude=[cfg.name])
    records = []
    exif = 0
    for k, (rel, chk, sha) in enumerate(kept):
        w, h = upright_size(chk)
        rec = {"id": start + k, "file_name": (prefix / rel).as_posix(), "width": w, "height": h,
               "orientation": "exif" if 2 <= chk.exif_tag <= 8 else "raw"}
        if chk.exif_tag != 1:
            rec["exif_orientation_tag"] = chk.exif_tag
        exif += rec["orientation"] == "exif"
        rec["sha256"] = sha
        records.append(rec)
    source = {
        "dir": str(root_real),
        "files_list": None if cfg.files is None else str(Path(cfg.files).resolve()),
        "recursive": bool(cfg.recursive),
        "found": len(rels),
        "count": len(records),
        "skipped": len(skipped),
        "skipped_by_reason": by_reason,
        "skipped_files": skipped[:MAX_RECORDED],
        "other_files_ignored": ignored,
        "exif_orientation_applied": exif,
    }
    return add_unlabelled_split(data, cfg.name, records, source=source, image_root=split_root,
                                overwrite=cfg.overwrite)
