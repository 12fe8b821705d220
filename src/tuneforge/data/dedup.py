"""Telling rows apart: content keys, exact and near-duplicate detection.

Every record gets a content key: its text normalised (Unicode NFKC, case-folded, whitespace
collapsed) with roles, untrained replies and tool definitions marked, hashed. The key decides exact
duplicates, which side of a train/validation split a row falls on, and validation leaks. Near duplicates are found with
MinHash LSH (`datasketch`) over word pairs (punctuation at word ends left out) of what the conversation says
(its non-system messages, with their reasoning and tool calls: a system prompt shared by every row would make
all rows look alike); rows that leave different replies untrained are never near repeats.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence

import numpy as np

from .schema import Conversation, Document, Message, Preference, Record

NUM_PERM = 128
_CANDIDATE_MARGIN = 0.15
_EDGE_PUNCTUATION = re.compile(r"^[^\w]+|[^\w]+$")
_SHINGLE_WORDS = 2  # word pairs: one changed word in a 25-word ticket still scores about 0.86


def normalise_text(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _message_text(m: Message) -> str:
    calls = json.dumps(m.tool_calls, sort_keys=True) if m.tool_calls else ""
    # A reply of weight 0 is shown but not trained: rows that train different replies of one
    # conversation (a common way to write it) are not duplicates.
    untrained = " weight=0" if m.weight == 0 else ""
    reasoning = f"<think>{normalise_text(m.reasoning_content)}</think>" if m.reasoning_content else ""
    return f"<{m.role}{untrained}>{reasoning}{normalise_text(m.content)}{calls}{_images_text(m)}"


def _images_text(m: Message) -> str:
    """The images a message shows, by the hash of their bytes: rows whose text is the same but whose
    images differ teach different answers, and are never repeats of each other."""
    return "".join(f"<image {hashlib.blake2b(i.data, digest_size=16).hexdigest()}>" for i in m.images)


def _row_images(record: Record) -> str:
    messages = [*record.prompt, record.chosen] if isinstance(record, Preference) else getattr(record, "messages", ())
    return "".join(map(_images_text, messages))


def _tools_text(tools: list[dict] | None) -> str:
    """The tool definitions a row offers, which templates write into the prompt."""
    return f"<tools>{json.dumps(tools, sort_keys=True)}" if tools else ""


def content_text(record: Record) -> str:
    """The normalised text that two rows share exactly when they are duplicates."""
    if isinstance(record, Document):
        return normalise_text(record.text)
    if isinstance(record, Preference):
        return (
            _tools_text(record.tools)
            + "".join(map(_message_text, record.prompt))
            + "<chosen>"
            + _message_text(record.chosen)
            + "<rejected>"
            + _message_text(record.rejected)
        )
    return _tools_text(record.tools) + "".join(map(_message_text, record.messages)) + _rating(record)


def _rating(record: Conversation) -> str:
    """A KTO row's rating: the same reply rated the other way (two users' feedback) teaches the opposite, so
    it is no repeat of it."""
    return "" if record.label is None else f"<label={str(record.label).lower()}>"


def content_hash(record: Record) -> int:
    digest = hashlib.blake2b(content_text(record).encode("utf-8", "surrogatepass"), digest_size=16).digest()
    return int.from_bytes(digest, "big")


def held_out_keys(keys: Sequence[int], fraction: float) -> set[int]:
    """The content keys of the rows a validation `fraction` of these rows' keys splits off: chosen by
    key, so the same rows whatever the file order, and rows that share a key stay on one side. At
    least one row and never every row; none for fewer than two rows or a fraction of 0."""
    if fraction <= 0 or len(keys) < 2:
        return set()
    wanted = min(len(keys) - 1, max(1, round(fraction * len(keys))))
    chosen: set[int] = set()
    taken = 0
    per_key = Counter(keys)
    for key in sorted(per_key):
        if taken >= wanted:
            break
        chosen.add(key)
        taken += per_key[key]
    return chosen


def _said_text(record: Record) -> str:
    """What a row says, for near-duplicate detection (system prompts left out)."""
    if isinstance(record, Document):
        return normalise_text(record.text)
    # A pair's rejected reply is half of what it teaches: pairs that share a prompt and a chosen reply differ.
    messages = [*record.prompt, record.chosen, record.rejected] if isinstance(record, Preference) else record.messages
    return " ".join(_said(m) for m in messages if m.role != "system")


def _said(m: Message) -> str:
    """A message's words: its reasoning and tool calls too, which a reply trains as it trains its content."""
    calls = json.dumps(m.tool_calls, sort_keys=True) if m.tool_calls else ""
    return " ".join(normalise_text(text) for text in (m.reasoning_content or "", m.content, calls) if text)


def _untrained_turns(record: Record) -> str:
    """Which messages of a row are shown but not trained (weight 0), by place: rows that train different
    replies of one conversation say the same words but teach different replies, so they are never near
    repeats of each other. Empty for a row that gives no weight of 0."""
    if not isinstance(record, Conversation):
        return ""
    said = [m for m in record.messages if m.role != "system"]
    return ",".join(str(i) for i, m in enumerate(said) if m.weight == 0)


class DuplicateIndex:
    """The rows seen so far; says whether a new row repeats one of them, exactly or nearly.

    With `near_threshold` None only exact repeats (same content hash) are found. Otherwise a row
    whose estimated Jaccard similarity to an earlier row reaches the threshold is a near repeat.
    """

    def __init__(self, near_threshold: float | None = None):
        self._exact: dict[int, int] = {}
        self.near_threshold = near_threshold
        if near_threshold is not None:
            from datasketch import MinHash, MinHashLSH

            self._minhash = MinHash
            self._template = MinHash(num_perm=NUM_PERM, seed=1)  # its permutations are reused: they are costly
            # LSH finds candidates with a probability that rises steeply around its threshold; a lower
            # one catches rows just above ours, and the signatures then decide.
            self._lsh = MinHashLSH(threshold=max(0.1, near_threshold - _CANDIDATE_MARGIN), num_perm=NUM_PERM)
            self._signatures: dict[int, np.ndarray] = {}

    def signature(self, record: Record):
        """The MinHash of a row, for `find` and `add`; None when only exact repeats are looked for."""
        if self.near_threshold is None:
            return None
        # Words without the punctuation at their ends, so a row that differs in commas or a "?" for a "!"
        # repeats the row; punctuation inside a word ("2+2", "a.b") and a word of punctuation alone ("+")
        # stay, so "2+2" and "2*2" differ.
        words = [_EDGE_PUNCTUATION.sub("", word) or word for word in _said_text(record).split()]
        shingles = {" ".join(words[i : i + _SHINGLE_WORDS]) for i in range(max(1, len(words) - _SHINGLE_WORDS + 1))}
        if untrained := _untrained_turns(record):  # rows that train other messages share no shingle
            shingles = {f"<weight=0 {untrained}>{s}" for s in shingles}
        if images := _row_images(record):  # other images: no shingle shared
            shingles = {f"{images}{s}" for s in shingles}
        if isinstance(record, Conversation) and record.label is not None:  # rated the other way: no shingle shared
            shingles = {f"{_rating(record)}{s}" for s in shingles}
        minhash = self._minhash(
            num_perm=NUM_PERM, seed=1, permutations=self._template.permutations, scheme=self._template.scheme
        )
        minhash.update_batch([s.encode("utf-8", "surrogatepass") for s in shingles])
        return minhash

    def find(self, key: int, signature=None) -> tuple[str, int] | None:
        """("exact" | "near", id of the earlier row) if the row repeats one, else None."""
        if key in self._exact:
            return "exact", self._exact[key]
        if signature is None:
            return None
        similar = [row for row in self._lsh.query(signature) if self.similarity(row, signature) >= self.near_threshold]
        return ("near", min(similar)) if similar else None

    def similarity(self, row_id: int, signature) -> float:
        """The estimated Jaccard similarity of a row (by its `signature`) to the row `row_id` added earlier."""
        return float(np.mean(self._signatures[row_id] == signature.hashvalues))

    def add(self, row_id: int, key: int, signature=None) -> None:
        self._exact.setdefault(key, row_id)
        if signature is not None:
            self._lsh.insert(row_id, signature, check_duplication=False)
            self._signatures[row_id] = signature.hashvalues
