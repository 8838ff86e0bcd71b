"""The command line: parse options, call the library, hand the rows to ``report``. No logic lives here."""
from __future__ import annotations

import os
import sys
from typing import Any

import click

from mmdetect import __version__
from mmdetect.errors import MMDetectError
from mmdetect.options import (debug_option, layers_option, model_options, output_options, progress_option,
                              resolve_output, revision_option, text_options)


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
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except Exception as exc:
            if ctx.meta.get("mmdetect.debug"):
                raise
            click.echo(f"error: internal error ({type(exc).__name__}: {exc}); rerun with --debug for the traceback "
                       f"and please report it", err=True)
            ctx.exit(1)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
             epilog=_example("mmdetect scan ./my-checkpoint", "mmdetect scan gpt2 --format csv -o gpt2.csv"))
@click.version_option(__version__, prog_name="mmdetect")
@debug_option
def main() -> None:
    """Find memory-management neurons: MLP neurons whose input and output weights point in opposite directions."""


@main.command(epilog=_example("mmdetect scan ./TinyLlama --top 30",
                              "mmdetect scan gpt2 --layers 0-5 --format csv -o gpt2.csv",
                              "mmdetect scan model.gguf --raw --format parquet -o raw.parquet",
                              "mmdetect scan ./stories260K --verify 10"))
@click.argument("model")
@model_options
@output_options
@progress_option
@click.option("--verify", type=click.IntRange(min=1), is_flag=False, flag_value=20, default=None, metavar="[K]",
              help="For the top K flagged neurons (20 if K is omitted) add the deletion score on text and the top "
                   "upstream writer (runs the model with transformers).")
@text_options
@debug_option
def scan(model: str, revision: str | None, raw: bool, threshold: float, layers: str | None, device: str,
         fmt: str | None, output: str | None, top: int, flagged_only: bool, progress: bool | None,
         verify: int | None, text: str | None, dataset: str | None, field_name: str, max_tokens: int,
         seq_len: int) -> None:
    """Scan every MLP neuron of MODEL and rank them by cos(read, write).

    MODEL is a local checkpoint folder, a hub id (cached files are used, HF_HUB_OFFLINE=1 works) or a .gguf file.
    """
    from mmdetect import report
    from mmdetect.scanner import parse_layers, scan as run_scan

    parse_layers(layers)  # reject a bad --layers before opening anything
    fmt, output = resolve_output(fmt, output)
    if fmt == "html":  # the page of `mmdetect report MODEL` (mmdetect/report/command.py)
        from mmdetect.report.command import scan_html
        return scan_html(model, output, verify=verify, revision=revision, convention="raw" if raw else "folded",
                         threshold=threshold, layers=layers, device=device, progress=progress, text=text,
                         dataset=dataset, field_name=field_name, max_tokens=max_tokens, seq_len=seq_len)
    # CSV and TSV are written from the scan's numpy columns: no pandas import on the path that is benchmarked.
    frame = bool(verify) or fmt not in ("csv", "tsv")
    df = run_scan(model, revision=revision, threshold=threshold, raw=raw, layers=layers, device=device,
                  progress=progress, as_frame=frame)
    if verify:
        from mmdetect.analysis.explain import render_verify, verify as run_verify

        run_verify(df, model, verify, revision=revision, raw=raw, text=text, dataset=dataset, field_name=field_name,
                   max_tokens=max_tokens, seq_len=seq_len)
    if not flagged_only:
        rows = df
    elif frame:
        rows = df[df["flagged"]].reset_index(drop=True)
        rows.attrs = df.attrs
    else:
        rows = df.select(df.columns["flagged"])
    if fmt == "table":
        if output:
            with report.atomic_open(output) as fh:
                from rich.console import Console

                report.render(rows, top=top, console=Console(file=fh, width=140))
                if verify:
                    render_verify(df, top=top, console=Console(file=fh, width=140))
        else:
            report.render(rows, top=top)
            if verify:
                render_verify(df, top=top)
        return
    report.write(rows, fmt, output)
    if output:
        click.echo(f"wrote {len(rows):,} rows to {output}", err=True)


@main.command(epilog=_example("mmdetect archs", "mmdetect archs --gguf --format csv"))
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option("--gguf", is_flag=True, help="List GGUF architectures instead of Hugging Face model types.")
@debug_option
def archs(fmt: str, gguf: bool) -> None:
    """List the model types the registry supports, with their MLP layout."""
    from mmdetect.registry import load_registry

    registry = load_registry()
    want = "gguf" if gguf else "safetensors"
    rows = []
    for fam in registry.families:
        if fam.format != want:
            continue
        for model_type in fam.model_types:
            for spec in fam.mlps:
                rows.append({
                    "model_type": model_type, "family": fam.family, "mlp": spec.name,
                    "gated": spec.gated, "experts": spec.experts,
                    "tensors": ", ".join(f"{role}={ts.key.split('{i}.')[-1]}" for role, ts in spec.tensors().items()),
                    "pre_norm": spec.pre_norm.kind if spec.pre_norm else "none",
                    "post_norm": spec.post_norm.kind if spec.post_norm else "",
                    "variants": len(fam.variants),
                })
    rows.sort(key=lambda r: (r["model_type"], r["mlp"]))
    if fmt == "json":
        import json

        click.echo(json.dumps({"supported": rows, "unsupported": registry.refused}, indent=1))
    elif fmt == "csv":
        import csv

        writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    else:
        from rich.console import Console
        from rich.table import Table

        types = sorted({r["model_type"] for r in rows})
        table = Table(title=f"{len(types)} supported {'GGUF architectures' if gguf else 'model types'}",
                      title_justify="left", header_style="bold")
        for col in ("model_type", "mlp", "gated", "experts", "pre_norm", "post_norm", "tensors"):
            table.add_column(col)
        for r in rows:
            table.add_row(r["model_type"], r["mlp"], "yes" if r["gated"] else "", r["experts"], r["pre_norm"],
                          r["post_norm"], r["tensors"])
        console = Console()
        console.print(table)
        if not gguf and registry.refused:
            console.print("[bold]Known but unsupported:[/bold] " + "; ".join(
                f"{k} ({v})" for k, v in sorted(registry.refused.items())))


@main.command(epilog=_example("mmdetect sweep configs/examples/tiny-local.yaml --output-dir sweep-out",
                              "mmdetect sweep configs/hub-small.yaml -d out/shard0 --shard 0/4",
                              "mmdetect sweep configs/published.yaml -d out --only 'gpt2-*' --baseline last-run"))
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("-d", "--output-dir", required=True, type=click.Path(file_okay=False),
              help="Folder for <name>.csv per model, summary.csv/.md, results.json and the figures.")
@click.option("--shard", default=None, metavar="I/N", help="Scan only entries whose config index is I modulo N.")
@click.option("--only", multiple=True, metavar="GLOB", help="Only entries whose name matches (repeatable).")
@click.option("--force", is_flag=True, help="Rescan models whose output is complete and unchanged.")
@click.option("--baseline", type=click.Path(exists=True, file_okay=False), default=None, metavar="OLD_DIR",
              help="Compare per-layer flagged shares with an earlier sweep's output folder.")
@click.option("--tolerance", type=click.FloatRange(min=0), default=0.01, show_default=True,
              help="How far a layer's flagged share may move from --baseline before it counts as drift.")
@click.option("--threshold", type=float, default=None, help="Override every entry's threshold.")
@click.option("--raw/--folded", "raw", default=None, help="Override every entry's convention.")
@click.option("--layers", default=None, metavar="SPEC", help="Override every entry's layers, e.g. 0-5,10.")
@click.option("--device", default=None, metavar="DEV", help="Override every entry's device (cpu, cuda, mps).")
@click.option("--format", "fmt", type=click.Choice(["csv", "tsv", "json", "jsonl", "parquet"]), default=None,
              help="Override every entry's per-model file format.")
@click.option("--plots/--no-plots", default=True, help="Draw <name>.png and overview.png (default: on).")
@click.option("--progress/--no-progress", default=None, help="Live display (default: when stderr is a terminal).")
@debug_option
@click.pass_context
def sweep(ctx: click.Context, config: str, output_dir: str, shard: str | None, only: tuple[str, ...], force: bool,
          baseline: str | None, tolerance: float, threshold: float | None, raw: bool | None, layers: str | None,
          device: str | None, fmt: str | None, plots: bool, progress: bool | None) -> None:
    """Scan every model of a zoo CONFIG (YAML) and write per-model results, a summary and regression gates.

    Options come from the command line, then the entry, then the config's defaults. Relative model paths resolve
    against the config file's folder. A rerun skips models whose output is complete and unchanged. Exit code: 0 ok,
    1 a model failed, 3 drift from an expect: gate or --baseline, 2 a config error (nothing scanned).
    """
    from mmdetect import sweep as zoo

    parsed = zoo.parse_shard(shard)
    spec = zoo.load_config(config, {"threshold": threshold, "raw": raw, "layers": layers, "device": device,
                                    "format": fmt})
    result = zoo.run_sweep(spec, output_dir, shard=parsed, only=only, force=force, baseline=baseline,
                           tolerance=tolerance, plots=plots, progress=progress,
                           debug=bool(ctx.find_root().meta.get("mmdetect.debug")))
    click.echo(f"{' · '.join(f'{v} {k}' for k, v in result.counts.items() if v)} · wrote {output_dir}/summary.csv, "
               f"summary.md, results.json" + (", overview.png" if plots else ""), err=True)
    ctx.exit(result.exit_code)


@main.command(epilog=_example("mmdetect merge out/shard0 out/shard1 out/shard2 out/shard3 --output-dir out/all",
                              "mmdetect merge shards/* -d merged --baseline last-run"))
@click.argument("folders", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("-d", "--output-dir", required=True, type=click.Path(file_okay=False),
              help="Folder for the merged per-model files and reports.")
@click.option("--baseline", type=click.Path(exists=True, file_okay=False), default=None, metavar="OLD_DIR",
              help="Compare per-layer flagged shares with an earlier sweep's output folder.")
@click.option("--tolerance", type=click.FloatRange(min=0), default=0.01, show_default=True,
              help="How far a layer's flagged share may move from --baseline before it counts as drift.")
@click.option("--plots/--no-plots", default=True, help="Draw overview.png (default: on).")
@debug_option
@click.pass_context
def merge(ctx: click.Context, folders: tuple[str, ...], output_dir: str, baseline: str | None, tolerance: float,
          plots: bool) -> None:
    """Combine the output folders of `mmdetect sweep --shard` runs into one, as if swept unsharded.

    Models are listed in config order; one that no folder has is reported as failed. Exit codes as for sweep.
    """
    from mmdetect import sweep as zoo

    result = zoo.merge(list(folders), output_dir, baseline=baseline, tolerance=tolerance, plots=plots)
    click.echo(f"merged {len(folders)} folders: {' · '.join(f'{v} {k}' for k, v in result.counts.items() if v)} "
               f"· wrote {output_dir}/summary.csv", err=True)
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
@click.option("-d", "--output-dir", required=True, type=click.Path(file_okay=False),
              help="Folder for checkpoints/, track.parquet (or .csv), layers.csv, emergence.csv, stability.csv.")
@click.option("--convention", type=click.Choice(["folded", "raw"]), default="folded", show_default=True,
              help="How read and write vectors are formed (see README: Conventions).")
@click.option("--threshold", type=float, default=-0.5, show_default=True, help="Flag neurons with cos <= THRESHOLD.")
@layers_option
@click.option("--device", default="cpu", show_default=True, metavar="DEV", help="cpu, cuda, cuda:N or mps.")
@click.option("--format", "fmt", type=click.Choice(["parquet", "csv"]), default="parquet", show_default=True,
              help="The long table: track.parquet or track.csv.")
@click.option("--all", "everything", is_flag=True,
              help="emergence.csv lists every neuron ever flagged, not only those flagged at the last step.")
@click.option("--shard", default=None, metavar="I/N", help="Scan only checkpoints I, I+N, ... (CI matrices).")
@click.option("--force", is_flag=True, help="Rescan checkpoints even when their output is complete.")
@click.option("--top", type=click.IntRange(min=0), default=10, show_default=True,
              help="Trajectories drawn for the most negative final candidates.")
@click.option("--plots/--no-plots", default=True, help="Draw track-shares.png and track-top.png (default: on).")
@progress_option
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
    from mmdetect import sweep as zoo
    from mmdetect.track import parse_revisions, parse_steps, track as run_track

    result = run_track(list(sources), output_dir=output_dir, revisions=parse_revisions(revisions, revisions_from),
                       steps=parse_steps(steps), convention=convention, threshold=threshold, layers=layers,
                       device=device, fmt=fmt, everything=everything, shard=zoo.parse_shard(shard), force=force,
                       top=top, plots=plots, progress=progress)
    for name, error in result.failed:
        click.echo(f"failed: {name}: {error}", err=True)
    if result.complete:
        click.echo(f"tracked {len(result.units)} checkpoints · wrote {output_dir}/{', '.join(result.files)}", err=True)
    elif not result.failed:
        click.echo(f"scanned this shard; {len(result.missing)} checkpoint(s) still to scan "
                   f"({', '.join(result.missing[:5])}{', ...' if len(result.missing) > 5 else ''}); rerun without "
                   f"--shard once every shard has finished to write the track", err=True)
    ctx.exit(result.exit_code)


@main.command(epilog=_example("mmdetect plot gpt2.csv", "mmdetect plot scan.csv --d-model 768 -o figure.png",
                              "mmdetect plot sweep-out            # the overview of a sweep"))
@click.argument("scan_file", type=click.Path(exists=True))
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="PNG to write. Default: SCAN_FILE with .png (overview.png for a sweep folder).")
@click.option("--d-model", type=click.IntRange(min=2), default=None,
              help="Residual width for the random-direction band when no sibling .json/.parquet/.meta.json has it.")
@click.option("--threshold", type=float, default=None, help="Threshold line (default: the scan's).")
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


# -- explain, heads, chains: what a candidate deletes, who wrote it, and memory-management heads -------------------

def _expert(value: str | None) -> Any:
    return int(value) if value is not None and value.isdigit() else value


def _table_output(fmt: str | None, output: str | None, write: Any, render: Any, key: str) -> None:
    """Shared tail of heads and chains: a rich table on the terminal or in a file, or every row in a file format."""
    from mmdetect.report.tables import render_to, write_rows

    fmt, output = resolve_output(fmt, output)
    if fmt == "table":
        render_to(output, render)
        return
    write_rows(write, fmt, output, key)
    if output:
        click.echo(f"wrote {len(write):,} rows to {output}", err=True)


@main.command(epilog=_example("mmdetect explain ./stories260K --layer 0 --neuron 84",
                              "mmdetect explain gpt2 -l 10 -n 2035 --text story.txt --format json -o n2035.json",
                              "mmdetect explain ./qwen-moe -l 3 -n 12 --expert shared --no-activations"))
@click.argument("model")
@click.option("-l", "--layer", type=click.IntRange(min=0), required=True, help="The neuron's layer.")
@click.option("-n", "--neuron", type=click.IntRange(min=0), required=True, help="The neuron's index in its MLP.")
@click.option("--expert", default=None, metavar="E", help="Routed expert index, or a label such as shared (MoE).")
@revision_option
@click.option("--raw", is_flag=True, help="Stored weights without norm folding, centring or sign canonicalisation.")
@text_options
@click.option("--activations/--no-activations", default=True, show_default=True,
              help="Run the model on text for the activation evidence and the deletion score.")
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True,
              help="Writers and tokens listed per section.")
@click.option("--contexts", type=click.IntRange(min=0), default=8, show_default=True,
              help="Top-activating contexts shown.")
@click.option("--top-tokens", type=click.IntRange(min=1), default=None,
              help="Tokens the deletion score covers: those with the largest |activation| (default: 2%, at least 20).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default=None,
              help="A panel on the terminal (default), or the JSON document.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Write to this file (atomically); a .json name implies --format json.")
@debug_option
def explain(model: str, layer: int, neuron: int, expert: str | None, revision: str | None, raw: bool,
            text: str | None, dataset: str | None, field_name: str, max_tokens: int, seq_len: int, activations: bool,
            top: int, contexts: int, top_tokens: int | None, fmt: str | None, output: str | None) -> None:
    """Explain one MLP neuron of MODEL: its upstream writers, its vocabulary view and what it does on text.

    Upstream writers are earlier neurons, heads and embedding tokens that write along the direction the neuron
    reads, ranked by |cos| (heads: share of output energy). The deletion score is the fraction of the residual's
    component along that direction which the neuron's own write removes, on the tokens where it fires most.
    """
    import json

    from mmdetect import report
    from mmdetect.analysis.explain import explain as run_explain, render_explain
    from mmdetect.report.tables import render_to

    if output is not None:
        report.check_writable(output)
        fmt = fmt or ("json" if output.lower().endswith(".json") else "table")
    doc = run_explain(model, layer, neuron, _expert(expert), revision=revision, raw=raw, text=text, dataset=dataset,
                      field_name=field_name, activations=activations, top=top, top_tokens=top_tokens,
                      n_contexts=contexts, max_tokens=max_tokens, seq_len=seq_len)
    if fmt == "json":
        body = json.dumps(report.clean(doc), indent=1) + "\n"
        if output is None:
            click.echo(body, nl=False)
        else:
            with report.atomic_open(output) as fh:
                fh.write(body)
        return
    render_to(output, lambda console: render_explain(doc, console))


@main.command(epilog=_example("mmdetect heads ./stories260K",
                              "mmdetect heads gpt2 --flagged-only --format csv -o heads.csv",
                              "mmdetect heads model.gguf --threshold -0.3 --top 40"))
@click.argument("model")
@revision_option
@click.option("--raw", is_flag=True, help="Stored W_V and W_O without norm gains or centring.")
@click.option("--threshold", type=float, default=-0.5, show_default=True,
              help="Flag heads whose copying score is <= THRESHOLD.")
@layers_option
@output_options
@progress_option
@debug_option
def heads(model: str, revision: str | None, raw: bool, threshold: float, layers: str | None, fmt: str | None,
          output: str | None, top: int, flagged_only: bool, progress: bool | None) -> None:
    """Rank every attention head of MODEL by the copying score of its OV circuit, most anti-copying first.

    copying = sum of Re(eigenvalues) / sum of |eigenvalues| of the d_head x d_head matrix W_V W_O (folded): -1 for a
    head that writes back exactly the negative of what it reads (copy suppression), +1 for a pure copier.
    """
    from mmdetect.analysis.heads import render, scan_heads
    from mmdetect.scanner import parse_layers

    parse_layers(layers)
    resolve_output(fmt, output)
    df = scan_heads(model, revision=revision, threshold=threshold, raw=raw, layers=layers, progress=progress)
    rows = df[df["flagged"]].reset_index(drop=True) if flagged_only else df
    rows.attrs = df.attrs
    _table_output(fmt, output, rows, lambda console: render(rows, top=top, console=console), "heads")


@main.command(epilog=_example("mmdetect chains ./stories260K",
                              "mmdetect chains gpt2 --threshold -0.6 --per-deleter 5 --format csv -o chains.csv",
                              "mmdetect chains ./model --no-heads --format json"))
@click.argument("model")
@revision_option
@click.option("--raw", is_flag=True, help="Stored weights without norm folding, centring or sign canonicalisation.")
@click.option("--threshold", type=float, default=-0.5, show_default=True,
              help="Neuron deleters: cos(read, write) <= THRESHOLD.")
@click.option("--head-threshold", type=float, default=-0.5, show_default=True,
              help="Head deleters: copying score <= THRESHOLD.")
@click.option("--heads/--no-heads", default=True, show_default=True, help="Include flagged heads as deleters.")
@click.option("--per-deleter", type=click.IntRange(min=1), default=3, show_default=True,
              help="Writers kept per deleter.")
@click.option("--max-deleters", type=click.IntRange(min=1), default=200, show_default=True,
              help="At most this many neuron (and head) deleters, most negative first.")
@click.option("--layers", default=None, metavar="SPEC", help="Deleters only in these layers, e.g. 3-5.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "tsv", "json", "jsonl", "parquet", "markdown"]),
              default=None, help="Output format. Default: a table on the terminal, or the --output file's extension.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Write to this file (atomically). File formats hold every pair.")
@click.option("--top", type=click.IntRange(min=1), default=20, show_default=True, help="Rows shown in the table.")
@debug_option
def chains(model: str, revision: str | None, raw: bool, threshold: float, head_threshold: float, heads: bool,
           per_deleter: int, max_deleters: int, layers: str | None, fmt: str | None, output: str | None,
           top: int) -> None:
    """List writer -> deleter pairs of MODEL: a component whose write a later flagged neuron or head reads and erases.

    Pairs rank by align x erase (align: how much of the deleter's read the writer feeds; erase: -cos(read, write) of
    a neuron, or how exactly a head writes back the negative of that writer's direction).
    """
    from mmdetect.analysis.chains import find_chains, render
    from mmdetect.scanner import parse_layers

    parse_layers(layers)
    resolve_output(fmt, output)
    df = find_chains(model, revision=revision, raw=raw, threshold=threshold, head_threshold=head_threshold,
                     per_deleter=per_deleter, max_deleters=max_deleters, layers=layers, heads=heads)
    _table_output(fmt, output, df, lambda console: render(df, top=top, console=console), "chains")


from mmdetect.report.command import report_command  # noqa: E402
main.add_command(report_command, "report")


def entry() -> None:  # pragma: no cover - exercised by the installed `mmdetect` command, not by CliRunner
    """The console script: run the CLI, flush, and leave without the interpreter's teardown.

    Tearing down torch, pandas and pyarrow takes ~0.3-0.4 s after the work is done; every file is already complete
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
