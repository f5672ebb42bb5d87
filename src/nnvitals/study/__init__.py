"""The lesson material and the ways to learn it: practice, exercise, spaced review, Anki and paper.

material  the lesson file (lesson.toml) and its loader, read by every surface
exercise  diagnosis cases: what to ask, tolerances, worked solutions, fresh drill cases
store     FSRS review schedules in SQLite: due_cards, new_cards, grade, undo_last, stats
export    the flashcards as an Anki deck and as a printable PDF
cli       the `nnvitals study` commands
"""
