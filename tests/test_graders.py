"""Graders (tuneforge.graders): OpenAI's grader specs scored on examples with known answers."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import subprocess
import sys
import time

import pytest
from families import WEATHER_TOOL

from tuneforge.graders import GraderError, PythonLimits, build_grader, sample_of
from tuneforge.graders.text import lcs_length

OUTPUT = "{{ sample.output_text }}"
QUICK = PythonLimits(timeout_s=1.0, memory_bytes=256 << 20)


def scores(grader, texts: list[str], items: list[dict]) -> list[float]:
    return [result.score for result in grader.grade([sample_of(text) for text in texts], items)]


def compare(kind: str, key: str, value: str, reference: str = "{{ item.answer }}", **spec):
    return build_grader({"type": kind, "name": kind, "input": OUTPUT, "reference": reference, key: value, **spec})


def python(source: str, limits: PythonLimits = QUICK, name: str = "py"):
    return build_grader({"type": "python", "name": name, "source": source}, limits=limits)


def refused(spec: dict, *fragments: str, limits: PythonLimits = QUICK) -> str:
    with pytest.raises(GraderError) as caught:
        build_grader(spec, limits=limits)
    assert caught.value.code == "invalid_grader"
    for fragment in fragments:
        assert fragment in caught.value.message
    return caught.value.message


def failure(grader, texts: list[str], items: list[dict], *fragments: str) -> str:
    with pytest.raises(GraderError) as caught:
        scores(grader, texts, items)
    assert caught.value.code == "grader_failed"
    for fragment in fragments:
        assert fragment in caught.value.message
    return caught.value.message


def test_sample_of_parses_a_json_object_output_fenced_or_not():
    assert sample_of('{"a": 1}') == {"output_text": '{"a": 1}', "output_json": {"a": 1}, "output_tools": []}
    assert sample_of('  ```json\n{"a": 1}\n```\n')["output_json"] == {"a": 1}
    assert sample_of("[1, 2]")["output_json"] is None
    assert sample_of("the answer is 4")["output_json"] is None


def test_string_check_operations():
    items = [{"answer": "Paris"}] * 4
    texts = ["Paris", "paris", "It is Paris.", "it is paris."]
    assert scores(compare("string_check", "operation", "eq"), texts, items) == [1, 0, 0, 0]
    assert scores(compare("string_check", "operation", "ne"), texts, items) == [0, 1, 1, 1]
    assert scores(compare("string_check", "operation", "like"), texts, items) == [1, 0, 1, 0]
    assert scores(compare("string_check", "operation", "ilike"), texts, items) == [1, 1, 1, 1]
    # A number in the item reads as its text; a template with text around references renders it in place.
    assert scores(compare("string_check", "operation", "eq"), ["42"], [{"answer": 42}]) == [1]
    exact = compare("string_check", "operation", "eq", reference="x={{ item.a.b }} y={{ item.list.1 }}")
    assert scores(exact, ["x=1 y=c"], [{"a": {"b": 1}, "list": ["b", "c"]}]) == [1]


def test_text_similarity_metrics_on_hand_computed_cases():
    def score(metric, output, reference):
        [value] = scores(compare("text_similarity", "evaluation_metric", metric), [output], [{"answer": reference}])
        return value

    same, near = "the cat sat on the mat", "the cat sat on a mat"
    for metric in ("fuzzy_match", "bleu", "gleu", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l"):
        assert score(metric, same, same) == pytest.approx(1.0), metric
        assert score(metric, "", same) == 0.0, metric
    # fuzzy_match = 2 LCS / (len a + len b): "ittn" is common to kitten and sitting (rapidfuzz's ratio: 61.54).
    assert score("fuzzy_match", "kitten", "sitting") == pytest.approx(8 / 13)
    # BLEU+1: p1 = 5/6, p2 = (3+1)/(5+1), p3 = (2+1)/(4+1), p4 = (1+1)/(3+1), no brevity penalty.
    assert score("bleu", near, same) == pytest.approx((5 / 6 * 4 / 6 * 3 / 5 * 1 / 2) ** 0.25)
    # Every n-gram of a 3-word prefix matches, so only the brevity penalty exp(1 - 6/3) is left.
    assert score("bleu", "the cat sat", same) == pytest.approx(math.exp(-1))
    assert score("bleu", "dog", same) == 0.0
    # GLEU: the prefix's 6 n-grams all match; the reference has 6 + 5 + 4 + 3 = 18.
    assert score("gleu", "the cat sat", same) == pytest.approx(6 / 18)
    assert score("rouge_1", near, same) == pytest.approx(5 / 6)
    assert score("rouge_2", near, same) == pytest.approx(3 / 5)
    assert score("rouge_l", near, same) == pytest.approx(5 / 6)
    # LCS "a c": precision 2/4, recall 2/3; words are lower-cased, punctuation is not a word.
    assert score("rouge_l", "A b, c d!", "a c e") == pytest.approx(4 / 7)


def test_lcs_length_agrees_with_dynamic_programming():
    def by_table(a, b):
        row = [0] * (len(b) + 1)
        for x in a:
            diagonal, row[0] = 0, 0
            for j, y in enumerate(b, start=1):
                diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
        return row[-1]

    rng = random.Random(0)
    for _ in range(200):
        a = "".join(rng.choices("abc", k=rng.randrange(0, 90)))
        b = "".join(rng.choices("abcd", k=rng.randrange(0, 40)))
        assert lcs_length(a, b) == by_table(a, b), (a, b)


def test_text_similarity_refuses_metrics_it_does_not_compute():
    message = refused(
        {"type": "text_similarity", "input": OUTPUT, "reference": "x", "evaluation_metric": "cosine"},
        "cosine is not supported",
        "embedding model",
    )
    assert "fuzzy_match" in message and "rouge_l" in message
    refused(
        {"type": "text_similarity", "input": OUTPUT, "reference": "x", "evaluation_metric": "wer"},
        "`evaluation_metric` must be one of fuzzy_match, bleu",
    )
    for metric in (["bleu"], {"bleu": 1}):  # not a name: refused as an unknown metric, not looked up as a key
        refused(
            {"type": "text_similarity", "input": OUTPUT, "reference": "x", "evaluation_metric": metric},
            "`evaluation_metric` must be one of fuzzy_match, bleu",
        )


def test_json_fields_exact_partial_fenced_and_not_json():
    grader = compare("json_fields", "reference", "{{ item.reference }}")
    reference = {"label": "billing", "priority": 2, "tags": ["a"]}
    texts = [
        '{"label": "billing", "priority": 2, "tags": ["a"], "extra": 1}',
        '{"label": "billing", "priority": 3}',
        '```json\n{"label": "billing", "priority": 2, "tags": ["a"]}\n```',
        "label: billing",
        '["billing"]',
    ]
    assert scores(grader, texts, [{"reference": reference}] * 5) == pytest.approx([1, 1 / 3, 1, 0, 0])
    # The reference may be a JSON string; `fields` picks the fields that count.
    picked = build_grader(
        {"type": "json_fields", "input": OUTPUT, "reference": "{{ item.reference }}", "fields": ["priority"]}
    )
    assert scores(picked, texts[:2], [{"reference": '{"label": "x", "priority": 2}'}] * 2) == [1, 0]
    failure(picked, ["{}"], [{"reference": {"label": "x"}}], "the reference lacks the field(s) priority")
    failure(grader, ["{}"], [{"reference": "not json"}], "the reference is not a JSON object")
    # JSON's true is no 1, though Python's True == 1.
    assert scores(picked, ['{"priority": true}', '{"priority": 1.0}'], [{"reference": {"priority": 1}}] * 2) == [0, 1]


def test_python_grader_scores_a_batch_in_one_process():
    grader = python("import os\n\ndef grade(sample, item) -> float:\n    return os.getpid()\n")
    first = scores(grader, ["a"] * 8, [{}] * 8)
    assert len(set(first)) == 1 and first[0] != os.getpid()
    assert scores(grader, ["a"], [{}]) != first[:1]  # each grade() call is a fresh process
    assert grader.grade([], []) == []

    exact = python(
        "def grade(sample, item):\n"
        "    print('debug output does not disturb the scores')\n"
        "    return float(sample['output_text'].strip() == item['answer'])\n",
        name="exact",
    )
    [right, wrong] = exact.grade([sample_of(" 4 "), sample_of("5")], [{"answer": "4"}, {"answer": "4"}])
    assert (right.score, right.parts, wrong.score) == (1.0, {"exact": 1.0}, 0.0)


def test_python_grader_refuses_source_that_does_not_compile():
    missing_colon = {"type": "python", "name": "bad", "source": "def grade(sample, item)\n    return 1"}
    refused(missing_colon, '"bad" (python)', "the source does not compile", "line 1")
    refused({"type": "python", "source": "def score(sample, item):\n    return 1"}, "no top-level function grade")


def test_python_grader_failures_name_the_grader_the_error_and_the_sample():
    message = failure(
        python("def grade(sample, item):\n    return 1 / len(item)\n", name="ratio"),
        ["ok", "x" * 500],
        [{"a": 1}, {}],
        'grader "ratio" (python)',
        "ZeroDivisionError: division by zero",
        'File "<grader>", line 2, in grade',
        "return 1 / len(item)",
        "on sample 1 of the batch",
    )
    assert "x" * 200 in message and "x" * 201 not in message and "(500 characters)" in message
    failure(python("def grade(sample, item):\n    return 'x'\n"), ["a"], [{}], "returned 'x' (str), not a number")
    failure(python("def grade(sample, item):\n    return float('inf')\n"), ["a"], [{}], "not a finite number")
    huge = failure(
        python("def grade(sample, item):\n    return 10 ** 400\n"),
        ["a"],
        [{}],
        "grade() returned a number that float() refuses: OverflowError",
        "on sample 0",
    )
    assert "python_child" not in huge  # the child's own frames, with the server's paths, stay out


def test_a_python_graders_long_exception_is_cut_short_in_its_message():
    # A message of 1 MiB would otherwise come whole into the error, twice (the error and its traceback's last line).
    message = failure(
        python("def grade(sample, item):\n    raise ValueError('x' * (1 << 20))\n", name="loud"),
        ["a"],
        [{}],
        'grader "loud" (python): grade() raised ValueError: xxx',
        "(1048576 characters)",
        "on sample 0",
    )
    assert len(message) < 4000


def test_a_python_result_whose_repr_fails_is_named_by_its_type():
    # A list nested past the recursion limit, and an object whose __repr__ raises: neither can be shown.
    nested = "def grade(sample, item):\n    x = []\n    for _ in range(100000):\n        x = [x]\n    return x\n"
    unshown = (
        "class Odd:\n    def __repr__(self):\n        raise ValueError\n\ndef grade(sample, item):\n    return Odd()\n"
    )
    for source, kind in ((nested, "list"), (unshown, "Odd")):
        message = failure(python(source, name="odd"), ["a"], [{}], 'grader "odd" (python)', "on sample 0")
        assert f"returned a value ({kind}) whose repr() fails, not a number" in message
        assert "python_child" not in message


def test_python_grader_limits_time_memory_network_and_environment(monkeypatch):
    monkeypatch.setenv("TUNEFORGE_TEST_SECRET", "s3cret")
    environment = python(
        "import os\n\ndef grade(sample, item):\n    return len(os.environ.get('TUNEFORGE_TEST_SECRET', ''))\n"
    )
    assert scores(environment, ["a"], [{}]) == [0]
    sleeper = python("import time\n\ndef grade(sample, item):\n    time.sleep(30)\n")
    failure(
        sleeper,
        ["a", "b"],
        [{}, {}],
        "took longer than its limit of 1.5 s (1 s and 0.25 s a sample; 0 graded)",
        "on sample 0",
    )
    # The limit grows with the batch: 4 samples of 0.4 s pass the 3 s that 1 s and 0.5 s a sample give.
    steady = python(
        "import time\n\ndef grade(sample, item):\n    time.sleep(0.4)\n    return 1.0\n",
        limits=PythonLimits(timeout_s=1.0, per_sample_s=0.5, memory_bytes=256 << 20),
    )
    assert scores(steady, ["a", "b", "c", "d"], [{}] * 4) == [1.0] * 4
    hog = python("def grade(sample, item):\n    return len(bytearray(512 << 20))\n")
    failure(hog, ["a"], [{}], "MemoryError", "memory limit of 256 MiB")
    for call in ("socket.socket()", "socket.create_connection(('127.0.0.1', 9))"):
        network = python(f"import socket\n\ndef grade(sample, item):\n    {call}\n    return 1.0\n")
        failure(network, ["a"], [{}], "PermissionError: network access is disabled")
    failure(python("import os\n\ndef grade(sample, item):\n    os._exit(3)\n"), ["a"], [{}], "ended (exit code 3)")


def test_a_python_grader_ends_with_its_last_score_not_with_the_threads_it_left_running():
    # A thread that is not a daemon would hold the interpreter's exit, and the batch, until the time limit.
    lingering = python(
        "import threading, time\n\ndef grade(sample, item):\n"
        "    threading.Thread(target=time.sleep, args=(60,)).start()\n    return 1.0\n",
        limits=PythonLimits(timeout_s=30.0, memory_bytes=256 << 20),
    )
    started = time.monotonic()
    assert scores(lingering, ["a", "b"], [{}, {}]) == [1.0, 1.0]
    assert time.monotonic() - started < 15  # held by the thread, it would end at the 30 s limit


def _ended(pid: int) -> bool:
    """Whether process `pid` is gone (or a zombie waiting for its parent), after up to 5 s."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_processes_a_python_grader_starts_end_with_it():
    # Started apart from the grader's output, so nothing of theirs keeps the grading waiting.
    spawner = python(
        "import subprocess\n\ndef grade(sample, item):\n"
        "    return subprocess.Popen(['sleep', '60'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid\n"
    )
    pids = [int(pid) for pid in scores(spawner, ["a", "b"], [{}, {}])]
    try:
        assert all(_ended(pid) for pid in pids)
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)


def test_a_process_a_python_grader_starts_in_a_session_of_its_own_does_not_hold_the_grading():
    # It escapes the kill of the grader's process group, and holds the grader's stderr for 60 s.
    escaper = python(
        "import subprocess\n\ndef grade(sample, item):\n"
        "    print('before')\n    return subprocess.Popen(['sleep', '60'], start_new_session=True).pid\n",
        limits=PythonLimits(timeout_s=20.0, memory_bytes=256 << 20),
    )
    started = time.monotonic()
    [pid] = scores(escaper, ["a"], [{}])
    try:
        assert time.monotonic() - started < 10
    finally:
        os.kill(int(pid), 9)


def test_a_python_grader_that_writes_into_its_replies_fails_naming_the_grader():
    for written in (b"not json\n", b"[1]\n", b'{"memory": true}\n'):
        forger = python(  # fd 3: the child's replies, the first file it opens
            f"import os\n\ndef grade(sample, item):\n    os.write(3, {written!r})\n    return 1.0\n",
            name="forger",
        )
        failure(forger, ["a"], [{}], 'grader "forger" (python)', "is no reply of the grader's", "on sample 0")


LOUD_GRADER = """
import os, sys

def grade(sample, item):
    line = "x" * 1023 + "\\n"
    for _ in range(512 << 10):  # 512 MiB of prints
        sys.stderr.write(line)
    print("the last words")
    sys.stdout.flush()
    os._exit(3)
"""


def test_a_python_grader_that_prints_without_end_keeps_only_its_last_lines_in_memory(tmp_path):
    # In a fresh interpreter, whose peak memory is the grading's: the grader's prints are not all held here.
    # (Its VmHWM, not ru_maxrss, which keeps the peak of the pytest process it was forked from.)
    script = tmp_path / "grade.py"
    script.write_text(
        "import re\n"
        "from pathlib import Path\n"
        "from tuneforge.graders import GraderError, PythonLimits, build_grader, sample_of\n"
        f"grader = build_grader({{'type': 'python', 'name': 'loud', 'source': {LOUD_GRADER!r}}},\n"
        "    limits=PythonLimits(timeout_s=60, memory_bytes=256 << 20))\n"
        "try:\n"
        "    grader.grade([sample_of('a')], [{}])\n"
        "except GraderError as err:\n"
        "    print(err.message)\n"
        "peak_kib = re.search(r'VmHWM:\\s*(\\d+)', Path('/proc/self/status').read_text()).group(1)\n"
        "print('peak MiB', int(peak_kib) >> 10)\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=True)
    assert "ended (exit code 3)" in result.stdout and "the last words" in result.stdout
    assert int(result.stdout.split("peak MiB")[-1]) < 256


def test_multi_combines_sub_graders_and_reports_each():
    grader = build_grader(
        {
            "type": "multi",
            "name": "total",
            "graders": {
                "exact": {"type": "string_check", "input": OUTPUT, "reference": "{{ item.answer }}", "operation": "eq"},
                "short": {"type": "python", "source": "def grade(sample, item):\n    return 0.5\n"},
            },
            "calculate_output": "0.5 * exact + max(short, 0.2) ^ 2 - abs(-sqrt(0)) + floor(log(exp(1)))",
        },
        limits=QUICK,
    )
    [right, wrong] = grader.grade([sample_of("4"), sample_of("5")], [{"answer": "4"}] * 2)
    assert grader.name == "total"
    assert right.score == pytest.approx(0.5 + 0.25 + 1) and right.parts == {"exact": 1.0, "short": 0.5}
    assert wrong.score == pytest.approx(0.25 + 1) and wrong.parts == {"exact": 0.0, "short": 0.5}


def test_multi_refuses_formulas_beyond_arithmetic():
    def multi(formula: str) -> dict:
        check = {"type": "string_check", "input": OUTPUT, "reference": "x", "operation": "eq"}
        return {"type": "multi", "name": "m", "graders": {"a": check, "b": check}, "calculate_output": formula}

    refused(multi("a.__class__"), "`a.__class__` is not allowed (Attribute)")
    refused(multi("__import__('os').system('true')"), "is not allowed (Call)")
    refused(multi("round(a)"), "`round(a)` is not allowed")
    refused(multi("a + c"), "`c` is not one of the graders", "graders' names (a, b)")
    refused(multi("a if b else 0"), "(IfExp)")
    refused(multi("min(a)"), "min() takes 2 or more argument(s)")
    refused(multi("a +"), "it is not a formula")
    grader = build_grader(multi("a / b"))
    failure(grader, ["y"], [{}], 'grader "m" (multi)', "calculate_output 'a / b' failed", "division by zero")


def test_multi_errors_name_the_sub_grader():
    spec = {
        "type": "multi",
        "name": "total",
        "graders": {"inner": {"type": "python", "source": "def grade(sample, item):\n    return item['score']\n"}},
        "calculate_output": "inner",
    }
    failure(build_grader(spec, limits=QUICK), ["a"], [{}], 'grader "total" > "inner" (python)', "KeyError: 'score'")
    spec["graders"]["inner"] = {"type": "string_check", "input": "{{ item.x }}", "reference": "y", "operation": "bogus"}
    refused(spec, '"total" > "inner" (string_check)', "`operation` must be one of eq, ne, like, ilike")


def test_template_errors():
    def spec(reference: str) -> dict:
        return {"type": "string_check", "name": "s", "input": OUTPUT, "reference": reference, "operation": "eq"}

    refused(spec("{{ answer }}"), "is not a dotted path")
    refused(spec("{{ row.answer }}"), "`row` is not a namespace")
    refused(spec("{{ sample.text }}"), "sample has no field `text`", "output_text, output_json, output_tools")
    refused(spec("{{ item.answer }"), "unmatched")
    refused(spec("{{ item['answer'] }}"), "is not a dotted path")
    failure(
        build_grader(spec("{{ item.gold.answer }}")),
        ["4"],
        [{"gold": {"value": 4}}],
        'grader "s" (string_check)',
        "`reference` template '{{ item.gold.answer }}' reads item.gold.answer, which the item does not have",
    )
    # A field the output lacks reads as empty: a malformed output scores 0 rather than stopping training.
    field = build_grader(spec("{{ item.label }}") | {"input": "{{ sample.output_json.label }}"})
    assert scores(field, ['{"label": "a"}', "not json"], [{"label": "a"}] * 2) == [1, 0]


def test_spec_errors():
    refused({"type": "score_model", "name": "judge"}, '"judge" (score_model)', "judge model", "python")
    refused({"type": "label_model"}, "judge model")
    refused({"type": "regex"}, "`type` must be one of string_check, text_similarity, python, multi, json_fields")
    refused({"type": "string_chek"}, "got 'string_chek' (did you mean 'string_check'?)")
    refused({"type": "string_check", "input": OUTPUT, "reference": "x", "operation": "eqq"}, "(did you mean 'eq'?)")
    refused(
        {"type": "json_fields", "input": OUTPUT, "reference": "x", "fieldz": ["label"], "nmae": "j", "zzz": 1},
        "unknown field(s) fieldz (did you mean 'fields'?), nmae (did you mean 'name'?), zzz; a json_fields grader",
    )
    refused({"type": "string_check", "input": OUTPUT, "reference": "x", "operation": "eq", "pass": 1}, "unknown field")
    refused({"type": "string_check", "input": OUTPUT, "reference": "x", "operation": "eq", 1: "x"}, "field(s) 1;")
    refused({"type": "string_check", "input": OUTPUT, "operation": "eq"}, "`reference` must be a non-empty string")
    threshold = {"type": "text_similarity", "input": OUTPUT, "reference": "x", "evaluation_metric": "bleu"}
    refused(threshold | {"pass_threshold": "high"}, "`pass_threshold` must be a number")
    assert build_grader(threshold | {"pass_threshold": 0.5}).pass_threshold == 0.5  # OpenAI's Evals field
    refused({"type": "json_fields", "input": OUTPUT, "reference": "{{ item.r }}", "fields": "label"}, "`fields`")
    refused({"type": "multi", "graders": {}, "calculate_output": "1"}, "`graders` must be an object")
    with pytest.raises(GraderError):
        build_grader(["string_check"])


def test_check_catches_a_bad_grader_before_training():
    items = [{"answer": "4"}, {"answer": "12"}]
    compare("text_similarity", "evaluation_metric", "bleu").check(items)
    python("def grade(sample, item):\n    return float(sample['output_text'] == item['answer'])\n").check(items)

    # Fails on an empty output only, as a model's first samples may be.
    with pytest.raises(GraderError) as caught:
        python("def grade(sample, item):\n    return int(sample['output_text']) / 10\n").check(items)
    assert caught.value.code == "invalid_grader"
    assert "ValueError: invalid literal for int()" in caught.value.message and "an empty output" in caught.value.message
    # eval --grader and distill generate --grader check it too, where nothing trains: the advice fits each of them.
    assert caught.value.message.endswith("fix it (or the items) and run again.")

    with pytest.raises(GraderError, match="reads item.solution, which the item does not have"):
        compare("string_check", "operation", "eq", reference="{{ item.solution }}").check(items)
    with pytest.raises(GraderError, match="took longer than its limit"):
        python("def grade(sample, item):\n    while True:\n        pass\n").check(items)


def test_graders_read_a_reasoning_models_answer_without_its_reasoning():
    # OpenAI's output_text of a reasoning model is its answer; DeepSeek-R1's template opens <think> in the prompt.
    grader = build_grader(
        {
            "type": "string_check",
            "name": "s",
            "operation": "eq",
            "input": "{{ sample.output_text }}",
            "reference": "{{ item.answer }}",
        }
    )
    replies = ["<think>\nTwo and two.\n</think>\n\nFour", "Two and two.\n</think>\n\nFour", "<think>\nFour, or"]
    samples = [sample_of(r) for r in replies]
    assert [s["output_text"] for s in samples] == ["Four", "Four", ""]
    assert [r.score for r in grader.grade(samples, [{"answer": "Four"}] * 3)] == [1.0, 1.0, 0.0]
    assert sample_of('<think>\n{"a": 1}?\n</think>\n{"a": 2}')["output_json"] == {"a": 2}


@pytest.mark.parametrize(
    ("family", "reply"),
    [
        ("qwen2.5", 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'),
        ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}}'),
    ],
)
def test_a_reply_that_calls_tools_reaches_graders_as_output_tools(tmp_path, family, reply):
    """An answer to a prompt with tools gives graders its calls as `sample.output_tools` (OpenAI's chat
    completion tool_calls, read by the model's own call form) and the text beside them as output_text, as
    serve replies; without tools the reply is text."""
    from families import FAMILIES, family_tokenizer

    from tuneforge.graders import rollout_samples

    tokenizer = family_tokenizer(FAMILIES[family], tmp_path)
    grader = build_grader(
        {
            "type": "string_check",
            "name": "called",
            "input": "{{ sample.output_tools.0.function.name }}",
            "reference": "get_weather",
            "operation": "eq",
        }
    )
    with_tools, without = rollout_samples([reply, reply], [[WEATHER_TOOL], None], tokenizer)
    [call] = with_tools["output_tools"]
    assert (call["type"], call["function"]["name"], json.loads(call["function"]["arguments"])) == (
        "function",
        "get_weather",
        {"city": "Paris"},
    )
    assert with_tools["output_text"] == ("Let me look." if family == "qwen2.5" else "")
    assert with_tools["completion"] == reply
    assert [r.score for r in grader.grade([with_tools], [{}])] == [1.0]
    assert (without["output_tools"], without["output_text"]) == ([], reply)
