"""`make bench`: mmdetect against the peer route (transformers from_pretrained + cosines) and the I/O floor.

Every route runs as its own child process of this one, so wall time and peak RSS (from wait4's rusage) are measured
the same way for all. Warm runs read the weights once beforehand; cold runs evict the weight files from the page
cache with posix_fadvise(POSIX_FADV_DONTNEED) first. mmdetect runs from this checkout (PYTHONPATH), whatever the
virtual environment has installed. Results: a table on stdout and bench/results.md.

Two floors: `cat` of every weight file (plus importing torch), and the MLP floor: exactly the byte ranges the scan
reads (MLP weights and norm gains, from mmdetect's own read plan), read in file order with large preads
(bench/floor.py), plus importing torch. The first is what a user sees next to the scan; the second compares like
with like.

    python -m bench.run                      # TinyLlama-, Llama-3-8B- and Mixtral-shaped: scan vs peer vs floors,
                                             # warm and cold; the report page (scan --format html) against the CSV
    python -m bench.run --shapes tinyllama
    python -m bench.run --big                # also a 32 GB checkpoint, bigger than this machine's memory, cold
    python -m bench.run --big --before REF   # and the scan of commit REF beside every scan, in the same run
    python -m bench.run --analysis           # Qwen2-1.5B shape, safetensors and GGUF: scan, heads, chains, explain
                                             # side by side (bench/analysis.py)
    python -m bench.run --activations [N]    # the corpus pass against a bare forward and TransformerLens, N tokens
                                             # (bench/activations.py)

--before REF exports the mmdetect package of commit REF (git archive) into bench/out/before-REF and runs it with
PYTHONPATH pointing there, under the same conditions, right after this checkout's run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.cache import cached_fraction, evict, warm, weight_files
from bench.child import BIN, DATA, HERE, LOADS, OUT, PY, ROOT, Run, ensure, median, run, verdict


def median_run(cmd: list[str], repeat: int, folder: Path, cold: bool, tree: Path = ROOT) -> Run:
    runs = []
    for _ in range(repeat):
        evict(folder) if cold else warm(folder)
        runs.append(run(cmd, tree))
    return median(runs)


def before_tree(ref: str) -> Path:
    """The mmdetect package of commit ``ref``, exported once into bench/out/before-REF (git archive)."""
    commit = subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout.strip()
    dest = OUT / f"before-{commit}"
    if not (dest / "mmdetect" / "__init__.py").exists():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", "--format=tar", commit, "mmdetect"], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def mlp_ranges(folder: Path, name: str) -> tuple[Path, int]:
    """The byte ranges a scan of ``folder`` reads (bench/floor.py plan, in a child process) and their total."""
    out = OUT / f"{name}-ranges.json"
    subprocess.run([PY, "-m", "bench.floor", "plan", str(folder), str(out)], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return out, int(json.loads(out.read_text())["bytes"])


def routes(folder: Path, name: str) -> dict[str, list[str]]:
    OUT.mkdir(parents=True, exist_ok=True)
    files = [str(p) for p in weight_files(folder)]
    ranges, _ = mlp_ranges(folder, name)
    return {
        "torch import": [PY, "-c", "import torch"],
        "cat weights": ["sh", "-c", f"cat {' '.join(files)} > /dev/null"],
        "MLP ranges": [PY, "-m", "bench.floor", "read", str(ranges)],
        "mmdetect scan": [str(BIN / "mmdetect"), "scan", str(folder), "--format", "csv", "-o",
                          str(OUT / f"{name}.csv")],
        "peer route": [PY, "-m", "bench.peer", str(folder), str(OUT / f"{name}-peer.csv")],
        # the report page of the same scan (`mmdetect report` minus heads and chains): page generation's cost
        "scan html": [str(BIN / "mmdetect"), "scan", str(folder), "--format", "html", "-o", str(OUT / f"{name}.html")],
    }


def machine() -> str:
    with open("/proc/cpuinfo") as fh:
        cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")),
                   platform.processor())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    from importlib.metadata import version

    return (f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB memory, Linux {platform.release()}, Python "
            f"{platform.python_version()}, torch {version('torch')}")


def bench_shape(name: str, repeat: int, cold: bool, peer: bool, before: Path | None) -> list[dict]:
    folder = ensure(name)
    cmds = routes(folder, name)
    rows = []
    for mode in (["warm", "cold"] if cold else ["warm"]):
        res = {}
        for route, cmd in cmds.items():
            if route == "peer route" and not peer:
                continue
            if route == "scan html" and (name != "tinyllama" or mode != "warm"):
                continue
            if route == "torch import":  # the interpreter and torch stay cached: never a cold measurement
                res[route] = median_run(cmd, repeat, folder, cold=False)
                continue
            res[route] = median_run(cmd, repeat, folder, cold=mode == "cold")
            print(f"  {name} {mode} {route}: {res[route].seconds:.2f} s, peak RSS {res[route].rss_mb:.0f} MB",
                  flush=True)
            if route == "mmdetect scan" and mode == "cold":  # what a second scan finds in the page cache
                res["cached after"] = cached_share(OUT / f"{name}-ranges.json")
            if route == "mmdetect scan" and before is not None:
                res["before"] = median_run(cmd, repeat, folder, cold=mode == "cold", tree=before)
                print(f"  {name} {mode} scan before: {res['before'].seconds:.2f} s, peak RSS "
                      f"{res['before'].rss_mb:.0f} MB", flush=True)
        floor = res["torch import"].seconds + res["cat weights"].seconds
        mlp_floor = res["torch import"].seconds + res["MLP ranges"].seconds
        rows.append({"shape": name, "mode": mode, **res, "floor": floor, "mlp floor": mlp_floor})
    return rows


def cached_share(ranges_file: Path) -> float:
    """The share of a scan's byte ranges in the page cache now."""
    from bench.cache import cached_ranges

    doc = json.loads(ranges_file.read_text())
    return cached_ranges([(Path(f), b, e) for f, b, e in doc["ranges"]]) / max(1, doc["bytes"])


def shape_table(args: argparse.Namespace, before: Path | None) -> tuple[list[str], list[str]]:
    ref = f" (`{args.before}`)" if before else ""
    head = ["shape", "cache", "torch import", "cat weights", "floor", "MLP floor", "mmdetect scan", "peer route",
            "scan/peer", "scan/floor", "scan/MLP floor", "scan peak RSS", "peer peak RSS"]
    head += [f"before{ref}", "before peak RSS"] if before else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    verdicts = []
    for name in [n for n in args.shapes.split(",") if n]:
        for row in bench_shape(name, args.repeat, not args.no_cold, name != "mixtral-2l", before):
            scan, floor, mlp_floor = row["mmdetect scan"], row["floor"], row["mlp floor"]
            peer = row.get("peer route")
            cells = [name, row["mode"], f"{row['torch import'].seconds:.2f} s", f"{row['cat weights'].seconds:.2f} s",
                     f"{floor:.2f} s", f"{mlp_floor:.2f} s", f"{scan.seconds:.2f} s",
                     f"{peer.seconds:.2f} s" if peer else "n/a",
                     f"{scan.seconds / peer.seconds:.2f}" if peer else "n/a",
                     f"{scan.seconds / floor:.2f}", f"{scan.seconds / mlp_floor:.2f}", f"{scan.rss_mb:.0f} MB",
                     f"{peer.rss_mb:.0f} MB" if peer else "n/a"]
            if before:
                cells += [f"{row['before'].seconds:.2f} s", f"{row['before'].rss_mb:.0f} MB"]
            lines.append("| " + " | ".join(cells) + " |")
            verdicts += shape_verdicts(name, row)
        if not args.keep and name != "tinyllama":
            shutil.rmtree(DATA / name, ignore_errors=True)
    return lines, verdicts


def shape_verdicts(name: str, row: dict) -> list[str]:
    scan, floor, peer = row["mmdetect scan"], row["floor"], row.get("peer route")
    out = []
    if name == "tinyllama" and row["mode"] == "warm" and peer:
        page = row["scan html"].seconds - scan.seconds
        out += [f"- warm scan/peer {scan.seconds / peer.seconds:.2f} (target ≤ 0.25): "
                f"{verdict(scan.seconds <= 0.25 * peer.seconds)}",
                f"- warm scan/floor {scan.seconds / floor:.2f} (target ≤ 1.5): {verdict(scan.seconds <= 1.5 * floor)}",
                f"- warm scan peak RSS {scan.rss_mb:.0f} MB (target ≤ 800 MB): {verdict(scan.rss_mb <= 800)}",
                f"- warm report page: `scan --format html` {row['scan html'].seconds:.2f} s against `--format csv` "
                f"{scan.seconds:.2f} s, {page:+.2f} s (target ≤ +1 s): {verdict(page <= 1.0)}"]
    if name == "tinyllama" and row["mode"] == "cold":
        out.append(f"- cold scan/floor {scan.seconds / floor:.2f} (target ≤ 1.3): "
                   f"{verdict(scan.seconds <= 1.3 * floor)}")
    if name == "llama3-8b-2l" and row["mode"] == "warm":
        per_layer = (scan.seconds - row["torch import"].seconds) / 2
        out.append(f"- Llama-3-8B, extrapolated from 2 layers to 32 (not measured): about "
                   f"{row['torch import'].seconds + 32 * per_layer:.1f} s warm, {per_layer:.2f} s per layer")
    if name == "mixtral-2l" and row["mode"] == "warm":
        out.append(f"- Mixtral-like warm scan/floor {scan.seconds / floor:.2f} (target ≤ 1.5): "
                   f"{verdict(scan.seconds <= 1.5 * floor)}")
    if "cached after" in row:
        out.append(f"- {name}: after a cold scan {100 * row['cached after']:.0f}% of the bytes it reads are in the "
                   f"page cache (a second scan is warm)")
    return out


def big_section(args: argparse.Namespace, before: Path | None) -> tuple[list[str], list[str]]:
    """The 32 GB checkpoint, cold: this checkout's scan, the MLP floor, and (--before) the older scan, each run
    after evicting it and warming the TinyLlama checkpoint, whose share still cached afterwards shows whether the scan
    pushed the rest of the page cache out."""
    folder = ensure("big-16b")
    size = sum(p.stat().st_size for p in weight_files(folder)) / 1e9
    ranges, mlp_bytes = mlp_ranges(folder, "big-16b")
    other = DATA / "tinyllama" if (DATA / "tinyllama" / "config.json").exists() else None
    scan_cmd = [str(BIN / "mmdetect"), "scan", str(folder), "--format", "csv", "-o", str(OUT / "big-16b.csv")]
    trees = {"this version": ROOT, **({f"before (`{args.before}`)": before} if before else {})}
    runs: dict[str, list[Run]] = {label: [] for label in [*trees, "MLP ranges"]}
    kept: dict[str, list[float]] = {label: [] for label in trees}
    for k in range(args.repeat):
        for label, tree in trees.items():
            if other:
                warm(other)
            evict(folder)
            runs[label].append(run(scan_cmd, tree))
            if other:
                kept[label].append(cached_fraction(other))
            last = runs[label][-1]
            print(f"  big-16b #{k + 1} {label}: {last.seconds:.1f} s, peak RSS {last.rss_mb:.0f} MB "
                  f"(load {last.load:.1f})", flush=True)
        evict(folder)
        runs["MLP ranges"].append(run([PY, "-m", "bench.floor", "read", str(ranges)]))
        print(f"  big-16b #{k + 1} MLP ranges: {runs['MLP ranges'][-1].seconds:.1f} s", flush=True)
    torch_import = median_run([PY, "-c", "import torch"], args.repeat, folder, cold=False).seconds
    floor = torch_import + median(runs["MLP ranges"]).seconds
    lines = [f"big-16b: {size:.0f} GB in {len(weight_files(folder))} shards, {mlp_bytes / 1e9:.1f} GB of MLP and norm "
             f"bytes; cold (evicted before every run). MLP floor: torch import {torch_import:.2f} s + the MLP ranges "
             f"{median(runs['MLP ranges']).seconds:.2f} s ({mlp_bytes / 1e9 / median(runs['MLP ranges']).seconds:.2f} "
             f"GB/s) = {floor:.2f} s.\n",
             "| big-16b | scan | scan/MLP floor | effective GB/s | peak RSS | TinyLlama still cached after "
             "| all runs |",
             "|---|---|---|---|---|---|---|"]
    verdicts = []
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    for label in trees:
        r = median(runs[label])
        cached = f"{100 * statistics.median(kept[label]):.0f}%" if kept[label] else "n/a"
        lines.append(f"| {label} | {r.seconds:.1f} s | {r.seconds / floor:.2f} | {mlp_bytes / 1e9 / r.seconds:.2f} | "
                     f"{r.rss_mb:.0f} MB | {cached} | " + ", ".join(f"{x.seconds:.1f}" for x in runs[label]) + " |")
    r = median(runs["this version"])
    verdicts.append(f"- bigger than RAM ({size:.0f} GB on a {ram:.0f} GiB machine): scan/MLP floor "
                    f"{r.seconds / floor:.2f} (target ≤ 1.3): {verdict(r.seconds <= 1.3 * floor)}; peak RSS "
                    f"{r.rss_mb:.0f} MB (target < 1024 MB): {verdict(r.rss_mb < 1024)}")
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return lines, verdicts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="tinyllama,llama3-8b-2l,mixtral-2l",
                        help="comma-separated, from: tinyllama, llama3-8b-2l, mixtral-2l")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-cache runs")
    parser.add_argument("--big", action="store_true", help="also scan a 32 GB checkpoint (bigger than RAM)")
    parser.add_argument("--before", metavar="REF", help="also run the scan of commit REF (git archive of mmdetect/)")
    parser.add_argument("--keep", action="store_true", help="keep generated checkpoints in bench/data")
    parser.add_argument("--analysis", action="store_true",
                        help="only scan, heads, chains and explain side by side on the Qwen2-1.5B shape "
                             "(bench/results-analysis.md)")
    parser.add_argument("--activations", type=int, nargs="?", const=16384, metavar="TOKENS",
                        help="only the corpus pass against a bare forward and TransformerLens, on the Qwen2-0.5B and "
                             "Llama-1B shapes, TOKENS tokens each (default 16384: four batches, so that filling the "
                             "top sets in the first is not most of the run; bench/results-activations.md)")
    args = parser.parse_args(argv)
    command = f"python -m bench.run {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip()
    if args.analysis:
        from bench import analysis

        text = (f"# mmdetect analysis benchmark\n\nMachine: {machine()}.  \nDate: "
                f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Peak RSS from wait4; warm cache. Reproduce: "
                f"`make bench ARGS=--analysis` (`{command}`).\n\n" + analysis.bench_analysis(args.repeat))
        print("\n" + text)
        (HERE / "results-analysis.md").write_text(text)
        return
    if args.activations:
        from bench import activations

        lines, verdicts = activations.bench_activations(args.activations, min(1024, args.activations))
        text = (f"# mmdetect corpus-pass benchmark\n\nMachine: {machine()}.  \nDate: "
                f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. One run per route; peak RSS from wait4; warm "
                f"cache; the 1-minute load average before each run in the table. Reproduce: "
                f"`make bench ARGS=--activations` (`{command}`).\n\n" + "\n".join(lines)
                + "\n\nTargets:\n" + "\n".join(verdicts) + "\n")
        print("\n" + text)
        (HERE / "results-activations.md").write_text(text)
        return
    before = before_tree(args.before) if args.before else None
    lines, verdicts = shape_table(args, before)
    if args.big:
        big_lines, big_verdicts = big_section(args, before)
        lines += [""] + big_lines
        verdicts += big_verdicts
    start_help = run([str(BIN / "mmdetect"), "--help"])
    verdicts.append(f"- `mmdetect --help` {start_help.seconds:.2f} s (target ≤ 0.5 s): "
                    f"{verdict(start_help.seconds <= 0.5)}")
    header = ["# mmdetect benchmark\n", f"Machine: {machine()}.  ",
              f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Medians of {args.repeat} runs; peak RSS "
              f"from wait4; 1-minute load average before the runs {min(LOADS):.1f} to {max(LOADS):.1f} (median "
              f"{statistics.median(LOADS):.1f}). Reproduce: `make bench` (`{command}`).\n"]
    text = "\n".join(header + lines) + "\n\nTargets:\n" + "\n".join(verdicts) + "\n"
    print("\n" + text)
    (HERE / "results.md").write_text(text)


if __name__ == "__main__":
    main()
