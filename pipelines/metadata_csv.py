"""The BIOSCAN-5M metadata CSV, streamed with bounded memory (``validate``'s two passes read it here).

Arrow's CSV streaming reader reads its input ahead without bound on a
background thread; :class:`MetadataStream` reads through a gate that keeps it
a few blocks ahead of the batches taken.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from g2p.data.bioscan import arrow_types, metadata_path

TEXT_COLUMNS = ("processid", "dna_barcode", "coord-lat", "coord-lon", "split", "chunk")
REQUIRED = ("processid", "dna_barcode", "coord-lat", "coord-lon", "split")
ID_COLUMNS = ("processid", "split", "chunk")  # what the first pass reads
_BLOCK = 4 << 20  # CSV bytes per streamed block (what the derive pipeline holds is a few of them)
_AHEAD = 2  # blocks the CSV reader may read beyond those taken


class _Gate(io.RawIOBase):
    """A file Arrow may read at most ``ahead`` bytes beyond what :meth:`advance` has allowed."""

    def __init__(self, source: Path | Any, ahead: int) -> None:
        """``source``: a path, or a binary stream with ``readinto`` (a pyarrow input stream, e.g. from S3)."""
        super().__init__()
        self._f = open(source, "rb") if isinstance(source, (str, Path)) else source
        self._pos, self._allowed = 0, ahead
        self._cond, self._done = threading.Condition(), False

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:  # called from Arrow's IO thread
        with self._cond:
            while self._pos >= self._allowed and not self._done:
                self._cond.wait()
            if self._done:
                return 0
        n = self._f.readinto(b)
        with self._cond:
            self._pos += n
        return n

    def advance(self, nbytes: int) -> None:
        with self._cond:
            self._allowed += nbytes
            self._cond.notify_all()

    def stop(self) -> None:
        """Every read from now on returns end-of-file (a reader waiting at the gate goes on)."""
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def close(self) -> None:
        self.stop()
        self._f.close()
        super().close()


class MetadataStream:
    """The metadata CSV as record batches of about ``_BLOCK`` bytes, read ahead at most ``_AHEAD``
    blocks; the required columns must be there. Use it as a context manager.

    Arrow's CSV streaming reader reads its input ahead without bound on a
    background thread: left open, or consumed slower than it parses (as the
    rules and writers consume it), it buffers the whole file (measured: all
    341 MB of a 400 k-record CSV within 2 s, ``use_threads=False`` too). Here
    it reads through a gate that lets it get ``_AHEAD`` blocks beyond the
    batches taken (15-38 MB allocated on that file)."""

    def __init__(self, root: Path, columns: list[str] | None = None) -> None:
        """``columns``: read only these (types as ``arrow_types`` gives them); default all, text as text."""
        self.path = metadata_path(root)
        self._gate = _Gate(self.path, _AHEAD * _BLOCK)
        convert = pacsv.ConvertOptions(column_types=arrow_types(TEXT_COLUMNS), strings_can_be_null=True) \
            if columns is None else pacsv.ConvertOptions(include_columns=columns, column_types=arrow_types(columns),
                                                        strings_can_be_null=True)
        try:
            self._reader = pacsv.open_csv(self._gate, read_options=pacsv.ReadOptions(block_size=_BLOCK),
                                          convert_options=convert)
        except BaseException:
            self._gate.close()
            raise
        self.schema = self._reader.schema
        missing = [c for c in REQUIRED if c not in self.schema.names] if columns is None else []
        if missing:
            self.close()
            raise ValueError(f"{self.path}: missing column(s) {missing}")

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        for batch in self._reader:
            self._gate.advance(_BLOCK)
            yield batch

    def close(self) -> None:
        self._gate.stop()  # first: the reader's IO thread may be waiting at the gate
        self._reader.close()
        self._gate.close()

    def __enter__(self) -> MetadataStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def metadata_columns(root: Path) -> list[str]:
    """The metadata CSV's column names (the required ones checked)."""
    with MetadataStream(root) as m:
        return list(m.schema.names)


def read_ids(root: Path, names: list[str]) -> pa.Table:
    """The first pass: only ``processid``, ``split`` and ``chunk`` (where present), every record.

    Each block's columns are copied out (``take``): a column the CSV reader
    converts keeps its whole parse block alive, the barcodes included (74 MB
    held for 200 k records' 6 MB of ids)."""
    with MetadataStream(root, [c for c in ID_COLUMNS if c in names]) as stream:
        blocks = [b.take(pa.array(np.arange(b.num_rows))) for b in stream]
        return pa.Table.from_batches(blocks, schema=stream.schema)


def text_csv_batches(open_stream: Any) -> Iterator[pa.RecordBatch]:
    """Any CSV as record batches with every column text (empty = null), read ahead at most ``_AHEAD``
    blocks. ``open_stream()`` opens the file (binary; called twice: the header, then the rows)."""
    import csv

    with open_stream() as f:
        head = f.read(1 << 20)
    first = io.TextIOWrapper(io.BytesIO(head), encoding="utf-8", newline="").readline()
    names = next(csv.reader([first]), [])
    if not names:
        raise ValueError("input: the CSV file has no header line")
    gate = _Gate(open_stream(), _AHEAD * _BLOCK)
    try:
        reader = pacsv.open_csv(gate, read_options=pacsv.ReadOptions(block_size=_BLOCK),
                                convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                                                     strings_can_be_null=True))
        try:
            for batch in reader:
                gate.advance(_BLOCK)
                yield batch
        finally:
            gate.stop()
            reader.close()
    finally:
        gate.close()
