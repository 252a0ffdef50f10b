"""Image counterfactuals (issue 20 item 3): does the answer follow the image?

Real components throughout: the phantom source, the environment, the expert and random agents, and a small
scripted agent that answers from the drill view's pixels (defined here; it knows where the object is from
the case's boxes, so it always looks at the object, and reads only what the drill shows).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medeyes_env.env import MedEyesEnv
from medeyes_env.protocol import Action, render_turn
from medeyes_env.sources import open_source


def test_swapped_phantom_case_differs_only_around_its_object_and_flips_presence() -> None:
    source = open_source("phantom:look")
    flipped = 0
    for index in range(12):
        case, swapped = source.case("test", index), source.swapped_case("test", index)
        assert swapped is not None and swapped.id == case.id and swapped.question == case.question
        (obj,) = case.regions or case.lookalikes  # phantom:look: one round object, lesion or mimic
        real = np.asarray(case.load_image(), dtype=int)
        other = np.asarray(swapped.load_image(), dtype=int)
        ys, xs = np.nonzero(np.abs(real - other).max(axis=-1))
        assert xs.size > 200, "the object's class must change its pixels"
        x1, y1, x2, y2 = obj.box
        margin = 4  # the stamp reaches a few px past the gold box's radius + 1.5
        assert (
            x1 - margin <= xs.min() and xs.max() <= x2 + margin and y1 - margin <= ys.min() and ys.max() <= y2 + margin
        )
        # The swapped case's boxes: the object is now the other class, at the same place.
        assert [r.box for r in swapped.regions] == [r.box for r in case.lookalikes]
        assert [r.box for r in swapped.lookalikes] == [r.box for r in case.regions]
        if case.meta["family"] == "presence":
            assert {case.answer, swapped.answer} == {"yes", "no"}
            flipped += 1
        else:
            assert swapped.answer == case.answer
        # Rendering twice gives the same bytes (the case's own noise RNG, not a fresh one).
        assert np.array_equal(np.asarray(swapped.load_image(), dtype=int), other)
    assert flipped >= 3


def test_swap_is_undefined_where_the_answer_names_one_lesion() -> None:
    source = open_source("phantom")
    families = {}
    for index in range(40):
        case = source.case("test", index)
        families.setdefault(case.meta["family"], source.swapped_case("test", index))
    assert families["size"] is None and families["location"] is None
    assert families["presence"] is not None and families["modality"] is not None


# -- the environment's drill_image option (the drill_swap arm) ---------------------------------------------------------


def _drill(box: tuple[float, ...]) -> str:
    return render_turn(Action.drill(box))


def test_drill_image_replaces_only_the_drill_views() -> None:
    source = open_source("phantom:look")
    index = next(i for i in range(20) if source.case("test", i).meta["family"] == "presence")
    case, swapped = source.case("test", index), source.swapped_case("test", index)
    (obj,) = case.regions or case.lookalikes
    views = {}
    for name, options in (("real", {}), ("drill_swap", {"drill_image": swapped.load_image()})):
        env = MedEyesEnv(source, split="test")
        overview, _ = env.reset(seed=3, options={"case_index": index, **options})
        scan, *_ = env.step(render_turn(Action.scan(obj.box, (0, 0, 100, 100))))
        drill, *_ = env.step(_drill(obj.box))
        views[name] = (overview["image"], scan["image"], drill["image"], env.turns[-1].shown_boxes)
    real, other = views["real"], views["drill_swap"]
    assert np.array_equal(real[0], other[0]), "the overview must be the real case's"
    assert np.array_equal(real[1], other[1]), "scans must show the real case"
    assert not np.array_equal(real[2], other[2]), "the drill must show the swapped image"
    assert real[3] == other[3], "the same box is shown (box convention unchanged)"
    # The drill view is the one a drill of the swapped case itself gives.
    env = MedEyesEnv(source, split="test")
    env.reset(seed=3, options={"case": swapped})
    own, *_ = env.step(_drill(obj.box))
    assert np.array_equal(own["image"], other[2])


def test_drill_image_of_another_size_is_refused_naming_both_sizes() -> None:
    env = MedEyesEnv(open_source("phantom:look"), split="test")
    with pytest.raises(ValueError, match=r"options\['drill_image'\] is 64x64 but the case's image is 512x512"):
        env.reset(seed=0, options={"case_index": 0, "drill_image": Image.new("RGB", (64, 64))})
