"""Distillation on tiny models: the objective against hand-computed losses, the method in the loop,
`distill init` (layer subsets) and `distill generate` (resumable teacher answers)."""

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_config
from families import CLOCK_TOOL, WEATHER_TOOL
from tiny import save_tiny_model, set_context, tiny_llama, tiny_tokenizer

from tuneforge.config import load_config
from tuneforge.data import collate, pack, render_conversation
from tuneforge.errors import ConfigError, DataError, TuneforgeError
from tuneforge.methods import DistillObjective
from tuneforge.methods.distill import divergence

pytestmark = pytest.mark.usefixtures("one_thread")

IGNORE = -100


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def distill_config(student_dir, teacher_dir, data, out, *, student="full", **distill) -> dict:
    cfg = tiny_run_config(student_dir, data, out)
    cfg["method"] = "distill"
    cfg["distill"] = {"teacher": str(teacher_dir), "student": student, **distill}
    return cfg


@pytest.fixture(scope="module")
def teacher_dir(tiny_model_dir, triage_data, tmp_path_factory) -> Path:
    """The tiny model fine-tuned a little: peaked distributions the random student does not share."""
    from tuneforge.training import train

    out = tmp_path_factory.mktemp("teacher") / "run"
    cfg = tiny_run_config(tiny_model_dir, triage_data, out, max_steps=6, learning_rate=1e-2)
    cfg["method"] = "full"
    return train(cfg, progress=False).final_dir


@pytest.fixture(scope="module")
def pair():
    """A student and a differently initialised teacher with one tokenizer, and a batch whose labels
    are shifted targets with untrained (prompt) positions in between."""
    tokenizer = tiny_tokenizer()
    student, teacher = tiny_llama(tokenizer, seed=0), tiny_llama(tokenizer, layers=3, seed=1)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, len(tokenizer), (2, 12), generator=generator)
    labels = torch.full_like(input_ids, IGNORE)
    labels[0, 3:11] = input_ids[0, 4:12]
    labels[1, 6:9] = input_ids[1, 7:10]
    return student, teacher, input_ids, labels


def by_hand(student, teacher, input_ids, labels, *, alpha, temperature, kind, beta=0.5) -> dict:
    """The loss from full-vocabulary logits of the whole batch, written out without the objective's helpers."""
    trained = labels != IGNORE
    with torch.no_grad():
        s = student(input_ids=input_ids).logits[trained].double()
        t = teacher(input_ids=input_ids).logits[trained].double()
    targets = labels[trained]
    ce = -(s.log_softmax(-1).gather(1, targets[:, None])).sum()
    p, q = (t / temperature).softmax(-1), (s / temperature).softmax(-1)
    kl = lambda a, b: (a * (a.log() - b.log())).sum()  # noqa: E731
    m = beta * p + (1 - beta) * q
    div = {"forward_kl": kl(p, q), "reverse_kl": kl(q, p), "jsd": beta * kl(p, m) + (1 - beta) * kl(q, m)}[kind]
    agreement = (s.argmax(-1) == t.argmax(-1)).sum()
    return {
        "ce": ce,
        "divergence": div,
        "loss": alpha * ce + (1 - alpha) * temperature**2 * div,
        "tokens": int(trained.sum()),
        "teacher_agreement": int(agreement),
    }


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("alpha,temperature", [(0.5, 2.0), (0.2, 1.0), (0.0, 4.0)])
def test_loss_is_alpha_ce_plus_t_squared_divergence(pair, kind, alpha, temperature):
    student, teacher, input_ids, labels = pair
    objective = DistillObjective(student, teacher, alpha=alpha, temperature=temperature, kind=kind, beta=0.3)
    sums = objective(input_ids=input_ids, labels=labels)
    expected = by_hand(student, teacher, input_ids, labels, alpha=alpha, temperature=temperature, kind=kind, beta=0.3)
    assert sums["tokens"] == expected["tokens"] == 11
    assert int(sums["teacher_agreement"]) == expected["teacher_agreement"]
    # fp32 against float64: a divergence is a small difference of sums of p log p terms of size ~log(vocab).
    for key in ("ce", "divergence", "loss"):
        assert sums[key].item() == pytest.approx(expected[key].item(), rel=1e-5, abs=1e-5 * temperature**2), key
    assert sums["divergence"].item() > 0


def test_jsd_tends_to_forward_and_reverse_kl_at_the_beta_limits():
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(5, 40, generator=generator, dtype=torch.float64).mul(3).log_softmax(-1)
    student = torch.randn(5, 40, generator=generator, dtype=torch.float64).log_softmax(-1)  # flatter: KLs differ
    forward, reverse = divergence(teacher, student, "forward_kl"), divergence(teacher, student, "reverse_kl")
    assert float(reverse) > 1.5 * float(forward)  # so the limits below tell the two apart
    near_zero, near_one = 1e-8, 1 - 1e-8
    assert float(divergence(teacher, student, "jsd", near_zero) / near_zero) == pytest.approx(float(forward), rel=1e-4)
    assert float(divergence(teacher, student, "jsd", near_one) / (1 - near_one)) == pytest.approx(
        float(reverse), rel=1e-4
    )
    half = divergence(teacher, student, "jsd", 0.5)
    assert float(half) == pytest.approx(float(divergence(student, teacher, "jsd", 0.5)), rel=1e-12)  # symmetric
    assert 0 < float(half) <= math.log(2) * teacher.shape[0]  # Jensen-Shannon is bounded by log 2 per token


def test_only_trained_positions_count(pair):
    """Untrained positions, and tokens after the last trained one, change nothing."""
    student, teacher, input_ids, labels = pair
    objective = DistillObjective(student, teacher, alpha=0.5, temperature=2.0, kind="forward_kl")
    base = objective(input_ids=input_ids, labels=labels)
    longer_ids = torch.cat([input_ids, torch.randint(3, student.config.vocab_size, (2, 5))], dim=1)
    longer_labels = torch.cat([labels, torch.full((2, 5), IGNORE)], dim=1)
    longer = objective(input_ids=longer_ids, labels=longer_labels)
    assert longer["tokens"] == base["tokens"]
    for key in ("ce", "divergence", "loss"):
        assert longer[key].item() == pytest.approx(base[key].item(), rel=1e-5), key
    one_less = labels.clone()
    one_less[1, 8] = IGNORE
    fewer = objective(input_ids=input_ids, labels=one_less)
    assert fewer["tokens"] == base["tokens"] - 1 and fewer["loss"].item() < base["loss"].item()


def test_a_top_k_past_the_compared_tokens_is_refused(pair):
    student, teacher, _, _ = pair
    vocab = student.config.vocab_size
    with pytest.raises(ValueError, match=f"teacher_top_k {vocab + 1} is more than the {vocab} tokens"):
        DistillObjective(student, teacher, alpha=0.5, temperature=2.0, kind="forward_kl", top_k=vocab + 1)


def test_teacher_is_frozen_in_eval_mode_and_outside_the_module(pair):
    student, teacher, input_ids, labels = pair
    teacher.train()
    objective = DistillObjective(student, teacher, alpha=0.5, temperature=2.0, kind="jsd")
    objective.train()
    objective(input_ids=input_ids, labels=labels)["loss"].backward()
    assert not teacher.training and not objective.teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert {id(p) for p in objective.parameters()} == {id(p) for p in student.parameters()}
    assert all(key.startswith("model.") for key in objective.state_dict())
    student.zero_grad(set_to_none=True)


def test_config_needs_a_teacher_and_keeps_other_methods_hashes(tiny_model_dir, triage_data, tmp_path):
    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path)
    with pytest.raises(ConfigError, match="distill.teacher"):
        load_config({**cfg, "method": "distill"})
    with pytest.raises(ConfigError, match="kl_to_base"):
        load_config(
            {**cfg, "method": "distill", "distill": {"teacher": "x"}, "train": {**cfg["train"], "kl_to_base": 1.0}}
        )
    with pytest.raises(ConfigError, match="distill.divergence"):
        load_config({**cfg, "method": "distill", "distill": {"teacher": "x", "divergence": "kl"}})
    lora = load_config(cfg)
    assert lora.results_hash() == load_config({**cfg, "distill": {"alpha": 0.9}}).results_hash()
    distill = load_config({**cfg, "method": "distill", "distill": {"teacher": "x"}})
    assert (
        distill.results_hash()
        != load_config({**cfg, "method": "distill", "distill": {"teacher": "x", "alpha": 0.9}}).results_hash()
    )


def test_distill_run_brings_the_student_towards_the_teacher(tiny_model_dir, teacher_dir, triage_data, tmp_path):
    from tuneforge.training import train

    cfg = distill_config(tiny_model_dir, teacher_dir, triage_data, tmp_path / "run", alpha=0.2, temperature=2.0)
    cfg["train"].update(max_steps=8, learning_rate=5e-3)
    result = train(cfg, progress=False)
    rows = [r for r in metrics(tmp_path / "run") if "divergence" in r]
    assert len(rows) == 8 and all(0 <= r["teacher_agreement"] <= 1 for r in rows)
    assert rows[-1]["divergence"] < 0.5 * rows[0]["divergence"]
    assert rows[-1]["teacher_agreement"] > rows[0]["teacher_agreement"]
    assert "full_valid_loss" in result.metrics and (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_a_lora_student_trains_only_its_adapters(tiny_model_dir, teacher_dir, triage_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tuneforge.training import train

    cfg = distill_config(
        tiny_model_dir, teacher_dir, triage_data, tmp_path / "run", student="lora", divergence="reverse_kl"
    )
    cfg["train"]["max_steps"] = 2
    train(cfg, progress=False)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "run" / "final")
    assert any("lora_A" in name for name, _ in tuned.named_parameters())


def test_a_teacher_with_another_vocabulary_fails_before_any_compute(tiny_model_dir, triage_data, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuneforge.training import train

    other = tiny_tokenizer(vocab_size=400)
    teacher = tmp_path / "teacher"
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(other),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    ).save_pretrained(teacher)
    other.save_pretrained(teacher)
    cfg = distill_config(tiny_model_dir, teacher, triage_data, tmp_path / "run")
    with pytest.raises(TuneforgeError, match=r"token by token.*tuneforge distill generate") as err:
        train(cfg, progress=False)
    assert err.value.code == "vocabulary_mismatch"
    assert not (tmp_path / "run").exists()  # nothing prepared, loaded or written


@pytest.mark.parametrize("teacher", ["no-such-model", "damaged.gguf", "folder", "several", " "])
def test_a_teacher_that_cannot_be_found_or_read_is_refused_naming_where_it_was_given(
    teacher, tiny_model_dir, triage_data, tmp_path
):
    from tuneforge.distill import generate_teacher_data, init_student
    from tuneforge.training import train

    (tmp_path / "damaged.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    (tmp_path / "folder").mkdir()
    for model in ("a", "b"):  # a folder of two models, neither named
        shutil.copytree(tiny_model_dir, tmp_path / "several" / model)
    named = teacher if teacher in ("no-such-model", " ") else str(tmp_path / teacher)
    cfg = distill_config(tiny_model_dir, named, triage_data, tmp_path / "run")
    with pytest.raises(TuneforgeError) as config:
        train(cfg, progress=False)
    assert config.value.message.startswith("distill.teacher"), config.value.message
    assert not (tmp_path / "run").exists()
    prompts = tmp_path / "prompts.jsonl"
    write_prompts(prompts)
    with pytest.raises(TuneforgeError) as generate:
        generate_teacher_data(named, prompts, tmp_path / "out.jsonl", progress=False)
    with pytest.raises(TuneforgeError) as init:
        init_student(named, tmp_path / "student")
    for err in (config, generate, init):
        assert "base_model" not in err.value.message, err.value.message  # the teacher is no base model
    for err in (generate, init):
        assert err.value.message.startswith("--teacher"), err.value.message
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "student").exists()


def test_a_teacher_top_k_above_the_vocabulary_fails_before_any_compute(tiny_model_dir, triage_data, tmp_path):
    from transformers import AutoConfig

    from tuneforge.training import train

    vocab = AutoConfig.from_pretrained(tiny_model_dir).vocab_size
    cfg = distill_config(tiny_model_dir, tiny_model_dir, triage_data, tmp_path / "run", teacher_top_k=vocab + 1)
    with pytest.raises(ConfigError, match=rf"distill.teacher_top_k.*{vocab + 1}.*the {vocab} tokens.*{vocab} or less"):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_a_teacher_with_a_shorter_context_than_data_max_length_fails_before_any_compute(
    tiny_model_dir, triage_data, tmp_path
):
    from tuneforge.training import train

    teacher = set_context(shutil.copytree(tiny_model_dir, tmp_path / "teacher"), 256)
    cfg = distill_config(tiny_model_dir, teacher, triage_data, tmp_path / "run")  # data.max_length: 512
    with pytest.raises(
        ConfigError, match=r"distill\.teacher.*data\.max_length: rows of up to 512 tokens.*256 positions"
    ):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()  # nothing prepared, loaded or written


@pytest.mark.parametrize("top_k", [None, 8])
def test_a_teacher_of_one_tokenizer_with_a_padded_output_layer_teaches_as_the_unpadded_one(
    top_k, tiny_model_dir, teacher_dir, triage_data, tmp_path, monkeypatch
):
    """Qwen 2.5 7B and 0.5B share a tokenizer but pad their output layers to other widths: the
    distributions are compared over the columns both have, which hold every token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.training import train

    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path / "home"))
    padded = tmp_path / "padded"
    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    model.resize_token_embeddings(model.config.vocab_size + 64)
    model.save_pretrained(padded)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(padded)
    runs = []
    for teacher in (teacher_dir, padded):
        cfg = distill_config(tiny_model_dir, teacher, triage_data, tmp_path / teacher.name, teacher_top_k=top_k)
        cfg["train"]["max_steps"] = 2
        train(cfg, progress=False)
        runs.append([r for r in metrics(tmp_path / teacher.name) if "train_loss" in r])
    for row, expected in zip(*runs, strict=True):
        for key in ("train_loss", "divergence", "teacher_agreement"):
            assert row[key] == pytest.approx(expected[key], rel=1e-5), key


def test_gradient_accumulation_gives_the_same_distill_losses(tiny_model_dir, teacher_dir, triage_data, tmp_path):
    from tuneforge.training import train

    runs = {}
    for accum in (1, 4):
        cfg = distill_config(
            tiny_model_dir, teacher_dir, triage_data, tmp_path / f"a{accum}", student="lora", divergence="jsd"
        )
        cfg["train"].update(max_steps=3, learning_rate=1e-2, grad_accum=accum)
        cfg["lora"]["dropout"] = 0.0
        cfg["data"]["packing"] = False
        train(cfg, progress=False)
        runs[accum] = {r["step"]: r for r in metrics(tmp_path / f"a{accum}") if "train_loss" in r}
    assert runs[1].keys() == runs[4].keys() == {1, 2, 3}
    for step in runs[1]:
        for key in ("train_loss", "divergence", "teacher_agreement"):
            assert runs[4][step][key] == pytest.approx(runs[1][step][key], rel=1e-5, abs=1e-6), (step, key)


@pytest.mark.parametrize("positions", ["answers", "all"])
def test_the_cached_teacher_top_k_gives_the_online_losses_when_k_covers_the_vocabulary(
    positions, tiny_model_dir, teacher_dir, triage_data, tmp_path, monkeypatch
):
    from transformers import AutoConfig

    from tuneforge.methods import distill
    from tuneforge.training import train

    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path / "home"))
    teacher_runs = []
    compute = distill.compute_top_k
    monkeypatch.setattr(distill, "compute_top_k", lambda *a, **k: teacher_runs.append(1) or compute(*a, **k))
    vocab = AutoConfig.from_pretrained(teacher_dir).vocab_size
    runs = {}
    for name, top_k in (("online", None), ("whole vocabulary", vocab), ("from the cache", vocab), ("top 4", 4)):
        cfg = distill_config(tiny_model_dir, teacher_dir, triage_data, tmp_path / name, student="lora", alpha=0.3)
        cfg["distill"].update(teacher_top_k=top_k, positions=positions)
        cfg["train"].update(max_steps=3, learning_rate=1e-2, eval_every=2)
        cfg["lora"]["dropout"] = 0.0
        result = train(cfg, progress=False)
        runs[name] = ([r for r in metrics(tmp_path / name) if "train_loss" in r], result.metrics)
        if name == "whole vocabulary":
            assert teacher_runs == [1]  # the teacher ran once, over every row, before the first step
    assert teacher_runs == [1, 1]  # not for the run on the same rows: it read the cache; again for k = 4
    assert len(list((tmp_path / "home" / "teacher-cache").glob("*.safetensors"))) == 2
    online = runs["online"]
    for name in ("whole vocabulary", "from the cache"):
        steps, final = runs[name]
        assert [r["step"] for r in steps] == [1, 2, 3]
        for row, expected in zip(steps, online[0]):
            for key in ("train_loss", "divergence", "teacher_agreement", "valid_loss", "valid_divergence"):
                if key in expected:
                    assert row[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), (name, row["step"], key)
        assert final["full_valid_loss"] == pytest.approx(online[1]["full_valid_loss"], rel=1e-5)
    # With k = 4 the first step sees the same student, labels and teacher top-1 token; only the divergence,
    # now against the teacher's distribution over its 4 likeliest tokens, differs.
    first, first_online = runs["top 4"][0][0], online[0][0]
    for key in ("train_loss", "teacher_agreement"):
        assert first[key] == pytest.approx(first_online[key], rel=1e-5)
    assert first["divergence"] != pytest.approx(first_online["divergence"], rel=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_fused_top_k_loss_gives_autograds_losses_and_gradients(dtype, temperature, monkeypatch):
    """The chunked closed-form loss against the same terms written with autograd: the cross-entropy at
    the trained rows, the forward KL from the teacher's top-k distribution at every row, and the
    gradient of a weighted sum of both, over chunks that split the rows unevenly."""
    import torch.nn.functional as F

    from tuneforge.methods import distill

    generator = torch.Generator().manual_seed(0)
    n, vocab, k = 50, 300, 8
    logits = (3 * torch.randn(n, vocab, generator=generator)).to(dtype).requires_grad_()
    trained = torch.rand(n, generator=generator) < 0.4
    targets = torch.randint(0, vocab, (int(trained.sum()),), generator=generator)
    values, ids = torch.randn(n, vocab, generator=generator).topk(k, -1)
    teacher_logp = F.log_softmax(values / temperature, -1)
    monkeypatch.setattr(distill, "LOGITS_PER_CHUNK", 7 * vocab)  # chunks of 7 rows: the last one shorter

    token_ce, soft = distill._TopKDistillation.apply(logits, trained, targets, ids, teacher_logp, temperature)
    (grad,) = torch.autograd.grad(0.4 * token_ce.sum() + 0.6 * temperature**2 * soft, logits)

    exact = logits.detach().double().requires_grad_()
    expected_ce = F.cross_entropy(exact[trained], targets, reduction="none")
    student_logp = F.log_softmax(exact / temperature, -1).gather(1, ids)
    expected_soft = (teacher_logp.double().exp() * (teacher_logp.double() - student_logp)).sum()
    (expected_grad,) = torch.autograd.grad(0.4 * expected_ce.sum() + 0.6 * temperature**2 * expected_soft, exact)
    assert grad.dtype == dtype
    torch.testing.assert_close(token_ce.double(), expected_ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(soft.double(), expected_soft, rtol=1e-5, atol=1e-4)
    tolerance = 1e-6 if dtype == torch.float32 else 8e-3  # bf16: the gradient is rounded to it
    torch.testing.assert_close(grad.double(), expected_grad, rtol=tolerance, atol=tolerance)


def test_the_teacher_cache_key_changes_with_an_adapter_teachers_adapter(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tuneforge.methods.distill import cache_key

    def save_adapter(seed: int) -> None:
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        lora = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
        get_peft_model(base, lora).save_pretrained(tmp_path / "teacher")

    save_adapter(0)
    first = cache_key(str(tmp_path / "teacher"), 8, 512, "float32", ["row"])
    assert first == cache_key(str(tmp_path / "teacher"), 8, 512, "float32", ["row"])
    assert first != cache_key(str(tiny_model_dir), 8, 512, "float32", ["row"])  # the base alone is another teacher
    save_adapter(1)  # retrained: the same base, new adapter files
    assert cache_key(str(tmp_path / "teacher"), 8, 512, "float32", ["row"]) != first


@pytest.mark.parametrize(
    "damage",
    [
        "cut short",
        "no safetensors",
        "rows of other lengths",
        "ids past the vocabulary",
        "another k",
        "no logits",
        "nan",
    ],
)
def test_a_damaged_teacher_cache_entry_is_computed_again_and_replaced(damage, tiny_model_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save
    from transformers import AutoModelForCausalLM

    from tuneforge.methods.distill import TeacherTopK, cache_dir, output_width

    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path))
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    vocab = output_width(teacher)
    input_ids = torch.randint(3, vocab, (2, 10), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(input_ids, IGNORE)
    labels[0, 4:9], labels[1, 2:6] = input_ids[0, 5:10], input_ids[1, 3:7]
    batches = [{"input_ids": input_ids, "labels": labels, "position_ids": torch.arange(10).expand(2, 10)}]

    def load(log) -> dict:
        cpu = torch.device("cpu")
        return TeacherTopK.load_or_compute(teacher, str(tiny_model_dir), 4, vocab, batches, cpu, False, log).by_row

    first = load(print)
    [path] = cache_dir().glob("*.safetensors")
    whole = path.read_bytes()
    stored = load_file(path)
    if damage == "cut short":
        path.write_bytes(whole[: len(whole) // 2])
    elif damage == "no safetensors":
        path.write_text("hello")
    else:
        if damage == "rows of other lengths":  # as many positions in all, split otherwise between the rows
            stored["lengths"] += torch.tensor([1, -1])
        elif damage == "ids past the vocabulary":
            stored["ids"][0, 0] = vocab
        elif damage == "another k":
            stored = {
                name: tensor[:, :2].contiguous() if tensor.dim() == 2 else tensor for name, tensor in stored.items()
            }
        elif damage == "no logits":
            del stored["values"]
        else:
            stored["values"][1, 1] = math.nan
        path.write_bytes(save(stored))
    said = []
    again = load(said.append)
    assert len(said) == 1 and str(path) in said[0] and "computing them again" in said[0], said
    assert first.keys() == again.keys()
    for key, (ids, values) in first.items():
        assert torch.equal(again[key][0], ids) and torch.equal(again[key][1], values)
    assert path.read_bytes() == whole  # the entry replaced: the next run reads it
    silent = []
    load(silent.append)
    assert silent == []


def test_positions_all_compares_every_token_up_to_the_last_trained_one(pair):
    student, teacher, input_ids, labels = pair
    objective = DistillObjective(student, teacher, alpha=0.5, temperature=2.0, kind="forward_kl", positions="all")
    with torch.no_grad():
        out = objective(input_ids=input_ids, labels=labels)
        s, t = student(input_ids=input_ids).logits.double(), teacher(input_ids=input_ids).logits.double()
    compared = torch.zeros_like(labels, dtype=torch.bool)
    compared[0, :11], compared[1, :9] = True, True  # up to each row's last trained position, prompt included
    p, q = (t[compared] / 2.0).softmax(-1), (s[compared] / 2.0).softmax(-1)
    assert out["divergence"].item() == pytest.approx((p * (p.log() - q.log())).sum().item(), rel=1e-5)
    answers = by_hand(student, teacher, input_ids, labels, alpha=0.5, temperature=2.0, kind="forward_kl")
    assert out["ce"].item() == pytest.approx(answers["ce"].item(), rel=1e-5)  # the cross-entropy stays on the answers
    assert out["teacher_agreement"] == answers["teacher_agreement"] and out["tokens"] == answers["tokens"]


def test_teacher_top_k_takes_forward_kl_only(tiny_model_dir, triage_data, tmp_path):
    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path)
    with pytest.raises(ConfigError, match="teacher_top_k.*set divergence: forward_kl"):
        load_config({**cfg, "method": "distill", "distill": {"teacher": "x", "teacher_top_k": 8, "divergence": "jsd"}})
    online = load_config({**cfg, "method": "distill", "distill": {"teacher": "x"}})
    cached = load_config({**cfg, "method": "distill", "distill": {"teacher": "x", "teacher_top_k": 8}})
    assert online.results_hash() != cached.results_hash()


# --- distill init ----------------------------------------------------------------------------------


def test_layers_to_keep_defaults_to_about_half_with_first_and_last():
    from tuneforge.distill import layers_to_keep

    assert layers_to_keep(30) == (0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 29)
    assert layers_to_keep(30, every=3) == (0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 29)
    assert layers_to_keep(6, keep=[5, 0, 3]) == (0, 3, 5)
    for keep, every, message in (
        ([0, 6], None, "not layers"),
        ([1, 1], None, "twice"),
        ([0], 2, "either"),
        (None, 0, "at least 1"),
        ([], None, "empty"),
    ):
        with pytest.raises(TuneforgeError, match=message):
            layers_to_keep(6, keep, every)


def test_distill_init_keeps_the_chosen_layers(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, GenerationConfig

    from tuneforge.distill.commands import distill_init
    from tuneforge.models import load_tokenizer

    teacher_dir = save_tiny_model(tmp_path / "teacher", layers=4)
    assert distill_init(str(teacher_dir), str(tmp_path / "student"), keep_layers="0,2,3") == 0
    printed = capsys.readouterr().out
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    n_teacher, n_student = (sum(p.numel() for p in m.parameters()) for m in (teacher, student))
    assert f"{n_teacher / 1e6:.1f}M parameters, 4 layers" in printed and f"{n_student / 1e6:.1f}M parameters" in printed
    assert student.config.num_hidden_layers == 3 and n_student < n_teacher
    for new, old in enumerate((0, 2, 3)):
        for (name, p), (_, q) in zip(
            student.model.layers[new].named_parameters(), teacher.model.layers[old].named_parameters()
        ):
            assert torch.equal(p, q), (new, name)
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight)

    input_ids = torch.randint(3, teacher.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        teacher.model.layers = torch.nn.ModuleList(teacher.model.layers[i] for i in (0, 2, 3))
        expected = teacher(input_ids=input_ids, use_cache=False).logits
        got = student(input_ids=input_ids, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)

    tokenizer = load_tokenizer(str(tmp_path / "student"))
    assert tokenizer.chat_template and tokenizer.get_vocab() == load_tokenizer(str(teacher_dir)).get_vocab()
    assert GenerationConfig.from_pretrained(tmp_path / "student").eos_token_id == tokenizer.eos_token_id
    with pytest.raises(TuneforgeError, match="already exists"):
        distill_init(str(teacher_dir), str(tmp_path / "student"))


def _chat_rows(path: Path, n: int) -> Path:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"ticket {i}: the app crashes"},
                {"role": "assistant", "content": "bug"},
            ]
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_most_influential_cut_drops_the_layer_that_passes_its_input_through(tmp_path):
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from tuneforge.cli import app
    from tuneforge.distill.student import block_influence, influence_rows
    from tuneforge.models import load_tokenizer

    tokenizer = tiny_tokenizer()
    teacher = tiny_llama(tokenizer, layers=4).eval()
    with torch.no_grad():  # layer 2 adds nothing to the residual stream: its output is its input
        teacher.model.layers[2].self_attn.o_proj.weight.zero_()
        teacher.model.layers[2].mlp.down_proj.weight.zero_()
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    data = _chat_rows(tmp_path / "train.jsonl", 3)

    rows = influence_rows(data, load_tokenizer(str(tmp_path / "teacher")))
    influence = block_influence(teacher, rows)
    assert len(rows) == 3 and influence[2] == pytest.approx(0, abs=1e-6) and min(influence[:2]) > 1e-3
    with torch.no_grad():  # layer 0's figure by hand: the embeddings against the first hidden state
        turned = [
            1
            - torch.cosine_similarity(
                *teacher(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[:2], dim=-1
            )
            for ids in rows
        ]
    assert influence[0] == pytest.approx(torch.cat(turned, dim=-1).mean().item(), rel=1e-5)

    command = ["distill", "init", "--teacher", str(tmp_path / "teacher"), "--out", str(tmp_path / "student")]
    result = CliRunner().invoke(app, [*command, "--most-influential", "3", "--data", str(data)])
    assert result.exit_code == 0, result.output
    printed = result.output
    chart = {int(line.split()[0]): line for line in printed.splitlines() if line[:4].strip().isdigit()}
    assert sorted(chart) == [0, 1, 2, 3] and "(teacher layers 0,1,3)" in printed
    assert chart[2].split()[1:] == ["0.000"] and all(chart[i].split()[1] == "kept" for i in (0, 1, 3))
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    input_ids = torch.tensor([rows[0]])
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=input_ids).logits, teacher(input_ids=input_ids).logits)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"most_influential": 2}, "go together"),
        ({"most_influential": 5, "data": "good"}, "the teacher has 4 layers; keep 1 to 4"),
        ({"most_influential": 2, "data": "good", "every": 2}, "one of --keep-layers, --every and --most-influential"),
        ({"most_influential": 2, "data": "bad"}, "bad.jsonl: 1 row cannot be used:\n.*bad.jsonl:2"),
        ({"most_influential": 2, "data": "missing"}, "no such file"),
    ],
)
def test_most_influential_cut_refuses_bad_options_and_data(tmp_path, options, message):
    from tuneforge.distill.commands import distill_init

    teacher_dir = save_tiny_model(tmp_path / "teacher", layers=4)
    good = _chat_rows(tmp_path / "good.jsonl", 2)
    (tmp_path / "bad.jsonl").write_text(good.read_text().splitlines()[0] + '\n{"messages": [}\n')
    if "data" in options:
        options["data"] = str(tmp_path / f"{options['data']}.jsonl")
    with pytest.raises(TuneforgeError, match=message):
        distill_init(str(teacher_dir), str(tmp_path / "student"), **options)
    assert not (tmp_path / "student").exists()


def test_distill_init_prints_the_student_folder_as_named(tmp_path, capsys, monkeypatch):
    # rich would read `[/x]` in a user's path as a closing tag (an error) and `:x:` as an emoji's code.
    from tuneforge.distill.commands import distill_init

    monkeypatch.setenv("COLUMNS", "1000")
    teacher_dir = save_tiny_model(tmp_path / "teacher", layers=2)
    (tmp_path / "[").mkdir()
    out = tmp_path / "[" / "x]:x: [bold]"
    assert distill_init(str(teacher_dir), str(out), keep_layers="0") == 0
    assert f"written to {out}\n" in capsys.readouterr().out


def test_distill_init_refuses_models_without_llama_style_layers(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from tuneforge.distill import init_student

    tokenizer = tiny_tokenizer()
    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with pytest.raises(TuneforgeError, match="Llama-style") as err:
        init_student(str(folder), tmp_path / "student")
    assert err.value.code == "unsupported_architecture" and not (tmp_path / "student").exists()


# --- distill generate ------------------------------------------------------------------------------


def write_prompts(path: Path) -> list[list[dict]]:
    """Seven prompt rows in the accepted shapes, and the prompts the teacher is to answer."""
    system = {"role": "system", "content": "Answer briefly."}
    rows, prompts = [], []
    for i in range(7):
        user = {"role": "user", "content": f"Question {i}: how do I reset my password?"}
        if i % 3 == 0:
            rows.append({"messages": [system, user, {"role": "assistant", "content": "old answer, dropped"}]})
            prompts.append([system, user])
        elif i % 3 == 1:
            rows.append({"messages": [user]})
            prompts.append([user])
        else:
            rows.append({"prompt": user["content"], "completion": "ignored"})
            prompts.append([user])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return prompts


def test_distill_generate_resumes_without_duplicates(base_dir, tiny_model_dir, tmp_path, capfd):
    from tuneforge.data import Conversation, read_conversations
    from tuneforge.distill import generate_teacher_data

    # The teacher is the sharp tiny model: a call that answered other prompts than its rows' writes other answers.
    prompts_file = tmp_path / "prompts.jsonl"
    prompts = write_prompts(prompts_file)
    out = tmp_path / "teacher.jsonl"
    options = dict(max_new_tokens=6, batch_size=2, progress=False)
    first = generate_teacher_data(str(base_dir), prompts_file, out, limit=3, **options)
    assert (first.written, first.resumed_from) == (3, 0) and len(out.read_text().splitlines()) == 3
    assert "Loading weights" not in capfd.readouterr().err  # progress=False: transformers' bar too
    # Continued by another teacher, or with another answer length, the file would mix two teachers' answers.
    for teacher, length in ((tiny_model_dir, 6), (base_dir, 12)):
        with pytest.raises(TuneforgeError, match="would mix the two") as mixed:
            generate_teacher_data(str(teacher), prompts_file, out, **{**options, "max_new_tokens": length})
        assert mixed.value.code == "output_mismatch"
    assert len(out.read_text().splitlines()) == 3  # nothing added
    with out.open("a") as f:
        f.write('{"messages": [{"role": "user", "cont')  # killed in the middle of a line
    second = generate_teacher_data(str(base_dir), prompts_file, out, **options)
    assert (second.written, second.resumed_from, second.prompts) == (7, 3, 7)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["messages"][:-1] for r in rows] == prompts
    assert all(r["messages"][-1]["role"] == "assistant" for r in rows)
    assert len({r["messages"][-1]["content"] for r in rows}) > 1  # the answers tell the prompts apart

    at_once = tmp_path / "at_once.jsonl"
    generate_teacher_data(str(base_dir), prompts_file, at_once, **options)
    assert out.read_text() == at_once.read_text()  # greedy answers do not depend on the interruption
    assert generate_teacher_data(str(base_dir), prompts_file, out, **options).resumed_from == 7

    assert first.empty == second.empty == 0
    assert all(isinstance(item, Conversation) for _, item in read_conversations(out))  # SFT data as it is


def test_distill_generate_refuses_a_complete_file_of_another_teacher(teacher_dir, tiny_model_dir, tmp_path):
    # A finished file answers "all rows already there" only for the teacher and answer length that wrote it.
    from tuneforge.distill import generate_teacher_data

    prompts_file = tmp_path / "prompts.jsonl"
    write_prompts(prompts_file)
    out = tmp_path / "teacher.jsonl"
    options = dict(batch_size=4, progress=False)
    generate_teacher_data(str(teacher_dir), prompts_file, out, max_new_tokens=6, **options)
    written = out.read_text()
    for teacher, length in ((tiny_model_dir, 6), (teacher_dir, 12)):
        with pytest.raises(TuneforgeError, match="would mix the two") as mixed:
            generate_teacher_data(str(teacher), prompts_file, out, max_new_tokens=length, **options)
        assert mixed.value.code == "output_mismatch"
    assert out.read_text() == written
    assert generate_teacher_data(str(teacher_dir), prompts_file, out, max_new_tokens=6, **options).resumed_from == 7


def test_distill_generate_refuses_an_output_of_answers_it_did_not_write(tiny_model_dir, tmp_path):
    # Labelled rows answer their prompts: taken as the teacher's answers, they would be reported as written.
    from tuneforge.distill import generate_teacher_data

    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": "A"}]})
            + "\n"
            for i in range(3)
        )
    )
    before = labelled.read_text()
    with pytest.raises(TuneforgeError, match="is the --prompts file") as same:
        generate_teacher_data(str(tiny_model_dir), labelled, labelled, max_new_tokens=4, progress=False)
    assert same.value.code == "bad_option"
    copy = tmp_path / "copy.jsonl"
    shutil.copy(labelled, copy)
    with pytest.raises(TuneforgeError, match="which teacher wrote them is unknown") as foreign:
        generate_teacher_data(str(tiny_model_dir), labelled, copy, max_new_tokens=4, progress=False)
    assert foreign.value.code == "output_mismatch" and "Choose another --out" in foreign.value.message
    assert labelled.read_text() == copy.read_text() == before
    assert not copy.with_name(copy.name + ".teacher.json").exists()
    # Answers it wrote whose record was since removed: the refusal does not call them another file's alone.
    answers = tmp_path / "answers.jsonl"
    generate_teacher_data(str(tiny_model_dir), labelled, answers, max_new_tokens=4, progress=False)
    answers.with_name(answers.name + ".teacher.json").unlink()
    with pytest.raises(TuneforgeError, match="or their record was removed") as lost:
        generate_teacher_data(str(tiny_model_dir), labelled, answers, max_new_tokens=4, progress=False)
    assert lost.value.code == "output_mismatch"


def test_distill_generate_counts_one_answer_of_a_foreign_output_in_the_singular(tiny_model_dir, tmp_path):
    from tuneforge.distill import generate_teacher_data

    labelled, out = tmp_path / "labelled.jsonl", tmp_path / "copy.jsonl"
    row = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    labelled.write_text(json.dumps(row) + "\n")
    shutil.copy(labelled, out)
    with pytest.raises(TuneforgeError, match=f"^{re.escape(str(out))} holds 1 answer but no ") as foreign:
        generate_teacher_data(str(tiny_model_dir), labelled, out, max_new_tokens=4, progress=False)
    assert foreign.value.code == "output_mismatch"


@pytest.mark.parametrize("record", ["{cut", "", "[]", '{"max_new_tokens": 4}'])
def test_distill_generate_refuses_to_continue_past_a_teacher_record_it_cannot_read(record, tiny_model_dir, tmp_path):
    from tuneforge.distill import generate_teacher_data

    prompts_file, out = tmp_path / "prompts.jsonl", tmp_path / "teacher.jsonl"
    write_prompts(prompts_file)
    generate_teacher_data(str(tiny_model_dir), prompts_file, out, max_new_tokens=4, limit=2, progress=False)
    written = out.read_text()
    (tmp_path / "teacher.jsonl.teacher.json").write_text(record)
    with pytest.raises(TuneforgeError, match="teacher.jsonl.teacher.json") as err:
        generate_teacher_data(str(tiny_model_dir), prompts_file, out, max_new_tokens=4, progress=False)
    assert err.value.code == "output_mismatch" and "choose another --out" in err.value.message
    assert out.read_text() == written


def test_distill_generate_refuses_bad_prompts_and_foreign_output(tiny_model_dir, tmp_path):
    from tuneforge.distill import generate_teacher_data

    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}]})
        + "\n"
        + json.dumps({"question": "hi"})
        + "\n"
        + json.dumps({"messages": [{"role": "system", "content": "only a system prompt"}]})
        + "\n"
    )
    with pytest.raises(DataError) as err:
        generate_teacher_data(str(tiny_model_dir), bad, tmp_path / "out.jsonl", progress=False)
    assert "bad.jsonl:2" in err.value.message and "bad.jsonl:3" in err.value.message
    assert not (tmp_path / "out.jsonl").exists()
    with pytest.raises(DataError) as missing:
        generate_teacher_data(str(tiny_model_dir), tmp_path / "nope.jsonl", tmp_path / "out.jsonl", progress=False)
    assert missing.value.message.startswith(f"--prompts {tmp_path / 'nope.jsonl'} cannot be read")
    assert "does not exist" in missing.value.message and "rows" not in missing.value.message

    prompts_file = tmp_path / "prompts.jsonl"
    write_prompts(prompts_file)
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text(
        json.dumps({"messages": [{"role": "user", "content": "another prompt"}, {"role": "assistant", "content": "x"}]})
        + "\n"
    )
    with pytest.raises(TuneforgeError, match="line 1 does not answer prompt 1"):
        generate_teacher_data(str(tiny_model_dir), prompts_file, foreign, progress=False)

    with pytest.raises(TuneforgeError, match="is a folder; give the file to write") as folder:
        generate_teacher_data(str(tiny_model_dir), prompts_file, tmp_path, progress=False)
    assert folder.value.code == "bad_option"


def test_distill_generate_names_the_prompt_field_of_a_bad_prompt_row(tmp_path):
    from tuneforge.distill import read_prompts

    bad = tmp_path / "bad.jsonl"
    rows = [
        {"prompt": 5},
        {"prompt": ""},
        {"prompt": [{"role": "user"}]},
        {"prompt": [{"role": "system", "content": "x"}]},
    ]
    bad.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(DataError) as err:
        read_prompts(bad)
    found = [(p.line, p.field, p.code) for p in err.value.problems]
    assert found == [
        (1, "prompt", "data_type"),
        (2, "prompt", "missing_content"),
        (3, "prompt[0].content", "missing_content"),
        (4, "prompt", "missing_prompt"),
    ]


@pytest.mark.parametrize("pattern", [False, True])
def test_distill_generate_given_a_folder_or_a_pattern_as_prompts_is_told_to_name_one_file(tmp_path, pattern):
    """--prompts is one file a call: a folder or a pattern is told so, not pointed at data.train's list."""
    from tuneforge.distill import read_prompts

    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "Hi"}) + "\n")
    given = tmp_path / "*.jsonl" if pattern else tmp_path
    with pytest.raises(DataError) as err:
        read_prompts(given)
    [problem] = err.value.problems
    assert problem.code == "file_not_found"
    assert problem.message.endswith("Give one data file by name: distill generate reads one file a call.")
    assert "data.train takes a list" not in str(err.value)


def test_distill_generate_reads_chat_prompts_from_a_csv_file_as_training_does(tmp_path):
    import csv

    from tuneforge.distill import read_prompts

    jsonl, table = tmp_path / "prompts.jsonl", tmp_path / "prompts.csv"
    prompts = write_prompts(jsonl)
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["messages"])
        writer.writerows([json.dumps(row["messages"])] for row in rows if "messages" in row)
    assert read_prompts(table) == [prompt for prompt, row in zip(prompts, rows) if "messages" in row]

    table.write_text('messages\n"[{""role"": ""user"", ""content"": ""hi""}"\n')  # the closing ] is missing
    with pytest.raises(DataError) as err:
        read_prompts(table)
    assert [(p.line, p.field, p.code) for p in err.value.problems] == [(2, "messages", "invalid_json")]


def test_distill_generate_refuses_to_continue_with_a_teacher_retrained_in_place(tmp_path):
    from tuneforge.distill import generate_teacher_data

    teacher = save_tiny_model(tmp_path / "teacher")
    prompts_file, out = tmp_path / "prompts.jsonl", tmp_path / "teacher.jsonl"
    write_prompts(prompts_file)
    options = dict(max_new_tokens=4, batch_size=2, progress=False)
    generate_teacher_data(str(teacher), prompts_file, out, limit=2, **options)
    save_tiny_model(teacher, seed=1)  # retrained: other weights in the same folder
    with pytest.raises(TuneforgeError, match="teacher files that have changed since") as mixed:
        generate_teacher_data(str(teacher), prompts_file, out, **options)
    assert mixed.value.code == "output_mismatch" and len(out.read_text().splitlines()) == 2

    # A record written before it held the files' hash still lets the same teacher finish the file.
    record = out.with_name(out.name + ".teacher.json")
    record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items() if k != "files"}))
    assert generate_teacher_data(str(teacher), prompts_file, out, **options).written == 7


def test_positions_all_compares_each_packed_example_as_when_it_runs_alone(pair):
    """In a packed row, what follows an example's last trained token (its last position, which the next
    example's first token follows) is not compared: the packed divergence is that of the examples one by one."""
    student, teacher, _, _ = pair
    tokenizer = tiny_tokenizer()
    chats = [
        [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}],
        [{"role": "user", "content": "Hello, how are you?"}, {"role": "assistant", "content": "I am fine."}],
        [{"role": "user", "content": "The quick brown fox?"}, {"role": "assistant", "content": "Jumps."}],
    ]
    examples = [render_conversation(c, tokenizer) for c in chats]
    objective = DistillObjective(student, teacher, alpha=0.5, temperature=2.0, kind="forward_kl", positions="all")
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        rows = pack(examples, max_length=sum(map(len, examples)))
        assert len(rows) == 1
        packed = objective(**collate(rows, pad))
        alone = [objective(**collate([e], pad, pad_to_multiple_of=1)) for e in examples]
    for key in ("divergence", "ce", "loss"):
        assert packed[key].item() == pytest.approx(sum(out[key].item() for out in alone), rel=1e-5), key


def test_positions_all_packs_without_sharing_a_prompt_prefix(pair, tiny_model_dir, triage_data, tmp_path):
    """A prefix held once in a packed row would have its divergence counted once for all the examples that
    share it; the rows the loop builds for `positions: all` give the divergence of the examples one by one."""
    from tuneforge.models.attention import per_example_attention
    from tuneforge.training import shares_prefixes, to_rows

    student, teacher, _, _ = pair
    tokenizer = tiny_tokenizer()
    system = {"role": "system", "content": "You are a helpful assistant. Answer the question briefly, in English."}
    chats = [
        [system, {"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}],
        [system, {"role": "user", "content": "Hello, how are you?"}, {"role": "assistant", "content": "Fine."}],
    ]
    examples = [render_conversation(c, tokenizer) for c in chats]
    pad = tokenizer.pad_token_id
    for positions in ("answers", "all"):
        cfg = load_config(distill_config(tiny_model_dir, tiny_model_dir, triage_data, tmp_path, positions=positions))
        rows = to_rows(examples, cfg, shares_prefixes(cfg, all_per_example=True))
        objective = DistillObjective(
            student, teacher, alpha=0.5, temperature=2.0, kind="forward_kl", positions=positions
        )
        with torch.no_grad(), per_example_attention(student, teacher):
            packed = objective(**collate(rows, pad))
            alone = [objective(**collate([e], pad, pad_to_multiple_of=1)) for e in examples]
        for key in ("divergence", "ce", "loss"):
            expected = sum(out[key].item() for out in alone)
            assert packed[key].item() == pytest.approx(expected, rel=1e-5), (positions, key)
        shared = sum(map(len, rows)) < sum(map(len, examples))  # the system prompt held once
        assert len(rows) == 1 and shared == (positions == "answers")


def test_distill_generate_refuses_prompts_past_the_teachers_context_before_any_answer(tiny_model_dir, tmp_path):
    from tuneforge.distill import generate_teacher_data

    prompts = tmp_path / "prompts.jsonl"
    questions = ["hi", "hello", "Why? " * 2100]
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n" for q in questions))
    out = tmp_path / "teacher.jsonl"
    with pytest.raises(DataError, match="1 prompt does not fit the teacher's context") as err:
        generate_teacher_data(str(tiny_model_dir), prompts, out, max_new_tokens=4, progress=False)
    assert "prompts.jsonl:3: [too_long] the prompt is" in err.value.message
    assert "maximum context length is 2048 tokens" in err.value.message
    assert not out.exists() or not out.read_text()  # no answer written


# --- distill generate --samples: best-of-N -----------------------------------------------------------

REWARDS = '''
def length(prompts, completions, **columns):
    """The answer's length, except for a prompt asking for a tie: 0 for every answer."""
    return [0.0 if "tie" in p[-1]["content"] else float(len(c[0]["content"])) for p, c in zip(prompts, completions)]
'''


def best_of_n_prompts(tmp_path: Path, ties: int = 0) -> tuple[Path, str]:
    """Five chat prompts, the last `ties` of them asking for a tie, and a python grader of the answers' length."""
    prompts = tmp_path / "prompts.jsonl"
    texts = [f"Question {i}: {'tie' if i >= 5 - ties else 'why'}?" for i in range(5)]
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": t}]}) + "\n" for t in texts))
    (tmp_path / "rewards.py").write_text(REWARDS)
    return prompts, f"{tmp_path / 'rewards.py'}:length"


@pytest.fixture(scope="module")
def stopping_model_dir(tmp_path_factory) -> Path:
    """The tiny model with 30 more stop tokens in its generation config: sampled at T=1 (near uniform over 512
    tokens), a third or so of its answers end within 6 tokens and the others are cut there."""
    from transformers import GenerationConfig

    folder = save_tiny_model(tmp_path_factory.mktemp("stopping") / "model")
    config = GenerationConfig.from_pretrained(folder)
    config.eos_token_id = [config.eos_token_id, *range(100, 130)]
    config.save_pretrained(folder)
    return folder


def ended(record: dict) -> list[str]:
    """The texts of a best-of-N record's answers that ended before max_new_tokens: those rows are made of."""
    return [s["text"] for s in record["samples"] if s["finish_reason"] != "length"]


def test_best_of_n_samples_differ_repeat_with_the_seed_and_resume_as_at_once(stopping_model_dir, tmp_path):
    from tuneforge.distill import generate_teacher_data

    prompts, grader = best_of_n_prompts(tmp_path)
    options = dict(max_new_tokens=6, progress=False, samples=4, temperature=1.0, grader=grader)
    at_once = tmp_path / "at_once.jsonl"
    result = generate_teacher_data(str(stopping_model_dir), prompts, at_once, seed=3, batch_size=16, **options)
    records = [json.loads(line) for line in result.samples_file.read_text().splitlines()]
    kept = [record for record in records if ended(record)]
    assert (result.written, result.rows, result.left_out) == (5, len(kept), 5 - len(kept))
    rows = [json.loads(line) for line in at_once.read_text().splitlines()]
    assert len(rows) == len(kept) >= 3
    for record, row in zip(kept, rows):
        texts = [s["text"] for s in record["samples"]]
        assert len(set(texts)) > 1  # sampled at T=1, not four greedy answers
        assert [s["score"] for s in record["samples"]] == [float(len(t)) for t in texts]
        # The longest answer that ended is kept, not a longer one cut at max_new_tokens.
        best = max(ended(record), key=len)
        assert row["messages"] == [*record["prompt"], {"role": "assistant", "content": best}]
        assert row["scores"] == {"best": float(len(best)), "all": [float(len(t)) for t in texts]}
    # To some prompt, a longer answer was cut at max_new_tokens: it is not the one kept.
    assert any(max((s["text"] for s in r["samples"]), key=len) != max(ended(r), key=len) for r in kept)

    # Interrupted after two prompts and finished in smaller batches: each answer is sampled from its own seed.
    resumed = tmp_path / "resumed.jsonl"
    generate_teacher_data(str(stopping_model_dir), prompts, resumed, seed=3, batch_size=4, limit=2, **options)
    assert len(resumed.read_text().splitlines()) == 2
    second = generate_teacher_data(str(stopping_model_dir), prompts, resumed, seed=3, batch_size=4, **options)
    assert (second.resumed_from, second.written) == (2, 5)
    assert resumed.read_text() == at_once.read_text()
    assert second.samples_file.read_text() == result.samples_file.read_text()

    other = generate_teacher_data(str(stopping_model_dir), prompts, tmp_path / "other.jsonl", seed=4, **options)
    assert other.samples_file.read_text() != result.samples_file.read_text()
    # Continued with another seed, number of samples or --keep, the file would mix two samplings.
    for changed in ({"seed": 4}, {"samples": 3}, {"keep": "pairs"}):
        with pytest.raises(TuneforgeError, match=f"{next(iter(changed))} .* where this call asks for") as mixed:
            generate_teacher_data(str(stopping_model_dir), prompts, at_once, **{**options, "seed": 3, **changed})
        assert mixed.value.code == "output_mismatch"


def test_best_of_n_with_a_reward_model_retrained_in_place_is_refused_rather_than_mixing_its_scores(
    tiny_model_dir, tmp_path
):
    import torch
    from tiny import tiny_llama, tiny_tokenizer
    from transformers import LlamaForSequenceClassification

    from tuneforge.distill import generate_teacher_data

    def save_reward_model(seed: int) -> Path:
        tokenizer = tiny_tokenizer()
        config = tiny_llama(tokenizer).config
        config.num_labels = 1
        torch.manual_seed(seed)
        LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
        tokenizer.save_pretrained(tmp_path / "rm")
        return tmp_path / "rm"

    prompts, _ = best_of_n_prompts(tmp_path)
    grader = {"type": "reward_model", "name": "rm", "model": str(save_reward_model(0))}
    out = tmp_path / "pairs.jsonl"
    options = dict(max_new_tokens=4, progress=False, samples=2, grader=grader, keep="pairs")
    generate_teacher_data(str(tiny_model_dir), prompts, out, limit=1, **options)
    # The same reward model continues the file; one retrained in place (new weights, same folder) would give
    # the remaining prompts' answers scores from another model.
    assert generate_teacher_data(str(tiny_model_dir), prompts, out, limit=2, **options).resumed_from == 1
    save_reward_model(1)
    with pytest.raises(TuneforgeError, match="reward models that have changed since") as mixed:
        generate_teacher_data(str(tiny_model_dir), prompts, out, **options)
    assert mixed.value.code == "output_mismatch"


def test_best_of_n_pairs_leave_ties_and_cut_answers_out_and_train_dpo(stopping_model_dir, tmp_path):
    from tuneforge.distill import generate_teacher_data
    from tuneforge.training import train

    prompts, grader = best_of_n_prompts(tmp_path, ties=2)
    out = tmp_path / "pairs.jsonl"
    options = dict(max_new_tokens=6, progress=False, samples=4, seed=3, grader=grader, keep="pairs")
    result = generate_teacher_data(str(stopping_model_dir), prompts, out, **options)
    records = [json.loads(line) for line in result.samples_file.read_text().splitlines()]
    # A pair needs two answers that ended, of different lengths; the prompts asking for a tie give none.
    paired = [r for r in records[:3] if len({len(t) for t in ended(r)}) > 1]
    assert (result.written, result.rows, result.left_out) == (5, len(paired), 5 - len(paired))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["prompt"] for row in rows] == [r["prompt"] for r in paired] and len(rows) >= 2
    for record, row in zip(paired, rows):
        assert row["chosen"][0]["content"] == max(ended(record), key=len)
        assert row["rejected"][0]["content"] == min(ended(record), key=len)
        assert row["scores"]["chosen"] > row["scores"]["rejected"]
        assert row["scores"]["all"] == [s["score"] for s in record["samples"]]
    # The longest answer to some prompt was cut at max_new_tokens: it is not the chosen one.
    assert any(max(r["samples"], key=lambda s: len(s["text"]))["finish_reason"] == "length" for r in paired)
    # A rerun finds every prompt answered and writes the same pairs again from the recorded answers.
    again = generate_teacher_data(str(stopping_model_dir), prompts, out, **options)
    assert (again.resumed_from, again.rows, again.left_out) == (5, len(paired), 0)
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows

    # The pairs are DPO's data as they are.
    cfg = tiny_run_config(stopping_model_dir, {"train": out, "validation": None}, tmp_path / "run", max_steps=2)
    cfg["method"], cfg["dpo"], cfg["data"]["validation"] = "dpo", {}, 0
    assert math.isfinite(train(cfg, progress=False).metrics["train_loss"])


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "best-of-N"])
def test_distill_generate_continues_with_numpy_counts_as_with_ints(sampled, stopping_model_dir, tmp_path):
    """Counts computed with NumPy (np.int64) are recorded as the numbers they are: the file continues with the same
    counts, as NumPy integers or ints, not refused as written with other settings ("max_new_tokens 6 where ... 6")."""
    import numpy as np

    from tuneforge.distill import generate_teacher_data

    prompts, grader = best_of_n_prompts(tmp_path)
    given = {"samples": np.int64(2), "seed": np.int64(3), "grader": grader} if sampled else {}
    out = tmp_path / "answers.jsonl"
    model = str(stopping_model_dir)
    generate_teacher_data(model, prompts, out, max_new_tokens=np.int64(6), limit=2, progress=False, **given)
    record = json.loads(out.with_name(out.name + ".teacher.json").read_text())
    assert record["max_new_tokens"] == 6 and record["samples"] == (2 if sampled else None)
    as_ints = {key: int(value) if isinstance(value, np.integer) else value for key, value in given.items()}
    continued = generate_teacher_data(model, prompts, out, max_new_tokens=6, progress=False, **as_ints)
    assert (continued.resumed_from, continued.written) == (2, 5)


@pytest.mark.parametrize(
    "edit",
    [
        lambda record: record.pop("samples"),
        lambda record: record["samples"][0].pop("score"),
        lambda record: record["samples"][1].update(score="high"),
        lambda record: record["samples"][2].update(finish_reason=None),
        lambda record: record.update(samples="none"),
    ],
)
def test_best_of_n_refuses_to_continue_answers_edited_by_hand(edit, stopping_model_dir, tmp_path):
    from tuneforge.distill import generate_teacher_data

    prompts, grader = best_of_n_prompts(tmp_path)
    options = dict(max_new_tokens=6, progress=False, samples=4, temperature=1.0, grader=grader)
    out = tmp_path / "out.jsonl"
    result = generate_teacher_data(str(stopping_model_dir), prompts, out, limit=2, **options)
    records = [json.loads(line) for line in result.samples_file.read_text().splitlines()]
    edit(records[1])
    result.samples_file.write_text("".join(json.dumps(record) + "\n" for record in records))
    with pytest.raises(TuneforgeError, match="line 2 does not answer prompt 2") as err:
        generate_teacher_data(str(stopping_model_dir), prompts, out, **options)
    assert err.value.code == "output_mismatch" and str(result.samples_file) in err.value.message


def test_best_of_n_refuses_options_that_cannot_work_before_any_model_loads(tmp_path):
    from tuneforge.distill import generate_teacher_data

    prompts, grader = best_of_n_prompts(tmp_path)
    missing = str(tmp_path / "no-model")
    out = tmp_path / "out.jsonl"
    for options, message in (
        ({"samples": 4}, "--samples N and --grader SPEC go together"),
        ({"grader": grader}, "--samples N and --grader SPEC go together"),
        ({"samples": 1, "grader": grader}, r"needs --samples of at least 2 \(got 1\)\.$"),
        (
            {"samples": 4, "grader": grader, "temperature": 0.0},
            r"needs a --temperature above 0 \(got 0\.0; at 0 every answer is the same\)\.$",
        ),
        ({"samples": 4, "grader": grader, "keep": "pair"}, r"needs --keep best or pairs \(got pair\)\.$"),
        ({"samples": 4, "grader": f"{tmp_path / 'rewards.py'}:nothing"}, "nothing"),
    ):
        with pytest.raises(TuneforgeError, match=message):
            generate_teacher_data(missing, prompts, out, progress=False, **options)
    out.write_text(
        '{"messages": [{"role": "user", "content": "Question 0: why?"}, {"role": "assistant", "content": "a"}]}\n'
    )
    with pytest.raises(TuneforgeError, match="rows that best-of-N did not write") as foreign:
        generate_teacher_data(missing, prompts, out, progress=False, samples=4, grader=grader)
    assert foreign.value.code == "output_mismatch"


def test_best_of_n_best_leaves_out_prompts_whose_best_answer_falls_short_of_the_pass_threshold(
    stopping_model_dir, tmp_path
):
    from tuneforge.distill import generate_teacher_data

    prompts, _ = best_of_n_prompts(tmp_path)
    source = "def grade(sample, item):\n    return float(len(sample['output_text']))\n"
    grader = {"type": "python", "name": "length", "source": source, "pass_threshold": 10}
    out = tmp_path / "best.jsonl"
    result = generate_teacher_data(str(stopping_model_dir), prompts, out, max_new_tokens=6, samples=3, grader=grader)
    records = [json.loads(line) for line in result.samples_file.read_text().splitlines()]
    best = [max(map(len, ended(r)), default=-1) for r in records]
    assert 0 < result.left_out == sum(b < 10 for b in best) < 5  # some prompts pass, some do not
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["messages"][:-1] for row in rows] == [r["prompt"] for r, b in zip(records, best) if b >= 10]
    assert all(row["scores"]["best"] >= 10 for row in rows)


TOOL_ROWS = [
    {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER_TOOL]},
    {"messages": [{"role": "user", "content": "What time is it?"}], "tools": [CLOCK_TOOL, WEATHER_TOOL]},
    {"messages": [{"role": "user", "content": "Hello"}]},
]


def test_distill_generate_answers_with_each_rows_tools_as_serve_renders_them(tmp_path):
    """The teacher answers each prompt rendered with its row's tools, as `tuneforge serve` encodes a request
    with the same messages and tools (rows with different tools in one batch), and each row keeps its tools."""
    from families import FAMILIES, save_family_model

    from tuneforge.distill import generate_teacher_data
    from tuneforge.generate import generate
    from tuneforge.models import load_model, load_tokenizer
    from tuneforge.serve.app import _encode
    from tuneforge.serve.bodies import ChatCompletionBody

    teacher = save_family_model(FAMILIES["qwen2.5"], tmp_path / "qwen")
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps(r) + "\n" for r in TOOL_ROWS))
    out = tmp_path / "teacher.jsonl"
    generate_teacher_data(
        str(teacher), prompts_file, out, max_new_tokens=8, batch_size=4, precision="fp32", progress=False
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.get("tools") for r in rows] == [r.get("tools") for r in TOOL_ROWS]

    model, tokenizer = load_model(str(teacher)), load_tokenizer(str(teacher))
    for row, written in zip(TOOL_ROWS, rows):
        body = ChatCompletionBody(model="m", messages=row["messages"], tools=row.get("tools"))
        [served] = _encode(tokenizer, [body.template_messages()], body.template_tools())
        [answer] = generate(model, tokenizer, [tuple(served)], max_new_tokens=8)
        assert written["messages"][-1]["content"] == answer.text


def test_distill_generate_refuses_tools_the_teacher_cannot_read(tiny_model_dir, tmp_path):
    """Rows with tools, for a teacher whose template writes none: refused at their line and field, before
    any answer is generated."""
    from tuneforge.distill import generate_teacher_data

    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps(r) + "\n" for r in TOOL_ROWS))
    with pytest.raises(DataError) as err:
        generate_teacher_data(str(tiny_model_dir), prompts_file, tmp_path / "out.jsonl", progress=False)
    assert [(p.line, p.field, p.code) for p in err.value.problems] == [
        (1, "tools", "tools_not_rendered"),
        (2, "tools", "tools_not_rendered"),
    ]
    assert not (tmp_path / "out.jsonl").exists()


def test_distill_generate_does_not_continue_rows_written_for_other_tools(tmp_path):
    """A rerun after the rows' tools changed refuses to continue: the rows already written answer prompts
    rendered without (or with other) tools."""
    from families import FAMILIES, save_family_model

    from tuneforge.distill import generate_teacher_data

    teacher = save_family_model(FAMILIES["qwen2.5"], tmp_path / "qwen")
    prompts_file = tmp_path / "prompts.jsonl"
    untooled = [{"messages": row["messages"]} for row in TOOL_ROWS]
    prompts_file.write_text("".join(json.dumps(r) + "\n" for r in untooled))
    out = tmp_path / "teacher.jsonl"
    options = dict(max_new_tokens=4, progress=False)
    generate_teacher_data(str(teacher), prompts_file, out, limit=2, **options)
    prompts_file.write_text("".join(json.dumps(r) + "\n" for r in TOOL_ROWS))
    with pytest.raises(TuneforgeError, match="line 1 does not answer prompt 1") as mixed:
        generate_teacher_data(str(teacher), prompts_file, out, **options)
    assert mixed.value.code == "output_mismatch"
    assert len(out.read_text().splitlines()) == 2


def test_distill_generate_writes_a_teachers_tool_calls_as_openai_tool_calls_a_student_trains_on(tmp_path, capsys):
    """A teacher's answer that calls tools is written as serve replies, an assistant message with `tool_calls`,
    not the teacher's call syntax: a Llama 3 student's `data check --show` renders the call in Llama's form,
    a rerun continues the file, and one from the start writes it byte for byte."""
    from families import FAMILIES, save_family_model
    from test_serve import TOOLS, WEATHER, train_tool_caller

    from tuneforge.data.check import check_command
    from tuneforge.distill import generate_teacher_data

    teacher = train_tool_caller(tmp_path)  # a Qwen 2.5 that answers WEATHER with TOOLS by calling get_weather
    prompts_file = tmp_path / "prompts.jsonl"
    rows = [{"messages": WEATHER, "tools": TOOLS}, {"messages": [{"role": "user", "content": "Hello"}]}]
    prompts_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "teacher.jsonl"
    options = dict(max_new_tokens=60, precision="fp32", progress=False)
    generate_teacher_data(str(teacher), prompts_file, out, limit=1, **options)
    result = generate_teacher_data(str(teacher), prompts_file, out, **options)
    assert (result.resumed_from, result.written) == (1, 2)
    again = generate_teacher_data(str(teacher), prompts_file, tmp_path / "again.jsonl", **options)
    assert again.out.read_bytes() == out.read_bytes()  # the calls' ids too: a rerun writes the same file

    [called, answered] = [json.loads(line) for line in out.read_text().splitlines()]
    reply = called["messages"][-1]
    assert reply["content"] is None and "tool_call" not in json.dumps(reply["content"])
    [call] = reply["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert (call["function"]["name"], json.loads(call["function"]["arguments"])) == ("get_weather", {"city": "Paris"})
    assert "tool_calls" not in answered["messages"][-1]  # a row without tools: its answer is text

    student = save_family_model(FAMILIES["llama3"], tmp_path / "llama")
    capsys.readouterr()
    assert check_command([str(out)], model=str(student), show=1) == 0
    shown = capsys.readouterr().out
    assert '{"name": "get_weather", "parameters": {"city": "Paris"}}' in shown and "<tool_call>" not in shown


def test_best_of_n_rows_give_their_tool_calls_the_same_ids_each_time_they_are_written():
    """A resumed call writes the output again from the recorded answers: each call's id derives from its prompt's
    place and answer, so the rows come out as before, and the chosen and rejected answers' calls differ."""
    from tuneforge.distill.teacher_data import kept_row
    from tuneforge.tool_calls import HERMES

    def call(city: str) -> str:
        return f'<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "{city}"}}}}\n</tool_call>'

    record = {
        "prompt": [{"role": "user", "content": "Weather?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather"}}],
        "samples": [
            {"text": call("Paris"), "score": 1.0, "finish_reason": "stop"},
            {"text": call("Rome"), "score": 0.0, "finish_reason": "stop"},
        ],
    }
    first, second = (kept_row(record, 3, "pairs", None, HERMES) for _ in range(2))
    assert json.dumps(first) == json.dumps(second)
    [chosen], [rejected] = first["chosen"][0]["tool_calls"], first["rejected"][0]["tool_calls"]
    assert chosen["id"].startswith("call_") and chosen["id"] != rejected["id"]
    assert kept_row(record, 4, "pairs", None, HERMES)["chosen"][0]["tool_calls"][0]["id"] != chosen["id"]


def test_a_teacher_that_is_the_student_itself_is_warned_of_before_any_work(tiny_model_dir, triage_data, tmp_path):
    import warnings

    from tuneforge.training.loop import check_before_launch

    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    other = save_tiny_model(tmp_path / "other", seed=1)
    for teacher, said in ((tiny_model_dir, "the same folder"), (copy, "the same weights"), (other, None)):
        cfg = load_config(distill_config(tiny_model_dir, teacher, triage_data, tmp_path / "run"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check_before_launch(cfg, 1)
        told = [str(w.message) for w in caught if "distill.teacher" in str(w.message)]
        if said is None:
            assert told == []
            continue
        assert len(told) == 1 and said in told[0] and "knows more than the student" in told[0], told
    assert not (tmp_path / "run").exists()
