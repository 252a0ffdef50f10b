"""Local dataset loaders: files on disk become :class:`~medeyes_env.cases.Case` objects, once, here.

Spec strings (``open_source``), each ``NAME:PATH`` with optional ``?key=value&...`` options:

- ``jsonl:/data/cases.jsonl``: MedEyes' own JSON Lines format (:func:`load_jsonl`).
- ``slake:/data/Slake1.0``: SLAKE (:func:`load_slake`), boxes converted from ``xywh``.
- ``vqa_rad:/data/VQA_RAD``: VQA-RAD (:func:`load_vqa_rad`).
- ``path_vqa:/data/pvqa``: PathVQA exported to CSV/JSON/JSONL (:func:`load_path_vqa`).
- ``pmc_vqa:/data/PMC-VQA``: PMC-VQA CSV files (:func:`load_pmc_vqa`).

Options every loader takes: ``skip_bad=1`` skips malformed rows (missing image,
bad field, bad box) instead of stopping at the first one; the source then lists
them in ``source.skipped`` and logs a warning with the count. Without it, the first
malformed row raises an error that names the file and line (or item) number.

Rules shared by every loader:

- Image paths are resolved under the dataset directory with :func:`safe_join`:
  absolute paths and ``..`` escapes raise :class:`UnsafePathError`.
- A missing image is refused when the source is opened; a corrupt one when its
  case's image is loaded (:class:`ImageLoadError`, naming the file).
- Boxes leave this module as ``xyxy`` pixels of the original image.
- Answers become ``CLOSED`` only when they are yes/no; a dataset's other "closed"
  questions (e.g. "left or right?") become ``OPEN`` with
  ``meta["dataset_answer_type"] = "CLOSED"``.
- Case ids are ``NAME/SPLIT/N``, N the row's position in its split's file.
- Cases are built lazily from light rows, so large datasets open fast.
- Nothing is ever unpickled: pickle files are refused with a message.
"""

from __future__ import annotations

import csv
import difflib
import functools
import logging
import os
import posixpath
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pydantic
from PIL import Image

from medeyes_env.cases import (
    SPLITS,
    AnswerType,
    Box,
    Case,
    Region,
    Split,
    displayed_size,
    safe_join,
    xywh_to_xyxy,
)
from medeyes_env.errors import ImageLoadError, MedEyesError, SourceError, UnsafePathError
from medeyes_env.sources import CaseSource, register_source
from medeyes_env.strict_json import BadInput, load_file, loads, to_float
from medeyes_env.strict_json import lines as text_lines

logger = logging.getLogger(__name__)

MAX_SKIPPED_KEPT = 1000
"""How many skip messages a source keeps in ``skipped`` (the count is always exact)."""
MAX_JSON_FILE_BYTES = 1024**3
"""Largest ``.json`` annotation file parsed whole (a 1 GB array takes several GB of memory; use JSONL beyond)."""
MAX_DETECTION_BYTES = 16 * 1024**2
"""Largest SLAKE ``detection.json`` read (the real ones are under 2 kB)."""


# ---------------------------------------------------------------------------------------------
# The source object every loader returns


@dataclass(frozen=True, slots=True)
class _Row:
    """Everything a Case needs, kept light so that 10^6-row datasets stay cheap.

    The image path is kept as ``str`` (a ``Path`` costs 260 bytes, its string 80) and an empty ``meta`` as
    one shared mapping; :meth:`FileSource.case` builds the Case's own objects on demand.
    """

    question: str
    answer: str
    answer_type: AnswerType
    image_path: str | Path
    options: tuple[str, ...] = ()
    regions: tuple[Region, ...] = ()
    modality: str = "unknown"
    organ: str = "unknown"
    image_size: tuple[int, int] | None = None
    meta: Mapping[str, str | int | float | bool] = field(default_factory=dict)
    case_id: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_path", os.fspath(self.image_path))
        if not self.meta:
            object.__setattr__(self, "meta", _NO_META)


_NO_META: Mapping[str, str | int | float | bool] = MappingProxyType({})


class FileSource:
    """A finite source over rows read from files; :meth:`case` builds the Case on demand."""

    def __init__(self, name: str, root: Path, rows: dict[Split, list[_Row]], skipped: list[str], n_skipped: int):
        """Wrap rows already validated by a loader."""
        self.name = name
        self.root = root
        self._rows = {split: rows.get(split, []) for split in SPLITS}
        self.skipped = skipped
        """Messages (file, line, reason) of the rows skipped with ``skip_bad``; at most MAX_SKIPPED_KEPT."""
        self.n_skipped = n_skipped
        """How many rows ``skip_bad`` skipped."""

    def size(self, split: Split) -> int:
        """Number of cases in ``split``."""
        return len(self._rows[split])

    def case(self, split: Split, index: int) -> Case:
        """The ``index``-th case of ``split`` (file order)."""
        rows = self._rows[split]
        if not 0 <= index < len(rows):
            raise SourceError(f"{self.name}/{split} has {len(rows)} cases; index {index} is out of range")
        row = rows[index]
        return Case(
            id=row.case_id or f"{self.name}/{split}/{index}",
            question=row.question,
            answer=row.answer,
            answer_type=row.answer_type,
            options=row.options,
            regions=row.regions,
            modality=row.modality,
            organ=row.organ,
            source=self.name,
            split=split,
            image_path=Path(row.image_path),
            image_size=row.image_size,
            meta=dict(row.meta),
        )

    def __repr__(self) -> str:
        sizes = ", ".join(f"{split}={len(rows)}" for split, rows in self._rows.items())
        return f"FileSource({self.name!r}, {str(self.root)!r}, {sizes}, skipped={self.n_skipped})"


class _Collector:
    """One loader run: collects rows per split, turns a bad row into an error naming ``where`` (or a skip).

    It also caches directory listings and image sizes for the run only, so reopening a
    dataset after its files changed sees the change.
    """

    def __init__(self, skip_bad: bool) -> None:
        self.skip_bad = skip_bad
        self.rows: dict[Split, list[_Row]] = {split: [] for split in SPLITS}
        self.skipped: list[str] = []
        self.n_skipped = 0
        self._dirs: dict[tuple[Path, str], tuple[Path, dict[str, str]]] = {}
        self._sizes: dict[Path, tuple[int, int]] = {}

    def image(self, root: Path, relative: str, folders: tuple[str, ...] = ("",)) -> Path:
        """The first ``root/folder/relative`` that exists, else ImageLoadError naming the paths tried.

        Same guarantees as :func:`safe_join` (no absolute paths, no escapes, symlinks
        resolved), but each directory is resolved and listed once per run instead of
        once per row: on 150k-row datasets this is the difference between seconds and
        a minute.
        """
        if not relative:
            raise SourceError("the image name is empty")
        if "\x00" in relative:
            raise SourceError(f"the image name {relative!r} contains a NUL byte")
        tried: list[Path] = []
        for folder in folders:
            joined = f"{folder}/{relative}" if folder else relative
            directory, name = posixpath.split(joined)
            if posixpath.isabs(joined) or name in ("", ".", ".."):
                path = safe_join(root, joined)  # raises for absolute paths and escapes
                raise ImageLoadError(f"image {relative!r} names the directory {path}, not an image file")
            key = (root, directory)
            if key not in self._dirs:
                try:
                    resolved = safe_join(root, directory or ".")
                except UnsafePathError:
                    safe_join(root, joined)  # the same refusal, naming the whole path
                    raise
                self._dirs[key] = (resolved, _listing(resolved))
            resolved, listing = self._dirs[key]
            path = resolved / name
            kind = listing.get(name)
            if kind is not None:
                found = safe_join(root, joined) if kind == "link" else path
                if not (found.is_file() if kind == "link" else kind == "file"):
                    raise ImageLoadError(f"image path {found} is a directory or special file, not an image file")
                return found
            tried.append(path)
        also = f" (also tried {', '.join(str(p) for p in tried[1:])})" if len(tried) > 1 else ""
        raise ImageLoadError(f"image file not found: {tried[0]}{also}")

    def size(self, path: Path) -> tuple[int, int]:
        """Cached :func:`image_size`."""
        if path not in self._sizes:
            self._sizes[path] = image_size(path)
        return self._sizes[path]

    @contextmanager
    def row(self, where: str) -> Iterator[None]:
        """Run one row's parsing; errors get ``where`` (file and line) in front of their message."""
        try:
            yield
        except pydantic.ValidationError as exc:
            detail = "; ".join(error["msg"] for error in exc.errors())
            self._bad(SourceError(f"{where}: {detail}"), exc)
        except MedEyesError as exc:
            self._bad(type(exc)(f"{where}: {exc}"), exc)

    def _bad(self, error: MedEyesError, cause: Exception) -> None:
        if not self.skip_bad:
            raise error from cause
        self.n_skipped += 1
        if len(self.skipped) < MAX_SKIPPED_KEPT:
            self.skipped.append(str(error))

    def source(self, name: str, root: Path) -> FileSource:
        if self.n_skipped:
            logger.warning("%s: skipped %d malformed rows (see source.skipped)", name, self.n_skipped)
        return FileSource(name, root, self.rows, self.skipped, self.n_skipped)


# ---------------------------------------------------------------------------------------------
# Small shared helpers


def parse_spec_argument(argument: str | None, source: str, options: Mapping[str, str]) -> tuple[Path, dict[str, str]]:
    """Split ``PATH?key=value&...`` into the path and options (defaults from ``options``).

    >>> parse_spec_argument("/d?skip_bad=1", "slake", {"skip_bad": "0"})
    (PosixPath('/d'), {'skip_bad': '1'})
    """
    if not argument:
        raise SourceError(f"the {source!r} source needs a path: {source}:/path/to/data")
    path_text, _, query = argument.partition("?")
    values = dict(options)
    for item in filter(None, query.split("&")):
        key, _, value = item.partition("=")
        if key not in options:
            close = difflib.get_close_matches(key, options, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise SourceError(f"unknown option {key!r} for source {source!r}.{hint} Known: {', '.join(options)}")
        values[key] = value or "1"
    return Path(path_text).expanduser(), values


def _listing(directory: Path) -> dict[str, str]:
    """Names in ``directory`` -> ``file``, ``link`` (resolved where used) or ``other``, from one ``scandir``."""

    def kind(entry: os.DirEntry[str]) -> str:
        if entry.is_symlink():
            return "link"
        return "file" if entry.is_file(follow_symlinks=False) else "other"

    try:
        with os.scandir(directory) as entries:
            return {entry.name: kind(entry) for entry in entries}
    except (OSError, ValueError):
        return {}


def _flag(value: str, key: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise SourceError(f"option {key}={value!r} is not a boolean; use {key}=1 or {key}=0")


def _refuse_pickles(directory: Path, source: str) -> None:
    pickles = sorted(p.name for p in directory.glob("*.pkl")) if directory.is_dir() else []
    if pickles:
        raise SourceError(
            f"{source}: {directory} holds only pickle files ({', '.join(pickles[:3])}); MedEyes never unpickles "
            "data (it can run arbitrary code). Export the annotations to CSV, JSON or JSONL with columns "
            "image, question, answer (docs/sources.md)"
        )


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` as displayed (EXIF orientation applied), from the header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            return displayed_size(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageLoadError(f"cannot read image {path}: {exc}") from exc


def _text(record: Mapping[str, Any], key: str, *, required: bool = True, default: str = "") -> str:
    value = record.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise SourceError(f"field {key!r} is missing or empty")
        return default
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise SourceError(f"field {key!r} must be text, got {type(value).__name__} {value!r}")
    return str(value).strip()


def _first_key(record: Mapping[str, Any], keys: tuple[str, ...]) -> str:
    for key in keys:
        if record.get(key) not in (None, ""):
            return key
    raise SourceError(f"none of the fields {', '.join(keys)} is present")


def _is_yes_no(answer: str) -> bool:
    return answer.strip().lower() in ("yes", "no")


def _dataset_answer_type(raw: str, answer: str) -> tuple[AnswerType, dict[str, str]]:
    """Map a dataset's CLOSED/OPEN label to an AnswerType (CLOSED only for yes/no answers)."""
    label = raw.strip().upper()
    if label not in ("CLOSED", "OPEN"):
        raise SourceError(f"answer_type {raw!r} is neither CLOSED nor OPEN")
    if label == "CLOSED" and _is_yes_no(answer):
        return AnswerType.CLOSED, {"dataset_answer_type": label}
    return AnswerType.OPEN, {"dataset_answer_type": label}


def _read_records(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield ``(where, item)`` from a .json (array), .jsonl or .csv file; :func:`_record` checks each item.

    Items are checked by the caller, inside its per-row error handling, so that
    ``skip_bad`` can skip a broken line like any other malformed row.
    """
    suffix = path.suffix.lower()
    reader = None
    try:
        if suffix == ".csv":
            # surrogateescape: a row with bytes that are not UTF-8 is refused alone (skip_bad can skip it)
            with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as handle:
                reader = csv.DictReader(handle)
                for row in reader:
                    yield f"{path}:{reader.line_num}", _utf8_row(row)
        elif suffix == ".jsonl":
            with path.open("rb") as handle:
                for number, line in text_lines(handle):
                    if isinstance(line, BadInput) or line.strip():
                        yield f"{path}:{number}", line
        elif suffix == ".json":
            try:
                data = load_file(path, MAX_JSON_FILE_BYTES)
            except BadInput as exc:
                raise SourceError(exc.at(path)) from None
            if not isinstance(data, list):
                raise SourceError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
            for number, item in enumerate(data):
                yield f"{path} item {number}", item
        else:
            raise SourceError(f"{path}: unsupported annotation file type {suffix!r}; use .json, .jsonl or .csv")
    except csv.Error as exc:
        line = f":{reader.line_num + 1}" if reader is not None else ""  # the record after the last one read
        raise SourceError(f"{path}{line}: malformed CSV ({exc}); the rows after it were not read") from None


def _utf8_row(row: dict[Any, Any]) -> dict[Any, Any] | BadInput:
    """``row``, or :class:`BadInput` when a value held bytes that are not UTF-8 (decoded as surrogates)."""
    try:
        "".join(v for v in row.values() if isinstance(v, str)).encode("utf-8")
    except UnicodeEncodeError as exc:
        return BadInput(f"not UTF-8 text (byte 0x{ord(exc.object[exc.start]) - 0xDC00:02x})")
    return row


def _record(item: Any) -> dict[str, Any]:
    """A record from :func:`_read_records`: a JSONL line is parsed, anything but an object refused."""
    if isinstance(item, BadInput):
        raise SourceError(str(item))
    if isinstance(item, str):
        try:
            item = loads(item)
        except BadInput as exc:
            raise SourceError(str(exc)) from None
    if not isinstance(item, dict):
        raise SourceError(f"expected a JSON object, got {type(item).__name__}")
    return item


def _clip_box(box: Box, size: tuple[int, int]) -> Box | None:
    width, height = size
    x1, y1, x2, y2 = max(box[0], 0.0), max(box[1], 0.0), min(box[2], float(width)), min(box[3], float(height))
    return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None


def _boxes_of(value: Any, where: str) -> list[tuple[float, float, float, float]]:
    """One box ``[a, b, c, d]`` or a list of them, as float 4-tuples."""
    numbers = isinstance(value, (list, tuple)) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    )
    if numbers and len(value) == 4:
        try:
            return [tuple(to_float(v, where) for v in value)]  # type: ignore[list-item]
        except BadInput as exc:
            raise SourceError(str(exc)) from None
    if isinstance(value, (list, tuple)) and all(isinstance(v, (list, tuple)) for v in value):
        return [box for item in value for box in _boxes_of(item, where)]
    raise SourceError(f"{where}: expected a box of 4 numbers, got {value!r}")


# ---------------------------------------------------------------------------------------------
# jsonl: MedEyes' own format

JSONL_FIELDS = {
    "id": "unique case id (text)",
    "image": "image path relative to the JSONL file's directory",
    "question": "the question text",
    "answer": "gold answer; for choice questions the option text (a letter A, B, ... is accepted)",
    "answer_type": "closed (yes/no), choice or open",
    "options": "list of option texts (choice questions only)",
    "regions": "list of {box: [x1, y1, x2, y2] in pixels of the image, label: text}",
    "modality": "e.g. ct, mri, xray, ultrasound, pathology",
    "organ": "e.g. chest, brain, abdomen",
    "split": "train, validation (or val) or test; default test",
    "meta": "object of text/number/bool values kept on the case",
}
"""The fields of one JSONL line; ``id``, ``image``, ``question``, ``answer`` and ``answer_type`` are required."""

_SPLIT_ALIASES: dict[str, Split] = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}


def load_jsonl(path: str | os.PathLike[str], skip_bad: bool = False) -> FileSource:
    """Open a MedEyes JSONL file: one case per line, fields as in :data:`JSONL_FIELDS`.

    Example line::

        {"id": "cxr-1", "image": "images/cxr-1.png", "question": "Is there a nodule?", "answer": "yes",
         "answer_type": "closed", "regions": [{"box": [40, 52, 88, 96], "label": "nodule"}],
         "modality": "xray", "organ": "chest", "split": "train"}

    Every line is validated when the file is opened (unknown fields, types, the image
    exists, boxes lie inside the image), and errors name the line number.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise SourceError(f"JSONL file not found: {path}")
    root = path.parent
    collector = _Collector(skip_bad)
    seen: dict[str, int] = {}
    with path.open("rb") as handle:
        for number, line in text_lines(handle):
            if not isinstance(line, BadInput) and not line.strip():
                continue
            where = f"{path}:{number}"
            with collector.row(where):
                split, row = _jsonl_row(_record(line), root, collector)
                case_id = row.case_id or ""
                if case_id in seen:
                    raise SourceError(f"duplicate id {case_id!r} (first on line {seen[case_id]})")
                _validate(row, split)
                seen[case_id] = number
                collector.rows[split].append(row)
    return collector.source("jsonl", root)


def _jsonl_row(record: dict[str, Any], root: Path, collector: _Collector) -> tuple[Split, _Row]:
    unknown = sorted(set(record) - set(JSONL_FIELDS))
    if unknown:
        close = difflib.get_close_matches(unknown[0], JSONL_FIELDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SourceError(f"unknown field {unknown[0]!r}{hint}; fields are: {', '.join(JSONL_FIELDS)}")
    raw_type = _text(record, "answer_type").lower()
    try:
        answer_type = AnswerType(raw_type)
    except ValueError:
        raise SourceError(f"answer_type {raw_type!r} must be one of closed, choice, open") from None
    options = record.get("options", [])
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise SourceError(f"options must be a list of texts, got {options!r}")
    answer = _text(record, "answer")
    if answer_type is AnswerType.CHOICE and answer not in options and re.fullmatch(r"[A-Za-z]", answer):
        letter = ord(answer.upper()) - ord("A")
        if letter < len(options):
            answer = options[letter]
    split_name = _text(record, "split", required=False, default="test").lower()
    if split_name not in _SPLIT_ALIASES:
        raise SourceError(f"split {split_name!r} must be one of train, validation (val), test")
    meta = record.get("meta", {})
    if not isinstance(meta, dict) or not all(
        isinstance(v, (str, int, float, bool)) and isinstance(k, str) for k, v in meta.items()
    ):
        raise SourceError(f"meta must be an object of text/number/bool values, got {meta!r}")
    image_path = collector.image(root, _text(record, "image"))
    regions_raw = record.get("regions", [])
    if not isinstance(regions_raw, list):
        raise SourceError(f"regions must be a list of {{box, label}} objects, got {regions_raw!r}")
    regions = []
    for region in regions_raw:
        if not isinstance(region, dict) or "box" not in region or set(region) - {"box", "label"}:
            raise SourceError(f"each region must be {{'box': [x1, y1, x2, y2], 'label': text}}, got {region!r}")
        boxes = _boxes_of(region["box"], "region box")
        if len(boxes) != 1:
            raise SourceError(f"a region has one box [x1, y1, x2, y2], got {region['box']!r}")
        label = region.get("label")
        if label is not None and not isinstance(label, str):
            raise SourceError(f"a region label must be text, got {type(label).__name__} {label!r}")
        regions.append(Region(box=boxes[0], label=label if label is not None else "abnormality"))
    size = collector.size(image_path) if regions else None
    row = _Row(
        question=_text(record, "question"),
        answer=answer,
        answer_type=answer_type,
        image_path=image_path,
        options=tuple(options),
        regions=tuple(regions),
        modality=_text(record, "modality", required=False, default="unknown"),
        organ=_text(record, "organ", required=False, default="unknown"),
        image_size=size,
        meta=meta,
        case_id=_text(record, "id"),
    )
    return _SPLIT_ALIASES[split_name], row


def _validate(row: _Row, split: Split) -> None:
    """Run the Case model's own checks on a row (answer in options, yes/no, boxes inside the image)."""
    Case(
        id=row.case_id or "?",
        question=row.question,
        answer=row.answer,
        answer_type=row.answer_type,
        options=row.options,
        regions=row.regions,
        source="jsonl",
        split=split,
        image_path=None,  # not part of any rule; converting it to a Path costs 10% of opening a file
        image_size=row.image_size,
        meta=dict(row.meta),
    )


# ---------------------------------------------------------------------------------------------
# SLAKE

SLAKE_SPLIT_FILES: dict[Split, str] = {"train": "train.json", "validation": "validate.json", "test": "test.json"}


def load_slake(path: str | os.PathLike[str], skip_bad: bool = False, regions: str = "matched") -> FileSource:
    """Open SLAKE 1.0 (``Slake1.0/`` with ``train.json``, ``validate.json``, ``test.json`` and ``imgs/``).

    Assumed layout (the public release; state of knowledge, not checked against every copy):

    - each split file is a JSON array of objects with ``img_name`` (``xmlab102/source.jpg``,
      relative to ``imgs/``), ``question``, ``answer``, ``answer_type`` (``CLOSED``/``OPEN``),
      ``q_lang`` (``en``/``zh``), ``modality`` (``CT``, ``MRI``, ``X-Ray``), ``location``
      (body part), ``qid``, ``content_type``;
    - ``imgs/xmlabN/detection.json`` holds boxes as ``[x, y, w, h]`` in pixels, keyed by
      organ or lesion name: a list of ``{name: box}`` objects (also accepted: one object
      ``{name: box or [boxes]}``, or a list of ``{"name"|"label": ..., "bbox"|"box": [...]}``).

    Only English questions (``q_lang == "en"``) are kept. Boxes are converted to
    ``xyxy`` with :func:`xywh_to_xyxy` and clipped to the image. ``regions="matched"``
    (default) gives a case the boxes whose name appears in its question or answer, and
    all of the image's boxes when none does; ``regions="all"`` always gives all of them;
    ``regions="none"`` gives none.
    """
    if regions not in ("matched", "all", "none"):
        raise SourceError(f"slake option regions={regions!r} must be matched, all or none")
    root = Path(path).expanduser()
    if not (root / "train.json").is_file() and (root / "Slake1.0" / "train.json").is_file():
        root = root / "Slake1.0"
    present = {split: root / name for split, name in SLAKE_SPLIT_FILES.items() if (root / name).is_file()}
    if not present:
        raise SourceError(
            f"no SLAKE split files in {root}: expected {', '.join(SLAKE_SPLIT_FILES.values())} beside imgs/"
        )
    collector = _Collector(skip_bad)
    detections = functools.cache(functools.partial(_slake_detections, root=root))
    for split, split_file in present.items():
        for where, item in _read_records(split_file):
            with collector.row(where):
                record = _record(item)
                if str(record.get("q_lang", "en")).strip().lower() == "en":
                    collector.rows[split].append(_slake_row(record, root, regions, collector, detections))
    return collector.source("slake", root)


def _slake_row(
    record: dict[str, Any],
    root: Path,
    regions_mode: str,
    collector: _Collector,
    detections_of: Callable[[Path], tuple[tuple[str, Box], ...]],
) -> _Row:
    answer = _text(record, "answer")
    answer_type, meta = _dataset_answer_type(_text(record, "answer_type"), answer)
    image_path = collector.image(root / "imgs", _text(record, "img_name"))
    question = _text(record, "question")
    regions: tuple[Region, ...] = ()
    size = None
    if regions_mode != "none":
        detections = detections_of(image_path.parent / "detection.json")
        if detections:
            size = collector.size(image_path)
            boxes = [(label, clipped) for label, box in detections if (clipped := _clip_box(box, size)) is not None]
            text = f" {question} {answer} ".lower()
            matched = [(label, box) for label, box in boxes if re.search(rf"\b{re.escape(label.lower())}\b", text)]
            chosen = matched if (matched and regions_mode == "matched") else boxes
            regions = tuple(Region(box=box, label=label) for label, box in chosen)
            meta["regions_matched"] = bool(matched)
    for key in ("qid", "img_id", "content_type", "base_type", "location"):
        if record.get(key) not in (None, ""):
            meta[key] = record[key] if isinstance(record[key], (int, float)) else str(record[key])
    return _Row(
        question=question,
        answer=answer,
        answer_type=answer_type,
        image_path=image_path,
        regions=regions,
        modality=_normalise_modality(str(record.get("modality", "unknown"))),
        organ=str(record.get("location", "unknown")).strip().lower() or "unknown",
        image_size=size,
        meta=meta,
    )


def _normalise_modality(name: str) -> str:
    key = re.sub(r"[^a-z]", "", name.lower())
    return {"xray": "xray", "mri": "mri", "mr": "mri", "ct": "ct"}.get(key, key or "unknown")


def _slake_detections(path: Path, root: Path) -> tuple[tuple[str, Box], ...]:
    """Labelled ``xyxy`` boxes from a SLAKE ``detection.json`` (``xywh`` on disk); empty when absent.

    A ``detection.json`` that resolves outside ``root`` (a symlink out of the dataset) is refused.
    """
    if not path.is_file():
        return ()
    resolved, inside = path.resolve(), root.resolve()
    if inside not in resolved.parents:
        raise UnsafePathError(f"{path} resolves to {resolved}, outside the dataset directory {inside}")
    try:
        data = load_file(path, MAX_DETECTION_BYTES)
    except BadInput as exc:
        raise SourceError(exc.at(path)) from None
    pairs: list[tuple[str, Any]] = []
    items = data if isinstance(data, list) else [data]
    for item in items:
        if not isinstance(item, dict):
            raise SourceError(f"{path}: expected objects of {{name: [x, y, w, h]}}, got {item!r}")
        label_key = next((k for k in ("name", "label", "category") if k in item), None)
        box_key = next((k for k in ("bbox", "box") if k in item), None)
        if label_key and box_key:
            pairs.append((str(item[label_key]), item[box_key]))
        else:
            pairs.extend((str(k), v) for k, v in item.items())
    result = []
    for label, value in pairs:
        for x, y, w, h in _boxes_of(value, f"{path} box {label!r}"):
            if w <= 0 or h <= 0:
                raise SourceError(f"{path}: box {label!r} [{x}, {y}, {w}, {h}] has no area; expected [x, y, w, h]")
            result.append((label.strip(), xywh_to_xyxy((x, y, w, h))))
    return tuple(result)


# ---------------------------------------------------------------------------------------------
# VQA-RAD

VQA_RAD_JSON = "VQA_RAD Dataset Public.json"
VQA_RAD_IMAGE_FOLDERS = ("VQA_RAD Image Folder", "images", "")
_ORGANS = {"abd": "abdomen", "head": "head", "chest": "chest"}


def load_vqa_rad(path: str | os.PathLike[str], skip_bad: bool = False) -> FileSource:
    """Open VQA-RAD: ``VQA_RAD Dataset Public.json`` and the ``VQA_RAD Image Folder/`` beside it.

    ``path`` is that directory or the JSON file itself. Each record has ``image_name``,
    ``question``, ``answer``, ``answer_type`` (``CLOSED``/``OPEN``), ``phrase_type`` and
    ``image_organ``. Split: records whose ``phrase_type`` starts with ``test``
    (``test_freeform``, ``test_para``: the 451-question test set) go to ``test``, all others
    (``freeform``, ``para``, ``frame``) to ``train``; ``validation`` is empty. Images are
    looked up in ``VQA_RAD Image Folder/``, then ``images/``, then the directory itself.
    """
    json_path = Path(path).expanduser()
    if json_path.is_dir():
        json_path = json_path / VQA_RAD_JSON
    if not json_path.is_file():
        raise SourceError(f"VQA-RAD annotation file not found: {json_path} (expected {VQA_RAD_JSON!r})")
    root = json_path.parent
    collector = _Collector(skip_bad)
    for where, item in _read_records(json_path):
        with collector.row(where):
            record = _record(item)
            answer = _text(record, "answer")
            answer_type, meta = _dataset_answer_type(_text(record, "answer_type"), answer)
            phrase_type = _text(record, "phrase_type", required=False, default="freeform").lower()
            split: Split = "test" if phrase_type.startswith("test") else "train"
            organ = _text(record, "image_organ", required=False, default="unknown").lower()
            meta["phrase_type"] = phrase_type
            for key in ("qid", "question_type"):
                if record.get(key) not in (None, ""):
                    meta[key] = str(record[key])
            row = _Row(
                question=_text(record, "question"),
                answer=answer,
                answer_type=answer_type,
                image_path=collector.image(root, _text(record, "image_name"), VQA_RAD_IMAGE_FOLDERS),
                organ=_ORGANS.get(organ, organ),
                meta=meta,
            )
            collector.rows[split].append(row)
    return collector.source("vqa_rad", root)


# ---------------------------------------------------------------------------------------------
# PathVQA

PATH_VQA_SPLITS: dict[Split, tuple[str, ...]] = {
    "train": ("train",),
    "validation": ("val", "validation", "valid"),
    "test": ("test",),
}
_IMAGE_KEYS = ("image", "image_name", "img_name", "image_id", "img_id", "file_name")


def load_path_vqa(path: str | os.PathLike[str], skip_bad: bool = False) -> FileSource:
    """Open PathVQA exported to text: one annotation file per split, images in folders.

    The original release stores its annotations as pickles, which MedEyes never loads.
    Expected instead, in ``path`` or ``path/qas``: ``train``, ``val`` (or ``validation``)
    and ``test`` as ``.csv``, ``.json`` (array of objects) or ``.jsonl``, with fields
    ``image`` (or ``image_name``/``img_name``/``image_id``), ``question`` and ``answer``.
    An image name without extension gets ``.jpg``; images are looked up in
    ``images/<split file stem>/``, ``images/``, ``<split file stem>/`` and ``path`` itself.
    yes/no answers become CLOSED cases, all others OPEN.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise SourceError(f"PathVQA directory not found: {root}")
    files = _split_files(root, PATH_VQA_SPLITS)
    if not files:
        _refuse_pickles(root / "qas", "path_vqa")
        _refuse_pickles(root, "path_vqa")
        raise SourceError(
            f"no PathVQA annotation files in {root} or {root / 'qas'}: expected train/val/test as .csv, .json or .jsonl"
        )
    collector = _Collector(skip_bad)
    for split, split_file in files.items():
        folders = (f"images/{split_file.stem}", "images", split_file.stem, "")
        for where, item in _read_records(split_file):
            with collector.row(where):
                record = _record(item)
                image = _text(record, _first_key(record, _IMAGE_KEYS))
                if not Path(image).suffix:
                    image += ".jpg"
                answer = _text(record, "answer")
                row = _Row(
                    question=_text(record, "question"),
                    answer=answer,
                    answer_type=AnswerType.CLOSED if _is_yes_no(answer) else AnswerType.OPEN,
                    image_path=collector.image(root, image, folders),
                    modality="pathology",
                )
                collector.rows[split].append(row)
    return collector.source("path_vqa", root)


def _split_files(root: Path, names: Mapping[Split, tuple[str, ...]]) -> dict[Split, Path]:
    found: dict[Split, Path] = {}
    for split, stems in names.items():
        for folder in (root, root / "qas"):
            candidates = [folder / f"{stem}{ext}" for stem in stems for ext in (".csv", ".json", ".jsonl")]
            existing = [c for c in candidates if c.is_file()]
            if existing:
                found[split] = existing[0]
                break
    return found


# ---------------------------------------------------------------------------------------------
# PMC-VQA

PMC_VQA_IMAGE_FOLDERS = ("images", "figures", "")
_CHOICE_PREFIX = re.compile(r"^\s*([A-Da-d])\s*[:：.)]\s*")


def load_pmc_vqa(
    path: str | os.PathLike[str], skip_bad: bool = False, train: str = "train.csv", test: str | None = None
) -> FileSource:
    """Open PMC-VQA: CSV files with ``Figure_path, Question, Answer, Choice A..D, Answer_label``.

    ``train.csv`` becomes ``train``; ``test_clean.csv`` (the cleaned 2k benchmark set)
    becomes ``test`` when present, else ``test.csv``; ``train=``/``test=`` name other
    files in the directory (e.g. ``train_2.csv``). ``validation`` is empty. Choices
    lose their ``"A:"`` prefix; the gold answer is the choice named by ``Answer_label``
    (the ``Answer`` text is kept in ``meta``). Images are looked up in ``images/``,
    ``figures/`` and the directory itself.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise SourceError(f"PMC-VQA directory not found: {root}")
    if test is None:
        test = "test_clean.csv" if (root / "test_clean.csv").is_file() else "test.csv"
    files: dict[Split, Path] = {}
    for split, name in (("train", train), ("test", test)):
        candidate = safe_join(root, name)
        if candidate.is_file():
            files[split] = candidate  # type: ignore[index]
    if not files:
        raise SourceError(f"no PMC-VQA CSV files in {root}: expected {train} and/or {test}")
    collector = _Collector(skip_bad)
    for split, split_file in files.items():
        for where, item in _read_records(split_file):
            with collector.row(where):
                collector.rows[split].append(_pmc_row(_record(item), root, collector))
    return collector.source("pmc_vqa", root)


def _pmc_row(record: dict[str, Any], root: Path, collector: _Collector) -> _Row:
    options: list[str] = []
    letters: list[str] = []
    for letter in "ABCD":
        raw = record.get(f"Choice {letter}")
        if raw is None or not str(raw).strip():
            continue
        options.append(_CHOICE_PREFIX.sub("", str(raw)).strip())
        letters.append(letter)
    if len(options) < 2:
        raise SourceError(f"needs at least two of the columns 'Choice A'..'Choice D', got {options!r}")
    label = _text(record, "Answer_label").upper()
    if label not in letters:
        raise SourceError(f"Answer_label {label!r} names none of the choices {letters}")
    answer_text = _text(record, "Answer", required=False)
    return _Row(
        question=_text(record, "Question"),
        answer=options[letters.index(label)],
        answer_type=AnswerType.CHOICE,
        image_path=collector.image(root, _text(record, "Figure_path"), PMC_VQA_IMAGE_FOLDERS),
        options=tuple(options),
        meta={"answer_label": label, "answer_text": answer_text},
    )


# ---------------------------------------------------------------------------------------------
# Registration


def _factory(
    name: str, options: Mapping[str, str], open_: Callable[[Path, dict[str, str]], CaseSource]
) -> Callable[[str | None], CaseSource]:
    def factory(argument: str | None) -> CaseSource:
        path, values = parse_spec_argument(argument, name, options)
        return open_(path, values)

    factory.__name__ = f"open_{name}"
    return factory


register_source(
    "jsonl",
    _factory("jsonl", {"skip_bad": "0"}, lambda p, o: load_jsonl(p, skip_bad=_flag(o["skip_bad"], "skip_bad"))),
)
register_source(
    "slake",
    _factory(
        "slake",
        {"skip_bad": "0", "regions": "matched"},
        lambda p, o: load_slake(p, skip_bad=_flag(o["skip_bad"], "skip_bad"), regions=o["regions"]),
    ),
)
register_source(
    "vqa_rad",
    _factory("vqa_rad", {"skip_bad": "0"}, lambda p, o: load_vqa_rad(p, skip_bad=_flag(o["skip_bad"], "skip_bad"))),
)
register_source(
    "path_vqa",
    _factory("path_vqa", {"skip_bad": "0"}, lambda p, o: load_path_vqa(p, skip_bad=_flag(o["skip_bad"], "skip_bad"))),
)
register_source(
    "pmc_vqa",
    _factory(
        "pmc_vqa",
        {"skip_bad": "0", "train": "train.csv", "test": ""},
        lambda p, o: load_pmc_vqa(
            p, skip_bad=_flag(o["skip_bad"], "skip_bad"), train=o["train"], test=o["test"] or None
        ),
    ),
)
