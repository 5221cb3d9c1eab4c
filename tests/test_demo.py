"""The demo pipeline end to end at its smallest settings: every stage runs for real (synthetic set, teacher training,
cache, baseline + distilled students, YOLO11n, evaluation), and the report and summary say what happened."""
import json
import re
import struct

import pytest
import yaml

pytestmark = pytest.mark.slow


def test_demo_smallest_settings_end_to_end(tmp_path, capsys):
    from rtcodetr.demo import main

    out = tmp_path / "demo"
    argv = ["--out", str(out), "train_images=8", "val_images=4", "test_images=2", "unlabeled_images=4", "image_size=128",
            "teacher_steps=3", "student_steps=3", "teacher_batch_size=4", "student_batch_size=4", "yolo_epochs=1",
            "latency_warmup=1", "latency_iterations=2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out

    report = json.loads((out / "report.json").read_text())
    names = [m["name"] for m in report["models"]]
    assert names == ["teacher", "baseline", "distilled", "yolo11"]
    for m in report["models"]:
        assert 0.0 <= m["mAP"] <= 1.0 and 0.0 <= m["mAP50"] <= 1.0 and m["params"] > 0
        assert m["latency_ms"] is not None
    kinds = {m["name"]: m["kind"] for m in report["models"]}
    assert kinds["yolo11"] == "ultralytics" and kinds["teacher"] == "transformers"
    md = (out / "report.md").read_text()
    assert all(n in md for n in names)
    png = (out / "plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24])[0] > 100

    from rtcodetr.cache_teacher import TeacherCache

    assert TeacherCache(out / "cache" / "train_mirror.zarr").mirrored  # flipped views' targets, for the ablation
    # the students shared one schedule and seed; only the distilled one read the cache
    base_cfg = (out / "baseline" / "config.yaml").read_text()
    dist_cfg = (out / "distilled" / "config.yaml").read_text()
    base_yaml, dist_yaml = yaml.safe_load(base_cfg), yaml.safe_load(dist_cfg)
    assert base_yaml["cache"] is None and dist_yaml["cache"] is not None
    assert base_yaml["mirror_cache"] is None and dist_yaml["mirror_cache"].endswith("train_mirror.zarr")
    drop = lambda cfg: {k: v for k, v in cfg.items() if k not in ("out", "cache", "mirror_cache")}  # noqa: E731
    assert drop(base_yaml) == drop(dist_yaml)
    dist_metrics = [json.loads(l) for l in (out / "distilled" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in dist_metrics if r["type"] == "train"]
    assert train_rows and all("loss/feature" in r and "loss/pred_class" in r for r in train_rows), train_rows[0]
    base_rows = [json.loads(l) for l in (out / "baseline" / "metrics.jsonl").read_text().splitlines()]
    assert not any("loss/feature" in r for r in base_rows)

    summary = (out / "summary.txt").read_text()
    scores = {m["name"]: m for m in report["models"]}
    gain = scores["distilled"]["mAP"] - scores["baseline"]["mAP"]
    verdict = "The distilled student beat the baseline" if gain > 0 else "The distilled student did NOT beat the baseline"
    assert verdict in summary and f"{gain:+.4f} mAP50:95" in summary  # the verdict follows the measured numbers
    assert "the teacher" in summary and summary.strip() in printed
    assert (out / "cache" / "unlabeled.zarr").is_dir()  # the unlabelled split is cached for the ablation's arm

    # a second run reuses every finished stage instead of training again
    capsys.readouterr()
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert printed.count("reusing") < again.count("reusing")
    assert again.count("reusing finished run") == 4  # teacher, baseline, distilled, yolo: nothing retrained

    # other settings into the same output would mix runs: refused (exit 2, one line), naming the setting
    capsys.readouterr()
    assert main([*argv, "student_steps=4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rtcodetr demo: error: ") and re.search("student_steps=3.*student_steps=4", err), err
