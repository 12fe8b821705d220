"""`model.chat_template`: the chat template a run trains with and saves, chosen in the config.

A Llama 3 model trained with `chatml` renders ChatML in training, saves it in `final/` and answers
through serve stopping at the token ChatML ends its turns with there; a template training or
generation cannot use is refused before any data is read, naming the config's line and the
template's."""

from __future__ import annotations

import pytest
import yaml
from families import FAMILIES, save_family_model
from test_families import QUESTIONS, REPLY, STEPS, TRAIN_PAIRS, conversation, write_chats

from tuneforge.config import load_config
from tuneforge.data import render_conversation
from tuneforge.data.cache import tokenizer_fingerprint
from tuneforge.dry_run import validate
from tuneforge.errors import ConfigError
from tuneforge.models import load_tokenizer, resolve, run_tokenizer
from tuneforge.models.loading import fallback_template

pytestmark = pytest.mark.usefixtures("one_thread")

CHAT = [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}]


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    """A tiny Llama 3 folder (its own template: header tokens, <|eot_id|>) and chats to train on."""
    root = tmp_path_factory.mktemp("llama3")
    family = FAMILIES["llama3"]
    return {
        "base": save_family_model(family, root / "llama3"),
        "train": write_chats(family, root / "t.jsonl", TRAIN_PAIRS),
    }


def config_file(folder, llama3, template, **train) -> str:
    cfg = {
        "base_model": str(llama3["base"]),
        "model": {"chat_template": template},
        "lora": {"r": 8, "alpha": 16},
        "data": {"train": str(llama3["train"]), "validation": 0, "max_length": 256},
        "train": {"max_steps": 1, "batch_size": 8, "eval_every": 0, "save_every": 0, **train},
        "output_dir": str(folder / "run"),
    }
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return str(path)


def with_tokenizer(llama3, tokenizer, folder):
    """The tiny Llama 3 model in `folder`, with `tokenizer` in place of its own."""
    tokenizer.save_pretrained(folder)
    (folder / "config.json").write_text((llama3["base"] / "config.json").read_text())
    (folder / "model.safetensors").symlink_to(llama3["base"] / "model.safetensors")
    return folder


def test_llama3_trained_with_chatml_renders_saves_and_serves_chatml(llama3, tmp_path, capsys):
    from fastapi.testclient import TestClient

    from tuneforge.serve import AdapterPool, Engine, create_app
    from tuneforge.training import train

    path = config_file(tmp_path, llama3, "chatml", max_steps=STEPS, learning_rate=2e-2)
    # validate's sample is ChatML, its turns ended by <|eot_id|>, the token of the vocabulary that ends a turn.
    assert validate(path) == 0
    assert "<|im_start|>user\nWhat is" in capsys.readouterr().out
    tokenizer = run_tokenizer(load_config(path), resolve(str(llama3["base"])))
    text = tokenizer.decode(render_conversation(CHAT, tokenizer).input_ids)
    turns = "<|im_start|>user\nWhat is two plus two?<|eot_id|>\n<|im_start|>assistant\nFour.<|eot_id|>\n"
    assert text == turns
    # The run's data is rendered anew: the cache tells the two templates apart.
    assert tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(load_tokenizer(str(llama3["base"])))
    assert train(path, progress=False).status == "completed"
    final = tmp_path / "run" / "final"
    # Saved after the system prompt the data shares, which the run records in front of it.
    assert load_tokenizer(str(final)).chat_template.endswith(fallback_template(tokenizer))
    engine = Engine(AdapterPool(str(llama3["base"]), {"tuned": str(tmp_path / "run")}))
    try:
        with TestClient(create_app(engine)) as client:
            messages = conversation(FAMILIES["llama3"], *(QUESTIONS[i] for i in TRAIN_PAIRS[5]))["messages"][:-1]
            body = {"model": "tuned", "messages": messages, "max_tokens": 16, "temperature": 0}
            reply = client.post("/v1/chat/completions", json=body).json()
    finally:
        engine.close()
    [choice] = reply["choices"]
    assert (choice["message"]["content"], choice["finish_reason"]) == (REPLY, "stop")
    assert reply["usage"]["completion_tokens"] < 16


def test_a_template_file_beside_the_config_inline_jinja_and_a_named_template_are_each_used(llama3, tmp_path):
    (tmp_path / "turns.jinja").write_text(
        "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>{{ m.content }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>{% endif %}\n",
        encoding="utf-8",
    )
    from_file = run_tokenizer(load_config(config_file(tmp_path, llama3, "turns.jinja")), str(llama3["base"]))
    assert from_file.chat_template.startswith("{% for m in messages %}<|start_header_id|>")
    inline = (
        "{% for m in messages %}[{{ m.role }}] {{ m.content }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    tokenizer = run_tokenizer(load_config(config_file(tmp_path, llama3, inline)), str(llama3["base"]))
    assert tokenizer.decode(render_conversation(CHAT, tokenizer).input_ids).endswith("[assistant] Four.<|eot_id|>")
    # A tokenizer that ships several templates: the one named is the default, the others stay beside it.
    named = load_tokenizer(str(llama3["base"]))
    named.chat_template = {"default": named.chat_template, "plain": inline}
    chosen = load_tokenizer(str(with_tokenizer(llama3, named, tmp_path / "named")), template="plain")
    assert chosen.chat_template == {"default": inline, "plain": inline}


BAD = {
    "syntax": (
        "{% for m in messages %}\n{{ m.content }\n{% endfor %}",
        r"does not compile at its line 2 on a plain conversation",
    ),
    "nested too deeply": (
        "{% for m in messages %}{{ m.content }}{% endfor %}" + "{% if x %}" * 300 + "{% endif %}" * 300,
        r"fails on a plain conversation .*RecursionError",
    ),
    "raises": (
        "{% for m in messages %}\n{{ m.content }}\n{{ raise_exception('no system turn') }}{% endfor %}",
        r"fails at its line 3 .*no system turn",
    ),
    "no generation prompt": (
        "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>{{ m.content }}<|eot_id|>{% endfor %}",
        r"writes nothing for add_generation_prompt",
    ),
    "no end token": (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        r"ends an assistant turn with '<\|im_end\|>\\n', which holds no single token .* model.add_tokens",
    ),
    "spans not found": (
        "{{ messages | length }}{% for m in messages %}[{{ m.role }}] {{ m.content }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}",
        r"replies cannot be found in its renderings .*template_not_prefix",
    ),
    "generation prompt ends in a space": (
        "{% for m in messages %}[{{ m.role }}] {{ m.content }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}",
        r"generation prompt ends in a space \('\[assistant\] '\), which the tokenizer .* joins to the first word "
        r".*without the trailing space",
    ),
    "unknown name": ("llama3", r"llama3 is no file, no Jinja .* not a named template .*it has no named templates"),
}


def test_an_empty_template_file_is_refused_rather_than_read_as_no_template(llama3, tmp_path):
    (tmp_path / "empty.jinja").write_text("\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"model.chat_template \(.*line 3\): .*empty.jinja is empty"):
        validate(config_file(tmp_path, llama3, "empty.jinja"))


@pytest.mark.parametrize("bad", list(BAD))
def test_a_template_training_or_generation_cannot_use_is_refused_at_validate_naming_its_line(llama3, tmp_path, bad):
    template, reason = BAD[bad]
    path = config_file(tmp_path, llama3, template)
    line = next(i for i, text in enumerate(open(path).read().splitlines(), 1) if "chat_template:" in text)
    with pytest.raises(ConfigError, match=rf"model.chat_template \(.*run.yaml line {line}\): .*{reason}"):
        validate(path)


def test_the_template_is_a_setting_that_changes_results_and_runs_without_it_resume_as_before():
    from tuneforge.config import Config, load_config

    plain = Config.model_validate({"data": {"train": "x"}})
    # The hash of checkpoints written before the key: training validates the config it is given again, which made
    # lora.alpha's default (then the int 32) the float a reloaded config holds, as the default now is.
    assert plain.results_hash() == load_config(plain).results_hash() == "93e4d6e08cc96661"
    chatml = Config.model_validate({"data": {"train": "x"}, "model": {"chat_template": "chatml"}})
    assert plain.changed_results_settings(chatml) == ["model.chat_template: None -> chatml"]


def test_models_info_names_the_token_that_ends_a_turn_of_a_family_format_on_another_vocabulary(llama3, tmp_path):
    from tuneforge.models import model_info

    # ChatML on Llama 3's vocabulary, which has no <|im_end|>: its turns end with <|eot_id|>.
    folder = with_tokenizer(llama3, load_tokenizer(str(llama3["base"]), template="chatml"), tmp_path / "chatml")
    info = model_info(str(folder))
    assert (info["end_of_turn_tokens"], info["stop_tokens"]) == (["<|eot_id|>"], ["<|eot_id|>"])


def test_the_ollama_modelfile_of_chatml_on_llama3_ends_turns_and_stops_at_eot_id(llama3):
    from tuneforge.exporting.ollama import modelfile

    written = modelfile(load_tokenizer(str(llama3["base"]), template="chatml"), "model.gguf")
    assert "{{ .Content }}<|eot_id|>\n" in written and "<|im_start|>assistant\n" in written
    assert written.endswith('PARAMETER stop "<|eot_id|>"\n')


@pytest.mark.parametrize("bad", ["no generation prompt", "spans not found"])
def test_data_prepare_refuses_a_template_a_run_would_refuse_before_writing_any_row(llama3, tmp_path, bad):
    from tuneforge.data.write import prepare_command

    template, reason = BAD[bad]
    path = config_file(tmp_path, llama3, template)
    with pytest.raises(ConfigError, match=rf"model.chat_template \(.*run.yaml line \d+\): .*{reason}"):
        prepare_command(path, out=tmp_path / "prepared", progress=False)
    assert not (tmp_path / "prepared").exists()
