"""Loaders of the public medical VQA releases: SLAKE, VQA-RAD, PathVQA and PMC-VQA.

Spec strings ``slake:/data/Slake1.0``, ``vqa_rad:/data/VQA_RAD``, ``path_vqa:/data/pvqa``,
``pmc_vqa:/data/PMC-VQA``; the options and rules every file loader shares are in :mod:`medeyes_env.sources.files`.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import shapely

from medeyes_env.cases import (
    AnswerType,
    Box,
    Region,
    Split,
    open_image,
    safe_join,
    xywh_to_xyxy,
)
from medeyes_env.errors import SourceError, UnsafePathError
from medeyes_env.shapes import Shape, shape_from_mask
from medeyes_env.sources import register_source
from medeyes_env.sources.rows import (
    FileRow,
    FileSource,
    RowCollector,
    boxes_of,
    clip_box,
    dataset_answer_type,
    first_present_key,
    is_yes_no,
    normalise_modality,
    parse_flag,
    parse_record,
    read_records,
    refuse_pickles,
    spec_factory,
    text_field,
)
from medeyes_env.strict_json import BadInput, load_file

# ---------------------------------------------------------------------------------------------
# SLAKE

MAX_DETECTION_BYTES = 16 * 1024**2
"""Largest SLAKE ``detection.json`` read (the real ones are under 2 kB)."""

SLAKE_SPLIT_FILES: dict[Split, str] = {"train": "train.json", "validation": "validate.json", "test": "test.json"}


def load_slake(
    path: str | os.PathLike[str], skip_bad: bool = False, regions: str = "matched", shapes: bool = True
) -> FileSource:
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

    With ``shapes`` (default) and an ``imgs/xmlabN/mask.png`` beside the image (a label map: one grey
    level or colour per structure, 0 or black for background), each box also gets its structure's outline:
    the mask's most frequent non-background label inside the box, traced with scikit-image
    (:func:`~medeyes_env.shapes.shape_from_mask`) and clipped to the box. A box whose mask is empty there,
    or an image without a mask, keeps its box alone. ``shapes=False`` keeps every region a box.
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
    collector = RowCollector(skip_bad)
    detections = functools.cache(functools.partial(_slake_detections, root=root))
    outlines = functools.cache(functools.partial(slake_mask_shapes, root=root)) if shapes else None
    for split, split_file in present.items():
        for where, item in read_records(split_file):
            with collector.row(where):
                record = parse_record(item)
                if str(record.get("q_lang", "en")).strip().lower() == "en":
                    row = _slake_row(record, root, regions, collector, detections, outlines)
                    collector.rows[split].append(row)
    return collector.source("slake", root)


def _slake_row(
    record: dict[str, Any],
    root: Path,
    regions_mode: str,
    collector: RowCollector,
    detections_of: Callable[[Path], tuple[tuple[str, Box], ...]],
    outlines_of: Callable[[Path, tuple[Box, ...]], tuple[Shape | None, ...]] | None = None,
) -> FileRow:
    answer = text_field(record, "answer")
    answer_type, meta = dataset_answer_type(text_field(record, "answer_type"), answer)
    image_path = collector.image(root / "imgs", text_field(record, "img_name"))
    question = text_field(record, "question")
    regions: tuple[Region, ...] = ()
    size = None
    if regions_mode != "none":
        detections = detections_of(image_path.parent / "detection.json")
        if detections:
            size = collector.size(image_path)
            boxes = [(label, clipped) for label, box in detections if (clipped := clip_box(box, size)) is not None]
            text = f" {question} {answer} ".lower()
            matched = [(label, box) for label, box in boxes if re.search(rf"\b{re.escape(label.lower())}\b", text)]
            chosen = matched if (matched and regions_mode == "matched") else boxes
            mask = image_path.parent / "mask.png"
            if outlines_of is not None and mask.is_file():
                outline = dict(zip(boxes, outlines_of(mask, tuple(box for _, box in boxes)), strict=True))
                regions = tuple(Region(box=box, label=label, shape=outline[label, box]) for label, box in chosen)
            else:
                regions = tuple(Region(box=box, label=label) for label, box in chosen)
            meta["regions_matched"] = bool(matched)
    for key in ("qid", "img_id", "content_type", "base_type", "location"):
        if record.get(key) not in (None, ""):
            meta[key] = record[key] if isinstance(record[key], (int, float)) else str(record[key])
    return FileRow(
        question=question,
        answer=answer,
        answer_type=answer_type,
        image_path=image_path,
        regions=regions,
        modality=normalise_modality(str(record.get("modality", "unknown"))),
        organ=str(record.get("location", "unknown")).strip().lower() or "unknown",
        image_size=size,
        meta=meta,
    )


def slake_mask_shapes(path: Path, boxes: tuple[Box, ...], root: Path) -> tuple[Shape | None, ...]:
    """The outline of each box's structure in a SLAKE ``mask.png`` label map (None where the box holds none).

    A box's structure is the most frequent non-background label among the mask's pixels inside it; its
    pixels there are traced (:func:`~medeyes_env.shapes.shape_from_mask`) and the outline clipped to the box.
    A mask that resolves outside ``root``, or whose size differs from the image's, is refused.
    """
    resolved, inside = path.resolve(), root.resolve()
    if inside not in resolved.parents:
        raise UnsafePathError(f"{path} resolves to {resolved}, outside the dataset directory {inside}")
    labels = label_map(path)
    height, width = labels.shape
    shapes: list[Shape | None] = []
    for box in boxes:
        x1, y1, x2, y2 = box
        if x2 > width or y2 > height:
            raise SourceError(f"{path} is {width}x{height}, smaller than box {list(box)} of its image; masks must "
                              "have the image's size (or open slake with shapes=0)")  # fmt: skip
        cols = slice(int(np.floor(x1)), int(np.ceil(x2)))
        rows = slice(int(np.floor(y1)), int(np.ceil(y2)))
        window = labels[rows, cols]
        values, counts = np.unique(window[window != 0], return_counts=True)
        if values.size == 0:
            shapes.append(None)
            continue
        full = np.zeros(labels.shape, dtype=bool)
        full[rows, cols] = window == values[np.argmax(counts)]
        try:
            traced = shape_from_mask(full)
        except ImportError as exc:
            raise SourceError(f"{path}: {exc}; or open slake with shapes=0 to keep its regions as boxes") from None
        clipped = traced.geometry.intersection(shapely.box(*box)) if traced is not None else None
        shapes.append(Shape.from_geometry(clipped) if clipped is not None and clipped.area > 0 else None)
    return tuple(shapes)


def label_map(path: Path) -> np.ndarray:
    """A mask image as a 2-D integer label map: grey levels as they are, a colour image's RGB packed in one int."""
    image = open_image(path, f"mask {path}")
    if image.mode in ("RGB", "RGBA", "P"):
        rgb = np.asarray(image.convert("RGB"), dtype=np.int64)
        return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    return np.asarray(image.convert("I") if image.mode not in ("L", "I", "I;16") else image).astype(np.int64)


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
        for x, y, w, h in boxes_of(value, f"{path} box {label!r}"):
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
    collector = RowCollector(skip_bad)
    for where, item in read_records(json_path):
        with collector.row(where):
            record = parse_record(item)
            answer = text_field(record, "answer")
            answer_type, meta = dataset_answer_type(text_field(record, "answer_type"), answer)
            phrase_type = text_field(record, "phrase_type", required=False, default="freeform").lower()
            split: Split = "test" if phrase_type.startswith("test") else "train"
            organ = text_field(record, "image_organ", required=False, default="unknown").lower()
            meta["phrase_type"] = phrase_type
            for key in ("qid", "question_type"):
                if record.get(key) not in (None, ""):
                    meta[key] = str(record[key])
            row = FileRow(
                question=text_field(record, "question"),
                answer=answer,
                answer_type=answer_type,
                image_path=collector.image(root, text_field(record, "image_name"), VQA_RAD_IMAGE_FOLDERS),
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
        refuse_pickles(root / "qas", "path_vqa")
        refuse_pickles(root, "path_vqa")
        raise SourceError(
            f"no PathVQA annotation files in {root} or {root / 'qas'}: expected train/val/test as .csv, .json or .jsonl"
        )
    collector = RowCollector(skip_bad)
    for split, split_file in files.items():
        folders = (f"images/{split_file.stem}", "images", split_file.stem, "")
        for where, item in read_records(split_file):
            with collector.row(where):
                record = parse_record(item)
                image = text_field(record, first_present_key(record, _IMAGE_KEYS))
                if not Path(image).suffix:
                    image += ".jpg"
                answer = text_field(record, "answer")
                row = FileRow(
                    question=text_field(record, "question"),
                    answer=answer,
                    answer_type=AnswerType.CLOSED if is_yes_no(answer) else AnswerType.OPEN,
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
    collector = RowCollector(skip_bad)
    for split, split_file in files.items():
        for where, item in read_records(split_file):
            with collector.row(where):
                collector.rows[split].append(_pmc_row(parse_record(item), root, collector))
    return collector.source("pmc_vqa", root)


def _pmc_row(record: dict[str, Any], root: Path, collector: RowCollector) -> FileRow:
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
    label = text_field(record, "Answer_label").upper()
    if label not in letters:
        raise SourceError(f"Answer_label {label!r} names none of the choices {letters}")
    answer_text = text_field(record, "Answer", required=False)
    return FileRow(
        question=text_field(record, "Question"),
        answer=options[letters.index(label)],
        answer_type=AnswerType.CHOICE,
        image_path=collector.image(root, text_field(record, "Figure_path"), PMC_VQA_IMAGE_FOLDERS),
        options=tuple(options),
        meta={"answer_label": label, "answer_text": answer_text},
    )


# ---------------------------------------------------------------------------------------------
# Registration


register_source(
    "slake",
    spec_factory(
        "slake",
        {"skip_bad": "0", "regions": "matched", "shapes": "1"},
        lambda p, o: load_slake(
            p,
            skip_bad=parse_flag(o["skip_bad"], "skip_bad"),
            regions=o["regions"],
            shapes=parse_flag(o["shapes"], "shapes"),
        ),
    ),
)
register_source(
    "vqa_rad",
    spec_factory(
        "vqa_rad", {"skip_bad": "0"}, lambda p, o: load_vqa_rad(p, skip_bad=parse_flag(o["skip_bad"], "skip_bad"))
    ),
)
register_source(
    "path_vqa",
    spec_factory(
        "path_vqa", {"skip_bad": "0"}, lambda p, o: load_path_vqa(p, skip_bad=parse_flag(o["skip_bad"], "skip_bad"))
    ),
)
register_source(
    "pmc_vqa",
    spec_factory(
        "pmc_vqa",
        {"skip_bad": "0", "train": "train.csv", "test": ""},
        lambda p, o: load_pmc_vqa(
            p, skip_bad=parse_flag(o["skip_bad"], "skip_bad"), train=o["train"], test=o["test"] or None
        ),
    ),
)
