import hashlib
import random
from pathlib import Path

import pytest

from nnvitals.lab import data


def test_vocabulary_is_marker_then_sorted_characters_seen():
    vocab = data.Vocabulary.from_words(["bob", "ané", "zed"])
    assert vocab.symbols == (".", "a", "b", "d", "e", "n", "o", "z", "é")
    assert vocab.size == 9
    assert vocab.decode([2, 6, 2]) == "bob"


def test_examples_predict_each_character_and_the_end_from_three_before():
    vocab = data.Vocabulary.from_words(["emma"])
    X, Y = data.examples(["emma"], vocab)
    rows = [(vocab.decode(x.tolist()), vocab.symbols[y]) for x, y in zip(X, Y, strict=True)]
    assert rows == [("...", "e"), ("..e", "m"), (".em", "m"), ("emm", "a"), ("mma", ".")]


def test_split_follows_random_seed_42_and_the_80_10_10_cuts(words27):
    splits = data.split(words27)
    shuffled = list(words27)
    random.seed(42)
    random.shuffle(shuffled)  # the lesson's own calls
    n1, n2 = int(0.8 * len(shuffled)), int(0.9 * len(shuffled))
    assert (splits.train.words, splits.val.words, splits.test.words) == (n1, n2 - n1, len(shuffled) - n2)
    assert len(splits.train) == sum(len(w) + 1 for w in shuffled[:n1])
    assert len(splits.val) == sum(len(w) + 1 for w in shuffled[n1:n2])
    first = splits.train.Y[: len(shuffled[0]) + 1].tolist()
    assert splits.vocab.decode(first) == shuffled[0] + "."
    assert splits.vocab.size == 27


NAMES_TXT = Path(__file__).resolve().parents[3] / "shared" / "data" / "names.txt"


@pytest.mark.skipif(not NAMES_TXT.is_file(), reason="the lesson's names.txt is not beside the checkout")
def test_lesson_split_sizes_on_names_txt():
    words = data.read_words(NAMES_TXT)
    assert words.is_lesson_data
    splits = data.split(words.words)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (182_625, 22_655, 22_866)


@pytest.mark.parametrize(("content", "expected"), [
    (b"", "is empty"),
    (b"\n  \n", "is empty"),
    (b"anna\x00\x01\x02\nbob\n", "binary"),
    (b"\xff\xfe\xfa\n", "not UTF-8"),
    (b"onlyword\n", "1 word"),
    (b"ann\nbo.b\ncy\n", "line 2"),
])
def test_unusable_files_get_a_clear_error(tmp_path, content, expected):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(data.DataError, match=expected):
        data.read_words(path)


def test_missing_and_unreadable_paths(tmp_path):
    with pytest.raises(data.DataError, match="no such file"):
        data.read_words(tmp_path / "nope.txt")
    with pytest.raises(data.DataError, match="is a directory"):
        data.read_words(tmp_path)


def test_any_characters_but_the_marker_are_words(tmp_path):
    path = tmp_path / "w.txt"
    path.write_text("ça va\r\nnaïve\n\nzoë\nüber\nmañana\nsão\nkøbenhavn\nłódź\nđak\nñu\n")
    words = data.read_words(path)
    assert words.words[:2] == ("ça va", "naïve")
    assert " " in data.Vocabulary.from_words(words.words).symbols
    assert words.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not words.is_lesson_data


def test_embedded_default_is_census_first_names_lowercase_letters_unique():
    words = data.embedded_words()
    assert words.source == "embedded" and words.path is None
    assert len(words.words) > 5000
    assert len(set(words.words)) == len(words.words)
    assert all(w.isascii() and w.isalpha() and w.islower() for w in words.words)
    assert {"mary", "james", "emma"} <= set(words.words)
    assert data.embedded_words().sha256 == words.sha256  # the same list every time


def test_resolution_order(tmp_path, word_file):
    env = {"XDG_CACHE_HOME": str(tmp_path / "c")}
    assert data.resolve(None, env).source == "embedded"
    cached = tmp_path / "c" / "nnvitals" / "names.txt"
    cached.parent.mkdir(parents=True)
    cached.write_text("\n".join(f"w{'a' * i}" for i in range(20)))
    assert data.resolve(None, env).source == "cache"
    env["NNVITALS_DATA"] = str(word_file)
    assert data.resolve(None, env).source == "env"
    assert data.resolve(cached, env).source == "file"


def test_cache_dir_follows_xdg(tmp_path):
    assert data.cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "nnvitals"
    assert data.cache_dir({}).parts[-2:] == (".cache", "nnvitals")


def test_fetch_offline_says_so_and_writes_nothing(tmp_path):
    dest = tmp_path / "names.txt"
    with pytest.raises(data.DataError, match="offline"):
        data.fetch("http://127.0.0.1:9/names.txt", dest=dest, timeout=5)
    assert not dest.exists()


def test_fetch_checks_the_sha256(tmp_path):
    source = tmp_path / "served.txt"
    source.write_text("ann\nbob\n" * 10)
    dest = tmp_path / "cache" / "names.txt"
    with pytest.raises(data.DataError, match="sha256"):
        data.fetch(source.as_uri(), dest=dest)
    assert not dest.exists()
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    assert data.fetch(source.as_uri(), sha256=digest, dest=dest) == dest
    assert dest.read_bytes() == source.read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == ["names.txt"]  # no temporary file left behind


def test_data_fetch_command_offline(run_cli, monkeypatch):
    monkeypatch.setattr(data, "NAMES_URL", "http://127.0.0.1:9/names.txt")
    code, out, err = run_cli("data", "fetch")
    assert code == 2 and out == ""
    assert err.startswith("error: could not download") and "offline" in err and len(err.splitlines()) == 1


def test_data_fetch_command_saves_into_the_cache(run_cli, monkeypatch, tmp_path, word_file):
    digest = hashlib.sha256(word_file.read_bytes()).hexdigest()
    monkeypatch.setattr(data, "NAMES_URL", word_file.as_uri())
    monkeypatch.setattr(data, "NAMES_SHA256", digest)
    code, out, err = run_cli("data", "fetch", "--json")
    assert code == 0, err
    assert '"words": 240' in out
    assert data.resolve().source == "cache"
