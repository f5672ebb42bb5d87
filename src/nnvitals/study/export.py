"""The flashcards outside the terminal: an Anki deck (genanki) and printable cards (fpdf2).

Both are written to a temporary file beside the target and renamed over it, so a failed export never
leaves a half-written file. Anki ids are fixed and note GUIDs come from the stable card ids, so
importing an updated deck updates the notes already in a collection instead of adding duplicates.
"""

from __future__ import annotations

import html
import importlib.util
import itertools
import os
import sqlite3
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import cast

from nnvitals.study.material import Flashcard, Lesson, packaged

# Fixed for good (Anki recognises a deck and a note type by id): never change them.
ANKI_DECK_ID = 1_783_514_296
ANKI_MODEL_ID = 1_462_901_837
_GUID_PREFIX = "nnvitals-study:"

_ANKI_CSS = """.card { font-family: sans-serif; font-size: 22px; line-height: 1.4; text-align: left;
  color: #1d1d1f; background: #fff; max-width: 40em; margin: 0 auto; }
hr#answer { margin: 1em 0; }"""


class ExportError(Exception):
    """The export cannot be written where it was asked to go."""


def note_guid(card: Flashcard) -> str:
    """The Anki note GUID of a card: derived from its stable id, never from its wording."""
    import genanki

    return str(genanki.guid_for(_GUID_PREFIX + card.id))


def _atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    target = Path(path)
    if target.is_dir():
        raise ExportError(f"cannot write {target}: it is a folder; give a file name")
    folder = target.parent
    if not folder.is_dir():
        raise ExportError(f"cannot write {target}: the folder {folder} does not exist")
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".part")
    except OSError as e:
        raise ExportError(f"cannot write {target}: {e.strerror or e}") from None
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give it an ordinary file's mode
        os.replace(tmp, target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"cannot write {target}: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def write_anki(path: str | os.PathLike[str], lesson: Lesson | None = None) -> Path:
    """Write the flashcards as an Anki package (.apkg): one note per card, text HTML-escaped."""
    import genanki

    lesson = lesson or packaged()
    model = genanki.Model(
        ANKI_MODEL_ID,
        "nnvitals flashcard",
        fields=[{"name": "Question"}, {"name": "Answer"}, {"name": "Card id"}],
        templates=[{
            "name": "Question first",
            "qfmt": "{{Question}}",
            "afmt": '{{FrontSide}}<hr id="answer">{{Answer}}',
        }],
        css=_ANKI_CSS,
    )
    deck = genanki.Deck(ANKI_DECK_ID, f"nnvitals::{lesson.title}",
                        description=html.escape(lesson.flashcards_intro))
    for card in lesson.cards:
        deck.add_note(genanki.Note(
            model=model,
            fields=[html.escape(card.question), html.escape(card.answer), card.id],
            guid=note_guid(card),
            tags=["nnvitals"],
        ))

    def write(tmp: Path) -> None:
        # genanki's own write_to_file leaves its scratch database in the system temp folder; build the
        # collection in a folder that is cleaned up, then zip it the way Anki expects.
        with tempfile.TemporaryDirectory(prefix="nnvitals-anki-") as scratch:
            db = Path(scratch) / "collection.anki2"
            conn = sqlite3.connect(db)
            try:
                now = time.time()
                genanki.Package(deck).write_to_db(conn.cursor(), now, itertools.count(int(now * 1000)))
                conn.commit()
            finally:
                conn.close()
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
                z.write(db, "collection.anki2")
                z.writestr("media", "{}")

    return _atomic_write(path, write)


def _font_files() -> tuple[Path, Path]:
    """DejaVu Sans (regular, bold) as shipped inside matplotlib: full Unicode, nothing to install."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is not None and spec.submodule_search_locations:
        folder = Path(list(spec.submodule_search_locations)[0]) / "mpl-data" / "fonts" / "ttf"
        regular, bold = folder / "DejaVuSans.ttf", folder / "DejaVuSans-Bold.ttf"
        if regular.is_file() and bold.is_file():
            return regular, bold
    raise ExportError("the DejaVu Sans font that ships with matplotlib was not found; reinstall nnvitals")


# A5 landscape: the size of a large index card, and two fit on a sheet of A4.
_PAGE = (148.0, 210.0)  # A5 in mm, given as numbers: fpdf2 2.8 warns about its "A5" name
_MARGIN = 14.0  # mm
# Type sizes to try, largest first; a card takes the largest that fits its page.
_QUESTION_PT = (20, 18, 16, 14)
_ANSWER_PT = (15, 14, 13, 12, 11)
# With a page to each side there is room for bigger type.
_FRONT_PT = (26, 24, 22, 20, 18)
_BACK_PT = (19, 18, 17, 16, 15, 14)


def write_pdf(path: str | os.PathLike[str], lesson: Lesson | None = None, fronts_backs: bool = False) -> Path:
    """One card per page, question above answer; or, with `fronts_backs`, questions and answers on
    alternate pages so that a double-sided print puts each answer on the back of its question."""
    from fpdf import FPDF

    lesson = lesson or packaged()
    regular, bold = _font_files()
    pdf = FPDF(orientation="landscape", unit="mm", format=_PAGE)
    pdf.set_auto_page_break(False)  # every card must fit its page: the type shrinks instead
    pdf.set_margins(_MARGIN, _MARGIN, _MARGIN)
    pdf.add_font("DejaVu", "", str(regular))
    pdf.add_font("DejaVu", "B", str(bold))
    pdf.set_title(f"nnvitals flashcards: {lesson.title}")
    pdf.set_author("nnvitals")
    pdf.set_creator("nnvitals study print")
    pdf.set_lang("en")
    width = pdf.w - 2 * _MARGIN
    bottom = pdf.h - _MARGIN - 6  # room for the footer line

    def header(card: Flashcard, number: int, side: str) -> None:
        pdf.add_page()
        pdf.set_font("DejaVu", "", 8)
        pdf.set_text_color(110)
        pdf.cell(width, 4, f"nnvitals · {lesson.title} · card {number} of {len(lesson.cards)}{side}")
        pdf.set_xy(_MARGIN, pdf.h - _MARGIN - 3)
        pdf.cell(width, 4, card.id, align="R")
        pdf.set_xy(_MARGIN, _MARGIN + 9)
        pdf.set_text_color(0)

    def label(text: str) -> None:
        pdf.set_font("DejaVu", "B", 9)
        pdf.set_text_color(110)
        pdf.cell(width, 5, text.upper(), new_x="LMARGIN", new_y="NEXT")
        pdf.set_text_color(0)

    def block(text: str, style: str, sizes: tuple[int, ...], room: float) -> None:
        for size in sizes:
            pdf.set_font("DejaVu", style, size)
            line = size * 0.3528 * 1.35  # points to mm, with comfortable leading
            lines = cast(list[str], pdf.multi_cell(width, line, text, dry_run=True, output="LINES"))
            if len(lines) * line <= room or size == sizes[-1]:
                break
        pdf.multi_cell(width, line, text, align="L", new_x="LMARGIN", new_y="NEXT")

    for number, card in enumerate(lesson.cards, 1):
        if fronts_backs:
            header(card, number, " · front")
            label("Question")
            block(card.question, "B", _FRONT_PT, bottom - pdf.get_y())
            header(card, number, " · back")
            label("Answer")
            block(card.answer, "", _BACK_PT, bottom - pdf.get_y())
        else:
            header(card, number, "")
            label("Question")
            block(card.question, "B", _QUESTION_PT, (bottom - pdf.get_y()) * 0.4)
            pdf.ln(3)
            y = pdf.get_y()
            pdf.set_draw_color(190)
            pdf.line(_MARGIN, y, _MARGIN + width, y)
            pdf.ln(4)
            label("Answer")
            block(card.answer, "", _ANSWER_PT, bottom - pdf.get_y())

    return _atomic_write(path, lambda tmp: pdf.output(str(tmp)))
