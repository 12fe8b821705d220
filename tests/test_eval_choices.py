"""Multiple-choice benchmarks in `tuneforge eval`: the layouts read, bad rows refused, and the scores against
each choice's summed log-probabilities computed here with transformers, as lm-evaluation-harness computes them."""

import gc
import json
import os
import random
import warnings

import pyarrow
import pyarrow.parquet
import pytest
import torch
from conftest import tiny_run_config
from data.rows import write_jsonl
from tiny import set_context

from tuneforge.config import load_config
from tuneforge.errors import ConfigError, DataError
from tuneforge.eval import compare, eval_command, evaluate
from tuneforge.eval.choices import (
    check_scorable,
    choice_requests,
    encode_choices,
    evaluate_choices,
    is_choice_file,
    loglikelihoods,
    read_benchmark,
    read_choice_rows,
)
from tuneforge.models import load_model, load_tokenizer
from tuneforge.pipeline import train

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = [
    {"question": "What is two plus two?", "choices": ["four", "five", "the lazy dog"], "answer": 0},
    {"question": "How do I reset my password?", "choices": ["web console", "brown fox"], "answer": "web console"},
    {"question": "Hello, how are you?", "choices": ["fine, thank you", "urgent", "database", "outage"], "answer": 3},
]


def direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """The harness's log-likelihood, from plain logits: the continuation's tokens are those of the whole
    encoding past the context's, read after the context's own tokens."""
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ids = context_ids + whole[len(context_ids) :]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    log_probs = logits.log_softmax(-1)
    return sum(log_probs[i - 1, ids[i]].item() for i in range(len(context_ids), len(ids)))


def test_scores_equal_summed_log_probabilities(tiny_model_dir, tmp_path):
    """Each choice's log-likelihood is " CHOICE" after "Question: ...\\nAnswer:", batched as one; acc takes the
    most likely choice, acc_norm divides by the choice's length in characters."""
    data = write_jsonl(tmp_path / "quiz.jsonl", QUESTIONS)
    result = evaluate(str(tiny_model_dir), data, progress=False)
    model, tokenizer = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    right = right_norm = 0
    for row, sample in zip(QUESTIONS, result["samples"]):
        context = f"Question: {row['question']}\nAnswer:"
        expected = [direct_loglikelihood(model, tokenizer, context, f" {c}") for c in row["choices"]]
        assert sample["loglikelihoods"] == pytest.approx(expected, abs=1e-4)
        answer = row["answer"] if isinstance(row["answer"], int) else row["choices"].index(row["answer"])
        assert sample["answer"] == answer
        right += max(range(len(expected)), key=expected.__getitem__) == answer
        normed = [ll / len(c) for ll, c in zip(expected, row["choices"])]
        right_norm += max(range(len(normed)), key=normed.__getitem__) == answer
    assert result["scores"] == {"acc": right / 3, "acc_norm": right_norm / 3}
    low, high = result["intervals"]["acc"]
    assert low <= result["scores"]["acc"] <= high


def test_each_question_is_encoded_once_for_its_check_and_its_scores(tiny_model_dir, tmp_path, monkeypatch):
    """The check before the model loads hands its encodings on to scoring: each question's choices are encoded
    once per model, and the scores are those of the encodings checked."""
    from tuneforge.eval import choices

    encoded = []

    def counted_encode(tokenizer, context, continuations):
        encoded.append(context)
        return encode_choices(tokenizer, context, continuations)

    monkeypatch.setattr(choices, "encode_choices", counted_encode)
    data = write_jsonl(tmp_path / "quiz.jsonl", QUESTIONS)
    result = evaluate_choices(str(tiny_model_dir), data, progress=False)
    assert encoded == [f"Question: {q['question']}\nAnswer:" for q in QUESTIONS]
    assert result["n"] == 3
    encoded.clear()
    compared = choices.compare_choices(str(tiny_model_dir), str(tiny_model_dir), data, progress=False)
    assert len(encoded) == 2 * len(QUESTIONS)  # once for each model's tokenizer
    assert compared["base"]["samples"] == compared["tuned"]["samples"] == result["samples"]


def test_a_base_whose_context_the_questions_do_not_fit_is_refused_before_the_tuned_model_is_scored(
    tiny_model_dir, tmp_path, monkeypatch
):
    """--compare with a base of a shorter context: its refusal comes before either model loads, not after the
    tuned model has scored every question."""
    import shutil

    from tuneforge.eval import choices

    base = set_context(shutil.copytree(tiny_model_dir, tmp_path / "short"), 8)
    loaded = []
    monkeypatch.setattr(choices, "load_text_model", lambda source, *a, **k: loaded.append(source.path))
    data = write_jsonl(tmp_path / "quiz.jsonl", QUESTIONS)
    with pytest.raises(DataError, match="more than the model's context of 8 tokens"):
        choices.compare_choices(str(tiny_model_dir), str(base), data, progress=False)
    assert loaded == []


FEWSHOT_QUESTIONS = [
    *QUESTIONS,
    {"question": "Which is a colour?", "choices": ["blue", "seven"], "answer": 0},
    {"question": "Which is a fruit?", "choices": ["chair", "apple"], "answer": 1},
    {"question": "Which is an animal?", "choices": ["cat", "stone"], "answer": 0},
]


def harness_contexts(questions, shots, pool, seed=1234):
    """The harness's few-shot contexts: one generator seeded once, a sample per question (one more drawn where
    the pool is the question's own file, any example equal to the question left out), each example
    "Question: Q\nAnswer: A",
    joined by blank lines."""
    rng, contexts = random.Random(seed), []
    for question in questions:
        drawn = rng.sample(pool, shots + (question in pool))
        examples = [e for e in drawn if e != question][:shots]
        texts = [f"Question: {e['question']}\nAnswer: {e['choices'][e['answer']]}" for e in examples]
        contexts.append("\n\n".join([*texts, f"Question: {question['question']}\nAnswer:"]))
    return contexts


def test_few_shot_contexts_are_the_harness_s_and_scored_after_the_examples(tiny_model_dir, tmp_path):
    """--num-fewshot N: each question after N solved examples drawn, seeded, from the file less the question
    itself, or from --fewshot-file; the scores are the choices' log-likelihoods after that whole context; a
    context past the model's window is refused before it loads."""
    questions = [
        {**q, "answer": q["choices"].index(q["answer"])} if isinstance(q["answer"], str) else q
        for q in FEWSHOT_QUESTIONS
    ]
    data = write_jsonl(tmp_path / "quiz.jsonl", questions)
    dev = write_jsonl(tmp_path / "quiz_dev.jsonl", questions[3:])
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir)).eval()

    result = evaluate_choices(str(tiny_model_dir), data, limit=3, num_fewshot=2, progress=False)
    assert result["num_fewshot"] == 2 and result["n"] == 3
    for context, question, sample in zip(harness_contexts(questions[:3], 2, questions), questions, result["samples"]):
        assert context.count("Question:") == 3 and f"Question: {question['question']}\nAnswer: " not in context
        expected = [direct_loglikelihood(model, tokenizer, context, f" {c}") for c in question["choices"]]
        assert sample["loglikelihoods"] == pytest.approx(expected, abs=1e-4)

    rows = read_benchmark(data, num_fewshot=2)
    assert [r.prompt for r in rows] == harness_contexts(questions, 2, questions)
    assert read_benchmark(data, num_fewshot=2) == rows  # the same seed, the same contexts
    assert [r.prompt for r in read_benchmark(data, num_fewshot=2, seed=7)] != [r.prompt for r in rows]
    from_dev = read_benchmark(data, limit=3, num_fewshot=3, fewshot_file=dev)
    assert [r.prompt for r in from_dev] == harness_contexts(questions[:3], 3, questions[3:])
    # A question on two lines is never shown solved before itself, as the harness compares the drawn documents.
    twice = write_jsonl(tmp_path / "twice.jsonl", [questions[0], *questions])
    solved = f"Question: {questions[0]['question']}\nAnswer: {questions[0]['choices'][questions[0]['answer']]}"
    for seed in range(8):
        contexts = [r.prompt for r in read_benchmark(twice, limit=2, num_fewshot=4, seed=seed)]
        assert contexts == harness_contexts([questions[0], questions[0]], 4, [questions[0], *questions], seed)
        assert not any(solved in context for context in contexts)
    # The file itself under another spelling: each question still left out of its own examples.
    respelled = tmp_path / ".." / tmp_path.name / "quiz.jsonl"
    assert read_benchmark(data, num_fewshot=2, fewshot_file=respelled) == rows

    zero_shot = max(sum(map(len, pair)) for r in read_choice_rows(data) for pair in choice_requests(tokenizer, r))
    check_scorable(read_choice_rows(data), tokenizer, zero_shot)
    with pytest.raises(DataError, match="more than the model's context"):
        check_scorable(rows, tokenizer, zero_shot)
    with pytest.raises(DataError, match="has 6 questions, too few to draw 6 examples besides the question asked"):
        read_benchmark(data, num_fewshot=6)
    with pytest.raises(ConfigError, match="--num-fewshot is 0"):
        eval_command(str(tiny_model_dir), str(data), fewshot_file=str(dev))


MMLU_ROWS = [
    {
        "question": "Which bone is in the thigh?",
        "subject": "anatomy",
        "choices": ["femur", "skull", "rib"],
        "answer": 0,
    },
    {"question": "What is 2+2?", "subject": "high_school_mathematics", "choices": ["3", "4", "5"], "answer": 1},
    {"question": "Which gas do plants take in?", "subject": "college_biology", "choices": ["CO2", "neon"], "answer": 0},
]


def test_a_subject_that_is_not_mmlu_s_gives_no_mmlu_header(tmp_path):
    """ScienceQA's rows name a subject too, and a CSV of MMLU's columns may be named NAME_test.csv: the header
    is mmlu_continuation's, for MMLU's own subjects only."""
    science = {"question": "Which is a mammal?", "choices": ["whale", "shark"], "answer": 0, "subject": "biology"}
    rows = read_choice_rows(write_jsonl(tmp_path / "scienceqa.jsonl", [science, {**science, "subject": "virology"}]))
    assert [row.prompt for row in rows] == [
        "Question: Which is a mammal?\nAnswer:",
        "The following are questions (with answers) about virology.\n\nQuestion: Which is a mammal?\nAnswer:",
    ]
    csv = tmp_path / "support_test.csv"
    csv.write_text('"Which queue takes billing tickets?",billing,network,storage,auth,A\n')
    assert read_choice_rows(csv)[0].prompt == "Question: Which queue takes billing tickets?\nAnswer:"


def test_mmlu_questions_start_with_the_harness_s_subject_header(tiny_model_dir, tmp_path):
    """A row or a CSV file that names MMLU's subject: the question starts with `mmlu_continuation`'s header
    ("The following are questions (with answers) about SUBJECT.\n\n", _ as spaces), zero-shot and before the
    few-shot examples, which leave their own out; the scores are the choices' log-likelihoods after it."""
    data = write_jsonl(tmp_path / "mmlu.jsonl", MMLU_ROWS)
    header = "The following are questions (with answers) about high school mathematics.\n\n"
    assert read_choice_rows(data)[1].prompt == f"{header}Question: What is 2+2?\nAnswer:"
    sums = [
        {"question": f"What is {n}+1?", "subject": "high_school_mathematics", "choices": ["2", "3"], "answer": n - 1}
        for n in (1, 2)
    ]
    dev, math = write_jsonl(tmp_path / "dev.jsonl", sums), write_jsonl(tmp_path / "math.jsonl", [MMLU_ROWS[1]])
    shots = read_benchmark(math, num_fewshot=2, fewshot_file=dev)[0].prompt
    assert shots == (
        f"{header}Question: What is 1+1?\nAnswer: 2\n\n"
        "Question: What is 2+1?\nAnswer: 3\n\nQuestion: What is 2+2?\nAnswer:"
    )
    csv = tmp_path / "high_school_us_history_dev.csv"
    csv.write_text('"Who was the first president?",Washington,Lincoln,Adams,Grant,A\n')
    assert read_choice_rows(csv)[0].prompt == (
        "The following are questions (with answers) about high school us history.\n\n"
        "Question: Who was the first president?\nAnswer:"
    )
    assert read_choice_rows(write_jsonl(tmp_path / "quiz.jsonl", QUESTIONS))[0].prompt.startswith("Question:")

    model, tokenizer = load_model(str(tiny_model_dir)).eval(), load_tokenizer(str(tiny_model_dir))
    for shown, num_fewshot in ((f"{header}Question: What is 2+2?\nAnswer:", 0), (shots, 2)):
        options = {"num_fewshot": num_fewshot, "fewshot_file": dev if num_fewshot else None, "progress": False}
        result = evaluate_choices(str(tiny_model_dir), math, **options)
        expected = [direct_loglikelihood(model, tokenizer, shown, f" {c}") for c in MMLU_ROWS[1]["choices"]]
        assert result["samples"][0]["loglikelihoods"] == pytest.approx(expected, abs=1e-4)
    with pytest.raises(DataError, match=r"mmlu.jsonl:1 subject: .*must be non-empty text"):
        read_choice_rows(write_jsonl(tmp_path / "mmlu.jsonl", [{**MMLU_ROWS[0], "subject": None}]))


ANATOMY_DEV = (
    "Which bone is in the thigh?,femur,skull,rib,ulna,A\n"
    "Which organ pumps blood?,lung,heart,liver,skin,B\n"
    "Which bone guards the brain?,femur,rib,skull,ulna,C\n"
    "Where is the tibia?,arm,neck,back,leg,D\n"
    "Which muscle bends the elbow?,biceps,calf,jaw,tongue,A\n"
    "Which organ filters blood?,heart,kidney,lung,ear,B\n"
)
ANATOMY_TEST = "Which bone is in the arm?,humerus,pelvis,skull,rib,A\nWhich organ breathes?,kidney,lung,heart,eye,B\n"


def test_mmlu_few_shot_examples_are_the_first_of_the_subject_s_dev_split(tiny_model_dir, tmp_path):
    """MMLU follows the harness's `mmlu_continuation` task (fewshot_split dev, sampler first_n): question k's N
    examples are the first N of the dev file, in order, whatever k; from the question's own file, the first N
    other than itself; from rows naming their subjects, the first N on the question's subject. The score is the
    choices' log-likelihoods after that prompt."""
    dev, test = tmp_path / "anatomy_dev.csv", tmp_path / "anatomy_test.csv"
    dev.write_text(ANATOMY_DEV)
    test.write_text(ANATOMY_TEST)
    header = "The following are questions (with answers) about anatomy.\n\n"
    first_five = (
        "Question: Which bone is in the thigh?\nAnswer: femur\n\n"
        "Question: Which organ pumps blood?\nAnswer: heart\n\n"
        "Question: Which bone guards the brain?\nAnswer: skull\n\n"
        "Question: Where is the tibia?\nAnswer: leg\n\n"
        "Question: Which muscle bends the elbow?\nAnswer: biceps\n\n"
    )
    rows = read_benchmark(test, num_fewshot=5, fewshot_file=dev)
    assert [r.prompt for r in rows] == [
        f"{header}{first_five}Question: Which bone is in the arm?\nAnswer:",
        f"{header}{first_five}Question: Which organ breathes?\nAnswer:",
    ]
    # The dev file scored on its own: its question 2 is shown the first 2 questions other than itself.
    assert read_benchmark(dev, num_fewshot=2)[1].prompt == (
        f"{header}Question: Which bone is in the thigh?\nAnswer: femur\n\n"
        "Question: Which bone guards the brain?\nAnswer: skull\n\n"
        "Question: Which organ pumps blood?\nAnswer:"
    )
    # The Hugging Face dataset's rows, subjects interleaved: each question's examples are on its subject.
    mixed = [
        {"question": "Which planet is red?", "subject": "astronomy", "choices": ["Mars", "Venus"], "answer": 0},
        {"question": "Which bone is in the thigh?", "subject": "anatomy", "choices": ["femur", "rib"], "answer": 0},
        {"question": "What orbits Earth?", "subject": "astronomy", "choices": ["the Sun", "the Moon"], "answer": 1},
        {"question": "Which organ pumps blood?", "subject": "anatomy", "choices": ["lung", "heart"], "answer": 1},
    ]
    asked = [
        {"question": "Which star is nearest?", "subject": "astronomy", "choices": ["Sirius", "the Sun"], "answer": 1}
    ]
    mixed_dev, mixed_test = write_jsonl(tmp_path / "dev.jsonl", mixed), write_jsonl(tmp_path / "test.jsonl", asked)
    shown = read_benchmark(mixed_test, num_fewshot=2, fewshot_file=mixed_dev)[0].prompt
    assert shown == (
        "The following are questions (with answers) about astronomy.\n\n"
        "Question: Which planet is red?\nAnswer: Mars\n\nQuestion: What orbits Earth?\nAnswer: the Moon\n\n"
        "Question: Which star is nearest?\nAnswer:"
    )
    with pytest.raises(DataError, match="has 2 questions on astronomy, too few to draw 3 examples"):
        read_benchmark(mixed_test, num_fewshot=3, fewshot_file=mixed_dev)

    model, tokenizer = load_model(str(tiny_model_dir)).eval(), load_tokenizer(str(tiny_model_dir))
    result = evaluate_choices(str(tiny_model_dir), test, num_fewshot=5, fewshot_file=dev, progress=False)
    expected = [direct_loglikelihood(model, tokenizer, rows[1].prompt, f" {c}") for c in rows[1].choices]
    assert result["samples"][1]["loglikelihoods"] == pytest.approx(expected, abs=1e-4)
    assert result["scores"]["acc"] == sum(s["prediction"] == s["answer"] for s in result["samples"]) / 2 and result[
        "samples"
    ][1]["prediction"] == max(range(4), key=expected.__getitem__)


def test_mmlu_questions_are_stripped_as_mmlu_continuation_strips_them(tmp_path):
    """`mmlu_continuation` writes "Question: {{question.strip()}}\nAnswer:": an MMLU question's spaces and line
    breaks around it are dropped, in the question asked and in its examples; other layouts keep theirs."""
    dev, test = tmp_path / "anatomy_dev.csv", tmp_path / "anatomy_test.csv"
    dev.write_text('"  Which bone is in the thigh?\n",femur,skull,rib,ulna,A\n')
    test.write_text('" Which organ breathes? ",kidney,lung,heart,eye,B\n')
    assert read_benchmark(test, num_fewshot=1, fewshot_file=dev)[0].prompt == (
        "The following are questions (with answers) about anatomy.\n\n"
        "Question: Which bone is in the thigh?\nAnswer: femur\n\nQuestion: Which organ breathes?\nAnswer:"
    )
    row = {"question": "Which bone? ", "subject": "anatomy", "choices": ["femur", "rib"], "answer": 0}
    assert read_choice_rows(write_jsonl(tmp_path / "mmlu.jsonl", [row]))[0].context == "Question: Which bone?\nAnswer:"
    quiz = write_jsonl(
        tmp_path / "quiz.jsonl", [{"question": "Which bone? ", "choices": ["femur", "rib"], "answer": 0}]
    )
    assert read_choice_rows(quiz)[0].context == "Question: Which bone? \nAnswer:"


def test_hellaswag_and_piqa_draw_one_example_more_as_their_harness_tasks_do(tiny_model_dir, tmp_path):
    """HellaSwag's and PIQA's harness tasks name no test split, so the harness draws N + 1 examples from the
    train split for each question and keeps the first N; ARC's (test split named) draws N. Over 6 examples, the
    generator seeded with 1234 draws [3, 0, 4] then [0, 4, 5] three at a time, [3, 0] then [0, 5] two at a
    time: question 2's examples are 0 and 4 for HellaSwag and PIQA, 0 and 5 for ARC."""
    rng, pairs = random.Random(1234), random.Random(1234)
    assert [rng.sample(range(6), 3) for _ in range(2)] == [[3, 0, 4], [0, 4, 5]]
    assert [pairs.sample(range(6), 2) for _ in range(2)] == [[3, 0], [0, 5]]

    def hellaswag(label, ctx_a, ctx_b, endings, answer):
        return {"activity_label": label, "ctx_a": ctx_a, "ctx_b": ctx_b, "endings": endings, "label": answer}

    train = [
        hellaswag("Baking", "A woman mixes flour.", "she", ["bakes bread.", "swims."], "0"),
        hellaswag("Running", "A man ties his shoes.", "he", ["flies.", "runs off."], "1"),
        hellaswag("Painting", "A girl dips a brush.", "she", ["paints a wall.", "eats it."], "0"),
        hellaswag("Fishing", "A boy casts a line.", "he", ["sleeps.", "catches a fish."], "1"),
        hellaswag("Skiing", "A woman waxes skis.", "she", ["skis downhill.", "cooks."], "0"),
        hellaswag("Gardening", "A man digs a hole.", "he", ["sings.", "plants a tree."], "1"),
    ]
    asked = [
        hellaswag("Swimming", "A boy jumps in a pool.", "he", ["swims a lap.", "reads."], "0"),
        hellaswag("Cycling", "A girl mounts a bike.", "she", ["rides away.", "bakes."], "0"),
    ]
    train_file, data = write_jsonl(tmp_path / "train.jsonl", train), write_jsonl(tmp_path / "val.jsonl", asked)
    rows = read_benchmark(data, num_fewshot=2, fewshot_file=train_file)
    assert [r.prompt for r in rows] == [
        "Fishing: A boy casts a line. He catches a fish.\n\nBaking: A woman mixes flour. She bakes bread.\n\n"
        "Swimming: A boy jumps in a pool. He",
        "Baking: A woman mixes flour. She bakes bread.\n\nSkiing: A woman waxes skis. She skis downhill.\n\n"
        "Cycling: A girl mounts a bike. She",
    ]
    with pytest.raises(DataError, match="has 6 questions, too few to draw 6 examples and the one more the harness"):
        read_benchmark(data, num_fewshot=6, fewshot_file=train_file)

    solutions = [
        ("Open a jar", "twist the lid", "sing to it", 0),
        ("Dry wet hair", "use a fork", "use a towel", 1),
        ("Boil water", "heat it", "freeze it", 0),
        ("Cut paper", "use a spoon", "use scissors", 1),
        ("Light a room", "switch on a lamp", "close your eyes", 0),
        ("Cool soup", "add ice", "boil it", 0),
    ]
    piqa_train = [{"goal": g, "sol1": a, "sol2": b, "label": label} for g, a, b, label in solutions]
    piqa_asked = [
        {"goal": "Tie a shoe", "sol1": "loop the laces", "sol2": "glue it", "label": 0},
        {"goal": "Wake up early", "sol1": "set an alarm", "sol2": "stay up late", "label": 0},
    ]
    piqa = read_benchmark(
        write_jsonl(tmp_path / "piqa_val.jsonl", piqa_asked),
        num_fewshot=2,
        fewshot_file=write_jsonl(tmp_path / "piqa_train.jsonl", piqa_train),
    )
    assert [r.prompt for r in piqa] == [
        "Question: Cut paper\nAnswer: use scissors\n\nQuestion: Open a jar\nAnswer: twist the lid\n\n"
        "Question: Tie a shoe\nAnswer:",
        "Question: Open a jar\nAnswer: twist the lid\n\nQuestion: Light a room\nAnswer: switch on a lamp\n\n"
        "Question: Wake up early\nAnswer:",
    ]

    facts = [("gas", "ice", "steam", "B"), ("metal", "iron", "wood", "A"), ("liquid", "water", "rock", "A")]
    facts += [("planet", "Mars", "Moon", "A"), ("mammal", "whale", "shark", "A"), ("star", "Sun", "Earth", "A")]
    arc_train = [
        {"question": f"Which is a {kind}?", "choices": {"text": [a, b], "label": ["A", "B"]}, "answerKey": key}
        for kind, a, b, key in facts
    ]
    arc_asked = [
        {"question": "Which is hot?", "choices": {"text": ["fire", "snow"], "label": ["A", "B"]}, "answerKey": "A"},
        {"question": "Which is cold?", "choices": {"text": ["fire", "ice"], "label": ["A", "B"]}, "answerKey": "B"},
    ]
    arc = read_benchmark(
        write_jsonl(tmp_path / "arc_test.jsonl", arc_asked),
        num_fewshot=2,
        fewshot_file=write_jsonl(tmp_path / "arc_train.jsonl", arc_train),
    )
    assert arc[1].prompt == (
        "Question: Which is a gas?\nAnswer: steam\n\nQuestion: Which is a star?\nAnswer: Sun\n\n"
        "Question: Which is cold?\nAnswer:"
    )

    model, tokenizer = load_model(str(tiny_model_dir)).eval(), load_tokenizer(str(tiny_model_dir))
    result = evaluate_choices(str(tiny_model_dir), data, num_fewshot=2, fewshot_file=train_file, progress=False)
    expected = [direct_loglikelihood(model, tokenizer, rows[1].prompt, f" {c}") for c in rows[1].choices]
    assert result["samples"][1]["loglikelihoods"] == pytest.approx(expected, abs=1e-4)


def test_a_choice_merged_with_the_context_is_scored_on_the_whole_encoding(tiny_model_dir):
    """ "The qu" + "ick brown" encodes as "The quick brown": the continuation is what the whole encoding holds
    past the context's tokens (" brown"), read after the context's own tokens, as the harness takes it; a
    trailing space of the context moves to the continuation."""
    model, tokenizer = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    context, continuation = "The qu", "ick brown"
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    assert len(whole) == len(context_ids) + 1 and whole[len(context_ids) - 1] != context_ids[-1]  # "Ġquick"
    pairs = [
        *encode_choices(tokenizer, context, [continuation]),
        *encode_choices(tokenizer, "What is two plus ", ["two"]),
    ]
    assert pairs[0] == (context_ids, tokenizer(" brown", add_special_tokens=False)["input_ids"])
    assert pairs[1][1] == tokenizer(" two", add_special_tokens=False)["input_ids"]
    scores = loglikelihoods(model, pairs, tokenizer.pad_token_id, batch_size=2)
    assert scores[0] == pytest.approx(direct_loglikelihood(model, tokenizer, context, continuation), abs=1e-4)
    assert scores[1] == pytest.approx(direct_loglikelihood(model, tokenizer, "What is two plus", " two"), abs=1e-4)


def test_layouts_read_as_the_benchmarks_ship_them(tmp_path):
    """MMLU's JSON and its header-less CSV, ARC's two shapes, HellaSwag's and PIQA's rows, each rendered as
    the harness renders its task."""
    mmlu_csv = tmp_path / "anatomy_test.csv"
    mmlu_csv.write_text('"What is 2+2?",3,4,5,6,B\nWhich bone?,femur,skull,rib,ulna,A\n')
    rows = read_choice_rows(mmlu_csv)
    assert [(r.line, r.choices, r.answer) for r in rows] == [
        (1, ("3", "4", "5", "6"), 1),
        (2, ("femur", "skull", "rib", "ulna"), 0),
    ]
    assert rows[0].context == "Question: What is 2+2?\nAnswer:"
    headed = tmp_path / "headed.csv"
    headed.write_text('question,A,B,C,D,answer\n"What is 2+2?",3,4,5,6,B\n')
    assert read_choice_rows(headed)[0].answer == 1
    arc = write_jsonl(
        tmp_path / "arc.jsonl",
        [
            {
                "question": {
                    "stem": "Which is a gas?",
                    "choices": [{"text": "ice", "label": "A"}, {"text": "steam", "label": "B"}],
                },
                "answerKey": "B",
            },
            {
                "question": "Which is a metal?",
                "choices": {"text": ["iron", "wood"], "label": ["1", "2"]},
                "answerKey": "1",
            },
        ],
    )
    assert [(r.context, r.choices, r.answer) for r in read_choice_rows(arc)] == [
        ("Question: Which is a gas?\nAnswer:", ("ice", "steam"), 1),
        ("Question: Which is a metal?\nAnswer:", ("iron", "wood"), 0),
    ]
    hellaswag = write_jsonl(
        tmp_path / "hellaswag.jsonl",
        [
            {
                "activity_label": "Baking cookies",
                "ctx_a": "A woman mixes flour.",
                "ctx_b": "she",
                "ctx": "A woman mixes flour. she",
                "endings": ["bakes the dough [title] Step two.", "swims."],
                "label": "0",
            }
        ],
    )
    row = read_choice_rows(hellaswag)[0]
    assert (row.context, row.choices, row.answer) == (
        "Baking cookies: A woman mixes flour. She",
        ("bakes the dough. Step two.", "swims."),
        0,
    )
    parquet = tmp_path / "mmlu_anatomy.parquet"  # the Hugging Face dataset's file, a column of lists
    pyarrow.parquet.write_table(
        pyarrow.Table.from_pylist(
            [{"question": "Which bone?", "subject": "anatomy", "choices": ["femur", "rib"], "answer": 1}]
        ),
        parquet,
    )
    assert is_choice_file(parquet) and read_choice_rows(parquet)[0].choices == ("femur", "rib")
    piqa = write_jsonl(tmp_path / "piqa.jsonl", [{"goal": "Open a jar", "sol1": "twist", "sol2": "sing", "label": 0}])
    assert read_choice_rows(piqa)[0].choices == ("twist", "sing")


def test_a_headerless_mmlu_csv_whose_first_line_repeats_a_cell_is_read_cell_by_cell(tmp_path):
    """MMLU's CSV files have no header: the first line is a question, whose cells may repeat (two equal choices,
    or the answer's letter as a choice) and keep their spaces; each is read where it stands."""
    data = tmp_path / "quiz_test.csv"
    data.write_text("Which two are equal?, 1 ,1,B,A,C\nWhich bone?,femur,skull,rib,ulna,A\nWhat is 2+2?,3,4,5,6\n")
    with pytest.raises(DataError) as err:
        read_choice_rows(data)
    assert [(p.line, p.code) for p in err.value.problems] == [(3, "csv_field_count")]
    data.write_text("Which two are equal?, 1 ,1,B,A,C\nWhich bone?,femur,skull,rib,ulna,A\n")
    assert [(r.line, r.question, r.choices, r.answer) for r in read_choice_rows(data)] == [
        (1, "Which two are equal?", (" 1 ", "1", "B", "A"), 2),
        (2, "Which bone?", ("femur", "skull", "rib", "ulna"), 0),
    ]


def test_a_headerless_csv_row_short_of_a_field_is_measured_against_the_first_line(tmp_path):
    """MMLU's CSV files have no header: a row short of a field (a choice left out) is compared with the first
    line's fields, which is how the file is read, not with a header it does not have."""
    data = tmp_path / "anatomy_test.csv"
    data.write_text("Which bone?,femur,skull,rib,ulna,A\nWhich organ?,heart,liver,lung,B\n")
    with pytest.raises(DataError) as err:
        read_choice_rows(data)
    [problem] = err.value.problems
    assert (problem.line, problem.code) == (2, "csv_field_count")
    assert problem.message.startswith("this row has 5 fields but the first line has 6 (the file has no header)")


def test_a_headerless_csv_s_first_line_is_read_as_a_question_whatever_its_answer_letter(tmp_path):
    """A lower-case answer letter is read as its capital on the first line as on the others, and a letter past D
    there is refused as that row's answer, not taken for a header of another layout."""
    data = tmp_path / "anatomy_test.csv"
    data.write_text("Which bone?,femur,skull,rib,ulna,a\nWhich organ?,heart,liver,lung,skin,b\n")
    assert is_choice_file(data)
    assert [(r.line, r.answer) for r in read_choice_rows(data)] == [(1, 0), (2, 1)]
    data.write_text("Which bone?,femur,skull,rib,ulna,E\nWhich organ?,heart,liver,lung,skin,B\n")
    with pytest.raises(DataError) as err:
        read_choice_rows(data)
    [problem] = err.value.problems
    assert (problem.line, problem.field, problem.code) == (1, "answer", "bad_choice_row")
    assert "A, B, C or D, got 'E'" in problem.message


def test_reading_a_csv_closes_its_file(tmp_path):
    """Judging a CSV by its header and reading some of its rows (MMLU's header-less files are opened twice)
    leave no file open."""
    headerless, headed = tmp_path / "mmlu_test.csv", tmp_path / "quiz.csv"
    headerless.write_text("Which bone?,femur,skull,rib,ulna,A\nWhat is 2+2?,3,4,5,6,B\n")
    headed.write_text("question,A,B,C,D,answer\nWhich bone?,femur,skull,rib,ulna,A\nWhat is 2+2?,3,4,5,6,B\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        for data in (headerless, headed):
            assert is_choice_file(data) and len(read_choice_rows(data, limit=1)) == 1
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []


def test_blank_lines_are_skipped_as_training_data_s_are_and_said(tmp_path):
    """A blank line between questions is skipped, as the training data's reader skips it, and a warning names it;
    a file read for its questions and its few-shot examples says so once."""
    data = tmp_path / "quiz.jsonl"
    lines = [json.dumps(QUESTIONS[0]), "", json.dumps(QUESTIONS[1]), "  ", json.dumps(QUESTIONS[2]), ""]
    data.write_text("\n".join(lines) + "\n")
    for fewshot in (0, 1):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rows = read_benchmark(data, num_fewshot=fewshot)
        assert [row.line for row in rows] == [1, 3, 5]
        assert [str(w.message) for w in caught] == [f"{data}: 3 blank lines skipped (lines 2, 4, 6)."]


def test_a_file_in_no_known_layout_is_told_the_multiple_choice_layouts_too(tiny_model_dir, tmp_path):
    """A CSV or JSON Lines file that is neither chat data nor multiple choice: its message names both."""
    (tmp_path / "quiz.csv").write_text("prompt_text,right\nWhich bone?,femur\n")
    write_jsonl(tmp_path / "quiz.jsonl", [{"q": "Which bone?", "options": ["femur", "rib"], "answer": 0}])
    for name in ("quiz.csv", "quiz.jsonl"):
        with pytest.raises(DataError) as err:
            eval_command(str(tiny_model_dir), str(tmp_path / name))
        assert [p.code for p in err.value.problems] == ["unknown_format"]
        message = err.value.problems[0].message
        assert "alpaca" in message and "MMLU's CSV (question, A, B, C, D, answer letter)" in message


def test_bad_rows_are_refused_with_file_line_and_field(tmp_path):
    data = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            QUESTIONS[0],
            {"question": "Q?", "choices": ["a"], "answer": 0},
            {"question": "Q?", "choices": ["a", "b"], "answer": 2},
            {"question": "Q?", "choices": ["a", "b"], "answer": "c"},
            {"question": "Q?", "choices": ["a", "b"]},
        ],
    )
    with pytest.raises(DataError) as err:
        read_choice_rows(data)
    message = str(err.value)
    assert f"{data}:2" in message
    for line, field in ((2, "choices"), (3, "answer"), (4, "answer"), (5, "answer")):
        assert any(p.line == line and p.field == field for p in err.value.problems), (line, field, message)
    assert "out of range" in message and "none of the choices" in message and "is missing" in message


def test_a_few_shot_file_in_no_multiple_choice_layout_is_refused_naming_its_rows(tmp_path):
    """--fewshot-file (or eval.benchmarks' fewshot_file) of chat rows: each row refused with its file and line, and
    the layouts to give, before any model loads."""
    data = write_jsonl(tmp_path / "quiz.jsonl", QUESTIONS)
    chat = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 2
    fewshot = write_jsonl(tmp_path / "dev.jsonl", chat)
    with pytest.raises(DataError) as err:
        read_benchmark(data, num_fewshot=1, fewshot_file=fewshot)
    expected = [(str(fewshot), line, "bad_choice_row") for line in (1, 2)]
    assert [(p.file, p.line, p.code) for p in err.value.problems] == expected
    assert "in no multiple-choice layout (its keys: messages)" in str(err.value)
    assert "MMLU's CSV (question, A, B, C, D, answer letter)" in str(err.value)


def test_hellaswag_s_context_fields_of_another_type_are_refused_not_written_into_the_context(tmp_path):
    """HellaSwag's ctx_b and activity_label go into the context as text: null, a number or a list is refused with
    its file, line and field rather than written there as "None" or "['x']"; ctx_b may be empty, as HellaSwag's is."""
    row = {"activity_label": "Baking", "ctx_a": "A woman mixes flour.", "ctx_b": "she", "endings": ["a.", "b."]}
    rows = [
        {**row, "label": "0", "ctx_b": None},
        {**row, "label": "0", "activity_label": ["Baking"]},
        {**row, "label": "0", "ctx_b": 3},
    ]
    with pytest.raises(DataError) as err:
        read_choice_rows(write_jsonl(tmp_path / "hellaswag.jsonl", rows))
    fields = [(p.line, p.field) for p in err.value.problems]
    assert fields == [(1, "ctx_b"), (2, "activity_label"), (3, "ctx_b")], str(err.value)
    assert "must be text (it may be empty), got None" in str(err.value)
    (read,) = read_choice_rows(write_jsonl(tmp_path / "empty_b.jsonl", [{**row, "label": "0", "ctx_b": ""}]))
    assert read.context == "Baking: A woman mixes flour."


def test_arc_labels_given_twice_are_refused_as_an_answer_key_that_names_no_one_choice(tmp_path):
    """ARC's answerKey names its choice by label: two choices of one label leave it naming either, refused with
    the file, line and field rather than read as the first."""
    rows = [
        {"question": "2+2?", "choices": {"text": ["3", "4"], "label": ["A", "A"]}, "answerKey": "A"},
        {
            "question": {"stem": "2+2?", "choices": [{"text": "3", "label": "1"}, {"text": "4", "label": 1}]},
            "answerKey": "1",
        },
    ]
    with pytest.raises(DataError) as err:
        read_choice_rows(write_jsonl(tmp_path / "arc.jsonl", rows))
    assert [(p.line, p.field) for p in err.value.problems] == [(1, "choices.label"), (2, "question.choices.label")]
    assert "label 'A' is given to choices 0 and 1" in str(err.value)


def test_a_question_too_long_only_with_its_few_shot_examples_is_told_to_take_fewer(tiny_model_dir, tmp_path):
    """A short question that its few-shot examples push past the context: the refusal says so, and to take fewer
    or shorter examples, not to shorten the row; a question too long on its own is told to shorten it."""
    data = write_jsonl(tmp_path / "quiz.jsonl", QUESTIONS[:1] + [{**QUESTIONS[1], "question": "word " * 3000}])
    dev = write_jsonl(tmp_path / "dev.jsonl", [{**QUESTIONS[0], "question": "word " * 3000}])
    tokenizer = load_tokenizer(str(tiny_model_dir))
    with pytest.raises(DataError) as err:
        check_scorable(read_benchmark(data, num_fewshot=1, fewshot_file=dev), tokenizer, 2048)
    (short, long) = err.value.problems
    assert short.line == 1 and "with its 1 few-shot example" in short.message
    assert "lower the number of few-shot examples (--num-fewshot, num_fewshot) or give shorter ones" in short.message
    assert long.line == 2 and "shorten the row or leave it out" in long.message


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
@pytest.mark.parametrize("under", ["", "arc"])
def test_an_out_folder_that_cannot_be_written_is_refused_before_the_model_loads(tiny_model_dir, tmp_path, under):
    """--out in a read-only folder: refused, naming it, before the model loads and every question is scored."""
    data = write_jsonl(tmp_path / "quiz.jsonl", QUESTIONS)
    (tmp_path / "ro").mkdir(mode=0o555)
    out = tmp_path / "ro" / under
    with pytest.raises(ConfigError, match=f"--out {out}: {tmp_path / 'ro'} cannot be written into"):
        eval_command(str(tiny_model_dir), str(data), out=str(out))


def test_an_answer_in_digits_is_the_choice_with_that_text_and_refused_where_it_is_another_choices_index(tmp_path):
    """A quiz of numbers gives its answer as the right choice's text ("4" of "3", "4", "5"), as the layout reads
    text answers; digits that are one choice's text and another's index ("2" among "1", "2", "3") are refused."""
    data = write_jsonl(
        tmp_path / "sums.jsonl",
        [
            {"question": "What is 2+2?", "choices": ["3", "4", "5"], "answer": "4"},
            {"question": "What is 1+1?", "choices": ["1", "2", "3"], "answer": 1},
            {"question": "What is 9-8?", "choices": ["0", "1", "2"], "answer": "1"},
        ],
    )
    assert [r.answer for r in read_choice_rows(data)] == [1, 1, 1]
    data = write_jsonl(tmp_path / "ambiguous.jsonl", [{"question": "1+1?", "choices": ["1", "2", "3"], "answer": "2"}])
    with pytest.raises(DataError, match=r"ambiguous.jsonl:1 answer: .*'2' is the text of choice 1 and the index of"):
        read_choice_rows(data)


def test_command_compares_with_paired_difference_and_writes_rows(tiny_model_dir, tmp_path, capsys):
    """--compare gives both models and the paired change; --out each question's results; --limit; and the
    options of generated answers are refused, named."""
    from peft import LoraConfig, get_peft_model

    adapter = tmp_path / "adapter"
    torch.manual_seed(1)
    peft_model = get_peft_model(
        load_model(str(tiny_model_dir)),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, lora_alpha=64),
    )
    peft_model.save_pretrained(adapter)
    load_tokenizer(str(tiny_model_dir)).save_pretrained(adapter)
    data = write_jsonl(tmp_path / "quiz.jsonl", QUESTIONS)
    result = compare(str(adapter), str(tiny_model_dir), data, limit=2, progress=False)
    assert result["base"]["n"] == result["tuned"]["n"] == 2
    tokenizer = load_tokenizer(str(tiny_model_dir))
    context = f"Question: {QUESTIONS[0]['question']}\nAnswer:"
    expected = direct_loglikelihood(peft_model.eval(), tokenizer, context, " four")
    assert result["tuned"]["samples"][0]["loglikelihoods"][0] == pytest.approx(expected, abs=1e-4)
    assert result["tuned"]["samples"][0]["loglikelihoods"] != result["base"]["samples"][0]["loglikelihoods"]
    base_right = [s["correct"] for s in result["base"]["samples"]]
    tuned_right = [s["correct"] for s in result["tuned"]["samples"]]
    assert result["difference"]["acc"]["change"] == (sum(tuned_right) - sum(base_right)) / 2
    assert result["difference"]["acc"]["gained"] == sum(t and not b for b, t in zip(base_right, tuned_right))

    out = tmp_path / "out"
    assert eval_command(str(adapter), str(data), compare=str(tiny_model_dir), out=str(out)) == 0
    printed = capsys.readouterr().out
    assert "acc_norm" in printed and "change (paired)" in printed and "results.jsonl" in printed
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [row["line"] for row in lines] == [1, 2, 3]
    assert set(lines[0]["base"]) >= {"loglikelihoods", "correct", "correct_norm"}

    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    for given in (taken, taken / "arc"):  # refused before scoring, the file kept
        with pytest.raises(ConfigError, match=f"--out {given}: {taken} is a file, not a folder"):
            eval_command(str(tiny_model_dir), str(data), out=str(given))
    assert taken.read_text() == "mine"

    with pytest.raises(ConfigError, match="--metric, --max-new-tokens do not apply"):
        eval_command(str(tiny_model_dir), str(data), metric="exact", max_new_tokens=4)


def test_benchmarks_take_a_path_or_a_file_with_its_few_shot_examples(tmp_path):
    """eval.benchmarks: a plain path, or {file, num_fewshot, fewshot_file}, each read against the config's folder;
    a fewshot_file without num_fewshot is refused, named."""
    write_jsonl(tmp_path / "arc.jsonl", QUESTIONS)
    write_jsonl(tmp_path / "arc_dev.jsonl", QUESTIONS)
    config = tmp_path / "run.yaml"
    config.write_text(
        "data: {train: arc.jsonl}\neval:\n  benchmarks:\n    - arc.jsonl\n"
        "    - {file: arc.jsonl, num_fewshot: 25, fewshot_file: arc_dev.jsonl}\n"
    )
    plain, shots = load_config(config).eval.benchmarks
    assert (plain.file, plain.num_fewshot, plain.fewshot_file) == (str(tmp_path / "arc.jsonl"), 0, None)
    assert (shots.file, shots.num_fewshot, shots.fewshot_file) == (
        str(tmp_path / "arc.jsonl"),
        25,
        str(tmp_path / "arc_dev.jsonl"),
    )
    config.write_text(
        "data: {train: arc.jsonl}\neval:\n  benchmarks:\n    - {file: arc.jsonl, fewshot_file: arc_dev.jsonl}\n"
    )
    with pytest.raises(ConfigError, match="eval.benchmarks.0.*num_fewshot is 0"):
        load_config(config)


def test_a_benchmark_file_of_chat_rows_is_refused_once_by_its_key(tiny_model_dir, triage_data, tmp_path):
    """eval.benchmarks naming a chat file (the run's test set, say), or --fewshot-file naming one, is refused before
    any model loads in one line that names the key (or option) and the file's first row's keys, not once for each
    of its rows."""
    from tuneforge.eval.after_training import check_eval_inputs

    config = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run")
    chat = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 30
    test = write_jsonl(tmp_path / "test.jsonl", chat)
    quiz = write_jsonl(tmp_path / "quiz.jsonl", QUESTIONS)
    with pytest.raises(ConfigError) as err:
        check_eval_inputs(load_config({**config, "eval": {"benchmarks": [str(quiz), str(test)]}}))
    message = err.value.message
    assert message.startswith(f"eval.benchmarks.1: {test} holds no multiple-choice questions (its first row")
    assert "keys: messages, at line 1)" in message and "MMLU's CSV" in message
    assert len(message.splitlines()) == 1
    # The same file as `tuneforge eval --fewshot-file`.
    with pytest.raises(ConfigError, match=f"^--fewshot-file: {test} holds no multiple-choice questions"):
        eval_command(str(tiny_model_dir), str(quiz), num_fewshot=1, fewshot_file=str(test))


def test_after_training_scores_benchmarks_base_vs_tuned(tiny_model_dir, triage_data, tmp_path):
    """eval.benchmarks: a bad row is refused before training, naming file, line and field; a good file is scored
    on the base and the final model into the metrics, the report's tables and eval/benchmark_NAME.*."""
    bad = write_jsonl(tmp_path / "bad.jsonl", [QUESTIONS[0], {"question": "Q?", "choices": ["a", "b"], "answer": 7}])
    config = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=2)
    with pytest.raises(DataError, match=r"bad.jsonl:2 answer: .*out of range"):
        train({**config, "eval": {"benchmarks": [str(bad)]}}, progress=False)
    assert not (tmp_path / "run").exists()
    quiz = write_jsonl(tmp_path / "house-quiz.jsonl", QUESTIONS)
    one_shot = {"file": str(quiz), "num_fewshot": 1}  # the same file few-shot reports under its own name
    result = train({**config, "eval": {"benchmarks": [str(quiz), one_shot]}}, progress=False)
    assert set(result.metrics) >= {"benchmark_house_quiz_1shot_acc", "benchmark_house_quiz_1shot_acc_norm"}
    shot = json.loads((tmp_path / "run" / "eval" / "benchmark_house_quiz_1shot.json").read_text())
    assert shot["tuned"]["num_fewshot"] == 1 and "1-shot" in (tmp_path / "run" / "eval" / "report.html").read_text()
    figures = json.loads((tmp_path / "run" / "eval" / "benchmark_house_quiz.json").read_text())
    assert result.metrics["benchmark_house_quiz_acc"] == figures["tuned"]["scores"]["acc"]
    assert result.metrics["benchmark_house_quiz_acc_norm"] == figures["tuned"]["scores"]["acc_norm"]
    assert set(figures["difference"]) == {"acc", "acc_norm"}
    rows = (tmp_path / "run" / "eval" / "benchmark_house_quiz.jsonl").read_text().splitlines()
    assert [json.loads(r)["line"] for r in rows] == [1, 2, 3]
    assert "change (paired)" in (tmp_path / "run" / "eval" / "report.html").read_text()


@pytest.mark.parametrize("options", [{"num_fewshot": 2}, {"out": "scores"}, {}])
def test_eval_names_a_missing_data_file_as_missing_whatever_the_options(tiny_model_dir, tmp_path, options):
    """A mistyped DATA path is said not to exist, not to hold no multiple-choice questions (--num-fewshot) or
    neither pairs nor questions (--out)."""
    from tuneforge.errors import TuneforgeError
    from tuneforge.eval.command import evaluate_model

    with pytest.raises(TuneforgeError, match=r"nosuch\.jsonl does not exist\. Check the path\.$") as err:
        evaluate_model(str(tiny_model_dir), tmp_path / "nosuch.jsonl", **options)
    assert err.value.code == "file_not_found"


@pytest.mark.parametrize("pattern", [False, True])
def test_eval_given_a_folder_or_a_pattern_is_told_to_name_one_file(tiny_model_dir, tmp_path, pattern):
    """eval reads one DATA file a call: a folder or a pattern is told so, not pointed at data.train's list."""
    from tuneforge.errors import TuneforgeError
    from tuneforge.eval.command import evaluate_model

    write_jsonl(tmp_path / "quiz.jsonl", QUESTIONS)
    data = tmp_path / "*.jsonl" if pattern else tmp_path
    with pytest.raises(TuneforgeError) as err:
        evaluate_model(str(tiny_model_dir), data)
    assert err.value.code == "file_not_found"
    assert str(err.value).endswith("Give one data file by name: eval scores one file a call.")
    assert "data.train takes a list" not in str(err.value)


@pytest.mark.parametrize("pattern", [False, True])
def test_a_benchmark_or_fewshot_file_given_as_a_folder_or_a_pattern_is_told_to_name_one_file(tmp_path, pattern):
    """A multiple-choice file (eval's --fewshot-file, eval.benchmarks' file and fewshot_file) is one file: a folder
    or a pattern is told so, not pointed at data.train's list."""
    write_jsonl(tmp_path / "quiz.jsonl", QUESTIONS)
    given = tmp_path / "*.jsonl" if pattern else tmp_path
    with pytest.raises(DataError) as err:
        read_choice_rows(given)
    [problem] = err.value.problems
    assert problem.code == "file_not_found"
    assert problem.message.endswith("Give one data file by name: a multiple-choice benchmark reads one file a call.")
    assert "data.train takes a list" not in str(err.value)
