"""UniVIP scene-pair sampling, Algorithm 1 (pipeline/scene_pairs.py)."""

import numpy as np
import pytest

from pipeline.scene_pairs import (
    FILL_MAX_ASPECT,
    FILL_MAX_IOU,
    FILL_MIN_SIZE,
    boxes_inside,
    clean_boxes,
    random_resized_crop_boxes,
    sample_scene_pair,
)
from shards.proposals import box_iou


def intersection(a, b):
    return np.concatenate([np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])])


def check_pair(width, height, boxes, k, out):
    """The invariants every result must satisfy; returns (fitting, overlap)."""
    scene1, scene2, instances = out
    for arr, shape in ((scene1, (4,)), (scene2, (4,)), (instances, (k, 4))):
        assert isinstance(arr, np.ndarray) and arr.shape == shape and arr.dtype == np.int64
    for s in (scene1, scene2):
        assert 0 <= s[0] < s[2] <= width and 0 <= s[1] < s[3] <= height, (s, width, height)
    overlap = intersection(scene1, scene2)
    assert overlap[0] < overlap[2] and overlap[1] < overlap[3], "scenes do not overlap"
    if k:
        assert (instances[:, 2] > instances[:, 0]).all() and (
            instances[:, 3] > instances[:, 1]
        ).all()
        assert boxes_inside(instances, overlap[None])[0].all(), (instances, overlap)
    # proposals that fit the returned overlap come first, in rank order
    props = clean_boxes(boxes, width, height)
    fitting = props[boxes_inside(props, overlap[None])[0]]
    n_from_boxes = min(k, len(fitting))
    assert np.array_equal(instances[:n_from_boxes], fitting[:n_from_boxes])
    return fitting, overlap


def random_case(rng):
    kind = rng.integers(4)
    if kind == 0:  # tiny
        width, height = rng.integers(1, 16, size=2)
    elif kind == 1:  # skewed
        width, height = rng.integers(1, 40), rng.integers(200, 1500)
        if rng.random() < 0.5:
            width, height = height, width
    else:
        width, height = rng.integers(16, 1300, size=2)
    n = rng.integers(0, 60)
    x0 = rng.integers(-50, width + 20, size=n)
    y0 = rng.integers(-50, height + 20, size=n)
    w = rng.integers(-5, max(width, 2), size=n)  # some degenerate / swapped
    h = rng.integers(-5, max(height, 2), size=n)
    boxes = np.stack([x0, y0, x0 + w, y0 + h], axis=1)
    k = int(rng.integers(0, 7))
    tries = int(rng.integers(1, 25))
    return int(width), int(height), boxes, k, tries


def test_invariants_on_random_inputs():
    case_rng = np.random.default_rng(2024)
    filled_checked = 0
    for seed in range(2000):
        width, height, boxes, k, tries = random_case(case_rng)
        out = sample_scene_pair(width, height, boxes, k, tries, rng=np.random.default_rng(seed))
        fitting, overlap = check_pair(width, height, boxes, k, out)
        instances = out[2]
        n_props = min(k, len(fitting))
        filled = instances[n_props:]
        if not len(filled):
            continue
        ow, oh = overlap[2] - overlap[0], overlap[3] - overlap[1]
        fw, fh = filled[:, 2] - filled[:, 0], filled[:, 3] - filled[:, 1]
        # min side (relaxed to the overlap when it is smaller) and aspect always hold
        assert (np.minimum(fw, fh) >= min(FILL_MIN_SIZE, ow, oh)).all()
        assert (np.maximum(fw / fh, fh / fw) <= FILL_MAX_ASPECT).all()
        if min(ow, oh) >= 2 * FILL_MIN_SIZE:  # room enough: IoU limit holds too
            iou = box_iou(instances, instances)
            np.fill_diagonal(iou, 0.0)
            assert (iou[n_props:] <= FILL_MAX_IOU + 1e-9).all()  # vs proposals and each other
            filled_checked += 1
    assert filled_checked > 50  # the IoU branch really was exercised


def test_finds_the_centre_boxes():
    # four small boxes in the centre, behind decoys in rank order that cannot fit an overlap
    size = 800
    centre = np.array(
        [[380, 380, 400, 400], [400, 380, 420, 400], [380, 400, 400, 420], [400, 400, 420, 420]]
    )
    decoys = np.array([[0, 0, 800, 800], [0, 0, 800, 400], [0, 400, 800, 800], [0, 0, 10, 800]])
    boxes = np.concatenate([decoys, centre])
    found = 0
    for seed in range(200):
        out = sample_scene_pair(size, size, boxes, rng=np.random.default_rng(seed))
        check_pair(size, size, boxes, 4, out)
        found += np.array_equal(out[2], centre)
    assert found >= 190


def test_first_k_in_rank_order_when_more_fit():
    # full-image scenes (scale 1, square ratio): every box fits, the first k are taken
    boxes = np.array([[10, 10, 50, 50], [0, 0, 3, 3], [20, 5, 99, 99], [1, 1, 2, 2], [5, 5, 9, 9]])
    s1, s2, inst = sample_scene_pair(
        100, 100, boxes, k=4, rng=np.random.default_rng(0), scale=(1.0, 1.0), ratio=(1.0, 1.0)
    )
    assert s1.tolist() == s2.tolist() == [0, 0, 100, 100]
    assert np.array_equal(inst, boxes[:4])


def test_partial_fill_keeps_fitting_boxes_first():
    boxes = np.array([[10, 10, 40, 40], [60, 60, 90, 90]])
    s1, s2, inst = sample_scene_pair(
        400, 400, boxes, k=4, rng=np.random.default_rng(3), scale=(1.0, 1.0), ratio=(1.0, 1.0)
    )
    assert np.array_equal(inst[:2], boxes)
    fill = inst[2:]
    assert (np.minimum(fill[:, 2] - fill[:, 0], fill[:, 3] - fill[:, 1]) >= 64).all()
    assert (box_iou(fill, inst) - np.eye(4)[2:] <= 0.5).all()


@pytest.mark.parametrize(
    "width,height,boxes",
    [
        (1, 1, np.zeros((0, 4), dtype=np.int32)),
        (1, 1, [[0, 0, 1, 1]]),
        (10, 10, np.zeros((0, 4))),
        (10, 10, [[0, 0, 100, 100], [-5, -5, 3, 3]]),  # larger than the image, partly outside
        (1, 1000, [[0, 0, 1, 1000]]),
        (1000, 1, None),
        (3, 7, [[2, 2, 2, 5], [4, 4, 1, 1]]),  # zero-area and swapped corners
        (640, 480, [[0, 0, 640, 480]] * 10),  # boxes larger than any likely overlap
        (640, 480, [[np.nan, 0, 10, 10], [5.5, 5.2, 80.1, 90.9]]),  # float, non-finite
        (640, 480, []),
    ],
)
def test_degenerate_inputs(width, height, boxes):
    boxes = np.zeros((0, 4)) if boxes is None else boxes
    for seed in range(20):
        for k in (0, 1, 4, 7):
            out = sample_scene_pair(width, height, boxes, k=k, rng=np.random.default_rng(seed))
            check_pair(width, height, boxes, k, out)


def test_tiny_image_fill_is_bounded_and_relaxed():
    s1, s2, inst = sample_scene_pair(2, 2, np.zeros((0, 4)), k=6, rng=np.random.default_rng(0))
    assert inst.shape == (6, 4)
    check_pair(2, 2, np.zeros((0, 4)), 6, (s1, s2, inst))


def test_disjoint_draws_fall_back_to_one_scene():
    # one try of two 10x10 scenes in a 1000x10 strip: they rarely overlap, and then
    # scene2 becomes scene1 so that the instances still have an overlap to live in
    boxes = np.array([[0, 0, 5, 5], [500, 0, 505, 5]])
    same = 0
    for seed in range(200):
        out = sample_scene_pair(
            1000, 10, boxes, k=2, tries=1, rng=np.random.default_rng(seed),
            scale=(0.01, 0.01), ratio=(1.0, 1.0),
        )  # fmt: skip
        check_pair(1000, 10, boxes, 2, out)
        same += np.array_equal(out[0], out[1])
    assert same > 150


def test_deterministic_for_a_seed():
    rng = np.random.default_rng(7)
    boxes = rng.integers(0, 300, size=(40, 4))
    boxes[:, 2:] += boxes[:, :2] + 5
    a = sample_scene_pair(500, 400, boxes, rng=np.random.default_rng(11))
    b = sample_scene_pair(500, 400, boxes, rng=np.random.default_rng(11))
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)
    outs = {
        tuple(
            np.concatenate(
                sample_scene_pair(500, 400, boxes, rng=np.random.default_rng(s)), axis=None
            )
        )
        for s in range(10)
    }
    assert len(outs) > 1
    # default rng works
    check_pair(500, 400, boxes, 4, sample_scene_pair(500, 400, boxes))


def test_invalid_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="width"):
        sample_scene_pair(0, 10, [], rng=rng)
    with pytest.raises(TypeError, match="height"):
        sample_scene_pair(10, 2.5, [], rng=rng)
    with pytest.raises(ValueError, match="k must"):
        sample_scene_pair(10, 10, [], k=-1, rng=rng)
    with pytest.raises(ValueError, match="tries"):
        sample_scene_pair(10, 10, [], tries=0, rng=rng)
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        sample_scene_pair(10, 10, [[1, 2, 3]], rng=rng)
    with pytest.raises(ValueError, match="scale"):
        sample_scene_pair(10, 10, [], rng=rng, scale=(0.5, 0.1))
    with pytest.raises(ValueError, match="ratio"):
        sample_scene_pair(10, 10, [], rng=rng, ratio=(0.0, 1.0))
    with pytest.raises(TypeError, match="numeric"):
        sample_scene_pair(10, 10, np.array([["a", "b", "c", "d"]]), rng=rng)


def test_random_resized_crop_boxes_follow_scale_and_ratio():
    rng = np.random.default_rng(0)
    crops = random_resized_crop_boxes(640, 480, 5000, rng, scale=(0.2, 0.6), ratio=(0.5, 2.0))
    w, h = crops[:, 2] - crops[:, 0], crops[:, 3] - crops[:, 1]
    assert (crops[:, :2] >= 0).all() and (crops[:, 2] <= 640).all() and (crops[:, 3] <= 480).all()
    frac = w * h / (640 * 480)
    assert frac.min() > 0.19 and frac.max() < 0.61
    assert (w / h).min() > 0.49 and (w / h).max() < 2.02
    # positions cover the image
    assert crops[:, 0].min() == 0 and crops[:, 2].max() == 640
    # impossible draws fall back to the centre crop with the aspect clamped
    strip = random_resized_crop_boxes(1000, 10, 4, rng, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert strip.tolist() == [[495, 0, 505, 10]] * 4
