"""`prepare`: from a `DataConfig` to tokenized train and validation examples, checked and reported.

One streaming pass reads every file, checks every row, drops exact/near duplicates and validation
leaks, renders and tokenizes in batches, and fits rows to `max_length`. Then the validation set is
split off (if it is a fraction), data-set-wide checks run, and the report is written. Under
`on_error: strict` any error stops preparation with a `DataError` listing all of them (the report
has them too); under `skip` bad rows are left out and counted. Nothing is trained on until this
has passed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from ..config import DataConfig
from ..errors import DataError
from ..fsio import write_json
from ..models.loading import chatml_fallback_warning
from ..models.system_prompt import recorded_system_prompt
from ..progress import progress_bar
from ..tasks.general import BUNDLED_REPLAY, bundled_file
from ..wording import counted, first_places
from . import cache, pii
from .dedup import DuplicateIndex, content_hash, held_out_keys
from .formats import file_format, read_conversations
from .readers import extent
from .render import FATAL_CODES, render_examples, renderer_for
from .schema import Conversation, Document, Example, Preference, PreparedData, Problem, Record

REPORT_VERSION = 1
MAX_LISTED = 1000
"""Rejected rows (and duplicates, leaks) listed in the report; the counts cover all of them."""
_LISTED_PLACES = 20  # places a warning lists in the report
FEW_EXAMPLES = 10
_CHUNK_ROWS = 512
_SHOWN_IN_ERROR = 20
PII_CODES = ("secret_in_reply", "personal_data_in_reply", "secret_in_prompt", "personal_data_in_prompt")
"""A row's secrets and personal data, by where they are (most to be feared first); errors under data.pii: refuse."""
DATA_SET_CODES = FATAL_CODES | {
    "no_valid_rows",
    "eos_never_trained",
    "kto_one_label",
    "kto_one_valid_row",
    "file_changed",
    "split_not_text",
    *PII_CODES,
}
"""Errors that stop `prepare` even under on_error: skip: those with the data set as a whole, and the
secrets and personal data that data.pii: refuse refuses (skipping their rows would train on the rest unasked)."""


def refuses(on_error: str, codes) -> bool:
    """Whether problems with these codes stop `prepare`, and so the run: any under on_error: strict, and
    those with the data set as a whole under skip."""
    codes = set(codes)
    return bool(codes) and (on_error == "strict" or bool(codes & DATA_SET_CODES))


Item = Example | tuple[Example, ...]  # a preference pair, or a conversation rendered turn by turn


@dataclass
class _Row:
    """A row that made it through: where it came from, its content key, its tokens (None where only the
    report is wanted) and what the report counts of them."""

    file: str
    line: int
    key: int
    item: Item | None
    lengths: tuple[int, ...]  # each example's tokens, as fitted to max_length
    trained: int
    trains_end: bool  # trains an end-of-turn token
    read: int = 0  # which file read it: the index of its file in the report's `files`
    desirable: bool | None = None  # a KTO row's rating

    @property
    def examples(self) -> int:
        return len(self.lengths)

    @property
    def tokens(self) -> int:
        return sum(self.lengths)


@dataclass
class RowSelection:
    """Which rows of the files training keeps, and why each other row is left out: `train` and `valid`
    are (read, line) pairs in the order training sees them before it shuffles, where `read` is the index
    of the file in the report's `files` (a file may be read twice); `left_out` maps (read, line) to why
    the row is left out (a dict with `reason` and what it names)."""

    train: list[tuple[int, int]]
    valid: list[tuple[int, int]]
    left_out: dict[tuple[int, int], dict]


class _Stop(Exception):
    """A problem with the whole data set (not one row): preparation cannot go on."""

    def __init__(self, problem: Problem):
        self.problem = problem


def prepare(
    cfg: DataConfig,
    tokenizer,
    *,
    report_path: Path | None = None,
    use_cache: bool = True,
    log: Callable[[str], object] = print,
    progress: bool = False,
    hashed: tuple[str | None, list] | None = None,
) -> PreparedData:
    """Read, check, render, dedup, split and fit the data; raise DataError if it is not fit to train on.

    The report (what `data_report.json` holds) is in the result, and written to `report_path`
    (atomically) when given and the data is refused, naming what refused it; a run writes the report of data
    it trains on as it starts. With `use_cache`, the result is stored
    under `tuneforge_home()/data-cache/` and reused by a later run with the same files, tokenizer
    and data config. With `general_mix`, conversations of the `general_replay` file are mixed into
    training (`replay_file`). With `progress`, a bar (or log lines) follows each file through the pass.
    `hashed`: the cache key and file states `hash_data` gave where a caller has hashed the files, so they are
    not hashed again.
    """
    replay = replay_file(cfg)
    key, states = (hashed or hash_data(cfg, tokenizer)) if use_cache else (None, None)
    try:
        cached = cache.load(key) if key else None
    except (OSError, ValueError, KeyError) as e:
        # An entry damaged after it was written (a disk fault, a copy of the cache cut short) is only lost time:
        # the data is prepared again and the entry replaced.
        log(f"data: warning: the cached data set in {cache.cache_dir() / key} cannot be read ({e}); preparing it again")
        cached = None
    if cached is not None:
        cached.report["cache"] = {"key": key, "reused": True, "path": str(cache.cache_dir() / key)}
        log(f"data: reusing the tokenized data set cached in {cache.cache_dir() / key}")
        _log_report(cached.report, log)
        return cached
    data, errors = check_data(cfg, tokenizer, progress=progress)
    if refuses(cfg.on_error, (p.code for p in errors)):
        if report_path is not None:
            write_json(report_path, data.report)
        raise DataError(error_summary(errors, cfg, report_path), code=errors[0].code, problems=errors)
    _mix_general(data, cfg, tokenizer, replay)
    _log_report(data.report, log)
    # A data file saved over after its hashing holds other rows than the key says: that entry would hand
    # them to a later run on the earlier file, so it is not written. Its size and time tell, without hashing again.
    if key and states == [file_state(str(path)) for path in cache.data_files(cfg, replay)]:
        try:
            data.report["cache"] = {"key": key, "reused": False, "path": str(cache.save(key, data))}
            log(f"data: tokenized data set cached in {cache.cache_dir() / key}")
        except OSError as e:  # a cache that cannot be written costs the next run time, not this run
            log(f"data: warning: could not cache the tokenized data set in {cache.cache_dir()}: {e}")
    return data


def hash_data(cfg: DataConfig, tokenizer, *, contents: bool = True) -> tuple[str | None, list]:
    """The data's cache key (`cache.cache_key`; None where a file is missing, or without `contents`, which
    hashes nothing) and its files' states (`file_state`) taken before they are hashed: `prepare` caches no
    rows of a file saved over since, whose rows are not those the key was hashed from."""
    replay = replay_file(cfg)
    states = [file_state(str(path)) for path in cache.data_files(cfg, replay)]
    return (cache.cache_key(cfg, tokenizer, replay) if contents else None), states


def _log_report(report: dict, log: Callable[[str], object]) -> None:
    """What a run's log says of its data, prepared now or reused from the cache: its examples and every
    warning of its report."""
    counts = report["counts"]
    log(
        f"data: {counted(counts['train'], 'training example')} and "
        f"{counted(counts['validation'], 'validation example')} from {counted(counts['read'], 'row')}"
        + (f" ({split_documents(counts)})" if "train_documents" in counts else "")
    )
    for _, line in describe_files(report):
        log(f"data: {line}")
    for warning in told_warnings(report):
        log(f"data: warning: {warning['message']}")


# A report's warnings that a command has said already, as it loaded the model (`load_tokenizer`): the report keeps
# them for its readers (data_report.json, --json, the dashboard), and a person is not told them twice.
SAID_AS_THE_MODEL_LOADS = frozenset({"chat_template_missing"})


def told_warnings(report: dict) -> list:
    """The warnings of `report` a command prints for a person: all but those `SAID_AS_THE_MODEL_LOADS`."""
    return [w for w in report.get("warnings", []) if isinstance(w, str) or w["code"] not in SAID_AS_THE_MODEL_LOADS]


def split_documents(counts: dict) -> str:
    """What data.truncation: split made of the documents: the windows of each split, of how many documents."""
    return (
        f"windows of {counted(counts['train_documents'], 'training document')} and "
        f"{counted(counts['validation_documents'], 'validation document')}; "
        f"{counted(counts['split'], 'document')} over max_length cut into windows"
    )


def describe_files(report: dict) -> list[tuple[str, str]]:
    """One line per file where there are several: what became of its rows and its share of the tokens of
    the files read for the same role (none for a report written before files were counted)."""
    files = report["files"]
    if len(files) < 2 or any("left_out" not in f for f in files):
        return []
    totals = Counter()
    for f in files:
        totals[f["role"]] += f["tokens"]
    per_epoch = sum(f.get("trained_tokens_per_epoch", 0) for f in files)
    lines = []
    for f in files:
        kept = ", ".join(
            counted(f[key + "_rows"], f"{key} row")
            for key in ("train", "validation")
            if f[key + "_rows"] or f["role"] == key
        )
        lines.append(
            (
                "" if lines else "files",
                f"{Path(f['path']).name} ({f['format'] or 'unknown format'}, {f['role']}): {kept}, "
                f"{f['left_out']} left out; {f['tokens']:,} tokens "
                f"({f['tokens'] / (totals[f['role']] or 1):.0%} of {f['role']} tokens)"
                + (
                    f"; weight {f['weight']:g}: {counted(f['rows_per_epoch'], 'row')} per epoch, "
                    f"{f['trained_tokens_per_epoch'] / (per_epoch or 1):.0%} of the trained tokens of an epoch"
                    if "rows_per_epoch" in f
                    else ""
                ),
            )
        )
    return lines


def replay_file(cfg: DataConfig) -> Path | None:
    """The chat file whose conversations `general_mix` mixes in: a bundled set by name, or a path."""
    if not cfg.general_mix:
        return None
    if cfg.general_replay in BUNDLED_REPLAY:
        return bundled_file(cfg.general_replay)
    path = Path(cfg.general_replay)
    if not path.is_file():
        raise DataError(
            f"data.general_replay: {path} is not a file. Name a bundled set "
            f"({', '.join(BUNDLED_REPLAY)}) or a chat JSONL file, such as a model's replies to "
            "general prompts written by `tuneforge distill generate`.",
            code="missing_file",
        )
    return path


def replay_conversations(path: Path) -> list[Conversation]:
    """Every conversation of a replay file; its problems, all at once, as a `DataError`."""
    conversations, problems = [], []
    for line, item in read_conversations(path):
        if isinstance(item, Problem):
            problems += [item] if item.is_error else []
        elif isinstance(item, Conversation):
            conversations.append(item)
        else:
            problems.append(
                Problem(
                    "data_type",
                    f"this row is {file_format(path)} data, but replay rows must be conversations with a reply: "
                    'chat {"messages": [...]}, alpaca, sharegpt or prompt/completion rows.',
                    file=str(path),
                    line=line,
                )
            )
            break
    if problems:
        shown = "\n".join(str(p) for p in problems[:_SHOWN_IN_ERROR])
        raise DataError(
            f"data.general_replay: {path} has {counted(len(problems), 'problem')}; fix them or choose another "
            f"file:\n{shown}",
            code=problems[0].code,
            problems=problems,
        )
    return conversations


QUIET_REPLAY_REPEATS = 3
"""Times each general replay example may repeat to make up `general_mix` before the report warns."""


def _mix_general(data: PreparedData, cfg: DataConfig, tokenizer, replay: Path | None) -> None:
    """Mix general replay conversations into training so that `general_mix` of it is general data:
    a guard against forgetting."""
    if replay is None or not data.train:
        return
    wanted = round(cfg.general_mix / (1 - cfg.general_mix) * len(data.train))
    rendered = [e for c in replay_conversations(replay) for e in render_examples(c, tokenizer, cfg.train_on)]
    pool = [replace(e, is_replay=True) for e in rendered if len(e.input_ids) <= cfg.max_length]
    if wanted and not pool:
        raise DataError(
            f"data.general_mix {cfg.general_mix} asks for {wanted} replay examples, but none of the "
            f"{len(rendered)} replay examples of {cfg.general_replay} fits data.max_length {cfg.max_length} "
            f"(the shortest is {min((len(e) for e in rendered), default=0)} tokens). Raise data.max_length, "
            "or choose a general_replay file of shorter conversations.",
            code="replay_too_long",
        )
    left_out = len(rendered) - len(pool)
    repeats = wanted / len(pool) if pool else 0
    # A replay file a little smaller than the mix asks for repeats each example a few times, as a few
    # epochs would (the quickstart's 200 self-replies make up its 500 replay examples); more repeats
    # teach a replay learned as text by heart, and a length cut is a loss the user did not choose.
    if repeats > 1 and (left_out or repeats > QUIET_REPLAY_REPEATS):
        cut = f" ({left_out} longer than max_length {cfg.max_length} are left out)" if left_out else ""
        data.report["warnings"].append(
            {
                "code": "replay_repeated",
                "count": wanted - len(pool),
                "message": f"general_mix {cfg.general_mix} asks for {wanted} replay examples, but "
                f"{cfg.general_replay} gives {len(pool)}{cut}, so each is repeated about "
                f"{repeats:.1f} times. Give a general_replay file with more conversations, or lower "
                "data.general_mix.",
                "where": [],
            }
        )
    mixed = [pool[i % len(pool)] for i in range(wanted)] if pool else []
    data.train.extend(mixed)  # the loop shuffles every epoch
    data.report["counts"]["general_mix"] = len(mixed)
    data.report["counts"]["general_replay_too_long"] = left_out
    data.report["counts"]["train"] = len(data.train)


def check_data(
    cfg: DataConfig, tokenizer, *, progress: bool = False, keep_examples: bool = True
) -> tuple[PreparedData, list[Problem]]:
    """Everything `prepare` does except deciding: returns the data (bad rows left out) and every error.
    Without `keep_examples` only the report is filled (no examples): memory then stays small however
    many rows the files hold."""
    return _checked(cfg, tokenizer, progress, keep_examples).result()


def render_first_rows(cfg: DataConfig, tokenizer, rows: int) -> list[Problem]:
    """The problems of rendering the first `rows` rows of the first training file as training renders them: a
    quick check of the chat template on real rows, where `check_data` reads every row. Rows that cannot be read,
    or of another kind than the first, are `check_data`'s to report."""
    path = cfg.train_files[0]
    read: list[tuple[int, Record]] = []
    for line, item in read_conversations(path, cfg.format):
        if isinstance(item, Problem) or (read and _kind(item) != _kind(read[0][1])):
            continue
        read.append((line, item))
        if len(read) == rows:
            break
    if not read:
        return []
    records = [record for _, record in read]
    results = _start_rendering(renderer_for(tokenizer), _kind(records[0]), records, cfg).finish()
    return [
        replace(problem, file=str(path), line=line)
        for (line, _), result in zip(read, results)
        if isinstance(result, list)
        for problem in result
    ]


def select_rows(
    cfg: DataConfig, tokenizer, *, progress: bool = False
) -> tuple[PreparedData, list[Problem], RowSelection]:
    """`check_data` (the report only, no examples) with the rows it keeps and why it leaves out each
    other one, by file and line: what `tuneforge data prepare` writes out."""
    run = _checked(cfg, tokenizer, progress, keep_examples=False)
    data, errors = run.result()
    selection = RowSelection([(r.read, r.line) for r in run.train], [(r.read, r.line) for r in run.valid], run.left_out)
    return data, errors, selection


def _checked(cfg: DataConfig, tokenizer, progress: bool, keep_examples: bool) -> _Preparation:
    run = _Preparation(cfg, tokenizer, progress, keep_examples)
    try:
        run.read_all()
        run.split()
        run.check_data_set()
        run.weigh()
    except _Stop as stop:
        run.problems.append(stop.problem)
    return run


def file_state(path: str) -> tuple[int, int] | None:
    """A file's size and modification time: what writing to it changes. None when it cannot be read."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


class _Preparation:
    """One pass over the data: reads, checks, dedups, renders and fits every row, counting as it goes."""

    def __init__(self, cfg: DataConfig, tokenizer, progress: bool = False, keep_examples: bool = True):
        self.cfg, self.progress, self.keep_examples = cfg, progress, keep_examples
        self.renderer = renderer_for(tokenizer)
        self.problems: list[Problem] = []
        self.counts: Counter = Counter()
        self.kind: tuple[str, str, int] | None = None  # ("sft" | "preference" | "kto", file, line) of the first row
        self.files: list[dict] = []
        self.duplicates: list[tuple[int, dict]] = []  # (where the row is, as a row id: the order they are listed in)
        self.leaks: list[dict] = []
        self.over_length: list[str] = []  # the first places of rows cut or dropped at max_length
        self.system_prompts = SystemPromptTally(tokenizer)
        self.replies = ReplyTally()
        self.pii = PiiScreen(cfg.pii, cfg.train_on, self.problems)
        near = cfg.near_dedup_threshold if cfg.dedup == "near" else None
        self.validation_keys = DuplicateIndex(near)  # for the leak check, even without dedup
        self.train_index = DuplicateIndex(near) if cfg.dedup != "none" else None
        self.train: list[_Row] = []  # after `weigh`, the rows of an epoch, repeats included
        self.kept: list[_Row] | None = None  # the training rows before `weigh` repeats them (None: unweighted)
        self.valid: list[_Row] = []
        self.left_out: dict[tuple[int, int], dict] = {}  # (read, line) of a row left out: why

    # --- the streaming pass ---------------------------------------------------------------------

    def read_all(self) -> None:
        validation_file = self.cfg.validation if isinstance(self.cfg.validation, str) else None
        if validation_file:  # first, so that training rows it holds are caught before rendering
            self.valid = self._read_file(
                validation_file, "validation", index=self.validation_keys, drop_repeats=self.cfg.dedup != "none"
            )
        for path, weight in zip(self.cfg.train_files, self.cfg.train_weights):
            self.train += self._read_file(
                path,
                "train",
                index=self.train_index,
                drop_repeats=True,
                leaks_from=self.validation_keys if validation_file else None,
            )
            self.files[-1]["weight"] = weight

    def _read_file(
        self,
        path: str,
        role: str,
        *,
        index: DuplicateIndex | None,
        drop_repeats: bool,
        leaks_from: DuplicateIndex | None = None,
    ) -> list[_Row]:
        """Stream one file through checks, dedup and rendering. Rows are added to `index` once they are
        kept (rendered and fitted to max_length), in file order: a row repeats the first kept row it
        matches, never one left out, whatever the rows rendered at once."""
        self.files.append({"path": str(path), "role": role, "format": file_format(path, self.cfg.format)})
        rows: list[_Row] = []
        pending: list[tuple[int, Record, int, object]] = []
        in_flight: deque = deque()  # chunks tokenizing in the background while the next one is read
        # Progress is the line (or Parquet row) reached: rows are streamed, and the file's length in
        # lines is quick to count where its rows are not. Counted only for a bar: it reads the file once more.
        total, reached = (extent(path) if self.progress else 0), 0
        before = file_state(path)
        first_problem = len(self.problems)
        try:
            with progress_bar(f"data: {Path(path).name} lines", total, self.progress) as advance:
                for line, item in read_conversations(path, self.cfg.format):
                    if line and line > reached:
                        advance(line - reached)
                        reached = line
                    if isinstance(item, Problem):
                        self.problems.append(item)
                        continue
                    self.counts["records"] += 1
                    if not self._same_kind(item, path, line):
                        self.counts["rejected_records"] += 1
                        continue
                    if self.cfg.truncation == "split" and not isinstance(item, Document):
                        self.counts["rejected_records"] += 1  # the row it stops at is read, and rejected
                        raise _Stop(self._not_text(path, line))
                    if self.cfg.pii != "off":
                        item = self.pii.screen(item, str(path), line)
                    key = content_hash(item)
                    signer = index or leaks_from
                    signature = signer.signature(item) if signer else None
                    # The validation file is read to its end first: its index holds only the rows it keeps.
                    if leaks_from and (hit := leaks_from.find(key, signature)):
                        self.counts["validation_leak"] += 1
                        self.leaks.append(self._repeat(path, line, hit, "validation"))
                        self._leave_out(line, self._repeat_reason("validation_leak", hit, leaks_from, signature))
                        continue
                    # A repeat of a row already kept is left out before rendering; one of a row still
                    # rendering is found when the chunk is done (`_finish`), decided the same way.
                    if drop_repeats and index and self._repeats_kept(path, line, key, signature, index):
                        continue
                    pending.append((line, item, key, signature))
                    self.counts["unchecked"] += 1  # until its rendering is done (`_finish`)
                    if len(pending) >= _CHUNK_ROWS:
                        in_flight.append(self._start(path, pending))
                        pending = []
                        if len(in_flight) > 1:
                            rows += self._finish(*in_flight.popleft(), index, drop_repeats)
                if pending:
                    in_flight.append(self._start(path, pending))
                while in_flight:
                    rows += self._finish(*in_flight.popleft(), index, drop_repeats)
                if total > reached:  # the lines after the last row (a JSON array's "]") hold none
                    advance(total - reached)
            for problem in self.problems[first_problem:]:
                if problem.is_error and problem.line is not None:
                    why = self.left_out.setdefault((len(self.files) - 1, problem.line), {"reason": "error"})
                    error = {"code": problem.code, "field": problem.field, "message": problem.message}
                    why.setdefault("errors", []).append(error)
            if before is not None and file_state(path) != before:
                # A file still being written (appended to, or saved over) was read part old, part new: its
                # last row may be cut in half, and the rows are of no one version of it. First in the list, as
                # the row errors of such a read (a half line as invalid JSON) follow from it.
                self.problems.insert(
                    0,
                    Problem(
                        "file_changed",
                        "the file changed while it was being read (is something still writing it?), so what was "
                        "read is not the file as it is now. Wait until it is complete, then run again.",
                        file=str(path),
                    ),
                )
        finally:
            for _, _, job in in_flight:  # stopped early: never leave a tokenization running behind
                job.finish()
        return rows

    def _same_kind(self, record: Record, path: str, line: int) -> bool:
        kind = _kind(record)
        if self.kind is None:
            self.kind = (kind, str(path), line)
        elif kind != self.kind[0]:
            self.problems.append(
                Problem(
                    "mixed_formats",
                    f"this row is {kind} data but {self.kind[1]}:{self.kind[2]} is "
                    f"{self.kind[0]} data; preference pairs, rated (KTO) replies and SFT rows cannot be trained "
                    "together. Use separate runs (method: dpo for preference data, with dpo.loss: kto for rated "
                    "replies).",
                    file=str(path),
                    line=line,
                )
            )
            return False
        return True

    def _not_text(self, path: str, line: int) -> Problem:
        """Why data.truncation: split refuses a row that is not raw text: cut into windows, a conversation's
        or a preference pair's replies would train apart from their prompts."""
        return Problem(
            "split_not_text",
            f"this row is {self.files[-1]['format'] or 'conversation'} data, but data.truncation: split cuts text "
            'documents ({"text": ...} rows) into windows, and a window of a conversation would train a reply '
            "without its prompt. Use data.truncation: truncate or drop for conversations and preference pairs "
            "(train raw text and conversations in separate runs), or give this file text rows.",
            file=str(path),
            line=line,
        )

    def _repeat(self, path: str, line: int, hit: tuple[str, int], kind: str) -> dict:
        of_file, of_line = self.files[hit[1] >> 32]["path"], hit[1] & 0xFFFFFFFF
        return {"file": str(path), "line": line, "kind": kind, "of_file": of_file, "of_line": of_line}

    def _repeat_reason(self, reason: str, hit: tuple[str, int], index: DuplicateIndex, signature) -> dict:
        """Why a row that repeats another is left out: the row it repeats, and how alike they are if not exactly."""
        why = {"reason": reason, "of": f"{self.files[hit[1] >> 32]['path']}:{hit[1] & 0xFFFFFFFF}"}
        if hit[0] == "near":
            why["similarity"] = round(index.similarity(hit[1], signature), 3)
        return why

    def _leave_out(self, line: int, why: dict) -> None:
        """Note why a row of the file being read is left out (the first reason, where it has several)."""
        self.left_out.setdefault((len(self.files) - 1, line), why)

    def _repeats_kept(self, path: str, line: int, key: int, signature, index: DuplicateIndex) -> bool:
        """Whether a row repeats a kept row of `index`, exactly or nearly; if so it is left out and counted.
        Rows are kept in file order, so a row found to repeat one is a repeat of the same row whenever it is
        looked up: a row kept later, also an exact repeat of it, would have repeated that row itself."""
        hit = index.find(key, signature)
        if hit is None:
            return False
        self.counts[f"duplicates_{hit[0]}"] += 1
        repeat = self._repeat(path, line, hit, hit[0])
        self.duplicates.append(((len(self.files) - 1) << 32 | line, repeat))
        reason = "duplicate" if hit[0] == "exact" else "near_duplicate"
        self._leave_out(line, self._repeat_reason(reason, hit, index, signature))
        # The list is cut at MAX_LISTED: rows repeated across files are counted as they go.
        self.counts["shared_between_files"] += repeat["of_file"] != str(path)
        return True

    def _start(self, path: str, pending: list[tuple[int, Record, int, object]]):
        records = [record for _, record, _, _ in pending]
        return path, pending, _start_rendering(self.renderer, self.kind[0] if self.kind else "sft", records, self.cfg)

    def _finish(
        self,
        path: str,
        pending: list[tuple[int, Record, int, object]],
        job,
        index: DuplicateIndex | None,
        drop_repeats: bool,
    ) -> list[_Row]:
        """The rows of a rendered chunk that are kept, in order; each is added to `index` as it is kept. With
        `drop_repeats`, a row that repeats one kept before it is left out before its rendering counts."""
        kept = []
        for (line, record, key, signature), result in zip(pending, job.finish()):
            self.counts["unchecked"] -= 1
            if drop_repeats and index and self._repeats_kept(path, line, key, signature, index):
                continue
            if isinstance(result, list):
                # Counted before a fatal problem stops the check: the row is read, and rejected, once.
                self.counts["rejected_records"] += any(p.is_error for p in result)
                for problem in result:
                    problem = replace(problem, file=str(path), line=line)
                    if problem.code in FATAL_CODES:
                        raise _Stop(problem)
                    self.problems.append(problem)
                continue
            if isinstance(result, Example) and _rated(record):
                result.desirable = record.label
            if isinstance(record, Preference) and isinstance(result, tuple):
                result[0].margin = record.margin or 0.0  # the pair's, carried by its chosen example
            item = self._fit(result, str(path), line)
            if item is None:
                continue
            if index is not None:
                index.add((len(self.files) - 1) << 32 | line, key, signature)
            examples = item if isinstance(item, tuple) else (item,)
            kept.append(
                _Row(
                    str(path),
                    line,
                    key,
                    item if self.keep_examples else None,
                    tuple(len(e) for e in examples),
                    sum(e.trained_tokens for e in examples),
                    any(not self.renderer.end_ids.isdisjoint(e.labels) for e in examples),
                    len(self.files) - 1,
                    record.label if _rated(record) else None,
                )
            )
            self.problems += [replace(p, file=str(path), line=line) for p in self.renderer.unwritten(record)]
            self.counts["documents"] += isinstance(record, Document)
            if isinstance(record, Conversation | Preference):  # only rows that train decide the recorded prompt
                self.counts["conversations"] += 1
                self.counts["without_system"] += not self.system_prompts.add(
                    record.messages if isinstance(record, Conversation) else record.prompt
                )
            # An undesirable KTO reply is not learned as a reply: a stock one repeated is what the rows rate down.
            if isinstance(record, Conversation) and record.label is not False and self.files[-1]["role"] == "train":
                self.replies.add(record.messages, (len(self.files) - 1) << 32 | line)
        return kept

    def _fit(self, item: Item, path: str, line: int) -> Item | None:
        """Truncate (or drop, or split into windows) examples over max_length, never silently."""
        examples = item if isinstance(item, tuple) else (item,)
        limit = self.cfg.max_length
        if all(len(e) <= limit for e in examples):
            return item
        self.counts["over_max_length"] += 1  # rows: a pair, or a row trained turn by turn, is several examples
        if self.cfg.truncation == "split":  # only documents get here (`_not_text`): one row of several windows
            self.counts["split"] += 1
            return item.windows(limit)
        place = f"{path}:{line}"
        if self.cfg.truncation == "drop":
            self.counts["dropped_too_long"] += 1
            longest = max(len(e) for e in examples)
            self._leave_out(line, {"reason": "over_max_length", "tokens": longest, "max_length": limit})
            self._note_over_length(place)
            return None
        images = any(e.images for e in examples)  # an image's tokens are whole or the model refuses them
        cut = None if images else cut_to_length(examples, limit, pair=self._pairs)
        if cut is None:
            self.counts["rejected_records"] += 1
            longest = max(len(e) for e in examples)
            why = (
                f"the row is {longest} tokens with its images' tokens, over max_length {limit}, and a row with "
                "images is not cut (the model needs every token of an image). Raise data.max_length, shorten the "
                "row, or set data.truncation: drop."
                if images
                else f"the row is {longest} tokens; cut to max_length {limit}, no trained token is left (the reply "
                "comes after the cut). Raise data.max_length, shorten the prompt, or set data.truncation: drop."
            )
            self.problems.append(Problem("too_long", why, file=path, line=line))
            return None
        self.counts["truncated"] += 1
        self._note_over_length(place)
        return cut if isinstance(item, tuple) else cut[0]

    def _note_over_length(self, place: str) -> None:
        if len(self.over_length) < _LISTED_PLACES:
            self.over_length.append(place)

    # --- after the pass ---------------------------------------------------------------------------

    @property
    def _pairs(self) -> bool:
        return bool(self.kind and self.kind[0] == "preference")

    def result(self) -> tuple[PreparedData, list[Problem]]:
        errors = [p for p in self.problems if p.is_error]
        report = self._report(errors)
        pairs = self._pairs
        if not self.keep_examples:
            train, valid = [], []
        elif pairs:
            train, valid = [r.item for r in self.train], [r.item for r in self.valid]
        else:  # a conversation rendered turn by turn is one row of several examples
            train, valid = _examples(self.train), _examples(self.valid)
        data = PreparedData(
            [] if pairs else train,
            [] if pairs else valid,
            report,
            train_pairs=train if pairs else [],
            valid_pairs=valid if pairs else [],
        )
        return data, errors

    def split(self) -> None:
        """Split off the validation fraction by content hash: the same rows whatever the file order."""
        if not isinstance(self.cfg.validation, float):
            return
        # Rows with one key (duplicates kept by dedup: none) stay together.
        chosen = held_out_keys([r.key for r in self.train], self.cfg.validation)
        self.valid = [r for r in self.train if r.key in chosen]
        self.train = [r for r in self.train if r.key not in chosen]

    def weigh(self) -> None:
        """Repeat each training file's kept rows by its weight (`TrainFile.weight`), after dedup and the
        validation split: a weight of 2 sees every row twice, 0.5 a half of the rows, 1.5 every row once and
        a half of them twice (at least one row of a file). The part rows are chosen by content hash, so the
        same on every run and in every order. The rows come round by round (every row's first copy, then
        the second copies, ...): the loop packs each round in rows of its own and shuffles them every epoch."""
        weights = {read: f["weight"] for read, f in enumerate(self.files) if f.get("weight", 1) != 1}
        if not weights:
            return
        copies: dict[int, int] = {}  # id of a row -> times it is seen per epoch
        for read, weight in weights.items():
            rows = [r for r in self.train if r.read == read]
            whole, part = divmod(weight, 1)
            wanted = min(len(rows), max(round(part * len(rows)), 1 if part and not whole else 0))
            chosen = {id(r) for r in sorted(rows, key=_part_order)[:wanted]}
            copies |= {id(r): int(whole) + (id(r) in chosen) for r in rows}
        self.kept = self.train
        rounds = max(copies.values(), default=1)
        self.train = [r for k in range(rounds) for r in self.kept if copies.get(id(r), 1) > k]

    def check_data_set(self) -> None:
        validation_file = self.cfg.validation if isinstance(self.cfg.validation, str) else None
        if validation_file and not self.valid:
            # Training on without it would report no validation loss for a run that asked for one.
            rejected = sum(p.is_error and p.file == validation_file for p in self.problems)
            self.problems.append(
                Problem(
                    "no_valid_rows",
                    "no validation rows are left"
                    + (f" after {counted(rejected, 'problem')}" if rejected else "")
                    # Left out, data.validation is its default fraction, not none: null is none (YAML reads
                    # `none` as a file's name).
                    + ". Fix the rows listed, or give data.validation: null to train without validation (or a "
                    "fraction, such as 0.1, to hold out of the training rows).",
                    file=validation_file,
                )
            )
        if not self.train:
            # Rows removed as duplicates or validation leaks are warnings elsewhere; here they may be the only cause.
            causes = [
                (sum(p.is_error for p in self.problems), "problem", ""),
                (
                    self.counts["validation_leak"],
                    "row",
                    " removed as also in the validation file (give that file rows of its own)",
                ),
                (self.counts["duplicates_exact"] + self.counts["duplicates_near"], "duplicate row", " removed"),
            ]
            shown = ", ".join(f"{counted(count, noun)}{rest}" for count, noun, rest in causes if count)
            self.problems.append(
                Problem(
                    "no_valid_rows",
                    "no training rows are left"
                    + (f" after {shown}" if shown else "")
                    + ". Check the files and the problems listed.",
                    file=", ".join(self.cfg.train_files),
                )
            )
            return
        if self.kind and self.kind[0] == "kto" and len({r.desirable for r in self.train}) == 1:
            # KTO weighs the desirable replies against the undesirable ones; with one kind alone it only
            # pushes that kind's likelihood one way, with nothing to compare it with.
            have, lack = ("desirable", "undesirable") if self.train[0].desirable else ("undesirable", "desirable")
            self.problems.append(
                Problem(
                    "kto_one_label",
                    f"every training row is rated {have} ('label': {str(self.train[0].desirable).lower()}), but "
                    f"KTO learns from desirable and undesirable replies together: add {lack} rows (label: "
                    f"{str(not self.train[0].desirable).lower()}), for instance a file of them in data.train.",
                    file=", ".join(self.cfg.train_files),
                )
            )
        if self.kind and self.kind[0] == "kto" and len(self.valid) == 1:
            # KTO's KL estimate takes each rated reply's prompt with another row's reply (`dpo.kto_rows`); one row
            # has only its own, so its validation loss compares the reply with itself (TRL refuses a batch of one).
            split = "" if validation_file else f" (data.validation: {self.cfg.validation} of the training rows)"
            self.problems.append(
                Problem(
                    "kto_one_valid_row",
                    f"the validation split{split} holds 1 rated reply, and KTO's KL estimate pairs each reply's "
                    "prompt with another row's reply: with one row it compares the reply with itself, and the "
                    "validation loss measures nothing (0.5 for a desirable reply, whatever the model). Give 2 or "
                    "more validation rows (replies to other prompts, for a sound estimate), a larger "
                    "data.validation share, or data.validation: null to train without validation.",
                    file=validation_file or ", ".join(self.cfg.train_files),
                )
            )
        if not any(r.trains_end for r in self.train):
            ends = self.renderer.end_ids
            names = ", ".join(repr(self.renderer.tokenizer.convert_ids_to_tokens(i)) for i in sorted(ends))
            self.problems.append(
                Problem(
                    "eos_never_trained",
                    f"no training example is trained on the end-of-turn token ({names}), so the "
                    "model would never learn to stop. Usually max_length cuts every reply short (raise "
                    "data.max_length"
                    + (
                        ", or set data.truncation: split to train each text document whole, window by window"
                        if self.counts["documents"] and self.cfg.truncation == "truncate"
                        else ""
                    )
                    + ") or the chat template puts the end of turn outside the reply.",
                    file=", ".join(self.cfg.train_files),
                )
            )

    def _report(self, errors: list[Problem]) -> dict:
        rejected_rows = {(p.file, p.line) for p in errors if p.line is not None}
        # An epoch's tokens: repeats of a weighted file count each time, as training sees them.
        total = sum(r.tokens for r in self.train + self.valid)
        trained = sum(r.trained for r in self.train + self.valid)
        records, rejected_records = self.counts["records"], self.counts["rejected_records"]
        # Rows read but not checked: a problem of the whole data set (the chat template's) stopped the check first.
        unchecked = self.counts["unchecked"]
        counts = {
            "read": records + len(rejected_rows) - rejected_records,
            "valid": records - rejected_records - unchecked,
            "rejected": len(rejected_rows),
            "rejected_by_code": dict(Counter(p.code for p in errors).most_common()),
            "blank_lines": sum(p.code == "blank_line" for p in self.problems),
            "duplicates_exact": self.counts["duplicates_exact"],
            "duplicates_near": self.counts["duplicates_near"],
            "shared_between_files": self.counts["shared_between_files"],  # duplicates of a row in another file
            "validation_leak": self.counts["validation_leak"],
            "truncated": self.counts["truncated"],
            "dropped_too_long": self.counts["dropped_too_long"],
            "split": self.counts["split"],  # documents over max_length cut into windows (data.truncation: split)
            # Examples (a preference pair is one): a row trained turn by turn is several.
            "train": len(self.train) if self._pairs else sum(r.examples for r in self.train),
            "validation": len(self.valid) if self._pairs else sum(r.examples for r in self.valid),
        }
        if unchecked:
            counts["unchecked"] = unchecked
        if self.cfg.truncation == "split":  # `train` and `validation` count windows: these, the documents they are of
            counts["train_documents"], counts["validation_documents"] = len(self.train), len(self.valid)
        if self.kept is not None:  # data.train weights: `train` counts an epoch's examples, repeats included
            counts["train_kept"] = len(self.kept) if self._pairs else sum(r.examples for r in self.kept)
        if self.kind and self.kind[0] == "kto":  # the ratings, which dpo.desirable_weight and undesirable_weight weigh
            for split, rows in (("train", self.train), ("validation", self.valid)):
                counts[f"{split}_desirable"] = sum(r.desirable is True for r in rows)
                counts[f"{split}_undesirable"] = sum(r.desirable is False for r in rows)
        return {
            "version": REPORT_VERSION,
            "kind": self.kind[0] if self.kind else None,
            "files": [{**f, **self._file_counts(read)} for read, f in enumerate(self.files)],
            "config": self.cfg.model_dump(),
            "counts": counts,
            "tokens": {
                "max_length": self.cfg.max_length,
                "length": _percentiles([n for r in self.train + self.valid for n in r.lengths]),
                "over_max_length": self.counts["over_max_length"],
                "total": total,
                "trained": trained,
                "trained_share": round(trained / total, 4) if total else 0.0,
            },
            "template": {
                "chatml_fallback": self.renderer.uses_fallback_template,
                "end_of_turn_token": self.renderer.tokenizer.convert_ids_to_tokens(self.renderer.end_of_turn_id)
                if self.renderer.end_of_turn_id is not None
                else None,
            },
            "system_prompt": self.system_prompts.report(),
            "pii": self.pii.report(),
            "warnings": self._warnings(counts),
            "errors": [p.to_dict() for p in errors[:MAX_LISTED]],
            "errors_total": len(errors),
            "duplicates": [repeat for _, repeat in sorted(self.duplicates, key=lambda d: d[0])][:MAX_LISTED],
            "leaks": self.leaks[:MAX_LISTED],
        }

    def _file_counts(self, read: int) -> dict:
        """What became of one file's rows: kept for training or validation, left out (each row once,
        whatever its reasons), and the tokens of those kept, so a mix of files can be seen file by file."""
        train = self.train if self.kept is None else self.kept
        kept = [r for r in train + self.valid if r.read == read]
        counts = {
            "train_rows": sum(r.read == read for r in train),
            "validation_rows": sum(r.read == read for r in self.valid),
            "left_out": sum(place[0] == read for place in self.left_out),
            "tokens": sum(r.tokens for r in kept),
            "trained_tokens": sum(r.trained for r in kept),
        }
        if self.kept is not None:  # what an epoch sees of the file once data.train's weights repeat its rows
            seen = [r for r in self.train if r.read == read]
            counts |= {"rows_per_epoch": len(seen), "trained_tokens_per_epoch": sum(r.trained for r in seen)}
        return counts

    def _warnings(self, counts: dict) -> list[dict]:
        warnings = []

        def warn(code: str, count: int, message: str, where: list[str] | None = None) -> None:
            if count:
                warnings.append(
                    {"code": code, "count": count, "message": message, "where": (where or [])[:_LISTED_PLACES]}
                )

        warnings += problem_warnings(self.problems)
        warn(
            "chat_template_missing",
            int(self.renderer.uses_fallback_template),
            chatml_fallback_warning(self.renderer.tokenizer),
        )
        warn(
            "no_system_message",
            self.counts["without_system"],
            f"{self.counts['without_system']} of {self.counts['conversations']} conversations have no system message; "
            "the chat template renders them its own way (some add a default system prompt). Give every row the "
            "system prompt you will use at inference.",
        )
        dups = counts["duplicates_exact"] + counts["duplicates_near"]
        warn(
            "duplicates_removed",
            dups,
            f"{counts['duplicates_exact']} exact and {counts['duplicates_near']} near "
            "duplicate rows were removed (listed in the report).",
        )
        warn(
            "validation_leak",
            counts["validation_leak"],
            f"{counted(counts['validation_leak'], 'training row')} also in the validation file "
            f"{'was' if counts['validation_leak'] == 1 else 'were'} removed from training, so validation "
            "measures unseen data.",
        )
        warn(
            "truncated",
            counts["truncated"],
            f"{counted(counts['truncated'], 'row')} longer than max_length {self.cfg.max_length} "
            f"{'was cut (its end is' if counts['truncated'] == 1 else 'were cut (their ends are'} not trained): "
            f"{first_places(self.over_length, counts['truncated'])}. "
            "Raise data.max_length or set data.truncation: drop"
            + (", or split to train each text document whole, window by window." if self.counts["documents"] else "."),
            self.over_length,
        )
        warn(
            "dropped_too_long",
            counts["dropped_too_long"],
            f"{counted(counts['dropped_too_long'], 'row')} longer than max_length {self.cfg.max_length} "
            f"{'was' if counts['dropped_too_long'] == 1 else 'were'} dropped (data.truncation: drop): "
            f"{first_places(self.over_length, counts['dropped_too_long'])}.",
            self.over_length,
        )
        repeated = self.replies.repeated()
        places = [f"{self.files[row >> 32]['path']}:{row & 0xFFFFFFFF}" for _, rows, _ in repeated for row in rows]
        warn(
            "repeated_reply",
            sum(n for _, _, n in repeated),
            f"{counted(len(repeated), 'reply', 'replies')} {'is' if len(repeated) == 1 else 'are each'} the word "
            f"for word reply to different prompts in {sum(n for _, _, n in repeated)} rows"
            + (
                f" ({repeated[0][0][:60]!r} in {repeated[0][2]}: {first_places(places, repeated[0][2])})"
                if repeated
                else ""
            )
            + ". In data whose replies otherwise differ, that is usually a template, refusal or placeholder left in "
            "by the tool that wrote it, and the model learns to give it to anything; check those rows and remove "
            "or rewrite the ones that do not answer their prompt.",
            places,
        )
        if self.train and counts["train"] < FEW_EXAMPLES:
            warn(
                "few_examples",
                counts["train"],
                f"only {counted(counts['train'], 'training example')}; fine-tuning needs at "
                f"least {FEW_EXAMPLES}, and 50 to 100 good ones is a better start.",
            )
        if self.cfg.on_error == "skip":
            warn(
                "rows_skipped",
                counts["rejected"],
                f"{counted(counts['rejected'], 'row')} with errors {'was' if counts['rejected'] == 1 else 'were'} "
                "left out (data.on_error: skip); see errors in the report.",
            )
            # A file refused whole (a .png in a folder of documents, an empty file) has no row to count.
            unread = [p for p in self.problems if p.is_error and p.line is None and p.code not in DATA_SET_CODES]
            warn(
                "files_skipped",
                len(unread),
                f"{counted(len(unread), 'file')} {'was' if len(unread) == 1 else 'were'} left out whole "
                f"(data.on_error: skip): {first_places([f'{p.where()} ({p.code})' for p in unread])}; "
                "see errors in the report.",
                [p.where() for p in unread],
            )
        return warnings


def problem_warnings(problems: list[Problem]) -> list[dict]:
    """The report's warnings of the rows' problems that are not errors: one per code, with its count and the
    first places, secrets in replies first (the loudest)."""
    by_code: dict[str, list[Problem]] = {}
    for p in sorted(problems, key=lambda p: p.code != "secret_in_reply"):
        if not p.is_error:
            by_code.setdefault(p.code, []).append(p)
    warnings = []
    for code, found in by_code.items():
        places = [p.where() for p in found]
        message = found[0].message
        if found[0].sample:
            samples = dict.fromkeys(s for p in found[:3] for s in p.sample.split(", ") if s != "...")
            more = len(found) > 3 or any(p.sample.endswith("...") for p in found[:3])
            message = message.replace(found[0].sample, ", ".join(samples) + (", ..." if more else ""), 1)
        said = f"{message} ({counted(len(found), 'row')}: {first_places(places)})"
        warnings.append({"code": code, "count": len(found), "message": said, "where": places[:_LISTED_PLACES]})
    return warnings


class PiiScreen:
    """data.pii over the rows of a data set (`screen` each): their secrets and personal data found, counted
    and listed (`report`), a problem for each row with any (appended to `problems`, in the order of the
    rows), and under redact the rows with placeholders in their place. `train_on` (data.train_on) says
    which messages are replies the model learns."""

    def __init__(self, mode: str, train_on: str, problems: list[Problem]):
        self.mode, self.problems = mode, problems
        every_role = frozenset(("system", "user", "assistant", "tool"))
        self.trained_roles = every_role if train_on == "all" else frozenset(("assistant",))
        self.found: list[dict] = []  # each secret or piece of personal data: where, which kind, masked
        self.kinds: Counter = Counter()
        self.places: Counter = Counter()  # hits in replies (trained text) and in prompts
        self.rows = 0

    def screen(self, record: Record, path: str, line: int, extra=()) -> Record:
        """Find the secrets and personal data in a row's texts and `extra` ((field, text, whether it is a
        reply) beside the record's, as a grader's fields): each is counted by kind and listed where it is,
        masked; the row gets a problem for each of secrets and personal data, in replies (what the model
        learns to say) and in prompts apart (an error under data.pii: refuse). Under redact the row goes on
        with a typed placeholder in place of each of the record's (the caller redacts `extra`'s), so rendering,
        dedup and the cache see that."""
        texts = [
            (_text_field(record, where, attribute), text, trained)
            for where, attribute, text, trained in pii.record_texts(record, self.trained_roles)
        ]
        by_code: dict[str, list[tuple[str, pii.Hit]]] = {}
        for field, text, trained in [*texts, *extra]:
            for hit in pii.find(text):
                self.kinds[hit.kind.name] += 1
                self.places["in_replies" if trained else "in_prompts"] += 1
                if len(self.found) < MAX_LISTED:
                    self.found.append(
                        {"file": path, "line": line, "field": field, "kind": hit.kind.name, "sample": hit.sample}
                        | {"in_reply": trained}
                    )
                category = "secret" if hit.kind.category == pii.SECRET else "personal_data"
                by_code.setdefault(f"{category}_in_{'reply' if trained else 'prompt'}", []).append((field, hit))
        if not by_code:
            return record
        self.rows += 1
        for code in PII_CODES:
            if code in by_code:
                self.problems.append(self._problem(code, by_code[code], path, line))
        if self.mode != "redact":
            return record
        redacted = pii.redact_record(record)
        if isinstance(record, Preference) and _same_replies(redacted) and not _same_replies(record):
            self.problems.append(
                Problem(
                    "identical_preference",
                    "the chosen and rejected replies differ only in what data.pii: redact replaces, so with its "
                    "placeholders they are the same and the pair teaches nothing; fix or remove it.",
                    file=path,
                    line=line,
                    severity="warning",
                )
            )
        return redacted

    def report(self) -> dict:
        """The data report's `pii`: the rows with any, the count of each kind, in replies and in prompts, and
        each one found (masked)."""
        return {
            "mode": self.mode,
            "rows": self.rows,
            "kinds": dict(self.kinds.most_common()),
            "in_replies": self.places["in_replies"],
            "in_prompts": self.places["in_prompts"],
            "found": self.found,
        }

    def _problem(self, code: str, hits: list[tuple[str, pii.Hit]], path: str, line: int) -> Problem:
        found = ", ".join(f"{hit.kind.name} {hit.sample}" for _, hit in hits[:3]) + (", ..." if len(hits) > 3 else "")
        if self.mode == "redact":
            said = f"replaced by placeholders in the rows training sees (data.pii: redact): {found}."
        elif code == "secret_in_reply":
            said = (
                f"SECRET IN A REPLY: {found}. The model learns its replies word for word and can give it to anyone; "
                "remove it (and revoke it: it is in the data), or set data.pii: redact to train on a placeholder."
            )
        elif code == "personal_data_in_reply":
            said = (
                f"personal data in a reply: {found}. The model can learn it and repeat it; remove it, or set "
                "data.pii: redact to train on placeholders (<EMAIL>, ...)."
            )
        else:
            what = "a secret" if code == "secret_in_prompt" else "personal data"
            said = (
                f"{what} in a prompt: {found}. Prompts are not trained, but the data carries it; remove it, or set "
                "data.pii: redact."
            )
        severity = "error" if self.mode == "refuse" else "warning"
        return Problem(code, said, file=path, line=line, field=hits[0][0], severity=severity, sample=found)


class ReplyTally:
    """Training rows counted by their last reply, to find one reply given to several different prompts
    (exact duplicate rows are removed before they are counted) in data whose replies otherwise differ.
    Labels and other classification-style replies repeat by design: data where most distinct replies
    are given more than once, replies under a few words, and JSON replies (a label's fields, however
    many of its values are given once) are not flagged."""

    MIN_ROWS = 3
    MIN_WORDS = 3
    MIN_UNIQUE_SHARE = 0.5  # share of distinct replies given once at which the data counts as free-form

    def __init__(self):
        self.seen: dict[int, list] = {}  # hash of a reply: [rows, its text, the ids of its first rows]

    def add(self, messages: list, row: int) -> None:
        reply = next((m.content for m in reversed(messages) if m.role == "assistant"), None)
        if reply is None or _is_json(reply):
            return
        entry = self.seen.setdefault(hash(reply), [0, None, []])
        entry[0] += 1
        if entry[0] <= self.MIN_ROWS:
            entry[2].append(row)
            entry[1] = reply if entry[0] > 1 else None  # the text is kept only once it repeats

    def repeated(self) -> list[tuple[str, list[int], int]]:
        """(reply, its first rows, how many rows) of each reply of MIN_WORDS or more given to MIN_ROWS or
        more rows, most first; none where most distinct replies repeat (labels)."""
        unique = sum(entry[0] == 1 for entry in self.seen.values())
        if unique < self.MIN_UNIQUE_SHARE * len(self.seen):
            return []
        found = [
            (text, rows, n)
            for n, text, rows in self.seen.values()
            if n >= self.MIN_ROWS and len(text.split()) >= self.MIN_WORDS
        ]
        return sorted(found, key=lambda r: -r[2])


def _is_json(text: str) -> bool:
    """Whether a reply is a JSON object or array (structured output, as a classifier's labels) that Python's JSON
    reader reads (nesting too deep for it is a RecursionError)."""
    if not text.lstrip().startswith(("{", "[")):
        return False
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


class SystemPromptTally:
    """Rows counted by the system prompt they are rendered with: their own, or for a row without one
    the prompt the tokenizer's template records (a tuned model tuned again)."""

    def __init__(self, tokenizer):
        self.recorded = recorded_system_prompt(tokenizer)
        self.rows: Counter = Counter()
        self.without = 0

    def add(self, messages: list) -> bool:
        """Count one row's messages; whether they bring a system message."""
        given = messages[0].content if messages and messages[0].role == "system" else None
        self.without += given is None
        self.rows[given if given is not None else self.recorded] += 1
        return given is not None

    def report(self) -> dict:
        """The one system prompt every row is rendered with (`shared`), which the run records with the
        model; None when rows differ or have none."""
        distinct = [p for p in self.rows if p is not None]
        return {
            "shared": distinct[0] if len(distinct) == 1 and not self.rows[None] else None,
            "distinct": len(distinct),
            "rows_without": self.without,
            "from_base_template": self.recorded,
        }


def cut_to_length(examples: tuple[Example, ...], max_length: int, *, pair: bool = False) -> tuple[Example, ...] | None:
    """A row's examples cut to `max_length` as training cuts them. Of a row trained turn by turn, the
    examples a cut leaves nothing to train are left out (its earlier turns still train, as they do in a
    row of one example); None where none is left, or where a preference `pair` loses either side (the
    row is refused as too_long)."""
    cut = tuple(e.truncated(max_length) for e in examples)
    kept = tuple(e for e in cut if e.trained_tokens)
    if not kept or (pair and len(kept) < len(cut)):
        return None
    return kept


def _part_order(row: _Row) -> tuple[bytes, int]:
    """The order in which a weight's part (the 0.5 of 1.5) takes a file's rows: by a hash of their content
    that is not the validation split's order (which takes the lowest keys), then by line."""
    digest = hashlib.blake2b(row.key.to_bytes(16, "big"), digest_size=8, person=b"tuneforge-weight").digest()
    return digest, row.line


def _same_replies(pair: Preference) -> bool:
    return pair.chosen.to_template() == pair.rejected.to_template()


def _text_field(record: Record, where: int | str, attribute: str) -> str:
    """The row's field that holds a text of `pii.record_texts`: a message's `attribute` where the message sits in
    its row (`Conversation.row_field`), or the text a field of its own holds."""
    if isinstance(where, str):
        return where
    if isinstance(record, Preference):  # its prompt's messages, then the chosen reply, then the rejected
        record, where = record.sides()[where > len(record.prompt)], min(where, len(record.prompt))
    return record.row_field(f"messages[{where}].{attribute}")


def _kind(record: Record) -> str:
    """What a record trains as: "preference" (a pair), "kto" (a rated reply) or "sft"."""
    return "preference" if isinstance(record, Preference) else "kto" if _rated(record) else "sft"


def _start_rendering(renderer, kind: str, records: list[Record], cfg: DataConfig):
    """Start rendering records of one `kind` as training renders them; `finish()` gives each one's result."""
    if kind == "preference":
        return renderer.start_preferences(records)
    if kind == "kto":  # the rated reply alone trains, whatever data.train_on says
        return renderer.start(records, "last_assistant")
    return renderer.start(records, cfg.train_on)


def _rated(record: Record) -> bool:
    """Whether a record is a rated reply (a KTO row)."""
    return isinstance(record, Conversation) and record.label is not None


def _examples(rows: list[_Row]) -> list[Example]:
    """Every example of the rows: a preference pair or a conversation rendered turn by turn holds several."""
    return [e for r in rows for e in (r.item if isinstance(r.item, tuple) else (r.item,))]


def _percentiles(lengths: list[int]) -> dict:
    if not lengths:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0, "mean": 0.0}
    ordered = sorted(lengths)

    def at(q: float) -> int:  # nearest-rank percentile
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    return {
        "p50": at(0.5),
        "p90": at(0.9),
        "p99": at(0.99),
        "max": ordered[-1],
        "mean": round(sum(ordered) / len(ordered), 1),
    }


def error_summary(errors: list[Problem], cfg: DataConfig, report_path: Path | None) -> str:
    by_code = ", ".join(f"{code} x{n}" for code, n in Counter(p.code for p in errors).most_common())
    lines = [f"the data has {counted(len(errors), 'error')} ({by_code}):"]
    lines += [f"  {p}" for p in errors[:_SHOWN_IN_ERROR]]
    if len(errors) > _SHOWN_IN_ERROR:
        lines.append(f"  ... and {len(errors) - _SHOWN_IN_ERROR} more")
    if report_path:
        lines.append(f"The full list is in {report_path}.")
    if any(p.code in PII_CODES for p in errors):
        lines.append(
            "data.pii: refuse stops at secrets and personal data: remove them from the rows listed (revoke any "
            "key), or set data.pii: redact to train on typed placeholders (<EMAIL>, <API_KEY>) in their place."
        )
    # Only rows that on_error: skip would leave out: the data set's errors (DATA_SET_CODES) stop it under skip too.
    if cfg.on_error == "strict" and any(p.line is not None and p.code not in DATA_SET_CODES for p in errors):
        lines.append("Fix these rows, or set data.on_error: skip to leave bad rows out.")
    return "\n".join(lines)
