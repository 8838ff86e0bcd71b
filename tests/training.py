"""A real (tiny) training run for the track tests: a Llama-style model trained with a plain torch loop on mmdetect's
default corpus, saved in Hugging Face format at several steps.

Bytes are the tokens (vocabulary 256), so no tokenizer is needed. Hidden 48, 2 layers, 96 MLP neurons: about 90k
parameters, a few hundred steps of AdamW in a few seconds on two cores.
"""
from __future__ import annotations

from pathlib import Path

import torch

CORPUS = Path(__file__).resolve().parents[1] / "mmdetect" / "data" / "corpus.txt"
SAVE_AT = (0, 25, 50, 100, 200, 300)


def train_tiny_llama(folder: Path, save_at: tuple[int, ...] = SAVE_AT, *, seed: int = 0, seq: int = 64,
                     batch: int = 16) -> list[Path]:
    """Train and save ``folder/checkpoint-<step>`` at each step of ``save_at``; returns the folders in order."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    data = torch.tensor(list(CORPUS.read_bytes()), dtype=torch.long)
    cfg = LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=seq, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    saved: list[Path] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for step in range(max(save_at) + 1):
            if step in save_at:
                path = folder / f"checkpoint-{step}"
                model.save_pretrained(path)
                saved.append(path)
            if step == max(save_at):
                break
            starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
            x = torch.stack([data[s:s + seq] for s in starts])
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return saved
