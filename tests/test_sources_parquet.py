"""Parquet (Hugging Face VQA-RAD / SLAKE / PathVQA, MMMU) and OmniMedVQA loaders, on fixtures in each layout."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from medeyes.cli.app import app
from medeyes_env.cases import AnswerType
from medeyes_env.errors import ImageLoadError, SourceError, UnsafePathError
from medeyes_env.sources import open_source
from tests.layouts import hf_vqa, mmmu, omnimedvqa, png_bytes, write_parquet

pytest.importorskip("pyarrow")

VQA = {
    "train": [("Is there a fracture?", "yes"), ("Which organ is shown?", "Liver")],
    "test": [("Is the lung normal?", "no"), ("What modality?", "ct"), ("Is this MRI?", "yes")],
}


def test_vqa_rad_export_reads_splits_types_and_image_bytes(tmp_path: Path) -> None:
    source = open_source(f"vqa_rad_hf:{hf_vqa(tmp_path, VQA)}")
    assert (source.name, source.size("train"), source.size("validation"), source.size("test")) == ("vqa_rad", 2, 0, 3)
    case = source.case("test", 1)
    assert (case.question, case.answer, case.answer_type) == ("What modality?", "ct", AnswerType.OPEN)
    assert source.case("test", 0).answer_type is AnswerType.CLOSED
    expected = np.asarray(Image.open(io.BytesIO(png_bytes(1))).convert("RGB"))
    assert np.array_equal(np.asarray(case.load_image()), expected)


def test_slake_export_keeps_english_and_its_answer_types(tmp_path: Path) -> None:
    extra = {"test": {"q_lang": ["en", "zh", "en"], "answer_type": ["CLOSED", "OPEN", "CLOSED"],
                      "modality": ["CT", "MRI", "X-Ray"], "location": ["Lung", "Brain", "Chest"]}}  # fmt: skip
    source = open_source(f"slake_hf:{hf_vqa(tmp_path, {'test': VQA['test']}, extra)}")
    assert source.size("test") == 2 and source.excluded == {"not_english": 1}
    case = source.case("test", 1)
    assert (case.modality, case.organ, case.meta["dataset_answer_type"]) == ("xray", "chest", "CLOSED")


def test_path_vqa_export_reads_a_validation_split(tmp_path: Path) -> None:
    source = open_source(f"path_vqa_hf:{hf_vqa(tmp_path, {'validation': VQA['train'], 'test': VQA['test']})}")
    assert source.size("validation") == 2 and source.case("validation", 0).modality == "pathology"


def test_opening_decodes_no_image_and_a_corrupt_one_is_named_when_loaded(tmp_path: Path) -> None:
    root = hf_vqa(tmp_path, {"test": VQA["test"]}, image_bytes=b"not a png", row_group_size=2)
    source = open_source(f"vqa_rad_hf:{root}")  # opens: images are not touched
    with pytest.raises(ImageLoadError, match=r"test-00000-of-00001\.parquet row 2 column 'image': cannot decode"):
        source.case("test", 2).load_image()


def test_corrupt_and_incomplete_parquet_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "bad" / "data").mkdir(parents=True)
    (tmp_path / "bad" / "data" / "test-00000-of-00001.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(SourceError, match=r"test-00000-of-00001\.parquet: not a readable parquet file"):
        open_source(f"vqa_rad_hf:{tmp_path / 'bad'}")
    write_parquet(tmp_path / "cols" / "test.parquet", {"question": ["q"], "image": [None]}, ("image",))
    with pytest.raises(SourceError, match=r"test\.parquet: missing column\(s\) answer; it has question, image"):
        open_source(f"vqa_rad_hf:{tmp_path / 'cols'}")
    with pytest.raises(SourceError, match="no vqa_rad parquet files in"):
        open_source(f"vqa_rad_hf:{tmp_path}")


def test_an_empty_answer_names_file_and_row_or_is_skipped(tmp_path: Path) -> None:
    root = hf_vqa(tmp_path, {"test": [("q1", "yes"), ("q2", " "), ("q3", "no")]})
    with pytest.raises(SourceError, match=r"test-00000-of-00001\.parquet row 1: field 'answer' is missing or empty"):
        open_source(f"vqa_rad_hf:{root}")
    source = open_source(f"vqa_rad_hf:{root}?skip_bad=1")
    assert source.size("test") == 2 and source.n_skipped == 1


def test_missing_pyarrow_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = hf_vqa(tmp_path, {"test": VQA["test"]})
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(SourceError, match=r"needs pyarrow: pip install 'medeyes\[parquet\]'"):
        open_source(f"vqa_rad_hf:{root}")


def test_mmmu_maps_letters_handles_image_tags_and_skips_multi_image(tmp_path: Path) -> None:
    source = open_source(f"mmmu:{mmmu(tmp_path)}")
    assert (source.size("validation"), source.size("train"), source.size("test")) == (14, 4, 0)
    assert source.excluded == {"multi_image": 2, "unanswered": 6}
    case = source.case("validation", 1)
    assert case.question == "What does the image show? (1)"
    assert (case.answer_type, case.options, case.answer) == (
        AnswerType.CHOICE,
        ("a nodule", "an effusion", "nothing"),
        "an effusion",
    )
    assert case.meta["mmmu_id"] == "validation_Clinical_Medicine_2" and case.load_image().size == (64, 48)
    open_case = source.case("validation", 6)
    assert (open_case.answer_type, open_case.answer, open_case.options) == (AnswerType.OPEN, "2", ())


def test_mmmu_subjects_are_checked(tmp_path: Path) -> None:
    root = mmmu(tmp_path, subjects=("Pharmacy",))
    assert open_source(f"mmmu:{root}?subjects=Pharmacy").size("validation") == 7
    with pytest.raises(SourceError, match=r"unknown MMMU subject 'Pharmcy'\. Did you mean 'Pharmacy'\?"):
        open_source(f"mmmu:{root}?subjects=Pharmcy")
    with pytest.raises(SourceError, match=r"MMMU subject folder not found: .*Public_Health"):
        open_source(f"mmmu:{root}?subjects=Public_Health")


def test_omnimedvqa_reads_choices_and_names_a_missing_image(tmp_path: Path) -> None:
    root = omnimedvqa(tmp_path)
    source = open_source(f"omnimedvqa:{root}")
    case = source.case("test", 0)
    assert (source.size("test"), case.answer, case.options, case.modality) == (4, "CT", ("MRI", "CT", "X-Ray"), "ct")
    (root / "Images" / "Demo" / "2.png").unlink()
    with pytest.raises(ImageLoadError, match=r"Demo\.json item 2: image file not found: .*Demo/2\.png"):
        open_source(f"omnimedvqa:{root}")


def test_omnimedvqa_refuses_paths_outside_the_dataset(tmp_path: Path) -> None:
    root = omnimedvqa(tmp_path / "omni")
    qa = root / "QA_information" / "Open-access" / "Demo.json"
    records = json.loads(qa.read_text())
    records[0]["image_path"] = "../../etc/passwd"
    qa.write_text(json.dumps(records))
    with pytest.raises(UnsafePathError, match="escapes the dataset directory"):
        open_source(f"omnimedvqa:{root}")


@pytest.mark.parametrize(("layout", "spec", "paper"), [("slake", "slake_hf", "79.1"), ("mmmu", "mmmu", "59.7")])
def test_eval_runs_on_each_layout_with_the_papers_number(tmp_path: Path, layout: str, spec: str, paper: str) -> None:
    root = mmmu(tmp_path) if layout == "mmmu" else hf_vqa(tmp_path, {"validation": VQA["test"]})
    args = ["eval", "--data", f"{spec}:{root}", "--split", "validation", "--quiet", "--json", str(tmp_path / "j")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert paper in result.output
    figures = json.loads((tmp_path / "j").read_text())["datasets"][0]
    assert figures["dataset"] == layout and figures["n"] == (14 if layout == "mmmu" else 3)
    assert figures["paper"]["MedEyes (Qwen2.5-VL-3B)"] == float(paper)


def test_cases_check_reports_counts_bad_images_balance_and_the_blind_floor(tmp_path: Path) -> None:
    rows = {"train": [("Is there a fracture?", "yes")] * 3 + [("Is there a fracture?", "no")],
            "test": [("Is there a fracture?", "yes"), ("Is there a fracture?", "no"), ("Which organ?", "liver")]}  # fmt: skip
    root = hf_vqa(tmp_path, rows)
    bad = hf_vqa(tmp_path / "bad", {"test": rows["test"]}, image_bytes=b"broken")
    result = CliRunner().invoke(app, ["cases", "--data", f"vqa_rad_hf:{root}", "--check"])
    assert result.exit_code == 0, result.output
    test_row = next(line for line in result.output.splitlines() if line.startswith("│ test"))
    cells = [cell.strip() for cell in test_row.strip("│").split("│")]
    # closed 2, open 1; no regions (0 shapes / 0 boxes); no bad image; half of yes/no answers are yes; the train
    # majority "yes" gets 1 of 3
    assert cells[:7] == ["test", "3", "closed 2, open 1", "0", "0/0", "0/3", "0.50"] and cells[-1] == "0.333"
    result = CliRunner().invoke(app, ["cases", "--data", f"vqa_rad_hf:{bad}", "--check"])
    assert "0/3" not in result.output and "3/3" in result.output
    assert "bad image vqa_rad/test/0:" in result.output and "cannot decode image" in result.output


def test_images_load_from_several_threads_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An env's render-ahead and the trainer's preload read images from a background thread while the main thread
    # may read others; a row-group cache that holds one group at a time evicts on almost every read.
    import pickle
    from concurrent.futures import ThreadPoolExecutor

    from medeyes_env.sources import parquet_files

    monkeypatch.setattr(parquet_files, "IMAGE_GROUPS_CACHED_BYTES", 1)
    rows = {"test": [(f"Question {i}?", "yes") for i in range(24)]}
    source = open_source(f"vqa_rad_hf:{hf_vqa(tmp_path, rows, row_group_size=2)}")
    expected = [np.asarray(Image.open(io.BytesIO(png_bytes(i))).convert("RGB")) for i in range(24)]

    def load(index: int) -> bool:
        return np.array_equal(np.asarray(source.case("test", index).load_image()), expected[index])

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(load, [i % 24 for i in range(400)]))
    copy = pickle.loads(pickle.dumps(source))  # a vector env's worker gets a copy with its own, empty cache
    assert np.array_equal(np.asarray(copy.case("test", 5).load_image()), expected[5])
