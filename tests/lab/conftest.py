import random
import string

import pytest


def make_words(count: int = 240, seed: int = 0) -> list[str]:
    """Made-up words over a-z (every letter used), so the vocabulary has the lesson's 27 symbols."""
    rng = random.Random(seed)
    words = list(string.ascii_lowercase)  # each letter at least once
    while len(words) < count:
        words.append("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8))))
    rng.shuffle(words)
    return words


@pytest.fixture
def words27() -> list[str]:
    return make_words()


@pytest.fixture
def word_file(tmp_path, words27):
    path = tmp_path / "words.txt"
    path.write_text("\n".join(words27) + "\n")
    return path


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Keep every test away from the user's cache and $NNVITALS_DATA."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("NNVITALS_DATA", raising=False)
