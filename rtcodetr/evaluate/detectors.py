"""One prediction interface for every model kind the evaluator compares.

``Detector.predict(images)`` takes upright RGB PIL images and returns, per image, ``{"boxes": float32 [N, 4] xyxy
in that image's pixels, "scores": float32 [N], "labels": int64 [N] in 0..K-1}`` (CPU tensors). Kinds:

* ``transformers``: any ``save_pretrained`` object-detection directory. Geometry and normalisation come from the
  model's own image processor, boxes from its own ``post_process_object_detection`` with ``target_sizes`` = the
  input images' sizes and ``threshold=0`` (every query the post-processor keeps: RT-DETR's top ``num_queries``,
  Conditional DETR's top 100), as COCO AP needs the full ranked list.
* ``ultralytics``: a YOLO ``.pt`` checkpoint or a model ``.yaml`` (random init, built with the dataset's number of
  labels). Ultralytics' own letterbox + NMS with the settings in :data:`YOLO_SETTINGS`.
* ``onnx``: a graph written by ``rtcodetr export`` (RT-DETR / Conditional DETR), run by ONNX Runtime (CPU provider;
  CUDA / TensorRT providers on ``device="cuda"`` when the installed onnxruntime has them). Pre- and post-processing
  are the ``transformers`` kind's own code (the processor config beside the graph, ``post_process_object_detection``),
  only the network call differs, so mAP and latency of a graph and its PyTorch source come from one code path.
  A YOLO ``.onnx`` exported by ultralytics is the ``ultralytics`` kind (ultralytics runs it with ONNX Runtime).
* ``predictions``: a COCO detection-results file written by any other tool; accuracy only (no model to time).

Each detector states its ``runtime``: ``"pytorch"``, ``"onnxruntime"`` or ``"tensorrt"`` (ONNX Runtime's TensorRT
provider), reported beside its latency.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from rtcodetr.data.boxes import coco_xywh_to_xyxy
from rtcodetr.errors import InputError
from rtcodetr.evaluate.complexity import count_flops

# Ultralytics NMS for COCO evaluation (ultralytics' own `val` defaults: conf 0.001, IoU 0.7, 300 detections).
YOLO_SETTINGS: dict[str, Any] = {"conf": 0.001, "iou": 0.7, "max_det": 300}
DEFAULT_IMGSZ = 640
# ONNX Runtime execution providers by the names ``provider=`` / ``onnx_provider=`` take.
ORT_PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
ONNX_INPUT = "pixel_values"
ONNX_OUTPUTS = ("logits", "pred_boxes")


def ultralytics_offline_env() -> None:
    """Settings that keep ultralytics from reaching the network or writing into the user's home.

    ``YOLO_OFFLINE`` stops hub/version checks, ``YOLO_AUTOINSTALL=False`` stops pip installs of missing extras, and a
    private ``YOLO_CONFIG_DIR`` keeps its settings file out of ``~/.config``. Must run before ``import ultralytics``.
    """
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "False")
    if "YOLO_CONFIG_DIR" not in os.environ:
        os.environ["YOLO_CONFIG_DIR"] = tempfile.mkdtemp(prefix="rtcodetr-yolo-cfg-")


@contextlib.contextmanager
def keep_torch_threads():
    """Undo ultralytics' ``select_device``, which calls ``torch.set_num_threads(min(8, cpu_count - 1))`` on CPU: left
    alone it would change the thread count of every model timed after a YOLO model in the same process."""
    n = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


def open_yolo(spec: str):
    """``ultralytics.YOLO(spec, task="detect")`` for a ``.pt`` checkpoint or ``.yaml`` definition; a file that is not
    an ultralytics detection model (another framework's ``.pt``, a truncated download) raises ``ModelLoadError``
    naming the file instead of ultralytics' internal error."""
    from ultralytics import YOLO

    from rtcodetr.models import ModelLoadError

    try:
        yolo = YOLO(spec, task="detect")
    except Exception as e:  # noqa: BLE001 -- ultralytics raises TypeError/KeyError/ValueError/... by file kind
        detail = " ".join(str(e).replace("ERROR ❌️", "").split()) or type(e).__name__
        raise ModelLoadError(f"{spec}: not an ultralytics YOLO checkpoint or model definition ({detail[:300]})") from e
    if getattr(yolo, "task", "detect") != "detect":
        raise ModelLoadError(f"{spec}: an ultralytics '{yolo.task}' model, not a detector")
    return yolo


METADATA_KEY = "rtcodetr"  # ONNX metadata_props key holding rtcodetr's export manifest (JSON)


class OnnxFileError(ValueError, InputError):
    """A file given as an ONNX graph cannot be read as one."""


def read_export_metadata(path: str | Path) -> dict[str, Any] | None:
    """The manifest stored in an ONNX file by :func:`export_onnx` (``None`` for a graph exported by anything else).

    Also recognises ultralytics exports: returns ``{"family": "yolo", "ultralytics": {...their metadata...}}``.
    """
    import onnx

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"ONNX file {p} not found")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends: not an ONNX file
        raise OnnxFileError(f"{p}: not a readable ONNX file ({type(e).__name__}: {e})") from None
    props = {m.key: m.value for m in model.metadata_props}
    if METADATA_KEY in props:
        return json.loads(props[METADATA_KEY])
    if props.get("author", "").startswith("Ultralytics"):
        return {"family": "yolo", "ultralytics": props}
    return None


def _check_device(device: str, half: bool) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{device}' requested but CUDA is not available on this machine")
    if half and dev.type != "cuda":
        raise ValueError("--half (fp16) is only supported on a CUDA device")
    return dev


def _check_names(source: str, names: Sequence[str], label_map: Any) -> None:
    if label_map is not None:  # without a dataset to check against, trust the model's own class order
        label_map.check(names, source, fix="the model's labels must be the dataset's, in label order")


class Detector:
    """Base class: a named model that predicts boxes in original-image pixels."""

    kind: str = "?"
    runtime: str | None = "pytorch"   # what executes the network: "pytorch" | "onnxruntime" | "tensorrt"

    def __init__(self, name: str, path: str | Path, device: str = "cpu", half: bool = False) -> None:
        self.name = name
        self.path = Path(path)
        self.device = _check_device(device, half)
        self.half = half

    @property
    def can_time(self) -> bool:
        return True

    def predict(self, images: Sequence[Image.Image]) -> list[dict[str, torch.Tensor]]:
        raise NotImplementedError

    def module(self) -> torch.nn.Module:
        """The network whose parameters and FLOPs are reported."""
        raise NotImplementedError

    def forward_input(self, image: Image.Image, size_hw: tuple[int, int]) -> Any:
        """A ready batch-1 network input for ``image`` resized to ``size_hw``, on the device (forward-only timing)."""
        raise NotImplementedError

    def forward(self, inputs: Any) -> Any:
        raise NotImplementedError

    def complexity(self, inputs: Any, size_hw: tuple[int, int]) -> dict[str, Any]:
        """Parameters and FLOPs of one batch-1 forward on ``inputs`` (``forward_input`` at ``size_hw``)."""
        return count_flops(lambda: self.forward(inputs), self.module(), size_hw).to_dict()

    def predict_at(self, images: Sequence[Image.Image], size_hw: tuple[int, int]) -> list[dict[str, torch.Tensor]]:
        """End-to-end prediction with the network input forced to ``size_hw`` (latency at a stated size)."""
        raise NotImplementedError

    def latency_size(self, imgsz: int | None) -> tuple[int, int]:
        """The fixed input size latency and FLOPs are measured at."""
        raise NotImplementedError

    def protocol(self) -> dict[str, Any]:
        """How predictions are made (geometry, post-processing), for the report."""
        return {"kind": self.kind}


# ---------------------------------------------------------------------------------------------------------------------
class TransformersDetector(Detector):
    """A ``save_pretrained`` transformers object-detection model with its own image processor."""

    kind = "transformers"

    def __init__(self, name: str, path: str | Path, label_map: Any, device: str = "cpu", half: bool = False,
                 imgsz: int | None = None) -> None:
        super().__init__(name, path, device, half)
        from rtcodetr.models import load_model, model_family

        self.model, processor = load_model(path)
        id2label = self.model.config.id2label
        self._set_processing(processor, [id2label[i] for i in range(len(id2label))], model_family(self.model),
                             type(self.model).__name__, label_map, imgsz)
        self.model.to(self.device)
        if half:
            self.model.half()
        self.model.eval()

    @classmethod
    def from_model(cls, model: torch.nn.Module, processor: Any, *, name: str = "model", label_map: Any = None,
                   device: str | torch.device = "cpu") -> "TransformersDetector":
        """A detector around a model already in memory (the trainer's validation: the weights that will become
        ``best/``), with exactly the pre- and post-processing ``rtcodetr evaluate`` applies to the saved copy, so a
        checkpoint is picked under the protocol it is reported with. The model's train/eval mode is the caller's."""
        from rtcodetr.models import model_family

        self = cls.__new__(cls)
        Detector.__init__(self, name, Path(name), str(device), False)
        self.model = model
        id2label = model.config.id2label
        self._set_processing(processor, [id2label[i] for i in range(len(id2label))], model_family(model),
                             type(model).__name__, label_map, None)
        return self

    def _set_processing(self, processor: Any, names: Sequence[str], family: str, architecture: str, label_map: Any,
                        imgsz: int | None) -> None:
        """Pre-/post-processing state shared by the PyTorch model and its exported graph (:class:`OnnxDetector`)."""
        from rtcodetr.models import processor_geometry

        _check_names(str(self.path), names, label_map)
        self.processor = processor
        self.family = family
        self.architecture = architecture
        self.geometry = processor_geometry(processor)
        # --imgsz overrides a fixed-size processor (RT-DETR); shortest-edge processors keep their own geometry
        # for accuracy (their input size depends on the image) and use imgsz only for latency / FLOPs.
        self.size_override: dict[str, int] | None = None
        if imgsz is not None and self.geometry["mode"] == "fixed":
            self.size_override = {"height": int(imgsz), "width": int(imgsz)}
        self.imgsz = imgsz

    def _inputs(self, images: Sequence[Image.Image], size: Mapping[str, int] | None) -> dict[str, torch.Tensor]:
        kwargs = {"size": dict(size)} if size else {}
        batch = self.processor(images=list(images), return_tensors="pt", **kwargs)
        out = {}
        for k, v in batch.items():
            if not isinstance(v, torch.Tensor):
                continue
            v = v.to(self.device, non_blocking=True)
            if self.half and v.is_floating_point():
                v = v.half()
            out[k] = v
        return out

    def _post(self, outputs: Any, images: Sequence[Image.Image]) -> list[dict[str, torch.Tensor]]:
        if self.half:  # post-process in fp32: sigmoid/top-k on fp16 logits loses ranking resolution
            outputs.logits = outputs.logits.float()
            outputs.pred_boxes = outputs.pred_boxes.float()
        sizes = torch.tensor([[im.height, im.width] for im in images], dtype=torch.float32, device=outputs.logits.device)
        results = self.processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=sizes)
        return [
            {
                "boxes": r["boxes"].float().cpu(),
                "scores": r["scores"].float().cpu(),
                "labels": r["labels"].long().cpu(),
            }
            for r in results
        ]

    @torch.inference_mode()
    def predict(self, images: Sequence[Image.Image]) -> list[dict[str, torch.Tensor]]:
        if self.geometry["mode"] != "fixed" and self.size_override is None and len(images) > 1:
            # Aspect-preserving processors pad a batch to its largest image; the DETR post-processor then scales the
            # normalised boxes by each image's own size, which is only right for an unpadded input. One image per
            # forward keeps every input unpadded.
            return [r for im in images for r in self.predict([im])]
        outputs = self.forward(self._inputs(images, self.size_override))
        return self._post(outputs, images)

    @torch.inference_mode()
    def predict_at(self, images: Sequence[Image.Image], size_hw: tuple[int, int]) -> list[dict[str, torch.Tensor]]:
        outputs = self.forward(self._inputs(images, {"height": size_hw[0], "width": size_hw[1]}))
        return self._post(outputs, images)

    def module(self) -> torch.nn.Module:
        return self.model

    def forward_input(self, image: Image.Image, size_hw: tuple[int, int]) -> dict[str, torch.Tensor]:
        return self._inputs([image], {"height": size_hw[0], "width": size_hw[1]})

    def forward(self, inputs: dict[str, torch.Tensor]) -> Any:
        return self.model(**inputs)

    def latency_size(self, imgsz: int | None) -> tuple[int, int]:
        if self.size_override:
            return (self.size_override["height"], self.size_override["width"])
        if self.geometry["mode"] == "fixed":
            return tuple(self.geometry["size_hw"])
        return (imgsz or DEFAULT_IMGSZ, imgsz or DEFAULT_IMGSZ)

    def protocol(self) -> dict[str, Any]:
        geom = dict(self.geometry)
        if self.size_override:
            geom = {**geom, "size_hw": (self.size_override["height"], self.size_override["width"]),
                    "overridden_by_imgsz": True}
        return {
            "kind": self.kind,
            "family": self.family,
            "architecture": self.architecture,
            "input_geometry": geom,
            "post_processing": f"{type(self.processor).__name__}.post_process_object_detection, threshold 0, "
                               "the post-processor's own top-k, target_sizes = original image sizes",
        }


# ---------------------------------------------------------------------------------------------------------------------
def onnx_providers(device: str = "cpu", provider: str = "auto", half: bool = False) -> list[Any]:
    """ONNX Runtime providers for ``device``: ``["CPUExecutionProvider"]`` on CPU; on CUDA, ``provider="auto"``
    takes TensorRT when this onnxruntime build has it, then CUDA (``"tensorrt"`` / ``"cuda"`` insist on one), with
    the CPU provider last for the few nodes a GPU provider does not implement. ``half`` turns on TensorRT's fp16
    kernels (engines cached in the temp dir: the first run of a graph builds one, which takes a while)."""
    import onnxruntime as ort

    if provider not in ("auto", *ORT_PROVIDERS):
        raise ValueError(f"ONNX Runtime provider '{provider}' is not one of auto, {', '.join(ORT_PROVIDERS)}")
    dev = torch.device(device)
    if dev.type == "cpu" or provider == "cpu":
        if provider not in ("auto", "cpu"):
            raise ValueError(f"ONNX Runtime provider '{provider}' needs a CUDA device, got device '{device}'")
        return [ORT_PROVIDERS["cpu"]]
    if dev.type != "cuda":
        raise ValueError(f"ONNX Runtime graphs run on cpu or cuda here, not on '{device}'")
    available = set(ort.get_available_providers())
    index = dev.index or 0
    trt = (ORT_PROVIDERS["tensorrt"], {
        "device_id": index, "trt_fp16_enable": bool(half), "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(Path(tempfile.gettempdir()) / "rtcodetr-trt-engines"),
    })
    cuda = (ORT_PROVIDERS["cuda"], {"device_id": index})
    wanted = {"auto": [trt, cuda], "tensorrt": [trt, cuda], "cuda": [cuda]}[provider]
    if provider != "auto" and ORT_PROVIDERS[provider] not in available:
        raise ValueError(f"onnxruntime {ort.__version__} here has no {ORT_PROVIDERS[provider]} (available: "
                         f"{sorted(available)}); install onnxruntime-gpu in place of onnxruntime")
    chain = [p for p in wanted if p[0] in available]
    if not chain:
        raise ValueError(f"device '{device}' asked for, but onnxruntime {ort.__version__} here has no CUDA provider "
                         f"(available: {sorted(available)}); install onnxruntime-gpu in place of onnxruntime")
    return [*chain, ORT_PROVIDERS["cpu"]]


def onnx_session(path: str | Path, device: str = "cpu", provider: str = "auto", half: bool = False):
    """An ``onnxruntime.InferenceSession`` for ``path`` with :func:`onnx_providers`, as many intra-op threads as torch
    uses (so a CPU comparison with the PyTorch model runs on the same number of threads), full graph optimisation
    and warnings off. An explicitly requested GPU provider that fails to start is an error, not a silent fallback."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    providers = onnx_providers(device, provider, half)
    session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    if provider in ("tensorrt", "cuda") and ORT_PROVIDERS[provider] not in session.get_providers():
        raise ValueError(f"{path}: {ORT_PROVIDERS[provider]} did not start (active: {session.get_providers()}); "
                         "check the CUDA / TensorRT libraries onnxruntime-gpu needs")
    return session


def run_onnx(session: Any, pixel_values: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(logits [B, Q, K], pred_boxes [B, Q, 4])`` as float32 numpy arrays from an exported detector graph."""
    x = pixel_values.detach().float().cpu().contiguous().numpy()
    logits, boxes = session.run(list(ONNX_OUTPUTS), {ONNX_INPUT: x})
    return logits, boxes


class OnnxOutputs:
    """``logits`` / ``pred_boxes`` of ONNX Runtime runs as CPU float32 tensors, copied off the device on first access.

    Forward-only timing never reads them, so the graph's outputs stay wherever the runtime wrote them, as a PyTorch
    forward leaves its outputs on the GPU; post-processing reads them (on CPU).
    """

    def __init__(self, bindings: Sequence[Any]) -> None:
        self._bindings = list(bindings)
        self._tensors: list[torch.Tensor] | None = None

    def _load(self) -> list[torch.Tensor]:
        if self._tensors is None:
            parts = [b.copy_outputs_to_cpu() for b in self._bindings]  # one [logits, boxes] per run
            self._tensors = [torch.cat([torch.from_numpy(np.asarray(p[i], dtype=np.float32)) for p in parts])
                             for i in range(len(ONNX_OUTPUTS))]
        return self._tensors

    @property
    def logits(self) -> torch.Tensor:
        return self._load()[0]

    @property
    def pred_boxes(self) -> torch.Tensor:
        return self._load()[1]


class OnnxDetector(TransformersDetector):
    """A graph written by ``rtcodetr export``, run by ONNX Runtime with the ``transformers`` kind's pre/post-processing.

    The image processor is the ``preprocessor_config.json`` beside the graph (checked against the geometry the graph
    was exported with); the label names, family and input shape come from the graph's metadata. Inputs are bound
    to the device in place (``io_binding``), so a forward on CUDA does not time a host copy.
    """

    kind = "onnx"

    def __init__(self, name: str, path: str | Path, label_map: Any, device: str = "cpu", half: bool = False,
                 imgsz: int | None = None, provider: str = "auto") -> None:
        Detector.__init__(self, name, path, device, half)
        from transformers import AutoImageProcessor

        from rtcodetr.models import processor_geometry

        meta = read_export_metadata(path)
        if meta is None or meta.get("family") == "yolo":
            raise ValueError(f"{path}: not a graph written by `rtcodetr export` (no 'rtcodetr' metadata)")
        folder = self.path.parent
        if not (folder / "preprocessor_config.json").is_file():
            raise ValueError(f"{path}: no preprocessor_config.json beside the graph (written by `rtcodetr export`); "
                             "the input geometry and normalisation are unknown without it")
        processor = AutoImageProcessor.from_pretrained(str(folder))
        geometry = json.loads(json.dumps(processor_geometry(processor)))
        if geometry != meta["geometry"]:
            raise ValueError(f"{folder / 'preprocessor_config.json'} describes {geometry}, but {path} was exported "
                             f"for {meta['geometry']}")
        self.meta = meta
        shape = meta["input"]["shape"]
        self.static_batch = shape[0] if isinstance(shape[0], int) else None
        self.static_hw = (shape[2], shape[3]) if all(isinstance(v, int) for v in shape[2:]) else None
        if imgsz is not None and self.static_hw is not None and self.static_hw != (imgsz, imgsz):
            raise ValueError(f"{path}: the graph's input is fixed at {self.static_hw[0]}x{self.static_hw[1]}; "
                             f"--imgsz {imgsz} needs a graph exported with --image-size {imgsz} {imgsz}")
        names = [meta["id2label"][str(i)] for i in range(len(meta["id2label"]))]
        self._set_processing(processor, names, meta["family"], meta.get("architecture", "?"), label_map, imgsz)
        self.session = onnx_session(path, str(self.device), provider, half)
        self.providers = list(self.session.get_providers())
        if self.providers == [ORT_PROVIDERS["cpu"]]:  # onnx_provider=cpu on a CUDA host: inputs stay on the host
            self.device = torch.device("cpu")
        self.runtime = "tensorrt" if self.providers[0] == ORT_PROVIDERS["tensorrt"] else "onnxruntime"
        self.trt_fp16 = bool(half and self.runtime == "tensorrt")
        # The graph's inputs/outputs are fp32 (an fp16 graph casts inside), so the processor and post-processor run
        # exactly as for fp32; --half only selects TensorRT's fp16 kernels.
        self.half = False

    def _run(self, x: torch.Tensor) -> Any:
        x = x.float().contiguous()
        dev = x.device
        if dev.type == "cuda":  # ONNX Runtime reads the buffer on its own stream: torch's copy must have landed
            torch.cuda.current_stream(dev).synchronize()
        binding = self.session.io_binding()
        binding.bind_input(ONNX_INPUT, dev.type, dev.index or 0, np.float32, tuple(x.shape), x.data_ptr())
        for name in ONNX_OUTPUTS:
            binding.bind_output(name, dev.type, dev.index or 0)
        self.session.run_with_iobinding(binding)
        return binding

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> OnnxOutputs:
        x = inputs["pixel_values"]
        if self.static_batch is not None and x.shape[0] != self.static_batch:
            return OnnxOutputs([self._run(x[i:i + 1]) for i in range(x.shape[0])])  # a batch-1 graph, image by image
        return OnnxOutputs([self._run(x)])

    def module(self) -> torch.nn.Module:
        raise TypeError(f"{self.path}: an ONNX graph has no PyTorch module")

    def complexity(self, inputs: Any, size_hw: tuple[int, int]) -> dict[str, Any]:
        """The source model's params and FLOPs, counted at export time (the same network); FLOPs only when they
        were counted at ``size_hw``."""
        stored = dict(self.meta.get("complexity") or {})
        if stored and list(stored.get("input_hw", [])) == list(size_hw):
            return {**stored, "source": "counted on the PyTorch model at export time"}
        return {"params": self.meta.get("source", {}).get("params"), "flops": None, "macs": None, "gflops": None,
                "gmacs": None, "input_hw": list(size_hw), "counted_ops": {}, "uncounted_ops": {},
                "source": f"params of the PyTorch model at export; FLOPs were counted at {stored.get('input_hw')}"}

    def latency_size(self, imgsz: int | None) -> tuple[int, int]:
        if self.static_hw is not None:
            return tuple(self.static_hw)
        return super().latency_size(imgsz)

    def protocol(self) -> dict[str, Any]:
        return {
            **super().protocol(),
            "runtime": self.runtime,
            "providers": self.providers,
            "graph": {"opset": self.meta.get("opset"), "dtype": self.meta.get("graph_dtype"),
                      "input_shape": self.meta["input"]["shape"], "source": self.meta.get("source", {}).get("path"),
                      "tensorrt_fp16": self.trt_fp16},
        }


# ---------------------------------------------------------------------------------------------------------------------
class UltralyticsDetector(Detector):
    """An ultralytics YOLO checkpoint (``.pt``) or model definition (``.yaml``, random init with K classes)."""

    kind = "ultralytics"

    def __init__(self, name: str, path: str | Path, label_map: Any, device: str = "cpu", half: bool = False,
                 imgsz: int | None = None, settings: Mapping[str, Any] | None = None) -> None:
        super().__init__(name, path, device, half)
        ultralytics_offline_env()

        self.settings = {**YOLO_SETTINGS, **(settings or {})}
        spec = str(path)
        is_yaml = spec.endswith((".yaml", ".yml"))
        # a graph from `rtcodetr export` / ultralytics' export: ultralytics runs it with ONNX Runtime
        self.onnx = spec.endswith(".onnx")
        self.runtime = "onnxruntime" if self.onnx else "pytorch"
        if not is_yaml and not Path(spec).is_file():
            raise FileNotFoundError(f"YOLO checkpoint {spec} not found (ultralytics would try to download it)")
        # A .pt is a pickle that ultralytics loads with its own torch.load (weights_only=False): only evaluate
        # checkpoints you trained or trust, as with any ultralytics checkpoint.
        self.yolo = open_yolo(spec)
        if is_yaml:
            if label_map is None:
                raise ValueError(f"{spec}: building a YOLO model from a yaml needs the dataset's label map")
            # A model definition: rebuild it with the dataset's classes (the yaml's nc is COCO's 80).
            from ultralytics.nn.tasks import DetectionModel

            cfg = self.yolo.model.yaml
            model = DetectionModel({**cfg, "nc": label_map.num_labels}, nc=label_map.num_labels, verbose=False)
            model.names = dict(enumerate(label_map.names))
            model.args, model.task = self.yolo.model.args, "detect"
            self.yolo.model = model
        names = self.yolo.names
        _check_names(spec, [names[i] for i in range(len(names))], label_map)
        train_args = getattr(self.yolo.model, "args", None) or {}
        trained_size = train_args.get("imgsz") if isinstance(train_args, Mapping) and not is_yaml else None
        if self.onnx:  # the size the graph was exported at (ultralytics writes it into the graph's metadata)
            exported = str((read_export_metadata(spec) or {}).get("ultralytics", {}).get("imgsz", ""))
            trained_size = int(exported.strip("[]").split(",")[0]) if exported.strip("[]") else None
        self.imgsz = int(imgsz or (trained_size if isinstance(trained_size, int) else DEFAULT_IMGSZ))
        self._net: torch.nn.Module | None = None

    def _predict(self, images: Sequence[Image.Image], imgsz: int | tuple[int, int]) -> list[dict[str, torch.Tensor]]:
        extra = {"half": True} if self.half else {}  # passing half=False still triggers a deprecation warning
        with keep_torch_threads():
            results = self.yolo.predict(
                list(images), imgsz=imgsz, device=str(self.device), verbose=False, save=False, **extra,
                **self.settings,
            )
        out = []
        for r in results:
            b = r.boxes
            out.append({
                "boxes": b.xyxy.float().cpu(),
                "scores": b.conf.float().cpu(),
                "labels": b.cls.long().cpu(),  # names checked equal to the label map, so class index == label
            })
        return out

    def predict(self, images: Sequence[Image.Image]) -> list[dict[str, torch.Tensor]]:
        return self._predict(images, self.imgsz)

    def predict_at(self, images: Sequence[Image.Image], size_hw: tuple[int, int]) -> list[dict[str, torch.Tensor]]:
        return self._predict(images, tuple(size_hw))

    def module(self) -> torch.nn.Module:
        # parameters and FLOPs of the network as ultralytics runs it (Conv+BN fused), like its own model summary
        return self._network()

    def _network(self) -> torch.nn.Module:
        """The network exactly as ultralytics runs it (BN fused, eval, fp16 if asked): its predictor's backend."""
        if self._net is None:
            if self.yolo.predictor is None:
                blank = Image.new("RGB", (self.imgsz, self.imgsz))
                self._predict([blank], self.imgsz)
            backend = self.yolo.predictor.model  # AutoBackend; ultralytics 8.4 keeps the torch net in .backend.model
            if self.onnx:  # no torch network: the AutoBackend module runs the ONNX Runtime session
                self._net = backend
                return backend
            net = getattr(getattr(backend, "backend", None), "model", None)
            if not isinstance(net, torch.nn.Module):
                net = getattr(backend, "model", None)
            self._net = net if isinstance(net, torch.nn.Module) else self.yolo.model
        return self._net

    def complexity(self, inputs: Any, size_hw: tuple[int, int]) -> dict[str, Any]:
        if not self.onnx:
            return super().complexity(inputs, size_hw)
        import onnx

        graph = onnx.load(str(self.path))  # params = the numbers stored in the graph (Conv+BN fused, as for .pt)
        params = int(sum(int(np.prod(t.dims)) for t in graph.graph.initializer))
        return {"params": params, "flops": None, "macs": None, "gflops": None, "gmacs": None,
                "input_hw": list(size_hw), "counted_ops": {}, "uncounted_ops": {},
                "source": "params: initializers of the ONNX graph; FLOPs are not counted on graphs"}

    def forward_input(self, image: Image.Image, size_hw: tuple[int, int]) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(image.convert("RGB").resize((size_hw[1], size_hw[0])), dtype=np.float32))
        x = (x / 255.0).permute(2, 0, 1)[None].contiguous().to(self.device)
        return x.half() if self.half else x

    @torch.inference_mode()
    def forward(self, inputs: torch.Tensor) -> Any:
        return self._network()(inputs)

    def latency_size(self, imgsz: int | None) -> tuple[int, int]:
        s = imgsz or self.imgsz
        return (s, s)

    def protocol(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "architecture": str(self.yolo.model.yaml.get("yaml_file", "")) if hasattr(self.yolo.model, "yaml") else "",
            "runtime": self.runtime,
            "input_geometry": {"mode": "letterbox", "imgsz": self.imgsz},
            "post_processing": f"ultralytics NMS conf {self.settings['conf']}, IoU {self.settings['iou']}, "
                               f"max_det {self.settings['max_det']}",
        }


# ---------------------------------------------------------------------------------------------------------------------
class PredictionsFile(Detector):
    """A COCO detection-results file (``[{"image_id", "category_id", "bbox" xywh, "score"}, ...]``)."""

    kind = "predictions"
    runtime = None

    def __init__(self, name: str, path: str | Path, label_map: Any) -> None:
        super().__init__(name, path, "cpu", False)
        try:
            records = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read COCO results file {path}: {e}") from e
        if not isinstance(records, list):
            raise ValueError(f"{path}: a COCO results file must be a JSON list of detections")
        label_of = {int(c): i for i, c in enumerate(np.asarray(label_map.category_ids).tolist())}
        grouped: dict[int, list[tuple[list[float], float, int]]] = {}
        for j, r in enumerate(records):
            for key in ("image_id", "category_id", "bbox", "score"):
                if key not in r:
                    raise ValueError(f"{path}: record {j} has no '{key}' field")
            if int(r["category_id"]) not in label_of:
                raise ValueError(f"{path}: record {j} field 'category_id' = {r['category_id']} is not a category "
                                 f"of the dataset (valid: {sorted(label_of)})")
            bbox = r["bbox"]
            if len(bbox) != 4 or not all(math.isfinite(float(v)) for v in bbox) or not math.isfinite(float(r["score"])):
                raise ValueError(f"{path}: record {j} field 'bbox'/'score' is not 4 finite numbers / a finite number")
            grouped.setdefault(int(r["image_id"]), []).append(
                ([float(v) for v in bbox], float(r["score"]), label_of[int(r["category_id"])])
            )
        self._by_image = grouped
        self.num_records = len(records)

    @property
    def can_time(self) -> bool:
        return False

    def predictions_for(self, image_id: int) -> dict[str, torch.Tensor]:
        """Detections of one image (possibly none) in the internal xyxy form."""
        rows = self._by_image.get(int(image_id), [])
        xywh = torch.tensor([r[0] for r in rows], dtype=torch.float32).reshape(-1, 4)
        return {
            "boxes": coco_xywh_to_xyxy(xywh),
            "scores": torch.tensor([r[1] for r in rows], dtype=torch.float32),
            "labels": torch.tensor([r[2] for r in rows], dtype=torch.int64),
        }

    def image_ids(self) -> set[int]:
        return set(self._by_image)

    def protocol(self) -> dict[str, Any]:
        return {"kind": self.kind, "source": str(self.path), "detections": self.num_records}


# ---------------------------------------------------------------------------------------------------------------------
def detector_kind(path: str | Path) -> str:
    """``"ultralytics"`` for ``.pt``/``.yaml`` (and a YOLO ``.onnx``), ``"onnx"`` for a graph from ``rtcodetr
    export``, ``"transformers"`` for a directory with ``config.json``."""
    p = Path(path)
    if p.suffix in (".pt", ".yaml", ".yml"):
        return "ultralytics"
    if p.suffix == ".onnx":
        meta = read_export_metadata(p)
        if meta is None:
            raise ValueError(f"{p}: an ONNX graph without rtcodetr or ultralytics metadata; write it with "
                             "`rtcodetr export --model MODEL_DIR --out FILE.onnx`")
        return "ultralytics" if meta.get("family") == "yolo" else "onnx"
    if p.is_dir():
        if (p / "config.json").is_file():
            return "transformers"
        raise ValueError(f"{p}: a directory without config.json is not a save_pretrained model")
    if p.suffix == ".json":
        raise ValueError(f"{p}: a .json file is a COCO results file; pass it with --predictions NAME={p}")
    raise ValueError(f"{p}: expected a save_pretrained directory, an exported .onnx graph, an ultralytics .pt "
                     "checkpoint or a .yaml")


def load_detector(path: str | Path, device: str = "cpu", half: bool = False, *, label_map: Any = None,
                  name: str | None = None, imgsz: int | None = None,
                  yolo_settings: Mapping[str, Any] | None = None, provider: str = "auto") -> Detector:
    """Build the right :class:`Detector` for ``path`` (see :func:`detector_kind`).

    With ``label_map`` (the dataset's :class:`~rtcodetr.data.LabelMap`) a model whose classes are not the dataset's
    labels in label order is refused rather than scored against the wrong categories; a YOLO ``.yaml`` needs it to
    know how many classes to build. ``provider`` picks the ONNX Runtime provider of an ``.onnx`` graph (see
    :func:`onnx_providers`: ``"auto"`` = TensorRT, else CUDA, on ``device="cuda"``; CPU on ``device="cpu"``).
    """
    if not Path(path).exists() and Path(path).suffix == ".onnx":
        raise FileNotFoundError(f"ONNX file {path} not found")
    name = name or Path(path).stem
    kind = detector_kind(path)
    if kind == "ultralytics":
        return UltralyticsDetector(name, path, label_map, device, half, imgsz, yolo_settings)
    if kind == "onnx":
        return OnnxDetector(name, path, label_map, device, half, imgsz, provider)
    return TransformersDetector(name, path, label_map, device, half, imgsz)
