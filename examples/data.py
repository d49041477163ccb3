"""Reading the examples' inputs and cutting them into splits and batches.

Files: :func:`read_text` (UTF-8 text), :func:`read_csv_columns` (named columns of a CSV) and
:func:`strip_gutenberg`; a problem with a file is a :class:`DataError` naming the file and the
line, row or column. Splits and batches: :func:`tail_split`, :func:`shuffled_split`,
:func:`batch_indices` (seeded, so a resumed run draws the same batches), :func:`encode_padded`
and :func:`fill_batch`.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from examples.flags import ExampleError

__all__ = [
    "DataError",
    "batch_indices",
    "encode_padded",
    "fill_batch",
    "read_csv_columns",
    "read_text",
    "shuffled_split",
    "strip_gutenberg",
    "tail_split",
]

Batch = Mapping[str, np.ndarray]


class DataError(ExampleError, ValueError):
    """An input file the example cannot use; the message names the file and where."""


# -- files -------------------------------------------------------------------------------------


def _decode(path: str | Path) -> str:
    """A whole UTF-8 file as it is, but for a byte-order mark."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read it: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path}: not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {e.start} (line "
            f"{line}); convert it first, e.g. iconv -f cp949 -t utf-8"
        ) from None
    return text


def read_text(path: str | Path) -> str:
    """A UTF-8 file as text, without a byte-order mark and with ``\\n`` line ends
    (Gutenberg files use ``\\r\\n``)."""
    text = _decode(path).replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    return text


def read_csv_columns(path: str | Path, columns: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a CSV file (read with :mod:`csv`, so quoted commas and newlines are fine).

    Header names are compared without surrounding whitespace; values come back with theirs
    stripped. Each row also carries its line number in the file as ``"_line"`` (for messages).
    Raises :class:`DataError` naming the missing columns or the malformed row.
    """
    reader = csv.reader(io.StringIO(_decode(path), newline=""))
    try:
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in columns if c not in header]
        if missing:
            raise DataError(
                f"{path}: no column {', '.join(map(repr, missing))} in the header (line 1: "
                f"{', '.join(header) or 'empty'}); name the columns with the flags"
            )
        where = {c: header.index(c) for c in columns}
        rows = []
        line = reader.line_num
        for raw in reader:
            if any(cell.strip() for cell in raw):  # not a blank line
                row = {c: (raw[i].strip() if i < len(raw) else "") for c, i in where.items()}
                row["_line"] = str(line + 1)
                rows.append(row)
            line = reader.line_num
    except csv.Error as e:
        raise DataError(f"{path}: line {reader.line_num}: not valid CSV: {e}") from None
    return rows


def strip_gutenberg(
    text: str, *, start_marker: str | None = None, end_marker: str | None = None
) -> str:
    """Cuts a Project Gutenberg file down to the book.

    Without markers the book starts after the ``*** START OF ...`` line (and after the
    "Produced by ..." paragraph that often follows it) and ends before ``*** END OF ...`` or
    ``End of the Project Gutenberg`` (whichever comes first). ``start_marker`` / ``end_marker``
    cut at the first line that is exactly that text instead (the start line is kept, the end
    line is not). A text without the markers is returned whole.
    """
    lines = text.split("\n")
    begin, end = 0, len(lines)
    if start_marker is not None:
        begin = _line_index(lines, 0, end, start_marker, "start")
    else:
        for i, line in enumerate(lines):
            if line.startswith("*** START OF") or line.startswith("***START OF"):
                begin = i + 1
                # Skip blank lines and a "Produced by" credit paragraph (Gutenberg's, not the
                # author's).
                while begin < end and not lines[begin].strip():
                    begin += 1
                if begin < end and lines[begin].startswith("Produced by"):
                    while begin < end and lines[begin].strip():
                        begin += 1
                break
    if end_marker is not None:
        end = _line_index(lines, begin, end, end_marker, "end")
    else:
        for i in range(begin, end):
            if lines[i].startswith(("*** END OF", "***END OF", "End of the Project Gutenberg")):
                end = i
                break
    return "\n".join(lines[begin:end]).strip("\n") + "\n"


def _line_index(lines: list[str], begin: int, end: int, marker: str, which: str) -> int:
    for i in range(begin, end):
        if lines[i].strip() == marker:
            return i
    raise DataError(f"--{which}-marker {marker!r} is not a line of the text")


# -- splits and batches ------------------------------------------------------------------------


def tail_split(n: int, val_fraction: float) -> int:
    """Index where the held-out tail of ``n`` items starts (the last ``val_fraction``)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    return n - max(1, round(n * val_fraction))


def shuffled_split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split of ``range(n)`` into (train, validation) index arrays."""
    perm = np.random.default_rng([seed, 0x5EED]).permutation(n)
    cut = tail_split(n, val_fraction)
    return np.sort(perm[:cut]), np.sort(perm[cut:])


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """The examples of batch ``step``: epochs of seeded permutations of ``range(n)``.

    A pure function of its arguments, so a resumed run draws the same batches. A batch that
    would run past the end of an epoch is filled from the next one.
    """
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = _epoch_permutation(n, seed, epoch)
        out.extend(perm[offset : offset + batch_size - len(out)].tolist())
    return np.asarray(out)


@lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


PAD = 0  # the padding id of every vocabulary here


def encode_padded(
    sequences: Sequence[Sequence[int]], max_len: int, *, multiple: int = 8, offset: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads id sequences with ``PAD`` into ``int32 [N, L]`` and returns ``(ids, lengths)``.

    Sequences longer than ``max_len`` are cut. ``L - offset`` is the longest length less
    ``offset`` rounded up to a multiple of ``multiple`` (``L`` at most ``max_len``), so
    batches take few distinct shapes and the jitted step compiles only a few times
    (``offset=1`` for targets that lose one token when split into decoder input and output).
    """
    lengths = np.asarray([min(len(s), max_len) for s in sequences], np.int32)
    longest = max(int(lengths.max(initial=1)) - offset, 1)
    width = min(max_len, -(-longest // multiple) * multiple + offset)
    ids = np.full((len(sequences), width), PAD, np.int32)
    for i, s in enumerate(sequences):
        ids[i, : lengths[i]] = s[: lengths[i]]
    return ids, lengths


def fill_batch(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """Pads a short (last) validation batch to ``batch_size`` rows, so that every batch has one
    shape: filler rows are zeros (padding, weight 0), with length 1 (``*len*`` fields) so that
    no sequence is empty."""
    rows = len(next(iter(batch.values())))
    fill = batch_size - rows
    if fill <= 0:
        return batch
    out = {}
    for k, v in batch.items():
        filler = np.ones if "len" in k else np.zeros
        out[k] = np.concatenate([v, filler((fill, *v.shape[1:]), v.dtype)])
    return out
