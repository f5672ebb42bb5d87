import dataclasses
import re
import sqlite3
import zipfile
from pathlib import Path

import pytest
from pypdf import PdfReader

from nnvitals.study import export, material


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _notes(apkg: Path, tmp_path: Path) -> list[tuple[str, str]]:
    with zipfile.ZipFile(apkg) as z:
        assert "collection.anki2" in z.namelist()
        z.extract("collection.anki2", tmp_path / apkg.stem)
    with sqlite3.connect(tmp_path / apkg.stem / "collection.anki2") as conn:
        return conn.execute("SELECT guid, flds FROM notes ORDER BY id").fetchall()


def test_the_pdf_has_one_page_per_card_with_its_question_and_answer_as_text(tmp_path: Path):
    lesson = material.load()
    out = export.write_pdf(tmp_path / "cards.pdf", lesson)
    pages = PdfReader(out).pages
    assert len(pages) == 8
    for page, card in zip(pages, lesson.cards, strict=True):
        text = _flat(page.extract_text())
        assert _flat(card.question) in text
        assert _flat(card.answer) in text
        assert text.index(_flat(card.question)) < text.index(_flat(card.answer))


def test_fronts_and_backs_alternate_for_double_sided_printing(tmp_path: Path):
    lesson = material.load()
    pages = PdfReader(export.write_pdf(tmp_path / "duplex.pdf", lesson, fronts_backs=True)).pages
    assert len(pages) == 16
    for i, card in enumerate(lesson.cards):
        front, back = _flat(pages[2 * i].extract_text()), _flat(pages[2 * i + 1].extract_text())
        assert _flat(card.question) in front and _flat(card.answer) not in front
        assert _flat(card.answer) in back


def test_the_anki_package_holds_eight_notes_keyed_by_the_stable_ids(tmp_path: Path):
    lesson = material.load()
    notes = _notes(export.write_anki(tmp_path / "first.apkg", lesson), tmp_path)
    assert len(notes) == 8
    guids = [g for g, _ in notes]
    assert guids == [export.note_guid(c) for c in lesson.cards]
    assert [f.split("\x1f")[2] for _, f in notes] == lesson.card_ids

    reworded = dataclasses.replace(lesson, cards=tuple(
        dataclasses.replace(c, question="Reworded: " + c.question) if c.id == "card-llm" else c
        for c in lesson.cards))
    again = _notes(export.write_anki(tmp_path / "second.apkg", reworded), tmp_path)
    assert [g for g, _ in again] == guids  # re-importing updates the notes instead of duplicating them
    assert again[-1][1].startswith("Reworded: ")


def test_card_text_is_html_escaped_for_anki(tmp_path: Path):
    lesson = material.load()
    tricky = dataclasses.replace(lesson.cards[0], question="Is <b>x</b> & y > z?")
    notes = _notes(export.write_anki(tmp_path / "deck.apkg", dataclasses.replace(lesson, cards=(tricky,))),
                   tmp_path)
    assert notes[0][1].split("\x1f")[0] == "Is &lt;b&gt;x&lt;/b&gt; &amp; y &gt; z?"


def test_a_failed_export_leaves_no_file_and_keeps_the_old_one(tmp_path: Path, monkeypatch):
    with pytest.raises(export.ExportError, match="does not exist"):
        export.write_pdf(tmp_path / "missing" / "cards.pdf")
    assert not (tmp_path / "missing").exists()

    target = tmp_path / "cards.pdf"
    target.write_bytes(b"the previous export")

    def fail(self, name=""):
        Path(name).write_bytes(b"%PDF-1.4 half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("fpdf.FPDF.output", fail)
    with pytest.raises(export.ExportError, match="No space left"):
        export.write_pdf(target)
    assert target.read_bytes() == b"the previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["cards.pdf"]
