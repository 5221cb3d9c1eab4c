"""Print latency / params / FLOPs figures (a benchmark, run on purpose; tests never assert speed).

    .venv/bin/python benchmarks/bench_latency.py                     # tiny models on CPU at 320 px
    .venv/bin/python benchmarks/bench_latency.py --flops rtdetr-r50vd --flops-size 640
    .venv/bin/python benchmarks/bench_latency.py --device cuda --half --imgsz 640 --presets rtdetr-r18vd rtdetr-r50vd
    .venv/bin/python benchmarks/bench_latency.py --onnx --presets rtdetr-tiny rtdetr-r18vd --yolo --imgsz 640 --threads 1

Section 1 builds each preset with random weights for the synthetic label map, saves it, and runs the real evaluator
(``evaluate_models`` with ``latency=True``) on a few synthetic images, so the figures come from exactly the code
path ``rtcodetr evaluate --latency`` uses; it prints the report's tables. With ``--onnx`` every preset is also
exported (``rtcodetr export`` at ``--imgsz``) and timed as ``PRESET-onnx`` by ONNX Runtime in the same evaluator run
(runtime column, speed-up over its PyTorch source). Section 2 counts the FLOPs of full-size presets (weights
irrelevant) with the same FlopCounterMode code, for comparison with published figures.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def prepare_models(presets: list[str], yolo: list[str], imgsz: int, work: Path,
                   onnx: bool = False) -> tuple[Path, dict[str, str]]:
    """A small synthetic set at ``imgsz`` (its label map sizes the heads) and ``{name: model}`` for the evaluator:
    each preset saved with random weights under ``work`` (and, with ``onnx``, its ONNX export as ``<preset>-onnx``),
    each YOLO yaml/pt as given (a yaml is built by the detector with the set's classes). Returns
    ``(data_root, models)``."""
    from rtcodetr.data.synthetic import make_synthetic
    from rtcodetr.models import init_model

    data = make_synthetic(work / "data", train=4, val=4, test=1, size=imgsz, seed=0)
    models = {}
    for preset in presets:
        models[preset] = str(init_model(preset, data.root, work / preset))
        if onnx:
            from rtcodetr.export import export_onnx

            # random weights: an untrained RT-DETR's encoder scores tie within float32 rounding, so the parity
            # figures are printed but not enforced here (bench_export_parity.py checks a trained one)
            graph = work / f"{preset}-onnx" / "model.onnx"
            export_onnx(models[preset], graph, image_size=(imgsz, imgsz), tolerance=float("inf"))
            models[f"{preset}-onnx"] = str(graph)
    models.update({Path(y).stem: y for y in yolo})
    return data.root, models


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="*", default=["rtdetr-tiny", "rtdetr-small", "conditional-detr-tiny"])
    p.add_argument("--yolo", nargs="*", default=["yolo11n.yaml"], help="ultralytics yaml/pt models to include")
    p.add_argument("--device", default="cpu")
    p.add_argument("--half", action="store_true")
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--flops", nargs="*", default=[], help="full-size presets to count FLOPs for (section 2)")
    p.add_argument("--flops-size", type=int, default=640)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="keep the report here (default: a temp dir)")
    p.add_argument("--onnx", action="store_true", help="also export each preset and time it in ONNX Runtime")
    p.add_argument("--onnx-provider", default="auto", help="auto | tensorrt | cuda | cpu (ONNX Runtime provider)")
    args = p.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from rtcodetr.evaluate.api import evaluate_models
    from rtcodetr.evaluate.complexity import count_flops
    from rtcodetr.evaluate.report import markdown
    from rtcodetr.models import build_model

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}"
          f"{' fp16' if args.half else ''}", flush=True)
    with tempfile.TemporaryDirectory(prefix="rtcodetr-bench-") as tmp:
        tmp = Path(tmp)
        if args.presets or args.yolo:
            data_root, models = prepare_models(args.presets, args.yolo, args.imgsz, tmp, onnx=args.onnx)
            out = Path(args.out) if args.out else tmp / "report"
            report = evaluate_models(data_root, models, out, latency=True, device=args.device, half=args.half,
                                     imgsz=args.imgsz, warmup=args.warmup, iterations=args.iterations, plot=False,
                                     threads=args.threads, onnx_provider=args.onnx_provider)
            md = markdown(report)
            # the accuracy columns of random-init models mean nothing here: print cost tables and protocol only
            keep = md.split("## Sanity")[0].split("\n\n", 1)[1]
            print(keep)
            print(md[md.index("## Protocol"):md.index("## Models")])
        for preset in args.flops:
            model = build_model(preset, {i: f"class_{i}" for i in range(80)}).eval()
            s = args.flops_size
            c = count_flops(lambda: model(pixel_values=torch.rand(1, 3, s, s)), model, (s, s))
            top = ", ".join(f"{k}×{v}" for k, v in list(c.uncounted_ops.items())[:12])
            print(f"{preset} @ {s}x{s}, 80 classes: params {c.params / 1e6:.2f} M, GFLOPs {c.gflops:.2f} "
                  f"(= 2 x GMACs {c.gmacs:.2f}); counted: {', '.join(c.counted_ops)}; uncounted: {top}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
