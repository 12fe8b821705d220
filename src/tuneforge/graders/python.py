"""The python grader: the user's `grade(sample, item) -> float`, run in a separate process.

    grader = build_grader({"type": "python", "name": "close", "source": '''
    def grade(sample, item) -> float:
        return 1.0 if sample["output_text"].strip() == item["answer"] else 0.0
    '''}, limits=PythonLimits(timeout_s=10, memory_bytes=1 << 30))
    grader.grade(samples, items)      # one process start for the whole batch

`sample` and `item` are plain dicts, as in OpenAI's python graders. The source is compiled here
when the grader is built, so a syntax error or a missing `grade` is refused before any training.
Each `grade` call runs `python -I python_child.py` once for its whole batch, in a fresh temporary
folder with a bare environment, within `PythonLimits`: a time limit for the batch that grows with
its size, and a cap on the child's address space. The child also refuses new sockets. These limits
are best effort, not a sandbox: they stop mistakes (an endless loop, a runaway allocation, a stray
HTTP call), not code written to escape.
Run only graders you trust as you trust your own code.

`RewardFunctionGrader` runs a TRL-style reward function from a file in the same child, called once
for the whole batch with TRL's arguments.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .base import Grader, GraderError, checked_score, grading_failed, spec_text

CHILD = Path(__file__).with_name("python_child.py")
GRADER_FILE = "<grader>"  # the file name tracebacks show for the user's source (python_child.GRADER_FILE)
STDERR_LINES = 8
STDERR_KEPT_CHARS = 64 << 10  # of what the grader printed, enough for its last STDERR_LINES lines
CHUNK_CHARS = 64 << 10
ORPHAN_WAIT_S = 1.0  # for the grader's output to end once its process group is killed


@dataclass(frozen=True)
class PythonLimits:
    """What one `grade` call of a python grader may use: `timeout_s`, and `per_sample_s` more for each
    sample of its batch (a GRPO step grades prompts x group_size answers in one call, so a fixed limit
    would fail a grader that is fast enough as the batch grows), and bytes of address space."""

    timeout_s: float = 10.0
    per_sample_s: float = 0.25
    memory_bytes: int = 1 << 30

    def batch_seconds(self, samples: int) -> float:
        return self.timeout_s + self.per_sample_s * samples

    def __post_init__(self):
        if not self.timeout_s > 0 or self.per_sample_s < 0:
            raise ValueError(
                f"timeout_s must be positive and per_sample_s at least 0, got {self.timeout_s} and {self.per_sample_s}"
            )
        if self.memory_bytes < 64 << 20:
            raise ValueError(f"memory_bytes must be at least 64 MiB (the interpreter's own), got {self.memory_bytes}")


def _size(n: int) -> str:
    return f"{n / (1 << 30):g} GiB" if n >= 1 << 30 else f"{n / (1 << 20):g} MiB"


def _kill(child: subprocess.Popen) -> None:
    """Stop the child and every process it started (its process group: the child's id, which no new
    process is given while a process of the group is left, so it names none but them)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)
    child.wait()


class _Tail(threading.Thread):
    """Reads a stream to its end, keeping only its last `keep` characters: a grader that prints in a loop
    would otherwise fill this process's memory with what it wrote."""

    def __init__(self, stream, keep: int):
        super().__init__(daemon=True)
        self.stream, self.keep, self.text = stream, keep, ""
        self.start()

    def run(self) -> None:
        with self.stream:
            while chunk := self.stream.read(CHUNK_CHARS):
                self.text = (self.text + chunk)[-self.keep :]


class PythonGrader(Grader):
    type = "python"
    # image_tag is OpenAI's choice of container image; graders here run on this interpreter, so it is read and unused.
    keys = ("source", "image_tag")
    call = "grade()"  # how messages name the user's function

    def __init__(self, spec: dict, name: str, label: str, limits: PythonLimits):
        super().__init__(name, label)
        self.source = spec_text(spec, "source", label)
        self.limits = limits
        try:
            tree = ast.parse(self.source, GRADER_FILE)
            compile(tree, GRADER_FILE, "exec")
        except (SyntaxError, ValueError) as error:
            where = f" at line {error.lineno}: {error.text.strip()!r}" if getattr(error, "text", None) else ""
            raise GraderError(
                f"grader {label}: the source does not compile: {getattr(error, 'msg', error)}{where}"
            ) from None
        if not any(isinstance(node, ast.FunctionDef) and node.name == "grade" for node in tree.body):
            raise GraderError(f"grader {label}: the source defines no top-level function grade(sample, item)")

    def _grade(self, samples: Sequence[dict], items: Sequence[dict]) -> list[float]:
        if not samples:
            return []
        return self._run({"source": self.source, "samples": samples, "items": items}, samples)

    def _run(self, request: dict, samples: Sequence[dict]) -> list[float]:
        """The scores the child process gives for `request`, one per sample."""
        request = json.dumps({**request, "memory_bytes": self.limits.memory_bytes})
        with tempfile.TemporaryDirectory(prefix="tuneforge-grader-") as folder:
            # The request and the replies go through files, so only the user's prints come through a pipe.
            request_path, replies_path = Path(folder, "request.json"), Path(folder, "replies.jsonl")
            request_path.write_text(request, encoding="utf-8")
            with open(request_path, "rb") as stdin, open(replies_path, "wb") as stdout:
                # A session of its own, so that whatever processes the user's code starts end with the child.
                child = subprocess.Popen(
                    [sys.executable, "-I", str(CHILD)],
                    stdin=stdin,
                    stdout=stdout,
                    stderr=subprocess.PIPE,
                    cwd=folder,
                    # Only what the interpreter needs: the server's own variables (keys, database URLs) stay out.
                    env={"PATH": os.environ.get("PATH", ""), "LANG": "C.UTF-8", "HOME": folder, "TMPDIR": folder},
                    encoding="utf-8",
                    errors="replace",
                    start_new_session=True,
                )
            err = _Tail(child.stderr, STDERR_KEPT_CHARS)
            try:
                child.wait(timeout=self.limits.batch_seconds(len(samples)))
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                # Ended or not, the child goes with every process its user's code started and left running.
                _kill(child)
            # A process started in a session of its own outlives the kill and may hold the pipe: what was read is kept.
            err.join(ORPHAN_WAIT_S)
            out = replies_path.read_text(encoding="utf-8", errors="replace")
        return self._read_replies(out, err.text, timed_out, child.returncode, samples)

    def _none_score(self, samples: Sequence[dict], index: int) -> float:
        return checked_score(None, self.label, samples, index)

    def _read_replies(
        self, out: str, err: str, timed_out: bool, returncode: int, samples: Sequence[dict]
    ) -> list[float]:
        scores = []
        for index, line in enumerate(out.splitlines()):
            reply = _reply(line)
            if reply is None:  # the user's code wrote to the file the child replies in
                raise grading_failed(
                    self.label,
                    f"its process wrote {line!r:.100}, which is no reply of the grader's; {self.call} must leave the "
                    "process's open files alone",
                    samples,
                    index,
                )
            if reply.get("score", 0) is None:
                scores.append(self._none_score(samples, index))
            elif "score" in reply:
                scores.append(checked_score(reply["score"], self.label, samples, index))
            elif "returned" in reply:
                raise grading_failed(
                    self.label, f"{self.call} returned {reply['returned']}, not a number", samples, index
                )
            else:
                memory = f" (past the memory limit of {_size(self.limits.memory_bytes)})" if reply["memory"] else ""
                traceback = f"\n{reply['traceback']}" if reply["traceback"] else ""
                if reply.get("batch"):  # the one call for the whole batch failed: no sample of it is at fault
                    raise GraderError(
                        f"grader {self.label}: {reply['error']}{memory}{traceback}\non a batch of {len(samples)} "
                        "samples (one call), named here by its first",
                        code="grader_failed",
                        sample=0,
                    )
                raise grading_failed(self.label, f"{reply['error']}{memory}{traceback}", samples, index)
        if len(scores) == len(samples):
            return scores
        index = len(scores)
        if timed_out:
            what = (
                f"the batch of {len(samples)} samples took longer than its limit of "
                f"{self.limits.batch_seconds(len(samples)):g} s ({self.limits.timeout_s:g} s and "
                f"{self.limits.per_sample_s:g} s a sample; {index} graded); make {self.call} faster"
            )
        else:
            ended = f"signal {-returncode}" if returncode < 0 else f"exit code {returncode}"
            what = (
                f"the grader's process ended ({ended}) before giving a score; a {self.call} that goes past the memory "
                f"limit of {_size(self.limits.memory_bytes)} or exits can end it so"
            )
            what += "".join(f"\n{line}" for line in err.rstrip().splitlines()[-STDERR_LINES:])
        raise grading_failed(self.label, what, samples, index)


class RewardFunctionGrader(PythonGrader):
    """A TRL-style reward function, `FUNCTION(prompts, completions, **columns) -> list[float]` in a
    Python file, run by the python grader's child process once for each batch, within the same limits.

    It is given what TRL's GRPOTrainer gives: `prompts` (each sample's `prompt`: the text of a text
    prompt, or the prompt's messages) and `completions` (the sampled text, reasoning included, or for
    messages `[{"role": "assistant", "content": text}]`), and every other field of the items (the data
    rows' other columns) as a list by name. A None reward means "not applicable" and scores 0 where
    `allow_none` (one of several functions, whose rewards are summed, as TRL's nansum does); alone, it
    is an error. Each item needs `prompt`; a sample's text is its `completion` (`rollout_sample`).
    """

    type = "reward_function"
    keys = ()

    def __init__(self, path: Path, function: str, limits: PythonLimits, *, allow_none: bool = False):
        label = f'"{function}" ({path}:{function})'
        Grader.__init__(self, function, label)
        self.call = f"{function}()"
        self.path, self.function, self.limits, self.allow_none = path, function, limits, allow_none
        try:
            self.source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise GraderError(f"grader {label}: {path} cannot be read ({error})") from None
        try:
            tree = ast.parse(self.source, str(path))
            compile(tree, str(path), "exec")
        except (SyntaxError, ValueError) as error:
            line = f":{error.lineno}" if getattr(error, "lineno", None) else ""
            text = f": {error.text.strip()!r}" if getattr(error, "text", None) else ""
            raise GraderError(
                f"grader {label}: {path}{line} does not compile: {getattr(error, 'msg', error)}{text}"
            ) from None
        defined = _top_level_names(tree)
        if function not in defined:
            functions = [node.name for node in tree.body if isinstance(node, ast.FunctionDef)]
            raise GraderError(
                f"grader {label}: {path} defines no top-level {function}; its functions are "
                f"{', '.join(functions) or 'none'}. Name one as FILE:FUNCTION."
            )

    def _grade(self, samples: Sequence[dict], items: Sequence[dict]) -> list[float]:
        if not samples:
            return []
        prompts = [item["prompt"] for item in items]
        # A GRPO sample keeps the completion as sampled; check()'s plain samples are their output_text.
        texts = [sample.get("completion", sample["output_text"]) for sample in samples]
        completions = [
            [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text
            for prompt, text in zip(prompts, texts)
        ]
        reserved = ("prompt", "prompts", "completions", "completion")
        names = sorted({key for item in items for key in item if key not in reserved}, key=str)
        # A column missing from some rows is None there, as in a datasets.Dataset built from such rows.
        columns = {name: [item.get(name) for item in items] for name in names}
        request = {
            "source": self.source,
            "filename": str(self.path),
            "function": self.function,
            "prompts": prompts,
            "completions": completions,
            "columns": columns,
        }
        return self._run(request, samples)

    def _none_score(self, samples: Sequence[dict], index: int) -> float:
        if self.allow_none:
            return 0.0
        raise grading_failed(
            self.label,
            f"{self.call} gave None; a lone reward function must give a number for every completion (None, "
            "not applicable, is taken where several functions are summed, and counts 0)",
            samples,
            index,
        )


def _reply(line: str) -> dict | None:
    """One of the child's reply lines (python_child.main), or None for a line that is none of them."""
    try:
        reply = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(reply, dict):
        return None
    if "score" in reply or "returned" in reply:
        return reply
    failure = isinstance(reply.get("error"), str) and isinstance(reply.get("traceback"), str) and "memory" in reply
    return reply if failure else None


def _top_level_names(tree: ast.Module) -> set[str]:
    """The names a module binds at its top level: functions, classes, assignments and imports."""
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {name.id for target in targets for name in ast.walk(target) if isinstance(name, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    return names
