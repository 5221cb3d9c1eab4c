"""Teacher-cache storage without a model: dtype codecs, shard writer + markers, manifest checks, HDF5 copy."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from rtcodetr.cache_teacher.codecs import (
    bfloat16_bits_to_float32,
    check_dtype,
    cosine,
    decode,
    encode,
    float32_to_bfloat16_bits,
)
from rtcodetr.cache_teacher.config import GeometryConfig
from rtcodetr.cache_teacher.geometry import resolve_geometry, valid_cells
from rtcodetr.cache_teacher.manifest import CacheMismatchError, check_fields
from rtcodetr.cache_teacher.storage import (
    DONE_ARRAY,
    ShardPlan,
    ShardWriter,
    create_cache,
    export_hdf5,
    finished_shards,
    open_group,
    open_source,
    read_sample,
)


def _feature_like(rng: np.random.Generator, b: int = 2, c: int = 16, h: int = 5, w: int = 7) -> np.ndarray:
    # channels with ranges from 1e-3 to 1e2, like post-ReLU backbone maps: the case per-channel scales are for
    scale = np.logspace(-3, 2, c).astype(np.float32)[None, :, None, None]
    return (np.maximum(rng.normal(size=(b, c, h, w)), 0) * scale).astype(np.float32)


def test_bfloat16_bits_match_torch_rounding():
    x = torch.randn(4096) * torch.logspace(-20, 20, 4096)
    x[:3] = torch.tensor([0.0, -0.0, float("inf")])
    ours = bfloat16_bits_to_float32(float32_to_bfloat16_bits(x.numpy()))
    ref = x.bfloat16().float().numpy()
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))
    assert np.isnan(bfloat16_bits_to_float32(float32_to_bfloat16_bits(np.array([np.nan], np.float32))))[0]


@pytest.mark.parametrize("dtype,min_cos", [("float32", 1 - 1e-12), ("float16", 0.99999), ("bfloat16", 0.9999),
                                           ("int8", 0.999)])
def test_codec_fidelity_per_channel(dtype, min_cos):
    x = _feature_like(np.random.default_rng(0))
    stored, scale = encode(x, dtype)
    assert (scale is not None) == (dtype == "int8")
    y = decode(stored, dtype, scale)
    assert y.dtype == np.float32 and y.shape == x.shape
    if dtype == "float32":
        assert np.array_equal(x, y)
    elif dtype == "float16":
        np.testing.assert_allclose(y, x, rtol=2**-11, atol=6e-8)  # half ulp (+ subnormal step)
    elif dtype == "bfloat16":
        np.testing.assert_allclose(y, x, rtol=2**-8, atol=0)
    for b in range(x.shape[0]):
        for c in range(x.shape[1]):
            if dtype == "int8":
                # error within half a step of each channel's own scale: weak channels survive, unlike one scale
                step = np.abs(x[b, c]).max() / 127
                assert np.abs(y[b, c] - x[b, c]).max() <= step / 2 * (1 + 1e-5)
            assert cosine(x[b, c], y[b, c]) >= min_cos


def test_int8_zero_channel_and_rejections():
    x = np.zeros((1, 3, 2, 2), np.float32)
    x[0, 1] = -4.0
    q, s = encode(x, "int8")
    assert np.array_equal(decode(q, "int8", s), x)
    with pytest.raises(ValueError, match="per-channel"):
        check_dtype("logits", "int8", is_map=False)
    with pytest.raises(ValueError, match="unknown storage dtype"):
        check_dtype("encoder", "float8", is_map=True)
    with pytest.raises(ValueError, match="scale"):
        decode(q, "int8", None)


def _manifest(n: int, s: int, dtype: str = "int8") -> dict:
    return {
        "dataset": {"image_ids": list(range(100, 100 + n))},
        "storage": {"samples_per_shard": s, "compressor": {"name": "blosc", "level": 3}},
        "tensors": {"encoder": {"shape": [16, 5, 7], "dtype": dtype, "scale": "encoder_scale" if dtype == "int8"
                                else None},
                    "logits": {"shape": [6, 3], "dtype": "bfloat16", "scale": None}},
    }


def _write(url: str, manifest: dict, data: dict[str, np.ndarray], order: np.ndarray, batch: int, **kw):
    group = create_cache(url, manifest, overwrite=True)
    writer = ShardWriter(group, manifest, **kw)
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        writer.submit(idx, {k: v[idx] for k, v in data.items()},
                      {"valid": np.tile([5, 7], (len(idx), 1)), "input_hw": np.tile([160, 224], (len(idx), 1)),
                       "image_id": 100 + idx})
    writer.close()
    return group, writer


def test_shard_writer_layout_markers_and_hdf5_roundtrip(tmp_path):
    n, s = 10, 4
    rng = np.random.default_rng(1)
    data = {"encoder": _feature_like(rng, b=n), "logits": rng.normal(size=(n, 6, 3)).astype(np.float32)}
    man = _manifest(n, s)
    seen: list[int] = []
    group, writer = _write(str(tmp_path / "c"), man, data, np.arange(n), batch=3, on_shard_written=seen.append)
    assert seen == [0, 1, 2] and finished_shards(group).all()
    # one object per shard for every array, one marker object per shard
    assert sorted(p.name for p in (tmp_path / "c" / "encoder" / "c").iterdir()) == ["0", "1", "2"]
    assert sorted(p.name for p in (tmp_path / "c" / DONE_ARRAY / "c").iterdir()) == ["0", "1", "2"]
    g = open_group(str(tmp_path / "c"), "r")
    assert g["encoder"].chunks == (1, 16, 5, 7) and g["encoder"].shards == (4, 16, 5, 7)
    src = open_source(str(tmp_path / "c"))
    for i in range(n):
        smp = read_sample(src, man, i, ["encoder", "logits"])
        assert cosine(smp["encoder"], data["encoder"][i]) > 0.999
        np.testing.assert_allclose(smp["logits"], data["logits"][i], rtol=8e-3, atol=1e-6)
        assert int(smp["image_id"]) == 100 + i and smp["valid"].tolist() == [5, 7]
    # shuffled batch order inside shards gives the same bytes
    group2, _ = _write(str(tmp_path / "c2"), man, data, np.concatenate([rng.permutation(np.arange(k * s, min(n, k * s + s)))
                                                                          for k in range(3)]), batch=2)
    for name in ("encoder", "encoder_scale", "logits", "valid", "input_hw", "image_id"):
        assert np.array_equal(group[name][:], group2[name][:])
    # HDF5 copy: same stored arrays, same manifest, readable through the same sample reader
    h5 = export_hdf5(str(tmp_path / "c"), tmp_path / "c.h5", progress=False)
    src_h5 = open_source(str(h5))
    for name in ("encoder", "encoder_scale", "logits", "valid", "input_hw", "image_id", DONE_ARRAY):
        assert np.array_equal(src_h5.read(name, slice(None)), group[name][:]), name
    # an opened source pickles (DataLoader workers under spawn) without its store handle, and reads the same
    for opened in (src, src_h5):
        assert opened._handle is not None
        fresh = pickle.loads(pickle.dumps(opened))
        assert fresh._handle is None and fresh._pid is None and fresh._meta is None
        for i in (0, n - 1):
            a, b = read_sample(opened, man, i, ["encoder", "logits"]), read_sample(fresh, man, i, ["encoder", "logits"])
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
        assert fresh.finished().tolist() == [True, True, True]


def test_writer_error_surfaces_and_unmarked_shard_is_unfinished(tmp_path):
    n, s = 8, 4
    rng = np.random.default_rng(2)
    data = {"encoder": _feature_like(rng, b=n), "logits": rng.normal(size=(n, 6, 3)).astype(np.float32)}
    man = _manifest(n, s, dtype="float16")

    def boom(k: int) -> None:
        raise OSError(f"disk full after shard {k}")

    with pytest.raises(RuntimeError, match="writer thread failed.*disk full after shard 0"):
        _write(str(tmp_path / "c"), man, data, np.arange(n), batch=2, on_shard_written=boom)
    group = open_group(str(tmp_path / "c"), "r")
    # shard 0's marker went in before the hook failed; shard 1 was never completed
    assert finished_shards(group).tolist() == [True, False]
    # exporting an unfinished cache is refused, naming the markers
    with pytest.raises(CacheMismatchError, match="not finished") as e:
        export_hdf5(str(tmp_path / "c"), tmp_path / "c.h5", progress=False)
    assert e.value.field == "shard_done" and not (tmp_path / "c.h5").exists()


def test_incomplete_shard_rejected_on_close(tmp_path):
    man = _manifest(8, 4, dtype="float32")
    group = create_cache(str(tmp_path / "c"), man, overwrite=False)
    w = ShardWriter(group, man)
    idx = np.arange(3)
    w.submit(idx, {"encoder": np.ones((3, 16, 5, 7), np.float32), "logits": np.ones((3, 6, 3), np.float32)},
             {"valid": np.ones((3, 2)), "input_hw": np.ones((3, 2)), "image_id": idx})
    with pytest.raises(RuntimeError, match="incomplete shards \\[0\\]"):
        w.close()
    assert not finished_shards(group).any()
    with pytest.raises(FileExistsError):  # no silent overwrite without overwrite=True
        create_cache(str(tmp_path / "c"), man, overwrite=False)


def test_shard_plan_ownership():
    plan = ShardPlan(10, 4)
    assert plan.num_shards == 3 and plan.bounds(2) == (8, 10)
    assert plan.owned(0, 2) == [0, 2] and plan.owned(1, 2) == [1]
    assert sorted(plan.owned(0, 3) + plan.owned(1, 3) + plan.owned(2, 3)) == [0, 1, 2]


def test_manifest_difference_names_field():
    a = {"dataset": {"image_ids": [1, 2, 3]}, "geometry": {"input_hw": [640, 640], "mode": "fixed"}}
    b = {"dataset": {"image_ids": [1, 5, 3]}, "geometry": {"input_hw": [640, 640.0], "mode": "fixed"}}
    check_fields(a, b, ["geometry"], what="x")  # 640 == 640.0 after JSON
    with pytest.raises(CacheMismatchError, match=r"'dataset.image_ids\[1\]'") as e:
        check_fields(a, b, ["geometry", "dataset.image_ids"], what="x")
    assert e.value.field == "dataset.image_ids[1]"


def test_geometry_pads_to_split_max_and_records_processor_settings():
    proc = {"mode": "shortest_edge", "shortest_edge": 800, "longest_edge": 1333,
            "normalize": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), "rescale_factor": 1 / 255}
    sizes = np.array([[3024, 4032], [4032, 3024], [480, 640]])  # landscape, portrait (h, w)
    g = resolve_geometry(proc, GeometryConfig(), sizes)
    assert g["source"] == "processor" and g["mode"] == "shortest_edge"
    # landscape -> 800x1066, portrait -> 1066x800: one padded size holds both, rounded up to stride 32
    assert g["input_hw"] == [1088, 1088] and g["normalize"]["std"] == [0.229, 0.224, 0.225]
    assert valid_cells((800, 1066)) == (25, 34)
    g2 = resolve_geometry(proc, GeometryConfig(mode="fixed", size_hw=[600, 600]), sizes)
    assert g2["source"] == "config" and g2["input_hw"] == [608, 608]
    with pytest.raises(ValueError, match="smaller than the largest resized image"):
        resolve_geometry(proc, GeometryConfig(pad_hw=[800, 800]), sizes)


def test_fsspec_url_store(tmp_path):
    """Any fsspec URL zarr accepts works the same way (memory:// here; s3:// / gs:// in production)."""
    from rtcodetr.cache_teacher.storage import read_manifest

    n, s = 6, 4
    rng = np.random.default_rng(3)
    data = {"encoder": _feature_like(rng, b=n), "logits": rng.normal(size=(n, 6, 3)).astype(np.float32)}
    man = _manifest(n, s)
    url = f"memory://rtcodetr-test-{tmp_path.name}/cache"
    assert read_manifest(url) is None
    group, _ = _write(url, man, data, np.arange(n), batch=4)
    assert finished_shards(open_group(url, "r")).tolist() == [True, True]
    assert read_manifest(url)["storage"]["samples_per_shard"] == s
    smp = read_sample(open_source(url), man, 5, ["encoder"])
    assert cosine(smp["encoder"], data["encoder"][5]) > 0.999


@pytest.mark.parametrize("reference", ["padded", "unpadded"])
def test_boxes_to_original_frame_against_float64_reference(reference):
    from rtcodetr.cache_teacher.geometry import boxes_to_original_frame

    # original 300x400 (h, w) -> input 96x128, padded to 128x160; a box at original xyxy (40, 30, 200, 150)
    orig_hw, input_hw, padded = (300, 400), (96, 128), (128, 160)
    sx, sy = input_hw[1] / orig_hw[1], input_hw[0] / orig_hw[0]
    x1, y1, x2, y2 = 40 * sx, 30 * sy, 200 * sx, 150 * sy  # input pixels
    ref_h, ref_w = padded if reference == "padded" else input_hw
    pred = torch.tensor([[[(x1 + x2) / 2 / ref_w, (y1 + y2) / 2 / ref_h, (x2 - x1) / ref_w, (y2 - y1) / ref_h]]])
    affine = torch.tensor([[[sx, 0, 0], [0, sy, 0], [0, 0, 1]]], dtype=torch.float64)
    out = boxes_to_original_frame(pred, torch.tensor([input_hw]), affine, torch.tensor([orig_hw]), padded, reference)
    expect = [120 / 400, 90 / 300, 160 / 400, 120 / 300]  # cxcywh of (40, 30, 200, 150) over (w, h) = (400, 300)
    np.testing.assert_allclose(out[0, 0].numpy(), expect, rtol=1e-6)


def test_shipped_cache_config_loads_with_the_default_geometry():
    """configs/cache.yaml is what the docs tell users to run: its geometry (box reference included) must not drift
    from the code's defaults, or every documented run would silently use another box convention."""
    from pathlib import Path

    from rtcodetr.cache_teacher import CacheConfig
    from rtcodetr.config import load_config

    cfg = load_config(CacheConfig, Path(__file__).resolve().parents[1] / "configs" / "cache.yaml")
    assert cfg.geometry == GeometryConfig()
    assert cfg.geometry.box_reference == "unpadded"
