"""Capture a detector's stride-32 backbone and encoder maps during its normal forward pass.

``FeatureTap`` hooks modules of an HF ``transformers`` detector, so the teacher cache and the student trainer read
the same tensors the detector computes (no second forward, no re-implementation):

================  ==========================================================  ======================================
name              Conditional DETR                                            RT-DETR (v1/v2)
================  ==========================================================  ======================================
``backbone``      C5: the input of ``model.model.input_projection``           last map of ``model.model.backbone``
                  ``[B, C5, Hf, Wf]``                                         ``[B, C_last, Hf, Wf]``
``encoder``       encoder memory ``[B, Hf*Wf, d_model]`` reshaped to          stride-32 (last) entry of the hybrid
                  ``[B, d_model, Hf, Wf]``                                     encoder's output list (= the model's
                                                                              ``encoder_last_hidden_state[-1]``)
================  ==========================================================  ======================================

All maps are float tensors at stride 32 of the (padded) network input, ``Hf = ceil(H / 32)``. The tensors are the
ones inside the graph: with grad enabled they keep their ``grad_fn`` (the trainer puts a loss on the student's
tapped maps); under ``torch.no_grad`` they do not.

Padding: Conditional DETR pads a batch to its largest image and passes a ``pixel_mask``; feature cells over padding
hold values (the encoder masks padded keys but still computes padded queries). ``tap.mask`` is the backbone's own
downsampled pixel mask ``[B, Hf, Wf]`` bool (True = real image), the rows/columns a cache should keep. RT-DETR
inputs are fixed-size and unpadded, so its mask is all True unless the caller passes a ``pixel_mask``.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from rtcodetr.models import model_family, unwrap_model

STRIDE = 32  # both tapped maps, of every family: the one stride constant of the project

TAP_NAMES = ("backbone", "encoder")


def feature_channels(model: nn.Module) -> dict[str, int]:
    """Channels of each tapped map: ``{"backbone": C_backbone, "encoder": C_encoder}``."""
    model = unwrap_model(model)
    family = model_family(model)
    config = model.config
    backbone_channels = int(model.model.backbone.intermediate_channel_sizes[-1])
    if family == "conditional_detr":
        return {"backbone": backbone_channels, "encoder": int(config.d_model)}
    if family == "rtdetr":
        return {"backbone": backbone_channels, "encoder": int(config.encoder_hidden_dim)}
    raise NotImplementedError(f"FeatureTap knows Conditional DETR and RT-DETR models, not '{family}'")


class FeatureTap:
    """Context manager: while active, every forward of ``model`` stores its stride-32 maps in ``tap.features``.

    Example::

        with FeatureTap(student) as tap:
            outputs = student(pixel_values=x, labels=labels)   # training mode, denoising on: fine
        feats = tap.features["backbone"]                         # [B, C, Hf, Wf], requires grad

    ``names``: which maps to capture, a subset of ``("backbone", "encoder")``. ``model`` may be wrapped by DDP /
    accelerate / ``torch.compile``: the hooks go on the unwrapped HF model, which the wrapper calls. Each forward
    overwrites the previous one's tensors; hooks are removed on exit (also on error).

    Attributes after a forward: ``features: dict[str, Tensor]`` (float, ``[B, C, Hf, Wf]``) and ``mask``
    (``[B, Hf, Wf]`` bool, True over real pixels, from the backbone's downsampled pixel mask).
    """

    def __init__(self, model: nn.Module, names: Iterable[str] = TAP_NAMES) -> None:
        self.names = tuple(names)
        unknown = [n for n in self.names if n not in TAP_NAMES]
        if unknown or not self.names:
            raise ValueError(f"FeatureTap names must be a non-empty subset of {TAP_NAMES}, got {self.names}")
        self.model = unwrap_model(model)
        self.family = model_family(self.model)
        if self.family not in ("conditional_detr", "rtdetr"):
            raise NotImplementedError(f"FeatureTap knows Conditional DETR and RT-DETR models, not '{self.family}'")
        self.features: dict[str, torch.Tensor] = {}
        self.mask: torch.Tensor | None = None
        self._handles: list[Any] = []

    # -- hooks -------------------------------------------------------------------------------------------------------
    def _on_backbone(self, module: nn.Module, args: Any, output: Any) -> None:
        # Both families' conv encoders return [(feature_map, downsampled_mask), ...] from stride 8/16 up to 32.
        feature_map, mask = output[-1]
        self.mask = mask
        self._hw = tuple(feature_map.shape[-2:])
        if "backbone" in self.names and self.family == "rtdetr":
            self.features["backbone"] = feature_map

    def _on_input_projection(self, module: nn.Module, args: Any) -> None:
        # Conditional DETR: the tensor entering the 1x1 projection is exactly C5 (after the backbone, before d_model).
        self.features["backbone"] = args[0]

    def _on_encoder(self, module: nn.Module, args: Any, output: Any) -> None:
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        if self.family == "rtdetr":
            # The hybrid encoder returns its PAN outputs ordered by stride (8, 16, 32): the last one is stride 32.
            self.features["encoder"] = hidden[-1]
            return
        b, n, c = hidden.shape
        h, w = self._hw
        if n != h * w:
            raise RuntimeError(f"encoder memory has {n} tokens but the stride-32 map is {h}x{w}")
        # Tokens are the row-major flatten(2) of the [B, d, Hf, Wf] projected map: invert that exactly.
        self.features["encoder"] = hidden.transpose(1, 2).reshape(b, c, h, w)

    # -- context manager ---------------------------------------------------------------------------------------------
    def __enter__(self) -> "FeatureTap":
        if self._handles:
            raise RuntimeError("FeatureTap is already active")
        self.features = {}
        self.mask = None
        self._hw = (0, 0)
        inner = self.model.model
        self._handles.append(inner.backbone.register_forward_hook(self._on_backbone))
        if "backbone" in self.names and self.family == "conditional_detr":
            self._handles.append(inner.input_projection.register_forward_pre_hook(self._on_input_projection))
        if "encoder" in self.names:
            self._handles.append(inner.encoder.register_forward_hook(self._on_encoder))
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove the hooks (the captured tensors stay in ``features``)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
