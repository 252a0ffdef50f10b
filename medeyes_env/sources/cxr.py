"""Chest X-ray datasets whose gold regions come from annotation files: NIH ChestX-ray14 and VinDr-CXR.

Each joins its box annotations to a local image folder and asks two questions per annotated finding:

- presence: "Is there {finding} in this chest X-ray?" -> yes, the finding's boxes as gold regions; and per
  image one "no" question for the first finding of the dataset's list that nobody marked on it;
- location: "On which side of the image is the {finding}?" -> left / right of the image, asked only when
  every box of the finding lies wholly on one side of the vertical midline.

Specs: ``nih_cxr:/data/ChestXray14`` and ``vindr_cxr:/data/vindr``, with ``?skip_bad=1``. Boxes leave as
``xyxy`` pixels. A bad CSV row names ``FILE:LINE``; a missing image names the image and the row.
"""

from __future__ import annotations

import csv
import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

from PIL import Image

from medeyes_env.cases import AnswerType, Box, Region, Split, xywh_to_xyxy
from medeyes_env.errors import ImageLoadError, SourceError
from medeyes_env.sources import register_source
from medeyes_env.sources.rows import (
    FileRow,
    FileSource,
    RowCollector,
    clip_box,
    image_size,
    parse_flag,
    parse_spec_argument,
)
from medeyes_env.strict_json import BadInput, lines

NIH_BBOX_CSV = "BBox_List_2017.csv"
NIH_IMAGE_FOLDERS = (*(f"images_{k:03d}/images" for k in range(1, 13)), "images", "")
NIH_FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltrate", "Mass", "Nodule", "Pneumonia", "Pneumothorax")
VINDR_FILES: dict[Split, str] = {"train": "annotations_train.csv", "test": "annotations_test.csv"}
VINDR_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_Boxes = dict[str, dict[str, list[Box]]]  # image -> finding -> boxes


def _csv_rows(path: Path) -> Iterator[tuple[str, list[str], dict[str, str]]]:
    """``(FILE:LINE, cells, row by header)`` of every data row."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, [])
            for cells in reader:
                if any(cell.strip() for cell in cells):
                    yield f"{path}:{reader.line_num}", cells, dict(zip(header, cells, strict=False))
    except (csv.Error, UnicodeDecodeError) as exc:
        raise SourceError(f"{path}: malformed CSV ({exc})") from None


def _number(text: str, what: str) -> float:
    """A finite float: ``inf``, ``1e400`` (which float() reads as inf) and ``nan`` are refused."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise SourceError(f"{what} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise SourceError(f"{what} {text.strip()!r} is not a finite number")
    return value


def load_nih_cxr(path: str | os.PathLike[str], skip_bad: bool = False) -> FileSource:
    """Open NIH ChestX-ray14's box subset: ``BBox_List_2017.csv`` at the root, images in ``images_0NN/images/``.

    The CSV's columns are ``Image Index``, ``Finding Label``, ``Bbox [x,y,w,h]`` (its four numbers spill into
    four columns under that header) and three unnamed empty ones. ``test_list.txt`` / ``train_val_list.txt``
    at the root split the images when present; otherwise every case is in ``test``.
    """
    root = Path(path).expanduser()
    csv_path = root / NIH_BBOX_CSV
    if not csv_path.is_file():
        raise SourceError(f"NIH ChestX-ray14 box file not found: {csv_path}")
    collector = RowCollector(skip_bad)
    boxes: _Boxes = defaultdict(lambda: defaultdict(list))
    where_of: dict[str, str] = {}
    for where, cells, _ in _csv_rows(csv_path):
        with collector.row(where):
            if len(cells) < 6:
                raise SourceError(f"expected Image Index, Finding Label and 4 box numbers, got {len(cells)} cells")
            image, label = cells[0].strip(), cells[1].strip()
            x, y, w, h = (_number(v, "box value") for v in cells[2:6])
            if w <= 0 or h <= 0 or not image or not label:
                raise SourceError(f"row {cells[:6]} has an empty name or a box without area")
            boxes[image][label].append(xywh_to_xyxy((x, y, w, h)))
            where_of.setdefault(image, where)
    splits = _nih_splits(root, collector)
    for image, findings in boxes.items():
        split: Split = splits.get(image, "test")
        with collector.row(where_of[image]):
            collector.rows[split] += _questions(
                "nih_cxr", root, image, findings, NIH_FINDINGS, NIH_IMAGE_FOLDERS, collector
            )
    return collector.source("nih_cxr", root)


def _nih_splits(root: Path, collector: RowCollector) -> dict[str, Split]:
    """Image name -> split from the release's lists; a line that is not UTF-8 is ``FILE:LINE`` (or skipped).

    Skipping such a line loses no image: every name in the box CSV decoded as UTF-8, so none can match it.
    """
    splits: dict[str, Split] = {}
    for name, split in (("train_val_list.txt", "train"), ("test_list.txt", "test")):
        if (root / name).is_file():
            with (root / name).open("rb") as handle:
                for number, line in lines(handle):
                    with collector.row(f"{root / name}:{number}"):
                        if isinstance(line, BadInput):
                            raise SourceError(str(line))
                        if line.strip():
                            splits[line.strip()] = split
    return splits


def load_vindr_cxr(path: str | os.PathLike[str], skip_bad: bool = False) -> FileSource:
    """Open VinDr-CXR: ``annotations_train.csv`` / ``annotations_test.csv`` and PNG or JPEG exports of the images.

    Columns ``image_id``, ``rad_id``, ``class_name``, ``x_min``, ``y_min``, ``x_max``, ``y_max``; an image has
    one row per reader and finding (train: three readers; ``No finding`` rows have no box). Every reader's box
    is a gold region. Images are looked up as ``IMAGE_ID.png`` (or ``.jpg``) in ``SPLIT/``, ``SPLIT_png/``,
    ``images/`` and the root (the release's DICOM files must be exported to PNG first).
    """
    root = Path(path).expanduser()
    present = {split: root / name for split, name in VINDR_FILES.items() if (root / name).is_file()}
    if not present:
        raise SourceError(f"no VinDr-CXR annotation files in {root}: expected {', '.join(VINDR_FILES.values())}")
    collector = RowCollector(skip_bad)
    for split, csv_path in present.items():
        boxes: _Boxes = defaultdict(lambda: defaultdict(list))
        where_of: dict[str, str] = {}
        classes: list[str] = []
        for where, _, row in _csv_rows(csv_path):
            with collector.row(where):
                image, label = (row.get(k, "").strip() for k in ("image_id", "class_name"))
                if not image or not label:
                    raise SourceError("image_id or class_name is empty")
                where_of.setdefault(image, where)
                findings = boxes[image]
                if label == "No finding":
                    continue
                box = tuple(_number(row.get(k, ""), k) for k in ("x_min", "y_min", "x_max", "y_max"))
                Region(box=box)  # type: ignore[arg-type]  # refuses an unordered box, naming it
                findings[label].append(box)  # type: ignore[arg-type]
                classes += [label] if label not in classes else []
        folders = (split, f"{split}_png", "images", "")
        for image, findings in boxes.items():
            with collector.row(where_of[image]):
                name = _vindr_image(root, image, folders)
                collector.rows[split] += _questions(
                    "vindr_cxr", root, name, findings, tuple(sorted(classes)), folders, collector
                )
    return collector.source("vindr_cxr", root)


def _vindr_image(root: Path, image: str, folders: tuple[str, ...]) -> str:
    for extension in VINDR_IMAGE_EXTENSIONS[1:]:
        for folder in folders:
            if (root / folder / f"{image}{extension}").is_file():
                return f"{image}{extension}"
    return f"{image}.png"  # the collector names every folder tried when it is missing


def _questions(
    source: str,
    root: Path,
    image: str,
    findings: dict[str, list[Box]],
    vocabulary: tuple[str, ...],
    folders: tuple[str, ...],
    collector: RowCollector,
) -> list[FileRow]:
    """Presence (yes per finding, one no) and location questions about one image."""
    path = collector.image(root, image, folders)
    size = _header_size(path)

    def row(question: str, answer: str, kind: AnswerType, finding: str, **fields: object) -> FileRow:
        meta = {"image": image, "family": "location" if kind is AnswerType.CHOICE else "presence", "finding": finding}
        return FileRow(
            question, answer, kind, path, modality="xray", organ="chest", image_size=size, meta=meta, **fields
        )  # type: ignore[arg-type]

    rows: list[FileRow] = []
    for label, boxes in sorted(findings.items()):
        regions = tuple(Region(box=b, label=label) for box in boxes if (b := clip_box(box, size)) is not None)
        collector.excluded["boxes_outside_image"] += len(boxes) - len(regions)
        if not regions:
            continue
        rows.append(row(f"Is there {_article(label.lower())} in this chest X-ray?", "yes", AnswerType.CLOSED, label,
                        regions=regions))  # fmt: skip
        middle = size[0] / 2
        sides = {"left" if r.box[2] <= middle else "right" if r.box[0] >= middle else "both" for r in regions}
        if len(sides) == 1 and "both" not in sides:  # a box across the midline has no single right answer
            options = ("left side of the image", "right side of the image")
            question = f"On which side of the image is the {label.lower()}?"
            rows.append(row(question, f"{sides.pop()} side of the image", AnswerType.CHOICE, label,
                            options=options, regions=regions))  # fmt: skip
    absent = next((f for f in vocabulary if f not in findings), None)
    if absent is not None:
        rows.append(row(f"Is there {_article(absent.lower())} in this chest X-ray?", "no", AnswerType.CLOSED, absent))
    return rows


def _header_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from the file header without decoding pixels.

    PNG is read as stored: Pillow finds a PNG's EXIF orientation only by decoding the image, and opening
    100k questions must decode none (X-ray PNG exports carry no orientation); other formats go through
    :func:`image_size`, which applies EXIF orientation from the header.
    """
    try:
        with Image.open(path) as opened:
            if opened.format == "PNG":
                return opened.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageLoadError(f"cannot read image {path}: {exc}") from None
    return image_size(path)


def _article(finding: str) -> str:
    """``an effusion``, ``a nodule``, ``cardiomegaly`` (mass nouns without an article)."""
    if finding in ("cardiomegaly", "atelectasis", "pneumonia", "pneumothorax", "consolidation", "infiltration"):
        return finding
    return f"{'an' if finding[:1] in 'aeiou' else 'a'} {finding}"


def _opener(name: str, load: Callable[..., FileSource]) -> Callable[[str | None], FileSource]:
    def factory(argument: str | None) -> FileSource:
        path, values = parse_spec_argument(argument, name, {"skip_bad": "0"})
        return load(path, skip_bad=parse_flag(values["skip_bad"], "skip_bad"))

    return factory


register_source("nih_cxr", _opener("nih_cxr", load_nih_cxr))
register_source("vindr_cxr", _opener("vindr_cxr", load_vindr_cxr))
