"""Region oracles: the annotation oracle's noise model, the label-free detector, and the VLM oracle's client."""

from __future__ import annotations

import base64
import io
import json
import math
import re

import numpy as np
import pytest
from openai_stand_in import Reply, Request, Responder, StartServer
from PIL import Image

from medeyes.agents.expert.oracles.annotation import AnnotationOracle, AnnotationOracleConfig
from medeyes.agents.expert.oracles.base import RegionOracle
from medeyes.agents.expert.oracles.factory import make_oracle
from medeyes.agents.expert.oracles.image import ImageOracle
from medeyes.agents.expert.oracles.vlm import VLMOracle, VLMOracleConfig, parse_regions
from medeyes_env.cases import Case, Region
from medeyes_env.errors import ConfigError
from medeyes_env.rewards import box_iou
from medeyes_env.sources import open_source


def synthetic(kind: str = "disc", size: int = 256, seed: int = 0) -> Image.Image:
    """Flat grey tissue with noise and one round object (a solid disc, or a ring) at (80, 150), radius 10."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    image = 100 + 6 * rng.standard_normal((size, size))
    d = np.hypot(xx - 80, yy - 150)
    if kind == "disc":
        image += 40 * (d < 10)
    elif kind == "ring":
        image += 60 * ((d < 10) & (d > 5.5))
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).convert("RGB")


def case_with(regions=((60, 130, 100, 170),), answer="yes") -> Case:
    return Case(
        id="t/1",
        question="Is there a nodule?",
        answer=answer,
        answer_type="closed",
        regions=tuple(Region(box=b) for b in regions),
        source="test",
        image_size=(256, 256),
    )


@pytest.mark.parametrize("name", ["annotation", "perfect", "image"])
def test_every_oracle_meets_the_protocol(name):
    oracle = make_oracle(name)
    assert isinstance(oracle, RegionOracle)
    image, case = synthetic(), case_with()
    found = oracle.scan(image, case.question, case=case, rng=np.random.default_rng(0))
    assert all(0.0 <= r.confidence <= 1.0 for r in found)
    assert all(0 <= r.box[0] < r.box[2] <= 256 and 0 <= r.box[1] < r.box[3] <= 256 for r in found)
    confidence = oracle.drill(image, (60, 130, 100, 170), case.question, case=case, rng=np.random.default_rng(0))
    assert 0.0 <= confidence <= 1.0
    assert oracle.describe()["name"] == oracle.name


def test_perfect_annotation_oracle_sees_exactly_the_gold():
    oracle = make_oracle("perfect")
    case = case_with(((10, 10, 30, 30), (100, 100, 140, 120)))
    found = oracle.scan(synthetic(), case.question, case=case)
    assert sorted(r.box for r in found) == [(10, 10, 30, 30), (100, 100, 140, 120)]
    assert all(r.confidence == 1.0 for r in found)
    assert oracle.drill(synthetic(), (10, 10, 30, 30), "", case=case) == 1.0
    assert oracle.drill(synthetic(), (0, 0, 40, 40), "", case=case) == 1.0  # contains it: loose boxes not penalised
    assert oracle.drill(synthetic(), (200, 200, 230, 230), "", case=case) == 0.0
    assert oracle.read(synthetic(), "What modality?", ["CT", "MRI"], case=case) == "yes"


def test_annotation_oracle_is_informative_but_imperfect():
    oracle = AnnotationOracle()
    image = synthetic()
    rng = np.random.default_rng(1)
    gold_scan, other_scan, missed, ious, sites = [], [], 0, [], 0
    for index in range(60):
        case = case_with().model_copy(update={"id": f"t/{index}"})
        sites += len(oracle._distractor_sites(image, case))
        for _ in range(5):
            found = oracle.scan(image, case.question, case=case, rng=rng)
            hits = [r for r in found if box_iou(r.box, case.regions[0].box) > 0.3]
            missed += not hits
            gold_scan += [r.confidence for r in hits]
            other_scan += [r.confidence for r in found if r not in hits]
            ious += [box_iou(r.box, case.regions[0].box) for r in hits]
    case = case_with()
    on_gold = [oracle.drill(image, case.regions[0].box, "", case=case, rng=rng) for _ in range(200)]
    off_gold = [oracle.drill(image, (180, 20, 220, 60), "", case=case, rng=rng) for _ in range(200)]
    assert 0.03 < missed / 300 < 0.2, "about miss_rate=0.1 of the scans miss the finding"
    assert 1.0 < sites / 60 < 2.0, "about distractors=1.5 false-positive sites per image"
    assert np.mean(gold_scan) > np.mean(other_scan) + 0.1
    assert np.max(other_scan) > np.min(gold_scan), "scan confidences overlap: not trivially perfect"
    assert 0.5 < np.mean(ious) < 0.95, "boxes are jittered"
    assert np.mean(on_gold) > 0.85 and np.mean(off_gold) < 0.2
    # One seed, one answer; the false-positive sites stay where they are from one look to the next.
    again = [oracle.scan(image, "", case=case, rng=np.random.default_rng(9)) for _ in range(2)]
    assert again[0] == again[1]
    assert oracle._distractor_sites(image, case) == AnnotationOracle()._distractor_sites(image, case)


def test_annotation_read_returns_the_gold_with_the_configured_accuracy():
    case = Case(
        id="t/2",
        question="Which modality?",
        answer="CT",
        answer_type="choice",
        options=("CT", "MRI", "X-ray"),
        source="test",
    )
    rng = np.random.default_rng(0)
    oracle = AnnotationOracle(AnnotationOracleConfig(fact_accuracy=0.7))
    answers = [oracle.read(synthetic(), case.question, case.options, case=case, rng=rng) for _ in range(1000)]
    assert 0.65 < answers.count("CT") / 1000 < 0.75
    assert set(answers) == {"CT", "MRI", "X-ray"}


def test_annotation_oracle_needs_the_case():
    with pytest.raises(ConfigError, match="pass case="):
        AnnotationOracle().scan(synthetic(), "q")


def test_image_oracle_finds_a_solid_spot_and_distrusts_a_ring():
    oracle = ImageOracle()
    disc = synthetic("disc")
    found = oracle.scan(disc, "")
    assert box_iou(found[0].box, (68, 138, 92, 162)) > 0.3, found[:2]
    assert found[0].confidence > 0.8
    assert found[0].confidence > max(r.confidence for r in found[1:])
    on_disc = oracle.drill(disc, (66, 136, 94, 164), "")
    on_ring = oracle.drill(synthetic("ring"), (66, 136, 94, 164), "")
    on_tissue = oracle.drill(disc, (180, 30, 208, 58), "")
    assert on_disc > 0.8 and on_ring < 0.3 and on_tissue < 0.3, (on_disc, on_ring, on_tissue)
    assert oracle.read(disc, "q", ["a"]) is None


def test_image_oracle_runs_on_the_phantom_and_on_real_images():
    oracle = ImageOracle()
    phantom = open_source("phantom").case("train", 0).load_image()
    found = oracle.scan(phantom, "")
    assert 1 <= len(found) <= oracle.config.max_regions
    pytest.importorskip("pydicom")
    real = open_source("samples:all").case("test", 0).load_image()
    found = oracle.scan(real, "")
    assert found and all(0.0 <= oracle.drill(real, r.box, "") <= 1.0 for r in found)


def test_unknown_oracle_name_gets_a_suggestion():
    with pytest.raises(ConfigError, match=re.escape("unknown oracle 'imgae'. Did you mean 'image'?")):
        make_oracle("imgae")
    with pytest.raises(ConfigError, match="invalid options for the 'annotation' oracle"):
        make_oracle("annotation", miss_rate=2.0)


# ----------------------------------------------------------------------------------------------------------------------
# VLM oracle against the stand-in server on 127.0.0.1 (tests our client; the live vLLM test is elsewhere)
# ----------------------------------------------------------------------------------------------------------------------


def vlm_server(scan_text: str, yes: float) -> Responder:
    """A VLM endpoint's script: its model name, ``scan_text`` for a scan, P(yes) = ``yes`` for a drill."""

    def respond(request: Request) -> Reply:
        if request.method == "GET":
            return 200, json.dumps({"data": [{"id": "fake-vlm"}]}).encode()
        if request.payload.get("max_tokens") == 1:
            top = [
                {"token": " Yes", "logprob": math.log(yes)},
                {"token": "No", "logprob": math.log(1 - yes)},
            ]
            choice = {
                "message": {"content": "Yes"},
                "finish_reason": "length",
                "logprobs": {"content": [{"token": "Yes", "logprob": top[0]["logprob"], "top_logprobs": top}]},
            }
        else:
            choice = {"message": {"content": scan_text}, "finish_reason": "stop"}
        return 200, json.dumps({"choices": [choice]}).encode()

    return respond


def _image_of(request: dict) -> Image.Image:
    parts = request["messages"][0]["content"]
    url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def test_vlm_oracle_scan_and_drill_against_a_fake_server(openai_server: StartServer):
    reply = 'Found: ```json\n[{"box": [100, 100, 140, 150], "confidence": 0.8}, {"box": [10, 10, 20, 20]}]\n```'
    image = synthetic(size=896)
    server = openai_server(vlm_server(reply, yes=0.75))
    oracle = VLMOracle(VLMOracleConfig(base_url=server.base_url, image_side=448))
    found = oracle.scan(image, "Is there a nodule?")
    confidence = oracle.drill(image, (200, 200, 300, 260), "Is there a nodule?")
    scan_request, drill_request = (r.payload for r in server.requests if r.method == "POST")
    assert scan_request["model"] == "fake-vlm" and scan_request["temperature"] == 0.0
    text = next(p["text"] for p in scan_request["messages"][0]["content"] if p["type"] == "text")
    assert text.startswith("Please locate all abnormal regions in this image. The image is 448 x 448 pixels.")
    assert "Is there a nodule?" in text
    assert _image_of(scan_request).size == (448, 448)
    # Boxes come back in the sent image's pixels and are scaled to the original (x2).
    assert [(r.box, r.confidence) for r in found] == [((200, 200, 280, 300), 0.8), ((20, 20, 40, 40), 0.5)]
    assert drill_request["max_tokens"] == 1 and drill_request["logprobs"] is True
    assert drill_request["top_logprobs"] == 20
    assert _image_of(drill_request).size == (100, 60), "the drill sends the full-resolution crop"
    assert confidence == pytest.approx(0.75)


def test_vlm_oracle_reports_an_unreachable_server():
    from medeyes.agents.backends.openai import BackendError

    oracle = VLMOracle(VLMOracleConfig(base_url="http://127.0.0.1:9/v1", model="m", timeout_s=2))
    oracle.backend.max_retries = 0
    with pytest.raises(BackendError, match="cannot reach"):
        oracle.drill(synthetic(), (0, 0, 10, 10), "q")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[{"bbox_2d": [0, 0, 10, 10], "score": 0.3}]', [((0, 0, 20, 20), 0.3)]),
        ('{"regions": [[5, 5, 15, 25]]}', [((10, 10, 30, 50), 0.5)]),
        ("no abnormality", []),
        ("[]", []),
        ('[{"box": [10, 10, 5, 5]}, {"box": "x"}, {"box": [1, 2, 3]}, {"box": [0, 0, NaN, 1]}]', []),
        ("boxes [1,1,4,4] and [2, 2, 8, 9]", [((2, 2, 8, 8), 0.5), ((4, 4, 16, 18), 0.5)]),
        ('[{"box": [-50, 0, 500, 40], "confidence": 7}]', [((0, 0, 200, 80), 1.0)]),
    ],
)
def test_parse_regions_never_raises_on_model_text(text, expected):
    found = parse_regions(text, (100, 100), (200, 200))
    assert sorted((r.box, r.confidence) for r in found) == sorted(expected)
