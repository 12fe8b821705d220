"""lora.init: PiSSA and OLoRA train on a base with the adapter's start taken out; every model the run writes is the
trained one on the original base."""

import json

import pytest
import torch
import yaml
from conftest import tiny_run_config

from tuneforge.config import load_config
from tuneforge.errors import ConfigError, TuneforgeError
from tuneforge.exporting import export
from tuneforge.exporting.probe import probe_ids, probe_logits
from tuneforge.methods import prepare_model
from tuneforge.models import load_model, load_tokenizer, resolve
from tuneforge.models.saving import save_model
from tuneforge.training import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _max_diff(logits_a, logits_b) -> float:
    return max((a - b).abs().max().item() for a, b in zip(logits_a, logits_b, strict=True))


def _trained_in_memory(tiny_model_dir, triage_data, tmp_path, init: str, method: str = "lora"):
    """The model as training holds it, its adapter moved away from its start as training moves it, and its logits."""
    cfg = load_config(tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run") | {"method": method})
    cfg.lora.init = init
    source = resolve(str(tiny_model_dir))
    tokenizer = load_tokenizer(source)
    model = prepare_model(load_model(source), cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model, tokenizer, source, probe_logits(model, probe_ids(tokenizer))


@pytest.mark.parametrize(("init", "method"), [("pissa", "lora"), ("olora", "lora"), ("pissa_niter_2", "dora")])
def test_a_pissa_or_olora_adapter_is_written_and_exported_as_the_trained_model_on_the_original_base(
    init, method, tiny_model_dir, triage_data, tmp_path
):
    model, tokenizer, source, trained = _trained_in_memory(tiny_model_dir, triage_data, tmp_path, init, method)
    run = tmp_path / "run"
    save_model(model, tokenizer, source.path, run / "final")
    (run / "config.yaml").write_text(yaml.safe_dump({"base_model": str(tiny_model_dir), "method": method}))
    written = json.loads((run / "final" / "adapter_config.json").read_text())
    assert written["r"] == 8 and written["init_lora_weights"] is True  # [A; A0], [B, -B0] of r = 4 each

    # What eval and serve load: the original base with the adapter.
    final = load_model(resolve(str(run / "final")))
    assert _max_diff(probe_logits(final, probe_ids(tokenizer)), trained) < 1e-4
    with final.disable_adapter():  # the base eval compares with is the original one
        base = load_model(source)
        assert _max_diff(probe_logits(final, probe_ids(tokenizer)), probe_logits(base, probe_ids(tokenizer))) < 1e-5

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = export(str(run), "merged", "f32", tmp_path / "merged", progress=False)
    plain = AutoModelForCausalLM.from_pretrained(merged.out, dtype=torch.float32)
    assert _max_diff(probe_logits(plain, probe_ids(tokenizer)), trained) < 1e-4
    adapter = export(str(run), "adapter", None, tmp_path / "adapter", progress=False)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    on_base = PeftModel.from_pretrained(original, adapter.out)
    assert _max_diff(probe_logits(on_base, probe_ids(tokenizer)), trained) < 1e-4


def test_a_randomized_pissa_run_resumes_with_the_uninterrupted_losses_and_refuses_another_start(
    tiny_model_dir, triage_data, tmp_path
):
    # pissa_niter_N draws random numbers for its SVD: the resumed run makes the same start from the seed.
    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=4, save_every=2, batch_size=4)
    cfg["lora"]["init"] = "pissa_niter_2"
    train(cfg, progress=False)
    losses = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    reference = {m["step"]: m["train_loss"] for m in losses if "train_loss" in m}
    checkpoint = tmp_path / "run" / "checkpoints" / "step-2"
    assert json.loads((checkpoint / "adapter_config.json").read_text())["r"] == 8  # on the original base
    train(cfg, resume=str(checkpoint), progress=False)
    losses = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {m["step"]: m["train_loss"] for m in losses if "train_loss" in m} == reference

    # Another seed makes another start, which the checkpoint's adapter was not trained from.
    cfg["train"]["seed"] = 7
    with pytest.raises(TuneforgeError, match="start .lora.init. differs from the one this run makes again"):
        train(cfg, resume=str(checkpoint), force=True, progress=False)


@pytest.mark.parametrize(("init", "spread"), [("pissa_niter_2", "fsdp"), ("olora", "ddp")])
def test_a_pissa_or_olora_run_on_two_processes_starts_every_process_alike_and_gives_the_one_process_run(
    init, spread, tiny_model_dir, triage_data, tmp_path
):
    """FSDP keeps each process's own shard of the weights it starts from, DDP takes rank 0's: every process makes
    the same start (pissa_niter_N's randomized SVD from the same seed), so both give one process's losses and
    adapter."""
    from safetensors.torch import load_file
    from test_distributed import metrics, run_cli

    runs = {}
    for nproc in (1, 2):
        cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / f"run{nproc}", max_steps=3, batch_size=4)
        cfg["lora"].update(init=init, dropout=0.0)
        cfg["train"].update(learning_rate=1e-2, distributed=spread)
        if nproc == 1:
            train(cfg, progress=False)
        else:
            res = run_cli(cfg, tmp_path, nproc)
            assert res.returncode == 0, res.stderr[-3000:]
        run = tmp_path / f"run{nproc}"
        runs[nproc] = (
            {m["step"]: m["train_loss"] for m in metrics(run) if "train_loss" in m},
            load_file(run / "final" / "adapter_model.safetensors"),
        )
    (losses, adapter), (alone, adapter_alone) = runs[2], runs[1]
    assert losses.keys() == alone.keys() == {1, 2, 3}
    for step in alone:
        assert losses[step] == pytest.approx(alone[step], abs=1e-5), step
    assert adapter.keys() == adapter_alone.keys()
    for name, weight in adapter_alone.items():
        assert weight.shape[0] == 8 or weight.shape[1] == 8, name  # rank 2r: on the original base
        assert torch.allclose(adapter[name], weight, atol=1e-5), name


@pytest.mark.parametrize(("written", "resumed"), [("pissa", "default"), ("default", "olora")])
def test_a_forced_resume_into_another_lora_init_is_refused_with_the_shapes_that_differ(
    written, resumed, tiny_model_dir, triage_data, tmp_path
):
    # A PiSSA or OLoRA checkpoint holds rank 2r (the start beside the trained adapter), a default one rank r.
    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=1, save_every=1, batch_size=2)
    cfg["lora"]["init"] = written
    train(cfg, progress=False)
    cfg["lora"]["init"] = resumed
    cfg["train"]["max_steps"] = 2
    checkpoint = tmp_path / "run" / "checkpoints" / "step-1"
    with pytest.raises(TuneforgeError, match="the checkpoint was written with another lora.r or lora.init"):
        train(cfg, resume=str(checkpoint), force=True, progress=False)


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ({"lora": {"init": "svd"}}, "'svd' is no LoRA initialisation; use one of default, gaussian, pissa"),
        ({"lora": {"init": "pissa_niter_"}}, "'pissa_niter_' is no LoRA initialisation"),
        ({"model": {"quantize": "nf4"}}, "model.quantize: nf4 base cannot hold exactly"),
        ({"method": "dpo", "data": {"format": "preference"}}, "method: dpo takes its reference from the policy"),
        ({"method": "distill", "distill": {"teacher": "t"}}, "offered for method: lora and dora"),
        ({"train": {"kl_to_base": 0.1}}, "train.kl_to_base compare the model with the base"),
    ],
)
def test_a_lora_init_that_cannot_work_is_refused_at_its_line(setting, named, tmp_path):
    cfg = {"data": {"train": "x.jsonl"}, "lora": {"init": "pissa"}}
    for key, value in setting.items():
        cfg[key] = cfg.get(key, {}) | value if isinstance(value, dict) else value
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "init:" in text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert f"lora.init (line {line})" in e.value.message and named in " ".join(e.value.message.split())


def test_a_lora_init_on_an_adapter_that_trains_on_is_refused_before_its_weights_load(
    tiny_model_dir, triage_data, tmp_path
):
    from tuneforge.dry_run import validate

    first = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "first", max_steps=1)
    train(first, progress=False)
    cfg = tiny_run_config(tmp_path / "first", triage_data, tmp_path / "next", max_steps=1)
    cfg["lora"]["init"] = "olora"
    with pytest.raises(ConfigError, match="olora sets how a new adapter starts, and base_model .* is a LoRA adapter"):
        validate(cfg)


def test_a_pissa_start_on_an_output_layer_tied_to_the_embeddings_is_refused_at_its_line(
    tiny_model_dir, triage_data, tmp_path
):
    # The tiny model ties lm_head to embed_tokens: PiSSA's residual written into lm_head would change the input
    # embeddings while training, and the adapter converted to the original base would not be the model trained.
    from tuneforge.dry_run import validate

    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run")
    cfg["lora"] |= {"init": "pissa", "target_modules": ["q_proj", "lm_head"]}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "target_modules:" in text)
    with pytest.raises(ConfigError) as e:
        validate(str(path))
    message = " ".join(e.value.message.split())
    assert f"lora.target_modules ({path} line {line})" in message
    assert "lm_head shares its weight with model.embed_tokens" in message and "lora.init: default" in message
    cfg["lora"]["init"] = "default"  # plain LoRA leaves the shared weight as it is
    assert validate(cfg) == 0


def test_the_validate_plan_says_how_the_adapter_starts(tiny_model_dir, triage_data, tmp_path, capsys):
    from tuneforge.dry_run import validate

    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run")
    cfg["lora"]["init"] = "olora"
    assert validate(cfg) == 0
    out = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert "lora.init: olora, the adapter's start taken out of the base while training" in out


@pytest.mark.parametrize(
    ("written", "named"),
    [("lora:\n  init_lora_weights: pissa\n", "lora.init ("), ("pissa_init: true\n", "lora.init: pissa")],
)
def test_the_names_peft_axolotl_and_llama_factory_give_the_init_point_at_lora_init(written, named, tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("data:\n  train: x.jsonl\n" + written)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert f"tuneforge calls it {named}" in e.value.message
