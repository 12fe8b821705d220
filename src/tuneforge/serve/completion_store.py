"""Stored chat completions: what a request with `store: true` asked and got, kept per API key.

Each row holds the prompt's messages as they were sent (role, content, name, tool calls), its tools, a
fine-tune's recorded system prompt (its chat template adds it to a conversation without one), the whole
`chat.completion` answer (reply, model, usage, created time) and the request's `metadata`. The
database is `tuneforge.database`'s: SQLite by default (`tuneforge serve`: a file under
$TUNEFORGE_HOME/serve; `tuneforge api`: its job store's database), PostgreSQL by URL. Every query
takes the owner (the key's hash), so one key never sees another's. `Retention` bounds the store by
age and by count (all keys together, oldest first); it is enforced when the store opens and
whenever a completion is stored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import JSON, BigInteger, Engine, String, Text, delete, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ..database import JSON_COLUMNS, Page, Tables, connect, database_url, opening, where_metadata
from ..errors import ConfigError
from ..fsio import tuneforge_home

SECONDS_A_DAY = 86400


def default_store() -> str:
    """Where `tuneforge serve` keeps stored completions unless told (`--store`)."""
    return str(tuneforge_home() / "serve" / "completions.db")


class Base(DeclarativeBase):
    type_annotation_map = JSON_COLUMNS


class StoredCompletion(Base):
    __tablename__ = "stored_chat_completions"
    seq: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    model: Mapped[str] = mapped_column(String(1300), index=True)
    created: Mapped[int] = mapped_column(BigInteger, index=True)
    messages: Mapped[list]  # the prompt as sent: [{"role", "content", "name"?}, ...], content a string or text parts
    response: Mapped[dict]  # the `chat.completion` object as it was answered
    metadata_: Mapped[dict | None] = mapped_column("metadata", JSON)
    tools: Mapped[list | None] = mapped_column(JSON)  # the request's tools, as sent (None: it gave none)
    # The system prompt a fine-tune recorded in its chat template (`models.system_prompt`), which the template adds
    # to a conversation that brings none, as it answered; None: the model has none recorded (a base template's own
    # default, as SmolLM2's, is not read out of its Jinja).
    system_prompt: Mapped[str | None] = mapped_column(Text)

    @property
    def reply(self) -> dict:
        return self.response["choices"][0]

    def to_api(self) -> dict:
        return {**self.response, "metadata": self.metadata_ or {}}

    def messages_to_api(self) -> list[dict]:
        """The prompt's messages as OpenAI lists them: content sent as parts comes back as `content_parts`, a
        call's null content (not stored) as null, and a message's tool calls and the call a result answers."""
        listed = []
        for i, message in enumerate(self.messages):
            content = message.get("content")
            listed.append(
                {
                    "id": f"{self.id}-{i}",
                    "role": message["role"],
                    "content": content if isinstance(content, str) else None,
                    "content_parts": content if isinstance(content, list) else None,
                    "name": message.get("name"),
                    **{key: message[key] for key in ("tool_calls", "tool_call_id") if key in message},
                }
            )
        return listed


@dataclass(frozen=True)
class Retention:
    """How long and how many completions the store keeps; None is no bound."""

    max_age_days: float | None = None
    max_count: int | None = None

    def __post_init__(self):
        if self.max_age_days is not None and not self.max_age_days > 0:  # NaN too: no completion is older than it
            raise ConfigError(f"--store-max-age-days must be above 0, got {self.max_age_days}", code="invalid_value")
        if self.max_count is not None and self.max_count < 1:
            raise ConfigError(f"--store-max-count must be at least 1, got {self.max_count}", code="invalid_value")


class CompletionStore(Tables):
    def __init__(self, engine: Engine, retention: Retention = Retention()):
        super().__init__(engine, Base)
        # A store made before completions kept their request's tools gets the column (empty for its rows).
        self.add_missing_columns(StoredCompletion.__tablename__, {"tools": "JSON", "system_prompt": "TEXT"})
        self.retention = retention
        self.prune()

    @classmethod
    def open(cls, spec: str, retention: Retention = Retention()) -> CompletionStore:
        """The store at `spec`, a file path or a database URL (the `--store` option)."""
        url = database_url(spec)
        with opening(url, "--store"):
            return cls(connect(url), retention)

    def save(
        self,
        owner: str,
        messages: list[dict],
        response: dict,
        metadata: dict | None,
        tools: list[dict] | None = None,
        system_prompt: str | None = None,
    ) -> None:
        row = StoredCompletion(
            id=response["id"],
            owner=owner,
            model=response["model"],
            created=response["created"],
            messages=messages,
            response=response,
            metadata_=metadata,
            tools=tools,
            system_prompt=system_prompt,
        )
        self.add(row)
        self.prune()

    def get(self, owner: str, completion_id: str) -> StoredCompletion | None:
        with self.session() as session:
            return session.scalar(self._own(owner, completion_id))

    def update_metadata(self, owner: str, completion_id: str, metadata: dict | None) -> StoredCompletion | None:
        """Replace the completion's metadata whole and return the completion; None where the owner has none by
        that id."""
        with self.session() as session:
            row = session.scalar(self._own(owner, completion_id))
            if row is not None:
                row.metadata_ = metadata
            return row

    def list_completions(
        self,
        owner: str,
        *,
        model: str | None,
        metadata: dict[str, str],
        after: str | None,
        limit: int,
        newest_first: bool,
    ) -> Page:
        return self.page(StoredCompletion, self._matching(model, metadata, owner), after, limit, newest_first)

    def all_matching(self, model: str | None, metadata: dict[str, str], owner: str | None = None) -> list:
        """Every completion that matches, oldest first: of one owner, or of all of them."""
        with self.session() as session:
            return list(session.scalars(self._matching(model, metadata, owner).order_by(StoredCompletion.seq)))

    def models_and_metadata(self, owner: str | None = None) -> list[tuple[str, dict | None]]:
        """The model and metadata of every completion: of one owner, or of all of them."""
        query = select(StoredCompletion.model, StoredCompletion.metadata_)
        if owner is not None:
            query = query.where(StoredCompletion.owner == owner)
        with self.session() as session:
            return [tuple(row) for row in session.execute(query)]

    def delete_completion(self, owner: str, completion_id: str) -> bool:
        query = delete(StoredCompletion).where(StoredCompletion.id == completion_id, StoredCompletion.owner == owner)
        with self.session() as session:
            return session.execute(query).rowcount == 1

    def prune(self) -> None:
        """Delete what the retention no longer keeps: completions past the age, then the oldest beyond the count."""
        with self.session() as session:
            if self.retention.max_age_days is not None:
                oldest_kept = time.time() - self.retention.max_age_days * SECONDS_A_DAY
                session.execute(delete(StoredCompletion).where(StoredCompletion.created < oldest_kept))
            if self.retention.max_count is not None:
                newest_dropped = (
                    select(StoredCompletion.seq)
                    .order_by(StoredCompletion.seq.desc())
                    .offset(self.retention.max_count)
                    .limit(1)
                    .scalar_subquery()
                )
                session.execute(delete(StoredCompletion).where(StoredCompletion.seq <= newest_dropped))

    @staticmethod
    def _own(owner: str, completion_id: str):
        return select(StoredCompletion).where(StoredCompletion.id == completion_id, StoredCompletion.owner == owner)

    @staticmethod
    def _matching(model: str | None, metadata: dict[str, str], owner: str | None):
        query = where_metadata(select(StoredCompletion), StoredCompletion.metadata_, metadata)
        if owner is not None:
            query = query.where(StoredCompletion.owner == owner)
        if model is not None:
            query = query.where(StoredCompletion.model == model)
        return query
