"""Fine-tuning on images and text: a tiny Gemma 3 that reads images (tests/families.py), trained on
OpenAI-style chat rows whose user messages hold image parts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from data.rows import write_jsonl
from families import FAMILIES, png_data_url, save_family_model, save_gemma3_vision_model, save_qwen2_5_vl_model

from tuneforge.config import DataConfig
from tuneforge.data import IGNORE_INDEX, collate, prepare, read_conversations
from tuneforge.errors import DataError
from tuneforge.methods import SFTObjective
from tuneforge.models import load_model, load_tokenizer
from tuneforge.models.loading import image_inputs

RED, GREEN, BLUE = (220, 20, 20), (20, 200, 20), (20, 20, 220)


def image_row(colour, answer: str, size=(20, 16)) -> dict:
    image = {"type": "image_url", "image_url": {"url": png_data_url(colour, size)}}
    question = {"type": "text", "text": "What colour is this?"}
    return {"messages": [{"role": "user", "content": [image, question]}, {"role": "assistant", "content": answer}]}


@pytest.fixture(scope="module")
def vision_model(tmp_path_factory) -> Path:
    return save_gemma3_vision_model(tmp_path_factory.mktemp("vision") / "model")


def test_labels_mask_image_tokens_and_examples_carry_their_images(vision_model, tmp_path):
    tokenizer = load_tokenizer(str(vision_model))
    images = image_inputs(tokenizer)
    rows = write_jsonl(tmp_path / "rows.jsonl", [image_row(RED, "It is red."), image_row(BLUE, "It is blue.")])
    cfg = DataConfig(train=str(rows), validation=0.0, dedup="exact")
    data = prepare(cfg, tokenizer, use_cache=False, log=lambda *_: None)
    assert len(data.train) == 2  # the same text with other images is no duplicate
    for example in data.train:
        ids, labels = example.input_ids.tolist(), example.labels.tolist()
        soft = [i for i, t in enumerate(ids) if t == images.image_token_id]
        assert len(soft) == 4 and len(example.images) == 1  # the processor's tokens per image
        assert all(labels[i] == IGNORE_INDEX and labels[i - 1] == IGNORE_INDEX for i in soft)
        trained = tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
        assert trained.startswith("It is") and trained.endswith("<end_of_turn>")
    # As the processor itself tokenizes the rendered conversation with its image.
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(vision_model)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is this?"}]}]
    messages.append({"role": "assistant", "content": "It is red."})
    from PIL import Image

    text = processor.apply_chat_template(messages, tokenize=False)
    picture = Image.new("RGB", (20, 16), RED)
    # The template writes BOS itself.
    expected = processor(text=text, images=[picture], add_special_tokens=False)["input_ids"][0]
    assert data.train[0].input_ids.tolist() == list(expected) or data.train[1].input_ids.tolist() == list(expected)


def test_the_image_reaches_the_model(vision_model, tmp_path):
    tokenizer = load_tokenizer(str(vision_model))
    rows = write_jsonl(tmp_path / "rows.jsonl", [image_row(RED, "It is red."), image_row(GREEN, "It is red.")])
    data = prepare(DataConfig(train=str(rows), validation=0.0), tokenizer, use_cache=False, log=lambda *_: None)
    model = load_model(str(vision_model), dtype=torch.float32)
    objective = SFTObjective(model).eval()
    losses = []
    with torch.no_grad():
        for example in data.train:
            batch = collate([example], tokenizer.pad_token_id, images=image_inputs(tokenizer))
            assert batch["pixel_values"].shape == (1, 3, 28, 28) and int(batch["token_type_ids"].sum()) == 4
            losses.append(objective(**batch)["ce"].item())
    assert data.train[0].input_ids == data.train[1].input_ids
    assert abs(losses[0] - losses[1]) > 1e-4  # same tokens, other image: another loss


def test_lora_trains_on_image_rows_and_final_loads_with_its_processor(vision_model, tmp_path, capsys):
    from transformers import AutoProcessor

    from tuneforge.training.loop import train

    rows = [image_row(c, f"It is {n}.", (20 + i, 16)) for i in range(8) for c, n in ((RED, "red"), (BLUE, "blue"))]
    config = {
        "base_model": str(vision_model),
        "data": {"train": str(write_jsonl(tmp_path / "train.jsonl", rows)), "validation": 0.25, "max_length": 64},
        "train": {"max_steps": 6, "batch_size": 4, "learning_rate": 1e-2, "precision": "fp32", "eval_every": 3},
        "output_dir": str(tmp_path / "run"),
    }
    result = train(config, progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert losses[-1] < losses[0] - 0.3
    out = capsys.readouterr().out
    assert "rows with images are not packed" in out and "shared prefixes" not in out
    assert "full_valid_loss" in result.metrics
    final = result.final_dir
    processor = AutoProcessor.from_pretrained(final)
    assert processor.image_seq_length == 4
    adapter = json.loads((final / "adapter_config.json").read_text())
    trained = set(load_model(str(tmp_path / "run"), dtype=torch.float32).state_dict())
    assert not any("vision_tower" in name and "lora_" in name for name in trained), adapter["target_modules"]
    from tuneforge.exporting import export

    merged = export(tmp_path / "run", "merged", None, tmp_path / "merged", progress=False).out
    assert AutoProcessor.from_pretrained(merged).image_seq_length == 4  # the merged model still reads images


def test_sample_answers_while_training_on_image_rows_are_answered_with_their_images(vision_model, tmp_path):
    from tuneforge.training.loop import train

    rows = [image_row(c, f"It is {n}.", (20 + i, 16)) for i in range(4) for c, n in ((RED, "red"), (BLUE, "blue"))]
    held_out = [image_row(GREEN, "It is green.", (24, 16)), image_row(BLUE, "It is blue.", (30, 20))]
    config = {
        "base_model": str(vision_model),
        "data": {
            "train": str(write_jsonl(tmp_path / "train.jsonl", rows)),
            "validation": str(write_jsonl(tmp_path / "valid.jsonl", held_out)),
        },
        "train": {"max_steps": 2, "batch_size": 4, "precision": "fp32", "eval_samples": 2, "eval_max_new_tokens": 4},
        "output_dir": str(tmp_path / "run"),
    }
    result = train(config, progress=False)
    final = json.loads((tmp_path / "run" / "samples.jsonl").read_text().splitlines()[-1])["samples"]
    model = load_model(str(result.final_dir), dtype=torch.float32).eval()
    prompts = [(QUESTION, [png(GREEN, (24, 16))]), (QUESTION, [png(BLUE, (30, 20))])]
    expected = answer(model, load_tokenizer(str(result.final_dir)), prompts, max_new_tokens=4)
    assert [s["answer"] for s in final] == [c.text for c in expected]
    assert [s["prompt"].count("[image]") for s in final] == [1, 1]  # each image shown as a person reads it
    assert not any("<start_of_image>" in s["prompt"] or "<image_soft_token>" in s["prompt"] for s in final)


@pytest.mark.parametrize("model", ["vision_model", "qwen_vl_model", "smolvlm_model"])
def test_sample_prompts_show_each_image_as_one_placeholder(model, request, tmp_path):
    """samples.jsonl and the report show the template's text with each image as `[image]`, as eval's examples do,
    not its hundreds of image tokens."""
    from tuneforge.training.samples import sample_prompts, shown_prompt

    tokenizer, images, data = red_and_blue(request.getfixturevalue(model), tmp_path)
    question = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is this?"}]}]
    rendered = tokenizer.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
    for prompt in sample_prompts(data.train, 2):
        assert shown_prompt(tokenizer, prompt) == rendered.replace(images.marker, "[image]")


@pytest.mark.parametrize("from_layer", [0.0, 0.5])
def test_lora_target_modules_only_the_vision_encoder_has_are_refused(vision_model, from_layer):
    """fc1 is a layer of Gemma 3's vision encoder alone; LoRA leaves that encoder out (exclude_modules), so a list
    naming fc1 would train q_proj alone, with or without lora.from_layer."""
    from tuneforge.config import load_config
    from tuneforge.errors import ConfigError
    from tuneforge.methods import prepare_model

    lora = {"target_modules": ["q_proj", "fc1"], "from_layer": from_layer}
    cfg = load_config({"base_model": str(vision_model), "data": {"train": "rows.jsonl"}, "lora": lora})
    with pytest.raises(ConfigError) as caught:
        prepare_model(load_model(str(vision_model), dtype=torch.float32), cfg)
    assert str(caught.value) == (
        "lora.target_modules: names fc1, which only the vision encoder and projector beside the text decoder have "
        "(model.vision_tower.encoder.layers.0.mlp.fc1, ...), and LoRA adapts the text decoder alone: "
        "PEFT would leave it untrained. Name linear layers the decoder has (down_proj, gate_proj, k_proj, o_proj, "
        "q_proj, up_proj, v_proj), or leave fc1 out."
    )


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("data:image/png;base64,@@@not-base64", "base64 does not decode"),
        (
            "data:image/png;base64,aGVsbG8gd29ybGQ=",
            "the data URL's bytes are not an image PIL reads (no image format recognized); "
            "give a PNG, JPEG, GIF or WEBP image.",
        ),
        ("https://example.com/cat.png", "not downloaded"),
        # OpenAI's layout takes a data URL; a path is read from the images field, which the data cache sees
        ("cat.png", "name the file in the row's 'images' field and put {\"type\": \"image\"} in this part's place"),
    ],
)
def test_bad_images_are_refused_by_line_and_field(tmp_path, url, says):
    good = image_row(RED, "It is red.")
    bad = image_row(RED, "It is red.")
    bad["messages"][0]["content"][0]["image_url"]["url"] = url
    problems = [
        p for _, p in read_conversations(write_jsonl(tmp_path / "rows.jsonl", [good, bad])) if hasattr(p, "code")
    ]
    assert [(p.code, p.line, p.field) for p in problems] == [("bad_image", 2, "messages[0].content[0].image_url.url")]
    assert says in problems[0].message


@pytest.mark.parametrize("side", [40, 100])  # Pillow warns from its limit and refuses to open from twice it
def test_an_image_over_pillows_pixel_limit_is_refused_by_line_and_field(tmp_path, monkeypatch, side):
    import PIL.Image

    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)  # a decompression bomb's size, at small sizes
    rows = [image_row(RED, "It is red.", (30, 30)), image_row(RED, "It is red.", (side, side))]
    problems = [p for _, p in read_conversations(write_jsonl(tmp_path / "rows.jsonl", rows)) if hasattr(p, "code")]
    assert [(p.code, p.line, p.field) for p in problems] == [("bad_image", 2, "messages[0].content[0].image_url.url")]
    assert "over 1000 pixels (Pillow's limit); resize it" in problems[0].message


@pytest.mark.parametrize("kind", ["GIF", "WEBP"])
def test_an_animated_image_is_refused_by_line_and_field(tmp_path, kind):
    """The model would see an animation's first frame alone: it is refused, as OpenAI's vision data refuses it."""
    import base64
    import io

    from PIL import Image

    frames = [Image.new("RGB", (20, 16), colour) for colour in (RED, BLUE)]
    out = io.BytesIO()
    frames[0].save(out, kind, save_all=True, append_images=frames[1:])
    row = image_row(RED, "It is red.")
    row["messages"][0]["content"][0]["image_url"]["url"] = (
        f"data:image/{kind.lower()};base64," + base64.b64encode(out.getvalue()).decode()
    )
    problems = [p for _, p in read_conversations(write_jsonl(tmp_path / "rows.jsonl", [row])) if hasattr(p, "code")]
    assert [(p.code, p.line, p.field) for p in problems] == [("bad_image", 1, "messages[0].content[0].image_url.url")]
    assert problems[0].message.endswith(
        f"are an animated {kind} (the model reads one frame); give a still PNG, JPEG, GIF or WEBP image."
    )


def test_an_image_in_a_reply_is_refused(tmp_path):
    row = image_row(RED, "x")
    row["messages"][1]["content"] = [{"type": "image_url", "image_url": {"url": png_data_url(RED)}}]
    problems = [p for _, p in read_conversations(write_jsonl(tmp_path / "rows.jsonl", [row])) if hasattr(p, "code")]
    assert [(p.code, p.field) for p in problems] == [("unsupported_content", "messages[1].content[0]")]


def test_a_text_only_model_refuses_image_rows_naming_the_first(tmp_path):
    model = save_family_model(FAMILIES["gemma3"], tmp_path / "text-model")
    rows = write_jsonl(
        tmp_path / "rows.jsonl",
        [
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
            image_row(RED, "It is red."),
        ],
    )
    with pytest.raises(DataError) as error:
        prepare(
            DataConfig(train=str(rows), validation=0.0),
            load_tokenizer(str(model)),
            use_cache=False,
            log=lambda *_: None,
        )
    assert "rows.jsonl:2 messages[0].content" in str(error.value) and "reads text only" in str(error.value)


def test_preference_pairs_read_back_from_the_data_cache_keep_their_prompts_images(vision_model, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path / "home"))
    image = {"type": "image_url", "image_url": {"url": png_data_url(RED)}}
    pair = {
        "prompt": [{"role": "user", "content": [image, {"type": "text", "text": "What colour is this?"}]}],
        "chosen": [{"role": "assistant", "content": "It is red."}],
        "rejected": [{"role": "assistant", "content": "It is blue."}],
    }
    rows = write_jsonl(tmp_path / "pairs.jsonl", [pair])
    tokenizer = load_tokenizer(str(vision_model))
    logged = []
    fresh, cached = (
        prepare(DataConfig(train=str(rows), validation=0.0), tokenizer, log=logged.append) for _ in range(2)
    )
    assert any("reusing the tokenized data set" in line for line in logged)
    assert cached.train_pairs == fresh.train_pairs
    assert [len(e.images) for e in cached.train_pairs[0]] == [1, 1]


@pytest.mark.parametrize(
    ("settings", "key"),
    [({"method": "reward"}, "method"), ({"train": {"kl_to_base": 0.1}}, "train.kl_to_base")],
)
def test_methods_that_would_run_without_the_images_are_refused(vision_model, tmp_path, settings, key):
    from tuneforge.config import load_config
    from tuneforge.errors import ConfigError
    from tuneforge.methods import batch_items

    tokenizer = load_tokenizer(str(vision_model))
    rows = write_jsonl(tmp_path / "rows.jsonl", [image_row(RED, "It is red.")])
    data = prepare(DataConfig(train=str(rows), validation=0.0), tokenizer, use_cache=False, log=lambda *_: None)
    cfg = load_config({"base_model": str(vision_model), "data": {"train": str(rows)}, **settings})
    with pytest.raises(ConfigError, match=key):
        batch_items(data, cfg)


def processor_answer(model, folder, messages, pictures, max_new_tokens) -> str:
    """transformers' greedy `generate` on the processor's inputs for a prompt and its images: the reply's text."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=text, images=pictures or None, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_eval_answers_image_and_text_rows_as_transformers_generates_from_the_processors_inputs(
    vision, vision_model, tmp_path
):
    from PIL import Image

    from tuneforge.eval import evaluate

    text = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    rows = [text, image_row(RED, "It is red."), image_row(GREEN, "It is green.", (12, 30))]
    result = evaluate(str(vision_model), write_jsonl(tmp_path / "test.jsonl", rows), max_new_tokens=6, progress=False)
    model, _ = vision
    expected = [
        processor_answer(model, vision_model, [{"role": "user", "content": "Hi"}], [], 6),
        processor_answer(model, vision_model, QUESTION, [Image.new("RGB", (20, 16), RED)], 6),
        processor_answer(model, vision_model, QUESTION, [Image.new("RGB", (12, 30), GREEN)], 6),
    ]
    assert [s["prediction"] for s in result["samples"]] == expected
    assert expected[1] != expected[2]  # the images reach the answers
    assert [s["input"] for s in result["samples"]] == [
        "Hi",
        "[image]What colour is this?",
        "[image]What colour is this?",
    ]
    assert result["scores"]["exact"] == 0.0 and result["loss"] > 0


def test_eval_loss_on_image_rows_is_the_validation_loss_of_their_batches(vision, vision_model, tmp_path):
    from tuneforge.eval.evaluate import read_eval_examples, render_within_window, token_loss

    model, tokenizer = vision
    rows = write_jsonl(tmp_path / "test.jsonl", [image_row(RED, "It is red."), image_row(GREEN, "It is red.")])
    examples = read_eval_examples(rows)
    losses = []
    for example in render_within_window(examples, tokenizer, None):
        batch = collate([example], tokenizer.pad_token_id, images=image_inputs(tokenizer))
        with torch.no_grad():
            losses.append(SFTObjective(model).eval()(**batch)["ce"].item())
    figures = token_loss(
        model, render_within_window(examples, tokenizer, None), tokenizer.pad_token_id, images=image_inputs(tokenizer)
    )
    assert figures["loss"] == pytest.approx(sum(losses) / figures["tokens"], rel=1e-5)


def test_eval_of_image_rows_by_a_text_model_is_refused_by_line_and_field_before_its_weights_load(
    vision_model, tmp_path, monkeypatch
):
    import importlib

    from tuneforge.eval import evaluate

    evaluate_module = importlib.import_module("tuneforge.eval.evaluate")
    model = save_family_model(FAMILIES["gemma3"], tmp_path / "text")
    text = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    rows = write_jsonl(tmp_path / "test.jsonl", [text, image_row(RED, "It is red.")])

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights loaded")

    monkeypatch.setattr(evaluate_module, "load_text_model", no_weights)
    with pytest.raises(DataError) as error:
        evaluate(str(model), rows, progress=False)
    assert "test.jsonl:2 messages[0].content" in str(error.value) and "images_not_read" in str(error.value)
    assert "reads text only" in str(error.value)
    with pytest.raises(DataError, match="images_not_read"):  # a text base, before the tuned model loads
        evaluate_module.compare(str(vision_model), str(model), rows, progress=False)


def test_prompt_rows_answered_by_generation_refuse_images(tmp_path):
    from tuneforge.distill.teacher_data import read_prompts

    rows = write_jsonl(tmp_path / "prompts.jsonl", [{"messages": image_row(RED, "x")["messages"][:1]}])
    with pytest.raises(DataError) as error:
        read_prompts(rows)
    assert "prompts.jsonl:1 messages[0].content" in str(error.value) and "images_in_prompt" in str(error.value)


def test_validate_says_rows_with_images_are_not_packed(vision_model, tmp_path, capsys):
    from tuneforge.dry_run import validate

    rows = write_jsonl(tmp_path / "rows.jsonl", [image_row(RED, "It is red."), image_row(BLUE, "It is blue.")])
    validate({"base_model": str(vision_model), "data": {"train": str(rows), "validation": 0.0}})
    out = " ".join(capsys.readouterr().out.split())
    assert "2 (unpacked: rows with images are not packed, max_length" in out.replace("│ ", "").replace(" │", "")


QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is this?"}]}]


def png(colour, size=(20, 16)) -> bytes:
    import base64

    return base64.b64decode(png_data_url(colour, size).split(",", 1)[1])


def answer(model, tokenizer, rows, max_new_tokens=8, **options) -> list:
    """Each (prompt, images) of `rows` answered greedily in one batch (each prompt encoded with its images, whose
    sizes set Qwen2-VL's token counts): the rows' completions."""
    from tuneforge.generate import Batch, Sampling, encode_prompts

    batch = Batch(model, tokenizer)
    added = [
        batch.add(
            encode_prompts(tokenizer, [prompt], images=images)[0], Sampling(max_new_tokens, **options), images=images
        )
        for prompt, images in rows
    ]
    while batch:
        batch.step()
    return [row.completion() for row in added]


@pytest.fixture(scope="module")
def vision(vision_model):
    tokenizer = load_tokenizer(str(vision_model))
    return load_model(str(vision_model), dtype=torch.float32).eval(), tokenizer


def test_a_prompt_with_an_image_is_answered_as_transformers_generates_from_the_processors_inputs(vision, vision_model):
    from PIL import Image
    from transformers import AutoProcessor

    model, tokenizer = vision
    [ours] = answer(model, tokenizer, [(QUESTION, [png(RED)])], max_new_tokens=12)
    processor = AutoProcessor.from_pretrained(vision_model)
    text = processor.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    picture = Image.new("RGB", (20, 16), RED)
    inputs = processor(text=text, images=[picture], add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    theirs = out[0, inputs["input_ids"].shape[1] :].tolist()
    assert ours.prompt_tokens == inputs["input_ids"].shape[1]
    assert list(ours.token_ids) == theirs[: len(ours.token_ids)] and len(ours.token_ids) >= 2


def test_another_image_changes_the_first_answer_tokens_logits(vision):
    model, tokenizer = vision
    red, green = answer(model, tokenizer, [(QUESTION, [png(RED)]), (QUESTION, [png(GREEN)])], 1, logprobs=5)
    assert abs(red.logprobs[0].top[0].logprob - green.logprobs[0].top[0].logprob) > 1e-4


def test_a_reply_never_holds_the_image_token(vision):
    # Sampled near uniformly over the tiny vocabulary, over eight tokens an entry: replies would hold it several times.
    model, tokenizer = vision
    torch.manual_seed(0)
    replies = answer(model, tokenizer, [(QUESTION, [png(RED)])] * 32, 256, temperature=100.0)
    tokens = [t for reply in replies for t in reply.token_ids]
    assert len(tokens) > 8 * len(tokenizer) and image_inputs(tokenizer).image_token_id not in tokens


def test_text_and_image_prompts_in_one_batch_answer_as_they_do_alone(vision):
    model, tokenizer = vision
    rows = [
        ([{"role": "user", "content": "Hello there, how are you?"}], []),
        (QUESTION, [png(RED)]),
        ([{"role": "user", "content": "Hi"}], []),
        (QUESTION, [png(GREEN, (12, 30))]),
    ]
    together = answer(model, tokenizer, rows)
    assert [c.token_ids for c in together] == [answer(model, tokenizer, [row])[0].token_ids for row in rows]


def test_a_prompt_whose_images_do_not_match_its_image_tokens_is_refused(vision):
    from tuneforge.generate import Batch, Sampling, encode_prompts

    model, tokenizer = vision
    with pytest.raises(ValueError, match="tokens of 1 images and 0 images"):
        Batch(model, tokenizer).add(encode_prompts(tokenizer, [QUESTION])[0], Sampling(4))


@pytest.fixture(scope="module")
def vision_server(vision_model):
    from test_serve import running_server

    from tuneforge.serve import AdapterPool, Engine, create_app

    engine = Engine(AdapterPool(str(vision_model)), max_batch=8)
    with running_server(create_app(engine)) as url:
        yield url
    engine.close()


def ask(url: str, content, **options):
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": content}]
    return client.chat.completions.create(model="model", messages=messages, temperature=0, **options)


def image_content(url: str) -> list:
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What colour is this?"}]


def test_serve_answers_image_and_text_requests_sent_together_as_each_is_answered_alone(vision_server, vision):
    from concurrent.futures import ThreadPoolExecutor

    model, tokenizer = vision
    requests = [
        (image_content(png_data_url(RED)), (QUESTION, [png(RED)])),
        ("Hello there, how are you?", ([{"role": "user", "content": "Hello there, how are you?"}], [])),
        (image_content(png_data_url(GREEN, (12, 30))), (QUESTION, [png(GREEN, (12, 30))])),
    ]
    with ThreadPoolExecutor(len(requests)) as pool:
        replies = list(pool.map(lambda r: ask(vision_server, r[0], max_tokens=6), requests))
    for reply, (_, row) in zip(replies, requests):
        [alone] = answer(model, tokenizer, [row], max_new_tokens=6)
        assert reply.choices[0].message.content == alone.text
        assert reply.usage.prompt_tokens == alone.prompt_tokens  # the image's tokens counted


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("https://example.com/cat.png", "not downloaded"),
        ("data:image/png;base64,@@@not-base64", "base64 does not decode"),
        (
            "data:image/png;base64,aGVsbG8gd29ybGQ=",
            "the data URL's bytes are not an image PIL reads (no image format recognized); "
            "give a PNG, JPEG, GIF or WEBP image.",
        ),
    ],
)
def test_serve_refuses_a_bad_image_naming_its_field(vision_server, url, says):
    import openai

    with pytest.raises(openai.BadRequestError) as caught:
        ask(vision_server, image_content(url), max_tokens=2)
    assert caught.value.param == "messages.0.content.0.image_url.url" and says in caught.value.body["message"]


def test_serve_refuses_an_image_over_pillows_pixel_limit_naming_its_field(vision_server, monkeypatch):
    import openai
    import PIL.Image

    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)  # a decompression bomb's size, at small sizes
    for side in (40, 100):  # Pillow warns from its limit and refuses to open from twice it
        with pytest.raises(openai.BadRequestError) as caught:
            ask(vision_server, image_content(png_data_url(RED, (side, side))), max_tokens=2)
        assert caught.value.param == "messages.0.content.0.image_url.url"
        assert "over 1000 pixels (Pillow's limit)" in caught.value.body["message"]


@pytest.mark.parametrize("as_text", [False, True])
def test_completions_prompts_holding_image_tokens_are_a_400_naming_the_prompt(vision_server, vision, as_text):
    """An image's soft tokens sent as ids, or as their text (which the tokenizer reads as the token), come with no
    image: a 400 that says where images go, not a server error."""
    import httpx

    _, tokenizer = vision
    soft = tokenizer.image_token_id
    prompts = [[5, 6, 7], [5, soft, soft, 7]]
    if as_text:
        prompts = ["Hello", f"Hello {tokenizer.image_token}{tokenizer.image_token} there"]
    body = {"model": "model", "prompt": prompts, "max_tokens": 2}
    response = httpx.post(f"{vision_server}/v1/completions", json=body, timeout=60)
    error = response.json()["error"]
    assert response.status_code == 400 and (error["param"], error["code"]) == ("prompt", "invalid_value")
    assert error["message"].startswith(f"prompt 1 holds the image token (id {soft}, '{tokenizer.image_token}' in text)")
    assert "image_url" in error["message"]


def test_a_text_model_served_refuses_image_parts_as_before(tmp_path):
    import openai
    from test_serve import running_server

    from tuneforge.serve import AdapterPool, Engine, create_app

    model = save_family_model(FAMILIES["gemma3"], tmp_path / "model")
    engine = Engine(AdapterPool(str(model)))
    try:
        with running_server(create_app(engine)) as url, pytest.raises(openai.BadRequestError) as caught:
            ask(url, image_content(png_data_url(RED)), max_tokens=2)
    finally:
        engine.close()
    assert caught.value.param == "messages.0.content" and "text model" in caught.value.body["message"]


def test_a_stored_chat_with_an_image_becomes_a_training_row_with_the_image(tmp_path):
    from tuneforge.serve.bodies import training_messages

    messages = training_messages([{"role": "user", "content": image_content(png_data_url(RED))}])
    row = {"messages": [*messages, {"role": "assistant", "content": "It is red."}]}
    [(_, record)] = list(read_conversations(write_jsonl(tmp_path / "rows.jsonl", [row])))
    assert [image.data for image in record.messages[0].images] == [png(RED)]
    assert record.messages[0].content == "What colour is this?"


def test_responses_reads_input_images_as_chat_completions_reads_image_parts(vision_server):
    import openai

    client = openai.OpenAI(base_url=f"{vision_server}/v1", api_key="none", max_retries=0, timeout=60)
    chat = ask(vision_server, image_content(png_data_url(RED)), max_tokens=6)
    parts = [
        {"type": "input_image", "image_url": png_data_url(RED), "detail": "auto"},
        {"type": "input_text", "text": "What colour is this?"},
    ]
    response = client.responses.create(
        model="model", input=[{"role": "user", "content": parts}], max_output_tokens=6, temperature=0
    )
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens  # the image's tokens counted
    http = [{"type": "input_image", "image_url": "https://example.com/cat.png"}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="model", input=[{"role": "user", "content": http}])
    assert caught.value.param == "input.0.content.0.image_url" and "not downloaded" in caught.value.body["message"]


@pytest.fixture(scope="module")
def qwen_vl_model(tmp_path_factory) -> Path:
    from families import save_qwen2_5_vl_model

    return save_qwen2_5_vl_model(tmp_path_factory.mktemp("qwen-vl") / "model")


def red_and_blue(model: Path, tmp_path, blue_size=(40, 32)):
    """The tokenizer, its image side and the prepared data of two rows of `model` whose images differ in size (red
    20x16, blue `blue_size`)."""
    tokenizer = load_tokenizer(str(model))
    rows = [image_row(RED, "It is red."), image_row(BLUE, "It is blue.", blue_size)]
    data = prepare(
        DataConfig(train=str(write_jsonl(tmp_path / "rows.jsonl", rows)), validation=0.0),
        tokenizer,
        use_cache=False,
        log=lambda *_: None,
    )
    return tokenizer, image_inputs(tokenizer), data


def test_qwen_vl_rows_get_as_many_image_tokens_as_the_processor_gives_each_image(qwen_vl_model, tmp_path):
    from PIL import Image
    from transformers import AutoImageProcessor

    tokenizer, images, data = red_and_blue(qwen_vl_model, tmp_path)
    # The processor's expansion (Qwen2VLProcessor.replace_image_token): one <|image_pad|> per merged patch.
    processor = AutoImageProcessor.from_pretrained(qwen_vl_model)
    by_answer = {"red": (RED, (20, 16)), "blue": (BLUE, (40, 32))}
    for example in data.train:
        answer = "red" if example.images[0] == png(RED) else "blue"
        colour, size = by_answer[answer]
        [grid] = processor(images=[Image.new("RGB", size, colour)], return_tensors="pt")["image_grid_thw"]
        pads = "<|image_pad|>" * int(grid.prod() // processor.merge_size**2)
        question = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is this?"}]}]
        text = tokenizer.apply_chat_template(
            [*question, {"role": "assistant", "content": f"It is {answer}."}], tokenize=False
        )
        expected = tokenizer(text.replace("<|image_pad|>", pads), add_special_tokens=False)["input_ids"]
        assert example.input_ids.tolist() == expected and len(example.images) == 1
        trained = tokenizer.decode([t for t in example.labels.tolist() if t != IGNORE_INDEX])
        assert trained == f"It is {answer}.<|im_end|>\n" or trained == f"It is {answer}.<|im_end|>"
    counts = sorted(example.input_ids.tolist().count(images.image_token_id) for example in data.train)
    assert counts == [4, 12]  # the image's size sets its token count


def test_qwen_vl_batches_place_image_tokens_by_the_models_3d_positions(qwen_vl_model, tmp_path):
    tokenizer, images, data = red_and_blue(qwen_vl_model, tmp_path)
    batch = collate(data.train, tokenizer.pad_token_id, images=images)
    assert "position_ids" not in batch and batch["image_grid_thw"].tolist() in (
        [[1, 4, 4], [1, 6, 8]],
        [[1, 6, 8], [1, 4, 4]],
    )
    objective = SFTObjective(load_model(str(qwen_vl_model), dtype=torch.float32)).eval()
    with torch.no_grad():
        together = objective(**batch)["ce"].item()
        alone = [objective(**collate([e], tokenizer.pad_token_id, images=images))["ce"].item() for e in data.train]
    assert together == pytest.approx(sum(alone), rel=1e-5)


@pytest.fixture(scope="module")
def qwen_vl(qwen_vl_model):
    return load_model(str(qwen_vl_model), dtype=torch.float32).eval(), load_tokenizer(str(qwen_vl_model))


def test_qwen_vl_prompts_with_images_are_answered_as_transformers_generates_them_alone_or_batched(qwen_vl):
    from tuneforge.generate import encode_prompts

    model, tokenizer = qwen_vl
    images = image_inputs(tokenizer)
    rows = [
        (QUESTION, [png(RED)]),
        ([{"role": "user", "content": "Hello there, how are you?"}], []),
        (QUESTION, [png(GREEN, (40, 32))]),
    ]
    for (prompt, shown), ours in zip(rows, answer(model, tokenizer, rows, 10)):
        [ids] = encode_prompts(tokenizer, [prompt], images=shown)
        inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        if shown:  # as the processor gives them: pixels, grids and where the image tokens are
            inputs.update(images.model_inputs(shown, inputs["input_ids"]))
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
        theirs = out[0, len(ids) :].tolist()
        assert list(ours.token_ids) == theirs[: len(ours.token_ids)] and len(ours.token_ids) >= 2
        assert ours.prompt_tokens == len(ids)


def test_serve_answers_qwen_vl_image_requests_as_each_is_answered_alone(qwen_vl_model, qwen_vl):
    from concurrent.futures import ThreadPoolExecutor

    from test_serve import running_server

    from tuneforge.serve import AdapterPool, Engine, create_app

    model, tokenizer = qwen_vl
    requests = [
        (image_content(png_data_url(RED)), (QUESTION, [png(RED)])),
        ("Hello there, how are you?", ([{"role": "user", "content": "Hello there, how are you?"}], [])),
        (image_content(png_data_url(GREEN, (40, 32))), (QUESTION, [png(GREEN, (40, 32))])),
    ]
    engine = Engine(AdapterPool(str(qwen_vl_model)), max_batch=8)
    try:
        with running_server(create_app(engine)) as url, ThreadPoolExecutor(len(requests)) as pool:
            replies = list(pool.map(lambda r: ask(url, r[0], max_tokens=6), requests))
    finally:
        engine.close()
    for reply, (_, row) in zip(replies, requests):
        [alone] = answer(model, tokenizer, [row], max_new_tokens=6)
        assert reply.choices[0].message.content == alone.text
        assert reply.usage.prompt_tokens == alone.prompt_tokens  # the image's tokens, by its size, counted


def test_serve_decodes_each_qwen_vl_image_once(qwen_vl_model, monkeypatch):
    """A request's image is checked and its tokens counted from its size, as the processor sizes it (an EXIF
    rotation swaps the sides and keeps the count); only the prefill decodes it, for its pixels."""
    import transformers.image_utils
    from test_serve import running_server

    from tuneforge.serve import AdapterPool, Engine, create_app

    decoded = []
    real = transformers.image_utils.load_image
    monkeypatch.setattr(transformers.image_utils, "load_image", lambda image: decoded.append(1) or real(image))
    engine = Engine(AdapterPool(str(qwen_vl_model)))
    try:
        with running_server(create_app(engine)) as url:
            reply = ask(url, image_content(png_data_url(GREEN, (40, 32))), max_tokens=2)
    finally:
        engine.close()
    assert reply.usage.prompt_tokens > 12 and len(decoded) == 1


def test_serve_refuses_an_image_qwen_vls_processor_does_not_take_naming_its_field(qwen_vl_model):
    """Qwen2-VL's image processor takes no image with a side over 200 times the other: a 400 at the image's url,
    not one that blames the chat template."""
    import openai
    from test_serve import running_server

    from tuneforge.serve import AdapterPool, Engine, create_app

    engine = Engine(AdapterPool(str(qwen_vl_model)))
    try:
        with running_server(create_app(engine)) as url, pytest.raises(openai.BadRequestError) as caught:
            ask(url, image_content(png_data_url(RED, (1, 250))), max_tokens=2)
    finally:
        engine.close()
    assert caught.value.param == "messages.0.content.0.image_url.url" and caught.value.code == "invalid_value"
    assert "image processor does not take this image (absolute aspect ratio" in caught.value.body["message"]


def test_qwen_vl_rows_with_an_image_its_processor_does_not_take_are_refused_by_line_and_field(qwen_vl_model, tmp_path):
    """The image the server refuses (a side over 200 times the other) is a bad_image at its url as the data is read,
    not the processor's error as the row renders."""
    tokenizer = load_tokenizer(str(qwen_vl_model))
    rows = [image_row(RED, "It is red."), image_row(RED, "It is red.", (1, 250))]
    rows[1]["messages"][0]["content"].reverse()  # the image as the second part
    cfg = DataConfig(train=str(write_jsonl(tmp_path / "rows.jsonl", rows)), validation=0.0)
    with pytest.raises(DataError) as error:
        prepare(cfg, tokenizer, use_cache=False, log=lambda *_: None)
    problems = [(p.code, p.line, p.field) for p in error.value.problems]
    assert problems == [("bad_image", 2, "messages[0].content[1].image_url.url")]
    assert "image processor does not take this image (absolute aspect ratio" in error.value.problems[0].message


@pytest.mark.parametrize("fixture", ["vision_model", "qwen_vl_model"])
def test_images_are_decoded_one_at_a_time_into_the_processors_inputs_for_all_of_them(fixture, request):
    """A request's or a batch's images take the memory of one decoded image at a time, not of all of them (a
    decoded image is up to ~270 MB), and give the pixels (and grids) the processor gives them all together."""
    import io
    import tracemalloc

    from PIL import Image

    side = image_inputs(load_tokenizer(str(request.getfixturevalue(fixture))))
    files = [png(colour, size) for colour, size in [(RED, (900, 700)), (GREEN, (700, 900)), (BLUE, (800, 800))]]
    ids = torch.tensor([[side.image_token_id] * 4])

    def peak(images) -> tuple[dict, int]:
        tracemalloc.start()
        try:
            return side.model_inputs(images, ids), tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    (_, one), (inputs, three) = peak(files[:1]), peak(files)
    assert three < 1.5 * one
    pictures = [Image.open(io.BytesIO(data)).convert("RGB") for data in files]
    together = side.image_processor(images=pictures, return_tensors="pt")
    for key in ("pixel_values", "image_grid_thw"):
        assert (key in inputs) == (key in together) and (key not in inputs or torch.equal(inputs[key], together[key]))


def test_a_photo_is_read_upright_as_its_exif_orientation_shows_it(vision_model):
    """A phone photo's pixels are stored sideways with an EXIF tag saying how to turn them (6: 90 degrees
    clockwise): the model sees it as viewers show it and transformers' `load_image` reads it, upright."""
    import io

    from PIL import Image

    side = image_inputs(load_tokenizer(str(vision_model)))
    stored = Image.new("RGB", (20, 16), RED)
    stored.paste(BLUE, (10, 0, 20, 16))  # red left, blue right as stored
    exif = stored.getexif()
    exif[0x0112] = 6

    def file(picture, **options) -> bytes:
        out = io.BytesIO()
        picture.save(out, "PNG", **options)
        return out.getvalue()

    upright = file(stored.transpose(Image.Transpose.ROTATE_270))  # red on top, blue below
    ids = torch.tensor([[side.image_token_id] * 4])
    seen = side.model_inputs([file(stored, exif=exif)], ids)["pixel_values"]
    assert torch.equal(seen, side.model_inputs([upright], ids)["pixel_values"])
    assert not torch.equal(seen, side.model_inputs([file(stored)], ids)["pixel_values"])


@pytest.mark.parametrize("family", ["gemma3", "qwen2.5-vl"])
def test_a_run_measures_image_rows_with_the_models_own_attention(family, vision_model, qwen_vl_model, tmp_path):
    from tuneforge.training.loop import train

    base = vision_model if family == "gemma3" else qwen_vl_model
    train_rows = write_jsonl(tmp_path / "train.jsonl", [image_row(RED, "It is red."), image_row(BLUE, "It is blue.")])
    valid_rows = [image_row(GREEN, "It is green.", (28, 20)), image_row(BLUE, "It is blue.", (16, 24))]
    valid = write_jsonl(tmp_path / "valid.jsonl", valid_rows)
    config = {
        "base_model": str(base),
        # Rows within Gemma 3's sliding window, where text rows would run per-example attention.
        "data": {"train": str(train_rows), "validation": str(valid), "max_length": 128},
        # The adapter starts at zero and barely moves: the run measures the base model.
        "train": {"max_steps": 1, "batch_size": 2, "learning_rate": 1e-12, "precision": "fp32"},
        "output_dir": str(tmp_path / "run"),
    }
    measured = train(config, progress=False).metrics["full_valid_loss"]
    # Gemma 3 attends within an image both ways, Qwen2-VL by 3-D positions: as the model's own forward does.
    tokenizer = load_tokenizer(str(base))
    data = prepare(DataConfig(train=str(valid), validation=0.0), tokenizer, use_cache=False, log=lambda *_: None)
    batch = collate(data.train, tokenizer.pad_token_id, images=image_inputs(tokenizer))
    with torch.no_grad():
        out = SFTObjective(load_model(str(base), dtype=torch.float32).eval())(**batch)
    assert measured == pytest.approx(out["ce"].item() / int((batch["labels"] != IGNORE_INDEX).sum()), abs=1e-5)


@pytest.mark.parametrize(("share_prefixes", "per_example"), [(False, False), (False, True), (True, True)])
def test_qwen_vl_packed_text_rows_score_as_each_example_alone(qwen_vl_model, tmp_path, share_prefixes, per_example):
    import contextlib

    from tuneforge.data import pack
    from tuneforge.models.attention import per_example_attention

    tokenizer = load_tokenizer(str(qwen_vl_model))
    chats = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"{2 * i}."},
            ]
        }
        for i in range(4)
    ]
    rows = write_jsonl(tmp_path / "rows.jsonl", chats)
    data = prepare(DataConfig(train=str(rows), validation=0.0), tokenizer, use_cache=False, log=lambda *_: None)
    model = load_model(str(qwen_vl_model), dtype=torch.float32).eval()
    objective = SFTObjective(model)
    [row] = pack(data.train, 512, share_prefixes=share_prefixes)
    with torch.no_grad():
        alone = sum(objective(**collate([e], tokenizer.pad_token_id))["ce"].item() for e in data.train)
        with per_example_attention(model) if per_example else contextlib.nullcontext():
            packed = objective(**collate([row], tokenizer.pad_token_id))["ce"].item()
    assert packed == pytest.approx(alone, rel=1e-5)


def test_a_qwen_vl_row_longer_than_max_length_is_never_cut_inside_its_image(qwen_vl_model, tmp_path):
    tokenizer = load_tokenizer(str(qwen_vl_model))
    # The 20x16 image is 4 tokens, the 64x64 one 16 (resized to the processor's largest, 32x32): 47 and 57 tokens.
    rows = write_jsonl(tmp_path / "rows.jsonl", [image_row(RED, "It is red."), image_row(BLUE, "Blue.", (64, 64))])
    with pytest.raises(DataError) as error:
        prepare(DataConfig(train=str(rows), validation=0.0, max_length=48), tokenizer, use_cache=False, log=print)
    assert "rows.jsonl:2" in str(error.value) and "with its images' tokens" in str(error.value)
    dropped = prepare(
        DataConfig(train=str(rows), validation=0.0, max_length=48, truncation="drop"),
        tokenizer,
        use_cache=False,
        log=lambda *_: None,
    )
    assert dropped.report["counts"]["dropped_too_long"] == 1 and len(dropped.train) == 1
    assert dropped.train[0].input_ids.tolist().count(image_inputs(tokenizer).image_token_id) == 4


def test_qwen_vl_prompt_with_an_image_scores_its_tokens_as_one_forward_pass_does(qwen_vl):
    """Prompt scoring (echo's log probabilities) of a prompt with an image: M-RoPE's 3-D positions go through the
    scoring prefill whole, and each prompt token's log probability is the model's own forward pass's."""
    from tuneforge.generate import Batch, Sampling, encode_prompts

    model, tokenizer = qwen_vl
    shown = [png(RED)]
    [ids] = encode_prompts(tokenizer, [QUESTION], images=shown)
    batch = Batch(model, tokenizer)
    row = batch.add(ids, Sampling(1, logprobs=0, prompt_logprobs=True), images=shown)
    while batch:
        batch.step()
    scored = row.completion().prompt_logprobs
    inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    inputs.update(image_inputs(tokenizer).model_inputs(shown, inputs["input_ids"]))
    with torch.no_grad():
        expected = torch.log_softmax(model(**inputs).logits[0, :-1].float(), dim=-1)
    expected = expected.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    assert scored[0].logprob is None and len(scored) == len(ids)
    torch.testing.assert_close(torch.tensor([entry.logprob for entry in scored[1:]]), expected, atol=1e-4, rtol=1e-4)


def test_eval_after_training_scores_a_vision_runs_answers_to_image_rows(vision_model, tmp_path):
    from tuneforge.pipeline import train

    rows = [image_row(c, f"It is {n}.", (20 + i, 16)) for i in range(4) for c, n in ((RED, "red"), (BLUE, "blue"))]
    valid = write_jsonl(
        tmp_path / "valid.jsonl",
        rows[:2] + [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}],
    )
    config = {
        "base_model": str(vision_model),
        "data": {"train": str(write_jsonl(tmp_path / "train.jsonl", rows)), "validation": str(valid), "max_length": 64},
        "train": {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-2, "precision": "fp32"},
        "eval": {"task": "contains"},
        "output_dir": str(tmp_path / "run"),
    }
    result = train(config, progress=False)
    from tuneforge.eval import evaluate

    after = json.loads((tmp_path / "run" / "eval" / "after.json").read_text())
    assert after["loss"] == pytest.approx(result.metrics["full_valid_loss"], rel=1e-4)  # the run's own figure
    assert result.metrics["task_contains"] == after["scores"]["contains"]
    samples = [json.loads(line) for line in (tmp_path / "run" / "eval" / "samples.jsonl").read_text().splitlines()]
    alone = evaluate(str(tmp_path / "run"), valid, progress=False)  # `tuneforge eval` of the run, the same answers
    assert [s["tuned"] for s in samples] == [s["prediction"] for s in alone["samples"]]
    assert samples[0]["input"] == "[image]What colour is this?"


def test_chat_image_attaches_a_file_to_the_next_message_answered_as_transformers_generates(
    vision, vision_model, tmp_path
):
    import io

    from PIL import Image

    from tuneforge.chat import chat_session

    model, tokenizer = vision
    (tmp_path / "red.png").write_bytes(png(RED))
    (tmp_path / "notes.png").write_text("not an image")
    script = f"/image {tmp_path / 'notes.png'}\n/image {tmp_path / 'red.png'}\nWhat colour is this?\n/exit\n"
    output = io.StringIO()
    conversation = chat_session(model, tokenizer, input=io.StringIO(script), output=output, max_new_tokens=6)
    shown = output.getvalue()
    assert f"/image: the bytes of {tmp_path / 'notes.png'} are not an image PIL reads" in shown
    assert "1 image attached to your next message" in shown
    expected = processor_answer(model, vision_model, QUESTION, [Image.new("RGB", (20, 16), RED)], 6)
    assert conversation[1]["content"] == expected
    assert conversation[0]["content"][0] == {"type": "image", "image": png(RED)}


def test_chat_image_on_a_text_model_is_refused_naming_it(tmp_path):
    import io

    from tuneforge.chat import chat_session

    folder = save_family_model(FAMILIES["gemma3"], tmp_path / "text")
    (tmp_path / "red.png").write_bytes(png(RED))
    output = io.StringIO()
    tokenizer = load_tokenizer(str(folder))
    model = load_model(str(folder), dtype=torch.float32)
    script = f"/image {tmp_path / 'red.png'}\n/exit\n"
    assert chat_session(model, tokenizer, input=io.StringIO(script), output=output, max_new_tokens=2) == []
    assert f"/image: {folder} reads text only (it has no image processor)" in output.getvalue()


def test_chat_image_qwen_vls_processor_does_not_take_is_not_attached(qwen_vl, tmp_path):
    """An image Qwen2-VL's processor refuses (a side over 200 times the other) is refused at /image, naming the
    processor, and the next message is sent without it."""
    import io

    from tuneforge.chat import chat_session

    model, tokenizer = qwen_vl
    (tmp_path / "thin.png").write_bytes(png(RED, (1, 250)))
    script = f"/image {tmp_path / 'thin.png'}\nHi\n/exit\n"
    output = io.StringIO()
    conversation = chat_session(model, tokenizer, input=io.StringIO(script), output=output, max_new_tokens=2)
    shown = output.getvalue()
    assert f"/image: the model's image processor does not take {tmp_path / 'thin.png'} (absolute aspect" in shown
    assert "not attached" in shown and [m["role"] for m in conversation] == ["user", "assistant"]
    assert conversation[0]["content"] == "Hi"


def test_eval_with_a_grader_answers_image_prompt_rows_without_reference_answers_with_their_images(
    vision_model, tmp_path
):
    from tuneforge.eval import evaluate

    rows = [image_row(RED, "It is red."), image_row(GREEN, "It is green.", (12, 30))]
    graded = tmp_path / "grader.py"
    graded.write_text("def seen(prompts, completions, **kw):\n    return [1.0 for _ in completions]\n")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"messages": r["messages"][:1]} for r in rows])
    answered = evaluate(str(vision_model), prompts, max_new_tokens=6, progress=False, grader=[f"{graded}:seen"])
    referenced = evaluate(
        str(vision_model), write_jsonl(tmp_path / "rows.jsonl", rows), max_new_tokens=6, progress=False
    )
    assert [s["prediction"] for s in answered["samples"]] == [s["prediction"] for s in referenced["samples"]]
    assert answered["grader"]["mean"] == 1.0 and answered["loss"] is None


def test_exports_of_a_vision_run_keep_its_processor_so_their_images_are_read(vision_model, tmp_path):
    from transformers import AutoProcessor

    from tuneforge.eval import evaluate
    from tuneforge.exporting import export
    from tuneforge.training.loop import train

    rows = [image_row(c, f"It is {n}.", (20 + i, 16)) for i in range(2) for c, n in ((RED, "red"), (BLUE, "blue"))]
    config = {
        "base_model": str(vision_model),
        "data": {"train": str(write_jsonl(tmp_path / "train.jsonl", rows)), "validation": 0.0, "max_length": 64},
        "train": {"max_steps": 1, "batch_size": 4, "learning_rate": 1e-2, "precision": "fp32"},
        "output_dir": str(tmp_path / "run"),
    }
    train(config, progress=False)
    test = write_jsonl(tmp_path / "test.jsonl", rows[:2])
    of_run = evaluate(str(tmp_path / "run"), test, max_new_tokens=4, progress=False)
    for fmt in ("merged", "adapter"):
        export(tmp_path / "run", fmt, None, tmp_path / fmt, progress=False)
        assert AutoProcessor.from_pretrained(tmp_path / fmt).image_seq_length == 4
    of_merged = evaluate(str(tmp_path / "merged"), test, max_new_tokens=4, progress=False)
    assert [s["prediction"] for s in of_merged["samples"]] == [s["prediction"] for s in of_run["samples"]]
    assert of_merged["loss"] == pytest.approx(of_run["loss"], rel=1e-5)


def test_chat_image_on_qwen_vl_is_answered_as_the_batch_answers_it(qwen_vl, tmp_path):
    """Qwen2-VL's image tokens count by the image's size: chat encodes the conversation with its images."""
    import io

    from tuneforge.chat import chat_session

    model, tokenizer = qwen_vl
    (tmp_path / "green.png").write_bytes(png(GREEN, (40, 32)))
    script = f"/image {tmp_path / 'green.png'}\nWhat colour is this?\n/exit\n"
    output = io.StringIO()
    conversation = chat_session(model, tokenizer, input=io.StringIO(script), output=output, max_new_tokens=6)
    [expected] = answer(model, tokenizer, [(QUESTION, [png(GREEN, (40, 32))])], 6)
    assert len(conversation) == 2, output.getvalue()
    assert conversation[1]["content"] == expected.text


def test_generate_answers_qwen_vl_image_prompts_as_the_batch_does(qwen_vl):
    """`generate` (eval's answers, distill's teacher) encodes each prompt with its images, whose sizes set
    Qwen2-VL's image token counts."""
    from tuneforge.generate import generate

    model, tokenizer = qwen_vl
    rows = [(QUESTION, [png(GREEN, (40, 32))]), ([{"role": "user", "content": "Hello there"}], [])]
    ours = generate(model, tokenizer, [p for p, _ in rows], max_new_tokens=6, images=[i for _, i in rows])
    assert [c.text for c in ours] == [c.text for c in answer(model, tokenizer, rows, 6)]


@pytest.mark.parametrize("size", [(40, 32), (36, 12), (300, 40)])
def test_qwen_vl_counts_an_images_tokens_from_its_size_as_the_processor_does_without_decoding_it(
    qwen_vl_model, monkeypatch, size
):
    """However many renderings of a row expand its image, none decodes it; the count is the grid the processor
    gives the decoded image, upright or stored sideways with an EXIF rotation (which swaps its sides)."""
    import io

    from PIL import Image

    from tuneforge.models.images import ImageInputs

    images = image_inputs(load_tokenizer(str(qwen_vl_model)))
    stored = Image.new("RGB", size, GREEN)
    exif = stored.getexif()
    exif[0x0112] = 6
    sideways = io.BytesIO()
    stored.save(sideways, "PNG", exif=exif)
    counts = {}
    for name, data in [("upright", png(GREEN, size)), ("sideways", sideways.getvalue())]:
        [grid] = images.model_inputs([data], torch.tensor([[images.image_token_id]]))["image_grid_thw"]
        counts[name] = int(grid.prod()) // images.image_processor.merge_size**2
    monkeypatch.setattr(ImageInputs, "_processed", lambda *_: pytest.fail("an image was decoded to count its tokens"))
    text = f"<|vision_start|>{images.marker}<|vision_end|>What colour is this?"
    for name, data in [("upright", png(GREEN, size)), ("sideways", sideways.getvalue())]:
        expanded = {images.expand(text, [data]) for _ in range(3)}
        assert len(expanded) == 1 and next(iter(expanded)).count(images.marker) == counts[name]
    assert counts["upright"] == counts["sideways"] and (size != (40, 32) or counts["upright"] == 12)


@pytest.fixture(scope="module")
def vision_gguf_of(tmp_path_factory):
    """A model that reads images of a family GGUF export writes an mmproj for, exported --format gguf (q8_0), once
    per family: Gemma 3 4B-shaped with Gemma 3's attention sizes (head width and query scale 256, which transformers'
    GGUF reader assumes); Qwen2-VL and Qwen2.5-VL with three vision blocks (the converter maps the projector's
    `mlp.2` by block number) and Qwen2.5-VL's 112-pixel attention windows (llama.cpp's)."""
    from tuneforge.exporting import export

    exported = {}

    def of(family: str):
        if family not in exported:
            folder = tmp_path_factory.mktemp(f"{family}-gguf")
            if family == "gemma3":
                base = save_gemma3_vision_model(folder / "tuned", head_dim=256, query_pre_attn_scalar=256)
            elif family == "qwen2_vl":
                base = save_qwen2_5_vl_model(folder / "tuned", qwen2_vl=True, depth=3)
            else:
                base = save_qwen2_5_vl_model(folder / "tuned", depth=3, fullatt_block_indexes=[2], window_size=112)
            exported[family] = base, export(base, "gguf", "q8_0", folder / "gguf", progress=False)
        return exported[family]

    return of


@pytest.fixture(scope="module")
def vision_gguf(vision_gguf_of):
    return vision_gguf_of("gemma3")


@pytest.mark.parametrize(
    ("family", "projector", "tensors", "figures"),
    [
        ("gemma3", "gemma3", 39, {"image_tokens": 4}),
        ("qwen2_vl", "qwen2vl_merger", 56, {"spatial_merge_size": 2}),
        (
            "qwen2_5_vl",
            "qwen2.5vl_merger",
            55,
            {"spatial_merge_size": 2, "window_size": 112, "full_attention_blocks": [2]},
        ),
    ],
)
def test_gguf_export_of_a_vision_model_writes_the_text_model_and_its_mmproj_checked(
    vision_gguf_of, family, projector, tensors, figures
):
    import gguf

    base, result = vision_gguf_of(family)
    assert sorted(p.name for p in result.out.iterdir()) == ["export.json", "mmproj-tuned-q8_0.gguf", "tuned-q8_0.gguf"]
    record = json.loads((result.out / "export.json").read_text())
    assert record["files"] == ["tuned-q8_0.gguf", "mmproj-tuned-q8_0.gguf"]
    assert record["checks"]["max_abs_logit_diff"] <= 5.0  # the text model, checked as every GGUF is
    mmproj = record["checks"]["mmproj"]
    assert mmproj["clip.projector_type"] == projector and figures.items() <= mmproj.items()
    assert mmproj["tensors"] == tensors and 0 < mmproj["max_diff_of_rounding"] <= 1
    # llama.cpp's names and layout: the vision tower's patch embedding (Qwen2-VL's two frames, one tensor each).
    reader = gguf.GGUFReader(str(result.out / "mmproj-tuned-q8_0.gguf"))
    written = {tensor.name: tensor for tensor in reader.tensors}
    source = load_model(str(base), dtype=torch.float32)
    if family == "gemma3":
        frames = {"v.patch_embd.weight": source.model.vision_tower.embeddings.patch_embedding.weight}
    else:
        both = source.model.visual.patch_embed.proj.weight
        frames = {"v.patch_embd.weight": both[:, :, 0], "v.patch_embd.weight.1": both[:, :, 1]}
    for name, weight in frames.items():
        got = gguf.quants.dequantize(written[name].data, written[name].tensor_type)
        assert got == pytest.approx(weight.detach().numpy(), rel=1e-3, abs=1e-7)
    assert reader.fields["general.type"].contents() == "mmproj"
    if family != "gemma3":  # the text model as llama.cpp reads it: M-RoPE's sections
        text = gguf.GGUFReader(str(result.out / "tuned-q8_0.gguf")).fields
        assert text["general.architecture"].contents() == "qwen2vl"
        assert text["qwen2vl.rope.dimension_sections"].contents() == [2, 3, 3, 0]


@pytest.mark.parametrize(
    ("family", "weight", "index", "written"),
    [
        ("gemma3", "model.vision_tower.encoder.layers.1.mlp.fc2.weight", (0, 0), "v.blk.1.ffn_down.weight"),
        # Qwen2-VL's fused attention input is written as three tensors, its two-frame patch embedding as two.
        ("qwen2_5_vl", "model.visual.blocks.1.attn.qkv.weight", (40, 0), "v.blk.1.attn_k.weight"),
        ("qwen2_vl", "model.visual.patch_embed.proj.weight", (0, 0, 1, 0, 0), "v.patch_embd.weight.1"),
    ],
)
def test_an_mmproj_unlike_the_models_vision_encoder_is_refused_naming_the_tensor(
    vision_gguf_of, family, weight, index, written
):
    from tuneforge.exporting import ExportFailed, llama_cpp

    base, result = vision_gguf_of(family)
    model = load_model(str(base), dtype=torch.float32)
    with torch.no_grad():
        model.get_parameter(weight)[index] += 0.01
    with pytest.raises(ExportFailed, match=rf"{re.escape(written)} differs from the model's weight"):
        llama_cpp.check_mmproj(result.out / "mmproj-tuned-q8_0.gguf", model, base)


def test_a_qwen2_5_vl_mmproj_llama_cpp_would_run_with_other_windows_is_refused_naming_the_setting(
    vision_gguf_of, tmp_path
):
    """llama.cpp runs Qwen2.5-VL's window attention over 112-pixel windows, which the mmproj does not record."""
    from tuneforge.exporting import ExportFailed, llama_cpp

    base, result = vision_gguf_of("qwen2_5_vl")
    model = load_model(str(base), dtype=torch.float32)
    model.config.vision_config.window_size = 56
    with pytest.raises(ExportFailed, match=r"within windows of 112 pixels, the model within 56 \(vision_config"):
        llama_cpp.check_mmproj(result.out / "mmproj-tuned-q8_0.gguf", model, base)


def test_a_qwen2_vl_gguf_whose_m_rope_sections_differ_from_the_models_is_refused(vision_gguf_of):
    """Read back as Qwen 2, the text model's logits on text cannot show M-RoPE's sections: they are compared."""
    from transformers import AutoConfig

    from tuneforge.exporting import ExportFailed, llama_cpp

    base, result = vision_gguf_of("qwen2_vl")
    config = AutoConfig.from_pretrained(base)
    config.text_config.rope_parameters["mrope_section"] = [2, 2, 4]
    with pytest.raises(ExportFailed, match=r"M-RoPE the sections \[2, 3, 3, 0\].*the model \[2, 2, 4\]"):
        llama_cpp.load_gguf(result.out, "tuned-q8_0.gguf", config)
    assert sorted(p.name for p in result.out.iterdir()) == ["export.json", "mmproj-tuned-q8_0.gguf", "tuned-q8_0.gguf"]


def test_the_mmproj_check_reads_the_file_once(vision_gguf, tmp_path, monkeypatch):
    """Its tensors, their types and its metadata all come from one reading of the mmproj GGUF."""
    import gguf

    from tuneforge.exporting import llama_cpp

    base, result = vision_gguf
    model = load_model(str(base), dtype=torch.float32)
    (tmp_path / "processor_config.json").write_text((base / "processor_config.json").read_text())
    opened, real = [], gguf.GGUFReader
    monkeypatch.setattr(gguf, "GGUFReader", lambda path, *a, **kw: opened.append(path) or real(path, *a, **kw))
    checks = llama_cpp.check_mmproj(result.out / "mmproj-tuned-q8_0.gguf", model, tmp_path)
    assert len(opened) == 1 and sum(checks["tensor_types"].values()) == checks["tensors"] > 0


def test_gguf_export_of_a_vision_model_for_ollama_is_refused_before_any_work(vision_model, tmp_path):
    from tuneforge.errors import TuneforgeError
    from tuneforge.exporting import export

    with pytest.raises(TuneforgeError, match="Ollama runs Gemma 3 and Qwen2.5-VL on its own engine") as refused:
        export(vision_model, "gguf", None, tmp_path / "gguf", ollama=True, progress=False)
    assert "llama-server -m model-f16.gguf --mmproj mmproj-model-f16.gguf" in str(refused.value)
    assert not (tmp_path / "gguf").exists()


def test_gguf_export_of_a_gemma3_whose_attention_is_not_scaled_by_256_reads_back_within_bounds(vision_model, tmp_path):
    """transformers' GGUF reader takes Gemma's query_pre_attn_scalar as 256 whatever the file; llama.cpp scales by
    the head width (here 32), and so does the model."""
    from tuneforge.exporting import export

    result = export(vision_model, "gguf", "f16", tmp_path / "gguf", progress=False)
    assert result.checks["max_abs_logit_diff"] <= 0.15 and result.checks["argmax_agreement"] == 1.0


def test_a_data_check_that_stops_at_an_image_row_counts_each_row_once(tmp_path, tiny_model_dir):
    """A text-only model stops the check at the first image row: that row is read once and rejected, not counted
    valid and again rejected, and the row after it, read but never checked, is counted as not checked."""
    from tuneforge.data.check import check

    text = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    rows = write_jsonl(tmp_path / "train.jsonl", [text, image_row(RED, "It is red."), text])
    report = check(str(rows), model=str(tiny_model_dir), progress=False)
    counts = report["counts"]
    assert counts["rejected_by_code"] == {"images_not_read": 1}
    assert (counts["read"], counts["valid"], counts["rejected"], counts["unchecked"]) == (3, 1, 1, 1)


@pytest.fixture(scope="module")
def smolvlm_model(tmp_path_factory) -> Path:
    from families import save_smolvlm_model

    return save_smolvlm_model(tmp_path_factory.mktemp("smolvlm") / "model")


@pytest.fixture(scope="module")
def smolvlm(smolvlm_model):
    return load_model(str(smolvlm_model), dtype=torch.float32).eval(), load_tokenizer(str(smolvlm_model))


def as_parts(messages: list[dict]) -> list[dict]:
    """Messages with each string content as one text part, as SmolVLM's template (which leaves a string's text out)
    is given them."""
    text = {"type": "text"}
    return [
        {**m, "content": [{**text, "text": m["content"]}]} if isinstance(m["content"], str) else m for m in messages
    ]


@pytest.mark.parametrize("size", [(20, 16), (40, 16), (16, 40), (300, 40), (33, 33), (65, 20), (7, 90)])
def test_smolvlm_counts_an_images_tiles_from_its_size_as_its_processor_splits_the_upright_image(smolvlm_model, size):
    """The tiles an image's tokens show are those the processor splits the decoded image into, upright or stored
    sideways with an EXIF rotation (which swaps its sides, and so its rows and columns of tiles)."""
    import io

    from PIL import Image
    from transformers import AutoProcessor

    images = image_inputs(load_tokenizer(str(smolvlm_model)))
    processor = AutoProcessor.from_pretrained(smolvlm_model)
    stored = Image.new("RGB", size, GREEN)
    exif = stored.getexif()
    exif[0x0112] = 6
    sideways = io.BytesIO()
    stored.save(sideways, "PNG", exif=exif)
    for data, upright in [(png(GREEN, size), size), (sideways.getvalue(), size[::-1])]:
        expected = processor(text="<image>", images=[Image.new("RGB", upright, GREEN)])["input_ids"][0]
        ours = processor.tokenizer(images.expand("<image>", [data]), add_special_tokens=False)["input_ids"]
        assert ours == list(expected) and images.shown(ours) == 1
        pixels = images.model_inputs([data], torch.tensor([ours]))["pixel_values"]
        assert pixels.shape[1] == ours.count(images.image_token_id) // 4  # a tile's pixels for each tile's tokens


@pytest.mark.parametrize(
    ("family", "language_model"),
    [("qwen_vl_model", ".language_model."), ("smolvlm_model", ".text_model."), ("smolvlm2_model", ".text_model.")],
)
def test_a_vision_lora_trains_the_language_model_resumes_exactly_and_exports_merged_with_its_processor(
    family, language_model, request, tmp_path
):
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    from tuneforge.exporting import export
    from tuneforge.training.loop import train

    base = request.getfixturevalue(family)
    rows = [image_row(c, f"It is {n}.", (20 + 8 * i, 16)) for i in range(8) for c, n in ((RED, "red"), (BLUE, "blue"))]
    config = {
        "base_model": str(base),
        "data": {"train": str(write_jsonl(tmp_path / "train.jsonl", rows)), "validation": 0.25, "max_length": 96},
        "train": {"max_steps": 6, "batch_size": 4, "learning_rate": 1e-2, "precision": "fp32", "save_every": 3},
        "output_dir": str(tmp_path / "run"),
    }

    def losses() -> list[float]:
        lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        return [r["train_loss"] for r in map(json.loads, lines) if "train_loss" in r]

    final = train(config, progress=False).final_dir
    uninterrupted = losses()
    assert uninterrupted[-1] < uninterrupted[0] - 0.3
    train(config, resume=str(tmp_path / "run" / "checkpoints" / "step-3"), progress=False)
    assert losses() == uninterrupted

    adapted = load_model(str(tmp_path / "run"), dtype=torch.float32).eval()
    trained = [name for name, _ in adapted.named_parameters() if "lora_" in name]
    assert trained and all(language_model in name for name in trained)  # the vision encoder stays frozen

    merged = export(tmp_path / "run", "merged", None, tmp_path / "merged", progress=False).out
    assert image_inputs(load_tokenizer(str(merged))) is not None  # it still reads images
    settings = [AutoImageProcessor.from_pretrained(folder).to_dict() for folder in (base, merged)]
    assert settings[0] == settings[1]
    plain = AutoModelForImageTextToText.from_pretrained(merged, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(str(final))
    data = prepare(DataConfig(train=config["data"]["train"], validation=0.0), tokenizer, use_cache=False, log=print)
    batch = collate(data.train[:4], tokenizer.pad_token_id, images=image_inputs(tokenizer))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        ours, theirs = adapted(**inputs).logits, plain(**inputs).logits
    assert (ours - theirs).abs().max().item() < 1e-3


SMOLVLM_PROMPTS = [
    (QUESTION, [png(RED)]),
    ([{"role": "user", "content": "Hello there, how are you?"}], []),
    (QUESTION, [png(GREEN, (40, 16))]),
]


@pytest.mark.parametrize("family", ["smolvlm", "smolvlm2"])
def test_smolvlm_prompts_with_images_are_answered_as_transformers_generates_from_the_processors_inputs(family, request):
    model, tokenizer = request.getfixturevalue(family)
    ours = answer(model, tokenizer, SMOLVLM_PROMPTS, 8)
    expected = smolvlm_processor_answers(model, request.getfixturevalue(f"{family}_model"), 8)
    assert [c.text for c in ours] == expected and [len(c.token_ids) for c in ours] == [8, 8, 8]
    assert expected[0] != expected[2]  # the images reach the answers
    alone = [answer(model, tokenizer, [row], 8)[0].text for row in SMOLVLM_PROMPTS]
    assert alone == expected


@pytest.mark.parametrize("family", ["smolvlm", "smolvlm2"])
def test_serve_and_a_loaded_smolvlm_answer_image_messages_as_transformers_generates(family, request):
    from concurrent.futures import ThreadPoolExecutor

    from test_serve import running_server

    import tuneforge
    from tuneforge.serve import AdapterPool, Engine, create_app

    model, tokenizer = request.getfixturevalue(family)
    smolvlm_model = request.getfixturevalue(f"{family}_model")
    expected = smolvlm_processor_answers(model, smolvlm_model, 6)
    requests = [
        image_content(png_data_url(RED)),
        "Hello there, how are you?",
        image_content(png_data_url(GREEN, (40, 16))),
    ]
    engine = Engine(AdapterPool(str(smolvlm_model)), max_batch=8)
    try:
        with running_server(create_app(engine)) as url, ThreadPoolExecutor(len(requests)) as pool:
            replies = list(pool.map(lambda content: ask(url, content, max_tokens=6), requests))
    finally:
        engine.close()
    assert [reply.choices[0].message.content for reply in replies] == expected
    prompt_tokens = [c.prompt_tokens for c in answer(model, tokenizer, SMOLVLM_PROMPTS, 1)]
    assert [reply.usage.prompt_tokens for reply in replies] == prompt_tokens  # each image's tiles counted
    loaded = tuneforge.load(smolvlm_model, precision="fp32", progress=False)
    chats = [loaded.chat([{"role": "user", "content": content}], max_new_tokens=6) for content in requests]
    assert [c["content"] for c in chats] == expected


@pytest.mark.parametrize("model_type", ["idefics3", "smolvlm"])
def test_gguf_export_of_smolvlm_is_refused_before_its_weights_load_naming_the_mmproj_it_would_need(
    model_type, request, tmp_path
):
    from tuneforge.errors import TuneforgeError
    from tuneforge.exporting import export

    folder = request.getfixturevalue({"idefics3": "smolvlm_model", "smolvlm": "smolvlm2_model"}[model_type])
    with pytest.raises(TuneforgeError) as refused:
        export(folder, "gguf", None, tmp_path / "gguf", progress=False)
    assert refused.value.code == "unsupported_architecture" and not (tmp_path / "gguf").exists()
    assert f"This model is {model_type} and reads images" in str(refused.value)
    assert "mmproj file for gemma3, qwen2_vl, qwen2_5_vl alone. Export it --format merged" in str(refused.value)


@pytest.fixture(scope="module")
def smolvlm2_model(tmp_path_factory) -> Path:
    from families import save_smolvlm_model

    return save_smolvlm_model(tmp_path_factory.mktemp("smolvlm2") / "model", smolvlm2=True)


@pytest.fixture(scope="module")
def smolvlm2(smolvlm2_model):
    return load_model(str(smolvlm2_model), dtype=torch.float32).eval(), load_tokenizer(str(smolvlm2_model))


def smolvlm2_processor_inputs(folder, messages, pictures, generation_prompt: bool) -> dict:
    """What `SmolVLMProcessor` gives for a conversation and its images, as its `__call__` builds it: the image
    processor's pixels and each image's rows and columns of tiles, each `<image>` of the template's text replaced by
    `get_image_prompt_string` of them (`replace_image_token`), then tokenized. The processor itself cannot be built
    here: it needs num2words and, for its video side, torchvision."""
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = tokenizer.apply_chat_template(as_parts(messages), add_generation_prompt=generation_prompt, tokenize=False)
    inputs = {}
    if pictures:
        image_processor = AutoImageProcessor.from_pretrained(folder)
        inputs = image_processor(images=[pictures], return_row_col_info=True, return_tensors="pt")
        parts = text.split("<image>")
        tokens = [
            get_image_prompt_string(rows, cols, 4, "<fake_token_around_image>", "<image>", "<global-img>")
            for rows, cols in zip(inputs.pop("rows")[0], inputs.pop("cols")[0])
        ]
        text = parts[0] + "".join(t + part for t, part in zip(tokens, parts[1:]))
    return {**tokenizer(text, add_special_tokens=False, return_tensors="pt"), **inputs}


def smolvlm_processor_inputs(folder, messages, pictures, generation_prompt: bool = False) -> dict:
    """What SmolVLM's processor gives for a conversation and its images (SmolVLM2's as `smolvlm2_processor_inputs`
    builds it)."""
    from transformers import AutoConfig, AutoProcessor

    if AutoConfig.from_pretrained(folder).model_type == "smolvlm":
        return smolvlm2_processor_inputs(folder, messages, pictures, generation_prompt)
    processor = AutoProcessor.from_pretrained(folder)
    text = processor.apply_chat_template(as_parts(messages), add_generation_prompt=generation_prompt, tokenize=False)
    return processor(text=text, images=pictures or None, add_special_tokens=False, return_tensors="pt")


@pytest.mark.parametrize("family", ["smolvlm_model", "smolvlm2_model"])
def test_smolvlm_rows_hold_the_image_tokens_its_processor_expands_and_train_on_the_reply_alone(
    family, request, tmp_path
):
    from PIL import Image

    folder = request.getfixturevalue(family)
    tokenizer, images, data = red_and_blue(folder, tmp_path, blue_size=(40, 16))
    by_answer = {"red": (RED, (20, 16)), "blue": (BLUE, (40, 16))}
    counts = []
    for example in data.train:
        answer = "red" if example.images[0] == png(RED) else "blue"
        colour, size = by_answer[answer]
        messages = [*QUESTION, {"role": "assistant", "content": f"It is {answer}."}]
        expected = smolvlm_processor_inputs(folder, messages, [Image.new("RGB", size, colour)])
        assert example.input_ids.tolist() == expected["input_ids"][0].tolist() and len(example.images) == 1
        pixels = images.model_inputs(list(example.images), torch.tensor([example.input_ids.tolist()]))
        assert torch.equal(pixels["pixel_values"], expected["pixel_values"])
        assert torch.equal(pixels["pixel_attention_mask"], expected["pixel_attention_mask"])
        ids, labels = example.input_ids.tolist(), example.labels.tolist()
        assert all(label == IGNORE_INDEX for t, label in zip(ids, labels) if t == images.image_token_id)
        trained = tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
        assert trained == f" It is {answer}.<end_of_utterance>"
        counts.append(ids.count(images.image_token_id))
    assert sorted(counts) == [12, 20]  # 1x2 tiles and the whole image, 2x2 and the whole: 4 tokens each


def test_smolvlm2_rows_with_a_video_are_refused_naming_the_part_and_what_a_part_may_be(smolvlm2_model, tmp_path):
    from tuneforge.data.check import check

    video = {"type": "video", "path": "clip.mp4"}
    row = {"messages": [{"role": "user", "content": [video, {"type": "text", "text": "What happens?"}]}]}
    row["messages"].append({"role": "assistant", "content": "A ball rolls."})
    data = write_jsonl(tmp_path / "train.jsonl", [row, image_row(RED, "It is red.")])
    report = check(str(data), model=str(smolvlm2_model), progress=False)
    assert report["counts"]["rejected_by_code"] == {"unsupported_content": 1}
    assert (report["counts"]["read"], report["counts"]["valid"]) == (2, 1)
    problem = json.dumps(report)
    assert "messages[0].content[0]" in problem and '{\\"type\\": \\"image_url\\"' in problem


def smolvlm_processor_answers(model, folder, max_new_tokens) -> list[str]:
    """transformers' greedy `generate` on SmolVLM's (or SmolVLM2's) processor's inputs for each of
    `SMOLVLM_PROMPTS`."""
    import io

    from PIL import Image

    replies = []
    for prompt, shown in SMOLVLM_PROMPTS:
        pictures = [Image.open(io.BytesIO(data)) for data in shown]
        inputs = smolvlm_processor_inputs(folder, prompt, pictures, True)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        reply = out[0, inputs["input_ids"].shape[1] :]
        replies.append(load_tokenizer(str(folder)).decode(reply, skip_special_tokens=True))
    return replies
