"""The command line's conventions: --version, Examples in every help, recipe defaults, one name
per concept (old spellings hidden but working), bare KEY=VALUE overrides, build progress."""

import re
import shlex
import subprocess
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

import cli.common
from cli.common import RECIPE_DEFAULT, ShardFolder, version_string
from cli.main import main
from shards.build import LogProgress, _progress
from tests.conftest import encode, photo
from train.config import parse_assignment

REPO = Path(__file__).resolve().parents[1]


def invoke(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env, prog_name="ssl-cli")


def commands(group=main, path=()):
    """Every command and group under ``main``: (path of names, command)."""
    out = [(path, group)]
    if isinstance(group, click.Group):
        for name in sorted(group.commands):
            out += commands(group.commands[name], (*path, name))
    return out


ALL = commands()


def options(cmd):
    return {opt: p for p in cmd.params if isinstance(p, click.Option) for opt in p.opts}


# ----------------------------------------------------------------------------------- version


def test_version_names_the_package_version_and_the_checkout_sha():
    result = invoke("--version")
    assert result.exit_code == 0, result.output
    line = result.output.strip()
    m = re.fullmatch(r"ssl-cli (\S+) \(git ([0-9a-f]{7,})(-dirty)?\)", line)
    assert m, line
    import importlib.metadata

    assert m.group(1) == importlib.metadata.version("ssl-cli")
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert m.group(2) == head
    status = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert bool(m.group(3)) == bool(status)


def test_version_outside_a_checkout_or_without_git_is_the_version_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(cli.common, "_ROOT", tmp_path)  # not a git checkout
    assert re.fullmatch(r"ssl-cli \S+", version_string())
    monkeypatch.setattr(cli.common, "_ROOT", REPO)
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable
    result = invoke("--version")
    assert result.exit_code == 0 and re.fullmatch(r"ssl-cli \S+", result.output.strip())


# ---------------------------------------------------------------------------------- examples


def example_lines(help_text: str) -> list[str]:
    _, _, tail = help_text.partition("Examples:\n")
    lines = []
    for line in tail.splitlines():
        if not line.startswith("    "):  # the block ends at the first line not indented
            break
        lines.append(line.strip())
    return lines


def dry_parse(line: str) -> None:
    """Parse an example through click without running it: the subcommands exist, every option
    is known, values of choices and ranges are valid, required options are there."""
    words = shlex.split(line)
    assert words[0] == "ssl-cli", line
    words = words[1:]
    cmd, name = main, "ssl-cli"
    while isinstance(cmd, click.Group):
        assert words and words[0] in cmd.commands, f"{line}: no command {words[:1]} in {name}"
        name, cmd, words = words[0], cmd.commands[words[0]], words[1:]
    ctx = click.Context(cmd, info_name=name)
    opts, extra, _ = cmd.make_parser(ctx).parse_args(list(words))
    assert not extra, f"{line}: unexpected arguments {extra}"
    for param in cmd.params:
        value = opts.get(param.name)
        given = value not in (None, (), [], ...) and repr(value) not in ("Sentinel.UNSET",)
        if param.required:
            assert given, f"{line}: missing {param.get_error_hint(ctx)}"
        if given and not isinstance(param.type, (click.Path, ShardFolder)):
            param.type_cast_value(ctx, value)  # BadParameter on a wrong choice or range
        if given and param.name == "overrides":
            for text in value:
                parse_assignment(text)  # KEY=VALUE, as --set reads it


@pytest.mark.parametrize("path, cmd", ALL, ids=[" ".join(p) or "ssl-cli" for p, _ in ALL])
def test_every_help_ends_with_examples_that_parse(path, cmd):
    result = invoke(*path, "--help")
    assert result.exit_code == 0, result.output
    assert "Examples:" in result.output, f"ssl-cli {' '.join(path)} --help has no Examples"
    lines = example_lines(result.output)
    runnable = [line for line in lines if line.startswith("ssl-cli ") or line == "ssl-cli"]
    assert 2 <= len(lines) <= 4 and runnable, lines
    if path:  # the examples of a command run that command
        assert any(line.startswith(f"ssl-cli {' '.join(path)}") for line in lines), lines
    for line in runnable:
        dry_parse(line)


@pytest.mark.parametrize("path, cmd", ALL, ids=[" ".join(p) or "ssl-cli" for p, _ in ALL])
def test_every_visible_option_has_help(path, cmd):
    for param in cmd.params:
        if isinstance(param, click.Option) and not param.hidden:
            assert (param.help or "").strip(), f"ssl-cli {' '.join(path)} {param.opts[0]}"


def test_main_help_documents_shell_completion_with_the_variable_click_reads():
    result = invoke("--help")
    assert result.output.rstrip().splitlines()[-1].strip() == (
        'Shell completion: eval "$(_SSL_CLI_COMPLETE=bash_source ssl-cli)" '
        "(zsh: zsh_source, fish: fish_source)"
    )
    script = invoke(env={"_SSL_CLI_COMPLETE": "bash_source"})
    assert script.exit_code == 0 and "_SSL_CLI_COMPLETE=bash_complete" in script.output


# ----------------------------------------------------------------------------- option help

CONFIG_OPTIONS = [
    "--synthetic",
    "--batch-size",
    "--base-lr",
    "--backbone",
    "--device",
    "--precision",
    "--compile",
    "--num-threads",
    "--loader-workers",
    "--seed",
]
PRETRAIN_ONLY = [
    "--epochs",
    "--steps",
    "--log-every",
    "--ckpt-every",
    "--keep-last",
    "--progress",
    "--eval-every",
]


def help_of(cmd, opt):
    ctx = click.Context(cmd, info_name=cmd.name)
    return " ".join(options(cmd)[opt].get_help_record(ctx)[1].split())


@pytest.mark.parametrize(
    "path, recipe_options",
    [
        (("pretrain",), CONFIG_OPTIONS + PRETRAIN_ONLY),
        (("bench", "train"), CONFIG_OPTIONS),
        (("bench", "quality"), ["--budget-seconds", "--eval-every"]),
    ],
)
def test_recipe_defaults_are_stated_and_every_option_has_help(path, recipe_options):
    cmd = main
    for name in path:
        cmd = cmd.commands[name]
    note = RECIPE_DEFAULT if path[-1] != "quality" else "[default: from --recipe; see --dry-run]"
    for opt in recipe_options:
        assert note in help_of(cmd, opt), opt
    for param in cmd.params:
        if isinstance(param, click.Option) and not param.hidden:
            assert param.help and param.help.strip(), f"{param.opts[0]} has no help text"
    text = " ".join(invoke(*path, "--help").output.split())
    assert "[default: None]" not in text
    if path[-1] != "quality":
        assert "--print-config" in text


def test_the_batch_options_say_which_batch():
    pretrain = main.commands["pretrain"]
    assert "GLOBAL batch" in help_of(pretrain, "--batch-size")
    assert "per process" in help_of(main.commands["eval"].commands["knn"], "--batch-size")
    assert "per batch" in help_of(main.commands["bench"].commands["pipeline"], "--batch-size")


# ------------------------------------------------------------ spellings removed in 0.1 (CHANGELOG)


def print_config(*args, cmd=("pretrain",)):
    extra = ("--synthetic-only",) if cmd == ("bench", "train") else ()
    result = invoke(*cmd, "--synthetic", *extra, *args, "--print-config")
    assert result.exit_code == 0, result.output
    return yaml.safe_load(result.stdout), result.stderr


@pytest.mark.parametrize("cmd", [("pretrain",), ("bench", "train")])
def test_loader_workers_is_the_only_spelling(cmd):
    new, _ = print_config("--loader-workers", "3", cmd=cmd)
    assert new["data"]["workers"] == 3
    old = invoke(*cmd, "--synthetic", "--workers", "3", "--print-config")
    assert old.exit_code == 2
    assert "No such option '--workers'. Did you mean '--loader-workers'?" in old.output


def fake_pipeline_report(monkeypatch):
    seen = {}

    def fake_run(shards, method, **kwargs):
        seen.update(shards=shards, **kwargs)
        return {"images_per_s": {}}

    monkeypatch.setattr("pipeline.bench.bench_pipeline", fake_run)
    monkeypatch.setattr("pipeline.bench.format_report", lambda report: "report")
    return seen


@pytest.mark.parametrize(
    "old, new, key",
    [("--threads", "--num-threads", "num_threads"), ("--workers", "--loader-workers", "workers")],
)
def test_bench_pipeline_takes_the_current_spellings_only(monkeypatch, tmp_path, old, new, key):
    seen = fake_pipeline_report(monkeypatch)
    base = ["bench", "pipeline", "--device", "cpu", "--no-baseline"]
    result = invoke(*base, "--data", tmp_path, new, "2")
    assert result.exit_code == 0, result.output
    assert seen["shards"] == str(tmp_path) and seen[key] == 2
    result = invoke(*base, "--data", tmp_path, old, "3")
    assert result.exit_code == 2 and f"No such option '{old}'" in result.output
    result = invoke(*base, tmp_path, new, "3")  # SHARDS as a positional argument: removed
    assert result.exit_code == 2 and "unexpected extra argument" in result.output
    assert (
        "Usage: ssl-cli bench pipeline [OPTIONS]\n" in invoke("bench", "pipeline", "--help").output
    )


def test_preview_takes_data(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(
        "pipeline.preview.render_preview", lambda shards, *a, **kw: seen.append(shards) or "p.png"
    )
    result = invoke("preview", "--data", tmp_path, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert seen == [str(tmp_path)]
    missing = invoke("preview", "--device", "cpu")
    assert missing.exit_code == 2 and "Missing option '--data'" in missing.output
    positional = invoke("preview", tmp_path, "--device", "cpu")
    assert positional.exit_code == 2 and "unexpected extra argument" in positional.output
    assert "Usage: ssl-cli preview [OPTIONS]\n" in invoke("preview", "--help").output


def test_eval_takes_the_run_as_argument(monkeypatch, tmp_path):
    seen = []

    def fake_knn(checkpoint, **kwargs):
        seen.append(checkpoint)
        counts = {"n_val": 1, "n_train": 1, "num_classes": 1, "elapsed_s": 0.0, "size": 32}
        return {"top1": 1.0, "top5": 1.0, "backbone": "b", "branch": "target", "step": 1,
                "path": "r.json", **counts}  # fmt: skip

    monkeypatch.setattr("train.eval.classify.knn_eval", fake_knn)
    shards = ["--train", tmp_path, "--val", tmp_path, "--device", "cpu"]
    result = invoke("eval", "knn", tmp_path, *shards)
    assert result.exit_code == 0, result.output
    assert seen == [str(tmp_path)]
    result = invoke("eval", "knn", "--ckpt", tmp_path, *shards)
    assert result.exit_code == 2 and "No such option '--ckpt'" in result.output
    missing = invoke("eval", "knn", *shards)
    assert missing.exit_code == 2 and "Missing argument 'RUN'" in missing.output
    help_text = invoke("eval", "knn", "--help").output
    assert "Usage: ssl-cli eval knn [OPTIONS] RUN\n" in help_text


# ------------------------------------------------------------------------- batch per GPU


@pytest.mark.parametrize("cmd", [("pretrain",), ("bench", "train")])
def test_batch_size_per_gpu_times_the_world_size(monkeypatch, cmd):
    monkeypatch.setenv("WORLD_SIZE", "4")
    cfg, _ = print_config("--batch-size-per-gpu", "16", cmd=cmd)
    assert cfg["data"]["batch_size"] == 64
    monkeypatch.delenv("WORLD_SIZE")
    cfg, _ = print_config("--batch-size-per-gpu", "16", cmd=cmd)
    assert cfg["data"]["batch_size"] == 16
    both = invoke(*cmd, "--batch-size", "64", "--batch-size-per-gpu", "16", "--print-config")
    assert both.exit_code == 2
    assert "--batch-size (global) and --batch-size-per-gpu: give one of them" in both.output


# ----------------------------------------------------------------------- KEY=VALUE overrides


@pytest.mark.parametrize("cmd", [("pretrain",), ("bench", "train")])
def test_bare_overrides_resolve_exactly_as_set(cmd):
    sets = ["optim.base_lr=1e-3", "schedule.epochs=2", "method=univip", "loss.sinkhorn_iters=5"]
    with_set, _ = print_config(*[a for s in sets for a in ("--set", s)], cmd=cmd)
    bare, _ = print_config(*sets, cmd=cmd)
    interleaved, _ = print_config(sets[0], "--base-lr", "0.5", *sets[1:], cmd=cmd)
    assert bare == with_set == interleaved
    assert bare["optim"]["base_lr"] == 1e-3 and bare["loss"]["sinkhorn_iters"] == 5


@pytest.mark.parametrize("cmd", [("pretrain",), ("bench", "train")])
def test_a_positional_that_is_not_an_override_is_a_clear_error(cmd):
    result = invoke(*cmd, "--synthetic", "data/shards/coco", "--print-config")
    assert result.exit_code == 2
    assert "unexpected argument 'data/shards/coco'" in result.output
    assert "--data SHARDS" in result.output
    bad_key = invoke(*cmd, "--synthetic", "optim.base_lrr=1", "--print-config")
    assert bad_key.exit_code == 2 and "did you mean 'optim.base_lr'" in bad_key.output


def test_bench_quality_takes_bare_overrides_too(tmp_path):
    args = ["--train", tmp_path, "--val", tmp_path, "--out", tmp_path / "q", "--dry-run"]
    result = invoke("bench", "quality", *args, "oops")
    assert result.exit_code == 2 and "unexpected argument 'oops'" in result.output


def test_flag_values_are_not_reinterpreted_as_yaml():
    # a shard folder named like a YAML float or bool stays a string
    for name in ("1e-3", "yes", "null"):
        cfg, _ = print_config("--data", name)
        assert cfg["data"]["shards"] == name
    cfg, _ = print_config("--base-lr", "1e-3", "--seed", "7", "--compile")
    assert (cfg["optim"]["base_lr"], cfg["run"]["seed"], cfg["run"]["compile"]) == (1e-3, 7, True)


# --------------------------------------------------------------------------- build progress


def test_log_progress_lines_use_the_cumulative_rate():
    now = [0.0]
    lines = []
    bar = LogProgress(1000, initial=100, write=lines.append, clock=lambda: now[0])
    for _ in range(10):  # 10 images in 10 s: 1 image/s, no line yet (under 30 s and 10%)
        now[0] += 1.0
        bar.update(1)
    assert lines == []
    now[0] += 20.0  # 30 s since the start: a line, the rate over the whole run
    bar.set_postfix(rejects=2, refresh=False)
    bar.update(1)
    assert lines == [
        "shards: 111/1000 images (11%), 0.4 images/s, 2 rejected; 0:00:30 elapsed, ETA 0:40:24"
    ]
    now[0] += 1.0
    bar.update(89)  # 200/1000: the next 10% step
    assert len(lines) == 2 and lines[1].startswith("shards: 200/1000 images (20%), 3.2 images/s")
    assert lines[1].endswith("; 0:00:31 elapsed, ETA 0:04:08")


def test_progress_is_a_bar_on_a_terminal_with_the_cumulative_rate(monkeypatch):
    class Terminal:
        def isatty(self):
            return True

        def write(self, text):
            pass

        def flush(self):
            pass

    monkeypatch.setattr("sys.stderr", Terminal())
    bar = _progress(10, 0, True)
    assert not isinstance(bar, LogProgress) and bar.smoothing == 0
    bar.close()


def test_shards_build_without_a_terminal_writes_log_lines(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        (src / f"{name}.jpg").write_bytes(encode(photo(name)))
    args = ["shards", "build", src, tmp_path / "out", "--max-side", "128", "--workers", "1"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "\r" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines and all(
        re.fullmatch(r"shards: \d/3 images .*; \d+:\d\d:\d\d elapsed, ETA \S+", x) for x in lines
    )
    assert lines[-1].startswith("shards: 3/3 images (100%)")
    quiet = invoke(*args[:3], tmp_path / "quiet", *args[4:], "--no-progress")
    assert quiet.exit_code == 0 and quiet.stderr == ""


@pytest.mark.parametrize("path", [("shards", "build"), ("pretrain",), ("eval", "knn")])
def test_object_storage_options_come_last_in_help(path):
    result = CliRunner().invoke(main, [*path, "--help"], terminal_width=200)
    options = [line.split()[0] for line in result.output.splitlines() if line.startswith("  --")]
    storage = {"--cache-dir", "--cache-size", "--s3-endpoint", "--staging"}
    first = next(i for i, o in enumerate(options) if o in storage)
    assert all(o in storage or o.startswith("--help") for o in options[first:]), options
