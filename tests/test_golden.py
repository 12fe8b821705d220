"""Pinned losses: the first steps of a tiny run for each method, as numbers.

The equivalence tests (accumulation, processes, packing, resume) compare two runs of the same
code, so a change that moves both sides alike (a masking or rendering change, a new default)
passes them. These pin the per-step training losses themselves. A deliberate change to what a
run computes updates the numbers here, and the commit says why.
"""

import json
from pathlib import Path

import pytest
from conftest import tiny_run_config
from tiny_sharp import save_sharp_tiny_model

from tuneforge.training import train

pytestmark = pytest.mark.usefixtures("one_thread")

PINNED = {
    "lora": [6.07098766208924, 5.942538114892184, 5.806705729166667, 5.780657087053571],
    "lora_kl_replay_neftune": [2.463981460369631, 3.685599902628462, 3.3897785932451536, 1.2381106938157127],
    "distill": [6.07098766208924, 5.945781697481469, 5.8105557528409095, 5.784316025771104],
    "dpo": [0.6931471824645996, 0.46741998195648193, 0.30344125628471375, 0.2737913429737091],
}


def step_losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row["train_loss"] for row in rows if "train_loss" in row]


def golden_config(name: str, model_dir, data, out, tmp_path) -> dict:
    cfg = tiny_run_config(model_dir, data, out, max_steps=4, batch_size=4, learning_rate=1e-2, seed=7)
    cfg["lora"]["dropout"] = 0.0
    if name == "lora_kl_replay_neftune":
        cfg["data"]["general_mix"] = 0.2
        cfg["train"].update(replay_loss="kl_to_base", neftune_alpha=5.0)
    elif name == "distill":
        cfg["method"] = "distill"
        cfg["distill"] = {"teacher": str(save_sharp_tiny_model(tmp_path / "teacher")), "student": "lora"}
    elif name == "dpo":
        from test_dpo import preference_rows

        cfg["method"] = "dpo"
        for split in ("train", "validation"):
            pairs = tmp_path / f"pairs-{split}.jsonl"
            pairs.write_text("".join(json.dumps(r) + "\n" for r in preference_rows(Path(data[split]))))
            cfg["data"][split] = str(pairs)
    return cfg


@pytest.mark.parametrize("name", list(PINNED))
def test_the_first_steps_of_each_method_give_the_pinned_losses(
    name, tiny_model_dir, triage_data, tmp_path, monkeypatch
):
    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path / "home"))
    cfg = golden_config(name, tiny_model_dir, triage_data, tmp_path / "run", tmp_path)
    train(cfg, progress=False)
    losses = step_losses(tmp_path / "run")
    assert losses == pytest.approx(PINNED[name], rel=1e-5)
