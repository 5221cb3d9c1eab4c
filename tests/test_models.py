"""Model presets: offline builds, parameter counts, image-processor geometry, init-model, --from, set_trainable."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

from rtcodetr import models
from rtcodetr.models import (
    PRESETS,
    ModelLoadError,
    build_config,
    build_image_processor,
    build_model,
    init_model,
    label_dependent_keys,
    load_model,
    model_family,
    processor_geometry,
    set_trainable,
)

COCO80 = {i: f"class_{i}" for i in range(80)}
TINY = ("rtdetr-tiny", "rtdetr-small", "conditional-detr-tiny")

# Parameters with 80 labels, counted on the meta device. Reference figures: PekingU/rtdetr_r50vd 42.9 M,
# RT-DETR-L (HGNetV2) 32.9 M (issue 2); RT-DETR paper r18/r34/r101 20 M / 31 M / 76 M; Conditional DETR R50 43.4 M.
FULL_PARAMS = {
    "conditional-detr-r50": 43_415_574,
    "rtdetr-r18vd": 20_174_608,
    "rtdetr-r34vd": 31_424_388,
    "rtdetr-r50vd": 42_891_372,
    "rtdetr-r101vd": 76_556_268,
    "rtdetr-l": 32_925_036,
}
# CPU_RECIPES.md figures (4 labels, the synthetic set): 0.82 M, 3.2 M, 2.16 M.
TINY_PARAMS_4 = {"rtdetr-tiny": 821_768, "rtdetr-small": 3_204_544, "conditional-detr-tiny": 2_156_778}


def count_params_meta(preset: str, id2label) -> int:
    from transformers import AutoModelForObjectDetection

    with torch.device("meta"):
        model = AutoModelForObjectDetection.from_config(build_config(preset, id2label))
    return sum(p.numel() for p in model.parameters())


def write_label_map(root: Path, names: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    labels = [{"label": i, "category_id": i + 1, "name": n, "supercategory": "x", "original_ids": [i]}
              for i, n in enumerate(names)]
    (root / "label_map.json").write_text(json.dumps({"labels": labels}))
    return root


@pytest.fixture(scope="module")
def data4(tmp_path_factory) -> Path:
    return write_label_map(tmp_path_factory.mktemp("data4"), ["bottle", "can", "cup", "lid"])


@pytest.fixture(scope="module")
def rtdetr_tiny_dir(tmp_path_factory, data4) -> Path:
    torch.manual_seed(0)
    return init_model("rtdetr-tiny", data4, tmp_path_factory.mktemp("m") / "rtdetr_tiny", verbose=False)


def test_preset_names_match_interfaces():
    assert set(PRESETS) == {"conditional-detr-r50", "conditional-detr-tiny", "rtdetr-r18vd", "rtdetr-r34vd",
                            "rtdetr-r50vd", "rtdetr-r101vd", "rtdetr-l", "rtdetr-tiny", "rtdetr-small"}


@pytest.mark.parametrize("preset", sorted(FULL_PARAMS))
def test_full_preset_param_count(preset):
    assert count_params_meta(preset, COCO80) == FULL_PARAMS[preset]


@pytest.mark.parametrize("preset", TINY)
def test_tiny_preset_param_count_matches_recipe(preset):
    assert count_params_meta(preset, {i: f"c{i}" for i in range(4)}) == TINY_PARAMS_4[preset]


def test_full_size_hgnetv2_preset_runs_a_forward():
    """The one real full-size forward: RT-DETR-L, the only preset whose backbone (HGNetV2) is not a ResNet."""
    torch.manual_seed(0)
    model = build_model("rtdetr-l", COCO80).eval()
    assert type(model.model.backbone.model).__name__ == "HGNetV2Backbone"
    assert model.model.backbone.intermediate_channel_sizes == [512, 1024, 2048]
    with torch.no_grad():
        out = model(pixel_values=torch.rand(1, 3, 160, 160))  # >= 300 tokens over strides 8/16/32
    assert out.logits.shape == (1, 300, 80)
    assert torch.isfinite(out.pred_boxes).all()


@pytest.mark.parametrize("preset", TINY)
def test_tiny_preset_forward_and_loss(preset):
    torch.manual_seed(0)
    model = build_model(preset, {0: "a", 1: "b", 2: "c"})
    x = torch.rand(2, 3, 96, 128)
    model.eval()
    with torch.no_grad():
        out = model(pixel_values=x)
    q = model.config.num_queries
    assert out.logits.shape == (2, q, 3) and out.pred_boxes.shape == (2, q, 4)
    assert ((out.pred_boxes >= 0) & (out.pred_boxes <= 1)).all()
    model.train()
    labels = [{"class_labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.1, 0.1]])},
              {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.4, 0.4, 0.5, 0.5]])}]
    out = model(pixel_values=x, labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_image_processor_geometry(preset):
    geom = processor_geometry(build_image_processor(preset))
    family = model_family(build_config(preset, {0: "a"}))
    if family == "rtdetr":
        assert geom["mode"] == "fixed" and geom["normalize"] is None
        assert geom["size_hw"] == ((320, 320) if preset in ("rtdetr-tiny", "rtdetr-small") else (640, 640))
    else:
        assert family == "conditional_detr"
        assert geom["mode"] == "shortest_edge"
        assert (geom["shortest_edge"], geom["longest_edge"]) == ((320, 512) if "tiny" in preset else (800, 1333))
        assert geom["normalize"] == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert geom["rescale_factor"] == pytest.approx(1 / 255)


def test_processor_geometry_rejects_unknown_size():
    proc = build_image_processor("rtdetr-tiny")
    proc.size = {"foo": 3}
    with pytest.raises(ValueError, match="unsupported image-processor size"):
        processor_geometry(proc)


def test_unknown_preset_suggests_closest():
    with pytest.raises(ValueError, match="did you mean 'rtdetr-tiny'"):
        build_config("rtdetr-tiyn", {0: "a"})


def test_init_model_writes_loadable_dir(rtdetr_tiny_dir, data4):
    assert (rtdetr_tiny_dir / "model.safetensors").is_file()
    assert (rtdetr_tiny_dir / "preprocessor_config.json").is_file()
    model, proc = load_model(rtdetr_tiny_dir)
    assert model.config.id2label == {0: "bottle", 1: "can", 2: "cup", 3: "lid"}
    assert model.config.label2id == {"bottle": 0, "can": 1, "cup": 2, "lid": 3}
    assert type(proc).__name__ == "RTDetrImageProcessor"
    assert processor_geometry(proc) == processor_geometry(build_image_processor("rtdetr-tiny"))
    assert not model.training


def test_cli_main_conditional_detr(tmp_path, data4, capsys):
    out = tmp_path / "cd"
    assert models.main(["--preset", "conditional-detr-tiny", "--data", str(data4), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    model, proc = load_model(out)
    assert model_family(model) == "conditional_detr" and model.config.num_labels == 4
    assert processor_geometry(proc)["shortest_edge"] == 320


def test_cli_main_reports_bad_label_map(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "label_map.json").write_text(json.dumps({"labels": [{"label": 0, "name": "a"}, {"label": 5, "name": "b"}]}))
    assert models.main(["--preset", "rtdetr-tiny", "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "label_map.json" in err and "contiguous" in err
    assert models.main(["--preset", "rtdetr-tiny", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "prepared dataset" in capsys.readouterr().err


def test_label_dependent_keys_are_the_heads():
    keys = label_dependent_keys(build_config("rtdetr-tiny", {0: "a", 1: "b"}))
    assert "model.denoising_class_embed.weight" in keys
    assert "model.enc_score_head.weight" in keys and "model.enc_score_head.bias" in keys
    assert {f"model.decoder.class_embed.{i}.weight" for i in range(3)} <= keys
    assert all("class" in k or "score" in k for k in keys)
    cd = label_dependent_keys(build_config("conditional-detr-tiny", {0: "a", 1: "b"}))
    assert cd == {"class_labels_classifier.weight", "class_labels_classifier.bias"}


def test_init_from_reinitialises_only_label_dependent_tensors(tmp_path, rtdetr_tiny_dir, capsys):
    data6 = write_label_map(tmp_path / "data6", ["a", "b", "c", "d", "e", "f"])
    torch.manual_seed(1)
    out = init_model("rtdetr-tiny", data6, tmp_path / "from", from_=rtdetr_tiny_dir)
    printed = capsys.readouterr().out
    src, _ = load_model(rtdetr_tiny_dir)
    new, _ = load_model(out)
    assert new.config.id2label == {i: n for i, n in enumerate("abcdef")}
    src_sd, new_sd = src.state_dict(), new.state_dict()
    assert src_sd.keys() == new_sd.keys()
    head = label_dependent_keys(new.config)
    assert head, "the class heads must depend on the label count"
    for key in src_sd:
        if key in head:
            assert src_sd[key].shape != new_sd[key].shape, key
            assert new_sd[key].shape[0] in (6, 7), key  # K labels (+1 for the denoising "no object" embedding)
            assert key in printed
        else:
            assert torch.equal(src_sd[key], new_sd[key]), key
    assert f"re-initialised {len(head)} label-dependent tensors" in printed


def test_init_from_same_label_map_copies_everything(tmp_path, rtdetr_tiny_dir, data4):
    out = init_model("rtdetr-tiny", data4, tmp_path / "same", from_=rtdetr_tiny_dir, verbose=False)
    src_sd = load_model(rtdetr_tiny_dir)[0].state_dict()
    new_sd = load_model(out)[0].state_dict()
    assert all(torch.equal(src_sd[k], new_sd[k]) for k in src_sd)


def test_init_from_wrong_family_is_an_error(tmp_path, rtdetr_tiny_dir, data4):
    with pytest.raises(ValueError, match="rtdetr model but preset 'conditional-detr-tiny' is conditional_detr"):
        init_model("conditional-detr-tiny", data4, tmp_path / "x", from_=rtdetr_tiny_dir, verbose=False)


def test_offline_hub_id_fails_fast_without_network(monkeypatch, tmp_path, data4, capsys):
    def no_network(*args, **kwargs):
        raise AssertionError("a network connection was attempted while offline")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(ModelLoadError, match="could not load model 'rtcodetr-test/no-such-model' offline") as e:
        load_model("rtcodetr-test/no-such-model")
    assert "pass a local model directory" in str(e.value)
    code = models.main(["--preset", "rtdetr-tiny", "--data", str(data4), "--out", str(tmp_path / "o"),
                        "--from", "rtcodetr-test/no-such-model"])
    assert code == 2 and "offline" in capsys.readouterr().err
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "missing_dir")


def _eval_out(model, x):
    model.eval()
    with torch.no_grad():
        out = model(pixel_values=x)
    return out.logits, out.pred_boxes


def test_set_trainable_conditional_detr_undoes_freeze_and_round_trips(tmp_path):
    from transformers import AutoModelForObjectDetection

    torch.manual_seed(0)
    model = build_model("conditional-detr-tiny", {0: "a", 1: "b"})
    backbone = model.model.backbone
    # transformers 5.x freezes the whole HF-ResNet backbone by accident and uses frozen BatchNorm.
    assert not any(p.requires_grad for p in backbone.parameters())
    x = torch.rand(2, 3, 64, 96)
    before = _eval_out(model, x)

    log = set_trainable(model, backbone=True, backbone_batchnorm=True)
    assert all(p.requires_grad for p in model.parameters())
    bns = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(type(m).__name__.endswith("FrozenBatchNorm2d") for m in backbone.modules())
    assert any(line.startswith("model.backbone: trainable") for line in log)
    assert any(f"{len(bns)} trainable, 0 frozen" in line for line in log)
    after = _eval_out(model, x)  # same statistics -> same eval output
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(before, after))

    model.train()  # one batch-statistics pass moves the running statistics and affine params get grads
    model(pixel_values=x).logits.sum().backward()
    assert bns[0].weight.grad is not None and not torch.equal(bns[0].running_mean, torch.zeros_like(bns[0].running_mean))
    trained = _eval_out(model, x)
    model.save_pretrained(tmp_path / "m")
    loaded, info = AutoModelForObjectDetection.from_pretrained(tmp_path / "m", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    reloaded = _eval_out(loaded, x)
    # Same statistics; frozen BN computes x * scale + shift instead of F.batch_norm: equal up to float rounding.
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in zip(trained, reloaded)), \
        max((a - b).abs().max().item() for a, b in zip(trained, reloaded))

    log = set_trainable(loaded, backbone=False, backbone_batchnorm=True)
    assert not any(p.requires_grad for p in loaded.model.backbone.parameters())
    assert any(line.startswith("model.backbone: frozen") for line in log)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in zip(trained, _eval_out(loaded, x)))


def test_set_trainable_rtdetr_freezes_batchnorm_and_round_trips(tmp_path):
    from transformers import AutoModelForObjectDetection

    torch.manual_seed(0)
    model = build_model("rtdetr-tiny", {0: "a", 1: "b"})
    x = torch.rand(1, 3, 96, 96)  # RT-DETR needs >= num_queries (100) tokens over strides 8/16/32
    model.train()
    model(pixel_values=x)  # move running statistics away from their init
    before = _eval_out(model, x)
    set_trainable(model, backbone=True, backbone_batchnorm=False)
    assert model.config.freeze_backbone_batch_norms is True
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.model.backbone.modules())
    frozen = _eval_out(model, x)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in zip(before, frozen))
    model.save_pretrained(tmp_path / "m")
    loaded, info = AutoModelForObjectDetection.from_pretrained(tmp_path / "m", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert all(torch.equal(a, b) for a, b in zip(frozen, _eval_out(loaded, x)))

    set_trainable(loaded, backbone=True, backbone_batchnorm=True)  # frozen -> trainable nn.BatchNorm2d again
    assert loaded.config.freeze_backbone_batch_norms is False
    assert sum(type(m) is torch.nn.BatchNorm2d for m in loaded.model.backbone.modules()) == 15
    loaded.save_pretrained(tmp_path / "m2")
    again, info = AutoModelForObjectDetection.from_pretrained(tmp_path / "m2", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in zip(frozen, _eval_out(again, x)))


def test_model_family_unwraps():
    model = build_model("rtdetr-tiny", {0: "a"})
    wrapper = torch.nn.Module()
    wrapper.module = model
    assert model_family(wrapper) == model_family(model.config) == "rtdetr"


@pytest.mark.parametrize("preset", ["rtdetr-tiny", "conditional-detr-tiny"])
def test_conftest_tiny_model_dir_fixture(tiny_model_dir, synthetic_data, preset):
    """The shared fixture other stages build on: a saved tiny model with the synthetic label map."""
    model, proc = load_model(tiny_model_dir(preset))
    assert model.config.id2label == synthetic_data.label_map.id2label
    assert processor_geometry(proc) == processor_geometry(build_image_processor(preset))


def test_offline_hub_id_in_local_cache_loads(monkeypatch, tmp_path, rtdetr_tiny_dir, data4):
    """Offline, a hub id resolves from the local Hugging Face cache (the same code path that downloads online)."""
    import shutil

    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--rtcodetr-test--tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(rtdetr_tiny_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model, proc = load_model("rtcodetr-test/tiny")
    assert model.config.id2label == {0: "bottle", 1: "can", 2: "cup", 3: "lid"}
    out = init_model("rtdetr-tiny", data4, tmp_path / "from_hub", from_="rtcodetr-test/tiny", verbose=False)
    assert load_model(out)[0].config.num_labels == 4


def test_init_model_is_reproducible_for_a_seed(synthetic_data, tmp_path):
    """The same command writes the same weights (the demo's teacher and students must not vary run to run), whatever
    the caller's RNG state; another seed gives other weights; the caller's RNG is left untouched."""
    import torch
    from safetensors.torch import load_file

    from rtcodetr.models import init_model

    torch.manual_seed(123)
    a = load_file(init_model("rtdetr-tiny", synthetic_data.root, tmp_path / "a", verbose=False) / "model.safetensors")
    after = torch.rand(1)
    torch.manual_seed(123)
    torch.rand(7)  # a different caller RNG state must not matter
    b = load_file(init_model("rtdetr-tiny", synthetic_data.root, tmp_path / "b", verbose=False) / "model.safetensors")
    c = load_file(init_model("rtdetr-tiny", synthetic_data.root, tmp_path / "c", verbose=False, seed=1)
                  / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), after)  # init_model did not advance the caller's generator


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_built_presets_start_with_batchnorm_weight_one_outside_the_backbone(preset):
    """transformers 5.x draws RT-DETR's non-backbone BatchNorm weights from N(0, 0.01), which leaves the decoder
    nearly blind; every preset built from its config must start at weight 1 / bias 0 / unit running variance."""
    torch.manual_seed(0)
    model = build_model(preset, {0: "a", 1: "b"})
    backbone = {id(m) for m in model.model.backbone.modules()}
    outside = [(n, m) for n, m in model.named_modules()
               if isinstance(m, torch.nn.BatchNorm2d) and id(m) not in backbone]
    if model_family(model) == "rtdetr":
        assert len(outside) > 10  # encoder input projections, CSP blocks, decoder input projections
    for name, m in outside:
        assert torch.equal(m.weight, torch.ones_like(m.weight)), name
        assert torch.equal(m.bias, torch.zeros_like(m.bias)), name
        assert torch.equal(m.running_var, torch.ones_like(m.running_var)), name
    for m in model.model.backbone.modules():  # the backbone's own init was right and stays as it was
        if isinstance(m, torch.nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
