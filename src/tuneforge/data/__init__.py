"""Training data: read -> validate -> render chat + loss mask -> dedup -> split -> fit -> cache; then pack.

    from tuneforge.data import IGNORE_INDEX, collate, pack, prepare
    data = prepare(cfg.data, tokenizer, report_path=run_dir / "data_report.json")  # the report written if refused
    batch = collate(pack(data.train, cfg.data.max_length)[:8], tokenizer.pad_token_id)
    labels = batch.pop("labels")  # already shifted: no shift here, and not passed to the model
    logits = model(**batch, use_cache=False).logits  # use_cache=False: see pack.py
    loss = cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)

Modules, one job each: `schema` (the types), `readers` (files -> rows), `formats` (rows -> records,
every row checked), `pii` (secrets and personal data: found, masked, redacted), `render` (records ->
token ids + loss masks via the chat template), `dedup` (content keys, exact and near duplicates),
`prepare` (the whole pass and its report), `cache` (prepared data on disk), `pack` (packing and
batching), `check` (the `tuneforge data check` command).
"""

from ..models.loading import CHATML_TEMPLATE
from .formats import FORMATS, read_conversations
from .pack import PackedRow, RowGroup, collate, join, pack, shows_images
from .prepare import check_data, prepare
from .render import render_conversation, render_examples, render_preference
from .schema import (
    IGNORE_INDEX,
    Conversation,
    Document,
    Example,
    Message,
    Preference,
    PreparedData,
    Problem,
)

__all__ = [
    "CHATML_TEMPLATE",
    "FORMATS",
    "IGNORE_INDEX",
    "Conversation",
    "Document",
    "Example",
    "Message",
    "PackedRow",
    "RowGroup",
    "Preference",
    "PreparedData",
    "Problem",
    "check_data",
    "collate",
    "join",
    "pack",
    "shows_images",
    "prepare",
    "read_conversations",
    "render_conversation",
    "render_examples",
    "render_preference",
]
