"""`tuneforge data prepare CONFIG --out DIR`: the rows a run trains and validates on, written out.

The config's data goes through the pipeline training runs (`prepare.select_rows`: read, check, dedup,
fit to max_length, split), and the folder gets, all at once or not at all:

- `train.jsonl`, `valid.jsonl`: the rows kept, as the files hold them, in the order training reads them
  (it shuffles them each epoch), a row of a file with a `weight` in data.train as many times as an epoch
  sees it (so `train_with` holds no weights); where the rows of one of them come from files of different formats
  (chat, alpaca and prompt/completion files, say), each of its rows is written instead as the record
  it reads as, in that record's canonical format (`formats.record_row`: OpenAI chat for a conversation),
  since a file of mixed formats is refused;
- `dropped.jsonl`: each row left out, with its file, line and reason (`duplicate` or `near_duplicate` of
  FILE:LINE, `validation_leak`, `over_max_length` under truncation: drop, `error` under on_error: skip);
- `summary.json`: the counts, tokens and warnings of the data report, and the data config that trains
  on the written files (`train_with`): the same examples and tokens as the config given.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from ..config import load_config
from ..errors import ConfigError, DataError
from ..fsio import atomic_dir, write_json
from ..progress import progress_bar
from ..wording import counted
from . import cache, pii
from .formats import json_rows, read_conversations, record_row
from .prepare import error_summary, file_state, refuses, replay_file, select_rows, told_warnings
from .readers import extent
from .render import check_template
from .schema import Problem


def prepare_command(config, overrides=(), *, out: str | Path, force: bool = False, progress: bool = True) -> int:
    """Write the rows CONFIG's run trains and validates on, and those it leaves out, to the folder `out`."""
    out = Path(out)
    cfg = load_config(config, overrides)
    if cfg.method == "grpo":
        raise ConfigError(
            "tuneforge data prepare writes the examples of the data pipeline; method: grpo trains on the data's "
            "prompts instead (see `tuneforge validate` for what it reads)."
        )
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; name a folder to write.")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"--out {out} is a folder that is not empty; name another, or add --force to replace it.")
    from ..methods import template_where  # here: the models stage pulls in heavy imports
    from ..models import run_tokenizer

    tokenizer = run_tokenizer(cfg, cfg.base_source())
    if cfg.model.chat_template is not None:  # refused as validate and train refuse it, before any row is read
        check_template(tokenizer, template_where(cfg))
    data = cfg.data
    files = cache.data_files(data, replay_file(data))
    states = [file_state(str(path)) for path in files]
    prepared, errors, selection = select_rows(data, tokenizer, progress=progress)
    if refuses(data.on_error, (p.code for p in errors)):
        raise DataError(error_summary(errors, data, None), code=errors[0].code, problems=errors)
    report = prepared.report
    # A row of a weighted file (data.train's `weight`) is written as many times as an epoch sees it.
    wanted = {"train": Counter(selection.train), "valid": Counter(selection.valid)}
    redact = data.pii == "redact"
    written_as = {name: _written_as(report["files"], name, redact) for name in ("train", "valid")}
    written: Counter = Counter()
    reasons: Counter = Counter()
    with atomic_dir(out, replace=True) as tmp:
        with (
            open(tmp / "train.jsonl", "w", encoding="utf-8") as train,
            open(tmp / "valid.jsonl", "w", encoding="utf-8") as valid,
            open(tmp / "dropped.jsonl", "w", encoding="utf-8") as dropped,
        ):
            for read, source in enumerate(report["files"]):
                path = source["path"]
                left_out = {line: why for (r, line), why in selection.left_out.items() if r == read}
                reached = 0
                records = _RecordsByLine(path, read_conversations(path, data.format))
                with progress_bar(f"data: writing the rows of {Path(path).name}", extent(path), progress) as advance:
                    for line, row in json_rows(path, data.format):
                        if line and line > reached:
                            advance(line - reached)
                            reached = line
                        for name, f in (("train", train), ("valid", valid)):
                            if (read, line) in wanted[name] and isinstance(row, dict):
                                as_read = written_as[name] == "as read"
                                times = wanted[name][(read, line)]
                                if as_read:
                                    f.write(_jsonl(row) * times)
                                else:
                                    record = records.at(line)
                                    record = pii.redact_record(record) if redact else record
                                    f.write(_jsonl(record_row(record)) * times)
                                written[name] += times
                        if line in left_out:
                            why = left_out.pop(line)
                            entry = {"file": path, "line": line, **why}
                            if isinstance(row, dict):
                                entry["row"] = pii.redact_value(row) if redact else row
                            dropped.write(_jsonl(entry))
                            reasons[why["reason"]] += 1
                for line, why in left_out.items():  # rows the reader gave no line of its own (none expected)
                    dropped.write(_jsonl({"file": path, "line": line, **why}))
                    reasons[why["reason"]] += 1
        if [file_state(str(path)) for path in files] != states:
            raise DataError(
                "a data file changed while it was being prepared (is something still writing it?), so the rows "
                "written may not be those checked. Wait until it is complete, then run again.",
                code="file_changed",
            )
        if written["train"] != len(selection.train) or written["valid"] != len(selection.valid):
            raise DataError(
                f"{counted(len(selection.train) + len(selection.valid), 'row')} kept, but "
                f"{written['train'] + written['valid']} could be read back from the files; run again.",
                code="file_changed",
            )
        write_json(tmp / "summary.json", _summary(report, data, written, reasons, written_as))
    counts = report["counts"]
    print(
        f"data: wrote {counted(written['train'], 'training row')} ({counted(counts['train'], 'example')}) and "
        f"{counted(written['valid'], 'validation row')} ({counted(counts['validation'], 'example')}) to {out}; "
        f"{counted(sum(reasons.values()), 'row')} left out "
        f"(dropped.jsonl)" + (": " + ", ".join(f"{n} {r}" for r, n in reasons.most_common()) if reasons else "")
    )
    for name, form in written_as.items():
        if redact:
            print(
                f"data: {name}.jsonl's rows have typed placeholders (<EMAIL>, <API_KEY>, ...) in place of the "
                f"secrets and personal data found (data.pii: redact), so each is written as the record it reads "
                f"as, in {form} format; dropped.jsonl's rows have them too"
            )
        elif form != "as read":
            print(
                f"data: {name}.jsonl's rows come from files of different formats, so each is written as the "
                f"record it reads as, in {form} format (a file of mixed formats is refused)"
            )
    if data.general_mix:
        print(
            f"data: training on them mixes in general replay conversations of {data.general_replay} as "
            f"data.general_mix {data.general_mix} asks (kept in summary.json's train_with; not written)"
        )
    for warning in told_warnings(report):
        print(f"data: warning: {warning['message']}")
    return 0


# Every other format reads as a conversation: chat.
_CANONICAL = {"text": "text", "preference": "preference", "kto": "kto"}


def _written_as(files: list[dict], name: str, redact: bool = False) -> str:
    """How the rows of one output file are written: "as read" where they all come from files of one
    format and are not redacted, else the canonical format of their records (a file of mixed formats is
    refused)."""
    counted = "train_rows" if name == "train" else "validation_rows"
    feeding = [f for f in files if f[counted]]
    if not feeding or (len({f["format"] for f in feeding}) < 2 and not redact):
        return "as read"
    canonical = {f["path"]: _CANONICAL.get(f["format"], "chat") for f in feeding}
    if len(set(canonical.values())) > 1:  # text with conversations: no one format holds both
        by_form = {form: [p for p, c in canonical.items() if c == form] for form in sorted(set(canonical.values()))}
        raise ConfigError(
            f"the rows of {name}.jsonl come from files whose records no one format holds ("
            + "; ".join(f"{form}: {', '.join(paths)}" for form, paths in by_form.items())
            + "), and a file of mixed formats is refused. Prepare the text files and the others in separate "
            "configs, or train on the config itself."
        )
    return next(iter(canonical.values()))


class _RecordsByLine:
    """The records of one file as `read_conversations` gives them, looked up by line in increasing order
    (the order the file's rows are written in), reading the file once as it goes."""

    def __init__(self, path: str, items):
        self.path, self.items = path, iter(items)

    def at(self, line: int):
        for at, item in self.items:
            if at == line and not isinstance(item, Problem):
                return item
        raise DataError(
            f"{self.path}:{line} could not be read back as it was checked (did the file change?); run again.",
            code="file_changed",
        )


def _jsonl(value) -> str:
    return json.dumps(value, ensure_ascii=False, default=str) + "\n"


def _summary(report: dict, data, written: Counter, reasons: Counter, written_as: dict) -> dict:
    """What summary.json holds: rows written and left out, how they are written, the report's counts,
    tokens and warnings, and the data config that trains on the written files."""
    train_with = {
        **data.model_dump(),
        "train": "train.jsonl",
        # A run without validation rows needs none: an empty valid.jsonl is refused as a validation file.
        "validation": "valid.jsonl" if written["valid"] else None,
        "dedup": "none",  # the rows are deduplicated already; a validation leak is still checked
    }
    return {
        "kind": report["kind"],
        "files": report["files"],
        "rows": {
            "train": written["train"],
            "validation": written["valid"],
            "dropped": sum(reasons.values()),
            "dropped_by_reason": dict(reasons.most_common()),
        },
        "written_as": {"train": written_as["train"], "validation": written_as["valid"]},
        "counts": report["counts"],
        "tokens": report["tokens"],
        "warnings": report["warnings"],
        "config": report["config"],
        "train_with": train_with,
    }
