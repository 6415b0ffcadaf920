"""``ssl-cli``: the command line. Parses options, builds configs, calls shards/pipeline/train."""

from __future__ import annotations

import click

from cli.bench_cmds import bench_group
from cli.common import COMPLETION, storage_options_last, version_option
from cli.data_cmds import data_group
from cli.demo_cmds import demo
from cli.eval_cmds import eval_group
from cli.export_cmds import export_cmd
from cli.pipeline_cmds import preview
from cli.plot_cmds import plot_cmd
from cli.shards_cmds import shards_group
from cli.train_cmds import pretrain


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
    epilog=COMPLETION,
)
@version_option
def main() -> None:
    """Self-supervised pretraining on multi-object images (MOS, UniVIP) from selective-search shards.

    Shard folders: a command that reads one takes it as --data SHARDS (pretrain, preview,
    bench pipeline, bench train); one that reads a labelled pair takes --train and --val (eval,
    bench quality); the shards commands take the folder they build or check as an argument. A
    run directory is the argument RUN of eval, export and plot, and --out RUN of pretrain.
    Config overrides: --set KEY=VALUE, or bare KEY=VALUE arguments after the options.

    \b
    Examples:
      ssl-cli demo
      ssl-cli shards build @sample data/shards/sample
      ssl-cli pretrain --method mos --data data/shards/sample --out runs/mos_sample --steps 20
      ssl-cli eval knn runs/mos_fmnist --train data/shards/fmnist_train --val data/shards/fmnist_test
    """


main.add_command(shards_group, name="shards")
main.add_command(data_group, name="data")
main.add_command(preview)
main.add_command(pretrain)
main.add_command(eval_group, name="eval")
main.add_command(export_cmd, name="export")
main.add_command(plot_cmd, name="plot")
main.add_command(bench_group, name="bench")
main.add_command(demo)
storage_options_last(main)

if __name__ == "__main__":
    main()
