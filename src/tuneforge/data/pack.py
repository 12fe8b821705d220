"""Packing examples into rows of a fixed length, and collating rows into batches.

A packed row lays several examples side by side. Position ids restart at 0 for each example, and
that is also how attention is kept inside each example: with `attention_mask=None` and no KV cache,
transformers (5.x, `masking_utils.find_packed_sequence_indices`) reads a new sequence wherever
position ids do not go up by one and builds a block-diagonal causal mask (eager, sdpa, flex), and
flash-attention uses the same position ids for its variable-length kernels. So a packed batch
must be run with `attention_mask` absent and `use_cache=False`; the loss of a packed batch then
equals the loss of its examples run one by one. `models.attention.segments` reads a row's
examples back from its position ids, the one place that rule is written.

Labels are already shifted (see `Example`), so an example's last position is never trained and no
example learns to predict the first token of the next one.
"""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .schema import IGNORE_INDEX, Example, token_array


@dataclass(slots=True)
class PackedRow:
    """Several examples laid end to end; position ids restart at 0 where each example begins. Its
    tokens, labels and positions are `token_array`s, as an `Example`'s are."""

    input_ids: array
    labels: array
    position_ids: array
    is_replay: bool = False  # holds general replay examples only (see `Example.is_replay`)
    desirable: tuple[bool, ...] = ()  # the ratings of the KTO examples it holds, in order (`Example.desirable`)
    margins: tuple[float, ...] = ()  # the margins of the preference pairs it holds, in order (`Example.margin`)

    def __post_init__(self) -> None:
        self.input_ids = token_array(self.input_ids)
        self.labels = token_array(self.labels)
        self.position_ids = token_array(self.position_ids)

    def __len__(self) -> int:
        return len(self.input_ids)

    def example_tokens(self) -> int:
        """The tokens of the examples it holds, a shared prefix counted for every example that uses it
        (the tokens a user's data has, and what tokens per second count)."""
        p = self.position_ids
        return len(p) + sum(p[t] for t in range(1, len(p)) if p[t] != p[t - 1] + 1)


@dataclass(frozen=True, slots=True)
class RowGroup:
    """Examples that are one item to the loop (one row to `train.batch_size` and the epoch's order) but run as
    rows of their own in a batch, each with its images: a preference pair (chosen, rejected), or a KTO example
    and its mismatched one, whose prompt shows images. The model's image attention (Gemma 3 attends within an
    image both ways) and Qwen2-VL's 3-D positions read a row as one sequence, so such examples are not laid end
    to end; each runs with the prompt's pixels, as TRL's DPOTrainer repeats them for the chosen and the rejected
    reply. `collate` lays each example out as a row of the batch, in order."""

    examples: tuple[Example, ...]
    is_replay = False

    @property
    def input_ids(self) -> array:
        return token_array(t for e in self.examples for t in e.input_ids)

    @property
    def labels(self) -> array:
        return token_array(t for e in self.examples for t in e.labels)

    @property
    def images(self) -> tuple[bytes, ...]:
        return tuple(image for e in self.examples for image in e.images)

    def __len__(self) -> int:
        return sum(map(len, self.examples))


def pack(examples: Sequence[Example | PackedRow], max_length: int, *, share_prefixes: bool = False) -> list[PackedRow]:
    """Best-fit-decreasing: longest examples first, each into the fullest row it still fits in.

    Deterministic for a given input order. Examples longer than `max_length` are an error here:
    `prepare` truncates or drops them first. With `share_prefixes` (see `shared_prefix_groups`),
    examples that begin with the same untrained tokens share rows that hold those tokens once.
    Replay examples (`Example.is_replay`) get rows of their own, after the user's: a row is then
    learned one way (`train.replay_loss`), and a term that runs the base model on replay runs it
    on those rows only.
    """
    too_long = next((e for e in examples if len(e) > max_length), None)
    if too_long is not None:
        raise ValueError(
            f"an example of {len(too_long)} tokens does not fit in rows of {max_length}; "
            "truncate examples to max_length before packing"
        )
    # Replay repeats its pool by design (`prepare._mix_general`) and keeps its packing: rounds are the user's.
    groups = [*_rounds([e for e in examples if not e.is_replay]), [e for e in examples if e.is_replay]]
    return [row for group in groups if group for row in _pack_group(group, max_length, share_prefixes)]


def _rounds(examples: Sequence[Example | PackedRow]) -> list[list[Example | PackedRow]]:
    """The examples in rounds: each example's first copy in the first, its second (a row of a file that
    data.train weights, or a duplicate kept by dedup: none) in the next, and so on. Packed round by round,
    copies never share a row, where best-fit-decreasing would lay them side by side (they are as long),
    and the epoch's shuffle spreads them over the epoch. Data without copies is one round, as it is."""
    seen: Counter = Counter()
    rounds: list[list] = [[]]
    for e in examples:
        key = (e.input_ids.tobytes(), e.labels.tobytes())
        k = seen[key]
        seen[key] += 1
        if k == len(rounds):
            rounds.append([])
        rounds[k].append(e)
    return rounds


def _pack_group(examples: Sequence[Example | PackedRow], max_length: int, share_prefixes: bool) -> list[PackedRow]:
    if not share_prefixes:
        return [join([examples[i] for i in members]) for members in best_fit([len(e) for e in examples], max_length)]
    pieces = []  # per group, rows that hold the group's prefix once
    for prefix, members in shared_prefix_groups(examples):
        p = len(prefix)
        for row in best_fit([len(examples[i]) - p for i in members], max_length - p):
            rest = [examples[members[j]] for j in row]
            replay = all(e.is_replay for e in rest)
            piece = PackedRow(array("i", prefix), token_array([IGNORE_INDEX]) * p, range(p), is_replay=replay)
            for e in rest:
                piece.desirable += _ratings(e)
                piece.margins += _margins(e)
                piece.input_ids += e.input_ids[p:]
                piece.labels += e.labels[p:]
                piece.position_ids.extend(range(p, len(e)))
            pieces.append(piece)
    # Each group leaves a part-filled last piece: pieces of different groups share rows, each
    # piece's first example starting again at position 0.
    return [join([pieces[i] for i in row]) for row in best_fit([len(r) for r in pieces], max_length)]


MIN_SHARED_PREFIX = 16
"""Shorter common prefixes are not worth a row of their own structure."""


def shared_prefix_groups(examples: Sequence[Example]) -> list[tuple[array, list[int]]]:
    """[(prefix tokens, example indices)]: examples that begin with the same untrained tokens.

    Chat data often starts every row with the same system prompt. Inside a group, a row holds the
    shared prefix once, then each example's remaining tokens with position ids that go on from the
    prefix's, as if each example were whole: `models.attention` lets such a continuation attend
    to the prefix and to itself, so losses and gradients are those of the examples one by one
    (tested), for fewer tokens. Only untrained positions are shared (a shared position's loss
    would count once), and every example keeps at least its last token. Examples with no partner
    form a group with an empty prefix.
    """
    heads = []
    for e in examples:
        trained = next((t for t, label in enumerate(e.labels) if label != IGNORE_INDEX), len(e))
        heads.append(e.input_ids[: min(trained, len(e) - 1)])
    order = sorted(range(len(examples)), key=lambda i: heads[i])  # equal beginnings end up side by side
    groups: list[tuple[array, list[int]]] = []
    loners: list[int] = []
    prefix = token_array(())
    members: list[int] = []

    def close() -> None:
        if len(members) > 1:
            groups.append((prefix, list(members)))
        else:
            loners.extend(members)

    for i in order:
        common = _common_length(prefix, heads[i]) if members else len(heads[i])
        if members and common < MIN_SHARED_PREFIX:
            close()
            members.clear()
            common = len(heads[i])
        prefix = heads[i][:common]
        members.append(i)
    close()
    return groups + ([(token_array(()), sorted(loners))] if loners else [])


def _common_length(a: array, b: array) -> int:
    n = min(len(a), len(b))
    return next((t for t in range(n) if a[t] != b[t]), n)


def best_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bins of `capacity`: the indices of `lengths` in each bin."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    # Rows by the space they have left; bit s of `has_space` is set while some row has exactly s
    # left, so the best fit (the least space that still fits) is the lowest set bit at or above n.
    rows_with_space: list[list[int]] = [[] for _ in range(capacity + 1)]
    has_space = 0
    for i in order:
        need = lengths[i]
        fits = has_space >> need
        if fits:
            space = need + (fits & -fits).bit_length() - 1
            row = rows_with_space[space].pop()
            if not rows_with_space[space]:
                has_space &= ~(1 << space)
        else:
            row, space = len(rows), capacity
            rows.append([])
        rows[row].append(i)
        space -= need
        if space:
            rows_with_space[space].append(row)
            has_space |= 1 << space
    return rows


def join(examples: Sequence[Example | PackedRow]) -> PackedRow:
    """Examples (or rows) laid end to end in one row, in order; each keeps its own position ids, so
    a DPO pair joined as (chosen, rejected) stays two examples wherever it is packed."""
    input_ids, labels, position_ids = token_array(()), token_array(()), token_array(())
    for e in examples:
        input_ids += e.input_ids
        labels += e.labels
        position_ids.extend(e.position_ids if isinstance(e, PackedRow) else range(len(e)))
    desirable = tuple(rating for e in examples for rating in _ratings(e))
    margins = tuple(margin for e in examples for margin in _margins(e))
    replay = all(e.is_replay for e in examples)
    return PackedRow(input_ids, labels, position_ids, is_replay=replay, desirable=desirable, margins=margins)


def _ratings(e: Example | PackedRow) -> tuple[bool, ...]:
    """The KTO ratings an example or a row holds, in order."""
    if isinstance(e, PackedRow):
        return e.desirable
    return () if e.desirable is None else (e.desirable,)


def _margins(e: Example | PackedRow) -> tuple[float, ...]:
    """The margins of the preference pairs an example (a pair's chosen one) or a row holds, in order."""
    if isinstance(e, PackedRow):
        return e.margins
    return () if e.margin is None else (e.margin,)


def shows_images(items: Sequence) -> bool:
    """Whether any of the examples (or tuples of them, or pairs) shows an image; such examples are not packed.
    Rows (`PackedRow`) show none: rows with images are never packed."""
    return any(getattr(e, "images", ()) for item in items for e in (item if isinstance(item, tuple) else (item,)))


def collate(
    rows: Sequence[Example | PackedRow | RowGroup], pad_id: int, *, pad_to_multiple_of: int = 8, images=None
) -> dict[str, torch.Tensor]:
    """Right-pad rows into a batch: input_ids, labels (IGNORE_INDEX on padding), position_ids, where a
    row holds replay, `is_replay` (a bool per row), and where rows hold KTO examples, `desirable` (their
    ratings, in the order of the batch's examples, row by row), where rows hold preference pairs with a `margin`,
    `margin` (one a pair, 0.0 for a pair without, in the batch's order), and where rows show images, `pixel_values`
    (from `images`, the model's `models.images.ImageInputs`) and `token_type_ids` (1 at image tokens). A
    `RowGroup` is its examples, each a row of the batch.

    `attention_mask` is returned only for a batch of unpacked rows with padding; a batch holding
    packed rows gets none, because transformers then derives the per-example mask from position ids
    (padding is given its own run of position ids, so it forms a block of its own).
    """
    if not rows:
        raise ValueError("collate needs at least one row")
    rows = [e for r in rows for e in (r.examples if isinstance(r, RowGroup) else (r,))]
    longest = max(len(r) for r in rows)
    width = -(-longest // pad_to_multiple_of) * pad_to_multiple_of if pad_to_multiple_of > 1 else longest
    packed = any(isinstance(r, PackedRow) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        n = len(row)
        input_ids[b, :n] = torch.tensor(row.input_ids)
        labels[b, :n] = torch.tensor(row.labels)
        positions = row.position_ids if isinstance(row, PackedRow) else range(n)
        position_ids[b, :n] = torch.tensor(list(positions))
        position_ids[b, n:] = torch.arange(width - n)
        attention_mask[b, :n] = 1
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    if not packed and any(len(r) < width for r in rows):
        batch["attention_mask"] = attention_mask
    if any(r.is_replay for r in rows):
        batch["is_replay"] = torch.tensor([r.is_replay for r in rows])
    ratings = [rating for r in rows for rating in _ratings(r)]
    if ratings:
        batch["desirable"] = torch.tensor(ratings)
    margins = [margin for r in rows for margin in _margins(r)]
    if any(margins):  # pairs without a margin (0.0) alone leave the batch, and the loss, as they are
        batch["margin"] = torch.tensor(margins, dtype=torch.float32)
    shown = [image for r in rows if isinstance(r, Example) for image in r.images]
    if shown:  # `images` (`models.images.ImageInputs`): the pixels, and where the image tokens are
        if images is None:
            raise ValueError("rows show images: collate needs the model's `images` (models.loading.image_inputs)")
        batch.update(images.model_inputs(shown, input_ids))
        if images.rope_from_images:  # M-RoPE: the model places the tokens in 3-D from the ids and the image grids
            del batch["position_ids"]
    return batch
