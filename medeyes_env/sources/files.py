"""Local dataset loaders: files on disk become :class:`~medeyes_env.cases.Case` objects, once, here.

Spec strings (``open_source``), each ``NAME:PATH`` with optional ``?key=value&...`` options:

- ``jsonl:/data/cases.jsonl``: MedEyes' own JSON Lines format (:func:`load_jsonl`, this module).
- ``slake:/data/Slake1.0``: SLAKE (:func:`~medeyes_env.sources.medvqa.load_slake`), boxes converted from ``xywh``.
- ``vqa_rad:/data/VQA_RAD``: VQA-RAD (:func:`~medeyes_env.sources.medvqa.load_vqa_rad`).
- ``path_vqa:/data/pvqa``: PathVQA exported to CSV/JSON/JSONL (:func:`~medeyes_env.sources.medvqa.load_path_vqa`).
- ``pmc_vqa:/data/PMC-VQA``: PMC-VQA CSV files (:func:`~medeyes_env.sources.medvqa.load_pmc_vqa`).

The machinery they share (the source object, the per-run row collector, record readers) is in
:mod:`medeyes_env.sources.rows`.

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

import difflib
import os
import re
from pathlib import Path
from typing import Any

from medeyes_env.cases import (
    AnswerType,
    Case,
    Region,
    Split,
)
from medeyes_env.errors import SourceError
from medeyes_env.sources import register_source
from medeyes_env.sources.rows import (
    FileRow,
    FileSource,
    RowCollector,
    boxes_of,
    parse_flag,
    parse_record,
    spec_factory,
    text_field,
)
from medeyes_env.strict_json import BadInput
from medeyes_env.strict_json import lines as text_lines

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


REGION_KEYS = frozenset({"box", "label", "shape"})
"""Keys of a JSONL region: a box, a shape (GeoJSON MultiPolygon coordinates under ``polygons``) or both."""


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
    collector = RowCollector(skip_bad)
    seen: dict[str, int] = {}
    with path.open("rb") as handle:
        for number, line in text_lines(handle):
            if not isinstance(line, BadInput) and not line.strip():
                continue
            where = f"{path}:{number}"
            with collector.row(where):
                split, row = _jsonl_row(parse_record(line), root, collector)
                case_id = row.case_id or ""
                if case_id in seen:
                    raise SourceError(f"duplicate id {case_id!r} (first on line {seen[case_id]})")
                _validate(row, split)
                seen[case_id] = number
                collector.rows[split].append(row)
    return collector.source("jsonl", root)


def _jsonl_row(record: dict[str, Any], root: Path, collector: RowCollector) -> tuple[Split, FileRow]:
    unknown = sorted(set(record) - set(JSONL_FIELDS))
    if unknown:
        close = difflib.get_close_matches(unknown[0], JSONL_FIELDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SourceError(f"unknown field {unknown[0]!r}{hint}; fields are: {', '.join(JSONL_FIELDS)}")
    raw_type = text_field(record, "answer_type").lower()
    try:
        answer_type = AnswerType(raw_type)
    except ValueError:
        raise SourceError(f"answer_type {raw_type!r} must be one of closed, choice, open") from None
    options = record.get("options", [])
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise SourceError(f"options must be a list of texts, got {options!r}")
    answer = text_field(record, "answer")
    if answer_type is AnswerType.CHOICE and answer not in options and re.fullmatch(r"[A-Za-z]", answer):
        letter = ord(answer.upper()) - ord("A")
        if letter < len(options):
            answer = options[letter]
    split_name = text_field(record, "split", required=False, default="test").lower()
    if split_name not in _SPLIT_ALIASES:
        raise SourceError(f"split {split_name!r} must be one of train, validation (val), test")
    meta = record.get("meta", {})
    if not isinstance(meta, dict) or not all(
        isinstance(v, (str, int, float, bool)) and isinstance(k, str) for k, v in meta.items()
    ):
        raise SourceError(f"meta must be an object of text/number/bool values, got {meta!r}")
    image_path = collector.image(root, text_field(record, "image"))
    regions_raw = record.get("regions", [])
    if not isinstance(regions_raw, list):
        raise SourceError(f"regions must be a list of {{box, label}} objects, got {regions_raw!r}")
    regions = []
    for region in regions_raw:
        if not isinstance(region, dict) or not {"box", "shape"} & set(region) or set(region) - REGION_KEYS:
            raise SourceError(
                f"each region must be {{'box': [x1, y1, x2, y2], 'label': text}} (and/or 'shape': "
                f"{{'polygons': [[[[x, y], ...]]]}}), got {region!r}"
            )
        box = None
        if "box" in region:
            boxes = boxes_of(region["box"], "region box")
            if len(boxes) != 1:
                raise SourceError(f"a region has one box [x1, y1, x2, y2], got {region['box']!r}")
            box = boxes[0]
        label = region.get("label")
        if label is not None and not isinstance(label, str):
            raise SourceError(f"a region label must be text, got {type(label).__name__} {label!r}")
        shape = region.get("shape")  # validated by Region (Shape): valid, non-empty, inside the box
        regions.append(Region(box=box, shape=shape, label=label if label is not None else "abnormality"))
    size = collector.size(image_path) if regions else None
    row = FileRow(
        question=text_field(record, "question"),
        answer=answer,
        answer_type=answer_type,
        image_path=image_path,
        options=tuple(options),
        regions=tuple(regions),
        modality=text_field(record, "modality", required=False, default="unknown"),
        organ=text_field(record, "organ", required=False, default="unknown"),
        image_size=size,
        meta=meta,
        case_id=text_field(record, "id"),
    )
    return _SPLIT_ALIASES[split_name], row


def _validate(row: FileRow, split: Split) -> None:
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
# Registration


register_source(
    "jsonl",
    spec_factory(
        "jsonl", {"skip_bad": "0"}, lambda p, o: load_jsonl(p, skip_bad=parse_flag(o["skip_bad"], "skip_bad"))
    ),
)
