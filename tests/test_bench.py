"""Smoke tests of the benchmark harness (bench/): its parts on the tiny model, in seconds.

The full harness (`make bench`) trains SmolLM2 for many minutes; here each piece it relies on is
checked on its own: the data generator's lengths, the shared tokenization and validation loss
(against transformers' own loss), the FLOP count, the turn
protocol between processes, the step profile, and the report.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import chatdata  # noqa: E402
import common  # noqa: E402


def test_chat_lengths_are_skewed_like_instruction_data(tokenizer):
    rows = chatdata.generate(300, seed=0)
    assert rows == chatdata.generate(300, seed=0)  # seeded
    assert all([m["role"] for m in r["messages"]] == ["system", "user", "assistant"] for r in rows)
    words = sorted(len(" ".join(m["content"] for m in r["messages"]).split()) for r in rows)
    median, p90 = words[len(words) // 2], words[int(0.9 * len(words))]
    assert 50 < median < 120 and p90 > 2.2 * median  # a long tail


def test_tokenize_and_shared_validation_loss_match_transformers(tokenizer):
    import torch
    from tiny import tiny_llama

    rows = chatdata.generate(6, seed=3)
    examples = common.tokenize_chat(rows, tokenizer)
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for ex in examples:
        s, e = ex.span
        assert ex.input_ids[e - 1] == end_id and 0 < s < e < len(ex.input_ids)  # reply + end of turn, not the newline
    model = tiny_llama(tokenizer).eval()
    got = common.assistant_ce(model, examples, tokenizer.pad_token_id, max_batch_tokens=10**6)
    total = count = 0.0
    with torch.no_grad():
        for ex in examples:
            labels = torch.tensor([ex.hf_labels()])
            n = int((labels[:, 1:] != -100).sum())
            total += model(input_ids=torch.tensor([ex.input_ids]), labels=labels).loss.item() * n
            count += n
    assert got["tokens"] == count
    assert got["loss"] == pytest.approx(total / count, rel=1e-5)


def test_flops_count_for_smollm2_shapes():
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
    )
    shapes = common.model_shapes(cfg)
    n_lin = 30 * sum(i * o for i, o in shapes["linears"].values())
    assert n_lin == 106_168_320
    one = common.flops_per_example(shapes, 16, 1, 0)
    assert one == 4 * n_lin + 6 * 30 * 16 * 10_176 + 6 * 30 * 576
    assert (
        common.flops_per_example(shapes, 16, 100, 40) - common.flops_per_example(shapes, 16, 100, 0)
        == 4 * 49152 * 576 * 40
    )


def test_turns_interleave_processes_step_by_step(tmp_path):
    from turns import Child, run_interleaved

    script = tmp_path / "child.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(BENCH)!r})
        from turns import Turns
        t = Turns(); t.send("ready")
        for step in (1, 2, 3):
            t.wait(); t.send("step", step=step, seconds=t.elapsed(), tokens=10, last=step == 3)
        t.wait(); t.send("result", name=sys.argv[1])
    """)
    )
    probe = tmp_path / "probe.py"
    probe.write_text(
        textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(BENCH)!r})
        from turns import Turns
        t = Turns(); t.send("ready"); n = 0
        while t.wait() == "go":
            n += 1; t.send("step", seconds=0.0)
        t.send("result", rounds=n)
    """)
    )
    order = []
    children = [Child(n, [sys.executable, str(script), n], tmp_path / f"{n}.log") for n in ("a", "b")]
    children.append(Child("p", [sys.executable, str(probe)], tmp_path / "p.log", probe=True))
    run_interleaved(children, lambda c, m: order.append((c.name, m["event"])))
    for c in children:
        c.close()
    steps = [n for n, e in order if e == "step" and n != "p"]
    assert steps == ["a", "b"] * 3
    assert [c.result["event"] for c in children] == ["result"] * 3
    assert children[2].result["rounds"] >= 3


def test_the_report_names_the_scripts_make_bench_runs():
    import re

    import report

    makefile = (BENCH.parent / "Makefile").read_text()
    target = re.search(r"^bench:.*?\n((?:\t.*\n)+)", makefile, re.M)[1]
    assert tuple(re.findall(r"bench/(\w+\.py)", target)) == report.MAKE_BENCH
    header = (BENCH.parent / "BENCHMARKS.md").read_text().split("\n## ", 1)[0]
    assert "`bench/data_prep.py`, `bench/serve.py`, `bench/run.py` measure" in header


def test_report_renders_a_throughput_result(tmp_path, monkeypatch):
    import report

    cand = {
        "label": "x",
        "tokens_per_s": 10.0,
        "tokens_per_s_min": 9.0,
        "tokens_per_s_max": 11.0,
        "tokens_per_s_aggregate": 10.0,
        "peak_rss_mib": 1000.0,
        "valid_loss": 1.0,
        "steps": 3,
        "real_tokens": 100,
        "achieved_gflops": 5.0,
        "mfu": 0.1,
        "speedup_vs_hf": 1.0,
        "rss_vs_hf": 1.0,
        "valid_loss_vs_hf": 0.0,
        "speedup_vs_trl": 1.0,
    }
    result = {
        "date": "2026-01-01T00:00:00",
        "command": "python bench/run.py",
        "machine": {
            "cpu": "cpu",
            "cores": 2,
            "isa": "AVX2",
            "avx512": False,
            "native_bf16": False,
            "memory_gib": 8,
            "tuneforge_auto_precision": "fp32",
        },
        "versions": {"torch": "2"},
        "load_average": {"median": 1.0, "min": 1.0, "max": 1.0},
        "setup": {
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
            "lr": 2e-4,
            "scheduler": "cosine",
            "seed": 1,
            "train_rows": 4,
            "batch_sequences": 2,
            "batch_packed_rows": 1,
            "packed_row_tokens": 1024,
            "warmup_steps_excluded": 1,
            "valid_rows": 2,
        },
        "data": {
            "generator": "g",
            "distribution_2000_rows": {
                "tokens": {"p10": 1, "p50": 2, "p90": 3, "p99": 4, "max": 5, "mean": 2.0},
                "assistant_share": 0.5,
            },
            "train": {"tokens": 100, "trained_tokens": 50, "lengths": {"p50": 2, "max": 5}},
        },
        "flops": {"formula": "f", "per_real_token": 1e6},
        "base_valid_loss": 2.0,
        "valid_tokens": 10,
        "probe": {
            "rounds": 1,
            "fp32_peak_gflops": 50.0,
            "fp32_peak_gflops_max": 60.0,
            "fp32_gflops_by_shape": {"s": 50.0},
            "bf16_gflops_by_shape": {"s": 1.0},
            "bf16_step": {"tokens": 8, "fp32_seconds": 1.0, "bf16_seconds": 20.0},
        },
        "candidates": {"tuneforge": cand, "hf_trainer": cand, "trl_sft": cand},
    }
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "train_throughput-2026-01-01.json").write_text(json.dumps(result))
    monkeypatch.setattr(report, "HERE", tmp_path)
    monkeypatch.setattr(report, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(report, "OUT", tmp_path / "BENCHMARKS.md")
    report.main()
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "| x | 10.0 (9.0-11.0) | 1.00x |" in text and "20.0x the fp32 time" in text


def test_the_step_profile_sorts_a_whole_training_step_into_parts(tiny_model_dir, tmp_path):
    """`profile_step.py` drives the training loop through the names it wraps (the loop's model loading,
    the objective's forward, collation); a rename in the loop must fail here, not the next benchmark."""
    import subprocess

    command = [sys.executable, str(BENCH / "profile_step.py"), "--model", str(tiny_model_dir), "--step", "2"]
    command += ["--rows", "6", "--threads", "1", "--work", str(tmp_path / "work"), "--results", str(tmp_path)]
    subprocess.run(command, check=True, capture_output=True)
    (result,) = tmp_path.glob("profile-*.json")
    profile = json.loads(result.read_text())
    parts = profile["categories"]
    # Every part the loop runs was seen, and the parts add up to the step's wall time.
    for part in ("attention (SDPA), backward", "matmul: LoRA A/B, forward", "matmul: LoRA A/B, backward"):
        assert parts[part] > 0, part
    assert parts["collation"] > 0 and parts["optimizer (AdamW step, zero_grad)"] > 0
    assert sum(parts.values()) == pytest.approx(profile["step_seconds"], rel=0.05)
    assert profile["step_tokens_per_s_own"] > 0


def test_the_memory_bench_refuses_unknown_shapes_and_modes_and_a_merge_without_a_file_before_any_run(
    capsys, monkeypatch, tmp_path
):
    import memory

    monkeypatch.setattr(memory, "HERE", tmp_path)  # a results folder without today's file, whatever bench/ holds

    # int8 would otherwise run as bf16 and be filed as int8; a misspelt shape would fail after the shapes before it ran.
    for argv, message in (
        (["--modes", "bf16,int8"], "int8: not one of fp32, bf16, nf4"),
        (
            ["--shapes", "smollm2-135m,llama-3.1-8B"],
            "llama-3.1-8B: not one of smollm2-135m, llama-3.2-1b, llama-3.1-8b",
        ),
    ):
        with pytest.raises(SystemExit):
            memory.arguments(argv)
        assert message in capsys.readouterr().err
    assert memory.arguments(["--modes", "nf4"]).modes == ["nf4"]
    today = memory.arguments(["--device", "cuda"]).results
    assert not today.exists()
    with pytest.raises(SystemExit):
        memory.arguments(["--device", "cuda", "--merge", "why"])
    assert f"{today}, which does not exist" in capsys.readouterr().err


def bench_scripts() -> list[str]:
    """The bench scripts one runs (the others are modules they import)."""
    return sorted(p.name for p in BENCH.glob("*.py") if 'if __name__ == "__main__":' in p.read_text())


@functools.cache
def bench_help(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True, cwd=BENCH.parent, timeout=120
    )


@pytest.mark.parametrize("script", bench_scripts())
def test_every_bench_script_answers_help_with_its_usage_and_runs_nothing(script):
    # report.py rewrote BENCHMARKS.md when asked for help; candidates.py and validloss.py took --help for a file.
    benchmarks = (BENCH.parent / "BENCHMARKS.md").stat().st_mtime_ns
    answer = bench_help(script)
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.startswith("usage: ")
    assert (BENCH.parent / "BENCHMARKS.md").stat().st_mtime_ns == benchmarks


@pytest.mark.parametrize("script", bench_scripts())
def test_every_bench_scripts_help_says_what_it_measures_in_the_whole_first_paragraph_of_its_docstring(script):
    # dashboard.py, grpo.py and run.py showed the docstring's first line only, cut mid-sentence.
    first_paragraph = " ".join(ast.get_docstring(ast.parse((BENCH / script).read_text())).split("\n\n")[0].split())
    assert first_paragraph in " ".join(bench_help(script).stdout.split())


def test_the_dashboard_bench_with_fewer_than_four_runs_compares_the_same_runs_in_both_servers():
    # The api side compared four jobs whatever --runs was, so fewer runs ended in a KeyError after every page was timed.
    answer = subprocess.run(
        [sys.executable, str(BENCH / "dashboard.py"), "--runs", "2", "--steps", "5", "--repeat", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert answer.returncode == 0, answer.stderr[-2000:]
    assert "comparison of 2 runs" in answer.stdout


def test_the_step_profile_refuses_a_step_with_no_step_before_it():
    # --step 1 trained, then failed with a TypeError: the profile opens at the end of step 0, which never comes.
    answer = subprocess.run(
        [sys.executable, str(BENCH / "profile_step.py"), "--step", "1"], capture_output=True, text=True, timeout=120
    )
    assert answer.returncode == 2
    assert "--step 1: the step profiled is 2 or later" in answer.stderr


def test_the_chat_data_generator_refuses_no_rows_before_writing(tmp_path):
    # --rows 0 wrote an empty file, then failed in transformers' chat template measuring it.
    out = tmp_path / "chat.jsonl"
    answer = subprocess.run(
        [sys.executable, str(BENCH / "chatdata.py"), str(out), "--rows", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert answer.returncode == 2
    assert "--rows 0: the lengths are measured on at least one row" in answer.stderr
    assert not out.exists()


def test_the_serve_bench_refuses_a_missing_llama_cpp_before_exporting(tmp_path):
    # It exported merged and GGUF models (minutes on a real model) before finding llama-cpp-python missing.
    if importlib.util.find_spec("llama_cpp") is not None:
        pytest.skip("llama-cpp-python is installed: the bench would run")
    answer = subprocess.run(
        [sys.executable, str(BENCH / "serve.py"), "--model", str(tmp_path / "no-model-needed")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert answer.returncode == 1 and "llama-cpp-python is missing" in answer.stderr
    assert not (BENCH / ".work" / "serve").exists()


def test_a_trial_of_the_data_prep_bench_writes_where_it_is_told(tmp_path, tiny_model_dir):
    # It wrote bench/results/data_prep-DATE.json always, so a trial run became the report's newest result.
    kept = sorted((BENCH / "results").glob("data_prep-*.json"))
    answer = subprocess.run(
        [
            *(sys.executable, str(BENCH / "data_prep.py"), "--rows", "10", "--repeats", "1", "--stream-rows", "10"),
            *("--tokenizer", str(tiny_model_dir), "--results", str(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert answer.returncode == 0, answer.stderr[-2000:]
    [written] = tmp_path.glob("data_prep-*.json")
    assert json.loads(written.read_text())["prepare"]
    assert sorted((BENCH / "results").glob("data_prep-*.json")) == kept
