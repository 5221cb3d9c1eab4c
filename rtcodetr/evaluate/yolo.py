"""``rtcodetr yolo train``: a thin, offline-safe ultralytics wrapper for the YOLO11 baseline.

    rtcodetr yolo train --data DATA_DIR --model yolo11l.yaml|PATH.pt --out RUN_DIR [key=value ...]

The prepared dataset is exported with :func:`rtcodetr.data.yolo.export_yolo` (``names`` in label order, so YOLO class
index == our label), ultralytics trains into ``RUN_DIR`` (``RUN_DIR/weights/best.pt``), and the printed weights path
goes straight into ``rtcodetr evaluate --model yolo11=RUN_DIR/weights/best.pt``. ``key=value`` words are ultralytics
train arguments (``epochs=100 imgsz=640 batch=16 lr0=0.01`` …).

Offline safety: ``YOLO_OFFLINE=1``, ``YOLO_AUTOINSTALL=False`` and a private ``YOLO_CONFIG_DIR`` are set before
ultralytics is imported; ``plots`` default to off (plotting fetches Arial fonts from the network); ``amp`` defaults to
off on CPU and, on CUDA, unless the ``yolo26n.pt`` that ultralytics' AMP self-check loads is already on disk (the
check would otherwise try to download it).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from rtcodetr.errors import BAD_INPUT, report_bad_input
from rtcodetr.evaluate.detectors import keep_torch_threads, open_yolo, ultralytics_offline_env


def _default_device() -> str:
    import torch

    return "0" if torch.cuda.is_available() else "cpu"


def _amp_check_weights_present() -> bool:
    from ultralytics.utils import WEIGHTS_DIR

    return (Path(WEIGHTS_DIR) / "yolo26n.pt").is_file()


def train_yolo(data: str | Path, model: str | Path, out: str | Path, *, epochs: int = 100, imgsz: int = 640,
               batch: int = 16, device: str | None = None, seed: int = 0, workers: int | None = None,
               **overrides: Any) -> Path:
    """Train an ultralytics YOLO on the prepared dataset ``data``; returns the path of the best weights.

    Args:
        data: prepared dataset directory (``rtcodetr data ...``).
        model: a model definition (``yolo11n.yaml``, ``yolo11l.yaml``; random init) or a ``.pt`` checkpoint to
            fine-tune (must exist locally: nothing is downloaded).
        out: run directory; the YOLO export goes to ``out/dataset``, ultralytics writes ``out/weights/best.pt``,
            ``out/results.csv`` and ``out/args.yaml``.
        overrides: any other ultralytics train argument.
    """
    ultralytics_offline_env()
    from rtcodetr.data.prepared import PreparedData
    from rtcodetr.data.yolo import export_yolo

    prepared = PreparedData.load(data)
    spec = str(model)
    if not spec.endswith((".yaml", ".yml")) and not Path(spec).is_file():
        raise FileNotFoundError(f"YOLO model {spec}: not a .yaml definition and no such checkpoint file "
                                "(offline: nothing is downloaded)")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_yaml = export_yolo(prepared, out / "dataset", link=True)
    exported = yaml.safe_load(Path(data_yaml).read_text())
    names = exported["names"]
    names = [names[i] for i in range(len(names))] if isinstance(names, dict) else list(names)
    prepared.label_map.check(names, f"{data_yaml} (YOLO export)")

    from ultralytics import YOLO

    yolo = open_yolo(spec)  # before anything is trained: a .pt that is not a YOLO detector is named here
    device = str(device if device is not None else _default_device())
    on_cpu = device == "cpu"
    args: dict[str, Any] = {
        "data": str(data_yaml), "epochs": epochs, "imgsz": imgsz, "batch": batch, "device": device, "seed": seed,
        "deterministic": True, "project": str(out.parent), "name": out.name, "exist_ok": True,
        "plots": False, "amp": (not on_cpu) and _amp_check_weights_present(), "verbose": False,
    }
    if workers is not None:
        args["workers"] = workers
    elif on_cpu:
        args["workers"] = 0  # forked loaders only compete with the training process for CPU cores
    args.update(overrides)
    with keep_torch_threads():  # ultralytics lowers torch's thread count for the whole process on CPU
        yolo.train(**args)
    trainer = yolo.trainer
    save_dir = Path(trainer.save_dir)
    weights = Path(trainer.best) if Path(trainer.best).is_file() else Path(trainer.last)
    if not weights.is_file():
        raise RuntimeError(f"ultralytics finished but wrote no weights under {save_dir / 'weights'}")
    trained = YOLO(str(weights), task="detect").names
    prepared.label_map.check([trained[i] for i in range(len(trained))], f"{weights} (trained YOLO)")
    return weights


def _parse_value(text: str) -> Any:
    """``key=value`` values typed like YAML (``10`` -> int, ``false`` -> bool, ``0.01`` -> float)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="rtcodetr yolo", description="YOLO11 baseline with ultralytics")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train on a prepared dataset", epilog="key=value: ultralytics train arguments")
    t.add_argument("--data", required=True, help="prepared dataset directory")
    t.add_argument("--model", required=True, help="yolo11n.yaml … yolo11x.yaml, or a local .pt to fine-tune")
    t.add_argument("--out", required=True, help="run directory (weights in OUT/weights/best.pt)")
    args, rest = parser.parse_known_args(argv)
    bad = [w for w in rest if "=" not in w or w.startswith("-")]
    if bad:
        parser.error(f"unrecognised arguments {bad} (ultralytics settings are key=value)")
    overrides = {k: _parse_value(v) for k, _, v in (w.partition("=") for w in rest)}
    for key in ("data", "project", "name"):
        if key in overrides:
            parser.error(f"'{key}=' is set by the wrapper (use --data / --out)")
    try:
        weights = train_yolo(args.data, args.model, args.out, **overrides)
    except BAD_INPUT as e:
        return report_bad_input("rtcodetr yolo train", e)
    except ValueError as e:  # a dataset whose export does not match its label map
        print(f"rtcodetr yolo train: error: {e}", file=sys.stderr)
        return 2
    print(f"rtcodetr yolo train: best weights: {weights}")
    print(f"  evaluate with: rtcodetr evaluate --data {args.data} --model yolo11={weights} --out REPORT_DIR")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
