"""The `distill_triage` recipe against its targets, seed by seed: the distilled student, a plain-SFT
student trained on the same data for the same steps, and the teacher they come from.

    .venv/bin/python bench/distill_recipe.py --teacher runs/quickstart --seeds 0,1,2

The teacher is the quickstart's tuned model (`tuneforge quickstart`); the student is
`tuneforge distill init --most-influential 11 --data <its train.jsonl>` of it, and the teacher's
answers to the quickstart's unlabelled tickets (`distill generate`, as the recipe's commands), both
written once into the work folder.
For each seed: the recipe's run (`distill_triage`, its paths pointed at the teacher's data and
those answers, `train.seed` set) and the same run as plain SFT (`method: full`, no distill
section) on the same rows. Every model is scored on the first
`test_tickets` held-out tickets, and the student's generation speed is measured beside the
teacher's. A finished run or score in the work folder is reused, so an interrupted benchmark goes
on where it stopped. Writes `results/distill_recipe-<date>.json`; `report.py` renders it.

Targets (issue "Distillation that pays"): the student reaches 85% of the teacher's exact match and
10 points above the SFT student, generates at least 2x faster, and the recipe (teacher pass,
training, scoring) runs within 30 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from distill import Setup, generation_speed, task_scores, training_figures  # noqa: E402

WORK = HERE / ".work" / "distill_recipe"
KEEP_LAYERS = 11  # the student keeps the teacher's 11 most influential layers on the training tickets


TEACHER_ANSWERS = WORK / "teacher-answers.jsonl"


def recipe_config(teacher: Path, student: Path, out: Path, seed: int, method: str) -> dict:
    from tuneforge.recipes import load_recipe

    config = load_recipe("distill_triage")
    data = teacher / "data"
    config["base_model"] = str(student)
    config["data"].update(
        train=[str(data / "train.jsonl"), str(TEACHER_ANSWERS)], validation=str(data / "validation.jsonl")
    )
    config["train"]["seed"] = seed
    config["output_dir"] = str(out)
    if method == "distill":
        config["distill"]["teacher"] = str(teacher)
    else:
        config["method"] = "full"
        del config["distill"]
    return config


def recipe_settings() -> dict:
    """The recipe's settings both students train with, and its distillation settings."""
    from tuneforge.recipes import load_recipe

    config = load_recipe("distill_triage")
    train = config["train"]
    keys = ("max_steps", "batch_size", "learning_rate", "scheduler", "precision")
    return {**{key: train[key] for key in keys}, "distill": config["distill"]}


def teacher_answers(teacher: Path, out: Path) -> float:
    """Writes the teacher's answers to the quickstart's unlabelled tickets into `out` as the recipes'
    `distill generate` does, once; the seconds that took."""
    from tuneforge.distill import generate_teacher_data
    from tuneforge.tasks.support_triage import UNLABELLED_FILE

    timing = out.with_suffix(".wall.json")
    if not timing.is_file():
        started = time.perf_counter()
        generate_teacher_data(str(teacher), teacher / "data" / UNLABELLED_FILE, out, max_new_tokens=48, batch_size=16)
        timing.write_text(json.dumps({"wall_seconds": time.perf_counter() - started}))
    return json.loads(timing.read_text())["wall_seconds"]


def train_once(config: dict) -> dict:
    """Trains unless the run folder is finished; the wall time of the whole run, teacher pass included."""
    from tuneforge.training import train

    out = Path(config["output_dir"])
    timing = out.parent / f"{out.name}.wall.json"
    if not (out / "summary.json").is_file():
        started = time.perf_counter()
        result = train(config, overwrite=True)  # an unfinished run starts over
        if result.status != "completed":
            sys.exit(f"{out}: training stopped ({result.status})")
        timing.write_text(json.dumps({"wall_seconds": time.perf_counter() - started}))
    wall = json.loads(timing.read_text())["wall_seconds"] if timing.is_file() else None
    return {**training_figures(out), "wall_seconds": wall}


def scored(setup: Setup, name: str, model: Path, data: dict, work: Path = WORK) -> dict:
    """The model's task scores, kept in the work folder once made."""
    path = work / f"{name}.scores.json"
    if not path.is_file():
        path.write_text(json.dumps(task_scores(setup, {name: model}, data)[name]))
    return json.loads(path.read_text())


class Start(NamedTuple):
    load_before: float  # the 1-minute load average before any work
    teacher: Path  # the teacher's run folder
    data: dict[str, Path]  # its splits
    seeds: list[int]


def start(description: str, default_teacher: str, teacher_help: str, work: Path) -> Start:
    """The command line (`--teacher`, `--seeds`) read and the work folder made."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, default=Path(default_teacher), help=teacher_help)
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    work.mkdir(parents=True, exist_ok=True)
    teacher = args.teacher.resolve()
    data = {split: teacher / "data" / f"{split}.jsonl" for split in ("train", "validation", "test")}
    return Start(load_before, teacher, data, [int(s) for s in args.seeds.split(",")])


def main() -> None:
    from common import result_header, write_result

    from tuneforge.distill import init_student

    load_before, teacher, data, seeds = start(__doc__, "runs/quickstart", "the quickstart's run folder", WORK)
    setup = Setup()
    student = WORK / "student"
    if not student.exists():
        init_student(str(teacher), student, most_influential_of=(KEEP_LAYERS, data["train"]))
    answers_seconds = teacher_answers(teacher, TEACHER_ANSWERS)
    runs = {}
    for seed in seeds:
        for method in ("distill", "sft"):
            out = WORK / f"{method}-s{seed}"
            training = train_once(recipe_config(teacher, student, out, seed, method))
            runs[f"{method}-s{seed}"] = {"seed": seed, "method": method, "training": training}
    teacher_scores = scored(setup, "teacher", teacher, data)
    for name, run in runs.items():
        run["scores"] = scored(setup, name, WORK / name, data)
    speed = generation_speed(setup, {"teacher": teacher, "student": WORK / f"distill-s{seeds[0]}"}, data)

    def exact(method: str) -> list[float]:
        return [run["scores"]["scores"]["exact"] for run in runs.values() if run["method"] == method]

    distilled, sft = exact("distill"), exact("sft")
    teacher_exact = teacher_scores["scores"]["exact"]
    result = {
        **result_header("distill_recipe", "python bench/distill_recipe.py " + " ".join(sys.argv[1:]), load_before),
        "setup": {
            "most_influential": KEEP_LAYERS,
            "seeds": seeds,
            "test_tickets": setup.test_tickets,
            "recipe": recipe_settings(),
            "teacher_answers_seconds": answers_seconds,
        },
        "teacher": teacher_scores,
        "runs": runs,
        "speed": {**speed, "student_vs_teacher": speed["student"]["tokens_per_s"] / speed["teacher"]["tokens_per_s"]},
        "summary": {
            "teacher_exact": teacher_exact,
            "distill_exact_mean": statistics.mean(distilled),
            "sft_exact_mean": statistics.mean(sft),
            "share_of_teacher": statistics.mean(distilled) / teacher_exact,
            "points_over_sft": statistics.mean(distilled) - statistics.mean(sft),
        },
    }
    print(f"wrote {write_result(result)}")


if __name__ == "__main__":
    main()
