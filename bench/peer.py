"""The route users take today: build the model with transformers, then cosines per layer.

`python -m bench.peer CHECKPOINT OUT.csv` loads the model in bf16 with from_pretrained, and under torch.no_grad()
computes F.cosine_similarity(up_j, down[:, j]) for every neuron of every layer, then writes a CSV with pandas.
"""
from __future__ import annotations

import sys

import pandas as pd
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM


def main(path: str, out: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    frames = []
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            up = layer.mlp.up_proj.weight.float()          # [I, d]
            down = layer.mlp.down_proj.weight.float()      # [d, I]
            cos = F.cosine_similarity(up, down.T, dim=1)
            frames.append(pd.DataFrame({"layer": i, "neuron": range(len(cos)), "cos": cos.numpy()}))
    pd.concat(frames).sort_values("cos").to_csv(out, index=False)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
