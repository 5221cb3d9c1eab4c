"""The trainable module: the student plus its 1x1 feature adapter (timm's distillation task: one module goes through
``accelerator.prepare``; the teacher, cached or online, sits outside and never requires grad)."""
from __future__ import annotations

import torch
from torch import nn

from rtcodetr.features import FeatureTap, feature_channels


class StudentWithAdapters(nn.Module):
    """The trainable thing: the HF student plus the 1x1 feature adapter, one module for ``accelerator.prepare``.

    ``forward`` returns (HF outputs, adapted student map ``[B, Ct, Hs, Ws]`` or None). The adapter maps the student's
    stride-32 map (``feature_source``) to the teacher's channel count; it is not part of the saved student.
    """

    def __init__(self, student: nn.Module, feature_source: str | None = None, teacher_channels: int | None = None,
                 seed: int = 0):
        super().__init__()
        self.student = student
        self.feature_source = feature_source
        self.adapter: nn.Module | None = None
        if feature_source is not None:
            cin = feature_channels(student)[feature_source]
            # Drawn from its own seeded stream, not the global RNG: otherwise an arm with an adapter would start the
            # loop from another RNG state than its baseline twin (other denoising noise, other dropout), and arms
            # would differ in more than their losses.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.adapter = nn.Conv2d(cin, int(teacher_channels), kernel_size=1)

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None, labels=None):
        if self.adapter is None:
            return self.student(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels), None
        with FeatureTap(self.student, names=(self.feature_source,)) as tap:
            outputs = self.student(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels)
        return outputs, self.adapter(tap.features[self.feature_source])
