"""Preference tuning on images: DPO (and KTO) pairs whose prompts hold images, on tiny vision models
(Gemma 3, Qwen2.5-VL and SmolVLM shapes, tests/families.py) in fp32."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from data.rows import write_jsonl
from families import png_data_url, save_gemma3_vision_model, save_qwen2_5_vl_model, save_smolvlm_model

from tuneforge.config import DataConfig, load_config
from tuneforge.data import IGNORE_INDEX, RowGroup, collate, prepare
from tuneforge.methods import batch_items, dpo
from tuneforge.models import causal_lm, load_model, load_tokenizer
from tuneforge.models.loading import image_inputs

RED, BLUE = (220, 20, 20), (20, 20, 220)
QUESTION = {"type": "text", "text": "What colour is this?"}


def image_part(colour, size) -> dict:
    return {"type": "image_url", "image_url": {"url": png_data_url(colour, size)}}


def openai_pair(colour, size, chosen: str, rejected: str) -> dict:
    return {
        "input": {"messages": [{"role": "user", "content": [image_part(colour, size), QUESTION]}]},
        "preferred_output": [{"role": "assistant", "content": chosen}],
        "non_preferred_output": [{"role": "assistant", "content": rejected}],
    }


def trl_pair(colour, size, chosen: str, rejected: str) -> dict:
    return {
        "prompt": [{"role": "user", "content": [image_part(colour, size), QUESTION]}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vision-dpo")
    return {
        "gemma3": save_gemma3_vision_model(root / "gemma3"),
        "qwen2_5_vl": save_qwen2_5_vl_model(root / "qwen"),
        "smolvlm": save_smolvlm_model(root / "smolvlm"),
    }


def direct_logps(model, folder: Path, example, pictures, *, with_pixels: bool) -> float:
    """The example's reply log-probability from transformers' own forward: the image processor's pixels (and
    Qwen2-VL's grid, SmolVLM's tiles' pixel mask) and the image tokens' types beside its tokens, or its tokens
    alone."""
    from transformers import AutoImageProcessor

    ids = torch.tensor([list(example.input_ids)])
    inputs = {"input_ids": ids}
    if with_pixels:
        inputs.update(AutoImageProcessor.from_pretrained(folder)(images=pictures, return_tensors="pt"))
        # What the processor marks beside the tokens: Gemma 3's image token types (an image attends both ways),
        # Qwen2-VL's multimodal token types (its 3-D positions); SmolVLM finds its image tokens itself.
        key = {"gemma3": "token_type_ids", "qwen2_5_vl": "mm_token_type_ids"}.get(model.config.model_type)
        if key is not None:
            inputs[key] = (ids == model.config.image_token_id).long()
    with torch.no_grad():
        logps = torch.log_softmax(model(**inputs).logits[0].float(), dim=-1)
    labels = torch.tensor(list(example.labels))
    trained = labels != IGNORE_INDEX
    return float(logps[trained].gather(-1, labels[trained][:, None]).sum())


def pair_items(folder: Path, pairs: list[dict], tmp_path: Path) -> tuple:
    """The model's tokenizer and the batch items a DPO run on it makes of `pairs` (written to a file in
    `tmp_path`)."""
    tokenizer = load_tokenizer(str(folder))
    data_file = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    data = prepare(DataConfig(train=str(data_file), validation=0.0), tokenizer, use_cache=False, log=lambda *_: None)
    cfg = load_config({"base_model": str(folder), "method": "dpo", "data": {"train": str(data_file)}})
    return tokenizer, batch_items(data, cfg)[0]


@pytest.mark.parametrize("family", ["gemma3", "qwen2_5_vl", "smolvlm"])
@pytest.mark.parametrize("row", [openai_pair, trl_pair])
def test_image_pairs_log_probabilities_are_transformers_forward_with_the_pixels(models, family, row, tmp_path):
    from PIL import Image

    folder = models[family]
    pairs = [row(RED, (20, 16), "It is red.", "It is blue."), row(BLUE, (40, 32), "Blue.", "Red, I think.")]
    tokenizer, items = pair_items(folder, pairs, tmp_path)
    assert all(isinstance(item, RowGroup) and len(item.examples) == 2 for item in items)
    model = load_model(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        batch = collate(items, tokenizer.pad_token_id, images=image_inputs(tokenizer))
        computed = dpo.sequence_logps(causal_lm(model), **batch).tolist()
    pictures = {(RED, (20, 16)): Image.new("RGB", (20, 16), RED), (BLUE, (40, 32)): Image.new("RGB", (40, 32), BLUE)}
    expected, blind = [], []
    for item in items:
        for example in item.examples:  # chosen, then rejected: each with the prompt's image
            [shown] = example.images
            picture = next(p for (colour, size), p in pictures.items() if shown == png_bytes(colour, size))
            expected.append(direct_logps(model, folder, example, [picture], with_pixels=True))
            blind.append(direct_logps(model, folder, example, [picture], with_pixels=False))
    assert computed == pytest.approx(expected, abs=1e-5)
    assert all(abs(c - b) > 1e-3 for c, b in zip(computed, blind))  # the images count


@pytest.mark.parametrize("family", ["gemma3", "qwen2_5_vl", "smolvlm"])
def test_an_image_pairs_dpo_loss_is_computed_from_transformers_forward_of_policy_and_reference_with_the_pixels(
    models, family, tmp_path
):
    """The objective's sigmoid loss on a LoRA policy that differs from its reference (the adapter disabled): each
    pair's -log sigmoid(beta * margin), its log-ratios from transformers' forward of each with the prompt's pixels."""
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from PIL import Image

    folder = models[family]
    pairs = [openai_pair(RED, (20, 16), "It is red.", "It is blue."), openai_pair(BLUE, (40, 32), "Blue.", "Red.")]
    tokenizer, items = pair_items(folder, pairs, tmp_path)
    torch.manual_seed(0)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    policy = get_peft_model(load_model(str(folder), dtype=torch.float32), lora).eval()
    objective = dpo.DPOObjective(policy, beta=0.5, loss="sigmoid")
    with torch.no_grad():
        loss = objective(**collate(items, tokenizer.pad_token_id, images=image_inputs(tokenizer)))["loss"].item()
    pictures = {png_bytes(RED, (20, 16)): Image.new("RGB", (20, 16), RED)}
    pictures[png_bytes(BLUE, (40, 32))] = Image.new("RGB", (40, 32), BLUE)
    expected = 0.0
    for item in items:
        ratios = []
        for example in item.examples:  # chosen, then rejected
            shown = [pictures[data] for data in example.images]
            mine = direct_logps(policy, folder, example, shown, with_pixels=True)
            with policy.disable_adapter():
                reference = direct_logps(policy, folder, example, shown, with_pixels=True)
            ratios.append(mine - reference)
        assert abs(ratios[0]) > 1e-3  # the policy is not its reference
        expected -= F.logsigmoid(torch.tensor(0.5 * (ratios[0] - ratios[1]))).item()
    assert loss == pytest.approx(expected, abs=1e-5)


def png_bytes(colour, size) -> bytes:
    import base64

    return base64.b64decode(png_data_url(colour, size).split(",", 1)[1])


def dpo_run(folder: Path, data_file: Path, out: Path, loss: str, **train) -> dict:
    return {
        "base_model": str(folder),
        "method": "dpo",
        "dpo": {"loss": loss, **({} if loss == "orpo" else {"beta": 0.5})},
        "lora": {"r": 8, "alpha": 16},
        "data": {"train": str(data_file), "validation": 0.25, "max_length": 96},
        "train": {"batch_size": 4, "learning_rate": 2e-2, "precision": "fp32", **train},
        "output_dir": str(out),
    }


def colour_pairs(n: int) -> list[dict]:
    """Pairs whose preferred answer names the image's colour: the text alone cannot tell which to prefer."""
    out = []
    for i in range(n):
        size = (20 + i, 16)
        out.append(openai_pair(RED, size, "It is red.", "It is blue."))
        out.append(openai_pair(BLUE, size, "It is blue.", "It is red."))
    return out


@pytest.mark.parametrize(("family", "loss"), [("gemma3", "sigmoid"), ("gemma3", "simpo"), ("smolvlm", "sigmoid")])
def test_a_dpo_run_on_image_pairs_learns_resumes_exactly_and_its_final_model_reads_images(
    models, family, loss, tmp_path
):
    from tuneforge.training.loop import train

    run = tmp_path / "run"
    data_file = write_jsonl(tmp_path / "pairs.jsonl", colour_pairs(8))
    cfg = dpo_run(models[family], data_file, run, loss, max_steps=6, eval_every=3, save_every=3)
    result = train(cfg, progress=False)
    rows = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "train_loss" in r]
    if loss == "sigmoid":  # the reference (the adapter disabled) reads the images as the policy does
        assert rows[0]["train_loss"] == pytest.approx(0.6931472, abs=1e-6)
    assert result.metrics["rewards/margins"] > rows[0]["rewards/margins"]
    assert "full_valid_rewards/accuracies" in result.metrics
    trained = set(load_model(str(run), dtype=torch.float32).state_dict())  # the vision encoder stays frozen
    assert any("lora_" in name for name in trained)
    assert not any("vision" in name and "lora_" in name for name in trained)
    # From the step-3 checkpoint again: steps 4 to 6 repeat to the bit.
    shutil.rmtree(run / "checkpoints" / "step-6")
    train(cfg, resume="latest", progress=False)
    again = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "train_loss" in r]
    assert [r["train_loss"] for r in again] == [r["train_loss"] for r in rows]
    # final/ answers a prompt with an image, the image read: another image changes the answer's first logits.
    from tuneforge.generate import Batch, Sampling, encode_prompts

    tokenizer = load_tokenizer(str(result.final_dir))
    model = load_model(str(result.final_dir), dtype=torch.float32).eval()
    prompt = [{"role": "user", "content": [{"type": "image"}, QUESTION]}]
    first_logits = []
    for colour in (RED, BLUE):
        shown = [png_bytes(colour, (20, 16))]
        [ids] = encode_prompts(tokenizer, [prompt], images=shown)
        batch = Batch(model, tokenizer)
        answered = batch.add(ids, Sampling(4), images=shown)
        while batch:
            batch.step()
        assert answered.completion().token_ids
        inputs = {"input_ids": torch.tensor([ids])}
        inputs.update(image_inputs(tokenizer).model_inputs(shown, inputs["input_ids"]))
        with torch.no_grad():
            first_logits.append(model(**inputs).logits[0, -1])
    assert not torch.allclose(first_logits[0], first_logits[1])


def test_kto_on_image_rows_keeps_each_prompts_images_with_its_mismatched_reply(models, tmp_path):
    from tuneforge.training.loop import train

    rated = []
    for i in range(4):
        for colour, name, other in ((RED, "red", "blue"), (BLUE, "blue", "red")):
            content = [image_part(colour, (20 + i, 16)), QUESTION]
            # Each image's replies are its own: a reply borrowed from another image's row is another reply.
            for answer, label in ((f"It is {name} ({name} {i}).", True), (f"It is {other} ({name} {i}).", False)):
                messages = [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
                rated.append({"messages": messages, "label": label})
    data_file = write_jsonl(tmp_path / "rated.jsonl", rated)
    tokenizer = load_tokenizer(str(models["gemma3"]))
    data = prepare(DataConfig(train=str(data_file), validation=0.0), tokenizer, use_cache=False, log=lambda *_: None)
    items = dpo.kto_rows(data.train, 64)
    for item in items:
        example, mismatched = item.examples
        assert mismatched.images == example.images
        # Its prompt is the example's, whole, and its reply another prompt's: the same question (the same tokens)
        # about another image is another prompt, so the reply is never one given to this image.
        start = dpo._reply_start(example)
        assert mismatched.input_ids[: start + 1] == example.input_ids[: start + 1]
        same_image = {tuple(e.input_ids[start + 1 :]) for e in data.train if e.images == example.images}
        assert tuple(mismatched.input_ids[start + 1 :]) not in same_image
    cfg = dpo_run(models["gemma3"], data_file, tmp_path / "run", "kto", max_steps=2)
    first = train(cfg, progress=False).metrics
    assert all(math.isfinite(first[key]) for key in ("train_loss", "kl", "rewards/chosen")), first
