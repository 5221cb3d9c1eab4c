"""``report.md`` (tables), ``report.json`` (everything) and ``plot.png`` (accuracy vs latency, per-class AP)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None (strict JSON has no NaN), tuples -> lists, numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    return obj


def _pct(v: Any) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _num(v: Any, fmt: str) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _lat(entry: dict, scope: str) -> str:
    s = (entry.get("latency") or {}).get(scope)
    if not s:
        return "—"
    return f"{s['median_ms']:.1f} (p90 {s['p90_ms']:.1f}; {s['mean_ms']:.1f} ± {s['std_ms']:.1f})"


def _runtime(entry: dict) -> str:
    return entry.get("runtime") or "—"


def _speedup(entry: dict, models: list[dict]) -> str:
    """End-to-end speed-up of an exported graph over its PyTorch source when both are in the report (else —)."""
    source = ((entry.get("protocol") or {}).get("graph") or {}).get("source")
    mine = entry.get("latency_ms")
    if not source or not mine:
        return "—"
    for other in models:
        if other.get("runtime") == "pytorch" and other.get("latency_ms") and \
                Path(other["path"]).resolve() == Path(source).resolve():
            return f"{other['latency_ms'] / mine:.2f}× vs {other['name']}"
    return "—"


def markdown(report: dict[str, Any]) -> str:
    """The human-readable report: main table, latency table, sanity flags, per-class AP, protocol, environment."""
    ds = report["dataset"]
    models = report["models"]
    lines = [f"# Evaluation report — {ds.get('name') or Path(ds['root']).name}, split `{ds['split']}` "
             f"({ds['num_images']} images, {ds['num_labels']} classes)", ""]
    lines += [
        "| model | runtime | mAP@.50:.95 | mAP@.50 | latency ms (e2e median) | params (M) | GFLOPs | GMACs | input | "
        "AP S | AP M | AP L | AR@100 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for e in models:
        params = e.get("params")
        hw = e.get("input_hw")
        lines.append(
            f"| {e['name']}{' ⚠' if e.get('sanity', {}).get('flag') else ''} | {_runtime(e)} | {_pct(e['mAP'])} "
            f"| {_pct(e['mAP50'])} "
            f"| {_num(e.get('latency_ms'), '.1f')} | {_num(params / 1e6 if params else None, '.2f')} "
            f"| {_num(e.get('gflops'), '.2f')} | {_num(e.get('gmacs'), '.2f')} | {f'{hw[0]}×{hw[1]}' if hw else '—'} "
            f"| {_pct(e['mAP_small'])} | {_pct(e['mAP_medium'])} | {_pct(e['mAP_large'])} | {_pct(e['AR100'])} |"
        )
    lines += ["", "AP in %, COCO protocol; FLOPs convention and uncounted ops below. — = not applicable / not measured.",
              ""]
    if any(e.get("latency") for e in models):
        lines += ["## Latency (ms, batch 1)", "", "| model | runtime | input | forward: median (p90; mean ± std) | "
                  "end-to-end: median (p90; mean ± std) | exported vs PyTorch (e2e) |", "|---|---|---|---|---|---|"]
        for e in models:
            if e.get("latency"):
                hw = e["input_hw"]
                lines.append(f"| {e['name']} | {_runtime(e)} | {hw[0]}×{hw[1]} | {_lat(e, 'forward')} "
                             f"| {_lat(e, 'end_to_end')} | {_speedup(e, models)} |")
        lines.append("")
    flagged = [e for e in models if e.get("sanity", {}).get("flag")]
    lines += ["## Sanity", ""]
    for e in models:
        s = e.get("sanity", {})
        ratio = s.get("mAP50_over_mAP")
        verdict = "⚠ " + s["reason"] if s.get("flag") else ("ok" if ratio is not None else s.get("reason", ""))
        lines.append(f"- {e['name']}: mAP50/mAP = {_num(ratio, '.2f')} — {verdict}")
        for note in e.get("notes") or []:
            lines.append(f"  - note: {note}")
    if not flagged:
        lines.append("")
        lines.append(f"No model outside the usual mAP50/mAP range {models[0]['sanity']['range'] if models else ''}.")
    lines.append("")
    names = ds["labels"]
    lines += ["## Per-class AP@.50:.95 (%)", "", "| class | " + " | ".join(e["name"] for e in models) + " |",
              "|---|" + "---:|" * len(models)]
    for c in names:
        lines.append(f"| {c} | " + " | ".join(_pct(e["per_class_AP"].get(c)) for e in models) + " |")
    lines.append("")
    lines += ["## Uncounted ops (called during the FLOPs pass, no FLOPs attributed)", ""]
    for e in models:
        comp = e.get("complexity")
        if comp:
            ops = ", ".join(f"{k}×{v}" for k, v in list(comp["uncounted_ops"].items())[:20])
            lines.append(f"- {e['name']}: {ops}")
    lines.append("")
    lines += ["## Protocol", ""] + [f"- **{k}**: {v}" for k, v in report["protocol"].items()] + [""]
    lines += ["## Models", ""]
    for e in models:
        p = e.get("protocol", {})
        lines.append(f"- **{e['name']}** ({e['kind']}): `{e['path']}` — "
                     + "; ".join(f"{k}: {v}" for k, v in p.items() if k != "kind"))
    env = report["environment"]
    lines += ["", "## Environment", "",
              f"- device: {env['device']} ({env['device_name']}), processes: {env.get('num_processes', 1)}, "
              f"torch threads: {env['torch_threads']}",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v),
              f"- python {env['python']}, {env['platform']}",
              f"- created {report['created_utc']}", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str | Path) -> Path:
    """Left: mAP against end-to-end latency (or GFLOPs/params when latency was not measured), one point per model.
    Right: per-class AP@.50:.95 bars, one colour per model."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    models = report["models"]
    names = report["dataset"]["labels"]
    width = max(10.0, 5.0 + 0.28 * len(names) * max(1, len(models)) ** 0.5)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(width, 4.8), gridspec_kw={"width_ratios": [1, 2]})
    if any(e.get("latency_ms") for e in models):
        key, xlabel = "latency_ms", "end-to-end latency, median (ms, batch 1)"
    elif any(e.get("gflops") for e in models):
        key, xlabel = "gflops", "GFLOPs (latency not measured)"
    else:
        key, xlabel = None, "model"
    for i, e in enumerate(models):
        x = e.get(key) if key else i
        y = e["mAP"]
        if x is None or y is None or (isinstance(y, float) and math.isnan(y)):
            continue
        ax1.scatter([x], [100 * y], s=40, zorder=3)
        ax1.annotate(e["name"], (x, 100 * y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax1.set_xlabel(xlabel)
    ax1.set_ylabel("mAP@.50:.95 (%)")
    ax1.set_title("accuracy vs cost")
    ax1.grid(alpha=0.3)
    xs = np.arange(len(names))
    bar_w = 0.8 / max(1, len(models))
    for i, e in enumerate(models):
        ap = [e["per_class_AP"].get(c) for c in names]
        ap = [0.0 if v is None or (isinstance(v, float) and math.isnan(v)) else 100 * v for v in ap]
        ax2.bar(xs + (i - (len(models) - 1) / 2) * bar_w, ap, width=bar_w, label=e["name"])
    def no_gt(c: str) -> bool:  # nan AP for every model: the class has no ground truth in the evaluated images
        return all(e["per_class_AP"].get(c) is None or math.isnan(e["per_class_AP"][c]) for e in models)

    ax2.set_xticks(xs)
    ax2.set_xticklabels([f"{c} (no GT)" if no_gt(c) else c for c in names], rotation=60, ha="right", fontsize=7)
    ax2.set_ylabel("AP@.50:.95 (%)")
    ax2.set_title(f"per-class AP ({report['dataset']['split']})")
    ax2.legend(fontsize=7)
    ax2.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(report: dict[str, Any], out: str | Path, plot: bool = True) -> dict[str, str]:
    """Write ``report.md``, ``report.json`` and (with ``plot``) ``plot.png`` into ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"report_md": str(out / "report.md"), "report_json": str(out / "report.json")}
    if plot:
        files["plot"] = str(_plot(report, out / "plot.png"))
    report = {**report, "files": files}
    (out / "report.json").write_text(json.dumps(_clean(report), indent=2, allow_nan=False) + "\n")
    (out / "report.md").write_text(markdown(report))
    return files


_plot = plot
