"""Progress off a terminal: plain lines with done/total, pace and ETA, throttled, and always the last one."""

from __future__ import annotations

import io
from types import SimpleNamespace

from rich.console import Console

from tuneforge import progress
from tuneforge.training.progress import TrainProgress


def test_off_a_terminal_progress_is_throttled_plain_lines_ending_with_the_last(monkeypatch, capsys):
    with progress.progress_bar("answers", 40) as advance:
        for _ in range(40):
            advance(1)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("answers 1/40 (2%)")  # the first update shows at once ...
    assert lines[-1].startswith("answers 40/40 (100%)") and "eta 0:00:00" in lines[-1]
    assert len(lines) == 2  # ... the rest wait LOG_EVERY_S, except the end

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    with progress.progress_bar("answers", 3) as advance:
        for _ in range(3):
            advance(1)
    assert [line.split(" (")[0] for line in capsys.readouterr().err.strip().splitlines()] == [
        "answers 1/3",
        "answers 2/3",
        "answers 3/3",
    ]


def test_off_a_terminal_pace_and_eta_wait_for_a_rate_measured_from_the_first_update(monkeypatch):
    # As a model pull's dequantizing: the first tensor comes after 1.4 s of opening the file, the rest at
    # 0.015 s each; a rate that counted those 1.4 s would give the first line an ETA of minutes for seconds of work.
    times = iter([0.0, 1.4, 1.415, 1.43])
    monkeypatch.setattr(progress, "time", SimpleNamespace(perf_counter=lambda: next(times)))
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    console = Console(file=io.StringIO(), width=200)
    lines = progress.LogLines(console, "tensors", 272)
    for done in (1, 2, 3):
        lines.update(done)
    first, second, third = console.file.getvalue().splitlines()
    assert first == "tensors 1/272 (0%) · elapsed 0:00:01"
    assert second.startswith("tensors 2/272 (1%) · 66.7/s · elapsed 0:00:01 · eta 0:00:04")
    assert third.endswith("· eta 0:00:04")


def test_training_progress_off_a_terminal_shows_steps_loss_and_speed():
    bar = TrainProgress(2, 0, enabled=True)
    bar.console = bar.lines.console = Console(file=io.StringIO())
    with bar:
        bar.update({"step": 1, "train_loss": 2.5, "tokens_per_s": 80.0})
        bar.update({"step": 2, "train_loss": 2.0, "tokens_per_s": 90.0, "valid_loss": 2.1})
    out = bar.console.file.getvalue()
    assert "train step 1/2 (50%) · loss 2.5000 · 80 tok/s" in out
    assert "train step 2/2 (100%) · loss 2.0000 (valid 2.1000) · 90 tok/s" in out


def test_off_a_terminal_each_validation_pass_shows_its_own_lines(
    tiny_model_dir, triage_data, tmp_path, monkeypatch, capsys
):
    from conftest import tiny_run_config

    from tuneforge.training import train

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=2, eval_every=1, batch_size=2)
    train(cfg)
    lines = capsys.readouterr().err.splitlines()

    def done(phase: str) -> list[str]:  # "done/total" of each line of the phase, in order
        return [line[len(phase) + 1 :].split(" ")[0] for line in lines if line.startswith(phase + " ")]

    # A line after each batch of 2 rows, the pass's own, before the next step and after the last one.
    rows = len(done("validation at step 1")) * 2
    assert rows > 2
    assert done("validation at step 1") == done("final validation") == [f"{n}/{rows}" for n in range(2, rows + 1, 2)]
    last_of_step_1 = max(i for i, line in enumerate(lines) if line.startswith("validation at step 1 "))
    assert last_of_step_1 < next(i for i, line in enumerate(lines) if line.startswith("train step 2/2"))

    train(cfg, overwrite=True, progress=False)
    assert "validation" not in capsys.readouterr().err


def test_a_spinner_shows_a_file_name_as_named():
    # rich's own spinner reads `:x:` in its text as an emoji's code whatever the console says.
    from tuneforge.console import new_console, plain

    name = "x]:x: [bold].gguf"
    status = new_console(file=io.StringIO()).status(f"Writing {plain(name)}")
    assert status.renderable.text.plain == f"Writing {name}"
