"""Transforms: the affine in the target moves boxes (and pixels) exactly like the transform did.

The reference is independent of the code under test: corners are mapped with a float64 numpy matrix product and
clipped by hand; pixel positions are found by locating a bright marker in the output image.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from rtcodetr.data.boxes import (
    affine_boxes,
    clip_boxes,
    coco_xywh_to_xyxy,
    cxcywh_normalized_to_xyxy,
    xyxy_to_coco_xywh,
    xyxy_to_cxcywh_normalized,
)
from rtcodetr.data.transforms import (
    AugmentConfig,
    Compose,
    Normalize,
    RandomHorizontalFlip,
    RandomIoUCrop,
    RandomPhotometricDistort,
    RandomZoomOut,
    Resize,
    SanitizeBoxes,
    ToTensor,
    boxes_to_original,
    build_transforms,
    pick_multiscale_size,
    resize_batch,
    shortest_edge_size,
)

H, W = 120, 160
BOXES = np.array(
    [[10, 20, 50, 60], [100.5, 30.25, 150, 110], [0, 0, 160, 120], [70, 5, 75, 10], [140, 100, 159, 119]],
    dtype=np.float64,
)


def make_sample(boxes: np.ndarray = BOXES, h: int = H, w: int = W, seed: int = 0):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB")
    n = len(boxes)
    target = {
        "image_id": 7,
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.arange(n, dtype=torch.int64),  # label i == box i: identifies survivors
        "area": torch.tensor((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), dtype=torch.float32)
        if n
        else torch.zeros(0),
        "iscrowd": torch.zeros(n, dtype=torch.int64),
        "orig_size": torch.tensor([h, w]),
        "size": torch.tensor([h, w]),
        "affine": torch.eye(3, dtype=torch.float64),
    }
    return img, target


def reference_boxes(orig: np.ndarray, affine: np.ndarray, size_hw) -> np.ndarray:
    """Independent float64 reference: 4 corners through the matrix, min/max, clip."""
    a = np.asarray(affine, dtype=np.float64)
    out = []
    for x1, y1, x2, y2 in orig:
        pts = np.array([[x1, y1, 1], [x2, y1, 1], [x1, y2, 1], [x2, y2, 1]], dtype=np.float64) @ a.T
        bx = [pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max()]
        bx = [min(max(bx[0], 0), size_hw[1]), min(max(bx[1], 0), size_hw[0]),
              min(max(bx[2], 0), size_hw[1]), min(max(bx[3], 0), size_hw[0])]
        out.append(bx)
    return np.array(out, dtype=np.float64).reshape(-1, 4)


def check_consistent(
    orig_boxes: np.ndarray, image, target, min_size: float = 0.0, drops_visible: bool = False
) -> None:
    """Surviving boxes == reference(original box, returned affine); dropped ones are degenerate there (unless
    ``drops_visible``: an IoU crop also drops boxes whose centre falls outside it). ``area`` follows the boxes
    (the samples' areas are their box areas)."""
    size = tuple(int(v) for v in target["size"])
    if isinstance(image, Image.Image):
        assert (image.size[1], image.size[0]) == size
    else:
        assert tuple(image.shape[-2:]) == size
    a = target["affine"].numpy()
    assert target["affine"].dtype == torch.float64 and a.shape == (3, 3)
    np.testing.assert_allclose(a[2], [0, 0, 1])
    labels = target["labels"].numpy()
    assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (len(labels), 4)
    assert len(target["area"]) == len(target["iscrowd"]) == len(labels)
    ref = reference_boxes(orig_boxes[labels], a, size)
    np.testing.assert_allclose(target["boxes"].numpy(), ref, atol=1e-3, rtol=1e-5)
    b = target["boxes"].numpy()
    assert (b[:, 2] - b[:, 0] > min_size).all() or len(b) == 0
    np.testing.assert_allclose(target["area"].numpy(), (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), rtol=1e-4, atol=1e-3)
    if not drops_visible:
        dropped = reference_boxes(np.delete(orig_boxes, labels, axis=0), a, size)
        assert (np.minimum(dropped[:, 2] - dropped[:, 0], dropped[:, 3] - dropped[:, 1]) <= min_size).all()
    assert (b[:, 0] >= 0).all() and (b[:, 2] <= size[1]).all() and (b[:, 3] <= size[0]).all()


STEPS = {
    "zoom_out": lambda: RandomZoomOut(fill=0, side_range=(1.0, 4.0), p=1.0),
    "iou_crop": lambda: RandomIoUCrop(p=1.0),
    "flip": lambda: RandomHorizontalFlip(p=1.0),
    "resize_fixed": lambda: Resize((64, 96)),
    "resize_shortest": lambda: Resize(shortest_edge=80, longest_edge=100),
    "train_pipeline": lambda: build_transforms(
        True, (64, 64), AugmentConfig(photometric_p=0.0, zoom_out_p=1.0, iou_crop_p=1.0, flip_p=1.0)
    ),
}


@pytest.mark.parametrize("name", list(STEPS))
@pytest.mark.parametrize("seed", range(6))
def test_affine_moves_boxes_like_the_transform(name, seed):
    torch.manual_seed(seed)
    img, target = make_sample(seed=seed)
    out_img, out = STEPS[name]()(img, target)
    check_consistent(BOXES, out_img, out, drops_visible=name in ("iou_crop", "train_pipeline"))
    assert out["image_id"] == 7 and out["orig_size"].tolist() == [H, W]


@pytest.mark.parametrize("name", list(STEPS))
def test_empty_target(name):
    torch.manual_seed(0)
    img, target = make_sample(np.zeros((0, 4)))
    out_img, out = STEPS[name]()(img, target)
    assert out["boxes"].shape == (0, 4) and out["labels"].shape == (0,)
    check_consistent(np.zeros((0, 4)), out_img, out)


def test_exact_matrices_of_simple_steps():
    img, target = make_sample()
    _, out = RandomHorizontalFlip(p=1.0)(img, target)
    np.testing.assert_array_equal(out["affine"].numpy(), [[-1, 0, W], [0, 1, 0], [0, 0, 1]])
    np.testing.assert_allclose(out["boxes"][0].numpy(), [W - 50, 20, W - 10, 60])
    _, out = Resize((60, 320))(img, target)
    np.testing.assert_allclose(out["affine"].numpy(), np.diag([2.0, 0.5, 1.0]))
    np.testing.assert_allclose(out["boxes"][0].numpy(), [20, 10, 100, 30])
    np.testing.assert_allclose(out["area"][0].item(), 40 * 40 * 2.0 * 0.5)


def test_shortest_edge_matches_detr_arithmetic():
    # expected values equal transformers.image_transforms.get_size_with_aspect_ratio (checked once by hand; importing
    # transformers here would cost seconds)
    assert shortest_edge_size(3264, 2448, 800, 1333) == (1066, 800)
    assert shortest_edge_size(100, 1000, 800, 1333) == (133, 1333)
    assert shortest_edge_size(480, 640, 800, 1333) == (800, 1066)
    assert shortest_edge_size(800, 1200, 800, 1333) == (800, 1200)
    assert shortest_edge_size(600, 600, 800, None) == (800, 800)


def _marker_image(h: int, w: int, box):
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    x1, y1, x2, y2 = box
    arr[y1:y2, x1:x2] = 255
    return Image.fromarray(arr, "RGB")


@pytest.mark.parametrize("seed", range(8))
def test_pixels_move_as_the_affine_says(seed):
    """A bright rectangle drawn in the input lands where the returned affine maps it."""
    torch.manual_seed(seed)
    marker = (60, 40, 100, 80)  # pixel columns 60..99 and rows 40..79 -> continuous box [60, 40, 100, 80]
    img = _marker_image(H, W, marker)
    _, target = make_sample(np.array([marker], dtype=np.float64))
    pipe = build_transforms(True, (96, 128), AugmentConfig(photometric_p=0.0, zoom_out_p=1.0, iou_crop_p=1.0,
                                                            flip_p=0.5, zoom_out_side_range=(1.0, 2.0)))
    out_img, out = pipe(img, target)
    assert len(out["boxes"]) == 1  # the crop keeps the only box (its centre must be inside)
    mask = out_img.mean(0).numpy() > 0.5
    ys, xs = np.nonzero(mask)
    found = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)
    expected = reference_boxes(np.array([marker], dtype=np.float64), out["affine"].numpy(), out["size"].tolist())[0]
    # bilinear resampling blurs edges by about one output pixel
    np.testing.assert_allclose(found, expected, atol=1.6)
    np.testing.assert_allclose(out["boxes"][0].numpy(), expected, atol=1e-3)


def _bright_box(image) -> np.ndarray:
    arr = np.asarray(image, dtype=np.float64).mean(-1) if isinstance(image, Image.Image) else image.mean(0).numpy()
    ys, xs = np.nonzero(arr > arr.max() / 2)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


@pytest.mark.parametrize("name", ["zoom_out", "iou_crop", "flip"])
@pytest.mark.parametrize("seed", range(5))
def test_pixels_move_exactly_for_integer_steps(name, seed):
    """Zoom-out, crop and flip move pixels by whole pixels: the marker must land exactly where the affine says."""
    torch.manual_seed(seed)
    marker = (60, 40, 100, 80)
    img = _marker_image(H, W, marker)
    _, target = make_sample(np.array([marker], dtype=np.float64))
    out_img, out = STEPS[name]()(img, target)
    expected = reference_boxes(np.array([marker], dtype=np.float64), out["affine"].numpy(), out["size"].tolist())[0]
    np.testing.assert_array_equal(_bright_box(out_img), expected)


def test_inverse_affine_recovers_original_boxes():
    torch.manual_seed(3)
    img, target = make_sample()
    _, out = build_transforms(True, (64, 64), AugmentConfig(photometric_p=0, zoom_out_p=1.0, iou_crop_p=0,
                                                            flip_p=1.0))(img, target)
    back = boxes_to_original(out["boxes"], out["affine"])
    np.testing.assert_allclose(back.numpy(), BOXES[out["labels"].numpy()], atol=1e-3)


def test_transforms_do_not_mutate_inputs():
    torch.manual_seed(1)
    img, target = make_sample()
    img_before = np.asarray(img).copy()
    target_before = copy.deepcopy(target)
    pipe = build_transforms(True, (64, 64), AugmentConfig(photometric_p=1.0, zoom_out_p=1.0, iou_crop_p=1.0,
                                                          flip_p=1.0), normalize=((0.5, 0.5, 0.5), (0.2, 0.2, 0.2)))
    for _ in range(3):
        pipe(img, target)
    np.testing.assert_array_equal(np.asarray(img), img_before)
    assert target.keys() == target_before.keys()
    for k, v in target_before.items():
        assert torch.equal(torch.as_tensor(target[k]), torch.as_tensor(v)), k
    # tensor inputs too
    t_img = torch.rand(3, H, W)
    t_before = t_img.clone()
    for step in (RandomHorizontalFlip(p=1.0), Resize((50, 50)), RandomZoomOut(p=1.0), RandomIoUCrop(p=1.0)):
        out_img, out = step(t_img, target)
        check_consistent(BOXES, out_img, out, drops_visible=isinstance(step, RandomIoUCrop))
    assert torch.equal(t_img, t_before)


def test_sanitize_drops_small_and_keeps_fields_aligned():
    boxes = np.array([[0, 0, 10, 10], [5, 5, 5.5, 30], [20, 20, 40, 20.9]], dtype=np.float64)
    img, target = make_sample(boxes)
    _, out = SanitizeBoxes(min_size=1)(img, target)
    assert out["labels"].tolist() == [0]
    assert out["boxes"].shape == (1, 4) and out["area"].shape == (1,) and out["iscrowd"].shape == (1,)
    assert len(target["labels"]) == 3


def test_stop_epoch_switches_augmentation_off():
    aug = AugmentConfig(photometric_p=1.0, zoom_out_p=1.0, iou_crop_p=1.0, flip_p=0.0, stop_epoch=2,
                        multiscale=(32, 64))
    pipe = build_transforms(True, (64, 64), aug)
    img, target = make_sample()
    pipe.set_epoch(1)
    torch.manual_seed(0)
    _, out = pipe(img, target)
    assert not np.allclose(out["affine"].numpy(), np.diag([64 / W, 64 / H, 1.0]))  # zoom-out changed the geometry
    pipe.set_epoch(2)
    im2, out = pipe(img, target)
    np.testing.assert_allclose(out["affine"].numpy(), np.diag([64 / W, 64 / H, 1.0]))
    assert len(out["boxes"]) == len(BOXES)
    # photometric distort skipped too: the image equals a plain resize
    plain, _ = build_transforms(False, (64, 64))(img, target)
    assert torch.equal(im2, plain)
    assert pick_multiscale_size(aug, 1) in {(32, 32), (64, 64)}
    assert pick_multiscale_size(aug, 2) is None


def test_eval_pipeline_and_tensor_format():
    img, target = make_sample()
    pipe = build_transforms(False, {"mode": "shortest_edge", "shortest_edge": 60, "longest_edge": 100},
                            normalize=((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    out_img, out = pipe(img, target)
    assert out_img.dtype == torch.float32 and tuple(out_img.shape) == (3, 60, 80)
    check_consistent(BOXES, out_img, out)
    raw, _ = build_transforms(False, (H, W))(img, target)
    assert raw.min() >= 0 and raw.max() <= 1
    np.testing.assert_allclose(raw.permute(1, 2, 0).numpy() * 255, np.asarray(img), atol=1e-3)
    with pytest.raises(TypeError, match="ToTensor"):
        Normalize((0, 0, 0), (1, 1, 1))(img, target)


def test_resize_batch_updates_every_target():
    torch.manual_seed(0)
    pipe = build_transforms(True, (64, 64), AugmentConfig(photometric_p=0, zoom_out_p=1.0, iou_crop_p=1.0))
    samples = [pipe(*make_sample(seed=s)) for s in range(3)]
    images = torch.stack([s[0] for s in samples])
    targets = [s[1] for s in samples]
    before = copy.deepcopy(targets)
    out_images, out_targets = resize_batch(images, targets, (96, 80))
    assert out_images.shape == (3, 3, 96, 80)
    for img_t, t in zip(out_images, out_targets):
        check_consistent(BOXES, img_t, t, drops_visible=True)  # the pipeline IoU-crops
    for t, b in zip(targets, before):  # inputs untouched
        assert torch.equal(t["boxes"], b["boxes"]) and torch.equal(t["affine"], b["affine"])


def test_photometric_distort_keeps_geometry():
    torch.manual_seed(0)
    img, target = make_sample()
    out_img, out = RandomPhotometricDistort(p=1.0)(img, target)
    assert out_img.size == img.size and torch.equal(out["boxes"], target["boxes"])
    assert torch.equal(out["affine"], target["affine"])


def test_box_conversions_roundtrip_numpy_and_torch():
    xyxy = np.array([[10.0, 20.0, 50.0, 80.0]], dtype=np.float32)
    np.testing.assert_allclose(xyxy_to_coco_xywh(xyxy), [[10, 20, 40, 60]])
    np.testing.assert_allclose(coco_xywh_to_xyxy(np.array([[10, 20, 40, 60]])), xyxy)
    c = xyxy_to_cxcywh_normalized(torch.from_numpy(xyxy), (100, 200))
    assert isinstance(c, torch.Tensor)
    np.testing.assert_allclose(c.numpy(), [[30 / 200, 50 / 100, 40 / 200, 60 / 100]])
    np.testing.assert_allclose(cxcywh_normalized_to_xyxy(c, (100, 200)).numpy(), xyxy, atol=1e-5)
    flip = np.array([[-1, 0, 200], [0, 1, 0], [0, 0, 1]], dtype=np.float64)
    np.testing.assert_allclose(affine_boxes(xyxy, flip), [[150, 20, 190, 80]])
    np.testing.assert_allclose(clip_boxes(np.array([[-5, -1, 250, 90]]), (80, 200)), [[0, 0, 200, 80]])
    assert Compose([]).augmenting and ToTensor()(Image.new("RGB", (4, 3)), {})[0].shape == (3, 3, 4)


def test_to_tensor_is_exact_contiguous_and_always_three_channels():
    arr = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    t, _ = ToTensor()(Image.fromarray(arr), {})
    assert t.dtype == torch.float32 and t.is_contiguous() and t.shape == (3, 5, 7)
    assert torch.equal(t, torch.from_numpy(arr).permute(2, 0, 1).to(torch.float32) / 255.0)
    grey, _ = ToTensor()(Image.fromarray(arr[..., 0]), {})  # "L" -> RGB: three equal channels
    assert grey.shape == (3, 5, 7) and torch.equal(grey[0], grey[2])
    assert torch.equal(grey[1], torch.from_numpy(arr[..., 0]).to(torch.float32) / 255.0)
    u8 = torch.from_numpy(arr).permute(2, 0, 1)
    from_tensor, _ = ToTensor()(u8, {})
    assert torch.equal(from_tensor, t) and from_tensor.is_contiguous() and u8.dtype == torch.uint8
