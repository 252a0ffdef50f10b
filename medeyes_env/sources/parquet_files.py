"""Reading parquet files from others within stated bounds: text a batch at a time, images one cell at a time.

A parquet file is small on disk and can be huge in memory: compression and dictionary encoding store a
repeated value once. A 1 kB file held 200 image cells of 5 MB in one row group; a 10 kB file one question of
300 MB; a 53 kB file 3,000,000 rows. So every read here starts from the file's metadata and refuses, naming
the file:

- more than :data:`MAX_PARQUET_ROWS` rows;
- a text column over :data:`MAX_TEXT_COLUMN_BYTES`, uncompressed in the metadata, or once expanded (a
  dictionary-encoded column is checked a batch at a time, from its dictionary, before any cell is copied);
- a row group whose image column is over :data:`MAX_IMAGE_GROUP_BYTES` uncompressed (a row group is the
  smallest unit pyarrow reads).

A text cell over :data:`MAX_TEXT_CELL_BYTES` and an image cell over :data:`MAX_IMAGE_CELL_BYTES` are bad rows
(``FILE row N``), which ``skip_bad`` skips. Text and image bytes are read with their dictionaries kept
(``read_dictionary``), so a cell becomes a Python object only once it passed its bound.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from medeyes_env.errors import ImageLoadError, SourceError

MAX_PARQUET_ROWS = 1_000_000
"""Most rows one parquet file may hold (PathVQA's largest export file has about 20,000)."""
MAX_TEXT_COLUMN_BYTES = 64 * 2**20
"""Most bytes of text one column of one file may hold: 64 bytes a row at the row limit."""
MAX_TEXT_CELL_BYTES = 65_536
"""Longest text cell (a question, an answer, MMMU's options); a longer one is a bad row."""
MAX_IMAGE_CELL_BYTES = 64 * 2**20
"""Largest image cell (the encoded PNG or JPEG bytes of one image)."""
MAX_IMAGE_GROUP_BYTES = 256 * 2**20
"""Most bytes one row group's image column may hold uncompressed: it is read whole to take one cell."""
IMAGE_GROUPS_CACHED_BYTES = 256 * 2**20
"""Row groups of images kept for the next image (the most recent one always), in Arrow memory."""
TEXT_BATCH_ROWS = 1024
"""Rows of text read and checked at a time."""


def pyarrow_parquet() -> Any:
    """``pyarrow.parquet``, or a :class:`SourceError` saying how to install it."""
    try:
        import pyarrow.parquet as pq
    except ModuleNotFoundError:
        raise SourceError(
            "reading parquet datasets needs pyarrow: pip install 'medeyes[parquet]' (or pip install pyarrow)"
        ) from None
    return pq


def read_text_columns(
    path: Path, wanted: tuple[str, ...], required: tuple[str, ...]
) -> tuple[list[str], Iterator[tuple[int, dict[str, Any] | SourceError]]]:
    """Every column name of ``path``, and ``(row number, record)`` of its ``wanted`` columns, within bounds.

    ``wanted`` may name one struct field (``image_2.path``: whether an image is there, without its bytes).
    A row with a text cell over :data:`MAX_TEXT_CELL_BYTES` comes as ``(number, SourceError)`` for the
    caller to raise where it handles bad rows; a bound of the file raises :class:`SourceError` at once.
    """
    pq = pyarrow_parquet()
    try:
        handle = pq.ParquetFile(path)
        names = handle.schema_arrow.names
        metadata = handle.metadata
    except (OSError, ValueError) as exc:  # ArrowInvalid (not a parquet file, truncated) is a ValueError
        raise SourceError(f"{path}: not a readable parquet file ({exc})") from None
    missing = [c for c in required if c not in names]
    if missing:
        raise SourceError(f"{path}: missing column(s) {', '.join(missing)}; it has {', '.join(names)}")
    if metadata.num_rows > MAX_PARQUET_ROWS:
        raise SourceError(
            f"{path}: {metadata.num_rows:,} rows, above the {MAX_PARQUET_ROWS:,}-row limit of a parquet file; split it"
        )
    columns = [c for c in wanted if c.partition(".")[0] in names]
    for column in columns:
        size = sum(_uncompressed(metadata, group, column) for group in range(metadata.num_row_groups))
        if size > MAX_TEXT_COLUMN_BYTES:
            raise SourceError(
                f"{path}: column {column!r} holds {size:,} bytes of text uncompressed, above the "
                f"{MAX_TEXT_COLUMN_BYTES:,}-byte limit of a text column"
            )
    leaves = [leaf for column in columns for leaf in _byte_leaves(handle.schema_arrow, column)]
    return names, _text_records(path, columns, leaves)


def _text_records(
    path: Path, columns: list[str], leaves: list[str]
) -> Iterator[tuple[int, dict[str, Any] | SourceError]]:
    totals = dict.fromkeys(columns, 0)
    number = 0
    try:
        handle = pyarrow_parquet().ParquetFile(path, read_dictionary=leaves)
        for batch in handle.iter_batches(batch_size=TEXT_BATCH_ROWS, columns=columns):
            too_long: dict[int, str] = {}
            for name, array in zip(batch.schema.names, batch.columns, strict=True):
                lengths = cell_bytes(array)
                totals[name] = totals.get(name, 0) + int(lengths.sum())
                if totals[name] > MAX_TEXT_COLUMN_BYTES:  # checked before any cell of the batch is copied
                    raise SourceError(
                        f"{path}: column {name!r} holds more than {MAX_TEXT_COLUMN_BYTES:,} bytes of text (the "
                        "limit of a text column) once its repeated values are expanded"
                    )
                for row in np.flatnonzero(lengths > MAX_TEXT_CELL_BYTES):
                    too_long.setdefault(int(row), f"field {name!r} is {int(lengths[row]):,} bytes")
            for row, record in enumerate(batch.to_pylist()):
                if row in too_long:
                    yield (
                        number,
                        SourceError(f"{too_long[row]}, above the {MAX_TEXT_CELL_BYTES:,}-byte limit of a text cell"),
                    )
                else:
                    yield number, record
                number += 1
    except (OSError, ValueError) as exc:
        if isinstance(exc, SourceError):
            raise
        raise SourceError(f"{path}: not a readable parquet file ({exc})") from None


class ImageCells:
    """Image cells of parquet files, read one row group of one column at a time, the recent ones kept."""

    def __init__(self) -> None:
        """Start with nothing read."""
        self._starts: dict[Path, list[int]] = {}
        self._cache: OrderedDict[tuple[Path, int, str], Any] = OrderedDict()
        # Images load from background threads too (an env's render-ahead, the trainer's next-step preload).
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        """Nothing: a copy (pickle, a vector env's worker) reads again what it needs; a lock cannot be pickled."""
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        ImageCells.__init__(self)

    def cell(self, path: Path, row: int, column: str, where: str) -> Any:
        """The Python value of ``column`` at ``row`` of ``path`` (``where`` names it in errors)."""
        with self._lock:
            starts = self._group_starts(path)
            group = int(np.searchsorted(starts, row, side="right")) - 1
            key = (path, group, column)
            if key not in self._cache:
                self._cache[key] = _read_group(path, group, column)
                while len(self._cache) > 1 and sum(a.nbytes for a in self._cache.values()) > IMAGE_GROUPS_CACHED_BYTES:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(key)
            array = self._cache[key]
        index = row - starts[group]
        size = int(cell_bytes(array.slice(index, 1))[0])
        if size > MAX_IMAGE_CELL_BYTES:
            raise ImageLoadError(
                f"{where}: {size:,} image bytes, above the {MAX_IMAGE_CELL_BYTES:,}-byte limit of an image cell"
            )
        return array[index].as_py()

    def _group_starts(self, path: Path) -> list[int]:
        if path not in self._starts:
            try:
                metadata = pyarrow_parquet().ParquetFile(path).metadata
            except (OSError, ValueError) as exc:
                raise ImageLoadError(f"{path}: cannot read its metadata: {exc}") from None
            sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
            self._starts[path] = [int(v) for v in np.cumsum([0, *sizes[:-1]])]
        return self._starts[path]


def _read_group(path: Path, group: int, column: str) -> Any:
    """One row group of ``column`` as one Arrow array (dictionaries kept), refused over its byte bound."""
    pq = pyarrow_parquet()
    try:
        handle = pq.ParquetFile(path)
        size = _uncompressed(handle.metadata, group, column)
        leaves = _byte_leaves(handle.schema_arrow, column)
    except (OSError, ValueError) as exc:
        raise ImageLoadError(f"{path}: cannot read row group {group}: {exc}") from None
    if size > MAX_IMAGE_GROUP_BYTES:
        raise ImageLoadError(
            f"{path}: row group {group} of column {column!r} is {size:,} bytes uncompressed, above the "
            f"{MAX_IMAGE_GROUP_BYTES:,}-byte limit of a row group of images; rewrite it with smaller row groups"
        )
    try:
        table = pq.ParquetFile(path, read_dictionary=leaves).read_row_group(group, columns=[column])
    except (OSError, ValueError) as exc:  # pyarrow's errors derive from these
        raise ImageLoadError(f"{path}: cannot read row group {group}: {exc}") from None
    return table.column(0).combine_chunks()


def cell_bytes(array: Any) -> np.ndarray:
    """Bytes of text or binary data in each cell of an Arrow array (struct fields summed), without copying any.

    A dictionary-encoded array is measured on its dictionary, so a value repeated a million times is not
    expanded to be measured.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = array.type
    if pa.types.is_dictionary(kind):
        indices = array.indices.fill_null(0).to_numpy(zero_copy_only=False)
        sizes = cell_bytes(array.dictionary)[indices] if len(array.dictionary) else np.zeros(len(array), np.int64)
        return np.where(array.is_null().to_numpy(zero_copy_only=False), 0, sizes)
    if pa.types.is_struct(kind):
        fields = array.flatten()
        return sum((cell_bytes(f) for f in fields), np.zeros(len(array), np.int64))
    if (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_binary(kind)
        or (pa.types.is_large_binary(kind))
    ):
        return pc.binary_length(array).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        flat = cell_bytes(array.flatten())
        offsets = array.offsets.to_numpy(zero_copy_only=False) - array.offsets[0].as_py()
        totals = np.concatenate([[0], np.cumsum(flat)])
        return totals[offsets[1:]] - totals[offsets[:-1]]
    return np.zeros(len(array), np.int64)


def _uncompressed(metadata: Any, group: int, column: str) -> int:
    """Uncompressed bytes of ``column`` (all its leaves, or the one struct field it names) in row group ``group``."""
    row_group = metadata.row_group(group)
    chunks = (row_group.column(j) for j in range(row_group.num_columns))
    return sum(c.total_uncompressed_size for c in chunks if f"{c.path_in_schema}.".startswith(f"{column}."))


def _byte_leaves(schema: Any, column: str) -> list[str]:
    """The string and binary leaves of ``column`` (or of the struct field it names), for ``read_dictionary``."""
    import pyarrow as pa

    top, _, child = column.partition(".")
    kind = schema.field(top).type
    if child:
        kind = kind.field(child).type if pa.types.is_struct(kind) else kind
    texts = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary)
    if any(test(kind) for test in texts):
        return [column]
    if pa.types.is_struct(kind) and not child:
        return [f"{column}.{f.name}" for f in kind if any(test(f.type) for test in texts)]
    return []
