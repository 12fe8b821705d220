"""FSDP2 on CPU with gloo: full fine-tuning on 2 and 4 processes gives the 1-process losses while each
process holds about 1/N of the weights, gradients and optimizer state; a checkpoint of 2 processes,
killed with SIGKILL, resumes on 1 and on 4 with the uninterrupted losses (on 2, bitwise); two
launchers with --nnodes 2 (two "machines" on this one, each with its own $TUNEFORGE_HOME) give one
machine's losses; and what FSDP cannot do is refused before any work."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from conftest import SUBPROCESS_ENV, tiny_run_config
from fsdp_run import main as run_recording
from safetensors import safe_open

from tuneforge.config import load_config
from tuneforge.errors import RunFailed, TuneforgeError
from tuneforge.training import checkpoint, distributed, train

# The module's runs are made once and shared by its tests: keep them on one test worker.
pytestmark = pytest.mark.xdist_group("fsdp")

STEPS = 8
TESTS = Path(__file__).parent


def full_config(model_dir: Path, data: dict, out: Path, **train) -> dict:
    cfg = tiny_run_config(model_dir, data, out, max_steps=STEPS, batch_size=4, learning_rate=1e-2, **train)
    cfg["method"] = "full"  # train.distributed: auto shards it over several processes
    return cfg


def write_config(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def step_losses(run: Path) -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {m["step"]: m["train_loss"] for m in map(json.loads, lines) if "train_loss" in m}


def assert_same_losses(got: dict, expected: dict, tolerance: float) -> None:
    assert got.keys() == expected.keys() == set(range(1, STEPS + 1))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=tolerance), step


def start(args: list[str], log: Path, env: dict = SUBPROCESS_ENV, **popen) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, **popen)


def tuneforge(*args: str, log: Path, **popen) -> subprocess.Popen:
    return start([sys.executable, "-m", "tuneforge", *args], log, **popen)


def finished(proc: subprocess.Popen, log: Path) -> None:
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]


def kill_with_what_it_started(pid: int) -> None:
    """SIGKILL a launcher and its training processes, at once (torchrun gives each a session of its own)."""
    tree = []
    with contextlib.suppress(psutil.NoSuchProcess):
        tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    for process in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


@pytest.fixture(scope="module")
def runs(tiny_model_dir, triage_data, tmp_path_factory) -> dict[int, dict]:
    """The same full fine-tuning on 1, 2 and 4 processes: per-step losses and what each process held."""
    out = {}
    for n in (1, 2, 4):
        folder = tmp_path_factory.mktemp(f"fsdp{n}")
        cfg = write_config(full_config(tiny_model_dir, triage_data, folder / "run"), folder / "cfg.yaml")
        if n == 1:
            run_recording(str(cfg), str(folder))
        else:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]
            log = folder / "log"
            finished(start([*launcher, str(TESTS / "fsdp_run.py"), str(cfg), str(folder)], log), log)
        held = [json.loads((folder / f"held-{rank}.json").read_text()) for rank in range(n)]
        out[n] = {"losses": step_losses(folder / "run"), "held": held, "folder": folder}
    return out


def test_full_fine_tuning_on_2_and_4_fsdp_processes_gives_the_one_process_losses_holding_1_nth_each(runs):
    alone = runs[1]["held"][0]
    assert alone["parameters"] > 0 and alone["gradients"] == alone["parameters"]
    for n in (2, 4):
        assert_same_losses(runs[n]["losses"], runs[1]["losses"], 1e-4)
        for held in runs[n]["held"]:
            for kind in ("parameters", "gradients", "optimizer"):
                assert held[kind] == pytest.approx(alone[kind] / n, rel=0.1), (n, kind)


def test_the_final_model_of_4_fsdp_processes_is_one_plain_transformers_folder_with_the_1_process_weights(runs):
    from transformers import AutoModelForCausalLM

    finals = [runs[n]["folder"] / "run" / "final" for n in (1, 4)]
    assert [p.name for p in finals[1].glob("*.safetensors")] == ["model.safetensors"]
    alone, sharded = (AutoModelForCausalLM.from_pretrained(folder).state_dict() for folder in finals)
    assert alone.keys() == sharded.keys()
    for name, weight in alone.items():
        assert torch.allclose(sharded[name], weight, atol=1e-5), name


def test_a_2_process_checkpoint_killed_with_sigkill_resumes_on_1_2_and_4_with_the_uninterrupted_losses(
    runs, tiny_model_dir, triage_data, tmp_path
):
    cut = tmp_path / "cut"
    cfg = full_config(tiny_model_dir, triage_data, cut, save_every=2)
    log = tmp_path / "cut.log"
    proc = tuneforge("train", str(write_config(cfg, tmp_path / "cut.yaml")), "--nproc", "2", log=log)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not (cut / "checkpoints" / "step-2").exists():
        time.sleep(0.05)
    kill_with_what_it_started(proc.pid)
    proc.wait()
    saved = checkpoint.latest(cut / "checkpoints")
    assert saved is not None and saved.name != f"step-{STEPS}", log.read_text()[-3000:]
    assert sorted(p.name for p in (saved / checkpoint.OPTIMIZER).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    # Gathered weights are copies: the output layer tied to the embeddings is written once, as one process does.
    written = [
        set(safe_open(folder / "model.safetensors", "pt").keys())
        for folder in (saved, runs[1]["folder"] / "run" / "final")
    ]
    assert "lm_head.weight" not in written[1] and written[0] == written[1]

    for n in (1, 2, 4):
        resumed = tmp_path / f"resumed{n}"
        shutil.copytree(cut, resumed)
        cfg_n = write_config({**cfg, "output_dir": str(resumed)}, tmp_path / f"resumed{n}.yaml")
        if n == 1:
            train(cfg_n, resume="latest", progress=False)
        else:
            log = tmp_path / f"resumed{n}.log"
            finished(tuneforge("train", str(cfg_n), "--resume", "--nproc", str(n), log=log), log)
        if n == 2:  # on as many processes: bitwise
            assert step_losses(resumed) == runs[2]["losses"]
        assert_same_losses(step_losses(resumed), runs[2]["losses"], 1e-5)


def test_a_sharded_model_s_final_save_writes_its_gathered_weights(tiny_model_dir, tmp_path):
    """`loop.finish` saves a sharded model through `checkpoint.savable`: the gathered weights are those written."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.models.saving import save_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    weights = {name: torch.zeros_like(value) for name, value in model.state_dict().items()}
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    save_model(checkpoint.savable(model, weights), tokenizer, tiny_model_dir, tmp_path / "final")
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert all(not value.any() for value in saved.state_dict().values())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_machines_of_one_process_each_give_the_one_machine_losses_each_preparing_its_data(
    runs, tiny_model_dir, triage_data, tmp_path
):
    cfg = write_config(full_config(tiny_model_dir, triage_data, tmp_path / "run"), tmp_path / "cfg.yaml")
    master = f"127.0.0.1:{free_port()}"
    homes = [tmp_path / f"home-{rank}" for rank in (0, 1)]  # each "machine" has its own data cache
    logs = [tmp_path / f"machine-{rank}.log" for rank in (0, 1)]
    launchers = [
        tuneforge(
            *("train", str(cfg), "--nnodes", "2", "--node-rank", str(rank), "--master", master),
            log=logs[rank],
            env={**SUBPROCESS_ENV, "TUNEFORGE_HOME": str(home)},
        )
        for rank, home in enumerate(homes)
    ]
    for launcher, log in zip(launchers, logs):
        finished(launcher, log)
    assert_same_losses(step_losses(tmp_path / "run"), runs[2]["losses"], 1e-4)
    for home in homes:
        assert list((home / "data-cache").glob("*/report.json")), f"{home}: no data prepared there"


def test_a_checkpoint_without_another_process_s_files_is_refused_naming_the_shared_folder(runs):
    written = checkpoint.latest(runs[1]["folder"] / "run" / "checkpoints")
    with pytest.raises(RunFailed, match=r"rng-1\.pt.*output_dir must be a folder they all share"):
        checkpoint._check_complete(written, processes=2)


def test_auto_shards_full_fine_tuning_and_replicates_adapters_and_refuses_what_fsdp_cannot_do(
    tiny_model_dir, triage_data, tmp_path
):
    def config(method="full", data=None, **train):
        cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", **train)
        cfg["method"] = method
        cfg["data"].update(data or {})
        return load_config(cfg)

    assert [distributed.strategy(config(), n) for n in (1, 2)] == ["single", "fsdp"]
    assert distributed.strategy(config("lora"), 2) == "ddp"
    assert distributed.strategy(config("lora", distributed="fsdp"), 2) == "fsdp"
    assert distributed.strategy(config(distributed="ddp"), 2) == "ddp"
    with pytest.raises(TuneforgeError, match="cpu_offload .* needs train.distributed: fsdp"):
        distributed.strategy(config("lora", cpu_offload=True), 2)
    with pytest.raises(TuneforgeError, match="Use train.distributed: ddp"):
        distributed.strategy(config("lora", {"general_mix": 0.2}, distributed="fsdp", replay_loss="kl_to_base"), 2)
    with pytest.raises(TuneforgeError, match="Use train.distributed: ddp"):
        distributed.strategy(config("dpo", distributed="fsdp"), 2, saves_merged=True)
    with pytest.raises(TuneforgeError, match="train.keep_best .* FSDP's sharded weights cannot take"):
        distributed.strategy(config(keep_best=True, eval_every=2), 2)
    assert distributed.strategy(config(keep_best=True, eval_every=2), 1) == "single"
    quantized = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", distributed="fsdp")
    quantized.update(method="lora", model={"quantize": "nf4"})
    assert (
        distributed.strategy(load_config({**quantized, "train": {**quantized["train"], "distributed": "auto"}}), 2)
        == "ddp"
    )
    path = tmp_path / "quantized.yaml"
    path.write_text(yaml.safe_dump(quantized))
    lines = path.read_text().splitlines()
    quantize = next(i for i, text in enumerate(lines, 1) if "quantize:" in text)
    shard = next(i for i, text in enumerate(lines, 1) if "distributed: fsdp" in text)
    with pytest.raises(
        TuneforgeError, match="model.quantize: nf4 .* FSDP cannot shard.*Use train.distributed: ddp"
    ) as error:
        distributed.strategy(load_config(path), 2)
    assert f"model.quantize ({path} line {quantize}), train.distributed ({path} line {shard}): " in error.value.message


@pytest.mark.parametrize(
    "machines,message",
    [
        ({"master": "127.0.0.1:29500"}, "--nnodes 2 or more"),
        ({"nnodes": 2}, "give ADDR:PORT"),
        ({"nnodes": 2, "master": "nowhere"}, "give ADDR:PORT"),
        ({"nnodes": 2, "node_rank": 2, "master": "127.0.0.1:29500"}, "give 0 to 1"),
    ],
)
def test_machine_options_that_cannot_meet_are_refused_with_what_to_give(machines, message):
    with pytest.raises(TuneforgeError, match=message):
        distributed.rendezvous(**machines)


def test_sharded_layers_compute_in_bf16_copies_of_fp32_shards_and_reduce_gradients_in_fp32(tiny_model_dir):
    import torch.distributed as dist

    from tuneforge.methods import SFTObjective
    from tuneforge.models import load_model, resolve

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = load_model(resolve(str(tiny_model_dir)), dtype=torch.float32)
        layers = distributed.decoder_layers(model)
        assert len(layers) == model.config.num_hidden_layers
        objective = distributed.shard(SFTObjective(model), model, distributed.World(), bf16=True, cpu_offload=False)
        seen = []
        layers[0].mlp.up_proj.register_forward_pre_hook(lambda module, args: seen.append(module.weight.dtype))
        ids = torch.randint(0, 400, (2, 12))
        objective(input_ids=ids, labels=ids)["loss"].backward()
        weight = layers[0].mlp.up_proj.weight
        assert seen == [torch.bfloat16] and weight.dtype == weight.grad.dtype == torch.float32
    finally:
        dist.destroy_process_group()


def test_validate_prints_what_each_process_holds(tiny_model_dir, triage_data, tmp_path, capsys, monkeypatch):
    from tuneforge.dry_run import validate

    monkeypatch.setenv("COLUMNS", "400")  # one line a table row
    cfg = full_config(tiny_model_dir, triage_data, tmp_path / "run")
    held = {}
    for processes, distributed_as in ((4, "fsdp"), (4, "ddp")):
        cfg["train"]["distributed"] = distributed_as
        assert validate(cfg, processes=processes) == 0
        rows = {
            line.split("│")[1].strip(): line.split("│")[2].strip()
            for line in capsys.readouterr().out.splitlines()
            if line.count("│") == 3
        }
        assert rows["processes"].startswith(f"4, {distributed_as}: each process holds")
        held[distributed_as] = float(rows["each process holds"].split()[1])  # weights, MiB
    assert held["fsdp"] == pytest.approx(held["ddp"] / 4, abs=0.05)


def test_a_launch_into_an_output_dir_another_run_trains_in_is_refused_before_torchrun_starts(
    tiny_model_dir, triage_data, tmp_path
):
    import fcntl
    import os

    from tuneforge.training.loop import check_before_launch
    from tuneforge.training.run_folder import RUN_LOCK

    out = tmp_path / "run"
    out.mkdir()
    cfg = load_config(full_config(tiny_model_dir, triage_data, out))
    with open(out / RUN_LOCK, "w") as held:  # as a training run holds it
        held.write(f"{os.getpid()}\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(TuneforgeError) as refused:
            check_before_launch(cfg, 2)
    assert refused.value.code == "run_in_progress" and f"process {os.getpid()}" in refused.value.message
    check_before_launch(cfg, 2)  # the lock released with its holder: no refusal
