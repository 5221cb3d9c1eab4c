"""``rtcodetr yolo train``: one short epoch at a tiny size on the synthetic set, then straight into the evaluator."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from rtcodetr.evaluate.yolo import main as yolo_main


def test_yolo_train_one_epoch_then_evaluate(synthetic_data, tmp_path, capsys):
    out = tmp_path / "yolo_run"
    rc = yolo_main(["train", "--data", str(synthetic_data.root), "--model", "yolo11n.yaml", "--out", str(out),
                    "epochs=1", "imgsz=64", "batch=4", "workers=0", "device=cpu"])
    printed = capsys.readouterr().out
    assert rc == 0
    m = re.search(r"best weights: (\S+)", printed)
    assert m, printed[-2000:]
    weights = Path(m.group(1))
    assert weights.is_file() and weights.parent == (out / "weights").resolve()
    # offline-safe settings actually reached ultralytics, and the exported class order is the label order
    args = yaml.safe_load((out / "args.yaml").read_text())
    assert args["plots"] is False and args["amp"] is False and args["epochs"] == 1 and args["imgsz"] == 64
    data_yaml = yaml.safe_load(Path(args["data"]).read_text())
    names = data_yaml["names"]
    assert [names[i] for i in range(len(names))] == synthetic_data.label_map.names

    from rtcodetr.evaluate.api import evaluate_models

    report = evaluate_models(synthetic_data.root, {"yolo11n": weights}, None, complexity=False)
    entry = report["models"][0]
    assert entry["kind"] == "ultralytics" and entry["protocol"]["input_geometry"]["imgsz"] == 64  # trained size
    assert entry["num_images"] == synthetic_data.info["splits"]["val"]["num_images"]
    assert 0.0 <= entry["mAP"] <= 1.0


def test_yolo_train_refuses_missing_checkpoint_and_reserved_keys(synthetic_data, tmp_path, capsys):
    rc = yolo_main(["train", "--data", str(synthetic_data.root), "--model", str(tmp_path / "nope.pt"),
                    "--out", str(tmp_path / "run")])
    assert rc == 2 and "nothing is downloaded" in capsys.readouterr().err
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        yolo_main(["train", "--data", str(synthetic_data.root), "--model", "yolo11n.yaml", "--out",
                   str(tmp_path / "run"), "project=/elsewhere"])
    assert e.value.code == 2 and "'project=' is set by the wrapper" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was trained or written
