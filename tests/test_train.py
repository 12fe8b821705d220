"""The training loop on a tiny model: outputs, loss normalisation, resume, signals, failures."""

import errno
import json
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import SUBPROCESS_ENV, tiny_run_config

from tuneforge.config import load_config
from tuneforge.dry_run import validate
from tuneforge.errors import RunFailed, TuneforgeError
from tuneforge.models import load_model, load_tokenizer, resolve
from tuneforge.training import checkpoint, run_folder, train
from tuneforge.training.distributed import World
from tuneforge.training.loop import resume_command

ENV = SUBPROCESS_ENV


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def step_losses(run: Path) -> dict[int, float]:
    return {m["step"]: m["train_loss"] for m in metrics(run) if "train_loss" in m}


def test_lora_run_writes_a_complete_run_folder(tiny_model_dir, triage_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GenerationConfig

    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", eval_every=4, save_every=4, batch_size=4)
    result = train(cfg, progress=False)
    run = tmp_path / "run"
    last = result.steps
    assert result.status == "completed" and last >= 4
    for name in ("config.yaml", "data_report.json", "metrics.jsonl", "summary.json"):
        assert (run / name).is_file(), name
    rows = metrics(run)
    first = rows[0]
    for key in (
        "step",
        "epoch",
        "train_loss",
        "train_mean_token_accuracy",
        "lr",
        "grad_norm",
        "tokens",
        "tokens_per_s",
        "elapsed",
    ):
        assert key in first, key
    assert any("valid_loss" in r for r in rows)
    assert "full_valid_loss" in result.metrics
    assert rows[-1]["step"] == last and result.metrics["train_loss"] < rows[0]["train_loss"]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["scheduler"] == "cosine"  # defaults are written out
    kept = {p.name for p in (run / "checkpoints").iterdir()}
    assert kept == {f"step-{last}", f"step-{(last - 1) // 4 * 4}"}  # every 4 steps and the end, the last 2 kept
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuned = PeftModel.from_pretrained(base, run / "final")
    assert any("lora_A" in n for n, _ in tuned.named_parameters())
    gen = GenerationConfig.from_pretrained(run / "final")
    assert gen.eos_token_id == tuned.config.eos_token_id


def test_each_step_logs_the_learning_rate_it_trained_with(tiny_model_dir, triage_data, tmp_path):
    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=3, warmup=1, learning_rate=1e-3)
    train(cfg, progress=False)
    # One warmup step at half the rate, then cosine from the full rate over the two steps left.
    assert [m["lr"] for m in metrics(tmp_path / "run") if "lr" in m] == pytest.approx([5e-4, 1e-3, 5e-4])


def test_full_run_saves_a_plain_transformers_model(tiny_model_dir, triage_data, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=3)
    cfg["method"] = "full"
    train(cfg, progress=False)
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    diff = (tuned.model.layers[0].mlp.up_proj.weight - base.model.layers[0].mlp.up_proj.weight).abs().max()
    assert diff > 0


def test_a_full_run_in_a_process_of_its_own_imports_neither_peft_nor_bitsandbytes(
    tiny_model_dir, triage_data, tmp_path
):
    # Their imports take seconds of CPU in each process of a run (torch's compiler comes with bitsandbytes).
    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=1, save_every=1)
    cfg["method"] = "full"
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    script = f"""
import sys
from tuneforge.pipeline import train
assert train({str(path)!r}, progress=False).status == "completed"
print(sorted({{"peft", "bitsandbytes"}} & set(sys.modules)))
"""
    done = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == "[]"


def test_checkpoints_carry_the_generation_config_that_stops_at_the_end_of_turn(tiny_model_dir, triage_data, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    # A base whose generation config lists only its end-of-text, as many base models' do.
    base = Path(shutil.copytree(tiny_model_dir, tmp_path / "base"))
    tokenizer = AutoTokenizer.from_pretrained(base)
    GenerationConfig(eos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>")).save_pretrained(base)
    cfg = tiny_run_config(base, triage_data, tmp_path / "run", max_steps=1, save_every=1)
    cfg["method"] = "full"
    train(cfg, progress=False)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for folder in ("checkpoints/step-1", "final"):
        eos_ids = GenerationConfig.from_pretrained(tmp_path / "run" / folder).eos_token_id
        assert eos_ids[0] == end_of_turn and tokenizer.convert_tokens_to_ids("<|endoftext|>") in eos_ids, folder


def test_a_run_resumed_at_its_last_step_removes_the_final_model_a_killed_run_half_wrote(
    tiny_model_dir, triage_data, tmp_path
):
    # A process killed while it writes its final model leaves the temporary folder `atomic_dir` made.
    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=1, save_every=1)
    train(cfg, progress=False)
    half_written = tmp_path / "run" / ".tmp-final-k1lled_0"
    half_written.mkdir()
    (half_written / "adapter_model.safetensors").write_bytes(b"half")
    train(cfg, resume="latest", progress=False)
    assert not half_written.exists()
    assert (tmp_path / "run" / "final" / "adapter_config.json").is_file()


def test_a_record_of_several_steps_logs_their_mean_over_trained_tokens(
    tiny_model_dir, triage_data, tmp_path, monkeypatch
):
    """With train.log_every > 1 a record's train_ metrics are those of all the steps since the last one,
    per trained token: what one step over all their rows would report (not the last step's alone)."""
    from tuneforge.training import loop

    counts = []  # each step's trained tokens, read from the loop's own count as the steps run
    real_step = loop.train_step

    def counted_step(run, *args):
        before = run.state["interval"]["count"]
        result = real_step(run, *args)
        counts.append(run.state["interval"]["count"] - before)
        return result

    monkeypatch.setattr(loop, "train_step", counted_step)
    runs = {}
    for log_every in (1, 2):
        cfg = tiny_run_config(
            tiny_model_dir, triage_data, tmp_path / str(log_every), max_steps=4, log_every=log_every, save_every=3
        )
        cfg["lora"]["dropout"] = 0.0
        train(cfg, progress=False)
        runs[log_every] = {m["step"]: m for m in metrics(tmp_path / str(log_every)) if "lr" in m}
    # Resumed from step 3, between two records, the run logs step 4's record as the uninterrupted one did.
    train(cfg, resume=str(tmp_path / "2" / "checkpoints" / "step-3"), progress=False)
    resumed = {m["step"]: m for m in metrics(tmp_path / "2") if "lr" in m}
    assert resumed[4]["train_loss"] == runs[2][4]["train_loss"]
    each, pooled = runs[1], runs[2]
    assert sorted(pooled) == [2, 4]
    for last in (2, 4):
        steps, weights = (last - 1, last), counts[last - 2 : last]
        for name in ("train_loss", "train_mean_token_accuracy"):
            mean = sum(w * each[s][name] for s, w in zip(steps, weights)) / sum(weights)
            assert pooled[last][name] == pytest.approx(mean, rel=1e-5), (last, name)
        assert pooled[last]["train_loss"] != pytest.approx(each[last]["train_loss"], rel=1e-5)
        assert pooled[last]["grad_norm"] == pytest.approx(each[last]["grad_norm"], rel=1e-5)  # the last step's


def test_gradient_accumulation_gives_the_same_losses(tiny_model_dir, triage_data, tmp_path):
    """Loss is normalised by the trained tokens of the whole step, so splitting a step into
    micro-batches of different lengths changes nothing (a mean of micro-batch means would)."""
    common = dict(max_steps=4, learning_rate=1e-2)
    a = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "a", grad_accum=1, **common)
    b = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "b", grad_accum=4, **common)
    for cfg in (a, b):
        cfg["lora"]["dropout"] = 0.0
        cfg["data"]["packing"] = False
        train(cfg, progress=False)
    la, lb = step_losses(tmp_path / "a"), step_losses(tmp_path / "b")
    assert la.keys() == lb.keys()
    for step in la:
        assert la[step] == pytest.approx(lb[step], rel=1e-5, abs=1e-6)


def test_non_finite_loss_stops_with_the_step_and_cause(tiny_model_dir, triage_data, tmp_path):
    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", learning_rate=1e8, max_grad_norm=None)
    cfg["method"] = "full"
    with pytest.raises(RunFailed, match=r"step \d+: .* not finite.*learning rate"):
        train(cfg, progress=False)


def _write_config(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "tuneforge", *args], env=ENV, capture_output=True, text=True, **kw)


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_resume_after_sigkill_reproduces_the_uninterrupted_losses_bitwise(
    quantize, tiny_model_dir, triage_data, tmp_path
):
    # LoRA dropout and NEFTune draw random numbers every step: the resumed run must draw the same ones.
    base = tiny_run_config(
        tiny_model_dir, triage_data, tmp_path / "x", epochs=3, batch_size=2, save_every=5, neftune_alpha=5.0
    )
    base["train"]["keep_checkpoints"] = 3
    base["model"] = {"quantize": quantize}
    ref_cfg = _write_config({**base, "output_dir": str(tmp_path / "ref")}, tmp_path / "ref.yaml")
    assert _cli("train", str(ref_cfg)).returncode == 0
    reference = step_losses(tmp_path / "ref")
    assert len(reference) >= 30

    cut_cfg = _write_config({**base, "output_dir": str(tmp_path / "cut")}, tmp_path / "cut.yaml")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tuneforge", "train", str(cut_cfg)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpts = tmp_path / "cut" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not (ckpts / "step-15").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (ckpts / "step-15").exists(), "the run never reached step 15"

    resumed = _cli("train", str(cut_cfg), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    losses = step_losses(tmp_path / "cut")
    assert losses == reference  # bitwise: exact float equality at every step


def test_a_run_on_documents_split_into_windows_resumes_mid_epoch_exactly(tiny_model_dir, tmp_path):
    """data.truncation: split turns each long document into several examples: a run resumed between two
    steps of its epoch picks up on the same windows and logs the losses the uninterrupted run logged."""
    docs = tmp_path / "docs.jsonl"
    pages = [
        " ".join(f"Page {i}: the quick brown fox number {j} jumps over the lazy dog." for j in range(6))
        for i in range(12)
    ]
    docs.write_text("".join(json.dumps({"text": page}) + "\n" for page in pages))
    cfg = tiny_run_config(tiny_model_dir, {"train": docs, "validation": docs}, tmp_path / "run", batch_size=4)
    cfg["data"] |= {"validation": None, "max_length": 48, "truncation": "split"}
    cfg["train"] |= {"save_every": 2, "max_steps": 4}
    cfg["lora"]["dropout"] = 0.0
    train(cfg, progress=False)
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())["counts"]
    assert report["train_documents"] == 12 and report["train"] > 16  # 4 steps of 4 rows: within the first epoch
    whole = step_losses(tmp_path / "run")
    train(cfg, resume=str(tmp_path / "run" / "checkpoints" / "step-2"), progress=False)
    resumed = step_losses(tmp_path / "run")
    assert [resumed[s] for s in (3, 4)] == [whole[s] for s in (3, 4)]


def test_resume_refuses_a_changed_config_unless_forced(tiny_model_dir, triage_data, tmp_path):
    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=2)
    train(cfg, progress=False)
    changed = json.loads(json.dumps(cfg))
    changed["train"]["learning_rate"] = 5e-4
    # The refusal names what changed: the setting alone, from the run's own config.yaml.
    with pytest.raises(
        TuneforgeError,
        match=r"different config \(one that changes results\): train\.learning_rate: "
        r"\S+ -> 0\.0005 \(the original is \S+config\.yaml\)\. Resume with",
    ):
        train(changed, resume="latest", progress=False)
    train(changed, resume="latest", force=True, progress=False)
    # A longer run: what --force does to the schedule, and the way to train further on a schedule of its own.
    longer = {**changed, "train": {**changed["train"], "max_steps": 3}}
    with pytest.raises(TuneforgeError) as e:
        train(longer, resume="latest", progress=False)
    assert "train.max_steps: 2 -> 3" in e.value.message
    assert "--force continues its learning-rate schedule fitted to the new length" in e.value.message
    assert f"base_model: {tmp_path / 'run' / 'checkpoints' / 'step-2'}, another output_dir" in e.value.message
    # A checkpoint past the changed config's last step would be saved again as that step.
    changed["train"]["max_steps"] = 1
    with pytest.raises(TuneforgeError, match=r"step-2 is at step 2, past this run's last step \(1: train.max_steps"):
        train(changed, resume="latest", force=True, progress=False)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-2"]


def test_resume_from_an_edited_run_config_yaml_names_each_setting_changed_since_the_checkpoint(
    tiny_model_dir, triage_data, tmp_path
):
    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=2)
    train(cfg, progress=False)
    written = tmp_path / "run" / "config.yaml"
    edited = yaml.safe_load(written.read_text())
    edited["train"]["learning_rate"], edited["lora"]["r"] = 5e-4, 8
    written.write_text(yaml.safe_dump(edited))
    # config.yaml is the edited config itself: the checkpoint's own record of its settings is what it differs from.
    with pytest.raises(TuneforgeError) as e:
        train(str(written), resume="latest", progress=False)
    assert re.search(
        r"different config \(one that changes results\): lora\.r: 4 -> 8, train\.learning_rate: \S+ -> 0\.0005 "
        r"\(the checkpoint's value first, then this config's\)\. Resume with",
        e.value.message,
    )


def test_a_runs_own_config_resumed_from_another_folder_names_its_run_folder(
    tiny_model_dir, triage_data, tmp_path, monkeypatch
):
    # output_dir is relative to the working directory: the run's config.yaml holds it as it was given.
    (tmp_path / "start").mkdir()
    monkeypatch.chdir(tmp_path / "start")
    train(tiny_run_config(tiny_model_dir, triage_data, "runs/r", max_steps=1), progress=False)
    monkeypatch.chdir(tmp_path)
    own = tmp_path / "start" / "runs" / "r"
    with pytest.raises(TuneforgeError) as e:
        train(str(own / "config.yaml"), resume="latest", progress=False)
    assert e.value.message == (
        f"no checkpoint to resume from at runs/r/checkpoints (output_dir runs/r is read against the working "
        f"directory, {tmp_path}); the config sits in the run folder {own}, which has checkpoints: resume it "
        f"with the override output_dir={own}, or from the folder the run started in."
    )
    train(str(own / "config.yaml"), [f"output_dir={own}"], resume="latest", progress=False)


def test_a_forced_resume_trains_at_the_learning_rate_of_the_changed_config(tiny_model_dir, triage_data, tmp_path):
    cfg = tiny_run_config(
        tiny_model_dir, triage_data, tmp_path / "run", max_steps=4, save_every=2, scheduler="constant", warmup=0
    )
    train(cfg, progress=False)
    before = metrics(tmp_path / "run")
    changed = json.loads(json.dumps(cfg))
    changed["train"]["learning_rate"] = 5e-3
    train(changed, resume=str(tmp_path / "run" / "checkpoints" / "step-2"), force=True, progress=False)
    after = metrics(tmp_path / "run")
    assert [m["lr"] for m in after if "lr" in m] == pytest.approx([1e-3, 1e-3, 5e-3, 5e-3])
    # The step after the first resumed one starts from weights that step moved at the new rate.
    assert after[3]["train_loss"] != before[3]["train_loss"]
    # A change that regroups the optimizer's parameters cannot be resumed: said so, not "damaged".
    changed["lora"]["loraplus_lr_ratio"] = 4
    with pytest.raises(TuneforgeError, match="saved by an optimizer with 1 parameter group.*makes 2") as error:
        train(changed, resume=str(tmp_path / "run" / "checkpoints" / "step-2"), force=True, progress=False)
    assert "damaged" not in error.value.message


def test_a_loraplus_run_resumes_with_the_uninterrupted_losses(tiny_model_dir, triage_data, tmp_path):
    # LoRA+ puts the B matrices in a group of their own; LoRA's adapters have no vectors to group apart.
    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=4, save_every=2)
    cfg["lora"]["loraplus_lr_ratio"] = 4
    train(cfg, progress=False)
    reference = step_losses(tmp_path / "run")
    train(cfg, resume=str(tmp_path / "run" / "checkpoints" / "step-2"), progress=False)
    assert step_losses(tmp_path / "run") == reference


@pytest.mark.parametrize("damaged", [False, True])
def test_a_run_resumed_from_an_earlier_checkpoint_drops_the_later_ones_it_replaces(
    damaged, tiny_model_dir, triage_data, tmp_path, capsys
):
    run = tmp_path / "run"
    cfg = tiny_run_config(tiny_model_dir, triage_data, run, max_steps=4, save_every=2)
    train(cfg, progress=False)
    if damaged:  # a resume of the latest refuses step-4 and names step-2 to resume from instead
        (run / "checkpoints" / "step-4" / "trainer_state.json").unlink()
    shorter = json.loads(json.dumps(cfg))
    shorter["train"].update(max_steps=3, learning_rate=5e-3)
    train(shorter, resume=str(run / "checkpoints" / "step-2"), force=True, progress=False)
    # step-4 continued the run this one replaced: kept, it would be `latest` and outrank step-3 in pruning, or,
    # damaged, be refused by every later resume of the latest.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-3"]
    capsys.readouterr()
    assert train(cfg, resume="latest", force=True, progress=False).steps == 4
    assert f"resumed from {run / 'checkpoints' / 'step-3'} at step 3" in capsys.readouterr().out


def test_a_forced_resume_from_a_checkpoint_of_the_other_kind_full_or_lora_says_which_it_holds(
    tiny_model_dir, triage_data, tmp_path
):
    runs = {}
    for method in ("full", "lora"):
        runs[method] = tiny_run_config(tiny_model_dir, triage_data, tmp_path / method, max_steps=2, save_every=2)
        runs[method]["method"] = method
        train(runs[method], progress=False)
    for method, other, holds in (
        ("lora", "full", "holds a full model's weights"),
        ("full", "lora", "holds a LoRA adapter"),
    ):
        cfg = {**runs[method], "output_dir": str(tmp_path / f"{method}-from-{other}")}
        with pytest.raises(RunFailed) as e:
            train(cfg, resume=str(tmp_path / other / "checkpoints" / "step-2"), force=True, progress=False)
        assert f"{tmp_path / other / 'checkpoints' / 'step-2'} {holds}" in e.value.message, e.value.message


def test_resume_refuses_training_data_that_changed_unless_forced(tiny_model_dir, triage_data, tmp_path):
    data = tmp_path / "train.jsonl"
    shutil.copy(triage_data["train"], data)
    cfg = tiny_run_config(tiny_model_dir, {**triage_data, "train": data}, tmp_path / "run", max_steps=2)
    train(cfg, progress=False)
    lines = data.read_text().splitlines(keepends=True)
    data.write_text("".join(lines[: len(lines) // 2]))  # the same path and config, other rows
    with pytest.raises(TuneforgeError, match=r"the data changed since .*step-2 was written") as e:
        train(cfg, resume="latest", progress=False)
    assert e.value.code == "data_changed" and "--force" in e.value.message
    assert train(cfg, resume="latest", force=True, progress=False).steps == 2


def test_resume_of_a_checkpoint_from_a_version_that_prepared_data_otherwise_says_so(
    tiny_model_dir, triage_data, tmp_path
):
    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=2)
    train(cfg, progress=False)
    # A checkpoint as an earlier tuneforge wrote it: no data format, and a key made its own way from the same files.
    state_file = tmp_path / "run" / "checkpoints" / "step-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state.pop("data_format", None)
    state_file.write_text(json.dumps({**state, "data_key": "1a5dc907c727a6138ecd1161e7972ff9"}))
    with pytest.raises(TuneforgeError, match=r"step-2 was written by another version of tuneforge") as e:
        train(cfg, resume="latest", progress=False)
    assert e.value.code == "data_changed" and "--force" in e.value.message
    assert "the data changed" not in e.value.message
    assert train(cfg, resume="latest", force=True, progress=False).steps == 2


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:40])


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda c: _truncate(c / "adapter_model.safetensors"), "adapter_model.safetensors cannot be read"),
        (lambda c: (c / "scheduler.pt").unlink(), "files are missing: scheduler.pt"),
        (lambda c: _truncate(c / "rng-0.pt"), "rng-0.pt cannot be read"),
        (
            lambda c: _truncate(c / "optimizer" / "__0_0.distcp"),
            "files are cut short: optimizer/__0_0.distcp (40 of ",
        ),
        (lambda c: _truncate(c / "optimizer" / ".metadata"), "optimizer/.metadata cannot be read"),
        (lambda c: _truncate(c / "trainer_state.json"), "trainer_state.json cannot be read"),
    ],
)
def test_a_damaged_checkpoint_is_refused_naming_its_file_and_the_one_before_it(
    damage, named, tiny_model_dir, triage_data, tmp_path
):
    run = tmp_path / "run"
    cfg = tiny_run_config(tiny_model_dir, triage_data, run, max_steps=4, save_every=2)
    train(cfg, progress=False)
    damage(run / "checkpoints" / "step-4")
    with pytest.raises(TuneforgeError) as e:
        train(cfg, resume="latest", progress=False)
    assert e.value.code == "checkpoint_damaged"
    assert f"step-4: {named}" in e.value.message
    assert f"--resume {run / 'checkpoints' / 'step-2'}" in e.value.message and "--overwrite" in e.value.message
    assert train(cfg, resume=str(run / "checkpoints" / "step-2"), progress=False).steps == 4


def test_resume_of_the_latest_refuses_a_newer_step_folder_it_cannot_read_instead_of_passing_over_it(
    tiny_model_dir, triage_data, tmp_path
):
    run = tmp_path / "run"
    cfg = tiny_run_config(tiny_model_dir, triage_data, run, max_steps=4, save_every=2)
    train(cfg, progress=False)
    newest = run / "checkpoints" / "step-4"
    (newest / "trainer_state.json").unlink()
    with pytest.raises(TuneforgeError) as e:
        train(cfg, resume="latest", progress=False)
    assert e.value.code == "checkpoint_damaged" and f"{newest}: trainer_state.json is missing" in e.value.message
    assert f"--resume {run / 'checkpoints' / 'step-2'}" in e.value.message
    shutil.rmtree(newest)
    newest.write_text("")
    with pytest.raises(TuneforgeError, match="step-4: it is a file, not a checkpoint folder"):
        train(cfg, resume="latest", progress=False)
    newest.unlink()
    assert train(cfg, resume="latest", progress=False).steps == 4


@pytest.mark.parametrize(
    "edit, named",
    [
        (
            lambda state: state.update(step="four"),
            """trainer_state.json's field 'step' is "four", not a whole number""",
        ),
        (lambda state: state.pop("config_hash"), "trainer_state.json has no field 'config_hash'"),
        (lambda state: state.update(elapsed=None), "trainer_state.json's field 'elapsed' is null, not a number"),
        (lambda state: state.clear(), "trainer_state.json has no field 'step'"),
        (lambda state: state.update(step=1), "trainer_state.json is step 1's, not step-2's"),
    ],
)
def test_a_loop_state_without_a_field_or_with_one_of_another_type_is_refused_naming_it(
    edit, named, tiny_model_dir, triage_data, tmp_path
):
    run = tmp_path / "run"
    cfg = tiny_run_config(tiny_model_dir, triage_data, run, max_steps=2, save_every=1)
    train(cfg, progress=False)
    saved = run / "checkpoints" / "step-2" / "trainer_state.json"
    state = json.loads(saved.read_text())
    edit(state)
    saved.write_text(json.dumps(state))
    with pytest.raises(TuneforgeError) as e:
        train(cfg, resume="latest", progress=False)
    assert e.value.code == "checkpoint_damaged" and f"step-2: {named}" in e.value.message
    assert f"--resume {run / 'checkpoints' / 'step-1'}" in e.value.message
    saved.write_text("[2]")
    with pytest.raises(TuneforgeError, match="trainer_state.json holds a JSON list, not the object of the loop state"):
        train(cfg, resume="latest", progress=False)


def test_a_checkpoint_the_disk_refuses_is_an_error_naming_it_and_leaves_nothing_half_written(
    tiny_model_dir, triage_data, tmp_path
):
    import resource

    run = tmp_path / "run"
    path = _write_config(
        tiny_run_config(tiny_model_dir, triage_data, run, max_steps=2, save_every=1), tmp_path / "c.yaml"
    )

    def small_file_limit():  # the optimizer state outgrows it, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))

    failed = _cli("train", str(path), preexec_fn=small_file_limit)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert f"error: {run / 'checkpoints' / 'step-1'}: File too large. A file grew past" in " ".join(
        failed.stderr.split()
    )
    assert list((run / "checkpoints").iterdir()) == []


def test_a_new_run_over_an_earlier_one_is_refused_unless_asked_to_overwrite_it(
    tiny_model_dir, triage_data, tmp_path, capsys
):
    run = tmp_path / "run"
    cfg = tiny_run_config(tiny_model_dir, triage_data, run, max_steps=5, save_every=3)
    train(cfg, progress=False)
    earlier = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert earlier == ["step-3", "step-5"]
    final_weights = (run / "final" / "adapter_model.safetensors").read_bytes()
    shorter = json.loads(json.dumps(cfg))
    shorter["train"].update(max_steps=2, learning_rate=1e-3)
    with pytest.raises(TuneforgeError, match=r"earlier run \(checkpoints step-3, step-5 and a final model\)") as e:
        train(shorter, progress=False)
    assert e.value.code == "run_exists" and "--overwrite" in e.value.message and "--resume" in e.value.message
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == earlier  # nothing touched
    assert (run / "final" / "adapter_model.safetensors").read_bytes() == final_weights
    capsys.readouterr()
    assert validate(shorter) == 0  # the dry run says so too
    said = " ".join(capsys.readouterr().out.split())
    assert "holds an earlier run (checkpoints step-3, step-5 and a final model): train refuses" in said
    assert "ok, but: start it with --resume or --overwrite" in said and "nothing found that would stop" not in said
    assert int(re.search(r"warnings │ (\d+) │", said)[1]) == said.count("warning:")  # the table counts them all
    # Overwritten: only the new run's checkpoints, so --resume continues the new run, not the earlier one.
    assert train(shorter, overwrite=True, progress=False).steps == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"]
    assert (run / "final" / "adapter_model.safetensors").read_bytes() != final_weights
    shorter["train"]["max_steps"] = 3
    # Continue it and delete it both: refused at once, naming the two, rather than one of them silently done.
    with pytest.raises(TuneforgeError, match="--resume and --overwrite") as both:
        train(shorter, resume="latest", force=True, overwrite=True, progress=False)
    assert both.value.code == "bad_option"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"]
    # The run folder named instead of a checkpoint: the answer lists the checkpoints to pick from.
    with pytest.raises(TuneforgeError, match="is not a checkpoint") as not_one:
        train(shorter, resume=str(run), force=True, progress=False)
    assert (
        str(run / "checkpoints" / "step-2") in not_one.value.message and "without --resume" not in not_one.value.message
    )
    assert train(shorter, resume="latest", force=True, progress=False).steps == 3


def test_overwrite_keeps_the_earlier_run_whole_until_the_new_one_passes_its_checks(
    tiny_model_dir, triage_data, tmp_path
):
    run = tmp_path / "run"
    cfg = tiny_run_config(tiny_model_dir, triage_data, run, max_steps=2)
    train(cfg, progress=False)

    # The run's files, not its lock (.train.lock: each run that starts there writes its own process and token).
    def files() -> dict:
        return {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".train.lock"}

    earlier = files()
    broken = tmp_path / "broken.jsonl"
    broken.write_text("not json\n")
    refused = json.loads(json.dumps(cfg))
    refused["data"]["train"] = str(broken)
    refused["train"]["learning_rate"] = 1e-4
    with pytest.raises(TuneforgeError, match="invalid_json"):
        train(refused, overwrite=True, progress=False)
    # The refused run deleted nothing and wrote nothing: the earlier run's files are all there, as they were.
    assert files() == earlier
    # A run that starts over leaves nothing of the earlier one: no summary of a run that is not there.
    for name in ("eval/report.json", "tensorboard/events.out.tfevents.1"):
        (run / name).parent.mkdir()
        (run / name).write_text("{}")
    longer = json.loads(json.dumps(cfg))
    longer["train"].update(max_steps=3, save_every=0)
    result = train(longer, overwrite=True, progress=False)
    assert not (run / "eval").exists() and not (run / "tensorboard" / "events.out.tfevents.1").exists()
    assert json.loads((run / "summary.json").read_text())["steps"] == 3 == result.steps
    assert [m["step"] for m in metrics(run) if "train_loss" in m] == [1, 2, 3]


def test_a_second_run_into_an_output_dir_in_use_is_refused_and_a_killed_run_lets_it_go(
    tiny_model_dir, triage_data, tmp_path
):
    run = tmp_path / "run"
    cfg = tiny_run_config(tiny_model_dir, triage_data, run, epochs=50, batch_size=4, save_every=1)
    first = subprocess.Popen(
        [sys.executable, "-m", "tuneforge", "train", str(_write_config(cfg, tmp_path / "cfg.yaml"))],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (run / "checkpoints" / "step-2").exists():
            time.sleep(0.05)
        assert (run / "checkpoints" / "step-2").exists(), "the first run never reached step 2"
        # Both at once would write the same checkpoints (each deleting the other's half-written one) and
        # metrics.jsonl; with --overwrite the second would delete the first's checkpoints under it.
        for overwrite in (False, True):
            with pytest.raises(
                TuneforgeError, match=rf"{run} is in use by another training run \(process {first.pid}\)"
            ):
                train({**cfg, "train": {**cfg["train"], "max_steps": 2}}, overwrite=overwrite, progress=False)
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The lock went with the killed process: the run continues at once.
    reached = max(int(folder.name.split("-")[1]) for folder in (run / "checkpoints").glob("step-*"))
    longer = {**cfg, "train": {**cfg["train"], "max_steps": reached + 1}}
    assert train(longer, resume="latest", force=True, progress=False).steps == reached + 1


def test_a_full_disk_at_the_run_lock_or_a_metrics_line_names_the_file_and_leaves_no_folder(
    tmp_path, file_size_limit, tiny_model_dir, triage_data
):
    from tuneforge.config import load_config
    from tuneforge.training.distributed import World
    from tuneforge.training.loop import MetricsLog
    from tuneforge.training.run_folder import sole_run_in

    run = tmp_path / "run"
    with file_size_limit(8), pytest.raises(OSError) as refused, sole_run_in(run, World()):
        pass
    assert (refused.value.errno, refused.value.filename) == (errno.EFBIG, str(run / ".train.lock"))
    assert not run.exists()  # as a run refused before it writes anything leaves it
    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path)
    cfg["train"]["report_to"] = []
    log = MetricsLog(load_config(cfg), None, enabled=True)
    with file_size_limit(8), pytest.raises(OSError) as refused:
        log.write({"step": 1, "train_loss": 1.0})
    assert (refused.value.errno, refused.value.filename) == (errno.EFBIG, str(tmp_path / "metrics.jsonl"))


def test_a_run_refused_at_a_new_folder_leaves_the_lock_of_the_run_that_took_it(tmp_path, monkeypatch):
    import fcntl
    import types

    from tuneforge.training.distributed import World

    run, taken = tmp_path / "run", []

    def flock(fd, operation):
        # Another run takes the lock of the folder this one found missing, just before this one tries it.
        if not taken:
            taken.append(open(run / run_folder.RUN_LOCK, "a+"))
            fcntl.flock(taken[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
            taken[0].write("4242\ntoken\n")
            taken[0].flush()
        fcntl.flock(fd, operation)

    monkeypatch.setattr(run_folder, "fcntl", types.SimpleNamespace(**{**vars(fcntl), "flock": flock}))
    try:
        with pytest.raises(TuneforgeError, match=r"in use by another training run \(process 4242\)"):
            with run_folder.sole_run_in(run, World()):
                pass
        # The refused run removed neither the lock nor the folder of the run that holds it.
        assert (run / run_folder.RUN_LOCK).read_text() == "4242\ntoken\n"
    finally:
        taken[0].close()


def test_a_one_process_run_saves_and_resumes_without_distributed_warnings(tiny_model_dir, triage_data, tmp_path):
    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg, progress=False)
        cfg["train"]["max_steps"] = 3
        assert train(cfg, resume="latest", force=True, progress=False).steps == 3
        cfg["train"]["max_steps"] = 4
        assert train(cfg, resume=True, force=True, progress=False).steps == 4  # as a bare --resume
    assert [str(w.message) for w in caught if "torch.distributed" in str(w.message)] == []


def test_resuming_a_finished_run_keeps_its_last_steps_metrics_in_the_result_and_summary(
    tiny_model_dir, triage_data, tmp_path
):
    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=2)
    finished = train(cfg, progress=False)
    logged = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert '"full_valid_loss"' in logged
    # As after a crash between the last checkpoint and the final model: resuming redoes the final stage.
    again = train(cfg, resume=True, progress=False)
    assert again.steps == 2 and again.metrics == finished.metrics
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == logged  # the full validation's record once
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["metrics"] == again.metrics


def test_a_resume_drops_a_metrics_line_cut_short_and_refuses_one_damaged_inside(tiny_model_dir, triage_data, tmp_path):
    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=3, save_every=2)
    train(cfg, progress=False)
    log = tmp_path / "run" / "metrics.jsonl"
    logged = log.read_text()
    # As a run stopped while writing step 3's record leaves it (a power cut, a full disk).
    kept = [line for line in logged.splitlines(keepends=True) if json.loads(line)["step"] <= 2]
    log.write_text("".join(kept) + '{"step": 3, "epoch": 0.2, "train_lo')
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-3")
    train(cfg, resume="latest", progress=False)

    def untimed(text):
        return [
            {k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "elapsed")}
            for line in text.splitlines()
        ]

    assert untimed(log.read_text()) == untimed(logged)
    log.write_text("".join(kept[:1]) + '{"step": 2, "epo\n' + "".join(kept[1:]))
    with pytest.raises(TuneforgeError, match=rf"{re.escape(str(log))}:2: not a JSON record"):
        train(cfg, resume="latest", progress=False)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"step": 2, "epo', "Unterminated string starting at: character 13"),
        ("7", "an object with an integer step"),
        ('{"step": "2"}', "an object with an integer step"),
    ],
)
def test_a_metrics_line_damaged_inside_is_refused_saying_what_is_wrong_with_it(line, problem, tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text(f'{{"step": 1}}\n{line}\n{{"step": 3}}\n')
    with pytest.raises(TuneforgeError, match=rf"{re.escape(str(log))}:2: not a JSON record \({re.escape(problem)}"):
        run_folder.restart_step_log(log, 3)
    assert log.read_text() == f'{{"step": 1}}\n{line}\n{{"step": 3}}\n'


def test_a_run_leaves_the_callers_random_generators_as_they_were(tiny_model_dir, triage_data, tmp_path):
    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=2)

    def draws():
        return random.random(), np.random.rand(), torch.rand(1).item()

    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    expected = draws()
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    train(cfg, progress=False)  # seeds them with train.seed and draws dropout masks and batches from them
    assert draws() == expected


def test_the_python_api_without_progress_draws_no_library_bar_and_leaves_the_callers_setting(
    tiny_model_dir, triage_data, tmp_path, capfd
):
    from transformers.utils import logging as transformers_logging

    import tuneforge

    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=1)
    suites = transformers_logging.is_progress_bar_enabled()
    transformers_logging.enable_progress_bar()  # as in a notebook, where the CLI's environment is not set
    try:
        tuneforge.train(cfg, progress=False)
        assert "Loading weights" not in capfd.readouterr().err
        assert transformers_logging.is_progress_bar_enabled()
    finally:
        if not suites:
            transformers_logging.disable_progress_bar()


def test_a_run_started_from_another_thread_trains_and_leaves_the_signal_handlers_alone(
    tiny_model_dir, triage_data, tmp_path
):
    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=2)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with ThreadPoolExecutor(1) as worker:  # as a notebook's or a service's worker thread runs it
        result = worker.submit(train, cfg, progress=False).result()
    assert result.status == "completed" and result.steps == 2 and (result.final_dir / "adapter_config.json").is_file()
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_model_dir, triage_data, tmp_path):
    run = tmp_path / "my runs" / "run"  # the printed command quotes a path with a space
    cfg = tiny_run_config(tiny_model_dir, triage_data, run, epochs=20, batch_size=4)
    path = _write_config(cfg, tmp_path / "cfg.yaml")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tuneforge", "train", str(path), "train.learning_rate=0.003"],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        if (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count("\n") >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, errs = proc.communicate(timeout=60)
    assert proc.returncode == 130, errs
    saved = list((run / "checkpoints").glob("step-*"))
    assert len(saved) == 1
    # The command it prints resumes with the run's own config, which any command-line overrides are in.
    printed = re.search(r"continue with `([^`]+)`", out + errs)
    assert printed, out + errs
    command = shlex.split(printed[1])
    assert command[:2] == ["tuneforge", "train"] and command[3:] == ["--resume"]
    started_with = load_config(path, ["train.learning_rate=0.003"])
    assert load_config(command[2]).results_hash() == started_with.results_hash()
    last_logged = metrics(run)[-1]["step"]
    assert saved[0].name == f"step-{last_logged}"


def test_a_finished_run_continued_past_its_end_and_interrupted_keeps_no_summary_of_the_earlier_end(
    tiny_model_dir, triage_data, tmp_path, monkeypatch
):
    """A finished run resumed with a raised train.max_steps trains past its final model: its summary.json says
    how the earlier run ended, so it goes with the first step; stopped there, the folder reads as an interrupted
    run, and final/ stays the earlier end's model (nothing a user may serve is deleted)."""
    from tuneforge.training import loop

    run = tmp_path / "run"
    cfg = tiny_run_config(tiny_model_dir, triage_data, run, max_steps=2)
    train(cfg, progress=False)
    assert (run / "summary.json").is_file() and (run / "final").is_dir()
    stepped = loop.train_step

    def stopped_at_step_3(run_, step, stop, lengths):
        if step == 2:
            stop.signal = "SIGINT"
        return stepped(run_, step, stop, lengths)

    monkeypatch.setattr(loop, "train_step", stopped_at_step_3)
    longer = {**cfg, "train": {**cfg["train"], "max_steps": 4}}
    result = train(longer, resume="latest", force=True, progress=False)
    assert result.status == "interrupted" and result.steps == 3
    assert not (run / "summary.json").exists() and (run / "final").is_dir()
    assert [p.name for p in checkpoint.step_folders(run / "checkpoints")][-1] == "step-3"
    # Resumed again, it trains to its new end and writes the final model and summary of step 4.
    monkeypatch.setattr(loop, "train_step", stepped)
    train(longer, resume="latest", force=True, progress=False)
    assert json.loads((run / "summary.json").read_text())["steps"] == 4 and (run / "final").is_dir()


def test_the_resume_command_a_stop_prints_starts_the_processes_and_machines_the_run_had(tmp_path):
    """A run under `--nproc 2` (or over machines) stopped by a signal says to resume on as many; the
    bare `--resume` would continue it on one process."""
    run = tmp_path / "run"
    alone = resume_command(run, World())
    assert alone == f"`tuneforge train {run / 'config.yaml'} --resume`"
    two = re.search(r"`([^`]+)`", resume_command(run, World(rank=0, size=2, local_size=2)))[1]
    assert shlex.split(two)[3:] == ["--resume", "--nproc", "2"]
    machines = resume_command(run, World(rank=0, size=4, local_size=2))
    assert shlex.split(re.search(r"`([^`]+)`", machines)[1])[3:] == ["--resume", "--nproc", "2", "--nnodes", "2"]
    assert "on every machine, each with its own --node-rank" in machines


def test_two_processes_match_one_process_with_the_same_global_batch(tiny_model_dir, triage_data, tmp_path):
    common = dict(max_steps=4, learning_rate=1e-2, batch_size=8)
    one = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "one", grad_accum=2, **common)
    two = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "two", grad_accum=1, **common)
    for cfg in (one, two):
        cfg["lora"]["dropout"] = 0.0
    train(one, progress=False)
    res = _cli("train", str(_write_config(two, tmp_path / "two.yaml")), "--nproc", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    l1, l2 = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert l1.keys() == l2.keys() == {1, 2, 3, 4}
    for step in l1:
        assert l2[step] == pytest.approx(l1[step], abs=1e-4)


def test_kl_to_base_keeps_the_tuned_model_closer_to_the_base(tiny_model_dir, triage_data, tmp_path):
    kls = {}
    for weight in (1e-9, 50.0):
        cfg = tiny_run_config(
            tiny_model_dir, triage_data, tmp_path / f"kl{weight}", max_steps=6, learning_rate=2e-2, kl_to_base=weight
        )
        train(cfg, progress=False)
        rows = metrics(tmp_path / f"kl{weight}")
        assert rows[0]["kl_to_base"] == pytest.approx(0, abs=1e-6)  # LoRA starts as the base (B = 0)
        kls[weight] = rows[-2]["kl_to_base"]
    assert 0 < kls[50.0] < kls[1e-9] / 2


def test_kl_to_base_with_full_fine_tuning_uses_a_frozen_copy(tiny_model_dir, triage_data, tmp_path):
    cfg = tiny_run_config(
        tiny_model_dir, triage_data, tmp_path / "run", max_steps=3, learning_rate=1e-3, kl_to_base=1.0
    )
    cfg["method"] = "full"
    train(cfg, progress=False)
    kl = [r["kl_to_base"] for r in metrics(tmp_path / "run") if "kl_to_base" in r]
    assert kl[0] == pytest.approx(0, abs=1e-6) and kl[-1] > 0


def test_lora_from_layer_adapts_only_the_upper_decoder_layers(tiny_model_dir, triage_data, tmp_path):
    from tuneforge.config import load_config
    from tuneforge.methods import prepare_model

    cfg = load_config(tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=1))
    cfg.lora.from_layer = 0.5
    model = prepare_model(load_model(resolve(str(tiny_model_dir)), dtype=torch.float32), cfg)
    adapted = {name.split(".layers.")[1].split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    depth = model.config.num_hidden_layers
    assert adapted == {str(i) for i in range(depth // 2, depth)}
    per_layer = {
        name.split(".layers.")[1].split(".", 1)[1].split(".lora_")[0]
        for name, p in model.named_parameters()
        if p.requires_grad and ".lora_A." in name
    }
    assert per_layer >= {"self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"}  # every linear of those layers


# Qwen3-MoE's mlp_only_layers: decoder layers with a dense MLP (gate_proj, up_proj, down_proj linear layers).
MOE_MODELS = [
    pytest.param("MixtralConfig", {}, id="Mixtral"),
    pytest.param("Qwen3MoeConfig", {}, id="Qwen3-MoE"),
    pytest.param("Qwen2MoeConfig", {}, id="Qwen2-MoE"),
    pytest.param("Qwen3MoeConfig", {"mlp_only_layers": [0]}, id="Qwen3-MoE-dense-layer-0"),
    pytest.param("Qwen3MoeConfig", {"mlp_only_layers": [1]}, id="Qwen3-MoE-dense-layer-1"),
]


@pytest.mark.parametrize(("architecture", "dense"), MOE_MODELS)
def test_lora_from_layer_adapts_what_all_linear_adapts_in_the_upper_layers_experts_included(
    architecture, dense, tiny_model_dir, triage_data, tmp_path
):
    """Under all-linear PEFT adapts Mixtral's and Qwen3-MoE's fused expert weights and routers as parameters
    (Qwen2-MoE's not): from_layer keeps them, in the upper layers, with the ranks all-linear gives them, and leaves
    the lower layers whole, dense or not."""
    from tiny import tiny_moe

    from tuneforge.methods import prepare_model

    trained = {}
    for from_layer in (0.0, 0.5):
        cfg = load_config(tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run"))
        cfg.lora.dropout, cfg.lora.from_layer = 0.0, from_layer  # PEFT's adapters on fused experts take no dropout
        model = prepare_model(tiny_moe(architecture=architecture, experts=4, **dense), cfg)
        trained[from_layer] = {name: p.shape for name, p in model.named_parameters() if p.requires_grad}
    assert any(".mlp.experts." in name for name in trained[0.0]) == (architecture != "Qwen2MoeConfig")
    upper = {name: shape for name, shape in trained[0.0].items() if ".layers.0." not in name}
    assert upper and trained[0.5] == upper


@pytest.mark.parametrize("architecture", ["MixtralConfig", "Qwen3MoeConfig"])
def test_lora_target_modules_naming_fused_expert_weights_adapts_them_as_all_linear_does(
    architecture, tiny_model_dir, triage_data, tmp_path
):
    """transformers 5 holds each expert projection of a layer in one 3-D parameter (mlp.experts.gate_up_proj), no
    module: naming it adapts it as all-linear does, with all-linear's rank, in the layers from_layer keeps."""
    from tiny import tiny_moe

    from tuneforge.methods import prepare_model

    def trained(targets, from_layer=0.0):
        cfg = load_config(tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run"))
        cfg.lora.dropout, cfg.lora.target_modules, cfg.lora.from_layer = 0.0, targets, from_layer
        model = prepare_model(tiny_moe(architecture=architecture, experts=4), cfg)
        return {name: p.shape for name, p in model.named_parameters() if p.requires_grad}

    # PEFT names an adapter on a parameter by its module (mlp.experts.lora_A, mlp.experts.base_layer.lora_A).
    experts = {name: shape for name, shape in trained("all-linear").items() if ".mlp." in name}
    assert len(experts) == 12  # A and B of down_proj, gate_up_proj and the router (mlp.gate) in both layers
    listed = trained(["q_proj", "gate", "down_proj", "gate_up_proj"])
    assert {name: shape for name, shape in listed.items() if ".mlp." in name} == experts
    assert {name for name in listed if ".mlp." not in name} == {
        f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{ab}.default.weight" for i in (0, 1) for ab in "AB"
    }
    upper = trained(["q_proj", "gate", "down_proj", "gate_up_proj"], from_layer=0.5)
    assert upper == {name: shape for name, shape in listed.items() if ".layers.0." not in name}


@pytest.mark.parametrize("from_layer", [0.0, 0.5])
@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "down_proj"]])
@pytest.mark.parametrize("dense", [[0], [1]])
def test_lora_adapts_the_linear_layers_of_a_mixture_of_experts_models_dense_layers(
    dense, targets, from_layer, tiny_model_dir, triage_data, tmp_path
):
    """Qwen3-MoE's dense layers (mlp_only_layers) hold their MLP in linear layers named as the fused expert weights
    (gate_proj, up_proj, down_proj) that PEFT maps those names to: all-linear, or a list naming them, adapts them
    too, in the layers from_layer keeps."""
    from tiny import tiny_moe

    from tuneforge.methods import prepare_model

    cfg = load_config(tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run"))
    cfg.lora.dropout, cfg.lora.target_modules, cfg.lora.from_layer = 0.0, targets, from_layer
    base = tiny_moe(architecture="Qwen3MoeConfig", experts=4, mlp_only_layers=dense)
    linears = {name for name, m in base.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name}
    model = prepare_model(base, cfg)
    trained = {
        name.removeprefix("base_model.model.").split(".lora_")[0]
        for name, p in model.named_parameters()
        if p.requires_grad
    }
    assert trained & linears == {
        name
        for name in linears
        if int(name.split(".layers.")[1].split(".")[0]) >= from_layer * 2
        and (targets == "all-linear" or name.rsplit(".", 1)[-1] in targets)
    }


def adapted_weights(model) -> set[str]:
    """The base weights of `model` that carry an adapter, by their names on the base (model.layers.1.mlp.gate.weight,
    model.layers.1.mlp.experts.gate_up_proj)."""
    from peft.tuners.lora import LoraLayer, ParamWrapper

    # PEFT nests the wrappers of one module's parameters (mlp.experts, mlp.experts.base_layer).
    return {
        f"{name.removeprefix('base_model.model.').replace('.base_layer', '')}."
        + (m.parameter_name if isinstance(m, ParamWrapper) else "weight")
        for name, m in model.named_modules()
        if isinstance(m, LoraLayer)
    }


@pytest.mark.parametrize("from_layer", [0.0, 0.5])
@pytest.mark.parametrize(
    "targets",
    [
        ["q_proj", "gate_proj", "up_proj"],
        ["q_proj", "gate_proj"],
        ["q_proj", "mlp.down_proj"],
        ["q_proj", "down_proj", "gate"],
        ["q_proj", "gate_up_proj"],
    ],
)
@pytest.mark.parametrize(("architecture", "dense"), MOE_MODELS)
def test_lora_target_modules_list_adapts_what_the_model_holds_under_each_name_from_from_layer_up(
    architecture, dense, targets, from_layer, tiny_model_dir, triage_data, tmp_path
):
    """A name adapts what the decoder's layers that from_layer keeps hold under it, whole or by its last parts: linear
    layers (a dense layer's gate_proj), the routed experts' fused weights (gate_up_proj) and the router (gate) where
    PEFT adapts those (not Qwen2-MoE's), and nothing below from_layer; a name that holds nothing there is refused."""
    from tiny import tiny_moe

    from tuneforge.errors import ConfigError
    from tuneforge.methods import prepare_model

    cfg = load_config(tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run"))
    cfg.lora.dropout, cfg.lora.target_modules, cfg.lora.from_layer = 0.0, targets, from_layer
    base = tiny_moe(architecture=architecture, experts=4, **dense)
    held = {}
    for name, p in base.named_parameters():
        owner, key = name.rsplit(".", 1)
        named = owner if key == "weight" else name  # a layer's weight by its module, a fused expert weight by itself
        experts_or_router = p.ndim == 3 or owner.endswith(".mlp.gate")
        if int(name.split(".layers.")[1].split(".")[0]) >= from_layer * 2 if ".layers." in name else False:
            if not (architecture == "Qwen2MoeConfig" and experts_or_router):
                for wanted in targets:
                    if named == wanted or named.endswith(f".{wanted}"):
                        held.setdefault(wanted, set()).add(name)
    if set(held) != set(targets):
        with pytest.raises(ConfigError):
            prepare_model(base, cfg)
        return
    assert adapted_weights(prepare_model(base, cfg)) == set().union(*held.values())


def test_lora_target_modules_naming_what_only_the_layers_below_from_layer_hold_are_refused_saying_so(
    tiny_model_dir, triage_data, tmp_path
):
    """Qwen3-MoE's dense layer 0 alone holds an mlp.down_proj linear layer (the others' experts mlp.experts)."""
    from tiny import tiny_moe

    from tuneforge.errors import ConfigError
    from tuneforge.methods import prepare_model

    cfg = load_config(tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run"))
    cfg.lora.dropout, cfg.lora.target_modules, cfg.lora.from_layer = 0.0, ["q_proj", "mlp.down_proj"], 0.5
    with pytest.raises(ConfigError) as e:
        prepare_model(tiny_moe(architecture="Qwen3MoeConfig", experts=4, mlp_only_layers=[0]), cfg)
    assert e.value.message == (
        "lora.target_modules: names mlp.down_proj, which only the layers below layer 1 hold "
        "(model.layers.0.mlp.down_proj, ...), and lora.from_layer adapts those from layer 1 up alone: PEFT would "
        "leave it untrained. Leave mlp.down_proj out, or lora.from_layer out to adapt it."
    )


@pytest.mark.parametrize("architecture", ["MixtralConfig", "Qwen3MoeConfig"])
def test_lora_target_modules_naming_the_experts_gate_and_up_projections_apart_are_refused_naming_the_fused_weight(
    architecture, tiny_model_dir, triage_data, tmp_path
):
    """gate_proj and up_proj name linear layers alone (a dense layer's, adapted): a model without them holds its
    experts' two as one weight, gate_up_proj."""
    from tiny import tiny_moe

    from tuneforge.errors import ConfigError
    from tuneforge.methods import prepare_model

    cfg = load_config(tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run"))
    cfg.lora.dropout, cfg.lora.target_modules = 0.0, ["q_proj", "gate_proj", "up_proj"]
    with pytest.raises(ConfigError) as e:
        prepare_model(tiny_moe(architecture=architecture, experts=4), cfg)
    assert e.value.message == (
        "lora.target_modules: names gate_proj, up_proj, which this model has no module called. Name linear layers it "
        "has (k_proj, o_proj, q_proj, v_proj) or its routed experts' fused weights and router (down_proj, gate, "
        "gate_up_proj; the experts hold their gate and up projections as one weight, gate_up_proj), or leave "
        "target_modules out."
    )


def test_lora_target_modules_naming_fused_expert_weights_peft_does_not_adapt_are_refused_saying_so(
    tiny_model_dir, triage_data, tmp_path
):
    """PEFT adapts Qwen2-MoE's routed experts under no name; its down_proj is the shared expert's, and adapted."""
    from tiny import tiny_moe

    from tuneforge.errors import ConfigError
    from tuneforge.methods import prepare_model

    cfg = load_config(tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run"))
    cfg.lora.dropout, cfg.lora.target_modules = 0.0, ["q_proj", "gate_up_proj"]
    with pytest.raises(ConfigError) as e:
        prepare_model(tiny_moe(architecture="Qwen2MoeConfig", experts=4), cfg)
    assert e.value.message == (
        "lora.target_modules: names gate_up_proj, the routed experts' fused weight (mlp.experts.gate_up_proj), which "
        "PEFT adapts only on the mixture-of-experts models it maps from transformers 4 (Mixtral, Qwen3-MoE), not "
        "this one. Name linear layers it has (down_proj, gate_proj, k_proj, o_proj, q_proj, shared_expert_gate, "
        "up_proj, v_proj), or use method: full to train the experts."
    )
    cfg.lora.target_modules = ["down_proj"]
    model = prepare_model(tiny_moe(architecture="Qwen2MoeConfig", experts=4), cfg)
    assert {name for name, p in model.named_parameters() if p.requires_grad} == {
        f"base_model.model.model.layers.{i}.mlp.shared_expert.down_proj.lora_{ab}.default.weight"
        for i in (0, 1)
        for ab in "AB"
    }


@pytest.mark.parametrize("from_layer", [0.0, 0.5])
@pytest.mark.parametrize("architecture", ["MixtralConfig", "Qwen3MoeConfig"])
def test_lora_on_fused_experts_gives_gate_up_proj_twice_the_rank_without_a_warning_that_its_pattern_matched_nothing(
    architecture, from_layer, tiny_model_dir, triage_data, tmp_path
):
    """PEFT gives the fused gate_up_proj the rank and alpha of the two projections it holds by a rank_pattern and
    alpha_pattern key, and checks such keys against the modules it adapts alone, not the parameters."""
    from peft.tuners.lora import ParamWrapper
    from tiny import tiny_moe

    from tuneforge.methods import prepare_model

    cfg = load_config(tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run"))
    cfg.lora.dropout, cfg.lora.from_layer = 0.0, from_layer
    with warnings.catch_warnings(record=True) as heard:
        warnings.simplefilter("always")
        model = prepare_model(tiny_moe(architecture=architecture, experts=4), cfg)
    assert not [str(w.message) for w in heard if "pattern" in str(w.message)]
    ranks = {
        (name.split(".mlp.")[0], m.parameter_name): (m.r["default"], m.scaling["default"])
        for name, m in model.named_modules()
        if isinstance(m, ParamWrapper) and m.parameter_name != "weight"  # the router's weight
    }
    scaling = cfg.lora.alpha / cfg.lora.r
    layers = ["base_model.model.model.layers.1"] + ([] if from_layer else ["base_model.model.model.layers.0"])
    assert ranks == {
        (layer, weight): (cfg.lora.r * (2 if weight == "gate_up_proj" else 1), scaling)
        for layer in layers
        for weight in ("gate_up_proj", "down_proj")
    }


def test_a_mixture_of_experts_adapter_loads_without_a_warning_that_its_rank_pattern_matched_nothing(
    triage_data, tmp_path
):
    """The saved adapter keeps the rank_pattern and alpha_pattern key of the fused gate_up_proj, which PEFT checks
    again, against the modules alone, wherever the adapter loads: for export, eval, chat, serve and as a user loads
    it."""
    from peft.tuners.lora import ParamWrapper
    from tiny import save_tiny_model, tiny_moe

    from tuneforge.exporting.adapter import load_saved
    from tuneforge.methods import prepare_model
    from tuneforge.serve import AdapterPool

    base = save_tiny_model(tmp_path / "model", build=tiny_moe, experts=4)
    cfg = load_config(tiny_run_config(base, triage_data, tmp_path / "run"))
    cfg.lora.dropout = 0.0
    prepare_model(load_model(resolve(str(base))), cfg).save_pretrained(tmp_path / "adapter")
    load_tokenizer(resolve(str(base))).save_pretrained(tmp_path / "adapter")
    served = AdapterPool(str(base), {"one": str(tmp_path / "adapter"), "two": str(tmp_path / "adapter")})
    for load in (
        lambda: load_model(resolve(str(tmp_path / "adapter"))),
        lambda: load_saved(base, tmp_path / "adapter"),
        lambda: served.activate("one"),  # onto the base
        lambda: served.activate("two"),  # onto the PeftModel that holds "one"
    ):
        with warnings.catch_warnings(record=True) as heard:
            warnings.simplefilter("always")
            model = load()
        assert not [str(w.message) for w in heard if "pattern" in str(w.message)]
        wrappers = [m for m in model.modules() if getattr(m, "parameter_name", None) == "gate_up_proj"]
        ranks = {r for m in wrappers for r in m.r.values()}
        assert ranks == {2 * cfg.lora.r} and any(isinstance(m, ParamWrapper) for m in model.modules())


def test_lora_modules_the_model_lacks_are_refused_before_the_data_is_read(tiny_model_dir, triage_data, tmp_path):
    from tuneforge.errors import ConfigError

    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=1)
    cfg["lora"]["target_modules"] = ["q_proj", "gate"]
    with pytest.raises(ConfigError, match=r"^lora\.target_modules: names gate, which this model has no module"):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()  # no data report: the data was never read


def test_a_run_refused_after_its_data_is_read_leaves_no_run_folder_or_only_the_data_report(
    tiny_model_dir, triage_data, tmp_path
):
    from tuneforge.errors import DataError

    # Refused by its plan, once the data is read: a new output_dir goes as it came.
    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=2, warmup=5)
    with pytest.raises(TuneforgeError, match=r"train\.warmup"):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()
    # Refused by its data: the report of why stays, alone, and a run started there after it is no earlier run's.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "narrator", "content": "hi"}]}\n')
    refused = {**cfg, "data": {**cfg["data"], "train": str(bad), "validation": None}}
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "run" / "data_report.json"))):
        train(refused, progress=False)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["data_report.json"]
    # A run refused after it there leaves no report of the earlier run's data to read as its own.
    with pytest.raises(TuneforgeError, match=r"train\.warmup"):
        train(cfg, progress=False)
    assert not (tmp_path / "run" / "data_report.json").exists()
    assert train({**cfg, "train": {**cfg["train"], "warmup": 0}}, progress=False).steps == 2


@pytest.mark.parametrize(
    ("name", "said"),
    [
        ("mlp", "a LlamaMLP, which holds linear layers but is none: name those (down_proj, gate_proj, up_proj)"),
        (
            "input_layernorm",
            "a LlamaRMSNorm, no linear layer: name linear layers it has "
            "(down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj)",
        ),
    ],
)
def test_lora_target_modules_naming_no_linear_layer_are_refused_saying_which_to_name(
    name, said, tiny_model_dir, triage_data, tmp_path
):
    from tuneforge.config import load_config
    from tuneforge.errors import ConfigError
    from tuneforge.methods import prepare_model

    cfg = load_config(tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run"))
    cfg.lora.target_modules = ["q_proj", name]
    with pytest.raises(ConfigError) as e:
        prepare_model(load_model(resolve(str(tiny_model_dir))), cfg)
    assert e.value.message == f"lora.target_modules: names {name}, which is {said}, or write all-linear."


def test_lora_target_modules_naming_a_layer_peft_adapts_that_is_not_linear_is_taken(
    tiny_model_dir, triage_data, tmp_path
):
    """GPT-2's attention is a transformers Conv1D, which PEFT adapts as it does a linear layer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tuneforge.config import load_config
    from tuneforge.methods import prepare_model

    cfg = load_config(tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run"))
    cfg.lora.target_modules = ["c_attn"]
    model = prepare_model(GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2)), cfg)
    assert all(block.attn.c_attn.lora_A for block in model.base_model.model.transformer.h)


def test_lora_target_modules_outside_the_layers_from_layer_adapts_are_refused(tiny_model_dir, triage_data, tmp_path):
    """PEFT matches layers_to_transform against a layer number in the module's name: embed_tokens has none."""
    from tuneforge.config import load_config
    from tuneforge.errors import ConfigError
    from tuneforge.methods import prepare_model

    cfg = load_config(tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run"))
    cfg.lora.target_modules, cfg.lora.from_layer = ["q_proj", "embed_tokens"], 0.5
    with pytest.raises(ConfigError) as e:
        prepare_model(load_model(resolve(str(tiny_model_dir))), cfg)
    assert e.value.message == (
        "lora.target_modules: names embed_tokens, which sits outside the decoder's layers, and lora.from_layer "
        "adapts those from layer 1 up alone: PEFT would leave it untrained. Leave embed_tokens out, or "
        "lora.from_layer out to adapt it."
    )
    cfg.lora.target_modules = ["q_proj", "lm_head"]  # PEFT adapts a name that is a module's whole name
    assert prepare_model(load_model(resolve(str(tiny_model_dir))), cfg).lm_head.lora_A


def test_lora_dropout_on_a_mixture_of_experts_models_fused_experts_is_refused_naming_it(triage_data, tmp_path):
    """Under all-linear PEFT adapts Mixtral's fused expert weights, with adapters that take no dropout."""
    from tiny import save_tiny_model, tiny_moe

    from tuneforge.errors import ConfigError

    model = save_tiny_model(tmp_path / "model", build=tiny_moe, experts=4)
    cfg = tiny_run_config(model, triage_data, tmp_path / "run", max_steps=1)  # lora.dropout: 0.1
    with pytest.raises(
        ConfigError, match=r"^lora\.dropout: 0\.1, but PEFT's adapters on the weights of this mixture-of-experts model "
    ):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()  # refused before the data is read


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "down_proj"]])
def test_dora_on_a_mixture_of_experts_models_fused_experts_is_refused_naming_the_method(
    targets, tiny_model_dir, triage_data, tmp_path
):
    """PEFT's adapters on Mixtral's fused expert weights (all-linear, or a list naming them) have no DoRA."""
    from tiny import tiny_moe

    from tuneforge.errors import ConfigError
    from tuneforge.methods import prepare_model

    cfg = load_config({**tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run"), "method": "dora"})
    cfg.lora.dropout, cfg.lora.target_modules = 0.0, targets
    with pytest.raises(ConfigError) as e:
        prepare_model(tiny_moe(experts=4), cfg)
    assert e.value.message == (
        "method: dora, but PEFT's adapters on the weights of this mixture-of-experts model that lora.target_modules "
        "adapts as parameters (mlp.experts.down_proj"
        + (", mlp.experts.gate_up_proj, mlp.gate.weight" if targets == "all-linear" else "")
        + ") have no DoRA; use method: lora, or list target_modules without them (such as [q_proj, k_proj, v_proj, "
        "o_proj])."
    )


def test_dora_on_a_mixture_of_experts_models_dense_layer_named_by_a_list_is_refused_naming_its_weights(
    tiny_model_dir, triage_data, tmp_path
):
    """A dense layer's mlp.gate_proj goes to PEFT as a parameter (`parameters_for_peft`), whose adapters have no DoRA:
    the refusal names that weight, not the experts, which the list leaves alone."""
    from tiny import tiny_moe

    from tuneforge.errors import ConfigError
    from tuneforge.methods import prepare_model

    cfg = load_config({**tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run"), "method": "dora"})
    cfg.lora.dropout, cfg.lora.target_modules = 0.0, ["q_proj", "mlp.gate_proj"]
    with pytest.raises(ConfigError) as e:
        prepare_model(tiny_moe(architecture="Qwen3MoeConfig", experts=4, mlp_only_layers=[1]), cfg)
    assert e.value.message == (
        "method: dora, but PEFT's adapters on the weights of this mixture-of-experts model that lora.target_modules "
        "adapts as parameters (mlp.gate_proj.weight) have no DoRA; use method: lora, or list target_modules without "
        "them (such as [q_proj, k_proj, v_proj, o_proj])."
    )


def test_loraplus_moves_the_b_matrices_ratio_times_as_far(tiny_model_dir, triage_data, tmp_path):
    """One step from the same start: LoRA's B matrices start at zero, so A gets no gradient yet and
    Adam moves each B entry by the learning rate; with LoRA+ B's learning rate is ratio times larger."""
    from safetensors.torch import load_file

    weights = {}
    for ratio in (1.0, 4.0):
        cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / f"r{ratio}", max_steps=1, warmup=0)
        cfg["lora"] = {**cfg["lora"], "dropout": 0.0, "loraplus_lr_ratio": ratio}
        train(cfg, progress=False)
        weights[ratio] = load_file(tmp_path / f"r{ratio}" / "final" / "adapter_model.safetensors")
    b_names = [name for name in weights[1.0] if "lora_B" in name]
    assert b_names and len(b_names) * 2 == len(weights[1.0])
    for name, plain in weights[1.0].items():
        if "lora_B" in name:
            assert plain.abs().max() > 0
            torch.testing.assert_close(weights[4.0][name], 4 * plain)
        else:
            torch.testing.assert_close(weights[4.0][name], plain, rtol=0, atol=0)


@pytest.mark.parametrize("adapted", [None, [1]], ids=["every layer", "upper layer"])
def test_replay_rows_learn_the_base_distribution_and_task_rows_their_text(tiny_model_dir, adapted):
    from peft import LoraConfig, get_peft_model

    from tuneforge.data import Example, collate
    from tuneforge.methods import KLToBase, SFTObjective

    torch.manual_seed(0)
    model = get_peft_model(
        load_model(resolve(str(tiny_model_dir)), dtype=torch.float32),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=adapted),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)  # the tuned model now differs from the base
    ids = torch.randint(5, 200, (2, 12)).tolist()
    task = Example(ids[0], [-100] * 5 + ids[0][6:] + [-100])
    replay = Example(ids[1], [-100] * 3 + ids[1][4:] + [-100], is_replay=True)
    batch = collate([task, replay], pad_id=0)
    assert batch["is_replay"].tolist() == [False, True]
    objective = SFTObjective(model, terms=(KLToBase(weight=0.0, replay=True),))
    out = objective(**batch)

    labels = batch["labels"]
    tuned = model(input_ids=batch["input_ids"]).logits.log_softmax(-1).detach()
    with model.disable_adapter():
        base = model(input_ids=batch["input_ids"]).logits.log_softmax(-1)
    trained = labels != -100
    ce = -tuned.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    kl = (base.exp() * (base - tuned)).sum(-1)
    assert out["loss"].item() == pytest.approx(float(ce[0][trained[0]].sum() + kl[1][trained[1]].sum()), rel=1e-4)
    assert float(out["replay_kl"]) == pytest.approx(float(kl[1][trained[1]].sum()), rel=1e-4)
    assert out["ce"].item() == out["loss"].item()  # train_loss: replay tokens count their KL, not their text's CE
    assert out["tokens"] == int(trained.sum())


def test_example_lengths_follow_packed_examples_shared_prefixes_and_padding():
    from tuneforge.methods.neftune import example_lengths

    # A prefix of 4 shared by two examples of 3 and 5 more tokens, then 3 of padding; a plain row of 6.
    packed = [0, 1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 8, 0, 1, 2]
    plain = list(range(6)) + list(range(9))
    lengths = example_lengths(torch.tensor([packed, plain]))
    assert lengths.tolist() == [[7] * 7 + [9] * 5 + [3] * 3, [6] * 6 + [9] * 9]


def test_neftune_noise_is_scaled_by_each_examples_own_length():
    from tuneforge.methods.neftune import neftune_noise

    torch.manual_seed(0)
    positions = torch.tensor([list(range(16)) + list(range(64))])  # two packed examples: 16 and 64 tokens
    noise = neftune_noise(5.0, positions, 256, torch.float32)
    assert noise.shape == (1, 80, 256)
    for span, length in ((slice(0, 16), 16), (slice(16, 80), 64)):
        bound = 5.0 / (length * 256) ** 0.5
        part = noise[0, span].abs()
        assert part.max() <= bound and part.max() > 0.99 * bound  # uniform in ±bound
        assert part.mean() == pytest.approx(bound / 2, rel=0.05)


def test_neftune_noises_the_embeddings_of_training_forwards_only_and_the_base_sees_them_clean(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    from tuneforge.data import Example, collate
    from tuneforge.methods import KLToBase, NEFTune, SFTObjective
    from tuneforge.methods.neftune import neftune_noise

    torch.manual_seed(0)
    model = get_peft_model(
        load_model(resolve(str(tiny_model_dir)), dtype=torch.float32),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    ids = torch.randint(5, 200, (2, 12)).tolist()
    batch = collate(
        [
            Example(ids[0], [-100] * 5 + ids[0][6:] + [-100]),
            Example(ids[1], [-100] * 3 + ids[1][4:] + [-100], is_replay=True),
        ],
        pad_id=0,
    )
    labels, trained = batch["labels"], batch["labels"] != -100
    clean_loss = SFTObjective(model, terms=(KLToBase(weight=0.0, replay=True),)).eval()(**batch)["loss"].item()
    NEFTune(50.0).attach(model)
    objective = SFTObjective(model, terms=(KLToBase(weight=0.0, replay=True),)).train()

    torch.manual_seed(1)
    out = objective(**batch)
    torch.manual_seed(1)
    noise = neftune_noise(50.0, batch["position_ids"], model.config.hidden_size, torch.float32)
    model.eval()  # by hand from here: the hook adds nothing in eval mode
    embeds = model.get_input_embeddings()(batch["input_ids"]) + noise
    tuned = model(inputs_embeds=embeds, position_ids=batch["position_ids"]).logits.log_softmax(-1).detach()
    with model.disable_adapter():
        base = model(input_ids=batch["input_ids"]).logits.log_softmax(-1)
    ce = -tuned.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    kl = (base.exp() * (base - tuned)).sum(-1)
    assert out["loss"].item() == pytest.approx(float(ce[0][trained[0]].sum() + kl[1][trained[1]].sum()), rel=1e-4)
    # The adapter starts as the identity (B = 0): the KL to the clean base is the noise's alone.
    assert float(out["replay_kl"]) == pytest.approx(float(kl[1][trained[1]].sum()), rel=1e-4) and out["replay_kl"] > 0

    objective.eval()
    assert objective(**batch)["loss"].item() == clean_loss  # validation: no noise


def test_kl_replay_keeps_the_model_closer_to_the_base_on_replay_than_ce_replay(tiny_model_dir, triage_data, tmp_path):
    from peft import PeftModel

    from tuneforge.config import load_config
    from tuneforge.data import collate, prepare
    from tuneforge.methods import KLToBase, SFTObjective
    from tuneforge.models import load_tokenizer
    from tuneforge.training import to_rows

    runs = {}
    for loss in ("ce", "kl_to_base"):
        cfg = tiny_run_config(
            tiny_model_dir, triage_data, tmp_path / loss, max_steps=6, learning_rate=2e-2, replay_loss=loss
        )
        cfg["data"]["general_mix"] = 0.3
        cfg["lora"]["from_layer"] = 0.5
        train(cfg, progress=False)
        runs[loss] = load_config(cfg)
    rows = metrics(tmp_path / "kl_to_base")
    assert rows[0]["replay_kl"] == pytest.approx(0, abs=1e-6)  # LoRA starts as the base
    assert max(r.get("replay_kl", 0) for r in rows) > 0
    assert not any("valid_replay_kl" in key for r in rows for key in r)  # validation holds no replay

    cfg = runs["kl_to_base"]
    tokenizer = load_tokenizer(resolve(cfg.base_model))
    items = prepare(cfg.data, tokenizer, log=lambda _: None).train
    train_rows = to_rows(items, cfg)
    replay_rows = [r for r in train_rows if r.is_replay]
    assert {e.is_replay for e in items} == {True, False} and replay_rows
    assert sum(map(len, replay_rows)) == sum(len(e) for e in items if e.is_replay)  # replay has rows of its own
    batch = collate(replay_rows, tokenizer.pad_token_id)
    kl = {}
    for loss in runs:
        model = PeftModel.from_pretrained(
            load_model(resolve(cfg.base_model), dtype=torch.float32), tmp_path / loss / "final"
        )
        with torch.no_grad():
            kl[loss] = float(SFTObjective(model, terms=(KLToBase(weight=0.0, replay=True),))(**batch)["replay_kl"])
    assert kl["kl_to_base"] < 0.6 * kl["ce"]


def test_kl_replay_needs_replay_and_an_sft_method(tiny_model_dir, triage_data, tmp_path):
    from tuneforge.config import load_config

    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", replay_loss="kl_to_base")
    with pytest.raises(TuneforgeError, match="set data.general_mix above 0"):
        load_config(cfg)
    cfg["data"]["general_mix"] = 0.2
    cfg["method"] = "dpo"
    with pytest.raises(TuneforgeError, match="method: dpo does not take train.replay_loss: kl_to_base"):
        load_config(cfg)


def test_lora_from_a_lora_run_trains_that_adapter_on(tiny_model_dir, triage_data, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    first = train(
        tiny_run_config(tiny_model_dir, triage_data, tmp_path / "a", max_steps=2, learning_rate=1e-2), progress=False
    )
    # A learning rate too small to move the weights: the second run's adapter is the first run's.
    again = train(
        tiny_run_config(first.output_dir, triage_data, tmp_path / "b", max_steps=1, learning_rate=1e-12), progress=False
    )
    a = load_file(first.final_dir / "adapter_model.safetensors")
    b = load_file(again.final_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any("lora_B" in k and a[k].abs().max() > 0 for k in a)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-8), key
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), again.final_dir)
    assert tuned.peft_config["default"].r == 4

    reshaped = tiny_run_config(first.output_dir, triage_data, tmp_path / "c", max_steps=1)
    reshaped["lora"]["r"] = 8
    with pytest.raises(TuneforgeError, match=r"another r .*r=4"):
        train(reshaped, progress=False)


@pytest.mark.parametrize(
    ("saved", "listed"),
    [
        (["q_proj", "v_proj"], ["self_attn.q_proj", "model.layers.0.self_attn.v_proj", "layers.1.self_attn.v_proj"]),
        ("all-linear", ["q_proj", "k_proj", "v_proj", "o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]),
    ],
    ids=["list", "all-linear"],
)
def test_a_lora_adapter_trained_on_with_target_modules_spelt_otherwise_for_the_same_weights_trains_on(
    saved, listed, tiny_model_dir, triage_data, tmp_path
):
    """lora.target_modules is compared with the adapter's by the weights each adapts, not by how they are named."""
    from tuneforge.methods import prepare_model

    cfg = load_config(tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run"))
    cfg.lora.target_modules = saved
    prepare_model(load_model(resolve(str(tiny_model_dir))), cfg).save_pretrained(tmp_path / "adapter")
    load_tokenizer(resolve(str(tiny_model_dir))).save_pretrained(tmp_path / "adapter")
    on = load_config(tiny_run_config(tmp_path / "adapter", triage_data, tmp_path / "on"))
    on.lora.target_modules = listed
    before = adapted_weights(load_model(resolve(str(tmp_path / "adapter"))))
    assert adapted_weights(prepare_model(load_model(resolve(str(tmp_path / "adapter"))), on)) == before
    on.lora.target_modules = listed[1:]
    with pytest.raises(
        TuneforgeError, match=r"adapts other weights than it: self_attn\.q_proj\.weight, which it adapts"
    ):
        prepare_model(load_model(resolve(str(tmp_path / "adapter"))), on)


@pytest.mark.parametrize("from_layer", [0.0, 0.5])
def test_a_lora_adapter_trained_on_with_target_modules_naming_its_weights_in_fewer_layers_is_refused(
    from_layer, tiny_model_dir, triage_data, tmp_path
):
    """A list naming the adapter's weights in one layer of the two it adapts names fewer weights; the same names
    without a layer name the adapter's, from_layer left out keeping the adapter's layers."""
    from tuneforge.methods import prepare_model

    cfg = load_config(tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run"))
    cfg.lora.target_modules = ["q_proj", "v_proj"]
    prepare_model(load_model(resolve(str(tiny_model_dir))), cfg).save_pretrained(tmp_path / "adapter")
    load_tokenizer(resolve(str(tiny_model_dir))).save_pretrained(tmp_path / "adapter")
    on = load_config(tiny_run_config(tmp_path / "adapter", triage_data, tmp_path / "on"))
    on.lora.target_modules = ["layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj"]
    with pytest.raises(TuneforgeError) as e:
        prepare_model(load_model(resolve(str(tmp_path / "adapter"))), on)
    assert (
        "adapts other weights than it: model.layers.1.self_attn.q_proj.weight, model.layers.1.self_attn.v_proj.weight, "
        "which it adapts (" in e.value.message
    ), e.value.message
    # An adapter of the upper layer alone trains on with the names alone.
    cfg.lora.from_layer = 0.5
    prepare_model(load_model(resolve(str(tiny_model_dir))), cfg).save_pretrained(tmp_path / "upper")
    load_tokenizer(resolve(str(tiny_model_dir))).save_pretrained(tmp_path / "upper")
    on = load_config(tiny_run_config(tmp_path / "upper", triage_data, tmp_path / "on"))
    on.lora.target_modules, on.lora.from_layer = ["q_proj", "self_attn.v_proj"], from_layer
    before = adapted_weights(load_model(resolve(str(tmp_path / "upper"))))
    assert all(".layers.1." in name for name in before)
    assert adapted_weights(prepare_model(load_model(resolve(str(tmp_path / "upper"))), on)) == before


@pytest.mark.parametrize("from_layer", [0.0, 0.5])
@pytest.mark.parametrize("dense", [{}, {"mlp_only_layers": [1]}], ids=["sparse", "dense-layer-1"])
def test_a_mixture_of_experts_adapter_trained_on_with_other_expert_weights_listed_is_refused(
    from_layer, dense, triage_data, tmp_path
):
    """A list naming fused expert weights hands them to PEFT as parameters (target_parameters), not modules, and a
    dense layer's linear layers of that name too (Qwen3-MoE's mlp_only_layers): an adapter on [q_proj, down_proj]
    is another shape than one on [q_proj]."""
    from tiny import save_tiny_model, tiny_moe

    from tuneforge.methods import prepare_model

    architecture = "Qwen3MoeConfig" if dense else "MixtralConfig"
    base = save_tiny_model(tmp_path / "model", build=tiny_moe, architecture=architecture, experts=4, **dense)
    cfg = load_config(tiny_run_config(base, triage_data, tmp_path / "run"))
    cfg.lora.dropout, cfg.lora.target_modules, cfg.lora.from_layer = 0.0, ["q_proj", "down_proj"], from_layer
    prepare_model(load_model(resolve(str(base))), cfg).save_pretrained(tmp_path / "adapter")
    load_tokenizer(resolve(str(base))).save_pretrained(tmp_path / "adapter")
    on = load_config(tiny_run_config(tmp_path / "adapter", triage_data, tmp_path / "on"))
    on.lora.dropout, on.lora.from_layer = 0.0, from_layer
    for targets in (["q_proj", "down_proj"], "all-linear"):  # the adapter's list, and the default: it trains on
        on.lora.target_modules = targets
        prepare_model(load_model(resolve(str(tmp_path / "adapter"))), on)
    on.lora.target_modules = ["q_proj"]
    with pytest.raises(
        TuneforgeError, match=r"target_modules adapts other weights than it: [^(]*down_proj[^(]*, which it adapts \("
    ):
        prepare_model(load_model(resolve(str(tmp_path / "adapter"))), on)


def test_a_mixture_of_experts_adapter_trained_on_with_its_own_list_but_other_weights_is_refused_naming_them(
    triage_data, tmp_path
):
    """An adapter saved with [q_proj, gate_proj, up_proj] as PEFT alone resolves the list adapts the fused experts'
    gate_up_proj of every layer but not a dense layer's gate_proj and up_proj; the same list adapts those now: the
    refusal names the weights that differ, not another list."""
    from peft import LoraConfig, get_peft_model
    from tiny import save_tiny_model, tiny_moe

    from tuneforge.methods import prepare_model

    base = save_tiny_model(
        tmp_path / "model", build=tiny_moe, architecture="Qwen3MoeConfig", experts=4, mlp_only_layers=[1]
    )
    targets = ["q_proj", "gate_proj", "up_proj"]
    get_peft_model(
        load_model(resolve(str(base))), LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    ).save_pretrained(tmp_path / "adapter")
    load_tokenizer(resolve(str(base))).save_pretrained(tmp_path / "adapter")
    on = load_config(tiny_run_config(tmp_path / "adapter", triage_data, tmp_path / "on"))
    on.lora.dropout, on.lora.target_modules = 0.0, targets
    with pytest.raises(TuneforgeError) as e:
        prepare_model(load_model(resolve(str(tmp_path / "adapter"))), on)
    assert e.value.message.startswith(
        "base_model is a LoRA adapter that trains on as it is, but lora.target_modules adapts other weights than it: "
        "mlp.gate_proj.weight, mlp.up_proj.weight, which the adapter leaves as the base has them, and not "
        "mlp.experts.gate_up_proj, which it adapts (the adapter has r=4, alpha=8, "
        "dora=False). Leave those keys out"
    )


def test_a_mixture_of_experts_adapter_naming_its_expert_weights_by_their_last_parts_trains_on_with_that_list(
    triage_data, tmp_path
):
    """PEFT takes target_parameters by their last parts (down_proj) as well as in full, as tuneforge names them."""
    from tiny import save_tiny_model, tiny_moe

    from tuneforge.methods import prepare_model

    base = save_tiny_model(tmp_path / "model", build=tiny_moe, experts=4)
    cfg = load_config(tiny_run_config(base, triage_data, tmp_path / "run"))
    cfg.lora.dropout, cfg.lora.target_modules = 0.0, ["q_proj", "down_proj"]
    prepare_model(load_model(resolve(str(base))), cfg).save_pretrained(tmp_path / "adapter")
    load_tokenizer(resolve(str(base))).save_pretrained(tmp_path / "adapter")
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(written["target_parameters"]) == [f"model.layers.{i}.mlp.experts.down_proj" for i in (0, 1)]
    written["target_parameters"] = ["down_proj"]
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(written))
    on = load_config(tiny_run_config(tmp_path / "adapter", triage_data, tmp_path / "on"))
    on.lora.dropout, on.lora.target_modules = 0.0, ["q_proj", "down_proj"]
    model = prepare_model(load_model(resolve(str(tmp_path / "adapter"))), on)
    assert {name for name in adapted_weights(model) if ".mlp." in name} == {
        f"model.layers.{i}.mlp.experts.down_proj" for i in (0, 1)
    }


def test_too_few_rows_for_a_step_says_how_many_it_needs_and_why():
    from tuneforge.config import load_config
    from tuneforge.training import make_plan

    cfg = load_config({"data": {"train": "x"}, "train": {"batch_size": 8}})
    assert make_plan(cfg, 1, 1, world_size=1).steps_per_epoch == 1  # a short step, but a step
    with pytest.raises(
        TuneforgeError,
        match=r"1 training rows are fewer than one step needs: 4, a row for each "
        r"micro-batch \(train\.grad_accum 1 x 4 processes\)",
    ):
        make_plan(cfg, 1, 1, world_size=4)


def test_a_warmup_as_long_as_the_run_is_refused_before_the_first_step(tmp_path):
    from tuneforge.config import load_config
    from tuneforge.training import make_plan

    cfg = {"data": {"train": "x"}, "train": {"batch_size": 2, "max_steps": 5}}
    with pytest.raises(
        TuneforgeError, match=r"^train\.warmup \(override\): 5 steps, but the run takes 5: the learning"
    ):
        make_plan(load_config(cfg, "train.warmup=5"), 10, 10, world_size=1)
    # Set in a file, the key is told at its line.
    path = tmp_path / "cfg.yaml"
    path.write_text("data:\n  train: x\ntrain:\n  max_steps: 5\n  warmup: 5\n")
    with pytest.raises(TuneforgeError, match=rf"^train\.warmup \({re.escape(str(path))} line 5\): 5 steps, but"):
        make_plan(load_config(path), 10, 10, world_size=1)
    assert make_plan(load_config(cfg, "train.warmup=4"), 10, 10, world_size=1).warmup_steps == 4


def test_only_step_n_folders_count_as_checkpoints_not_a_copy_the_user_keeps_beside_them(tmp_path):
    for name in ("step-2", "step-4", "step-4.bak", "step-9-copy"):
        (tmp_path / name).mkdir()
        (tmp_path / name / checkpoint.STATE).write_text("{}")
    assert [folder.name for folder in checkpoint.step_folders(tmp_path)] == ["step-2", "step-4"]
    assert checkpoint.latest_to_resume(tmp_path) == tmp_path / "step-4"


@pytest.mark.parametrize("base_model", [" ", "no-such-model"])
def test_a_base_model_that_cannot_be_found_is_refused_naming_base_model(base_model, triage_data, tmp_path):
    from tuneforge.training import train

    cfg = tiny_run_config(base_model, triage_data, tmp_path / "run")
    with pytest.raises(TuneforgeError) as err:
        train(cfg, progress=False)
    assert err.value.message.startswith("base_model"), err.value.message
    assert not (tmp_path / "run").exists()


def test_a_base_model_path_that_does_not_exist_is_named_with_its_config_line(triage_data, tmp_path, monkeypatch):
    """`base_model: runs/sft` where the run has another name: validate and train name the line that set it, as they
    name a missing data file's."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "quickstart").mkdir(parents=True)
    config = tmp_path / "dpo.yaml"
    cfg = tiny_run_config("runs/sft", triage_data, tmp_path / "run")
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    for command in (validate, lambda c: train(c, progress=False)):
        with pytest.raises(TuneforgeError) as e:
            command(str(config))
        assert e.value.message.startswith(f"base_model ({config} line 1): runs/sft does not exist")
        assert "runs/ holds quickstart" in e.value.message


def test_a_base_model_gone_by_the_end_of_training_is_named_with_its_config_line(tiny_model_dir, triage_data, tmp_path):
    """The evaluation after training loads `base_model` again beside the final model: one deleted while the run
    trained is named by the line that set it, as before training."""
    from tuneforge.config import load_config
    from tuneforge.eval.after_training import evaluate_after_training

    config = tmp_path / "run.yaml"
    gone = tmp_path / "base"
    cfg = tiny_run_config(str(gone), triage_data, tmp_path / "run")
    cfg["eval"] = {"forgetting": True}
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    with pytest.raises(TuneforgeError) as e:
        evaluate_after_training(load_config(str(config)), tmp_path / "run", tiny_model_dir, progress=False)
    assert e.value.message.startswith(f"base_model ({config} line 1): {gone} does not exist"), e.value.message


def test_the_summary_prints_the_run_folder_as_named(tiny_model_dir, triage_data, tmp_path, capsys):
    # rich would read `[/x]` in a user's path as a closing tag (an error) and `:x:` as an emoji's code.
    out = tmp_path / "runs" / "[/x]:x:"
    train(tiny_run_config(tiny_model_dir, triage_data, out, max_steps=1), progress=True)
    assert f"run{out}" in "".join(capsys.readouterr().err.split())  # the title wraps at the table's width
