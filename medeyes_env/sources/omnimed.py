"""OmniMedVQA (``omnimedvqa:/data/OmniMedVQA``): ``QA_information/*/*.json`` records over ``Images/``.

Each JSON file (one per source dataset, under ``Open-access/`` or ``Restricted-access/``) is an array of
records with ``question``, ``gt_answer``, ``option_A``..``option_D`` (some absent or empty), ``image_path``
(relative to the dataset root, e.g. ``Images/ACRIMA/Im553_g_ACRIMA.png``), ``modality_type`` and
``dataset``. Every record is a multiple-choice case; the benchmark has no official split, so all cases
are in ``test``. The shared rules of :mod:`medeyes_env.sources.files` hold: unsafe image paths are
refused, a missing image or bad record names ``FILE item N`` (or is skipped with ``skip_bad=1``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from medeyes_env.cases import AnswerType
from medeyes_env.errors import SourceError
from medeyes_env.sources import register_source
from medeyes_env.sources.rows import (
    FileRow,
    FileSource,
    RowCollector,
    parse_flag,
    parse_record,
    parse_spec_argument,
    read_records,
    text_field,
)

OPTION_KEYS = ("option_A", "option_B", "option_C", "option_D")
_MODALITIES = {"x-ray": "xray", "ct(computed tomography)": "ct", "mr (mag-netic resonance imaging)": "mri"}


def load_omnimedvqa(path: str | os.PathLike[str], skip_bad: bool = False) -> FileSource:
    """Open OmniMedVQA from its release directory (the one holding ``QA_information/`` and ``Images/``)."""
    root = Path(path).expanduser()
    qa = root / "QA_information"
    files = sorted(qa.glob("*/*.json")) if qa.is_dir() else []
    if not files:
        raise SourceError(f"no OmniMedVQA question files in {qa}: expected QA_information/*/*.json")
    collector = RowCollector(skip_bad)
    for file in files:
        for where, item in read_records(file):
            with collector.row(where):
                collector.rows["test"].append(_row(parse_record(item), root, collector, file.parent.name))
    return collector.source("omnimedvqa", root)


def _row(record: dict[str, Any], root: Path, collector: RowCollector, access: str) -> FileRow:
    options = tuple(str(record[k]).strip() for k in OPTION_KEYS if record.get(k) not in (None, ""))
    answer = text_field(record, "gt_answer")
    if answer not in options:
        raise SourceError(f"gt_answer {answer!r} is not one of the options {list(options)}")
    modality = text_field(record, "modality_type", required=False, default="unknown").lower()
    meta: dict[str, str | int | float | bool] = {"access": access}
    for key in ("question_id", "dataset", "question_type"):
        if record.get(key) not in (None, ""):
            meta[key] = str(record[key])
    return FileRow(
        question=text_field(record, "question"),
        answer=answer,
        answer_type=AnswerType.CHOICE,
        image_path=collector.image(root, text_field(record, "image_path")),
        options=options,
        modality=_MODALITIES.get(modality, modality),
        meta=meta,
    )


def _open(argument: str | None) -> FileSource:
    path, values = parse_spec_argument(argument, "omnimedvqa", {"skip_bad": "0"})
    return load_omnimedvqa(path, skip_bad=parse_flag(values["skip_bad"], "skip_bad"))


register_source("omnimedvqa", _open)
