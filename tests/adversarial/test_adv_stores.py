"""Hostile trajectory stores: torn tails are kept when they parse and moved aside when not; every corruption is a
RecordError naming FILE:LINE; stored images are opened with a pixel limit."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from medeyes.trajectories import Producer, TrajectoryRecord, TrajectoryStore, read_records
from medeyes_env.errors import RecordError
from tests.adversarial.test_adv_images import float_tiff_header

PRODUCER = Producer(kind="other", name="test")


def _record(tid: str, **fields) -> TrajectoryRecord:
    values = dict(
        trajectory_id=tid,
        case_id="c/1",
        source="test",
        split="test",
        question="q",
        answer_type="closed",
        gold_answer="yes",
        image_size=(8, 8),
        producer=PRODUCER,
    )
    return TrajectoryRecord(**{**values, **fields})


def _store(tmp_path, *ids):
    store = TrajectoryStore(tmp_path / "run")
    for tid in ids:
        store.append(_record(tid))
    return store, store.records_path


def test_complete_last_record_without_its_newline_is_kept(tmp_path):
    _, path = _store(tmp_path, "a", "b")
    path.write_bytes(path.read_bytes()[:-1])  # only the trailing newline was lost
    assert [r.trajectory_id for r in read_records(path)] == ["a", "b"]
    reopened = TrajectoryStore(tmp_path / "run")
    assert reopened.repaired == 0 and reopened.completed_tail and reopened.torn_path is None
    assert [r.trajectory_id for r in reopened.records()] == ["a", "b"]  # before: ["a"], "repaired a torn line"
    assert path.read_bytes().endswith(b"}\n") and not path.with_name("trajectories.jsonl.torn").exists()
    assert reopened.append(_record("c")) and len(read_records(path)) == 3


def test_unparseable_tail_is_moved_aside_not_destroyed(tmp_path):
    _, path = _store(tmp_path, "a", "b")
    whole = path.read_bytes()
    tail = _record("c").model_dump_json().encode()[:57]
    path.write_bytes(whole + tail)
    reopened = TrajectoryStore(tmp_path / "run")
    assert reopened.repaired == 57 and reopened.torn_path == path.with_name("trajectories.jsonl.torn")
    assert path.read_bytes() == whole and reopened.torn_path.read_bytes() == tail + b"\n"
    path.write_bytes(whole + b"\xff\xfe")  # a second crash: appended to the same .torn file
    TrajectoryStore(tmp_path / "run")
    assert reopened.torn_path.read_bytes() == tail + b"\n\xff\xfe\n"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b'{"trajectory_id": "\xff"}', r"trajectories.jsonl:2: not UTF-8 text \(byte 0xff at offset 19\)"),
        (b"[" * 50_000 + b"]" * 50_000, r"trajectories.jsonl:2: JSON nested too deeply"),
        (b'{"trajectory_id": "x", "trajectory_id": "y"}', r"trajectories.jsonl:2: duplicate key 'trajectory_id'"),
        (b'{"seed": ' + b"9" * 5000 + b"}", r"trajectories.jsonl:2: invalid JSON \(Exceeds the limit \(4300 digits\)"),
        (b"{broken", r"trajectories.jsonl:2: invalid JSON \(Expecting property name"),
    ],
    ids=["non-utf8", "deep", "duplicate-key", "5000-digits", "syntax"],
)
def test_corrupt_middle_line_is_a_named_error_for_writers_and_readers(tmp_path, line, message):
    _, path = _store(tmp_path, "a")
    path.write_bytes(path.read_bytes() + line + b"\n" + _record("b").model_dump_json().encode() + b"\n")
    with pytest.raises(RecordError, match=message + ".*the file was edited or corrupted"):
        TrajectoryStore(tmp_path / "run")
    with pytest.raises(RecordError, match=message):
        read_records(path)


def test_out_of_range_box_number_is_a_named_error(tmp_path):
    _, path = _store(tmp_path, "a")
    data = json.loads(_record("b").model_dump_json())
    text = json.dumps(data).replace('"gold_boxes": []', '"gold_boxes": [[0, 0, 1' + "0" * 400 + ", 1]]")
    path.write_text(path.read_text() + text + "\n")
    with pytest.raises(RecordError, match=r"trajectories.jsonl:2 is not a valid trajectory record: gold_boxes.0.2: "):
        read_records(path)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\nnot really"), r"cannot read stored image .*\.png: "),
        (lambda p: p.mkdir(), r"\.png: not an image file \(a directory or special file\)"),
        (lambda p: Image.new("1", (9000, 9000)).save(p, format="PNG"), r"png is 9000x9000, above the 64,000,000-pixel"),
        (lambda p: float_tiff_header(p, 8000, 8000), r"256,000,000 bytes decoded, above the 192,000,000-byte limit"),
    ],
    ids=["corrupt", "directory", "bomb", "decoded-bytes"],
)
def test_bad_image_under_a_valid_hash_is_a_named_error(tmp_path, make, message):
    store, _ = _store(tmp_path)
    digest = "ab" * 32
    make(store.image_path(digest))
    with pytest.raises(RecordError, match=message):
        store.load_image(digest)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"producer": "\xff"}', r"run.json:1: not UTF-8 text \(byte 0xff at offset 14\); delete it"),
        (b"[" * 50_000, r"run.json: JSON nested too deeply; delete it"),
        (b"[1]", r"run.json: expected a JSON object, got list"),
    ],
)
def test_bad_run_json_is_a_named_error(tmp_path, content, message):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_bytes(content)
    with pytest.raises(RecordError, match=message):
        TrajectoryStore(tmp_path / "run", producer=PRODUCER)


def _cli(*args: str) -> tuple[int, str]:
    from typer.testing import CliRunner

    from medeyes.cli.app import app

    result = CliRunner().invoke(app, list(args))
    return result.exit_code, " ".join(result.output.split())


EVAL = ("eval", "--limit", "4", "--quiet")


def _edit_first_record(out, edit) -> str:
    """Apply ``edit`` to the first stored record of the eval store under ``out``; return the file's path."""
    (path,) = (out / "tools_on").rglob("trajectories.jsonl")
    first, *rest = path.read_text().splitlines(keepends=True)
    data = json.loads(first)
    edit(data)
    path.write_text(json.dumps(data) + "\n" + "".join(rest))
    return str(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r["reward_components"].update(accuracy=7.0), "reward_components.accuracy is 7.0, outside [0, 1]"),
        (lambda r: r["reward_components"].update(best_iou=9.0), "reward_components.best_iou is 9.0, outside [0, 1]"),
        (lambda r: r.update(reward=float("inf")), "reward: Input should be a finite number"),
        (lambda r: r["reward_components"].update(accuracy=float("nan")), "reward_components.accuracy: Input should be a finite number"),
        (lambda r: r.update(answer_type="[/]"), "answer_type: Input should be 'closed', 'open' or 'choice'"),
        (lambda r: r.update(final_answer="certainly not this"), "reward_components.accuracy is 1.0 in the store, but the stored answer and boxes score 0.0"),
        (lambda r: r.update(gold_boxes=[[0, 0, 1024, 1024]]), "gold_boxes is [[0.0, 0.0, 1024.0, 1024.0]] in the store, but case 'phantom/test/"),
        (lambda r: r.update(steps=r["steps"][:1] * 9 + r["steps"][-1:]), "steps: 9 tool turns, more than max_steps=4"),
    ],
    ids=["accuracy-700%", "iou-9", "inf-reward", "nan-accuracy", "markup-answer-type", "answer-swapped", "gold-moved", "steps"],
)  # fmt: skip
def test_a_tampered_eval_record_is_refused_naming_file_line_and_field(tmp_path, edit, message):
    """Before: 700% accuracy, IoU 9.0, an infinite reward were scored as stored, and '[/]' crashed the table."""
    out = tmp_path / "eval"
    code, output = _cli(*EVAL, "--out", str(out))
    assert code == 0, output
    path = _edit_first_record(out, edit)
    code, output = _cli(*EVAL, "--out", str(out))
    assert code == 2, output
    assert f"error: {path}:1" in output and message in output


def test_a_rollout_store_of_another_dataset_is_refused(tmp_path):
    """Case ids are positional (phantom/test/000000 in every preset): resuming used to skip the hard cases."""
    out = str(tmp_path / "run")
    code, output = _cli("rollout", "--data", "phantom:easy", "--n", "2", "--samples", "1", "--out", out, "--quiet")
    assert code == 0, output
    code, output = _cli("rollout", "--data", "phantom:hard", "--n", "2", "--samples", "1", "--out", out, "--quiet")
    assert code == 2, output  # before: "skipped 2 already there", the easy episodes summarised as hard ones
    assert "data: stored 'phantom:easy', this run 'phantom:hard'" in output
    code, output = _cli("rollout", "--data", "phantom:easy", "--n", "4", "--samples", "1", "--out", out, "--quiet")
    assert code == 0 and "stored 2 trajectories" in output and "skipped 2 already there" in output, output


def test_a_store_without_recorded_settings_is_refused(tmp_path):
    """A store written before settings were recorded cannot be matched to a dataset: refused, not trusted."""
    args = ("rollout", "--n", "1", "--samples", "1", "--out", str(tmp_path / "run"), "--quiet")
    code, output = _cli(*args)
    assert code == 0, output
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    (tmp_path / "run" / "run.json").write_text(json.dumps({k: v for k, v in info.items() if k != "settings"}))
    code, output = _cli(*args)
    assert code == 2, output
    assert "run.json records no episode settings" in output


def test_a_served_image_over_the_decoded_byte_limit_is_refused_before_decoding(tmp_path):
    """The client decodes what a server sends with the same limits as a dataset image (pixels and decoded bytes)."""
    import base64

    pytest.importorskip("openenv")
    from medeyes_env.serving.wire import DATA_URL_PREFIX, decode_image

    float_tiff_header(tmp_path / "huge.tif", 8000, 8000)
    url = DATA_URL_PREFIX + base64.b64encode((tmp_path / "huge.tif").read_bytes()).decode()
    with pytest.raises(ValueError, match=r"256,000,000 bytes decoded, above the 192,000,000-byte limit"):
        decode_image(url)
