"""`tuneforge distill generate`: the teacher's answers to prompts, as chat data a student trains on.

Sequence-level distillation: the student learns from the teacher's text, not its distributions, so
teacher and student may have different tokenizers. Prompts are chat rows (a last assistant turn,
if any, is dropped: the teacher answers in its place) or prompt/completion rows (the completion is
ignored). A row's `tools` are rendered into the teacher's prompt as `tuneforge serve` renders a request's,
and kept in its output row, so the student trains on the prompt the teacher answered. An answer to such a row
that calls tools is written as `tuneforge serve` replies: an assistant message with OpenAI's `tool_calls`
(parsed by the teacher's template's parser, `tool_calls`) and the text before them as its content, so
the student's own template writes the calls in training, whatever the teacher's family. The output is OpenAI
chat JSONL, one row per prompt, in the prompts' order.

Resumable: rows are appended a batch at a time, whole lines only, flushed and synced. A rerun
drops a torn last line (a crash mid-write), checks that every row already written answers the
prompt at its position, and continues with the next prompt, so no prompt is answered twice.
Every prompt gets its row, an empty answer too (rows stay aligned with prompts); the count of
empty answers is reported, and `data.on_error: skip` leaves them out of training.

Best-of-N (`samples`, with a `grader`): each prompt's `samples` answers are sampled at `temperature`, each
from its own random stream seeded by `seed` and its place (prompt, answer), and scored by the grader
(`graders.load_grader`, as GRPO and `tuneforge eval --grader` take it, each answer against its row as
they grade it). `keep: best` writes the best-scoring answer as a chat row (rejection sampling fine-tuning;
a grader's pass_threshold leaves out prompts whose best answer falls short of it), `keep: pairs` the best
and the worst as a DPO pair (prompt/chosen/rejected in chat form; a prompt whose answers all score alike
is left out). Answers cut at max_new_tokens are neither kept nor paired (trained, a cut answer teaches
ending the turn mid-answer, and its score may be the cut's): a prompt with no answer that ended is left
out, and one with a single ended answer gives no pair. Each row's scores are in its `scores` field,
which the data reader ignores. Every prompt's answers and scores go to `OUT.samples.jsonl`, one line a
prompt in the prompts' order: that file is what a rerun checks and continues, and `out` is written again
from it first, so the two never disagree.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import numbers
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ..data import Problem
from ..data.formats import prompt_conversation
from ..data.readers import one_file_by_name, open_rows
from ..errors import DataError, TuneforgeError, json_value
from ..fsio import atomic_file, writing
from ..graders.base import rollout_samples
from ..reasoning import assistant_message
from ..wording import counted


@dataclass(frozen=True)
class TeacherData:
    out: Path
    prompts: int  # prompts in the file
    written: int  # rows in `out` now
    resumed_from: int  # rows that were already there
    stopped_by_length: int  # answers of this call cut at max_new_tokens
    empty: int  # answers of this call with no text, which SFT data checks reject (missing_content)
    # Best-of-N only: the file of every prompt's sampled answers and scores, the rows in `out` now, and the
    # prompts of this call left out (their answers that ended before max_new_tokens, if any, all scored alike
    # for pairs, or below the grader's pass_threshold for best).
    samples_file: Path | None = None
    rows: int = 0
    left_out: int = 0


def _row_prompt(
    row, path: str, line: int, csv: bool
) -> tuple[list[dict] | None, list[dict] | None, str | None, list[Problem]]:
    """The row's prompt as chat messages, the assistant turn dropped from its end (None if none), its tools,
    and its problems."""
    if not isinstance(row, dict) or not ({"messages", "prompt"} & set(row)):
        return (
            None,
            None,
            None,
            [
                Problem(
                    "unknown_format",
                    'a prompt row needs "messages" (chat) or "prompt" (prompt/completion).',
                    file=path,
                    line=line,
                )
            ],
        )
    conversation, problems = prompt_conversation(row, file=path, line=line, csv=csv)
    if conversation is None:
        return None, None, None, problems
    messages = conversation.messages
    reference = None
    if "messages" in row and messages[-1].role == "assistant":
        reference = messages[-1].content
        messages = messages[:-1]
    if not messages or messages[-1].role == "system":
        return (
            None,
            None,
            None,
            [
                Problem(
                    "missing_prompt",
                    "nothing for the teacher to answer: the row has no user message "
                    "(after dropping its last assistant turn).",
                    file=path,
                    line=line,
                    field="messages" if "messages" in row else "prompt",
                )
            ],
        )
    return [m.to_template() for m in messages], conversation.tools, reference, []


def read_prompts(path: str | Path) -> list[list[dict]]:
    """Every row's prompt as chat messages; all problems at once, as a `DataError`, before any model loads."""
    return _read_prompts(path)[0]


def _read_prompts(path: str | Path) -> tuple[list[list[dict]], list[int], list[dict], list[list[dict] | None]]:
    """`read_prompts`, the line each prompt is on, what a grader reads for each row, as GRPO and
    `tuneforge eval --grader` give it: the row's fields other than its prompt, `reference` (the dropped
    assistant turn) and `prompt` (a text prompt's text, else the messages), and each row's tools."""
    from ..methods.grpo import grader_item

    path = str(path)
    prompts, lines, items, tools, problems = [], [], [], [], []
    rows = open_rows(path, by_name=one_file_by_name("distill generate reads"))
    for line, row in rows:
        if isinstance(row, Problem):
            problems.append(row)
            continue
        messages, row_tools, reference, row_problems = _row_prompt(row, path, line, rows.kind == "csv")
        problems += [p for p in row_problems if p.is_error]
        if messages is not None:
            prompts.append(messages)
            lines.append(line)
            tools.append(row_tools)
            text = "messages" not in row and isinstance(row.get("prompt"), str)
            items.append({**grader_item(row, reference), "prompt": row["prompt"] if text else messages})
    unreadable = [p for p in problems if p.line is None]  # the file as a whole: missing, empty, unknown
    if unreadable:
        raise DataError.listing(f"--prompts {path} cannot be read", unreadable)
    if problems:
        raise DataError.listing(f"{path}: {len(problems)} prompt rows cannot be used", problems)
    if not prompts:
        raise DataError(f"{path} holds no prompts.", code="empty_file")
    return prompts, lines, items, tools


def _check_tools_written(path, tools: list[list[dict] | None], lines: list[int], tokenizer) -> None:
    """Rows that give tools are for a teacher whose chat template writes them (else an error naming the lines):
    without them in its prompt the teacher answers without seeing the functions it is to call."""
    from ..data.render import renderer_for

    if not any(tools) or renderer_for(tokenizer).writes_tools:
        return
    problems = [
        Problem(
            "tools_not_rendered",
            "the row gives 'tools', and the teacher's chat template does not write tool definitions: it would "
            "answer without seeing the functions it is to call. Use a teacher whose chat template takes tools "
            "(Qwen 2.5 and 3, Llama 3.1, Mistral, ...), or remove 'tools' from the row.",
            file=str(path),
            line=line,
            field="tools",
        )
        for line, row_tools in zip(lines, tools)
        if row_tools
    ]
    raise DataError.listing(
        f"{path}: {counted(len(problems), 'prompt row')} with tools the teacher cannot read", problems
    )


def _check_prompts_fit(
    path, prompts: list[list[dict]], tools: list[list[dict] | None], lines: list[int], tokenizer, window: int | None
) -> None:
    """Every prompt, with its tools, leaves the teacher room for an answer in its context (else an error naming
    the lines)."""
    from ..generate import encode_each

    if window is None:
        return
    problems = [
        Problem(
            "too_long",
            f"the prompt is {len(ids)} tokens; the teacher's maximum context length is {window} tokens, which "
            "leaves no room for its answer. Shorten the prompt or leave the row out.",
            file=str(path),
            line=line,
        )
        for line, ids in zip(lines, encode_each(tokenizer, prompts, tools))
        if len(ids) >= window
    ]
    if problems:
        raise DataError.listing(
            f"{path}: {counted(len(problems), 'prompt')} "
            f"{'does' if len(problems) == 1 else 'do'} not fit the teacher's context",
            problems,
        )


def rows_already_written(
    out: Path, prompts: list, prompt_of=lambda row: [row["messages"][:-1], row.get("tools")]
) -> int:
    """How many rows `out` holds, each checked against its prompt (`prompt_of(row)`, a chat row's messages
    before its answer and its tools by default); a torn last line is cut off."""
    if not out.exists():
        return 0
    data = out.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) < len(data):
        with out.open("r+b") as f:
            f.truncate(len(complete))
    lines = complete.decode("utf-8").splitlines()
    if len(lines) > len(prompts):
        raise TuneforgeError(
            f"{out} holds {counted(len(lines), 'row')} but the prompts file only {len(prompts)}: it was written "
            "for other prompts. Choose another --out.",
            code="output_mismatch",
        )
    for i, (text, prompt) in enumerate(zip(lines, prompts)):
        try:
            written = prompt_of(json.loads(text))
        except (ValueError, KeyError, TypeError):
            written = None
        if written != prompt:
            raise TuneforgeError(
                f"{out} line {i + 1} does not answer prompt {i + 1} of the prompts file: it was written "
                "for other prompts (their messages or tools), or by hand. Choose another --out (or remove the file).",
                code="output_mismatch",
            )
    return len(lines)


def check_same_teacher(out: Path, teacher: str, max_new_tokens: int, done: int, sampling: dict | None = None) -> None:
    """Rows added to `out` come from the teacher and answer length that wrote the rows already there, as
    `out`'s record beside it says (written before the first row; rows without one are refused, as another file's):
    a file continued by another teacher, or by the same one retrained in place, would mix two teachers' answers.
    `sampling` (best-of-N: samples, temperature, seed, grader, keep) must match too; greedy answers record samples
    as None."""
    from ..fsio import write_json
    from ..methods.distill import teacher_files
    from ..models import resolve_at

    source = resolve_at(teacher, "--teacher")
    wanted = {
        "teacher": str(source.path.resolve()),
        "adapter": str(source.adapter.resolve()) if source.adapter else None,
        "max_new_tokens": max_new_tokens,
        "files": hashlib.sha256(json.dumps(teacher_files(teacher)).encode()).hexdigest(),
        **(sampling or {"samples": None}),
    }
    # A NumPy count as the JSON number the record holds and is compared with.
    wanted = {key: int(value) if isinstance(value, numbers.Integral) else value for key, value in wanted.items()}
    record = out.with_name(out.name + ".teacher.json")
    answers = f"the sampled answers to {counted(done, 'prompt')}" if sampling else counted(done, "answer")
    if done and not record.is_file():
        # The record is written before the first answer: rows without one are another file's answers to the prompts,
        # or answers whose record was removed since; which teacher wrote them is unknown either way.
        raise TuneforgeError(
            f"{out} holds {answers} but no {record.name} beside it, which distill generate writes before its first "
            "answer, so which teacher wrote them is unknown: they are another file's (labelled training rows, say), "
            "or their record was removed. Choose another --out, or remove the file to write the answers again.",
            code="output_mismatch",
        )
    if done:
        written, unreadable = json_value(record.read_bytes())
        if unreadable is None and not (isinstance(written, dict) and isinstance(written.get("teacher"), str)):
            unreadable = "is no object naming the teacher"
        if unreadable is not None:
            raise TuneforgeError(
                f"{record} {unreadable}: it records the teacher that wrote {out}'s {answers}, and a rerun continues "
                "only with that teacher. Restore it, or choose another --out (or remove both files).",
                code="output_mismatch",
            )
        # A record without the files' hash predates it: its other keys still say which teacher wrote the rows.
        changed = [key for key in wanted if key in written and written[key] != wanted[key]]
        if len(changed) > 1 and "files" in changed:
            changed.remove("files")  # another teacher: its path says more than its files' hash
        differences = [
            "teacher files that have changed since (retrained or replaced)"
            if key == "files"
            else "grader files or reward models that have changed since (edited, replaced or retrained)"
            if key == "grader_files"
            else f"{key} {written[key]} where this call asks for {wanted[key]}"
            for key in changed
        ]
        if changed:
            raise TuneforgeError(
                f"{out} holds {answers} written with {'; '.join(differences)}, and the file would mix "
                "the two. Continue with the same --teacher, --max-new-tokens and (best-of-N) --samples, --temperature, "
                "--seed, --grader and --keep, or choose another --out.",
                code="output_mismatch",
            )
    if not done:
        write_json(record, wanted)


KEEP = ("best", "pairs")


def _sampled_prompt(record: dict) -> list | None:
    """A best-of-N record's prompt and tools, as `rows_already_written` checks them; None where its answers are
    not what `kept_row` reads (a text, a numeric score and a finish reason each), as after an edit by hand."""
    answers = record["samples"]
    whole = isinstance(answers, list) and all(
        isinstance(a, dict)
        and isinstance(a.get("text"), str)
        and isinstance(a.get("finish_reason"), str)
        and isinstance(a.get("score"), int | float)
        and not isinstance(a["score"], bool)
        for a in answers
    )
    return [record["prompt"], record.get("tools")] if whole else None


def sample_seed(seed: int, prompt: int, answer: int) -> int:
    """The seed of answer `answer` to prompt `prompt` (places in the prompts file): a rerun, or a resumed
    call, samples each answer as the first call did, and two seeds share no stream."""
    digest = hashlib.sha256(f"{seed}:{prompt}:{answer}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def reply_message(text: str, calls, answer: str) -> dict:
    """The assistant message of a teacher's answer. `calls`, a `tool_calls.ToolCallParser` (for an answer
    to a prompt with tools): an answer that calls tools has them as OpenAI's `tool_calls` and the text before
    them as content (None when there is none), as `tuneforge serve` replies, not as the teacher's call syntax.
    The calls' ids derive from `answer`, which answer it is (its prompt's place, and of best-of-N's the
    sample's), so a rerun or a resumed call writes the same bytes."""
    return assistant_message(text, None, partial(calls.parse, ids_from=answer) if calls is not None else None)


def kept_row(record: dict, place: int, keep: str, pass_threshold: float | None, calls=None) -> dict | None:
    """The training row a prompt's sampled answers give (`keep`: its best answer as a chat row, or its best
    and worst as a DPO pair), its scores in `scores`; None when the answers all score alike (pairs) or the
    best falls short of the grader's pass_threshold (best). Only answers that ended before max_new_tokens
    (finish_reason other than length) are chosen from; None when there are none. `place`: its prompt's in the
    prompts file; `calls`: as `reply_message` takes it, for a record with tools."""
    answers = record["samples"]
    scores = [a["score"] for a in answers]
    # An answer cut at max_new_tokens takes no part: the model did not end it, so kept as the best or chosen
    # reply it would train ending the turn mid-answer, and as the rejected one its score may be the cut's.
    whole = [i for i, a in enumerate(answers) if a["finish_reason"] != "length"]
    if not whole:
        return None
    best = max(whole, key=scores.__getitem__)
    prompt = record["prompt"]
    tools = {"tools": record["tools"]} if record.get("tools") else {}  # the student trains with the teacher's prompt
    calls = calls if tools else None
    if keep == "best":
        if pass_threshold is not None and scores[best] < pass_threshold:
            return None
        reply = reply_message(answers[best]["text"], calls, f"{place}:{best}")
        return {"messages": [*prompt, reply], **tools, "scores": {"best": scores[best], "all": scores}}
    worst = min(whole, key=scores.__getitem__)
    if scores[best] == scores[worst]:
        return None
    return {
        "prompt": prompt,
        "chosen": [reply_message(answers[best]["text"], calls, f"{place}:{best}")],
        "rejected": [reply_message(answers[worst]["text"], calls, f"{place}:{worst}")],
        **tools,
        "scores": {"chosen": scores[best], "rejected": scores[worst], "all": scores},
    }


def _grader_record(grader: str | dict | list, judge) -> dict:
    """What the record beside the output keeps of a grader: its spec, and a hash of the files it names and
    of the models it scores with (`judge`, the loaded grader): a grader file or reward functions' source
    edited, or a reward model retrained, between calls would score the rows by two graders."""
    parts = grader if isinstance(grader, list) else [grader]
    digest = hashlib.sha256()
    models = judge.model_files()
    if models:  # a grader without models: the hash of its files alone
        digest.update(json.dumps(models).encode())
    for part in parts:
        if isinstance(part, str):
            path = Path(part.rpartition(":")[0] if ".py:" in part else part)
            if path.is_file():
                digest.update(path.read_bytes())
    return {"grader": json.dumps(grader, sort_keys=True), "grader_files": digest.hexdigest()}


def generate_teacher_data(
    teacher: str,
    prompts_file: str | Path,
    out: str | Path,
    *,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    limit: int | None = None,
    precision: str = "auto",
    progress: bool = True,
    samples: int | None = None,
    temperature: float = 1.0,
    seed: int = 0,
    grader: str | dict | list | None = None,
    keep: str = "best",
) -> TeacherData:
    """Append the teacher's greedy answers to `out`, continuing after the rows already there.
    `limit` stops after the first `limit` prompts (a later call without it finishes the file).
    `precision` is what the teacher computes in: auto (bf16 where the hardware has it), bf16 or fp32.
    With `samples` and `grader`: best-of-N, `samples` answers a prompt at `temperature` from `seed`, scored
    by `grader`, `keep` best (chat rows) or pairs (DPO rows); see the module's docstring."""
    import torch

    from ..generate import generate
    from ..models import (
        compute_dtype,
        load_frozen_model,
        load_tokenizer,
        model_context_length,
        resolve_at,
        resolve_precision,
    )
    from ..progress import library_bars, progress_bar

    if max_new_tokens < 1 or batch_size < 1 or (limit is not None and limit < 0):
        raise TuneforgeError(
            "--max-new-tokens and --batch-size must be at least 1, --limit at least 0.", code="bad_option"
        )
    sampled = samples is not None
    if sampled != (grader is not None):
        raise TuneforgeError(
            "--samples N and --grader SPEC go together: N answers a prompt, the grader picks among them "
            "(without both, each prompt gets one greedy answer).",
            code="bad_option",
        )
    if sampled:
        # Only the options that fail are named: one that is fine, listed beside them, reads as a cause.
        needs = [
            (samples < 2, f"--samples of at least 2 (got {samples})"),
            (not temperature > 0, f"a --temperature above 0 (got {temperature}; at 0 every answer is the same)"),
            (keep not in KEEP, f"--keep best or pairs (got {keep})"),
        ]
        unmet = [need for failed, need in needs if failed]
        if unmet:
            raise TuneforgeError(f"best-of-N needs {' and '.join(unmet)}.", code="bad_option")
    out = Path(out)
    if out.is_dir():
        raise TuneforgeError(
            f"--out {out} is a folder; give the file to write, e.g. {out / 'teacher.jsonl'}.", code="bad_option"
        )
    if out.is_file() and Path(prompts_file).is_file() and out.samefile(prompts_file):
        raise TuneforgeError(
            f"--out {out} is the --prompts file: the teacher's answers would be written into the prompts they answer. "
            "Choose another --out.",
            code="bad_option",
        )
    prompts, lines, items, tools = _read_prompts(prompts_file)
    calls = None  # the parser of the teacher's tool calls, where a row gives tools
    tokenizer = None  # the teacher's: loaded here where rows give tools, else when answers are generated
    if any(tools):
        from ..data.render import renderer_for
        from ..tool_calls import parser_for

        tokenizer = load_tokenizer(resolve_at(teacher, "--teacher"))
        _check_tools_written(prompts_file, tools, lines, tokenizer)
        calls = parser_for(renderer_for(tokenizer).template)
    record_file = out.with_name(out.name + ".samples.jsonl") if sampled else out
    if sampled:
        from ..graders import load_grader
        from ..methods.grpo import naming_rows

        judge = load_grader(grader, key="--grader")
        where = [_Place(f"{prompts_file}:{line}") for line in lines]
        with naming_rows(where[:16]):
            judge.check(items[:16])
        with naming_rows(where):
            judge.check_items(items)
        done = rows_already_written(record_file, [[p, t] for p, t in zip(prompts, tools)], _sampled_prompt)
        if not done and out.exists() and out.stat().st_size:
            raise TuneforgeError(
                f"{out} holds rows that best-of-N did not write (there is no {record_file.name} beside it, whose "
                "answers it is written from). Choose another --out.",
                code="output_mismatch",
            )
    else:
        done = rows_already_written(out, [[p, t] for p, t in zip(prompts, tools)])
    target = len(prompts) if limit is None else min(limit, len(prompts))
    stopped_by_length = empty = left_out = 0
    if done or target:
        # Also when no row is left to add: a complete file from another teacher or answer length would
        # otherwise be taken as this teacher's answers.
        options = (
            {
                "samples": samples,
                "temperature": temperature,
                "seed": seed,
                "keep": keep,
                **_grader_record(grader, judge),
            }
            if sampled
            else None
        )
        check_same_teacher(out, teacher, max_new_tokens, done, options)
    rows = 0
    if sampled:
        # `out` follows from the answers recorded: written again whole, it drops rows of a call cut short.
        kept = [
            kept_row(json.loads(line), place, keep, judge.pass_threshold, calls)
            for place, line in enumerate(_lines(record_file))
        ]
        rows = sum(row is not None for row in kept)
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(out) as f:
            f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in kept if row is not None))
    if done < target:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        with library_bars(progress):
            model = load_frozen_model(
                teacher, "distill generate", dtype=compute_dtype(resolve_precision(precision, device)), device=device
            )
        if tokenizer is None:
            tokenizer = load_tokenizer(teacher)
        _check_prompts_fit(
            prompts_file,
            prompts[done:target],
            tools[done:target],
            lines[done:target],
            tokenizer,
            model_context_length(model),
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        per_call = max(1, batch_size // samples) if sampled else batch_size  # prompts a generate call decodes
        with (
            writing(out),
            writing(record_file),
            out.open("a", encoding="utf-8") as f,
            record_file.open("a", encoding="utf-8") if sampled else contextlib.nullcontext() as record,
            progress_bar("prompts sampled" if sampled else "teacher answers", target - done, progress) as advance,
        ):
            for start in range(done, target, per_call):
                batch = prompts[start : min(start + per_call, target)]
                batch_tools = tools[start : start + len(batch)]
                if sampled:
                    tools_asked = [row_tools for row_tools in batch_tools for _ in range(samples)]
                    answers = generate(
                        model,
                        tokenizer,
                        [prompt for prompt in batch for _ in range(samples)],
                        batch_size=batch_size,
                        max_new_tokens=max_new_tokens,
                        temperature=temperature,
                        seed=[
                            sample_seed(seed, i, j) for i in range(start, start + len(batch)) for j in range(samples)
                        ],
                        tools=tools_asked,
                    )
                    batch_items = [item for item in items[start : start + len(batch)] for _ in range(samples)]
                    with naming_rows(where[start : start + len(batch)], samples):
                        samples_given = rollout_samples([a.text for a in answers], tools_asked, tokenizer)
                        grades = judge.grade(samples_given, batch_items)
                    records = [
                        {
                            "prompt": prompt,
                            **({"tools": row_tools} if row_tools else {}),
                            "samples": [
                                {"text": a.text, "score": g.score, "finish_reason": a.finish_reason}
                                for a, g in zip(answers[k * samples : (k + 1) * samples], grades[k * samples :])
                            ],
                        }
                        for k, (prompt, row_tools) in enumerate(zip(batch, batch_tools))
                    ]
                    # The answers first: a crash between the two writes leaves `out` short, which the next
                    # call writes again from them.
                    _append(record, records)
                    kept = [kept_row(r, start + k, keep, judge.pass_threshold, calls) for k, r in enumerate(records)]
                    _append(f, [row for row in kept if row is not None])
                    rows += sum(row is not None for row in kept)
                    left_out += sum(row is None for row in kept)
                else:
                    answers = generate(
                        model, tokenizer, batch, batch_size=batch_size, max_new_tokens=max_new_tokens, tools=batch_tools
                    )
                    _append(
                        f,
                        [
                            {
                                "messages": [
                                    *prompt,
                                    reply_message(a.text, calls if row_tools else None, str(start + k)),
                                ],
                                **({"tools": row_tools} if row_tools else {}),
                            }
                            for k, (prompt, row_tools, a) in enumerate(zip(batch, batch_tools, answers))
                        ],
                    )
                stopped_by_length += sum(a.finish_reason == "length" for a in answers)
                empty += sum(not a.text.strip() for a in answers)
                advance(len(batch))
    written = max(done, target)
    if sampled:
        return TeacherData(out, len(prompts), written, done, stopped_by_length, empty, record_file, rows, left_out)
    return TeacherData(out, len(prompts), written, done, stopped_by_length, empty)


@dataclass(frozen=True)
class _Place:
    where: str  # file:line of a prompt, as `naming_rows` names the row a grader failed on


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


def _append(f, rows: list[dict]) -> None:
    """One write of whole lines, flushed and synced: a crash leaves at most a torn last line."""
    f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    f.flush()
    os.fsync(f.fileno())
