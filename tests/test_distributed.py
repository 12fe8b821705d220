"""Runs of several processes (torchrun, gloo on CPU): every rank issues the same collectives whatever
the data, metrics equal those of one process, and a rank that fails or sticks ends the whole run
with an error that names the rank and the phase."""

import atexit
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from conftest import SUBPROCESS_ENV, tiny_run_config

from tuneforge.config import load_config
from tuneforge.data import prepare
from tuneforge.errors import LAUNCHER_SHOWS_ERRORS, RunFailed, TuneforgeError
from tuneforge.eval.evaluate import token_loss
from tuneforge.models import load_model, load_tokenizer, resolve
from tuneforge.training.distributed import _failure_as_error, launch, launch_function, setup

ENV = SUBPROCESS_ENV


def run_cli(cfg: dict, tmp_path: Path, nproc: int, env: dict = ENV, timeout: float = 300):
    """`tuneforge train --nproc N` in a session of its own: a run that hangs past `timeout` is killed
    with every process torchrun started, not only the launcher."""
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    command = [sys.executable, "-m", "tuneforge", "train", str(path), "--nproc", str(nproc)]
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # torchrun gives each training process a session of its own: kill them by ancestry as well.
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        os.killpg(proc.pid, signal.SIGKILL)
        for process in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        proc.communicate(timeout=30)
        raise
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def one_process_loss(model_dir: Path, cfg: dict) -> float:
    """The validation loss of a saved model computed in this one process, from the same examples."""
    source = resolve(str(model_dir))
    tokenizer = load_tokenizer(source)
    examples = prepare(load_config(cfg).data, tokenizer).valid
    return token_loss(load_model(source, dtype=torch.float32), examples, tokenizer.pad_token_id)["loss"]


@pytest.mark.parametrize("nproc,n_valid", [(2, 1), (2, 2), (2, 3), (3, 2)])
def test_validation_rows_that_do_not_split_evenly_give_the_one_process_metrics(
    nproc, n_valid, tiny_model_dir, triage_data, tmp_path
):
    valid = tmp_path / "valid.jsonl"
    valid.write_text("".join(Path(triage_data["validation"]).read_text().splitlines(keepends=True)[:n_valid]))
    cfg = tiny_run_config(
        tiny_model_dir,
        {**triage_data, "validation": valid},
        tmp_path / "run",
        max_steps=2,
        batch_size=2 * nproc,
        eval_every=1,
        save_every=1,
    )
    cfg["data"]["packing"] = False  # one validation row per example: the rows do not split evenly
    res = run_cli(cfg, tmp_path, nproc)
    assert res.returncode == 0, res.stderr[-3000:]
    logged = metrics(tmp_path / "run")
    mid = next(m for m in logged if m["step"] == 1)
    final = next(m for m in logged if "full_valid_loss" in m)
    run = tmp_path / "run"
    assert mid["valid_loss"] == pytest.approx(one_process_loss(run / "checkpoints" / "step-1", cfg), rel=1e-6)
    assert final["full_valid_loss"] == pytest.approx(one_process_loss(run / "final", cfg), rel=1e-6)


def test_every_rank_gets_rows_in_every_micro_batch_of_every_step():
    """DDP needs every rank in every forward/backward: a step, the last of an epoch included, gives
    each rank grad_accum non-empty micro-batches, and no row twice."""
    from tuneforge.training import batches

    for world_size in (1, 2, 3, 4):
        for grad_accum in (1, 2, 3):
            n_micro = world_size * grad_accum
            for batch_size in range(n_micro, 4 * n_micro + 1, n_micro):
                for n_rows in range(batch_size, 3 * batch_size + 2):
                    order = batches.epoch_order(n_rows, seed=0, epoch=0)
                    lengths = (order * 7) % 11
                    seen = []
                    for step in range(batches.steps_per_epoch(n_rows, batch_size, n_micro)):
                        for rank in range(world_size):
                            micro = batches.step_micro_batches(
                                order, step, batch_size, grad_accum, world_size, rank, lengths
                            )
                            assert len(micro) == grad_accum and all(micro), (n_rows, batch_size, step, rank)
                            seen += [i for m in micro for i in m]
                    assert len(seen) == len(set(seen)) and len(seen) > n_rows - batch_size


def fault_env(tmp_path: Path, action: str) -> dict:
    """An environment whose rank 1 fails at its second training step: it raises, or it sticks (and,
    unlike a real stuck process, dies at once on the launcher's SIGTERM, so the test is quick)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        textwrap.dedent(f"""
        import os
        if os.environ.get("RANK") == "1":
            import signal, time
            from tuneforge.training import batches
            plan = batches.step_micro_batches

            def faulty(order, step_in_epoch, *args, **kwargs):
                if step_in_epoch == 1:
                    if {action!r} == "raise":
                        raise RuntimeError("injected failure on rank 1")
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    time.sleep(600)
                return plan(order, step_in_epoch, *args, **kwargs)

            batches.step_micro_batches = faulty
    """)
    )
    return {**ENV, "PYTHONPATH": f"{site}{os.pathsep}{ENV['PYTHONPATH']}"}


def test_a_rank_that_fails_ends_every_process_and_shows_its_error(tiny_model_dir, triage_data, tmp_path):
    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=4, batch_size=4)
    # Far longer than the test may take: rank 0 learns of rank 1's death from the closed connection.
    cfg["train"]["distributed_timeout"] = 600
    started = time.monotonic()
    res = run_cli(cfg, tmp_path, 2, env=fault_env(tmp_path, "raise"), timeout=240)
    assert res.returncode != 0
    assert time.monotonic() - started < 120
    assert "injected failure on rank 1" in res.stderr
    assert "rank 0 of 2" in res.stderr and "training step 2" in res.stderr


def test_a_batch_size_that_does_not_split_among_the_processes_is_refused_before_the_data_is_prepared(
    tiny_model_dir, triage_data, tmp_path
):
    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=2, batch_size=4, grad_accum=4)
    res = run_cli(cfg, tmp_path, 2, timeout=240)
    assert res.returncode == 2
    assert res.stderr.count("is no multiple of train.grad_accum x processes (4 x 2)") == 1  # not once per process
    assert "give train.batch_size a multiple of 8" in res.stderr
    assert "data:" not in res.stdout + res.stderr
    assert not (tmp_path / "run" / "data_report.json").exists()


@pytest.mark.parametrize(
    "refused,said",
    [
        ({"model": {"quantize": "nf4"}, "train": {"distributed": "fsdp"}}, "which FSDP cannot shard here"),
        ({"train": {"batchsize": 4}}, "train.batchsize (line 14): unknown key"),
    ],
)
def test_a_refused_config_is_refused_by_the_launcher_before_torchrun_starts(
    refused, said, tiny_model_dir, triage_data, tmp_path
):
    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=2, batch_size=4)
    for section, values in refused.items():
        cfg.setdefault(section, {}).update(values)
    scratch = tmp_path / "tmp"  # where torchrun's agent makes its torchelastic_* folder as it starts
    scratch.mkdir()
    res = run_cli(cfg, tmp_path, 2, env={**ENV, "TMPDIR": str(scratch)}, timeout=240)
    assert res.returncode == 2
    assert res.stderr.count(said) == 1, res.stderr  # the message one process gives, once
    assert "torchrun" not in res.stderr and not list(scratch.glob("torchelastic_*"))
    assert not (tmp_path / "run").exists()


def test_an_error_every_process_reports_reads_once_and_one_only_a_process_hits_still_shows(tmp_path):
    """Under `tuneforge train --nproc N` local rank 0 prints its error; the other processes hand theirs to
    the launcher (torchrun's error file), whose own error adds those that differ."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    failures = {}
    for rank, recipe in enumerate(["nope", "nope", "other"]):
        error_file = tmp_path / f"error{rank}.json"
        env = {
            **ENV,
            **{"WORLD_SIZE": "3", "RANK": str(rank), "LOCAL_RANK": str(rank), LAUNCHER_SHOWS_ERRORS: "1"},
            "TORCHELASTIC_ERROR_FILE": str(error_file),
        }
        command = [sys.executable, "-m", "tuneforge", "recipes", "show", recipe]
        res = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        assert res.returncode == 2
        assert ("no shipped recipe named 'nope'" in res.stderr) == (rank == 0), res.stderr
        failures[rank] = ProcessFailure(local_rank=rank, pid=0, exitcode=2, error_file=str(error_file))
    with pytest.raises(RunFailed) as stopped, _failure_as_error(3, shows_errors=True):
        raise ChildFailedError("tuneforge", failures)
    assert "no shipped recipe named 'other'" in stopped.value.message
    assert "'nope'" not in stopped.value.message


def test_a_stuck_rank_times_out_with_the_rank_and_phase(tiny_model_dir, triage_data, tmp_path):
    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=4, batch_size=4)
    cfg["train"]["distributed_timeout"] = 10
    started = time.monotonic()
    res = run_cli(cfg, tmp_path, 2, env=fault_env(tmp_path, "stick"), timeout=240)
    elapsed = time.monotonic() - started
    assert res.returncode != 0
    assert elapsed < 120, f"took {elapsed:.0f} s"  # startup and the 10 s wait; a hang would run into 240 s
    assert "rank 0 of 2" in res.stderr and "training step 2" in res.stderr
    assert "train.distributed_timeout" in res.stderr


@pytest.mark.parametrize("method", ["dpo", "distill"])
def test_dpo_and_distill_on_two_processes_with_one_validation_row_match_one_process(
    method, tiny_model_dir, triage_data, tmp_path
):
    from test_dpo import preference_rows

    data = {"train": Path(triage_data["train"]), "validation": tmp_path / "valid.jsonl"}
    data["validation"].write_text(Path(triage_data["validation"]).read_text().splitlines(keepends=True)[0])
    if method == "dpo":  # the same conversations as pairs
        for split, chats in list(data.items()):
            data[split] = tmp_path / f"pairs-{split}.jsonl"
            data[split].write_text("".join(json.dumps(r) + "\n" for r in preference_rows(chats)))
    losses = {}
    for nproc in (1, 2):
        cfg = tiny_run_config(
            tiny_model_dir,
            data,
            tmp_path / f"run{nproc}",
            max_steps=2,
            batch_size=4,
            grad_accum=2 // nproc,
            learning_rate=1e-2,
        )
        cfg["method"] = method
        cfg["lora"]["dropout"] = 0.0
        if method == "distill":
            cfg["distill"] = {"teacher": str(tiny_model_dir), "student": "lora"}
        res = run_cli(cfg, tmp_path, nproc)
        assert res.returncode == 0, res.stderr[-3000:]
        losses[nproc] = metrics(tmp_path / f"run{nproc}")[-1]["full_valid_loss"]
    assert losses[2] == pytest.approx(losses[1], rel=1e-4)


def _rank_marking_its_exit(folder: str) -> int:
    """A process's work for `launch_function`: its rank, and a file the interpreter writes if it finalizes."""
    rank = int(os.environ["RANK"])
    atexit.register(Path(folder, f"finalized-{rank}").touch)
    return rank


def test_launched_processes_hand_back_rank_0s_value_and_never_finalize(tmp_path):
    """A job's processes: finalizing one whose gloo threads still free a finished run's tensors aborts it
    (`cli.leave`), so they end without running the interpreter's exit handlers."""
    assert launch_function(_rank_marking_its_exit, (str(tmp_path),), 2) == 0
    assert not list(tmp_path.glob("finalized-*"))


def _rank_1_killed(folder: str) -> None:
    """A process's work for `launch_function`: rank 1 is killed as the out-of-memory killer kills, rank 0
    waits to be stopped."""
    if int(os.environ["RANK"]) == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)


def test_a_process_killed_by_a_signal_is_named_by_its_signal_not_sent_to_an_error_it_never_printed(tmp_path):
    started = time.monotonic()
    with pytest.raises(RunFailed) as failed:
        launch_function(_rank_1_killed, (str(tmp_path),), 2)
    assert time.monotonic() - started < 45
    said = failed.value.message
    assert "process 1 of 2 was ended by SIGKILL (exit code -9) and printed no error" in said
    assert "out-of-memory" in said and "printed above" not in said


def test_a_process_ended_by_a_signal_python_has_no_name_for_is_named_by_its_number():
    """A real-time signal (SIGRTMIN + n) has no name in Python's `signal.Signals`."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    ended = subprocess.Popen(["sleep", "60"])
    ended.send_signal(signal.SIGRTMIN + 6)
    code = ended.wait(timeout=30)
    failure = ProcessFailure(local_rank=0, pid=ended.pid, exitcode=code, error_file="")
    with pytest.raises(RunFailed) as stopped, _failure_as_error(2):
        raise ChildFailedError("tuneforge", {0: failure})
    said = stopped.value.message
    assert f"process 0 of 2 was ended by signal {-code} (exit code {code}) and printed no error" in said


def test_more_processes_than_gpus_are_refused_before_any_start(monkeypatch, tmp_path):
    """This machine has no GPU; the count a machine with two reports is put in its place."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(TuneforgeError, match=r"3 processes on this machine, but it has 2 GPU\(s\).*--nproc 2"):
        launch_function(_rank_marking_its_exit, (str(tmp_path),), 3)
    with pytest.raises(TuneforgeError, match="--nproc 2"):
        launch(["train", "config.yaml"], 3)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(TuneforgeError, match="4 processes on this machine"):
        setup()
    assert not list(tmp_path.iterdir())  # nothing ran


def test_ctrl_c_at_the_launcher_exits_as_a_signal_without_torchruns_traceback(monkeypatch):
    """torchrun's agent turns the SIGINT it passes on to the processes (which checkpoint and say how to
    resume) into a `SignalException`; `tuneforge train --nproc N` exits 130 then, as one process does."""
    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing.api import SignalException

    def interrupted(_):
        raise SignalException("Process 1 got signal: 2", sigval=signal.SIGINT)

    monkeypatch.setattr(torch.distributed.run, "run", interrupted)
    assert launch(["train", "config.yaml"], 2) == 130


# `tuneforge train` whose run is stopped by Ctrl-C while it loads, before the loop can checkpoint.
STOPPED_WHILE_LOADING = """
import os, signal, tuneforge.pipeline
from tuneforge.cli import main
def loading(*_args, **_kw):
    os.kill(os.getpid(), signal.SIGINT)  # as torchrun's agent passes Ctrl-C on
    signal.pause()
tuneforge.pipeline.train = loading
main()
"""


def stopped_while_loading(config: Path, overwrite: bool = False, **env: str) -> str:
    """What `tuneforge train CONFIG` (with --overwrite where `overwrite`) says (its stderr, on one line) when
    Ctrl-C stops it while it loads, in a process with `env` besides the usual; it exits 130."""
    done = subprocess.run(
        [sys.executable, "-c", STOPPED_WHILE_LOADING, "train", str(config), *(["--overwrite"] if overwrite else [])],
        capture_output=True,
        text=True,
        timeout=60,
        env={**SUBPROCESS_ENV, **env},
    )
    assert done.returncode == 130, done.stderr
    return " ".join(done.stderr.split())


def test_ctrl_c_before_the_processes_save_is_said_once_with_where_the_run_continues_from(
    tiny_model_dir, triage_data, tmp_path
):
    """A Ctrl-C the launcher passes on while the processes load (before the loop can checkpoint) is said by the
    machine's local rank 0 alone, with the checkpoint the run continues from and the command, or that there is none."""
    out = tmp_path / "run"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(tiny_model_dir, triage_data, out)))

    def stopped(local_rank: int) -> str:
        return stopped_while_loading(
            config, WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", LOCAL_RANK=str(local_rank), **{LAUNCHER_SHOWS_ERRORS: "1"}
        )

    assert stopped(1) == ""
    assert stopped(0) == (
        "interrupted before the run saved a checkpoint: nothing to resume; run the same command to start it again."
    )
    saved = out / "checkpoints" / "step-3"
    saved.mkdir(parents=True)
    (saved / "trainer_state.json").write_text("{}")
    assert (
        stopped(0)
        == f"interrupted; continue from {saved} with `tuneforge train {out / 'config.yaml'} --resume --nproc 2`."
    )


def test_ctrl_c_while_one_process_loads_says_where_an_earlier_run_continues_from(tiny_model_dir, triage_data, tmp_path):
    """One process stopped by Ctrl-C while it loads (before this run's first checkpoint) says, as a process of
    several does, the checkpoint an earlier run left to continue from and the command, or that there is none."""
    out = tmp_path / "run"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(tiny_model_dir, triage_data, out)))
    assert stopped_while_loading(config) == (
        "interrupted before the run saved a checkpoint: nothing to resume; run the same command to start it again."
    )
    saved = out / "checkpoints" / "step-3"
    saved.mkdir(parents=True)
    (saved / "trainer_state.json").write_text("{}")
    assert stopped_while_loading(config) == (
        f"interrupted; continue from {saved} with `tuneforge train {out / 'config.yaml'} --resume`."
    )
    # Started over an earlier completed run: that run stays as it was until this one passes its checks.
    (out / "summary.json").write_text("{}")
    assert stopped_while_loading(config, overwrite=True) == (
        f"interrupted before this run started over: the earlier run in {out} is as it was; run the same command "
        "to start over."
    )


def test_more_processes_than_cpu_cores_without_gpus_are_warned_of_before_the_start(monkeypatch, capsys):
    import torch.distributed.run

    monkeypatch.setattr(torch.distributed.run, "run", lambda _: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # the machine's; this process may run on two of them
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1})
    assert launch(["train", "config.yaml"], 2) == 0
    assert "warning" not in capsys.readouterr().err
    assert launch(["train", "config.yaml"], 3) == 0
    said = capsys.readouterr().err
    assert "warning: --nproc 3 on a machine with 2 CPU cores and no GPU" in said and "--nproc 2" in said


def _train_own_config(folder: str) -> None:
    """A process's work for `launch_function`: train the config `folder`/cfg-RANK.yaml, as a machine
    started with its own config file does, writing the refusal it meets to `folder`/said-RANK."""
    from tuneforge.training import train

    rank = os.environ["RANK"]
    try:
        train(str(Path(folder, f"cfg-{rank}.yaml")), progress=False)
    except TuneforgeError as refused:
        Path(folder, f"said-{rank}").write_text(refused.message)


def refusals(configs: list[dict], tmp_path: Path) -> list[str]:
    """What each of len(configs) processes, each training its own config, was refused with."""
    for rank, cfg in enumerate(configs):
        (tmp_path / f"cfg-{rank}.yaml").write_text(yaml.safe_dump(cfg))
    launch_function(_train_own_config, (str(tmp_path),), len(configs))
    return [(tmp_path / f"said-{rank}").read_text() for rank in range(len(configs))]


def test_machines_that_do_not_share_output_dir_are_refused_on_every_one_before_any_work(
    tiny_model_dir, triage_data, tmp_path
):
    """Each process writes its shards of every checkpoint into output_dir: machines with a folder each
    (no network file system) would train until their first checkpoint and fail there."""
    configs = [tiny_run_config(tiny_model_dir, triage_data, tmp_path / f"run-{rank}", max_steps=2) for rank in (0, 1)]
    for said in refusals(configs, tmp_path):
        assert "is not one folder every process shares: rank(s) 1 do not see the files rank 0 writes" in said
    assert not (tmp_path / "run-0").exists() and not (tmp_path / "run-1").exists()


def test_machines_started_with_other_configs_or_data_are_refused_on_every_one_naming_the_difference(
    tiny_model_dir, triage_data, tmp_path
):
    """Each process trains as its own config file says: one started with another learning rate or data
    file would train its share of every step otherwise, silently."""
    other_data = tmp_path / "other-train.jsonl"
    other_data.write_text(Path(triage_data["train"]).read_text())
    configs = [tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=2) for _ in (0, 1)]
    configs[1]["train"]["learning_rate"] = 2e-3
    configs[1]["data"]["train"] = str(other_data)
    for said in refusals(configs, tmp_path):
        assert "started with different configs or data" in said
        assert f"data.train: {triage_data['train']} on rank 0, {other_data} on rank 1" in said
        assert "train.learning_rate: 0.001 on rank 0, 0.002 on rank 1" in said
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_machine_whose_others_never_start_stops_after_the_join_timeout_saying_what_to_start(monkeypatch, tmp_path):
    """torchrun's rendezvous waits JOIN_TIMEOUT_S (10 minutes) for the other machines, then fails with
    its own traceback; the launcher says which machines were to meet where instead."""
    from tuneforge.training import distributed

    monkeypatch.setattr(distributed, "JOIN_TIMEOUT_S", 2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        master = f"127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(RunFailed) as unmet:
        launch(["train", str(tmp_path / "cfg.yaml")], 1, nnodes=2, node_rank=0, master=master)
    assert f"machine 0 of 2: the machines did not all meet at --master {master} within 2 s" in unmet.value.message
    assert "each with its own --node-rank from 0 to 1" in unmet.value.message


def test_machine_0_whose_master_port_another_program_holds_says_so_not_that_it_cannot_reach_it(tmp_path):
    """Machine 0 hosts the rendezvous at --master: with that port taken here, torchrun reports that it
    cannot connect to its store, which reads as a network fault; the launcher names the port in use."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        master = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(RunFailed) as refused:
            launch(["train", str(tmp_path / "cfg.yaml")], 1, nnodes=2, node_rank=0, master=master)
    said = refused.value.message
    assert f"machine 0 of 2: port {master.rpartition(':')[2]} of --master {master} is in use on this machine" in said
    assert "could not reach" not in said and "every machine" in said


def _train_counting_data_hashes(folder: str, data_files: list[str]) -> None:
    """A process's work for `launch_function`: train `folder`/cfg.yaml, writing to `folder`/hashed-RANK the
    data files it read to hash (for the data's cache key)."""
    import hashlib

    from tuneforge.training import train

    digest, hashed = hashlib.file_digest, []

    def counting(f, name):
        if f.name in data_files:
            hashed.append(f.name)
        return digest(f, name)

    hashlib.file_digest = counting  # this forked process's own
    train(str(Path(folder, "cfg.yaml")), progress=False)
    Path(folder, f"hashed-{os.environ['RANK']}").write_text(json.dumps(hashed))


def test_one_process_hashes_the_data_files_once_and_the_others_read_its_key(tiny_model_dir, triage_data, tmp_path):
    """The cache key hashes every data file whole (gigabytes, for a large data set): the first process of a
    machine hashes them, once, and the others prepare the data from rank 0's key."""
    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=1, batch_size=2)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    files = [str(triage_data["train"]), str(triage_data["validation"])]
    launch_function(_train_counting_data_hashes, (str(tmp_path), files), 2)
    hashed = [json.loads((tmp_path / f"hashed-{rank}").read_text()) for rank in (0, 1)]
    assert sorted(hashed[0]) == sorted(files) and hashed[1] == []
    assert json.loads((tmp_path / "run" / "data_report.json").read_text())["cache"]["key"]


def test_full_fine_tuning_of_a_vision_model_on_rows_with_and_without_images_runs_ddp_as_one_process(tmp_path):
    """A micro-batch without images leaves the vision tower out of its forward: DDP runs on (the tower's gradients
    those of the processes that ran it) and matches one process; FSDP is refused before the model loads."""
    from families import save_gemma3_vision_model
    from test_vision import image_row

    from tuneforge.training import train

    model = save_gemma3_vision_model(tmp_path / "model")
    rows = []
    for i in range(8):
        rows.append(image_row((220, 20, 20), "It is red.", (20 + i, 16)))
        rows.append({"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}."}]})
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def config(run: str, spread: str) -> dict:
        return {
            "base_model": str(model),
            "method": "full",
            "data": {"train": str(tmp_path / "mixed.jsonl"), "validation": 0.25, "max_length": 64},
            "train": {"max_steps": 3, "batch_size": 2, "learning_rate": 1e-3, "precision": "fp32"}
            | {"eval_every": 0, "save_every": 0, "distributed": spread},
            "output_dir": str(tmp_path / run),
        }

    res = run_cli(config("ddp", "ddp"), tmp_path, 2)
    assert res.returncode == 0, res.stderr[-3000:]
    alone = train(config("alone", "auto"), progress=False).metrics["full_valid_loss"]
    assert metrics(tmp_path / "ddp")[-1]["full_valid_loss"] == pytest.approx(alone, rel=1e-4)
    res = run_cli(config("fsdp", "auto"), tmp_path, 2)
    assert res.returncode != 0 and "some show images and some do not" in res.stderr
    assert "train.distributed: ddp" in res.stderr and not (tmp_path / "fsdp" / "final").exists()


def test_grpo_with_a_full_policy_on_prompts_with_and_without_images_runs_under_ddp(tmp_path):
    """A micro-batch of text prompts leaves the vision tower out of its forward, as in full fine-tuning: DDP looks
    for the parameters a forward leaves out and runs on."""
    from families import save_gemma3_vision_model
    from test_grpo_vision import image_prompt

    model = save_gemma3_vision_model(tmp_path / "model")
    rows = []
    for i in range(4):
        rows.append(image_prompt((220, 20 * i, 20), "red"))
        rows.append({"prompt": f"Say {i}.", "answer": str(i)})
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def config(run: str) -> dict:
        grader = {
            "type": "python",
            "name": "length",
            "source": "def grade(sample, item):\n    return len(sample['output_text']) % 5 / 4\n",
        }
        return {
            "base_model": str(model),
            "method": "grpo",
            "grpo": {"policy": "full", "grader": grader, "group_size": 2, "max_new_tokens": 4},
            "data": {"train": str(tmp_path / "mixed.jsonl"), "validation": 0.0, "max_length": 64},
            "train": {"max_steps": 2, "batch_size": 2, "learning_rate": 1e-3, "precision": "fp32"}
            | {"eval_every": 0, "save_every": 0, "distributed": "ddp"},
            "output_dir": str(tmp_path / run),
        }

    res = run_cli(config("ddp"), tmp_path, 2)
    assert res.returncode == 0, res.stderr[-3000:]
    steps = [r for r in metrics(tmp_path / "ddp") if "train_loss" in r]
    assert len(steps) == 2 and all(math.isfinite(r[k]) for r in steps for k in ("train_loss", "kl", "reward"))


def step_losses(run: Path) -> dict[int, float]:
    return {m["step"]: m["train_loss"] for m in metrics(run) if "train_loss" in m}


@pytest.mark.parametrize("architecture,spread", [("MixtralConfig", "ddp"), ("Qwen2MoeConfig", "fsdp")])
def test_full_fine_tuning_of_a_mixture_of_experts_on_two_processes_gives_the_one_process_losses(
    architecture, spread, triage_data, tmp_path
):
    """Each token takes one of 32 experts, so a process's micro-batch routes no token to some of them: their
    gradients are zeros there (transformers holds a layer's experts in one weight), never missing, and DDP's
    and FSDP's reductions give the one-process step."""
    from tiny import save_tiny_model, tiny_moe

    from tuneforge.training import train

    model = save_tiny_model(tmp_path / "model", build=tiny_moe, architecture=architecture)

    def config(run: str) -> dict:
        cfg = tiny_run_config(model, triage_data, tmp_path / run, max_steps=3, batch_size=4, learning_rate=1e-2)
        cfg["method"] = "full"
        cfg["train"]["distributed"] = spread
        del cfg["lora"]
        return cfg

    res = run_cli(config("two"), tmp_path, 2)
    assert res.returncode == 0, res.stderr[-3000:]
    train(config("one"), progress=False)
    two, one = step_losses(tmp_path / "two"), step_losses(tmp_path / "one")
    assert two.keys() == one.keys() == {1, 2, 3}
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-5), step
    assert one[3] < one[1] - 0.1  # the experts trained: a matching loss that stood still would prove nothing


def _train_counting_teacher_passes(folder: str) -> None:
    """A process's work for `launch_function`: train `folder`/cfg.yaml, writing to `folder`/teacher-RANK how
    many times it ran the teacher over the rows for its top-k logits."""
    from tuneforge.methods import distill
    from tuneforge.training import train

    compute, passes = distill.compute_top_k, []

    def counting(*args, **kwargs):
        passes.append(1)
        return compute(*args, **kwargs)

    distill.compute_top_k = counting  # this forked process's own
    train(str(Path(folder, "cfg.yaml")), progress=False)
    Path(folder, f"teacher-{os.environ['RANK']}").write_text(str(len(passes)))


def test_rank_0_computes_a_missing_or_damaged_teacher_cache_entry_once_and_the_others_read_it(
    tiny_model_dir, triage_data, tmp_path, monkeypatch
):
    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path / "home"))
    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=1, batch_size=2)
    cfg["method"], cfg["distill"] = "distill", {"teacher": str(tiny_model_dir), "student": "lora", "teacher_top_k": 4}
    for entry in ("missing", "damaged"):
        cfg["output_dir"] = str(tmp_path / entry)
        (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
        launch_function(_train_counting_teacher_passes, (str(tmp_path),), 2)
        assert [(tmp_path / f"teacher-{rank}").read_text() for rank in (0, 1)] == ["1", "0"], entry
        (written,) = (tmp_path / "home" / "teacher-cache").iterdir()
        written.write_bytes(written.read_bytes()[:100])  # cut short: the next run computes it again


def test_a_teacher_that_is_the_student_itself_is_warned_of_once_under_nproc(tiny_model_dir, triage_data, tmp_path):
    # The launcher checks the config before torchrun starts: the processes it starts leave the warning (and the
    # comparison of the weights) to it.
    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=1, batch_size=2)
    cfg["method"], cfg["distill"] = "distill", {"teacher": str(tiny_model_dir), "student": "lora"}
    res = run_cli(cfg, tmp_path, 2)
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("is the student's own model") == 1, res.stderr


def test_a_model_without_a_chat_template_is_warned_of_once_under_nproc(tiny_model_dir, triage_data, tmp_path):
    # The launcher says it as it checks the config (`check_before_launch`): the processes torchrun starts, each
    # loading the tokenizer again, leave it to the launcher.
    from tiny import without_chat_template

    model = without_chat_template(tiny_model_dir, tmp_path / "no-template")
    res = run_cli(tiny_run_config(model, triage_data, tmp_path / "run", max_steps=1, batch_size=2), tmp_path, 2)
    assert res.returncode == 0, res.stderr
    assert (res.stdout + res.stderr).count("has no chat template; using ChatML") == 1, res.stdout + res.stderr
