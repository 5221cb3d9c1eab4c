"""``rtcodetr sweep --config configs/ablation.yaml``: every arm x seed from one teacher cache, then one table.

Each run is the trainer launched in its own process (``accelerate launch -m rtcodetr.train_student`` by default), all
runs sharing the base trainer YAML, the data, the student initialisation and the cache, so arms differ only in the
overrides they name (loss weights). A run whose ``results.json`` exists is finished and is not rerun when the sweep is
restarted; an unfinished one resumes from its last checkpoint (``resume=auto``). Finished runs are then evaluated with
the evaluator on one split, and ``sweep.md`` / ``sweep.json`` give mean ± std across seeds per arm and the difference
to the baseline arm.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence


from rtcodetr.config import ConfigError, config_to_dict, load_config, save_config, split_overrides
from rtcodetr.errors import BAD_INPUT, report_bad_input


@dataclass
class SweepConfig:
    data: str = ""  # prepared dataset directory (rtcodetr data ...)
    model: str = ""  # student initialisation: a save_pretrained directory (rtcodetr init-model ...)
    # Or one initialisation per seed (init_preset set): `rtcodetr init-model --preset P [--from F] --seed SEED` into
    # out/init/seedN, so a seed varies the student's initial weights as well as data order and noise.
    init_preset: str = ""
    init_from: str = ""  # with init_preset: start from these weights (only the label head is drawn from the seed)
    cache: str = ""  # teacher cache (zarr path / URL or .h5) shared by every distilled arm
    out: str = "runs/sweep"
    train_config: str = "configs/baseline.yaml"  # the trainer YAML every arm starts from (same schedule)
    train_overrides: list[str] = field(default_factory=list)  # key=value applied to every arm
    arms: dict[str, Any] = field(default_factory=dict)  # arm name -> mapping of trainer overrides
    baseline_arm: str = "baseline"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    split: str = "val"  # split the finished runs are evaluated on
    checkpoint: str = "best"  # "best" or "final"
    launcher: str = "accelerate"  # "accelerate" (accelerate launch) or "python" (one process, python -m)
    launch_args: list[str] = field(default_factory=list)  # e.g. ["--num_processes", "2", "--mixed_precision", "fp16"]
    device: str = "cpu"  # device for the evaluation of finished runs
    # Runs trained at once. On a CPU host each gets OMP_NUM_THREADS = cores // parallel (unless it is set), which is
    # faster in total than one run on every core; on GPUs give each run its own device through launch_args.
    parallel: int = 1


def flatten_overrides(mapping: dict[str, Any], prefix: str = "") -> list[str]:
    """``{"loss": {"feature_weight": 0}, "cache": None}`` -> ``["loss.feature_weight=0", "cache=null"]``."""
    words = []
    for key, value in mapping.items():
        if isinstance(value, dict):
            words += flatten_overrides(value, f"{prefix}{key}.")
        else:  # JSON is YAML: null, true, 0.0, [1, 2] parse back to the same value; plain strings stay bare
            words.append(f"{prefix}{key}={value if isinstance(value, str) else json.dumps(value)}")
    return words


def run_dir_for(cfg: SweepConfig, arm: str, seed: int) -> Path:
    return Path(cfg.out) / "runs" / arm / f"seed{seed}"


def is_finished(run_dir: Path) -> bool:
    """A run is finished when the trainer wrote its results.json (the very last thing it does)."""
    return (run_dir / "results.json").is_file()


def init_dir_for(cfg: SweepConfig, seed: int) -> Path:
    return Path(cfg.out) / "init" / f"seed{seed}"


def student_init(cfg: SweepConfig, seed: int) -> str:
    """The student model directory of ``seed``: ``cfg.model``, or (with ``init_preset``) its own seeded init, written
    once and shared by every arm of that seed (so arms of one seed start from the same weights)."""
    if not cfg.init_preset:
        return cfg.model
    out = init_dir_for(cfg, seed)
    if not (out / "config.json").is_file():
        from rtcodetr.models import init_model

        init_model(cfg.init_preset, cfg.data, out, from_=cfg.init_from or None, seed=seed, verbose=False)
    return str(out)


def train_command(cfg: SweepConfig, arm: str, seed: int) -> list[str]:
    """The exact command line of one arm x seed run (logged in sweep.json, so any run can be redone by hand)."""
    run_dir = run_dir_for(cfg, arm, seed)
    model = str(init_dir_for(cfg, seed)) if cfg.init_preset else cfg.model
    overrides = [f"data={cfg.data}", f"model={model}", f"out={run_dir}", f"seed={seed}"]
    arm_overrides = flatten_overrides(cfg.arms[arm] or {})
    if cfg.cache and not any(w.startswith("cache=") for w in arm_overrides):
        overrides.append(f"cache={cfg.cache}")  # an arm may say cache: null (the baseline never opens the cache)
    overrides += list(cfg.train_overrides)
    overrides += arm_overrides
    overrides.append("resume=auto")
    if cfg.launcher == "accelerate":
        head = [sys.executable, "-m", "accelerate.commands.launch", *cfg.launch_args, "-m", "rtcodetr.train_student"]
    elif cfg.launcher == "python":
        head = [sys.executable, "-m", "rtcodetr.train_student"]
    else:
        raise ConfigError(f"sweep launcher must be 'accelerate' or 'python', got '{cfg.launcher}'")
    return [*head, "--config", cfg.train_config, *overrides]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(values) / n
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return m, s


def summarize_arms(per_run: dict[str, dict[int, dict[str, float]]], baseline: str,
                   metrics: Sequence[str] = ("mAP", "mAP50")) -> dict[str, dict[str, Any]]:
    """Per arm: mean ± std of each metric over seeds, and the difference of means to the baseline arm.

    The difference is also given per seed (paired: same seed, same data order) when both arms have that seed, since
    seed-to-seed variance on small data is often larger than the effect being measured.
    """
    table: dict[str, dict[str, Any]] = {}
    for arm, runs in per_run.items():
        row: dict[str, Any] = {"seeds": sorted(runs)}
        for m in metrics:
            row[m] = mean_std([r[m] for r in runs.values()])
        table[arm] = row
    if baseline in table:
        for arm, row in table.items():
            for m in metrics:
                row[f"delta_{m}"] = row[m][0] - table[baseline][m][0]
                paired = [per_run[arm][s][m] - per_run[baseline][s][m] for s in per_run[arm] if s in per_run[baseline]]
                row[f"paired_delta_{m}"] = mean_std(paired)
    return table


def format_table(table: dict[str, dict[str, Any]], baseline: str, metrics: Sequence[str] = ("mAP", "mAP50")) -> str:
    head = ["arm", "seeds"] + [f"{m} (mean ± std)" for m in metrics] + [f"Δ{m} vs {baseline} (paired)" for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, row in table.items():
        cells = [arm, str(len(row["seeds"]))]
        cells += [f"{row[m][0]:.4f} ± {row[m][1]:.4f}" for m in metrics]
        for m in metrics:
            if f"delta_{m}" in row and arm != baseline:
                pm, ps = row[f"paired_delta_{m}"]
                cells.append(f"{row[f'delta_{m}']:+.4f} ({pm:+.4f} ± {ps:.4f})")
            else:
                cells.append("—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluate_run(cfg: SweepConfig, run_dir: Path) -> dict[str, float]:
    """COCO metrics of one finished run's checkpoint on ``cfg.split`` (cached in the run dir as eval_<split>.json)."""
    cached = run_dir / f"eval_{cfg.split}_{cfg.checkpoint}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    from rtcodetr.evaluate.api import evaluate_checkpoint

    metrics = evaluate_checkpoint(run_dir / cfg.checkpoint, cfg.data, split=cfg.split, device=cfg.device)
    cached.write_text(json.dumps(metrics, indent=2))
    return metrics


def run(cfg: SweepConfig) -> dict[str, Any]:
    if not cfg.arms:
        raise ConfigError("sweep config has no arms")
    if cfg.baseline_arm not in cfg.arms:
        raise ConfigError(f"baseline_arm '{cfg.baseline_arm}' is not one of the arms {sorted(cfg.arms)}")
    for key in ("data", "train_config"):
        if not getattr(cfg, key):
            raise ConfigError(f"sweep config needs '{key}'")
    if bool(cfg.model) == bool(cfg.init_preset):
        raise ConfigError("sweep config needs exactly one of 'model' (one student init for every seed) and "
                          "'init_preset' (one init per seed)")
    if cfg.checkpoint not in ("best", "final"):
        raise ConfigError(f"sweep checkpoint must be 'best' or 'final', got '{cfg.checkpoint}'")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "sweep_config.yaml")

    if cfg.parallel < 1:
        raise ConfigError(f"sweep parallel must be >= 1, got {cfg.parallel}")
    commands: dict[str, dict[int, dict[str, Any]]] = {}
    todo: list[tuple[str, int]] = []
    for seed in cfg.seeds:  # seed-major: the arms of one seed finish together, so partial tables are paired
        for arm in cfg.arms:
            run_dir = run_dir_for(cfg, arm, seed)
            entry = {"command": train_command(cfg, arm, seed), "run_dir": str(run_dir),
                     "init": student_init(cfg, seed), "init_seed": seed if cfg.init_preset else None}
            commands.setdefault(arm, {})[seed] = entry
            if is_finished(run_dir):
                print(f"[sweep] {arm} seed {seed}: finished earlier, not rerun ({run_dir})", flush=True)
                entry["status"] = "skipped (finished)"
            else:
                todo.append((arm, seed))
    commands = {arm: commands[arm] for arm in cfg.arms}  # table order = the config's arm order
    env = os.environ.copy()
    if cfg.parallel > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // cfg.parallel))
    running: list[tuple[str, int, subprocess.Popen, Any, float]] = []

    def finish(arm: str, seed: int, proc: subprocess.Popen, log: Any, t0: float) -> None:
        log.close()
        entry, run_dir = commands[arm][seed], run_dir_for(cfg, arm, seed)
        entry["seconds"] = round(time.time() - t0, 1)
        if proc.returncode != 0 or not is_finished(run_dir):
            for other in running:  # stop the others: the sweep reports the first failure
                other[2].kill()
            tail = (run_dir / "launch.log").read_text()[-3000:]
            raise RuntimeError(f"sweep run {arm} seed {seed} failed (exit {proc.returncode}); "
                               f"command: {' '.join(entry['command'])}\nlast output:\n{tail}")
        entry["status"] = "trained"
        print(f"[sweep] {arm} seed {seed}: finished in {entry['seconds']:.0f} s", flush=True)

    for arm, seed in todo:
        while len(running) >= cfg.parallel:
            done = next((r for r in running if r[2].poll() is not None), None)
            if done is None:
                time.sleep(1)
                continue
            running.remove(done)
            finish(*done)
        run_dir = run_dir_for(cfg, arm, seed)
        print(f"[sweep] {arm} seed {seed}: training -> {run_dir}", flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        log = open(run_dir / "launch.log", "a")
        proc = subprocess.Popen(commands[arm][seed]["command"], stdout=log, stderr=subprocess.STDOUT, env=env)
        running.append((arm, seed, proc, log, time.time()))
    while running:
        done = running.pop(0)
        done[2].wait()
        finish(*done)

    per_run: dict[str, dict[int, dict[str, float]]] = {}
    for arm in cfg.arms:
        for seed in cfg.seeds:
            metrics = evaluate_run(cfg, run_dir_for(cfg, arm, seed))
            per_run.setdefault(arm, {})[seed] = metrics
    table = summarize_arms(per_run, cfg.baseline_arm)
    text = format_table(table, cfg.baseline_arm)
    md = [f"# Sweep: {len(cfg.arms)} arms x {len(cfg.seeds)} seeds", "",
          f"Evaluated on split `{cfg.split}` with the `{cfg.checkpoint}` checkpoint of each run. "
          f"Δ is the difference of means to `{cfg.baseline_arm}`; in brackets the mean ± std of per-seed differences.",
          "", text, ""]
    (out / "sweep.md").write_text("\n".join(md))
    result = {"config": config_to_dict(cfg), "runs": commands, "metrics": per_run, "table": table}
    (out / "sweep.json").write_text(json.dumps(result, indent=2, default=str))
    print("\n".join(md), flush=True)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    flags, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    parser = argparse.ArgumentParser(prog="rtcodetr sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="sweep YAML (see configs/ablation.yaml); key=value overrides follow")
    args = parser.parse_args(flags)
    try:
        cfg = load_config(SweepConfig, args.config, overrides)
        run(cfg)
    except BAD_INPUT as e:
        return report_bad_input("rtcodetr sweep", e)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
