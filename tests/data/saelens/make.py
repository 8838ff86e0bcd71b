"""Build the SAELens transcoders in this folder with SAELens itself (its classes and its own ``save_model``).

sae-lens 6.54.12 requires transformer-lens < 4, and the test extra pins transformer-lens 4.3, so sae-lens cannot be
installed beside the test suite; these files were made once in a separate environment and are read by
``tests/test_transcoder_scan.py``. To remake them (d_in = d_out = 64, the tiny models' width; 12 features):

    pip install --target /tmp/saelens sae-lens==6.54.12 transformer-lens==3.9.0   # (--no-deps and their few deps)
    PYTHONPATH=/tmp/saelens python tests/data/saelens/make.py tests/data/saelens

Contents (``set/`` is a per-layer set: one transcoder per layer; ``jumprelu_skip/`` stands alone):

* ``set/L0``: a ``Transcoder`` at ``blocks.0.hook_resid_mid`` -> ``blocks.0.hook_mlp_out``, encoder columns centred
  over d_in; features 0, 1, 2 planted (decoder row = -encoder column, times 0.5, 2, 1), feature 3 a copier
  (decoder row = +encoder column), the rest random.
* ``set/L1``: a ``SkipTranscoder`` at ``blocks.1.ln2.hook_normalized`` -> ``blocks.1.hook_mlp_out``, random
  features, ``W_skip = -I`` (a skip path that deletes what it reads: copying score -1).
* ``jumprelu_skip``: a ``JumpReLUSkipTranscoder`` at layer 1, random, positive thresholds, random ``W_skip``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from sae_lens import (
    JumpReLUSkipTranscoder,
    JumpReLUSkipTranscoderConfig,
    SkipTranscoder,
    SkipTranscoderConfig,
    Transcoder,
    TranscoderConfig,
)
from sae_lens.saes.sae import SAEMetadata

D, N = 64, 12


def meta(layer: int, hook_in: str, name: str) -> SAEMetadata:
    return SAEMetadata(model_name="gpt2", hook_name=f"blocks.{layer}.{hook_in}",
                       hook_name_out=f"blocks.{layer}.hook_mlp_out", neuronpedia_id=f"gpt2-small/{layer}-{name}")


def main(out: Path) -> None:
    gen = torch.Generator().manual_seed(23)
    with torch.no_grad():
        tc = Transcoder(TranscoderConfig(d_in=D, d_sae=N, d_out=D, apply_b_dec_to_input=False,
                                         metadata=meta(0, "hook_resid_mid", "planted")))
        enc = torch.randn(D, N, generator=gen)
        enc -= enc.mean(dim=0, keepdim=True)
        tc.W_enc.copy_(enc)
        dec = torch.randn(N, D, generator=gen)
        for i, scale in enumerate((-0.5, -2.0, -1.0, 1.0)):
            dec[i] = scale * enc[:, i]
        tc.W_dec.copy_(dec)
        tc.b_enc.copy_(torch.randn(N, generator=gen))
        tc.save_model(out / "set" / "L0")

        skip = SkipTranscoder(SkipTranscoderConfig(d_in=D, d_sae=N, d_out=D, apply_b_dec_to_input=False,
                                                   metadata=meta(1, "ln2.hook_normalized", "skip")))
        skip.W_enc.copy_(torch.randn(D, N, generator=gen))
        skip.W_dec.copy_(torch.randn(N, D, generator=gen))
        skip.W_skip.copy_(-torch.eye(D))
        skip.save_model(out / "set" / "L1")

        jr = JumpReLUSkipTranscoder(JumpReLUSkipTranscoderConfig(
            d_in=D, d_sae=N, d_out=D, apply_b_dec_to_input=False, metadata=meta(1, "ln2.hook_normalized", "jr")))
        jr.W_enc.copy_(torch.randn(D, N, generator=gen))
        jr.W_dec.copy_(torch.randn(N, D, generator=gen))
        jr.W_skip.copy_(torch.randn(D, D, generator=gen) / D ** 0.5)
        jr.threshold.copy_(torch.rand(N, generator=gen) + 0.1)
        jr.save_model(out / "jumprelu_skip")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
