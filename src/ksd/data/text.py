"""Character-level text for language modelling (``dataset=text``).

The corpus is one UTF-8 text file (``dataset.path``; relative paths are taken under ``dataset.root``), or,
with ``path: null``, the built-in corpus: the English reference documentation that every CPython ships in
``pydoc_data.topics`` (about 0.46 MB of prose and code examples, PSF licence), so that a run needs no
download and no file. Which Python wrote it is part of the source line, since the text changes between
Python versions.

The text is cut into consecutive windows of ``L = seq_len`` characters: example ``i`` has inputs ``c[i·L :
i·L + L]`` and targets ``c[i·L + 1 : i·L + L + 1]`` (the next character at every position), as character
indices into the sorted set of characters of the whole corpus. The first 90 % of the windows are the
training set, the last 10 % the test set, so the test text follows the training text and no window straddles
the two; the validation set is carved from the training windows like any other data set's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from .splits import DataError, RawData

TEST_FRACTION = 0.1


def builtin_corpus() -> tuple[str, str]:
    """The text of ``pydoc_data.topics`` in key order, and a description of where it came from."""
    from pydoc_data.topics import topics

    version = ".".join(map(str, sys.version_info[:3]))
    return "".join(topics[key] for key in sorted(topics)), f"Python {version} reference topics (pydoc_data)"


def read_corpus(root: Path, path: str | None) -> tuple[str, str]:
    """The corpus text and its source line; :class:`DataError` for a missing, unreadable or empty file."""
    if path is None:
        return builtin_corpus()
    file = Path(path).expanduser()
    file = file if file.is_absolute() else root / file
    if not file.is_file():
        raise DataError(
            f"text corpus {file} not found: set dataset.path to a UTF-8 text file "
            "(relative paths are under dataset.root), or null for the built-in corpus."
        )
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"text corpus {file} could not be read as UTF-8 text: {error}.") from None
    return text, f"text file {file}"


def read_text(root: Path, *, path: str | None, seq_len: int) -> tuple[RawData, list[str]]:
    """Windows of ``seq_len`` characters and their next characters, and the vocabulary (sorted characters)."""
    if seq_len < 1:
        raise DataError(f"dataset.seq_len must be >= 1, got {seq_len}.")
    text, source = read_corpus(root, path)
    vocabulary = sorted(set(text))
    n_windows = (len(text) - 1) // seq_len
    n_test = int(n_windows * TEST_FRACTION)
    if n_windows - n_test < 2 or n_test < 1:
        raise DataError(
            f"text corpus ({source}) has {len(text)} characters: too short for windows of "
            f"dataset.seq_len={seq_len} (at least {10 * seq_len + 1} characters needed)."
        )
    lookup = {char: index for index, char in enumerate(vocabulary)}
    codes = np.fromiter((lookup[c] for c in text[: n_windows * seq_len + 1]), dtype=np.int64)
    inputs = codes[:-1].reshape(n_windows, seq_len)
    targets = codes[1:].reshape(n_windows, seq_len)
    split = n_windows - n_test
    note = (
        f"text: {len(text):,} characters, {len(vocabulary)} distinct; {n_windows} windows of {seq_len} "
        f"characters, the first {split} for training (and validation), the last {n_test} for test"
    )
    raw = RawData(inputs[:split], targets[:split], inputs[split:], targets[split:], source, [note])
    return raw, vocabulary
