"""``rtcodetr export`` and ONNX graphs in the evaluator: parity with PyTorch, the written files, refusals.

Tiny models are built from configs. An untrained RT-DETR's class head is near zero, so all its encoder scores sit
within float32 rounding of the prior logit and the top-k that selects its decoder queries is decided by rounding
(the exporter says so when its parity check fails). The RT-DETR tests therefore scale the encoder score head so the
scores spread over a few units, as a trained model's do; that changes no code path.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from rtcodetr.evaluate.api import evaluate_models  # noqa: E402
from rtcodetr.evaluate.cli import main as evaluate_main  # noqa: E402
from rtcodetr.evaluate.detectors import (  # noqa: E402
    OnnxDetector, TransformersDetector, load_detector, onnx_providers,
)
from rtcodetr.export import (  # noqa: E402
    METADATA_KEY, StableTopK, export_onnx, main as export_main, read_export_metadata,
)


def _spread_scores(src: Path, dst: Path) -> Path:
    """A copy of an untrained RT-DETR whose encoder scores spread like a trained model's (see module docstring)."""
    from rtcodetr.models import load_model

    model, processor = load_model(src)
    with torch.no_grad():
        model.model.enc_score_head.weight.mul_(1000.0)
    model.save_pretrained(dst)
    processor.save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def rtdetr_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return _spread_scores(tiny_model_dir("rtdetr-tiny"), tmp_path_factory.mktemp("rtdetr_spread") / "model")


@pytest.fixture(scope="module")
def rtdetr_onnx(rtdetr_dir, synthetic_data, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("rtdetr_onnx") / "deploy" / "model.onnx"
    record = export_onnx(rtdetr_dir, out, dynamic_batch=True, check_images=synthetic_data.root, split="val",
                         num_check_images=3, verbose=False)
    return out, record


@pytest.fixture(scope="module")
def cdetr_onnx(tiny_model_dir, synthetic_data, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("cdetr_onnx") / "model.onnx"
    record = export_onnx(tiny_model_dir("conditional-detr-tiny"), out, check_images=synthetic_data.root,
                         num_check_images=2, verbose=False)
    return out, record


# ------------------------------------------------------------------------------------------------------ the export
def test_rtdetr_export_writes_checked_graph_processor_and_manifest(rtdetr_onnx, rtdetr_dir):
    out, record = rtdetr_onnx
    parity = record["parity"]
    assert parity["ok"] is True and parity["tolerance"] == 1e-3
    assert parity["logits_max_abs_diff"] < 1e-4 and parity["boxes_max_abs_diff"] < 1e-5
    assert parity["runs"] == 4 and parity["input_shapes"][-1] == [3, 3, 320, 320]  # 3 images + one batch of 3
    graph = onnx.load(str(out))
    onnx.checker.check_model(graph, full_check=True)
    assert [o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert [i.name for i in graph.graph.input] == ["pixel_values"]
    assert [o.name for o in graph.graph.output] == ["logits", "pred_boxes"]
    meta = read_export_metadata(out)
    assert meta["family"] == "rtdetr" and meta["input"]["shape"] == ["batch", 3, 320, 320]
    assert meta["id2label"] == {str(k): v for k, v in json.loads((rtdetr_dir / "config.json").read_text())
                                ["id2label"].items()}
    assert meta["complexity"]["input_hw"] == [320, 320] and meta["complexity"]["flops"] > 0
    sidecar = json.loads(out.with_suffix(".export.json").read_text())
    assert sidecar["parity"] == json.loads(json.dumps(parity)) and sidecar["onnx"] == str(out)
    assert sidecar["versions"]["onnxruntime"] == ort.__version__
    processor_cfg = json.loads((out.parent / "preprocessor_config.json").read_text())
    assert processor_cfg["size"] == {"height": 320, "width": 320} and processor_cfg["do_normalize"] is False


def test_stable_topk_breaks_ties_lowest_index_first():
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]])
    with StableTopK():
        values, indices = torch.topk(x, 3, dim=1)
        v2, i2 = x.topk(2, largest=False)
    assert indices.tolist() == [[1, 2, 4]] and values.tolist() == [[3.0, 3.0, 3.0]]
    assert i2.tolist() == [[0, 3]] and v2.tolist() == [[1.0, 2.0]]


def test_conditional_detr_export_has_dynamic_size_and_matches(cdetr_onnx):
    out, record = cdetr_onnx
    assert record["parity"]["ok"] is True and record["parity"]["logits_max_abs_diff"] < 1e-4
    meta = read_export_metadata(out)
    assert meta["family"] == "conditional_detr" and meta["input"]["shape"] == [1, 3, "height", "width"]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for h, w in ((96, 160), (128, 128)):  # shortest-edge inputs vary per image
        logits, boxes = session.run(None, {"pixel_values": np.zeros((1, 3, h, w), np.float32)})
        assert logits.shape[:2] == boxes.shape[:2] and boxes.shape[2] == 4


def test_export_image_size_and_fp16(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "fp16" / "model.onnx"
    rc = export_main(["--model", str(tiny_model_dir("conditional-detr-tiny")), "--out", str(out), "--half",
                      "--image-size", "96", "128"])
    printed = capsys.readouterr().out
    assert rc == 0 and "max |d logits|" in printed and "not enforced" in printed
    meta = read_export_metadata(out)
    assert meta["graph_dtype"] == "float16" and meta["input"]["shape"] == [1, 3, 96, 128]
    graph = onnx.load(str(out))
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 at the edges
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.graph.initializer)
    assert json.loads((out.parent / "preprocessor_config.json").read_text())["size"] == {"height": 96, "width": 128}


# ------------------------------------------------------------------------------------------------- the evaluator
def test_onnx_detector_forward_equals_pytorch_and_handles_batches(rtdetr_onnx, rtdetr_dir, synthetic_data, tmp_path):
    from rtcodetr.data.dataset import CocoDetection

    out, _ = rtdetr_onnx
    images = [CocoDetection(synthetic_data, "val").load(i)[0] for i in range(3)]
    torch_det = TransformersDetector("pt", rtdetr_dir, synthetic_data.label_map)
    onnx_det = load_detector(out, label_map=synthetic_data.label_map)
    assert isinstance(onnx_det, OnnxDetector) and onnx_det.runtime == "onnxruntime"
    assert onnx_det.providers == ["CPUExecutionProvider"]
    inputs = torch_det._inputs(images, None)
    with torch.inference_mode(), StableTopK():
        ref = torch_det.forward(inputs)
    got = onnx_det.forward(onnx_det._inputs(images, None))
    assert torch.allclose(got.logits, ref.logits, atol=1e-4) and torch.allclose(got.pred_boxes, ref.pred_boxes,
                                                                                atol=1e-5)
    # a batch-1 graph fed a batch runs image by image and returns the same
    (tmp_path / "b1").mkdir()
    export_onnx(rtdetr_dir, tmp_path / "b1" / "model.onnx", verbose=False)
    b1 = load_detector(tmp_path / "b1" / "model.onnx", label_map=synthetic_data.label_map)
    assert b1.static_batch == 1
    assert torch.allclose(b1.forward(b1._inputs(images, None)).logits, got.logits, atol=1e-5)


def test_evaluator_onnx_gives_the_pytorch_metrics(rtdetr_onnx, rtdetr_dir, cdetr_onnx, tiny_model_dir,
                                                   synthetic_data, tmp_path):
    models = {"rtdetr": rtdetr_dir, "rtdetr-onnx": rtdetr_onnx[0],
              "cdetr": tiny_model_dir("conditional-detr-tiny"), "cdetr-onnx": cdetr_onnx[0]}
    report = evaluate_models(synthetic_data.root, models, tmp_path / "report", split="val", latency=True,
                             warmup=1, iterations=2, plot=False)
    by = {e["name"]: e for e in report["models"]}
    assert [by[n]["runtime"] for n in models] == ["pytorch", "onnxruntime", "pytorch", "onnxruntime"]
    assert by["cdetr-onnx"]["kind"] == "onnx" and by["cdetr"]["AR100"] > 0  # the untrained model finds something
    for name in ("rtdetr", "cdetr"):
        a, b = by[name], by[f"{name}-onnx"]
        for key in ("mAP", "mAP50", "AR100"):
            assert abs(a[key] - b[key]) <= 0.002, (name, key, a[key], b[key])
        assert a["per_class_AP"].keys() == b["per_class_AP"].keys()
        assert b["params"] == a["params"] and b["latency_ms"] > 0 and set(b["latency"]) == {"forward", "end_to_end"}
    # params and FLOPs travel with the graph (counted on the PyTorch model at export, at the size the evaluator times)
    for name, hw in (("rtdetr", [320, 320]), ("cdetr", [640, 640])):
        assert by[f"{name}-onnx"]["input_hw"] == by[name]["input_hw"] == hw
        assert by[f"{name}-onnx"]["gflops"] == pytest.approx(by[name]["gflops"]) and by[name]["gflops"] > 0
    assert by["cdetr-onnx"]["protocol"]["providers"] == ["CPUExecutionProvider"]
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| model | runtime |" in md and "| cdetr-onnx | onnxruntime |" in md
    assert "× vs cdetr" in md  # the exported graph's end-to-end speed-up over its own PyTorch source


def test_yolo_export_through_ultralytics_and_evaluate(synthetic_data, tmp_path, capsys):
    from rtcodetr.evaluate.detectors import ultralytics_offline_env

    ultralytics_offline_env()
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    label_map = synthetic_data.label_map
    yolo = YOLO("yolo11n.yaml")
    net = DetectionModel({**yolo.model.yaml, "nc": label_map.num_labels}, nc=label_map.num_labels, verbose=False)
    net.names = dict(enumerate(label_map.names))
    yolo.model = net
    pt = tmp_path / "run" / "best.pt"
    pt.parent.mkdir()
    yolo.save(str(pt))
    out = tmp_path / "deploy" / "yolo.onnx"
    rc = export_main(["--model", str(pt), "--out", str(out), "--image-size", "128", "128",
                      "--data", str(synthetic_data.root), "--check-images", "2"])
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in pt.parent.iterdir()) == ["best.pt"]  # nothing written beside the checkpoint
    sidecar = json.loads(out.with_suffix(".export.json").read_text())
    assert sidecar["family"] == "yolo" and sidecar["parity"]["ok"] is True
    assert sidecar["parity"]["logits_max_abs_diff"] < 1e-4
    assert read_export_metadata(out)["family"] == "yolo"
    report = evaluate_models(synthetic_data.root, {"pt": pt, "onnx": out}, None, split="val", imgsz=128,
                             complexity=True)
    by = {e["name"]: e for e in report["models"]}
    assert by["onnx"]["kind"] == "ultralytics" and by["onnx"]["runtime"] == "onnxruntime"
    assert by["pt"]["runtime"] == "pytorch" and abs(by["pt"]["mAP"] - by["onnx"]["mAP"]) <= 0.002
    # the graph's stored numbers (Conv+BN fused, some head constants folded) ~ the fused network's parameters
    assert by["onnx"]["params"] == pytest.approx(by["pt"]["params"], rel=0.01) and by["onnx"]["gflops"] is None


# ------------------------------------------------------------------------------------------------------ refusals
def test_export_refusals(rtdetr_dir, synthetic_data, tmp_path, capsys):
    def refused(argv: list[str], *expected: str) -> None:
        assert export_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert all(e in err for e in expected), err
        assert "Traceback" not in err

    out = tmp_path / "x" / "model.onnx"
    refused(["--model", str(rtdetr_dir), "--out", str(out), "--opset", "15"], "opset 15", "GridSample", "16")
    refused(["--model", str(rtdetr_dir), "--out", str(out), "--opset", "21"], "opset 21", "16..20")
    refused(["--model", str(tmp_path / "missing"), "--out", str(out)], "does not exist")
    refused(["--model", str(synthetic_data.root), "--out", str(out)], "no config.json")
    not_detector = tmp_path / "bert"
    not_detector.mkdir()
    (not_detector / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    refused(["--model", str(not_detector), "--out", str(out)], "model_type 'bert'", "not a detector")
    refused(["--model", str(rtdetr_dir), "--out", str(tmp_path / "model.pt")], "must end with .onnx")
    refused(["--model", str(tmp_path / "missing.pt"), "--out", str(out)], "missing.pt", "not found")
    assert not (tmp_path / "x").exists()
    # a folder whose processor config has another geometry (here: the model's own directory) is not overwritten
    before = (rtdetr_dir / "preprocessor_config.json").read_text()
    refused(["--model", str(rtdetr_dir), "--out", str(rtdetr_dir / "model.onnx"), "--image-size", "256", "256"],
            "another input geometry", "own folder")
    assert (rtdetr_dir / "preprocessor_config.json").read_text() == before
    assert not (rtdetr_dir / "model.onnx").exists()


def test_evaluator_refusals(rtdetr_onnx, synthetic_data, tmp_path, capsys):
    def refused(model: str, *extra: str, expected: str) -> None:
        rc = evaluate_main(["--data", str(synthetic_data.root), "--out", str(tmp_path / "r"), "--model", f"m={model}",
                            *extra])
        err = capsys.readouterr().err
        assert rc == 2 and expected in err and "Traceback" not in err, err

    refused(str(tmp_path / "missing.onnx"), expected="not found")
    plain = tmp_path / "plain.onnx"  # a valid graph without rtcodetr / ultralytics metadata
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph), str(plain))
    refused(str(plain), expected="without rtcodetr or ultralytics metadata")
    (tmp_path / "junk.onnx").write_bytes(b"not a graph")
    refused(str(tmp_path / "junk.onnx"), expected="not a readable ONNX file")
    refused(str(rtdetr_onnx[0]), "--imgsz", "256", expected="fixed at 320x320")
    refused(str(rtdetr_onnx[0]), "onnx_provider=tensorrt", expected="needs a CUDA device")


def test_onnx_providers_by_device():
    assert onnx_providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="needs a CUDA device"):
        onnx_providers("cpu", "cuda")
    with pytest.raises(ValueError, match="not one of"):
        onnx_providers("cpu", "openvino")
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:  # onnxruntime-gpu: TensorRT first when present, CPU last
        chain = [p if isinstance(p, str) else p[0] for p in onnx_providers("cuda")]
        assert chain[-1] == "CPUExecutionProvider" and "CUDAExecutionProvider" in chain
        assert (chain[0] == "TensorrtExecutionProvider") == ("TensorrtExecutionProvider" in available)
    else:
        with pytest.raises(ValueError, match="onnxruntime-gpu"):
            onnx_providers("cuda")


def test_metadata_key_is_what_the_graph_carries(rtdetr_onnx):
    graph = onnx.load(str(rtdetr_onnx[0]), load_external_data=False)
    assert METADATA_KEY in {p.key for p in graph.metadata_props}
