"""Multiple-choice benchmarks scored by log-likelihood, as lm-evaluation-harness scores them.

    from tuneforge.eval.choices import evaluate_choices
    result = evaluate_choices("runs/my-run", "mmlu_anatomy.jsonl")
    result["scores"]["acc"], result["scores"]["acc_norm"], result["samples"][0]["loglikelihoods"]

Each row is a question and its choices; each choice is scored by the log-probability of " CHOICE" as a
continuation of the question rendered as the harness renders it by default, as raw text (no chat template):
"Question: QUESTION\\nAnswer:" (its ARC, PIQA and `mmlu_continuation` tasks, the last with MMLU's question
stripped), HellaSwag's context as its task cleans it. An MMLU question whose row (`subject`, as the Hugging
Face dataset's) or file name (SUBJECT_test.csv, _dev, _val, as MMLU ships them) names one of MMLU's 57 subjects
starts with `mmlu_continuation`'s header, "The following are questions (with answers) about SUBJECT.\\n\\n" (the
subject's _ as spaces), before any few-shot example. Few-shot examples are chosen as the harness's task for
the layout chooses them: MMLU's (`mmlu_continuation`) are the first N of the examples' file on the question's
subject, the others' drawn at random with a seeded generator (HellaSwag's and PIQA's N + 1, the first N kept).
`acc` is the share of rows whose most likely choice is the answer; `acc_norm` ranks the choices by
log-likelihood over the choice's length in characters (the harness's `len(choice)`).

The continuation's tokens are the harness's: the context and context + continuation are encoded, and the
continuation is what the whole encoding holds past the context's tokens (a trailing space of the context
moves to the continuation first), so a choice whose first token merges with the context's last character is
scored on the tokens the model reads.

The layouts read, with no download: `{"question", "choices": [...], "answer": index or the choice's text}`
(MMLU's too); MMLU's CSV (question, A, B, C, D, answer letter; with that header or none); ARC's
(`question` as `{stem, choices}` or `question` and `choices` as `{text, label}`, `answerKey`); HellaSwag's
(`ctx` or `ctx_a`/`ctx_b`, `endings`, `label`); PIQA's (`goal`, `sol1`, `sol2`, `label`); in JSON Lines, a
JSON array or Parquet (the Hugging Face datasets' files).
"""

from __future__ import annotations

import json
import math
import random
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..data import Problem
from ..data.readers import one_file_by_name, open_rows
from ..data.schema import IGNORE_INDEX
from ..errors import DataError, check_counts, refuse_options
from ..fsio import atomic_file
from ..generate import per_tokenizer
from ..methods.sft import trained_logits
from ..models import causal_lm, load_text_model, load_tokenizer, resolve, source_context_length
from ..progress import library_bars, progress_bar
from ..wording import counted, first_places
from .report import share_interval

DEFAULT_BATCH_SIZE = 16  # (context, choice) requests per forward
LETTERS = "ABCDEFGHIJ"
FEWSHOT_SEED = 1234  # lm-evaluation-harness's default seed for drawing few-shot examples
# The layouts whose harness task takes the first N examples in order (its fewshot_config's sampler first_n):
# MMLU's `mmlu_continuation`, from each subject's dev split.
FIRST_N = frozenset({"mmlu"})
# The layouts whose harness task names no test split (HellaSwag's and PIQA's, scored on validation): the harness
# takes their few-shot split (none named either) for the split asked, so it draws N + 1 examples and keeps the
# first N other than the question asked, even from the train split.
ONE_MORE = frozenset({"hellaswag", "piqa"})
# `mmlu_continuation`'s header before a question on SUBJECT (its _ as spaces), few-shot or not.
MMLU_DESCRIPTION = "The following are questions (with answers) about {}.\n\n"
# MMLU's CSV files are named for their subject and split: SUBJECT_test.csv, SUBJECT_dev.csv, SUBJECT_val.csv.
MMLU_FILE_NAME = re.compile(r"(?P<subject>\w+?)_(?:test|dev|val)")
# MMLU's 57 subjects, as its rows and files name them: the header is for these only (ScienceQA's rows name a
# subject too, "natural science", and a file of MMLU's columns may be named NAME_test.csv).
MMLU_SUBJECTS = frozenset(
    """abstract_algebra anatomy astronomy business_ethics clinical_knowledge college_biology college_chemistry
    college_computer_science college_mathematics college_medicine college_physics computer_security
    conceptual_physics econometrics electrical_engineering elementary_mathematics formal_logic global_facts
    high_school_biology high_school_chemistry high_school_computer_science high_school_european_history
    high_school_geography high_school_government_and_politics high_school_macroeconomics high_school_mathematics
    high_school_microeconomics high_school_physics high_school_psychology high_school_statistics
    high_school_us_history high_school_world_history human_aging human_sexuality international_law jurisprudence
    logical_fallacies machine_learning management marketing medical_genetics miscellaneous moral_disputes
    moral_scenarios nutrition philosophy prehistory professional_accounting professional_law professional_medicine
    professional_psychology public_relations security_studies sociology us_foreign_policy virology
    world_religions""".split()
)
# MMLU's CSV: the question, a column per choice, the answer's letter.
MMLU_COLUMNS = ("question", "A", "B", "C", "D", "answer")
LAYOUTS = (
    '{"question", "choices": [...], "answer": index or the choice\'s text} (MMLU\'s too); MMLU\'s CSV (question, '
    'A, B, C, D, answer letter); ARC\'s {"question": {"stem", "choices"}, "answerKey"} or {"question", "choices": '
    '{"text", "label"}, "answerKey"}; HellaSwag\'s {"ctx", "endings", "label"}; PIQA\'s {"goal", "sol1", "sol2", '
    '"label"}'
)


@dataclass(frozen=True)
class ChoiceRow:
    file: str
    line: int
    context: str  # the question as the model reads it, after `examples`
    choices: tuple[str, ...]
    answer: int
    question: str  # the question as the row gives it, for tables
    task: str = "choices"  # whose few-shot rules the row follows: mmlu, arc, hellaswag, piqa, or choices
    subject: str = ""  # MMLU's subject, as its row or file names it
    examples: tuple[str, ...] = ()  # the solved examples shown before the question (`with_fewshot`)

    @property
    def description(self) -> str:
        """The text before any few-shot example and the question: MMLU's subject header, where it names one."""
        return MMLU_DESCRIPTION.format(self.subject.replace("_", " ")) if self.subject else ""

    @property
    def prompt(self) -> str:
        """The whole text the choices continue: the description, then the examples and the context, each after a
        blank line."""
        return self.description + "\n\n".join([*self.examples, self.context])

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def choice_layout(row) -> str | None:
    """The multiple-choice layout a row (or a CSV header's columns) is in; None where it is none."""
    if isinstance(row, list):
        return "mmlu_csv" if _mmlu_header(row) or _headerless_mmlu(row) else None
    if not isinstance(row, dict):
        return None
    keys = set(row)
    if "endings" in keys and keys & {"ctx", "ctx_a"}:
        return "hellaswag"
    if {"goal", "sol1", "sol2"} <= keys:
        return "piqa"
    if "answerKey" in keys or isinstance(row.get("question"), dict):
        return "arc"
    if "question" in keys and "choices" in keys:
        return "choices"
    return None


def _mmlu_header(columns: list[str]) -> bool:
    return [c.lower() for c in columns] == [c.lower() for c in MMLU_COLUMNS]


def _headerless_mmlu(columns: list[str]) -> bool:
    """MMLU's own CSV files have no header: a first line of six fields whose last is one letter, its answer (a
    letter past D, or in lower case, is that row's to refuse or read as `_mmlu_row` does any row's)."""
    return len(columns) == 6 and re.fullmatch(r"[A-Za-z]", columns[-1].strip()) is not None


def is_choice_file(path: str | Path) -> bool:
    """Whether a data file holds multiple-choice rows (judged by its header or first row)."""
    with open_rows(path) as rows:
        if rows.kind == "csv":  # a Parquet file's rows are read whole, as JSON's are
            return choice_layout(rows.columns) is not None
        return next((choice_layout(row) is not None for _, row in rows if isinstance(row, dict)), False)


def layout_refusal(path: str | Path) -> str | None:
    """Where the first row of a JSON or Parquet file is in no multiple-choice layout (a chat file given as a
    benchmark): the file, that row's keys and the layouts to give, said once rather than for each row; else None."""
    with open_rows(path) as rows:
        if rows.kind == "csv":  # a CSV's header is refused once by `read_choice_rows`
            return None
        line, first = next(((line, row) for line, row in rows if isinstance(row, dict)), (None, None))
    if first is None or choice_layout(first) is not None:
        return None
    return (
        f"{path} holds no multiple-choice questions (its first row's keys: {', '.join(map(str, first))}, at line "
        f"{line}); give a file in one of: {LAYOUTS}."
    )


def _hellaswag_text(text: str) -> str:
    """HellaSwag's text as the harness's task cleans it: WikiHow's `[title]` marks and other brackets out."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _label_index(value, labels: list[str], field: str, bad: Callable[[str, str], None]) -> int | None:
    """The index of `value` among `labels` (ARC's answerKey); None after `bad` is told where it is not."""
    if str(value) in labels:
        return labels.index(str(value))
    bad(field, f"{value!r} is none of the choices' labels ({', '.join(labels)}); give one of them.")
    return None


def _index(value, count: int, field: str, bad: Callable[[str, str], None]) -> int | None:
    """A 0-based answer index (an int, or a string of digits as HellaSwag's `label`) within `count` choices."""
    if isinstance(value, str) and value.strip().isdecimal():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        bad(field, f"must be the answer's index among the choices (0 to {count - 1}), got {value!r}.")
        return None
    if not 0 <= value < count:
        bad(field, f"{value} is out of range: the row has {count} choices, so the answer is 0 to {count - 1}.")
        return None
    return value


def parse_choice_row(row, layout: str | None, file: str, line: int) -> ChoiceRow | list[Problem]:
    """One row in `layout` (None: the file's first row is in none) as a `ChoiceRow`, or its problems, each naming the
    file, line and field."""
    problems: list[Problem] = []

    def bad(field: str, message: str) -> None:
        problems.append(Problem("bad_choice_row", message, file=file, line=line, field=field))

    def text(field: str, value) -> str:
        if not isinstance(value, str) or not value.strip():
            bad(field, f"must be non-empty text, got {value!r}.")
            return ""
        return value

    def may_be_empty(field: str) -> str:
        """A field that may be empty or left out (HellaSwag's ctx_b and activity_label), else text."""
        value = row.get(field, "")
        if not isinstance(value, str):
            bad(field, f"must be text (it may be empty), got {value!r}.")
            return ""
        return value

    if layout is None:  # a chat file given as the few-shot file, say
        keys = f" (its keys: {', '.join(map(str, row))})" if isinstance(row, dict) else ""
        bad(None, f"the row is in no multiple-choice layout{keys}; give every row in one layout: {LAYOUTS}.")
        return problems
    # MMLU's CSV rows come as the generic layout's (`_mmlu_row`).
    if not isinstance(row, dict) or choice_layout(row) != ("choices" if layout == "mmlu_csv" else layout):
        found = choice_layout(row) if isinstance(row, dict) else None
        bad(
            None,
            f"the row is not in the file's layout ({layout}{f'; it is in {found}' if found else ''}); "
            f"give every row in one layout: {LAYOUTS}.",
        )
        return problems
    labels: list[str] | None = None
    subject, task = "", layout
    if layout == "hellaswag":
        if "ctx_a" in row:
            context = f"{text('ctx_a', row['ctx_a'])} {may_be_empty('ctx_b').capitalize()}"
        else:
            context = text("ctx", row["ctx"])
        question = context
        if activity := may_be_empty("activity_label"):
            context = f"{activity}: {context}"
        context = _hellaswag_text(context)
        choices_field, choices = "endings", row["endings"]
        answer_field = "label"
    elif layout == "piqa":
        question = text("goal", row["goal"])
        context = f"Question: {question}\nAnswer:"
        choices_field, choices = "sol1", [row["sol1"], row["sol2"]]
        answer_field = "label"
    elif layout == "arc":
        stem = row.get("question")
        choices_field = "question.choices" if isinstance(stem, dict) else "choices"
        if isinstance(stem, dict):
            stem, choices = stem.get("stem"), stem.get("choices")
            question = text("question.stem", stem)
        else:
            question, choices = text("question", stem), row.get("choices")
        if isinstance(choices, list) and all(isinstance(c, dict) for c in choices):  # AI2's [{text, label}]
            choices = {"text": [c.get("text") for c in choices], "label": [c.get("label") for c in choices]}
        if not isinstance(choices, dict) or not isinstance(choices.get("text"), list):
            bad(
                choices_field,
                f'must be {{"text": [...], "label": [...]}} or a list of {{text, label}}, got {choices!r}.',
            )
            return problems
        labels = [str(label) for label in choices.get("label") or LETTERS[: len(choices["text"])]]
        choices = choices["text"]
        context = f"Question: {question}\nAnswer:"
        answer_field = "answerKey"
    else:
        question = text("question", row["question"])
        if "subject" in row and (named := text("subject", row["subject"])) in MMLU_SUBJECTS:  # MMLU's rows name theirs
            subject = named
        task = "mmlu" if layout == "mmlu_csv" or subject else layout
        # `mmlu_continuation` strips the question (its doc_to_text); the harness's other tasks keep it as given.
        context = f"Question: {question.strip() if task == 'mmlu' else question}\nAnswer:"
        choices_field, choices = "choices", row["choices"]
        answer_field = "answer"
    if not isinstance(choices, list) or len(choices) < 2:
        bad(choices_field, f"must be a list of at least two choices, got {choices!r}.")
        return problems
    for i, choice in enumerate(choices):
        text(f"{choices_field}[{i}]" if layout != "piqa" else f"sol{i + 1}", choice)
    if answer_field not in row:
        bad(answer_field, "is missing: give the right choice.")
        return problems
    value = row[answer_field]
    if labels is not None:
        if len(labels) != len(choices):
            bad(f"{choices_field}.label", f"has {len(labels)} labels for {len(choices)} choices; give one each.")
            return problems
        if (twice := next((label for i, label in enumerate(labels) if label in labels[:i]), None)) is not None:
            first, second = [i for i, label in enumerate(labels) if label == twice][:2]
            bad(
                f"{choices_field}.label",
                f"label {twice!r} is given to choices {first} and {second}, so {answer_field} cannot name one of "
                "them; give each choice its own label.",
            )
            return problems
        answer = _label_index(value, labels, answer_field, bad)
    elif layout == "choices" and isinstance(value, str) and value in choices:
        # The answer given as the right choice's text; digits that are one choice's text and another's index
        # ("2" among the choices "1", "2", "3") could mean either.
        answer = choices.index(value)
        if value.strip().isdecimal() and answer != int(value) < len(choices):
            bad(
                answer_field,
                f"{value!r} is the text of choice {answer} and the index of choice {int(value)} "
                f"({choices[int(value)]!r}); give the index as a JSON number ({answer} or {int(value)}).",
            )
    elif layout == "choices" and isinstance(value, str) and not value.strip().isdecimal():
        bad(answer_field, f"{value!r} is none of the choices; give the right choice's text or its index.")
        answer = None
    else:
        answer = _index(value, len(choices), answer_field, bad)
    if problems:
        return problems
    if layout == "hellaswag":
        choices = [_hellaswag_text(c) for c in choices]
    return ChoiceRow(file, line, context, tuple(choices), answer, question, task, subject)


def read_choice_rows(path: str | Path, limit: int | None = None) -> list[ChoiceRow]:
    """The first `limit` (all, if None) multiple-choice rows of a file; a bad row is an error that names
    its file, line and field, all of them listed, before any model loads. Blank lines are skipped, as training
    data's are, and said in a warning that names them."""
    file = str(path)
    layout = None
    with open_rows(path) as rows:
        columns = rows.columns if rows.kind == "csv" else None
    if columns is not None:
        layout = choice_layout(columns)
        if layout is None:
            raise DataError(
                f"{file}: the CSV's columns ({', '.join(columns)}) are not a multiple-choice layout; give "
                f"MMLU's: {', '.join(MMLU_COLUMNS)} (or its header-less files, six fields a line).",
                code="bad_choice_row",
            )
    # MMLU's own files have no header: the first line is a question, its cells as given.
    rows = open_rows(
        path,
        header=columns is None or _mmlu_header(columns),
        by_name=one_file_by_name("a multiple-choice benchmark reads"),
    )
    items = iter(rows)
    if columns is not None:
        items = ((line, _mmlu_row(row, file, line)) for line, row in items)
    parsed: list[ChoiceRow] = []
    problems: list[Problem] = []
    blank_lines: list[int] = []
    with rows:
        for line, row in items:
            if isinstance(row, Problem):
                problems += [row] if row.is_error else []
                blank_lines += [line] if row.code == "blank_line" else []
                continue
            if limit is not None and len(parsed) >= limit:
                break
            layout = layout or choice_layout(row)
            result = parse_choice_row(row, layout, file, line)
            if isinstance(result, ChoiceRow):
                parsed.append(result)
            else:
                problems += result
    if problems:
        raise DataError.listing(f"{file}: {counted(len(problems), 'problem')} in the multiple-choice rows", problems)
    if not parsed:
        raise DataError(f"{file} has no multiple-choice rows. Give rows in one of: {LAYOUTS}.", code="empty_file")
    if blank_lines:
        where = first_places([str(line) for line in blank_lines])
        said = (
            f"{file}: {counted(len(blank_lines), 'blank line')} skipped (line{'s' * (len(blank_lines) > 1)} {where})."
        )
        warnings.warn(said, stacklevel=2)
    return parsed


def with_fewshot(
    rows: list[ChoiceRow], pool: list[ChoiceRow], num_fewshot: int, *, seed: int = FEWSHOT_SEED
) -> list[ChoiceRow]:
    """Each row with `num_fewshot` solved examples of `pool` before its question, as the harness's continuation
    tasks write them: each example's context, a space and its right choice ("Question: ...\nAnswer: CHOICE"),
    joined by a blank line and followed by one, after the row's description (MMLU's header), which the
    examples' own leave out. The examples are chosen as the harness task the row's layout follows chooses them
    (`FIRST_N`, else one generator seeded with `seed`, a sample per row in turn); where `pool` holds the row
    itself (its own file) or the task draws one more (`ONE_MORE`), one more is drawn. An example that is the
    row's question (the row itself, or another line with the same question, choices and answer) is left out,
    as the harness leaves out a drawn document equal to the one asked. An MMLU row's examples are those of
    `pool` on its subject, where `pool` names subjects, as the harness reads each subject's own dev split."""
    members = set(pool)
    on_subject: dict[str, list[ChoiceRow]] = {}
    for example in pool:
        on_subject.setdefault(example.subject, []).append(example)
    rng = random.Random(seed)
    shown = []
    for row in rows:
        by_subject = row.task == "mmlu" and bool(row.subject) and bool(on_subject.keys() - {""})
        candidates = on_subject.get(row.subject, []) if by_subject else pool
        own = row in members
        needed = num_fewshot + (own or row.task in ONE_MORE)
        if len(candidates) < needed:
            why = ""
            if own:
                why = " besides the question asked"
            elif needed > num_fewshot:
                why = f" and the one more the harness's {row.task} task draws"
            raise DataError(
                f"{pool[0].file} has {counted(len(candidates), 'question')}"
                f"{f' on {row.subject}' if by_subject else ''}, too few to draw {num_fewshot} examples{why}; lower "
                "the number of few-shot examples or give a file with more (--fewshot-file, fewshot_file).",
                code="too_few_examples",
            )
        drawn = candidates if row.task in FIRST_N else rng.sample(candidates, needed)
        asked = (row.context, row.choices, row.answer)
        examples = [e for e in drawn if (e.context, e.choices, e.answer) != asked][:num_fewshot]
        solved = [f"{example.context} {example.choices[example.answer]}" for example in examples]
        shown.append(replace(row, examples=tuple(solved)))
    return shown


def read_benchmark(
    path: str | Path,
    limit: int | None = None,
    *,
    num_fewshot: int = 0,
    fewshot_file: str | Path | None = None,
    seed: int = FEWSHOT_SEED,
) -> list[ChoiceRow]:
    """The first `limit` rows of a multiple-choice file (`read_choice_rows`), each after `num_fewshot` solved
    examples drawn from `fewshot_file` (the harness's dev or train split), else from the whole file without the
    row itself (`with_fewshot`). A `fewshot_file` that is `path` under another spelling (./quiz.jsonl) is the
    file itself: its rows are the questions asked, left out of their own examples, and the file is read once."""
    if fewshot_file is not None and Path(fewshot_file).resolve() == Path(path).resolve():
        fewshot_file = None
    if not num_fewshot or fewshot_file is not None:
        rows = read_choice_rows(path, limit)
        return with_fewshot(rows, read_choice_rows(fewshot_file), num_fewshot, seed=seed) if num_fewshot else rows
    pool = read_choice_rows(path)
    return with_fewshot(pool[:limit], pool, num_fewshot, seed=seed)


def _mmlu_row(row, file: str, line: int):
    """A row of MMLU's CSV as the generic layout (the answer's letter as its index), or its problem."""
    if isinstance(row, Problem):
        return row
    cells = list(row.values())
    letter = cells[5].strip().upper()
    if len(letter) != 1 or letter not in "ABCD":
        return Problem(
            "bad_choice_row",
            f"the answer must be the right choice's letter, A, B, C or D, got {cells[5]!r}.",
            file=file,
            line=line,
            field="answer",
        )
    named = MMLU_FILE_NAME.fullmatch(Path(file).name.split(".")[0])
    subject = {"subject": named["subject"]} if named and named["subject"] in MMLU_SUBJECTS else {}
    return {"question": cells[0], "choices": cells[1:5], "answer": LETTERS.index(letter), **subject}


# --- scoring ---------------------------------------------------------------------------------------


def encode_choices(tokenizer, context: str, continuations: list[str]) -> list[tuple[list[int], list[int]]]:
    """Each continuation's (context tokens, continuation tokens) as the harness takes them: a trailing space of the
    context moves to the continuation, and the continuation's tokens are those of the whole past the context's.
    The context, encoded once for all its continuations, starts with the BOS token where the tokenizer puts one
    before text by itself (Llama, Gemma)."""
    stripped = context.rstrip()
    moved = context[len(stripped) :]
    context_ids = tokenizer(stripped, add_special_tokens=False)["input_ids"]
    prefixed = _bos_prefix(tokenizer) + context_ids
    pairs = []
    for continuation in continuations:
        whole = tokenizer(stripped + moved + continuation, add_special_tokens=False)["input_ids"]
        pairs.append((prefixed, whole[len(context_ids) :]))
    return pairs


def choice_requests(tokenizer, row: ChoiceRow) -> list[tuple[list[int], list[int]]]:
    """The row's choices as `encode_choices` requests, each choice the continuation " CHOICE" of its context."""
    return encode_choices(tokenizer, row.prompt, [f" {choice}" for choice in row.choices])


@per_tokenizer(maxsize=8)
def _bos_prefix(tokenizer) -> list[int]:
    """[BOS] where the tokenizer puts it before text by itself, else []."""
    bos = tokenizer.bos_token_id
    with_specials = tokenizer("a")["input_ids"]
    return [bos] if bos is not None and with_specials and with_specials[0] == bos else []


@torch.inference_mode()
def loglikelihoods(
    model,
    requests: list[tuple[list[int], list[int]]],
    pad_id: int,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    advance: Callable[[int], None] = lambda n: None,
) -> list[float]:
    """The summed log-probability of each request's continuation tokens after its context tokens, in batches
    of similar lengths (right-padded). The output layer runs at the continuation's positions alone, so a batch
    holds logits for those tokens, not for every position times the vocabulary."""
    lm = causal_lm(model)
    lm.eval()
    device = lm.device
    order = sorted(range(len(requests)), key=lambda i: -sum(map(len, requests[i])))
    scores = [0.0] * len(requests)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        rows = [(requests[i][0] + requests[i][1])[:-1] for i in batch]
        longest = max(map(len, rows))
        ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        # The token each position predicts, where it is a continuation's; IGNORE_INDEX elsewhere.
        targets = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
        for r, (row, i) in enumerate(zip(rows, batch)):
            context, continuation = requests[i]
            ids[r, : len(row)] = torch.tensor(row)
            mask[r, : len(row)] = 1
            targets[r, len(context) - 1 : len(row)] = torch.tensor(continuation)
        logits = trained_logits(lm, ids.to(device), targets.to(device), attention_mask=mask.to(device))
        picked = logits.log_softmax(-1).gather(-1, targets[targets != IGNORE_INDEX].to(device).unsqueeze(-1))
        at = 0
        for i in batch:
            length = len(requests[i][1])
            scores[i] = picked[at : at + length].sum().item()
            at += length
        advance(len(batch))
    return scores


def score_rows(
    model,
    tokenizer,
    rows: list[ChoiceRow],
    encoded: list[list[tuple[list[int], list[int]]]],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> dict:
    """`acc` and `acc_norm` of a loaded model on `rows`, with their 95% intervals, and each row's result;
    `encoded` holds each row's requests as `check_scorable` returns them, encoded with `tokenizer`."""
    requests = [pair for pairs in encoded for pair in pairs]
    started = time.perf_counter()
    with progress_bar("choices", len(requests), progress) as advance:
        scores = loglikelihoods(model, requests, tokenizer.pad_token_id, batch_size=batch_size, advance=advance)
    samples, at = [], 0
    for row in rows:
        lls = scores[at : at + len(row.choices)]
        at += len(row.choices)
        normed = [ll / len(choice) for ll, choice in zip(lls, row.choices)]
        pred, pred_norm = max(range(len(lls)), key=lls.__getitem__), max(range(len(lls)), key=normed.__getitem__)
        samples.append(
            {
                "line": row.line,
                "input": row.question,
                "choices": list(row.choices),
                "answer": row.answer,
                "loglikelihoods": lls,
                "prediction": pred,
                "prediction_norm": pred_norm,
                "correct": pred == row.answer,
                "correct_norm": pred_norm == row.answer,
            }
        )
    n = len(samples)
    figures = {
        key: sum(s[f"correct{suffix}"] for s in samples) / n for key, suffix in (("acc", ""), ("acc_norm", "_norm"))
    }
    return {
        "n": n,
        "task": "multiple_choice",
        "scores": figures,
        "intervals": {key: list(share_interval(value, n)) for key, value in figures.items()},
        "seconds": {"scoring": round(time.perf_counter() - started, 2)},
        "samples": samples,
    }


def _most_tokens(requests: list[tuple[list[int], list[int]]]) -> int:
    """The most tokens a row's request (its context and one choice) runs to."""
    return max(len(context) + len(choice) for context, choice in requests)


def check_scorable(rows: list[ChoiceRow], tokenizer, window: int | None) -> list[list[tuple[list[int], list[int]]]]:
    """Before the model loads, a question with a choice longer than the model's context (past its window a
    log-likelihood means nothing), or a choice that leaves no token of its own past the question's (it would
    score 0, the most likely), is refused, naming its line. Returns each row's requests (`choice_requests`),
    which `score_rows` scores, so each row is encoded once."""
    problems = []
    encoded = [choice_requests(tokenizer, row) for row in rows]
    for row, pairs in zip(rows, encoded):
        empty = [c for c, (_, continuation) in zip(row.choices, pairs) if not continuation]
        if empty:
            problems.append(
                Problem(
                    "bad_choice_row",
                    f"the choice {empty[0]!r} encodes into no token past the question's; reword it.",
                    file=row.file,
                    line=row.line,
                )
            )
        longest = _most_tokens(pairs)
        if window and longest > window:
            # A question that fits without its few-shot examples is told to take fewer or shorter ones.
            own = row.examples and _most_tokens(choice_requests(tokenizer, replace(row, examples=())))
            what, do = "the question with its longest choice", "shorten the row or leave it out"
            if own and own <= window:
                what = f"the question with its {counted(len(row.examples), 'few-shot example')} and its longest choice"
                do = (
                    "lower the number of few-shot examples (--num-fewshot, num_fewshot) or give shorter ones "
                    f"(without them it is {own} tokens)"
                )
            problems.append(
                Problem(
                    "too_long",
                    f"{what} is {longest} tokens, more than the model's context of {window} tokens; {do}.",
                    file=row.file,
                    line=row.line,
                )
            )
    if problems:
        raise DataError.listing(
            f"{rows[0].file}: {counted(len(problems), 'row')} cannot be scored",
            problems,
        )
    return encoded


def checked_for(model: str, rows: list[ChoiceRow]) -> tuple:
    """`model`'s source, tokenizer and the rows' requests `check_scorable` gives for them, before its weights load."""
    source = resolve(model)
    tokenizer = load_tokenizer(source)
    return source, tokenizer, check_scorable(rows, tokenizer, source_context_length(source))


def evaluate_choices(
    model: str,
    data: str | Path,
    *,
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
    num_fewshot: int = 0,
    fewshot_file: str | Path | None = None,
    rows: list[ChoiceRow] | None = None,
    checked: tuple | None = None,
) -> dict:
    """`acc` and `acc_norm` of `model` (registry name, model folder, adapter, run or checkpoint folder) on the
    multiple-choice rows of `data`, each after `num_fewshot` solved examples (`read_benchmark`), with their 95%
    (Wilson) intervals and each row's log-likelihoods. `checked`: `checked_for(model, rows)`, where it was
    called already."""
    check_counts({"limit": (limit, 1), "num_fewshot": (num_fewshot, 0), "batch_size": (batch_size, 1)})
    rows = rows or read_benchmark(data, limit, num_fewshot=num_fewshot, fewshot_file=fewshot_file)
    source, tokenizer, encoded = checked or checked_for(model, rows)
    with library_bars(progress):
        loaded = load_text_model(source, "eval")
    result = score_rows(loaded, tokenizer, rows, encoded, batch_size=batch_size, progress=progress)
    # A NumPy count as the JSON number it is; None, left out, as none.
    return {"model": source.name, "spec": str(model), "data": str(data), "num_fewshot": int(num_fewshot or 0), **result}


def paired_difference(base: dict, tuned: dict) -> dict:
    """Per score, tuned minus base over the same rows, with the 95% interval of the paired difference (mean ±
    1.96 standard errors of each row's difference) and how many rows the tuned model got right that the base
    got wrong (`gained`) and the reverse (`lost`)."""
    figures = {}
    for key, suffix in (("acc", ""), ("acc_norm", "_norm")):
        pairs = [(b[f"correct{suffix}"], t[f"correct{suffix}"]) for b, t in zip(base["samples"], tuned["samples"])]
        differences = [int(t) - int(b) for b, t in pairs]
        n = len(differences)
        mean = sum(differences) / n
        spread = math.sqrt(sum((d - mean) ** 2 for d in differences) / max(n - 1, 1))
        half = 1.96 * spread / math.sqrt(n)
        figures[key] = {
            "change": mean,
            "interval": [mean - half, mean + half],
            "gained": sum(t and not b for b, t in pairs),
            "lost": sum(b and not t for b, t in pairs),
        }
    return figures


def compare_choices(
    model: str,
    base: str,
    data: str | Path,
    *,
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
    num_fewshot: int = 0,
    fewshot_file: str | Path | None = None,
) -> dict:
    """`evaluate_choices` for `model` and `base` on the same rows (and few-shot examples), side by side, and the
    paired difference."""
    check_counts({"limit": (limit, 1), "num_fewshot": (num_fewshot, 0), "batch_size": (batch_size, 1)})
    rows = read_benchmark(data, limit, num_fewshot=num_fewshot, fewshot_file=fewshot_file)
    # Both models are found and the rows checked against each before either loads: a base that cannot be found,
    # or whose context the rows do not fit, fails now, not after the tuned model has scored every row.
    checked_tuned, checked_base = checked_for(model, rows), checked_for(base, rows)
    options = {"batch_size": batch_size, "progress": progress, "num_fewshot": num_fewshot, "rows": rows}
    tuned_result = evaluate_choices(model, data, **options, checked=checked_tuned)
    return side_by_side(evaluate_choices(base, data, **options, checked=checked_base), tuned_result)


def side_by_side(base: dict, tuned: dict) -> dict:
    """Two evaluations of the same rows: both, the paired difference, and each row's results joined."""
    keys = ("loglikelihoods", "prediction", "prediction_norm", "correct", "correct_norm")
    samples = [
        {
            "line": b["line"],
            "input": b["input"],
            "choices": b["choices"],
            "answer": b["answer"],
            "base": {k: b[k] for k in keys},
            "tuned": {k: t[k] for k in keys},
        }
        for b, t in zip(base["samples"], tuned["samples"])
    ]
    return {"base": base, "tuned": tuned, "difference": paired_difference(base, tuned), "samples": samples}


def benchmark_name(path: str | Path, num_fewshot: int = 0) -> str:
    """A benchmark file's name in metrics (`benchmark_NAME_acc`) and the run's eval/ folder: its stem, each run of
    other characters than letters, digits and _ as one _, and `_Nshot` after it for N few-shot examples (so one
    file may be scored zero-shot and few-shot)."""
    name = re.sub(r"\W+", "_", Path(path).name.split(".")[0]).strip("_") or "file"
    return f"{name}_{num_fewshot}shot" if num_fewshot else name


def write_choice_results(folder: str | Path, result: dict) -> str:
    """`results.jsonl` in `folder` (each row: its line, choices, answer, and each model's log-likelihoods and
    predictions), written atomically; its path."""
    path = Path(folder) / "results.jsonl"
    with atomic_file(path) as f:
        for sample in result["samples"]:
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")
    return str(path)


def refuse_generation_options(data: str, **given: bool) -> None:
    """The options that concern generated answers do not apply to multiple-choice rows: refused, naming each."""
    why = f"{data} holds multiple-choice questions, scored by each choice's log-likelihood with no answer generated"
    refuse_options(why, given)
