"""A briefly trained toy student and its ONNX export: max abs logit/box difference and mAP on the test split.

    .venv/bin/python benchmarks/bench_export_parity.py --work /tmp/bench_export            # ~3 min on 2 CPU cores
    .venv/bin/python benchmarks/bench_export_parity.py --work /tmp/bench_export --half     # + an fp16 graph

Steps (each skipped when its output exists, so a rerun only repeats the export and the evaluation): the demo's
synthetic set (64/16/16 images at 256 px), ``init-model --preset rtdetr-tiny``, ``--steps`` trainer steps with
``configs/demo_student.yaml`` at 256x256 (CPU), ``rtcodetr export`` with the parity check on the 16 test images,
then ``rtcodetr evaluate`` on the test split with the PyTorch checkpoint and the graph side by side (the same
processor, post-processor and COCO code). Prints the parity figures and both mAPs.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="working directory (data, run, graph, report)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--half", action="store_true", help="also export and evaluate an fp16 graph")
    args = p.parse_args(argv)

    import torch

    from rtcodetr.data.synthetic import make_synthetic
    from rtcodetr.evaluate.api import evaluate_models
    from rtcodetr.export import ParityError, export_onnx
    from rtcodetr.models import init_model

    work = Path(args.work)
    data_dir, init_dir, run_dir = work / "data", work / "init", work / "run"
    if not (data_dir / "dataset.json").is_file():
        make_synthetic(data_dir, train=64, val=16, test=16, size=args.size, seed=0)
    if not (init_dir / "config.json").is_file():
        init_model("rtdetr-tiny", data_dir, init_dir)
    if not (run_dir / "results.json").is_file():
        cmd = [sys.executable, "-m", "rtcodetr.train_student", "--config", str(REPO / "configs" / "demo_student.yaml"),
               f"data={data_dir}", f"model={init_dir}", f"out={run_dir}", f"max_steps={args.steps}",
               f"image_size=[{args.size},{args.size}]", "num_workers=0"]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    best = run_dir / "best"
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    graphs = {"onnx-fp32": (work / "onnx" / "model.onnx", False)}
    if args.half:
        graphs["onnx-fp16"] = (work / "onnx" / "model_fp16.onnx", True)
    parity = {}
    for name, (path, half) in graphs.items():
        try:
            parity[name] = export_onnx(best, path, opset=args.opset, half=half, check_images=data_dir, split="test",
                                       num_check_images=16)["parity"]
        except ParityError as e:
            print(f"{name}: {e}", flush=True)
            return 1
    report = evaluate_models(data_dir, {"pytorch": best, **{k: v[0] for k, v in graphs.items()}}, work / "report",
                             split="test", latency=False, plot=False)
    by_name = {e["name"]: e for e in report["models"]}
    ref = by_name["pytorch"]
    print(f"\ntest split ({report['dataset']['num_images']} images), student after {args.steps} steps:")
    print(f"  pytorch    mAP50:95 {ref['mAP']:.4f}  mAP50 {ref['mAP50']:.4f}")
    for name in graphs:
        e, par = by_name[name], parity[name]
        print(f"  {name:<10} mAP50:95 {e['mAP']:.4f}  mAP50 {e['mAP50']:.4f}  |d mAP50:95| {abs(e['mAP'] - ref['mAP']):.4f}"
              f"  max |d logits| {par['logits_max_abs_diff']:.2e}  max |d boxes| {par['boxes_max_abs_diff']:.2e}"
              f"  (parity on {par['images']}; encoder top-k close pairs {par.get('topk_close_pairs')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
