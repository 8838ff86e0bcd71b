"""The command line: parse options, call the library, hand the rows to ``report``. No logic lives here."""
from __future__ import annotations

import os
import sys
from typing import Any

import click

from mmdetect.commands.report import report_command
from mmdetect.corpus.defaults import BATCH_TOKENS, DEFAULT_MAX_TOKENS, DEFAULT_SEQ_LEN, TOP_K
from mmdetect.errors import MMDetectError, one_line
from mmdetect.options import (
    activations_option,
    convention_option,
    corpus_options,
    debug_option,
    device_option,
    force_option,
    format_option,
    gate_options,
    layers_option,
    model_options,
    output_dir_option,
    output_option,
    output_options,
    parse_size,
    plots_option,
    progress_option,
    resolve_output,
    revision_option,
    shard_option,
    sweep_scan_options,
    text_options,
    threshold_option,
    top_option,
)
from mmdetect.version import __version__

TABLE_FORMATS = ["csv", "tsv", "json", "jsonl", "parquet", "markdown"]   # report.formats.FILE_FORMATS


def _example(*lines: str) -> str:
    """A help epilog: click prints it after the options and commands, so every help ends with its examples."""
    return "\b\nExample:\n" + "\n".join(f"  {line}" for line in lines)


class Group(click.Group):
    """Turns user errors into one line on stderr and exit code 2; tracebacks only with --debug."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MMDetectError as exc:
            if ctx.meta.get("mmdetect.debug"):
                raise
            click.echo(f"error: {one_line(exc)}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except OSError as exc:  # the disk, a permission, a pipe: the machine's state, not a bug in mmdetect
            if ctx.meta.get("mmdetect.debug"):
                raise
            from mmdetect.io.output import reason

            where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
            click.echo(f"error: {one_line(reason(exc))}{where}", err=True)
            ctx.exit(2)
        except Exception as exc:
            if ctx.meta.get("mmdetect.debug"):
                raise
            click.echo(f"error: internal error ({type(exc).__name__}: {one_line(exc)}); rerun with --debug for the "
                       f"traceback and please report it", err=True)
            ctx.exit(1)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
             epilog=_example("mmdetect scan ./my-checkpoint", "mmdetect scan gpt2 --format csv -o gpt2.csv"))
@click.version_option(__version__, prog_name="mmdetect")
@debug_option
def main() -> None:
    """Find memory-management neurons: MLP neurons whose input and output weights point in opposite directions."""


def _wrote(n_rows: int | None, output: str | None) -> None:
    if n_rows is not None:
        click.echo(f"wrote {n_rows:,} rows to {output}", err=True)


@main.command(epilog=_example("mmdetect scan ./TinyLlama --top 30",
                              "mmdetect scan gpt2 --layers 0-5 --format csv -o gpt2.csv",
                              "mmdetect scan model.gguf --raw --format parquet -o raw.parquet",
                              "mmdetect scan ./stories260K --verify 10",
                              "mmdetect scan ./gpt2 --transcoder ./gpt2-transcoders --neurons --format csv -o tc.csv"))
@click.argument("model")
@model_options
@output_options
@progress_option()
@click.option("--transcoder", default=None, metavar="PATH",
              help="Scan the features of a SAELens transcoder instead of MODEL's neurons: a folder with cfg.json "
                   "and sae_weights.safetensors, a folder of one such folder per layer, or a hub id "
                   "owner/name[@REV][:SUBFOLDER]. MODEL supplies the norms the features read and write through.")
@click.option("--neurons", "with_neurons", is_flag=True,
              help="With --transcoder: also scan MODEL's own neurons at the transcoder's layers and show them beside "
                   "the features in the per-layer summary.")
@click.option("--verify", type=click.IntRange(min=1), is_flag=False, flag_value=20, default=None, metavar="[K]",
              help="For the top K flagged neurons (20 if K is omitted) add the deletion score on text and the top "
                   "upstream writer (runs the model with transformers).")
@text_options
@activations_option
@debug_option
def scan(model: str, revision: str | None, convention: str, threshold: float, layers: str | None, device: str,
         fmt: str | None, output: str | None, top: int, flagged_only: bool, progress: bool | None,
         transcoder: str | None, with_neurons: bool, verify: int | None, text: str | None, dataset: str | None,
         field_name: str, max_tokens: int, seq_len: int, activations: str | None) -> None:
    """Scan every MLP neuron of MODEL and rank them by cos(read, write).

    MODEL is a local checkpoint folder, a hub id (cached files are used, HF_HUB_OFFLINE=1 works) or a .gguf file.
    """
    from mmdetect import report
    from mmdetect.results import flagged_rows
    from mmdetect.scanner import parse_layers
    from mmdetect.scanner import scan as run_scan

    parse_layers(layers)  # reject a bad --layers before opening anything
    fmt, output = resolve_output(fmt, output)
    if transcoder is not None or with_neurons:
        return _scan_transcoder(model, transcoder, with_neurons, fmt=fmt, output=output, top=top,
                                flagged_only=flagged_only, verify=verify, activations=activations, revision=revision,
                                convention=convention, threshold=threshold, layers=layers, device=device,
                                progress=progress)
    stats: Any = None
    if activations is not None and activations != "auto":  # a bad stats file fails before the scan
        from mmdetect.report.join import load_stats

        stats, where = load_stats(activations, model)
    if fmt == "html":  # the page of `mmdetect report MODEL` (mmdetect/commands/report.py)
        if activations is not None:
            from mmdetect.errors import UsageError
            raise UsageError("scan --format html does not join --activations: write a file format (csv, json, "
                             "parquet ...) or the table")
        from mmdetect.commands.report import scan_html
        return scan_html(model, output, verify=verify, revision=revision, convention=convention,
                         threshold=threshold, layers=layers, device=device, progress=progress, text=text,
                         dataset=dataset, field_name=field_name, max_tokens=max_tokens, seq_len=seq_len)
    # CSV, TSV, JSON and JSONL are written from the scan's numpy columns: no pandas import on the benchmarked path.
    frame = bool(verify) or fmt not in ("csv", "tsv", "json", "jsonl")
    df = run_scan(model, revision=revision, threshold=threshold, convention=convention, layers=layers,
                  device=device, progress=progress, as_frame=frame)
    if activations is not None:
        from mmdetect.report.join import join_stats, load_stats

        if stats is None:
            stats, where = load_stats(activations, model, revision=revision, convention=convention, layers=layers,
                                      device=device, progress=progress)
        df = join_stats(df, stats, where)
    render_verify: Any = None
    if verify:
        from mmdetect.analysis.verify import verify as run_verify
        from mmdetect.report.panels import render_verify

        df = run_verify(df, model, verify, revision=revision, convention=convention, text=text, dataset=dataset,
                        field_name=field_name, max_tokens=max_tokens, seq_len=seq_len, stats=stats)
    rows = flagged_rows(df) if flagged_only else df

    def draw(console: Any) -> None:
        from mmdetect.commands.page import model_name

        report.render(rows, top=top, console=console, name=model_name(model))
        if render_verify is not None:
            render_verify(df, top=top, console=console)

    _wrote(report.emit(rows, fmt, output, draw), output)


def _scan_transcoder(model: str, transcoder: str | None, with_neurons: bool, *, fmt: str, output: str | None,
                     top: int, flagged_only: bool, verify: int | None, activations: str | None,
                     **options: Any) -> None:
    """``scan MODEL --transcoder PATH``: one row per transcoder feature, in the scan's formats."""
    from mmdetect import report
    from mmdetect.analysis.features import scan_transcoder
    from mmdetect.errors import UsageError
    from mmdetect.results import flagged_rows

    if transcoder is None:
        raise UsageError("--neurons goes with --transcoder PATH (it puts the model's neurons beside the features)")
    refused = [flag for flag, given in (("--verify", verify is not None), ("--activations", activations is not None),
                                        ("--format html", fmt == "html")) if given]
    if refused:
        raise UsageError(f"scan --transcoder does not take {refused[0]}: " + (
            "`mmdetect report MODEL --transcoder PATH -o page.html` writes the report page" if fmt == "html" and
            refused[0] == "--format html" else "write the table or a file format (csv, json, parquet ...)"))
    rows = scan_transcoder(model, transcoder, neurons=with_neurons,
                           as_frame=fmt not in ("csv", "tsv", "json", "jsonl"), **options)
    rows = flagged_rows(rows) if flagged_only else rows
    _wrote(report.emit(rows, fmt, output, lambda console: report.render(rows, top=top, console=console),
                       key="features"), output)


@main.command(epilog=_example("mmdetect archs", "mmdetect archs --gguf --format csv"))
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option("--gguf", is_flag=True, help="List GGUF architectures instead of Hugging Face model types.")
@debug_option
def archs(fmt: str, gguf: bool) -> None:
    """List the model types the registry supports, with their MLP layout and whether attention heads are available."""
    from mmdetect.registry.catalog import archs_rows, refused

    rows = archs_rows("gguf" if gguf else "safetensors")
    unsupported = refused()
    if fmt == "json":
        from mmdetect.report import write_document

        write_document({"supported": rows, "unsupported": unsupported})
    elif fmt == "csv":
        from mmdetect.report import write

        write(rows, "csv")
    else:
        from mmdetect.report.tables import render_archs

        render_archs(rows, {} if gguf else unsupported, "GGUF architectures" if gguf else "model types")


@main.command(epilog=_example("mmdetect sweep configs/examples/tiny-local.yaml --output-dir sweep-out",
                              "mmdetect sweep configs/hub-small.yaml -d out/shard0 --shard 0/4",
                              "mmdetect sweep configs/published.yaml -d out --only 'gpt2-*' --baseline last-run"))
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@output_dir_option("Folder for <name>.csv per model, summary.csv/.md, results.json and the figures.")
@shard_option()
@click.option("--only", multiple=True, metavar="GLOB", help="Only entries whose name matches (repeatable).")
@force_option()
@gate_options
@sweep_scan_options
@plots_option("Draw <name>.png and overview.png (default: on).")
@progress_option("Live display (default: when stderr is a terminal).")
@debug_option
@click.pass_context
def sweep(ctx: click.Context, config: str, output_dir: str, shard: str | None, only: tuple[str, ...], force: bool,
          baseline: str | None, tolerance: float, threshold: float | None, convention: str | None,
          layers: str | None, device: str | None, fmt: str | None, plots: bool, progress: bool | None) -> None:
    """Scan every model of a zoo CONFIG (YAML) and write per-model results, a summary and regression gates.

    Options come from the command line, then the entry, then the config's defaults. Relative model paths resolve
    against the config file's folder. An entry (or the defaults) with activations: {dataset: ..., max_tokens: ...}
    also runs `mmdetect activations` on the model and joins its statistics, as `scan --activations` does. A rerun
    reuses models whose output is complete and unchanged (same options, same weights, same statistics). Exit code:
    0 ok, 1 a model failed, 3 drift from an expect: gate or --baseline, 2 a config error (nothing scanned) or another
    sweep writing to the same folder.
    """
    from mmdetect.sweep import load_config, parse_shard, run_sweep

    parsed = parse_shard(shard)
    spec = load_config(config, {"threshold": threshold, "convention": convention, "layers": layers,
                                    "device": device, "format": fmt})
    result = run_sweep(spec, output_dir, shard=parsed, only=only, force=force, baseline=baseline,
                           tolerance=tolerance, plots=plots, progress=progress,
                           debug=bool(ctx.find_root().meta.get("mmdetect.debug")))
    click.echo(f"{result.describe()} · wrote {output_dir}/summary.csv, summary.md, results.json"
               + (", overview.png" if plots else ""), err=True)
    ctx.exit(result.exit_code)


@main.command(epilog=_example("mmdetect merge out/shard0 out/shard1 out/shard2 out/shard3 --output-dir out/all",
                              "mmdetect merge shards/* -d merged --baseline last-run"))
@click.argument("folders", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@output_dir_option("Folder for the merged per-model files and reports.")
@gate_options
@plots_option("Draw overview.png (default: on).")
@debug_option
@click.pass_context
def merge(ctx: click.Context, folders: tuple[str, ...], output_dir: str, baseline: str | None, tolerance: float,
          plots: bool) -> None:
    """Combine the output folders of `mmdetect sweep --shard` runs into one, as if swept unsharded.

    Models are listed in config order; one that no folder has, or whose files do not match their recorded checksums,
    is reported as failed. Exit codes as for sweep.
    """
    from mmdetect.sweep import merge as merge_folders

    result = merge_folders(list(folders), output_dir, baseline=baseline, tolerance=tolerance, plots=plots)
    click.echo(f"merged {len(folders)} folders: {result.describe()} · wrote {output_dir}/summary.csv", err=True)
    ctx.exit(result.exit_code)


@main.command(epilog=_example(
    "mmdetect track EleutherAI/pythia-70m --revisions 'step{0..143000..1000}' -d pythia70m",
    "mmdetect track runs/checkpoint-500 runs/checkpoint-1000 runs/checkpoint-2000 -d dyn --format csv",
    "mmdetect track org/model --revisions-from revs.txt -d out --shard 0/4      # one CI job of four"))
@click.argument("sources", nargs=-1, required=True)
@click.option("--revisions", default=None, metavar="LIST",
              help="Hub revisions of the one MODEL, in training order: step0,step1000 or 'step{0..143000..1000}'.")
@click.option("--revisions-from", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="A text file with one revision a line (# comments allowed).")
@click.option("--steps", default=None, metavar="LIST",
              help="The training step of each checkpoint, e.g. 0,500,1000 (default: from names like step500).")
@output_dir_option("Folder for checkpoints/, track.parquet (or .csv), layers.csv, emergence.csv, stability.csv.")
@convention_option()
@threshold_option("neurons with cos <= T")
@layers_option()
@device_option()
@click.option("--format", "fmt", type=click.Choice(["parquet", "csv"]), default="parquet", show_default=True,
              help="The long table: track.parquet or track.csv.")
@click.option("--all", "everything", is_flag=True,
              help="emergence.csv lists every neuron ever flagged, not only those flagged at the last step.")
@shard_option("checkpoints I, I+N, I+2N, ... of the track")
@force_option("checkpoints")
@click.option("--top", type=click.IntRange(min=0), default=10, show_default=True,
              help="Trajectories drawn for the most negative final candidates.")
@plots_option("Draw track-shares.png and track-top.png (default: on).")
@progress_option()
@debug_option
@click.pass_context
def track(ctx: click.Context, sources: tuple[str, ...], revisions: str | None, revisions_from: str | None,
          steps: str | None, output_dir: str, convention: str, threshold: float, layers: str | None, device: str,
          fmt: str, everything: bool, shard: str | None, force: bool, top: int, plots: bool,
          progress: bool | None) -> None:
    """Scan the checkpoints of one training run and report when memory-management neurons appear.

    SOURCES is one hub id with --revisions/--revisions-from, or local checkpoint folders / .gguf files in training
    order. Each checkpoint is scanned once (a rerun resumes); with --shard, the run that finds every checkpoint
    scanned writes the track. Exit code: 0 ok, 1 a checkpoint failed, 2 a usage error.
    """
    from mmdetect.sweep import parse_shard
    from mmdetect.track import parse_revisions, parse_steps
    from mmdetect.track import track as run_track

    result = run_track(list(sources), output_dir=output_dir, revisions=parse_revisions(revisions, revisions_from),
                       steps=parse_steps(steps), convention=convention, threshold=threshold, layers=layers,
                       device=device, fmt=fmt, everything=everything, shard=parse_shard(shard), force=force,
                       top=top, plots=plots, progress=progress)
    for name, error in result.failed:
        click.echo(f"failed: {name}: {error}", err=True)
    if result.complete:
        click.echo(f"tracked {len(result.points)} checkpoints · wrote {output_dir}/{', '.join(result.files)}", err=True)
    elif not result.failed:
        click.echo(f"scanned this shard; {len(result.missing)} checkpoint(s) still to scan "
                   f"({', '.join(result.missing[:5])}{', ...' if len(result.missing) > 5 else ''}); rerun without "
                   f"--shard once every shard has finished to write the track", err=True)
    ctx.exit(result.exit_code)


@main.command(epilog=_example("mmdetect plot gpt2.csv", "mmdetect plot scan.csv --d-model 768 -o figure.png",
                              "mmdetect plot sweep-out            # the overview of a sweep"))
@click.argument("scan_file", type=click.Path(exists=True))
@output_option("PNG to write. Default: SCAN_FILE with .png (overview.png for a sweep folder).")
@click.option("--d-model", type=click.IntRange(min=2), default=None,
              help="Residual width for the random-direction band when no sibling .json/.parquet/.meta.json has it.")
@click.option("--threshold", type=float, default=None, metavar="T", help="Threshold line (default: the scan's).")
@click.option("--title", default=None, help="Figure title (default: the model).")
@debug_option
def plot(scan_file: str, output: str | None, d_model: int | None, threshold: float | None,
         title: str | None) -> None:
    """Draw the cos distribution per layer of a scan output (csv, tsv, json, jsonl, parquet) as a PNG.

    Given a sweep output folder, draw its overview: flagged share against relative depth, one line per model.
    """
    from mmdetect.report.plot import plot_file

    png, note = plot_file(scan_file, output, d_model=d_model, threshold=threshold, title=title)
    if note:
        click.echo(f"note: {note}", err=True)
    click.echo(f"wrote {png}", err=True)


# -- activations: every neuron over a corpus ------------------------------------------------------------------------

@main.command(epilog=_example("mmdetect activations ./stories260K -o stories.csv",
                              "mmdetect activations gpt2 --dataset web.jsonl --max-tokens 1000000 -o gpt2.parquet",
                              "mmdetect activations gpt2 --dataset hf:NAME --shard 0/8 -o part0.parquet",
                              "mmdetect merge-activations part*.parquet -o gpt2.parquet"))
@click.argument("model")
@revision_option
@convention_option()
@layers_option()
@corpus_options(DEFAULT_MAX_TOKENS, DEFAULT_SEQ_LEN)
@click.option("--shard", default="0/1", show_default=True, metavar="I/N",
              help="Only the windows whose index is I modulo N (combine the N outputs with merge-activations).")
@device_option()
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="The dtype the model runs in.")
@click.option("--max-memory", default=None, metavar="SIZE",
              help="Cap the model's memory (e.g. 8GB): what does not fit is offloaded and read from disk each pass.")
@click.option("--batch-tokens", type=click.IntRange(min=1), default=BATCH_TOKENS, show_default=True,
              help="Tokens per forward pass (whole windows).")
@click.option("--top-k", type=click.IntRange(min=1, max=1000), default=TOP_K, show_default=True,
              help="Top tokens by post-activation kept per neuron (in OUT.details.parquet).")
@format_option(TABLE_FORMATS, "File format (default: from the --output name).")
@click.option("-o", "--output", required=True, metavar="OUT",
              help="The per-neuron table; OUT.details.parquet and OUT.state are written beside it.")
@progress_option()
@debug_option
def activations(model: str, revision: str | None, convention: str, layers: str | None, text: str | None,
                dataset: str | None, field_name: str, split: str | None, max_tokens: int, seq_len: int, shard: str,
                device: str, dtype: str, max_memory: str | None, batch_tokens: int, top_k: int, fmt: str | None,
                output: str, progress: bool | None) -> None:
    """Statistics of every MLP neuron of MODEL over a corpus, from the model's own forward pass.

    One row per neuron (layer, expert, neuron, as in a scan): pre-activation moments, sign cases of gate and linear
    input, post-activation summary and the deletion score. A stopped run continues from OUT.state when rerun.
    """
    from mmdetect.corpus.activations import Request, parse_shard, run
    from mmdetect.report.activations import state_path, write_result

    fmt = resolve_output(fmt, output)[0]
    req = Request(model, revision=revision, convention=convention, layers=layers, text=text, dataset=dataset,
                  field_name=field_name, split=split, max_tokens=max_tokens, seq_len=seq_len,
                  shard=parse_shard(shard), device=device, dtype=dtype, batch_tokens=batch_tokens, top_k=top_k,
                  max_memory=parse_size(max_memory), progress=progress, state=state_path(output))
    result = run(req)
    paths = write_result(result, fmt, output)
    click.echo(f"wrote {len(result.frame):,} neurons to {paths[0]} (details: {paths[1]}; state: {req.state})",
               err=True)


@main.command("merge-activations", epilog=_example("mmdetect merge-activations part0.csv part1.csv -o all.csv"))
@click.argument("parts", nargs=-1, required=True, metavar="OUT...")
@format_option(TABLE_FORMATS, "File format (default: from the --output name).")
@click.option("-o", "--output", required=True, metavar="OUT",
              help="The merged table; OUT.details.parquet is written beside it.")
@debug_option
def merge_activations(parts: tuple[str, ...], fmt: str | None, output: str) -> None:
    """Combine the outputs of `activations --shard i/N` (every shard once) into what one run gives."""
    from mmdetect.report.activations import merge_outputs, write_result

    fmt = resolve_output(fmt, output)[0]
    result = merge_outputs(list(parts), output)
    paths = write_result(result, fmt, output)
    click.echo(f"wrote {len(result.frame):,} neurons to {paths[0]} (details: {paths[1]})", err=True)


# -- explain, heads, chains: what a candidate deletes, who wrote it, and memory-management heads -------------------

def _expert(_ctx: click.Context, _param: Any, value: str | None) -> int | str | None:
    """--expert 3 is a routed expert's index; --expert shared (or mlps.1) a label."""
    return int(value) if value is not None and value.isdigit() else value


@main.command(epilog=_example("mmdetect explain ./stories260K --layer 0 --neuron 84",
                              "mmdetect explain gpt2 -l 10 -n 2035 --text story.txt --format json -o n2035.json",
                              "mmdetect explain ./qwen-moe -l 3 -n 12 --expert shared --no-activations",
                              "mmdetect explain ./gpt2 --transcoder ./gpt2-transcoders -l 0 --feature 1"))
@click.argument("model")
@click.option("-l", "--layer", type=click.IntRange(min=0), required=True, help="The neuron's (or feature's) layer.")
@click.option("-n", "--neuron", type=click.IntRange(min=0), default=None, help="The neuron's index in its MLP.")
@click.option("--expert", default=None, metavar="E", callback=_expert,
              help="Routed expert index, or a label such as shared (MoE).")
@click.option("--transcoder", default=None, metavar="PATH",
              help="Explain a feature of this SAELens transcoder (as scan --transcoder takes it) instead of a neuron.")
@click.option("--feature", type=click.IntRange(min=0), default=None,
              help="With --transcoder: the feature's index in the transcoder at --layer.")
@revision_option
@convention_option()
@text_options
@click.option("--activations/--no-activations", default=True, show_default=True,
              help="Run the model on text for the activation evidence and the deletion score.")
@top_option(10, "Writers and tokens listed per section.")
@click.option("--contexts", type=click.IntRange(min=0), default=8, show_default=True,
              help="Top-activating contexts shown.")
@format_option(["table", "json"], "A panel on the terminal (default), or the JSON document.")
@output_option("Write to this file (atomically); a .json name implies --format json.")
@debug_option
def explain(model: str, layer: int, neuron: int | None, expert: int | str | None, transcoder: str | None,
            feature: int | None, revision: str | None, convention: str, text: str | None, dataset: str | None,
            field_name: str, max_tokens: int, seq_len: int, activations: bool, top: int, contexts: int,
            fmt: str | None, output: str | None) -> None:
    """Explain one MLP neuron of MODEL (or one transcoder feature): its upstream writers, its vocabulary view and
    what it does on text.

    Upstream writers are earlier neurons, heads and embedding tokens that write along the direction the neuron
    reads, ranked by |cos| (heads: share of output energy). The deletion score is the fraction of the residual's
    component along that direction which the neuron's own write removes, on the tokens where it fires most. A
    feature (--transcoder PATH --feature F) reads its encoder column and writes its decoder row; its activation comes
    from the transcoder's own encoder on the MLP's input.
    """
    from mmdetect import report
    from mmdetect.analysis.explain import explain as run_explain
    from mmdetect.analysis.explain import explain_feature
    from mmdetect.errors import UsageError
    from mmdetect.report.panels import render_explain

    if transcoder is None and feature is not None:
        raise UsageError("--feature F goes with --transcoder PATH (the transcoder whose feature F is explained)")
    if transcoder is not None and (feature is None or neuron is not None or expert is not None):
        raise UsageError("explain --transcoder PATH takes --feature F (not --neuron or --expert): the feature's "
                         "index in the transcoder at --layer")
    if transcoder is None and neuron is None:
        raise UsageError("explain needs --neuron N (or --transcoder PATH --feature F for a transcoder feature)")
    if output is not None:
        report.check_writable(output)
        fmt = fmt or ("json" if output.lower().endswith(".json") else "table")
    options: dict[str, Any] = {"revision": revision, "convention": convention, "text": text, "dataset": dataset,
                               "field_name": field_name, "activations": activations, "top": top,
                               "n_contexts": contexts, "max_tokens": max_tokens, "seq_len": seq_len}
    if transcoder is not None:
        assert feature is not None
        doc = explain_feature(model, transcoder, layer, feature, **options)
    else:
        assert neuron is not None
        doc = run_explain(model, layer, neuron, expert, **options)
    if fmt == "json":
        report.write_document(doc, output)
        return
    from mmdetect.commands.page import model_name

    report.render_to(output, lambda console: render_explain(doc, console, name=model_name(model)))


@main.command(epilog=_example("mmdetect heads ./stories260K",
                              "mmdetect heads gpt2 --flagged-only --format csv -o heads.csv",
                              "mmdetect heads model.gguf --threshold -0.3 --top 40"))
@click.argument("model")
@revision_option
@convention_option()
@threshold_option("heads whose copying score is <= T")
@layers_option()
@output_options
@progress_option()
@debug_option
def heads(model: str, revision: str | None, convention: str, threshold: float, layers: str | None,
          fmt: str | None, output: str | None, top: int, flagged_only: bool, progress: bool | None) -> None:
    """Rank every attention head of MODEL by the copying score of its OV circuit, most anti-copying first.

    copying = sum of Re(eigenvalues) / sum of |eigenvalues| of the d_head x d_head matrix W_V W_O (folded): -1 for a
    head that writes back exactly the negative of what it reads (copy suppression), +1 for a pure copier.
    """
    from mmdetect import report
    from mmdetect.analysis.heads import scan_heads
    from mmdetect.report.panels import render_heads as render
    from mmdetect.results import flagged_rows
    from mmdetect.scanner import parse_layers

    parse_layers(layers)
    fmt, output = resolve_output(fmt, output)
    df = scan_heads(model, revision=revision, threshold=threshold, convention=convention, layers=layers,
                    progress=progress)
    rows = flagged_rows(df) if flagged_only else df
    from mmdetect.commands.page import model_name

    _wrote(report.emit(rows, fmt, output, lambda console: render(rows, top=top, console=console,
                                                                 name=model_name(model)), key="heads"), output)


@main.command(epilog=_example("mmdetect chains ./stories260K",
                              "mmdetect chains gpt2 --threshold -0.6 --per-deleter 5 --format csv -o chains.csv",
                              "mmdetect chains ./model --no-heads --format json"))
@click.argument("model")
@revision_option
@convention_option()
@threshold_option("neurons as deleters when cos(read, write) <= T")
@threshold_option("heads as deleters when their copying score is <= T", name="--head-threshold")
@click.option("--heads/--no-heads", default=True, show_default=True, help="Include flagged heads as deleters.")
@click.option("--per-deleter", type=click.IntRange(min=1), default=3, show_default=True,
              help="Writers kept per deleter.")
@click.option("--max-deleters", type=click.IntRange(min=1), default=200, show_default=True,
              help="At most this many neuron (and head) deleters, most negative first.")
@layers_option("Deleters only in these layers, e.g. 3-5.")
@format_option()
@output_option("Write to this file (atomically). File formats hold every pair.")
@top_option()
@debug_option
def chains(model: str, revision: str | None, convention: str, threshold: float, head_threshold: float, heads: bool,
           per_deleter: int, max_deleters: int, layers: str | None, fmt: str | None, output: str | None,
           top: int) -> None:
    """List writer -> deleter pairs of MODEL: a component whose write a later flagged neuron or head reads and erases.

    Pairs rank by align x erase (align: how much of the deleter's read the writer feeds; erase: -cos(read, write) of
    a neuron, or how exactly a head writes back the negative of that writer's direction).
    """
    from mmdetect import report
    from mmdetect.analysis.chains import find_chains
    from mmdetect.report.panels import render_chains as render
    from mmdetect.scanner import parse_layers

    parse_layers(layers)
    fmt, output = resolve_output(fmt, output)
    df = find_chains(model, revision=revision, convention=convention, threshold=threshold,
                     head_threshold=head_threshold, per_deleter=per_deleter, max_deleters=max_deleters,
                     layers=layers, heads=heads)
    from mmdetect.commands.page import model_name

    _wrote(report.emit(df, fmt, output, lambda console: render(df, top=top, console=console, name=model_name(model)),
                       key="chains"), output)


main.add_command(report_command, "report")


def entry() -> None:  # pragma: no cover - exercised by the installed `mmdetect` command, not by CliRunner
    """The console script: run the CLI, flush, and leave without the interpreter's teardown.

    Tearing down torch, pandas and pyarrow takes a noticeable time after the work is done (docs/performance.md,
    "Measured choices in the code"); every file is already complete
    (written atomically) and the streams are flushed here, so nothing is lost by skipping it.
    """
    try:
        main(standalone_mode=True)
        code: Any = 0
    except SystemExit as exc:
        code = exc.code
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":  # pragma: no cover
    entry()
