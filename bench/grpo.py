"""Reinforcement fine-tuning (GRPO) on the demo task: the quickstart's SFT model samples triage
answers, the json_fields grader rewards the fields it gets right, and GRPO is scored against the
SFT model it started from on held-out test tickets.

    .venv/bin/python bench/grpo.py --home . --seeds 0 1 2     # after `tuneforge quickstart` in .

For each seed: `tuneforge train grpo_triage train.seed=SEED` in --home (where runs/quickstart is),
into runs/grpo-triage-seed-SEED (a finished run is reused); then the GRPO model and the SFT model
on the first --tickets test tickets (support_triage, greedy; all 300 by default), and the GRPO
model's general questions kept against the base model (the forgetting check). The recipe's settings
and the quickstart's own training time (the budget a GRPO run is held to) go into the result.
Writes bench/results/grpo-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from common import result_header, write_result

HERE = Path(__file__).resolve().parent


def train_seed(home: Path, seed: int) -> Path:
    run = home / "runs" / f"grpo-triage-seed-{seed}"
    if not (run / "summary.json").is_file():
        command = [sys.executable, "-m", "tuneforge", "train", "grpo_triage", f"train.seed={seed}", f"output_dir={run}"]
        command.append("--overwrite")  # an unfinished run starts over
        subprocess.run(command, cwd=home, check=True)
    return run


def recipe_settings() -> dict:
    """What the recipe trains with, as the result's table states it."""
    from tuneforge.recipes import load_recipe

    recipe = load_recipe("grpo_triage")
    grpo, train = recipe["grpo"], recipe["train"]
    keys = ("group_size", "temperature", "beta", "loss", "skip_uniform_groups")
    return {
        **{key: grpo.get(key) for key in keys},
        **{key: train[key] for key in ("max_steps", "batch_size", "learning_rate")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, default=Path("."), help="the folder holding runs/quickstart")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tickets", type=int, default=300)
    args = parser.parse_args()
    from tuneforge.eval.evaluate import evaluate
    from tuneforge.eval.forgetting import measure_forgetting

    home = args.home.resolve()
    sft, test = home / "runs" / "quickstart", home / "runs" / "quickstart" / "data" / "test.jsonl"
    load_before = os.getloadavg()[0]
    options = {"metric": "support_triage", "limit": args.tickets, "progress": False}
    sft_scores = evaluate(str(sft), str(test), **options)["scores"]
    forgetting_file = sft / "eval" / "forgetting.json"  # the quickstart's own check
    sft_forgetting = json.loads(forgetting_file.read_text()) if forgetting_file.is_file() else None
    sft_seconds = json.loads((sft / "summary.json").read_text())["metrics"]["elapsed"]
    seeds = []
    for seed in args.seeds:
        run = train_seed(home, seed)
        summary = json.loads((run / "summary.json").read_text())
        forgetting = measure_forgetting(str(run), base="smollm2-135m-instruct", progress=False)
        seeds.append(
            {
                "seed": seed,
                "train_seconds": summary["metrics"]["elapsed"],
                "final_reward": summary["metrics"]["reward"],
                "validation_exact": summary["metrics"].get("task_exact"),
                "test": evaluate(str(run), str(test), **options)["scores"],
                "general_questions_kept": forgetting["general_questions"]["retained"],
            }
        )
    result = {
        **result_header("grpo", "python bench/grpo.py " + " ".join(sys.argv[1:]), load_before),
        "recipe": "src/tuneforge/recipes/grpo_triage.yaml",
        "settings": recipe_settings(),
        "sft_train_seconds": sft_seconds,
        "tickets": args.tickets,
        "sft_test": sft_scores,
        "sft_general_questions_kept": sft_forgetting["general_questions"]["retained"] if sft_forgetting else None,
        "seeds": seeds,
    }
    print(f"wrote {write_result(result)}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
