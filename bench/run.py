"""`make bench`: mmdetect against the peer route (transformers from_pretrained + cosines) and the I/O floor.

Every route runs as its own child process of this one, so wall time and peak RSS (from wait4's rusage) are measured
the same way for all. Warm runs read the weights once beforehand; cold runs evict the weight files from the page
cache with posix_fadvise(POSIX_FADV_DONTNEED) first. Results: a table on stdout and bench/results.md.

    python -m bench.run                      # TinyLlama-shaped: scan vs peer vs floor, warm and cold; the report
                                             # page (scan --format html) against the CSV scan, warm
    python -m bench.run --shapes tinyllama,llama3-8b-2l,mixtral-2l
    python -m bench.run --big                # also a 32 GB checkpoint, bigger than this machine's memory
    python -m bench.run --analysis           # Qwen2-1.5B shape: scan, heads, chains, explain side by side
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = HERE / "data"
OUT = HERE / "out"
BIN = Path(sys.executable).parent
PY = sys.executable


@dataclass
class Run:
    seconds: float
    rss_mb: float


def run(cmd: list[str]) -> Run:
    """Wall time and peak RSS of one child process (ru_maxrss is in KiB on Linux)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    err = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err}")
    return Run(seconds, usage.ru_maxrss / 1024)


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def evict(folder: Path) -> None:
    for path in weight_files(folder):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(folder: Path) -> None:
    for path in weight_files(folder):
        with open(path, "rb") as fh:
            while fh.read(64 << 20):
                pass


def median_run(cmd: list[str], repeat: int, folder: Path, cold: bool) -> Run:
    runs = []
    for _ in range(repeat):
        evict(folder) if cold else warm(folder)
        runs.append(run(cmd))
    return Run(statistics.median(r.seconds for r in runs), statistics.median(r.rss_mb for r in runs))


def ensure(name: str) -> Path:
    """Generate the checkpoint in a child process. This process must stay small: a child's peak RSS as wait4
    reports it starts from its parent's RSS at fork, so a parent that had held tensors would inflate every number."""
    folder = DATA / name
    if not (folder / "config.json").exists():
        print(f"generating {name} in {folder} ...", flush=True)
        subprocess.run([PY, "-m", "bench.generate", name, str(folder)], check=True, cwd=ROOT)
    return folder


def routes(folder: Path, name: str) -> dict[str, list[str]]:
    OUT.mkdir(parents=True, exist_ok=True)
    files = [str(p) for p in weight_files(folder)]
    return {
        "torch import": [PY, "-c", "import torch"],
        "cat weights": ["sh", "-c", f"cat {' '.join(files)} > /dev/null"],
        "mmdetect scan": [str(BIN / "mmdetect"), "scan", str(folder), "--format", "csv", "-o",
                          str(OUT / f"{name}.csv")],
        "peer route": [PY, "-m", "bench.peer", str(folder), str(OUT / f"{name}-peer.csv")],
        # the report page of the same scan (`mmdetect report` minus heads and chains): page generation's cost
        "scan html": [str(BIN / "mmdetect"), "scan", str(folder), "--format", "html", "-o", str(OUT / f"{name}.html")],
    }


ANALYSIS_SHAPE = "qwen2-1.5b"
# The deepest layer's neuron 0: explain then streams every earlier MLP, every attention layer and both vocabularies.
EXPLAIN_AT = ("27", "0")


def analysis_routes(folder: Path, name: str) -> dict[str, list[str]]:
    """scan and the three analysis commands on one checkpoint, each writing its file as a user would."""
    OUT.mkdir(parents=True, exist_ok=True)
    tool = str(BIN / "mmdetect")
    return {
        "scan": [tool, "scan", str(folder), "--format", "csv", "-o", str(OUT / f"{name}.csv")],
        "heads": [tool, "heads", str(folder), "--format", "csv", "-o", str(OUT / f"{name}-heads.csv")],
        "chains": [tool, "chains", str(folder), "--format", "csv", "-o", str(OUT / f"{name}-chains.csv")],
        # (no target: where chains' time goes without its head deleters)
        "chains --no-heads": [tool, "chains", str(folder), "--no-heads", "--format", "csv", "-o",
                              str(OUT / f"{name}-chains-no-heads.csv")],
        "explain --no-activations": [tool, "explain", str(folder), "-l", EXPLAIN_AT[0], "-n", EXPLAIN_AT[1],
                                     "--no-activations", "--format", "json", "-o", str(OUT / f"{name}-explain.json")],
    }


def bench_analysis(repeat: int) -> str:
    """Each repeat runs the four commands one after another (warm cache), so each ratio to the scan compares runs
    made under the same load; medians over the repeats. The 1-minute load average is read before every run."""
    folder = ensure(ANALYSIS_SHAPE)
    cmds = analysis_routes(folder, ANALYSIS_SHAPE)
    runs: dict[str, list[Run]] = {route: [] for route in cmds}
    loads: list[float] = []
    for k in range(repeat):
        for route, cmd in cmds.items():
            warm(folder)
            loads.append(os.getloadavg()[0])
            runs[route].append(run(cmd))
            print(f"  {ANALYSIS_SHAPE} #{k + 1} {route}: {runs[route][-1].seconds:.2f} s, peak RSS "
                  f"{runs[route][-1].rss_mb:.0f} MB (load {loads[-1]:.1f})", flush=True)
    med = {route: Run(statistics.median(r.seconds for r in rs), statistics.median(r.rss_mb for r in rs))
           for route, rs in runs.items()}
    # The ratio of each repeat's pair, then its median: robust to a load that changed between repeats.
    ratio = {route: statistics.median(a.seconds / b.seconds for a, b in zip(rs, runs["scan"]))
             for route, rs in runs.items()}
    lines = [f"| command | seconds (median of {repeat}) | ratio to scan | peak RSS | all runs |", "|---|---:|---:|---:|---|"]
    for route in cmds:
        lines.append(f"| `mmdetect {route}` | {med[route].seconds:.1f} s | {ratio[route]:.2f} | {med[route].rss_mb:.0f} MB | "
                     + ", ".join(f"{r.seconds:.1f}" for r in runs[route]) + " |")
    targets = {"heads": 2.0, "chains": 4.0, "explain --no-activations": 2.0}
    verdicts = [f"- {route} / scan {ratio[route]:.2f} (target ≤ {t:g}): {'met' if ratio[route] <= t else 'MISSED'}"
                for route, t in targets.items()]
    verdicts.append(f"- chains peak RSS {med['chains'].rss_mb:.0f} MB (target ≤ 1536 MB): "
                    f"{'met' if med['chains'].rss_mb <= 1536 else 'MISSED'}")
    return (f"Shape: {ANALYSIS_SHAPE} (bench/generate.py: 28 layers, d_model 1536, d_mlp 8960, 12/2 heads, 151,936 "
            f"tied tokens, bf16, 448 planted deleter neurons and 14 planted deleter heads). 1-minute load average "
            f"before the runs: {min(loads):.1f} to {max(loads):.1f} (median {statistics.median(loads):.1f}) on "
            f"{os.cpu_count()} cores.\n\n" + "\n".join(lines) + "\n\nTargets:\n" + "\n".join(verdicts) + "\n")


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    from importlib.metadata import version

    return (f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB memory, Linux {platform.release()}, Python "
            f"{platform.python_version()}, torch {version('torch')}")


def bench_shape(name: str, repeat: int, cold: bool, peer: bool) -> list[dict]:
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
        floor = res["torch import"].seconds + res["cat weights"].seconds
        rows.append({"shape": name, "mode": mode, **{k: v for k, v in res.items()}, "floor": floor})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="tinyllama,llama3-8b-2l,mixtral-2l",
                        help="comma-separated, from: tinyllama, llama3-8b-2l, mixtral-2l")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-cache runs")
    parser.add_argument("--big", action="store_true", help="also scan a 32 GB checkpoint (bigger than RAM)")
    parser.add_argument("--keep", action="store_true", help="keep generated checkpoints in bench/data")
    parser.add_argument("--analysis", action="store_true",
                        help="only scan, heads, chains and explain side by side on the Qwen2-1.5B shape "
                             "(bench/results-analysis.md)")
    args = parser.parse_args(argv)
    if args.analysis:
        text = (f"# mmdetect analysis benchmark\n\nMachine: {machine()}.  \nDate: "
                f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Peak RSS from wait4; warm cache. Reproduce: "
                f"`make bench ARGS=--analysis` (`python -m bench.run {' '.join(argv or sys.argv[1:])}`).\n\n"
                + bench_analysis(args.repeat))
        print("\n" + text)
        (HERE / "results-analysis.md").write_text(text)
        return
    lines = ["# mmdetect benchmark\n", f"Machine: {machine()}.  ",
             f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Medians of {args.repeat} runs; "
             f"peak RSS from wait4. Reproduce: `make bench` (`python -m bench.run {' '.join(argv or sys.argv[1:])}`)."
             .rstrip() + "\n"]
    lines += ["| shape | cache | torch import | cat weights | floor | mmdetect scan | peer route | scan/peer | "
              "scan/floor | scan peak RSS | peer peak RSS |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for name in args.shapes.split(","):
        for row in bench_shape(name, args.repeat, not args.no_cold, peer=name != "mixtral-2l"):
            scan, floor = row["mmdetect scan"], row["floor"]
            peer = row.get("peer route")
            ratio_peer = f"{scan.seconds / peer.seconds:.2f}" if peer else "n/a"
            lines.append(
                f"| {name} | {row['mode']} | {row['torch import'].seconds:.2f} s | {row['cat weights'].seconds:.2f} s | "
                f"{floor:.2f} s | {scan.seconds:.2f} s | {f'{peer.seconds:.2f} s' if peer else 'n/a'} | "
                f"{ratio_peer} | {scan.seconds / floor:.2f} | {scan.rss_mb:.0f} MB | "
                f"{f'{peer.rss_mb:.0f} MB' if peer else 'n/a'} |")
            if name == "tinyllama":
                if row["mode"] == "warm":
                    verdicts.append(f"- warm scan/peer {scan.seconds / peer.seconds:.2f} (target ≤ 0.25): "
                                    f"{'met' if scan.seconds <= 0.25 * peer.seconds else 'MISSED'}")
                    verdicts.append(f"- warm scan/floor {scan.seconds / floor:.2f} (target ≤ 1.5): "
                                    f"{'met' if scan.seconds <= 1.5 * floor else 'MISSED'}")
                    verdicts.append(f"- warm scan peak RSS {scan.rss_mb:.0f} MB (target ≤ 800 MB): "
                                    f"{'met' if scan.rss_mb <= 800 else 'MISSED'}")
                    page = row["scan html"].seconds - scan.seconds
                    verdicts.append(f"- warm report page: `scan --format html` {row['scan html'].seconds:.2f} s "
                                    f"against `--format csv` {scan.seconds:.2f} s, {page:+.2f} s (target ≤ +1 s): "
                                    f"{'met' if page <= 1.0 else 'MISSED'}")
                else:
                    verdicts.append(f"- cold scan/floor {scan.seconds / floor:.2f} (target ≤ 1.3): "
                                    f"{'met' if scan.seconds <= 1.3 * floor else 'MISSED'}")
            if name == "llama3-8b-2l" and row["mode"] == "warm":
                per_layer = (scan.seconds - row["torch import"].seconds) / 2
                verdicts.append(f"- Llama-3-8B, extrapolated from 2 layers to 32 (not measured): about "
                                f"{row['torch import'].seconds + 32 * per_layer:.1f} s warm, "
                                f"{per_layer:.2f} s per layer")
        if not args.keep and name != "tinyllama":
            shutil.rmtree(DATA / name, ignore_errors=True)
    if args.big:
        folder = ensure("big-16b")
        size = sum(p.stat().st_size for p in weight_files(folder)) / 1e9
        res = run([str(BIN / "mmdetect"), "scan", str(folder), "--format", "csv", "-o", str(OUT / "big-16b.csv")])
        lines.append(f"| big-16b ({size:.0f} GB, {len(weight_files(folder))} shards) | cold-ish | | | | "
                     f"{res.seconds:.1f} s | n/a (does not fit) | | | {res.rss_mb:.0f} MB | |")
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        verdicts.append(f"- bigger than RAM ({size:.0f} GB on a {ram:.0f} GiB machine): scanned in {res.seconds:.0f} s, "
                        f"peak RSS {res.rss_mb:.0f} MB (target < 1024 MB): "
                        f"{'met' if res.rss_mb < 1024 else 'MISSED'}")
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    start_help = run([str(BIN / "mmdetect"), "--help"])
    verdicts.append(f"- `mmdetect --help` {start_help.seconds:.2f} s (target ≤ 0.5 s): "
                    f"{'met' if start_help.seconds <= 0.5 else 'MISSED'}")
    text = "\n".join(lines) + "\n\nTargets:\n" + "\n".join(verdicts) + "\n"
    print("\n" + text)
    (HERE / "results.md").write_text(text)


if __name__ == "__main__":
    main()
