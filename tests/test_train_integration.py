"""The training loop on the real bundled SmolLM2: a LoRA run and a full run finish and load."""

import pytest
from conftest import tiny_run_config

from tuneforge.training import train

pytestmark = pytest.mark.integration


def short_run(smollm2_dir, triage_data, out, method):
    cfg = tiny_run_config(smollm2_dir, triage_data, out, max_steps=2, batch_size=4, keep_checkpoints=1)
    cfg["method"] = method
    cfg["data"]["max_length"] = 384
    return train(cfg, progress=False)


def test_lora_on_smollm2_learns_and_the_adapter_loads_with_plain_peft(smollm2_dir, triage_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = short_run(smollm2_dir, triage_data, tmp_path / "lora", "lora")
    assert result.status == "completed" and result.steps == 2
    assert 0 < result.metrics["full_valid_loss"] < 10
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_dir), result.final_dir)
    tok = AutoTokenizer.from_pretrained(result.final_dir)
    assert tok.convert_ids_to_tokens(model.generation_config.eos_token_id) == "<|im_end|>"


def test_full_fine_tuning_on_smollm2_saves_a_transformers_model(smollm2_dir, triage_data, tmp_path):
    from transformers import AutoModelForCausalLM

    result = short_run(smollm2_dir, triage_data, tmp_path / "full", "full")
    model = AutoModelForCausalLM.from_pretrained(result.final_dir)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
