"""The registry's one schema: the strict loader, the variant rule, the prefix rule and the coverage of every model type.

Family documents here are written by hand for each case; the expected layouts and keys are spelled out literally,
never read back from the registry under test. Checkpoints are folders of zero tensors with hand-picked names:
resolving a layout reads names and config.json only.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import save_file

from mmdetect.cli import main
from mmdetect.io.checkpoint import open_checkpoint
from mmdetect.registry import HERE, NormSpec, Proj, RegistryError, load_registry, parse_family, tensor_key
from mmdetect.registry.loader import find_family, refusal
from mmdetect.registry.resolve import Rebase, resolve_layout

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import import_survey

LLAMA_ATTENTION = {
    "heads": ["num_attention_heads"],
    "pre_norm": {"weight": "model.layers.{i}.input_layernorm.weight", "kind": "rms"},
    "q": {"key": "model.layers.{i}.self_attn.q_proj.weight", "axis": 0},
    "k": {"key": "model.layers.{i}.self_attn.k_proj.weight", "axis": 0},
    "v": {"key": "model.layers.{i}.self_attn.v_proj.weight", "axis": 0},
    "o": {"key": "model.layers.{i}.self_attn.o_proj.weight", "axis": 1},
}
LLAMA_MLP = {
    "name": "mlp",
    "pre_norm": {"weight": "model.layers.{i}.post_attention_layernorm.weight", "kind": "rms"},
    "gate": {"key": "model.layers.{i}.mlp.gate_proj.weight", "axis": 0},
    "up": {"key": "model.layers.{i}.mlp.up_proj.weight", "axis": 0},
    "out": {"key": "model.layers.{i}.mlp.down_proj.weight", "axis": 1},
}


def doc(**changes: Any) -> dict[str, Any]:
    """A complete llama-like family document, with top-level fields replaced."""
    base: dict[str, Any] = {
        "family": "toy", "model_types": ["toy", "toy_mla"], "mlps": [copy.deepcopy(LLAMA_MLP)],
        "attention": copy.deepcopy(LLAMA_ATTENTION),
        "embedding": {"embed": "model.embed_tokens.weight", "unembed": "lm_head.weight",
                      "final_norm": {"weight": "model.norm.weight", "kind": "rms"}},
    }
    base.update(changes)
    return base


# -- the strict loader ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path,edit,message", [
    ("top level", lambda d: d.update(attenion={}), "toy.yaml: unknown key 'attenion'"),
    ("attention.q", lambda d: d["attention"]["q"].update(axes=0), "toy.yaml: attention.q: unknown key 'axes'"),
    ("mlps[0].gate", lambda d: d["mlps"][0]["gate"].update(axs=0), "toy.yaml: mlps[0].gate: unknown key 'axs'"),
    ("embedding", lambda d: d["embedding"].update(unembedding="x"), "toy.yaml: embedding: unknown key 'unembedding'"),
    ("variant attention", lambda d: d.update(variants=[{"when": {"x": 1}, "attention": {"paralel": True}}]),
     "toy.yaml: variants[0].attention: unknown key 'paralel'"),
    ("variant", lambda d: d.update(variants=[{"when": {"x": 1}, "set": {}}]),
     "toy.yaml: variants[0]: unknown key 'set'"),
    ("pre_norm kind", lambda d: d["attention"]["pre_norm"].update(kind="rmsnorm"),
     "toy.yaml: attention.pre_norm.kind: must be one of"),
    ("missing attention", lambda d: d.pop("attention"), "toy.yaml: missing key 'attention'"),
    ("q and qkv", lambda d: d["attention"].update(qkv={"key": "a.{i}.qkv", "axis": 0, "groups": 1,
                                                       "order": ["q", "k", "v"]}),
     "toy.yaml: attention: give either q, k and v or one fused qkv"),
    ("unsupported with fields", lambda d: d["attention"].update(unsupported="x"),
     "toy.yaml: attention: unknown key 'heads'"),
    ("transformerlens", lambda d: d.update(transformerlens={"fold_layernorm": False}),
     "toy.yaml: transformerlens: unknown key 'fold_layernorm'"),
    ("transformerlens value", lambda d: d.update(variants=[{"when": {"x": 1},
                                                          "transformerlens": {"fold_ln": "no"}}]),
     "toy.yaml: variants[0].transformerlens.fold_ln: must be true or false"),
    ("transformerlens logit_scale", lambda d: d.update(transformerlens={"logit_scale": 0}),
     "toy.yaml: transformerlens.logit_scale: must be a positive number or null"),
    ("variant for a foreign model type", lambda d: d.update(variants=[{"when": {"model_type": "gpt2"},
                                                                      "attention": {"unsupported": "x"}}]),
     "toy.yaml: variants[0].when: model_type 'gpt2' is not one of this file's model_types"),
])
def test_a_malformed_file_is_an_error_naming_file_and_path(path: str, edit: Any, message: str) -> None:
    data = doc()
    edit(data)
    with pytest.raises(RegistryError) as err:
        parse_family(data, "toy.yaml")
    assert str(err.value).startswith(message), str(err.value)


def test_an_incomplete_layout_left_by_a_variant_is_an_error_at_load() -> None:
    data = doc(attention={"unsupported": "MLA"},
               variants=[{"when": {"model_type": "toy"},
                          "attention": {"heads": ["n_head"], "o": LLAMA_ATTENTION["o"]}}])
    with pytest.raises(RegistryError, match=r"toy.yaml: attention: give either q, k and v .*model type 'toy'"):
        parse_family(data, "toy.yaml")


def test_the_shipped_files_load_through_the_same_loader(tmp_path: Path) -> None:
    """A copy of the shipped directory with one typo fails on that file and path."""
    for src in HERE.glob("*.yaml"):
        (tmp_path / src.name).write_text(src.read_text())
    assert len(load_registry(str(tmp_path)).families) == len(load_registry().families)
    text = (tmp_path / "gpt2.yaml").read_text().replace("  qkv:\n", "  qvk:\n", 1)
    (tmp_path / "gpt2.yaml").write_text(text)
    with pytest.raises(RegistryError, match=r"^gpt2.yaml: attention: unknown key 'qvk'"):
        load_registry.__wrapped__(str(tmp_path))


def test_a_lookup_parses_only_the_file_it_needs(tmp_path: Path) -> None:
    """find_family (the scan's lookup) reads every file's head but validates only the file it returns."""
    for src in HERE.glob("*.yaml"):
        (tmp_path / src.name).write_text(src.read_text())
    text = (tmp_path / "gpt2.yaml").read_text().replace("  qkv:\n", "  qvk:\n", 1)
    (tmp_path / "gpt2.yaml").write_text(text)
    toy = doc(model_types=["toy"])
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump({k: toy[k] for k in ("mlps", "family", "attention",
                                                                         "model_types")}, sort_keys=False))
    llama = find_family("llama", directory=str(tmp_path))
    assert llama is not None and llama.family == "llama" and "mistral" in llama.model_types
    found = find_family("toy", directory=str(tmp_path))          # model_types after mlps: the file is read whole
    assert found is not None and found.family == "toy"
    assert find_family("no_such_type", directory=str(tmp_path)) is None
    assert refusal("zamba", directory=str(tmp_path)) == ("the MLPs live in one shared, tied transformer block, not in "
                                                         "the layer stack")
    with pytest.raises(RegistryError, match=r"^gpt2.yaml: attention: unknown key 'qvk'"):
        find_family("gpt2", directory=str(tmp_path))
    dup = tmp_path / "dup"
    dup.mkdir()
    (dup / "llama.yaml").write_text((HERE / "llama.yaml").read_text())
    (dup / "twice.yaml").write_text("family: twice\nmodel_types: [llama]\nmlps: []\n")
    with pytest.raises(RegistryError, match="^twice.yaml: model type 'llama' is also in llama.yaml"):
        find_family("llama", directory=str(dup))


# -- the variant rule -------------------------------------------------------------------------------------------------

def test_every_matching_variant_applies_in_file_order() -> None:
    other_mlp = {**copy.deepcopy(LLAMA_MLP), "pre_norm": {"weight": "model.layers.{i}.input_layernorm.weight",
                                                          "kind": "rms"}}
    third_mlp = {**copy.deepcopy(LLAMA_MLP), "pre_norm": None}
    fam = parse_family(doc(
        defaults={"parallel_mode": False},
        variants=[
            {"when": {"parallel_mode": True}, "mlps": [other_mlp], "attention": {"parallel": True}},
            {"when": {"new_arch": True}, "mlps": [third_mlp],
             "attention": {"pre_norm": None}, "embedding": {"final_norm": None}},
            {"when": {"model_type": "toy_mla"}, "attention": {"unsupported": "MLA"}},
        ]), "toy.yaml")

    plain = fam.resolve({"model_type": "toy"})
    assert plain.mlps[0].pre_norm == NormSpec("model.layers.{i}.post_attention_layernorm.weight", "rms")
    assert plain.attention is not None and not plain.attention.parallel
    assert plain.attention.final_norm == NormSpec("model.norm.weight", "rms")
    assert plain.attention.unembed == ("lm_head.weight",) and plain.attention.family == "toy"

    par = fam.resolve({"model_type": "toy", "parallel_mode": True})
    assert par.mlps[0].pre_norm == NormSpec("model.layers.{i}.input_layernorm.weight", "rms")
    assert par.attention is not None and par.attention.parallel
    assert par.attention.pre_norm == NormSpec("model.layers.{i}.input_layernorm.weight", "rms")

    both = fam.resolve({"model_type": "toy", "parallel_mode": True, "new_arch": True})
    assert both.mlps[0].pre_norm is None                       # mlps: the later variant's list replaces the earlier
    assert both.attention is not None and both.attention.parallel    # a field only the earlier one set survives
    assert both.attention.pre_norm is None and both.attention.final_norm is None
    assert both.attention.q == Proj("model.layers.{i}.self_attn.q_proj.weight", 0)

    mla = fam.resolve({"model_type": "toy_mla", "parallel_mode": True})
    assert (mla.attention, mla.attention_gap) == (None, "MLA")
    assert mla.mlps[0].pre_norm == NormSpec("model.layers.{i}.input_layernorm.weight", "rms")


def test_defaults_fill_missing_config_keys_and_none_counts_as_missing() -> None:
    fam = parse_family(doc(defaults={"multi_query": True},
                           variants=[{"when": {"multi_query": True}, "attention": {"parallel": True}}]), "toy.yaml")
    for config in ({"model_type": "toy"}, {"model_type": "toy", "multi_query": None}):
        lay = fam.resolve(config).attention
        assert lay is not None and lay.parallel
    lay = fam.resolve({"model_type": "toy", "multi_query": False}).attention
    assert lay is not None and not lay.parallel


def test_the_transformerlens_section_and_its_variants_resolve_per_model_type_and_config() -> None:
    """What TransformerLens's adapter leaves unprocessed is data: a file's section, model_type and config variants."""
    from mmdetect.registry import Processing

    data = doc(transformerlens={"center_writing_weights": False},
               variants=[{"when": {"model_type": "toy_mla"}, "transformerlens": {"fold_ln": False}},
                         {"when": {"post_ln": True}, "transformerlens": {"center_writing_weights": True}}])
    fam = parse_family(data, "toy.yaml")
    assert fam.resolve({"model_type": "toy"}).processing == {"transformerlens": Processing(True, False, None)}
    assert fam.resolve({"model_type": "toy_mla"}).processing["transformerlens"] == Processing(False, False)
    assert fam.resolve({"model_type": "toy_mla", "post_ln": True}).processing["transformerlens"] == \
        Processing(False, True)
    assert parse_family(doc(), "toy.yaml").resolve({"model_type": "toy"}).processing["transformerlens"] == \
        Processing(True, True)
    shipped = {t: load_registry().lookup(t).resolve({"model_type": t}).processing["transformerlens"]  # type: ignore
               for t in ("llama", "glm", "nemotron", "xglm", "gpt2", "olmo2", "cohere")}
    assert shipped == {"llama": Processing(True, True), "glm": Processing(False, True),
                       "nemotron": Processing(False, False), "xglm": Processing(True, False),
                       "gpt2": Processing(True, True), "olmo2": Processing(False, True),
                       "cohere": Processing(True, True, 0.0625)}
    opt = load_registry().lookup("opt")
    assert opt is not None
    assert opt.resolve({"model_type": "opt"}).processing["transformerlens"] == Processing(True, True)
    assert opt.resolve({"model_type": "opt", "do_layer_norm_before": False}).processing["transformerlens"] == \
        Processing(False, False)


def test_giving_qkv_replaces_q_k_v_and_back() -> None:
    qkv = {"key": "model.layers.{i}.self_attn.qkv_proj.weight", "axis": 0, "groups": "heads", "order": ["q", "k", "v"]}
    fam = parse_family(doc(variants=[{"when": {"fused": True}, "attention": {"qkv": qkv}},
                                     {"when": {"split": True}, "attention": {k: LLAMA_ATTENTION[k] for k in "qkv"}}]),
                       "toy.yaml")
    fused = fam.resolve({"model_type": "toy", "fused": True}).attention
    assert fused is not None and (fused.q, fused.k, fused.v) == (None, None, None)
    assert fused.qkv == Proj("model.layers.{i}.self_attn.qkv_proj.weight", 0, "heads", ("q", "k", "v"))
    split = fam.resolve({"model_type": "toy", "fused": True, "split": True}).attention
    assert split is not None and split.qkv is None and split.v == Proj("model.layers.{i}.self_attn.v_proj.weight", 0)


def test_a_model_type_variant_gives_a_layout_where_the_file_gives_a_reason() -> None:
    gpt = {"name": "other", "heads": ["n_head"], "qkv": {"key": "h.{i}.attn.c_attn.weight", "axis": 1, "groups": 1,
                                                          "order": ["q", "k", "v"]},
           "o": {"key": "h.{i}.attn.c_proj.weight", "axis": 0}}
    fam = parse_family(doc(attention={"unsupported": "MLA"}, embedding={},
                           variants=[{"when": {"model_type": "toy"}, "attention": gpt}]), "toy.yaml")
    lay = fam.resolve({"model_type": "toy"}).attention
    assert lay is not None and lay.family == "other" and lay.pre_norm is None and lay.heads == ("n_head",)
    assert fam.resolve({"model_type": "toy_mla"}).attention_gap == "MLA"


# -- the prefix rule, for MLPs and attention alike ---------------------------------------------------------------------

def _checkpoint(folder: Path, names: list[str], config: dict[str, Any]) -> Path:
    folder.mkdir()
    save_file({n: torch.zeros(4, 4) for n in names}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


LLAMA_LAYER = ["input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
               "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
               "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]


def test_a_wrapped_text_model_is_rebased_for_mlps_and_attention(tmp_path: Path) -> None:
    names = [f"model.language_model.layers.{i}.{n}" for i in range(2) for n in LLAMA_LAYER]
    names += ["model.language_model.embed_tokens.weight", "model.language_model.norm.weight", "lm_head.weight",
              "model.vision_tower.layers.0.mlp.fc1.weight"]
    folder = _checkpoint(tmp_path / "wrapped", names, {"model_type": "llama", "num_attention_heads": 4})
    with open_checkpoint(str(folder)) as ckpt:
        layout = resolve_layout(ckpt)
    assert sorted(layout.located) == [0, 1]
    (spec,) = layout.mlps
    assert spec.out.key == "model.language_model.layers.{i}.mlp.down_proj.weight"
    assert spec.pre_norm == NormSpec("model.language_model.layers.{i}.post_attention_layernorm.weight", "rms")
    lay = layout.attention
    assert lay is not None and layout.attention_gap is None
    assert lay.v == Proj("model.language_model.layers.{i}.self_attn.v_proj.weight", 0)
    assert lay.o == Proj("model.language_model.layers.{i}.self_attn.o_proj.weight", 1)
    assert lay.pre_norm == NormSpec("model.language_model.layers.{i}.input_layernorm.weight", "rms")
    assert lay.embed == "model.language_model.embed_tokens.weight"          # under the stack's parent: moved
    assert lay.final_norm == NormSpec("model.language_model.norm.weight", "rms")
    assert lay.unembed == ("lm_head.weight",)                                # outside it: kept


def test_a_checkpoint_saved_without_its_outer_module_is_rebased(tmp_path: Path) -> None:
    layer = ["ln_1.weight", "ln_2.weight", "attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
             "mlp.c_proj.weight"]
    names = [f"h.{i}.{n}" for i in range(3) for n in layer] + ["wte.weight", "ln_f.weight"]
    folder = _checkpoint(tmp_path / "bare", names, {"model_type": "gpt2", "n_head": 4})
    with open_checkpoint(str(folder)) as ckpt:
        layout = resolve_layout(ckpt)
    assert sorted(layout.located) == [0, 1, 2]
    assert layout.mlps[0].in_ is not None and layout.mlps[0].in_.key == "h.{i}.mlp.c_fc.weight"
    lay = layout.attention
    assert lay is not None
    assert lay.qkv == Proj("h.{i}.attn.c_attn.weight", 1, 1, ("q", "k", "v"))
    assert (lay.embed, lay.final_norm) == ("wte.weight", NormSpec("ln_f.weight", "layernorm"))


def test_rebasing_keeps_a_weightless_norm_and_moves_every_weight_of_a_chain() -> None:
    rebase = Rebase("model.layers.", "model.text.layers.")
    assert rebase.norm(NormSpec(None, "layernorm")) == NormSpec(None, "layernorm")
    chained = NormSpec(("model.layers.{i}.a.weight", "model.layers.{i}.b.weight"), "rms")
    assert rebase.norm(chained) == NormSpec(("model.text.layers.{i}.a.weight", "model.text.layers.{i}.b.weight"), "rms")


def test_heads_are_unavailable_with_the_registry_reason(tmp_path: Path) -> None:
    names = [f"model.layers.{i}.{n}" for i in range(2) for n in LLAMA_LAYER]
    folder = _checkpoint(tmp_path / "mla", names, {"model_type": "minicpm3", "num_attention_heads": 4})
    with open_checkpoint(str(folder)) as ckpt:
        layout = resolve_layout(ckpt)
    assert layout.attention is None and sorted(layout.located) == [0, 1]
    assert layout.attention_gap == ("attention of model type 'minicpm3' is not supported: multi-head latent "
                                    "attention (MLA) compresses K and V through a shared low-rank latent")


def test_tensor_key_fills_layer_and_expert() -> None:
    assert tensor_key("model.layers.{i}.experts.{e}.up_proj.weight", 3, 5) == "model.layers.3.experts.5.up_proj.weight"
    assert tensor_key("blk.{i}.ffn_up_exps.weight", 12) == "blk.12.ffn_up_exps.weight"
    assert tensor_key("model.layers.{i}.mlp.experts.{e}.w1", 0) == "model.layers.0.mlp.experts.0.w1"


# -- coverage ---------------------------------------------------------------------------------------------------------

def test_every_model_type_has_an_attention_layout_or_a_reason() -> None:
    registry = load_registry()
    assert registry.families
    for fam in registry.families:
        for model_type in fam.model_types:
            resolved = fam.resolve({"model_type": model_type})
            if resolved.attention is None:
                assert isinstance(resolved.attention_gap, str) and resolved.attention_gap.strip(), (fam, model_type)
            else:
                assert resolved.attention_gap is None
    with_heads = {t for f in registry.families if f.format == "safetensors" for t in f.model_types
                  if f.resolve({"model_type": t}).attention is not None}
    assert {"llama", "gpt2", "gpt_neox", "falcon", "mixtral", "gemma2", "opt", "bloom"} <= with_heads
    assert not {"deepseek_v3", "jamba", "qwen3_next"} & with_heads


def test_archs_lists_heads_and_the_reason_per_model_type() -> None:
    result = CliRunner().invoke(main, ["archs", "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["supported"]
    assert list(rows[0])[-2:] == ["heads", "heads_reason"]
    by_type = {r["model_type"]: r for r in rows}
    assert by_type["llama"]["heads"] is True and by_type["llama"]["heads_reason"] is None
    assert by_type["deepseek_v3"]["heads"] is False and "MLA" in by_type["deepseek_v3"]["heads_reason"]
    table = CliRunner(env={"COLUMNS": "400"}).invoke(main, ["archs"]).stdout
    assert "│ no: multi-head latent attention (MLA)" in table and "Attention heads:" in table


# -- the import tool keeps attention -----------------------------------------------------------------------------------

def test_import_survey_recomposes_every_generated_file_unchanged() -> None:
    """Reading each generated file's attention per model type and composing it again gives the same sections."""
    checked = 0
    for path in sorted(HERE.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if not import_survey.is_generated(path) or "refuse" in data:
            continue
        mlp_variants = [{"when": v["when"], "mlps": v["mlps"]} for v in data.get("variants", []) if "mlps" in v]
        sections = import_survey.compose(data["family"], data["model_types"], import_survey.programs(data),
                                         mlp_variants)
        assert sections == {k: data[k] for k in ("attention", "embedding", "transformerlens", "defaults", "variants")
                            if k in data}, path
        checked += 1
    assert checked > 50


def test_import_survey_moves_a_model_types_attention_with_it() -> None:
    """gpt_neo leaves the gpt_bigcode file for the llama one: its layout follows as a model_type variant."""
    bigcode = yaml.safe_load((HERE / "gpt_bigcode.yaml").read_text())
    llama = yaml.safe_load((HERE / "llama.yaml").read_text())
    kept = {**import_survey.programs(bigcode), **import_survey.programs(llama)}
    moved = copy.deepcopy(llama)
    moved["model_types"] = sorted(llama["model_types"] + ["gpt_neo"])
    del moved["variants"]
    moved.update(import_survey.compose("llama", moved["model_types"], kept, []))
    rest = copy.deepcopy(bigcode)
    rest["model_types"] = ["gpt_bigcode"]
    del rest["variants"]
    rest.update(import_survey.compose("gpt_bigcode", ["gpt_bigcode"], kept, []))
    import_survey.check_attention_kept({"gpt_bigcode.yaml": bigcode, "llama.yaml": llama},
                                       {"gpt_bigcode.yaml": rest, "llama.yaml": moved})
    lay = parse_family(moved, "llama.yaml").resolve({"model_type": "gpt_neo"}).attention
    assert lay is not None and lay.family == "gpt_neo"
    assert lay.o == Proj("transformer.h.{i}.attn.attention.out_proj.weight", 1)
    assert lay.embed == "transformer.wte.weight"
    broken = copy.deepcopy(moved)
    broken["variants"] = [v for v in broken["variants"] if v["when"] != {"model_type": "gpt_neo"}]
    with pytest.raises(SystemExit, match="gpt_neo"):
        import_survey.check_attention_kept({"gpt_bigcode.yaml": bigcode}, {"llama.yaml": broken})
