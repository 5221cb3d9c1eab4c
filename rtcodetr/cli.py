"""``rtcodetr <stage> ...``: dispatch to each stage's ``main(argv)``.

Every stage also runs as ``python -m rtcodetr.<stage>`` (and ``accelerate launch -m rtcodetr.<stage>``).
Modules are imported only when their sub-command runs, so ``rtcodetr data`` never imports torch's training stack.
"""
from __future__ import annotations

import importlib
import sys
from typing import Sequence

# sub-command -> (module with main(argv), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("rtcodetr.data.cli", "prepare datasets: taco, synthetic, add-images (unlabelled), yolo export, check"),
    "init-model": ("rtcodetr.models", "write a save_pretrained model directory from a preset"),
    "cache-teacher": ("rtcodetr.cache_teacher.cli", "run the teacher once and cache its outputs (also: info, verify, export)"),
    "train": ("rtcodetr.train_student.train", "train a student (or fine-tune the teacher); same as python -m rtcodetr.train_student"),
    "evaluate": ("rtcodetr.evaluate.cli", "COCO mAP, latency, params and FLOPs report for any set of models"),
    "export": ("rtcodetr.export", "export a trained detector to ONNX (parity-checked in ONNX Runtime)"),
    "yolo": ("rtcodetr.evaluate.yolo", "train a YOLO11 baseline with ultralytics on a prepared dataset"),
    "demo": ("rtcodetr.demo", "the whole pipeline on the embedded synthetic set, on CPU"),
    "sweep": ("rtcodetr.sweep", "run ablation arms x seeds from one cache, evaluate, tabulate"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: rtcodetr <command> [args ...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'rtcodetr <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from rtcodetr import __version__

        print(__version__)
        return 0
    name = argv[0].replace("_", "-")
    if name == "train-student":
        name = "train"
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"rtcodetr: unknown command '{argv[0]}'{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    result = module.main(argv[1:])
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
