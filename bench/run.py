"""`make bench`: mmdetect against the peer route (transformers from_pretrained + cosines) and the I/O floor.

Every route runs as its own child process of this one, so wall time and peak RSS (from wait4's rusage) are measured
the same way for all. Warm runs read the weights once beforehand; cold runs evict the weight files from the page
cache with posix_fadvise(POSIX_FADV_DONTNEED) first. Results: a table on stdout and bench/results.md.

    python -m bench.run                      # TinyLlama-shaped: scan vs peer vs floor, warm and cold; the report
                                             # page (scan --format html) against the CSV scan, warm
    python -m bench.run --shapes tinyllama,llama3-8b-2l,mixtral-2l
    python -m bench.run --big                # also a 32 GB checkpoint, bigger than this machine's memory
    python -m bench.run --analysis           # Qwen2-1.5B shape, safetensors and GGUF: scan, heads, chains, explain
                                             # side by side (bench/analysis.py)
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
        from bench import analysis

        text = (f"# mmdetect analysis benchmark\n\nMachine: {machine()}.  \nDate: "
                f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Peak RSS from wait4; warm cache. Reproduce: "
                f"`make bench ARGS=--analysis` (`python -m bench.run {' '.join(argv or sys.argv[1:])}`).\n\n"
                + analysis.bench_analysis(args.repeat))
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
