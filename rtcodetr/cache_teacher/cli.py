"""``rtcodetr cache-teacher``: the caching job, plus ``info``, ``verify`` and ``export`` on an existing cache.

    rtcodetr cache-teacher --data DATA_DIR --split train --teacher MODEL --out CACHE [--config FILE] [--overwrite] [k=v ...]
    accelerate launch -m rtcodetr.cache_teacher --data ... --out CACHE          # one process per device, shards split
    rtcodetr cache-teacher info CACHE [--json]
    rtcodetr cache-teacher verify CACHE --teacher MODEL [--samples 8] [--data DATA_DIR] [--min-cosine 0.99]
    rtcodetr cache-teacher export CACHE --to FILE.h5
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from rtcodetr.config import ConfigError, load_config, split_overrides

SUBCOMMANDS = ("info", "verify", "export")


def _run_main(argv: list[str]) -> int:
    from rtcodetr.cache_teacher.config import CacheConfig
    from rtcodetr.cache_teacher.runner import run

    flags, overrides = split_overrides(argv)
    p = argparse.ArgumentParser(prog="rtcodetr cache-teacher", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file (e.g. configs/cache.yaml); key=value words override it")
    p.add_argument("--data", help="prepared dataset directory")
    p.add_argument("--split", help="split to cache (default train)")
    p.add_argument("--teacher", help="teacher model directory or hub id")
    p.add_argument("--out", help="cache location: a path or an fsspec URL")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache at --out")
    args = p.parse_args(flags)
    words = [f"{k}={v}" for k in ("data", "split", "teacher", "out") if (v := getattr(args, k)) is not None]
    if args.overwrite:
        words.append("overwrite=true")
    try:
        cfg = load_config(CacheConfig, args.config, overrides + words)
    except ConfigError as e:
        print(f"rtcodetr cache-teacher: {e}", file=sys.stderr)
        return 2
    result = run(cfg)
    return 0 if result["finished"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        return _run_main(argv)
    cmd, rest = argv[0], argv[1:]
    p = argparse.ArgumentParser(prog=f"rtcodetr cache-teacher {cmd}")
    p.add_argument("cache", help="cache directory / fsspec URL (or an .h5 export for info/verify)")
    if cmd == "info":
        p.add_argument("--json", action="store_true", help="print the full info (manifest included) as JSON")
        args = p.parse_args(rest)
        from rtcodetr.cache_teacher.tools import cache_info, format_info

        info = cache_info(args.cache)
        if args.json:
            print(json.dumps(info, indent=2, default=str))
        else:
            print(format_info(info))
        return 0
    if cmd == "verify":
        p.add_argument("--teacher", required=True, help="teacher model directory or hub id")
        p.add_argument("--samples", type=int, default=8, help="how many samples to recompute (evenly spaced)")
        p.add_argument("--data", help="prepared dataset directory (default: the one recorded in the manifest)")
        p.add_argument("--device", help="cpu / cuda (default: cuda when available)")
        p.add_argument("--min-cosine", type=float, default=0.99,
                       help="fail (exit 1) when a tensor's cosine similarity to the recomputed value is below this")
        args = p.parse_args(rest)
        from rtcodetr.cache_teacher.tools import format_verify, verify, verify_passed

        result = verify(args.cache, args.teacher, samples=args.samples, data=args.data, device=args.device)
        print(format_verify(result))
        ok = verify_passed(result, args.min_cosine)
        print("verify: OK" if ok else f"verify: FAILED (teacher differs or cosine < {args.min_cosine})")
        return 0 if ok else 1
    # export
    p.add_argument("--to", required=True, help="output .h5 file")
    p.add_argument("--compression", default="gzip", choices=["gzip", "lzf", "none"])
    args = p.parse_args(rest)
    from rtcodetr.cache_teacher.storage import export_hdf5

    out = export_hdf5(args.cache, args.to, compression=None if args.compression == "none" else args.compression)
    print(f"exported {args.cache} -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
