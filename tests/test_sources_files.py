"""File-based dataset loaders: jsonl, slake, vqa_rad, path_vqa, pmc_vqa, on small fixtures made here."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from medeyes_env.cases import SPLITS, AnswerType
from medeyes_env.errors import ImageLoadError, SourceError, UnsafePathError
from medeyes_env.sources import iter_cases, open_source


def png(path: Path, size: tuple[int, int] = (64, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, 128).save(path)
    return path


def write_jsonl(path: Path, records: list[dict | str]) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


def record(**fields: object) -> dict:
    base = {"id": "c1", "image": "img/a.png", "question": "Is there a nodule?", "answer": "yes"}
    return {**base, "answer_type": "closed", **fields}


# ------------------------------------------------------------------------------------------- jsonl


def test_jsonl_reads_every_field(tmp_path: Path) -> None:
    png(tmp_path / "img/a.png")
    png(tmp_path / "img/b.png", (100, 80))
    write_jsonl(
        tmp_path / "cases.jsonl",
        [
            record(regions=[{"box": [4, 5, 30, 40], "label": "nodule"}], modality="ct", organ="chest", split="train"),
            "",
            {
                "id": "c2",
                "image": "img/b.png",
                "question": "Which lobe?",
                "answer": "B",
                "answer_type": "CHOICE",
                "options": ["upper", "lower"],
                "split": "val",
                "meta": {"origin": "hand", "difficulty": 2},
            },
            record(id="c3", answer="no"),
        ],
    )
    source = open_source(f"jsonl:{tmp_path / 'cases.jsonl'}")
    assert {split: source.size(split) for split in SPLITS} == {"train": 1, "validation": 1, "test": 1}
    first = source.case("train", 0)
    assert first.id == "c1" and first.source == "jsonl" and first.split == "train"
    assert first.regions[0].box == (4.0, 5.0, 30.0, 40.0) and first.regions[0].label == "nodule"
    assert first.image_size == (64, 48) and (first.modality, first.organ) == ("ct", "chest")
    choice = source.case("validation", 0)
    assert choice.answer_type is AnswerType.CHOICE and choice.answer == "lower"  # letter B -> option text
    assert choice.meta == {"origin": "hand", "difficulty": 2}
    assert source.case("test", 0).answer == "no"
    assert first.load_image().size == (64, 48)


def test_jsonl_bad_json_line_names_the_line(tmp_path: Path) -> None:
    png(tmp_path / "img/a.png")
    path = write_jsonl(tmp_path / "cases.jsonl", [record(), record(id="c2"), '{"id": "c3", "image": '])
    with pytest.raises(SourceError) as error:
        open_source(f"jsonl:{path}")
    assert str(error.value).startswith(f"{path}:3: invalid JSON (Expecting value")


def test_jsonl_missing_image_names_the_path(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "cases.jsonl", [record(image="img/missing.png")])
    with pytest.raises(ImageLoadError) as error:
        open_source(f"jsonl:{path}")
    assert str(error.value) == f"{path}:1: image file not found: {tmp_path.resolve() / 'img/missing.png'}"


@pytest.mark.parametrize("image", ["../../etc/passwd", "/etc/passwd", "img/../../outside.png"])
def test_jsonl_refuses_paths_outside_the_dataset(tmp_path: Path, image: str) -> None:
    (tmp_path / "data").mkdir()
    path = write_jsonl(tmp_path / "data/cases.jsonl", [record(image=image)])
    with pytest.raises(UnsafePathError, match=rf"^{path}:1: path '{image}' (escapes|is absolute)"):
        open_source(f"jsonl:{path}")


def test_jsonl_refuses_a_symlink_that_leads_outside(tmp_path: Path) -> None:
    outside = png(tmp_path / "outside.png")
    (tmp_path / "data/img").mkdir(parents=True)
    (tmp_path / "data/img/a.png").symlink_to(outside)
    path = write_jsonl(tmp_path / "data/cases.jsonl", [record()])
    with pytest.raises(UnsafePathError, match=rf"^{path}:1: path 'img/a.png' escapes the dataset directory"):
        open_source(f"jsonl:{path}")


def test_corrupt_png_is_refused_at_load_time_naming_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "img/a.png"
    bad.parent.mkdir()
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    source = open_source(f"jsonl:{write_jsonl(tmp_path / 'cases.jsonl', [record()])}")
    case = source.case("test", 0)
    with pytest.raises(ImageLoadError, match=rf"^cannot read image {bad.resolve()}: "):
        case.load_image()


def test_corrupt_png_with_regions_is_refused_when_opening(tmp_path: Path) -> None:
    bad = tmp_path / "img/a.png"
    bad.parent.mkdir()
    bad.write_bytes(b"GIF89a garbage")
    path = write_jsonl(tmp_path / "cases.jsonl", [record(regions=[{"box": [1, 1, 5, 5]}])])
    with pytest.raises(ImageLoadError, match=rf"^{path}:1: cannot read image {bad.resolve()}"):
        open_source(f"jsonl:{path}")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"answers": "yes"}, "unknown field 'answers' (did you mean 'answer'?)"),
        ({"answer_type": "boolean"}, "answer_type 'boolean' must be one of closed, choice, open"),
        ({"answer": "maybe"}, "a CLOSED answer must be 'yes' or 'no', got 'maybe'"),
        ({"split": "dev"}, "split 'dev' must be one of train, validation (val), test"),
        ({"regions": [{"box": [30, 5, 4, 40]}]}, "is not xyxy with x2 > x1 and y2 > y1"),
        ({"regions": [{"box": [4, 5, 300, 40]}]}, "region [4.0, 5.0, 300.0, 40.0] lies outside the 64x48 image"),
        ({"regions": [{"xywh": [1, 2, 3, 4]}]}, "each region must be {'box': [x1, y1, x2, y2], 'label': text}"),
        ({"question": ""}, "field 'question' is missing or empty"),
        ({"regions": [{"box": [[1, 2, 3, 4], [5, 6, 7, 8]]}]}, "a region has one box [x1, y1, x2, y2]"),
        ({"regions": [{"box": [1, 2, 3]}]}, "region box: expected a box of 4 numbers, got [1, 2, 3]"),
    ],
)
def test_jsonl_malformed_rows_name_line_and_problem(tmp_path: Path, fields: dict, message: str) -> None:
    png(tmp_path / "img/a.png")
    path = write_jsonl(tmp_path / "cases.jsonl", [record(id="ok"), record(**fields)])
    with pytest.raises(SourceError) as error:
        open_source(f"jsonl:{path}")
    assert str(error.value).startswith(f"{path}:2: ")
    assert message in str(error.value)


def test_jsonl_duplicate_ids_are_refused(tmp_path: Path) -> None:
    png(tmp_path / "img/a.png")
    path = write_jsonl(tmp_path / "cases.jsonl", [record(), record(answer="no")])
    with pytest.raises(SourceError, match=r":2: duplicate id 'c1' \(first on line 1\)$"):
        open_source(f"jsonl:{path}")


def test_skip_bad_skips_and_counts(tmp_path: Path) -> None:
    png(tmp_path / "img/a.png")
    path = write_jsonl(
        tmp_path / "cases.jsonl", [record(), "{broken", record(id="c2", image="../x.png"), record(id="c3")]
    )
    source = open_source(f"jsonl:{path}?skip_bad=1")
    assert source.size("test") == 2
    assert source.n_skipped == 2
    assert source.skipped[0].startswith(f"{path}:2: invalid JSON")
    assert source.skipped[1].startswith(f"{path}:3: path '../x.png' escapes")


def test_spec_errors_are_helpful(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"^the 'jsonl' source needs a path: jsonl:/path/to/data$"):
        open_source("jsonl")
    with pytest.raises(SourceError, match=r"unknown option 'skipbad' for source 'jsonl'. Did you mean 'skip_bad'\?"):
        open_source(f"jsonl:{tmp_path}/x.jsonl?skipbad=1")
    with pytest.raises(SourceError, match=r"^JSONL file not found: "):
        open_source(f"jsonl:{tmp_path}/x.jsonl")
    with pytest.raises(SourceError, match=r"option skip_bad='maybe' is not a boolean"):
        open_source(f"jsonl:{tmp_path}/x.jsonl?skip_bad=maybe")


# ------------------------------------------------------------------------------------------- SLAKE


def make_slake(root: Path) -> Path:
    png(root / "imgs/xmlab1/source.jpg", (100, 80))
    png(root / "imgs/xmlab2/source.jpg", (50, 50))
    # xywh on disk; the lung box runs past the right edge of the 100x80 image and gets clipped.
    detections = [{"Liver": [10, 20, 30, 40]}, {"Lung": [90, 5, 20, 10]}]
    (root / "imgs/xmlab1/detection.json").write_text(json.dumps(detections))
    (root / "imgs/xmlab2/detection.json").write_text(json.dumps([]))

    def q(qid: int, img: str, question: str, answer: object, answer_type: str, lang: str = "en") -> dict:
        return {
            "img_id": int(img[5]),
            "img_name": f"{img}/source.jpg",
            "question": question,
            "answer": answer,
            "q_lang": lang,
            "location": "Abdomen",
            "modality": "CT",
            "answer_type": answer_type,
            "base_type": "vqa",
            "content_type": "Organ",
            "triple": ["vhead", "_", "_"],
            "qid": qid,
        }

    train = [
        q(0, "xmlab1", "Where is the liver?", "Left", "OPEN"),
        q(1, "xmlab1", "肝脏在哪里？", "左", "OPEN", lang="zh"),
        q(2, "xmlab1", "Does the picture contain a kidney?", "No", "CLOSED"),
    ]
    test = [
        q(3, "xmlab2", "Is this a CT image?", "Yes", "CLOSED"),
        q(4, "xmlab1", "Which is bigger, liver or lung?", "Liver", "CLOSED"),
    ]
    (root / "train.json").write_text(json.dumps(train, ensure_ascii=False))
    (root / "validate.json").write_text("[]")
    (root / "test.json").write_text(json.dumps(test))
    return root


def test_slake_converts_xywh_to_xyxy_and_keeps_english(tmp_path: Path) -> None:
    root = make_slake(tmp_path / "Slake1.0")
    source = open_source(f"slake:{tmp_path}")  # the parent of Slake1.0 works too
    assert {split: source.size(split) for split in SPLITS} == {"train": 2, "validation": 0, "test": 2}
    liver = source.case("train", 0)
    assert liver.id == "slake/train/0" and liver.source == "slake"
    assert [(r.label, r.box) for r in liver.regions] == [("Liver", (10.0, 20.0, 40.0, 60.0))]  # matched by name
    assert liver.answer_type is AnswerType.OPEN and liver.meta["dataset_answer_type"] == "OPEN"
    assert (liver.modality, liver.organ, liver.image_size) == ("ct", "abdomen", (100, 80))
    assert liver.image_path == (root / "imgs/xmlab1/source.jpg").resolve()
    kidney = source.case("train", 1)
    assert kidney.answer_type is AnswerType.CLOSED and kidney.answer == "No"
    assert [r.label for r in kidney.regions] == ["Liver", "Lung"]  # no name matched: all boxes
    assert kidney.regions[1].box == (90.0, 5.0, 100.0, 15.0)  # clipped to the image
    assert kidney.meta["regions_matched"] is False
    assert source.case("test", 0).regions == ()
    closed_not_yes_no = source.case("test", 1)
    assert closed_not_yes_no.answer_type is AnswerType.OPEN
    assert closed_not_yes_no.meta["dataset_answer_type"] == "CLOSED"
    assert [r.label for r in closed_not_yes_no.regions] == ["Liver", "Lung"]
    assert liver.load_image().size == (100, 80)


def test_slake_region_options(tmp_path: Path) -> None:
    make_slake(tmp_path)
    every = open_source(f"slake:{tmp_path}?regions=all").case("train", 0)
    assert [r.label for r in every.regions] == ["Liver", "Lung"]
    assert open_source(f"slake:{tmp_path}?regions=none").case("train", 0).regions == ()
    with pytest.raises(SourceError, match="regions='some' must be matched, all or none"):
        open_source(f"slake:{tmp_path}?regions=some")


def test_slake_bad_item_and_bad_detection_are_named(tmp_path: Path) -> None:
    make_slake(tmp_path)
    rows = json.loads((tmp_path / "test.json").read_text())
    rows[1]["answer_type"] = "MAYBE"
    (tmp_path / "test.json").write_text(json.dumps(rows))
    with pytest.raises(SourceError, match=r"test\.json item 1: answer_type 'MAYBE' is neither CLOSED nor OPEN$"):
        open_source(f"slake:{tmp_path}")
    make_slake(tmp_path)
    (tmp_path / "imgs/xmlab1/detection.json").write_text(json.dumps([{"Liver": [10, 20, 0, 40]}]))
    with pytest.raises(SourceError, match=r"detection\.json: box 'Liver' \[10\.0, 20\.0, 0\.0, 40\.0\] has no area"):
        open_source(f"slake:{tmp_path}")


def test_slake_directory_without_split_files(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"no SLAKE split files in .*: expected train\.json, validate\.json"):
        open_source(f"slake:{tmp_path}")


# ------------------------------------------------------------------------------------------- VQA-RAD


def test_vqa_rad_splits_by_phrase_type(tmp_path: Path) -> None:
    png(tmp_path / "VQA_RAD Image Folder/synpic1.jpg")
    png(tmp_path / "VQA_RAD Image Folder/synpic2.jpg")

    def r(qid: int, image: str, phrase: str, answer: object, answer_type: str, organ: str = "ABD") -> dict:
        return {
            "qid": qid,
            "phrase_type": phrase,
            "image_name": image,
            "image_organ": organ,
            "question": f"question {qid}?",
            "answer": answer,
            "answer_type": answer_type,
            "question_type": "PRES",
        }

    records = [
        r(0, "synpic1.jpg", "freeform", "Yes", "CLOSED"),
        r(1, "synpic1.jpg", "test_freeform", "left", "CLOSED "),
        r(2, "synpic2.jpg", "para", 2, "OPEN", organ="HEAD"),
        r(3, "synpic2.jpg", "test_para", "no", "CLOSED"),
        r(4, "synpic2.jpg", "frame", "kidney", "OPEN"),
    ]
    (tmp_path / "VQA_RAD Dataset Public.json").write_text(json.dumps(records))
    source = open_source(f"vqa_rad:{tmp_path}")
    assert {split: source.size(split) for split in SPLITS} == {"train": 3, "validation": 0, "test": 2}
    assert [c.meta["qid"] for c in iter_cases(source, "test")] == ["1", "3"]
    left = source.case("test", 0)
    assert left.answer_type is AnswerType.OPEN and left.meta["dataset_answer_type"] == "CLOSED"
    assert left.organ == "abdomen"
    number = source.case("train", 1)
    assert number.answer == "2" and number.organ == "head" and number.answer_type is AnswerType.OPEN
    assert source.case("test", 1).answer_type is AnswerType.CLOSED


def test_vqa_rad_missing_image_names_file_item_and_path(tmp_path: Path) -> None:
    record_ = {"image_name": "synpic9.jpg", "question": "q?", "answer": "yes", "answer_type": "CLOSED"}
    json_path = tmp_path / "VQA_RAD Dataset Public.json"
    json_path.write_text(json.dumps([record_]))
    with pytest.raises(ImageLoadError) as error:
        open_source(f"vqa_rad:{json_path}")
    expected = tmp_path.resolve() / "VQA_RAD Image Folder/synpic9.jpg"
    assert str(error.value).startswith(f"{json_path} item 0: image file not found: {expected} (also tried ")


# ------------------------------------------------------------------------------------------- PathVQA


def test_path_vqa_csv_export(tmp_path: Path) -> None:
    png(tmp_path / "images/train/train_0001.jpg")
    png(tmp_path / "images/test/test_0001.jpg")
    (tmp_path / "qas").mkdir()
    with (tmp_path / "qas/train.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "question", "answer"])
        writer.writerow(["train_0001", "Is this tissue inflamed?", "yes"])
        writer.writerow(["train_0001", "What is present?", "granuloma"])
    rows = [{"image": "test_0001.jpg", "question": "What stain?", "answer": "hematoxylin"}]
    (tmp_path / "qas/test.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    source = open_source(f"path_vqa:{tmp_path}")
    assert {split: source.size(split) for split in SPLITS} == {"train": 2, "validation": 0, "test": 1}
    assert source.case("train", 0).answer_type is AnswerType.CLOSED
    assert source.case("train", 1).answer_type is AnswerType.OPEN
    assert source.case("train", 0).image_path == (tmp_path / "images/train/train_0001.jpg").resolve()
    assert source.case("test", 0).modality == "pathology"


def test_path_vqa_refuses_pickles(tmp_path: Path) -> None:
    (tmp_path / "qas").mkdir()
    (tmp_path / "qas/train_vqa.pkl").write_bytes(b"\x80\x04N.")
    with pytest.raises(SourceError, match=r"holds only pickle files \(train_vqa\.pkl\); MedEyes never unpickles"):
        open_source(f"path_vqa:{tmp_path}")


def test_path_vqa_bad_csv_row_names_the_line(tmp_path: Path) -> None:
    png(tmp_path / "images/a.jpg")
    (tmp_path / "train.csv").write_text("image,question,answer\na,Q1?,yes\na,,no\n")
    with pytest.raises(SourceError, match=r"train\.csv:3: field 'question' is missing or empty$"):
        open_source(f"path_vqa:{tmp_path}")


# ------------------------------------------------------------------------------------------- PMC-VQA

PMC_HEADER = [
    "index",
    "Figure_path",
    "Question",
    "Answer",
    "Choice A",
    "Choice B",
    "Choice C",
    "Choice D",
    "Answer_label",
]


def write_pmc(path: Path, rows: list[list[str]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(PMC_HEADER)
        writer.writerows(rows)


def test_pmc_vqa_choices_and_labels(tmp_path: Path) -> None:
    png(tmp_path / "images/PMC1_F1.jpg")
    png(tmp_path / "images/PMC2_F2.jpg")
    row = ["0", "PMC1_F1.jpg", "What modality?", "CT scan ", "A:MRI ", " B:CT scan", "C:X-ray", "D:PET", "B"]
    write_pmc(tmp_path / "train.csv", [row])
    write_pmc(tmp_path / "test.csv", [row, row])
    write_pmc(
        tmp_path / "test_clean.csv", [["0", "PMC2_F2.jpg", "Which side?", "Left", "A:Left", "B:Right", "", "", "A"]]
    )
    source = open_source(f"pmc_vqa:{tmp_path}")
    assert {split: source.size(split) for split in SPLITS} == {"train": 1, "validation": 0, "test": 1}
    case = source.case("train", 0)
    assert case.options == ("MRI", "CT scan", "X-ray", "PET")
    assert case.answer == "CT scan" and case.answer_type is AnswerType.CHOICE
    assert case.meta == {"answer_label": "B", "answer_text": "CT scan"}
    assert source.case("test", 0).options == ("Left", "Right")  # test_clean.csv preferred, empty choices dropped
    assert open_source(f"pmc_vqa:{tmp_path}?test=test.csv").size("test") == 2


def test_pmc_vqa_bad_label_names_the_line(tmp_path: Path) -> None:
    png(tmp_path / "images/PMC1_F1.jpg")
    good = ["0", "PMC1_F1.jpg", "Q?", "x", "A:x", "B:y", "C:z", "D:w", "A"]
    write_pmc(tmp_path / "train.csv", [good, good, [*good[:-1], "E"]])
    with pytest.raises(SourceError, match=r"train\.csv:4: Answer_label 'E' names none of the choices"):
        open_source(f"pmc_vqa:{tmp_path}")
    assert open_source(f"pmc_vqa:{tmp_path}?skip_bad=1").size("train") == 2


def test_pmc_vqa_file_options_stay_inside_the_directory(tmp_path: Path) -> None:
    with pytest.raises(UnsafePathError, match="escapes the dataset directory"):
        open_source(f"pmc_vqa:{tmp_path}?train=../secrets.csv")
