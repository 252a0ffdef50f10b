"""Gold regions from annotation files: NIH ChestX-ray14 BBox_List_2017.csv and VinDr-CXR annotations_*.csv."""

from __future__ import annotations

from pathlib import Path

import pytest

from medeyes_env.cases import AnswerType
from medeyes_env.errors import ImageLoadError, SourceError
from medeyes_env.sources import open_source
from tests.layouts import nih_cxr, vindr_cxr


def questions(source, split: str = "test") -> dict[tuple[str, str], object]:
    cases = [source.case(split, i) for i in range(source.size(split))]
    return {(c.meta["image"], c.question): c for c in cases}


def test_nih_boxes_become_presence_and_location_questions(tmp_path: Path) -> None:
    source = open_source(f"nih_cxr:{nih_cxr(tmp_path)}")
    cases = questions(source)
    nodule = cases[("00000001_000.png", "Is there a nodule in this chest X-ray?")]
    assert nodule.answer == "yes" and [r.box for r in nodule.regions] == [(20.5, 30.25, 36.5, 46.25)]  # xywh -> xyxy
    side = cases[("00000001_000.png", "On which side of the image is the effusion?")]
    assert (side.answer_type, side.answer) == (AnswerType.CHOICE, "right side of the image")
    assert ("00000002_000.png", "On which side of the image is the cardiomegaly?") not in cases  # straddles
    negative = cases[("00000001_000.png", "Is there atelectasis in this chest X-ray?")]
    assert negative.answer == "no" and negative.regions == ()
    assert source.size("test") == 7  # 3 yes + 2 location + 2 no


def test_nih_bad_row_and_missing_image_are_named(tmp_path: Path) -> None:
    root = nih_cxr(tmp_path)
    csv = root / "BBox_List_2017.csv"
    csv.write_text(csv.read_text() + "00000003_000.png,Mass,1,2,zero,4,,,\n")
    with pytest.raises(SourceError, match=r"BBox_List_2017\.csv:5: box value 'zero' is not a number"):
        open_source(f"nih_cxr:{root}")
    assert open_source(f"nih_cxr:{root}?skip_bad=1").n_skipped == 1
    nih_cxr(root)  # rewrites the CSV without the bad row
    (root / "images_002" / "images" / "00000002_000.png").unlink()
    with pytest.raises(ImageLoadError, match=r"BBox_List_2017\.csv:4: image file not found: .*00000002_000\.png"):
        open_source(f"nih_cxr:{root}")


def test_vindr_keeps_every_readers_box_and_asks_no_on_clear_images(tmp_path: Path) -> None:
    source = open_source(f"vindr_cxr:{vindr_cxr(tmp_path)}")
    cases = questions(source, "train")
    aorta = cases[("img1.png", "Is there an aortic enlargement in this chest X-ray?")]
    assert [r.box for r in aorta.regions] == [(60.0, 20.0, 80.0, 50.0), (62.0, 22.0, 82.0, 52.0)]
    assert cases[("img3.png", "Is there an aortic enlargement in this chest X-ray?")].answer == "no"
    effusion_side = cases[("img2.png", "On which side of the image is the pleural effusion?")]
    assert effusion_side.answer == "left side of the image"


def test_vindr_unordered_box_is_named(tmp_path: Path) -> None:
    root = vindr_cxr(tmp_path)
    csv = root / "annotations_train.csv"
    csv.write_text(csv.read_text() + "img3,R10,Nodule/Mass,50,50,40,60,8\n")
    with pytest.raises(SourceError, match=r"annotations_train\.csv:8: .*not xyxy with x2 > x1"):
        open_source(f"vindr_cxr:{root}")


@pytest.mark.parametrize("x_min, x_max", [("-inf", "inf"), ("0", "1e400"), ("nan", "60")])
def test_vindr_non_finite_box_is_named_not_a_whole_image_box(tmp_path: Path, x_min: str, x_max: str) -> None:
    root = vindr_cxr(tmp_path)
    csv = root / "annotations_train.csv"
    csv.write_text(csv.read_text() + f"img3,R10,Nodule/Mass,{x_min},50,{x_max},60,8\n")
    with pytest.raises(SourceError, match=r"annotations_train\.csv:8: x_(min|max) '.*' is not a finite number"):
        open_source(f"vindr_cxr:{root}")
    source = open_source(f"vindr_cxr:{root}?skip_bad=1")
    assert source.n_skipped == 1
    assert all(not c.regions for c in questions(source, "train").values() if c.meta["image"] == "img3.png")


def test_nih_nan_box_is_named_not_dropped_silently(tmp_path: Path) -> None:
    root = nih_cxr(tmp_path)
    csv = root / "BBox_List_2017.csv"
    csv.write_text(csv.read_text() + "00000002_000.png,Mass,nan,2,3,4,,,\n")
    with pytest.raises(SourceError, match=r"BBox_List_2017\.csv:5: box value 'nan' is not a finite number"):
        open_source(f"nih_cxr:{root}")
    assert open_source(f"nih_cxr:{root}?skip_bad=1").n_skipped == 1


def test_cases_check_counts_skipped_rows_and_boxes_outside_the_image(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medeyes.cli.app import app

    root = nih_cxr(tmp_path)
    csv = root / "BBox_List_2017.csv"
    extra = "00000002_000.png,Mass,nan,2,3,4,,,\n00000002_000.png,Nodule,500,500,10,10,,,\n"  # NaN; outside 128x128
    csv.write_text(csv.read_text() + extra)
    source = open_source(f"nih_cxr:{root}?skip_bad=1")
    assert (source.n_skipped, source.excluded) == (1, {"boxes_outside_image": 1})
    result = CliRunner().invoke(app, ["cases", "--data", f"nih_cxr:{root}?skip_bad=1", "--check"])
    assert result.exit_code == 0, result.output
    assert "rows skipped as malformed: 1; left out on purpose: {'boxes_outside_image': 1}" in result.output


def test_nih_split_list_that_is_not_utf8_is_named_and_skippable(tmp_path: Path) -> None:
    root = nih_cxr(tmp_path)
    (root / "train_val_list.txt").write_bytes(b"00000001_000.png\n\xff\xfe.png\n")
    with pytest.raises(SourceError, match=r"train_val_list\.txt:2: not UTF-8 text \(byte 0xff at column 1\)"):
        open_source(f"nih_cxr:{root}")
    source = open_source(f"nih_cxr:{root}?skip_bad=1")
    assert (source.n_skipped, source.size("train"), source.size("test")) == (1, 5, 2)
