"""Packing and collation: a packed batch gives the same loss as its examples unpacked."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_llama

from tuneforge.data import IGNORE_INDEX, Example, PackedRow, collate, pack, render_conversation
from tuneforge.models.attention import segments


def example(n: int, start: int = 10) -> Example:
    ids = list(range(start, start + n))
    return Example(ids, ids[1:] + [IGNORE_INDEX])


def test_best_fit_decreasing():
    examples = [example(n, start=10 * n) for n in (2, 6, 4, 5, 3)]
    rows = pack(examples, max_length=8)
    assert [r.position_ids.count(0) for r in rows] == [2, 2, 1]
    assert [len(r) for r in rows] == [8, 8, 4]
    # 6 + 2 fill the first row, 5 + 3 the second: each example went to the fullest row it fit in.
    assert rows[0].input_ids == examples[1].input_ids + examples[0].input_ids
    assert rows[1].input_ids == examples[3].input_ids + examples[4].input_ids


def test_packing_keeps_every_example_once_with_restarting_positions():
    examples = [example(n, start=100 * i) for i, n in enumerate([7, 3, 9, 1, 4, 4, 8, 2, 5, 6])]
    rows = pack(examples, max_length=12)
    assert all(len(r) <= 12 for r in rows)
    pieces = []
    for r in rows:
        starts = [i for i, p in enumerate(r.position_ids) if p == 0] + [len(r)]
        for a, b in zip(starts, starts[1:]):
            assert r.position_ids[a:b].tolist() == list(range(b - a))
            pieces.append((r.input_ids[a:b].tolist(), r.labels[a:b].tolist()))
    assert sorted(pieces) == sorted((e.input_ids.tolist(), e.labels.tolist()) for e in examples)
    assert sum(len(r) for r in rows) == sum(len(e) for e in examples)


def test_an_example_longer_than_a_row_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        pack([example(9)], max_length=8)


def test_collate_pads_and_masks_only_where_needed():
    batch = collate([example(5), example(3)], pad_id=0)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["labels"][1, 3:].eq(IGNORE_INDEX).all() and batch["input_ids"][1, 3:].eq(0).all()
    assert batch["position_ids"][0, :5].tolist() == [0, 1, 2, 3, 4]
    assert batch["attention_mask"].tolist() == [[1] * 5 + [0] * 3, [1] * 3 + [0] * 5]

    assert "attention_mask" not in collate([example(8), example(8)], pad_id=0)

    packed = collate(pack([example(5), example(2)], max_length=8), pad_id=0)
    assert "attention_mask" not in packed
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 0]]  # padding is a block of its own


def test_segments_of_a_row_and_a_prefix_the_row_does_not_hold():
    # A shared prefix of 3 with the rest of the first example (one run), a second example that
    # continues the prefix from position 3, a stand-alone example, then padding.
    assert segments([0, 1, 2, 3, 4, 3, 4, 5, 0, 1, 0]) == [(0, 5, 0, 0), (5, 8, 3, 0), (8, 10, 0, 8), (10, 11, 0, 10)]
    with pytest.raises(RuntimeError, match="prefix of 3 tokens"):
        segments([0, 1, 3, 4])


def _loss(model, batch: dict) -> torch.Tensor:
    labels = batch.pop("labels")
    logits = model(**batch, use_cache=False).logits
    return (
        F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        / labels.ne(IGNORE_INDEX).sum()
    )


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_packed_loss_equals_unpacked_loss(tokenizer, attention):
    conversations = [
        [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}],
        [
            {"role": "system", "content": "Answer with JSON only."},
            {"role": "user", "content": "My database is down and production is affected, please help!"},
            {"role": "assistant", "content": '{"category": "outage", "priority": "urgent", "product": "database"}'},
        ],
        [
            {"role": "user", "content": "Hello, how are you?"},
            {"role": "assistant", "content": "I am fine, thank you."},
            {"role": "user", "content": "How do I reset my password?"},
            {"role": "assistant", "content": "Use the console."},
        ],
        [
            {"role": "user", "content": "The quick brown fox?"},
            {"role": "assistant", "content": "Jumps over the lazy dog."},
        ],
    ]
    examples = [render_conversation(c, tokenizer) for c in conversations]
    model = tiny_llama(tokenizer).float().eval()
    model.set_attn_implementation(attention)
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        unpacked = _loss(model, collate(examples, pad))
        rows = pack(examples, max_length=128)
        assert len(rows) < len(examples)
        packed_batch = collate(rows, pad)
        packed = _loss(model, dict(packed_batch))
        one_by_one = torch.stack(
            [_loss(model, collate([e], pad, pad_to_multiple_of=1)) * e.trained_tokens for e in examples]
        ).sum() / sum(e.trained_tokens for e in examples)
    assert abs(packed.item() - unpacked.item()) < 1e-5
    assert abs(one_by_one.item() - unpacked.item()) < 1e-5


def test_packed_rows_and_examples_collate_together(tokenizer):
    rows = pack([example(3), example(4)], max_length=8) + [example(5)]
    batch = collate(rows, pad_id=0)
    assert isinstance(rows[0], PackedRow) and "attention_mask" not in batch
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]


def test_shared_prefix_groups_share_only_untrained_beginnings():
    from tuneforge.data.pack import MIN_SHARED_PREFIX, shared_prefix_groups

    system = list(range(100, 100 + MIN_SHARED_PREFIX + 4))
    a = Example(system + [1, 2, 3, 4], [-100] * (len(system) + 1) + [3, 4, -100])
    b = Example(system + [1, 5, 6], [-100] * (len(system) + 1) + [6, -100])
    trained_early = Example(system + [7, 8], [-100] * 5 + system[6:] + [7, 8, -100])  # trained inside the system prompt
    loner = Example(list(range(300, 330)), [-100] * 10 + list(range(311, 330)) + [-100])
    groups = shared_prefix_groups([a, b, trained_early, loner])
    assert [(prefix.tolist(), members) for prefix, members in groups] == [(system + [1], [0, 1]), ([], [2, 3])]
    [row] = pack([a, b, trained_early, loner], max_length=100, share_prefixes=True)  # the pieces of both groups
    p = len(system) + 1
    # a whole, then b going on from the shared prefix: its tokens, labels and positions after p only
    piece = list(
        zip(
            system + [1] + a.input_ids[p:].tolist() + b.input_ids[p:].tolist(),
            [-100] * p + a.labels[p:].tolist() + b.labels[p:].tolist(),
            list(range(len(a))) + list(range(p, len(b))),
        )
    )
    laid = list(zip(row.input_ids, row.labels, row.position_ids))
    assert any(laid[i : i + len(piece)] == piece for i in range(len(laid)))
    assert len(row) == len(a) + len(b) - p + len(trained_early) + len(loner)


def test_a_rows_example_tokens_count_a_shared_prefix_for_every_example():
    row = PackedRow([1] * 9, [IGNORE_INDEX] * 9, [0, 1, 2, 3, 4, 3, 4, 0, 1])  # prefix 3: examples of 5, 5 and 2
    assert row.example_tokens() == 12 and len(row) == 9


def test_an_examples_copies_are_packed_into_different_rows():
    # A row of a file data.train weights 2 comes twice: laid side by side, both copies would train in one step.
    a, b = Example([1, 2, 3, 4], [2, 3, 4, IGNORE_INDEX]), Example([5, 6], [6, IGNORE_INDEX])
    rows = pack([a, b, a, b], max_length=12)
    assert len(rows) == 2
    assert all(list(r.input_ids) == [1, 2, 3, 4, 5, 6] for r in rows)
