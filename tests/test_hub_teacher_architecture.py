"""The real TACO teacher path: a Conditional DETR saved with the hub checkpoint's architecture (timm ResNet
backbone, ``use_timm_backbone=True``, as microsoft/conditional-detr-resnet-50 is) goes through ``init-model --from``,
``set_trainable`` and ``FeatureTap`` like our own presets. Built from a config (resnet18 to stay cheap), no download."""
import pytest
import torch

pytest.importorskip("timm")


@pytest.fixture(scope="module")
def hub_like_teacher(tmp_path_factory):
    from transformers import ConditionalDetrConfig, ConditionalDetrForObjectDetection

    torch.manual_seed(0)
    cfg = ConditionalDetrConfig(use_timm_backbone=True, backbone="resnet18", use_pretrained_backbone=False,
                                num_labels=91, d_model=64, encoder_layers=1, decoder_layers=1,
                                encoder_ffn_dim=128, decoder_ffn_dim=128, num_queries=20)
    model = ConditionalDetrForObjectDetection(cfg)
    out = tmp_path_factory.mktemp("hub_like") / "conditional-detr-timm"
    model.save_pretrained(out)
    return out


def test_init_from_hub_architecture_reinitialises_only_the_head(hub_like_teacher, synthetic_data, tmp_path, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModelForObjectDetection

    from rtcodetr.models import init_model

    out = init_model("conditional-detr-r50", synthetic_data.root, tmp_path / "teacher", from_=str(hub_like_teacher))
    printed = capsys.readouterr().out
    assert "class_labels_classifier.weight" in printed
    src = load_file(hub_like_teacher / "model.safetensors")
    dst = load_file(out / "model.safetensors")
    changed = sorted(k for k in src if k not in dst or src[k].shape != dst[k].shape or not torch.equal(src[k], dst[k]))
    assert changed == ["class_labels_classifier.bias", "class_labels_classifier.weight"]
    model = AutoModelForObjectDetection.from_pretrained(out)
    assert model.config.num_labels == synthetic_data.label_map.num_labels
    assert model.config.id2label[0] == synthetic_data.label_map.names[0]


def test_feature_tap_and_trainable_backbone_on_timm_backbone(hub_like_teacher):
    from transformers import AutoModelForObjectDetection

    from rtcodetr.features import FeatureTap
    from rtcodetr.models import set_trainable

    model = AutoModelForObjectDetection.from_pretrained(hub_like_teacher).eval()
    set_trainable(model, backbone=True, backbone_batchnorm=False)
    assert all(p.requires_grad for p in model.parameters())
    x = torch.rand(1, 3, 128, 160)
    with torch.no_grad(), FeatureTap(model) as tap:
        outputs = model(pixel_values=x)
    assert tap.features["backbone"].shape == (1, 512, 4, 5)  # resnet18 C5, stride 32
    assert tap.features["encoder"].shape == (1, 64, 4, 5)
    memory = outputs.encoder_last_hidden_state  # [B, HW, C]
    torch.testing.assert_close(tap.features["encoder"].flatten(2).transpose(1, 2), memory)
