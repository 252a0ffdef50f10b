"""Fixtures in the published layouts of benchmark datasets (nothing downloads here): HF parquet, MMMU, OmniMedVQA.

Each builder writes a small dataset in the layout its users download, with real PNG bytes, so loaders and
``medeyes eval`` run on them unchanged. ``benchmarks/loader_speed.py`` builds 100k-row versions.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image, ImageDraw

IMAGE_STRUCT = None  # built on first use: pyarrow is optional


def png_bytes(seed: int = 0, size: tuple[int, int] = (64, 48)) -> bytes:
    """A small PNG with a bright disc whose place depends on ``seed``."""
    image = Image.new("RGB", size, (20, 20, 20))
    x, y = 8 + (seed * 7) % (size[0] - 24), 8 + (seed * 5) % (size[1] - 24)
    ImageDraw.Draw(image).ellipse((x, y, x + 14, y + 14), fill=(230, 230, 230))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _image_type():
    import pyarrow as pa

    return pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def write_parquet(
    path: Path, columns: dict[str, list], image_columns: tuple[str, ...], row_group_size: int = 64
) -> Path:
    """Write ``columns`` as a parquet file; ``image_columns`` hold ``{"bytes", "path"}`` structs (or None)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = {
        name: pa.array(values, type=_image_type()) if name in image_columns else pa.array(values)
        for name, values in columns.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(arrays), path, row_group_size=row_group_size)
    return path


def hf_vqa(root: Path, rows: dict[str, list[tuple[str, str]]], extra: dict[str, dict[str, list]] | None = None,
           image_bytes: bytes | None = None, row_group_size: int = 64) -> Path:  # fmt: skip
    """A Hub export: ``root/data/{split}-00000-of-00001.parquet`` with ``image``, ``question``, ``answer``."""
    for split, pairs in rows.items():
        columns: dict[str, list] = {
            "image": [{"bytes": image_bytes or png_bytes(i), "path": f"{split}_{i}.png"} for i in range(len(pairs))],
            "question": [q for q, _ in pairs],
            "answer": [a for _, a in pairs],
            **(extra or {}).get(split, {}),
        }
        write_parquet(root / "data" / f"{split}-00000-of-00001.parquet", columns, ("image",), row_group_size)
    return root


def mmmu_rows(n: int, subject: str, split: str = "validation") -> dict[str, list]:
    """MMMU rows: multiple choice with letter answers and ``<image 1>``, one open question, images as structs."""
    columns: dict[str, list] = {
        "id": [f"{split}_{subject}_{i + 1}" for i in range(n)],
        "question": [f"What does <image 1> show? ({i})" for i in range(n)],
        "options": [str(["a nodule", "an effusion", "nothing"]) for _ in range(n)],
        "explanation": ["" for _ in range(n)],
        "image_1": [{"bytes": png_bytes(i), "path": None} for i in range(n)],
        **{f"image_{k}": [None] * n for k in range(2, 8)},
        "img_type": [str(["CT"]) for _ in range(n)],
        "answer": ["ABC"[i % 3] for i in range(n)],
        "topic_difficulty": ["Easy" for _ in range(n)],
        "question_type": ["multiple-choice" for _ in range(n)],
        "subfield": ["Radiology" for _ in range(n)],
    }
    return columns


def mmmu(root: Path, subjects: tuple[str, ...] = ("Clinical_Medicine", "Pharmacy"), n: int = 6) -> Path:
    """``root/SUBJECT/{dev,validation,test}-00000-of-00001.parquet``; validation holds one multi-image and
    one open question beside ``n`` single-image ones; test answers are hidden (``?``).
    """
    images = tuple(f"image_{k}" for k in range(1, 8))
    for subject in subjects:
        columns = mmmu_rows(n + 2, subject)
        columns["question"][n] = "Compare <image 1> and <image 2>."
        columns["image_2"][n] = {"bytes": png_bytes(99), "path": None}
        columns["question_type"][n + 1], columns["options"][n + 1] = "open", "[]"
        columns["question"][n + 1], columns["answer"][n + 1] = "How many lesions does <image 1> show?", "2"
        write_parquet(root / subject / "validation-00000-of-00001.parquet", columns, images)
        write_parquet(root / subject / "dev-00000-of-00001.parquet", mmmu_rows(2, subject, "dev"), images)
        test = mmmu_rows(3, subject, "test")
        test["answer"] = ["?"] * 3
        write_parquet(root / subject / "test-00000-of-00001.parquet", test, images)
    return root


def omnimedvqa(root: Path, n: int = 4) -> Path:
    """``root/QA_information/Open-access/Demo.json`` and ``root/Images/Demo/*.png``."""
    records = []
    for i in range(n):
        image = root / "Images" / "Demo" / f"{i}.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        image.write_bytes(png_bytes(i))
        records.append(
            {
                "question_id": f"Demo_{i}",
                "dataset": "Demo",
                "question_type": "Modality Recognition",
                "question": "What imaging modality is shown?",
                "gt_answer": "CT",
                "option_A": "MRI",
                "option_B": "CT",
                "option_C": "X-Ray",
                "image_path": f"Images/Demo/{i}.png",
                "modality_type": "CT(Computed Tomography)",
            }
        )
    qa = root / "QA_information" / "Open-access"
    qa.mkdir(parents=True, exist_ok=True)
    (qa / "Demo.json").write_text(json.dumps(records))
    return root


def gray_png(path: Path, size: tuple[int, int] = (128, 128)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, 40).save(path)


def nih_cxr(root: Path) -> Path:
    """NIH ChestX-ray14: ``BBox_List_2017.csv`` (header with the box spilling into 4 columns and 3 trailing
    unnamed ones, as released), images under ``images_001/images/`` and ``images_002/images/``.
    """
    rows = [
        ("00000001_000.png", "Nodule", 20.5, 30.25, 16.0, 16.0),  # left side of the image
        ("00000001_000.png", "Effusion", 90.0, 80.0, 30.0, 40.0),  # right side
        ("00000002_000.png", "Cardiomegaly", 40.0, 50.0, 50.0, 40.0),  # straddles: no location question
    ]
    lines = ["Image Index,Finding Label,Bbox [x,y,w,h],,,"] + [",".join(map(str, r)) + ",,," for r in rows]
    root.mkdir(parents=True, exist_ok=True)
    (root / "BBox_List_2017.csv").write_text("\n".join(lines) + "\n")
    gray_png(root / "images_001" / "images" / "00000001_000.png")
    gray_png(root / "images_002" / "images" / "00000002_000.png")
    return root


def vindr_cxr(root: Path) -> Path:
    """VinDr-CXR: ``annotations_train.csv`` with three readers per image (one says No finding), PNG exports."""
    header = "image_id,rad_id,class_name,x_min,y_min,x_max,y_max,class_id"
    rows = [
        "img1,R8,Aortic enlargement,60,20,80,50,0",
        "img1,R9,Aortic enlargement,62,22,82,52,0",
        "img1,R10,No finding,,,,,14",
        "img2,R8,Pleural effusion,5,70,40,120,10",
        "img2,R9,No finding,,,,,14",
        "img3,R8,No finding,,,,,14",
    ]
    root.mkdir(parents=True, exist_ok=True)
    (root / "annotations_train.csv").write_text("\n".join([header, *rows]) + "\n")
    for name in ("img1", "img2", "img3"):
        gray_png(root / "train" / f"{name}.png")
    return root
