"""``rtcodetr evaluate``: COCO mAP, latency, params and FLOPs for any set of models, as report.md/json + plot.png.

    rtcodetr evaluate --data DATA_DIR --split val --model NAME=PATH [--model NAME=PATH ...]
        [--predictions NAME=RESULTS.json ...] --out REPORT_DIR [--latency] [--device cpu|cuda] [--imgsz 640] [--half]
        [--config eval.yaml] [key=value ...]

PATH is a ``save_pretrained`` object-detection directory, a graph written by ``rtcodetr export`` (``.onnx``, run by
ONNX Runtime with the same pre/post-processing; ``onnx_provider=auto|tensorrt|cuda|cpu``) or an ultralytics
``.pt``/``.yaml``/``.onnx``. Remaining settings of :class:`rtcodetr.evaluate.api.EvalConfig` (``batch_size``,
``iterations``, ``max_images``, ``draft_size`` …) are ``key=value`` words. Runs unchanged under ``accelerate launch -m rtcodetr.evaluate`` (images sharded across processes).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from rtcodetr.config import ConfigError, load_config


def _named(values: Sequence[str] | None, flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values or []:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"{flag} expects NAME=PATH, got '{v}'")
        if name in out:
            raise ConfigError(f"{flag}: name '{name}' given twice")
        out[name] = path
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rtcodetr evaluate", description=__doc__.split("\n\n")[0],
                                epilog="Other settings: key=value (see rtcodetr.evaluate.api.EvalConfig).")
    p.add_argument("--config", help="YAML file of EvalConfig settings (flags and key=value override it)")
    p.add_argument("--data", help="prepared dataset directory")
    p.add_argument("--split", help="split to evaluate (default val)")
    p.add_argument("--model", action="append", metavar="NAME=PATH",
                   help="a model to evaluate: save_pretrained dir, exported .onnx, YOLO .pt/.yaml (repeatable)")
    p.add_argument("--predictions", action="append", metavar="NAME=RESULTS.json",
                   help="a COCO detection-results file from another tool (accuracy only; repeatable)")
    p.add_argument("--out", help="report directory")
    p.add_argument("--latency", action="store_true", default=None, help="measure latency (batch 1)")
    p.add_argument("--device", help="cpu | cuda | cuda:N")
    p.add_argument("--imgsz", type=int, help="input size for fixed-size models, YOLO and latency/FLOPs")
    p.add_argument("--half", action="store_true", default=None, help="fp16 (CUDA only)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from rtcodetr.evaluate.api import EvalConfig, run

    args, rest = build_parser().parse_known_args(list(sys.argv[1:] if argv is None else argv))
    bad = [w for w in rest if "=" not in w or w.startswith("-")]
    if bad:
        print(f"rtcodetr evaluate: unrecognised arguments {bad}", file=sys.stderr)
        return 2
    try:
        cfg = load_config(EvalConfig, args.config, rest)
        for key in ("data", "split", "out", "latency", "device", "imgsz", "half"):
            value = getattr(args, key)
            if value is not None:
                setattr(cfg, key, value)
        cfg.models.update(_named(args.model, "--model"))
        cfg.predictions.update(_named(args.predictions, "--predictions"))
        if not cfg.out:
            raise ConfigError("--out REPORT_DIR is required")
        report = run(cfg)
    except (ConfigError, ValueError, OSError) as e:  # OSError: missing files, ModelLoadError
        print(f"rtcodetr evaluate: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:  # an .onnx model without the [deploy] extra (onnx, onnxruntime)
        print(f"rtcodetr evaluate: error: {e}; .onnx models need: pip install -e '.[deploy]'", file=sys.stderr)
        return 2
    if report.get("files"):
        print(f"rtcodetr evaluate: wrote {report['files']['report_md']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
