"""The system prompt a run's data shares travels with the tuned model: its chat template adds it to a
conversation that brings none, in chat, eval and the exports (serve: tests/test_serve.py)."""

import io
import json

import pytest
import yaml
from conftest import tiny_run_config
from families import TEMPLATES
from tiny import tiny_tokenizer
from typer.testing import CliRunner

from tuneforge.chat import chat_session
from tuneforge.cli import app
from tuneforge.config import DataConfig
from tuneforge.data import check_data
from tuneforge.eval.evaluate import evaluate
from tuneforge.exporting import export
from tuneforge.generate import encode_prompts, tokenizer_key
from tuneforge.models import load_model, load_tokenizer
from tuneforge.models.system_prompt import (
    record_system_prompt,
    recorded_system_prompt,
    with_system_prompt,
    without_recorded_system_prompt,
)
from tuneforge.tasks.support_triage import SYSTEM_PROMPT
from tuneforge.training import train

pytestmark = pytest.mark.usefixtures("one_thread")

HARD_PROMPTS = [
    'Reply in "JSON" only.\nNo prose.',
    "Backslashes \\n \\\\ and unicode: é, 日本, 🙂",
    "Jinja-looking text: {{ x }} {% endraw %} -%} {# not a comment #}",
]
HI = {"role": "user", "content": "Hi"}
WIDE = {"COLUMNS": "400"}  # a table cell on one line


def bare(rows_path, out_path):
    """The rows of a chat JSONL with their system messages taken out."""
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    out_path.write_text("".join(json.dumps({"messages": r["messages"][1:]}) + "\n" for r in rows))
    return out_path


def with_second_prompt(rows_path, out_path):
    """Every other row's system prompt changed: mixed system prompts."""
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    for row in rows[::2]:
        row["messages"][0]["content"] = "You answer tickets in plain English."
    out_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out_path


@pytest.fixture(scope="module")
def run_dir(base_dir, triage_data, tmp_path_factory):
    """The sharp tiny model (tiny_sharp.py) tuned: its answers change with the system prompt, so an answer
    given without the recorded prompt differs from one given with it."""
    out = tmp_path_factory.mktemp("system-prompt") / "run"
    train(tiny_run_config(base_dir, triage_data, out, max_steps=2, save_every=1), progress=False)
    return out


@pytest.fixture(scope="module")
def tuned(run_dir):
    return load_model(str(run_dir)).eval(), load_tokenizer(str(run_dir))


@pytest.mark.parametrize("template", sorted(p.name for p in TEMPLATES.glob("*.jinja") if p.stem != "gemma2"))
def test_a_bare_conversation_renders_as_with_the_recorded_prompt_in_every_family_template(template, tokenizer):
    original = (TEMPLATES / template).read_text()
    conversation = [HI, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    for prompt in HARD_PROMPTS:
        wrapped = with_system_prompt(original, prompt)

        def render(messages, chat_template):
            return tokenizer.apply_chat_template(
                messages, chat_template=chat_template, tokenize=False, add_generation_prompt=True
            )

        assert render(conversation, wrapped) == render([{"role": "system", "content": prompt}, *conversation], original)
        own = [{"role": "system", "content": "Be brief."}, *conversation]
        assert render(own, wrapped) == render(own, original)  # a conversation's own system message wins


def test_the_recorded_prompt_reads_back_exactly_and_is_replaced_not_stacked(tokenizer):
    original = tokenizer.chat_template
    try:
        for prompt in HARD_PROMPTS:
            record_system_prompt(tokenizer, prompt)
            assert recorded_system_prompt(tokenizer) == prompt
        assert tokenizer.chat_template == with_system_prompt(original, HARD_PROMPTS[-1])  # one header, the last
        with without_recorded_system_prompt(tokenizer):
            assert tokenizer.chat_template == original and recorded_system_prompt(tokenizer) is None
        assert recorded_system_prompt(tokenizer) == HARD_PROMPTS[-1]
        record_system_prompt(tokenizer, None)
        assert tokenizer.chat_template == original
    finally:
        tokenizer.chat_template = original


def test_a_tokenizers_key_follows_its_recorded_prompt():
    # The caches of a tokenizer's tables (generate.per_tokenizer) hold what its template gives apart.
    tokenizer = tiny_tokenizer()
    bare = tokenizer_key(tokenizer)
    record_system_prompt(tokenizer, "Answer in French.")
    prompted = tokenizer_key(tokenizer)
    assert prompted != bare
    with without_recorded_system_prompt(tokenizer):
        assert tokenizer_key(tokenizer) == bare
    assert tokenizer_key(tokenizer) == prompted


def test_the_run_records_the_prompt_its_data_shares(run_dir, tuned):
    report = json.loads((run_dir / "data_report.json").read_text())
    assert report["system_prompt"] == {
        "shared": SYSTEM_PROMPT,
        "distinct": 1,
        "rows_without": 0,
        "from_base_template": None,
    }
    assert json.loads((run_dir / "summary.json").read_text())["system_prompt"] == SYSTEM_PROMPT
    assert recorded_system_prompt(tuned[1]) == SYSTEM_PROMPT
    assert recorded_system_prompt(load_tokenizer(str(run_dir / "checkpoints" / "step-1"))) == SYSTEM_PROMPT
    assert recorded_system_prompt(load_tokenizer(str(run_dir / "final"))) == SYSTEM_PROMPT
    result = CliRunner().invoke(app, ["models", "info", str(run_dir), "--json"])
    assert json.loads(result.output)["system_prompt"] == SYSTEM_PROMPT


def test_chat_answers_a_bare_message_as_with_the_prompt_given(tuned):
    def chat(script, **options):
        output = io.StringIO()
        conversation = chat_session(*tuned, input=io.StringIO(script), output=output, max_new_tokens=8, **options)
        return conversation, output.getvalue()

    bare_conversation, shown = chat("Hi\n/show\n")
    given_conversation, _ = chat("Hi\n", system=SYSTEM_PROMPT)
    assert bare_conversation[-1] == given_conversation[-1]
    own_conversation, _ = chat("Hi\n", system="Hm.")
    assert own_conversation[-1] != given_conversation[-1]  # the answer depends on the system prompt
    assert f"(system message (the one the model was fine-tuned with): {SYSTEM_PROMPT})" in shown
    # The rendering itself: bare == with the prompt; a system message of the user's replaces it.
    tokenizer = tuned[1]
    prompts = [[HI], [{"role": "system", "content": SYSTEM_PROMPT}, HI], [{"role": "system", "content": "Hm."}, HI]]
    [bare_ids, given_ids, own_ids] = encode_prompts(tokenizer, prompts)
    assert bare_ids == given_ids and len(own_ids) < len(given_ids)
    # /system starts a new conversation under the new prompt: the earlier exchange is gone.
    conversation, shown = chat("Hi\n/system Be brief.\nHi\n/show\n")
    assert conversation[:2] == [{"role": "system", "content": "Be brief."}, HI] and len(conversation) == 3
    assert "(new conversation; system message: Be brief.)" in shown and "(system message: Be brief.)" in shown


def test_eval_of_bare_rows_equals_eval_with_the_prompt(run_dir, triage_data, tmp_path):
    given = evaluate(str(run_dir), str(triage_data["test"]), progress=False)
    without = evaluate(str(run_dir), str(bare(triage_data["test"], tmp_path / "bare.jsonl")), progress=False)
    assert [s["prediction"] for s in without["samples"]] == [s["prediction"] for s in given["samples"]]
    assert without["scores"] == given["scores"]


def test_the_gguf_template_and_the_modelfile_carry_the_prompt(run_dir, tuned, tmp_path):
    from gguf import GGUFReader

    result = export(run_dir, "gguf", "f16", tmp_path / "gguf", ollama=True, progress=False)
    fields = GGUFReader(result.files[0]).fields
    assert fields["tokenizer.chat_template"].contents() == tuned[1].chat_template
    modelfile = (result.out / "Modelfile").read_text()
    assert f'SYSTEM """{SYSTEM_PROMPT}"""' in modelfile
    # The Go template is the base's ChatML: the system turn is what the request (or SYSTEM) gives.
    assert "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}" in modelfile


def test_a_run_with_mixed_system_prompts_records_none_and_says_so(tiny_model_dir, triage_data, tmp_path):
    mixed = with_second_prompt(triage_data["train"], tmp_path / "mixed.jsonl")
    result = CliRunner().invoke(app, ["data", "check", str(mixed), "--model", str(tiny_model_dir)], env=WIDE)
    assert "2 different ones: none is saved with the model, so requests must bring their own" in result.output
    data = {**triage_data, "train": mixed}
    train(tiny_run_config(tiny_model_dir, data, tmp_path / "run", max_steps=1), progress=False)
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["system_prompt"]["shared"] is None and report["system_prompt"]["distinct"] == 2
    assert recorded_system_prompt(load_tokenizer(str(tmp_path / "run"))) is None


def test_tuning_a_tuned_model_again_keeps_the_prompt_its_bare_rows_are_rendered_with(run_dir, triage_data, tmp_path):
    tokenizer = load_tokenizer(str(run_dir))
    cfg = DataConfig(train=[str(bare(triage_data["train"], tmp_path / "bare.jsonl"))], validation=None)
    report = check_data(cfg, tokenizer)[0].report
    assert report["system_prompt"]["shared"] == SYSTEM_PROMPT
    assert report["system_prompt"]["rows_without"] == report["counts"]["train"]


def test_validate_states_the_prompt_that_will_be_recorded(tiny_model_dir, triage_data, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run")))
    result = CliRunner().invoke(app, ["validate", str(config)], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "saved with the model, for requests that bring none" in result.output
