"""Parquet datasets with images stored as bytes: the Hugging Face exports most people download.

Spec strings (``open_source``), each with the shared options ``?skip_bad=1``:

- ``vqa_rad_hf:/data/vqa-rad``, ``slake_hf:/data/SLAKE``, ``path_vqa_hf:/data/path-vqa``: the Hugging Face
  Hub exports (:func:`load_hf_parquet`). PathVQA users never need the release's pickles.
- ``mmmu:/data/MMMU``: MMMU's Health & Medicine subjects (:func:`load_mmmu`);
  ``?subjects=Pharmacy,Clinical_Medicine`` picks some.

Lazy: opening reads only the text columns; an image's bytes are read (one cell at a time, from the row
groups read last) and decoded when its case's image is loaded, so opening 100k questions decodes no image.
Files are read within the bounds of :mod:`medeyes_env.sources.parquet_files` (rows, text and image bytes).
Needs ``pyarrow`` (``pip install 'medeyes[parquet]'``), imported on first use. A corrupt or unreadable
file is refused naming it; a bad row names ``FILE row N`` (or is skipped and counted with ``skip_bad``).
"""

from __future__ import annotations

import ast
import difflib
import io
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from medeyes_env.cases import SPLITS, AnswerType, Case, Split, decode_8bit, load_image_file, safe_join
from medeyes_env.errors import ImageLoadError, SourceError
from medeyes_env.sources import register_source
from medeyes_env.sources.parquet_files import ImageCells, read_text_columns
from medeyes_env.sources.rows import (
    RowCollector,
    RowSource,
    dataset_answer_type,
    is_yes_no,
    normalise_modality,
    parse_flag,
    parse_spec_argument,
)

HF_SPLITS: dict[Split, tuple[str, ...]] = {
    "train": ("train",),
    "validation": ("validation", "val", "valid"),
    "test": ("test",),
}
MMMU_SPLITS: dict[Split, tuple[str, ...]] = {"train": ("dev",), "validation": ("validation",), "test": ("test",)}
"""MMMU's ``dev`` (5 few-shot questions per subject) is our train split; its test answers are hidden."""
MMMU_HEALTH_SUBJECTS = (
    "Basic_Medical_Science",
    "Clinical_Medicine",
    "Diagnostics_and_Laboratory_Medicine",
    "Pharmacy",
    "Public_Health",
)
MMMU_IMAGE_COLUMNS = tuple(f"image_{k}" for k in range(1, 8))
MAX_OPTIONS_CHARS = 20_000
"""Longest MMMU ``options`` string parsed (a list literal of a few answers)."""
_IMAGE_TAG = re.compile(r"<image (\d+)>")


@dataclass(frozen=True, slots=True)
class _PqRow:
    """A case's text and where its image lies: file number, row in the file, column."""

    question: str
    answer: str
    answer_type: AnswerType
    file: int
    row: int
    column: str
    options: tuple[str, ...] = ()
    modality: str = "unknown"
    organ: str = "unknown"
    meta: Mapping[str, str | int | float | bool] = field(default_factory=dict)


class ParquetSource(RowSource[_PqRow]):
    """A finite source over parquet files whose images are bytes in the file, decoded on demand."""

    def __init__(
        self, name: str, root: Path, files: list[Path], rows: dict[Split, list[_PqRow]], collector: RowCollector
    ):
        """Wrap rows already validated by a loader; ``collector`` holds the skipped-row messages and count."""
        super().__init__(name, root, rows, collector.skipped, collector.n_skipped)
        self.files = files
        self._cells = ImageCells()

    def _case(self, row: _PqRow, split: Split, index: int) -> Case:
        """The row's Case; its image is decoded when loaded."""
        case = Case(
            id=f"{self.name}/{split}/{index}",
            question=row.question,
            answer=row.answer,
            answer_type=row.answer_type,
            options=row.options,
            modality=row.modality,
            organ=row.organ,
            source=self.name,
            split=split,
            meta=dict(row.meta),
        )
        return case.with_image_factory(lambda: self.image(row))

    def image(self, row: _PqRow) -> Image.Image:
        """Decode one row's image (bytes in the file, or a relative ``path`` under the dataset directory)."""
        where = f"{self.files[row.file]} row {row.row} column {row.column!r}"
        value = self._cells.cell(self.files[row.file], row.row, row.column, where)
        data, path = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (value, None)
        if data is None and path:
            return load_image_file(safe_join(self.root, str(path)))
        if not isinstance(data, bytes) or not data:
            raise ImageLoadError(f"{where}: no image bytes")
        return decode_image(data, where)


def decode_image(data: bytes, where: str) -> Image.Image:
    """Decode image bytes as RGB, refusing corrupt and oversized images with a message naming ``where``."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            image = decode_8bit(opened, f"{where}: image", "minmax")
        del opened  # frees the decoded pixels of a high-bit-depth image before the RGB copy is made
        return image if image.mode == "RGB" else image.convert("RGB")
    except ImageLoadError:
        raise
    except (OSError, SyntaxError, ValueError, TypeError, Image.DecompressionBombError) as exc:
        raise ImageLoadError(f"{where}: cannot decode image: {exc}") from None


def _split_parquets(root: Path, names: Mapping[Split, tuple[str, ...]]) -> dict[Split, list[Path]]:
    """``{split: files}`` for ``NAME-*.parquet`` / ``NAME.parquet`` in ``root`` or ``root/data``."""
    found: dict[Split, list[Path]] = {}
    for folder in (root, root / "data"):
        for split, stems in names.items():
            for stem in stems:
                files = sorted({*folder.glob(f"{stem}-*.parquet"), *folder.glob(f"{stem}.parquet")})
                if files and split not in found:
                    found[split] = files
    return found


def _text(record: Mapping[str, Any], key: str) -> str:
    value = record.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise SourceError(f"field {key!r} is missing or empty")
    if isinstance(value, (bytes, dict, list)):
        raise SourceError(f"field {key!r} must be text, got {type(value).__name__}")
    return str(value).strip()


# ---------------------------------------------------------------------------------------------
# Hugging Face exports of VQA-RAD, SLAKE, PathVQA

HF_DATASETS: dict[str, str] = {"vqa_rad": "unknown", "slake": "unknown", "path_vqa": "pathology"}
"""Datasets :func:`load_hf_parquet` reads, with the modality of a case whose row names none."""
HF_TEXT_COLUMNS = ("question", "answer", "answer_type", "q_lang", "modality", "location", "qid", "content_type")


def load_hf_parquet(dataset: str, path: str | os.PathLike[str], skip_bad: bool = False) -> ParquetSource:
    """Open a Hugging Face parquet export of VQA-RAD, SLAKE or PathVQA.

    Layout: ``train-*.parquet``, ``validation-*.parquet`` (or ``val``), ``test-*.parquet`` in ``path`` or
    ``path/data`` (as the Hub stores them), with columns ``image`` (``{"bytes", "path"}`` or raw bytes),
    ``question`` and ``answer``. Optional columns: ``answer_type`` (SLAKE's ``CLOSED``/``OPEN``; a yes/no
    answer is CLOSED otherwise), ``q_lang`` (only ``en`` rows are kept), ``modality``, ``location`` (organ).
    These exports carry no boxes, so their cases have no gold regions.
    """
    if dataset not in HF_DATASETS:
        raise SourceError(f"no Hugging Face parquet reader for {dataset!r}; choose from {', '.join(HF_DATASETS)}")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise SourceError(f"{dataset} parquet directory not found: {root}")
    found = _split_parquets(root, HF_SPLITS)
    if not found:
        raise SourceError(
            f"no {dataset} parquet files in {root} or {root / 'data'}: expected train-*.parquet, test-*.parquet"
        )
    collector = RowCollector(skip_bad)
    files: list[Path] = []
    rows: dict[Split, list[_PqRow]] = {split: [] for split in SPLITS}
    not_english = 0
    for split, paths in found.items():
        for path_ in paths:
            files.append(path_)
            names, records = read_text_columns(path_, HF_TEXT_COLUMNS, ("question", "answer"))
            image_column = _image_column(path_, names)
            for number, record in records:
                with collector.row(f"{path_} row {number}"):
                    if isinstance(record, SourceError):
                        raise record
                    if str(record.get("q_lang") or "en").strip().lower() != "en":
                        not_english += 1
                        continue
                    rows[split].append(_hf_row(dataset, record, len(files) - 1, number, image_column))
    source = ParquetSource(dataset, root, files, rows, collector)
    if not_english:
        source.excluded["not_english"] = not_english
    return source


def _image_column(path: Path, names: list[str]) -> str:
    for name in ("image", "img", "image_1"):
        if name in names:
            return name
    raise SourceError(f"{path}: no image column (image, img or image_1); it has {', '.join(names)}")


def _hf_row(dataset: str, record: Mapping[str, Any], file: int, number: int, column: str) -> _PqRow:
    answer = _text(record, "answer")
    meta: dict[str, str | int | float | bool] = {}
    if record.get("answer_type"):
        answer_type, meta = dataset_answer_type(str(record["answer_type"]), answer)
    else:
        answer_type = AnswerType.CLOSED if is_yes_no(answer) else AnswerType.OPEN
    for key in ("qid", "content_type"):
        if record.get(key) not in (None, ""):
            meta[key] = str(record[key])
    modality = record.get("modality")
    return _PqRow(
        question=_text(record, "question"),
        answer=answer,
        answer_type=answer_type,
        file=file,
        row=number,
        column=column,
        modality=normalise_modality(str(modality)) if modality else HF_DATASETS[dataset],
        organ=str(record.get("location") or "unknown").strip().lower(),
        meta=meta,
    )


# ---------------------------------------------------------------------------------------------
# MMMU, Health & Medicine

MMMU_TEXT_COLUMNS = ("id", "question", "options", "answer", "question_type", "img_type", "subfield")


def load_mmmu(
    path: str | os.PathLike[str], subjects: tuple[str, ...] | None = None, skip_bad: bool = False
) -> ParquetSource:
    """Open MMMU's Health & Medicine subjects: ``SUBJECT/{dev,validation,test}-*.parquet`` under ``path``.

    Columns: ``id``, ``question``, ``options`` (a list written as a string), ``answer`` (a letter for
    multiple choice), ``image_1``..``image_7``, ``question_type`` (``multiple-choice`` or ``open``).

    - A letter answer maps to its option (a CHOICE case); an open answer is an OPEN case (CLOSED if yes/no).
    - ``<image 1>`` in the question becomes "the image".
    - One image per case: questions that show several images (``image_2``..``image_7`` set, or ``<image N>``
      with N > 1 in the question or options) are skipped and counted in ``source.excluded["multi_image"]``;
      so are questions whose answer is hidden (the test split's ``?``) in ``excluded["unanswered"]``.
    - Splits: ``dev`` -> train, ``validation`` -> validation, ``test`` -> test.

    ``subjects=None`` reads every Health & Medicine subject folder present; named subjects must all be there.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise SourceError(f"MMMU directory not found: {root}")
    if subjects is None:
        subjects = tuple(s for s in MMMU_HEALTH_SUBJECTS if (root / s).is_dir())
        if not subjects:
            raise SourceError(
                f"no MMMU Health & Medicine subject folder in {root}: expected {', '.join(MMMU_HEALTH_SUBJECTS)}"
            )
    for subject in subjects:
        if subject not in MMMU_HEALTH_SUBJECTS:
            close = difflib.get_close_matches(subject, MMMU_HEALTH_SUBJECTS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise SourceError(
                f"unknown MMMU subject {subject!r}.{hint} Health & Medicine: {', '.join(MMMU_HEALTH_SUBJECTS)}"
            )
        if not (root / subject).is_dir():
            raise SourceError(f"MMMU subject folder not found: {root / subject}")
    collector = RowCollector(skip_bad)
    files: list[Path] = []
    rows: dict[Split, list[_PqRow]] = {split: [] for split in SPLITS}
    excluded = {"multi_image": 0, "unanswered": 0}
    for subject in subjects:
        for split, paths in _split_parquets(root / subject, MMMU_SPLITS).items():
            for path_ in paths:
                files.append(path_)
                more = tuple(f"{c}.path" for c in MMMU_IMAGE_COLUMNS[1:])  # struct nulls only: no image bytes read
                _, records = read_text_columns(path_, MMMU_TEXT_COLUMNS + more, ("id", "question", "answer", "image_1"))
                for number, record in records:
                    with collector.row(f"{path_} row {number}"):
                        if isinstance(record, SourceError):
                            raise record
                        row = _mmmu_row(record, subject, len(files) - 1, number)
                        if isinstance(row, str):
                            excluded[row] += 1
                        else:
                            rows[split].append(row)
    if not files:
        raise SourceError(
            f"no MMMU parquet files under {root} for {', '.join(subjects)}: expected SUBJECT/validation-*.parquet"
        )
    source = ParquetSource("mmmu", root, files, rows, collector)
    source.excluded = {k: v for k, v in excluded.items() if v}
    return source


def parse_options(text: Any) -> tuple[str, ...]:
    """MMMU's ``options``: a Python list literal of texts (or numbers) in a string.

    >>> parse_options("['5 mg', '10 mg']")
    ('5 mg', '10 mg')
    >>> parse_options("[]")
    ()
    >>> parse_options("[['5 mg'], '10 mg']")
    Traceback (most recent call last):
    ...
    medeyes_env.errors.SourceError: option 1 must be text, got list ['5 mg']
    """
    if isinstance(text, list):
        return tuple(_option(v, k) for k, v in enumerate(text, start=1))
    if not isinstance(text, str) or len(text) > MAX_OPTIONS_CHARS:
        raise SourceError(f"options must be a list written as a string, got {str(text)[:80]!r}")
    try:
        value = ast.literal_eval(text.strip() or "[]")  # literals only: never evaluates code
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):  # TypeError: {[]: 1}, {[1]}
        raise SourceError(f"options {text[:80]!r} is not a list literal") from None
    if not isinstance(value, list):
        raise SourceError(f"options {text[:80]!r} is not a list")
    return tuple(_option(v, k) for k, v in enumerate(value, start=1))


def _option(value: Any, number: int) -> str:
    """One option as text: a string, or a finite number written as text; anything else names the option."""
    finite_number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not (isinstance(value, str) or finite_number):
        raise SourceError(f"option {number} must be text, got {type(value).__name__} {str(value)[:80]}")
    text = str(value).strip()
    if not text:
        raise SourceError(f"option {number} is empty")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise SourceError(f"option {number} is not UTF-8 text (a lone surrogate {text[:80]!r})") from None
    return text


def _mmmu_row(record: Mapping[str, Any], subject: str, file: int, number: int) -> _PqRow | str:
    """One MMMU question as a row, or the reason it is left out (``multi_image``, ``unanswered``)."""
    question, answer = _text(record, "question"), _text(record, "answer")
    options = parse_options(record.get("options") or "[]")
    tags = {k.lstrip("0") for k in _IMAGE_TAG.findall(" ".join((question, *options)))}  # text: no int of 5000 digits
    if any(record.get(f"{c}.path", record.get(c)) is not None for c in MMMU_IMAGE_COLUMNS[1:]) or tags - {"1"}:
        return "multi_image"
    if answer == "?":
        return "unanswered"
    meta: dict[str, str | int | float | bool] = {"mmmu_id": _text(record, "id"), "subject": subject}
    if record.get("subfield"):
        meta["subfield"] = str(record["subfield"])
    kind = str(record.get("question_type") or ("multiple-choice" if options else "open")).strip().lower()
    if kind == "multiple-choice":
        letter = answer.strip().upper()
        if len(letter) != 1 or not 0 <= ord(letter) - ord("A") < len(options):
            raise SourceError(f"answer {answer!r} is not a letter among {len(options)} options")
        meta["answer_label"] = letter
        answer, answer_type = options[ord(letter) - ord("A")], AnswerType.CHOICE
    else:
        answer_type, options = (AnswerType.CLOSED if is_yes_no(answer) else AnswerType.OPEN), ()
    return _PqRow(
        question=_IMAGE_TAG.sub("the image", question),
        answer=answer,
        answer_type=answer_type,
        file=file,
        row=number,
        column="image_1",
        options=options,
        modality=str(record.get("img_type") or "unknown").strip("[]'\" ").lower() or "unknown",
        organ="unknown",
        meta=meta,
    )


# ---------------------------------------------------------------------------------------------
# Registration


def _subjects(value: str) -> tuple[str, ...] | None:
    return tuple(s.strip() for s in value.split(",") if s.strip()) or None


def _path_and_skip(argument: str | None, name: str, options: dict[str, str]) -> tuple[Path, bool]:
    path, values = parse_spec_argument(argument, name, options)
    return path, parse_flag(values["skip_bad"], "skip_bad")


def _open_mmmu(argument: str | None) -> ParquetSource:
    path, values = parse_spec_argument(argument, "mmmu", {"skip_bad": "0", "subjects": ""})
    return load_mmmu(path, _subjects(values["subjects"]), parse_flag(values["skip_bad"], "skip_bad"))


for _name in HF_DATASETS:
    register_source(
        f"{_name}_hf",
        lambda argument, _name=_name: load_hf_parquet(
            _name, *_path_and_skip(argument, f"{_name}_hf", {"skip_bad": "0"})
        ),
    )
register_source("mmmu", _open_mmmu)
