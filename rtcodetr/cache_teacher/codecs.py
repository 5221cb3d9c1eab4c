"""Storage dtypes of the teacher cache: float32 / float16 / bfloat16 / int8 with per-channel scales.

Every tensor enters as float32 and leaves the reader as float32; what sits on disk is one of:

- ``float32``, ``float16``: plain IEEE arrays.
- ``bfloat16``: zarr v3 has no bfloat16 data type (numpy has none without ``ml_dtypes``), so the upper 16 bits of the
  float32 pattern are stored as ``uint16`` after round-to-nearest-even, exactly what ``torch.bfloat16`` does. Decoding
  shifts them back, so a value read back equals ``torch.tensor(x).bfloat16().float()`` bit for bit.
- ``int8`` (feature maps only): symmetric per-sample, per-channel quantisation. For a map ``x`` ``[C, H, W]`` the
  scale ``s[c] = max|x[c]| / 127`` goes into a sibling float32 array ``<name>_scale`` ``[N, C]`` and ``q = round(x /
  s)`` in ``[-127, 127]``. Per channel because DETR backbone channels differ in range by orders of magnitude (a
  per-tensor scale flattens the weak channels to zero); per sample because the cache is written one batch at a time.
"""
from __future__ import annotations

import numpy as np

# logical dtype -> numpy dtype held on disk
STORAGE_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(np.uint16),
    "int8": np.dtype(np.int8),
}
INT8_MAX = 127.0


def check_dtype(name: str, dtype: str, *, is_map: bool) -> None:
    """Raise ``ValueError`` when ``dtype`` is unknown or int8 is asked for a non-map tensor ``name``."""
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"tensor '{name}': unknown storage dtype '{dtype}' (choose from {sorted(STORAGE_DTYPES)})")
    if dtype == "int8" and not is_map:
        raise ValueError(
            f"tensor '{name}': int8 is only for feature maps [C, H, W] (per-channel scales); "
            "store predictions as float32, float16 or bfloat16"
        )


def float32_to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 array -> uint16 array of bfloat16 bit patterns (round to nearest even; NaN stays NaN)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    out = ((bits + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = np.uint16(0x7FC0)
    return out


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 values (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def encode(x: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Encode a float32 batch for storage.

    Args:
        x: float32 ``[B, ...]``; for ``int8`` it must be a batch of maps ``[B, C, H, W]``.
        dtype: logical storage dtype (a key of ``STORAGE_DTYPES``).
    Returns:
        ``(stored, scale)``: ``stored`` has dtype ``STORAGE_DTYPES[dtype]`` and the shape of ``x``; ``scale`` is
        float32 ``[B, C]`` for ``int8`` and ``None`` otherwise.
    """
    x = np.asarray(x, dtype=np.float32)
    if dtype == "float32":
        return np.ascontiguousarray(x), None
    if dtype == "float16":
        return x.astype(np.float16), None
    if dtype == "bfloat16":
        return float32_to_bfloat16_bits(x), None
    if dtype == "int8":
        if x.ndim != 4:
            raise ValueError(f"int8 storage needs maps [B, C, H, W], got shape {list(x.shape)}")
        amax = np.abs(x).max(axis=(2, 3))
        scale = (amax / INT8_MAX).astype(np.float32)
        # an all-zero channel has no range; any positive scale decodes it back to zeros
        scale[scale == 0] = 1.0
        q = np.clip(np.rint(x / scale[:, :, None, None]), -INT8_MAX, INT8_MAX).astype(np.int8)
        return q, scale
    raise ValueError(f"unknown storage dtype '{dtype}'")


def decode(stored: np.ndarray, dtype: str, scale: np.ndarray | None = None) -> np.ndarray:
    """Inverse of ``encode`` for one sample or a batch; returns float32.

    For ``int8``, ``stored`` is ``[..., C, H, W]`` and ``scale`` ``[..., C]`` with matching leading dims.
    """
    if dtype in ("float32", "float16"):
        return np.asarray(stored).astype(np.float32, copy=False)
    if dtype == "bfloat16":
        return bfloat16_bits_to_float32(stored)
    if dtype == "int8":
        if scale is None:
            raise ValueError("int8 tensor read without its per-channel scale")
        return np.asarray(stored).astype(np.float32) * np.asarray(scale, dtype=np.float32)[..., None, None]
    raise ValueError(f"unknown storage dtype '{dtype}'")


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two arrays flattened (float64 accumulation); 1.0 when both are all zeros."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(a @ b / (na * nb))
