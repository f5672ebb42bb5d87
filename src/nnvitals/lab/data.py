"""The lab's data: a list of words, its vocabulary, and the 80/10/10 split into (context, next) pairs.

Where the words come from, in order: `--data PATH`, then `$NNVITALS_DATA`, then the lesson's
`names.txt` if `nnvitals data fetch` has put it in the user cache, then an embedded default that needs
no network: the census first names shipped inside the `names` package on PyPI.

The split follows the lesson exactly, so that on names.txt every number lines up with the notebook's:
shuffle the word list with Python's `random.seed(42)`, cut at int(0.8 N) and int(0.9 N), and turn each
word into one example per character plus one for the end marker, each predicting that character from
the three before it (padded with the marker).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
import random
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

MARKER = "."  # start and end of a word; always symbol 0
BLOCK_SIZE = 3  # characters of context
SPLIT_SEED = 42
SPLIT_CUTS = (0.8, 0.9)

# The lesson's dataset, as published in karpathy/makemore.
NAMES_URL = "https://raw.githubusercontent.com/karpathy/makemore/master/names.txt"
NAMES_SHA256 = "0a30b5557f192f32ab962680889aac5f6fda0f4cecf40a6d0b5694f58ea8cc4d"
NAMES_FILE = "names.txt"
ENV_VAR = "NNVITALS_DATA"


class DataError(ValueError):
    """A dataset the lab cannot use, or cannot get; the message says why and what is accepted."""


@dataclass(frozen=True)
class Words:
    """A word list and where it came from."""

    words: tuple[str, ...]
    source: str  # "file" (--data), "env" ($NNVITALS_DATA), "cache" (data fetch) or "embedded"
    path: Path | None  # None for the embedded default
    sha256: str  # of the file's bytes; of the joined word list for the embedded default
    description: str  # for people: "names.txt from the user cache", ...

    @property
    def is_lesson_data(self) -> bool:
        """True when these are the lesson's names.txt, byte for byte (so its figures apply)."""
        return self.sha256 == NAMES_SHA256


def cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where downloaded data lives: $XDG_CACHE_HOME/nnvitals, else ~/.cache/nnvitals."""
    env = os.environ if env is None else env
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nnvitals"


def parse_words(data: bytes, origin: str) -> tuple[str, ...]:
    """One word per line, any characters except the marker; blank lines are skipped.

    Refuses what cannot be a word list: empty input, binary bytes, text that is not UTF-8, a word that
    contains the marker, and lists too short to split into non-empty training, validation and test parts.
    """
    if not data.strip():
        raise DataError(f"{origin} is empty: the lab needs one word per line")
    if b"\0" in data:
        raise DataError(f"{origin} looks binary (it contains NUL bytes): the lab needs a text file, one word a line")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{origin} is not UTF-8 text (bad byte at offset {e.start}): give one word per line") from None
    words = []
    for number, line in enumerate(text.splitlines(), start=1):
        word = line.strip("\r\n")
        if not word.strip():
            continue
        if MARKER in word:
            raise DataError(
                f"{origin} line {number}: {word[:40]!r} contains {MARKER!r}, which the lab reserves to mark "
                "the start and end of a word; remove it from the words"
            )
        words.append(word)
    n = len(words)
    n1, n2 = (int(cut * n) for cut in SPLIT_CUTS)
    if not 0 < n1 < n2 < n:
        raise DataError(
            f"{origin} has {n} word{'s' if n != 1 else ''}: too few to split 80/10/10 into non-empty training, "
            "validation and test parts; give at least 10 words"
        )
    return tuple(words)


def read_words(path: str | os.PathLike[str], source: str = "file") -> Words:
    """Read a word list from a file (see parse_words for what is accepted)."""
    p = Path(path).expanduser()
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise DataError(f"no such file: {p}") from None
    except IsADirectoryError:
        raise DataError(f"{p} is a directory; give a text file with one word per line") from None
    except OSError as e:
        raise DataError(f"cannot read {p}: {e.strerror or e}") from None
    words = parse_words(data, str(p))
    how = {"file": "given with --data", "env": f"from ${ENV_VAR}", "cache": "from the user cache"}[source]
    return Words(words, source, p, hashlib.sha256(data).hexdigest(), f"{p.name} {how} ({p})")


def embedded_words() -> Words:
    """US census first names from the `names` package: lowercased, letters only, first occurrence kept."""
    folder = importlib.resources.files("names")
    seen: dict[str, None] = {}
    for part in ("dist.female.first", "dist.male.first"):
        for line in (folder / part).read_text(encoding="ascii").splitlines():
            fields = line.split()
            if not fields:
                continue
            word = fields[0].lower()
            if word.isascii() and word.isalpha():
                seen.setdefault(word)
    words = tuple(seen)
    digest = hashlib.sha256("\n".join(words).encode()).hexdigest()
    return Words(words, "embedded", None, digest, "census first names from the 'names' package (embedded default)")


def resolve(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Words:
    """The dataset to use: `path`, else $NNVITALS_DATA, else the fetched names.txt, else the embedded one."""
    env = os.environ if env is None else env
    if path is not None:
        return read_words(path, "file")
    if env.get(ENV_VAR):
        return read_words(env[ENV_VAR], "env")
    cached = cache_dir(env) / NAMES_FILE
    if cached.is_file():
        return read_words(cached, "cache")
    return embedded_words()


def write_atomic(path: Path, data: bytes) -> None:
    """Write through a temporary file in the same folder and rename it: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give it the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fetch(url: str = NAMES_URL, sha256: str = NAMES_SHA256, dest: Path | None = None, timeout: float = 30.0) -> Path:
    """Download the lesson's names.txt into the user cache, check its sha256, and return its path.

    Nothing is written unless the download is complete and its checksum matches.
    """
    dest = cache_dir() / NAMES_FILE if dest is None else dest
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except urllib.error.HTTPError as e:
        raise DataError(f"could not download {url}: the server answered {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise DataError(
            f"could not download {url} ({reason}): this machine looks offline. The lab still runs on its "
            "embedded default, or on any word list with --data PATH"
        ) from None
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise DataError(
            f"the file downloaded from {url} has sha256 {got}, not the expected {sha256}; nothing was written"
        )
    write_atomic(dest, data)
    return dest


@dataclass(frozen=True)
class Vocabulary:
    """The marker (index 0) followed by every character seen in the words, in sorted order."""

    symbols: tuple[str, ...]

    @classmethod
    def from_words(cls, words: Sequence[str]) -> Vocabulary:
        return cls((MARKER, *sorted(set("".join(words)))))

    @property
    def size(self) -> int:
        return len(self.symbols)

    def index(self) -> dict[str, int]:
        return {s: i for i, s in enumerate(self.symbols)}

    def decode(self, indices: Sequence[int]) -> str:
        return "".join(self.symbols[i] for i in indices)


@dataclass(frozen=True)
class Split:
    """Examples of one part of the split: X (n, BLOCK_SIZE) context indices, Y (n,) next-symbol indices."""

    X: torch.Tensor
    Y: torch.Tensor
    words: int

    def __len__(self) -> int:
        return int(self.Y.shape[0])


@dataclass(frozen=True)
class Splits:
    train: Split
    val: Split
    test: Split
    vocab: Vocabulary


def examples(words: Sequence[str], vocab: Vocabulary,
             block_size: int = BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Each character of each word, and the end marker, predicted from the `block_size` symbols before it."""
    index = vocab.index()
    xs: list[list[int]] = []
    ys: list[int] = []
    for word in words:
        context = [0] * block_size
        for ch in (*word, MARKER):
            i = index[ch]
            xs.append(context)
            ys.append(i)
            context = [*context[1:], i]
    X = torch.tensor(xs, dtype=torch.long).reshape(len(xs), block_size)
    return X, torch.tensor(ys, dtype=torch.long)


def split(words: Sequence[str], block_size: int = BLOCK_SIZE, seed: int = SPLIT_SEED) -> Splits:
    """Shuffle with random.seed(seed), cut 80/10/10, and build the examples of each part."""
    vocab = Vocabulary.from_words(words)
    shuffled = list(words)
    random.Random(seed).shuffle(shuffled)
    n1, n2 = (int(cut * len(shuffled)) for cut in SPLIT_CUTS)
    parts = (shuffled[:n1], shuffled[n1:n2], shuffled[n2:])
    train, val, test = (Split(*examples(p, vocab, block_size), words=len(p)) for p in parts)
    return Splits(train, val, test, vocab)
