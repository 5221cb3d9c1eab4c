"""Decode + resize throughput of the TACO sample photos, with and without JPEG draft mode. Prints figures.

    .venv/bin/python benchmarks/bench_decode.py [--annotations ../shared/data/taco/sample/annotations.json]
        [--images ../shared/data/taco/sample/images] [--size 640]

Runs the real data path: prepare the sample (temporary directory), then ``CocoDetection(..., draft_size=...)`` with
``Resize((size, size))`` over every image, once with full decoding and once with draft decoding (libjpeg DCT
downscale to the smallest 1/2, 1/4, 1/8 that keeps both sides >= size). One pass each, single process; the first
image files are read once beforehand so both modes decode from the page cache.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TACO = REPO.parent / "shared" / "data" / "taco" / "sample"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--annotations", type=Path, default=TACO / "annotations.json")
    p.add_argument("--images", type=Path, default=TACO / "images")
    p.add_argument("--size", type=int, default=640)
    args = p.parse_args()

    import torch

    from rtcodetr.data.coco import PrepareConfig, run
    from rtcodetr.data.dataset import CocoDetection
    from rtcodetr.data.transforms import Compose, Resize

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = run(PrepareConfig(annotations=args.annotations, images=args.images, out=Path(tmp), val_fraction=0.0,
                                 test_fraction=0.0, progress=False))
        resize = Compose([Resize((args.size, args.size))])
        for p_ in CocoDetection(data, "train").image_path(0).parent.parent.rglob("*"):
            if p_.is_file():
                p_.read_bytes()  # warm the page cache so both modes read from memory
        results = {}
        for name, draft in (("full decode", None), ("draft mode", args.size)):
            ds = CocoDetection(data, "train", transforms=resize, draft_size=draft)
            t0 = time.perf_counter()
            for i in range(len(ds)):
                img, target = ds[i]
            dt = time.perf_counter() - t0
            assert img.size == (args.size, args.size)
            results[name] = (len(ds) / dt, dt)
        mp = np.mean([im["width"] * im["height"] for im in data.coco("train")["images"]]) / 1e6
        print(f"{len(ds)} TACO sample photos (mean {mp:.1f} MP) -> {args.size}x{args.size}, 1 thread, one pass each")
        for name, (ips, dt) in results.items():
            print(f"  {name:<12} {ips:7.2f} images/s  ({dt:.2f} s)")
        print(f"  speed-up {results['draft mode'][0] / results['full decode'][0]:.1f}x")


if __name__ == "__main__":
    main()
