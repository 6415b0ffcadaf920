"""``ssl-cli plot`` on one or several runs: panels, learning rate, accuracy axis, legend."""

import json

import matplotlib.pyplot as plt
import pytest
from click.testing import CliRunner
from PIL import Image

from cli.plot_cmds import plot_cmd
from train.outputs.plots import curves_figure, plot_run, plot_runs, run_names


def _train_record(step, steps_per_epoch=10, base_lr=1e-3, scale=1.0):
    """A training line as the trainer writes it (MOS terms)."""
    return {
        "step": step,
        "epoch": round(step / steps_per_epoch, 4),
        "lr": base_lr * min(1.0, step / 4),
        "wd": 0.04,
        "momentum": 0.996,
        "loss": scale * 6.0 / step,
        "m2s": scale * 2.0 / step,
        "m2m": scale * 2.5 / step,
        "s2s": scale * 1.5 / step,
        "images_per_s": 812.5,
        "elapsed_s": 0.25 * step,
    }


def _write_run(path, steps=(2, 4, 6, 8), evals=((4, 20.0, 55.0), (8, 31.5, 70.0)), **kw):
    path.mkdir(parents=True)
    lines = []
    for s in steps:
        lines.append(_train_record(s, **kw))
        for at, top1, top5 in evals:
            if at == s:
                lines.append({"step": s, "eval/knn_top1": top1, "eval/knn_top5": top5})
    (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _panel(fig, title):
    (ax,) = [ax for ax in fig.axes if ax.get_title() == title]
    return ax


def test_two_runs_share_one_figure_with_an_lr_panel_and_a_run_legend(tmp_path):
    a = _write_run(tmp_path / "mos")
    b = _write_run(tmp_path / "mocov3", steps=(2, 4, 6, 8, 10), base_lr=2e-3, scale=1.3)
    fig = curves_figure([a, b], log=lambda _: None)
    try:
        titles = [ax.get_title() for ax in fig.axes]
        # total loss, three terms, learning rate, accuracy; no blank axes left over
        assert titles == [
            "total loss",
            "m2s = multi-to-single (MOS eq. 11)",
            "m2m = multi-to-multi (MOS eq. 12)",
            "s2s = single-to-single (MOS eq. 13)",
            "learning rate (log scale)",
            "evaluation accuracy (%)",
        ]
        lr = _panel(fig, "learning rate (log scale)")
        assert lr.get_yscale() == "log"
        by_run = {line.get_gid(): line for line in lr.get_lines()}
        assert set(by_run) == {"mos", "mocov3"}
        assert list(by_run["mocov3"].get_ydata()) == [5e-4 * 2, 2e-3, 2e-3, 2e-3, 2e-3]
        assert by_run["mos"].get_color() != by_run["mocov3"].get_color()
        loss = _panel(fig, "total loss")
        assert [line.get_gid() for line in loss.get_lines()] == ["mos", "mocov3"]
        (legend,) = fig.legends
        assert [t.get_text() for t in legend.get_texts()] == ["mos", "mocov3"]
        colours = [h.get_color() for h in legend.legend_handles]
        assert colours == [by_run["mos"].get_color(), by_run["mocov3"].get_color()]
        acc = _panel(fig, "evaluation accuracy (%)")
        assert acc.get_ylim() == (0, 100)
        assert {line.get_gid() for line in acc.get_lines()} == {
            "mos knn_top1",
            "mos knn_top5",
            "mocov3 knn_top1",
            "mocov3 knn_top5",
        }
        assert "2 runs" in fig._suptitle.get_text()
    finally:
        plt.close(fig)


def test_equal_top1_and_top5_are_both_visible(tmp_path):
    run = _write_run(tmp_path / "run", evals=((4, 100.0, 100.0), (8, 100.0, 100.0)))
    fig = curves_figure([run])
    try:
        acc = _panel(fig, "evaluation accuracy (%)")
        lines = {line.get_label(): line for line in acc.get_lines()}
        top1, top5 = lines["knn_top1"], lines["knn_top5"]
        assert list(top1.get_ydata()) == list(top5.get_ydata()) == [100.0, 100.0]
        assert top1.get_linestyle() == "-" and top5.get_linestyle() == "--"
        assert top1.get_zorder() > top5.get_zorder()  # drawn on top
        assert top5.get_linewidth() < top1.get_linewidth()
        assert top5.get_markerfacecolor() == "none" and top1.get_markerfacecolor() != "none"
        assert acc.get_ylim() == (0, 100)
        assert [t.get_text() for t in acc.get_legend().get_texts()] == ["knn_top1", "knn_top5"]
        assert not fig.legends  # one run: no run legend
        assert fig._suptitle.get_text() == "run: 4 logged steps, last step 8"
    finally:
        plt.close(fig)


def test_the_online_branch_gets_its_own_marker(tmp_path):
    run = _write_run(tmp_path / "run", evals=())
    with open(run / "metrics.jsonl", "a") as f:
        record = {"step": 8, "eval/knn_top1": 30.0, "eval/knn_top5": 60.0}
        record |= {"eval/knn_online_top1": 25.0, "eval/knn_online_top5": 50.0}
        f.write(json.dumps(record) + "\n")
    fig = curves_figure([run])
    try:
        lines = {x.get_label(): x for x in _panel(fig, "evaluation accuracy (%)").get_lines()}
        assert set(lines) == {"knn_top1", "knn_top5", "knn_online_top1", "knn_online_top5"}
        assert lines["knn_top1"].get_marker() == lines["knn_top5"].get_marker()
        assert lines["knn_top1"].get_marker() != lines["knn_online_top1"].get_marker()
    finally:
        plt.close(fig)


def test_a_run_without_evaluations_has_no_accuracy_panel(tmp_path):
    run = _write_run(tmp_path / "run", evals=())
    fig = curves_figure([run])
    try:
        assert [ax.get_title() for ax in fig.axes][-1] == "learning rate (log scale)"
        assert len(fig.axes) == 5
    finally:
        plt.close(fig)


def test_run_names_widen_to_the_parent_where_two_runs_share_a_name(tmp_path):
    a, b = tmp_path / "seed0" / "mos", tmp_path / "seed1" / "mos"
    c = tmp_path / "x" / "seed0" / "byol"
    assert run_names([a, b, c]) == ["seed0/mos", "seed1/mos", "byol"]
    deep_a, deep_b = tmp_path / "p" / "s" / "mos", tmp_path / "q" / "s" / "mos"
    assert run_names([deep_a, deep_b]) == ["p/s/mos", "q/s/mos"]
    assert run_names([a, a]) == ["mos", "mos (2)"]


def test_duplicate_folder_names_are_told_apart_in_the_legend(tmp_path):
    a = _write_run(tmp_path / "seed0" / "mos")
    b = _write_run(tmp_path / "seed1" / "mos")
    fig = curves_figure([a, b])
    try:
        assert [t.get_text() for t in fig.legends[0].get_texts()] == ["seed0/mos", "seed1/mos"]
    finally:
        plt.close(fig)


def test_plot_runs_writes_a_png_and_plot_run_keeps_one_run(tmp_path):
    a, b = _write_run(tmp_path / "a"), _write_run(tmp_path / "b", scale=2.0)
    out = plot_runs([a, b], tmp_path / "out" / "compare.png")
    assert out == tmp_path / "out" / "compare.png"
    img = Image.open(out)
    assert img.format == "PNG" and img.size[0] > 1000
    single = plot_run(a, a / "curves.png")
    assert single == a / "curves.png" and Image.open(single).format == "PNG"
    assert plt.get_fignums() == []  # figures closed after saving


def test_errors_name_the_file(tmp_path):
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    with pytest.raises(FileNotFoundError, match=r"nothing/metrics\.jsonl not found"):
        curves_figure([empty_dir])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"empty/metrics\.jsonl is empty"):
        curves_figure([empty])


def _invoke(*args):
    return CliRunner().invoke(plot_cmd, [str(a) for a in args])


def test_cli_plots_two_runs(tmp_path):
    a, b = _write_run(tmp_path / "mos"), _write_run(tmp_path / "mocov3")
    out = tmp_path / "compare.png"
    result = _invoke(a, b, "--out", out)
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output and Image.open(out).format == "PNG"


def test_cli_one_run_defaults_to_its_curves_png(tmp_path):
    a = _write_run(tmp_path / "mos")
    result = _invoke(a)
    assert result.exit_code == 0, result.output
    assert (a / "curves.png").is_file()


def test_cli_errors(tmp_path):
    a, b = _write_run(tmp_path / "mos"), _write_run(tmp_path / "mocov3")
    result = _invoke(a, b)
    assert result.exit_code == 2 and "--out" in result.output
    assert not (a / "curves.png").exists()

    bare = tmp_path / "bare"
    bare.mkdir()
    result = _invoke(a, bare, "--out", tmp_path / "x.png")
    assert result.exit_code == 1 and f"{bare / 'metrics.jsonl'} not found" in result.output

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    result = _invoke(empty)
    assert result.exit_code == 1 and "metrics.jsonl is empty" in result.output

    result = _invoke(tmp_path / "missing")
    assert result.exit_code == 2 and "does not exist" in result.output

    result = _invoke()
    assert result.exit_code == 2 and "Missing argument" in result.output

    assert "Examples:" in _invoke("--help").output


def test_one_run_keeps_one_colour_shows_lone_points_and_eval_reports(tmp_path):
    run = _write_run(tmp_path / "run", steps=(2,), evals=((2, 20.0, 55.0),))
    (run / "eval").mkdir()
    report = {"eval": "linear", "step": 2, "branch": "both",
              "branches": {"online": {"top1": 41.5}, "target": {"top1": 44.0}}}  # fmt: skip
    (run / "eval" / "linear-both-step-00000002.json").write_text(json.dumps(report))
    (run / "eval" / "broken.json").write_text("{")  # left out, not an error
    fig = curves_figure([run])
    try:
        colours = {line.get_color() for ax in fig.axes for line in ax.get_lines()}
        assert colours == {"C0"}  # the run's colour on every panel
        loss = _panel(fig, "total loss")
        assert loss.get_lines()[0].get_marker() == "o"  # one logged step: a visible marker
        acc = _panel(fig, "evaluation accuracy (%)")
        stars = {line.get_gid(): line for line in acc.get_lines() if line.get_marker() == "*"}
        assert set(stars) == {"run linear online", "run linear target"}
        assert list(stars["run linear target"].get_ydata()) == [44.0]
    finally:
        plt.close(fig)
