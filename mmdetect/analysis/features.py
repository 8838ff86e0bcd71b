"""Transcoder features scanned as neurons: ``mmdetect scan MODEL --transcoder PATH``.

A transcoder stands in for one MLP: feature i reads its encoder column ``W_enc[:, i]`` ([d_in]) and writes its
decoder row ``W_dec[i, :]`` ([d_out]), as a neuron reads its input row and writes its output row. So the scan's own
kernel (``scanner.neurons.mlp_cosines``) takes ``W_enc.T`` ([d_sae, d_in], a transposed view: never copied whole)
as read rows and ``W_dec`` as write rows, folded by ``convention.feature_fold`` from where the transcoder's hooks sit
relative to the MLP's norms (``place``; the table is in docs/conventions.md), and the scan's statistics
(``scanner.stats``: flags, classes, z, z_layer, per-layer summary, null bands for d_model) finish the rows.

A skip transcoder's ``W_skip`` ([d_out, d_in], out = W_skip @ x) is a map from the residual stream to itself; its
copying score is computed exactly as ``heads`` scores an OV circuit (``heads.ov_eigenvalues``, ``spectrum_scores``):
read rows ``W_skip`` folded as the encoder's columns are, write rows the identity folded as the decoder's rows are.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mmdetect.analysis.circuit import Circuit
from mmdetect.analysis.heads import ov_eigenvalues, spectrum_scores
from mmdetect.analysis.targets import Target
from mmdetect.convention import DEFAULT, Convention, MLPFold, feature_fold, for_model, get_convention
from mmdetect.convention.kernel import actual_write, fold, fold_mlp
from mmdetect.errors import THRESHOLD, CorruptInputError, UnsupportedError, UsageError, check_unit, quoted
from mmdetect.io.checkpoint import Checkpoint, open_checkpoint
from mmdetect.io.transcoder import Transcoder, opened_transcoders
from mmdetect.registry import MLPSpec, tensor_key
from mmdetect.registry.resolve import resolve_layout
from mmdetect.results import Provenance, ScanResult
from mmdetect.results.progress import progress as _progress_bar
from mmdetect.results.rows import FEATURE_COLUMNS
from mmdetect.scanner.layers import LayerSet
from mmdetect.scanner.neurons import mlp_cosines
from mmdetect.scanner.pipeline import compute_workers, ordered_map, pick_device
from mmdetect.scanner.read import read_gain
from mmdetect.scanner.stats import finish_rows, layer_summary

# TransformerLens hook names (after ``blocks.L.``), by where they sit. HookedTransformer fires ``hook_mlp_out``
# after the post-MLP norm (Gemma 2/3's ln2_post), and TransformerBridge aliases it there too; ``mlp.hook_out`` is
# the MLP module's own output, before that norm.
READ_NORMED = ("ln2.hook_normalized", "ln2.hook_out", "mlp.hook_in")
READ_RESIDUAL = ("hook_resid_mid", "hook_mlp_in", "ln2.hook_in")
WRITE_BEFORE_POST = ("mlp.hook_out", "ln2_post.hook_in")
WRITE_AFTER_POST = ("hook_mlp_out", "ln2_post.hook_out")
TL_NAME = re.compile(r"^blocks\.(\d{1,6})\.(.+)$")
IN_FLIGHT_BYTES = 640 << 20  # transcoder weights mapped at once (two Gemma Scope 16k layers): bounds peak memory


@dataclass(frozen=True)
class Placement:
    """Where one transcoder reads and writes relative to its MLP's norms (see ``convention.feature_fold``)."""

    reads_normed: bool
    writes_before_post_norm: bool
    hook_in: str
    hook_out: str


def _module(template: str, layer: int) -> str:
    """A norm's module name from its weight's template: ``model.layers.{i}.ln.weight`` -> ``model.layers.3.ln``."""
    return tensor_key(template, layer).rsplit(".", 1)[0]


def _mlp_module(spec: MLPSpec, layer: int) -> str:
    """The MLP module's name: the dotted parts its tensors' names share (``transformer.h.3.mlp``)."""
    names = [tensor_key(ts.key, layer).split(".") for ts in spec.tensors().values()]
    common: list[str] = []
    for parts in zip(*names):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common)


def _side(name: str, layer: int, spec: MLPSpec, reading: bool) -> bool | None:
    """For a read hook: True after the pre-MLP norm, False on the residual stream. For a write hook: True before a
    post-MLP norm, False after it. None: a name this table does not place."""
    m = TL_NAME.match(name)
    if m and int(m.group(1)) == layer:
        suffix = m.group(2)
        if reading:
            return True if suffix in READ_NORMED else False if suffix in READ_RESIDUAL else None
        return True if suffix in WRITE_BEFORE_POST else False if suffix in WRITE_AFTER_POST else None
    # Hugging Face module names: a norm's output, the MLP module's input (reading) or output (writing).
    mlp = _mlp_module(spec, layer)
    if reading:
        pre = {_module(w, layer) for w in spec.pre_norm.weights} if spec.pre_norm else set()
        return True if name in pre or name == mlp else None
    post = {_module(w, layer) for w in spec.post_norm.weights} if spec.post_norm else set()
    return True if name == mlp else False if name in post else None


def place(tc: Transcoder, spec: MLPSpec) -> Placement:
    """Where ``tc`` sits, from its TransformerLens hook names or, failing those, its Hugging Face ones."""
    found: list[tuple[bool, str]] = []
    for reading, names in ((True, (tc.hook_name, tc.hf_hook_name)), (False, (tc.hook_name_out, tc.hf_hook_name_out))):
        for name in names:
            side = None if name is None else _side(name, tc.layer, spec, reading)
            if side is not None and name is not None:
                found.append((side, name))
                break
        else:
            where = "hook_name" if reading else "hook_name_out"
            known = READ_NORMED + READ_RESIDUAL if reading else WRITE_BEFORE_POST + WRITE_AFTER_POST
            raise UnsupportedError(
                f"{tc.path}: {where} {quoted(names[0])} is not the MLP's {'input' if reading else 'output'} at layer "
                f"{tc.layer}: mmdetect places blocks.{tc.layer}.{{{', '.join(known)}}}, or the Hugging Face module "
                f"{quoted(_mlp_module(spec, tc.layer))}")
    (reads, hook_in), (writes, hook_out) = found
    return Placement(reads, writes, hook_in, hook_out)


def _d_model(ckpt: Checkpoint, spec: MLPSpec, layer: int, experts: list[int] | None) -> int:
    """d_model from the MLP's output weight's shape: the axis that is not the neurons'."""
    shape = ckpt.tensors[tensor_key(spec.out.key, layer, experts[0] if experts else None)].shape
    return int(shape[1 - spec.out.axis] if len(shape) == 2 else shape[3 - spec.out.axis])


@dataclass
class _Layer:
    tc: Transcoder
    spec: MLPSpec
    d: int
    placement: Placement


def _fit(ckpt: Checkpoint, tcs: list[Transcoder]) -> list[_Layer]:
    """Each transcoder matched to MODEL's MLP at its layer; one line for the first that does not fit."""
    layout = resolve_layout(ckpt, attention=False)
    located = layout.located
    out = []
    for tc in tcs:
        if tc.layer not in located:
            raise UsageError(f"{tc.path}: {tc.hook_name} is at layer {tc.layer}, but {ckpt.ref} has MLPs at layers "
                             f"{min(located)}-{max(located)}: this transcoder was made for another model"
                             + (f" ({tc.model_name})" if tc.model_name else ""))
        spec, experts = located[tc.layer][0]
        d = _d_model(ckpt, spec, tc.layer, experts)
        for name, value in (("d_in", tc.d_in), ("d_out", tc.d_out)):
            if value != d:
                raise UsageError(f"{tc.path}: {name} is {value}, but {ckpt.ref} has d_model {d}: this transcoder "
                                 f"was made for another model" + (f" ({tc.model_name})" if tc.model_name else ""))
        out.append(_Layer(tc, spec, d, place(tc, spec)))
    return out


def _finite(tc: Transcoder, name: str, what: str, w: torch.Tensor, norms: torch.Tensor, first: int = 0) -> None:
    """Refuse non-finite weights in one line (a NaN would otherwise pass as a dead feature). ``first``: the feature
    index of row 0 of ``w``."""
    bad = ~torch.isfinite(norms)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        nan = not bool(torch.isfinite(w[i]).all())
        assert tc.weights is not None
        raise CorruptInputError(f"{tc.weights.files[0]}: {name} {what} {i + first} "
                                + ("holds NaN or infinite values" if nan else "is too large for float32 arithmetic")
                                + ": fix or re-download it")


def skip_scores(w_skip: torch.Tensor, f: MLPFold) -> dict[str, float]:
    """The copying score of a skip path x -> W_skip x (w_skip [d_out, d_in]), folded as the features are: the same
    spectrum ``heads`` takes of an OV circuit, with W_skip's rows as read rows and the identity's as write rows."""
    d = w_skip.shape[0]
    return spectrum_scores(ov_eigenvalues(fold(w_skip, f.read), fold(torch.eye(d), f.write)))


def _gains(ckpt: Checkpoint, layer: _Layer) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The MLP's pre- and post-norm gains at the transcoder's layer ([d] or None), refused when not finite."""
    spec, at = layer.spec, layer.tc.layer
    pre = read_gain(ckpt, spec.pre_norm, at, layer.d)
    post = read_gain(ckpt, spec.post_norm, at, layer.d)
    for gain, which in ((pre, spec.pre_norm), (post, spec.post_norm)):
        if gain is not None and which is not None and not bool(torch.isfinite(gain).all()):
            raise CorruptInputError(f"{ckpt.ref}: the norm weight {tensor_key(which.weights[0], at)} holds NaN "
                                    f"or infinite values: fix or re-download the model")
    return pre, post


def _fold(layer: _Layer, conv: Convention, pre: torch.Tensor | None, post: torch.Tensor | None) -> MLPFold:
    """The folds of this layer's features: ``convention.feature_fold`` at the transcoder's placement."""
    return feature_fold(conv, layer.spec, pre, post, reads_normed=layer.placement.reads_normed,
                        writes_before_post_norm=layer.placement.writes_before_post_norm,
                        centres_input=layer.tc.normalize_activations == "layer_norm")


def _scan_layer(ckpt: Checkpoint, layer: _Layer, conv: Convention, dev: str,
                read_lock: threading.Lock) -> dict[str, Any]:
    tc = layer.tc
    assert tc.weights is not None
    with read_lock:  # one read at a time: the disk sees one sequential stream
        pre, post = _gains(ckpt, layer)
        w_enc, w_dec = tc.weights.read("W_enc"), tc.weights.read("W_dec")
        w_skip = tc.weights.read("W_skip") if tc.skip else None
    f = _fold(layer, conv, pre, post)
    stats = mlp_cosines(w_enc.T, w_dec, None, f, device=dev)
    _finite(tc, "W_enc", "column (feature)", w_enc.T, stats.norm_in)
    _finite(tc, "W_dec", "row (feature)", w_dec, stats.norm_out)
    del w_enc, w_dec
    skip: dict[str, float] = {}
    if w_skip is not None:
        if not bool(torch.isfinite(w_skip).all()):
            raise CorruptInputError(f"{tc.weights.files[0]}: W_skip holds NaN or infinite values: fix or re-download "
                                    f"it")
        skip = skip_scores(w_skip, f)
    n = len(stats.cos)
    nan = np.full(n, np.nan)
    rows = {"layer": np.full(n, tc.layer, dtype=np.int64), "feature": np.arange(n, dtype=np.int64),
            "cos": stats.cos.numpy().astype(np.float64), "cos_gate_out": nan, "cos_gate_in": nan,
            "norm_in": stats.norm_in.numpy().astype(np.float64),
            "norm_out": stats.norm_out.numpy().astype(np.float64),
            "_gated": np.zeros(n, dtype=bool), "_d": np.full(n, layer.d, dtype=np.int64)}
    return {"rows": rows, "mismatched": stats.mismatched.numpy(), "skip": skip}


def _layer_facts(layer: _Layer, skip: dict[str, float]) -> dict[str, Any]:
    tc, p = layer.tc, layer.placement
    return {"transcoder": tc.path.name, "architecture": tc.architecture, "d_sae": tc.d_sae,
            "hook_name": p.hook_in, "hook_name_out": p.hook_out,
            "reads": "normed" if p.reads_normed else "residual",
            "writes": ("MLP output" if layer.spec.post_norm is None
                       else "before post-norm" if p.writes_before_post_norm else "after post-norm"),
            "neuronpedia": tc.link_template,
            "skip_copying": skip.get("copying"), "skip_min_eig": skip.get("min_eig"),
            "skip_min_eig_rel": skip.get("min_eig_rel"), "skip_neg_mass": skip.get("neg_mass")}


def scan_features(ckpt: Checkpoint, transcoders: list[Transcoder], *, threshold: float = THRESHOLD,
                  convention: str | Convention = DEFAULT, layers: Any = None, device: str = "cpu",
                  progress: bool | None = False, neurons: bool = False,
                  scan_neurons: Callable[..., ScanResult] | None = None, source: str | None = None) -> ScanResult:
    """Scan every feature of ``transcoders`` (one per layer of ``ckpt``'s model) into a ``ScanResult`` keyed
    ``layer, feature`` (``FEATURE_COLUMNS``), ranked by cos; ``attrs["layers"]`` is the per-layer summary with the
    transcoder's facts, its skip path's copying score, and with ``neurons`` the model's own neurons at those layers
    (``scan_neurons``: the neuron scan, ``scanner.scan_result``)."""
    check_unit(threshold)
    asked = get_convention(convention)
    layout = resolve_layout(ckpt, attention=False)
    conv = for_model(asked, layout.resolved, ckpt.config)
    selection = LayerSet.of(layers)
    if selection is not None:
        chosen = selection.select([tc.layer for tc in transcoders])
        transcoders = [tc for tc in transcoders if tc.layer in chosen]
    fitted = _fit(ckpt, transcoders)
    dev = pick_device(device)
    biggest = max(4 * tc.d_sae * (tc.d_in + tc.d_out) for tc in transcoders)
    workers = max(1, min(compute_workers(), IN_FLIGHT_BYTES // max(1, biggest))) if dev == "cpu" else 1
    read_lock = threading.Lock()
    results = []
    with _progress_bar(progress, len(fitted), source or str(transcoders[0].path)) as advance:
        for res in ordered_map(lambda layer: _scan_layer(ckpt, layer, conv, dev, read_lock), fitted, workers,
                               name="mmdetect-features"):
            results.append(res)
            advance(1)
    parts = [r["rows"] for r in results]
    rows = finish_rows({k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, threshold)
    order = np.lexsort((rows["feature"], rows["layer"], np.where(np.isfinite(rows["cos"]), rows["cos"], np.inf)))
    columns = {"rank": np.arange(1, len(order) + 1, dtype=np.int64),
               **{k: rows[k][order] for k in FEATURE_COLUMNS if k != "rank"}}
    mismatched = {layer.tc.layer: [r["mismatched"]] for layer, r in zip(fitted, results)}
    summary = layer_summary(columns, mismatched,
                            {layer.tc.layer: layer.d for layer in fitted})
    own: dict[int, dict[str, Any]] = {}
    if neurons:
        assert scan_neurons is not None, "neurons=True needs the neuron scan"
        scanned = scan_neurons(ckpt, threshold=threshold, convention=asked, layers=[lay.tc.layer for lay in fitted],
                               device=device, progress=progress)
        own = {s["layer"]: s for s in scanned.attrs["layers"]}
    for k, (s, layer, r) in enumerate(zip(summary, fitted, results)):
        s = summary[k] = {("n_features" if key == "n_neurons" else key): v for key, v in s.items()}
        mine = own.get(s["layer"])
        s.update(_layer_facts(layer, r["skip"]), n_neurons=mine["n_neurons"] if mine else None,
                 neurons_flagged=mine["n_flagged"] if mine else None, neurons_min=mine["min"] if mine else None)
    family = layout.family
    prov = Provenance.of(ckpt, "scan", convention=conv.name, threshold=threshold,
                         layers=layers if isinstance(layers, str) or layers is None else sorted(set(layers)),
                         device=dev, family=family.family if family else None,
                         heuristic=family.heuristic if family else None, rows="features",
                         transcoder=source or str(transcoders[0].path), neurons=neurons)
    return ScanResult(columns, {"provenance": prov.to_dict(), "layers": summary})


def scan_transcoder(model: str, transcoder: str | Path, *, revision: str | None = None,
                    threshold: float = THRESHOLD, convention: str | Convention = DEFAULT, layers: Any = None,
                    device: str = "cpu", progress: bool | None = False, neurons: bool = False,
                    as_frame: bool = True) -> Any:
    """Scan the features of the SAELens transcoder(s) at ``transcoder`` against ``model`` (a folder, hub id or
    .gguf file, which supplies the norms the features read and write through): a DataFrame, one row per feature,
    ranked by cos (``as_frame=False``: the ``ScanResult``). ``neurons``: also scan the model's own neurons at those
    layers, for the per-layer summary. Options as for ``mmdetect.scan``."""
    from mmdetect.scanner import scan_result

    check_unit(threshold)
    conv = get_convention(convention)
    with opened_transcoders(transcoder) as tcs, open_checkpoint(model, revision=revision) as ckpt:
        result = scan_features(ckpt, tcs, threshold=threshold, convention=conv, layers=layers, device=device,
                               progress=progress, neurons=neurons, scan_neurons=scan_result, source=str(transcoder))
    return result.to_frame() if as_frame else result


# -- one feature, for explain ----------------------------------------------------------------------------------------

@dataclass
class FeatureEncoder:
    """One feature's activation from the transcoder's input x [N, d_in], computed as SAELens' ``encode`` computes it:
    x normalised per token (``normalize_activations``: ``constant_norm_rescale`` scales it to norm sqrt(d_in),
    ``layer_norm`` centres it and divides by its std + 1e-5; ``expected_average_only_in`` is folded into the saved
    weights, so nothing), minus b_dec where ``apply_b_dec_to_input``, then pre = x . W_enc[:, f] + b_enc[f] and
    a = relu(pre), times (pre > threshold[f]) for a JumpReLU transcoder. ``placement`` says where x is taken: the
    MLP's input (the pre-MLP norm's output) or the residual stream in front of that norm."""

    w: torch.Tensor                   # [d_in] float32: W_enc[:, f]
    b: torch.Tensor                   # [] float32: b_enc[f]
    threshold: torch.Tensor | None    # [] float32: threshold[f] (JumpReLU)
    b_dec: torch.Tensor | None        # [d_in] float32, subtracted from x (apply_b_dec_to_input)
    normalize: str
    placement: Placement

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, d_in] -> the pre-activation [N] float32."""
        x = x.float()
        if self.normalize == "constant_norm_rescale":
            x = x * (x.shape[-1] ** 0.5 / x.norm(dim=-1, keepdim=True))
        elif self.normalize == "layer_norm":
            x = x - x.mean(dim=-1, keepdim=True)
            x = x / (x.std(dim=-1, keepdim=True) + 1e-5)
        if self.b_dec is not None:
            x = x - self.b_dec.to(x.device)
        return x @ self.w.to(x.device) + self.b.to(x.device)

    def act(self, pre: torch.Tensor) -> torch.Tensor:
        """The pre-activation [N] -> the activation [N] that multiplies the decoder row."""
        a = torch.relu(pre)
        return a if self.threshold is None else a * (pre > self.threshold.to(pre.device)).to(a.dtype)


def _layers_text(layers: list[int]) -> str:
    shown = ", ".join(str(x) for x in layers[:8])
    return f"layer {shown}" if len(layers) == 1 else f"layers {shown}" + (", ..." if len(layers) > 8 else "")


def find_feature(circuit: Circuit, transcoders: list[Transcoder], layer: int, feature: int,
                 source: str) -> tuple[Target, dict[str, Any]]:
    """Feature ``feature`` of the transcoder at ``layer`` as an explain :class:`Target` (kind "feature"): its read is
    its encoder column and its write its decoder row, folded in the circuit's convention exactly as
    ``scan_features`` folds them (``_fold``: the transcoder's placement); its actual write is the decoder row times
    the post-MLP norm's gain where the decoder writes in front of that norm. Returns the target and the
    transcoder's facts (the scan's per-layer keys, with this feature's Neuronpedia link). ``source``: how the user
    named the transcoder(s), for the messages."""
    by_layer = {tc.layer: tc for tc in transcoders}
    tc = by_layer.get(layer)
    if tc is None:
        raise UsageError(f"layer {layer} has no transcoder in {source} (it has {_layers_text(sorted(by_layer))}): "
                         f"check --layer")
    (fitted,) = _fit(circuit.ckpt, [tc])
    if not 0 <= feature < tc.d_sae:
        raise UsageError(f"feature {feature} is out of range: the transcoder at layer {layer} has {tc.d_sae} features "
                         f"(0-{tc.d_sae - 1})")
    if tc.apply_b_dec_to_input and tc.d_in != tc.d_out:
        raise UnsupportedError(f"{tc.path}: apply_b_dec_to_input is set but b_dec has d_out = {tc.d_out} entries, "
                               f"not d_in = {tc.d_in}: SAELens cannot subtract it from the input either")
    weights = tc.weights
    assert weights is not None
    pre, post = _gains(circuit.ckpt, fitted)
    f = _fold(fitted, circuit.convention, pre, post)
    enc = weights.read("W_enc", populate=False)[:, feature].float().clone()[None]   # [1, d_in]: one column
    dec = weights.read("W_dec", feature, feature + 1).float()                         # [1, d_out]
    stats = mlp_cosines(enc, dec, None, f)
    _finite(tc, "W_enc", "column (feature)", enc, stats.norm_in, feature)
    _finite(tc, "W_dec", "row (feature)", dec, stats.norm_out, feature)
    # what the encoder adds to x . W_enc[:, f]: this feature's bias and threshold, and all of b_dec where it is used
    used = {"b_enc": feature, "threshold": feature, "b_dec": slice(None) if tc.apply_b_dec_to_input else None}
    small = {name: weights.read(name).float()[at] for name, at in used.items() if at is not None and name in weights}
    for name, t in small.items():
        if not bool(torch.isfinite(t).all()):
            where = "" if name == "b_dec" else f" for feature {feature}"
            raise CorruptInputError(f"{weights.files[0]}: {name} holds NaN or infinite values{where}: fix or "
                                    f"re-download it")
    encoder = FeatureEncoder(enc[0], small["b_enc"].clone(), small.get("threshold"), small.get("b_dec"),
                             tc.normalize_activations, fitted.placement)
    rows = fold_mlp(f, enc, dec, None)
    w_write = actual_write(dec, post if fitted.placement.writes_before_post_norm else None)
    target = Target(layer, None, feature, fitted.spec, rows.read[0].clone(), rows.write[0].clone(), w_write[0].clone(),
                    stats, kind="feature", encoder=encoder)
    facts = {k: v for k, v in _layer_facts(fitted, {}).items() if not k.startswith("skip_") and k != "neuronpedia"}
    facts["neuronpedia"] = tc.link(feature)
    return target, facts
