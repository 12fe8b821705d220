"""Big models on small memory, on the tiny model: frozen weights in the compute dtype, quantized bases
(bitsandbytes, on CPU), 8-bit optimizers, the loss in chunks, and the dry run's memory plan."""

import json
import platform
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import tiny_run_config

from tuneforge.config import load_config
from tuneforge.errors import ConfigError, TuneforgeError
from tuneforge.methods import load_for_training
from tuneforge.methods.sft import output_logits
from tuneforge.models import bf16_supported, load_model, resolve
from tuneforge.training import train

pytestmark = pytest.mark.usefixtures("one_thread")

native_bf16 = pytest.mark.skipif(not bf16_supported(torch.device("cpu")), reason="this CPU has no native bf16")


def step_losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row["train_loss"] for row in rows if "train_loss" in row]


def config(model_dir, data, out, *, quantize="none", dtype="auto", **train_options) -> dict:
    cfg = tiny_run_config(model_dir, data, out, **{"max_steps": 3, "learning_rate": 1e-2, **train_options})
    cfg["lora"]["dropout"] = 0.0
    cfg["model"] = {"quantize": quantize, "dtype": dtype}
    return cfg


def base_and_adapter_dtypes(model) -> tuple[set, set]:
    base = {p.dtype for n, p in model.named_parameters() if "lora_" not in n}
    return base, {p.dtype for n, p in model.named_parameters() if "lora_" in n}


@native_bf16
def test_with_adapters_the_frozen_base_is_held_in_bf16_and_what_trains_in_fp32(tiny_model_dir, triage_data, tmp_path):
    cfg = load_config(config(tiny_model_dir, triage_data, tmp_path / "run", precision="auto"))
    model = load_for_training(resolve(str(tiny_model_dir)), cfg, precision="bf16", device=torch.device("cpu"))
    assert base_and_adapter_dtypes(model) == ({torch.bfloat16}, {torch.float32})
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    full = load_config({**config(tiny_model_dir, triage_data, tmp_path / "full"), "method": "full"})
    model = load_for_training(resolve(str(tiny_model_dir)), full, precision="bf16", device=torch.device("cpu"))
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # full fine-tuning trains in fp32
    result = train(config(tiny_model_dir, triage_data, tmp_path / "trained", precision="bf16"), progress=False)
    losses = step_losses(result.output_dir)
    assert losses[-1] < losses[0]


def test_model_dtype_auto_follows_the_compute_precision(tiny_model_dir, triage_data, tmp_path):
    cfg = load_config(config(tiny_model_dir, triage_data, tmp_path / "run", precision="fp32"))
    model = load_for_training(resolve(str(tiny_model_dir)), cfg, precision="fp32", device=torch.device("cpu"))
    assert base_and_adapter_dtypes(model) == ({torch.float32}, {torch.float32})
    with pytest.raises(ConfigError, match="model.dtype: bf16 holds the frozen weights in bf16.*train.precision"):
        load_config(config(tiny_model_dir, triage_data, tmp_path / "run", dtype="bf16", precision="fp32"))


@pytest.mark.parametrize("quantize", ["nf4", "fp4", "int8"])
def test_a_quantized_base_trains_lora_and_saves_the_adapter_alone(quantize, tiny_model_dir, triage_data, tmp_path):
    from bitsandbytes.nn import Linear4bit, Linear8bitLt
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = load_config(config(tiny_model_dir, triage_data, tmp_path / "run", quantize=quantize))
    model = load_for_training(resolve(str(tiny_model_dir)), cfg, precision="fp32", device=torch.device("cpu"))
    layer = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(layer, Linear8bitLt if quantize == "int8" else Linear4bit)
    result = train(
        config(tiny_model_dir, triage_data, tmp_path / "run", quantize=quantize, max_steps=6), progress=False
    )
    losses = step_losses(result.output_dir)
    assert losses[-1] < losses[0]
    saved = {f.name for f in (result.output_dir / "checkpoints" / "step-6").iterdir()}
    assert "adapter_model.safetensors" in saved and "model.safetensors" not in saved
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), result.final_dir)
    assert tuned.peft_config["default"].r == 4  # loads on the full-precision base, in plain PEFT


@pytest.mark.parametrize("quantize", ["nf4", "fp4"])
def test_an_eval_pass_leaves_the_gradients_through_a_4bit_base_whole(quantize, tiny_model_dir, triage_data, tmp_path):
    # bitsandbytes repacks a 4-bit weight for its inference kernel (no backward) on a CPU with AVX512-BF16
    # when the layer first runs in eval mode: validation passes and GRPO's sampling come between steps.
    cfg = load_config(config(tiny_model_dir, triage_data, tmp_path / "run", quantize=quantize))
    model = load_for_training(resolve(str(tiny_model_dir)), cfg, precision="fp32", device=torch.device("cpu"))
    ids = torch.arange(3, 40).unsqueeze(0)

    def gradients() -> dict:
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = gradients()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    after = gradients()
    for name, grad in before.items():
        torch.testing.assert_close(after[name], grad, msg=name)


@pytest.mark.parametrize(
    "method, section",
    [("full", {}), ("distill", {"distill": {"teacher": "t", "student": "full"}}), ("dpo", {"dpo": {"policy": "full"}})],
)
def test_a_quantized_base_is_refused_where_every_weight_trains(method, section, tmp_path):
    raw = {"data": {"train": "x"}, "method": method, "model": {"quantize": "nf4"}, **section}
    with pytest.raises(ConfigError, match="model.quantize: nf4 holds the base frozen.*trains every weight.*lora"):
        load_config(raw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for CPUs")
def test_dora_on_an_int8_base_is_refused_before_training_on_a_cpu(tiny_model_dir, triage_data, tmp_path):
    # It fails inside bitsandbytes on the first step otherwise; nf4 under DoRA trains.
    cfg = config(tiny_model_dir, triage_data, tmp_path / "run", quantize="int8", max_steps=1)
    cfg["method"] = "dora"
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    lines = path.read_text().splitlines()
    method = next(i for i, text in enumerate(lines, 1) if text.startswith("method:"))
    quantize = next(i for i, text in enumerate(lines, 1) if "quantize:" in text)
    with pytest.raises(ConfigError, match="method: dora on model.quantize: int8 does not run on a CPU") as error:
        train(path, progress=False)
    assert f"method ({path} line {method}), model.quantize ({path} line {quantize}): " in error.value.message
    assert not (tmp_path / "run" / "checkpoints").exists()
    cfg["model"]["quantize"] = "nf4"
    assert train(cfg, progress=False).status == "completed"


def test_dpo_from_a_lora_run_on_a_quantized_base_is_refused_before_training(tiny_model_dir, triage_data, tmp_path):
    from test_dpo import preference_rows

    first = train(config(tiny_model_dir, triage_data, tmp_path / "sft", max_steps=1), progress=False)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in preference_rows(Path(triage_data["train"]))))
    cfg = config(first.output_dir, {"train": pairs, "validation": pairs}, tmp_path / "dpo", quantize="nf4")
    cfg["method"] = "dpo"
    cfg["data"]["validation"] = None
    with pytest.raises(TuneforgeError, match="export the run merged"):
        train(cfg, progress=False)
    assert not (tmp_path / "dpo" / "checkpoints").exists()


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit"])
def test_8bit_adamw_keeps_its_state_in_a_byte_a_value_trains_and_resumes_exactly(
    optimizer, tiny_model_dir, triage_data, tmp_path
):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    cfg = config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=4, optimizer=optimizer, save_every=2)
    cfg["method"] = "full"
    cfg["train"]["keep_checkpoints"] = 2
    result = train(cfg, progress=False)
    losses = step_losses(result.output_dir)
    assert losses[-1] < losses[0]
    checkpoints = result.output_dir / "checkpoints"
    dcp_to_torch_save(checkpoints / "step-4" / "optimizer", tmp_path / "optimizer.pt")
    state = torch.load(tmp_path / "optimizer.pt", weights_only=False)
    quantized = [
        s["__bnb_optimizer_quant_state__"] for s in state["state"].values() if "__bnb_optimizer_quant_state__" in s
    ]
    # bitsandbytes keeps small tensors' moments in fp32; every weight matrix's are 8-bit blocks.
    moments = [q[key] for q in quantized for key in ("state1", "state2") if q[key].numel() >= 4096]
    assert moments and all(m.dtype == torch.uint8 for m in moments)

    # From step 2 again: the 8-bit state comes back as it was, so steps 3 and 4 repeat to the bit.
    shutil.rmtree(checkpoints / "step-4")
    train(cfg, resume="latest", progress=False)
    assert step_losses(result.output_dir) == losses


@pytest.mark.parametrize("head", ["trained", "frozen"])
def test_the_loss_in_chunks_equals_the_loss_at_once_and_so_do_its_gradients(head, tiny_model_dir, monkeypatch):
    from tuneforge.methods import sft

    torch.manual_seed(0)
    model = load_model(resolve(str(tiny_model_dir)), dtype=torch.float32)
    if head == "frozen":  # as under adapters: the output layer takes no gradient, the layers below do
        model.get_output_embeddings().weight.requires_grad_(False)
    ids = torch.randint(5, 300, (3, 40))
    labels = torch.where(torch.rand(3, 40) < 0.7, torch.roll(ids, -1, 1), torch.tensor(-100))
    targets = labels[labels != -100]
    weights = torch.rand(len(targets))
    n_chunks = -(-len(targets) // 7)
    vocab = model.get_output_embeddings().weight.shape[0]
    trained = [p for p in model.parameters() if p.requires_grad]
    runs = {}
    for name, at_once in (("whole", sft.LOGITS_AT_ONCE), ("chunks of 7 tokens", 7 * vocab)):
        monkeypatch.setattr(sft, "LOGITS_AT_ONCE", at_once)
        seen = []

        def counted(lm, hidden, seen=seen):
            seen.append(len(hidden))
            return output_logits(lm, hidden)

        monkeypatch.setattr(sft, "output_logits", counted)
        model.zero_grad()
        token_ce, correct = sft.token_cross_entropy(model, sft.trained_hidden(model, ids, labels), targets)
        # Weighted per token, as GRPO's advantages and DPO's pairs weigh them.
        (token_ce * weights).sum().backward()
        runs[name] = (token_ce.detach(), correct, [p.grad.clone() for p in trained], seen)
    whole, chunked = runs["whole"], runs["chunks of 7 tokens"]
    assert max(chunked[3]) == 7 < max(whole[3])  # at most 7 tokens' logits at once
    # A frozen output layer's chunks run once, their gradient taken on the way; a trained one's run again in backward.
    assert len(chunked[3]) == n_chunks * (1 if head == "frozen" else 2)
    torch.testing.assert_close(chunked[0], whole[0], rtol=1e-6, atol=1e-6)
    assert chunked[1] == whole[1]
    for a, b in zip(chunked[2], whole[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("quantize, optimizer", [("none", "adamw"), ("nf4", "adamw"), ("int8", "adamw_8bit")])
def test_gradient_checkpointing_gives_the_same_losses(quantize, optimizer, tiny_model_dir, triage_data, tmp_path):
    losses = {}
    for checkpointing in (False, True):
        out = tmp_path / f"run-{checkpointing}"
        cfg = config(
            tiny_model_dir,
            triage_data,
            out,
            quantize=quantize,
            optimizer=optimizer,
            gradient_checkpointing=checkpointing,
        )
        train(cfg, progress=False)
        losses[checkpointing] = step_losses(out)
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_the_merged_export_of_a_quantized_run_folds_the_adapter_into_the_full_precision_base(
    tiny_model_dir, triage_data, tmp_path
):
    from tuneforge.exporting import export

    result = train(config(tiny_model_dir, triage_data, tmp_path / "run", quantize="nf4"), progress=False)
    exported = export(str(result.output_dir), "merged", None, tmp_path / "merged")
    record = json.loads((exported.out / "export.json").read_text())
    assert "nf4-quantized base" in record["source"]["trained_on"] and "full precision" in record["source"]["trained_on"]
    base = load_model(resolve(str(tiny_model_dir)))
    merged = load_model(resolve(str(exported.out)))
    # The merge is into the original fp32 weights: the weights the adapter does not touch are bit-identical.
    assert torch.equal(merged.model.embed_tokens.weight, base.model.embed_tokens.weight)


def test_validate_states_the_memory_plan_by_part(tiny_model_dir, triage_data, tmp_path, capsys, monkeypatch):
    from tuneforge.dry_run import validate

    monkeypatch.setenv("COLUMNS", "300")  # one table row a line

    cfg = config(
        tiny_model_dir,
        triage_data,
        tmp_path / "run",
        quantize="nf4",
        optimizer="adamw_8bit",
        gradient_checkpointing=True,
    )
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert validate(str(path)) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "decoder linear layers nf4" in out
    for part in ("frozen weights", "trained weights and gradients", "optimizer state", "activations", "logits"):
        assert part in out
    # On a CPU the process's own imports (about 0.44 GiB of RSS before any model loads) share the memory too.
    assert ("torch and transformers imported 0.44" in out) == (not torch.cuda.is_available())


def test_validate_on_a_cpu_counts_every_process_of_the_machine_against_its_memory(
    tiny_model_dir, triage_data, tmp_path, capsys, monkeypatch
):
    from tuneforge.dry_run import memory_rows, validate

    monkeypatch.setenv("COLUMNS", "300")  # one table row a line
    cfg = config(tiny_model_dir, triage_data, tmp_path / "run", batch_size=8)
    cfg["train"]["distributed"] = "ddp"
    # Two machines of two processes: each machine's two processes share its memory.
    assert validate(cfg, processes=4, machines=2) == 0
    out = " ".join(capsys.readouterr().out.split())
    # On GPUs each process holds its own device's memory, which no other process shares.
    assert ("GiB free, 2 processes sharing this machine's memory, each" in out) == (not torch.cuda.is_available())
    gib = 2**30
    (row,) = memory_rows({"frozen weights": 3 * gib, "activations": 1 * gib}, 10 * gib, sharing=2)
    assert row[1].startswith("8.0 GiB of 10.0 GiB free, 2 processes sharing this machine's memory, each 4.0 GiB:")


def test_the_memory_plan_counts_the_teacher_or_reference_copy_a_run_holds(
    tiny_model_dir, triage_data, tmp_path, capsys, monkeypatch
):
    from tiny import save_tiny_model

    from tuneforge.dry_run import frozen_copy_parameters, validate

    monkeypatch.setenv("COLUMNS", "300")  # one table row a line
    teacher = save_tiny_model(tmp_path / "teacher", hidden=512, layers=4)
    teacher_gib = sum(p.numel() for p in load_model(resolve(str(teacher))).parameters()) * 4 / 2**30
    cfg = config(tiny_model_dir, triage_data, tmp_path / "run")
    cfg["method"], cfg["distill"] = "distill", {"teacher": str(teacher)}
    assert validate(cfg) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"teacher or reference copy {teacher_gib:.2f} (GiB)" in out and f"{teacher_gib:.2f}" != "0.00"

    # A full DPO policy's reference is a frozen copy of the starting model; a LoRA policy's is its disabled adapter;
    # simpo and orpo have no reference at all.
    n = sum(p.numel() for p in load_model(resolve(str(tiny_model_dir))).parameters())
    for policy, loss, copy in (("full", "sigmoid", n), ("full", "ipo", n), ("lora", "sigmoid", 0)) + tuple(
        (policy, loss, 0) for policy in ("full", "lora") for loss in ("simpo", "orpo")
    ):
        dpo = load_config(
            {
                **config(tiny_model_dir, triage_data, tmp_path / "dpo"),
                "method": "dpo",
                "dpo": {"policy": policy, "loss": loss},
            }
        )
        assert frozen_copy_parameters(dpo, n) == copy, (policy, loss)


def test_the_warning_of_a_plan_that_does_not_fit_offers_only_what_the_config_accepts(
    tiny_model_dir, triage_data, tmp_path, capsys, monkeypatch
):
    from tuneforge import dry_run

    monkeypatch.setenv("COLUMNS", "300")  # one table row a line
    monkeypatch.setattr(dry_run, "available_memory", lambda device: 1)
    full = {**config(tiny_model_dir, triage_data, tmp_path / "full"), "method": "full"}
    assert dry_run.validate(full) == 0
    out = " ".join(capsys.readouterr().out.split())
    # A quantized base is refused where every weight trains: adapters come first.
    assert "train adapters instead of every weight (method: full -> lora)" in out and "model.quantize: nf4" not in out
    # The verdict says what still stands in the way, not "ok" alone.
    assert "ok, but: run it where its memory plan fits, or lower the plan" in out and "nothing found" not in out
    quantized = config(tiny_model_dir, triage_data, tmp_path / "nf4", quantize="nf4", gradient_checkpointing=True)
    assert dry_run.validate(quantized) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "has free (0.0 GiB): lower data.max_length or the batch." in out


@pytest.mark.parametrize("positions", ["answers", "all"])
@pytest.mark.parametrize("top_k", [None, 8])
def test_the_memory_plan_holds_what_distillation_keeps_of_its_vocabulary_wide_tensors(
    tiny_model_dir, tmp_path, positions, top_k
):
    """Distillation's loss is unchunked: the plan's logits part covers the vocabulary-wide tensors a
    forward keeps for the backward (counted with autograd's saved-tensor hooks), without inflating them."""
    from tuneforge import data as tfdata
    from tuneforge.dry_run import memory_plan
    from tuneforge.methods import batch_items, build_objective, prepare_items, prepare_model
    from tuneforge.models import load_tokenizer

    rows = [
        {"messages": [{"role": "user", "content": f"question {i} " * 20}, {"role": "assistant", "content": f"ok {i}"}]}
        for i in range(4)
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    distill = {"teacher": str(tiny_model_dir), "student": "lora", "positions": positions, "teacher_top_k": top_k}
    cfg = load_config(
        {
            "base_model": str(tiny_model_dir),
            "method": "distill",
            "distill": distill,
            "data": {"train": str(tmp_path / "train.jsonl"), "validation": None, "packing": False},
            "train": {"batch_size": 4, "precision": "fp32"},
            "output_dir": str(tmp_path / "run"),
        }
    )
    tokenizer = load_tokenizer(str(tiny_model_dir))
    items, _ = batch_items(prepare_items(cfg, tokenizer, log=lambda *a, **k: None), cfg)
    model = prepare_model(load_model(resolve(str(tiny_model_dir))), cfg)
    objective = build_objective(model, cfg, tokenizer, dtype=torch.float32, device=torch.device("cpu"))
    if top_k:
        objective.cache_teacher(items, tokenizer.pad_token_id, torch.device("cpu"), batch_rows=4, progress=False)
    batch = tfdata.collate(items, tokenizer.pad_token_id)
    vocab = model.config.vocab_size
    kept = []

    def note(tensor):
        if tensor.dim() and tensor.shape[-1] == vocab:
            kept.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(note, lambda tensor: tensor):
        objective(**{name: value for name, value in batch.items() if name != "is_replay"})
    rows, length = batch["input_ids"].shape
    share = float((batch["labels"] != tfdata.IGNORE_INDEX).sum()) / (rows * length)
    plan = SimpleNamespace(micro_batch_rows=rows)
    planned = memory_plan((1, 1, 1, 0), model.config, cfg, plan, length, "fp32", trained_share=share)["logits"]
    assert sum(kept) <= planned <= 2.5 * sum(kept), (sum(kept), planned)


def test_the_fsdp_plan_counts_what_each_process_gathers_whole_to_compute(
    tiny_model_dir, triage_data, tmp_path, capsys, monkeypatch
):
    """FSDP shards weights, gradients and optimizer state, but each process holds its root unit
    (embeddings, final norm, output layer) whole through the forward and backward, and a decoder
    layer with the next one prefetched: the plan of a sharded run counts them beside the shards."""
    from tuneforge.dry_run import memory_plan, parameter_counts, validate

    monkeypatch.setenv("COLUMNS", "300")  # one table row a line
    cfg = {**config(tiny_model_dir, triage_data, tmp_path / "run"), "method": "full"}
    model = load_model(resolve(str(tiny_model_dir)))
    layers = [sum(p.numel() for p in layer.parameters()) for layer in model.model.layers]
    root = sum(p.numel() for p in model.parameters()) - sum(layers)
    n, trainable, linear, gathered, hf_config, _ = parameter_counts(resolve(str(tiny_model_dir)), load_config(cfg))
    assert gathered == root + 2 * max(layers)
    plan = SimpleNamespace(micro_batch_rows=1)
    whole = memory_plan((n, trainable, linear, 0), hf_config, load_config(cfg), plan, 64, "fp32")
    sharded = memory_plan((n, trainable, linear, 0), hf_config, load_config(cfg), plan, 64, "fp32", 2, 1.0, gathered)
    assert "gathered to compute" not in whole
    assert sharded["gathered to compute"] == gathered * 4
    assert sharded["optimizer state"] == whole["optimizer state"] / 2
    assert validate(cfg, processes=2) == 0
    assert "gathered to compute" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("mlp", [2, 8])
@pytest.mark.parametrize("method, dropout", [("full", 0.0), ("lora", 0.0), ("lora", 0.1)])
def test_the_memory_plan_holds_the_activations_a_forward_keeps(
    tiny_model_dir, triage_data, tmp_path, mlp, method, dropout
):
    """Without gradient checkpointing the plan's activations cover what autograd keeps for the backward
    (counted with its saved-tensor hooks), for narrow and wide MLPs (Gemma's is 8 times the hidden size)
    and with adapter dropout, without inflating it."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tuneforge.dry_run import memory_plan
    from tuneforge.methods import prepare_model

    hf_config = LlamaConfig(
        hidden_size=128,
        intermediate_size=128 * mlp,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
    )
    cfg = {**config(tiny_model_dir, triage_data, tmp_path / "run"), "method": method}
    cfg["lora"]["dropout"] = dropout
    cfg = load_config(cfg)
    torch.manual_seed(0)
    model = prepare_model(AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa"), cfg)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def note(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    length = 256
    with torch.autograd.graph.saved_tensors_hooks(note, lambda tensor: tensor):
        model(input_ids=torch.randint(0, 64, (1, length)))
    planned = memory_plan((1, 1, 1, 0), hf_config, cfg, SimpleNamespace(micro_batch_rows=1), length, "fp32")
    assert sum(kept.values()) <= planned["activations"] <= 1.5 * sum(kept.values()), (sum(kept.values()), planned)


def test_the_memory_plan_of_a_model_that_also_reads_images_uses_its_text_settings(
    triage_data, tmp_path, capsys, monkeypatch
):
    """Gemma 3 4B and up keep hidden size, layers and vocabulary under `text_config`: the dry run plans
    activations and logits from them, as for the same text model on its own."""
    from families import save_gemma3_multimodal_config
    from transformers import AutoConfig

    from tuneforge.dry_run import memory_plan, validate

    monkeypatch.setenv("COLUMNS", "300")  # one table row a line
    folder = save_gemma3_multimodal_config(tmp_path / "gemma3-mm")
    cfg = config(folder, triage_data, tmp_path / "run")
    assert validate(cfg) == 0
    assert "activations" in " ".join(capsys.readouterr().out.split())
    hf_config = AutoConfig.from_pretrained(folder)
    plan = SimpleNamespace(micro_batch_rows=2)
    both = memory_plan((1, 1, 1, 0), hf_config, load_config(cfg), plan, 64, "fp32")
    text = memory_plan((1, 1, 1, 0), hf_config.text_config, load_config(cfg), plan, 64, "fp32")
    assert both == text and both["activations"] > 0


def test_the_memory_plan_counts_the_checkpoint_file_a_quantized_load_reads_whole(
    triage_data, tmp_path, capsys, monkeypatch
):
    from tiny import tiny_llama, tiny_tokenizer

    from tuneforge import dry_run
    from tuneforge.models.loading import largest_shard_bytes

    monkeypatch.setenv("COLUMNS", "400")  # one table row a line
    base = tmp_path / "sharded"
    tiny_llama(hidden=2048, layers=1).save_pretrained(base, max_shard_size="100MB")
    tiny_tokenizer().save_pretrained(base)
    files = sorted(base.glob("model-*.safetensors"))
    assert len(files) > 1 and largest_shard_bytes(base) == max(f.stat().st_size for f in files)
    cfg = config(base, triage_data, tmp_path / "run", quantize="nf4", gradient_checkpointing=True, batch_size=1)
    assert dry_run.validate(cfg) == 0
    (row,) = [line for line in capsys.readouterr().out.splitlines() if "memory plan (estimate)" in line]
    gib = 2**30
    shard = largest_shard_bytes(base) / gib
    if torch.cuda.is_available():  # the shard is read into host memory, the device holds the quantized weights
        assert "loading" not in row
        return
    # On a CPU the load holds the largest file in fp32 beside the quantized weights: more than training holds here.
    assert "peak while the quantized base loads" in row and f"checkpoint file read whole {shard:.2f}" in row
    loading = float(row.split("loading ")[1].split(":")[0])
    training = float(row.split("training ")[1].split(":")[0])
    assert training < loading
    # Memory enough for training but not for the load is no "ok": the warning says the load is the peak.
    monkeypatch.setattr(dry_run, "available_memory", lambda device: (training + loading) / 2 * gib)
    assert dry_run.validate(cfg) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "ok, but: run it where its memory plan fits" in out
    assert "its peak is the load, which reads the checkpoint's largest file" in out and "max_shard_size" in out


JEMALLOC = Path(f"/usr/lib/{platform.machine()}-linux-gnu/libjemalloc.so.2")


def allocator_warning_in_a_process(step_bytes: float, preload: str = "", first: str = "") -> str:
    """What `allocator_warning` says on the CPU in a process of its own, with `preload` as its LD_PRELOAD (none
    by default, whatever this process has: a developer may preload jemalloc, as the README advises), after
    running the Python code `first`."""
    import os
    import subprocess
    import sys

    code = f"import platform, torch\n{first}\nfrom tuneforge.training import step_memory\n"
    code += f"print(step_memory.allocator_warning(torch.device('cpu'), {step_bytes}))"
    env = {**os.environ, "LD_PRELOAD": preload}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_big_cpu_step_under_glibc_malloc_is_warned_of_with_jemalloc_as_the_remedy():
    """glibc's malloc holds a long step's freed activations; the warning names the preload that returns them."""
    from tuneforge.training.step_memory import FRAGMENTING_STEP_BYTES, allocator_warning

    assert platform.libc_ver()[0] == "glibc"  # what the warning is about: this process runs on glibc's malloc
    said = allocator_warning_in_a_process(2 * FRAGMENTING_STEP_BYTES)
    assert "(0.50 GiB)" in said and f"LD_PRELOAD={JEMALLOC}" in said, said
    # What docs/LOG.md measured: peaks of 1.9-2.3 GiB against a plan of 1.1 at 2 rows of 512 tokens, and of 5.5 GB
    # and more against 1.3 GiB at 4 rows of 1,024.
    assert "can peak at twice the memory plan or more" in said, said
    assert allocator_warning(torch.device("cpu"), FRAGMENTING_STEP_BYTES / 2) is None
    assert allocator_warning(torch.device("meta"), 2 * FRAGMENTING_STEP_BYTES) is None  # not host memory


def test_the_allocator_warning_names_the_jemalloc_of_this_machines_architecture():
    """On an ARM machine (Debian/Ubuntu's aarch64-linux-gnu) a preload of the x86_64 path is ignored by ld.so:
    the run goes on under glibc's malloc as before."""
    said = allocator_warning_in_a_process(2**29, first="platform.machine = lambda: 'aarch64'")
    assert "LD_PRELOAD=/usr/lib/aarch64-linux-gnu/libjemalloc.so.2 " in said, said


@pytest.mark.skipif(not JEMALLOC.is_file(), reason="no jemalloc here: apt-get install libjemalloc2 (.ci/run does)")
def test_a_process_with_jemalloc_preloaded_is_not_warned():
    assert allocator_warning_in_a_process(2**30, preload=str(JEMALLOC)) == "None"


def step_sizes_told(monkeypatch) -> list[float]:
    """The step sizes validate and train give the allocator warning, in the order they give them."""
    from tuneforge import dry_run
    from tuneforge.training import loop, step_memory

    sized = []

    def recording(device, step_bytes):
        sized.append(step_bytes)
        return step_memory.allocator_warning(device, step_bytes)

    monkeypatch.setattr(dry_run, "allocator_warning", recording)
    monkeypatch.setattr(loop, "allocator_warning", recording)
    return sized


def test_train_warns_of_glibc_malloc_before_training_from_the_step_validate_sizes(
    tiny_model_dir, triage_data, tmp_path, capsys, monkeypatch
):
    """`tuneforge train` says what `validate` says of a step glibc's malloc will hold, before its first step, from
    the same size of step: a user who trains without validating first is told too."""
    from tuneforge import dry_run
    from tuneforge.training import step_memory

    sized = step_sizes_told(monkeypatch)
    monkeypatch.setattr(step_memory, "RETURNING_ALLOCATORS", ())  # as without jemalloc, where a developer preloads it
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=1)))
    assert dry_run.validate(str(path)) == 0
    (planned,) = sized
    assert planned > 0
    capsys.readouterr()
    monkeypatch.setattr(step_memory, "FRAGMENTING_STEP_BYTES", planned)  # the tiny model's step as a big one
    train(str(path), progress=False)
    out = capsys.readouterr().out
    assert sized == [planned, planned]
    (said,) = [line for line in out.splitlines() if "glibc's malloc keeps what a step frees" in line]
    assert said.startswith("warning: a step's activations and logits") and "LD_PRELOAD=" in said


def test_validate_plans_the_rows_train_makes_where_the_distill_teacher_cannot_attend_per_example(
    tiny_model_dir, triage_data, tmp_path, monkeypatch
):
    """Packed rows share their prompts' prefix only where every model of the forward attends per example: a teacher
    that cannot (a sliding window shorter than the rows) makes train lay rows out unshared, and validate's plan of
    them, and so the step its memory plan and the allocator warning count, is of those rows too."""
    from tuneforge import dry_run

    teacher = shutil.copytree(tiny_model_dir, tmp_path / "teacher")
    settings = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**settings, "sliding_window": 16}))
    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=1)
    cfg = {k: v for k, v in cfg.items() if k != "lora"} | {
        "method": "distill",
        "distill": {"teacher": str(teacher), "student": "full"},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    sized = step_sizes_told(monkeypatch)
    assert dry_run.validate(str(path)) == 0
    train(str(path), progress=False)
    planned, trained = sized
    assert planned == trained
