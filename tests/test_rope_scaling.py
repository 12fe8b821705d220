"""model.rope_scaling: training past the base's window, and the scaling kept with what the run saves."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_config
from families import FAMILIES, family_tokenizer
from tiny import save_tiny_model, set_context

from tuneforge.dry_run import validate
from tuneforge.errors import ConfigError
from tuneforge.exporting import export
from tuneforge.models import load_model, model_context_length, resolve
from tuneforge.models.loading import scale_rope
from tuneforge.training import train

WINDOW = 128  # the base's positions: rows of twice as many need the scaling
YARN = {"rope_type": "yarn", "factor": 2.0}


@pytest.fixture(scope="module")
def short_base(tmp_path_factory) -> Path:
    """The tiny model, built for WINDOW positions."""
    folder = set_context(save_tiny_model(tmp_path_factory.mktemp("short") / "model"), WINDOW)
    return folder


@pytest.fixture(scope="module")
def long_chats(tmp_path_factory) -> dict:
    """Chats of about 200 tokens: past the base's window, within twice it."""
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
    folder = tmp_path_factory.mktemp("long")

    def write(name: str, n: int) -> str:
        rows = [
            {
                "messages": [
                    {"role": "user", "content": " ".join(rng.choice(words) for _ in range(28))},
                    {"role": "assistant", "content": " ".join(rng.choice(words) for _ in range(6))},
                ]
            }
            for _ in range(n)
        ]
        (folder / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
        return str(folder / name)

    return {"train": write("train.jsonl", 16), "validation": write("valid.jsonl", 4)}


def long_run_config(base: Path, data: dict, out: Path) -> dict:
    cfg = tiny_run_config(base, data, out, max_steps=2, batch_size=4)
    cfg["data"].update(max_length=2 * WINDOW, packing=False)
    cfg["model"] = {"rope_scaling": {"type": "yarn", "factor": 2}}
    return cfg


@pytest.fixture(scope="module")
def long_run(short_base, long_chats, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "long"
    train(long_run_config(short_base, long_chats, out), progress=False)
    return out


def test_a_max_length_past_the_window_is_refused_without_rope_scaling_and_runs_with_it(
    short_base, long_chats, tmp_path, capsys
):
    cfg = long_run_config(short_base, long_chats, tmp_path / "run")
    without = {**cfg, "model": {}}
    with pytest.raises(ConfigError, match=r"256 tokens is more than the 128 positions .* model\.rope_scaling"):
        validate(without)
    capsys.readouterr()
    assert validate(cfg) == 0
    assert "256 positions: model's 128 stretched 2x" in capsys.readouterr().out
    cfg["data"]["max_length"] = 4 * WINDOW
    with pytest.raises(ConfigError, match=r"512 tokens is more than the 256 positions model\.rope_scaling stretches"):
        validate(cfg)


def test_a_lora_run_past_the_window_trains_and_its_model_loads_with_the_scaling(long_run):
    model = load_model(resolve(str(long_run / "final")))
    assert model_context_length(model) == 2 * WINDOW
    rope = model.get_base_model().config.rope_parameters
    assert (rope["rope_type"], rope["factor"], rope["original_max_position_embeddings"]) == ("yarn", 2.0, WINDOW)


def test_a_merged_export_saves_the_scaling_and_the_gguf_writes_llama_cpp_s_keys(long_run, tmp_path):
    from gguf import GGUFReader

    merged = export(long_run, "merged", "f32", tmp_path / "merged", progress=False)
    config = json.loads((merged.out / "config.json").read_text())
    assert config["max_position_embeddings"] == 2 * WINDOW
    assert {k: config["rope_parameters"][k] for k in ("rope_type", "factor")} == YARN
    result = export(long_run, "gguf", "f16", tmp_path / "gguf", progress=False)  # its round-trip check passes
    fields = GGUFReader(result.files[0]).fields
    assert fields["llama.rope.scaling.type"].contents() == "yarn"
    assert fields["llama.rope.scaling.factor"].contents() == 2.0
    assert fields["llama.rope.scaling.original_context_length"].contents() == WINDOW
    assert fields["llama.context_length"].contents() == 2 * WINDOW


def test_the_scaling_changes_what_the_model_computes_past_the_old_window(short_base):
    ids = torch.randint(3, 200, (1, 2 * WINDOW), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = load_model(resolve(str(short_base))).eval()(ids).logits
        scaled = load_model(resolve(str(short_base)), rope_scaling={"rope_type": "linear", "factor": 2.0})
        stretched = scaled.eval()(ids).logits
    assert model_context_length(scaled) == 2 * WINDOW
    # Position 0 turns by no angle either way; past the window every position now turns half as far.
    assert torch.allclose(plain[0, 0], stretched[0, 0], atol=1e-6)
    assert (plain[0, WINDOW:] - stretched[0, WINDOW:]).abs().amax(-1).min() > 1e-4


@pytest.mark.parametrize("name", [n for n in FAMILIES if n != "phi3"])
def test_every_rotary_family_takes_the_scaling_and_gemma_3_scales_its_global_layers(name, tmp_path):
    config = FAMILIES[name].build_config(family_tokenizer(FAMILIES[name], tmp_path))
    window = config.max_position_embeddings
    scale_rope(config, dict(YARN), name)
    assert config.max_position_embeddings == 2 * window
    rope = config.rope_parameters
    if name == "gemma3":  # the sliding-window layers keep their base, as Gemma 3's own long releases do
        assert rope["sliding_attention"]["rope_type"] == "default"
        rope = rope["full_attention"]
    assert (rope["rope_type"], rope["factor"], rope["original_max_position_embeddings"]) == ("yarn", 2.0, window)


def test_a_base_that_scales_already_or_has_no_rotary_positions_or_takes_only_its_own_kind_is_refused(tmp_path):
    from transformers import GPT2Config, LlamaConfig

    llama31 = LlamaConfig(
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        max_position_embeddings=131072,
    )
    with pytest.raises(ConfigError, match=r"llama-3\.1 already scales its rotary positions .*'llama3'"):
        scale_rope(llama31, dict(YARN), "llama-3.1")
    with pytest.raises(ConfigError, match=r"gpt2-small \(gpt2\) has no rotary position embeddings"):
        scale_rope(GPT2Config(), dict(YARN), "gpt2-small")
    phi3 = FAMILIES["phi3"].build_config(family_tokenizer(FAMILIES["phi3"], tmp_path))
    with pytest.raises(ConfigError, match=r"phi3 config takes no rope_type yarn"):
        scale_rope(phi3, dict(YARN), "phi-3")


def test_rope_scaling_takes_type_or_rope_type_and_refuses_dynamic_and_a_factor_of_one(short_base, tmp_path):
    from tuneforge.config import RopeScaling

    assert RopeScaling.model_validate({"type": "linear", "factor": 4}).parameters() == {
        "rope_type": "linear",
        "factor": 4.0,
    }
    with pytest.raises(ValueError, match="dynamic .* use yarn"):
        RopeScaling.model_validate({"type": "dynamic", "factor": 2})
    with pytest.raises(ValueError, match="greater than 1"):
        RopeScaling.model_validate({"rope_type": "yarn", "factor": 1})


def test_serve_runs_a_lora_run_on_its_scaled_base_and_answers_a_prompt_past_the_old_window(
    long_run, short_base, tmp_path
):
    from fastapi.testclient import TestClient
    from peft import LoraConfig, get_peft_model

    from tuneforge.serve import AdapterPool, Engine, create_app

    engine = Engine(AdapterPool(str(long_run)), max_batch=2)
    try:
        assert model_context_length(engine.pool.model) == 2 * WINDOW
        prompt = " ".join(["alpha beta gamma"] * 14)  # past the base's 128 positions, within 256
        with TestClient(create_app(engine)) as client:
            body = {"model": "long", "prompt": prompt, "max_tokens": 4}
            answer = client.post("/v1/completions", json=body).json()
            assert "usage" in answer, answer
            assert WINDOW < answer["usage"]["prompt_tokens"] < 2 * WINDOW - 4, answer
            too_long = client.post("/v1/completions", json={**body, "prompt": prompt * 2}).json()
            assert too_long["error"]["code"] == "context_length_exceeded"
    finally:
        engine.close()
    # The base in memory is shared: an adapter trained on unscaled positions cannot sit beside it.
    plain = tmp_path / "plain"
    get_peft_model(load_model(str(short_base)), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(plain)
    with pytest.raises(ConfigError, match=r"Adapter 'plain' .* trained with model\.rope_scaling None, but the server"):
        AdapterPool(str(long_run), {"plain": str(plain)})


def test_an_adapter_export_of_a_scaled_run_passes_its_check_and_records_the_scaling(long_run, tmp_path):
    result = export(long_run, "adapter", None, tmp_path / "adapter", progress=False)
    assert result.checks  # checked against the base loaded with the scaling, as its user loads it
    recorded = json.loads((result.out / "export.json").read_text())["source"]["rope_scaling"]
    assert recorded == YARN


def test_models_info_of_a_scaled_lora_run_gives_the_window_it_trained_for(long_run):
    from tuneforge.models import model_info

    assert model_info(str(long_run / "final"))["context_length"] == 2 * WINDOW


def test_a_run_that_goes_on_training_a_scaled_run_s_adapter_keeps_its_scaling(long_run, long_chats, tmp_path):
    cfg = long_run_config(long_run, long_chats, tmp_path / "more")
    del cfg["model"]  # the earlier run's adapter loads with its scaling; this run names none
    cfg["train"]["max_steps"] = 1
    train(cfg, progress=False)
    assert model_context_length(load_model(resolve(str(tmp_path / "more" / "final")))) == 2 * WINDOW


def test_models_info_refuses_a_bad_rope_scaling_in_a_run_s_config_naming_the_file_and_key(short_base, tmp_path):
    from test_serve import random_adapter

    from tuneforge.errors import ModelSourceError
    from tuneforge.models import model_info

    random_adapter(short_base, tmp_path / "run" / "final", seed=1)
    config = tmp_path / "run" / "config.yaml"
    config.write_text(f"base_model: {short_base}\nmodel:\n  rope_scaling: {{type: yarn, factor: 0.5}}\n")
    with pytest.raises(
        ModelSourceError, match=rf"^{config}: model.rope_scaling.factor: must be more than 1 \(got 0.5\)"
    ):
        model_info(str(tmp_path / "run" / "final"))
