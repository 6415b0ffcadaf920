"""What every ``ssl-cli`` command shares: the version string, the shared options,
config overrides given as bare ``KEY=VALUE`` arguments, and the world size of a launch."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import subprocess
from pathlib import Path

import click

__all__ = [
    "DEVICES",
    "device_option",
    "COMPLETION",
    "RECIPE_DEFAULT",
    "ShardFolder",
    "fail",
    "git_describe",
    "json_option",
    "library_errors",
    "overrides_argument",
    "parse_size",
    "recipe",
    "require",
    "rounds_option",
    "split_overrides",
    "storage_options",
    "storage_options_last",
    "version_string",
    "world_size",
]

PACKAGE = "ssl-cli"
_ROOT = Path(__file__).resolve().parent.parent  # the checkout root when run from a checkout

RECIPE_DEFAULT = "[default: from the method's recipe; see --print-config]"

COMPLETION = (
    "\b\n"
    'Shell completion: eval "$(_SSL_CLI_COMPLETE=bash_source ssl-cli)" '
    "(zsh: zsh_source, fish: fish_source)"
)


def recipe(text: str) -> str:
    """An option's help text for a value whose default comes from the resolved config."""
    return f"{text} {RECIPE_DEFAULT}"


# ----------------------------------------------------------------------------------- version


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(_ROOT), *args],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_describe() -> str | None:
    """Short SHA of the checkout this package runs from, ``-dirty`` when tracked files changed;
    ``None`` when git is missing or the package is not inside a checkout of its own repository
    (an installed copy inside some other repository does not count)."""
    top = _git("rev-parse", "--show-toplevel")
    if not top:
        return None
    try:
        if Path(top).resolve() != _ROOT:
            return None
    except OSError:
        return None
    sha = _git("rev-parse", "--short", "HEAD")
    if not sha:
        return None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return f"{sha}-dirty" if status else sha


def version_string() -> str:
    """``ssl-cli 0.1.0 (git 5dde7b6-dirty)``, or ``ssl-cli 0.1.0`` outside a checkout."""
    try:
        version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    try:
        sha = git_describe()
    except Exception:  # --version never fails
        sha = None
    return f"{PACKAGE} {version}" + (f" (git {sha})" if sha else "")


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    click.echo(version_string())
    ctx.exit()


version_option = click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Print the version (and the git SHA of a checkout) and exit.",
)


def require(value, name: str):
    """``value``, or the usage error of the missing parameter ``name``."""
    if value is not None:
        return value
    ctx = click.get_current_context()
    param = next(p for p in ctx.command.params if p.name == name)
    raise click.MissingParameter(ctx=ctx, param=param)


# ------------------------------------------------------------------------ KEY=VALUE overrides


def overrides_argument(f):
    """Bare ``KEY=VALUE`` arguments after the options: the same as ``--set KEY=VALUE``."""
    return click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")(f)


def split_overrides(overrides: tuple[str, ...], shards_option: str | None = "--data") -> tuple:
    """The bare arguments as ``--set`` assignments; anything else is a usage error naming it."""
    for text in overrides:  # the values themselves are parsed by train.config.parse_assignment
        if "=" not in text:
            where = f"; shards go in {shards_option} SHARDS" if shards_option else ""
            raise click.UsageError(
                f"unexpected argument {text!r}: arguments after the options are config "
                f"overrides KEY=VALUE, e.g. optim.base_lr=1e-3 (the same as --set){where}"
            )
    return tuple(overrides)


# ------------------------------------------------------------------------------- world size


def world_size() -> int:
    """Processes of this launch: ``WORLD_SIZE`` under torchrun, 1 otherwise."""
    raw = os.environ.get("WORLD_SIZE", "").strip()
    if not raw:
        return 1
    try:
        n = int(raw)
    except ValueError:
        raise click.UsageError(f"WORLD_SIZE={raw!r} is not a number") from None
    if n < 1:
        raise click.UsageError(f"WORLD_SIZE={raw!r} must be >= 1")
    return n


# ------------------------------------------------------------------------------ object storage


def parse_size(text: str) -> int:
    """``"200G"``, ``"512M"``, ``"1.5T"`` or a plain byte count -> bytes (binary units)."""
    from shards.remote import parse_size as parse

    try:
        return parse(text)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


class ShardFolder(click.ParamType):
    """A shard folder: an ``s3://``, ``gs://`` or ``https://`` URL (read through the local shard
    cache), or a local directory (``exists``: it must exist)."""

    name = "shards"

    def __init__(self, exists: bool = True) -> None:
        self.local = click.Path(exists=exists, file_okay=False)

    def convert(self, value, param, ctx):
        from shards.location import locate
        from shards.remote import RemoteShardError

        try:
            location = locate(value)
        except RemoteShardError as e:
            self.fail(str(e), param, ctx)
        if location.is_remote:
            return location.url
        return self.local.convert(value, param, ctx)


def _configure_storage(ctx: click.Context, param: click.Parameter, value) -> None:
    if value is None:
        return
    from shards.remote import configure

    if param.name == "cache_dir":
        configure(cache_dir=value)
    elif param.name == "cache_size":
        configure(max_bytes=parse_size(value))
    elif param.name == "s3_endpoint":
        configure(endpoint_url=value)


def storage_options(f):
    """``--cache-dir``, ``--cache-size`` and ``--s3-endpoint`` for shard folders given as URLs;
    they set this process's defaults (``shards.remote.configure``), so every torchrun rank
    that parses the same command line gets the same cache."""
    for name, help_text in (
        (
            "--s3-endpoint",
            "Endpoint of an S3-compatible store (MinIO, Ceph, R2) [default: $AWS_ENDPOINT_URL, "
            "else AWS].",
        ),
        (
            "--cache-size",
            "Size limit of the local shard cache, e.g. 200G; least recently used shards go "
            "first [default: $SSL_CLI_SHARD_CACHE_BYTES, else no limit].",
        ),
        (
            "--cache-dir",
            "Local cache of shards read from a URL [default: $SSL_CLI_SHARD_CACHE, else "
            "~/.cache/ssl-cli/shards].",
        ),
    ):
        f = click.option(
            name,
            default=None,
            expose_value=False,
            callback=_configure_storage,
            help=help_text,
        )(f)
    return f


STORAGE_PARAMS = ("cache_dir", "cache_size", "s3_endpoint", "staging")


def storage_options_last(group: click.Group) -> None:
    """Every command under ``group``: the object-storage options moved to the end of its
    parameters, so ``--help`` lists what a newcomer needs first (the order of the options on
    a command line does not matter to click)."""
    for cmd in group.commands.values():
        if isinstance(cmd, click.Group):
            storage_options_last(cmd)
        cmd.params.sort(key=lambda p: p.name in STORAGE_PARAMS)  # stable: the rest keep order


def fail(e: Exception) -> click.ClickException:
    """A library error as the command's error message (exit status 1, no traceback)."""
    return click.ClickException(str(e))


DEVICES = ("auto", "cpu", "cuda")


def device_option(help: str, default: str | None = "auto"):
    """``--device auto|cpu|cuda``, declared once for every command (auto: CUDA when available);
    ``default`` None where a config's ``run.device`` decides."""
    return click.option("--device", type=click.Choice(DEVICES), default=default, help=help)


def json_option(help: str = "Also write the report as JSON."):
    """``--json PATH`` (the parameter ``json_out``): where a command also writes its report,
    declared once for the bench and eval commands."""
    return click.option(
        "--json", "json_out", type=click.Path(dir_okay=False), default=None, help=help
    )


def rounds_option(default: int, help: str):
    """``--rounds N`` (N >= 1) of the benchmarks, which alternate their contestants' order."""
    return click.option(
        "--rounds", type=click.IntRange(min=1), default=default, show_default=True, help=help
    )


LIBRARY_ERRORS = (ValueError, RuntimeError, OSError, KeyError)


def library_errors(f=None, *, usage: tuple[str, ...] = ("ConfigError",)):
    """Decorate a command: what the library raises for bad input (``ValueError``,
    ``RuntimeError``, ``OSError``, ``KeyError``: messages that name the file, key or option)
    becomes the command's error message, exit status 1 and no traceback. ``usage``: the names
    of the exceptions that are usage errors instead (exit status 2, with the usage line): a
    ``ConfigError`` (a config key or value, an option that does not fit) for every command,
    ``FileNotFoundError`` too where the missing file is one the command line names. click's
    own exceptions pass unchanged (usage errors: 2). The exit statuses, for every command:
    0 done, 1 the work failed (an input, the shards, the training), 2 the command line or
    config is wrong."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except click.ClickException:
                raise
            except LIBRARY_ERRORS as e:
                names = {c.__name__ for c in type(e).__mro__}
                if names & set(usage):
                    raise click.UsageError(str(e)) from None
                raise fail(e) from None

        return wrapper

    return decorate(f) if f is not None else decorate
