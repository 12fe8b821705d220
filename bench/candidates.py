"""One benchmark candidate, run in its own process under the turn protocol of `turns.py`.

    python bench/candidates.py SPEC.json

SPEC holds: kind (tuneforge | hf_trainer | trl_sft | probe), name, model (an HF folder), train
(OpenAI chat JSONL), out (a folder for the run and the adapter), batch (sequences, or packed rows
for packed candidates), lr, seed, lora {r, alpha, dropout}, and per kind: packing, precision,
overrides (tuneforge), bf16 (hf_trainer, trl_sft). Writes the adapter to OUT/adapter and reports
per-step times and real-token counts to the parent; the last message carries the peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common import peak_rss_mib, read_jsonl, tokenize_chat  # noqa: E402
from turns import Turns  # noqa: E402

TURNS = Turns()


def peft_lora(spec):
    from peft import LoraConfig

    lc = spec["lora"]
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=lc["r"],
        lora_alpha=lc["alpha"],
        lora_dropout=lc["dropout"],
        target_modules="all-linear",
    )


# --- tuneforge -------------------------------------------------------------------------------------


def run_tuneforge(spec) -> dict:
    """`tuneforge.train` as a user calls it; its progress bar is swapped for the turn hook."""
    import tuneforge
    from tuneforge.training import loop

    class TurnProgress:
        def __init__(self, total_steps, start_step, *, enabled):
            self.total, self.tokens = total_steps, 0

        def __enter__(self):
            TURNS.send("ready")
            TURNS.wait()
            return self

        def __exit__(self, *exc):
            return False

        def update(self, record):
            seconds = TURNS.elapsed()
            tokens, self.tokens = record["tokens"] - self.tokens, record["tokens"]
            TURNS.send(
                "step",
                step=record["step"],
                seconds=seconds,
                tokens=tokens,
                loss=record.get("train_loss"),
                own_tokens_per_s=record.get("tokens_per_s"),
                last=record["step"] == self.total,
            )
            TURNS.wait()

        def summary(self, metrics, output_dir):  # what tuneforge before 2026-12 calls at the end (--before)
            pass

    loop.TrainProgress = TurnProgress
    lc = spec["lora"]
    cfg = {
        "base_model": spec["model"],
        "method": "lora",
        "lora": {"r": lc["r"], "alpha": lc["alpha"], "dropout": lc["dropout"], "target_modules": "all-linear"},
        "data": {
            "train": spec["train"],
            "validation": None,
            "packing": spec["packing"],
            "max_length": 1024,
            "dedup": "none",
        },
        "train": {
            "epochs": 1,
            "batch_size": spec["batch"],
            "learning_rate": spec["lr"],
            "scheduler": "cosine",
            "warmup": 0,
            "precision": spec.get("precision", "auto"),
            "seed": spec["seed"],
            "eval_every": 0,
            "save_every": 0,
        },
        "output_dir": str(Path(spec["out"]) / "run"),
    }
    for key, value in spec.get("overrides", {}).items():  # dotted keys, e.g. lora.dropout
        section, _, leaf = key.rpartition(".")
        node = cfg
        for part in section.split(".") if section else []:
            node = node.setdefault(part, {})
        node[leaf] = value
    result = tuneforge.train(cfg, overwrite=True, progress=False)
    summary = json.loads((Path(cfg["output_dir"]) / "summary.json").read_text())
    return {"adapter": str(result.final_dir), "precision": summary.get("precision"), "steps": result.steps}


# --- Hugging Face Trainer + PEFT, and TRL ----------------------------------------------------------


def turn_callback():
    from transformers import TrainerCallback

    class TurnCallback(TrainerCallback):
        def __init__(self):
            self.trainer = None
            self.reported = 0

        def on_train_begin(self, args, state, control, **kw):
            TURNS.send("ready")
            TURNS.wait()

        def on_step_end(self, args, state, control, **kw):
            seconds = TURNS.elapsed()
            tokens = self.trainer.bench_tokens - self.reported
            self.reported = self.trainer.bench_tokens
            TURNS.send(
                "step",
                step=state.global_step,
                seconds=seconds,
                tokens=tokens,
                last=state.global_step == state.max_steps,
            )
            TURNS.wait()

    return TurnCallback()


def counting(trainer_cls):
    """A trainer that counts the real (non-padding) tokens of every micro-batch it trains on."""

    class Counting(trainer_cls):
        bench_tokens = 0

        def training_step(self, model, inputs, num_items_in_batch=None):
            if "attention_mask" in inputs:
                self.bench_tokens += int(inputs["attention_mask"].sum())
            else:  # padding-free: one flattened row and, on CPU, no padding at all
                self.bench_tokens += int(inputs["input_ids"].numel())
            return super().training_step(model, inputs, num_items_in_batch)

    return Counting


def common_args(spec) -> dict:
    return dict(
        output_dir=str(Path(spec["out"]) / "run"),
        per_device_train_batch_size=spec["batch"],
        num_train_epochs=1,
        learning_rate=spec["lr"],
        lr_scheduler_type="cosine",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=spec["seed"],
        data_seed=spec["seed"],
        dataloader_num_workers=0,
        use_cpu=True,
        bf16=spec.get("bf16", False),
        fp16=False,
        disable_tqdm=True,
    )


def run_hf_trainer(spec) -> dict:
    """What Axolotl and LLaMA-Factory run underneath without packing: Trainer + PEFT, the prompt
    masked in the labels, DataCollatorForSeq2Seq padding each batch to its longest row."""
    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    tok = AutoTokenizer.from_pretrained(spec["model"])
    rows = tokenize_chat(read_jsonl(spec["train"]), tok)
    data = Dataset.from_list(
        [{"input_ids": r.input_ids, "attention_mask": [1] * len(r.input_ids), "labels": r.hf_labels()} for r in rows]
    )
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    model = get_peft_model(model, peft_lora(spec))
    callback = turn_callback()
    trainer = counting(Trainer)(
        model=model,
        args=TrainingArguments(**common_args(spec)),
        train_dataset=data,
        data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100),
        callbacks=[callback],
    )
    callback.trainer = trainer
    trainer.train()
    adapter = Path(spec["out"]) / "adapter"
    model.save_pretrained(adapter)
    return {"adapter": str(adapter), "steps": trainer.state.global_step}


def run_trl_sft(spec) -> dict:
    """TRL's SFTTrainer with packing (best-fit decreasing, padding-free: its fastest setting that runs
    on CPU), prompt-completion data so only the reply is trained. TRL's own defaults would turn on
    bf16 and gradient checkpointing; both are off here (bf16 is emulated on this CPU)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(spec["model"])
    rows = read_jsonl(spec["train"])
    data = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    args = SFTConfig(
        **common_args(spec), packing=spec.get("packing", True), max_length=1024, activation_checkpointing=False
    )
    callback = turn_callback()
    trainer = counting(SFTTrainer)(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=tok,
        peft_config=peft_lora(spec),
        callbacks=[callback],
    )
    callback.trainer = trainer
    trainer.train()
    adapter = Path(spec["out"]) / "adapter"
    trainer.model.save_pretrained(adapter)
    return {"adapter": str(adapter), "steps": trainer.state.global_step}


# --- the machine's limit ---------------------------------------------------------------------------


def run_probe(spec) -> dict:
    """Matmul throughput with the model's linear shapes, one round per turn for as long as the
    trainers run (so it sees the same load they do); bf16 once, in the first turn."""
    import torch
    import torch.nn.functional as F
    from common import model_shapes
    from transformers import AutoConfig

    shapes = model_shapes(AutoConfig.from_pretrained(spec["model"]))
    tokens = spec.get("probe_tokens", 1024)
    kinds = {}
    for name, (i, o) in shapes["linears"].items():
        kinds.setdefault((i, o), []).append(name)
    kinds[(shapes["hidden"], spec["lora"]["r"])] = ["lora_A"]

    def rate(dtype, i, o, reps, min_seconds=0.0):
        x = torch.randn(tokens, i, dtype=dtype)
        w = torch.randn(o, i, dtype=dtype)
        F.linear(x, w)
        times = []
        start = time.perf_counter()
        while len(times) < reps or time.perf_counter() - start < min_seconds:
            t = time.perf_counter()
            F.linear(x, w)
            times.append(time.perf_counter() - t)
        times.sort()
        return 2 * tokens * i * o / times[len(times) // 2] / 1e9

    TURNS.send("ready")
    rounds, first = [], True
    while TURNS.wait() == "go":
        fp32 = {
            "/".join(names) + f" [{tokens},{i}]x[{i},{o}]": rate(torch.float32, i, o, 5, 0.3)
            for (i, o), names in kinds.items()
        }
        info = {"fp32_gflops": fp32}
        if first:
            i, o = shapes["linears"]["gate_proj"]
            info["bf16_gflops"] = {
                f"gate_proj/up_proj [{tokens},{i}]x[{i},{o}]": rate(torch.bfloat16, i, o, 1),
                f"q_proj/o_proj [{tokens},{i}]x[{i},{i}]": rate(torch.bfloat16, i, i, 1),
            }
            info["bf16_step"] = bf16_step_probe(spec)
            first = False
        rounds.append(info)
        TURNS.send("step", seconds=TURNS.elapsed(), probe=info)
    return {"rounds": rounds}


def bf16_step_probe(spec, length: int = 64) -> dict:
    """One LoRA forward+backward of SmolLM2 on one 64-token sequence, fp32 vs bf16 autocast (what
    precision: bf16 would run): the whole-model cost of emulated bf16 on this CPU."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32), peft_lora(spec))
    model.train()
    ids = torch.randint(0, min(10000, model.config.vocab_size), (1, length))
    out = {}
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()  # warm-up
    model.zero_grad(set_to_none=True)
    for name, ctx in (("fp32", None), ("bf16", torch.bfloat16), ("fp32_again", None)):
        times = []
        for _ in range(1 if ctx else 2):  # emulated bf16 is slow: one pass is enough to see it
            t = time.perf_counter()
            if ctx is None:
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            else:
                with torch.autocast("cpu", dtype=ctx):
                    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
        out[name + "_seconds"] = min(times)
    del model
    return {"tokens": length, **out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", type=Path, help="the candidate's JSON spec (bench/run.py writes one per candidate)")
    spec = json.loads(parser.parse_args().spec.read_text())
    if spec.get("threads"):
        import torch

        torch.set_num_threads(spec["threads"])
    run = {"tuneforge": run_tuneforge, "hf_trainer": run_hf_trainer, "trl_sft": run_trl_sft, "probe": run_probe}[
        spec["kind"]
    ]
    started = time.time()
    result = run(spec)
    TURNS.send("result", **result, peak_rss_mib=peak_rss_mib(), wall_s=time.time() - started)


if __name__ == "__main__":
    main()
