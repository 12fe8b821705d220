"""Preference tuning (DPO) on the demo task: SmolLM2-135M-Instruct learns to prefer answers in the
house format (one line of JSON) over chatty or malformed ones, with LoRA, against its own
adapter-disabled self as the reference.

    OMP_NUM_THREADS=1 .venv/bin/python bench/dpo.py
    OMP_NUM_THREADS=1 .venv/bin/python bench/dpo.py --steps 2 --out /tmp/dpo-try   # a quick try

Phases (into bench/.work/dpo/, a finished run is reused):
  data     support-triage tickets -> preference pairs: chosen = the reference JSON answer,
           rejected = the same labels said another way (prose, JSON wrapped in chat or a code
           fence, malformed JSON); training pairs from the training templates, held-out pairs
           from the test split (phrasings training never saw)
  train    `method: dpo`, LoRA on the upper half of the layers (the quickstart's recipe)
  measure  on the held-out pairs, before (the reference) and after (the policy): the share of pairs
           whose chosen reply has the higher reward (policy-vs-reference log-ratio) and the share
           where plain log p(chosen) > log p(rejected); the share of valid JSON answers when
           generating greedily on held-out tickets; writes bench/results/dpo-<date>.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work" / "dpo"


@dataclass(frozen=True)
class Setup:
    train_pairs: int = 200
    heldout_pairs: int = 50
    generation_tickets: int = 30
    steps: int = 30
    batch_size: int = 3  # pairs per step (packing off: one pair per row); 30 x 3 pairs: about 9 minutes on one thread
    learning_rate: float = 2e-4  # 1e-3 drove the loss to 0 by step 14 and the answers into degenerate JSON
    beta: float = 0.1
    lora_r: int = 16
    lora_from_layer: float = 0.5
    max_length: int = 512
    max_new_tokens: int = 40
    seed: int = 0


def rejected_reply(labels: dict[str, str], rng: random.Random) -> tuple[str, str]:
    """A reply with the right labels in the wrong form: (style, text)."""
    from tuneforge.tasks.support_triage import format_answer

    answer = format_answer(labels)
    category, priority, product = (labels[k].replace("_", " ") for k in ("category", "priority", "product"))
    styles = {
        "prose": f"Thanks for reaching out to Nimbus Cloud support! This looks like a {category} issue with "
        f"your {product}, and I would treat it as {priority} priority. We'll be in touch soon.",
        "wrapped": f"Sure! Here is the triage for this ticket:\n{answer}\nLet me know if you need anything else.",
        "code_fence": f"```json\n{answer}\n```",
        "unquoted": "{" + ", ".join(f"{k}: {v}" for k, v in labels.items()) + "}",
        "python_dict": str(dict(labels)),
    }
    style = rng.choice(sorted(styles))
    return style, styles[style]


def write_pairs(chat_file: Path, out: Path, seed: int) -> dict[str, int]:
    """The chat rows of `chat_file` as preference rows; returns how many of each rejected style."""
    from tuneforge.tasks.support_triage import parse_answer

    rng = random.Random(f"dpo/{seed}/{chat_file.name}")
    styles: dict[str, int] = {}
    with out.open("w") as f:
        for line in chat_file.read_text().splitlines():
            messages = json.loads(line)["messages"]
            style, rejected = rejected_reply(parse_answer(messages[-1]["content"]), rng)
            styles[style] = styles.get(style, 0) + 1
            f.write(
                json.dumps(
                    {
                        "prompt": messages[:-1],
                        "chosen": [messages[-1]],
                        "rejected": [{"role": "assistant", "content": rejected}],
                    }
                )
                + "\n"
            )
    return styles


def prepare_data(setup: Setup, work: Path) -> dict:
    from tuneforge.tasks import support_triage

    chats = support_triage.generate(
        work / "tickets", n_train=setup.train_pairs, n_valid=0, n_test=setup.heldout_pairs, seed=setup.seed
    )
    pairs = {"train": work / "train_pairs.jsonl", "heldout": work / "heldout_pairs.jsonl"}
    styles = {
        name: write_pairs(chats[split], pairs[name], setup.seed)
        for name, split in (("train", "train"), ("heldout", "test"))
    }
    return {"tickets": chats, "pairs": pairs, "rejected_styles": styles}


def train_config(setup: Setup, data: dict, out: Path) -> dict:
    from tuneforge.config import DEFAULT_MODEL

    return {
        "base_model": DEFAULT_MODEL,
        "method": "dpo",
        "dpo": {"beta": setup.beta, "loss": "sigmoid", "policy": "lora"},
        "lora": {
            "r": setup.lora_r,
            "alpha": 2 * setup.lora_r,
            "dropout": 0.0,
            "target_modules": "all-linear",
            "from_layer": setup.lora_from_layer,
        },
        "data": {
            "train": str(data["pairs"]["train"]),
            "validation": None,
            "max_length": setup.max_length,
            "packing": False,
        },
        "train": {
            "max_steps": setup.steps,
            "batch_size": setup.batch_size,
            "learning_rate": setup.learning_rate,
            "warmup": 0.1,
            "scheduler": "cosine",
            "precision": "fp32",
            "eval_every": 0,
            "save_every": 0,
            "seed": setup.seed,
        },
        "output_dir": str(out),
    }


def pair_figures(model, tokenizer, pairs_file: Path) -> dict:
    """Held-out pairs under the policy (adapter on) and the reference (adapter off)."""
    import torch

    from tuneforge.data import Preference, collate, read_conversations, render_preference
    from tuneforge.methods import dpo
    from tuneforge.models import causal_lm

    pairs = [render_preference(p, tokenizer) for _, p in read_conversations(pairs_file) if isinstance(p, Preference)]
    objective = dpo.DPOObjective(model, beta=1.0, loss="sigmoid").eval()
    policy, reference, tokens = [], [], []
    with torch.no_grad():
        for start in range(0, len(pairs), 8):
            batch = collate(dpo.rows(pairs[start : start + 8]), tokenizer.pad_token_id)
            policy.append(dpo.sequence_logps(causal_lm(model), **batch))
            reference.append(objective.reference_logps(**batch))
            tokens.append(torch.bincount(dpo.example_ids(batch["labels"], batch["position_ids"])))
    policy, reference, tokens = torch.cat(policy), torch.cat(reference), torch.cat(tokens)
    margin = (policy - reference)[0::2] - (policy - reference)[1::2]

    def prefers_chosen(logps):
        return float((logps[0::2] > logps[1::2]).float().mean())

    return {
        "pairs": len(pairs),
        "reward_accuracy_after": float((margin > 0).float().mean()),
        "mean_log_ratio_margin_after": float(margin.mean()),
        "logp_chosen_gt_rejected_before": prefers_chosen(reference),
        "logp_chosen_gt_rejected_after": prefers_chosen(policy),
        # Summed log-probabilities favour the shorter reply (the JSON, mostly); per token they do not.
        "logp_per_token_chosen_gt_rejected_before": prefers_chosen(reference / tokens),
        "logp_per_token_chosen_gt_rejected_after": prefers_chosen(policy / tokens),
        "mean_logp_chosen": {"before": float(reference[0::2].mean()), "after": float(policy[0::2].mean())},
        "mean_logp_rejected": {"before": float(reference[1::2].mean()), "after": float(policy[1::2].mean())},
    }


def generation_scores(model, tokenizer, setup: Setup, tickets: Path) -> dict:
    from tuneforge.eval.evaluate import evaluate_loaded, read_eval_examples

    examples = read_eval_examples(tickets, setup.generation_tickets)
    result = evaluate_loaded(model, tokenizer, examples, max_new_tokens=setup.max_new_tokens, progress=False)
    return {
        "scores": result["scores"],
        "usage": result["usage"],
        "seconds": result["seconds"],
        "samples": [{"prediction": s["prediction"], "reference": s["reference"]} for s in result["samples"][:5]],
    }


def training_figures(run: Path) -> dict:
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "train_loss" in s]
    keys = ("train_loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
    window = max(1, len(steps) // 5)  # the first and last fifth of the run: single steps of 4 pairs are noisy

    def mean(rows, key):
        return sum(r[key] for r in rows) / len(rows)

    return {
        "steps": len(steps),
        "seconds": steps[-1]["elapsed"],
        "seconds_per_step": steps[-1]["elapsed"] / len(steps),
        "window_steps": window,
        "first": {k: mean(steps[:window], k) for k in keys},
        "last": {k: mean(steps[-window:], k) for k in keys},
    }


def measure(setup: Setup, data: dict, run: Path) -> dict:
    from tuneforge.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(run / "final"))
    tuned = load_model(str(run / "final")).eval()
    pairs = pair_figures(tuned, tokenizer, data["pairs"]["heldout"])
    print(f"held-out pairs: {pairs}", flush=True)
    tickets = data["tickets"]["test"]
    with tuned.disable_adapter():
        before = generation_scores(tuned, tokenizer, setup, tickets)
    print(f"generation before: {before['scores']}", flush=True)
    after = generation_scores(tuned.merge_and_unload(), tokenizer, setup, tickets)
    print(f"generation after: {after['scores']}", flush=True)
    return {"heldout_pairs": pairs, "generation": {"before": before, "after": after}}


def main() -> None:
    from common import result_header, write_result
    from distill import train_once  # a finished run folder is reused

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=Setup.steps)
    parser.add_argument("--out", type=Path, default=WORK, help="working folder (data, run)")
    args = parser.parse_args()
    setup = Setup(steps=args.steps)
    args.out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    data = prepare_data(setup, args.out)
    run = train_once(train_config(setup, data, args.out / "run"))
    figures = measure(setup, data, run)
    result = {
        **result_header("dpo", "OMP_NUM_THREADS=1 .venv/bin/python bench/dpo.py", load_before),
        "setup": asdict(setup),
        "rejected_styles": data["rejected_styles"],
        "training": training_figures(run),
        **figures,
    }
    if args.out != WORK:
        print(json.dumps(result, indent=2))
        return
    print(f"wrote {write_result(result)}")


if __name__ == "__main__":
    main()
