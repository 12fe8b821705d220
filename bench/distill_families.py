"""The `distill_gemma_to_smollm2` recipe, seed by seed: Gemma 3 270M, tuned by the quickstart,
teaches SmolLM2-135M through its answers alone (sequence-level distillation across families).

    .venv/bin/python bench/distill_families.py --teacher runs/quickstart-gemma --seeds 0,1,2

The teacher is `tuneforge quickstart --model gemma3-270m`'s run folder. Its answers to the
quickstart's unlabelled tickets (`distill generate`, as the recipe's commands) are written once into
the work folder; for each seed the recipe trains SmolLM2 on them (`train.seed` set). The teacher and
every student are scored on the first `test_tickets` held-out tickets, and the first student's
generation speed is measured beside the teacher's. The answers themselves are scored against the
tickets' true labels (the generator's, which the recipe never reads): how much of what the student
learns is the teacher's mistakes. Finished runs and scores in the work folder are reused. Writes
`results/distill_families-<date>.json`; `report.py` renders it.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from distill import Setup, generation_speed  # noqa: E402
from distill_recipe import scored, start, teacher_answers, train_once  # noqa: E402

from tuneforge.quickstart import Settings  # noqa: E402

RECIPE = "distill_gemma_to_smollm2"
WORK = HERE / ".work" / "distill_families"
TEACHER_ANSWERS = WORK / "teacher-answers.jsonl"


def recipe_config(teacher: Path, out: Path, seed: int) -> dict:
    from tuneforge.recipes import load_recipe

    config = load_recipe(RECIPE)
    config["data"].update(train=str(TEACHER_ANSWERS), validation=str(teacher / "data" / "validation.jsonl"))
    config["train"]["seed"] = seed
    config["output_dir"] = str(out)
    return config


def answers_scored(teacher: Path) -> dict:
    """The teacher's answers against the unlabelled tickets' true labels, drawn again as the quickstart
    drew them (a mismatch with the written tickets stops the benchmark)."""
    from tuneforge.tasks import support_triage

    def rows(name: str) -> list[dict]:
        return [json.loads(line) for line in (teacher / "data" / name).read_text().splitlines()]

    seen = {
        row["messages"][1]["content"] for split in ("train", "validation", "test") for row in rows(f"{split}.jsonl")
    }
    prompts = rows(support_triage.UNLABELLED_FILE)
    tickets = support_triage.draw_unlabelled(Settings().data_seed, len(prompts), seen)
    if [t.text for t in tickets] != [row["messages"][1]["content"] for row in prompts]:
        sys.exit(f"{teacher}/data/{support_triage.UNLABELLED_FILE} is not the quickstart's unlabelled tickets")
    answers = [json.loads(line)["messages"][-1]["content"] for line in TEACHER_ANSWERS.read_text().splitlines()]
    return support_triage.score(answers, [support_triage.format_answer(t.labels) for t in tickets])


def main() -> None:
    from common import result_header, write_result

    load_before, teacher, data, seeds = start(
        __doc__, "runs/quickstart-gemma", "`quickstart --model gemma3-270m`'s run folder", WORK
    )
    setup = Setup()
    answers_seconds = teacher_answers(teacher, TEACHER_ANSWERS)
    runs = {
        f"student-s{seed}": {
            "seed": seed,
            "training": train_once(recipe_config(teacher, WORK / f"student-s{seed}", seed)),
        }
        for seed in seeds
    }
    teacher_scores = scored(setup, "teacher", teacher, data, WORK)
    for name, run in runs.items():
        run["scores"] = scored(setup, name, WORK / name, data, WORK)
    speed = generation_speed(setup, {"teacher": teacher, "student": WORK / f"student-s{seeds[0]}"}, data)
    students = [run["scores"]["scores"]["exact"] for run in runs.values()]
    result = {
        **result_header("distill_families", "python bench/distill_families.py " + " ".join(sys.argv[1:]), load_before),
        "setup": {"recipe": RECIPE, "seeds": seeds, "test_tickets": setup.test_tickets},
        "teacher_answers": {"seconds": answers_seconds, "scores": answers_scored(teacher)},
        "teacher": teacher_scores,
        "runs": runs,
        "speed": {**speed, "student_vs_teacher": speed["student"]["tokens_per_s"] / speed["teacher"]["tokens_per_s"]},
        "summary": {
            "teacher_exact": teacher_scores["scores"]["exact"],
            "student_exact_mean": statistics.mean(students),
            "share_of_teacher": statistics.mean(students) / teacher_scores["scores"]["exact"],
        },
    }
    print(f"wrote {write_result(result)}")


if __name__ == "__main__":
    main()
