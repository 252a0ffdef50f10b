"""The trajectory store and the rollout driver: atomic appends, resume, torn lines, versions, determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from medeyes.agents.expert.agent import make_expert
from medeyes.agents.random_agent import RandomAgent
from medeyes.rollout import RolloutConfig, producer_of, run_rollout
from medeyes.rollout_summary import summarize
from medeyes.trajectories import (
    SCHEMA_VERSION,
    Producer,
    RecordSink,
    TrajectoryRecord,
    TrajectoryStore,
    image_digest,
    parse_record,
    read_records,
)
from medeyes_env.env import MedEyesEnv
from medeyes_env.errors import RecordError

PRODUCER = Producer(kind="other", name="test")


def record(tid: str, **fields) -> TrajectoryRecord:
    values = dict(
        trajectory_id=tid,
        case_id="c/1",
        source="test",
        split="test",
        question="Is there a nodule?",
        answer_type="closed",
        gold_answer="yes",
        image_size=(64, 64),
        producer=PRODUCER,
    )
    values.update(fields)
    return TrajectoryRecord(**values)


def test_append_read_and_skip_duplicates(tmp_path):
    store = TrajectoryStore(tmp_path / "run", producer=PRODUCER)
    assert store.append(record("a"))
    assert store.append(record("b", final_answer="yes"))
    assert not store.append(record("a")), "a duplicate id must not be written twice"
    reopened = TrajectoryStore(tmp_path / "run", producer=PRODUCER)
    assert [r.trajectory_id for r in reopened.records()] == ["a", "b"]
    assert "a" in reopened and len(reopened) == 2
    assert not reopened.append(record("b"))
    assert len((tmp_path / "run" / "trajectories.jsonl").read_text().splitlines()) == 2


def test_images_are_stored_once_by_content(tmp_path):
    store = TrajectoryStore(tmp_path / "run")
    image = Image.new("RGB", (8, 8), (10, 20, 30))
    first = store.put_image(image)
    second = store.put_image(np.asarray(image))
    assert first == second == image_digest(image)
    assert len(list((tmp_path / "run" / "images").iterdir())) == 1
    assert np.array_equal(np.asarray(store.load_image(first)), np.asarray(image))
    other = store.put_image(Image.new("RGB", (8, 8), (10, 20, 31)))
    assert other != first


def test_a_record_naming_a_missing_image_is_refused(tmp_path):
    store = TrajectoryStore(tmp_path / "run")
    with pytest.raises(RecordError, match="store images with put_image"):
        store.append(record("a", image="0" * 64))


def test_torn_last_line_is_cut_off_and_the_run_resumes(tmp_path):
    store = TrajectoryStore(tmp_path / "run")
    store.append(record("a"))
    store.append(record("b"))
    path = store.records_path
    whole = path.read_bytes()
    path.write_bytes(whole + record("c").model_dump_json().encode()[:57])  # a crash mid-append
    assert [r.trajectory_id for r in read_records(path)] == ["a", "b"], "readers ignore a torn last line"
    assert [r.trajectory_id for r in TrajectoryStore(tmp_path / "run", read_only=True).records()] == ["a", "b"]
    reopened = TrajectoryStore(tmp_path / "run")
    assert reopened.repaired == 57
    assert path.read_bytes() == whole
    assert reopened.append(record("c"))
    assert [r.trajectory_id for r in reopened.records()] == ["a", "b", "c"]


def test_unknown_schema_version_is_refused_with_a_clear_message(tmp_path):
    data = json.loads(record("a").model_dump_json())
    data["schema_version"] = 99
    with pytest.raises(RecordError) as error:
        parse_record(json.dumps(data), "line 1 of x.jsonl")
    assert str(error.value) == (
        f"line 1 of x.jsonl has schema_version 99; this MedEyes reads trajectory records of version {SCHEMA_VERSION} "
        "only. Re-create the trajectories with this version, or read them with the MedEyes release that wrote them."
    )
    path = tmp_path / "old.jsonl"
    path.write_text(json.dumps(data) + "\n")
    with pytest.raises(RecordError, match="schema_version 99"):
        read_records(path)


def test_malformed_records_are_refused(tmp_path):
    with pytest.raises(RecordError, match=r"line 3: invalid JSON \(Expecting property name enclosed in double quotes"):
        parse_record("{nope", "line 3")
    with pytest.raises(RecordError, match="line 3 is not a valid trajectory record: case_id"):
        parse_record(json.dumps({"schema_version": SCHEMA_VERSION, "trajectory_id": "x"}), "line 3")


def test_resume_refuses_another_producer(tmp_path):
    TrajectoryStore(tmp_path / "run", producer=PRODUCER)
    with pytest.raises(RecordError, match="holds trajectories of another producer"):
        TrajectoryStore(tmp_path / "run", producer=Producer(kind="expert", name="expert", oracle="image"))


def test_read_only_store_writes_nothing(tmp_path):
    TrajectoryStore(tmp_path / "run").append(record("a"))
    store = TrajectoryStore(tmp_path / "run", read_only=True)
    with pytest.raises(RecordError, match="read-only"):
        store.append(record("b"))
    with pytest.raises(RecordError, match="no run directory"):
        TrajectoryStore(tmp_path / "missing", read_only=True)


def test_rollout_records_rebuild_the_chat_the_env_showed(tmp_path):
    store = TrajectoryStore(tmp_path / "run")
    expert = make_expert("perfect")
    result = run_rollout(expert, "phantom", RolloutConfig(n=2, samples_per_case=1, seed=3), store=store)
    assert result.stored == 2 and len(store) == 2
    for rec in store.records():
        env = MedEyesEnv("phantom", split="test")
        env.reset(seed=rec.seed, options={"case_index": int(rec.case_id.rsplit("/", 1)[1])})
        for step in rec.steps:
            env.step(step.text)
        expected = env.chat_messages()
        rebuilt = rec.chat_messages(store)
        assert [m["role"] for m in rebuilt] == [m["role"] for m in expected]
        for mine, theirs in zip(rebuilt, expected, strict=True):
            for a, b in zip(mine["content"], theirs["content"], strict=True):
                if a["type"] == "text":
                    assert a["text"] == b["text"]
                else:
                    assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))


def test_rollout_is_deterministic_and_independent_of_batch_size():
    agent = RandomAgent()
    config = RolloutConfig(n=3, samples_per_case=2, seed=5, batch_size=1)
    first = run_rollout(agent, "phantom", config).records
    second = run_rollout(agent, "phantom", config.model_copy(update={"batch_size": 4})).records

    def key(records):
        return sorted((r.trajectory_id, tuple(s.text for s in r.steps), r.reward) for r in records)

    assert key(first) == key(second)
    assert len(first) == 6


def test_interrupted_run_resumes_without_duplicates(tmp_path):
    agent = make_expert("perfect")
    config = RolloutConfig(n=3, samples_per_case=1, seed=1)
    producer = producer_of(agent)
    store = TrajectoryStore(tmp_path / "run", producer=producer)
    run_rollout(agent, "phantom", config.model_copy(update={"n": 2}), store=store)
    path = store.records_path
    path.write_bytes(path.read_bytes()[:-40])  # the second record was torn by a crash
    store = TrajectoryStore(tmp_path / "run", producer=producer)
    result = run_rollout(agent, "phantom", config, store=store)
    assert result.skipped == 1 and result.stored == 2
    ids = [r.trajectory_id for r in store.records()]
    assert len(ids) == len(set(ids)) == 3


def test_keep_only_correct_filters_the_store_but_not_the_summary(tmp_path):
    store = TrajectoryStore(tmp_path / "run")
    result = run_rollout(
        RandomAgent(), "phantom", RolloutConfig(n=8, samples_per_case=1, keep_only_correct=True), store=store
    )
    summary = summarize(result.records, result.seconds)
    stored = list(store.records())
    assert summary.episodes == 8
    assert all(r.correct for r in stored)
    assert len(stored) == sum(r.correct for r in result.records) == summary.kept


def test_policy_token_ids_and_logprobs_are_recorded():
    from medeyes.agents.base import TurnOutput

    class Scripted:
        name = "scripted"

        def act(self, batch):
            return [
                TurnOutput(text="<reasoning>r</reasoning><answer>yes</answer>", token_ids=[1, 2], logprobs=[-0.1, -0.2])
                for _ in batch
            ]

        def describe(self):
            return {"kind": "policy", "name": "scripted", "checkpoint": "ckpt-7"}

    (rec,) = run_rollout(Scripted(), "phantom", RolloutConfig(n=1)).records
    assert rec.steps[0].token_ids == [1, 2] and rec.steps[0].logprobs == [-0.1, -0.2]
    assert rec.producer.kind == "policy" and rec.producer.checkpoint == "ckpt-7"
    assert rec.terminated and rec.final_answer == "yes"


def test_episodes_without_a_system_message_are_recorded_and_rebuilt(tmp_path):
    """instructions="none": the record keeps an empty system prompt and rebuilds the messages without one."""
    from medeyes_env.env import EnvConfig
    from medeyes_env.sources import open_source

    env = EnvConfig(max_steps=1, instructions="none", box_format={"kind": "loc", "bins": 16})
    store = TrajectoryStore(tmp_path / "store")
    result = run_rollout(RandomAgent(), open_source("phantom:look"), RolloutConfig(n=2, env=env), store=store)
    record = result.records[0]
    assert record.system_prompt == "" and record.prompt
    messages = record.chat_messages(store)
    assert messages[0]["role"] == "user" and messages[0]["content"][1]["text"] == record.prompt


def test_the_memory_store_has_the_trajectory_store_interface(tmp_path):
    from medeyes.trajectories import MemoryStore

    for store in (MemoryStore(), TrajectoryStore(tmp_path / "s")):
        assert isinstance(store, RecordSink)
    memory = MemoryStore()
    records = run_rollout(RandomAgent(), "phantom:easy", RolloutConfig(n=2), store=memory).records
    assert all(r.trajectory_id in memory for r in records)
    assert records[0].chat_messages(memory)[1]["content"][0]["image"] is memory.load_image(records[0].image)


def test_the_record_reward_is_the_environments_total_with_its_malformed_penalty():
    from medeyes.agents.base import TurnOutput
    from medeyes_env.env import EnvConfig

    class GarbleThenAnswer:
        name = "garble"

        def describe(self):
            return {"kind": "scripted", "name": self.name}

        def act(self, batch):
            return [
                TurnOutput(text="no tags here" if c.step == 0 else "<reasoning>r</reasoning><answer>yes</answer>")
                for c in batch
            ]

    env = EnvConfig(malformed_penalty=0.25)
    records = run_rollout(GarbleThenAnswer(), "phantom:easy", RolloutConfig(n=3, env=env)).records
    for record in records:
        replay = MedEyesEnv("phantom:easy", split="test", config=env)
        replay.reset(seed=record.seed, options={"case_index": int(record.case_id.rsplit("/", 1)[1])})
        paid = [replay.step(step.text)[1] for step in record.steps]
        assert paid[0] == -0.25  # the unparseable first turn
        assert record.reward == sum(paid)
