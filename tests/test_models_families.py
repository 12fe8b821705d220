"""Model families: which family a model is, the warning for one the matrix does not cover, the
registry Gemma's chat template, and SentencePiece vocabularies kept through GGUF conversions."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
from families import FAMILIES, TEMPLATES, save_family_model

from tuneforge.models import REGISTRY, load_tokenizer, model_info
from tuneforge.models.commands import models_info
from tuneforge.models.convert import MODEL_RECORD, cached_registry_folder, registry_template
from tuneforge.models.families import FAMILIES as TESTED
from tuneforge.models.families import family_of
from tuneforge.models.loading import HeldTokens

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def untested_model(tmp_path_factory, tokenizer) -> Path:
    """A GPT-2 with the tiny ChatML tokenizer: an architecture the family matrix does not cover."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("untested") / "gpt2-chat"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_matrix_family_is_a_tested_family(name, tmp_path):
    folder = save_family_model(FAMILIES[name], tmp_path / name)
    info = model_info(str(folder))
    assert info["family"] == FAMILIES[name].title and info["family_tested"]
    assert FAMILIES[name].end_of_turn in info["end_of_turn_tokens"]
    assert info["chat_template_source"] == f"the model's own ({name}/chat_template.jinja)"


def test_every_tested_family_is_in_the_matrix():
    assert {f.name for f in TESTED} == set(FAMILIES)


def test_a_template_of_another_family_is_no_tested_family():
    llama3 = (TEMPLATES / "llama3.jinja").read_text()
    vocab = {"<|start_header_id|>", "<|eot_id|>"}
    assert family_of("llama", llama3, vocab).name == "llama3"
    assert family_of("qwen2", llama3, vocab) is None  # Qwen's architecture with Llama 3's turns
    assert family_of("llama", None, vocab) is None


def test_held_tokens_are_the_vocabulary_s_own(tokenizer):
    """Token by token as `get_vocab()` whole: a token it lacks reads back as the unknown token, not as held."""
    vocab = tokenizer.get_vocab()
    held = HeldTokens(tokenizer)
    assert all(token in held for token in list(vocab)[:500])
    assert tokenizer.unk_token is None or tokenizer.unk_token in held
    for absent in ("<end_of_turn>", "<|eot_id|>", "no-such-token-anywhere"):
        assert absent not in vocab and absent not in held


def test_an_untested_family_warns_once_and_models_info_says_not_tested(untested_model, tmp_path, capsys):
    with pytest.warns(UserWarning, match=r"gpt2-chat \(gpt2\) is not a model family tuneforge is tested on"):
        load_tokenizer(str(untested_model))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_tokenizer(str(untested_model))  # once per model, not at every load
    namesake = shutil.copytree(untested_model, tmp_path / "elsewhere" / untested_model.name)
    with pytest.warns(UserWarning, match=r"gpt2-chat \(gpt2\) is not a model family"):
        load_tokenizer(str(namesake))  # another model of the same name
    assert models_info(str(untested_model)) == 0
    out = capsys.readouterr().out
    assert "not tested:" in out and "gpt2 with this chat template" in out


def test_the_registry_gemma_has_google_s_published_gemma_3_template():
    entry = REGISTRY["gemma3-270m"]
    assert registry_template(entry) == (TEMPLATES / "gemma3.jinja").read_text().removesuffix("\n")
    assert registry_template(REGISTRY["smollm2-135m-instruct"]) is None  # its GGUF carries its own


def test_a_registry_folder_converted_before_its_template_was_pinned_is_converted_again(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path))
    entry = REGISTRY["gemma3-270m"]
    folder = tmp_path / "models" / entry.name
    folder.mkdir(parents=True)
    for member in entry.licence_files:
        (folder / Path(member).name).write_text("terms")
    record = {"name": entry.name, "sha256": entry.gguf_sha256}
    (folder / MODEL_RECORD).write_text(json.dumps(record))
    assert cached_registry_folder(entry) is None
    (folder / MODEL_RECORD).write_text(json.dumps({**record, "chat_template": entry.chat_template}))
    assert cached_registry_folder(entry) == folder


def test_a_sentencepiece_gguf_converts_into_a_folder_that_exports_the_same_vocabulary(tmp_path, monkeypatch):
    from gguf import GGUFReader
    from rich.console import Console

    from tuneforge.exporting import export, llama_cpp
    from tuneforge.models.convert import convert_local_gguf

    converter = llama_cpp.converter_folder(Console(quiet=True))
    monkeypatch.setattr(llama_cpp, "converter_folder", lambda console: converter)
    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path / "home"))
    base = save_family_model(FAMILIES["gemma3"], tmp_path / "gemma3")
    first = export(base, "gguf", "f32", tmp_path / "one", progress=False)
    folder = convert_local_gguf(first.files[0], progress=False)
    assert (folder / "tokenizer.model").is_file()  # rebuilt from the GGUF's own vocabulary
    second = export(str(first.files[0]), "gguf", "f32", tmp_path / "two", progress=False)
    vocabularies = [GGUFReader(result.files[0]).fields for result in (first, second)]
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
        assert vocabularies[0][key].contents() == vocabularies[1][key].contents()
    assert second.checks["tokenizer_roundtrip_identical"]


@pytest.mark.parametrize(
    "lora", [{"target_modules": "all-linear"}, {"target_modules": ["q_proj", "v_proj"]}, {"from_layer": 0.5}]
)
def test_adapters_on_a_model_that_also_reads_images_sit_in_its_text_decoder_only(lora, tmp_path):
    """Gemma 3 4B's vision encoder has q_proj, k_proj, ... too, and layers numbered like the decoder's:
    text-only training never reaches it, so adapters go on the text decoder's linear layers alone."""
    import torch
    from families import save_gemma3_multimodal_config
    from transformers import AutoConfig, AutoModelForCausalLM

    from tuneforge.config import load_config
    from tuneforge.methods import prepare_model

    folder = save_gemma3_multimodal_config(tmp_path / "gemma3-mm")
    (tmp_path / "train.jsonl").write_text("")
    cfg = load_config(
        {"base_model": str(folder), "lora": {"r": 4, **lora}, "data": {"train": str(tmp_path / "train.jsonl")}}
    )
    with torch.device("meta"):
        both = prepare_model(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder)), cfg)
        text = prepare_model(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder).text_config), cfg)
    adapted = [name for name, p in both.named_parameters() if p.requires_grad]
    assert adapted and all(".language_model." in name for name in adapted)
    assert len(adapted) == sum(p.requires_grad for p in text.parameters())


def test_models_info_reads_the_text_settings_of_a_model_that_also_reads_images(tmp_path):
    """Gemma 3 4B and up keep vocabulary, context window and EOS under `text_config`, and a folder may
    have no generation_config.json: models info states them as for a text-only model."""
    from families import save_gemma3_multimodal_config

    info = model_info(str(save_gemma3_multimodal_config(tmp_path / "gemma3-mm")))
    assert (info["vocab_size"], info["context_length"]) == (
        len(load_tokenizer(str(tmp_path / "gemma3-mm"))),
        1024,
    )
    assert "<end_of_turn>" in info["stop_tokens"]


def test_a_llama_3_without_its_template_is_no_tested_family_under_the_chatml_fallback(tmp_path):
    # ChatML on Llama 3's vocabulary ends its turns with <|eot_id|>: the SmolLM2 family's format in name only.
    folder = save_family_model(FAMILIES["llama3"], tmp_path / "llama3-no-template")
    (folder / "chat_template.jinja").unlink()
    with pytest.warns(UserWarning, match=r"llama3-no-template \(llama\) is not a model family tuneforge is tested"):
        load_tokenizer(str(folder))
    info = model_info(str(folder))
    assert info["family"] is None and not info["family_tested"]
    assert info["end_of_turn_tokens"] == ["<|eot_id|>"]
