import multiprocessing
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from nnvitals.study import material, store

T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)


def test_a_fresh_database_has_eight_new_cards_and_nothing_due(db: Path):
    assert store.new_cards(db) == material.load().card_ids
    assert store.due_cards(db) == []
    assert not db.exists()  # reading does not create the file
    store.grade(db, "card-baseline", 3, now=T0)
    assert db.exists()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA application_id").fetchone()[0] == store.APPLICATION_ID
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.new_cards(db)[0] == "card-huge-start"


def test_a_graded_card_comes_back_when_fsrs_says_so(db: Path):
    review = store.grade(db, "card-baseline", 3, now=T0)  # Good on a new card: next learning step
    assert review.rating_name == "Good" and review.state == "learning"
    assert T0 < review.due < T0 + timedelta(hours=1)
    assert store.due_cards(db, now=T0) == []
    assert store.due_cards(db, now=review.due + timedelta(seconds=1)) == ["card-baseline"]
    again = store.grade(db, "card-huge-start", 1, now=T0)
    assert again.due - T0 < review.due - T0  # Again comes back sooner than Good
    easy = store.grade(db, "card-fan-in", 4, now=T0)
    assert easy.state == "review" and easy.due - T0 >= timedelta(days=1)


def test_undo_restores_the_schedule_the_grade_replaced(db: Path):
    first = store.grade(db, "card-baseline", 3, now=T0)
    store.grade(db, "card-baseline", 4, now=first.due)
    undone = store.undo_last(db)
    assert undone is not None and undone.rating == 4
    (after,) = store.schedules(db, ["card-baseline"])
    assert (after.state, after.due, after.reviews) == ("learning", first.due, 1)
    assert store.undo_last(db, first.id) is not None
    assert store.new_cards(db, ["card-baseline"]) == ["card-baseline"]
    assert store.undo_last(db) is None


def test_undo_never_erases_a_later_grade_of_the_same_card(db: Path):
    mine = store.grade(db, "card-llm", 3, now=T0)
    store.grade(db, "card-llm", 1, now=T0 + timedelta(minutes=5))  # another session, later
    with pytest.raises(store.StoreError, match="only its latest grade"):
        store.undo_last(db, mine.id)
    assert store.stats(db, now=T0).reviews == 2


def test_rewording_a_card_keeps_its_schedule(db: Path, tmp_path: Path):
    store.grade(db, "card-batchnorm", 4, now=T0)
    raw = (Path(material.__file__).parent / "lesson.toml").read_text(encoding="utf-8")
    edited = tmp_path / "lesson.toml"
    edited.write_text(raw.replace("What does batch normalisation do?", "BatchNorm in one sentence?"),
                      encoding="utf-8")
    ids = material.load(edited).card_ids
    (row,) = [s for s in store.schedules(db, ids) if s.card_id == "card-batchnorm"]
    assert (row.state, row.reviews) == ("review", 1)


def test_stats_count_states_due_cards_and_forgetting(db: Path):
    store.grade(db, "card-baseline", 1, now=T0)
    store.grade(db, "card-histogram", 3, now=T0)
    store.grade(db, "card-llm", 4, now=T0)
    s = store.stats(db, now=T0 + timedelta(minutes=2))
    assert (s.cards, s.new, s.learning, s.review) == (8, 5, 2, 1)
    assert s.due_now == 1  # the Again card, after its one-minute step
    assert s.reviews == 3 and s.again_share == pytest.approx(1 / 3)
    assert s.to_dict()["schedules"][0]["card_id"] == "card-baseline"


def test_the_default_location_follows_the_environment(tmp_path: Path):
    assert store.default_path({"NNVITALS_DB": str(tmp_path / "x.db")}) == tmp_path / "x.db"
    assert store.default_path({"XDG_DATA_HOME": str(tmp_path)}) == tmp_path / "nnvitals" / store.FILE_NAME
    assert store.default_path({"XDG_DATA_HOME": "relative"}).parts[-4:] == (".local", "share", "nnvitals",
                                                                              store.FILE_NAME)


def _refuses_untouched(path: Path, match: str) -> None:
    before = path.read_bytes()
    with pytest.raises(store.StoreError, match=match):
        store.grade(path, "card-baseline", 3)
    with pytest.raises(store.StoreError, match=match):
        store.stats(path)
    assert path.read_bytes() == before


def test_a_file_that_is_not_sqlite_is_refused_and_left_alone(tmp_path: Path):
    path = tmp_path / "notes.db"
    path.write_bytes(b"my shopping list, not a database\n" * 200)
    _refuses_untouched(path, "not an SQLite database")


def test_another_programs_database_is_refused_and_left_alone(tmp_path: Path):
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE photos (name TEXT)")
    _refuses_untouched(path, "another program")


def test_a_corrupt_study_database_is_refused_and_left_alone(db: Path):
    store.grade(db, "card-baseline", 3)
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(db.read_bytes())
    page = 4096
    data[page:2 * page] = b"\xff" * page  # wreck the first table page
    db.write_bytes(bytes(data))
    _refuses_untouched(db, "corrupt")


def test_a_database_from_a_newer_nnvitals_is_refused(db: Path):
    store.grade(db, "card-baseline", 3)
    with sqlite3.connect(db) as conn:
        conn.execute(f"PRAGMA user_version = {store.SCHEMA_VERSION + 1}")
    with pytest.raises(store.StoreError, match="newer nnvitals"):
        store.stats(db)


def _review_many(path: str, cards: list[str], start, count: int) -> None:
    start.wait()
    conn = store.open_store(path)
    for i in range(count):
        store.grade(conn, cards[i % len(cards)], 1 + i % 4)
    conn.close()


def test_two_processes_grading_at_once_lose_nothing(db: Path):
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    ids = material.load().card_ids
    workers = [ctx.Process(target=_review_many, args=(str(db), ids, start, 40)) for _ in range(2)]
    for w in workers:
        w.start()
    start.set()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = conn.execute("SELECT card_id, before, after FROM review ORDER BY id").fetchall()
        states = dict(conn.execute("SELECT card_id, fsrs FROM card_state").fetchall())
    assert len(rows) == 80
    # every grade started from the state the previous grade of that card left: no update was lost
    last: dict[str, str | None] = {}
    for card_id, before, after in rows:
        assert before == last.get(card_id)
        last[card_id] = after
    assert last == states
