"""Model presets: HF ``transformers`` detectors built from configs (no download), their image processors, loading,
trainability switches and ``rtcodetr init-model``.

Presets (``PRESETS[name](id2label) -> config``):

=====================  ============================================================  =================  ======
name                   architecture                                                  params, 80 labels  GFLOPs
=====================  ============================================================  =================  ======
conditional-detr-r50   microsoft/conditional-detr-resnet-50 (HF ResNet-50 backbone)  43.42 M
conditional-detr-tiny  CPU recipe: ResNet [32,64,128,256] basic, d 128, 10 queries   2.16 M (4 lab.)
rtdetr-r18vd           PekingU/rtdetr_r18vd                                          20.17 M           61.5
rtdetr-r34vd           PekingU/rtdetr_r34vd                                          31.42 M
rtdetr-r50vd           PekingU/rtdetr_r50vd                                          42.89 M           137.8
rtdetr-r101vd          PekingU/rtdetr_r101vd                                         76.56 M
rtdetr-l               RT-DETR-L: PP-HGNetV2-L backbone (paper: 32 M, 110 GFLOPs)    32.93 M           111.7
rtdetr-tiny            CPU student: ResNet-vd [16,32,64,128], d 64, 100 queries      0.82 M (4 lab.)
rtdetr-small           CPU demo teacher: ResNet-vd [32,64,128,256], d 128            3.20 M (4 lab.)
=====================  ============================================================  =================  ======

GFLOPs at 640x640, batch 1, with ``rtcodetr.evaluate.complexity.count_flops`` (2 FLOPs per MAC).
The exact counts are asserted in ``tests/test_models.py``. The Conditional DETR presets use the transformers ResNet
backbone (``use_timm_backbone=False``): same layers and parameter count as the timm ResNet-50 of the hub checkpoint,
different parameter names. A hub checkpoint loads through ``--from``, which keeps the checkpoint's own (timm)
architecture; that is what the ``timm`` dependency is for.

Input geometry and normalisation always come from a model's own image processor (see ``processor_geometry``):
RT-DETR takes plain ``[0, 1]`` pixels (``do_normalize=False``) resized to a fixed 640x640 (320x320 for the tiny CPU
presets); Conditional DETR takes ImageNet mean/std and an aspect-preserving resize to shortest edge 800 / longest
1333 (320 / 512 for ``conditional-detr-tiny``, small enough for CPU training), padded per batch with a pixel mask.

Two transformers 5.x behaviours matter for training from scratch (see ``set_trainable``): Conditional DETR freezes
its whole HF-ResNet backbone by accident (its name filter looks for ``stage.1`` while parameters are called
``stages.1``) and always swaps BatchNorm for a frozen BatchNorm, which is an identity at random init.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from rtcodetr.errors import BAD_INPUT_EXIT, InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ModelLoadError(OSError, InputError):
    """A model directory or hub id could not be loaded; the message says why and what to pass instead."""


# --------------------------------------------------------------------------------------------------------------------
# Preset configs
# --------------------------------------------------------------------------------------------------------------------
def _labels(id2label: Mapping[int, str]) -> dict[str, Any]:
    """HF config keyword arguments for a contiguous label map ``{0: name, ..., K-1: name}``."""
    id2label = {int(k): str(v) for k, v in id2label.items()}
    if sorted(id2label) != list(range(len(id2label))) or not id2label:
        raise ValueError(f"id2label must map the contiguous labels 0..K-1 to names, got keys {sorted(id2label)[:10]}")
    if len(set(id2label.values())) != len(id2label):
        raise ValueError("id2label has duplicate class names; label2id would be ambiguous")
    return {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}


def _conditional_detr(
    id2label: Mapping[int, str], *, embedding_size: int, hidden_sizes: Sequence[int], depths: Sequence[int],
    layer_type: str, d_model: int, layers: int, heads: int, ffn_dim: int, **overrides: Any,
):
    """Conditional DETR on the transformers ResNet (C5 only out), with symmetric encoder/decoder sizes."""
    from transformers import ConditionalDetrConfig, ResNetConfig

    backbone = ResNetConfig(
        embedding_size=embedding_size, hidden_sizes=list(hidden_sizes), depths=list(depths), layer_type=layer_type,
        out_features=["stage4"],
    )
    return ConditionalDetrConfig(
        backbone_config=backbone, use_timm_backbone=False, d_model=d_model, encoder_layers=layers,
        decoder_layers=layers, encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=ffn_dim,
        decoder_ffn_dim=ffn_dim, **overrides, **_labels(id2label),
    )


def _conditional_detr_r50(id2label: Mapping[int, str]):
    # microsoft/conditional-detr-resnet-50: ResNet-50 (torchvision-style stride in the 3x3 conv, which is HF's
    # default downsample_in_bottleneck=False), C5 only, 6+6 layers, d_model 256, 300 queries, focal loss.
    return _conditional_detr(
        id2label, embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3],
        layer_type="bottleneck", d_model=256, layers=6, heads=8, ffn_dim=2048, num_queries=300, dropout=0.1,
        auxiliary_loss=False,
    )


def _conditional_detr_tiny(id2label: Mapping[int, str]):
    # CPU_RECIPES: 10 queries and dropout 0 (100 or 30 queries collapse to one box from scratch), aux loss on.
    return _conditional_detr(
        id2label, embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1], layer_type="basic",
        d_model=128, layers=2, heads=4, ffn_dim=256, num_queries=10, dropout=0.0, auxiliary_loss=True,
    )


def _rtdetr_resnet(
    id2label: Mapping[int, str], *, depths: Sequence[int], hidden_sizes: Sequence[int], layer_type: str,
    embedding_size: int = 64, **overrides: Any,
):
    """RT-DETR with the ResNet-vd backbone (stages 2-4 out, strides 8/16/32), as in the PekingU conversions."""
    from transformers import RTDetrConfig

    backbone = {
        "model_type": "rt_detr_resnet", "embedding_size": embedding_size, "hidden_sizes": list(hidden_sizes),
        "depths": list(depths), "layer_type": layer_type, "out_indices": [2, 3, 4],
    }
    return RTDetrConfig(backbone_config=backbone, encoder_in_channels=list(hidden_sizes[1:]), **overrides,
                        **_labels(id2label))


def _rtdetr_r18vd(id2label):
    return _rtdetr_resnet(id2label, depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], layer_type="basic",
                          hidden_expansion=0.5, decoder_layers=3)


def _rtdetr_r34vd(id2label):
    return _rtdetr_resnet(id2label, depths=[3, 4, 6, 3], hidden_sizes=[64, 128, 256, 512], layer_type="basic",
                          hidden_expansion=0.5, decoder_layers=4)


def _rtdetr_r50vd(id2label):
    return _rtdetr_resnet(id2label, depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048],
                          layer_type="bottleneck")


def _rtdetr_r101vd(id2label):
    return _rtdetr_resnet(id2label, depths=[3, 4, 23, 3], hidden_sizes=[256, 512, 1024, 2048],
                          layer_type="bottleneck", encoder_hidden_dim=384, encoder_ffn_dim=2048,
                          decoder_in_channels=[384, 384, 384])


def _rtdetr_l(id2label):
    from transformers import RTDetrConfig

    # RT-DETR-L of the paper (rtdetr_hgnetv2_l_6x_coco): PP-HGNetV2-L, whose stage layout is transformers'
    # HGNetV2Config default; stages 2-4 (512/1024/2048 channels) feed the hybrid encoder. RTDetrConvEncoder builds
    # any AutoBackbone from backbone_config, so the HGNetV2 backbone needs no custom code.
    backbone = {
        "model_type": "hgnet_v2", "embedding_size": 64, "depths": [1, 1, 3, 1],
        "hidden_sizes": [128, 512, 1024, 2048], "stem_channels": [3, 32, 48],
        "stage_in_channels": [48, 128, 512, 1024], "stage_mid_channels": [48, 96, 192, 384],
        "stage_out_channels": [128, 512, 1024, 2048], "stage_num_blocks": [1, 1, 3, 1],
        "stage_downsample": [False, True, True, True], "stage_light_block": [False, False, True, True],
        "stage_kernel_size": [3, 3, 5, 5], "stage_numb_of_layers": [6, 6, 6, 6],
        "use_learnable_affine_block": False, "out_indices": [2, 3, 4],
    }
    return RTDetrConfig(backbone_config=backbone, encoder_in_channels=[512, 1024, 2048], **_labels(id2label))


def _rtdetr_cpu(id2label, hidden_sizes: Sequence[int], width: int):
    """The CPU_RECIPES RT-DETRs: basic-block ResNet-vd, trainable BatchNorm (from scratch), FFN 2x width."""
    return _rtdetr_resnet(
        id2label, depths=[1, 1, 1, 1], hidden_sizes=hidden_sizes, layer_type="basic",
        embedding_size=hidden_sizes[0], freeze_backbone_batch_norms=False, encoder_hidden_dim=width,
        hidden_expansion=0.5, d_model=width, decoder_in_channels=[width] * 3, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=2 * width, decoder_ffn_dim=2 * width, decoder_layers=3,
        num_queries=100, num_denoising=100,
    )


def _rtdetr_tiny(id2label):
    return _rtdetr_cpu(id2label, [16, 32, 64, 128], 64)


def _rtdetr_small(id2label):
    return _rtdetr_cpu(id2label, [32, 64, 128, 256], 128)


PRESETS: dict[str, Callable[[Mapping[int, str]], Any]] = {
    "conditional-detr-r50": _conditional_detr_r50,
    "conditional-detr-tiny": _conditional_detr_tiny,
    "rtdetr-r18vd": _rtdetr_r18vd,
    "rtdetr-r34vd": _rtdetr_r34vd,
    "rtdetr-r50vd": _rtdetr_r50vd,
    "rtdetr-r101vd": _rtdetr_r101vd,
    "rtdetr-l": _rtdetr_l,
    "rtdetr-tiny": _rtdetr_tiny,
    "rtdetr-small": _rtdetr_small,
}

# Input geometry per preset: ("fixed", (h, w)) or ("shortest_edge", (shortest, longest)).
_GEOMETRY: dict[str, tuple[str, tuple[int, int]]] = {
    "conditional-detr-r50": ("shortest_edge", (800, 1333)),
    "conditional-detr-tiny": ("shortest_edge", (320, 512)),
    "rtdetr-r18vd": ("fixed", (640, 640)),
    "rtdetr-r34vd": ("fixed", (640, 640)),
    "rtdetr-r50vd": ("fixed", (640, 640)),
    "rtdetr-r101vd": ("fixed", (640, 640)),
    "rtdetr-l": ("fixed", (640, 640)),
    "rtdetr-tiny": ("fixed", (320, 320)),
    "rtdetr-small": ("fixed", (320, 320)),
}


def _check_preset(preset: str) -> None:
    if preset not in PRESETS:
        import difflib

        close = difflib.get_close_matches(preset, PRESETS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown model preset '{preset}'{hint} (known: {', '.join(PRESETS)})")


def build_config(preset: str, id2label: Mapping[int, str]):
    """The ``PretrainedConfig`` of ``preset`` for the label map ``id2label`` ({label index: class name})."""
    _check_preset(preset)
    return PRESETS[preset](id2label)


def build_model(preset: str, id2label: Mapping[int, str]):
    """A randomly initialised ``*ForObjectDetection`` model of ``preset`` (no download), in training mode.

    RT-DETR selects its ``num_queries`` from the encoder tokens of strides 8/16/32, so an input must give at least
    that many (``rtdetr-tiny``, 100 queries: >= ~88x88 px; full presets, 300 queries: >= ~144x144 px).
    """
    from transformers import AutoModelForObjectDetection

    model = AutoModelForObjectDetection.from_config(build_config(preset, id2label))
    reset_batchnorm(model)
    return model


def calibrate_activation_scale(model: nn.Module, input_hw: tuple[int, int], *, seed: int = 0,
                               batch: int = 4) -> nn.Module:
    """Give a randomly initialised detector the activation scale of a trained one, in place; returns it in eval mode.

    For tests and benchmarks of the cache (storage dtypes, fidelity, bytes per image): He-initialised convolutions
    and BatchNorm running statistics averaged over one batch of random ``input_hw`` images give stride-32 maps of
    O(0.01..1), where a plain random init can leave values a 16-bit format cannot hold. Seeded in a forked RNG.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for mod in model.model.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
            if isinstance(mod, nn.BatchNorm2d):
                mod.reset_running_stats()
                mod.momentum = None  # cumulative average over the calibration batch
        model.train()
        with torch.no_grad():
            model(pixel_values=torch.rand(batch, 3, *input_hw))
    return model.eval()


def reset_batchnorm(model: nn.Module) -> int:
    """Set every ``nn.BatchNorm2d`` outside the backbone to weight 1, bias 0, running mean 0 / var 1; return the count.

    transformers 5.x's ``RTDetrPreTrainedModel._init_weights`` (and RT-DETRv2's) draws these weights from
    N(0, ``initializer_range``) instead of 1. The encoder/decoder input projections then scale their input by ~0.01,
    cross-attention sees almost nothing and the denoising queries return their noised boxes unchanged: a model built
    from a config learns at half speed or less. Pretrained checkpoints overwrite these weights, so only from-scratch
    models (``build_model``) need this. The backbone's own BatchNorm is initialised correctly and is left alone.
    """
    inner = getattr(model, "model", None)
    backbone = getattr(inner, "backbone", None)
    in_backbone = {id(m) for m in backbone.modules()} if backbone is not None else set()
    count = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d) and id(module) not in in_backbone:
                module.reset_parameters()  # weight 1, bias 0, running statistics reset
                count += 1
    return count


def build_image_processor(preset: str):
    """The preset's own image processor (geometry and normalisation), as it is saved next to the model."""
    _check_preset(preset)
    mode, (a, b) = _GEOMETRY[preset]
    if preset.startswith("rtdetr"):
        from transformers import RTDetrImageProcessor

        return RTDetrImageProcessor(size={"height": a, "width": b}, do_normalize=False, do_pad=False)
    from transformers import ConditionalDetrImageProcessor

    return ConditionalDetrImageProcessor(
        size={"shortest_edge": a, "longest_edge": b}, do_normalize=True, image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD), do_pad=True,
    )


def processor_geometry(processor) -> dict[str, Any]:
    """Input geometry and normalisation of an image processor, for building our own transforms.

    Returns ``{"mode": "fixed", "size_hw": (h, w)}`` or ``{"mode": "shortest_edge", "shortest_edge": s,
    "longest_edge": l}``, plus ``"normalize": (mean, std)`` (tuples of 3 floats, applied to ``[0, 1]`` pixels) or
    ``None`` when the model takes plain ``[0, 1]`` pixels, and ``"rescale_factor"`` (1/255 for 8-bit input).
    """
    size = processor.size
    get = size.get if isinstance(size, Mapping) else (lambda k, d=None: getattr(size, k, d))
    if get("height") and get("width"):
        geom: dict[str, Any] = {"mode": "fixed", "size_hw": (int(get("height")), int(get("width")))}
    elif get("shortest_edge"):
        longest = get("longest_edge")
        geom = {"mode": "shortest_edge", "shortest_edge": int(get("shortest_edge")),
                "longest_edge": int(longest) if longest else None}
    else:
        raise ValueError(f"unsupported image-processor size {dict(size) if isinstance(size, Mapping) else size}: "
                         "expected height/width or shortest_edge/longest_edge")
    if getattr(processor, "do_normalize", False):
        geom["normalize"] = (tuple(float(x) for x in processor.image_mean),
                             tuple(float(x) for x in processor.image_std))
    else:
        geom["normalize"] = None
    geom["rescale_factor"] = float(getattr(processor, "rescale_factor", 1 / 255))
    return geom


# --------------------------------------------------------------------------------------------------------------------
# Families and trainability
# --------------------------------------------------------------------------------------------------------------------
def model_family(model_or_config) -> str:
    """``"rtdetr"`` (RT-DETR v1/v2), ``"conditional_detr"``, or the config's ``model_type`` for anything else."""
    config = getattr(model_or_config, "config", model_or_config)
    config = getattr(getattr(model_or_config, "module", None), "config", config)  # DDP / accelerate wrapper
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise TypeError(f"cannot tell the model family of {type(model_or_config).__name__}: it has no config")
    if model_type in ("rt_detr", "rt_detr_v2"):
        return "rtdetr"
    return model_type


def unwrap_model(model: nn.Module) -> nn.Module:
    """The HF model inside DDP / accelerate / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


class TrainableBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose state dict has exactly the keys of the HF frozen BatchNorm it replaces.

    ``num_batches_tracked`` is kept out of the state dict (it only matters for ``momentum=None``), so a model saved
    after ``set_trainable(..., backbone_batchnorm=True)`` loads into a fresh ``from_pretrained`` model (which builds
    frozen BatchNorm again) without unexpected keys.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self._non_persistent_buffers_set.add("num_batches_tracked")


def _is_frozen_bn(module: nn.Module) -> bool:
    return type(module).__name__.endswith("FrozenBatchNorm2d") and hasattr(module, "running_var")


def _backbone(model: nn.Module) -> nn.Module:
    """The convolutional backbone module of an HF DETR-style detector (``model.model.backbone``)."""
    inner = getattr(model, "model", None)
    backbone = getattr(inner, "backbone", None)
    if backbone is None:
        raise TypeError(f"{type(model).__name__} has no model.backbone; set_trainable knows HF DETR-style detectors")
    return backbone


def _swap_batchnorm(root: nn.Module, to_trainable: bool, trainable_cls: type) -> int:
    """Replace frozen BN by ``trainable_cls`` (or plain BN by the model's frozen BN class); same statistics."""
    frozen_cls = None
    if not to_trainable:
        frozen_cls = _frozen_bn_class(root)
    swapped = 0
    for parent in list(root.modules()):  # snapshot: children are replaced while walking
        for name, child in list(parent.named_children()):
            if to_trainable and _is_frozen_bn(child):
                new = trainable_cls(child.weight.shape[0]).to(child.weight.device, child.weight.dtype)
            elif not to_trainable and isinstance(child, nn.BatchNorm2d):
                new = frozen_cls(child.num_features).to(child.weight.device, child.weight.dtype)
            else:
                continue
            with torch.no_grad():
                for key in ("weight", "bias", "running_mean", "running_var"):
                    getattr(new, key).copy_(getattr(child, key))
            new.train(child.training)
            setattr(parent, name, new)
            swapped += 1
    return swapped


def _frozen_bn_class(module: nn.Module) -> type:
    """The transformers frozen-BatchNorm class of the model family ``module`` belongs to."""
    mod_name = type(module).__module__
    import importlib

    source = importlib.import_module(mod_name)
    for attr in dir(source):
        if attr.endswith("FrozenBatchNorm2d"):
            return getattr(source, attr)
    from transformers.models.rt_detr.modeling_rt_detr import RTDetrFrozenBatchNorm2d

    return RTDetrFrozenBatchNorm2d


def _fmt_count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 100_000 else f"{n / 1e3:.1f}k" if n >= 1000 else str(n)


def set_trainable(model: nn.Module, *, backbone: bool, backbone_batchnorm: bool) -> list[str]:
    """Choose what trains in the backbone; everything outside it is made trainable.

    - ``backbone=True`` makes every backbone parameter trainable (this undoes Conditional DETR's accidental
      full-backbone freeze); ``False`` freezes them all.
    - ``backbone_batchnorm=True`` replaces the frozen BatchNorm modules of the backbone by trainable BatchNorm
      carrying the same weight, bias and running statistics (trainable only when ``backbone`` is true; in eval mode
      the output is unchanged up to float rounding); ``False`` does the reverse (BatchNorm -> the family's frozen
      BatchNorm). RT-DETR gets ``nn.BatchNorm2d`` and ``config.freeze_backbone_batch_norms`` follows, so a saved
      model rebuilds the same modules. Conditional DETR always rebuilds frozen BatchNorm on load, so it gets
      ``TrainableBatchNorm2d`` (same state-dict keys as the frozen one): the weights load into a fresh
      ``from_pretrained`` model, and training code calls this again after loading.

    ``backbone=False`` with ``backbone_batchnorm=True`` freezes the BatchNorm affine parameters but its running
    statistics still move in train mode; pass ``backbone_batchnorm=False`` for a fully fixed backbone.

    Call it before building the optimizer and before ``accelerator.prepare``. Returns lines for the start-up log:
    one per top-level module (``"model.backbone: trainable 11.2M / 11.2M params"``) and one for the BatchNorm swap.
    """
    model = unwrap_model(model)
    bb = _backbone(model)
    if model_family(model) == "rtdetr":
        # RT-DETR rebuilds plain BatchNorm2d on load when freeze_backbone_batch_norms is false: use exactly that.
        swapped = _swap_batchnorm(bb, backbone_batchnorm, nn.BatchNorm2d)
        model.config.freeze_backbone_batch_norms = not backbone_batchnorm
    else:
        # Conditional DETR (and other HF DETRs) always rebuild frozen BatchNorm: keep its state-dict keys.
        swapped = _swap_batchnorm(bb, backbone_batchnorm, TrainableBatchNorm2d)
    bb_params = {id(p) for p in bb.parameters()}
    for p in model.parameters():
        p.requires_grad_(backbone if id(p) in bb_params else True)

    groups: dict[str, list[int]] = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        key = ".".join(parts[:2]) if parts[0] == "model" and len(parts) > 2 else parts[0]
        tot = groups.setdefault(key, [0, 0])
        tot[0] += p.numel() * p.requires_grad
        tot[1] += p.numel()
    lines = []
    for key, (n_train, n_all) in groups.items():
        state = "trainable" if n_train == n_all else "frozen" if n_train == 0 else "partly trainable"
        lines.append(f"{key}: {state} {_fmt_count(n_train)} / {_fmt_count(n_all)} params")
    kinds = [type(m).__name__ for m in bb.modules() if isinstance(m, nn.BatchNorm2d) or _is_frozen_bn(m)]
    n_trainable_bn = sum(k == "TrainableBatchNorm2d" or k == "BatchNorm2d" for k in kinds)
    lines.append(f"backbone BatchNorm: {n_trainable_bn} trainable, {len(kinds) - n_trainable_bn} frozen "
                 f"({swapped} swapped now)")
    return lines


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------
def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or env.upper() in ("1", "ON", "YES", "TRUE")


def _resolve(path_or_id: str | Path) -> tuple[str, bool]:
    """``(source, is_local)``; a local-looking path that does not exist is an error, not a hub lookup."""
    s = str(path_or_id)
    p = Path(s).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{p} is a directory but has no config.json: not a save_pretrained model directory")
        return str(p), True
    if p.exists():
        raise ModelLoadError(f"{p} is a file; pass a save_pretrained model directory (with config.json)")
    if s.startswith((".", "/", "~")) or s.count("/") > 1 or os.sep in s.replace("/", ""):
        raise ModelLoadError(f"model directory {p} does not exist")
    if _offline():
        from huggingface_hub import try_to_load_from_cache

        # A cache probe is a few stat() calls: an offline miss fails here, before transformers' model stack is even
        # imported (that import alone takes seconds).
        if not isinstance(try_to_load_from_cache(s, "config.json"), str):
            raise _offline_error(s, "it is not in the local Hugging Face cache")
    return s, False


def _offline_error(source: str, detail: str, what: str = "model") -> ModelLoadError:
    return ModelLoadError(
        f"could not load {what} '{source}' offline (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set and {detail}); "
        "pass a local model directory instead, e.g. one written by "
        "`rtcodetr init-model --preset NAME --data DATA_DIR --out MODEL_DIR`")


def _from_pretrained(loader: Callable[..., Any], source: str, is_local: bool, what: str, **kwargs: Any):
    """Call ``loader.from_pretrained`` so that an offline hub id fails at once with a clear message.

    Offline, only the local Hugging Face cache is consulted (``local_files_only``), so a miss is immediate instead
    of a ~23 s connection timeout.
    """
    if is_local:
        return loader.from_pretrained(source, **kwargs)
    if _offline():
        try:
            return loader.from_pretrained(source, local_files_only=True, **kwargs)
        except (OSError, ValueError) as e:
            detail = f"its local cache copy is incomplete: {str(e).splitlines()[0]}"
            raise _offline_error(source, detail, what) from None
    try:
        return loader.from_pretrained(source, **kwargs)
    except OSError as e:
        raise ModelLoadError(f"could not load {what} '{source}' from the Hugging Face hub: {e}") from e


def load_model(path_or_id: str | Path):
    """``(model, image_processor)`` from a ``save_pretrained`` directory or a hub id.

    The model comes back in eval mode on CPU. A hub id works online; offline (``HF_HUB_OFFLINE=1``) it loads only
    from the local Hugging Face cache and otherwise raises ``ModelLoadError`` at once.
    """
    source, is_local = _resolve(path_or_id)  # first: an offline miss must not wait for the transformers import
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    model = _from_pretrained(AutoModelForObjectDetection, source, is_local, "model")
    processor = _from_pretrained(AutoImageProcessor, source, is_local, "image processor")
    model.eval()
    return model, processor


# --------------------------------------------------------------------------------------------------------------------
# init-model
# --------------------------------------------------------------------------------------------------------------------
def read_id2label(data_dir: str | Path) -> dict[int, str]:
    """``{label: name}`` from the prepared dataset's ``label_map.json`` (validated by ``LabelMap``)."""
    from rtcodetr.data.prepared import LabelMap

    path = Path(data_dir) / "label_map.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --data must be a prepared dataset directory (rtcodetr data ...)")
    return dict(LabelMap.load(path).id2label)


def label_dependent_keys(config) -> set[str]:
    """State-dict keys whose shape depends on the number of labels (class heads, denoising class embedding, ...).

    Found by building the architecture twice on the meta device (no memory, no init) with K and K+1 labels and
    comparing shapes, so it holds for any family without a hand-written list.
    """
    from transformers import AutoModelForObjectDetection

    def shapes(k: int) -> dict[str, tuple[int, ...]]:
        cfg = copy.deepcopy(config)
        for key, value in _labels({i: f"class_{i}" for i in range(k)}).items():
            setattr(cfg, key, value)
        with torch.device("meta"):
            m = AutoModelForObjectDetection.from_config(cfg)
        return {n: tuple(t.shape) for n, t in m.state_dict().items()}

    k = config.num_labels
    a, b = shapes(k), shapes(k + 1)
    return {n for n in a if a[n] != b.get(n)}


def _init_from(config, source: str, is_local: bool) -> tuple[nn.Module, list[str]]:
    """A model of ``config`` holding the source weights, except re-initialised label-dependent tensors."""
    from transformers import AutoModelForObjectDetection

    src_model = _from_pretrained(AutoModelForObjectDetection, source, is_local, "model")
    src_state = src_model.state_dict()
    same_labels = {int(k): v for k, v in src_model.config.id2label.items()} == config.id2label
    label_keys = label_dependent_keys(config)
    model = AutoModelForObjectDetection.from_config(config)
    state = model.state_dict()
    missing = sorted(set(state) - set(src_state))
    unexpected = sorted(set(src_state) - set(state))
    mismatched = sorted(k for k in set(state) & set(src_state)
                        if state[k].shape != src_state[k].shape and k not in label_keys)
    if missing or unexpected or mismatched:
        raise ValueError(
            f"weights of '{source}' do not fit its own architecture with the new label map: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, mismatched shapes {mismatched[:5]}")
    reinit = sorted(label_keys) if not same_labels else []
    load = {k: v for k, v in src_state.items() if k not in reinit}
    model.load_state_dict(load, strict=False)
    return model, reinit


def init_model(preset: str, data_dir: str | Path, out: str | Path, from_: str | Path | None = None,
               verbose: bool = True, seed: int = 0) -> Path:
    """Write a ``save_pretrained`` directory for ``preset`` with the label map of the prepared dataset ``data_dir``.

    Without ``from_`` the weights are a random init of the preset. With ``from_`` (a model directory or hub id)
    the architecture and weights come from that checkpoint, which must be of the preset's family; every tensor is
    copied except those whose shape depends on the label count, which are re-initialised (and printed) unless the
    checkpoint already has exactly this label map. The image-processor config is the checkpoint's own when it has
    one, else the preset's. Random initialisation (the whole model, or the re-initialised head) is drawn from
    ``seed`` without touching the caller's global RNG state, so the same command writes the same weights. Returns
    ``out``.
    """
    _check_preset(preset)
    out = Path(out)
    id2label = read_id2label(data_dir)
    source, is_local = _resolve(from_) if from_ is not None else (None, False)  # fail fast before heavy imports
    preset_config = build_config(preset, id2label)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, processor, reinit = _init_weights(preset, preset_config, id2label, source, is_local, verbose)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    if verbose:
        n = sum(p.numel() for p in model.parameters())
        print(f"init-model: wrote {out} ({preset}, {n / 1e6:.2f}M params, {len(id2label)} labels)")
    return out


def _init_weights(preset: str, preset_config, id2label: dict[int, str], source, is_local: bool, verbose: bool):
    """(model, image processor, names of re-initialised tensors) for ``init_model``; draws from the global RNG."""
    from transformers import AutoConfig, AutoImageProcessor

    if source is None:
        return build_model(preset, id2label), build_image_processor(preset), []
    else:
        config = _from_pretrained(AutoConfig, source, is_local, "config")
        if model_family(config) != model_family(preset_config):
            raise ValueError(f"--from {source} is a {model_family(config)} model but preset '{preset}' is "
                             f"{model_family(preset_config)}")
        for key, value in _labels(id2label).items():
            setattr(config, key, value)
        model, reinit = _init_from(config, source, is_local)
        try:
            processor = _from_pretrained(AutoImageProcessor, source, is_local, "image processor")
        except (ModelLoadError, OSError, ValueError):
            processor = build_image_processor(preset)
            if verbose:
                print(f"init-model: {source} has no image processor; using preset '{preset}''s")
        if verbose:
            print(f"init-model: weights from {source}; re-initialised {len(reinit)} label-dependent tensors "
                  f"({preset_config.num_labels} labels):")
            for key in reinit:
                print(f"  {key} {tuple(model.state_dict()[key].shape)}")
        return model, processor, reinit


def main(argv: Sequence[str] | None = None) -> int:
    """``rtcodetr init-model --preset NAME --data DATA_DIR --out MODEL_DIR [--from PATH_OR_HUB_ID]``."""
    parser = argparse.ArgumentParser(prog="rtcodetr init-model", description=init_model.__doc__.split("\n")[0])
    parser.add_argument("--preset", required=True, choices=list(PRESETS))
    parser.add_argument("--data", required=True, help="prepared dataset directory (its label_map.json is used)")
    parser.add_argument("--out", required=True, help="model directory to write")
    parser.add_argument("--from", dest="from_", default=None,
                        help="start from these weights (model directory or hub id); label-dependent tensors are "
                             "re-initialised")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation (default 0)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        init_model(args.preset, args.data, args.out, args.from_, seed=args.seed)
    except (ModelLoadError, FileNotFoundError, ValueError) as e:
        print(f"rtcodetr init-model: error: {e}", file=sys.stderr)
        return BAD_INPUT_EXIT
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
