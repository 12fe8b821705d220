"""GRPO on prompts with images, on tiny vision models (Gemma 3 and Qwen2.5-VL shapes, tests/families.py) in fp32:
the pixels in sampling, in the policy's and the reference's log-probabilities, and an exact resume."""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import pytest
import torch
from data.rows import write_jsonl
from families import FAMILIES, png_data_url, save_family_model, save_gemma3_vision_model, save_qwen2_5_vl_model
from test_grpo import assert_resumes_exactly

from tuneforge.config import load_config
from tuneforge.data import IGNORE_INDEX
from tuneforge.errors import DataError
from tuneforge.generate import Completion
from tuneforge.methods import build_objective, grpo, prepare_items, prepare_model
from tuneforge.methods.sft import token_cross_entropy
from tuneforge.models import load_model, load_tokenizer
from tuneforge.training import train

pytestmark = pytest.mark.usefixtures("one_thread")

RED, BLUE = (220, 20, 20), (20, 20, 220)
SIZE = (20, 16)
# Rewards answers by their length, so that a group's answers score differently and train.
BY_LENGTH = {
    "type": "python",
    "name": "by_length",
    "source": "def grade(sample, item):\n    return len(sample['output_text']) % 5 / 4\n",
}


def image_prompt(colour, answer: str) -> dict:
    content = [
        {"type": "image_url", "image_url": {"url": png_data_url(colour, SIZE)}},
        {"type": "text", "text": "What colour is this?"},
    ]
    return {"messages": [{"role": "user", "content": content}], "answer": answer}


def png_bytes(colour) -> bytes:
    return base64.b64decode(png_data_url(colour, SIZE).split(",", 1)[1])


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vision-grpo")
    return {"gemma3": save_gemma3_vision_model(root / "gemma3"), "qwen2_5_vl": save_qwen2_5_vl_model(root / "qwen")}


def grpo_config(folder: Path, data_file: Path, out: Path, **train_options) -> dict:
    return {
        "base_model": str(folder),
        "method": "grpo",
        "grpo": {"grader": BY_LENGTH, "group_size": 4, "max_new_tokens": 6, "beta": 0.04},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(data_file), "validation": 0.0, "max_length": 128},
        "train": {"batch_size": 2, "learning_rate": 5e-2, "precision": "fp32", "max_steps": 2, **train_options},
        "output_dir": str(out),
    }


def objective_for(folder: Path, data_file: Path, tmp_path: Path):
    cfg = load_config(grpo_config(folder, data_file, tmp_path / "run"))
    tokenizer = load_tokenizer(str(folder))
    model = prepare_model(load_model(str(folder), dtype=torch.float32), cfg)
    objective = build_objective(model, cfg, tokenizer, dtype=torch.float32, device=torch.device("cpu"))
    return objective, prepare_items(cfg, tokenizer).train, tokenizer


def direct_logps(model, folder: Path, ids: list[int], labels: list[int], colour, *, with_pixels: bool) -> torch.Tensor:
    """The trained tokens' log-probabilities from transformers' own forward of one answer: the image processor's
    pixels (and Qwen2-VL's grid) and the image tokens' types beside its tokens, or its tokens alone."""
    from PIL import Image
    from transformers import AutoImageProcessor

    input_ids = torch.tensor([ids])
    inputs = {"input_ids": input_ids}
    config = model.config
    if with_pixels:
        picture = Image.new("RGB", SIZE, colour)
        inputs.update(AutoImageProcessor.from_pretrained(folder)(images=[picture], return_tensors="pt"))
        key = "token_type_ids" if config.model_type == "gemma3" else "mm_token_type_ids"
        inputs[key] = (input_ids == config.image_token_id).long()
    logps = torch.log_softmax(model(**inputs).logits[0].float(), dim=-1)
    labels = torch.tensor(labels)
    trained = labels != IGNORE_INDEX
    return logps[trained].gather(-1, labels[trained][:, None])[:, 0]


@pytest.mark.parametrize("family", ["gemma3", "qwen2_5_vl"])
def test_the_objectives_log_probabilities_are_transformers_forward_with_the_pixels(
    models, family, tmp_path, monkeypatch
):
    folder = models[family]
    data_file = write_jsonl(tmp_path / "prompts.jsonl", [image_prompt(RED, "red"), image_prompt(BLUE, "blue")])
    objective, rows, tokenizer = objective_for(folder, data_file, tmp_path)
    assert [r.images for r in rows] == [(png_bytes(RED),), (png_bytes(BLUE),)]
    with torch.no_grad():  # an adapter away from the reference, so that the KL compares two distributions
        for name, p in objective.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    answers = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in ("It is red", "Blue", "No", "Red?")]
    completions = [Completion("", 0, len(ids), "stop", tuple(ids)) for ids in answers * 2]
    group = objective._grade(rows, completions)
    batch = objective._batch(group, list(range(8)), 1.0, sampled_scale=1.0)
    assert "pixel_values" in batch
    used = []  # the log-probabilities the objective computes: the policy's, then the reference's

    def recorded(lm, hidden, targets):
        out = token_cross_entropy(lm, hidden, targets)
        used.append(-out[0].detach())
        return out

    monkeypatch.setattr(grpo, "token_cross_entropy", recorded)
    with torch.no_grad():
        kl = objective(**batch)["kl"].item()

    def direct(with_pixels: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Each answer's trained tokens' log-probabilities under the policy and the reference, answer by answer."""
        policy, reference = [], []
        for b in range(8):
            n = int(batch["attention_mask"][b].sum()) if "attention_mask" in batch else batch["input_ids"].shape[1]
            ids, labels = batch["input_ids"][b, :n].tolist(), batch["labels"][b, :n].tolist()
            colour = RED if b < 4 else BLUE
            with torch.no_grad():
                policy.append(direct_logps(objective.model, folder, ids, labels, colour, with_pixels=with_pixels))
                with objective.model.disable_adapter():
                    reference.append(
                        direct_logps(objective.model, folder, ids, labels, colour, with_pixels=with_pixels)
                    )
        return torch.cat(policy), torch.cat(reference)

    policy, reference = direct(with_pixels=True)
    assert torch.allclose(used[0], policy, atol=1e-5) and torch.allclose(used[1], reference, atol=1e-5)
    assert not torch.allclose(used[0], direct(with_pixels=False)[0], atol=1e-3)  # the images count
    row = (batch["labels"] != IGNORE_INDEX).nonzero()[:, 0]
    q = reference - policy
    per_answer = torch.zeros(8).index_add(0, row, torch.exp(q) - q - 1) / torch.bincount(row, minlength=8)
    assert kl > 0 and kl == pytest.approx(per_answer.sum().item(), abs=1e-5)


@pytest.mark.parametrize("family", ["gemma3", "qwen2_5_vl"])
def test_answers_are_sampled_with_the_prompts_image(models, family, tmp_path):
    data_file = write_jsonl(tmp_path / "prompts.jsonl", [image_prompt(RED, "red"), image_prompt(BLUE, "blue")])
    objective, rows, _ = objective_for(models[family], data_file, tmp_path)
    assert rows[0].input_ids == rows[1].input_ids  # the same tokens: only the pixels tell the prompts apart

    def answers(row):
        [batch] = objective.make_batches([[row]], step=0, rank=0, all_sum=lambda t: t)
        return batch["input_ids"].tolist()

    assert answers(rows[0]) == answers(rows[0])  # seeded as for text prompts
    assert answers(rows[0]) != answers(rows[1])  # the same random stream answers another image otherwise


@pytest.mark.parametrize("family", ["gemma3", "qwen2_5_vl"])
def test_a_grpo_run_on_image_prompts_is_finite_and_resumes_exactly(models, family, tmp_path):
    rows = [image_prompt(colour, name) for colour, name in ((RED, "red"), (BLUE, "blue"))]
    rows += [{"messages": [{"role": "user", "content": "Name a colour."}], "answer": "red"}]  # a text prompt beside
    data_file = write_jsonl(tmp_path / "prompts.jsonl", rows)
    ref = tmp_path / "ref"
    cfg = grpo_config(models[family], data_file, ref, max_steps=4, save_every=2)
    train(cfg, progress=False)
    records = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train_loss" in r]
    assert len(steps) == 4
    for record in steps:
        assert all(math.isfinite(record[key]) for key in ("train_loss", "kl", "reward", "reward_std")), record
    assert steps[-1]["kl"] > 0  # the policy moved away from the reference
    rollouts = [json.loads(line) for line in (ref / "rollouts.jsonl").read_text().splitlines()]
    assert any(r["prompt"] == "[image]What colour is this?" for r in rollouts)

    assert_resumes_exactly(cfg, ref, tmp_path / "cut")


def test_image_prompts_for_a_model_that_reads_text_only_are_refused_by_line_and_field(tmp_path):
    text_model = save_family_model(FAMILIES["gemma3"], tmp_path / "text")
    rows = [{"prompt": "Name a colour.", "answer": "red"}, image_prompt(RED, "red")]
    data_file = write_jsonl(tmp_path / "prompts.jsonl", rows)
    cfg = load_config(grpo_config(text_model, data_file, tmp_path / "run"))
    with pytest.raises(DataError) as error:
        prepare_items(cfg, load_tokenizer(str(text_model)))
    assert "prompts.jsonl:2 messages[0].content" in str(error.value) and "images_not_read" in str(error.value)
    assert "reads text only" in str(error.value)


def test_a_reward_model_grader_on_image_prompts_is_refused_before_it_loads(models, tmp_path, monkeypatch):
    from tiny import tiny_llama
    from transformers import LlamaForSequenceClassification

    from tuneforge.errors import ConfigError
    from tuneforge.graders import reward_model

    tokenizer = load_tokenizer(str(models["gemma3"]))
    config = tiny_llama(tokenizer).config
    config.num_labels = 1
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    data_file = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hi", "answer": "x"}, image_prompt(RED, "red")])
    raw = grpo_config(models["gemma3"], data_file, tmp_path / "run")
    raw["grpo"]["grader"] = {"type": "reward_model", "name": "rm", "model": str(tmp_path / "rm")}

    def no_weights(self):
        raise AssertionError("the reward model loaded")

    monkeypatch.setattr(reward_model.RewardModelGrader, "_model", no_weights)
    with pytest.raises(
        ConfigError, match=r"grpo.grader: it scores with a reward model, which reads text only"
    ) as error:
        prepare_items(load_config(raw), tokenizer)
    assert "prompts.jsonl:2 shows images" in str(error.value)


def test_prompt_rows_with_an_images_field_read_as_the_same_rows_in_openais_layout(models, tmp_path):
    """LLaMA-Factory's `<image>` placeholder and TRL's `{"type": "image"}` part, their files named in an `images`
    field beside the data file, give the prompt tokens and image bytes of the image written into the message."""
    for colour, name in ((RED, "red.png"), (BLUE, "blue.png")):
        (tmp_path / name).write_bytes(png_bytes(colour))
    question = "What colour is this?"
    layouts = {
        "openai": [image_prompt(RED, "red"), image_prompt(BLUE, "blue")],
        "llama_factory": [
            {"messages": [{"role": "user", "content": f"<image>{question}"}], "images": [name], "answer": answer}
            for name, answer in (("red.png", "red"), ("blue.png", "blue"))
        ],
        "trl": [
            {
                "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                "images": [name],
                "answer": answer,
            }
            for name, answer in (("red.png", "red"), ("blue.png", "blue"))
        ],
    }
    read = {}
    for layout, rows in layouts.items():
        cfg = load_config(grpo_config(models["qwen2_5_vl"], write_jsonl(tmp_path / f"{layout}.jsonl", rows), tmp_path))
        prompts = prepare_items(cfg, load_tokenizer(str(models["qwen2_5_vl"]))).train
        read[layout] = [(r.input_ids, r.images) for r in prompts]
    assert [images for _, images in read["openai"]] == [(png_bytes(RED),), (png_bytes(BLUE),)]
    assert read["llama_factory"] == read["openai"] and read["trl"] == read["openai"]
