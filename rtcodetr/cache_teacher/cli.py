"""``rtcodetr cache-teacher``: the caching job, plus ``info``, ``verify`` and ``export`` on an existing cache.

    rtcodetr cache-teacher --data DATA_DIR --split train --teacher MODEL --out CACHE [--config FILE] [--overwrite] [k=v ...]
                           [--redo-shards K[,K...]]      # recompute only these shards (named by verify)
    accelerate launch -m rtcodetr.cache_teacher --data ... --out CACHE          # one process per device, shards split
    rtcodetr cache-teacher info CACHE [--json]
    rtcodetr cache-teacher verify CACHE [--full] [--teacher MODEL [--samples 8] [--data DATA_DIR] [--min-cosine 0.99]]
    rtcodetr cache-teacher export CACHE --to FILE.h5

Exit status: 0 done; 1 verify found differences, or the job stopped on a write error (finished shards are kept:
rerun the same command to resume); 2 bad input (one line names the file / field / shard and the fix).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from rtcodetr.config import ConfigError, load_config, split_overrides
from rtcodetr.errors import BAD_INPUT, report_bad_input

SUBCOMMANDS = ("info", "verify", "export")


def _run_main(argv: list[str]) -> int:
    from rtcodetr.cache_teacher.config import CacheConfig
    from rtcodetr.cache_teacher.runner import run
    from rtcodetr.cache_teacher.storage import CacheWriteError

    flags, overrides = split_overrides(argv)
    p = argparse.ArgumentParser(prog="rtcodetr cache-teacher", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file (e.g. configs/cache.yaml); key=value words override it")
    p.add_argument("--data", help="prepared dataset directory")
    p.add_argument("--split", help="split to cache (default train)")
    p.add_argument("--teacher", help="teacher model directory or hub id")
    p.add_argument("--out", help="cache location: a path or an fsspec URL")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache at --out")
    p.add_argument("--redo-shards", metavar="K[,K...]",
                   help="recompute these shards of an existing cache (the ones `verify` names as damaged)")
    args = p.parse_args(flags)
    words = [f"{k}={v}" for k in ("data", "split", "teacher", "out") if (v := getattr(args, k)) is not None]
    if args.overwrite:
        words.append("overwrite=true")
    try:
        if args.redo_shards is not None:
            try:
                words.append(f"redo_shards={[int(k) for k in args.redo_shards.split(',') if k.strip()]}")
            except ValueError:
                raise ConfigError(f"--redo-shards {args.redo_shards!r}: expected shard numbers like 2 or 2,5")
        cfg = load_config(CacheConfig, args.config, overrides + words)
        result = run(cfg)
    except BAD_INPUT as e:
        return report_bad_input("rtcodetr cache-teacher", e)
    except CacheWriteError as e:  # not bad input: the store failed; finished shards are kept
        print(f"rtcodetr cache-teacher: error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0 if result["finished"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        return _run_main(argv)
    try:
        return _tool_main(argv[0], argv[1:])
    except BAD_INPUT as e:
        return report_bad_input(f"rtcodetr cache-teacher {argv[0]}", e)


def _tool_main(cmd: str, rest: list[str]) -> int:
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
        p.add_argument("--full", action="store_true",
                       help="read and decode every sample of every shard (default: check that each shard object "
                            "exists and its checksummed index reads, one sample per shard and array)")
        p.add_argument("--teacher", help="also recompute --samples samples with this teacher and compare")
        p.add_argument("--samples", type=int, default=8, help="how many samples to recompute (evenly spaced)")
        p.add_argument("--data", help="prepared dataset directory (default: the one recorded in the manifest)")
        p.add_argument("--device", help="cpu / cuda (default: cuda when available)")
        p.add_argument("--min-cosine", type=float, default=0.99,
                       help="fail (exit 1) when a tensor's cosine similarity to the recomputed value is below this")
        args = p.parse_args(rest)
        from rtcodetr.cache_teacher.reader import TeacherCache
        from rtcodetr.cache_teacher.tools import format_verify, verify, verify_passed

        cache = TeacherCache(args.cache)
        cache.check_integrity(full=args.full, progress=args.full)  # damaged shards: CacheCorruptError, exit 2
        shards = cache.manifest["storage"]["num_shards"]
        print(f"integrity: all {shards} shards readable "
              f"({'every sample read' if args.full else 'shard objects and checksummed indexes'})")
        if not args.teacher:
            print("verify: OK")
            return 0
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
