"""Unlabelled images in training (issue: distil on unlabelled images): mixed batches, detection loss on labelled
images only, refusals, exact resume. Tiny presets, 128 px synthetic images, a few steps."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rtcodetr.config import ConfigError, load_config

COMMON = ["batch_size=4", "num_workers=0", "image_size=[128, 128]", "log_with=[]", "optim.warmup_steps=2",
          "optim.ema_warmup=5", "eval_every=0"]


@pytest.fixture(scope="module")
def unl_data(tmp_path_factory):
    from rtcodetr.data.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("unl"), train=8, val=4, test=4, size=128, seed=0, unlabeled=8)


@pytest.fixture(scope="module")
def unl_models(tmp_path_factory, unl_data):
    from rtcodetr.models import init_model

    root = tmp_path_factory.mktemp("unl_models")
    return {p: init_model(p, unl_data.root, root / p, verbose=False) for p in ("rtdetr-tiny", "rtdetr-small")}


@pytest.fixture(scope="module")
def unl_caches(tmp_path_factory, unl_data, unl_models):
    from rtcodetr.cache_teacher import CacheConfig, run

    out = {}
    for split in ("train", "unlabeled"):
        out[split] = tmp_path_factory.mktemp("unl_cache") / f"{split}.zarr"
        run(CacheConfig(data=str(unl_data.root), split=split, teacher=str(unl_models["rtdetr-small"]),
                        out=str(out[split]), num_workers=0, batch_size=8, progress=False, dtype="float32"))
    return out


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(**kv):
    from rtcodetr.train_student.config import TrainConfig

    return load_config(TrainConfig, None, COMMON + [f"{k}={v}" for k, v in kv.items()])


def test_mixed_batches_are_deterministic_resumable_and_split_across_processes():
    from rtcodetr.train_student.sampling import MixedBatchSampler

    def batches(rank=0, world=1, epoch=1, start=0):
        s = MixedBatchSampler(10, 7, 3, 2, seed=5, rank=rank, world=world)
        s.set_epoch(epoch, start_batch=start)
        return list(s)

    full = batches()
    assert len(full) == 3 and all(len(b) == 5 for b in full)
    for b in full:
        assert all(i < 10 for i in b[:3]) and all(10 <= i < 17 for i in b[3:])
    assert batches(start=1) == full[1:]  # a resumed epoch sees the same batches
    assert batches(epoch=0) != full
    # every unlabelled image is used once before any repeats (a new permutation per pass)
    stream = [i for e in range(3) for b in batches(epoch=e) for i in b[3:]]
    assert sorted(stream[:7]) == list(range(10, 17))
    # two processes: the same global batches, dealt out by rank (3 labelled per batch, 10 images: 1 batch each)
    two = [batches(rank=r, world=2) for r in (0, 1)]
    assert len(two[0]) == len(two[1]) == 1 and two[0] != two[1]


def test_detection_loss_ignores_unlabelled_images(unl_models):
    """The unlabelled image's queries get no gradient from the detection loss; the labelled one's do; a batch of
    unlabelled images alone gives a zero, finite detection loss that can be backpropagated."""
    from rtcodetr.models import load_model
    from rtcodetr.train_student.losses import labelled_detection_loss as _labelled_detection_loss

    torch.manual_seed(0)
    model, _ = load_model(unl_models["rtdetr-tiny"])
    model.train()
    labels = [{"class_labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.4, 0.4, 0.2, 0.2], [0.7, 0.6, 0.2, 0.3]])},
              {"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}]
    out = model(pixel_values=torch.rand(2, 3, 128, 128), labels=labels)
    out.intermediate_logits.retain_grad()
    loss = _labelled_detection_loss(model, out, labels, [True, False])
    assert torch.isfinite(loss) and float(loss) > 0
    loss.backward(retain_graph=True)
    grad = out.intermediate_logits.grad
    assert grad[1].abs().max() == 0 and grad[0].abs().max() > 0
    model.zero_grad()
    none = _labelled_detection_loss(model, out, labels, [False, False])
    assert float(none) == 0.0 and torch.isfinite(none)
    none.backward()
    assert all(float(p.grad.abs().max()) == 0 for p in model.parameters() if p.grad is not None)


def test_unlabelled_split_trains_and_resumes_exactly(tmp_path, unl_data, unl_models, unl_caches, one_thread):
    from rtcodetr.train_student.train import run

    common = dict(data=unl_data.root, model=unl_models["rtdetr-tiny"], cache=unl_caches["train"],
                  unlabeled_split="unlabeled", unlabeled_cache=unl_caches["unlabeled"], max_steps=4,
                  **{"loss.feature_weight": 1, "loss.prediction_weight": 1})
    straight = run(_cfg(out=tmp_path / "a", **common))
    assert straight["steps"] == 4 and {"feature", "pred_class"} <= set(straight["losses"])
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["type"] == "train"]
    assert all(np.isfinite(r["loss/total"]) and r["loss/pred_class"] > 0 for r in train_rows)
    first = run(_cfg(out=tmp_path / "b", stop_after_steps=2, **common))
    assert first["interrupted"]
    run(_cfg(out=tmp_path / "b", resume="auto", **common))

    def losses(d):
        return [json.loads(x)["loss/total"] for x in (d / "metrics.jsonl").read_text().splitlines()
                if json.loads(x)["type"] == "train"]

    np.testing.assert_allclose(losses(tmp_path / "b"), losses(tmp_path / "a"), rtol=1e-5)


def test_unlabelled_split_refusals(tmp_path, unl_data, unl_models, unl_caches):
    from rtcodetr.train_student.train import run

    base = dict(data=unl_data.root, model=unl_models["rtdetr-tiny"], max_steps=1, out=tmp_path / "r")
    with pytest.raises(ConfigError, match="needs its teacher cache"):
        run(_cfg(unlabeled_split="unlabeled", **{"loss.feature_weight": 1}, **base))
    with pytest.raises(ConfigError, match="has annotations"):
        run(_cfg(unlabeled_split="val", unlabeled_cache=unl_caches["train"], **{"loss.feature_weight": 1}, **base))
    with pytest.raises(ConfigError, match="distillation losses"):
        run(_cfg(unlabeled_split="unlabeled", unlabeled_cache=unl_caches["unlabeled"], **base))
    with pytest.raises(ConfigError, match="at least one of each kind"):
        run(_cfg(unlabeled_split="unlabeled", unlabeled_cache=unl_caches["unlabeled"], unlabeled_ratio=1.0,
                 **{"loss.feature_weight": 1}, **base))
