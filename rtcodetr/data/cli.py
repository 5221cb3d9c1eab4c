"""``rtcodetr data {taco,synthetic,yolo,check}``: prepare datasets, export them, check them.

    rtcodetr data taco --annotations FILE --images DIR --out DATA_DIR [--val-fraction 0.1] [--test-fraction 0.1]
                       [--seed 0] [--classes categories|supercategories] [--skip-missing]
                       [--val-ids FILE] [--test-ids FILE]
    rtcodetr data synthetic --out DATA_DIR [--train 64 --val 16 --test 16 --size 320 --seed 0]
    rtcodetr data yolo --data DATA_DIR --out YOLO_DIR [--copy]
    rtcodetr data check --annotations FILE --images DIR
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rtcodetr data", description="Prepare, export and check detection datasets.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{taco,synthetic,yolo,check}")

    s = sub.add_parser("synthetic", help="write the deterministic synthetic litter-like set")
    s.add_argument("--out", required=True, type=Path, help="output prepared dataset directory")
    s.add_argument("--train", type=int, default=64)
    s.add_argument("--val", type=int, default=16)
    s.add_argument("--test", type=int, default=16)
    s.add_argument("--size", type=int, default=320, help="square image side in pixels")
    s.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.command == "synthetic":
        from rtcodetr.data.synthetic import make_synthetic

        data = make_synthetic(args.out, args.train, args.val, args.test, args.size, args.seed)
        counts = ", ".join(f"{s} {v['num_images']} images / {v['num_annotations']} boxes"
                           for s, v in data.info["splits"].items())
        print(f"wrote synthetic dataset {data.root}: {data.label_map.num_labels} labels; {counts}")
        return 0
    raise AssertionError(args.command)
