"""SQL databases for tuneforge's stores: SQLite by default, PostgreSQL by URL.

SQLAlchemy keeps one code path for both. `connect` makes the engine (SQLite waits for another
writer and uses WAL so readers go on meanwhile; PostgreSQL goes through psycopg2, which the serve
extra installs), `opening` turns a database that cannot be opened into an error that says what to
give instead, and `Tables` holds one store's tables: created once even when several servers start
on one fresh database, short transactions, and listings paged the way OpenAI's are.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import JSON, Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DatabaseError, DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from .errors import ConfigError
from .fsio import refused_write

# Several servers may open one PostgreSQL database at once: one changes its tables, the others wait on this lock.
_CREATE_TABLES_LOCK = 2026112808
# PostgreSQL's SQLSTATE for a write its disk has no room for (disk_full).
_POSTGRES_DISK_FULL = "53100"
# The classes of PostgreSQL's SQLSTATEs for a state that passes: a connection lost or refused (08), resources short
# (53: a full disk, too many connections), the server restarting or shutting down (57), a transaction rolled back
# for a conflict with another (40: serialization failure, deadlock).
_POSTGRES_PASSING = ("08", "53", "57", "40")
# A declarative base's `type_annotation_map`: dicts and lists as JSON; on PostgreSQL its `json` type, which keeps a
# `\u0000` escape (a stored prompt may hold a NUL) where `jsonb` refuses it.
JSON_COLUMNS = {dict: JSON, list: JSON}
# The databases a store may be, as SQLAlchemy names their backends.
STORE_BACKENDS = ("sqlite", "postgresql")


class UnknownCursor(LookupError):
    """A listing's `after` names no row of that listing."""

    def __init__(self, after: str):
        super().__init__(after)
        self.after = after


def database_url(spec: str) -> str:
    """`spec` as a database URL: a URL as given, a file path as SQLite's URL for that file."""
    return spec if "://" in spec else f"sqlite:///{Path(spec).expanduser().resolve()}"


def existing_store(spec: str, where: str) -> str:
    """The URL of the store `spec` (`--store`: a path or database URL) that another command made, refused where its
    SQLite file is not there (`where` says where that command keeps it): SQLite would make the file (and `connect`
    its folder), so a typo'd path would be a new, empty store."""
    url = database_url(spec)
    with opening(url, "--store"):
        parsed = make_url(url)
    file = Path(parsed.database) if parsed.get_backend_name() == "sqlite" and parsed.database else None
    if file is not None and not file.is_file():
        found = "a folder, not a store's file" if file.is_dir() else "no such file"
        raise ConfigError(f"--store {spec}: {found}. {where}", code="store_not_found")
    return url


def connect(url: str) -> Engine:
    url = make_url(url)
    if url.get_backend_name() == "postgres":  # libpq's other spelling, which SQLAlchemy refuses, driver and all
        url = url.set(drivername=url.drivername.replace("postgres", "postgresql", 1))
    if url.drivername == "postgresql":
        # SQLAlchemy's default PostgreSQL driver is psycopg 3; the serve extra installs psycopg2.
        url = url.set(drivername="postgresql+psycopg2")
    if url.get_backend_name() not in STORE_BACKENDS:
        # SQLAlchemy would load that database's driver and, where it is missing, name it as the problem.
        raise ArgumentError(
            f"tuneforge's stores are SQLite or PostgreSQL databases, and this URL names {url.get_backend_name()!r}"
        )
    is_sqlite = url.get_backend_name() == "sqlite"
    if is_sqlite and url.database:
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    # SQLite: wait for another writer instead of failing at once.
    engine = create_engine(url, connect_args={"timeout": 30} if is_sqlite else {}, pool_pre_ping=not is_sqlite)
    if is_sqlite:
        event.listen(engine, "connect", _sqlite_pragmas)
    if url.database or not is_sqlite:  # an SQLite database in memory has no file to name
        event.listen(engine, "handle_error", _full_disk_naming(shown_url(url)))
    return engine


def _full_disk_naming(database: str):
    """A full disk as the database reports it, SQLite's "database or disk is full" (SQLITE_FULL) or PostgreSQL's
    disk_full (SQLSTATE 53100), as the OSError of a full disk naming `database` (SQLite's file, PostgreSQL's URL),
    as every other write the disk refuses is told: one line on the command line, a 507 from a server."""

    def handle_error(context) -> OSError | None:
        original = context.original_exception
        if (
            getattr(original, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
            or getattr(original, "pgcode", None) == _POSTGRES_DISK_FULL
        ):
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), database)
        return None

    return handle_error


def may_clear(err: BaseException) -> bool:
    """Whether a store's failure `err` is the database's state of the moment, which clears without anyone changing
    the code or the rows: a write its disk has no room for (`fsio.refused_write`), a connection lost or not made,
    a database busy with another writer, a PostgreSQL state of `_POSTGRES_PASSING`. Any other refusal (a constraint
    the row breaks, a missing table) comes again however often the write is tried."""
    if refused_write(err):
        return True
    if not isinstance(err, DBAPIError):
        return False
    if err.connection_invalidated:
        return True
    original = err.orig
    if (code := getattr(original, "sqlite_errorcode", None)) is not None:
        # The extended code's low byte is its primary code: SQLITE_BUSY_SNAPSHOT (a WAL read made stale by
        # another's commit) and SQLITE_BUSY_RECOVERY are SQLITE_BUSY's, SQLITE_LOCKED_SHAREDCACHE is SQLITE_LOCKED's.
        return (code & 0xFF) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    if (state := getattr(original, "pgcode", None)) is not None:
        return state.startswith(_POSTGRES_PASSING)
    # The driver's own operational error, with no state from a server: the connection's (psycopg2's "could not
    # connect", "server closed the connection").
    return isinstance(err, OperationalError)


def shown_url(url) -> str:
    """A store's URL as a person reads it: an SQLite file as its path (é as é, not %C3%A9), any other
    database as its URL without the password."""
    try:
        url = make_url(url)
    except ArgumentError:
        return str(url)
    if url.get_backend_name() == "sqlite" and url.database:
        return url.database
    return url.render_as_string(hide_password=True)


@contextmanager
def opening(url: str, option: str) -> Iterator[None]:
    """Around opening a store at `url`: a URL or database that does not work becomes a `ConfigError` for `option`."""
    shown = shown_url(url)
    try:
        yield
    except (ArgumentError, DatabaseError) as err:  # DatabaseError: one refused (OperationalError) or not one at all
        raise ConfigError(
            f"{option} {shown}: cannot open the database ({str(err).splitlines()[0]}). Give a file path or a "
            "database URL such as sqlite:////path/file.db or postgresql://user@host/db."
        ) from None
    except ModuleNotFoundError as err:
        raise ConfigError(
            f"{option} {shown}: the database driver is missing ({err.name}); install psycopg2-binary "
            "(part of tuneforge's serve extra)."
        ) from None


class Page(list):
    """One page of a listing; `has_more` says whether another follows."""

    has_more: bool = False


class Tables:
    """The tables of `base` in the database behind `engine`, created if missing, with their indexes; every method
    opens and commits its own short transaction. Listed tables have a `seq` column (their order) and an `id`."""

    def __init__(self, engine: Engine, base: type[DeclarativeBase]):
        self.engine, self.url = engine, engine.url
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        with self._changing_tables() as connection:
            base.metadata.create_all(connection)
            # create_all makes a table's indexes with the table alone: one a later version adds to a table that
            # exists is made here.
            for table in base.metadata.sorted_tables:
                for index in table.indexes:
                    index.create(connection, checkfirst=True)

    def add_missing_columns(self, table: str, columns: dict[str, str]) -> None:
        """The columns (name: SQL type) a table made by an earlier version lacks, added empty for its rows."""
        with self._changing_tables() as connection:
            have = {column["name"] for column in inspect(connection).get_columns(table)}
            exists = "" if self.engine.url.get_backend_name() == "sqlite" else "IF NOT EXISTS "
            for name, sql_type in columns.items():
                if name not in have:
                    connection.execute(text(f"ALTER TABLE {table} ADD COLUMN {exists}{name} {sql_type}"))

    @contextmanager
    def _changing_tables(self) -> Iterator[Connection]:
        """A transaction that alone may look at and change the tables: several processes may open one store at
        once (a fresh one, or one an earlier version made), and each makes what it finds missing."""
        with self.engine.begin() as connection:
            if self.url.get_backend_name() == "sqlite":
                connection.exec_driver_sql("BEGIN IMMEDIATE")  # the write lock, taken before the look
            else:
                connection.execute(text(f"SELECT pg_advisory_xact_lock({_CREATE_TABLES_LOCK})"))
            yield connection

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    def answers(self) -> bool:
        """Whether the database answers a trivial query now (a readiness check: cheap, and it opens a
        connection when the pool holds none)."""
        try:
            with self.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        except SQLAlchemyError:
            return False
        return True

    def add(self, *rows: DeclarativeBase) -> None:
        with self.session() as session:
            session.add_all(rows)

    def page(self, table, query, after: str | None, limit: int, newest_first: bool) -> Page:
        """`query`'s rows after the row whose id is `after`, at most `limit` of them, in `seq` order.

        Raises `UnknownCursor` when `after` is not one of `query`'s rows: an empty page would read as
        the end of the list.
        """
        with self.session() as session:
            if after:
                cursor = session.scalar(query.with_only_columns(table.seq).where(table.id == after))
                if cursor is None:
                    raise UnknownCursor(after)
                query = query.where(table.seq < cursor if newest_first else table.seq > cursor)
            query = query.order_by(table.seq.desc() if newest_first else table.seq).limit(limit + 1)
            rows = list(session.scalars(query))
        page = Page(rows[:limit])
        page.has_more = len(rows) > limit
        return page


def where_metadata(query, column, metadata: dict[str, str]):
    """`query` narrowed to rows whose JSON `column` holds every key of `metadata` with its value."""
    for key, value in metadata.items():
        query = query.where(column[key].as_string() == value)
    return query


def _sqlite_pragmas(connection, _record) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()
