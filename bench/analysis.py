"""`make bench ARGS=--analysis`: scan, heads, chains and explain side by side on a Qwen2-1.5B-shaped checkpoint,
as bf16 safetensors and as the same weights in a Q4_0 GGUF (the format issue 13 measured), each command a child
process with its wall time and peak RSS from wait4 (``bench.child.run``).

chains' head deleters cost a fixed amount of arithmetic that no exact method avoids: per writer (an upstream neuron,
token or head) and head deleter, p = W_V ô (once per key/value head) and q = W_O ô, each d·d_head multiply-adds.
``head_deleter_floor`` counts it from the heads the run flagged and times this machine's float32 matrix product, so
the report says how much of chains' time is that floor.
"""
from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
from pathlib import Path

from bench.cache import warm
from bench.child import BIN, DATA, OUT, PY, ROOT, Run, ensure, run

SHAPE = "qwen2-1.5b"
# The deepest layer's neuron 0: explain then streams every earlier MLP, every attention layer and both vocabularies.
EXPLAIN_AT = ("27", "0")
TARGETS = {"heads": 2.0, "chains": 4.0, "explain --no-activations": 2.0}
CHAINS_RSS_MB = 1536


def ensure_gguf(folder: Path) -> Path:
    """The Q4_0 GGUF of ``folder``, written by a child process (``bench.gguf``) on first use."""
    path = DATA / f"{folder.name}-q4_0.gguf"
    if not path.exists():
        print(f"writing {path} ...", flush=True)
        subprocess.run([PY, "-m", "bench.gguf", str(folder), str(path)], check=True, cwd=ROOT)
    return path


def routes(source: Path, tag: str) -> dict[str, list[str]]:
    """scan and the three analysis commands on one checkpoint, each writing its file as a user would."""
    OUT.mkdir(parents=True, exist_ok=True)
    tool = str(BIN / "mmdetect")
    return {
        "scan": [tool, "scan", str(source), "--format", "csv", "-o", str(OUT / f"{tag}.csv")],
        "heads": [tool, "heads", str(source), "--format", "csv", "-o", str(OUT / f"{tag}-heads.csv")],
        "chains": [tool, "chains", str(source), "--format", "csv", "-o", str(OUT / f"{tag}-chains.csv")],
        # (no target: where chains' time goes without its head deleters)
        "chains --no-heads": [tool, "chains", str(source), "--no-heads", "--format", "csv", "-o",
                              str(OUT / f"{tag}-chains-no-heads.csv")],
        "explain --no-activations": [tool, "explain", str(source), "-l", EXPLAIN_AT[0], "-n", EXPLAIN_AT[1],
                                     "--no-activations", "--format", "json", "-o", str(OUT / f"{tag}-explain.json")],
    }


GEMM = """
import time, torch
a, b = torch.randn(8960, 1536), torch.randn(1536, 2048)
a @ b
best = []
for _ in range(5):
    t = time.perf_counter(); a @ b; best.append(time.perf_counter() - t)
print(2 * 8960 * 1536 * 2048 / sorted(best)[2] / 1e9)
"""


def gemm_gflops() -> float:
    """This machine's float32 matrix-product rate (GFLOP/s, torch's default threads, median of 5), the shape of
    chains' head-deleter product: 8960 writers x d 1536 x 2048 columns."""
    out = subprocess.run([PY, "-c", GEMM], check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return float(out.strip().splitlines()[-1])


def head_deleter_floor(config: dict, heads_csv: Path) -> float:
    """Multiply-adds of chains' head-deleter side on the flagged heads of ``heads_csv``: per head deleter in layer L,
    (L·d_mlp neurons + vocab tokens + L·n_heads heads) writers, each d·d_head for q, plus d·d_head for p once per
    key/value head."""
    d, n_heads = config["hidden_size"], config["num_attention_heads"]
    dh = config.get("head_dim") or d // n_heads
    with open(heads_csv, newline="") as fh:
        flagged = [r for r in csv.DictReader(fh) if r["flagged"].lower() == "true"]
    total, keys = 0, set()
    for r in flagged:
        layer = int(r["layer"])
        writers = layer * config["intermediate_size"] + config["vocab_size"] + layer * n_heads
        products = 1 + ((layer, r["kv_head"]) not in keys)
        keys.add((layer, r["kv_head"]))
        total += writers * d * dh * products
    return float(total)


def bench_analysis(repeat: int) -> str:
    """Each repeat runs the commands one after another (warm cache), so each ratio to the scan compares runs made
    under the same load; medians over the repeats. The 1-minute load average is read before every run."""
    folder = ensure(SHAPE)
    config = json.loads((folder / "config.json").read_text())
    sources = {SHAPE: folder, f"{SHAPE} Q4_0 GGUF": ensure_gguf(folder)}
    text, loads = [], []
    rate = gemm_gflops()
    for label, source in sources.items():
        tag = source.stem if source.is_file() else source.name
        cmds = routes(source, tag)
        runs: dict[str, list[Run]] = {route: [] for route in cmds}
        for k in range(repeat):
            for route, cmd in cmds.items():
                warm(source)
                loads.append(os.getloadavg()[0])
                runs[route].append(run(cmd))
                print(f"  {label} #{k + 1} {route}: {runs[route][-1].seconds:.2f} s, peak RSS "
                      f"{runs[route][-1].rss_mb:.0f} MB (load {loads[-1]:.1f})", flush=True)
        med = {route: Run(statistics.median(r.seconds for r in rs), statistics.median(r.rss_mb for r in rs))
               for route, rs in runs.items()}
        # The ratio of each repeat's pair, then its median: robust to a load that changed between repeats.
        ratio = {route: statistics.median(a.seconds / b.seconds for a, b in zip(rs, runs["scan"]))
                 for route, rs in runs.items()}
        lines = [f"### {label}\n", f"| command | seconds (median of {repeat}) | ratio to scan | peak RSS | all runs |",
                 "|---|---:|---:|---:|---|"]
        for route in cmds:
            lines.append(f"| `mmdetect {route}` | {med[route].seconds:.1f} s | {ratio[route]:.2f} | "
                         f"{med[route].rss_mb:.0f} MB | " + ", ".join(f"{r.seconds:.1f}" for r in runs[route]) + " |")
        macs = head_deleter_floor(config, OUT / f"{tag}-heads.csv")
        floor = 2 * macs / (rate * 1e9)
        lines += ["", "Targets:"]
        lines += [f"- {route} / scan {ratio[route]:.2f} (target ≤ {t:g}): {'met' if ratio[route] <= t else 'MISSED'}"
                  for route, t in TARGETS.items()]
        lines.append(f"- chains peak RSS {med['chains'].rss_mb:.0f} MB (target ≤ {CHAINS_RSS_MB} MB): "
                     f"{'met' if med['chains'].rss_mb <= CHAINS_RSS_MB else 'MISSED'}")
        lines.append(f"- head deleters' arithmetic: {2 * macs / 1e12:.2f} TFLOP, {floor:.1f} s at the measured "
                     f"{rate:.0f} GFLOP/s; chains --no-heads plus that is "
                     f"{med['chains --no-heads'].seconds + floor:.1f} s, "
                     f"{(med['chains --no-heads'].seconds + floor) / med['scan'].seconds:.2f}× the scan")
        text.append("\n".join(lines))
    return (f"Shape: {SHAPE} (bench/generate.py: 28 layers, d_model 1536, d_mlp 8960, 12/2 heads, 151,936 tied "
            f"tokens, bf16, 448 planted deleter neurons and 14 planted deleter heads), and the same weights as a "
            f"Q4_0 GGUF (bench/gguf.py: Q4_0 attention and MLP, Q8_0 embedding). float32 matrix product on this "
            f"machine: {rate:.0f} GFLOP/s. 1-minute load average before the runs: {min(loads):.1f} to "
            f"{max(loads):.1f} (median {statistics.median(loads):.1f}) on {os.cpu_count()} cores.\n\n"
            + "\n\n".join(text) + "\n")
