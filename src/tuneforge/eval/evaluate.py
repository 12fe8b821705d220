"""Evaluating a model on chat data: loss on the reference answers, then its own answers, scored.

    from tuneforge.eval import evaluate, compare
    result = evaluate("runs/quickstart", "data/test.jsonl", limit=100)
    result["loss"], result["perplexity"], result["scores"]["exact"], result["samples"][0]

Each row of the data is a conversation whose last message is the assistant's reference answer, or
a preference pair, whose chosen reply is the reference (so a DPO run's validation file scores too).
The loss is the model's cross-entropy on the assistant tokens (the same tokens training trains on,
so it is comparable with a run's `valid_loss`); the model then answers each conversation without
its last message, greedily, and a metric from `tuneforge.tasks.metrics.METRICS` scores the answers;
with a grader (`tuneforge.graders`, as `grpo.grader` takes it) the grader scores them too, each
against its row as GRPO's validation grades it (`item.reference` the reference answer, `item.FIELD`
the row's other fields): its mean score, its pass rate where it has a `pass_threshold`, and the
mean of each part of a multi grader or of several reward functions. With a grader, GRPO's own data
scores too: rows without a reference answer (a `prompt`, or messages ending in the user's turn, read
as GRPO reads them), for which the grader's figures are all there is (no loss or metric).

Rows whose user messages hold images, for a model that reads them (Gemma 3 4B and up), are rendered and
their images expanded into the image's tokens as training does: the loss batches carry their pixels, and
the answers are generated with the images in the prompt's prefill, as `serve` answers them; a model that
reads text only refuses such rows, naming each, before its weights load (`refuse_unread`). A row's `tools`
go into its prompt as `serve` renders a request's; a model whose chat template writes no tools refuses
such rows the same way.

A file of raw text (text rows, `.txt`/`.md` documents) has no answers to score: its result is the
per-token loss, perplexity and next-token accuracy over every token of its documents, cut into windows
as `data.truncation: split` cuts them (`evaluate_documents`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import (
    Conversation,
    Example,
    PackedRow,
    Preference,
    Problem,
    pack,
    read_conversations,
    render_examples,
    shows_images,
)
from ..data.formats import file_format, prompt_conversation
from ..data.readers import open_rows
from ..data.render import renderer_for
from ..data.schema import shown_text
from ..errors import DataError, TuneforgeError, check_counts
from ..generate import generate
from ..graders import Grader, GradeResult, load_grader, rollout_samples
from ..methods import SFTObjective, sum_over_batches
from ..methods.grpo import grader_item, naming_rows
from ..models import (
    causal_lm,
    load_text_model,
    load_tokenizer,
    model_context_length,
    resolve,
    run_config_of,
    source_context_length,
)
from ..models.attention import per_example_attention, segments, supports_per_example_attention
from ..models.images import VISION_MODELS
from ..models.loading import image_inputs
from ..progress import library_bars, progress_bar
from ..tasks.metrics import METRICS, parse_json_object, split_reasoning
from ..wording import counted, unknown_choice

DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_BATCH_SIZE = 16  # unpacked rows per forward, where the loss cannot run on packed rows
EVAL_ROW_TOKENS = 2048


@dataclass(frozen=True)
class EvalExample:
    file: str
    line: int
    conversation: Conversation
    prompt: list[dict]  # the messages before the reference answer, as a chat template takes them
    reference: str | None  # the last assistant message; None for a prompt row (GRPO's data) that has none

    @property
    def answer(self) -> str | None:
        """The reference's answer, scored: what follows its reasoning, where it holds any."""
        return None if self.reference is None else split_reasoning(self.reference)[1]

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def input(self) -> str:
        """What a person reads as the question: the last user message, each image in it shown as `[image]`."""
        return shown_text(next((m["content"] for m in reversed(self.prompt) if m["role"] == "user"), ""))

    @property
    def images(self) -> tuple[bytes, ...]:
        """The image files the prompt shows, in order (user messages' image parts)."""
        return tuple(image.data for m in self.conversation.messages for image in m.images)

    def image_field(self) -> str | None:
        """The field of the first message that holds images (`messages[I].content`), None where none does."""
        at = next((i for i, m in enumerate(self.conversation.messages) if m.images), None)
        return None if at is None else f"messages[{at}].content"


NO_REFERENCE_HINT = (
    " To score answers to prompts without reference answers (GRPO's data: a prompt, or messages ending in the "
    "user's turn, with the fields a grader reads), give a grader: tuneforge eval --grader, or eval.grader "
    "(a GRPO run's grpo.grader) with eval.task: auto in a run's config."
)


def _prompt_row(row, path: str | Path, line: int, csv: bool) -> Conversation | None:
    """The row read as GRPO reads a prompt row (`prompt`, or `messages` ending in the user's or a tool's
    turn, with at most one reference reply after it), or None where it is not one."""
    if not isinstance(row, dict) or not {"messages", "prompt"} & set(row):
        return None
    conversation, _ = prompt_conversation(row, file=str(path), line=line, csv=csv, images=True)
    if conversation is None or not conversation.messages:
        return None
    messages = conversation.messages
    prompt = messages[:-1] if messages[-1].role == "assistant" else messages
    return conversation if prompt and prompt[-1].role in ("user", "tool") else None


def read_eval_examples(
    path: str | Path, limit: int | None = None, *, prompts: bool = False, rated_true_only: bool = False
) -> list[EvalExample]:
    """The first `limit` (all, if None) conversations of a data file, each ending in its reference answer
    (a preference pair's is its chosen reply; a KTO row rated false, which holds none, is an error, or with
    `rated_true_only` left out, as a pair's rejected reply is). `prompts` (for a grader): a row GRPO reads as a
    prompt without a reference answer (a `prompt` and the grader's fields, or messages ending in the user's turn)
    is taken too, its `reference` None; without it such a row is an error that points at a grader."""
    examples: list[EvalExample] = []
    problems: list[Problem] = []
    rows = open_rows(path)
    raw = {line: row for line, row in rows}
    # A row read_conversations refuses or leaves without a reference answer is read again as GRPO reads it.
    refused: dict[int, list[Problem]] = {}
    read: dict[int, Conversation] = {}
    order: list[int] = []
    for line, item in read_conversations(path):
        if isinstance(item, Problem):
            if item.is_error:
                if item.line is None or item.line not in raw:
                    problems.append(item)
                    continue
                if item.line not in refused and item.line not in read:
                    order.append(item.line)
                refused.setdefault(item.line, []).append(item)
            continue
        if isinstance(item, Preference):
            item = Conversation([*item.prompt, item.chosen], item.tools)
        order.append(line)
        read[line] = item
    for line in order:
        if limit is not None and len(examples) >= limit:
            break
        item = read.get(line)
        if line in refused or not item.messages or item.messages[-1].role != "assistant" or len(item.messages) < 2:
            as_prompt = _prompt_row(raw[line], path, line, rows.kind == "csv")
            # A row with a reference answer keeps the checks of its format; only its format may differ from
            # the file's first row's, as GRPO's rows may.
            kept = as_prompt is not None and (
                as_prompt.messages[-1].role != "assistant"
                or all(p.code == "mixed_formats" for p in refused.get(line, []))
            )
            if not kept:
                problems += refused.get(line) or [_missing_reference(path, line)]
                continue
            item = as_prompt
            if item.messages[-1].role != "assistant" and not prompts:
                problems.append(_missing_reference(path, line, NO_REFERENCE_HINT))
                continue
        if item.label is False:
            if not rated_true_only:
                problems.append(_undesirable_reference(path, line))
            continue
        messages = item.messages
        if messages[-1].role == "assistant":
            prompt, reference = messages[:-1], messages[-1].content
        else:
            prompt, reference = messages, None
        examples.append(EvalExample(str(path), line, item, [m.to_template() for m in prompt], reference))
    if problems:
        problems = [_with_choice_layouts(problem) for problem in problems]
        rows = sum(problem.line is not None for problem in problems)  # the others are about the file itself
        raise DataError.listing(f"{path}: {counted(rows, 'row') + ' ' if rows else ''}cannot be evaluated", problems)
    if not examples:
        raise DataError(f"{path} holds no conversations to evaluate.", code="empty_file")
    return examples


def _with_choice_layouts(problem: Problem) -> Problem:
    """A row in no known format may be meant as a multiple-choice question: its problem names those layouts too."""
    if problem.code != "unknown_format":
        return problem
    from .choices import LAYOUTS  # it builds on the report's tables, which build on this module

    message = f"{problem.message} Multiple-choice questions, scored by log-likelihood, take one of: {LAYOUTS}."
    return dataclasses.replace(problem, message=message)


def refuse_unread(examples: Sequence[EvalExample], tokenizer, name: str) -> None:
    """Rows with images, for a model that reads text only (`tokenizer` loaded without an image processor), and
    rows with tools, for a model whose chat template writes none: an error naming each row and its field,
    before the model's weights load."""
    if any(e.conversation.tools for e in examples) and not renderer_for(tokenizer).writes_tools:
        problems = [
            Problem(
                "tools_not_rendered",
                f"the row gives 'tools', and {name}'s chat template does not write tool definitions: its answers "
                "would be made without seeing them. Evaluate rows with tools with a model whose chat template "
                "takes tools (Qwen 2.5 and 3, Llama 3.1, Mistral, ...), or remove 'tools' from them.",
                file=e.file,
                line=e.line,
                field="tools",
            )
            for e in examples
            if e.conversation.tools
        ]
        raise DataError.listing(
            f"{examples[0].file}: {counted(len(problems), 'row')} with tools cannot be evaluated by {name}", problems
        )
    if image_inputs(tokenizer) is not None:
        return
    problems = [
        Problem(
            "images_not_read",
            f"the row holds images, but {name} reads text only (it has no image processor): its answers would be "
            f"made without them. Evaluate image rows with a model that reads images ({VISION_MODELS}, with the "
            "processor settings their folders ship), or remove them from this file.",
            file=e.file,
            line=e.line,
            field=field,
        )
        for e in examples
        if (field := e.image_field())
    ]
    if problems:
        raise DataError.listing(
            f"{examples[0].file}: {counted(len(problems), 'row')} with images cannot be evaluated by {name}", problems
        )


def _missing_reference(path: str | Path, line: int, hint: str = "") -> Problem:
    return Problem(
        "example_missing_assistant_message",
        "an evaluation row must be a conversation that ends with the assistant's reference answer, "
        f"after at least one message for it to answer.{hint}",
        file=str(path),
        line=line,
        field="messages",
    )


def _undesirable_reference(path: str | Path, line: int) -> Problem:
    return Problem(
        "undesirable_reference",
        "the row's reply is rated undesirable (label: false), a reply not to give: scored as the reference answer, "
        "its loss and metric would reward the model for giving it. Evaluate on the rows rated true (or rows with "
        "reference answers), or leave this one out.",
        file=str(path),
        line=line,
        field="label",
    )


def without_reference(examples: Sequence[EvalExample]) -> list[EvalExample]:
    return [e for e in examples if e.reference is None]


def choose_metric(metric: str, examples: Sequence[EvalExample]) -> str | None:
    """`auto`: `json_fields` when every reference is a JSON object, otherwise `exact`; None (no metric, a
    grader alone scores) where some rows have no reference answer. A task's own scorer (`support_triage`)
    is asked for by name. A metric that cannot score against some of the references (`json_fields` on plain
    text), or rows without one, is a DataError naming their lines, before any compute."""
    if metric not in METRICS and metric != "auto":
        raise TuneforgeError(unknown_choice("metric", metric, ("auto", *METRICS)), code="unknown_metric")
    if missing := without_reference(examples):
        if metric == "auto":
            return None
        problems = [
            Problem(
                "example_missing_assistant_message",
                f"the row has no reference answer for {metric} to score against: choose metric auto, which "
                "leaves the metric out for such data and lets the grader score the answers, or end the row with "
                "its reference answer (an assistant message).",
                file=e.file,
                line=e.line,
                field="messages",
            )
            for e in missing
        ]
        raise DataError.listing(
            f"{examples[0].file}: {counted(len(problems), 'row')} cannot be scored by {metric}", problems
        )
    if metric == "auto":
        return "json_fields" if all(parse_json_object(e.answer) is not None for e in examples) else "exact"
    problems = [
        Problem(
            "reference_unfit_for_metric",
            f"the reference answer {fault}, so {metric} cannot score answers against it: choose a metric "
            "that fits the answers (auto picks json_fields when every answer is a JSON object, exact otherwise).",
            file=e.file,
            line=e.line,
            field="messages",
        )
        for e in examples
        if (fault := METRICS[metric].reference_fault(e.answer))
    ]
    if problems:
        raise DataError.listing(
            f"{examples[0].file}: {counted(len(problems), 'row')} cannot be scored by {metric}", problems
        )
    return metric


def grader_items(examples: Sequence[EvalExample]) -> list[dict]:
    """What a grader reads for each example, as GRPO gives it for the same row: the row's fields other than
    its messages, `reference` (the reference answer) and `prompt` (a text prompt's text, else the messages)."""
    rows: dict[str, dict] = {}
    for file in {e.file for e in examples}:
        rows[file] = {line: row for line, row in open_rows(file) if isinstance(row, dict)}
    items = []
    for e in examples:
        row = rows[e.file][e.line]
        text = "messages" not in row and isinstance(row.get("prompt"), str)
        items.append({**grader_item(row, e.reference), "prompt": row["prompt"] if text else e.prompt})
    return items


def check_grader(
    spec: dict | str | list | Grader,
    examples: Sequence[EvalExample],
    *,
    key: str = "--grader",
    weights=None,
    placed: str | None = None,
) -> Grader:
    """The grader `spec` names, tried on the first examples with an empty answer and their reference
    answers, and the item fields its templates read looked up on every row, as GRPO checks its grader
    before training: a grader that cannot score this data fails before any model loads, naming the row.
    `key` and `placed` say where the spec was given, as `graders.load_grader` takes them."""
    grader = spec if isinstance(spec, Grader) else load_grader(spec, weights, key=key, placed=placed)
    items = grader_items(examples)
    with naming_rows(examples[:16]):
        grader.check(items[:16])
    with naming_rows(examples):
        grader.check_items(items)
    return grader


def share_interval(share: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95% for z = 1.96) of a share measured on `n` examples.

    Scores are shares of a few hundred examples at most: 72% of 100 test tickets is compatible with
    anything from 62.5% to 79.9%, so two runs a few points apart need not be two different models.
    Wilson's interval, unlike the normal approximation, stays inside 0..1 and is sound near 0% and 100%.
    """
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(stats: dict, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% interval of a mean score (`evaluate.score_stats`) over `n` examples: Wilson's where every score
    is 0 or 1 (the mean is a share), else the normal approximation, mean ± z standard errors."""
    if stats["all_0_or_1"]:
        return share_interval(stats["mean"], n, z)
    half = z * stats["std"] * math.sqrt(1 / max(n - 1, 1))
    return stats["mean"] - half, stats["mean"] + half


def score_stats(scores: Sequence[float]) -> dict:
    """The mean and standard deviation of scores, whether each is 0 or 1 (their mean a share), and the mean's
    95% interval (`intervals`, as multiple choice gives its scores')."""
    mean = sum(scores) / len(scores)
    stats = {
        "mean": mean,
        "std": math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores)),
        "all_0_or_1": all(s in (0, 1) for s in scores),
    }
    return {**stats, "intervals": {"mean": list(mean_interval(stats, len(scores)))}}


def grader_scores(grader: Grader, results: Sequence[GradeResult]) -> dict:
    """A grader's figures over the examples: its name, `n`, the mean score (with `std`, `all_0_or_1` and its
    interval), the pass rate and its interval where it has a pass threshold, and each part's figures where it
    has several."""
    scores = [r.score for r in results]
    summary = {"name": grader.name, "n": len(results), **score_stats(scores)}
    if grader.pass_threshold is not None:
        summary["pass_threshold"] = grader.pass_threshold
        summary["pass_rate"] = sum(s >= grader.pass_threshold for s in scores) / len(scores)
        summary["intervals"]["pass_rate"] = list(share_interval(summary["pass_rate"], len(scores)))
    if grader.part_names != [grader.name]:
        summary["parts"] = {part: score_stats([r.parts[part] for r in results]) for part in grader.part_names}
    return summary


@torch.inference_mode()
def token_loss(
    model,
    examples: Sequence[Example],
    pad_id: int,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    advance: Callable[[int], None] = lambda n: None,
    images=None,
) -> dict:
    """Mean cross-entropy and next-token accuracy over the trained tokens of `examples`, weighted by
    token (as training's loss is), with the objective training uses. `images` (the model's
    `models.images.ImageInputs`) collates examples that show images, whose batches carry their pixels.

    Where the model's attention allows it, the examples are packed as training packs them: rows of
    `EVAL_ROW_TOKENS` that hold a prefix all their examples share (a system prompt) once, each
    example attending to itself alone (`models.attention`). The loss is that of the examples run
    one by one, for less work: the test tickets' shared system prompt is about half their tokens.
    """
    lm = causal_lm(model)
    longest = max(map(len, examples), default=0)
    # Examples with images are not packed, as training packs none: the image attention reads a row as one sequence.
    if supports_per_example_attention(lm.config, longest) and not shows_images(examples):
        batches = [[row] for row in pack(examples, max(EVAL_ROW_TOKENS, longest), share_prefixes=True)]
        attention = per_example_attention(lm)
    else:  # unpacked, similar lengths together (less padding)
        ordered = sorted(examples, key=len)
        batches = [ordered[s : s + batch_size] for s in range(0, len(ordered), batch_size)]
        attention = contextlib.nullcontext()
    with attention:
        sums, tokens = sum_over_batches(
            SFTObjective(model).train(model.training),
            batches,
            pad_id,
            model.device,
            sums={"ce": "ce", "correct": "correct"},
            advance=lambda rows: advance(_examples_in(rows)),
            images=images,
        )
    loss = sums["ce"] / max(tokens, 1)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700)),
        "mean_token_accuracy": sums["correct"] / max(tokens, 1),
        "tokens": int(tokens),
    }


def _examples_in(rows) -> int:
    return sum(len(segments(r.position_ids)) if isinstance(r, PackedRow) else 1 for r in rows)


def _render(example: EvalExample, tokenizer, train_on: str = "assistant") -> list[Example]:
    """The examples the row trains as (`data.train_on`): one, or one per turn where the template
    rewrites earlier turns (Qwen 3), so the loss counts the tokens training counts, as it counts them."""
    try:
        return render_examples(example.conversation, tokenizer, train_on)
    except DataError as err:
        # The renderer sees a conversation, not where it came from: its problems get the row's place.
        where = {"file": example.file, "line": example.line}
        problems = [dataclasses.replace(p, **where) for p in err.problems] or [Problem(err.code, err.message, **where)]
        raise DataError.listing(f"{example.file}: row {example.line} cannot be evaluated", problems) from None


def render_within_window(
    examples: Sequence[EvalExample], tokenizer, window: int | None, train_on: str = "assistant"
) -> list[Example]:
    """The rows rendered as `_render` renders them; a row longer than the model's `window` (with its
    reference answer) is an error naming its line: past its window a model's loss and answers mean nothing."""
    rendered = [_render(e, tokenizer, train_on) for e in examples]
    problems = [
        Problem(
            "too_long",
            f"the row is {length} tokens with its reference answer, more than the model's maximum context "
            f"length of {window} tokens; shorten the row or leave it out.",
            file=e.file,
            line=e.line,
        )
        for e, examples_of_row in zip(examples, rendered)
        if window and (length := max(map(len, examples_of_row))) > window
    ]
    if problems:
        raise DataError.listing(
            f"{examples[0].file}: {counted(len(problems), 'row')} "
            f"{'does' if len(problems) == 1 else 'do'} not fit the model's context",
            problems,
        )
    return [example for examples_of_row in rendered for example in examples_of_row]


def evaluate_loaded(
    model,
    tokenizer,
    examples: Sequence[EvalExample],
    *,
    metric: str = "auto",
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
    train_on: str = "assistant",
    grader: Grader | None = None,
) -> dict:
    """`evaluate` on a model already in memory; the loss counts the tokens a run with `data.train_on`
    trains (a run's `valid_loss`). `grader`: one `check_grader` gave, which scores the answers too.

    Where some rows have no reference answer (GRPO's prompt rows), the grader alone scores: the loss,
    perplexity and metric are None for the whole file (figures over some of its rows would sit beside the
    grader's over all of them), `left_out` says why, and the rows that have one give it as `item.reference`."""
    check_counts({"max_new_tokens": (max_new_tokens, 1), "batch_size": (batch_size, 1)})
    metric = choose_metric(metric, examples)
    missing = without_reference(examples)
    if missing and grader is None:
        raise TuneforgeError(
            f"{missing[0].where}: the row has no reference answer, so only a grader can score the answers to it."
            + NO_REFERENCE_HINT,
            code="example_missing_assistant_message",
        )
    started = time.perf_counter()
    if missing:
        loss = {"loss": None, "perplexity": None, "mean_token_accuracy": None, "tokens": None}
    else:
        rendered = render_within_window(examples, tokenizer, model_context_length(model), train_on)
        with progress_bar("loss", len(rendered), progress) as advance:
            loss = token_loss(
                model,
                rendered,
                tokenizer.pad_token_id,
                batch_size=batch_size,
                advance=advance,
                images=image_inputs(tokenizer),
            )
    loss_seconds = time.perf_counter() - started
    with progress_bar("answers", len(examples), progress) as advance:
        answers = generate(
            model,
            tokenizer,
            [e.prompt for e in examples],
            max_new_tokens=max_new_tokens,
            on_progress=advance,
            images=[e.images for e in examples],
            tools=[e.conversation.tools for e in examples],
        )
    # A reasoning model's reply is scored on its answer, what follows its reasoning (OpenAI's output_text).
    predictions = [split_reasoning(a.text)[1] for a in answers]
    references = [e.answer for e in examples]
    scorer = METRICS[metric] if metric else None
    grades = None
    if grader is not None:
        with naming_rows(examples):
            answered = rollout_samples([a.text for a in answers], [e.conversation.tools for e in examples], tokenizer)
            grades = grader.grade(answered, grader_items(examples))
    samples = [
        {
            "line": e.line,
            "input": e.input,
            "prediction": a.text,
            "reference": e.reference,
            "correct": bool(scorer.score([prediction], [reference])[scorer.headline]) if scorer else None,
            "finish_reason": a.finish_reason,
            **({"grade": grades[i].score} if grades else {}),
        }
        for i, (e, a, prediction, reference) in enumerate(zip(examples, answers, predictions, references))
    ]
    return {
        "n": len(examples),
        "metric": metric,
        **loss,
        "scores": scorer.score(predictions, references) if scorer else None,
        **({"left_out": left_out(len(missing), len(examples))} if missing else {}),
        **({"grader": grader_scores(grader, grades)} if grades else {}),
        # How the scored answers were written: a score means little without it (a NumPy count as the JSON number).
        "generation": {"decoding": "greedy", "max_new_tokens": int(max_new_tokens)},
        "usage": {
            "prompt_tokens": sum(a.prompt_tokens for a in answers),
            "completion_tokens": sum(a.completion_tokens for a in answers),
            "stopped_by_length": sum(a.finish_reason == "length" for a in answers),
            # replies cut off before their reasoning ended: no answer to score (raise max_new_tokens)
            "stopped_in_reasoning": sum(
                a.finish_reason == "length" and bool(a.text.strip()) and not p for a, p in zip(answers, predictions)
            ),
        },
        "seconds": {
            "loss": round(loss_seconds, 2),
            "generation": round(time.perf_counter() - started - loss_seconds, 2),
        },
        "samples": samples,
    }


def left_out(missing: int, n: int) -> str:
    """Why an evaluation has no loss, perplexity or metric: rows without a reference answer."""
    which = "the rows have" if missing == n else f"{missing} of the {n} rows have"
    return (
        f"{which} no reference answer (prompt rows, as GRPO reads them): the loss, perplexity and metric score "
        "against one, so they are left out for the whole file and the grader alone scores the answers"
    )


def evaluate(
    model: str,
    data: str | Path,
    *,
    metric: str = "auto",
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    limit: int | None = None,
    train_on: str | None = None,
    progress: bool = True,
    grader: dict | str | list | Grader | None = None,
    window: int | None = None,
) -> dict:
    """Evaluate `model` (registry name, model folder, adapter, run or checkpoint folder) on a chat data file.

    Returns the loss and perplexity on the reference answers, `scores` from the metric (`auto`: see
    `choose_metric`), token usage, timings and per-example `samples` (input, prediction, reference,
    correct). The loss counts the replies `train_on` names (`data.train_on`); None: those the run
    `model` belongs to trained, so that it is the run's `valid_loss`, or every reply for other models.
    `progress=False` leaves out the progress bars, transformers' own included. `grader` (a grader object, a
    JSON/YAML file of one, or reward functions as FILE.py:FUNCTION, as `grpo.grader` takes them) scores the
    answers too, each against its row: `grader` in the result (`grader_scores`), `grade` in each sample. A
    grader that cannot work on this data is refused before the model loads. With a grader, rows without a
    reference answer (GRPO's prompt rows) are taken too; see `evaluate_loaded` for what is then left out.
    """
    check_counts({"limit": (limit, 1), "max_new_tokens": (max_new_tokens, 1), "batch_size": (batch_size, 1)})
    if choices := _choice_evaluation(data, metric=metric, grader=grader, max_new_tokens=max_new_tokens):
        return choices.evaluate_choices(model, data, limit=limit, batch_size=batch_size, progress=progress)
    if file_format(data) == "text":
        if grader is not None:
            raise TuneforgeError(
                f"{data} holds documents of raw text, which have no answers for a grader to score; leave out "
                "--grader to get their per-token loss and perplexity, or give a file of prompts.",
                code="bad_option",
            )
        return evaluate_documents(model, data, limit=limit, batch_size=batch_size, progress=progress, window=window)
    examples, grader = _checked_inputs(data, limit, metric, grader)
    return _evaluate_examples(
        model,
        *_model_for(model, examples),
        data,
        examples,
        metric=metric,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        train_on=train_on,
        progress=progress,
        grader=grader,
    )


def _choice_evaluation(data, *, metric, grader, max_new_tokens):
    """The `choices` module where `data` holds multiple-choice rows (scored by log-likelihood, so the options
    of generated answers are refused, naming each); None otherwise."""
    from . import choices  # it builds on the report's tables, which build on this module

    if not choices.is_choice_file(data):
        return None
    choices.refuse_generation_options(
        str(data),
        metric=metric != "auto",
        grader=grader is not None,
        max_new_tokens=max_new_tokens != DEFAULT_MAX_NEW_TOKENS,
    )
    return choices


def _checked_inputs(data, limit, metric, grader) -> tuple[list[EvalExample], Grader | None]:
    """The examples of `data` and the `Grader` of `grader` (or None), each checked against the other and the
    metric before any model loads (`evaluate_loaded` chooses the metric again)."""
    examples = read_eval_examples(data, limit, prompts=grader is not None)
    choose_metric(metric, examples)
    return examples, None if grader is None else check_grader(grader, examples)


def _model_for(model: str, examples: Sequence[EvalExample]) -> tuple:
    """`model`'s source and tokenizer, before its weights load: rows it cannot read (images for a text model, tools
    for a template without them) are refused now."""
    source = resolve(model)
    tokenizer = load_tokenizer(source)
    refuse_unread(examples, tokenizer, source.name)
    return source, tokenizer


def _evaluate_examples(
    model: str, source, tokenizer, data, examples, *, metric, max_new_tokens, batch_size, train_on, progress, grader
) -> dict:
    """`evaluate` on `examples` read from `data`, their metric and `grader` (a `Grader` or None) checked, with
    `model`'s `source` and `tokenizer` (`_model_for`)."""
    train_on = train_on or trained_replies(source)
    with library_bars(progress):
        loaded = load_text_model(source, "eval")
    result = evaluate_loaded(
        loaded,
        tokenizer,
        examples,
        metric=metric,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=progress,
        train_on=train_on,
        grader=grader,
    )
    return {"model": source.name, "spec": str(model), "data": str(data), **result}


def evaluate_documents(
    model: str,
    data: str | Path,
    *,
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
    window: int | None = None,
) -> dict:
    """The per-token loss, perplexity and next-token accuracy of `model` on the first `limit` documents of
    a file of raw text: every token a target once, in windows of `window` tokens as `data.truncation:
    split` cuts them (None: the `data.max_length` of the run the model is of, else the model's context)."""
    check_counts({"batch_size": (batch_size, 1)})
    documents, problems = [], []
    for _, item in read_conversations(data, "text"):
        if isinstance(item, Problem):
            problems += [item] if item.is_error else []
        elif limit is None or len(documents) < limit:
            documents.append(item)
    if problems:
        raise DataError.listing(f"{data}: {counted(len(problems), 'problem')} in the documents", problems)
    source = resolve(model)
    window = window or trained_window(source)
    tokenizer = load_tokenizer(source)
    with library_bars(progress):
        loaded = load_text_model(source, "eval")
    window = window or model_context_length(loaded) or EVAL_ROW_TOKENS
    windows = [w for d in documents for e in render_examples(d, tokenizer) for w in e.windows(window)]
    started = time.perf_counter()
    with progress_bar("loss", len(windows), progress) as advance:
        loss = token_loss(loaded, windows, tokenizer.pad_token_id, batch_size=batch_size, advance=advance)
    return {
        "model": source.name,
        "spec": str(model),
        "data": str(data),
        "n": len(documents),
        "windows": len(windows),
        "window": window,
        "metric": None,
        **loss,
        "scores": None,
        "seconds": {"loss": round(time.perf_counter() - started, 2)},
        "samples": [],
    }


def trained_window(source) -> int | None:
    """The `data.max_length` of the run a model is the final model or a checkpoint of; None otherwise."""
    data = run_config_of(source.adapter or source.path).get("data")
    return data.get("max_length") if isinstance(data, dict) else None


def trained_replies(source) -> str:
    """The `data.train_on` of the run a model is the final model or a checkpoint of; "assistant" otherwise."""
    data = run_config_of(source.adapter or source.path).get("data")
    return (data.get("train_on") if isinstance(data, dict) else None) or "assistant"


def side_by_side(base: dict, tuned: dict) -> list[dict]:
    """The samples of two evaluations on the same data, joined per example."""
    return [
        {
            "line": b["line"],
            "input": b["input"],
            "base": b["prediction"],
            "tuned": t["prediction"],
            "reference": b["reference"],
            "base_correct": b["correct"],
            "tuned_correct": t["correct"],
            **({"base_grade": b["grade"], "tuned_grade": t["grade"]} if "grade" in b and "grade" in t else {}),
        }
        for b, t in zip(base["samples"], tuned["samples"])
    ]


def compare(
    model: str,
    base: str,
    data: str | Path,
    *,
    metric: str = "auto",
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    limit: int | None = None,
    train_on: str | None = None,
    progress: bool = True,
    grader: dict | str | list | Grader | None = None,
    window: int | None = None,
) -> dict:
    """`evaluate` for `model` and for `base` on the same data (same options), side by side; documents of raw
    text in `window`-token windows (None: those the tuned model's run trained in)."""
    check_counts({"limit": (limit, 1), "max_new_tokens": (max_new_tokens, 1), "batch_size": (batch_size, 1)})
    if choices := _choice_evaluation(data, metric=metric, grader=grader, max_new_tokens=max_new_tokens):
        return choices.compare_choices(model, base, data, limit=limit, batch_size=batch_size, progress=progress)
    resolve(base)  # a base that cannot be found fails now, not after the first evaluation
    if file_format(data) == "text":  # documents: per-token loss in the windows the tuned model's run trained
        window = window or trained_window(resolve(model))
        tuned_result = evaluate(
            model, data, limit=limit, batch_size=batch_size, progress=progress, grader=grader, window=window
        )
        base_result = evaluate(base, data, limit=limit, batch_size=batch_size, progress=progress, window=window)
        return {"base": base_result, "tuned": tuned_result, "samples": side_by_side(base_result, tuned_result)}
    # The data is read, and the metric and a grader loaded and checked, once for both models.
    examples, grader = _checked_inputs(data, limit, metric, grader)
    # Rows either model cannot read, or that pass its context, fail before either loads, not after the tuned model
    # has answered every row.
    tuned, untuned = _model_for(model, examples), _model_for(base, examples)
    # Both losses count the replies the tuned model's run trained on.
    train_on = train_on or trained_replies(tuned[0])
    if not without_reference(examples):  # rows without one have no loss, and no rendered length to check
        for source, tokenizer in (tuned, untuned):
            render_within_window(examples, tokenizer, source_context_length(source), train_on)
    options = {
        "metric": metric,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "train_on": train_on,
        "progress": progress,
        "grader": grader,
    }
    tuned_result = _evaluate_examples(model, *tuned, data, examples, **options)
    base_result = _evaluate_examples(base, *untuned, data, examples, **options)
    return {"base": base_result, "tuned": tuned_result, "samples": side_by_side(base_result, tuned_result)}
