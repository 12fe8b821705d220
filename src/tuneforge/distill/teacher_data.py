"""`tuneforge distill generate`: the teacher's answers to prompts, as chat data a student trains on.

Sequence-level distillation: the student learns from the teacher's text, not its distributions, so
teacher and student may have different tokenizers. Prompts are chat rows (a last assistant turn,
if any, is dropped: the teacher answers in its place) or prompt/completion rows (the completion is
ignored). The output is OpenAI chat JSONL, one row per prompt, in the prompts' order.

Resumable: rows are appended a batch at a time, whole lines only, flushed and synced. A rerun
drops a torn last line (a crash mid-write), checks that every row already written answers the
prompt at its position, and continues with the next prompt, so no prompt is answered twice.
Every prompt gets its row, an empty answer too (rows stay aligned with prompts); the count of
empty answers is reported, and `data.on_error: skip` leaves them out of training.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..data import Problem
from ..data.formats import prompt_messages
from ..data.readers import open_rows
from ..errors import DataError, TuneforgeError
from ..fsio import writing
from ..wording import counted


@dataclass(frozen=True)
class TeacherData:
    out: Path
    prompts: int  # prompts in the file
    written: int  # rows in `out` now
    resumed_from: int  # rows that were already there
    stopped_by_length: int  # answers of this call cut at max_new_tokens
    empty: int  # answers of this call with no text, which SFT data checks reject (missing_content)


def _row_prompt(row, path: str, line: int, csv: bool) -> tuple[list[dict] | None, list[Problem]]:
    if not isinstance(row, dict) or not ({"messages", "prompt"} & set(row)):
        return None, [
            Problem(
                "unknown_format",
                'a prompt row needs "messages" (chat) or "prompt" (prompt/completion).',
                file=path,
                line=line,
            )
        ]
    messages, problems = prompt_messages(row, file=path, line=line, csv=csv)
    if messages is None:
        return None, problems
    if "messages" in row and messages[-1].role == "assistant":
        messages = messages[:-1]
    if not messages or messages[-1].role == "system":
        return None, [
            Problem(
                "missing_prompt",
                "nothing for the teacher to answer: the row has no user message "
                "(after dropping its last assistant turn).",
                file=path,
                line=line,
                field="messages" if "messages" in row else "prompt",
            )
        ]
    return [m.to_template() for m in messages], []


def read_prompts(path: str | Path) -> list[list[dict]]:
    """Every row's prompt as chat messages; all problems at once, as a `DataError`, before any model loads."""
    return _read_prompts(path)[0]


def _read_prompts(path: str | Path) -> tuple[list[list[dict]], list[int]]:
    """`read_prompts`, and the line each prompt is on."""
    path = str(path)
    prompts, lines, problems = [], [], []
    rows = open_rows(path)
    for line, row in rows:
        if isinstance(row, Problem):
            problems.append(row)
            continue
        messages, row_problems = _row_prompt(row, path, line, rows.kind == "csv")
        problems += [p for p in row_problems if p.is_error]
        if messages is not None:
            prompts.append(messages)
            lines.append(line)
    unreadable = [p for p in problems if p.line is None]  # the file as a whole: missing, empty, unknown
    if unreadable:
        raise DataError.listing(f"--prompts {path} cannot be read", unreadable)
    if problems:
        raise DataError.listing(f"{path}: {len(problems)} prompt rows cannot be used", problems)
    if not prompts:
        raise DataError(f"{path} holds no prompts.", code="empty_file")
    return prompts, lines


def _check_prompts_fit(path, prompts: list[list[dict]], lines: list[int], tokenizer, window: int | None) -> None:
    """Every prompt leaves the teacher room for an answer in its context (else an error naming the lines)."""
    from ..generate import encode_prompts

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
        for line, ids in zip(lines, encode_prompts(tokenizer, prompts))
        if len(ids) >= window
    ]
    if problems:
        raise DataError.listing(
            f"{path}: {counted(len(problems), 'prompt')} "
            f"{'does' if len(problems) == 1 else 'do'} not fit the teacher's context",
            problems,
        )


def rows_already_written(out: Path, prompts: list[list[dict]]) -> int:
    """How many rows `out` holds, each checked against its prompt; a torn last line is cut off."""
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
            written = json.loads(text)["messages"][:-1]
        except (ValueError, KeyError, TypeError):
            written = None
        if written != prompt:
            raise TuneforgeError(
                f"{out} line {i + 1} does not answer prompt {i + 1} of the prompts file: it was written "
                "for other prompts, or by hand. Choose another --out (or remove the file).",
                code="output_mismatch",
            )
    return len(lines)


def check_same_teacher(out: Path, teacher: str, max_new_tokens: int, done: int) -> None:
    """Rows added to `out` come from the teacher and answer length that wrote the rows already there, as
    `out`'s record beside it says (written with the first row): a file continued by another teacher,
    or by the same one retrained in place, would mix two teachers' answers."""
    from ..fsio import write_json
    from ..methods.distill import teacher_files
    from ..models import resolve

    source = resolve(teacher)
    wanted = {
        "teacher": str(source.path.resolve()),
        "adapter": str(source.adapter.resolve()) if source.adapter else None,
        "max_new_tokens": max_new_tokens,
        "files": hashlib.sha256(json.dumps(teacher_files(teacher)).encode()).hexdigest(),
    }
    record = out.with_name(out.name + ".teacher.json")
    if done and record.is_file():
        written = json.loads(record.read_text())
        # A record without the files' hash predates it: its other keys still say which teacher wrote the rows.
        changed = [key for key in wanted if key in written and written[key] != wanted[key]]
        if len(changed) > 1 and "files" in changed:
            changed.remove("files")  # another teacher: its path says more than its files' hash
        differences = [
            "teacher files that have changed since (retrained or replaced)"
            if key == "files"
            else f"{key} {written[key]} where this call asks for {wanted[key]}"
            for key in changed
        ]
        if changed:
            raise TuneforgeError(
                f"{out} holds {done} answers written with {'; '.join(differences)}, and the file would mix "
                "the two. Continue with the same --teacher and --max-new-tokens, or choose another --out.",
                code="output_mismatch",
            )
    if not done or not record.is_file():
        write_json(record, wanted)


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
) -> TeacherData:
    """Append the teacher's greedy answers to `out`, continuing after the rows already there.
    `limit` stops after the first `limit` prompts (a later call without it finishes the file).
    `precision` is what the teacher computes in: auto (bf16 where the hardware has it), bf16 or fp32."""
    import torch

    from ..generate import generate
    from ..models import compute_dtype, load_frozen_model, load_tokenizer, model_context_length, resolve_precision
    from ..progress import library_bars, progress_bar

    if max_new_tokens < 1 or batch_size < 1 or (limit is not None and limit < 0):
        raise TuneforgeError(
            "--max-new-tokens and --batch-size must be at least 1, --limit at least 0.", code="bad_option"
        )
    out = Path(out)
    if out.is_dir():
        raise TuneforgeError(
            f"--out {out} is a folder; give the file to write, e.g. {out / 'teacher.jsonl'}.", code="bad_option"
        )
    prompts, lines = _read_prompts(prompts_file)
    done = rows_already_written(out, prompts)
    target = len(prompts) if limit is None else min(limit, len(prompts))
    stopped_by_length = empty = 0
    if done or target:
        # Also when no row is left to add: a complete file from another teacher or answer length would
        # otherwise be taken as this teacher's answers.
        check_same_teacher(out, teacher, max_new_tokens, done)
    if done < target:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        with library_bars(progress):
            model = load_frozen_model(teacher, dtype=compute_dtype(resolve_precision(precision, device)), device=device)
        tokenizer = load_tokenizer(teacher)
        _check_prompts_fit(
            prompts_file, prompts[done:target], lines[done:target], tokenizer, model_context_length(model)
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        with (
            writing(out),
            out.open("a", encoding="utf-8") as f,
            progress_bar("teacher answers", target - done, progress) as advance,
        ):
            for start in range(done, target, batch_size):
                batch = prompts[start : min(start + batch_size, target)]
                answers = generate(model, tokenizer, batch, batch_size=batch_size, max_new_tokens=max_new_tokens)
                # One write per batch of whole lines, synced: a crash leaves at most a torn last line.
                f.write(
                    "".join(
                        json.dumps(
                            {"messages": [*prompt, {"role": "assistant", "content": answer.text}]}, ensure_ascii=False
                        )
                        + "\n"
                        for prompt, answer in zip(batch, answers)
                    )
                )
                f.flush()
                os.fsync(f.fileno())
                stopped_by_length += sum(a.finish_reason == "length" for a in answers)
                empty += sum(not a.text.strip() for a in answers)
                advance(len(batch))
    return TeacherData(out, len(prompts), max(done, target), done, stopped_by_length, empty)
