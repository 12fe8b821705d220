"""Exports hold what vLLM's loaders read (vLLM itself needs a GPU, so the files are checked, not served).

A merged export is what `vllm serve FOLDER` loads: config.json naming the architecture, safetensors
with Hugging Face's tensor names, the tokenizer with its chat template, and a generation config
whose EOS ids include the end-of-turn token (vLLM stops there by default). An adapter export is
what `--lora-modules NAME=FOLDER` loads: adapter_config.json with the fields vLLM's PEFT reader
requires, and adapter_model.safetensors with PEFT's tensor names."""

import json
import re

import pytest
from conftest import tiny_run_config
from safetensors import safe_open

from tuneforge.exporting import export
from tuneforge.models import load_tokenizer
from tuneforge.models.architecture import end_of_turn_token
from tuneforge.training import train

pytestmark = pytest.mark.usefixtures("one_thread")

HF_TENSOR_NAME = re.compile(r"^(model\.(embed_tokens|norm|layers\.\d+\.[a-z_.]+)|lm_head)\.weight$")
PEFT_TENSOR_NAME = re.compile(r"^base_model\.model\.model\.layers\.\d+\.[a-z_]+\.[a-z_]+\.lora_[AB]\.weight$")


@pytest.fixture(scope="module")
def run(tiny_model_dir, triage_data, tmp_path_factory):
    """A finished LoRA run on the tiny model, as `tuneforge train` leaves it."""
    out = tmp_path_factory.mktemp("vllm") / "run"
    train(tiny_run_config(tiny_model_dir, triage_data, out, max_steps=2), progress=False)
    return out


def tensor_names(path) -> set[str]:
    with safe_open(path, "pt") as weights:
        return set(weights.keys())


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_a_merged_export_has_what_vllm_serve_loads(run, tmp_path, dtype):
    out = export(run, "merged", dtype, tmp_path / "merged", progress=False).out

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["dtype"] == {"f16": "float16", "bf16": "bfloat16"}[dtype]
    names = set().union(*(tensor_names(p) for p in out.glob("*.safetensors")))
    assert names and all(HF_TENSOR_NAME.match(n) for n in names), sorted(names)[:5]
    assert {"model.embed_tokens.weight", "model.norm.weight", "model.layers.0.self_attn.q_proj.weight"} <= names

    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(str(out))
    assert tokenizer.chat_template  # vLLM's chat endpoint renders with it
    generation = json.loads((out / "generation_config.json").read_text())
    eos = generation["eos_token_id"]
    assert tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer)) in (eos if isinstance(eos, list) else [eos])


def test_an_adapter_export_has_what_vllm_lora_modules_loads(run, tiny_model_dir, tmp_path):
    out = export(run, "adapter", None, tmp_path / "adapter", progress=False).out

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert isinstance(config["r"], int) and config["r"] <= 16  # within vLLM's default --max-lora-rank
    assert isinstance(config["lora_alpha"], int | float)
    assert config["target_modules"]
    assert config["base_model_name_or_path"]
    # vLLM refuses adapters that train biases, carry DoRA magnitudes or whole extra modules.
    assert config.get("bias", "none") == "none"
    assert not config.get("use_dora")
    assert not config.get("modules_to_save")

    names = tensor_names(out / "adapter_model.safetensors")
    assert names and all(PEFT_TENSOR_NAME.match(n) for n in names), sorted(names)[:5]
    # Module names or full paths (tuneforge targets chosen layers): vLLM matches the last part.
    assert {n.split(".")[-3] for n in names} <= {t.split(".")[-1] for t in config["target_modules"]}
