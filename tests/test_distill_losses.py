"""Distillation losses, matching and augmentation-consistent teacher targets (no model, no files: fast)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rtcodetr.train_student.distill_data import teacher_boxes_to_current
from rtcodetr.train_student.losses import (
    DistillMatcher,
    FeatureDistillLoss,
    PredictionDistillLoss,
    PredictionTargets,
    foreground_weights,
    split_denoising,
)
from rtcodetr.train_student.resample import resample_teacher_features


def _teacher(num: int = 6, num_labels: int = 4, seed: int = 0) -> PredictionTargets:
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(num, num_labels, generator=g) * 0.9 + 0.05
    cxcy = torch.rand(num, 2, generator=g) * 0.6 + 0.2
    wh = torch.rand(num, 2, generator=g) * 0.2 + 0.05
    boxes = torch.cat([cxcy, wh], -1)
    return PredictionTargets(probs=probs, boxes=boxes, weight=probs.max(-1).values)


def _student_reproducing(t: PredictionTargets, num_queries: int, layers: int, perm: torch.Tensor) -> tuple:
    """Student queries: the teacher's predictions at positions ``perm`` plus distinct junk queries elsewhere."""
    k = t.probs.shape[1]
    logits = torch.full((num_queries, k), -6.0)
    boxes = torch.tensor([[0.9, 0.9, 0.05, 0.05]]).repeat(num_queries, 1)
    logits[perm] = torch.logit(t.probs)
    boxes[perm] = t.boxes
    return logits[None, None].repeat(1, layers, 1, 1), boxes[None, None].repeat(1, layers, 1, 1)


def test_prediction_loss_is_zero_when_student_reproduces_teacher():
    t = _teacher()
    perm = torch.tensor([7, 2, 9, 0, 4, 11])  # the student holds them in scrambled slots, never query i <-> i
    logits, boxes = _student_reproducing(t, num_queries=12, layers=3, perm=perm)
    losses = PredictionDistillLoss()(logits, boxes, [t])
    for name, value in losses.items():
        assert abs(float(value)) < 1e-4, (name, float(value))
    # and clearly non-zero when the student is off
    off = PredictionDistillLoss()(logits + 1.0, boxes + torch.tensor([0.05, -0.03, 0.02, 0.01]), [t])
    assert all(float(v) > 1e-2 for v in off.values())


def test_matcher_pairs_by_content_not_by_index():
    t = _teacher(num=5)
    perm = torch.tensor([3, 0, 4, 1, 2])
    logits, boxes = _student_reproducing(t, num_queries=5, layers=1, perm=perm)
    src, tgt = DistillMatcher()(logits[0, 0], boxes[0, 0], t)
    pairs = dict(zip(tgt.tolist(), src.tolist()))
    assert pairs == {i: int(perm[i]) for i in range(5)}


def test_prediction_loss_invariant_to_permuting_teacher_queries():
    t = _teacher(num=8, seed=1)
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 2, 10, 4, generator=g)
    boxes = torch.cat([torch.rand(1, 2, 10, 2, generator=g) * 0.6 + 0.2, torch.rand(1, 2, 10, 2, generator=g) * 0.2 + 0.05], -1)
    base = PredictionDistillLoss()(logits, boxes, [t])
    p = torch.randperm(8, generator=g)
    permuted = PredictionTargets(probs=t.probs[p], boxes=t.boxes[p], weight=t.weight[p])
    other = PredictionDistillLoss()(logits, boxes, [permuted])
    for name in base:
        assert torch.allclose(base[name], other[name], atol=1e-6), name


def test_prediction_loss_weighting_by_teacher_confidence():
    t = _teacher(num=2)
    t.weight = torch.tensor([1.0, 0.0])  # the second prediction carries no weight: its error must not count
    logits, boxes = _student_reproducing(t, num_queries=4, layers=1, perm=torch.tensor([1, 3]))
    boxes_bad = boxes.clone()
    boxes_bad[0, 0, 3] = torch.tensor([0.5, 0.5, 0.3, 0.3])
    losses = PredictionDistillLoss()(logits, boxes_bad, [t])
    assert float(losses["pred_l1"]) < 1e-5


def _gt_scene():
    """One image, 5 queries, 3 classes. GT: box A (class 0). Teacher: t0 detects A, t1 a confident object with no
    GT box, t2 low-confidence clutter. The student's GT matcher trains query 2 for A; query 4 sits exactly on t0."""
    box_a = torch.tensor([0.3, 0.3, 0.2, 0.2])
    teacher = PredictionTargets(
        probs=torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.1, 0.1, 0.05]]),
        boxes=torch.stack([box_a + 0.01, torch.tensor([0.7, 0.7, 0.2, 0.2]), torch.tensor([0.5, 0.2, 0.1, 0.1])]),
        weight=torch.tensor([0.9, 0.8, 0.1]))
    logits = torch.full((1, 1, 5, 3), -4.0)
    boxes = torch.tensor([[0.1, 0.1, 0.1, 0.1], [0.5, 0.5, 0.3, 0.3], [0.32, 0.28, 0.25, 0.2], [0.9, 0.9, 0.1, 0.1],
                          [0.31, 0.31, 0.2, 0.2]])[None, None]
    logits[0, 0, 4, 0] = 2.0
    gt = [{"class_labels": torch.tensor([0]), "boxes": box_a[None]}]
    gt_matcher = lambda outputs, labels: [(torch.tensor([2]), torch.tensor([0]))]  # noqa: E731
    return teacher, logits, boxes, gt, gt_matcher


def test_gt_assignment_distils_into_the_query_the_gt_loss_trains():
    teacher, logits, boxes, gt, gt_matcher = _gt_scene()
    loss = PredictionDistillLoss(assignment="gt", gt_matcher=gt_matcher, min_confidence=0.3, annotated="class")
    pairs_ = loss.assign(logits, boxes, [teacher], gt)
    q, t = pairs_.query, pairs_.teacher
    pairs = dict(zip(t.tolist(), q.tolist()))
    assert dict(zip(t.tolist(), pairs_.on_gt.tolist())) == {0: True, 1: False}
    assert pairs[0] == 2  # t0 detects GT A: it teaches A's positive query, not query 4 that happens to sit on it
    assert 1 in pairs and pairs[1] != 2  # the confident object without GT goes to a query the GT loss leaves free
    assert 2 not in pairs  # clutter below min_confidence is not distilled
    # the independent matching (the old design) puts t0 on query 4: the inconsistency the GT assignment removes
    hun = PredictionDistillLoss(assignment="hungarian", min_confidence=0.3).assign(logits, boxes, [teacher])
    q_h, t_h = hun.query, hun.teacher
    assert dict(zip(t_h.tolist(), q_h.tolist()))[0] == 4


def test_what_the_teacher_teaches_annotated_objects():
    """annotated="none": the queries trained for annotated boxes get nothing from the teacher; "class": their class
    distribution only (moving such a query's box changes no box term); "all": boxes too. The free query that learns
    the object the annotation lacks gets class and box in every mode."""
    teacher, logits, boxes, gt, gt_matcher = _gt_scene()

    def make(annotated):
        return PredictionDistillLoss(assignment="gt", gt_matcher=gt_matcher, min_confidence=0.3, annotated=annotated)

    none = make("none").assign(logits, boxes, [teacher], gt)
    assert none.teacher.tolist() == [1] and not none.on_gt.any() and none.query[0] != 2
    extra_query = int(none.query[0])
    moved_gt = boxes.clone()
    moved_gt[0, 0, 2] = torch.tensor([0.6, 0.2, 0.1, 0.1])
    moved_extra = boxes.clone()
    moved_extra[0, 0, extra_query, :2] += 0.05
    for annotated in ("none", "class", "all"):
        loss = make(annotated)
        base = loss(logits, boxes, [teacher], gt)
        gt_moved = loss(logits, moved_gt, [teacher], gt)
        assert torch.equal(gt_moved["pred_l1"], base["pred_l1"]) == (annotated != "all"), annotated
        assert not torch.equal(loss(logits, moved_extra, [teacher], gt)["pred_l1"], base["pred_l1"])
    with pytest.raises(ValueError, match="annotated"):
        make("boxes")


def test_gt_assignment_does_not_distil_a_duplicate_of_an_annotated_object():
    """A second confident teacher box on GT A (NMS-free detectors leave some) must not become an 'extra' object: it
    would pull a query that the GT loss trains as background onto A."""
    teacher, logits, boxes, gt, gt_matcher = _gt_scene()
    dup = PredictionTargets(probs=torch.cat([teacher.probs, torch.tensor([[0.6, 0.05, 0.05]])]),
                            boxes=torch.cat([teacher.boxes, torch.tensor([[0.29, 0.31, 0.21, 0.19]])]),
                            weight=torch.cat([teacher.weight, torch.tensor([0.6])]))
    got = PredictionDistillLoss(assignment="gt", gt_matcher=gt_matcher, min_confidence=0.3, annotated="class").assign(
        logits, boxes, [dup], gt)
    q, t = got.query, got.teacher
    assert 3 not in t.tolist() and dict(zip(t.tolist(), q.tolist()))[0] == 2


def test_gt_assignment_on_an_image_without_gt_distils_only_confident_predictions():
    teacher, logits, boxes, _, gt_matcher = _gt_scene()
    empty = [{"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}]
    loss = PredictionDistillLoss(assignment="gt", gt_matcher=lambda o, l: [(torch.zeros(0, dtype=torch.long),) * 2],
                                 min_confidence=0.3)
    got = loss.assign(logits, boxes, [teacher], empty)
    q, t = got.query, got.teacher
    assert sorted(t.tolist()) == [0, 1] and len(set(q.tolist())) == 2
    out = loss(logits.requires_grad_(), boxes, [teacher], empty)
    assert all(torch.isfinite(v) and v > 0 for v in out.values())


def test_teacher_duplicates_are_distilled_once_where_the_annotation_is_silent():
    """On an image without GT every confident teacher prediction is a target, but a duplicate of one (same class,
    IoU >= nms_iou) must not claim a second student query."""
    teacher, logits, boxes, _, _ = _gt_scene()
    dup = PredictionTargets(probs=torch.cat([teacher.probs, torch.tensor([[0.1, 0.6, 0.1]])]),
                            boxes=torch.cat([teacher.boxes, torch.tensor([[0.71, 0.69, 0.2, 0.21]])]),
                            weight=torch.cat([teacher.weight, torch.tensor([0.6])]))
    empty = [{"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}]
    no_gt = lambda o, l: [(torch.zeros(0, dtype=torch.long),) * 2]  # noqa: E731
    kept = PredictionDistillLoss(assignment="gt", gt_matcher=no_gt, min_confidence=0.3, nms_iou=0.5).assign(
        logits, boxes, [dup], empty)
    assert sorted(kept.teacher.tolist()) == [0, 1]  # t3 duplicates t1 (0.8 > 0.6): dropped
    every = PredictionDistillLoss(assignment="gt", gt_matcher=no_gt, min_confidence=0.3, nms_iou=1.0).assign(
        logits, boxes, [dup], empty)
    assert sorted(every.teacher.tolist()) == [0, 1, 3]


def test_gt_matcher_for_rtdetr_matches_like_its_detection_loss():
    from transformers.loss.loss_rt_detr import RTDetrHungarianMatcher

    from rtcodetr.models import build_config
    from rtcodetr.train_student.losses import gt_matcher_for

    config = build_config("rtdetr-tiny", {0: "a", 1: "b"})
    matcher = gt_matcher_for(config)
    assert isinstance(matcher, RTDetrHungarianMatcher)
    g = torch.Generator().manual_seed(0)
    outputs = {"logits": torch.randn(2, 10, 2, generator=g), "pred_boxes": torch.rand(2, 10, 4, generator=g) * 0.5 + 0.2}
    labels = [{"class_labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.3, 0.3, 0.1, 0.1], [0.6, 0.6, 0.2, 0.2]])},
              {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]])}]
    indices = matcher(outputs, labels)
    assert [len(i) for i, _ in indices] == [2, 1]


@pytest.mark.parametrize("kind", ["mse", "pkd", "cosine"])
def test_feature_loss_zero_on_match_and_ignores_masked_cells(kind):
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 8, 4, 5, generator=g)
    mask = torch.ones(2, 1, 4, 5)
    mask[:, :, :, 3:] = 0
    student = teacher.clone()
    student[:, :, :, 3:] = torch.randn(2, 8, 4, 2, generator=g) * 10  # garbage only where the mask is 0
    loss = FeatureDistillLoss(kind)(student, teacher, mask)
    assert float(loss) < 1e-5
    worse = FeatureDistillLoss(kind)(student + torch.randn_like(student), teacher, mask)
    assert float(worse) > 1e-2


@pytest.mark.parametrize("scale", [1e-4, 1e-2, 1e3])
def test_pkd_is_invariant_to_scaling_both_maps(scale):
    """PKD standardises each channel, so scaling the teacher and the student map by one factor must not change the
    loss (the old ``sqrt(var + 1e-6)`` left every channel with std < 1e-3 unstandardised: 0.097 -> 0.0011 at 1e-4)."""
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 8, 5, 6, generator=g)
    student = teacher + 0.5 * torch.randn(2, 8, 5, 6, generator=g)
    mask = torch.ones(2, 1, 5, 6)
    mask[1, :, 3:] = 0
    loss = FeatureDistillLoss("pkd")
    base = float(loss(student, teacher, mask))
    assert base > 0.05
    assert float(loss(student * scale, teacher * scale, mask)) == pytest.approx(base, rel=1e-3)


def test_pkd_gradient_is_finite_for_a_constant_channel_and_a_single_valid_cell():
    student = torch.zeros(1, 3, 4, 4, requires_grad=True)
    teacher = torch.randn(1, 3, 4, 4)
    for mask in (torch.ones(1, 1, 4, 4), torch.zeros(1, 1, 4, 4).index_put_((torch.tensor([0]),) * 2 +
                                                                           (torch.tensor([1]), torch.tensor([2])),
                                                                           torch.tensor(1.0))):
        FeatureDistillLoss("pkd")(student, teacher, mask).backward()
        assert torch.isfinite(student.grad).all()
        student.grad = None


def test_foreground_weights_mark_cells_in_gt_boxes():
    w = foreground_weights([torch.tensor([[0.0, 0.0, 40.0, 40.0]])], (3, 3), stride=32, fg_weight=2.0)
    expected = torch.ones(3, 3)
    expected[0, 0] = 3.0  # only the centre (16, 16) lies inside [0, 40]
    assert torch.equal(w[0, 0], expected)


def test_split_denoising_drops_dn_queries():
    logits = torch.randn(2, 3, 7, 4)
    boxes = torch.rand(2, 3, 7, 4)
    out = SimpleNamespace(intermediate_logits=logits, intermediate_reference_points=boxes,
                          denoising_meta_values={"dn_num_split": [2, 5]})
    l, b = split_denoising(out)
    assert l.shape == (2, 3, 5, 4) and torch.equal(l, logits[:, :, 2:]) and torch.equal(b, boxes[:, :, 2:])


# ---- augmentation-consistent teacher targets -----------------------------------------------------------------

def _resample(teacher, affine, orig_hw, current_hw, student_grid, teacher_input_hw=None):
    b = teacher.shape[0]
    tin = torch.tensor([teacher_input_hw or orig_hw] * b)
    valid = torch.tensor([[teacher.shape[2], teacher.shape[3]]] * b)
    return resample_teacher_features(
        teacher, torch.as_tensor(affine, dtype=torch.float64)[None].repeat(b, 1, 1), torch.tensor([orig_hw] * b), tin,
        valid, torch.tensor([current_hw] * b), student_grid,
    )


def test_resample_identity_flip_and_crop_exact():
    torch.manual_seed(0)
    teacher = torch.randn(1, 5, 4, 3)  # original 128 x 96 (h, w) at stride 32
    maps, mask = _resample(teacher, np.eye(3), (128, 96), (128, 96), (4, 3))
    assert torch.allclose(maps, teacher, atol=1e-5) and bool(mask.all())

    flip = np.array([[-1.0, 0, 96], [0, 1, 0], [0, 0, 1]])
    maps, mask = _resample(teacher, flip, (128, 96), (128, 96), (4, 3))
    assert torch.allclose(maps, teacher.flip(-1), atol=1e-5) and bool(mask.all())

    crop = np.array([[1.0, 0, -32], [0, 1, -32], [0, 0, 1]])  # crop starting at (x=32, y=32), 64 x 64
    maps, mask = _resample(teacher, crop, (128, 96), (64, 64), (2, 2))
    assert torch.allclose(maps, teacher[:, :, 1:3, 1:3], atol=1e-5) and bool(mask.all())


def test_resample_teacher_at_other_resolution_and_zoom_out_mask():
    torch.manual_seed(0)
    # teacher ran at twice the original resolution: each student cell covers 2 x 2 teacher cells -> their mean
    teacher = torch.randn(1, 3, 8, 6)
    maps, mask = _resample(teacher, np.eye(3), (128, 96), (128, 96), (4, 3), teacher_input_hw=(256, 192))
    assert torch.allclose(maps, torch.nn.functional.avg_pool2d(teacher, 2), atol=1e-5)
    # zoom-out: the original occupies the top-left half of a 128 x 96 canvas; the rest has no teacher
    teacher = torch.randn(1, 3, 4, 3)
    half = np.diag([0.5, 0.5, 1.0])
    maps, mask = _resample(teacher, half, (128, 96), (128, 96), (4, 3))
    expected_mask = torch.zeros(4, 3)
    expected_mask[:2, :1] = 1  # cell centres (16, 16), (16, 48): inside the 48 x 64 image; x = 48 is on its edge
    expected_mask[:2, 1] = 1
    assert torch.equal(mask[0, 0], expected_mask)
    assert torch.equal(maps * (1 - mask), torch.zeros_like(maps))


def _resample_reference(teacher, affine, orig_hw, tin_hw, valid, current_hw, grid_hw, stride=32.0):
    """Independent float64 reference: per student cell centre -> original -> teacher input pixels -> cell units;
    bilinear over the *valid* teacher cells only (coordinates clamped to the first/last valid cell centre); mask =
    inside the current image and inside min(valid cells, the resized image)."""
    c = teacher.shape[0]
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    out = np.zeros((c, *grid_hw))
    mask = np.zeros(grid_hw)
    rows, cols = valid
    for i in range(grid_hw[0]):
        for j in range(grid_hw[1]):
            x, y = (j + 0.5) * stride, (i + 0.5) * stride
            if x > current_hw[1] or y > current_hw[0]:
                continue
            ox, oy, _ = inv @ np.array([x, y, 1.0])
            u = ox * tin_hw[1] / orig_hw[1] / stride
            v = oy * tin_hw[0] / orig_hw[0] / stride
            if not (0 <= u <= min(cols, tin_hw[1] / stride) and 0 <= v <= min(rows, tin_hw[0] / stride)):
                continue
            mask[i, j] = 1
            uu = min(max(u - 0.5, 0.0), cols - 1.0)
            vv = min(max(v - 0.5, 0.0), rows - 1.0)
            j0, i0 = int(np.floor(uu)), int(np.floor(vv))
            j1, i1 = min(j0 + 1, cols - 1), min(i0 + 1, rows - 1)
            a, b = uu - j0, vv - i0
            out[:, i, j] = ((1 - a) * (1 - b) * teacher[:, i0, j0] + a * (1 - b) * teacher[:, i0, j1]
                            + (1 - a) * b * teacher[:, i1, j0] + a * b * teacher[:, i1, j1])
    return out, mask


@pytest.mark.parametrize("case", ["zoom_out", "padded_teacher", "crop_and_flip"])
def test_resample_near_edges_and_padding_matches_float64_reference(case):
    """Cells near the image edge must not blend with grid_sample's zero padding, and cells near the last valid
    teacher cell must not reach the teacher's padded cells (filled with garbage here so any leak shows)."""
    rng = np.random.default_rng(0)
    if case == "zoom_out":  # 256 x 256 original placed at (64, 40) in a 384 x 384 canvas, then resized to 320
        orig, tin, fgrid, valid = (256, 256), (256, 256), (8, 8), (8, 8)
        s = 320 / 384
        affine = np.array([[s, 0, 40 * s], [0, s, 64 * s], [0, 0, 1]])
        current, grid = (320, 320), (10, 10)
    elif case == "padded_teacher":  # 250 x 333 original, teacher input 250 x 333 padded to 352 x 352 (11 x 11 cells)
        orig, tin, fgrid, valid = (250, 333), (250, 333), (11, 11), (8, 11)
        affine = np.diag([416 / 333, 416 / 250, 1.0])
        current, grid = (416, 416), (13, 13)
    else:  # flip + crop of a 200 x 300 original cached at 2x (teacher input 400 x 600)
        orig, tin, fgrid, valid = (200, 300), (400, 600), (13, 19), (13, 19)
        affine = np.array([[-1.0, 0, 300 - 20], [0, 1, -10], [0, 0, 1]]) @ np.eye(3)
        current, grid = (180, 260), (6, 9)
    teacher = rng.normal(size=(3, *fgrid))
    teacher[:, valid[0]:, :] = 1e3  # padded teacher cells: garbage that must never be sampled
    teacher[:, :, valid[1]:] = 1e3
    maps, mask = resample_teacher_features(
        torch.tensor(teacher, dtype=torch.float32)[None], torch.tensor(affine)[None], torch.tensor([orig]),
        torch.tensor([tin]), torch.tensor([valid]), torch.tensor([current]), grid)
    ref, ref_mask = _resample_reference(teacher, affine, orig, tin, valid, current, grid)
    assert ref_mask.sum() > 0.3 * ref_mask.size
    np.testing.assert_array_equal(mask[0, 0].numpy(), ref_mask)
    np.testing.assert_allclose(maps[0].numpy(), ref * ref_mask, atol=2e-5)


def test_teacher_boxes_follow_flip_and_crop():
    orig_hw = (100, 200)
    xyxy = np.array([[10.0, 20.0, 50.0, 60.0], [150.0, 10.0, 190.0, 90.0]])
    cxcywh = np.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2 / 200, (xyxy[:, 1] + xyxy[:, 3]) / 2 / 100,
                       (xyxy[:, 2] - xyxy[:, 0]) / 200, (xyxy[:, 3] - xyxy[:, 1]) / 100], -1)
    flip = np.array([[-1.0, 0, 200], [0, 1, 0], [0, 0, 1]])
    boxes, keep = teacher_boxes_to_current(cxcywh, orig_hw, flip, orig_hw)
    assert keep.all()
    np.testing.assert_allclose(boxes, [[150, 20, 190, 60], [10, 10, 50, 90]], atol=1e-4)
    # crop x in [30, 130], y in [0, 100]: the first box is clipped to [0, 20, 20, 60], the second one is gone
    crop = np.array([[1.0, 0, -30], [0, 1, 0], [0, 0, 1]])
    boxes, keep = teacher_boxes_to_current(cxcywh, orig_hw, crop, (100, 100))
    assert keep.tolist() == [True, False]
    np.testing.assert_allclose(boxes, [[0, 20, 20, 60]], atol=1e-4)


def test_batched_prediction_loss_matches_per_pair_reference():
    """The one-sync batched implementation equals a naive loop over layers x samples (one sample with no teacher
    boxes left after a crop)."""
    from torchvision.ops import box_convert, generalized_box_iou

    from rtcodetr.train_student.losses import binary_kl_with_logits

    g = torch.Generator().manual_seed(5)
    targets = [_teacher(num=7, seed=2), _teacher(num=3, seed=3),
               PredictionTargets(torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0))]
    logits = torch.randn(3, 2, 9, 4, generator=g)
    boxes = torch.cat([torch.rand(3, 2, 9, 2, generator=g) * 0.6 + 0.2, torch.rand(3, 2, 9, 2, generator=g) * 0.3 + 0.02], -1)
    got = PredictionDistillLoss()(logits, boxes, targets)
    matcher = DistillMatcher()
    ref = {"pred_class": 0.0, "pred_l1": 0.0, "pred_giou": 0.0}
    norm = sum(float(t.weight.sum()) for t in targets)
    for layer in range(2):
        for b, t in enumerate(targets):
            src, tgt = matcher(logits[b, layer], boxes[b, layer], t)
            if len(src) == 0:
                continue
            w = t.weight[tgt]
            ref["pred_class"] += float((binary_kl_with_logits(logits[b, layer, src], t.probs[tgt]).mean(-1) * w).sum())
            ref["pred_l1"] += float(((boxes[b, layer, src] - t.boxes[tgt]).abs().sum(-1) * w).sum())
            giou = torch.diag(generalized_box_iou(box_convert(boxes[b, layer, src], "cxcywh", "xyxy"),
                                                  box_convert(t.boxes[tgt], "cxcywh", "xyxy")))
            ref["pred_giou"] += float(((1 - giou) * w).sum())
    for k in ref:
        assert float(got[k]) == pytest.approx(ref[k] / (norm * 2), rel=1e-5), k


def test_prediction_loss_without_teacher_boxes_is_zero_and_differentiable():
    """Every teacher box cropped away: the three losses are exactly 0 and still backpropagate (DDP needs the graph)."""
    empty = PredictionTargets(torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0))
    logits = torch.randn(2, 3, 5, 4, requires_grad=True)
    boxes = torch.rand(2, 3, 5, 4, requires_grad=True)
    losses = PredictionDistillLoss()(logits, boxes, [empty, empty])
    assert set(losses) == {"pred_class", "pred_l1", "pred_giou"}
    assert all(float(v.detach()) == 0.0 for v in losses.values())
    sum(losses.values()).backward()
    assert logits.grad is not None and torch.count_nonzero(logits.grad) == 0


def test_feature_mirrored_skip_leaves_flipped_views_out_of_the_feature_loss():
    """A flipped view of a cached image has no correct cached feature target (features are not flip-equivariant):
    feature_mirrored=skip distils only the unflipped samples, resample (default) distils both."""
    from rtcodetr.train_student.config import LossConfig
    from rtcodetr.train_student.losses import DistillCriterion, mirrored_views

    flip = torch.tensor([[-1.0, 0, 64], [0, 1, 0], [0, 0, 1]])
    zoom = torch.tensor([[0.5, 0, 8], [0, 0.5, 8], [0, 0, 1]])
    vflip = torch.tensor([[1.0, 0, 0], [0, -1, 64], [0, 0, 1]])
    assert mirrored_views(torch.stack([torch.eye(3), flip, zoom, vflip, flip @ vflip])).tolist() == \
        [False, True, False, True, False]  # a 180 degree turn keeps orientation

    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 8, 2, 2, generator=g)
    student = torch.randn(2, 8, 2, 2, generator=g)
    batch = {"teacher_encoder": teacher, "affine": torch.stack([torch.eye(3), flip]),
             "orig_size": torch.tensor([[64, 64]] * 2), "size": torch.tensor([[64, 64]] * 2),
             "teacher_input_hw": torch.tensor([[64, 64]] * 2), "teacher_valid": torch.tensor([[2, 2]] * 2),
             "targets": [{"boxes": torch.zeros(0, 4)}] * 2}
    outputs = SimpleNamespace(loss=torch.tensor(0.0))

    def feature(mode, idx=slice(None)):
        crit = DistillCriterion(LossConfig(feature_weight=1.0, feature_loss="pkd", feature_mirrored=mode), True, False)
        part = {k: (v[idx] if torch.is_tensor(v) else v[idx]) for k, v in batch.items()}
        return crit(outputs, student[idx], part)["feature"]

    both, unflipped_only = feature("resample"), feature("resample", slice(0, 1))
    skipped = feature("skip")
    assert torch.allclose(skipped, unflipped_only) and not torch.allclose(both, unflipped_only)
    assert float(feature("skip", slice(1, 2))) == 0.0  # only a flipped view: nothing to distil, no NaN
