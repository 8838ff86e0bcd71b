"""`scan --transcoder` on a Gemma-Scope-sized set against the I/O floor of reading its encoders and decoders.

    python -m bench.transcoder                 # 26 layers x 16,384 features, d_model 2304, float32: 7.9 GB of files
    python -m bench.transcoder --layers 4      # the same per layer, fewer layers (a short run)

The model is Gemma 2 2B's residual shape (d_model 2304, 26 layers, Gemma's (1 + w) sandwich norms, random gains)
with a 16-neuron MLP per layer: the feature scan reads only the norm gains from it. Each transcoder is a
``jumprelu_transcoder`` at ``blocks.L.ln2.hook_normalized`` -> ``blocks.L.hook_mlp_out`` in SAELens' layout, random
float32 weights. The floor reads exactly the W_enc and W_dec byte ranges with 64 MB preads (bench/floor.py ``read``),
plus the time to import torch, as bench/run.py's floors do. Warm runs read the files once first; cold runs evict them
(posix_fadvise DONTNEED). Wall time and peak RSS come from wait4 (bench/run.py ``run``). Results: a table on stdout
and bench/results-transcoder.md. Generated files go to bench/data/ (ignored by git).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

from bench.run import BIN, DATA, HERE, OUT, PY, ROOT, machine, median, run

D, N_SAE, LAYERS, D_MLP = 2304, 16384, 26, 16


def generate(root: Path, layers: int, d_sae: int) -> tuple[Path, Path]:
    """(model folder, transcoder set folder), written once per shape."""
    import torch
    from safetensors.torch import save_file

    model, tcs = root / "model", root / "transcoders"
    if not (model / "config.json").exists():
        gen = torch.Generator().manual_seed(0)
        state = {}
        for i in range(layers):
            p = f"model.layers.{i}."
            state[p + "pre_feedforward_layernorm.weight"] = torch.randn(D, generator=gen) * 0.3
            state[p + "post_feedforward_layernorm.weight"] = torch.randn(D, generator=gen) * 0.3
            for name, shape in (("gate_proj", (D_MLP, D)), ("up_proj", (D_MLP, D)), ("down_proj", (D, D_MLP))):
                state[p + f"mlp.{name}.weight"] = torch.randn(shape, generator=gen, dtype=torch.float32)
        model.mkdir(parents=True, exist_ok=True)
        save_file(state, str(model / "model.safetensors"))
        (model / "config.json").write_text(json.dumps({
            "model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"], "hidden_size": D,
            "intermediate_size": D_MLP, "num_hidden_layers": layers, "num_attention_heads": 8,
            "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 256000}))
    for i in range(layers):
        folder = tcs / f"layer_{i}"
        if (folder / "cfg.json").exists():
            continue
        gen = torch.Generator().manual_seed(100 + i)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"W_dec": torch.randn(d_sae, D, generator=gen), "W_enc": torch.randn(D, d_sae, generator=gen),
                   "b_dec": torch.zeros(D), "b_enc": torch.zeros(d_sae), "threshold": torch.rand(d_sae, generator=gen)},
                  str(folder / "sae_weights.safetensors"))
        (folder / "cfg.json").write_text(json.dumps({
            "d_in": D, "d_sae": d_sae, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": False,
            "normalize_activations": "none", "reshape_activations": "none",
            "metadata": {"model_name": "gemma-2-2b", "hook_name": f"blocks.{i}.ln2.hook_normalized",
                         "hook_name_out": f"blocks.{i}.hook_mlp_out",
                         "neuronpedia_id": f"gemma-2-2b/{i}-gemmascope-transcoder-16k"},
            "d_out": D, "architecture": "jumprelu_transcoder"}))
    return model, tcs


def files(tcs: Path) -> list[Path]:
    return sorted(tcs.glob("*/sae_weights.safetensors"))


def ranges(tcs: Path, out: Path) -> int:
    """The W_enc and W_dec byte ranges of every layer, for bench/floor.py ``read``; their total."""
    from mmdetect.io.safetensors import read_header

    spans = []
    for path in files(tcs):
        header = read_header(path)
        spans += [[str(path), header[k].start, header[k].end] for k in ("W_enc", "W_dec")]
    total = sum(end - begin for _, begin, end in spans)
    out.write_text(json.dumps({"ranges": sorted(spans), "bytes": total, "drop_behind": False}))
    return total


def set_cache(tcs: Path, cold: bool) -> None:
    for path in files(tcs):
        fd = os.open(path, os.O_RDONLY)
        try:
            if cold:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                while os.read(fd, 64 << 20):
                    pass
        finally:
            os.close(fd)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=LAYERS)
    parser.add_argument("--d-sae", type=int, default=N_SAE)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-cold", action="store_true")
    args = parser.parse_args(argv)
    root = DATA / f"transcoder-{args.layers}x{args.d_sae}"
    if not (root / "transcoders" / f"layer_{args.layers - 1}" / "cfg.json").exists():
        print(f"generating {root} ...", flush=True)
        subprocess.run([PY, "-c", f"from bench.transcoder import generate; from pathlib import Path; "
                                  f"generate(Path({str(root)!r}), {args.layers}, {args.d_sae})"],
                       check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    model, tcs = root / "model", root / "transcoders"
    OUT.mkdir(parents=True, exist_ok=True)
    spans = OUT / "transcoder-ranges.json"
    nbytes = ranges(tcs, spans)
    routes = {"torch import": [PY, "-c", "import torch"],
              "W_enc + W_dec reads": [PY, "-m", "bench.floor", "read", str(spans)],
              "scan --transcoder": [str(BIN / "mmdetect"), "scan", str(model), "--transcoder", str(tcs),
                                    "--format", "csv", "-o", str(OUT / "transcoder.csv")]}
    lines = ["# `scan --transcoder` benchmark\n", f"Machine: {machine()}.  ",
             f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. {args.layers} layers x {args.d_sae:,} "
             f"features, d_model {D}, float32: {nbytes / 1e9:.2f} GB of W_enc + W_dec. Medians of {args.repeat} "
             f"runs; peak RSS from wait4. Reproduce: `python -m bench.transcoder --layers {args.layers}`.\n",
             "| cache | route | seconds | peak RSS MB |", "|---|---|---|---|"]
    verdicts = []
    for cold in ([False] if args.no_cold else [False, True]):
        times = {}
        for name, cmd in routes.items():
            runs = []
            for _ in range(args.repeat):
                set_cache(tcs, cold)
                runs.append(run(cmd))
            times[name] = median(runs)
            lines.append(f"| {'cold' if cold else 'warm'} | {name} | {times[name].seconds:.2f} | "
                         f"{times[name].rss_mb:.0f} |")
        floor = times["torch import"].seconds + times["W_enc + W_dec reads"].seconds
        scan = times["scan --transcoder"]
        ratio = scan.seconds / floor
        verdicts.append(f"- {'cold' if cold else 'warm'}: scan {scan.seconds:.2f} s against the floor (torch import "
                        f"+ reads) {floor:.2f} s = {ratio:.2f}x (target <= 1.5x): "
                        f"{'met' if ratio <= 1.5 else 'NOT met'}; peak RSS {scan.rss_mb:.0f} MB (target < 1024): "
                        f"{'met' if scan.rss_mb < 1024 else 'NOT met'}")
    text = "\n".join(lines) + "\n\nTargets:\n" + "\n".join(verdicts) + "\n"
    print("\n" + text)
    (HERE / "results-transcoder.md").write_text(text)


if __name__ == "__main__":
    main()
