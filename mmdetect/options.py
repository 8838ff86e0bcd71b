"""Shared click option decorators, defined once and reused by every command (as sqlite-utils does)."""
from __future__ import annotations

from typing import Any, Callable

import click

FORMAT_CHOICES = ["table", "csv", "tsv", "json", "jsonl", "parquet", "markdown", "html"]


def _stack(*decorators: Callable) -> Callable:
    def apply(fn: Callable) -> Callable:
        for deco in reversed(decorators):
            fn = deco(fn)
        return fn
    return apply


def debug_option(fn: Callable) -> Callable:
    def callback(ctx: click.Context, _param: Any, value: bool) -> bool:
        if value:
            ctx.find_root().meta["mmdetect.debug"] = True
        return value
    return click.option("--debug", is_flag=True, expose_value=False, callback=callback, is_eager=True,
                        help="Show full tracebacks for errors.")(fn)


revision_option = click.option("--revision", default=None, metavar="REV",
                               help="Hub branch, tag or commit (hub ids only).")
layers_option = click.option("--layers", default=None, metavar="SPEC", help="Only these layers, e.g. 0-5,10.")
progress_option = click.option("--progress/--no-progress", default=None,
                               help="Progress bar on stderr (default: when a terminal).")

model_options = _stack(
    revision_option,
    click.option("--raw", is_flag=True, help="Plain cos(w_in, w_out) of the stored weights: no norm folding, "
                                             "centring or sign canonicalisation."),
    click.option("--threshold", type=float, default=-0.5, show_default=True,
                 help="Flag neurons with cos <= THRESHOLD."),
    layers_option,
    click.option("--device", default="cpu", show_default=True, metavar="DEV",
                 help="Where to compute: cpu, cuda, cuda:N or mps (falls back to cpu with a warning)."),
)

output_options = _stack(
    click.option("--format", "fmt", type=click.Choice(FORMAT_CHOICES), default=None,
                 help="Output format. Default: a table on the terminal, or the --output file's extension."),
    # A plain Path: report.check_writable explains a directory or a missing folder in one line, before the scan.
    click.option("-o", "--output", type=click.Path(), default=None,
                 help="Write to this file (atomically). File formats hold every row."),
    click.option("--top", type=click.IntRange(min=1), default=20, show_default=True,
                 help="Rows shown in the terminal table."),
    click.option("--flagged-only", is_flag=True, help="Only flagged rows in file output."),
)


def resolve_output(fmt: str | None, output: str | None) -> tuple[str, str | None]:
    """(format, path): the format is taken from --format, else the --output extension, else the terminal table."""
    from mmdetect.report import check_writable, infer_format

    if output is not None:
        check_writable(output)
        if fmt in (None, "table"):
            fmt = infer_format(output) if fmt is None else "table"
    return fmt or "table", output


text_options = _stack(
    click.option("--text", "text", type=click.Path(dir_okay=False), default=None, metavar="FILE",
                 help="Plain-text file to run the model on (default: mmdetect's small built-in corpus)."),
    click.option("--dataset", type=click.Path(dir_okay=False), default=None, metavar="PATH",
                 help="Local .jsonl (one object per line with a text field, or an 'ids' list) or .txt (documents "
                      "separated by blank lines)."),
    click.option("--field", "field_name", default="text", show_default=True, metavar="NAME",
                 help="The text field of --dataset JSONL records."),
    click.option("--max-tokens", type=click.IntRange(min=16), default=4096, show_default=True,
                 help="Run at most this many tokens."),
    click.option("--seq-len", type=click.IntRange(min=8), default=128, show_default=True,
                 help="Tokens per row (capped at the model's context)."),
)
