"""Hostile checkpoints: nothing in a run directory is ever executed, and ``latest`` never leaves the run.

Every case writes its own hostile files, then asserts the named error and its message, and that a pickle
payload (which would create a marker file when unpickled) never ran.
"""

from __future__ import annotations

import json
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from medeyes.training.checkpoints import (  # noqa: E402
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint_state,
    save_checkpoint,
)
from medeyes_env.errors import RecordError, UnsafePathError  # noqa: E402


class _Payload:
    """Unpickling this creates ``marker``: the proof that code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def _model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    for _ in range(2):
        model(torch.randn(5, 4)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def _checkpoint(run_dir: Path) -> Path:
    model, optimizer = _model_and_optimizer()
    return save_checkpoint(run_dir, 3, model, optimizer, {"stage": "grpo", "config": {"seed": 1}}, keep=2)


def test_round_trip_restores_weights_optimizer_and_every_rng_exactly(tmp_path):
    model, optimizer = _model_and_optimizer()
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's legacy state
    path = save_checkpoint(tmp_path, 3, model, optimizer, {"stage": "grpo"}, keep=2)
    expected = (random.random(), np.random.standard_normal(), torch.rand(3))
    assert sorted(p.name for p in path.iterdir()) == [
        "model.safetensors",
        "optimizer.json",
        "optimizer.safetensors",
        "rng.json",
        "rng.safetensors",
        "state.json",
    ]

    fresh = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    state = load_checkpoint(latest_checkpoint(tmp_path), fresh)
    assert (random.random(), np.random.standard_normal()) == expected[:2]
    assert torch.equal(torch.rand(3), expected[2])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True))
    assert state["step"] == 3 and state["stage"] == "grpo"
    saved, loaded = optimizer.state_dict(), state["optimizer"]
    assert loaded["param_groups"] == saved["param_groups"]  # betas come back as a tuple, params as ints
    assert loaded["state"].keys() == saved["state"].keys()
    for index, slots in saved["state"].items():
        assert all(torch.equal(slots[k], loaded["state"][index][k]) for k in slots)
    restored = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    restored.load_state_dict(loaded)  # accepted by torch as is


def test_legacy_pickle_checkpoint_is_refused_and_its_payload_never_runs(tmp_path):
    path = _checkpoint(tmp_path)
    marker = tmp_path / "pwned"
    for name in ("rng.pt", "optimizer.pt"):
        (path / name).write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(RecordError, match=r"step-0000003 is in the old pickle format \(rng.pt, optimizer.pt\)"):
        load_checkpoint(path, torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)))
    assert not marker.exists()


@pytest.mark.parametrize("name", ["model.safetensors", "rng.safetensors", "optimizer.safetensors"])
def test_pickle_under_a_safetensors_name_is_refused_and_never_runs(tmp_path, name):
    path = _checkpoint(tmp_path)
    marker = tmp_path / "pwned"
    (path / name).write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(RecordError, match=rf"{name}: not a valid safetensors file"):
        load_checkpoint(path, torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)))
    assert not marker.exists()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("state.json", b"\xff\xfe{", r"state.json: not UTF-8 \(byte 0\)"),
        ("state.json", b"[" * 100_000, r"state.json: JSON nested too deeply"),
        ("state.json", b'{"step": 1,\n "stage": }', r"state.json:2: not valid JSON"),
        ("state.json", b'{"step": "3"}', r"state.json: expected an object with a non-negative integer 'step'"),
        ("rng.json", b'{"numpy": {}, "python": {}}', r"rng.json: malformed RNG state \(KeyError: 'keys'\)"),
        ("optimizer.json", b'{"__reduce__": ["os.system", "id"]}', r"optimizer.json: unexpected value"),
        ("optimizer.json", b'{"__tensor__": "nope"}', r"optimizer.json: tensor 'nope' is not in the checkpoint"),
        ("optimizer.json", b"[" * 40 + b"]" * 40, r"optimizer.json: nested deeper than 32"),
    ],
)
def test_malformed_checkpoint_files_are_named_errors(tmp_path, name, content, message):
    path = _checkpoint(tmp_path)
    (path / name).write_bytes(content)
    with pytest.raises(RecordError, match=message):
        load_checkpoint(path, torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)))


def test_weights_of_another_shape_are_a_named_error(tmp_path):
    path = _checkpoint(tmp_path)
    with pytest.raises(RecordError, match=r"model.safetensors: does not fit the model"):
        load_checkpoint(path, torch.nn.Sequential(torch.nn.Linear(4, 5)))


@pytest.mark.parametrize(
    ("pointer", "message"),
    [
        ("/etc", r"latest names '/etc'; it must name a step directory next to it"),
        ("../../elsewhere/step-0000003", r"latest names '../../elsewhere/step-0000003'"),
        ("step-0000003/../../../x", r"latest names 'step-0000003/../../../x'"),
        ("step-0000003\x00", r"latest names 'step-0000003\\x00'"),
    ],
)
def test_latest_pointing_anywhere_but_a_step_directory_is_refused(tmp_path, pointer, message):
    run = tmp_path / "run"
    _checkpoint(run)
    (run / "checkpoints" / "latest").write_text(pointer)
    with pytest.raises(UnsafePathError, match=message):
        latest_checkpoint(run)


def test_symlinked_step_directory_outside_the_run_is_refused(tmp_path):
    elsewhere = _checkpoint(tmp_path / "other")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "step-0000009").symlink_to(elsewhere)
    (run / "checkpoints" / "latest").write_text("step-0000009")
    with pytest.raises(UnsafePathError, match=r"step-0000009 resolves to .*other/checkpoints/step-0000003, outside"):
        latest_checkpoint(run)


def test_latest_as_a_symlink_is_refused(tmp_path):
    run = tmp_path / "run"
    _checkpoint(run)
    outside = tmp_path / "pointer"
    outside.write_text("step-0000003")
    (run / "checkpoints" / "latest").unlink()
    (run / "checkpoints" / "latest").symlink_to(outside)
    with pytest.raises(UnsafePathError, match=r"latest must be a plain file naming a step directory, not a link"):
        latest_checkpoint(run)


def test_state_is_read_without_touching_tensors(tmp_path):
    path = _checkpoint(tmp_path)
    (path / "model.safetensors").write_bytes(b"garbage")
    assert read_checkpoint_state(path)["config"] == {"seed": 1}  # the config check needs no tensor file
    assert json.loads((path / "state.json").read_text())["step"] == 3


def test_train_refuses_a_run_whose_latest_points_outside_before_loading_anything(tmp_path):
    from medeyes.training.config import build_config, preset
    from medeyes.training.trainer import train

    data = preset("tiny").model_dump(mode="json")
    data["run_dir"] = str(tmp_path / "run")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "latest").write_text(str(tmp_path / "evil"))
    with pytest.raises(UnsafePathError, match=r"latest names '/.*/evil'; it must name a step directory"):
        train(build_config(data, {}))
