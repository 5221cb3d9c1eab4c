"""FeatureTap: stride-32 shapes, equality with the detector's own outputs, gradients, hook removal, wrappers."""
from __future__ import annotations

import pytest
import torch

from rtcodetr.features import FeatureTap, feature_channels
from rtcodetr.models import build_model, set_trainable

ID2LABEL = {0: "a", 1: "b", 2: "c"}


@pytest.fixture(scope="module")
def rtdetr():
    torch.manual_seed(0)
    return build_model("rtdetr-tiny", ID2LABEL)


@pytest.fixture(scope="module")
def cdetr():
    torch.manual_seed(0)
    model = build_model("conditional-detr-tiny", ID2LABEL)
    set_trainable(model, backbone=True, backbone_batchnorm=True)  # as the trainer uses it
    return model


def _labels(batch: int) -> list[dict[str, torch.Tensor]]:
    return [{"class_labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.2], [0.2, 0.7, 0.1, 0.1]])}
            for _ in range(batch)]


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_feature_channels(rtdetr, cdetr):
    assert feature_channels(rtdetr) == {"backbone": 128, "encoder": 64}
    assert feature_channels(cdetr) == {"backbone": 256, "encoder": 128}


@pytest.mark.parametrize("family", ["rtdetr", "cdetr"])
def test_shapes_are_stride_32(family, request):
    model = request.getfixturevalue(family).eval()
    x = torch.rand(2, 3, 96, 160)  # -> 3 x 5 at stride 32
    with torch.no_grad(), FeatureTap(model) as tap:
        model(pixel_values=x)
    channels = feature_channels(model)
    for name in ("backbone", "encoder"):
        assert tap.features[name].shape == (2, channels[name], 3, 5), name
        assert tap.features[name].dtype == torch.float32 and not tap.features[name].requires_grad
    assert tap.mask.shape == (2, 3, 5) and tap.mask.dtype == torch.bool and tap.mask.all()


def test_rtdetr_equals_direct_outputs(rtdetr):
    model = rtdetr.eval()
    x = torch.rand(2, 3, 96, 128)
    with torch.no_grad(), FeatureTap(model) as tap:
        out = model(pixel_values=x)
        direct_backbone = model.model.backbone(x, torch.ones(2, 96, 128))[-1][0]
    assert torch.equal(tap.features["encoder"], out.encoder_last_hidden_state[-1])
    assert torch.equal(tap.features["backbone"], direct_backbone)
    # The stride-32 entry is the last (smallest) of the encoder's three maps.
    assert [tuple(t.shape[-2:]) for t in out.encoder_last_hidden_state] == [(12, 16), (6, 8), (3, 4)]


def test_conditional_detr_equals_direct_outputs(cdetr):
    model = cdetr.eval()
    x = torch.rand(2, 3, 96, 128)
    mask = torch.ones(2, 96, 128, dtype=torch.long)
    mask[1, :, 64:] = 0  # second image padded on the right: 2 of 4 feature columns are real
    with torch.no_grad(), FeatureTap(model) as tap:
        out = model(pixel_values=x, pixel_mask=mask)
        direct_backbone = model.model.backbone(x, mask)[-1][0]
    enc = tap.features["encoder"]
    assert enc.shape == (2, 128, 3, 4)
    assert torch.equal(enc.flatten(2).transpose(1, 2), out.encoder_last_hidden_state)
    assert torch.equal(tap.features["backbone"], direct_backbone)
    assert tap.mask[0].all() and tap.mask[1, :, :2].all() and not tap.mask[1, :, 2:].any()


def test_rtdetr_training_with_denoising_keeps_gradients(rtdetr):
    model = rtdetr.train()
    x = torch.rand(2, 3, 96, 96)
    model.zero_grad()
    with FeatureTap(model) as tap:
        out = model(pixel_values=x, labels=_labels(2))
    assert out.denoising_meta_values is not None  # denoising queries were really on
    assert all(t.requires_grad for t in tap.features.values())
    (tap.features["backbone"].square().mean() + tap.features["encoder"].square().mean()).backward()
    stem = model.model.backbone.model.embedder.embedder[0].convolution.weight
    assert stem.grad is not None and stem.grad.abs().sum() > 0
    assert model.model.encoder.pan_blocks[-1].conv1.conv.weight.grad.abs().sum() > 0


def test_conditional_detr_training_gradients_reach_backbone(cdetr):
    model = cdetr.train()
    model.zero_grad()
    with FeatureTap(model, names=("backbone",)) as tap:
        model(pixel_values=torch.rand(1, 3, 64, 64), labels=_labels(1))
    assert set(tap.features) == {"backbone"}
    tap.features["backbone"].mean().backward()
    assert model.model.backbone.model.embedder.embedder.convolution.weight.grad.abs().sum() > 0


def test_hooks_removed_on_exit_and_on_error(rtdetr):
    base = _hooks(rtdetr)
    with FeatureTap(rtdetr) as tap:
        assert _hooks(rtdetr) > base
    assert _hooks(rtdetr) == base
    with pytest.raises(RuntimeError, match="boom"):
        with FeatureTap(rtdetr):
            raise RuntimeError("boom")
    assert _hooks(rtdetr) == base
    with torch.no_grad():
        rtdetr.eval()(pixel_values=torch.rand(1, 3, 96, 96))
    assert tap.features == {}  # exited before any forward: nothing captured afterwards


def test_works_through_ddp_wrapper(rtdetr, tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(rtdetr.train())
        with FeatureTap(wrapped) as tap:
            wrapped(pixel_values=torch.rand(1, 3, 96, 96), labels=_labels(1))
        assert tap.features["backbone"].shape == (1, 128, 3, 3) and tap.features["backbone"].requires_grad
    finally:
        dist.destroy_process_group()


def test_bad_names_and_family():
    model = build_model("rtdetr-tiny", ID2LABEL)
    with pytest.raises(ValueError, match="subset of"):
        FeatureTap(model, names=("neck",))
    with pytest.raises(TypeError, match="no config"):
        FeatureTap(torch.nn.Linear(2, 2))
