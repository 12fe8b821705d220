"""tuneforge export --combine: several LoRA adapters on one base combined into one, then exported."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from tiny import save_tiny_model

from tuneforge.errors import TuneforgeError
from tuneforge.exporting import EXPORT_RECORD, export
from tuneforge.exporting.probe import probe_ids, probe_logits
from tuneforge.models import load_model, load_tokenizer, resolve

pytestmark = pytest.mark.usefixtures("one_thread")


def _adapter(base, folder, seed: int, **lora):
    """A LoRA adapter on `base` with random A and B (so each changes every layer it targets)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    options = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False, **lora}
    get_peft_model(model, LoraConfig(**options)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "support": _adapter(tiny_model_dir, root / "support", 1, use_rslora=True),
        "tools": _adapter(tiny_model_dir, root / "tools", 2, use_rslora=True),
        "wide": _adapter(tiny_model_dir, root / "wide", 3, r=8, target_modules=["q_proj", "o_proj", "down_proj"]),
    }


def _logits(spec):
    source = resolve(str(spec))
    return probe_logits(load_model(source), probe_ids(load_tokenizer(source)))


def _max_diff(logits_a, logits_b) -> float:
    return max((a - b).abs().max().item() for a, b in zip(logits_a, logits_b, strict=True))


def test_linear_with_weights_one_and_zero_is_the_first_adapter(adapters, tmp_path):
    out = tmp_path / "combined"
    export(adapters["support"], "adapter", None, out, combine_with=[f"{adapters['tools']}:0"], combination="linear")
    # rsLoRA adapters: their scaling, alpha / sqrt(r), is folded into the combined A and B, which scale plainly.
    assert _max_diff(_logits(out), _logits(adapters["support"])) < 1e-5
    record = json.loads((out / EXPORT_RECORD).read_text())
    assert record["combined"]["combination"] == "linear"
    assert [a["weight"] for a in record["combined"]["adapters"]] == [1.0, 0.0]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch folder left


def _mean_of_merged(base, first, second, out) -> tuple[float, float]:
    """The largest logit difference between the merged export to `out` of `first`:0.5 + `second`:0.5 (cat)
    and the mean of the two adapters' merged models, which PEFT's cat combination is; and between it and
    `first`'s model."""
    from transformers import AutoModelForCausalLM

    export(f"{first}:0.5", "merged", "f32", out, combine_with=[f"{second}:0.5"], progress=False)
    merged = [load_model(resolve(str(adapter))).merge_and_unload().state_dict() for adapter in (first, second)]
    mean = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    mean.load_state_dict({key: (merged[0][key] + merged[1][key]) / 2 for key in merged[0]})
    ids = probe_ids(load_tokenizer(str(base)))
    written = probe_logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), ids)
    return _max_diff(written, probe_logits(mean, ids)), _max_diff(written, _logits(first))


def test_cat_of_halves_merges_to_the_mean_of_the_two_merged_models(adapters, tiny_model_dir, tmp_path):
    # Ranks 4 and 8 on partly different layers: cat takes them as they are.
    to_mean, to_first = _mean_of_merged(tiny_model_dir, adapters["support"], adapters["wide"], tmp_path / "out")
    assert to_mean < 1e-4 and to_first > 1e-2


def test_cat_keeps_the_layers_an_adapter_after_the_first_trains_beyond_the_first_ones(tiny_model_dir, tmp_path):
    """The first adapter trains the last layer alone (lora.from_layer: PEFT's layers_to_transform), the second
    every layer: the combination keeps the second one's first layer."""
    top = _adapter(tiny_model_dir, tmp_path / "top", 6, target_modules=["q_proj"], layers_to_transform=[1])
    every = _adapter(tiny_model_dir, tmp_path / "every", 7, target_modules=["q_proj", "v_proj"])
    assert _mean_of_merged(tiny_model_dir, top, every, tmp_path / "out")[0] < 1e-4


def test_ties_combines_from_the_command_line(adapters, tmp_path, monkeypatch):
    from tuneforge.cli import main

    out = tmp_path / "ties"
    argv = ["tuneforge", "export", str(adapters["support"]), "--combine", f"{adapters['tools']}:0.7"]
    argv += ["--combination", "ties", "--density", "0.5", "--format", "adapter", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 0
    record = json.loads((out / EXPORT_RECORD).read_text())["combined"]
    assert (record["combination"], record["density"]) == ("ties", 0.5)
    combined = _logits(out)
    assert _max_diff(combined, _logits(adapters["support"])) > 1e-3
    assert _max_diff(combined, _logits(adapters["tools"])) > 1e-3


def test_adapters_on_different_bases_are_refused_before_any_weights_load(adapters, tmp_path):
    other_base = save_tiny_model(tmp_path / "other-base", seed=1)
    stranger = _adapter(other_base, tmp_path / "stranger", 4)
    with pytest.raises(TuneforgeError, match="combine only on the base they were both trained on") as err:
        export(adapters["support"], "merged", None, tmp_path / "out", combine_with=[str(stranger)])
    assert str(other_base) in err.value.message and not (tmp_path / "out").exists()


@pytest.mark.parametrize("weight", ["0,3", "abc", "inf"])
def test_a_weight_that_is_no_finite_number_after_an_adapter_is_refused_naming_the_weight(adapters, tmp_path, weight):
    """`runs/tools:0,3` (a decimal comma) names an adapter that exists and a weight that is no number: taken whole
    as a path, it was refused as no registry model, local path or hub id."""
    spec = f"{adapters['tools']}:{weight}"
    with pytest.raises(TuneforgeError, match="the weight after ':' must be a finite number") as err:
        export(adapters["support"], "merged", None, tmp_path / "out", combine_with=[spec])
    assert err.value.message.startswith(f"{spec}: ") and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("lora", "says"),
    [
        ({"use_dora": True}, "DoRA adapter"),
        ({"modules_to_save": ["lm_head"]}, "trains lm_head whole"),
        ({"trainable_token_indices": [3, 4]}, "trainable_token_indices"),
    ],
)
def test_what_peft_would_combine_wrongly_is_refused(adapters, tiny_model_dir, lora, says, tmp_path):
    odd = _adapter(tiny_model_dir, tmp_path / "odd", 5, **lora)
    with pytest.raises(TuneforgeError, match=says) as err:
        export(adapters["support"], "adapter", None, tmp_path / "out", combine_with=[str(odd)])
    assert "adapter_config.json" in err.value.message and "tuneforge serve --adapter" in err.value.message


def test_linear_refuses_adapters_of_different_ranks_naming_cat_and_svd(adapters, tmp_path):
    with pytest.raises(TuneforgeError, match="ranks are .*r=4.*r=8.*--combination cat"):
        export(
            adapters["support"],
            "adapter",
            None,
            tmp_path / "o",
            combine_with=[str(adapters["wide"])],
            combination="linear",
        )


def test_an_adapter_trained_with_another_chat_template_is_warned_of(adapters, tiny_model_dir, tmp_path, capsys):
    import shutil

    other = shutil.copytree(adapters["tools"], tmp_path / "tools-own-template")
    tokenizer = load_tokenizer(str(tiny_model_dir))
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(other)
    export(adapters["support"], "adapter", None, tmp_path / "out", combine_with=[str(other)])
    assert "trained with another chat template" in " ".join(capsys.readouterr().err.split())


def test_one_weighted_adapter_is_its_effect_scaled(adapters, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "half"
    export(f"{adapters['wide']}:0.5", "merged", "f32", out, progress=False)
    merged = load_model(resolve(str(adapters["wide"]))).merge_and_unload().state_dict()
    half = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base = half.state_dict()
    half.load_state_dict({key: (base[key] + merged[key]) / 2 for key in merged})
    ids = probe_ids(load_tokenizer(str(tiny_model_dir)))
    written = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert _max_diff(probe_logits(written, ids), probe_logits(half, ids)) < 1e-4


def test_a_gemma_gguf_of_a_combination_is_refused_where_any_adapter_trains_the_output_layer(tmp_path, monkeypatch):
    """Gemma's GGUF reads its output layer from the embeddings: an adapter combined in second place that
    trains lm_head is refused before the converter is fetched, as the first would be."""
    from families import FAMILIES, save_family_model

    from tuneforge.exporting import llama_cpp

    base = save_family_model(FAMILIES["gemma2"], tmp_path / "base")
    plain = _adapter(base, tmp_path / "plain", 1, target_modules=["q_proj"])
    head = _adapter(base, tmp_path / "head", 2, target_modules=["q_proj", "lm_head"])
    monkeypatch.setattr(llama_cpp, "converter_folder", lambda console: pytest.fail("fetched the converter"))
    with pytest.raises(TuneforgeError, match=f"the adapter \\({head}\\) trains lm_head"):
        export(plain, "gguf", None, tmp_path / "out", combine_with=[str(head)])
