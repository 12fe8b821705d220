"""Per-example attention for training rows: the same logits and gradients as the model's own masked attention."""

from __future__ import annotations

import pytest
import torch

from tuneforge.data import Example, collate, pack
from tuneforge.methods.sft import trained_logits
from tuneforge.models import load_model, resolve
from tuneforge.models.attention import per_example_attention, segments, supports_per_example_attention


@pytest.fixture(scope="module")
def model(tiny_model_dir, one_thread):
    return load_model(resolve(str(tiny_model_dir)), dtype=torch.float32)


def examples(vocab: int, lengths: list[int], seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append(Example(ids, ids[1:] + [-100]))
    return out


def logits_and_grads(model, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    logits = trained_logits(model, **batch)
    (logits.square().mean()).backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("packed", [True, False])
def test_per_example_attention_matches_the_models_masked_attention(model, packed):
    rows = examples(model.config.vocab_size, [17, 5, 30, 9, 23])
    if packed:
        rows = pack(rows, max_length=48)
        assert any(r.position_ids.count(0) > 1 for r in rows)  # some rows really hold several examples
    batch = collate(rows, pad_id=0)
    assert ("attention_mask" in batch) == (not packed)  # padded unpacked rows carry a padding mask
    reference, reference_grads = logits_and_grads(model, batch)
    with per_example_attention(model):
        batch.pop("attention_mask", None)  # padding restarts its position ids: it is an example of its own
        fast, fast_grads = logits_and_grads(model, batch)
    torch.testing.assert_close(fast, reference, atol=2e-5, rtol=1e-4)
    for a, b in zip(fast_grads, reference_grads):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    assert model.config._attn_implementation == "sdpa"  # restored on leaving the block


def test_per_example_attention_refuses_a_kv_cache(model):
    ids = torch.randint(3, model.config.vocab_size, (1, 6))
    with per_example_attention(model), pytest.raises(RuntimeError, match="training rows only"):
        model.generate(ids, max_new_tokens=2, do_sample=False)
    assert model.config._attn_implementation == "sdpa"


def test_models_with_a_short_sliding_window_or_softcapping_keep_their_attention():
    from transformers import Gemma3TextConfig, LlamaConfig

    assert supports_per_example_attention(LlamaConfig(), max_length=1024)
    gemma = Gemma3TextConfig(sliding_window=512)
    assert not supports_per_example_attention(gemma, max_length=1024)
    assert supports_per_example_attention(gemma, max_length=512)
    assert not supports_per_example_attention(LlamaConfig(attn_logit_softcapping=50.0), max_length=512)


def test_teacher_and_reference_copies_switch_with_the_trained_model(model, tiny_model_dir):
    from tuneforge.methods import KLToBase, SFTObjective
    from tuneforge.models.attention import NAME

    reference = load_model(resolve(str(tiny_model_dir)), dtype=torch.float32)
    objective = SFTObjective(model, terms=(KLToBase(weight=0.1, replay=False, reference=reference),))
    assert objective.frozen == [reference]
    with per_example_attention(model, *objective.frozen):
        assert model.config._attn_implementation == reference.config._attn_implementation == NAME
    assert model.config._attn_implementation == reference.config._attn_implementation == "sdpa"


def shared_prefix_examples(vocab: int) -> list[Example]:
    """Two groups of chats that open with the same untrained tokens (a system prompt), and two loners."""
    g = torch.Generator().manual_seed(1)

    def tokens(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    out = []
    for prefix, rests in ((tokens(20), [9, 14, 6, 11, 30, 25]), (tokens(18), [7, 12, 5]), ([], [25, 16])):
        for n in rests:
            ids = prefix + tokens(n)
            head = len(prefix) + n // 2  # the prompt: untrained; the reply after it: trained
            out.append(Example(ids, [-100] * head + ids[head + 1 :] + [-100]))
    return out


def summed_loss_and_grads(model, rows) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    batch = collate(rows, pad_id=0)
    logits = trained_logits(model, **batch)
    loss = torch.nn.functional.cross_entropy(logits, batch["labels"][batch["labels"] != -100], reduction="sum")
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_shared_prefix_rows_give_the_losses_and_gradients_of_the_examples_one_by_one(model):
    items = shared_prefix_examples(model.config.vocab_size)
    # 68: the first group needs three rows (its prefix in each), and pieces of two groups share a row.
    plain, shared = pack(items, max_length=68), pack(items, max_length=68, share_prefixes=True)
    assert sum(map(len, shared)) == sum(map(len, items)) - (6 - 3) * 20 - (3 - 1) * 18  # prefixes held once per row
    assert sum(r.example_tokens() for r in shared) == sum(map(len, items))
    assert any(r.position_ids.count(0) > 1 and r.example_tokens() > len(r) for r in shared)  # groups share rows
    with per_example_attention(model):
        reference, reference_grads = summed_loss_and_grads(model, plain)
        got, grads = summed_loss_and_grads(model, shared)
    torch.testing.assert_close(got, reference, atol=1e-4, rtol=1e-5)
    for a, b in zip(grads, reference_grads):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_a_forward_pass_reads_its_rows_segments_once_not_once_per_layer(model, monkeypatch):
    """Reading the position ids on the host waits, on a GPU, for all the work queued before it: once per
    forward pass, not once per layer."""
    import tuneforge.models.attention as attention

    assert model.config.num_hidden_layers > 1
    reads = []
    monkeypatch.setattr(attention, "segments", lambda positions: reads.append(1) or segments(positions))
    batch = collate(pack(examples(model.config.vocab_size, [17, 5, 30]), max_length=64), pad_id=0)
    with per_example_attention(model):
        logits_and_grads(model, batch)
    assert len(reads) == len(batch["input_ids"])
    batch["position_ids"][0, 5:] = torch.arange(batch["input_ids"].shape[1] - 5)  # changed in place: read again
    with per_example_attention(model):
        logits_and_grads(model, batch)
    assert len(reads) == 2 * len(batch["input_ids"])


def test_per_example_attention_runs_under_inference_mode_as_outside_it(model):
    """Evaluation's loss runs packed rows under torch.inference_mode, whose tensors have no version counter."""
    batch = collate(pack(examples(model.config.vocab_size, [17, 5, 30]), max_length=64), pad_id=0)
    with per_example_attention(model), torch.no_grad():
        expected = trained_logits(model, **batch)
    with per_example_attention(model), torch.inference_mode():
        batch = {k: v.clone() for k, v in batch.items()}  # made under inference_mode, as evaluation's are
        got = trained_logits(model, **batch)
    torch.testing.assert_close(got, expected)
