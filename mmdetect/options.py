"""Shared click options, declared once and reused by every command (as sqlite-utils does).

Each ``*_option`` is a decorator; the factories take the few words that differ between commands (what a threshold
flags, which layers a spec selects). A sweep's options override its config, so there they default to None.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import click

from mmdetect import convention as conventions
from mmdetect.errors import THRESHOLD, UsageError, check_unit

F = TypeVar("F", bound=Callable[..., Any])

FORMAT_CHOICES = ["table", "csv", "tsv", "json", "jsonl", "parquet", "markdown", "html"]
SWEEP_FORMATS = ["csv", "tsv", "json", "jsonl", "parquet"]


def stack(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    """Several option decorators as one, applied in the order they are listed (so --help lists them that way)."""
    def apply(fn: F) -> F:
        for deco in reversed(decorators):
            fn = deco(fn)
        return fn
    return apply


def debug_option(fn: F) -> F:
    def callback(ctx: click.Context, _param: Any, value: bool) -> bool:
        if value:
            ctx.find_root().meta["mmdetect.debug"] = True
        return value
    return click.option("--debug", is_flag=True, expose_value=False, callback=callback, is_eager=True,
                        help="Show full tracebacks for errors.")(fn)


def check_threshold(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """--threshold and --head-threshold: cosines and copying scores lie in [-1, 1], so NaN or 1.5 flags nothing."""
    if value is not None:
        check_unit(value, param.opts[0],
                   "copying scores" if param.name == "head_threshold" or ctx.info_name == "heads" else "cosines")
    return value


# -- what to read ---------------------------------------------------------------------------------------------------

revision_option = click.option("--revision", default=None, metavar="REV",
                               help="Hub branch, tag or commit (hub ids only).")


def convention_names() -> list[str]:
    """The conventions ``--convention`` accepts: the keys of ``convention.CONVENTIONS`` (data, no torch)."""
    return list(conventions.CONVENTIONS)


class ConventionChoice(click.Choice):
    """``click.Choice`` over ``convention_names()``, read when an option is parsed or its help shown."""

    def __init__(self) -> None:
        super().__init__((), case_sensitive=True)

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(convention_names())

    @choices.setter
    def choices(self, _value: Any) -> None:  # click.Choice.__init__ assigns it
        pass


def convention_option(override: bool = False) -> Callable[[F], F]:
    """``--convention NAME`` and its alias ``--raw`` (= ``--convention raw``), passed on as ``convention: str``.

    ``override``: for a sweep, where the option overrides the config; then ``convention`` is None unless given.
    """
    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def command(*args: Any, convention: str | None, raw_alias: bool, **kwargs: Any) -> Any:
            if raw_alias and convention not in (None, "raw"):
                raise click.UsageError(f"--raw means --convention raw; it contradicts --convention {convention}: "
                                       f"give only one")
            chosen = "raw" if raw_alias else convention
            return fn(*args, convention=chosen if override or chosen else conventions.DEFAULT, **kwargs)

        what = "Override every entry's convention" if override else "How a neuron's read and write vectors are " \
            f"taken from the weights (default: {conventions.DEFAULT})"
        command = click.option("--raw", "raw_alias", is_flag=True,
                               help="Same as --convention raw: plain cos(w_in, w_out) of the stored weights, no "
                                    "norm folding, centring or sign canonicalisation.")(command)
        return click.option("--convention", type=ConventionChoice(), default=None,
                            help=f"{what}; see the README's Conventions.")(command)  # type: ignore[return-value]
    return decorate


def threshold_option(what: str, default: float | None = THRESHOLD, name: str = "--threshold") -> Callable[[F], F]:
    """``--threshold T`` (or ``name``): ``what`` completes the help's "Flag ..." (e.g. "neurons with cos <= T")."""
    return click.option(name, type=float, default=default, show_default=default is not None, metavar="T",
                        callback=check_threshold, help=f"Flag {what}.")


def layers_option(help: str = "Only these layers, e.g. 0-5,10.") -> Callable[[F], F]:
    return click.option("--layers", default=None, metavar="SPEC", help=help)


def device_option(default: str | None = "cpu") -> Callable[[F], F]:
    what = "Where to compute" if default else "Override every entry's device"
    return click.option("--device", default=default, show_default=default is not None, metavar="DEV",
                        help=f"{what}: cpu, cuda, cuda:N or mps (falls back to cpu with a warning).")


model_options = stack(revision_option, convention_option(), threshold_option("neurons with cos <= T"),
                      layers_option(), device_option())


# -- where the rows go -----------------------------------------------------------------------------------------------

def format_option(choices: list[str] = FORMAT_CHOICES, help: str | None = None) -> Callable[[F], F]:
    return click.option("--format", "fmt", type=click.Choice(choices), default=None,
                        help=help or "Output format. Default: a table on the terminal, or the --output file's "
                                     "extension.")


def output_option(help: str = "Write to this file (atomically). File formats hold every row.") -> Callable[[F], F]:
    # A plain Path: report.check_writable explains a directory or a missing folder in one line, before the scan.
    return click.option("-o", "--output", type=click.Path(), default=None, help=help)


def top_option(default: int = 20, help: str = "Rows shown in the terminal table.") -> Callable[[F], F]:
    return click.option("--top", type=click.IntRange(min=1), default=default, show_default=True, help=help)


flagged_only_option = click.option("--flagged-only", is_flag=True, help="Only flagged rows in file output.")
output_options = stack(format_option(), output_option(), top_option(), flagged_only_option)


def progress_option(help: str = "Progress bar on stderr (default: when a terminal).") -> Callable[[F], F]:
    return click.option("--progress/--no-progress", default=None, help=help)


def resolve_output(fmt: str | None, output: str | None) -> tuple[str, str | None]:
    """(format, path): the format is taken from --format, else the --output extension, else the terminal table."""
    from mmdetect.report import check_writable, infer_format

    if output is not None:
        check_writable(output)
        if fmt in (None, "table"):
            fmt = infer_format(output) if fmt is None else "table"
    return fmt or "table", output


# -- text to run the model on (explain, scan --verify) --------------------------------------------------------------

text_options = stack(
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


def corpus_options(max_tokens_default: int, seq_len_default: int = 512) -> Callable[[F], F]:
    """The corpus of a corpus pass (``mmdetect activations``), with ``text_options``' names: ``--text``,
    ``--dataset`` (also Parquet, a ``save_to_disk`` folder and ``hf:NAME[:CONFIG]``), ``--field``, ``--split``,
    ``--max-tokens``, ``--seq-len``; checked by ``mmdetect.corpus.sources.resolve_source``."""
    return stack(
        click.option("--text", "text", type=click.Path(dir_okay=False), default=None, metavar="FILE",
                     help="Plain-text file read as one document (default: mmdetect's small built-in corpus)."),
        click.option("--dataset", default=None, metavar="SRC",
                     help="Local .txt (documents separated by blank lines), .jsonl (one object per line with a text "
                          "field, or an 'ids' list), .parquet (a text column, or an 'ids' list column), a folder "
                          "written by datasets' save_to_disk, or hf:NAME[:CONFIG] (a Hugging Face dataset, "
                          "streamed; offline from its cache with HF_HUB_OFFLINE=1)."),
        click.option("--field", "field_name", default="text", show_default=True, metavar="NAME",
                     help="The text field (JSONL) or column (Parquet, datasets) of --dataset."),
        click.option("--split", default=None, metavar="NAME",
                     help="The split of a saved DatasetDict or an hf: dataset (default: train)."),
        click.option("--max-tokens", type=click.IntRange(min=1), default=max_tokens_default, show_default=True,
                     help="Feed at most this many tokens in all (BOS included), over the whole corpus."),
        click.option("--seq-len", type=click.IntRange(min=8), default=seq_len_default, show_default=True,
                     help="Tokens per window (BOS included)."),
    )


activations_option = click.option(
    "--activations", "activations", default=None, metavar="STATS|auto",
    help="Join the per-neuron statistics of `mmdetect activations` (its output STATS, with STATS.details.parquet "
         "beside it) onto the rows, and their relation to cos into the per-layer summary; `auto` runs that corpus "
         "pass first with its defaults (nothing saved).")


def parse_size(text: str | None, option: str = "--max-memory") -> int | None:
    """'8GB', '512MiB', '2e9' -> bytes (decimal for KB/MB/GB/TB, binary for KiB/MiB/GiB/TiB)."""
    import re

    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?(?:e[0-9]+)?)\s*([kmgt]i?b?|b)?\s*", str(text).lower())
    if not m:
        raise UsageError(f"{option} {text!r} is not a size: give e.g. 8GB, 512MiB or 2e9 (bytes)")
    unit = (m.group(2) or "b").rstrip("b") or "b"
    scale = {"b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
             "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}[unit]
    value = int(float(m.group(1)) * scale)
    if value <= 0:
        raise UsageError(f"{option} {text!r} must be more than 0 bytes")
    return value


# -- sweeps and merges ------------------------------------------------------------------------------------------------

def output_dir_option(help: str) -> Callable[[F], F]:
    return click.option("-d", "--output-dir", required=True, type=click.Path(file_okay=False), help=help)


gate_options = stack(
    click.option("--baseline", type=click.Path(exists=True, file_okay=False), default=None, metavar="OLD_DIR",
                 help="Compare per-layer flagged shares with an earlier sweep's output folder."),
    click.option("--tolerance", type=click.FloatRange(min=0), default=0.01, show_default=True,
                 help="How far a layer's flagged share may move from --baseline before it counts as drift."),
)


def shard_option(what: str = "entries whose config index is I modulo N") -> Callable[[F], F]:
    return click.option("--shard", default=None, metavar="I/N", help=f"Scan only {what} (CI matrices).")


def force_option(what: str = "models") -> Callable[[F], F]:
    return click.option("--force", is_flag=True, help=f"Rescan {what} whose output is complete and unchanged.")


def plots_option(help: str) -> Callable[[F], F]:
    return click.option("--plots/--no-plots", default=True, help=help)


sweep_scan_options = stack(
    threshold_option("neurons with cos <= T in every entry (overrides the config)", default=None),
    convention_option(override=True),
    layers_option("Override every entry's layers, e.g. 0-5,10."),
    device_option(default=None),
    format_option(SWEEP_FORMATS, help="Override every entry's per-model file format."),
)
