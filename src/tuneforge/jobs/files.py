"""Where uploaded files and results live: `<root>/files/<file id>.<kind>`, never a name the client chose.

The client's filename is only a label in the database, so no upload can write outside the folder.
The stored name keeps the kind (`.jsonl` uploads, `.csv` results) so the data readers know the
file by its name, as they would the client's. Bytes are copied in chunks into a temporary sibling
and renamed (`fsio.atomic_file`), with the size cap checked as they arrive; a compressed file or an archive (`PACKED`:
gzip, xz, bzip2, zstd, zip, 7z) is refused, since no reader of a stored file decompresses it.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from ..fsio import atomic_file
from .store import StoredFile, new_id, now

CHUNK_BYTES = 1 << 20
SUFFIXES = {
    "fine-tune": ".jsonl",
    "evals": ".jsonl",
    "batch": ".jsonl",
    "batch_output": ".jsonl",
    "fine-tune-results": ".csv",
}
RESULT_COLUMNS = (
    "step",
    "train_loss",
    "train_mean_token_accuracy",
    "valid_loss",
    "valid_mean_token_accuracy",
    "full_valid_loss",
    "full_valid_mean_token_accuracy",
)
REWARD_COLUMNS = (
    "reward",
    "reward_std",
    "kl",
    "completion_length",
    "clipped_share",
    "valid_reward",
    "full_valid_reward",
)
"""A reinforcement job's metrics beside the loss (and `reward/NAME` and `reward_std/NAME` per grader, in its
events): the sampled answers' rewards, KL to the base, length and share cut at the token limit, and the greedy
answers' rewards on the validation prompts."""


PACKED = {
    b"\x1f\x8b": "gzip-compressed",
    b"PK\x03\x04": "a zip archive",
    b"PK\x05\x06": "a zip archive",  # one that holds no file: its end record alone
    b"PK\x07\x08": "a zip archive",  # one written in several parts
    b"\xfd7zXZ\x00": "xz-compressed",
    b"BZh": "bzip2-compressed",
    b"\x28\xb5\x2f\xfd": "zstd-compressed",
    b"7z\xbc\xaf\x27\x1c": "a 7z archive",
}
"""What a file that starts with these bytes (its format's magic number) is: no reader of a stored file
decompresses one. JSON Lines text starts with none of them, as a JSON object starts with `{` (or white space)."""


class FileTooLarge(Exception):
    """An upload past the server's limit; the route's refusal names the limit and what to do
    (`routes.files.upload_too_large`)."""


class FilePacked(Exception):
    """The file is compressed (`PACKED`), where the store keeps JSON Lines text."""


class FileStorage:
    def __init__(self, root: Path):
        self.folder = Path(root) / "files"
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, row: StoredFile) -> Path:
        named = self.folder / f"{row.id}{SUFFIXES[row.purpose]}"
        # Files stored before the name kept the kind have none; they stay where they are.
        bare = self.folder / row.id
        return bare if not named.exists() and bare.exists() else named

    def save(self, source: BinaryIO, *, owner: str, filename: str, purpose: str, max_bytes: int) -> StoredFile:
        """Copy `source` into the store; raises `FileTooLarge` past `max_bytes`, and `FilePacked` for a compressed
        file (nothing is left behind)."""
        row = StoredFile(
            id=new_id("file-"),
            owner=owner,
            filename=Path(filename).name,
            purpose=purpose,
            bytes=0,
            created_at=now(),
        )
        with atomic_file(self.path(row), "wb") as out:
            while chunk := source.read(CHUNK_BYTES):
                if not row.bytes and (packed := _packed(chunk)) is not None:
                    raise FilePacked(f"'{row.filename}' is {packed}; upload the JSON Lines text itself, decompressed.")
                row.bytes += len(chunk)
                if row.bytes > max_bytes:
                    raise FileTooLarge
                out.write(chunk)
        return row

    def save_results(self, records: Iterable[dict], *, owner: str) -> StoredFile:
        """A job's metrics as OpenAI's `step_metrics.csv` (purpose `fine-tune-results`)."""
        text = io.StringIO()
        records = list(records)
        rewarded = any("reward" in record for record in records)
        writer = csv.DictWriter(text, RESULT_COLUMNS + REWARD_COLUMNS * rewarded, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
        return self.save(
            io.BytesIO(text.getvalue().encode()),
            owner=owner,
            filename="step_metrics.csv",
            purpose="fine-tune-results",
            max_bytes=1 << 40,
        )

    def delete(self, row: StoredFile) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(row))


def _packed(head: bytes) -> str | None:
    """What compressed file `head` starts (`PACKED`); None for any other."""
    return next((what for magic, what in PACKED.items() if head.startswith(magic)), None)
