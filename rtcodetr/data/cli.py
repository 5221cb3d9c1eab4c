"""``rtcodetr data {taco,synthetic,add-images,yolo,check}``: prepare datasets, extend them, export them, check them.

    rtcodetr data taco --annotations FILE --images DIR --out DATA_DIR [--val-fraction 0.1] [--test-fraction 0.1]
                       [--seed 0] [--classes categories|supercategories] [--skip-missing]
                       [--val-ids FILE] [--test-ids FILE]
    rtcodetr data synthetic --out DATA_DIR [--train 64 --val 16 --test 16 --size 320 --seed 0] [--unlabeled N]
    rtcodetr data add-images --data DATA_DIR --images DIR [--name unlabeled] [--recursive | --files LIST]
                             [--skip-bad] [--skip-duplicates] [--overwrite]
    rtcodetr data yolo --data DATA_DIR --out YOLO_DIR [--copy]
    rtcodetr data check --annotations FILE --images DIR
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from rtcodetr.errors import BAD_INPUT, BAD_INPUT_EXIT, report_bad_input

MAX_MISSING_PRINTED = 20


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rtcodetr data", description="Prepare, export and check detection datasets.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{taco,synthetic,add-images,yolo,check}")

    t = sub.add_parser("taco", help="prepare a COCO file (TACO) and its images: fix, split, write DATA_DIR; "
                                    "flags, or --config FILE and key=value words (PrepareConfig keys)")
    t.add_argument("--config", type=Path, default=None, help="YAML with PrepareConfig keys; flags and key=value "
                                                              "words override it")
    t.add_argument("--annotations", type=Path, help="COCO json (e.g. TACO's annotations.json)")
    t.add_argument("--images", type=Path, help="image root the file names are relative to")
    t.add_argument("--out", type=Path, help="output prepared dataset directory")
    t.add_argument("--val-fraction", type=float)
    t.add_argument("--test-fraction", type=float)
    t.add_argument("--seed", type=int, help="seed of the image-level split (default 0)")
    t.add_argument("--classes", choices=("categories", "supercategories"))
    t.add_argument("--skip-missing", action="store_true", default=None,
                   help="drop images that are not on disk or whose size matches neither EXIF orientation "
                        "(counted in report.json) instead of failing")
    t.add_argument("--val-ids", type=Path, help="pin the val split to these image ids (one per line)")
    t.add_argument("--test-ids", type=Path, help="pin the test split to these image ids")
    t.add_argument("--name", help="dataset name written into dataset.json (default taco)")

    c = sub.add_parser("check", help="decode every image of a COCO file and print what is wrong; writes nothing")
    c.add_argument("--annotations", required=True, type=Path)
    c.add_argument("--images", required=True, type=Path)

    y = sub.add_parser("yolo", help="export a prepared dataset as an ultralytics dataset")
    y.add_argument("--data", required=True, type=Path, help="prepared dataset directory")
    y.add_argument("--out", required=True, type=Path, help="output directory (data.yaml, images/, labels/)")
    y.add_argument("--copy", action="store_true", help="copy images instead of symlinking them")

    s = sub.add_parser("synthetic", help="write the deterministic synthetic litter-like set")
    s.add_argument("--out", required=True, type=Path, help="output prepared dataset directory")
    s.add_argument("--train", type=int, default=64)
    s.add_argument("--val", type=int, default=16)
    s.add_argument("--test", type=int, default=16)
    s.add_argument("--size", type=int, default=320, help="square image side in pixels")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--unlabeled", type=int, default=0, metavar="N",
                   help="also write N images from the same generator as the unlabelled split 'unlabeled' "
                        "(their boxes are not stored; the other splits stay byte-identical)")

    a = sub.add_parser("add-images", help="add a folder of images without annotations as an unlabelled split")
    a.add_argument("--data", required=True, type=Path, help="prepared dataset directory")
    a.add_argument("--images", required=True, type=Path, help="folder of images (no file may lead outside it)")
    a.add_argument("--name", default="unlabeled", help="split name (default: unlabeled)")
    how = a.add_mutually_exclusive_group()
    how.add_argument("--recursive", action="store_true", help="also list the images of sub-folders")
    how.add_argument("--files", type=Path, default=None,
                     help="text file of image paths relative to --images, one per line, instead of listing it")
    a.add_argument("--skip-bad", action="store_true",
                   help="skip unreadable / truncated images (named and counted) instead of failing")
    a.add_argument("--skip-duplicates", action="store_true",
                   help="drop images whose bytes equal a labelled image's instead of failing")
    a.add_argument("--overwrite", action="store_true", help="replace an existing unlabelled split of this name")
    return p


def _summary(data) -> str:
    return ", ".join(f"{s} {v['num_images']} images / "
                     + (f"{v['num_annotations']} boxes" if v.get("labelled", True) else "unlabelled")
                     for s, v in data.info["splits"].items())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (errors in the input data print one clear message and return 2; ``check``
    returns 2 when it finds problems)."""
    from rtcodetr.config import split_overrides

    flags, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    parser = _parser()
    args = parser.parse_args(flags)
    args.overrides = overrides
    if overrides and args.command != "taco":
        parser.error(f"key=value settings ({overrides[0]}) are only for `data taco`")
    from rtcodetr.data.coco import DatasetError
    from rtcodetr.data.dataset import ImageDecodeError
    from rtcodetr.data.prepared import PreparedDataError

    try:
        return _dispatch(args)
    except (DatasetError, PreparedDataError, ImageDecodeError) as e:
        print(f"rtcodetr data {args.command}: error: {e}", file=sys.stderr)
        return BAD_INPUT_EXIT
    except BAD_INPUT as e:  # e.g. --annotations or --images that do not exist
        return report_bad_input(f"rtcodetr data {args.command}", e)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "taco":
        from rtcodetr.config import load_config
        from rtcodetr.data.coco import PrepareConfig, run

        keys = ("annotations", "images", "out", "val_fraction", "test_fraction", "seed", "classes", "skip_missing",
                "val_ids", "test_ids", "name")
        given = [f"{k}={getattr(args, k)}" for k in keys if getattr(args, k) is not None]
        data = run(load_config(PrepareConfig, args.config, [*given, *args.overrides]))
        fixes = {k: v for k, v in json.loads((data.root / "report.json").read_text())["fixes"].items() if v}
        print(f"wrote {data.root}: {data.label_map.num_labels} labels; {_summary(data)}")
        print(f"fixes (report.json): {json.dumps(fixes)}")
        return 0
    if args.command == "check":
        from rtcodetr.data.coco import check

        problems, report = check(args.annotations, args.images)
        fixes = {k: v for k, v in report["fixes"].items() if v and k not in ("missing_images_dropped",
                                                                             "size_mismatch_images_dropped")}
        print(f"{args.annotations}: {report['counts']['images_in_file']} images, "
              f"{report['counts']['annotations_in_file']} annotations; fixes `data taco` would apply: "
              f"{json.dumps(fixes)}")
        missing = [p for p in problems if p.startswith("missing: ")]
        others = [p for p in problems if not p.startswith("missing: ")]
        for p in others + missing[:MAX_MISSING_PRINTED]:  # every decode problem, but not thousands of absent files
            print(f"problem: {p}")
        if len(missing) > MAX_MISSING_PRINTED:
            print(f"problem: ... and {len(missing) - MAX_MISSING_PRINTED} more missing images")
        print(f"{len(problems)} problem(s)" if problems else "no problems found")
        return BAD_INPUT_EXIT if problems else 0
    if args.command == "yolo":
        from rtcodetr.data.yolo import export_yolo

        yaml_path = export_yolo(args.data, args.out, link=not args.copy)
        print(f"wrote ultralytics dataset {yaml_path}")
        return 0
    if args.command == "synthetic":
        from rtcodetr.data.synthetic import make_synthetic

        data = make_synthetic(args.out, args.train, args.val, args.test, args.size, args.seed,
                              unlabeled=args.unlabeled)
        print(f"wrote synthetic dataset {data.root}: {data.label_map.num_labels} labels; {_summary(data)}")
        return 0
    if args.command == "add-images":
        from rtcodetr.data.unlabeled import AddImagesConfig, add_images

        data = add_images(AddImagesConfig(data=args.data, images=args.images, name=args.name,
                                          recursive=args.recursive, files=args.files, skip_bad=args.skip_bad,
                                          skip_duplicates=args.skip_duplicates, overwrite=args.overwrite))
        entry = data.info["splits"][args.name]
        src = entry["source"]
        ids = data.image_ids(args.name)
        print(f"added unlabelled split '{args.name}' to {data.root}: {src['count']} images (ids {ids[0]}..{ids[-1]}, "
              f"{src['exif_orientation_applied']} EXIF-rotated), read from {data.image_root_of(args.name)}; "
              f"skipped {src['skipped']} {json.dumps(src['skipped_by_reason'])}")
        for s in src["skipped_files"][:MAX_MISSING_PRINTED]:
            print(f"skipped: {s['file']}: {s['reason']}")
        if src["skipped"] > MAX_MISSING_PRINTED:
            print(f"skipped: ... and {src['skipped'] - MAX_MISSING_PRINTED} more (dataset.json lists the first "
                  f"{len(src['skipped_files'])})")
        return 0
    raise AssertionError(args.command)
