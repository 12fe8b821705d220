"""The training loop on the real bundled SmolLM2: a LoRA run and a full run finish and load."""

import pytest
from conftest import tiny_run_config

from tuneforge.training import train

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def few_valid_rows_data(tmp_path_factory) -> dict:
    """The demo task with 4 validation rows: the 135M model's validation costs seconds a row on a CPU."""
    from tuneforge.tasks.support_triage import generate

    return generate(tmp_path_factory.mktemp("triage-few-valid"), n_train=96, n_valid=4, n_test=1, seed=1)


def short_run_config(smollm2_dir, data, out, method, *, steps: int):
    # One packed row a step: a step of the real model on a CPU takes seconds for each row of 384 tokens.
    cfg = tiny_run_config(smollm2_dir, data, out, max_steps=steps, batch_size=1, keep_checkpoints=1)
    cfg["method"] = method
    cfg["data"]["max_length"] = 384
    return cfg


def test_lora_on_smollm2_learns_and_the_adapter_loads_with_plain_peft(smollm2_dir, few_valid_rows_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = short_run_config(smollm2_dir, few_valid_rows_data, tmp_path / "lora", "lora", steps=2)
    result = train(cfg, progress=False)
    assert result.status == "completed" and result.steps == 2
    assert 0 < result.metrics["full_valid_loss"] < 10
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_dir), result.final_dir)
    tok = AutoTokenizer.from_pretrained(result.final_dir)
    assert tok.convert_ids_to_tokens(model.generation_config.eos_token_id) == "<|im_end|>"


def test_full_fine_tuning_on_smollm2_saves_a_transformers_model(smollm2_dir, few_valid_rows_data, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = short_run_config(smollm2_dir, few_valid_rows_data, tmp_path / "full", "full", steps=1)
    cfg["data"]["validation"] = None  # what is asserted is the saved model; the LoRA test checks validation
    result = train(cfg, progress=False)
    model = AutoModelForCausalLM.from_pretrained(result.final_dir)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
