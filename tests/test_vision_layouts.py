"""Vision rows in TRL's and LLaMA-Factory's layouts (the images in an `images` field beside the text, shown where
their placeholders are) train as the same rows in OpenAI's layout, on tiny Gemma 3 and Qwen2.5-VL models
(tests/families.py)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from data.rows import write_jsonl
from families import FAMILIES, png_data_url, save_family_model, save_gemma3_vision_model, save_qwen2_5_vl_model

from tuneforge.config import DataConfig
from tuneforge.data import prepare, read_conversations
from tuneforge.errors import DataError
from tuneforge.models import load_tokenizer

RED, BLUE = (220, 20, 20), (20, 20, 220)
QUESTION = "What colour is this?"


def save_png(path: Path, colour, size=(20, 16)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(png_data_url(colour, size).split(",", 1)[1]))
    return png_data_url(colour, size)


def text(value: str) -> dict:
    return {"type": "text", "text": value}


def url(data_url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url}}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vision-layouts")
    return {"gemma3": save_gemma3_vision_model(root / "gemma3"), "qwen2_5_vl": save_qwen2_5_vl_model(root / "qwen")}


@pytest.fixture
def pictures(tmp_path) -> tuple[str, str]:
    """A red and a blue PNG under imgs/ beside the data files, as data URLs for OpenAI's layout."""
    return save_png(tmp_path / "imgs" / "red.png", RED), save_png(tmp_path / "imgs" / "blue.png", BLUE, (24, 16))


def prepared(path: Path, tokenizer):
    return prepare(DataConfig(train=str(path), validation=0.0), tokenizer, use_cache=False, log=lambda *_: None)


def same_examples(a, b) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.input_ids.tolist() == y.input_ids.tolist() and x.labels.tolist() == y.labels.tolist()
        assert x.images == y.images


@pytest.mark.parametrize("family", ["gemma3", "qwen2_5_vl"])
def test_llama_factory_and_trl_chat_rows_train_as_their_openai_rows(models, tmp_path, pictures, family):
    red, blue = pictures
    tokenizer = load_tokenizer(str(models[family]))
    openai = [
        {
            "messages": [
                {"role": "user", "content": [url(red), text(QUESTION)]},
                {"role": "assistant", "content": "Red."},
            ]
        },
        {
            "messages": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": [text("Compare "), url(red), text(" and\n"), url(blue)]},
                {"role": "assistant", "content": "Red, then blue."},
            ]
        },
    ]
    llama_factory = [
        {
            "messages": [{"role": "user", "content": f"<image>{QUESTION}"}, {"role": "assistant", "content": "Red."}],
            "images": ["imgs/red.png"],
        },
        {
            "messages": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "Compare <image> and\n<image>"},
                {"role": "assistant", "content": "Red, then blue."},
            ],
            "images": ["imgs/red.png", str(tmp_path / "imgs" / "blue.png")],  # relative to the data file, or absolute
        },
    ]
    sharegpt = [
        {
            "conversations": [{"from": "human", "value": f"<image>{QUESTION}"}, {"from": "gpt", "value": "Red."}],
            "images": ["imgs/red.png"],
        },
        {
            "system": "Answer briefly.",
            "conversations": [
                {"from": "human", "value": "Compare <image> and\n<image>"},
                {"from": "gpt", "value": "Red, then blue."},
            ],
            "images": ["imgs/red.png", "imgs/blue.png"],
        },
    ]
    trl = [
        {
            "images": ["imgs/red.png"],  # as TRL's vision SFT data holds a row
            "messages": [
                {"role": "user", "content": [{"type": "image"}, text(QUESTION)]},
                {"role": "assistant", "content": [text("Red.")]},
            ],
        },
        {
            "images": ["imgs/red.png", "imgs/blue.png"],
            "messages": [
                {"role": "system", "content": [text("Answer briefly.")]},
                {"role": "user", "content": [text("Compare "), {"type": "image"}, text(" and\n"), {"type": "image"}]},
                {"role": "assistant", "content": [text("Red, then blue.")]},
            ],
        },
    ]
    expected = prepared(write_jsonl(tmp_path / "openai.jsonl", openai), tokenizer).train
    assert [len(e.images) for e in expected] == [1, 2]
    for name, rows in (("llama_factory", llama_factory), ("sharegpt", sharegpt), ("trl", trl)):
        same_examples(prepared(write_jsonl(tmp_path / f"{name}.jsonl", rows), tokenizer).train, expected)
    # A Hugging Face data set's Parquet file holds each image as {"bytes", "path"}.
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = {"imgs/red.png": (tmp_path / "imgs" / "red.png").read_bytes()}
    files["imgs/blue.png"] = (tmp_path / "imgs" / "blue.png").read_bytes()
    hub = [{**row, "images": [{"bytes": files[name], "path": None} for name in row["images"]]} for row in trl]
    pq.write_table(pa.Table.from_pylist(hub), tmp_path / "hub.parquet")
    same_examples(prepared(tmp_path / "hub.parquet", tokenizer).train, expected)


@pytest.mark.parametrize("family", ["gemma3", "qwen2_5_vl"])
def test_trl_and_llama_factory_vision_pairs_train_as_their_openai_pairs(models, tmp_path, pictures, family):
    red, _ = pictures
    tokenizer = load_tokenizer(str(models[family]))
    openai = {
        "input": {"messages": [{"role": "user", "content": [url(red), text(QUESTION)]}]},
        "preferred_output": [{"role": "assistant", "content": "Red."}],
        "non_preferred_output": [{"role": "assistant", "content": "Blue."}],
    }
    trl = {  # as TRL's vision DPO data (rlaif-v) holds a pair
        "images": ["imgs/red.png"],
        "prompt": [{"role": "user", "content": [{"type": "image"}, text(QUESTION)]}],
        "chosen": [{"role": "assistant", "content": [text("Red.")]}],
        "rejected": [{"role": "assistant", "content": [text("Blue.")]}],
    }
    whole = {  # TRL's pairs without a prompt: whole conversations, each showing the image
        "images": ["imgs/red.png"],
        "chosen": [trl["prompt"][0], trl["chosen"][0]],
        "rejected": [trl["prompt"][0], trl["rejected"][0]],
    }
    ultrafeedback = {**whole, "prompt": trl["prompt"]}  # a prompt beside whole conversations that repeat it
    sharegpt = {
        "conversations": [{"from": "human", "value": f"<image>{QUESTION}"}],
        "chosen": {"from": "gpt", "value": "Red."},
        "rejected": {"from": "gpt", "value": "Blue."},
        "images": ["imgs/red.png"],
    }
    expected = prepared(write_jsonl(tmp_path / "openai.jsonl", [openai]), tokenizer).train_pairs
    for name, row in (("trl", trl), ("whole", whole), ("ultrafeedback", ultrafeedback), ("sharegpt", sharegpt)):
        pairs = prepared(write_jsonl(tmp_path / f"{name}.jsonl", [row]), tokenizer).train_pairs
        same_examples([e for pair in pairs for e in pair], [e for pair in expected for e in pair])


@pytest.mark.parametrize(
    ("row", "code", "field", "says"),
    [
        (
            {"messages": [{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "Red."}]}
            | {"images": ["imgs/red.png", "imgs/red.png"]},
            "image_count",
            "images",
            "'images' holds 2 image(s) but its messages show 1",
        ),
        (
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Red."}]}
            | {"images": "imgs/red.png"},
            "image_count",
            "images",
            "but its messages show 0",
        ),
        (
            {"messages": [{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "Red."}]}
            | {"images": ["imgs/green.png"]},
            "bad_image",
            "images[0]",
            "green.png does not exist (an image's path is read from the data file's folder",
        ),
        (
            {"messages": [{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "Red."}]}
            | {"images": ["https://example.com/cat.png"]},
            "bad_image",
            "images[0]",
            "not downloaded (tuneforge reads no network)",
        ),
        (
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<image>Red."}]}
            | {"images": ["imgs/red.png"]},
            "unsupported_content",
            "messages[1].content",
            "an image placeholder is in an assistant message, and images are shown in user messages only",
        ),
        (
            {"prompt": [{"role": "user", "content": [{"type": "image"}, text("Hi")]}]}
            | {"chosen": [{"role": "user", "content": [{"type": "image"}] * 2}, {"role": "assistant", "content": "R"}]}
            | {"rejected": [{"role": "assistant", "content": "Blue."}], "images": ["imgs/red.png"]},
            "image_count",
            "images",
            "but 'chosen' shows 2",
        ),
        (
            {"messages": [{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "Red."}]}
            | {"images": ["imgs/red.png"], "image": "imgs/red.png"},
            "image_column",
            "image",
            "the row has both 'images' and 'image'",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "Red."}]},
            "image_count",
            "messages[0].content[0]",
            "and the row has none",
        ),
        (
            {"messages": [{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "Red."}]}
            | {"images": []},
            "image_count",
            "images",
            "'images' holds 0 image(s) but its messages show 1",
        ),
    ],
)
def test_rows_whose_images_do_not_fit_are_refused_by_line_and_field(tmp_path, pictures, row, code, field, says):
    good = {"messages": [{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "Red."}]}
    if "chosen" in row:  # a pair, after a good pair
        good = {"prompt": "<image>Hi", "chosen": "Red.", "rejected": "Blue."}
    path = write_jsonl(tmp_path / "rows.jsonl", [good | {"images": ["imgs/red.png"]}, row])
    problems = [p for _, p in read_conversations(path) if hasattr(p, "code")]
    assert [(p.code, p.line, p.field) for p in problems] == [(code, 2, field)]
    assert says in problems[0].message


def test_a_missing_image_of_a_data_file_given_by_a_relative_path_names_the_folder_it_was_looked_for_in(
    tmp_path, monkeypatch
):
    row = {"messages": [{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "Red."}]}
    write_jsonl(tmp_path / "rows.jsonl", [row | {"images": ["green.png"]}])
    monkeypatch.chdir(tmp_path)
    [problem] = [p for _, p in read_conversations("rows.jsonl") if hasattr(p, "code")]
    assert f"green.png does not exist (an image's path is read from the data file's folder, {tmp_path})" in (
        problem.message
    )


def test_a_text_only_model_refuses_rows_with_an_images_field_naming_the_first(tmp_path, pictures):
    model = save_family_model(FAMILIES["gemma3"], tmp_path / "text-model")
    rows = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
        {
            "messages": [{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "Red."}],
            "images": ["imgs/red.png"],
        },
    ]
    with pytest.raises(DataError) as error:
        prepared(write_jsonl(tmp_path / "rows.jsonl", rows), load_tokenizer(str(model)))
    assert "rows.jsonl:2 messages[0].content" in str(error.value) and "reads text only" in str(error.value)


def test_the_data_cache_sees_a_changed_image_file(models, tmp_path, pictures, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path / "home"))
    tokenizer = load_tokenizer(str(models["gemma3"]))
    row = {
        "messages": [{"role": "user", "content": f"<image>{QUESTION}"}, {"role": "assistant", "content": "Red."}],
        "images": ["imgs/red.png"],
    }
    cfg = DataConfig(train=str(write_jsonl(tmp_path / "rows.jsonl", [row])), validation=0.0)
    logged = []
    first, again = (prepare(cfg, tokenizer, log=logged.append) for _ in range(2))
    assert sum("reusing the tokenized data set" in line for line in logged) == 1 and again.train == first.train
    save_png(tmp_path / "imgs" / "red.png", BLUE)  # the same path, another picture
    logged.clear()
    changed = prepare(cfg, tokenizer, log=logged.append)
    assert not any("reusing the tokenized data set" in line for line in logged)
    assert changed.train[0].images == (base64.b64decode(png_data_url(BLUE).split(",", 1)[1]),)


@pytest.mark.parametrize("family", ["gemma3", "qwen2_5_vl"])
def test_llama_factory_alpaca_rows_train_as_their_openai_rows(models, tmp_path, pictures, family):
    red, blue = pictures
    tokenizer = load_tokenizer(str(models[family]))
    openai = [
        {
            "messages": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": [url(red), text("Hi")]},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": [text("Compare "), url(red), text(" and\n\n"), url(blue)]},
                {"role": "assistant", "content": "Red, then blue."},
            ]
        }
    ]
    alpaca = [  # the history's images first, then the instruction's, then its input's
        {
            "system": "Answer briefly.",
            "history": [["<image>Hi", "Hello."]],
            "instruction": "Compare <image> and",
            "input": "<image>",
            "output": "Red, then blue.",
            "images": ["imgs/red.png", "imgs/red.png", "imgs/blue.png"],
        }
    ]
    expected = prepared(write_jsonl(tmp_path / "openai.jsonl", openai), tokenizer).train
    assert [len(e.images) for e in expected] == [3]
    same_examples(prepared(write_jsonl(tmp_path / "alpaca.jsonl", alpaca), tokenizer).train, expected)
    pair = {"instruction": f"<image>{QUESTION}", "chosen": "Red.", "rejected": "Blue.", "images": ["imgs/red.png"]}
    as_openai = {
        "input": {"messages": [{"role": "user", "content": [url(red), text(QUESTION)]}]},
        "preferred_output": [{"role": "assistant", "content": "Red."}],
        "non_preferred_output": [{"role": "assistant", "content": "Blue."}],
    }
    pairs = [
        prepared(write_jsonl(tmp_path / f"{n}.jsonl", [r]), tokenizer).train_pairs
        for n, r in (("a", pair), ("o", as_openai))
    ]
    same_examples(*([e for p in pairs_ for e in p] for pairs_ in pairs))


def test_teacher_prompts_read_the_images_field_as_training_does(tmp_path, pictures):
    from tuneforge.distill import read_prompts

    rows = [
        {"messages": [{"role": "user", "content": "Hi"}]},
        {"messages": [{"role": "user", "content": f"<image>{QUESTION}"}], "images": ["imgs/red.png"]},
        {"prompt": [{"role": "user", "content": [{"type": "image"}, text(QUESTION)]}], "images": ["imgs/red.png"]},
        {"messages": [{"role": "user", "content": f"<image>{QUESTION}"}], "images": ["imgs/green.png"]},
        {"messages": [{"role": "user", "content": QUESTION}], "images": ["imgs/red.png"]},
    ]
    with pytest.raises(DataError) as error:
        read_prompts(write_jsonl(tmp_path / "prompts.jsonl", rows))
    found = [(p.line, p.code, p.field) for p in error.value.problems]
    assert found == [
        (2, "images_in_prompt", "messages[0].content"),
        (3, "images_in_prompt", "prompt[0].content"),
        (4, "bad_image", "images[0]"),
        (5, "image_count", "images"),
    ]


def test_an_images_entry_the_processor_does_not_take_is_refused_at_that_entry(models, tmp_path, pictures):
    save_png(
        tmp_path / "imgs" / "thin.png", RED, (1, 250)
    )  # Qwen2-VL's processor takes no side over 200 times the other
    row = {
        "messages": [{"role": "user", "content": "<image> and <image>"}, {"role": "assistant", "content": "Red."}],
        "images": ["imgs/red.png", "imgs/thin.png"],
    }
    rows = [{**row, "images": ["imgs/red.png", "imgs/red.png"]}, row]
    with pytest.raises(DataError) as error:
        prepared(write_jsonl(tmp_path / "rows.jsonl", rows), load_tokenizer(str(models["qwen2_5_vl"])))
    assert [(p.code, p.line, p.field) for p in error.value.problems] == [("bad_image", 2, "images[1]")]
    assert "image processor does not take this image" in error.value.problems[0].message


def test_the_cache_key_parses_no_rows_of_a_file_whose_images_are_data_urls(tmp_path, pictures, monkeypatch):
    """Every run (a cache hit too) keys the data: OpenAI's rows, their images in their `image_url` parts, name no
    image file, and parsing them all for an `images` field would cost a second read of every data URL."""
    from tuneforge.data import formats

    red, _ = pictures
    parsed = []
    entries = formats._image_entries
    monkeypatch.setattr(formats, "_image_entries", lambda value: parsed.append(value) or entries(value))
    openai = {
        "messages": [{"role": "user", "content": [url(red), text(QUESTION)]}, {"role": "assistant", "content": "R"}]
    }
    assert formats.image_files(write_jsonl(tmp_path / "openai.jsonl", [openai])) == [] and parsed == []
    trl = {"messages": [{"role": "user", "content": [{"type": "image"}]}], "images": ["imgs/red.png"]}
    assert formats.image_files(write_jsonl(tmp_path / "trl.jsonl", [trl])) == [tmp_path / "imgs" / "red.png"]
