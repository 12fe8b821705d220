"""The cache of prepared (tokenized) data sets, under `tuneforge_home()/data-cache/<key>/`.

The key hashes everything the prepared data depends on: the data files' paths and contents (and those of the
image files their rows name), the tokenizer (vocabulary, merges, added tokens, chat template) and the data
config. Entries are Parquet files written atomically (a folder renamed into place), so a crash never leaves a
half entry that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..config import DataConfig
from ..fsio import atomic_dir, tuneforge_home, write_json
from ..models.loading import given_chatml, image_inputs
from .formats import image_files
from .schema import Example, PreparedData, token_array

CACHE_FORMAT = 24
"""Bump when prepared output changes for the same inputs (a fix in rendering, say)."""

_SPLITS = ("train", "valid")


def cache_dir() -> Path:
    return tuneforge_home() / "data-cache"


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything about a tokenizer that changes its tokens or its chat rendering."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = [
        vocab,
        json.dumps(tokenizer.chat_template, sort_keys=True),
        # The report's warning about ChatML given for want of the model's own template names its folder.
        str(given_chatml(tokenizer) and tokenizer.name_or_path),
        *(str(getattr(tokenizer, name, None)) for name in ("bos_token", "eos_token", "pad_token")),
    ]
    if images := image_inputs(tokenizer):  # the tokens and pixels an image becomes
        parts.append(images.fingerprint())
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def data_files(cfg: DataConfig, replay_file: Path | None = None) -> list:
    """The files whose contents the cache key holds: the training files, a validation file, the replay file."""
    files = cfg.train_files + ([cfg.validation] if isinstance(cfg.validation, str) else [])
    return files + ([replay_file] if replay_file is not None else [])


def cache_key(cfg: DataConfig, tokenizer, replay_file: Path | None = None) -> str | None:
    """The key for this config, tokenizer and the contents of its data files (and of the replay
    file it mixes in); None when a data file is missing (nothing to cache)."""
    files = data_files(cfg, replay_file)
    h = hashlib.sha256()
    settings = cfg.model_dump(
        exclude={"train", "validation", "packing", "share_prefixes"}
    )  # packing comes after the cache
    settings["validation"] = cfg.validation if not isinstance(cfg.validation, str) else "file"
    # The paths as well as the contents: the report (data_report.json) names the files and the lines of
    # every problem, duplicate and leak, so a copy of the data elsewhere must not reuse another path's report.
    settings["paths"] = [str(path) for path in files]
    if cfg.weighted:  # an unweighted config's key stays what it was before files had weights
        settings["weights"] = cfg.train_weights
    h.update(json.dumps({"format": CACHE_FORMAT, "settings": settings}, sort_keys=True).encode())
    for path in files:
        try:
            with open(path, "rb") as f:
                h.update(hashlib.file_digest(f, "sha256").digest())
        except OSError:
            return None
        for image in image_files(path):  # the images its rows name by path: a row trains on their bytes
            h.update(str(image).encode())
            try:
                with open(image, "rb") as f:
                    h.update(hashlib.file_digest(f, "sha256").digest())
            except OSError:  # the row is refused; once the file is there, the key changes
                h.update(b"missing")
    h.update(tokenizer_fingerprint(tokenizer).encode())
    return h.hexdigest()[:32]


def load(key: str) -> PreparedData | None:
    folder = cache_dir() / key
    if not (folder / "report.json").is_file():
        return None
    report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    lists = {name: _read_examples(folder / f"{name}.parquet") for name in _SPLITS}
    pairs = {name: _read_pairs(folder / f"{name}_pairs.parquet") for name in _SPLITS}
    return PreparedData(lists["train"], lists["valid"], report, train_pairs=pairs["train"], valid_pairs=pairs["valid"])


def save(key: str, data: PreparedData) -> Path:
    folder = cache_dir() / key
    with atomic_dir(folder, replace=True) as tmp:
        for name in _SPLITS:
            _write_examples(tmp / f"{name}.parquet", getattr(data, name))
            pairs = getattr(data, f"{name}_pairs")
            _write_examples(tmp / f"{name}_pairs.parquet", [c for c, _ in pairs], [r for _, r in pairs])
        write_json(tmp / "report.json", data.report)
    return folder


def _write_examples(path: Path, examples: list[Example], second: list[Example] | None = None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tokens = pa.list_(pa.int32())
    columns = {
        "input_ids": pa.array([e.input_ids for e in examples], tokens),
        "labels": pa.array([e.labels for e in examples], tokens),
        "is_replay": pa.array([e.is_replay for e in examples], pa.bool_()),
        "desirable": pa.array([e.desirable for e in examples], pa.bool_()),  # null but for KTO examples
        "margin": pa.array([e.margin for e in examples], pa.float64()),  # null but for preference pairs
    }
    if any(e.images for e in examples):  # the image files of rows that show images
        columns["images"] = pa.array([list(e.images) for e in examples], pa.list_(pa.binary()))
    if second is not None:  # the rejected half of preference pairs
        columns["rejected_input_ids"] = pa.array([e.input_ids for e in second], tokens)
        columns["rejected_labels"] = pa.array([e.labels for e in second], tokens)
        if any(e.images for e in second):  # the prompt's images, which the rejected reply is read with too
            columns["rejected_images"] = pa.array([list(e.images) for e in second], pa.list_(pa.binary()))
    pq.write_table(pa.table(columns), path)


def _read_columns(path: Path) -> dict[str, list]:
    """Each column as a list: of `token_array`s for the token columns, read from Arrow's buffers without a
    Python int per token (what keeps a large cached data set as small in memory as it is on disk)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    columns = {}
    for name in table.column_names:
        column = table.column(name)
        if not pa.types.is_list(column.type) or name in ("images", "rejected_images"):
            columns[name] = column.to_pylist()
            continue
        lists = column.combine_chunks()
        offsets = lists.offsets.to_numpy()
        offsets = (offsets - offsets[0]).tolist()
        tokens = token_array(())
        tokens.frombytes(lists.flatten().to_numpy().astype("int32", copy=False).tobytes())
        columns[name] = [tokens[a:b] for a, b in zip(offsets, offsets[1:])]
    return columns


def _read_examples(path: Path) -> list[Example]:
    columns = _read_columns(path)
    desirable = columns.get("desirable") or [None] * len(columns["input_ids"])
    images = columns.get("images") or [()] * len(columns["input_ids"])
    columns = zip(columns["input_ids"], columns["labels"], columns["is_replay"], desirable, images)
    return [Example(ids, labels, is_replay, rated, tuple(shown)) for ids, labels, is_replay, rated, shown in columns]


def _read_pairs(path: Path) -> list[tuple[Example, Example]]:
    c = _read_columns(path)
    n = len(c["input_ids"])
    margins = c.get("margin") or [0.0] * n
    chosen_images, rejected_images = c.get("images") or [()] * n, c.get("rejected_images") or [()] * n
    columns = zip(
        c["input_ids"],
        c["labels"],
        c["rejected_input_ids"],
        c["rejected_labels"],
        margins,
        chosen_images,
        rejected_images,
    )
    return [
        (Example(a, b, margin=m, images=tuple(shown)), Example(x, y, images=tuple(rejected_shown)))
        for a, b, x, y, m, shown, rejected_shown in columns
    ]
