"""Image counterfactuals (issue 20 item 3): does the answer follow the image?

Real components throughout: the phantom source, the environment, the expert and random agents, and a small
scripted agent that answers from the drill view's pixels (defined here; it knows where the object is from
the case's boxes, so it always looks at the object, and reads only what the drill shows).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import Result
from PIL import Image
from typer.testing import CliRunner

from medeyes.agents.base import EpisodeContext, TurnOutput
from medeyes.agents.expert.agent import make_expert
from medeyes.agents.random_agent import RandomAgent
from medeyes.cli.app import app
from medeyes.evaluation.counterfactual import (
    ARMS,
    BLANK_GREY,
    ArmFigures,
    CounterfactualConfig,
    CounterfactualReport,
    run_counterfactuals,
)
from medeyes.rollout import RolloutConfig, run_rollout
from medeyes.trajectories import TrajectoryRecord, TrajectoryStore
from medeyes_env.cases import Case
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


# -- the measurement through its public function -----------------------------------------------------------------------


class DrillReader:
    """Drills the case's round object and answers a presence question from the drill view's pixels alone.

    It knows where the object is (the case's boxes), so it always looks at it; what it answers comes only from
    the view the environment returned: a mimic's stripes (alternate pixel columns) make the view's horizontal
    second differences far larger than its vertical ones. Other questions get the first option (no look).
    """

    name = "drill_reader"

    def describe(self) -> dict[str, Any]:
        return {"kind": "other", "name": self.name}

    def act(self, batch: list[EpisodeContext]) -> list[TurnOutput]:
        return [TurnOutput(text=self._turn(context)) for context in batch]

    def _turn(self, context: EpisodeContext) -> str:
        case = context.case
        if case.meta.get("family") != "presence":
            return render_turn(Action.final_answer(case.options[0] if case.options else "unknown"))
        if context.step == 0:
            (obj,) = case.regions or case.lookalikes
            return _drill(obj.box)
        view = next(p["image"] for p in context.messages[-1]["content"] if p["type"] == "image")
        grey = np.asarray(view, dtype=float)[64:192, 64:192, 0]
        across = np.abs(np.diff(grey, 2, axis=1)).mean()
        down = np.abs(np.diff(grey, 2, axis=0)).mean()
        return render_turn(Action.final_answer("no" if across > 3 * down else "yes"))


def _arms(report: CounterfactualReport) -> dict[str, ArmFigures]:
    return {arm.arm: arm for arm in report.arms}


def _records(out: Path, arm: str) -> dict[str, TrajectoryRecord]:
    store = TrajectoryStore(out / "counterfactual" / "phantom" / arm, read_only=True)
    return {record.trajectory_id: record for record in store.records()}


CONFIG = CounterfactualConfig(n=24, store_images=True)


def test_a_pixel_reading_agent_follows_the_swapped_object_in_both_directions(tmp_path: Path) -> None:
    report = run_counterfactuals(DrillReader(), open_source("phantom:look"), ARMS, CONFIG, tmp_path)
    arms = _arms(report)
    assert list(arms) == list(ARMS)
    assert arms["real"].presence_accuracy == 1.0 and arms["real"].presence_episodes >= 8
    for name in ("swap", "drill_swap"):
        arm = arms[name]
        assert arm.reached_yes_to_no >= 3 and arm.reached_no_to_yes >= 3
        assert arm.follows_yes_to_no == 1.0 and arm.follows_no_to_yes == 1.0
        assert arm.changed_presence == 1.0
    assert arms["swap"].presence_accuracy == 1.0  # scored against the swapped gold
    assert arms["drill_swap"].presence_accuracy == 0.0  # scored against the real gold: it read the drill
    # A blank drill shows no stripes: every mimic case's answer changes to yes.
    assert 0.2 < arms["blank"].changed_presence < 0.8


def test_blank_and_shuffle_change_the_image_and_drill_swap_keeps_the_overview(tmp_path: Path) -> None:
    source = open_source("phantom:look")
    run_counterfactuals(DrillReader(), source, ARMS, CONFIG.model_copy(update={"n": 6}), tmp_path)
    stores = {arm: TrajectoryStore(tmp_path / "counterfactual" / "phantom" / arm, read_only=True) for arm in ARMS}
    records = {arm: {r.trajectory_id: r for r in store.records()} for arm, store in stores.items()}
    real_images = {tid: np.asarray(stores["real"].load_image(r.original_image)) for tid, r in records["real"].items()}
    shown = [image for image in real_images.values()]
    for tid, real in real_images.items():
        blank = np.asarray(stores["blank"].load_image(records["blank"][tid].original_image))
        assert blank.shape == real.shape and (blank == BLANK_GREY).all()
        other = np.asarray(stores["shuffle"].load_image(records["shuffle"][tid].original_image))
        assert not np.array_equal(other, real) and any(np.array_equal(other, image) for image in shown)
        swapped = np.asarray(stores["swap"].load_image(records["swap"][tid].original_image))
        assert not np.array_equal(swapped, real)
        drill_swap = records["drill_swap"][tid]
        assert np.array_equal(np.asarray(stores["drill_swap"].load_image(drill_swap.original_image)), real)
        first_view = stores["drill_swap"].load_image(drill_swap.image)
        assert np.array_equal(np.asarray(first_view), np.asarray(stores["real"].load_image(records["real"][tid].image)))


def test_the_expert_reads_gold_not_pixels_and_the_random_agent_reads_nothing(tmp_path: Path) -> None:
    source = open_source("phantom:look")
    expert = _arms(run_counterfactuals(make_expert(), source, ARMS, CONFIG, tmp_path / "expert"))
    # The annotation oracle proposes and judges regions from the case's gold boxes and answer: the swap arm
    # changes the gold, so it follows; a swapped drill view changes nothing it reads.
    assert expert["swap"].follows_no_to_yes == 1.0 and expert["swap"].reached_no_to_yes >= 3
    assert expert["drill_swap"].changed_presence == 0.0
    assert expert["blank"].changed_presence == 0.0 and expert["shuffle"].changed_presence == 0.0
    random = _arms(run_counterfactuals(RandomAgent(), source, ARMS, CONFIG, tmp_path / "random"))
    assert all(random[arm].changed == 0.0 for arm in ARMS if arm != "real")


def test_an_arm_plays_the_same_episodes_after_real_as_in_a_fresh_process(tmp_path: Path) -> None:
    """The annotation oracle cached distractor sites by case id: the swap arm got the real case's sites."""
    source = open_source("phantom:look")
    run_counterfactuals(make_expert(), source, ["swap"], CONFIG, tmp_path)

    class Swapped:
        name = "phantom"

        def size(self, split: str) -> None:
            return None

        def case(self, split: str, index: int) -> Case:
            return source.swapped_case(split, index)

    alone = run_rollout(make_expert(), Swapped(), RolloutConfig(n=CONFIG.n, samples_per_case=1))
    after_real = _records(tmp_path, "swap")
    for record in alone.records:
        paired = after_real[record.trajectory_id]
        assert paired.final_answer == record.final_answer
        assert [s.shown_boxes for s in paired.steps] == [s.shown_boxes for s in record.steps]


def test_a_source_that_cannot_swap_reports_the_swap_arms_not_available() -> None:
    report = run_counterfactuals(RandomAgent(), open_source("samples"), ARMS, CounterfactualConfig(n=3))
    arms = _arms(report)
    assert not arms["swap"].available and not arms["drill_swap"].available
    assert "cannot render a class swap" in arms["swap"].note
    assert arms["blank"].available and arms["blank"].episodes == 3


# -- through the CLI ------------------------------------------------------------------------------------------------


def _cli(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def test_rollout_counterfactual_prints_every_arm_writes_json_and_resumes(tmp_path: Path) -> None:
    args = ("rollout", "--agent", "random", "--data", "phantom:look", "--n", "4", "--counterfactual", "all")
    first = _cli(*args, "--out", str(tmp_path), "--quiet")
    assert first.exit_code == 0, first.output
    for arm in ARMS:
        assert f"│ {arm} " in first.output
    (report,) = json.loads((tmp_path / "counterfactual.json").read_text())
    assert [arm["arm"] for arm in report["arms"]] == list(ARMS) and report["n"] == 4
    assert sorted(p.name for p in (tmp_path / "counterfactual" / "phantom").iterdir()) == sorted(ARMS)
    again = _cli(*args, "--out", str(tmp_path), "--quiet")
    assert "0 episodes played" in again.output and "20 read back from the stores" in again.output
    assert json.loads((tmp_path / "counterfactual.json").read_text())[0]["arms"] == report["arms"]


def test_eval_counterfactual_takes_a_comma_list_and_says_where_a_source_cannot_swap(tmp_path: Path) -> None:
    path = tmp_path / "cf.json"
    args = ("eval", "--agent", "expert", "--data", "phantom:look", "--data", "samples", "--limit", "3")
    result = _cli(*args, "--counterfactual", "swap,blank", "--json", str(path), "--quiet")
    assert result.exit_code == 0, result.output
    look, samples = json.loads(path.read_text())
    assert [arm["arm"] for arm in look["arms"]] == ["real", "blank", "swap"]
    assert look["arms"][2]["available"] and not samples["arms"][2]["available"]
    assert "not renderable" in result.output


def test_an_unknown_arm_is_one_red_line_naming_the_choices() -> None:
    result = _cli("rollout", "--agent", "random", "--n", "2", "--counterfactual", "blank,swop")
    assert result.exit_code == 2
    assert "--counterfactual takes 'all' or a comma list of real, blank, shuffle, swap, drill_swap" in result.output


def test_the_tiny_policy_plays_every_arm_greedily() -> None:
    args = ("rollout", "--agent", "policy", "--model", "tiny", "--data", "phantom:look", "--n", "2")
    result = _cli(*args, "--max-new-tokens", "16", "--temperature", "0", "--counterfactual", "all", "--quiet")
    assert result.exit_code == 0, result.output
    assert all(f"│ {arm} " in result.output for arm in ARMS) and "10 episodes played" in result.output


def test_a_real_store_passed_off_as_another_arm_is_refused(tmp_path: Path) -> None:
    """Each arm has its own store, and the arm is part of its settings: real's episodes never count as blank's."""
    args = ("rollout", "--agent", "random", "--data", "phantom:look", "--n", "2", "--out", str(tmp_path), "--quiet")
    assert _cli(*args, "--counterfactual", "real").exit_code == 0
    root = tmp_path / "counterfactual" / "phantom"
    shutil.copytree(root / "real", root / "blank")
    result = _cli(*args, "--counterfactual", "blank")
    assert result.exit_code == 2
    assert "holds episodes of other settings: options.counterfactual: stored 'real', this run 'blank'" in result.output


def test_a_tampered_arm_record_is_refused_naming_file_line_and_field(tmp_path: Path) -> None:
    """A counterfactual store is read back only after the eval store's check: components as the answer scores."""
    args = ("rollout", "--agent", "random", "--data", "phantom:look", "--n", "2", "--out", str(tmp_path), "--quiet")
    assert _cli(*args, "--counterfactual", "swap").exit_code == 0
    path = tmp_path / "counterfactual" / "phantom" / "swap" / "trajectories.jsonl"
    lines = path.read_text().splitlines()
    record = json.loads(lines[0])
    record["reward_components"]["accuracy"] = 1.0 - record["reward_components"]["accuracy"]
    path.write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
    result = _cli(*args, "--counterfactual", "swap")
    assert result.exit_code == 2
    assert "trajectories.jsonl:1: reward_components.accuracy" in result.output
