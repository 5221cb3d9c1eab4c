"""On-device resampling of cached teacher feature maps onto the student's feature grid.

The cache stores each teacher map ``[Ct, Hf, Wf]`` computed on the *original* image resized to the teacher input
``input_hw = (h_t, w_t)`` (then padded; ``valid = (rows, cols)`` are the unpadded feature cells). The student sees the
same image after its geometric augmentation, summarised by ``affine`` (``[3, 3]``, original pixel -> current pixel).
For every student cell centre we go back to the original frame through ``affine^-1``, into the teacher input frame by
the resize factor, and sample the teacher map there with ``grid_sample`` (bilinear). Everything is a composition of
affine maps, so one ``affine_grid`` per batch does it, on the device, after the batch left the workers.

Coordinate conventions (``docs/INTERFACES.md``): continuous pixels, an image of width W spans ``[0, W]``; a feature cell
``j`` at stride ``s`` spans ``[j s, (j + 1) s]`` and its centre is ``(j + .5) s``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rtcodetr.features import STRIDE


def student_to_teacher_theta(
    affine: torch.Tensor,
    orig_hw: torch.Tensor,
    teacher_input_hw: torch.Tensor,
    teacher_grid_hw: tuple[int, int],
    teacher_stride: float,
    student_grid_hw: tuple[int, int],
    student_stride: float,
) -> torch.Tensor:
    """``affine_grid`` matrices ``[B, 2, 3]`` (float32) mapping student-grid normalized coords to teacher-map ones.

    affine: float ``[B, 3, 3]`` original -> current pixels; orig_hw, teacher_input_hw: ``[B, 2]`` (h, w);
    teacher_grid_hw: the cached map's full (padded) ``(Hf, Wf)``; student_grid_hw: ``(Hs, Ws)``.
    Normalized coords follow ``align_corners=False``: x_n = -1 at the left edge of cell 0, +1 at the right edge of the
    last cell, so a cell centre maps to pixel ``(j + .5) * stride``.
    """
    dev = affine.device
    b = affine.shape[0]
    affine = affine.to(torch.float64)
    hs, ws = student_grid_hw
    hf, wf = teacher_grid_hw
    # student normalized -> current pixels
    m1 = torch.zeros(b, 3, 3, dtype=torch.float64, device=dev)
    m1[:, 0, 0] = m1[:, 0, 2] = ws * student_stride / 2
    m1[:, 1, 1] = m1[:, 1, 2] = hs * student_stride / 2
    m1[:, 2, 2] = 1
    # current -> original pixels
    m2 = torch.linalg.inv(affine)
    # original pixels -> teacher input pixels -> teacher normalized (x_n = 2 x_t / (s_t Wf) - 1)
    orig_hw = orig_hw.to(dev, torch.float64)
    tin_hw = teacher_input_hw.to(dev, torch.float64)
    m3 = torch.zeros(b, 3, 3, dtype=torch.float64, device=dev)
    m3[:, 0, 0] = 2 * (tin_hw[:, 1] / orig_hw[:, 1]) / (teacher_stride * wf)
    m3[:, 1, 1] = 2 * (tin_hw[:, 0] / orig_hw[:, 0]) / (teacher_stride * hf)
    m3[:, 0, 2] = -1
    m3[:, 1, 2] = -1
    m3[:, 2, 2] = 1
    return (m3 @ m2 @ m1)[:, :2].to(torch.float32)


def resample_teacher_features(
    teacher: torch.Tensor,
    affine: torch.Tensor,
    orig_hw: torch.Tensor,
    teacher_input_hw: torch.Tensor,
    teacher_valid: torch.Tensor,
    current_hw: torch.Tensor,
    student_grid_hw: tuple[int, int],
    teacher_stride: float = STRIDE,
    student_stride: float = STRIDE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp cached teacher maps onto the student's grid; return (maps ``[B, Ct, Hs, Ws]``, mask ``[B, 1, Hs, Ws]``).

    teacher: float ``[B, Ct, Hf, Wf]`` (as cached, padded); affine: ``[B, 3, 3]`` original -> current pixels;
    orig_hw / teacher_input_hw / current_hw: ``[B, 2]`` (h, w) of the original image, the teacher input before
    padding, and the student's current image before batch padding; teacher_valid: ``[B, 2]`` unpadded feature
    (rows, cols). The mask (float 0/1) is 1 where the student cell centre lies inside the current image, inside the
    original image (zoom-out fill has no teacher) and inside the teacher's valid feature area.
    """
    b, _, hf, wf = teacher.shape
    hs, ws = student_grid_hw
    theta = student_to_teacher_theta(affine, orig_hw, teacher_input_hw, (hf, wf), teacher_stride, (hs, ws), student_stride)
    grid = F.affine_grid(theta, [b, 1, hs, ws], align_corners=False)  # [B, Hs, Ws, 2] teacher-normalized (x, y)
    # Sample only from valid teacher cells: clamp to the centres of the first and last valid cell, so bilinear
    # weights never reach the zero padding of grid_sample (student cells within half a teacher cell of an image
    # edge) nor the teacher's padded cells (when the last valid cell is more than half filled). Near an edge the
    # value is then the edge cell's own, as for any other cell inside it.
    dev = teacher.device
    valid = teacher_valid.to(dev, torch.float32)
    lo = torch.tensor([1.0 / wf - 1.0, 1.0 / hf - 1.0], device=dev)  # centre of cell 0, normalized
    hi = torch.stack([2 * (valid[:, 1] - 0.5) / wf - 1, 2 * (valid[:, 0] - 0.5) / hf - 1], -1)  # [B, 2]
    sample_grid = torch.maximum(torch.minimum(grid, hi[:, None, None, :]), lo)
    maps = F.grid_sample(teacher.float(), sample_grid, mode="bilinear", padding_mode="border", align_corners=False)

    # teacher feature coordinates in cell units (0 .. Wf): u = (x_n + 1) Wf / 2
    u = (grid[..., 0] + 1) * wf / 2
    v = (grid[..., 1] + 1) * hf / 2
    tin_hw = teacher_input_hw.to(dev, torch.float32)
    # limit: the valid cells and the teacher input image itself (the original image resized), whichever is smaller
    lim_u = torch.minimum(valid[:, 1], tin_hw[:, 1] / teacher_stride)[:, None, None]
    lim_v = torch.minimum(valid[:, 0], tin_hw[:, 0] / teacher_stride)[:, None, None]
    tol = 1e-4
    inside_teacher = (u >= -tol) & (u <= lim_u + tol) & (v >= -tol) & (v <= lim_v + tol)
    cur = current_hw.to(dev, torch.float32)
    ys = (torch.arange(hs, device=dev, dtype=torch.float32) + 0.5) * student_stride
    xs = (torch.arange(ws, device=dev, dtype=torch.float32) + 0.5) * student_stride
    inside_current = (ys[None, :, None] <= cur[:, 0, None, None]) & (xs[None, None, :] <= cur[:, 1, None, None])
    mask = (inside_teacher & inside_current).unsqueeze(1).to(maps.dtype)
    return maps * mask, mask
