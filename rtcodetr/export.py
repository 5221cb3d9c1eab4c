"""``rtcodetr export``: a trained detector as an ONNX graph, parity-checked against PyTorch in ONNX Runtime.

    rtcodetr export --model RUN/best --out deploy/model.onnx [--opset 17] [--image-size H W] [--dynamic-batch]
        [--half] [--data DATA_DIR [--split val] [--check-images 4] | --images A.jpg B.jpg] [--tolerance 1e-3]

What is written (the folder of ``--out``):

* ``model.onnx``: input ``pixel_values`` float32 ``[B, 3, H, W]`` (the image processor's output: resized, rescaled
  to ``[0, 1]``, normalised when the model's processor normalises); outputs ``logits`` float32 ``[B, Q, K]`` (raw,
  pre-sigmoid) and ``pred_boxes`` float32 ``[B, Q, 4]`` (normalised ``cxcywh`` of the network input). ``B`` is 1
  unless ``--dynamic-batch``; ``H, W`` are fixed for a fixed-size processor (RT-DETR) and dynamic for a shortest-edge
  one (Conditional DETR, whose input size follows each image), unless ``--image-size`` fixes them. The graph's
  metadata (key ``rtcodetr``) holds the label names, the family, the input geometry and the source model's
  params/FLOPs, so the file alone says what it computes.
* ``preprocessor_config.json``: the model's own image processor (geometry + normalisation; ``--image-size``
  written into it), loadable with ``AutoImageProcessor.from_pretrained(folder)``. Several exports of one model
  (fp32 / fp16 / dynamic batch) can share a folder; a folder whose processor config has another geometry is refused.
* ``model.export.json``: everything above plus the parity figures, versions and the exact settings.

Why logits + boxes and not boxes/scores/labels after an in-graph top-k: the evaluator then post-processes ONNX and
PyTorch outputs with the *same* ``post_process_object_detection`` (one code path, identical mAP by construction);
the raw outputs are a stronger parity check than a thresholded list; the post-processing is a sigmoid and a top-k
over ``Q x K`` (300 x 80) numbers, negligible next to the network, and it stays independent of the image size.

Exporter: ``torch.onnx.export(..., dynamo=False)`` (the TorchScript tracer). Measured with torch 2.14 on RT-DETR and
Conditional DETR: it exports both at opsets 16-20 in 1-4 s, honours the requested opset, and gives graphs with
dynamic batch and (for Conditional DETR) dynamic height/width that match PyTorch to ~5e-6. The dynamo-based default
cannot honour opset 17 for RT-DETR (its version converter fails and it keeps opset 18), specialises RT-DETR's input
shape so a dynamic-batch graph rejects any other batch size at run time, and takes 10-50 s. The tracer's warnings
(branches on shapes that are constant for a given input geometry) are silenced; the parity check is what guards the
trace.

Parity: every check image goes through the processor, then through PyTorch and ONNX Runtime (CPU provider).
RT-DETR picks its decoder queries with a top-k over encoder scores, and tied scores (e.g. all anchors outside the
valid area score the same) are ordered arbitrarily by ``torch.topk`` but lowest-index-first by ONNX ``TopK``; the
PyTorch reference therefore runs with a stable, lowest-index-first top-k (:class:`StableTopK`), which only fixes the
order among exactly tied scores. Differences are max abs over logits and over boxes; a difference above
``tolerance`` (default 1e-3 for fp32 graphs) fails the export (exit code 1; the files are written and marked
failed). For fp16 graphs the figures are reported but not enforced unless ``--tolerance`` is given: fp16 rounding of
RT-DETR's encoder scores changes which queries its top-k selects, so an fp16 graph is judged by its mAP (``rtcodetr
evaluate``), not by raw outputs. An untrained RT-DETR has all encoder scores within float32 rounding of each other
(its class head is near zero), and a featureless image (a blank frame) gives many anchors the same score, so the
check is meaningful only for a trained model on real images; when it fails with such ties the message says so.

YOLO (an ultralytics ``.pt``) goes through ultralytics' own ONNX export into the same layout (``model.onnx`` +
``model.export.json``; letterbox geometry and class names are in ultralytics' own graph metadata), with the same
parity check on the raw network output.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode

from rtcodetr.evaluate.detectors import (  # noqa: F401 (read_export_metadata: part of this module API too)
    DEFAULT_IMGSZ, METADATA_KEY, keep_torch_threads, onnx_session, read_export_metadata, run_onnx,
    ultralytics_offline_env,
)

FORMAT_VERSION = 1
INPUT_NAME = "pixel_values"
OUTPUT_NAMES = ("logits", "pred_boxes")
# Families this exporter knows and the lowest opset their graphs need: RT-DETR's deformable attention samples with
# grid_sample (ONNX GridSample exists from opset 16); Conditional DETR's attention is scaled_dot_product_attention
# (exported from opset 14).
MIN_OPSET = {"rtdetr": 16, "conditional_detr": 14}
MODEL_TYPES = {"rt_detr": "rtdetr", "rt_detr_v2": "rtdetr", "conditional_detr": "conditional_detr"}
MAX_OPSET = 20                      # the TorchScript exporter's highest opset in torch 2.14
# Largest accepted max abs difference of logits and of boxes. fp16 graphs: reported, not enforced unless asked, as
# fp16 rounding of RT-DETR's encoder scores changes which decoder queries its top-k selects (judge those by mAP).
DEFAULT_TOLERANCE: dict[str, float | None] = {"float32": 1e-3, "float16": None}


class ExportError(ValueError):
    """The model, the options or the output folder cannot be exported as asked; the message says which and why."""


class ParityError(RuntimeError):
    """The exported graph disagrees with PyTorch beyond the tolerance (the files are written and marked failed)."""


# ---------------------------------------------------------------------------------------------------------------------
class StableTopK(TorchFunctionMode):
    """Inside this mode ``torch.topk`` breaks ties lowest-index-first, like ONNX ``TopK``.

    ``torch.topk`` leaves the order of equal values unspecified (on CPU it differs from ONNX Runtime's), so a model
    that selects queries with a top-k over tied scores is only comparable with its exported graph when the reference
    uses the same rule. Values and the set of indices are unchanged unless ties straddle the k-th place.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.topk or func is torch.Tensor.topk:
            names = ("input", "k", "dim", "largest", "sorted")
            bound = {**dict(zip(names, args)), **kwargs}
            x, k, dim = bound["input"], int(bound["k"]), int(bound.get("dim", -1))
            values, indices = torch.sort(x, dim=dim, descending=bool(bound.get("largest", True)), stable=True)
            return torch.return_types.topk((values.narrow(dim, 0, k), indices.narrow(dim, 0, k)))
        return func(*args, **kwargs)


class _RawOutputs(torch.nn.Module):
    """The traced function: ``pixel_values -> (logits, pred_boxes)`` of a transformers detector (eval mode)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(pixel_values=pixel_values)
        return out.logits, out.pred_boxes


# ---------------------------------------------------------------------------------------------------------------------
def _model_family(model_dir: Path) -> str:
    """The exporter's family name for a save_pretrained directory, refusing anything that is not a known detector."""
    from rtcodetr.models import ModelLoadError

    if not model_dir.exists():
        raise ModelLoadError(f"model directory {model_dir} does not exist")
    if not model_dir.is_dir():
        raise ExportError(f"{model_dir}: expected a save_pretrained model directory or an ultralytics .pt checkpoint")
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise ExportError(f"{model_dir} has no config.json: not a save_pretrained model directory")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise ExportError(f"{config_file}: not a readable model config ({e})") from None
    if model_type not in MODEL_TYPES:
        raise ExportError(f"{config_file}: model_type '{model_type}' is not a detector this exporter supports "
                          f"(supported: {', '.join(sorted(MODEL_TYPES))})")
    return MODEL_TYPES[model_type]


def _check_opset(opset: int, family: str) -> None:
    low = MIN_OPSET.get(family, 7)
    if not low <= opset <= MAX_OPSET:
        why = {"rtdetr": " (RT-DETR's deformable attention needs GridSample, added in opset 16)",
               "conditional_detr": " (scaled_dot_product_attention is exported from opset 14)"}.get(family, "")
        raise ExportError(f"opset {opset} is not supported for a {family} model: use {low}..{MAX_OPSET}{why}")


def _check_out(out: Path) -> None:
    if out.suffix != ".onnx":
        raise ExportError(f"--out {out}: the output file name must end with .onnx")
    if out.is_dir():
        raise ExportError(f"--out {out} is a directory; give the .onnx file to write")


def _sidecar(out: Path) -> Path:
    return out.with_suffix(".export.json")


def _load_check_images(check_images: Any, split: str, count: int) -> tuple[list[Image.Image], str]:
    """``(images, description)``: a prepared dataset's first ``count`` images of ``split``, image files, PIL
    images, or (``None``) one seeded random-noise image."""
    if check_images is None:
        rng = np.random.default_rng(0)
        return [Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))], "one random 640x480 image"
    if isinstance(check_images, (str, Path)) and Path(check_images).is_dir():
        from rtcodetr.data.dataset import CocoDetection

        dataset = CocoDetection(check_images, split)
        n = min(count, len(dataset))
        if n == 0:
            raise ExportError(f"{check_images}: split '{split}' has no images to check the export on")
        return [dataset.load(i)[0] for i in range(n)], f"{n} images of split '{split}' of {check_images}"
    items = [check_images] if isinstance(check_images, (str, Path, Image.Image)) else list(check_images)
    images = []
    for item in items:
        if isinstance(item, Image.Image):
            images.append(item.convert("RGB"))
            continue
        try:
            with Image.open(item) as im:
                images.append(im.convert("RGB"))
        except (OSError, ValueError) as e:
            raise ExportError(f"check image {item}: cannot be read ({e})") from None
    if not images:
        raise ExportError("no check images given")
    return images, f"{len(images)} image file(s)"


def _input_shape(geometry: Mapping[str, Any], dynamic_batch: bool) -> list[int | str]:
    batch: int | str = "batch" if dynamic_batch else 1
    if geometry["mode"] == "fixed":
        h, w = geometry["size_hw"]
        return [batch, 3, int(h), int(w)]
    return [batch, 3, "height", "width"]


def _dynamic_axes(shape: Sequence[int | str]) -> dict[str, dict[int, str]]:
    axes = {i: name for i, name in enumerate(shape) if isinstance(name, str)}
    if not axes:
        return {}
    dyn = {INPUT_NAME: axes}
    if 0 in axes:
        dyn.update({name: {0: "batch"} for name in OUTPUT_NAMES})
    return dyn


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) if a.size else 0.0


def _to_float16(model):
    """fp32 graph -> fp16 weights and activations, fp32 inputs/outputs (casts at the edges), so the processor and
    post-processor stay exactly as for fp32. ONNX Runtime's own converter; its casts are appended at the end of the
    node list, so the graph is re-sorted before the checker sees it."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    converted = OnnxModel(convert_float_to_float16(model, keep_io_types=True))
    converted.topological_sort()
    return converted.model


def _versions() -> dict[str, str | None]:
    import importlib.metadata as md

    out = {}
    for pkg in ("rtcodetr", "torch", "transformers", "onnx", "onnxruntime", "ultralytics"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


@contextlib.contextmanager
def _quiet_tracer():
    """Silence the tracer's warnings about shape-dependent Python branches (constant for a given input geometry;
    the parity check guards the result) and the notice that the TorchScript exporter is the legacy one."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*will be removed.*", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*aten::index.*", category=UserWarning)
        yield


# ---------------------------------------------------------------------------------------------------------------------
def export_onnx(model_dir: str | Path, out: str | Path, *, opset: int = 17,
                image_size: tuple[int, int] | None = None, dynamic_batch: bool = False, half: bool = False,
                check_images: Any = None, split: str = "val", num_check_images: int = 4,
                tolerance: float | None = None, verbose: bool = True) -> dict[str, Any]:
    """Export ``model_dir`` (a transformers save_pretrained detector, or an ultralytics ``.pt``) to ``out`` (``.onnx``).

    Args:
        opset: ONNX opset (RT-DETR needs >= 16; at most 20, the TorchScript exporter's limit).
        image_size: ``(H, W)`` fixed network input; written into the processor config beside the graph.
            Default: the processor's own size (RT-DETR) or dynamic height/width (shortest-edge processors).
        dynamic_batch: a dynamic batch dimension (default batch 1).
        half: fp16 weights and activations (inputs/outputs stay fp32); for GPU runtimes.
        check_images: a prepared dataset directory (its first ``num_check_images`` images of ``split``), image
            files / PIL images, or ``None`` for one seeded random image.
        tolerance: largest accepted max abs difference of logits and of boxes (default 1e-3 fp32; fp16: not
            enforced unless given).

    Returns the manifest dict (also written to ``<out stem>.export.json``): paths, geometry, opset, ``parity``
    (``{"logits_max_abs_diff", "boxes_max_abs_diff", "ok", ...}``) and more. Raises :class:`ExportError` for an
    unsupported model/opset/output, ``ModelLoadError``/``FileNotFoundError`` for a missing model, and
    :class:`ParityError` (after writing the files, marked failed) when the graph disagrees with PyTorch.
    """
    model_path, out = Path(model_dir), Path(out)
    _check_out(out)
    if image_size is not None:
        image_size = (int(image_size[0]), int(image_size[1]))
        if min(image_size) < 32:
            raise ExportError(f"--image-size {image_size[0]} {image_size[1]}: both sides must be >= 32")
    if model_path.suffix == ".pt":
        return _export_yolo(model_path, out, opset=opset, image_size=image_size, dynamic_batch=dynamic_batch,
                            half=half, check_images=check_images, split=split, num_check_images=num_check_images,
                            tolerance=tolerance, verbose=verbose)

    family = _model_family(model_path)
    _check_opset(opset, family)
    images, images_desc = _load_check_images(check_images, split, num_check_images)

    from rtcodetr.evaluate.complexity import count_flops
    from rtcodetr.models import load_model, processor_geometry

    model, processor = load_model(model_path)
    model.float().eval()
    if image_size is not None:
        processor.size = {"height": image_size[0], "width": image_size[1]}
    geometry = processor_geometry(processor)
    _check_folder(out.parent, geometry)
    shape = _input_shape(geometry, dynamic_batch)
    dtype = "float16" if half else "float32"
    tol = tolerance if tolerance is not None else DEFAULT_TOLERANCE[dtype]

    # FLOPs at the size the evaluator times this graph at (its fixed size, else the default square)
    flops_hw = tuple(geometry["size_hw"]) if geometry["mode"] == "fixed" else (DEFAULT_IMGSZ, DEFAULT_IMGSZ)
    with torch.inference_mode():
        complexity = count_flops(lambda: model(pixel_values=torch.zeros(1, 3, *flops_hw)), model, flops_hw).to_dict()
    id2label = {int(k): str(v) for k, v in model.config.id2label.items()}
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "family": family,
        "architecture": type(model).__name__,
        "id2label": {str(k): id2label[k] for k in sorted(id2label)},
        "num_queries": int(getattr(model.config, "num_queries", 0)) or None,
        "input": {"name": INPUT_NAME, "shape": shape, "dtype": "float32",
                  "meaning": "the image processor's pixel_values (resized, rescaled, normalised if the processor is)"},
        "outputs": {
            "logits": {"shape": [shape[0], "queries", len(id2label)], "dtype": "float32",
                       "meaning": "raw class logits (pre-sigmoid)"},
            "pred_boxes": {"shape": [shape[0], "queries", 4], "dtype": "float32",
                           "meaning": "boxes, normalised cxcywh of the network input"},
        },
        "geometry": json.loads(json.dumps(geometry)),
        "graph_dtype": dtype,
        "opset": opset,
        "exporter": "torch.onnx.export(dynamo=False) (TorchScript tracer)",
        "source": {"path": str(model_path.resolve()), "params": complexity["params"]},
        "complexity": complexity,
    }

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
    try:
        traced = tmp_dir / "traced.onnx"
        example = torch.zeros(1, 3, *flops_hw)
        if verbose:
            print(f"export: tracing {model_path} ({family}, input {shape}, opset {opset}, {dtype})", flush=True)
        # .eval() on the wrapper too: the exporter restores the wrapper's own mode afterwards, and a fresh module
        # is in training mode, which would leave the wrapped model in training mode for the parity check.
        with _quiet_tracer(), torch.no_grad():
            torch.onnx.export(_RawOutputs(model).eval(), (example,), str(traced), input_names=[INPUT_NAME],
                              output_names=list(OUTPUT_NAMES), opset_version=opset, dynamo=False,
                              dynamic_axes=_dynamic_axes(shape) or None, do_constant_folding=True)
        graph_file = tmp_dir / out.name
        _finish_graph(traced, graph_file, manifest, half)
        parity = _parity_transformers(model, processor, graph_file, images, dynamic_batch, geometry, tol)
        parity["images"] = images_desc
        os.replace(graph_file, out)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    processor.save_pretrained(out.parent)
    return _finish(out, manifest, parity, {"opset": opset, "image_size": image_size, "dynamic_batch": dynamic_batch,
                                           "half": half, "tolerance": tol}, verbose)


def _check_folder(folder: Path, geometry: Mapping[str, Any]) -> None:
    """Refuse to overwrite a processor config of another geometry (an earlier export or a model directory)."""
    from rtcodetr.models import processor_geometry

    existing = folder / "preprocessor_config.json"
    if not existing.is_file():
        return
    from transformers import AutoImageProcessor

    try:
        old = processor_geometry(AutoImageProcessor.from_pretrained(str(folder)))
    except (OSError, ValueError) as e:
        raise ExportError(f"{existing} exists and cannot be read ({e}); export into another folder") from None
    if old != dict(geometry):
        raise ExportError(f"{existing} already describes another input geometry ({old}); the new graph needs "
                          f"{dict(geometry)}: export into its own folder")


def _finish_graph(traced: Path, dest: Path, manifest: Mapping[str, Any], half: bool) -> None:
    """Optional fp16 conversion, manifest into the metadata, full ONNX check (incl. strict shape inference), save."""
    import onnx

    graph = onnx.load(str(traced))
    if half:
        graph = _to_float16(graph)
    entry = graph.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(manifest)
    try:
        onnx.checker.check_model(graph, full_check=True)
    except Exception as e:  # ValidationError / InferenceError: the exporter produced an invalid graph
        raise ExportError(f"the exported graph fails onnx.checker: {str(e).splitlines()[0]}") from None
    onnx.save(graph, str(dest))


def _parity_transformers(model, processor, graph: Path, images: Sequence[Image.Image], dynamic_batch: bool,
                         geometry: Mapping[str, Any], tol: float | None) -> dict[str, Any]:
    """Max abs difference of logits and boxes between PyTorch (stable top-k) and ONNX Runtime (CPU), per image and,
    for a dynamic batch of fixed-size inputs, for all images as one batch."""
    session = onnx_session(graph, "cpu")
    batches = [processor(images=[im], return_tensors="pt")["pixel_values"] for im in images]
    if dynamic_batch and geometry["mode"] == "fixed" and len(images) > 1:
        batches.append(torch.cat(batches))
    d_logits = d_boxes = 0.0
    close = None
    with torch.inference_mode(), StableTopK():
        for x in batches:
            ref = model(pixel_values=x.float())
            logits, boxes = run_onnx(session, x.float())
            d_logits = max(d_logits, _max_abs(ref.logits.numpy(), logits))
            d_boxes = max(d_boxes, _max_abs(ref.pred_boxes.numpy(), boxes))
            c = _topk_close_pairs(ref, getattr(model.config, "num_queries", 0))
            close = c if close is None or c is None else max(close, c)
    ok = None if tol is None else bool(d_logits <= tol and d_boxes <= tol)
    parity = {"logits_max_abs_diff": d_logits, "boxes_max_abs_diff": d_boxes, "tolerance": tol, "ok": ok,
              "runs": len(batches), "input_shapes": [list(x.shape) for x in batches],
              "provider": "CPUExecutionProvider", "topk_close_pairs": close}
    if ok is False and close:
        parity["note"] = (f"{close} neighbouring scores of the encoder's top-{model.config.num_queries} are closer "
                          f"than {TIE_GAP:.0e}, i.e. within float32 rounding (an untrained model, or a featureless "
                          "image such as a blank frame), so the two runtimes can select or order the decoder queries "
                          "differently; check a trained model on real images")
    return parity


TIE_GAP = 1e-5  # encoder scores closer than this can swap places between runtimes (float32 rounding of O(1) values)


def _topk_close_pairs(outputs: Any, k: int) -> int | None:
    """How many neighbouring scores among the top ``k + 1`` encoder scores that pick RT-DETR's decoder queries are
    closer than :data:`TIE_GAP` (most per image; ``None`` for models without that selection). Exact ties are
    counted too: they are only harmless when both runtimes compute them bit for bit."""
    enc = getattr(outputs, "enc_outputs_class", None)
    if enc is None or not k or enc.shape[1] <= k:
        return None
    top = enc.float().max(-1).values.sort(dim=1, descending=True).values[:, :k + 1]
    return int(((top[:, :-1] - top[:, 1:]) < TIE_GAP).sum(dim=1).max())


def _finish(out: Path, manifest: dict[str, Any], parity: dict[str, Any], settings: dict[str, Any],
            verbose: bool) -> dict[str, Any]:
    """Write the sidecar manifest, print the parity line, raise :class:`ParityError` when it failed."""
    from rtcodetr.evaluate.report import _clean

    record = {**manifest, "onnx": str(out), "settings": settings, "parity": parity,
              "processor_config": str(out.parent / "preprocessor_config.json") if manifest["family"] != "yolo" else None,
              "versions": _versions(),
              "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    record = _clean(record)
    _sidecar(out).write_text(json.dumps(record, indent=2) + "\n")
    a, b = parity.get("logits_max_abs_diff"), parity.get("boxes_max_abs_diff")
    names = ("logits", "boxes") if manifest["family"] != "yolo" else ("scores", "boxes/imgsz")
    tol = parity["tolerance"]
    verdict = ("reported, not enforced (fp16; pass --tolerance to enforce)" if parity["ok"] is None
               else f"tolerance {tol:.0e} -> {'ok' if parity['ok'] else 'FAILED'}")
    line = (f"export: {out} ({out.stat().st_size / 1e6:.1f} MB): ONNX Runtime vs PyTorch on {parity['images']}: "
            f"max |d {names[0]}| = {a:.2e}, max |d {names[1]}| = {b:.2e} ({verdict})"
            + (f" ({parity['note']})" if parity.get("note") else ""))
    if verbose:
        print(line, flush=True)
    if parity["ok"] is False:
        raise ParityError(f"{line}; the graph was written but disagrees with PyTorch (see {_sidecar(out)})")
    return record


# ---------------------------------------------------------------------------------------------------------------------
def _export_yolo(pt: Path, out: Path, *, opset: int, image_size: tuple[int, int] | None, dynamic_batch: bool,
                 half: bool, check_images: Any, split: str, num_check_images: int, tolerance: float | None,
                 verbose: bool) -> dict[str, Any]:
    """Ultralytics' own ONNX export of a YOLO ``.pt``, moved into ``out`` with the same sidecar and parity check."""
    if not pt.is_file():
        raise FileNotFoundError(f"YOLO checkpoint {pt} not found")
    if not 7 <= opset <= MAX_OPSET:
        raise ExportError(f"opset {opset} is not supported: use 7..{MAX_OPSET}")
    if half and not torch.cuda.is_available():
        raise ExportError("--half for a YOLO model: ultralytics exports fp16 graphs only on a CUDA device")
    ultralytics_offline_env()
    from ultralytics import YOLO

    images, images_desc = _load_check_images(check_images, split, num_check_images)
    yolo = YOLO(str(pt), task="detect")
    train_args = getattr(yolo.model, "args", None) or {}
    trained = train_args.get("imgsz") if isinstance(train_args, Mapping) else None
    if image_size is None:
        side = int(trained) if isinstance(trained, int) else DEFAULT_IMGSZ
        image_size = (side, side)
    tol = tolerance if tolerance is not None else DEFAULT_TOLERANCE["float16" if half else "float32"]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
    try:
        # ultralytics writes the graph beside the checkpoint: export a copy, never into the run folder
        local = tmp_dir / "model.pt"
        shutil.copy2(pt, local)
        if verbose:
            print(f"export: ultralytics ONNX export of {pt} (imgsz {list(image_size)}, opset {opset})", flush=True)
        with keep_torch_threads():
            exported = YOLO(str(local), task="detect").export(
                format="onnx", imgsz=list(image_size), opset=opset, dynamic=dynamic_batch, half=half,
                simplify=False, device="0" if half else "cpu", batch=1, verbose=False)
        # the reference: the fused network as ultralytics runs it, on the same plainly resized [0, 1] input
        net = yolo.model.fuse(verbose=False).float().eval() if hasattr(yolo.model, "fuse") else yolo.model.eval()
        session = onnx_session(exported, "cpu")
        d_scores = d_boxes = 0.0
        with torch.inference_mode(), keep_torch_threads():
            for im in images:
                x = np.asarray(im.convert("RGB").resize((image_size[1], image_size[0])), dtype=np.float32) / 255.0
                x = torch.from_numpy(x).permute(2, 0, 1)[None].contiguous()
                ref = net(x)
                ref = (ref[0] if isinstance(ref, (list, tuple)) else ref).numpy()
                got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
                d_boxes = max(d_boxes, _max_abs(ref[:, :4], got[:, :4]) / max(image_size))
                d_scores = max(d_scores, _max_abs(ref[:, 4:], got[:, 4:]))
        parity = {"logits_max_abs_diff": d_scores, "boxes_max_abs_diff": d_boxes, "tolerance": tol,
                  "ok": None if tol is None else bool(d_scores <= tol and d_boxes <= tol), "images": images_desc,
                  "compared": "raw Detect output [B, 4 + K, anchors]: class scores, and xywh boxes / imgsz",
                  "provider": "CPUExecutionProvider"}
        os.replace(exported, out)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    names = yolo.names
    manifest = {
        "format_version": FORMAT_VERSION, "family": "yolo", "architecture": type(yolo.model).__name__,
        "id2label": {str(i): str(names[i]) for i in range(len(names))},
        "geometry": {"mode": "letterbox", "imgsz": list(image_size)},
        "graph_dtype": "float16" if half else "float32", "opset": opset,
        "exporter": "ultralytics YOLO.export(format='onnx', simplify=False)",
        "source": {"path": str(pt.resolve())},
    }
    return _finish(out, manifest, parity, {"opset": opset, "image_size": list(image_size),
                                           "dynamic_batch": dynamic_batch, "half": half, "tolerance": tol}, verbose)


# ---------------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rtcodetr export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="save_pretrained detector directory (RT-DETR, Conditional DETR) "
                                                  "or an ultralytics YOLO .pt")
    p.add_argument("--out", required=True, help="the .onnx file to write (processor config and manifest beside it)")
    p.add_argument("--opset", type=int, default=17, help=f"ONNX opset (default 17; RT-DETR needs >= 16; <= {MAX_OPSET})")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                   help="fixed network input size (default: the processor's own; written into its config)")
    p.add_argument("--dynamic-batch", action="store_true", help="dynamic batch dimension (default batch 1)")
    p.add_argument("--half", action="store_true", help="fp16 weights/activations, fp32 inputs and outputs")
    p.add_argument("--data", help="prepared dataset directory: check parity on its images (default: a random image)")
    p.add_argument("--split", default="val", help="split of --data to take check images from (default val)")
    p.add_argument("--check-images", type=int, default=4, help="how many images of --data to check (default 4)")
    p.add_argument("--images", nargs="+", help="image files to check parity on (instead of --data)")
    p.add_argument("--tolerance", type=float,
                   help="max accepted abs difference of logits and of boxes (default 1e-3; fp16: not enforced)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from rtcodetr.config import ConfigError
    from rtcodetr.data.prepared import PreparedDataError

    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.data and args.images:
        print("rtcodetr export: error: give --data or --images, not both", file=sys.stderr)
        return 2
    try:
        export_onnx(args.model, args.out, opset=args.opset, image_size=args.image_size,
                    dynamic_batch=args.dynamic_batch, half=args.half, check_images=args.data or args.images,
                    split=args.split, num_check_images=args.check_images, tolerance=args.tolerance)
    except ParityError as e:
        print(f"rtcodetr export: error: {e}", file=sys.stderr)
        return 1
    except (ExportError, ConfigError, PreparedDataError, ValueError, OSError) as e:  # OSError: ModelLoadError, missing
        print(f"rtcodetr export: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:  # onnx / onnxruntime (the [deploy] extra) or ultralytics (the [yolo] extra) missing
        print(f"rtcodetr export: error: {e}; install the extras: pip install -e '.[deploy,yolo]'", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
