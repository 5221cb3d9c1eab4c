"""Settings of the teacher-cache job (``rtcodetr cache-teacher``); YAML: ``configs/cache.yaml``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class GeometryConfig:
    """Teacher input geometry. ``mode: auto`` takes everything from the teacher's own image-processor config.

    - ``fixed``: resize every image to ``size_hw`` (aspect not kept; RT-DETR's 640x640).
    - ``shortest_edge``: DETR-style aspect-keeping resize (shortest side to ``shortest_edge`` unless the longest
      would exceed ``longest_edge``). Feature maps of one cache have one size, so every input is padded
      bottom/right to ``pad_hw``: by default the largest resized image of the split rounded up to
      ``pad_multiple``; ``valid`` records each sample's unpadded feature extent.

    Fields left ``null`` fall back to the processor's value.
    """

    mode: str = "auto"  # auto | fixed | shortest_edge
    size_hw: Optional[list[int]] = None
    shortest_edge: Optional[int] = None
    longest_edge: Optional[int] = None
    pad_hw: Optional[list[int]] = None
    pad_multiple: int = 32
    # What the teacher's normalized pred_boxes are fractions of when inputs are padded: "unpadded" (original DETR /
    # Conditional DETR training, hence the hub checkpoints, and rtcodetr's own trainer, which normalises targets by
    # each image before batch padding) or "padded" (a teacher fine-tuned with transformers' processors and
    # pad(update_bboxes=True)). RT-DETR inputs are not padded: both give the same boxes.
    box_reference: str = "unpadded"
    # Teacher on the mirrored (left-right flipped) image: a second cache whose feature maps serve the student's
    # flipped views (teacher maps are not flip-equivariant, so mirroring the plain cache's map is a wrong target).
    # Boxes are stored in the original image's frame either way.
    hflip: bool = False


@dataclass
class CacheConfig:
    """One caching run: which teacher over which split, what to store and how."""

    data: str = ""  # prepared dataset directory
    split: str = "train"
    teacher: str = ""  # save_pretrained directory or hub id
    out: str = ""  # cache location: a path or any fsspec URL zarr accepts
    overwrite: bool = False
    tensors: list[str] = field(default_factory=lambda: ["backbone", "encoder", "logits", "boxes"])
    dtype: str = "float16"  # feature maps: float16 | bfloat16 | int8 | float32
    prediction_dtype: str = "float32"  # logits/boxes: float32 | float16 | bfloat16
    compressor: str = "blosc"  # blosc (zstd + byte shuffle) | zstd | gzip | none
    compression_level: int = 3
    samples_per_shard: int = 32
    batch_size: int = 8
    num_workers: int = 2
    draft: bool = True  # JPEG draft-mode decode at the smallest DCT scale still >= the teacher input
    writer_queue: int = 4  # batches waiting for the writer thread before the teacher blocks
    storage_options: dict = field(default_factory=dict)  # fsspec options for remote URLs
    progress: bool = True
    redo_shards: list[int] = field(default_factory=list)  # recompute these shards of an existing cache (repair)
    geometry: GeometryConfig = field(default_factory=GeometryConfig)
