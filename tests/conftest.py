"""Shared test set-up: offline everything, small fixtures built once per session.

Every hub lookup must fail at once (no network in CI), so the offline switches are set before transformers or
ultralytics are imported by any test module.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "False")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="rtcodetr-yolo-cfg-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TACO = SHARED / "data" / "taco"


@pytest.fixture(scope="session")
def taco_sample() -> dict[str, Path]:
    """Paths of the 80 real TACO photos and their official annotations (plus the full official file)."""
    if not (TACO / "sample" / "annotations.json").is_file():
        pytest.skip("../shared/data/taco is not beside the repository")
    return {
        "annotations": TACO / "sample" / "annotations.json",
        "images": TACO / "sample" / "images",
        "official": TACO / "annotations.json",
        "seed_val_ids": TACO / "seed_val_image_ids.txt",
    }


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """A small synthetic prepared dataset (16 train / 8 val / 8 test images at 128 px)."""
    from rtcodetr.data.synthetic import make_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    return make_synthetic(out, train=16, val=8, test=8, size=128, seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, synthetic_data):
    """Factory: ``tiny_model_dir("rtdetr-tiny")`` -> a saved model directory for the synthetic label map (cached)."""
    from rtcodetr.models import init_model

    made: dict[str, Path] = {}

    def make(preset: str) -> Path:
        if preset not in made:
            out = tmp_path_factory.mktemp(preset.replace("-", "_"))
            made[preset] = init_model(preset, synthetic_data.root, out / "model")
        return made[preset]

    return make


@pytest.fixture(scope="session")
def small_cache(tmp_path_factory, synthetic_data, tiny_model_dir):
    """A finished teacher cache of the synthetic train split: rtdetr-tiny teacher at 128x128, 16 samples in 4 shards
    of 4, float32 maps (a random-init teacher's maps are below float16's range). Copy it before damaging it."""
    from rtcodetr.cache_teacher import CacheConfig, run
    from rtcodetr.config import load_config

    import torch

    out = tmp_path_factory.mktemp("small_cache") / "cache"
    # one teacher thread, whichever test first asks for it: tests that recompute shards of it and compare bytes run
    # on one thread too (other thread counts reorder float reductions)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(load_config(CacheConfig, None, [
            f"data={synthetic_data.root}", f"teacher={tiny_model_dir('rtdetr-tiny')}", f"out={out}",
            "samples_per_shard=4", "batch_size=4", "num_workers=0", "progress=false", "dtype=float32",
            "geometry.size_hw=[128,128]"]))
    finally:
        torch.set_num_threads(before)
    return out
