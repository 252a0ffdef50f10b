"""The store that keeps records as JSONL with images beside them: :class:`TrajectoryStore` (see the package)."""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medeyes.trajectories.records import (
    SCHEMA_VERSION,
    Producer,
    TrajectoryRecord,
    image_digest,
    parse_record,
)
from medeyes.trajectories.settings import EpisodeSettings, check_settings
from medeyes_env.cases import open_image
from medeyes_env.errors import ImageLoadError, RecordError, StoreMismatchError
from medeyes_env.strict_json import BadInput, decode, load_file, loads

RECORDS_FILE = "trajectories.jsonl"
RUN_FILE = "run.json"
IMAGES_DIR = "images"
TORN_SUFFIX = ".torn"
MAX_RUN_INFO_BYTES = 16 * 1024 * 1024
"""Largest ``run.json`` read (a producer with its config is a few kB)."""


class TrajectoryStore:
    """A run directory of trajectory records (JSONL) and content-addressed PNG images.

    Opening an existing run for writing repairs its last line when an append was interrupted: a line
    that parses as a record is kept (its newline added, ``completed_tail`` set); one that does not is
    moved to ``trajectories.jsonl.torn`` (``repaired``: its size in bytes, ``torn_path``: where).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        producer: Producer | None = None,
        *,
        settings: EpisodeSettings | None = None,
        read_only: bool = False,
    ) -> None:
        """Open (or create) the run directory ``root``.

        Args:
            root: the run directory.
            producer: when given, ``run.json`` must name the same producer (written on first use), so a
                resumed run never mixes two agents' trajectories.
            settings: when given, ``run.json`` must hold the same episode settings (data, dataset digest,
                environment, scoring; written on first use); a store with records but no settings is refused.
            read_only: open an existing run for reading: no directories made, no repair, no writes.

        """
        self.root = Path(root)
        self.read_only = read_only
        self.completed_tail = False
        """True when opening added the newline a complete last record had lost."""
        self.torn_path: Path | None = None
        """Where an unparseable last line was moved, when opening moved one."""
        if self.root.exists() and not self.root.is_dir():
            raise RecordError(f"trajectory store {self.root} exists and is not a directory; pass a directory path")
        if read_only:
            if not self.root.is_dir():
                raise RecordError(f"no run directory at {self.root}")
            self.repaired = 0
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            self.images_dir.mkdir(exist_ok=True)
            self.repaired = self._repair_torn_tail()
        self._ids: set[str] = set(self._scan_ids())
        self._known_images: set[str] = set()
        if producer is not None or settings is not None:
            self._check_run(producer, settings)

    # -- paths ---------------------------------------------------------------------------------------

    @property
    def records_path(self) -> Path:
        """The JSONL file of records."""
        return self.root / RECORDS_FILE

    @property
    def images_dir(self) -> Path:
        """Folder of ``<sha256>.png`` images."""
        return self.root / IMAGES_DIR

    def image_path(self, digest: str) -> Path:
        """Path of the image stored under ``digest``."""
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise RecordError(f"{digest!r} is not a sha256 image name (64 lowercase hex digits)")
        return self.images_dir / f"{digest}.png"

    # -- writing -------------------------------------------------------------------------------------

    def _writable(self) -> None:
        if self.read_only:
            raise RecordError(f"{self.root} was opened read-only")

    def put_image(self, image: Image.Image | np.ndarray) -> str:
        """Store an image once (by content hash) and return its digest."""
        self._writable()
        digest = image_digest(image)
        if digest in self._known_images:
            return digest
        path = self.image_path(digest)
        if not path.exists():
            if isinstance(image, np.ndarray):
                image = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="PNG", compress_level=1)
            _atomic_write_bytes(path, buffer.getvalue())
        self._known_images.add(digest)
        return digest

    def __contains__(self, trajectory_id: object) -> bool:
        return trajectory_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def append(self, record: TrajectoryRecord) -> bool:
        """Append one record atomically; returns False (and writes nothing) if its id is already stored."""
        self._writable()
        if record.schema_version != SCHEMA_VERSION:
            raise RecordError(
                f"cannot write schema_version {record.schema_version}; this store writes {SCHEMA_VERSION}"
            )
        if record.trajectory_id in self._ids:
            return False
        for digest in _image_refs(record):
            if digest not in self._known_images and not self.image_path(digest).exists():
                raise RecordError(
                    f"record {record.trajectory_id!r} names image {digest} that is not in {self.images_dir}; "
                    "store images with put_image() before appending the record"
                )
        line = (record.model_dump_json() + "\n").encode("utf-8")
        fd = os.open(self.records_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, line)
            while written < len(line):  # os.write may be partial on some filesystems
                written += os.write(fd, line[written:])
            os.fsync(fd)
        finally:
            os.close(fd)
        self._ids.add(record.trajectory_id)
        return True

    def write_run_info(self, info: dict[str, Any]) -> None:
        """Write ``run.json`` (atomically), e.g. the command line and producer of the run."""
        _atomic_write_bytes(self.root / RUN_FILE, json.dumps(info, indent=2, default=str).encode())

    def run_info(self) -> dict[str, Any] | None:
        """The contents of ``run.json``, or None when absent."""
        path = self.root / RUN_FILE
        if not path.exists():
            return None
        try:
            info = load_file(path, MAX_RUN_INFO_BYTES)
        except (BadInput, OSError) as exc:
            where = exc.at(path) if isinstance(exc, BadInput) else f"{path}: {exc}"
            raise RecordError(f"{where}; delete it or use a new run directory") from None
        if not isinstance(info, dict):
            raise RecordError(f"{path}: expected a JSON object, got {type(info).__name__}")
        return info

    # -- reading -------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[TrajectoryRecord]:
        return self.records()

    def records(self) -> Iterator[TrajectoryRecord]:
        """Every stored record, in file order (a torn last line of a run still being written is skipped)."""
        for _, record in self.located_records():
            yield record

    def located_records(self) -> Iterator[tuple[str, TrajectoryRecord]]:
        """Every stored record with its ``FILE:LINE``, in file order."""
        if self.records_path.exists():
            yield from _iter_records(self.records_path)

    def load_image(self, digest: str) -> Image.Image:
        """Load a stored image as RGB; a missing, corrupt, oversized or non-file image is a :class:`RecordError`."""
        path = self.image_path(digest)
        if not path.exists():
            raise RecordError(f"image {digest} is missing from {self.images_dir}; the run directory is incomplete")
        if not path.is_file():
            raise RecordError(f"{path}: not an image file (a directory or special file)")
        try:
            image = open_image(path, f"stored image {path}")  # pixels and decoded bytes checked before decoding
        except ImageLoadError as exc:
            raise RecordError(str(exc)) from None
        return image.convert("RGB")

    # -- internals -----------------------------------------------------------------------------------

    def _check_run(self, producer: Producer | None, settings: EpisodeSettings | None) -> None:
        """Refuse a run of another producer or other settings; record what ``run.json`` does not hold yet."""
        info = self.run_info()
        stored = info or {}
        missing: dict[str, Any] = {} if info is not None else {"schema_version": SCHEMA_VERSION}
        if producer is not None:
            wanted = producer.model_dump(mode="json")
            if info is None:
                missing["producer"] = wanted
            elif stored.get("producer") != wanted:
                raise StoreMismatchError(
                    f"{self.root} holds trajectories of another producer ({_short(stored.get('producer'))}), not "
                    f"{_short(wanted)}; resume only with the same agent and configuration, or pass a new output "
                    "directory"
                )
        if settings is not None:
            if "settings" in stored:
                check_settings(self.root, stored["settings"], settings)
            elif self._ids:
                raise StoreMismatchError(
                    f"{self.root / RUN_FILE} records no episode settings (the store was written before MedEyes "
                    f"recorded them), so its {len(self._ids)} episode(s) cannot be matched to this run's data and "
                    "settings; pass a new output directory"
                )
            else:
                missing["settings"] = settings.model_dump(mode="json")
        if missing and not self.read_only:
            self.write_run_info({**stored, **missing})

    def _repair_torn_tail(self) -> int:
        """Complete a last record that lost only its newline; move an unparseable last line to ``.torn``."""
        path = self.records_path
        if not path.exists() or path.stat().st_size == 0:
            return 0
        with path.open("rb+") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(size - 1)
            if handle.read(1) == b"\n":
                return 0
            keep = _last_line_start(handle, size)
            handle.seek(keep)
            tail = handle.read(size - keep)
            if _parses(tail, f"{path}:tail"):
                handle.seek(size)
                handle.write(b"\n")
                handle.flush()
                os.fsync(handle.fileno())
                self.completed_tail = True
                return 0
            torn = path.with_name(path.name + TORN_SUFFIX)
            with torn.open("ab") as aside:  # kept, not destroyed: appended before the cut
                aside.write(tail + b"\n")
                aside.flush()
                os.fsync(aside.fileno())
            handle.truncate(keep)
            handle.flush()
            os.fsync(handle.fileno())
            self.torn_path = torn
            return size - keep

    def _scan_ids(self) -> Iterator[str]:
        if not self.records_path.exists():
            return
        for where, raw, tail in _lines(self.records_path):
            if tail:
                record = _tail_record(raw, where)
                if record is not None:
                    yield record.trajectory_id
                continue
            try:
                data = loads(decode(raw))
            except BadInput as exc:
                raise RecordError(
                    f"{where}: {exc}; the file was edited or corrupted "
                    "(a torn last line is repaired automatically, a broken middle line is not)"
                ) from None
            if isinstance(data, dict) and "trajectory_id" in data:
                yield str(data["trajectory_id"])


def _last_line_start(handle: Any, size: int) -> int:
    """Offset just after the last newline before ``size`` (0 when there is none)."""
    position, chunk = size, 65536
    while position > 0:
        start = max(0, position - chunk)
        handle.seek(start)
        block = handle.read(position - start)
        newline = block.rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        position = start
    return 0


def _tail_record(raw: bytes, where: str) -> TrajectoryRecord | None:
    """The record on a last line without its newline, or None when it does not parse (torn, or being written)."""
    try:
        return parse_record(decode(raw), where)
    except (RecordError, BadInput):
        return None


def _parses(raw: bytes, where: str) -> bool:
    return _tail_record(raw, where) is not None


def _lines(path: Path) -> Iterator[tuple[str, bytes, bool]]:
    """``(FILE:LINE, raw bytes, is a last line without its newline)`` for every non-blank line of ``path``."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            if raw.strip():
                yield f"{path}:{number}", raw, not raw.endswith(b"\n")


def _iter_records(path: Path) -> Iterator[tuple[str, TrajectoryRecord]]:
    """``(FILE:LINE, record)`` of a JSONL file; a last line that does not parse (torn or being written) is skipped."""
    for where, raw, tail in _lines(path):
        if tail:
            record = _tail_record(raw, where)
            if record is not None:
                yield where, record
            return
        try:
            text = decode(raw)
        except BadInput as exc:
            raise RecordError(f"{where}: {exc}") from None
        yield where, parse_record(text, where)


def _short(producer: Any) -> str:
    if not isinstance(producer, dict):
        return repr(producer)
    return f"{producer.get('kind')}:{producer.get('name')}" + (
        f" oracle={producer['oracle']}" if producer.get("oracle") else ""
    )


def _image_refs(record: TrajectoryRecord) -> list[str]:
    refs = [record.image, record.original_image] + [step.observation_image for step in record.steps]
    return [ref for ref in refs if ref is not None]


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_records(path: str | os.PathLike[str]) -> list[TrajectoryRecord]:
    """Read every record of a run directory or a ``.jsonl`` file (no repair, no writes)."""
    path = Path(path)
    if path.is_dir():
        path = path / RECORDS_FILE
    if not path.is_file():
        raise RecordError(f"no trajectories at {path}; pass a run directory (with {RECORDS_FILE}) or a .jsonl file")
    return [record for _, record in _iter_records(path)]
