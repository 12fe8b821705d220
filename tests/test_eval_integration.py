"""`evaluate` on the real bundled model (SmolLM2-135M-Instruct) and a few triage tickets."""

import math

import pytest

from tuneforge.eval import evaluate

pytestmark = pytest.mark.integration


def test_evaluate_smollm2_on_triage_tickets(smollm2_dir, triage_data):
    result = evaluate(
        "smollm2-135m-instruct",
        triage_data["test"],
        metric="support_triage",
        limit=4,
        max_new_tokens=40,
        batch_size=4,
        progress=False,
    )
    assert result["model"] == "smollm2-135m-instruct" and result["metric"] == "support_triage"
    assert result["n"] == 4 and len(result["samples"]) == 4
    # The base model has never seen the house format: the answers are far from the reference.
    assert 0.5 < result["loss"] < 10 and math.isclose(result["perplexity"], math.exp(result["loss"]))
    assert result["tokens"] >= 4 * 18  # each reference is about 20 tokens with its end of turn
    assert 0 <= result["scores"]["exact"] <= result["scores"]["valid_json"] + 1e-9
    for sample in result["samples"]:
        assert sample["prediction"].strip()
        assert sample["finish_reason"] in ("stop", "length")
    assert result["usage"]["completion_tokens"] <= 4 * 40
