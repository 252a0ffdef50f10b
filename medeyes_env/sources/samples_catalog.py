"""The catalogue of the ``samples`` source: each bundled image, where it ships, and the questions it answers.

Every answer cites its evidence (a DICOM tag, the package's own description); :mod:`medeyes_env.sources.samples`
locates and decodes the files and serves the cases.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

from medeyes_env.cases import AnswerType, Split

MODALITY_OPTIONS: tuple[str, ...] = (
    "CT",
    "MRI",
    "Ultrasound",
    "X-ray",
    "Nuclear medicine",
    "Fundus photograph",
    "Histology",
)
"""The pool the modality multiple-choice questions draw their options from."""

_PLANES = ("Axial", "Coronal", "Sagittal")
_BODY_REGIONS = ("Head", "Chest", "Abdomen", "Whole body")


@dataclass(frozen=True)
class SampleQuestion:
    """One question about a sample image, with what makes its answer known."""

    key: str
    question: str
    answer: str
    answer_type: AnswerType
    evidence: str
    options: tuple[str, ...] = ()
    marked_lesion: bool = False
    """True when the case's gold regions are the lesion marked in the DICOM overlay."""


@dataclass(frozen=True)
class SampleImage:
    """A real image bundled in a PyPI package, and what is known about it."""

    key: str
    package: Literal["pydicom", "skimage"]
    file: str
    size: tuple[int, int]
    """(width, height) of the decoded image."""
    modality: str
    organ: str
    split: Split
    description: str
    questions: tuple[SampleQuestion, ...]


def _modality_choice(key: str, answer: str, evidence: str) -> SampleQuestion:
    """A 4-option modality question; distractors and order are fixed by a hash of ``key``."""

    def rank(option: str) -> str:
        return hashlib.sha256(f"{key}/{option}".encode()).hexdigest()

    distractors = sorted((o for o in MODALITY_OPTIONS if o != answer), key=rank)[:3]
    options = tuple(sorted([answer, *distractors], key=rank))
    return SampleQuestion(
        "modality_choice", "Which imaging modality produced this image?", answer, AnswerType.CHOICE, evidence, options
    )


def _modality_open(answer: str, evidence: str) -> SampleQuestion:
    return SampleQuestion("modality_open", "What imaging modality is this?", answer, AnswerType.OPEN, evidence)


def _plane(answer: str, evidence: str) -> SampleQuestion:
    return SampleQuestion("plane", "In which plane is this image shown?", answer, AnswerType.CHOICE, evidence, _PLANES)


def _body_region(answer: str, evidence: str) -> SampleQuestion:
    return SampleQuestion(
        "body_region", "Which body region does this image show?", answer, AnswerType.CHOICE, evidence, _BODY_REGIONS
    )


_AXIAL_IOP = "DICOM ImageOrientationPatient [1,0,0,0,1,0] (normal along the patient's z axis)"

SAMPLE_IMAGES: tuple[SampleImage, ...] = (
    SampleImage(
        key="examples_overlay",
        package="pydicom",
        file="examples_overlay.dcm",
        size=(484, 300),
        modality="mri",
        organ="liver",
        split="test",
        description="T1 VIBE fat-saturated axial MR of the upper abdomen after contrast, with a hand-drawn overlay "
        "circle around a liver lesion (SeriesDescription 'marked lesion').",
        questions=(
            _modality_choice("examples_overlay", "MRI", "DICOM Modality 'MR'"),
            _modality_open("MRI", "DICOM Modality 'MR'"),
            _body_region("Abdomen", "DICOM BodyPartExamined 'ABDOMEN'"),
            _plane("Axial", f"{_AXIAL_IOP}; the overlay labels the image 'Tra' (transverse)"),
            SampleQuestion(
                "lesion_present",
                "Is there a lesion in the liver?",
                "yes",
                AnswerType.CLOSED,
                "DICOM overlay (6000,3000) circles a lesion; StudyDescription 'abdomen^liver', "
                "SeriesDescription 'marked lesion'",
                marked_lesion=True,
            ),
            SampleQuestion(
                "lesion_organ",
                "In which organ is the marked lesion located?",
                "liver",
                AnswerType.OPEN,
                "StudyDescription 'abdomen^liver'; the overlay circle lies inside the liver",
                marked_lesion=True,
            ),
        ),
    ),
    SampleImage(
        key="J2K_pixelrep_mismatch",
        package="pydicom",
        file="J2K_pixelrep_mismatch.dcm",
        size=(512, 512),
        modality="ct",
        organ="head",
        split="test",
        description="Axial CT of the head at the skull base (JPEG 2000, brain window from the header).",
        questions=(
            _modality_choice("J2K_pixelrep_mismatch", "CT", "DICOM Modality 'CT'"),
            _modality_open("CT", "DICOM Modality 'CT'"),
            _body_region("Head", "DICOM BodyPartExamined 'HEAD'"),
            _plane(
                "Axial",
                "DICOM ImageType 'AXIAL'; ImageOrientationPatient normal (0, 0.37, 0.93): axial with gantry tilt",
            ),
        ),
    ),
    SampleImage(
        key="examples_rgb_color",
        package="pydicom",
        file="examples_rgb_color.dcm",
        size=(320, 240),
        modality="ultrasound",
        organ="lymph node",
        split="test",
        description="Power Doppler ultrasound of a lymph node (burned-in caption 'LYMPH NODE').",
        questions=(
            _modality_choice("examples_rgb_color", "Ultrasound", "DICOM Modality 'US'"),
            _modality_open("ultrasound", "DICOM Modality 'US'"),
            SampleQuestion(
                "structure",
                "Which structure is imaged?",
                "Lymph node",
                AnswerType.CHOICE,
                "burned-in caption 'LYMPH NODE'; DICOM ImageType 'SMALL PARTS'",
                ("Thyroid", "Lymph node", "Kidney", "Liver"),
            ),
        ),
    ),
    SampleImage(
        key="microaneurysms",
        package="skimage",
        file="microaneurysms.png",
        size=(102, 102),
        modality="fundus",
        organ="eye",
        split="test",
        description="Green-channel crop of fundus image 07_dr (diabetic retinopathy) of the HRF database, "
        "described by scikit-image as 'Retina image with lesions'.",
        questions=(
            _modality_choice("microaneurysms", "Fundus photograph", "skimage.data.microaneurysms: fundus image crop"),
            SampleQuestion(
                "microaneurysms_present",
                "Are microaneurysms visible in this retinal image?",
                "yes",
                AnswerType.CLOSED,
                "skimage.data.microaneurysms docstring: 'Retina image with lesions' (HRF image 07_dr)",
            ),
        ),
    ),
    SampleImage(
        key="MR_small",
        package="pydicom",
        file="MR_small.dcm",
        size=(64, 64),
        modality="mri",
        organ="unknown",
        split="validation",
        description="64x64 axial MR slice downsized from NEMA WG04 'MR1_UNC'; the header names no body part.",
        questions=(
            _modality_choice("MR_small", "MRI", "DICOM Modality 'MR'"),
            _modality_open("MRI", "DICOM Modality 'MR'"),
            _plane("Axial", _AXIAL_IOP),
        ),
    ),
    SampleImage(
        key="JPEG2000",
        package="pydicom",
        file="JPEG2000.dcm",
        size=(256, 1024),
        modality="nuclear_medicine",
        organ="whole body",
        split="validation",
        description="Whole-body bone scintigraphy (NM), lossy JPEG 2000, from NEMA WG04 'NM1_J2KI'.",
        questions=(
            _modality_choice("JPEG2000", "Nuclear medicine", "DICOM Modality 'NM'; StudyDescription 'Whole Body Bone'"),
            _body_region("Whole body", "DICOM BodyPartExamined 'WHOLE BODY'"),
        ),
    ),
    SampleImage(
        key="CT_small",
        package="pydicom",
        file="CT_small.dcm",
        size=(128, 128),
        modality="ct",
        organ="unknown",
        split="train",
        description="128x128 axial CT slice downsized from NEMA WG04 'CT1_UNC'; the header names no body part.",
        questions=(
            _modality_choice("CT_small", "CT", "DICOM Modality 'CT'"),
            _modality_open("CT", "DICOM Modality 'CT'"),
            _plane("Axial", f"DICOM ImageType 'AXIAL'; {_AXIAL_IOP}"),
        ),
    ),
    SampleImage(
        key="retina",
        package="skimage",
        file="retina.jpg",
        size=(1411, 1411),
        modality="fundus",
        organ="eye",
        split="train",
        description="Fundus photograph of a normal left eye (Wikimedia Commons, Häggström 2014, CC0).",
        questions=(
            _modality_choice(
                "retina", "Fundus photograph", "skimage.data.retina: 'Fundus photograph of normal left eye'"
            ),
            SampleQuestion(
                "laterality",
                "Which eye does this fundus photograph show?",
                "Left",
                AnswerType.CHOICE,
                "source file 'Fundus_photograph_of_normal_left_eye.jpg'",
                ("Left", "Right"),
            ),
            SampleQuestion(
                "normal",
                "Is this a normal fundus?",
                "yes",
                AnswerType.CLOSED,
                "source file 'Fundus_photograph_of_normal_left_eye.jpg'",
            ),
        ),
    ),
    SampleImage(
        key="immunohistochemistry",
        package="skimage",
        file="ihc.png",
        size=(512, 512),
        modality="pathology",
        organ="colon",
        split="train",
        description="Colonic glands, immunohistochemistry for FHL2 revealed with DAB, hematoxylin counterstain.",
        questions=(
            _modality_choice("immunohistochemistry", "Histology", "skimage.data.immunohistochemistry docstring"),
            SampleQuestion(
                "organ",
                "From which organ is this tissue?",
                "Colon",
                AnswerType.CHOICE,
                "skimage.data.immunohistochemistry docstring: 'colonic glands'",
                ("Liver", "Colon", "Lung", "Skin"),
            ),
            SampleQuestion(
                "stain",
                "Which staining technique is shown?",
                "Immunohistochemistry with hematoxylin counterstain",
                AnswerType.CHOICE,
                "skimage.data.immunohistochemistry docstring: 'IHC staining with hematoxylin counterstaining'",
                (
                    "Hematoxylin and eosin",
                    "Immunohistochemistry with hematoxylin counterstain",
                    "Gram stain",
                    "Papanicolaou stain",
                ),
            ),
        ),
    ),
)
"""Every sample image, its fixed split and its questions."""
