"""Hostile dataset files for every layout (jsonl, SLAKE, VQA-RAD json, PMC-VQA csv): each is a named error with
FILE:LINE, or skipped and counted under ``skip_bad=1``, or loaded correctly."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medeyes_env.cases import safe_join
from medeyes_env.errors import ImageLoadError, SourceError, UnsafePathError
from medeyes_env.sources import open_source

GOOD = {"id": "ok", "image": "img/a.png", "question": "Is there a nodule?", "answer": "yes", "answer_type": "closed"}


def _dataset(tmp_path: Path, bad_line: bytes) -> Path:
    """A JSONL dataset: a good line, the hostile line, another good line."""
    (tmp_path / "img").mkdir(exist_ok=True)
    Image.new("L", (64, 48), 128).save(tmp_path / "img" / "a.png")
    good2 = json.dumps({**GOOD, "id": "ok2"}).encode()
    (tmp_path / "cases.jsonl").write_bytes(json.dumps(GOOD).encode() + b"\n" + bad_line + b"\n" + good2 + b"\n")
    return tmp_path / "cases.jsonl"


def _line(**fields) -> bytes:
    return json.dumps({**GOOD, "id": "bad", **fields}).encode()


BOX = '"regions": [{"box": [1, 2, 3, 4], "label": "x"}]'
JSONL_CASES = {
    "non-utf8": (
        b'{"id": "bad", "question": "\xff\xfe"}',
        SourceError,
        r"cases.jsonl:2: not UTF-8 text \(byte 0xff at column 28\)",
    ),
    "deep-nesting": (b"[" * 50_000 + b"]" * 50_000, SourceError, r"cases.jsonl:2: JSON nested too deeply"),
    "duplicate-key": (
        _line()[:-1] + b', "answer": "no"}',
        SourceError,
        r"cases.jsonl:2: duplicate key 'answer' in one object",
    ),
    "int-overflow-box": (
        _line()[:-1] + b', "regions": [{"box": [1, 2, 1' + b"0" * 400 + b", 4]}]}",
        SourceError,
        r"cases.jsonl:2: region box: 1000000000\.\.\. \(401 digits\) is too large for a number",
    ),
    "5000-digit-int": (
        b'{"id": ' + b"9" * 5000 + b"}",
        SourceError,
        r"cases.jsonl:2: invalid JSON \(Exceeds the limit \(4300 digits\)",
    ),
    "nan-box": (
        _line()[:-1] + b', "regions": [{"box": [NaN, 2, 3, 4]}]}',
        SourceError,
        r"cases.jsonl:2: region box: nan is not a finite number",
    ),
    "nul-in-folder": (
        _line(image="im\x00g/a.png"),
        SourceError,
        r"cases.jsonl:2: the image name 'im\\x00g/a.png' contains a NUL byte",
    ),
    "image-dot": (
        _line(image="."),
        ImageLoadError,
        r"cases.jsonl:2: image '\.' names the directory .*, not an image file",
    ),
    "image-is-a-directory": (
        _line(image="img"),
        ImageLoadError,
        r"cases.jsonl:2: image path .*/img is a directory or special file",
    ),
    "label-not-text": (
        _line()[:-1] + b", " + BOX.replace('"x"', "5").encode() + b"}",
        SourceError,
        r"cases.jsonl:2: a region label must be text, got int 5",
    ),
    "not-an-object": (b"[1, 2]", SourceError, r"cases.jsonl:2: expected a JSON object, got list"),
    "escape": (
        _line(image="../../etc/passwd"),
        UnsafePathError,
        r"cases.jsonl:2: path '../../etc/passwd' escapes the dataset directory",
    ),
}


@pytest.mark.parametrize("case", sorted(JSONL_CASES))
def test_hostile_jsonl_line_is_a_named_error_with_its_line_or_skipped(tmp_path, case):
    line, error, message = JSONL_CASES[case]
    path = _dataset(tmp_path, line)
    with pytest.raises(error, match=message):
        open_source(f"jsonl:{path}")
    source = open_source(f"jsonl:{path}?skip_bad=1")
    assert source.size("test") == 2 and source.n_skipped == 1
    assert re.search(message, source.skipped[0]) and [source.case("test", i).id for i in (0, 1)] == ["ok", "ok2"]


def test_null_label_is_the_default_label_not_the_string_none(tmp_path):
    path = _dataset(tmp_path, _line()[:-1] + b', "regions": [{"box": [1, 2, 3, 4], "label": null}]}')
    case = open_source(f"jsonl:{path}").case("test", 1)
    assert [r.label for r in case.regions] == ["abnormality"]  # before: "None"


def test_nul_byte_in_a_path_is_refused_by_safe_join(tmp_path):
    with pytest.raises(UnsafePathError, match=r"path 'a\\x00/b.png' contains a NUL byte"):
        safe_join(tmp_path, "a\x00/b.png")


# ------------------------------------------------------------------------------------------- SLAKE (JSON arrays)


def _slake(tmp_path: Path, train: bytes, detection: bytes | None = b'[{"liver": [1, 2, 10, 10]}]') -> Path:
    root = tmp_path / "Slake1.0"
    (root / "imgs" / "xmlab1").mkdir(parents=True)
    Image.new("L", (64, 64), 100).save(root / "imgs" / "xmlab1" / "source.jpg")
    if detection is not None:
        (root / "imgs" / "xmlab1" / "detection.json").write_bytes(detection)
    (root / "train.json").write_bytes(train)
    return root


SLAKE_ROW = {
    "img_name": "xmlab1/source.jpg",
    "question": "Is the liver normal?",
    "answer": "Yes",
    "answer_type": "CLOSED",
    "q_lang": "en",
}


@pytest.mark.parametrize(
    ("train", "detection", "message"),
    [
        (
            b"[\n" + json.dumps(SLAKE_ROW).encode() + b",\n\xff]",
            None,
            r"train.json:3: not UTF-8 text \(byte 0xff at offset \d+\)",
        ),
        (b"[" * 50_000, None, r"train.json: JSON nested too deeply"),
        (b'[{"question": "a",\n "question": "b"}]', None, r"train.json: duplicate key 'question' in one object"),
        (b'[\n{"a": 1},\n{"b": }]', None, r"train.json:3: invalid JSON \(Expecting value, column 7\)"),
        (
            json.dumps([SLAKE_ROW]).encode(),
            b'[{"liver": [1, 2, 1' + b"0" * 400 + b", 4]}]",
            r"detection.json box 'liver': 1000000000\.\.\. \(401 digits\)",
        ),
        (json.dumps([SLAKE_ROW]).encode(), b"[" * 50_000, r"detection.json: JSON nested too deeply"),
        (
            json.dumps([SLAKE_ROW]).encode(),
            b'{"liver": [1, 2, 3, 4], "liver": [5, 6, 7, 8]}',
            r"detection.json: duplicate key 'liver'",
        ),
    ],
    ids=[
        "non-utf8",
        "deep",
        "duplicate-key",
        "syntax",
        "detection-int-overflow",
        "detection-deep",
        "detection-duplicate",
    ],
)
def test_hostile_slake_files_are_named_errors(tmp_path, train, detection, message):
    root = _slake(tmp_path, train, detection if detection is not None else b"[]")
    with pytest.raises(SourceError, match=message):
        open_source(f"slake:{root}")


def test_slake_detection_json_symlinked_outside_is_refused(tmp_path):
    root = _slake(tmp_path, json.dumps([SLAKE_ROW]).encode(), detection=None)
    outside = tmp_path / "secret.json"
    outside.write_text('[{"liver": [1, 2, 10, 10]}]')
    (root / "imgs" / "xmlab1" / "detection.json").symlink_to(outside)
    with pytest.raises(
        UnsafePathError, match=r"detection.json resolves to .*secret.json, outside the dataset directory"
    ):
        open_source(f"slake:{root}")
    good = _slake(tmp_path / "good", json.dumps([SLAKE_ROW]).encode())
    assert [r.label for r in open_source(f"slake:{good}").case("train", 0).regions] == ["liver"]


def test_vqa_rad_json_not_utf8_names_the_line(tmp_path):
    (tmp_path / "VQA_RAD Dataset Public.json").write_bytes(b'[\n{"image_name": "\xe9"}]')
    with pytest.raises(SourceError, match=r"VQA_RAD Dataset Public.json:2: not UTF-8 text \(byte 0xe9 at offset 18\)"):
        open_source(f"vqa_rad:{tmp_path}")


# ------------------------------------------------------------------------------------------- PMC-VQA (CSV)


def _pmc(tmp_path: Path, rows: list[list[str]], raw_tail: bytes = b"") -> Path:
    (tmp_path / "images").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "images" / "f.jpg")
    with (tmp_path / "train.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Figure_path", "Question", "Answer", "Choice A", "Choice B", "Answer_label"])
        writer.writerows(rows)
    with (tmp_path / "train.csv").open("ab") as handle:
        handle.write(raw_tail)
    return tmp_path


ROW = ["f.jpg", "Which?", "a", "A: a", "B: b", "A"]


def test_csv_row_that_is_not_utf8_is_named_and_skippable(tmp_path):
    root = _pmc(tmp_path, [ROW], raw_tail=b"f.jpg,Wh\xffich?,a,A: a,B: b,A\r\n" + ",".join(ROW).encode() + b"\r\n")
    with pytest.raises(SourceError, match=r"train.csv:3: not UTF-8 text \(byte 0xff\)"):
        open_source(f"pmc_vqa:{root}")
    source = open_source(f"pmc_vqa:{root}?skip_bad=1")
    assert source.size("train") == 2 and source.n_skipped == 1


def test_huge_csv_field_is_a_named_error_with_its_line(tmp_path):
    root = _pmc(tmp_path, [ROW, ["f.jpg", "x" * 200_000, "a", "A: a", "B: b", "A"]])
    with pytest.raises(SourceError, match=r"train.csv:3: malformed CSV \(field larger than field limit \(131072\)\)"):
        open_source(f"pmc_vqa:{root}")


# ------------------------------------------------------------------------------------------- MMMU (parquet)


def _mmmu(tmp_path: Path, **bad: str) -> Path:
    """An MMMU subject whose validation row 1 has the ``bad`` fields; rows 0 and 2 are good."""
    pytest.importorskip("pyarrow")
    from tests.layouts import mmmu_rows, write_parquet

    columns, images = mmmu_rows(3, "Pharmacy"), tuple(f"image_{k}" for k in range(1, 8))
    for key, value in bad.items():
        columns[key][1] = value
    write_parquet(tmp_path / "Pharmacy" / "validation-00000-of-00001.parquet", columns, images)
    return tmp_path


MMMU_CASES = {
    "unhashable-set": ("options", "[{1, [2]}]", r"options '\[\{1, \[2\]\}\]' is not a list literal"),
    "unhashable-key": ("options", "[{[]: 1}]", r"options '\[\{\[\]: 1\}\]' is not a list literal"),
    "nested-list": ("options", "[['a'], 'b']", r"option 1 must be text, got list \['a'\]"),
    "bytes": ("options", "['a', b'x']", r"option 2 must be text, got bytes b'x'"),
    "infinite": ("options", "['a', 1e400]", r"option 2 must be text, got float inf"),
    "empty": ("options", "['a', ' ']", r"option 2 is empty"),
    "lone-surrogate": ("options", "['a', '\\ud800']", r"option 2 is not UTF-8 text"),
}


@pytest.mark.parametrize("case", sorted(MMMU_CASES))
def test_malformed_mmmu_options_are_named_with_file_and_row_or_skipped(tmp_path, case):
    key, value, message = MMMU_CASES[case]
    root = _mmmu(tmp_path, **{key: value})
    with pytest.raises(SourceError, match=r"validation-00000-of-00001\.parquet row 1: " + message):
        open_source(f"mmmu:{root}")
    source = open_source(f"mmmu:{root}?skip_bad=1")
    assert (source.size("validation"), source.n_skipped) == (2, 1)


@pytest.mark.parametrize("tag", ["<image " + "9" * 5000 + ">", "<image 0>", "<image 02>"])
def test_mmmu_image_tag_other_than_1_is_a_multi_image_question_whatever_its_digits(tmp_path, tag):
    source = open_source(f"mmmu:{_mmmu(tmp_path, question=f'Which of {tag} and <image 1>?')}")
    assert (source.size("validation"), source.excluded) == (2, {"multi_image": 1})


# ------------------------------------------------------------------------------------------- parquet bounds


def _hf_parquet(tmp_path: Path, question, image=None, rows: int = 3) -> Path:
    """A VQA-RAD Hub export whose ``question`` column is the pyarrow array ``question`` (``rows`` rows)."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from tests.layouts import png_bytes

    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    if image is None:
        image = pa.array([{"bytes": png_bytes(i), "path": None} for i in range(rows)], type=struct)
    answer = pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows, np.int32)), pa.array(["yes"]))
    (tmp_path / "data").mkdir()
    table = pa.table({"image": image, "question": question, "answer": answer})
    pq.write_table(table, tmp_path / "data" / "test-00000-of-00001.parquet", row_group_size=1 << 20)
    return tmp_path


def _repeated(pa, text, rows: int):
    """``rows`` cells of ``text`` stored once (dictionary-encoded): small on disk, large once expanded."""
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows, np.int32)), pa.array([text], type=pa.binary()))


def test_parquet_file_with_more_rows_than_the_limit_is_refused_from_its_metadata(tmp_path):
    pa = pytest.importorskip("pyarrow")
    rows = 1_000_001  # 3,000,000 such rows took 1.9 GB to open
    nulls = pa.nulls(rows, pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    root = _hf_parquet(tmp_path, _repeated(pa, b"Is there a nodule?", rows), nulls, rows)
    with pytest.raises(SourceError, match=r"test-00000-of-00001.parquet: 1,000,001 rows, above the 1,000,000-row"):
        open_source(f"vqa_rad_hf:{root}?skip_bad=1")


def test_parquet_text_cell_over_the_cap_is_a_named_row_error_or_skipped(tmp_path):
    pa = pytest.importorskip("pyarrow")
    root = _hf_parquet(tmp_path, pa.array(["Is there a nodule?", "x" * 100_000, "Is it CT?"]))
    message = r"test-00000-of-00001.parquet row 1: field 'question' is 100,000 bytes, above the 65,536-byte limit"
    with pytest.raises(SourceError, match=message):
        open_source(f"vqa_rad_hf:{root}")
    source = open_source(f"vqa_rad_hf:{root}?skip_bad=1")
    assert (source.size("test"), source.n_skipped) == (2, 1)


def test_parquet_text_column_that_expands_past_the_limit_is_refused(tmp_path):
    pa = pytest.importorskip("pyarrow")
    root = _hf_parquet(tmp_path, _repeated(pa, b"x" * 60_000, 1_200), rows=1_200)  # 72 MB once expanded
    assert (root / "data" / "test-00000-of-00001.parquet").stat().st_size < 300_000
    message = r"test-00000-of-00001.parquet: column 'question' holds more than 67,108,864 bytes of text"
    with pytest.raises(SourceError, match=message):
        open_source(f"vqa_rad_hf:{root}?skip_bad=1")


def test_parquet_image_cell_over_the_cap_is_named_and_its_neighbours_load(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    from medeyes_env.sources import parquet_files
    from tests.layouts import png_bytes

    monkeypatch.setattr(parquet_files, "MAX_IMAGE_CELL_BYTES", 100_000)  # 64 MB in use: small here, a light test
    cells = pa.array([png_bytes(0), b"\x89PNG" + b"\x00" * 100_000, png_bytes(2)], type=pa.binary())
    struct = pa.StructArray.from_arrays([cells, pa.nulls(3, pa.string())], names=["bytes", "path"])
    source = open_source(f"vqa_rad_hf:{_hf_parquet(tmp_path, pa.array(['a?', 'b?', 'c?']), struct)}")
    message = r"parquet row 1 column 'image': 100,004 image bytes, above the 100,000-byte limit of an image cell"
    with pytest.raises(ImageLoadError, match=message):
        source.case("test", 1).load_image()
    assert source.case("test", 2).load_image().size == (64, 48)


def test_parquet_row_group_of_images_over_the_limit_is_refused_from_its_metadata(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    from medeyes_env.sources import parquet_files
    from tests.layouts import png_bytes

    # 256 MB in use: a 1 kB file whose one row group held 200 images of 5 MB ran out of memory on the first image
    monkeypatch.setattr(parquet_files, "MAX_IMAGE_GROUP_BYTES", 100_000)
    cells = pa.array([png_bytes(0), b"\x00" * 100_000, png_bytes(2)], type=pa.binary())
    source = open_source(f"vqa_rad_hf:{_hf_parquet(tmp_path, pa.array(['a?', 'b?', 'c?']), cells)}")
    message = r"test-00000-of-00001.parquet: row group 0 of column 'image' is 1\d\d,\d\d\d bytes uncompressed, above"
    with pytest.raises(ImageLoadError, match=message):
        source.case("test", 0).load_image()
