"""The teacher as the cache sees it: a loaded transformers detector, its identity, and one batched forward.

``Teacher.forward`` returns exactly what is stored per sample (float32, before the storage dtype): ``backbone``
and ``encoder`` maps ``[B, C, Hf, Wf]`` from ``rtcodetr.features.FeatureTap``, raw ``logits`` ``[B, Q, K]`` and
``boxes`` ``[B, Q, 4]`` as normalized cxcywh of the ORIGINAL image (converted from the model's padded-input frame).
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import warnings
from typing import Any, Sequence

import torch

from rtcodetr.cache_teacher.geometry import boxes_to_original_frame
from rtcodetr.cache_teacher.manifest import label_map_entries, label_map_sha256, sha256_json

FEATURE_NAMES = ("backbone", "encoder")
PREDICTION_NAMES = ("logits", "boxes")
TENSOR_NAMES = FEATURE_NAMES + PREDICTION_NAMES
_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "dtype", "torch_dtype", "_commit_hash",
                         "_attn_implementation_autoset", "_attn_implementation_internal", "architectures"}


def config_sha256(config) -> str:
    """sha256 of the model config without paths, versions and dtypes (what defines the network's function)."""

    def clean(d: Any) -> Any:
        if isinstance(d, dict):
            return {k: clean(v) for k, v in d.items() if k not in _VOLATILE_CONFIG_KEYS}
        return d

    return sha256_json(clean(config.to_dict()))


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over every state-dict tensor (name, dtype, shape, bytes) in name order: same weights, same hash."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def effective_precision(mixed_precision: str, device: torch.device) -> str:
    """The precision the teacher runs in: Accelerate's setting on accelerators, fp32 ("no") on CPU."""
    if device.type == "cpu" and mixed_precision not in ("no", None):
        warnings.warn(f"mixed precision '{mixed_precision}' requested but the teacher runs on CPU: using fp32",
                      stacklevel=2)
        return "no"
    return mixed_precision or "no"


class Teacher:
    """A detector ready to be cached: eval mode on ``device``, its identity, and ``forward``."""

    def __init__(self, path_or_id: str, device: torch.device | str = "cpu", mixed_precision: str = "no"):
        from rtcodetr.models import load_model, model_family, processor_geometry

        self.id = str(path_or_id)
        self.model, self.processor = load_model(path_or_id)
        self.model.eval().requires_grad_(False)
        self.device = torch.device(device)
        self.model.to(self.device)
        self.family = model_family(self.model)
        self.mixed_precision = effective_precision(mixed_precision, self.device)
        self.processor_geometry = processor_geometry(self.processor)
        self._takes_mask = "pixel_mask" in inspect.signature(self.model.forward).parameters
        config = self.model.config
        self.id2label = {int(k): str(v) for k, v in config.id2label.items()}
        self.label_names = [self.id2label[i] for i in sorted(self.id2label)]

    def identity(self) -> dict[str, Any]:
        """The manifest's ``teacher`` section."""
        config = self.model.config
        return {
            "id": self.id,
            "family": self.family,
            "model_type": str(config.model_type),
            "config_sha256": config_sha256(config),
            "weights_sha256": weights_sha256(self.model),
            "num_queries": int(getattr(config, "num_queries", 0)),
            "num_parameters": int(sum(p.numel() for p in self.model.parameters())),
            "label_map": label_map_entries(self.label_names),
            "label_map_sha256": label_map_sha256(self.label_names),
        }

    def _autocast(self):
        if self.mixed_precision in ("fp16", "bf16"):
            dtype = torch.float16 if self.mixed_precision == "fp16" else torch.bfloat16
            return torch.autocast(device_type=self.device.type, dtype=dtype)
        return contextlib.nullcontext()

    @torch.no_grad()
    def forward(self, batch: dict[str, torch.Tensor], tensors: Sequence[str], padded_hw: Sequence[int],
                box_reference: str = "unpadded") -> dict[str, torch.Tensor]:
        """Run the teacher on a ``PadCollate`` batch.

        Returns ``{name: float32 CPU tensor}`` for ``tensors``: ``backbone``/``encoder`` ``[B, C, Hf, Wf]``,
        ``logits`` ``[B, Q, K]`` (pre-sigmoid), ``boxes`` ``[B, Q, 4]`` normalized cxcywh of the original image.
        """
        from rtcodetr.features import FeatureTap

        pixels = batch["pixel_values"].to(self.device, non_blocking=True)
        kwargs = {}
        if self._takes_mask:
            kwargs["pixel_mask"] = batch["pixel_mask"].to(self.device, non_blocking=True)
        maps = [n for n in tensors if n in FEATURE_NAMES]
        tap = FeatureTap(self.model, maps) if maps else contextlib.nullcontext()
        with tap, self._autocast():
            out = self.model(pixel_values=pixels, **kwargs)
        result: dict[str, torch.Tensor] = {}
        for name in maps:
            result[name] = tap.features[name].float().cpu()
        if "logits" in tensors:
            result["logits"] = out.logits.float().cpu()
        if "boxes" in tensors:
            result["boxes"] = boxes_to_original_frame(out.pred_boxes.float(), batch["input_hw"], batch["affine"],
                                                      batch["orig_hw"], padded_hw, box_reference)
        return result
