import numpy as np
import pytest

from shards.proposals import (
    FilterParams,
    MissingXimgprocError,
    SearchParams,
    box_iou,
    filter_boxes,
    load_cv2,
    search_scale,
    selective_search,
)
from tests.conftest import photo


def test_box_iou_hand_computed():
    box = np.array([0, 0, 10, 10])
    boxes = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [10, 10, 20, 20], [0, 0, 5, 5]])
    # identical, half overlap: 50 / 150, touching corner, contained quarter
    np.testing.assert_allclose(box_iou(box[None], boxes)[0], [1.0, 50 / 150, 0.0, 0.25])


def test_filter_min_side_and_aspect():
    boxes = np.array(
        [
            [0, 0, 63, 200],  # width 63 < 64
            [0, 0, 64, 64],  # exactly the limits: kept
            [0, 0, 300, 99],  # aspect 3.03 > 3
            [0, 0, 300, 100],  # aspect exactly 3: kept
            [500, 500, 564, 756],  # aspect 0.25 < 1/3
            [500, 500, 600, 800],  # aspect exactly 1/3: kept
        ]
    )
    kept = filter_boxes(boxes, FilterParams(max_iou=1.0))
    np.testing.assert_array_equal(kept, boxes[[1, 3, 5]])
    assert kept.dtype == np.int32


def test_filter_greedy_iou_in_rank_order():
    boxes = np.array(
        [
            [0, 0, 100, 100],
            [10, 0, 110, 100],  # IoU 90/110 with the first: dropped
            [50, 0, 150, 100],  # IoU 50/150 = 0.33 with the first: kept
            [60, 0, 160, 100],  # IoU 90/110 with the third (kept): dropped
            [200, 200, 300, 300],
        ]
    )
    kept = filter_boxes(boxes, FilterParams(max_iou=0.5))
    np.testing.assert_array_equal(kept, boxes[[0, 2, 4]])
    # a dropped box never suppresses a later one: [60..160] vs dropped [10..110] is irrelevant
    assert len(filter_boxes(boxes, FilterParams(max_iou=0.5, top_n=2))) == 2
    np.testing.assert_array_equal(
        filter_boxes(boxes, FilterParams(max_iou=0.5, top_n=2)), boxes[[0, 2]]
    )


def test_filter_empty_and_top_zero():
    assert filter_boxes(np.zeros((0, 4))).shape == (0, 4)
    assert filter_boxes(np.array([[0, 0, 100, 100]]), FilterParams(top_n=0)).shape == (0, 4)


def test_search_scale():
    p = SearchParams(max_side=320, min_search_side=32)
    assert search_scale(640, 480, p) == 0.5
    assert search_scale(200, 100, p) == 1.0
    assert search_scale(6400, 64, p) == 0.5  # the short side never goes below 32
    assert search_scale(6400, 4800, SearchParams(max_side=0)) == 1.0
    with pytest.raises(ValueError, match="unknown search mode"):
        SearchParams(mode="slow")


def test_selective_search_boxes_in_original_pixels_and_deterministic():
    rgb = photo("astronaut", (480, 360))
    params = SearchParams(max_side=160)
    a = selective_search(rgb, params, key="x")
    b = selective_search(rgb, params, key="x")
    np.testing.assert_array_equal(a, b)  # same key: same rank order
    assert len(a) > 10
    assert a.dtype == np.int32
    assert (a[:, 0] >= 0).all() and (a[:, 1] >= 0).all()
    assert (a[:, 2] <= 480).all() and (a[:, 3] <= 360).all()
    assert (a[:, 2] > a[:, 0]).all() and (a[:, 3] > a[:, 1]).all()
    # boxes were mapped back from the 160-px copy: some reach the far edges of the full image
    assert a[:, 2].max() == 480 and a[:, 3].max() == 360
    # the same image at full resolution gives boxes on the same scale
    full = selective_search(rgb, SearchParams(max_side=0), key="x")
    assert full[:, 2].max() == 480


@pytest.mark.parametrize("shape", [(1, 1), (2, 300), (300, 3), (64, 2000), (16, 16)])
def test_selective_search_degenerate_shapes(shape):
    rgb = np.random.default_rng(0).integers(0, 255, (*shape, 3), dtype=np.uint8)
    boxes = selective_search(rgb, SearchParams(max_side=320), key="k")
    assert boxes.shape[1] == 4
    assert (boxes[:, 2] <= shape[1]).all() and (boxes[:, 3] <= shape[0]).all()


def test_missing_ximgproc_is_a_clear_error(monkeypatch):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "cv2", types.SimpleNamespace(__version__="4.10.0"))
    with pytest.raises(MissingXimgprocError, match="opencv-contrib-python-headless"):
        load_cv2()
