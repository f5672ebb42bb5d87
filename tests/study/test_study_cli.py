"""The study commands run in-process with piped input: plain text, no hanging, one-line errors."""

import json
import sqlite3
import zipfile
from pathlib import Path

import pytest
from pypdf import PdfReader

from nnvitals.study import material, store


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_study_help_shows_the_whole_unit(run_cli):
    code, out, _ = run_cli("study", "--help")
    assert code == 0
    for command in ("practice", "exercise", "review", "stats", "anki", "print"):
        assert f"nnvitals study {command}" in out
    assert "--drill" in out and "NNVITALS_DB" in out and "~/.local/share/nnvitals/" in out
    code, out, _ = run_cli("study", "review", "--help")
    assert "1 Again" in out and "4 Easy" in out and "undo" in out and "--cram" in out


def test_practice_piped_keeps_attempts_for_the_summary(run_cli, piped):
    piped("logits are too big\n1\n\n3\n")  # two questions, then the input ends
    code, out, err = run_cli("study", "practice")
    assert code == 0 and err == ""
    first = material.load().questions[0]
    assert first.prompt in out and first.answer in out
    assert "2 of 5 rated: 1 knew it · 0 partly · 1 not yet" in out
    assert "your attempt: logits are too big" in out
    assert "\x1b[" not in out  # plain text when piped


def test_exercise_piped_accepts_right_and_rejects_wrong_answers(run_cli, piped):
    piped("3.30\n9\n3.91\nlots\n0.5\n7%\n")
    code, out, _ = run_cli("study", "exercise")
    assert code == 0
    assert "right: 3.2958 (you gave 3.3)" in out
    assert "not within ±0.05 of 10.2042 (you gave 9)" in out
    assert "right: 3.9120" in out
    assert "'lots' is not a number" in out
    assert "not within ±0.005 of 0.9640 (you gave 0.5)" in out
    assert "right: 0.0707 (you gave 0.07)" in out
    assert out.count("Worked solution") == 3
    assert "Fix: Shrink the output layer's initial weights" in out
    assert "3 of 5 figures within tolerance." in out
    assert material.load().exercise_closing in out


def test_exercise_with_no_input_ends_cleanly(run_cli, piped):
    piped("")
    code, out, err = run_cli("study", "exercise", "--drill", "3")
    assert code == 0 and err == ""
    assert "0 of 0 figures" in out


@pytest.mark.parametrize("value", ["0", "-2", "many", "101"])
def test_a_bad_drill_count_is_one_error_line(run_cli, value):
    code, out, err = run_cli("study", "exercise", "--drill", value)
    assert code == 2 and out == ""
    assert "--drill" in _one_error_line(err)


def test_review_piped_grades_then_nothing_is_due_until_cram(run_cli, piped, db: Path):
    piped("\n3\n" * 8)
    code, out, _ = run_cli("study", "review")
    assert code == 0
    assert "Review: 0 due, 8 new, 8 cards in all" in out
    assert "8 graded and saved: 8 Good" in out
    piped("")
    code, out, _ = run_cli("study", "review")
    assert code == 0 and "Nothing is due. Next: card-baseline in 10 min" in out
    piped("\n4\nq\n")
    code, out, _ = run_cli("study", "review", "--cram")
    assert "Cram: all 8 cards" in out and "1 graded and saved: 1 Easy" in out
    assert store.stats(db).reviews == 9


def test_stats_reports_without_creating_a_database(run_cli, db: Path):
    code, out, _ = run_cli("study", "stats")
    assert code == 0 and "8 cards: 8 new" in out and "Grades: none yet" in out
    code, out, _ = run_cli("study", "stats", "--json")
    data = json.loads(out)
    assert (data["cards"], data["new"], data["db"]) == (8, 8, str(db))
    assert not db.exists()


def test_a_corrupt_database_is_one_error_line_and_stays_as_it_was(run_cli, piped, tmp_path: Path):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"\x00garbage" * 512)
    piped("\n3\n")
    code, out, err = run_cli("study", "review", "--db", str(bad))
    assert code == 2
    assert "not an SQLite database" in _one_error_line(err)
    assert bad.read_bytes() == b"\x00garbage" * 512
    code, _, err = run_cli("study", "stats", "--db", str(bad))
    assert code == 2 and "left untouched" in _one_error_line(err)


def test_a_foreign_database_named_by_the_environment_is_refused(run_cli, db: Path):
    db.parent.mkdir(parents=True)
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE inventory (item TEXT)")
    code, _, err = run_cli("study", "stats")
    assert code == 2 and "another program" in _one_error_line(err)


def test_anki_and_print_write_complete_files(run_cli, tmp_path: Path):
    code, out, _ = run_cli("study", "anki", "--out", str(tmp_path / "nn.apkg"))
    assert code == 0 and "8 notes" in out
    assert zipfile.ZipFile(tmp_path / "nn.apkg").namelist() == ["collection.anki2", "media"]
    code, out, _ = run_cli("study", "print", "--out", str(tmp_path / "nn.pdf"), "--fronts-backs")
    assert code == 0 and "16 pages" in out
    assert len(PdfReader(tmp_path / "nn.pdf").pages) == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nn.apkg", "nn.pdf"]


@pytest.mark.parametrize(
    "args, complaint",
    [
        (("anki", "--out", "{tmp}/deck.zip"), "ending in .apkg"),
        (("print", "--out", "{tmp}/cards.txt"), "ending in .pdf"),
        (("print", "--out", "{tmp}/no/such/folder/cards.pdf"), "does not exist"),
        (("print", "--out", "{tmp}"), "directory"),
        (("anki",), "--out"),
    ],
)
def test_a_bad_out_path_is_one_error_line_and_writes_nothing(run_cli, tmp_path: Path, args, complaint):
    code, out, err = run_cli("study", *(a.format(tmp=tmp_path) for a in args))
    assert code == 2 and out == ""
    assert complaint in _one_error_line(err)
    assert list(tmp_path.iterdir()) == []
