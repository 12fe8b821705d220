"""model.add_tokens: tokens added to the tokenizer, the embeddings grown for them, their rows trained and
saved, and the model loaded, resumed and exported with the grown vocabulary."""

import json

import pytest
import torch
import yaml
from conftest import tiny_run_config
from safetensors import safe_open

from tuneforge.config import load_config
from tuneforge.data.render import ChatRenderer
from tuneforge.data.schema import Conversation, Message
from tuneforge.dry_run import validate
from tuneforge.errors import ConfigError
from tuneforge.exporting import export
from tuneforge.models import load_model, load_tokenizer
from tuneforge.serve.adapters import AdapterPool
from tuneforge.training import train

TOKENS = ["<tool>", "</tool>", "<|im_end|>"]  # the last one the tiny tokenizer has already


@pytest.fixture(scope="module")
def tool_data(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("tools")
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is the status of order {i}?"},
                {"role": "assistant", "content": f'<tool>{{"order": {i}}}</tool>'},
            ]
        }
        for i in range(24)
    ]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:20]) + "\n")
    (folder / "valid.jsonl").write_text("\n".join(json.dumps(r) for r in rows[20:]) + "\n")
    return {"train": folder / "train.jsonl", "validation": folder / "valid.jsonl"}


def tool_run(model_dir, data, out, method="lora", **train_keys) -> dict:
    cfg = tiny_run_config(model_dir, data, out, batch_size=4, **train_keys)
    cfg["method"] = method
    cfg["model"] = {"add_tokens": TOKENS}
    cfg["data"]["packing"] = False  # a row per example: steps of their own rows
    return cfg


def train_losses(run) -> dict[int, float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["train_loss"] for m in lines if "train_loss" in m}


def test_added_tokens_are_one_id_each_when_rendered_and_one_already_there_is_kept(tiny_model_dir):
    plain = load_tokenizer(str(tiny_model_dir))
    with pytest.warns(UserWarning, match=r"already holds <\|im_end\|> \(id 2\), so it is not added again") as said:
        tokenizer = load_tokenizer(str(tiny_model_dir), TOKENS)
    assert len([w for w in said if "add_tokens" in str(w.message)]) == 1
    assert len(tokenizer) == len(plain) + 2
    ids = tokenizer.convert_tokens_to_ids(TOKENS)
    assert ids == [len(plain), len(plain) + 1, 2]
    reply = '<tool>{"order": 7}</tool>'
    [example] = ChatRenderer(tokenizer).render(
        [Conversation([Message("user", "Order 7?"), Message("assistant", reply)])]
    )
    trained = [label for label in example.labels if label != -100]
    assert trained.count(ids[0]) == 1 and trained.count(ids[1]) == 1  # each token one id, and trained
    assert tokenizer.decode(trained, skip_special_tokens=True).startswith(reply)  # kept in decoded answers


def test_a_lora_run_trains_and_saves_the_added_rows_alone_resumes_exactly_and_exports_merged(
    tiny_model_dir, tool_data, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("COLUMNS", "300")  # the plan's rows on one line each
    cfg = tool_run(tiny_model_dir, tool_data, tmp_path / "run", max_steps=4, save_every=2)
    assert validate(cfg) == 0
    shown = capsys.readouterr().out
    assert "<tool> (id 442, new), </tool> (id 443, new), <|im_end|> (id 2, in the vocabulary already)" in shown
    assert "444 embedding rows" in shown and "3 (ids 442, 443, 2), alone beside the adapter" in shown

    result = train(cfg, progress=False)
    losses = train_losses(tmp_path / "run")
    final = result.final_dir
    for folder in (final, tmp_path / "run" / "checkpoints" / "step-2"):
        assert len(load_tokenizer(str(folder))) == 444
        with safe_open(str(folder / "adapter_model.safetensors"), "pt") as weights:
            whole = {k: weights.get_slice(k).get_shape() for k in weights.keys() if "lora_" not in k}
        # The three trained rows alone (tied embeddings: one copy), not the grown matrix.
        assert whole == {"base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta": [3, 64]}

    train(cfg, resume=str(tmp_path / "run" / "checkpoints" / "step-2"), progress=False)
    assert train_losses(tmp_path / "run") == losses and len(losses) == 4

    # The base loads resized to the adapter's rows, which replace its new ones; they trained from the mean.
    mean = load_model(str(tiny_model_dir)).get_input_embeddings().weight.mean(0)
    with safe_open(str(final / "adapter_model.safetensors"), "pt") as weights:
        saved = weights.get_tensor("base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta")
    rows = load_model(str(final)).get_input_embeddings()(torch.tensor([442, 443, 2]))
    assert torch.equal(rows, saved) and not torch.allclose(rows[0], mean, atol=1e-3)

    merged = export(tmp_path / "run", "merged", None, tmp_path / "merged", progress=False)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["vocab_size"] == 444
    assert merged.checks["merge"]["max_abs_logit_diff"] <= 1e-3
    from tuneforge.exporting.probe import probe_ids

    probed = probe_ids(load_tokenizer(str(final)))
    assert any(442 in row and 443 in row for row in probed)  # the merge check runs on the added rows

    with pytest.raises(ConfigError, match=r"trains 2 token\(s\) added in training .* --format merged"):
        AdapterPool(str(tmp_path / "run"))  # the base it shares with other adapters has no rows for them

    # A LoRA run of it as base_model trains its adapter on, the added rows included; tokens whose rows it does
    # not train are refused: one it has no row for, and one of the base's own it did not add.
    on = {**cfg, "base_model": str(tmp_path / "run"), "output_dir": str(tmp_path / "on"), "train": {**cfg["train"]}}
    on["train"].update(max_steps=1, save_every=0)
    with safe_open(str(train(on, progress=False).final_dir / "adapter_model.safetensors"), "pt") as weights:
        further = weights.get_tensor("base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta")
    assert not torch.equal(further, saved)
    on["model"] = {"add_tokens": [*TOKENS, "<extra>"]}
    refused = r"model.add_tokens: adds <extra>, whose embedding rows the LoRA adapter of base_model .* does not train"
    with pytest.raises(ConfigError, match=refused):
        validate(on)  # as train does, before the data is read and the weights load
    with pytest.raises(ConfigError, match=refused):
        train(on, progress=False, overwrite=True)
    on["model"] = {"add_tokens": [*TOKENS, "<|im_start|>"]}
    with pytest.raises(ConfigError, match=r"adds <\|im_start\|>, whose embedding rows the LoRA adapter"):
        validate(on)


def test_a_full_run_grows_the_model_to_its_added_tokens(tiny_model_dir, tool_data, tmp_path):
    cfg = tool_run(tiny_model_dir, tool_data, tmp_path / "run", method="full", max_steps=2)
    final = train(cfg, progress=False).final_dir
    assert json.loads((final / "config.json").read_text())["vocab_size"] == 444
    assert len(load_tokenizer(str(final))) == 444
    assert load_model(str(final)).get_input_embeddings().num_embeddings == 444


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_model_continued_with_its_runs_added_tokens_is_warned_only_of_the_base_vocabularys(
    method, tiny_model_dir, tool_data, tmp_path
):
    train(tool_run(tiny_model_dir, tool_data, tmp_path / "run", method=method, max_steps=1), progress=False)
    with pytest.warns(UserWarning, match="already holds") as said:
        tokenizer = load_tokenizer(str(tmp_path / "run"), TOKENS)
    assert [str(w.message).split(" already holds ")[1].split(",")[0] for w in said] == ["<|im_end|> (id 2)"]
    assert tokenizer.convert_tokens_to_ids(TOKENS) == [442, 443, 2]


def test_the_plan_of_a_model_continued_names_its_runs_added_tokens_as_theirs(
    tiny_model_dir, tool_data, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("COLUMNS", "300")  # the plan's rows on one line each
    train(tool_run(tiny_model_dir, tool_data, tmp_path / "run", method="full", max_steps=1), progress=False)
    assert validate(tool_run(tmp_path / "run", tool_data, tmp_path / "again", method="full")) == 0
    shown = capsys.readouterr().out
    assert (
        "<tool> (id 442, added by a run this model comes from), </tool> (id 443, added by a run this model comes "
        "from), <|im_end|> (id 2, in the vocabulary already)"
    ) in shown


@pytest.mark.parametrize(
    ("keys", "said"),
    [
        ({"method": "dpo"}, "method: dpo cannot use"),
        ({"model": {"add_tokens": ["<tool>"], "quantize": "nf4"}}, "a quantized base"),
        ({"train": {"freeze_embeddings": True}}, "train.freeze_embeddings: true keeps them frozen"),
        ({"model": {"add_tokens": ["<tool>", "<tool>"]}}, "lists <tool> more than once"),
    ],
)
def test_add_tokens_where_it_cannot_work_is_refused_naming_the_keys(tiny_model_dir, tool_data, tmp_path, keys, said):
    cfg = {**tiny_run_config(tiny_model_dir, tool_data, tmp_path / "run"), "model": {"add_tokens": ["<tool>"]}}
    for key, value in keys.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    with pytest.raises(ConfigError, match=said) as error:
        load_config(cfg)
    assert "model.add_tokens" in error.value.message


@pytest.mark.parametrize("family", ["qwen2.5", "llama3"])  # tied embeddings, and an untied output layer
@pytest.mark.parametrize("layer", ["embed_tokens", "lm_head"])
def test_add_tokens_with_target_modules_naming_a_layer_whose_rows_train_is_refused_naming_both(
    family, layer, tool_data, tmp_path
):
    """The added tokens' rows train in the input embeddings, and in an untied output layer, beside the adapter: PEFT
    puts no LoRA adapter on a layer whose rows it trains."""
    from families import FAMILIES, save_family_model

    base = save_family_model(FAMILIES[family], tmp_path / "base")
    cfg = tool_run(base, tool_data, tmp_path / "run")
    cfg["model"]["add_tokens"] = ["<tool>"]
    cfg["lora"]["target_modules"] = ["q_proj", layer]
    if family == "qwen2.5" and layer == "lm_head":  # the tied output layer: its rows are the embeddings', no others
        assert validate(cfg) == 0
        return
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    assert error.value.message.startswith(f"lora.target_modules: names {layer}, "), error.value.message
    assert "model.add_tokens" in error.value.message and "lora.modules_to_save" in error.value.message


def test_add_tokens_is_named_for_axolotl_and_llama_factory_keys(tiny_model_dir, tool_data, tmp_path):
    for key in ("tokens", "new_special_tokens"):
        cfg = {**tiny_run_config(tiny_model_dir, tool_data, tmp_path / "run"), key: ["<tool>"]}
        with pytest.raises(ConfigError, match="model.add_tokens"):
            load_config(cfg)


def test_an_untied_model_trains_and_saves_the_added_rows_of_its_output_layer_too(tool_data, tmp_path):
    from families import FAMILIES, save_family_model

    base = save_family_model(FAMILIES["llama3"], tmp_path / "base")  # untied output layer
    cfg = tool_run(base, tool_data, tmp_path / "run", max_steps=2)
    cfg["model"]["add_tokens"] = ["<tool>", "</tool>"]
    final = train(cfg, progress=False).final_dir
    with safe_open(str(final / "adapter_model.safetensors"), "pt") as weights:
        whole = {k: weights.get_slice(k).get_shape() for k in weights.keys() if "lora_" not in k}
    assert whole == {
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta": [2, 64],
        "base_model.model.lm_head.token_adapter.trainable_tokens_delta": [2, 64],
    }
    merged = export(tmp_path / "run", "merged", None, tmp_path / "merged", progress=False)
    assert merged.checks["merge"]["max_abs_logit_diff"] <= 1e-3


@pytest.mark.parametrize("family", ["qwen2.5", "llama3"])  # tied embeddings, and an untied output layer
def test_added_tokens_in_the_spare_rows_of_a_padded_vocabulary_start_at_the_mean(family, tmp_path):
    from families import FAMILIES, save_family_model
    from transformers import AutoModelForCausalLM

    from tuneforge.methods import added_token_ids, load_for_training, new_token_ids
    from tuneforge.models import resolve

    # Like Qwen's, the vocabulary has rows past its tokenizer's tokens, holding values no token trained.
    folder = save_family_model(FAMILIES[family], tmp_path / "base")
    padded = AutoModelForCausalLM.from_pretrained(folder)
    own = padded.get_input_embeddings().num_embeddings
    padded.resize_token_embeddings(own + 8, mean_resizing=False)
    with torch.no_grad():
        for layer in (padded.get_input_embeddings(), padded.get_output_embeddings()):
            layer.weight[own:] = 5.0
    padded.save_pretrained(folder)

    cfg = load_config({"base_model": str(folder), "method": "full", "data": {"train": "x"}})
    cfg.model.add_tokens = ["<tool>", "</tool>"]
    tokenizer = load_tokenizer(str(folder), cfg.model.add_tokens)
    ids = added_token_ids(cfg, tokenizer)
    assert ids == [own, own + 1]
    model = load_for_training(
        resolve(str(folder)), cfg, precision="fp32", device="cpu", token_ids=ids, new_ids=new_token_ids(tokenizer)
    )
    assert model.get_input_embeddings().num_embeddings == own + 8  # the spare rows hold the new tokens
    for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
        mean = layer.weight[:own].mean(0)
        assert torch.allclose(layer.weight[own : own + 2], mean.expand(2, -1), atol=1e-6)
        assert torch.all(layer.weight[own + 2 :] == 5.0)  # rows no token uses are left as they are


def test_an_added_token_no_training_example_holds_is_warned_of_by_validate_and_train(
    tiny_model_dir, tool_data, tmp_path, capsys, monkeypatch
):
    """A token listed in model.add_tokens that the data never holds (misspelt, or with a space the data lacks)
    keeps its starting row: a run that trains it silently would give a model that never writes it."""
    from tuneforge.dry_run import validate

    monkeypatch.setenv("COLUMNS", "300")
    cfg = tool_run(tiny_model_dir, tool_data, tmp_path / "run", max_steps=1)
    cfg["model"]["add_tokens"] = [*TOKENS, "<never>"]
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert validate(str(path)) == 0
    planned = " ".join(capsys.readouterr().out.split())
    train(str(path), progress=False)
    trained = capsys.readouterr().out
    said = "'<never>' in none of the 20 training examples as tokenized, so its row never trains"
    assert said in planned and said in trained
    assert f"warning: model.add_tokens ({path} line" in planned + trained
    assert "'<tool>'" not in planned + trained  # the tokens the data holds are not named
    cfg["model"]["add_tokens"] = TOKENS
    path.write_text(yaml.safe_dump({**cfg, "output_dir": str(tmp_path / "all-seen")}))
    train(str(path), progress=False)
    assert "in none of the" not in capsys.readouterr().out
