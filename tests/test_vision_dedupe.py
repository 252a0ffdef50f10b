"""Encoding each distinct image once changes nothing: same greedy turns, same features, same gradients."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from medeyes.agents.backends.transformers import TransformersBackend  # noqa: E402
from medeyes.agents.policy import SamplingConfig  # noqa: E402
from medeyes.models.vision_dedupe import distinct_rows, shared_image_encoding, vision_tower  # noqa: E402


@pytest.fixture(scope="module")
def backend(tiny_models) -> TransformersBackend:
    return TransformersBackend.from_pretrained(str(tiny_models.path("idefics3")))


def image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((96, 96, 3)) * 255).astype("uint8"))


def group_batch() -> list[list[dict]]:
    """Four rollouts of one case (same overview) and two of another; the last one has a second, shared image."""
    shared, other = image(0), image(1)
    question = {"type": "text", "text": "Is there a lesion?"}
    batch = [[{"role": "user", "content": [{"type": "image", "image": shared}, question]}] for _ in range(4)]
    batch.append([{"role": "user", "content": [{"type": "image", "image": other}, question]}])
    batch.append([{"role": "user", "content": [{"type": "image", "image": other}, {"type": "image", "image": shared}]}])
    return batch


def test_distinct_rows_needs_exact_equality() -> None:
    x = torch.zeros(4, 3, 8, 8)
    x[1, 0, 0, 0] = 1e-6  # one value differs: a different image
    x[3] = x[1]
    keep, inverse = distinct_rows(x, None)
    assert keep == [0, 1] and inverse.tolist() == [0, 1, 0, 1]
    mask = torch.ones(4, 2, 2, dtype=torch.bool)
    mask[2, 0, 0] = False  # same pixels, another patch mask: encoded separately
    assert distinct_rows(x, mask)[0] == [0, 1, 2]


def test_greedy_turns_identical_with_and_without_dedupe(backend: TransformersBackend) -> None:
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=16, seed=0)
    backend.dedupe_images = False
    plain = backend.generate(group_batch(), greedy)
    backend.dedupe_images = True
    deduped = backend.generate(group_batch(), greedy)
    for a, b in zip(plain, deduped, strict=True):
        assert a.token_ids == b.token_ids and a.text == b.text and a.logprobs == b.logprobs  # bitwise equal
    sampled = SamplingConfig(temperature=1.0, max_new_tokens=16, seed=3)
    backend.dedupe_images = False
    backend.reset_calls()  # call n samples with seed + n
    plain = backend.generate(group_batch(), sampled)
    backend.dedupe_images = True
    backend.reset_calls()
    assert [t.token_ids for t in backend.generate(group_batch(), sampled)] == [t.token_ids for t in plain]


def test_the_encoder_sees_each_distinct_image_once(backend: TransformersBackend) -> None:
    inputs = backend.encode(group_batch())
    with torch.no_grad(), shared_image_encoding(backend.model) as counter:
        backend.model(**inputs)
    assert counter is not None and counter.rows_in > counter.rows_encoded > 0
    # 6 rollouts hold 7 images of 2 distinct pictures; the processor may split each into the same tiles
    assert counter.rows_in / counter.rows_encoded == pytest.approx(7 / 2)
    assert "forward" not in vars(vision_tower(backend.model))  # the tower is restored on exit


def test_gradients_through_the_shared_encoding_equal_the_plain_ones(backend: TransformersBackend) -> None:
    inputs = backend.encode(group_batch())
    tower = vision_tower(backend.model)
    assert tower is not None

    def grads(dedupe: bool) -> list[torch.Tensor]:
        backend.model.zero_grad()
        with shared_image_encoding(backend.model, enabled=dedupe):
            logits = backend.model(**inputs).logits
        logits.float().square().mean().backward()
        return [p.grad.clone() for p in tower.parameters() if p.grad is not None]

    plain, deduped = grads(False), grads(True)
    assert len(plain) == len(deduped) > 0
    for a, b in zip(plain, deduped, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    backend.model.zero_grad()
