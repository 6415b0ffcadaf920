"""``ssl-cli bench shards``: configurations swept, timed and scored against ground truth in one
run; the proposal stage's parts it measures (the rebuilt OpenCV presets, the agreement order)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli.main import main
from shards.bench import BenchError, load_images, parse_sweep, run_bench, sweep
from shards.proposals import (
    FilterParams,
    SearchParams,
    _seed_c_rand,
    _seed_for,
    agreement_scores,
    filter_boxes,
    load_cv2,
    search_scale,
    segment_min_size,
    selective_search,
)
from tests.conftest import photo

# Two solid rectangles per scene on a plain background: every segmentation finds them exactly.
RECTS = [
    [(10, 12, 30, 20), (50, 40, 36, 44)],
    [(5, 50, 40, 30), (60, 8, 24, 50)],
    [(20, 20, 50, 24), (8, 60, 28, 28)],
]


def _scenes(tmp: Path) -> Path:
    """96x96 PNG scenes under tmp/images and their COCO file tmp/instances.json."""
    (tmp / "images").mkdir()
    images, anns = [], []
    for i, rects in enumerate(RECTS):
        a = np.full((96, 96, 3), 200, np.uint8)
        for j, (x, y, w, h) in enumerate(rects):
            a[y : y + h, x : x + w] = (40, 90, 160) if j else (170, 30, 30)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "bbox": [x, y, w, h],
                    "category_id": 1 + j,
                    "iscrowd": 0,
                }
            )
        Image.fromarray(a).save(tmp / "images" / f"s{i}.png")
        images.append({"id": i + 1, "file_name": f"s{i}.png", "width": 96, "height": 96})
    doc = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": 1, "name": "red"}, {"id": 2, "name": "blue"}],
    }
    (tmp / "instances.json").write_text(json.dumps(doc))
    return tmp


def test_sweep_is_every_combination_of_the_values_given():
    configs = sweep(mode=["fast", "quality"], max_iou=[0.5, 0.7], top_n=[])
    assert [(s.mode, f.max_iou) for s, f in configs] == [
        ("fast", 0.5),
        ("fast", 0.7),
        ("quality", 0.5),
        ("quality", 0.7),
    ]
    assert all(f.top_n == FilterParams().top_n for _, f in configs)  # empty: the base value
    assert sweep(SearchParams(max_side=0), base_k=[150, 150]) == [
        (SearchParams(max_side=0), FilterParams())
    ]  # duplicates dropped
    with pytest.raises(ValueError, match="'max_ios' is a field of neither"):
        sweep(max_ios=[0.5])


def test_sweep_option_values_take_the_fields_types():
    assert parse_sweep(["upsample=false,TRUE", "agreement-iou=0.6, 0.8", "mode=quality"]) == {
        "upsample": [False, True],
        "agreement_iou": [0.6, 0.8],
        "mode": ["quality"],
    }
    for item, message in [
        ("nope=1", "unknown parameter 'nope'"),
        ("top_n=ten", "'ten' is not a int"),
        ("upsample=maybe", "'maybe' is not a bool"),
        ("upsample", "expected NAME=VALUE"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_sweep([item])
    result = CliRunner().invoke(
        main, ["bench", "shards", "--rank", "search", "--sweep", "rank=agreement"]
    )
    assert result.exit_code == 2 and "rank has its own option" in result.output


def test_bench_scores_every_configuration_against_ground_truth(tmp_path):
    d = _scenes(tmp_path)
    out = tmp_path / "bench.json"
    png = tmp_path / "curve.png"
    result = CliRunner().invoke(
        main,
        ["bench", "shards", str(d / "images"), "--annotations", str(d / "instances.json")]
        + ["--min-box-side", "8", "--rank", "search", "--rank", "agreement"]
        + ["--max-iou", "0.5", "--max-iou", "0.7", "--rounds", "2"]
        + ["--json", str(out), "--plot", str(png)],
    )
    assert result.exit_code == 0, result.output
    assert "AR@100" in result.output and "varying max_iou, rank" in result.output
    report = json.loads(out.read_text())
    assert report["images"] == 3 and report["annotations"]["objects"] == 6
    names = [r["name"] for r in report["rows"]]
    # the ORL recipe once per filter threshold (its order is always the search's), then ours
    assert names == ["ORL recipe", "ORL recipe, reseeded"] * 2 + ["ours"] * 4
    for r in report["rows"]:
        assert r["gt"]["objects"] == 6 and r["gt"]["images"] == 3
        # solid rectangles on a plain ground: every configuration finds each one (a box off by
        # a pixel or two misses the strictest IoU thresholds of AR)
        assert r["gt"]["recall@0.7"] == 1.0 and 0.6 < r["gt"]["AR@100"] <= 1.0, r["label"]
        assert r["images_per_s_per_core"] > 0 and r["speedup_vs_orl"] > 0
        assert 0.0 <= r["orl_recall"] <= 1.0
    orl = [r for r in report["rows"] if r["name"].startswith("ORL")]
    assert {r["filter"]["rank"] for r in orl} == {"search"}
    assert {r["search"]["max_side"] for r in orl} == {0}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_size_that_differs_from_the_file_names_the_image_and_writes_nothing(tmp_path):
    d = _scenes(tmp_path)
    doc = json.loads((d / "instances.json").read_text())
    doc["images"][1]["width"] = 100
    (d / "instances.json").write_text(json.dumps(doc))
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        main,
        ["bench", "shards", str(d / "images"), "--annotations", str(d / "instances.json")]
        + ["--min-box-side", "8", "--json", str(out)],
    )
    assert result.exit_code == 1
    assert "1 image(s) differ in size" in result.output
    assert "s1.png is 96x96 decoded, 100x96 in the file (image id 2)" in result.output
    assert not out.exists()


def test_only_images_with_an_entry_are_benchmarked_and_none_is_an_error(tmp_path):
    d = _scenes(tmp_path)
    photo_path = d / "images" / "extra.jpg"
    Image.fromarray(photo("astronaut", (96, 96))).save(photo_path)
    notes = []
    images = load_images(str(d / "images"), annotations=d / "instances.json", log=notes.append)
    assert sorted(images.keys) == sorted(f"s{i}" for i in range(3))
    assert images.notes == {"no_entry_in_annotations": 1}
    assert notes == ["left out: 1 image(s), no entry in annotations"]
    doc = json.loads((d / "instances.json").read_text())
    for im in doc["images"]:
        im["file_name"] = "elsewhere/" + im["file_name"] + ".jpg"
    (d / "other.json").write_text(json.dumps(doc))
    with pytest.raises(BenchError, match="no image of the file is in"):
        load_images(str(d / "images"), annotations=d / "other.json")


def test_plot_without_ground_truth_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(main, ["bench", "shards", "--plot", str(tmp_path / "a.png")])
    assert result.exit_code == 2 and "--annotations" in result.output


def test_filters_share_one_search_and_rounds_keep_the_fastest(tmp_path):
    d = _scenes(tmp_path)
    images = load_images(str(d / "images"), annotations=d / "instances.json", log=lambda s: None)
    configs = sweep(filter=FilterParams(min_side=8), top_n=[1, 100])
    rows = run_bench(images, configs, rounds=3, log=lambda s: None)
    ours = [r for r in rows if r["name"] == "ours"]
    assert [r["boxes_per_image"] for r in ours] == [1.0, ours[1]["boxes_per_image"]]
    assert ours[1]["boxes_per_image"] > 2
    # one box per image cannot cover two objects; the search is the same, so is its time
    assert ours[0]["gt"]["recall@0.5"] == 0.5
    assert abs(ours[0]["seconds"] - ours[1]["seconds"]) < 0.5 * ours[1]["seconds"]
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        run_bench(images, configs, rounds=0)


# ------------------------------------------------------------------------- the proposal stage


def test_agreement_scores_hand_case():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 9], [0, 0, 10, 5], [50, 50, 60, 60]])
    scores = agreement_scores(boxes, iou=0.7, chunk=2)  # chunks of 2 rows: same sums
    # box 0: itself 1 + box 1 (IoU 0.9) ; box 2 agrees with nobody at 0.7 (IoU 0.5 and 5/9)
    np.testing.assert_allclose(scores, [1.9, 1.9, 1.0, 1.0])
    np.testing.assert_allclose(agreement_scores(boxes, iou=0.5)[2], 1 + 0.5 + 5 / 9)
    assert agreement_scores(np.zeros((0, 4)), iou=0.7).shape == (0,)


def test_agreement_order_keeps_the_box_the_search_keeps_finding():
    loose = [0, 0, 40, 40]  # first in the search's order
    tight = [[4, 4, 36, 36], [4, 4, 36, 35], [5, 4, 36, 36]]  # found three times, nearly alike
    boxes = np.array([loose, *tight, [60, 60, 90, 90]])
    fp = FilterParams(min_side=8, max_iou=0.5, rank="search")
    np.testing.assert_array_equal(filter_boxes(boxes, fp), boxes[[0, 4]])
    kept = filter_boxes(boxes, FilterParams(min_side=8, max_iou=0.5, rank="agreement"))
    np.testing.assert_array_equal(kept, boxes[[1, 4]])  # the loose box overlaps it by 0.64
    with pytest.raises(ValueError, match="unknown rank 'best'"):
        FilterParams(rank="best")
    with pytest.raises(ValueError, match="agreement_iou must be in"):
        FilterParams(agreement_iou=0.0)


def _opencv_preset(rgb: np.ndarray, mode: str, k: int, key: str) -> np.ndarray:
    cv2 = load_cv2()
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if mode == "fast":
        ss.switchToSelectiveSearchFast(k, k)
    else:
        ss.switchToSelectiveSearchQuality(k, k)
    _seed_c_rand(_seed_for(key))
    r = np.asarray(ss.process()).reshape(-1, 4)
    return np.stack([r[:, 0], r[:, 1], r[:, 0] + r[:, 2], r[:, 1] + r[:, 3]], axis=1)


@pytest.mark.parametrize("mode", ["fast", "quality"])
def test_rebuilt_presets_give_opencvs_boxes_in_its_order(mode):
    rgb = photo("coffee", (120, 90))
    for k in (150, 60):
        ours = selective_search(rgb, SearchParams(mode=mode, max_side=0, base_k=k), key="c")
        np.testing.assert_array_equal(ours, _opencv_preset(rgb, mode, k, "c"))
    finer = selective_search(rgb, SearchParams(mode=mode, max_side=0, min_segment=20), key="c")
    assert len(finer) > len(ours)  # smaller segments: a deeper hierarchy, more boxes
    with pytest.raises(ValueError, match="min_segment must be >= 1"):
        SearchParams(min_segment=0)


def test_the_defaults_are_ours_and_the_orl_recipe_is_one_option_set_away():
    assert (SearchParams().mode, SearchParams().scale_segment) == ("lean", True)
    assert FilterParams().rank == "agreement"
    orl = SearchParams(mode="fast", max_side=0)
    rgb = photo("coffee", (120, 90))
    np.testing.assert_array_equal(
        selective_search(rgb, orl, key="o"), _opencv_preset(rgb, "fast", 150, "o")
    )


def test_smallest_segment_scales_with_the_area_of_images_below_max_side():
    p = SearchParams(max_side=320, min_segment=100, scale_segment=True)
    assert segment_min_size(96, 96, p) == 9  # 100 * (96 / 320)^2 = 9.0
    assert segment_min_size(160, 120, p) == 25
    assert segment_min_size(320, 240, p) == 100  # a copy of max_side: as given
    assert segment_min_size(96, 96, SearchParams(max_side=0, scale_segment=True)) == 100
    assert segment_min_size(96, 96, SearchParams(scale_segment=False)) == 100
    assert segment_min_size(4, 4, p) == 1  # never below one pixel


def test_upsample_searches_a_copy_of_max_side_and_maps_boxes_back():
    p = SearchParams(max_side=192, upsample=True)
    assert search_scale(96, 72, p) == 2.0
    assert search_scale(96, 72, SearchParams(max_side=192)) == 1.0  # never, unless asked
    rgb = photo("coffee", (96, 72))
    up = selective_search(rgb, p, key="u")
    plain = selective_search(rgb, SearchParams(max_side=192, scale_segment=False), key="u")
    assert up.max(axis=0)[2] <= 96 and up.max(axis=0)[3] <= 72 and up.min() >= 0
    assert len(up) > len(plain)  # four times the pixels, finer segments
