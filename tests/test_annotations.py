"""Ground truth in the shards: COCO annotations read, checked, stored, verified; recall."""

from __future__ import annotations

import copy
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from cli.main import main
from shards import read_gt
from shards.annotations import AnnotationError, load_annotations
from shards.build import build_shards
from shards.process import BuildParams
from shards.proposals import FilterParams, box_iou
from shards.recall import matched_ious, proposal_recall
from shards.verify import verify_shards
from tests.conftest import exif_rotated_jpeg, photo

PARAMS = BuildParams(filter=FilterParams(min_side=8))


def _coco(tmp: Path, n: int = 4) -> tuple[Path, dict]:
    """``n`` photographs (160x120) under tmp/img/sub/, three coloured rectangles each, and the
    COCO file describing them (ids from 100, categories 3 and 7)."""
    rng = np.random.default_rng(0)
    (tmp / "img" / "sub").mkdir(parents=True)
    images, anns = [], []
    for i in range(n):
        a = photo("astronaut", (160, 120)).copy()
        for j in range(3):
            x, y = int(rng.integers(0, 110)), int(rng.integers(0, 80))
            w, h = int(rng.integers(20, 45)), int(rng.integers(20, 38))
            a[y : y + h, x : x + w] = rng.integers(0, 255, 3)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": 100 + i,
                    "bbox": [x + 0.25, y + 0.5, w - 0.5, h - 0.75],
                    "category_id": 3 if j else 7,
                    "iscrowd": int(j == 2 and i == 0),
                    "area": float(w * h),
                }
            )
        Image.fromarray(a).save(tmp / "img" / "sub" / f"im{i}.jpg", quality=95)
        images.append({"id": 100 + i, "file_name": f"im{i}.jpg", "width": 160, "height": 120})
    doc = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": 3, "name": "three"}, {"id": 7, "name": "seven"}],
    }
    return _write(tmp / "instances.json", doc), doc


def _write(path: Path, doc: dict) -> Path:
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gt")
    ann, doc = _coco(tmp)
    result = build_shards(
        str(tmp / "img"), tmp / "out", PARAMS, annotations=ann, progress=False, log=lambda _: None
    )
    return tmp, ann, doc, result


def test_ground_truth_lands_in_parquet_tar_and_manifest(built):
    tmp, ann, doc, result = built
    out = tmp / "out"
    assert not result.problems
    rows = pq.read_table(out / "proposals.parquet").to_pydict()
    assert rows["key"] == ["sub_im0", "sub_im1", "sub_im2", "sub_im3"]
    assert rows["image_id"] == [100, 101, 102, 103]
    first = doc["annotations"][0]
    x, y, w, h = first["bbox"]
    # floor/ceil: every pixel the float box touches, xyxy exclusive
    assert rows["gt_boxes"][0][0] == [int(x), int(y), int(np.ceil(x + w)), int(np.ceil(y + h))]
    assert rows["gt_labels"][0] == [7, 3, 3]
    assert rows["gt_crowd"][0] == [False, False, True]
    assert rows["gt_areas"][0][0] == pytest.approx(first["area"])
    with tarfile.open(out / "shard-000000.tar") as tf:
        gt = read_gt(tf.extractfile("sub_im0.gt").read())
    assert gt.tolist() == [b + [c, int(k)] for b, c, k in zip(
        rows["gt_boxes"][0], rows["gt_labels"][0], rows["gt_crowd"][0]
    )]  # fmt: skip
    info = result.manifest["annotations"]
    assert info["sha256"] == load_annotations(ann).sha256
    assert info["counts"] == {
        "annotated_images": 4,
        "images_without_entry": 0,
        "objects": 11,  # 12 boxes, one crowd
        "crowd": 1,
        "classes": 2,
    }
    r = info["recall"]
    assert r["objects"] == 11 and 0 < r["recall@0.7"] <= r["recall@0.5"] <= 1
    assert r["by_size"]["small"]["objects"] + r["by_size"]["medium"]["objects"] == 11
    assert verify_shards(out) == []


def test_webdataset_reads_the_gt_member(built):
    import webdataset as wds

    import shards

    tmp = built[0]
    ds = wds.WebDataset(str(tmp / "out" / "shard-000000.tar"), shardshuffle=False).decode(
        shards.boxes_decoder
    )
    first = next(iter(ds))
    assert first["gt"].shape == (3, 6) and first["gt"].dtype == np.int32


def test_verify_checks_the_truth_against_its_file(built, tmp_path):
    tmp, ann, doc, _ = built
    out = tmp / "out"
    changed = copy.deepcopy(doc)
    changed["annotations"][0]["bbox"][0] += 3
    other = _write(tmp_path / "changed.json", changed)
    problems = verify_shards(out, annotations=other)
    assert len(problems) == 1 and "sha256" in problems[0] and "changed since" in problems[0]
    problems = verify_shards(out, annotations=tmp_path / "gone.json")
    assert "not found" in problems[0] and "--annotations" in problems[0]
    # a copy of the same bytes elsewhere: OK
    same = tmp_path / "moved.json"
    same.write_bytes(ann.read_bytes())
    assert verify_shards(out, annotations=same) == []


def test_verify_finds_tampered_parquet_truth(built, tmp_path):
    import shutil

    import pyarrow as pa

    tmp, ann, _, _ = built
    out = tmp_path / "copy"
    shutil.copytree(tmp / "out", out)
    table = pq.read_table(out / "proposals.parquet")
    labels = table.column("gt_labels").to_pylist()
    labels[1] = [3] * len(labels[1])  # image 101 relabelled
    i = table.schema.get_field_index("gt_labels")
    table = table.set_column(i, table.schema.field(i), pa.array(labels, table.schema.field(i).type))
    pq.write_table(table, out / "proposals.parquet")
    problems = verify_shards(out)
    assert any("sub_im1: .gt differs" in p for p in problems)
    assert any("sub_im1: ground truth differs from image id 101" in p for p in problems)


def test_inspect_shows_objects_classes_and_recall(built):
    out = CliRunner().invoke(main, ["shards", "inspect", str(built[0] / "out")]).output
    assert "4 annotated, 0 without an entry" in out
    assert "11 in 2 of 2 classes, 1 crowd regions apart" in out
    assert "3 (three): 7" in out and "7 (seven): 4" in out and "AR@100" in out


def test_rerun_is_up_to_date_and_other_annotations_are_refused(built, tmp_path):
    tmp, ann, doc, _ = built
    again = build_shards(
        str(tmp / "img"), tmp / "out", PARAMS, annotations=ann, progress=False, log=lambda _: None
    )
    assert again.up_to_date
    changed = copy.deepcopy(doc)
    changed["annotations"][0]["category_id"] = 3
    with pytest.raises(Exception, match="annotations_sha256"):
        build_shards(
            str(tmp / "img"),
            tmp / "out",
            PARAMS,
            annotations=_write(tmp_path / "c.json", changed),
            progress=False,
            log=lambda _: None,
        )


# ------------------------------------------------------------------------- bad input


def _bad(doc: dict, edit) -> dict:
    doc = copy.deepcopy(doc)
    edit(doc)
    return doc


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["annotations"][4].update(bbox=[150, 10, 15, 10]), r"outside the image.*annotation 5 \(image 101\)"),
        (lambda d: d["annotations"][2].update(bbox=[10, 10, 0, 10]), r"non-positive.*annotation 3 \(image 100\)"),
        (lambda d: d["annotations"][1].update(category_id=9), r"category id.*annotation 2 \(image 100\): category 9"),
        (lambda d: d["annotations"][0].update(image_id=555), r"image id that 'images' does not list: annotation 1 \(image 555\)"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), r"annotation 1 \(image 100\): bbox"),
        (lambda d: d["images"][1].update(width=-3), r"image id 101 \(im1.jpg\): size"),
        (lambda d: d.pop("categories"), r"no 'categories' list"),
        (lambda d: d["annotations"].append(dict(d["annotations"][0])), r"annotation id 1 listed twice"),
    ],
)  # fmt: skip
def test_bad_annotation_files_stop_the_build_before_any_work(tmp_path, edit, message):
    ann, doc = _coco(tmp_path, n=2)
    _write(ann, _bad(doc, edit))
    with pytest.raises(AnnotationError, match=message):
        build_shards(
            str(tmp_path / "img"), tmp_path / "out", PARAMS, annotations=ann, progress=False
        )
    assert not (tmp_path / "out").exists()  # nothing written


def test_malformed_json_is_an_error_naming_the_file(tmp_path):
    _coco(tmp_path, n=1)
    bad = tmp_path / "broken.json"
    bad.write_text('{"images": [')
    result = CliRunner().invoke(
        main, ["shards", "build", str(tmp_path / "img"), str(tmp_path / "out"),
               "--annotations", str(bad)],
    )  # fmt: skip
    assert result.exit_code == 1
    assert f"{bad}: not valid JSON" in result.output
    assert not (tmp_path / "out").exists()


def test_overrun_within_a_pixel_is_clipped(tmp_path):
    ann, doc = _coco(tmp_path, n=1)
    doc["annotations"][0]["bbox"] = [140.0, 100.0, 20.6, 20.4]  # right 160.6 > 160, bottom 120.4
    _write(ann, doc)
    gt = load_annotations(ann)
    truth = gt.images["im0.jpg"]
    assert truth.boxes[0].tolist() == [140, 100, 160, 120] and gt.clipped == 1


def test_missing_and_extra_images_are_counted_and_strict_fails(tmp_path):
    ann, doc = _coco(tmp_path, n=3)
    (tmp_path / "img" / "sub" / "im2.jpg").unlink()  # in the JSON, not in SRC
    Image.fromarray(photo("coffee", (120, 100))).save(tmp_path / "img" / "extra.jpg")  # no entry
    with pytest.raises(
        AnnotationError,
        match=r"1 image\(s\) with 3 annotation\(s\) are not in the source: 'im2.jpg' \(id 102\)",
    ):
        build_shards(
            str(tmp_path / "img"), tmp_path / "strict", PARAMS, annotations=ann,
            strict_annotations=True, progress=False,
        )  # fmt: skip
    lines: list[str] = []
    result = build_shards(
        str(tmp_path / "img"), tmp_path / "out", PARAMS, annotations=ann, progress=False,
        log=lines.append,
    )  # fmt: skip
    info = result.manifest["annotations"]
    assert info["images_not_in_source"] == 1 and info["annotations_not_in_source"] == 3
    assert info["counts"]["images_without_entry"] == 1
    assert any("1 image(s) of" in line and "'im2.jpg'" in line for line in lines)
    rows = pq.read_table(tmp_path / "out" / "proposals.parquet").to_pydict()
    extra = rows["key"].index("extra")
    assert rows["image_id"][extra] is None and rows["gt_boxes"][extra] == []
    assert verify_shards(tmp_path / "out") == []


def test_size_mismatch_is_a_reject_naming_the_file_and_the_build_fails(tmp_path):
    ann, doc = _coco(tmp_path, n=2)
    # im1 carries EXIF orientation 6: it decodes as 120x160, the JSON says 160x120
    arr = np.asarray(Image.open(tmp_path / "img" / "sub" / "im1.jpg"))
    (tmp_path / "img" / "sub" / "im1.jpg").write_bytes(exif_rotated_jpeg(arr, 6))
    result = CliRunner().invoke(
        main, ["shards", "build", str(tmp_path / "img"), str(tmp_path / "out"),
               "--annotations", str(ann), "--min-side", "8", "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 1
    assert "1 image(s) disagree in size with the annotation file" in result.output
    reject = json.loads((tmp_path / "out" / "rejects.jsonl").read_text())
    assert reject["reason"] == "annotation_mismatch"
    assert "im1.jpg: decodes to 120x160" in reject["detail"] and "image id 101" in reject["detail"]
    assert "EXIF orientation" in reject["detail"]


def test_annotations_need_a_layout_of_named_files(tmp_path):
    from sklearn.datasets import load_digits  # noqa: F401 - the demo extra is installed

    _coco(tmp_path, n=1)
    result = CliRunner().invoke(
        main, ["shards", "build", "@sample", str(tmp_path / "out"), "--annotations",
               str(tmp_path / "instances.json")],
    )  # fmt: skip
    assert result.exit_code == 1 and "layouts folder, coco, imagenet" in result.output
    result = CliRunner().invoke(
        main, ["shards", "build", str(tmp_path / "img"), str(tmp_path / "o"), "--strict"]
    )
    assert result.exit_code == 2 and "--strict applies to --annotations" in result.output


def test_read_gt_rejects_bytes_it_never_writes():
    ok = np.array([[1, 2, 5, 6, 3, 0]], dtype="<i4").tobytes()
    assert read_gt(ok).tolist() == [[1, 2, 5, 6, 3, 0]]
    assert read_gt(b"").shape == (0, 6)
    with pytest.raises(ValueError, match="multiple of 24"):
        read_gt(ok[:-4], where="s.tar:k.gt")
    with pytest.raises(ValueError, match="s.tar:k.gt: object 0"):
        read_gt(np.array([[1, 2, 5, 6, 3, 2]], dtype="<i4").tobytes(), where="s.tar:k.gt")


# ---------------------------------------------------------------------------------- recall


def test_box_iou_hand_case():
    a = np.array([[0, 0, 10, 10]])
    b = np.array([[5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 10]])
    assert box_iou(a, b)[0].tolist() == pytest.approx([50 / 150, 0.0, 1.0])


def test_matching_is_one_to_one_and_greedy():
    gt = np.array([[0, 0, 10, 10], [1, 0, 11, 10]])
    # one proposal fits both; the second ground truth (IoU 1.0) takes it, the first gets 0
    assert matched_ious(np.array([[1, 0, 11, 10]]), gt).tolist() == pytest.approx([0.0, 1.0])
    # two proposals: each gt its own
    props = np.array([[1, 0, 11, 10], [0, 0, 10, 9]])
    assert matched_ious(props, gt).tolist() == pytest.approx([0.9, 1.0])


def test_proposal_recall_hand_case():
    gt = [np.array([[0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 100, 100]])]
    crowd = [np.array([False, False, True])]
    # proposal 1 hits gt 0 at IoU 0.81 (9x9 inside 10x10); proposal 2 misses; gt 1 only at rank 12
    props = [np.array([[0, 0, 9, 9]] + [[200, 200, 210, 210]] * 10 + [[50, 50, 60, 60]])]
    r = proposal_recall(props, gt, crowd, limits=(10, 100))
    assert r["objects"] == 2  # the crowd region is not an object to find
    assert r["recall@0.5"] == 1.0 and r["recall@0.7"] == 1.0
    # AR@10: gt0 passes thresholds 0.50..0.80 (7 of 10), gt1 none -> 0.35; AR@100 adds gt1 fully
    assert r["AR@10"] == pytest.approx(0.35)
    assert r["AR@100"] == pytest.approx((0.7 + 1.0) / 2)
    assert r["by_size"]["small"] == {"objects": 2, "AR@100": pytest.approx(0.85)}
    empty = proposal_recall([np.zeros((0, 4))], [np.zeros((0, 4))])
    assert empty["objects"] == 0 and empty["AR@100"] is None
