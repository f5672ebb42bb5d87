"""Spaced repetition of the flashcards: FSRS schedules kept in one SQLite file.

Every grade is one `BEGIN IMMEDIATE` transaction that reads the card's state, asks FSRS for the next one
and writes it together with a review row holding the state before, so:
- a process killed mid-session loses nothing already graded (WAL, synchronous commits);
- two processes reviewing at once serialise on the write lock (busy timeout) instead of overwriting;
- `undo_last` restores exactly the state the grade replaced.
Cards are keyed by their stable ids from the lesson file, so rewording a card keeps its schedule.

A file is only used if it is empty or carries our `PRAGMA application_id`; anything else (another
program's database, a corrupt file, a file that is not SQLite) is refused before anything is written.
Every function takes a path or an open connection (from `open_store`), so the web page can share them.
"""

from __future__ import annotations

import os
import sqlite3
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import fsrs

from nnvitals.study import material

APPLICATION_ID = 0x6E6E7673  # "nnvs" in ASCII: marks the file as an nnvitals study database
SCHEMA_VERSION = 1
ENV_VAR = "NNVITALS_DB"
FILE_NAME = "study.sqlite3"
# How long a grade waits for another process's transaction before giving up.
BUSY_TIMEOUT_S = 10.0

RATINGS: dict[int, str] = {r.value: r.name for r in fsrs.Rating}  # 1 Again, 2 Hard, 3 Good, 4 Easy
_STATES = {fsrs.State.Learning: "learning", fsrs.State.Review: "review", fsrs.State.Relearning: "relearning"}

_SCHEMA = (
    """CREATE TABLE card_state (
        card_id    TEXT PRIMARY KEY,   -- the stable id from lesson.toml
        fsrs       TEXT NOT NULL,      -- fsrs.Card as JSON
        updated_at TEXT NOT NULL
    )""",
    """CREATE TABLE review (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        card_id     TEXT NOT NULL,
        rating      INTEGER NOT NULL CHECK (rating BETWEEN 1 AND 4),
        reviewed_at TEXT NOT NULL,
        before      TEXT,              -- fsrs.Card JSON before this grade, NULL when the card was new
        after       TEXT NOT NULL
    )""",
    "CREATE INDEX review_by_card ON review (card_id, id)",
)

DB = str | os.PathLike[str] | sqlite3.Connection

_scheduler = fsrs.Scheduler()


class StoreError(Exception):
    """The database cannot be used: unreadable, foreign, corrupt, newer, or locked too long."""


@dataclass(frozen=True)
class Review:
    """One recorded grade."""

    id: int
    card_id: str
    rating: int
    reviewed_at: datetime
    due: datetime  # when the card comes back after this grade
    state: str  # learning | review | relearning after this grade

    @property
    def rating_name(self) -> str:
        return RATINGS[self.rating]


@dataclass(frozen=True)
class CardSchedule:
    card_id: str
    state: str  # new | learning | review | relearning
    due: datetime | None  # None while new
    stability: float | None
    difficulty: float | None
    reviews: int
    lapses: int  # times graded Again
    last_review: datetime | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "card_id": self.card_id,
            "state": self.state,
            "due": self.due.isoformat() if self.due else None,
            "stability_days": self.stability,
            "difficulty": self.difficulty,
            "reviews": self.reviews,
            "lapses": self.lapses,
            "last_review": self.last_review.isoformat() if self.last_review else None,
        }


@dataclass(frozen=True)
class Stats:
    cards: int
    new: int
    learning: int
    review: int
    relearning: int
    due_now: int
    due_within_day: int
    reviews: int
    reviews_last_day: int
    again_share: float | None  # share of all grades that were Again
    next_due: datetime | None
    schedules: tuple[CardSchedule, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "cards": self.cards,
            "new": self.new,
            "learning": self.learning,
            "review": self.review,
            "relearning": self.relearning,
            "due_now": self.due_now,
            "due_within_day": self.due_within_day,
            "reviews": self.reviews,
            "reviews_last_day": self.reviews_last_day,
            "again_share": self.again_share,
            "next_due": self.next_due.isoformat() if self.next_due else None,
            "schedules": [s.to_dict() for s in self.schedules],
        }


def default_path(environ: Mapping[str, str] | None = None) -> Path:
    """$NNVITALS_DB, else $XDG_DATA_HOME/nnvitals/study.sqlite3, else ~/.local/share/nnvitals/…"""
    env = os.environ if environ is None else environ
    explicit = env.get(ENV_VAR)
    if explicit:
        return Path(explicit).expanduser()
    xdg = env.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "share"
    return base / "nnvitals" / FILE_NAME


def open_store(path: str | os.PathLike[str], create: bool = True) -> sqlite3.Connection:
    """Open (and, if the file is new or empty, initialise) a study database; refuse any other file."""
    p = Path(path)
    if p.exists() and not p.is_file():
        raise StoreError(f"{p} is not a file; give a file path with --db or ${ENV_VAR}")
    if not p.exists():
        if not create:
            raise StoreError(f"{p} does not exist")
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the folder {p.parent}: {e.strerror or e}") from None
    try:
        conn = sqlite3.connect(p, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    except sqlite3.Error as e:
        raise StoreError(f"cannot open {p}: {e}") from None
    try:
        _check_or_initialise(conn, p)
    except BaseException:
        conn.close()
        raise
    return conn


def _refusal(p: Path, e: sqlite3.Error) -> StoreError:
    text = str(e)
    untouched = f"it was left untouched; move it aside or choose another file with --db or ${ENV_VAR}"
    if "not a database" in text:
        return StoreError(f"{p} is not an SQLite database, so not an nnvitals study database; {untouched}")
    if "malformed" in text or "corrupt" in text:
        return StoreError(f"{p} is a corrupt SQLite database ({text}); {untouched}")
    return StoreError(f"cannot use {p}: {text}")


def _check_or_initialise(conn: sqlite3.Connection, p: Path) -> None:
    try:
        app_id, version, objects = _header(conn)
        if (app_id, version, objects) == (0, 0, 0):
            with _transaction(conn):
                # re-read under the write lock: another process may have initialised it meanwhile
                app_id, version, objects = _header(conn)
                if (app_id, version, objects) == (0, 0, 0):
                    for statement in _SCHEMA:  # executescript would commit the transaction
                        conn.execute(statement)
                    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                    app_id, version = APPLICATION_ID, SCHEMA_VERSION
        if app_id != APPLICATION_ID:
            raise StoreError(
                f"{p} is an SQLite database of another program (application_id {app_id:#x}, "
                f"{objects} schema objects), not an nnvitals study database; it was left untouched; "
                f"choose another file with --db or ${ENV_VAR}"
            )
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{p} was written by a newer nnvitals (schema {version}, this one reads {SCHEMA_VERSION}); "
                "upgrade nnvitals to use it"
            )
        if version < 1:
            raise StoreError(f"{p} is marked as nnvitals but has no schema version; it was left untouched")
        problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise StoreError(
                f"{p} is a corrupt SQLite database ({problems[0]}); it was left untouched; move it "
                f"aside or choose another file with --db or ${ENV_VAR}"
            )
    except sqlite3.Error as e:
        raise _refusal(p, e) from None
    # Write-ahead logging (persistent, so a no-op once set): readers never block the writer and a
    # killed process leaves committed grades in the log. If another process holds the file right now,
    # rollback journaling with the busy timeout is just as safe, only less concurrent.
    with suppress(sqlite3.OperationalError):
        conn.execute("PRAGMA journal_mode = WAL")


def _header(conn: sqlite3.Connection) -> tuple[int, int, int]:
    # one statement, so one snapshot: read separately, another process could initialise in between
    app_id, version, objects = conn.execute(
        "SELECT (SELECT application_id FROM pragma_application_id), "
        "(SELECT user_version FROM pragma_user_version), (SELECT count(*) FROM sqlite_master)"
    ).fetchone()
    return int(app_id), int(version), int(objects)


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction: take the write lock up front so read-then-write cannot interleave."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


@contextmanager
def _connect(db: DB, create: bool = True) -> Iterator[sqlite3.Connection | None]:
    """Yield a usable connection (None when reading a database that does not exist yet)."""
    if isinstance(db, sqlite3.Connection):
        conn: sqlite3.Connection | None = db
        owned = False
    elif not create and not Path(db).exists():
        conn, owned = None, False
    else:
        conn, owned = open_store(db, create=create), True
    try:
        yield conn
    except sqlite3.Error as e:
        if "locked" in str(e) or "busy" in str(e):
            raise StoreError(
                f"the study database stayed locked by another process for {BUSY_TIMEOUT_S:g} s; try again"
            ) from None
        raise StoreError(f"the study database failed: {e}") from None
    finally:
        if owned and conn is not None:
            conn.close()


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("times must be timezone-aware")
    return now.astimezone(UTC)


def _iso(moment: datetime) -> str:
    # fixed width, so stored times compare correctly as text
    return moment.isoformat(timespec="microseconds")


def _card(text: str, card_id: str) -> fsrs.Card:
    try:
        return fsrs.Card.from_json(text)
    except (ValueError, KeyError, TypeError) as e:
        raise StoreError(f"the stored schedule of {card_id} is unreadable ({e}); "
                         "the database is damaged") from None


def _state(card: fsrs.Card) -> str:
    return _STATES[card.state]


def _ids(card_ids: Sequence[str] | None) -> list[str]:
    return list(card_ids) if card_ids is not None else material.packaged().card_ids


def grade(db: DB, card_id: str, rating: int, now: datetime | None = None) -> Review:
    """Record one grade (1 Again, 2 Hard, 3 Good, 4 Easy) in its own transaction; returns the review."""
    if isinstance(rating, bool) or int(rating) not in RATINGS:
        raise ValueError(f"rating must be 1 (Again), 2 (Hard), 3 (Good) or 4 (Easy), got {rating!r}")
    at = _utc(now)
    with _connect(db) as conn:
        assert conn is not None
        with _transaction(conn):
            row = conn.execute("SELECT fsrs FROM card_state WHERE card_id = ?", (card_id,)).fetchone()
            before = row[0] if row else None
            fsrs_id = zlib.crc32(card_id.encode())  # fsrs wants an integer id: a stable one from ours
            card = _card(before, card_id) if before else fsrs.Card(card_id=fsrs_id, due=at)
            card, _ = _scheduler.review_card(card, fsrs.Rating(int(rating)), review_datetime=at)
            after = card.to_json()
            conn.execute(
                "INSERT INTO card_state (card_id, fsrs, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (card_id) DO UPDATE SET fsrs = excluded.fsrs, updated_at = excluded.updated_at",
                (card_id, after, _iso(at)),
            )
            cur = conn.execute(
                "INSERT INTO review (card_id, rating, reviewed_at, before, after) VALUES (?, ?, ?, ?, ?)",
                (card_id, int(rating), _iso(at), before, after),
            )
            review_id = cur.lastrowid
    assert review_id is not None
    return Review(review_id, card_id, int(rating), at, card.due, _state(card))


def undo_last(db: DB, review_id: int | None = None) -> Review | None:
    """Take back the latest grade (or grade `review_id`), restoring the card's previous schedule.

    Returns the review taken back, or None if there was nothing to undo. A grade can only be taken back
    while it is the latest one of its card, so an undo never erases another session's later grade.
    """
    with _connect(db) as conn:
        assert conn is not None
        with _transaction(conn):
            query = "SELECT id, card_id, rating, reviewed_at, before, after FROM review "
            row = (conn.execute(query + "ORDER BY id DESC LIMIT 1").fetchone() if review_id is None
                   else conn.execute(query + "WHERE id = ?", (review_id,)).fetchone())
            if row is None:
                return None
            rid, card_id, rating, reviewed_at, before, after = row
            latest = conn.execute("SELECT max(id) FROM review WHERE card_id = ?", (card_id,)).fetchone()[0]
            if latest != rid:
                raise StoreError(f"{card_id} has been graded again since (in another session); "
                                 "only its latest grade can be undone")
            if before is None:
                conn.execute("DELETE FROM card_state WHERE card_id = ?", (card_id,))
            else:
                conn.execute("UPDATE card_state SET fsrs = ?, updated_at = ? WHERE card_id = ?",
                             (before, _iso(datetime.now(UTC)), card_id))
            conn.execute("DELETE FROM review WHERE id = ?", (rid,))
    card = _card(after, card_id)
    return Review(rid, card_id, rating, datetime.fromisoformat(reviewed_at), card.due, _state(card))


def schedules(db: DB, card_ids: Sequence[str] | None = None) -> list[CardSchedule]:
    """Each card's schedule, in the order of `card_ids` (the lesson's cards by default)."""
    ids = _ids(card_ids)
    with _connect(db, create=False) as conn:
        states: dict[str, str] = {}
        counts: dict[str, tuple[int, int, str | None]] = {}
        if conn is not None:
            states = dict(conn.execute("SELECT card_id, fsrs FROM card_state").fetchall())
            counts = {
                row[0]: (row[1], row[2], row[3])
                for row in conn.execute(
                    "SELECT card_id, count(*), sum(rating = 1), max(reviewed_at) FROM review GROUP BY card_id"
                )
            }
    result = []
    for card_id in ids:
        reviews, lapses, last = counts.get(card_id, (0, 0, None))
        if card_id not in states:
            result.append(CardSchedule(card_id, "new", None, None, None, reviews, lapses, None))
            continue
        card = _card(states[card_id], card_id)
        result.append(CardSchedule(
            card_id, _state(card), card.due, card.stability, card.difficulty, reviews, lapses,
            datetime.fromisoformat(last) if last else card.last_review,
        ))
    return result


def due_cards(db: DB, card_ids: Sequence[str] | None = None, now: datetime | None = None) -> list[str]:
    """Cards seen before and due by `now`, most overdue first."""
    at = _utc(now)
    due = [s for s in schedules(db, card_ids) if s.due is not None and s.due <= at]
    return [s.card_id for s in sorted(due, key=lambda s: s.due or at)]


def new_cards(db: DB, card_ids: Sequence[str] | None = None) -> list[str]:
    """Cards never graded, in lesson order."""
    return [s.card_id for s in schedules(db, card_ids) if s.state == "new"]


def stats(db: DB, card_ids: Sequence[str] | None = None, now: datetime | None = None) -> Stats:
    """Counts by state, what is due, and how the grades went."""
    at = _utc(now)
    ids = _ids(card_ids)
    rows = schedules(db, ids)
    day_ago = _iso(at - timedelta(days=1))
    with _connect(db, create=False) as conn:
        ratings: list[tuple[int, str]] = []
        if conn is not None:
            marks = ",".join("?" * len(ids))
            ratings = conn.execute(
                f"SELECT rating, reviewed_at FROM review WHERE card_id IN ({marks})", ids
            ).fetchall()
    by_state = {name: sum(1 for s in rows if s.state == name) for name in ("new", "learning", "review",
                                                                            "relearning")}
    dues = [s.due for s in rows if s.due is not None]
    return Stats(
        cards=len(rows),
        new=by_state["new"],
        learning=by_state["learning"],
        review=by_state["review"],
        relearning=by_state["relearning"],
        due_now=sum(1 for d in dues if d <= at),
        due_within_day=sum(1 for d in dues if d <= at + timedelta(days=1)),
        reviews=len(ratings),
        reviews_last_day=sum(1 for _, when in ratings if when >= day_ago),
        again_share=(sum(1 for r, _ in ratings if r == 1) / len(ratings)) if ratings else None,
        next_due=min(dues) if dues else None,
        schedules=tuple(rows),
    )

