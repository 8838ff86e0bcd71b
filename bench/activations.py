"""`make bench ARGS=--activations`: the corpus pass (`mmdetect activations`) against a bare transformers forward pass
and the anchors' route (TransformerLens), on Qwen2-0.5B- and Llama-3.2-1B-shaped checkpoints (random bf16 weights),
each route its own child process (wall time and peak RSS from wait4, ``bench.run.run``), then an offloaded run of a
checkpoint twice the memory it is allowed.

Every route feeds the same windows: rows of token ids (``{"ids": [...]}`` JSONL, 512 tokens each, seeded), run as
float32 in batches of ``corpus.defaults.BATCH_TOKENS`` tokens (mmdetect's default), on the CPU:

- bare forward: ``model(input_ids)``, nothing else (the logits of every position, as a plain call computes them);
- mmdetect: ``corpus.activations.run``, every column and the companion file, written as the command writes them;
- TransformerLens: ``TransformerBridge.boot_transformers`` + ``run_with_cache`` on each layer's ``hook_pre``,
  ``hook_pre_linear`` (gated) and ``hook_post``, then the same statistics in torch (float64 moments, sign cases,
  the 256-bin histogram, the top 20 by post-activation), as universal-neurons computes them over its cache.

Each child prints its load time and its pass time (the corpus loop alone); throughput is tokens / pass time. The
statistics' own cost is mmdetect's pass time less the bare forward's, over the bare forward's.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from bench.child import OUT, PY
from bench.generate import SHAPES
from mmdetect.corpus.defaults import BATCH_TOKENS

SEQ_LEN = 512

BENCH_SHAPES = ("qwen2-0.5b", "llama-1b")

# The children: each prints one JSON line {"load": s, "pass": s, "tokens": n}.
BARE = """
import json, sys, time, torch
from transformers import AutoModelForCausalLM
folder, corpus, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_grad_enabled(False)
t = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
load = time.perf_counter() - t
status = lambda key: next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith(key)) / 1024
resident = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # the peak from here on: the pass's
rows = [json.loads(line)["ids"] for line in open(corpus)]
t = time.perf_counter()
for i in range(0, len(rows), batch):
    model(input_ids=torch.tensor(rows[i:i + batch]))
print(json.dumps({"load": load, "pass": time.perf_counter() - t, "tokens": sum(map(len, rows)),
                  "resident": resident, "pass_peak": status("VmHWM")}))
"""

OURS = """
import json, os, sys, time
from mmdetect.corpus import activations
from mmdetect.report.activations import state_path, write_result
folder, corpus, out = sys.argv[1], sys.argv[2], sys.argv[3]
extra = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
for stale in (out, out + ".details.parquet", str(state_path(out))):
    if os.path.exists(stale):
        os.remove(stale)  # a state left by an earlier run would be resumed
loads = []
load_model = activations.load_model
status = lambda key: next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith(key)) / 1024
def timed(*a, **k):
    t = time.perf_counter()
    try:
        return load_model(*a, **k)
    finally:
        loads.append(time.perf_counter() - t)
        open("/proc/self/clear_refs", "w").write("5")  # the peak from here on: the read directions, pass, outputs
activations.load_model = timed
t = time.perf_counter()
req = activations.Request(folder, dataset=corpus, max_tokens=None, state=state_path(out), **extra)
result = activations.run(req)
write_result(result, "csv", out)
total = time.perf_counter() - t
print(json.dumps({"load": loads[0], "pass": total - loads[0], "tokens": int(result.frame["tokens"].max()),
                  "pass_peak": status("VmHWM")}))
"""

TL = """
import json, logging, sys, time, warnings, torch
from transformer_lens.model_bridge import TransformerBridge
folder, corpus, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_grad_enabled(False)
logging.getLogger("transformer_lens").setLevel(logging.ERROR)
warnings.simplefilter("ignore")
t = time.perf_counter()
model = TransformerBridge.boot_transformers(folder, device="cpu", dtype=torch.float32)
model.enable_compatibility_mode(disable_warnings=True)
load = time.perf_counter() - t
rows = [json.loads(line)["ids"] for line in open(corpus)]
L, n = model.cfg.n_layers, model.cfg.d_mlp
gated = model.W_gate is not None
edges = torch.linspace(-10, 15, 257)
hooks = ("pre", "pre_linear", "post") if gated else ("pre", "post")
names = {f"blocks.{i}.mlp.hook_{k}" for i in range(L) for k in hooks}
S = {k: torch.zeros(L, n, dtype=torch.float64) for k in ("s1", "s2", "s3", "s4", "pos", "p1", "pa")}
cases = torch.zeros(L, 4, n, dtype=torch.float64)
case_sum = torch.zeros(L, 4, n, dtype=torch.float64)
pmin, pmax = torch.full((L, n), float("inf")), torch.full((L, n), float("-inf"))
hist = torch.zeros(L, n, 258, dtype=torch.int64)
top = [torch.full((0, n), float("-inf")) for _ in range(L)]
t = time.perf_counter()
for b in range(0, len(rows), batch):
    _, cache = model.run_with_cache(torch.tensor(rows[b:b + batch]), names_filter=lambda x: x in names)
    for i in range(L):
        x = cache[f"blocks.{i}.mlp.hook_pre"].reshape(-1, n)
        post = cache[f"blocks.{i}.mlp.hook_post"].reshape(-1, n)
        xd = x.double()
        S["s1"][i] += xd.sum(0); S["s2"][i] += (xd ** 2).sum(0); S["s3"][i] += (xd ** 3).sum(0)
        S["s4"][i] += (xd ** 4).sum(0); S["pos"][i] += (x > 0).sum(0)
        S["p1"][i] += post.double().sum(0); S["pa"][i] += post.double().abs().sum(0)
        pmin[i] = torch.minimum(pmin[i], post.min(0).values); pmax[i] = torch.maximum(pmax[i], post.max(0).values)
        if gated:
            up = cache[f"blocks.{i}.mlp.hook_pre_linear"].reshape(-1, n)
            for c, m in enumerate(((x > 0) & (up > 0), (x > 0) & (up < 0), (x < 0) & (up > 0), (x < 0) & (up < 0))):
                cases[i, c] += m.sum(0); case_sum[i, c] += (post * m).double().sum(0)
        bins = torch.bucketize(x, edges, right=True)
        index = (torch.arange(n) * 258 + bins).reshape(-1)  # neuron-major [n, 258] counts
        hist[i].view(-1).scatter_add_(0, index, torch.ones(index.numel(), dtype=torch.int64))
        top[i] = torch.cat([top[i], post]).topk(min(20, len(top[i]) + len(post)), 0).values
    del cache
print(json.dumps({"load": load, "pass": time.perf_counter() - t, "tokens": sum(map(len, rows))}))
"""


def corpus(tokens: int, vocab: int) -> Path:
    """Rows of ``SEQ_LEN`` random token ids (seeded), ``tokens`` in all."""
    import random

    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"ids-{vocab}-{tokens}.jsonl"
    rng = random.Random(0)
    with path.open("w") as fh:
        for _ in range(max(1, tokens // SEQ_LEN)):
            fh.write(json.dumps({"ids": [rng.randrange(4, vocab) for _ in range(SEQ_LEN)]}) + "\n")
    return path


def child(script: str, *args: str) -> tuple[dict, object]:
    """Run one route: its own timings (its last stdout line) and the wall time and peak RSS of the process."""
    from bench.child import run

    OUT.mkdir(parents=True, exist_ok=True)
    stamp = OUT / "child.json"
    cmd = ["sh", "-c", 'exec "$@" > "$0"', str(stamp), PY, "-c", script, *args]
    r = run(cmd)
    return json.loads(stamp.read_text().strip().splitlines()[-1]), r


def ensure_tokenizer(folder: Path, vocab: int) -> None:
    """A word-level ``tokenizer.json`` of ``vocab`` tokens beside the random weights: TransformerLens' bridge loads a
    tokenizer with every model (the routes themselves feed token ids)."""
    if (folder / "tokenizer.json").exists():
        return
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"t{i}" for i in range(vocab - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(folder))


def _after(timing: dict, resident: float) -> str:
    """The peak after the load over the resident model, where the route measured it."""
    return f"{timing['pass_peak'] - resident:,.0f}" if "pass_peak" in timing else ""


def weight_bytes(folder: Path, size: int = 4) -> int:
    """Bytes of the checkpoint's weights as float32 (``size`` bytes each), from its safetensors header."""
    from mmdetect.io.checkpoint import open_checkpoint

    with open_checkpoint(folder) as ckpt:
        return size * sum(math.prod(i.shape) for i in ckpt.tensors.values())


def bench_activations(tokens: int, offload_tokens: int) -> tuple[list[str], list[str]]:
    """The section's table lines and target verdicts."""
    from bench.cache import warm
    from bench.child import ensure, verdict

    batch = BATCH_TOKENS // SEQ_LEN        # windows a forward pass: mmdetect's default batch
    lines = [f"## Corpus pass (`mmdetect activations`), {tokens:,} tokens in windows of {SEQ_LEN}, batches of "
             f"{batch * SEQ_LEN:,} tokens, float32, CPU\n",
             "Peak RSS of the whole process (wait4), and the peak after the model's load (the pass, and for "
             "mmdetect the read directions and the outputs: VmHWM reset once transformers has loaded the model) "
             "over the resident model, the bare route's RSS at that point (the weights, the interpreter and the "
             "libraries). The load's own peak is transformers' (the float32 model beside the mapped bf16 file), "
             "the same for every route.\n",
             "| shape | route | load s | pass s | tokens/s | peak RSS MB | over the float32 weights MB | "
             "after the load, over the resident model MB | load avg |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    verdicts = []
    for name in BENCH_SHAPES:
        folder = ensure(name)
        ensure_tokenizer(folder, SHAPES[name].vocab)
        warm(folder)
        ids = corpus(tokens, SHAPES[name].vocab)
        weights_mb = weight_bytes(folder) / 2**20
        got = {}
        for route, script, args in (("bare forward", BARE, (str(folder), str(ids), str(batch))),
                                    ("mmdetect activations", OURS, (str(folder), str(ids),
                                                                    str(OUT / f"{name}-act.csv"))),
                                    ("TransformerLens + torch stats", TL, (str(folder), str(ids), str(batch)))):
            timing, r = child(script, *args)
            got[route] = (timing, r)
            resident = got["bare forward"][0]["resident"]
            lines.append(f"| {name} | {route} | {timing['load']:.1f} | {timing['pass']:.1f} | "
                         f"{timing['tokens'] / timing['pass']:,.0f} | {r.rss_mb:,.0f} | {r.rss_mb - weights_mb:,.0f} | "
                         f"{_after(timing, resident)} | {r.load:.1f} |")
            print(lines[-1], flush=True)
        bare, ours, tl = (got[k][0] for k in got)
        ratio = bare["pass"] / ours["pass"]
        cost = (ours["pass"] - bare["pass"]) / bare["pass"]
        over = (got["mmdetect activations"][1].rss_mb - weights_mb) / 1024
        over_resident = (ours["pass_peak"] - bare["resident"]) / 1024
        verdicts += [
            f"- {name}: mmdetect's throughput {ratio:.2f}× the bare forward's (target ≥ 0.8×): {verdict(ratio >= 0.8)}",
            f"- {name}: the statistics cost {cost:+.0%} of the bare forward (target ≤ +25%): {verdict(cost <= 0.25)}",
            f"- {name}: faster than TransformerLens: {tl['pass'] / ours['pass']:.2f}× "
            f"({verdict(ours['pass'] < tl['pass'])})",
            f"- {name}: peak RSS {over:.2f} GB over the float32 weights (target ≤ 1 GB): {verdict(over <= 1.0)}; "
            f"after the load, {over_resident:.2f} GB over the resident model (target ≤ 1 GB): "
            f"{verdict(over_resident <= 1.0)}",
        ]
    # Offloaded: the Llama-1B shape in bfloat16 under --max-memory of half its weights.
    folder = ensure("llama-1b")
    need = weight_bytes(folder, 2)
    cap = need // 2
    ids = corpus(offload_tokens, SHAPES["llama-1b"].vocab)
    timing, r = child(OURS, str(folder), str(ids), str(OUT / "llama-1b-offload.csv"),
                      json.dumps({"dtype": "bfloat16", "max_memory": cap}))
    lines += ["", f"Offloaded: llama-1b in bfloat16 ({need / 1e9:.2f} GB of weights) under `--max-memory "
              f"{cap / 1e9:.2f} GB`, {timing['tokens']:,} tokens: load {timing['load']:.1f} s, pass "
              f"{timing['pass']:.1f} s ({timing['tokens'] / timing['pass']:,.0f} tokens/s), peak RSS "
              f"{r.rss_mb:,.0f} MB."]
    verdicts.append(f"- offloaded llama-1b completes under half its weights' memory: peak RSS {r.rss_mb:,.0f} MB "
                    f"against {need / 2**20:,.0f} MB of weights ({verdict(r.rss_mb * 2**20 < need)})")
    return lines, verdicts


if __name__ == "__main__":  # python -m bench.activations [TOKENS]: the section alone, printed
    lines, verdicts = bench_activations(int(sys.argv[1]) if len(sys.argv) > 1 else 16384, 1024)
    print("\n".join(lines + ["", *verdicts]))
