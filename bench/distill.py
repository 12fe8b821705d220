"""Distillation on the demo task: a half-depth student distilled from a LoRA-tuned SmolLM2 teacher,
against the same student trained with plain SFT on the same data for the same steps.

    OMP_NUM_THREADS=1 .venv/bin/python bench/distill.py            # every phase; finished ones are reused
    OMP_NUM_THREADS=1 .venv/bin/python bench/distill.py --until teacher

Phases (each writes into bench/.work/distill/ and is skipped when its output is there):
  data     support-triage train/validation/test tickets (the quickstart's generator and seed)
  teacher  SmolLM2-135M-Instruct + LoRA on the upper half of its layers (the quickstart's recipe, fewer steps)
  student  `tuneforge distill init`: every third teacher layer (first and last always kept)
  sft      the student, full fine-tuning, cross-entropy on the labels
  distill  the student, full fine-tuning, alpha x CE + (1 - alpha) x T^2 x KL(teacher || student)
  cached   the same, with the teacher's top-k logits computed once before training
           (`distill.teacher_top_k`) instead of the teacher's forward pass at every step
  measure  task metric on the held-out test tickets for teacher and both students; generation speed,
           teacher vs student, on the same prompts; writes bench/results/distill-<date>.json

The students share everything but the objective: initial weights, data order, steps, learning rate.
The cached run's steps against the online one's give what the cache saves per step; its time before
the first step (the teacher's one pass) is reported apart.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work" / "distill"
TEACHER_PASS = WORK / "cached-teacher-pass.json"
PHASES = ("data", "teacher", "student", "sft", "distill", "cached", "measure")


@dataclass(frozen=True)
class Setup:
    teacher_steps: int = 60
    student_steps: int = 40
    keep_every: int = 3  # 11 of SmolLM2's 30 layers: about 67M of 135M parameters
    student_learning_rate: float = 5e-4
    batch_size: int = 2  # packed rows of up to max_length tokens, as in the quickstart
    max_length: int = 512
    alpha: float = 0.5
    temperature: float = 2.0
    divergence: str = "forward_kl"
    teacher_top_k: int = 64
    test_tickets: int = 100
    max_new_tokens: int = 40
    speed_prompts: int = 32
    speed_batch_size: int = 8
    speed_rounds: int = 2  # teacher and student take turns, so background load falls on both alike
    seed: int = 0


def prepare_data(setup: Setup) -> dict[str, Path]:
    from tuneforge.quickstart import Settings
    from tuneforge.tasks import support_triage

    quick = Settings()
    return support_triage.generate(
        WORK / "data", n_train=quick.n_train, n_valid=quick.n_valid, n_test=quick.n_test, seed=setup.seed
    )


def train_once(config: dict) -> Path:
    """A finished run folder is reused: every phase can be rerun cheaply after a later one fails."""
    from tuneforge.training import train

    out = Path(config["output_dir"])
    if not (out / "summary.json").is_file():
        result = train(config, overwrite=True)  # an unfinished run starts over
        if result.status != "completed":
            sys.exit(f"{out}: training stopped ({result.status})")
    return out


def train_teacher(setup: Setup, data: dict[str, Path]) -> Path:
    from tuneforge.quickstart import Settings, quickstart_config, write_self_replay
    from tuneforge.recipes import load_recipe

    replay = write_self_replay(load_recipe("quickstart")["base_model"], WORK / "data", Settings().replay_tokens)
    config = quickstart_config({**data, "replay": replay}, WORK / "teacher", max_steps=setup.teacher_steps)
    config["train"]["seed"] = setup.seed
    config["eval"] = {"task": "support_triage", "forgetting": False}
    return train_once(config)


def student_config(
    setup: Setup, student: Path, data: dict[str, Path], out: Path, method: str, teacher: Path, top_k: int | None = None
) -> dict:
    config = {
        "base_model": str(student),
        "method": method,
        "data": {
            "train": str(data["train"]),
            "validation": str(data["validation"]),
            "max_length": setup.max_length,
            "packing": True,
        },
        "train": {
            "max_steps": setup.student_steps,
            "batch_size": setup.batch_size,
            "learning_rate": setup.student_learning_rate,
            "warmup": 0.05,
            "scheduler": "cosine",
            "precision": "fp32",
            "eval_every": 0,
            "save_every": 0,
            "seed": setup.seed,
        },
        "output_dir": str(out),
    }
    if method == "distill":
        config["distill"] = {
            "teacher": str(teacher),
            "student": "full",
            "alpha": setup.alpha,
            "temperature": setup.temperature,
            "divergence": setup.divergence,
            "teacher_top_k": top_k,
        }
    return config


@contextlib.contextmanager
def timed_teacher_pass():
    """Records the seconds of the teacher's one pass over the rows (`distill.teacher_top_k`) in TEACHER_PASS."""
    from tuneforge.methods import distill

    compute = distill.compute_top_k

    def timed(*args, **kwargs):
        started = time.perf_counter()
        result = compute(*args, **kwargs)
        TEACHER_PASS.write_text(json.dumps({"teacher_pass_seconds": time.perf_counter() - started}))
        return result

    distill.compute_top_k = timed
    try:
        yield
    finally:
        distill.compute_top_k = compute


def init_student(setup: Setup, teacher: Path) -> Path:
    from tuneforge.distill import init_student

    out = WORK / "student"
    if not out.exists():
        init_student(str(teacher), out, every=setup.keep_every)
    return out


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def load(spec: Path):
    """A model as a plain causal LM (adapters merged) and its tokenizer: teacher and students alike."""
    from tuneforge.models import load_frozen_model, load_tokenizer

    return load_frozen_model(str(spec)), load_tokenizer(str(spec))


def task_scores(setup: Setup, models: dict[str, Path], data: dict[str, Path]) -> dict:
    """Each model on the same held-out test tickets: loss on the reference answers, the task metric."""
    from tuneforge.eval.evaluate import evaluate_loaded, read_eval_examples

    examples = read_eval_examples(data["test"], setup.test_tickets)
    scores = {}
    for name, spec in models.items():
        model, tokenizer = load(spec)
        result = evaluate_loaded(model, tokenizer, examples, max_new_tokens=setup.max_new_tokens, progress=False)
        scores[name] = {
            "parameters": parameters(model),
            "layers": model.config.num_hidden_layers,
            "loss": result["loss"],
            "mean_token_accuracy": result["mean_token_accuracy"],
            "scores": result["scores"],
            "usage": result["usage"],
            "seconds": result["seconds"],
        }
        print(f"{name}: {result['scores']}", flush=True)
    return scores


def generation_speed(setup: Setup, models: dict[str, Path], data: dict[str, Path]) -> dict:
    """Greedy decoding of the same prompts, the models taking turns round by round; tokens/s is the
    median over rounds of every generated token (end of turn included) over the wall time."""
    from common import median

    from tuneforge.eval.evaluate import read_eval_examples
    from tuneforge.generate import generate

    prompts = [e.prompt for e in read_eval_examples(data["test"], setup.speed_prompts)]
    loaded = {name: load(spec) for name, spec in models.items()}
    rounds: dict[str, list[dict]] = {name: [] for name in models}
    for _ in range(setup.speed_rounds):
        for name, (model, tokenizer) in loaded.items():
            started = time.perf_counter()
            answers = generate(
                model, tokenizer, prompts, batch_size=setup.speed_batch_size, max_new_tokens=setup.max_new_tokens
            )
            seconds = time.perf_counter() - started
            tokens = sum(a.completion_tokens for a in answers)
            rounds[name].append(
                {
                    "tokens": tokens,
                    "seconds": round(seconds, 3),
                    "tokens_per_s": tokens / seconds,
                    "load_average": os.getloadavg()[0],
                }
            )
    return {
        name: {"tokens_per_s": median([r["tokens_per_s"] for r in runs]), "rounds": runs}
        for name, runs in rounds.items()
    }


def training_figures(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train_loss" in r]
    figures = {
        "steps": len(steps),
        "seconds": steps[-1]["elapsed"],
        "seconds_per_step": steps[-1]["elapsed"] / len(steps),
        "first_train_loss": steps[0]["train_loss"],
        "last_train_loss": steps[-1]["train_loss"],
        "full_valid_loss": next((r["full_valid_loss"] for r in rows if "full_valid_loss" in r), None),
    }
    if "divergence" in steps[0]:
        figures.update(
            {
                f"{edge}_{key}": steps[index][key]
                for edge, index in (("first", 0), ("last", -1))
                for key in ("divergence", "teacher_agreement")
            }
        )
    return figures


def measure(setup: Setup, data: dict[str, Path], teacher: Path, sft: Path, distilled: Path, cached: Path) -> Path:
    from common import result_header, write_result

    from tuneforge.distill import layers_to_keep

    load_before = os.getloadavg()[0]
    models = {"teacher": teacher, "student_sft": sft, "student_distill": distilled, "student_distill_cached": cached}
    scores = task_scores(setup, models, data)
    speed = generation_speed(setup, {"teacher": teacher, "student": distilled}, data)
    result = {
        **result_header("distill", "OMP_NUM_THREADS=1 .venv/bin/python bench/distill.py", load_before),
        "setup": asdict(setup),
        "teacher_layers": scores["teacher"]["layers"],
        "kept_layers": list(layers_to_keep(scores["teacher"]["layers"], every=setup.keep_every)),
        "models": scores,
        "training": {
            "teacher": training_figures(teacher),
            "student_sft": training_figures(sft),
            "student_distill": training_figures(distilled),
            "student_distill_cached": {**training_figures(cached), **json.loads(TEACHER_PASS.read_text())},
        },
        "speed": {**speed, "student_vs_teacher": speed["student"]["tokens_per_s"] / speed["teacher"]["tokens_per_s"]},
    }
    return write_result(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--until", choices=PHASES, default=PHASES[-1], help="stop after this phase")
    args = parser.parse_args()
    setup = Setup()
    last = PHASES.index(args.until)
    WORK.mkdir(parents=True, exist_ok=True)
    data = prepare_data(setup)
    if last < PHASES.index("teacher"):
        return
    teacher = train_teacher(setup, data)
    if last < PHASES.index("student"):
        return
    student = init_student(setup, teacher)
    if last < PHASES.index("sft"):
        return
    sft = train_once(student_config(setup, student, data, WORK / "sft", "full", teacher))
    if last < PHASES.index("distill"):
        return
    distilled = train_once(student_config(setup, student, data, WORK / "distill", "distill", teacher))
    if last < PHASES.index("cached"):
        return
    with timed_teacher_pass():
        cached = train_once(
            student_config(setup, student, data, WORK / "cached", "distill", teacher, top_k=setup.teacher_top_k)
        )
    if last < PHASES.index("measure"):
        return
    path = measure(setup, data, teacher, sft, distilled, cached)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
