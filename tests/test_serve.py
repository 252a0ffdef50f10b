"""``medeyes serve``: a real server on a loopback port, driven by OpenEnv's real client and raw sockets."""

from __future__ import annotations

import asyncio
import json
import re

import gymnasium as gym
import numpy as np
import pytest

pytest.importorskip("openenv", reason="needs the serve extra: pip install 'medeyes[serve]'")

import httpx
from typer.testing import CliRunner
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

import medeyes_env  # noqa: F401  (registers the ids)
from medeyes.cli.app import app
from medeyes_env.serving.client import MedEyesClient
from medeyes_env.serving.server import ServeConfig, background_server
from medeyes_env.serving.wire import MAX_ACTION_CHARS, decode_image

TOKEN = "s3cret-token-for-tests"
SCAN = '<reasoning>two zones</reasoning><action>{"name": "scan", "boxes": [[100, 200, 400, 500], [600, 200, 900, 500]]}</action>'
DRILL = '<reasoning>the dense one</reasoning><action>{"name": "drill", "box": [400, 400, 600, 600]}</action>'
MALFORMED = "<reasoning>no tags after this</reasoning>"


@pytest.fixture(scope="module")
def url():
    with background_server(ServeConfig(port=0, max_sessions=16)) as base:
        yield base


@pytest.fixture(scope="module")
def guarded_url():
    config = ServeConfig(port=0, max_sessions=2, token=TOKEN, max_request_bytes=64 * 1024)
    with background_server(config) as base:
        yield base


def ws_url(base: str, query: str = "") -> str:
    return base.replace("http://", "ws://") + "/ws" + query


def in_process_episode(seed: int, actions_for) -> list[tuple]:
    env = gym.make("MedEyes/Phantom-v0").unwrapped
    obs, info = env.reset(seed=seed)
    out = [(obs["image"], obs["text"], None, info["case_id"], {})]
    for action in actions_for(env.case.answer):
        obs, reward, terminated, truncated, info = env.step(action)
        out.append((obs["image"], obs["text"], reward, info["case_id"], info["reward_components"]))
    return out


def script(gold: str) -> list[str]:
    return [SCAN, DRILL, MALFORMED, f"<reasoning>seen</reasoning><answer>{gold}</answer>"]


@pytest.mark.parametrize("seed", [0, 3])
def test_an_episode_over_the_socket_equals_the_in_process_one(url, seed):
    expected = in_process_episode(seed, script)
    gold = gym.make("MedEyes/Phantom-v0").unwrapped
    gold.reset(seed=seed)
    with MedEyesClient(url).sync() as env:
        results = [env.reset(seed=seed)]
        results += [env.step(action) for action in script(gold.case.answer)]
    assert re.fullmatch(r"case-[0-9a-f]{20}", results[0].observation.case_id)  # opaque without --eval
    for (pixels, text, reward, _, components), result in zip(expected, results, strict=True):
        obs = result.observation
        assert obs.case_id == results[0].observation.case_id
        assert obs.text == text
        np.testing.assert_array_equal(obs.pixels(), pixels)
        assert result.reward == reward
        assert obs.components() == components
    assert results[-1].done and results[-1].observation.accuracy == 1.0
    assert results[-1].observation.grammar == 0.0  # the malformed turn cost it, as in-process
    assert results[-1].observation.gold_answer is None and results[-1].observation.gold_boxes is None


def test_views_are_grey_png_data_urls_and_gold_stays_off_the_wire(url):
    with connect(ws_url(url)) as ws:
        ws.send(json.dumps({"type": "reset", "data": {"seed": 1}}))
        raw = ws.recv()
    frame = json.loads(raw)
    obs = frame["data"]["observation"]
    assert obs["image"].startswith("data:image/png;base64,")
    assert decode_image(obs["image"]).mode == "L"  # phantoms are grey: one channel on the wire
    assert obs["gold_answer"] is None and obs["gold_boxes"] is None
    env = gym.make("MedEyes/Phantom-v0").unwrapped
    env.reset(seed=1)
    assert f'"{env.case.answer}"' not in raw


def test_eval_flag_sends_gold():
    with background_server(ServeConfig(port=0, include_gold=True)) as base, MedEyesClient(base).sync() as env:
        obs = env.reset(seed=2).observation
    local = gym.make("MedEyes/Phantom-v0").unwrapped
    local.reset(seed=2)
    assert obs.gold_answer == local.case.answer
    assert obs.case_id == local.case.id
    assert obs.gold_boxes == [region.box for region in local.case.regions]


def test_timings_count_the_env_and_png_encoding_only_when_asked(url):
    assert httpx.get(url + "/medeyes/timings").status_code == 404  # off by default
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with background_server(ServeConfig(port=0, token=TOKEN, timings=True)) as base:
        assert httpx.get(base + "/medeyes/timings").status_code == 401  # the totals need the token
        before = httpx.get(base + "/medeyes/timings", headers=headers).json()
        with MedEyesClient(base, token=TOKEN).sync() as env:
            env.reset(seed=0)
            env.step(SCAN)
            env.step(DRILL)
        after = httpx.get(base + "/medeyes/timings", headers=headers).json()
    calls = {name: after["parts"][name]["calls"] - before["parts"][name]["calls"] for name in after["parts"]}
    assert calls == {"env_reset": 1, "env_step": 2, "png_encode": 3}
    spent = {name: after["parts"][name]["cpu_s"] - before["parts"][name]["cpu_s"] for name in after["parts"]}
    assert all(seconds > 0 for seconds in spent.values())
    assert sum(spent.values()) <= after["process_cpu_s"] - before["process_cpu_s"]
    assert "--timings" in CliRunner().invoke(app, ["serve", "--help"]).output


def test_async_clients_run_interleaved_sessions_without_crossing(url):
    async def episode(seed: int) -> tuple[str, float]:
        async with MedEyesClient(url) as env:
            first = await env.reset(seed=seed)
            await env.step(DRILL)
            await asyncio.sleep(0)  # let the other sessions step in between
            last = await env.step("<reasoning>r</reasoning><answer>no</answer>")
            return first.observation.question, last.reward

    async def main():
        return await asyncio.gather(*(episode(seed) for seed in range(6)))

    got = asyncio.run(main())
    for seed, (question, reward) in enumerate(got):
        expected = in_process_episode(seed, lambda _: [DRILL, "<reasoning>r</reasoning><answer>no</answer>"])
        assert (question, reward) == (expected[0][1], expected[-1][2])  # the question stands for the case


def test_a_grpo_group_of_sessions_renders_its_case_once(monkeypatch):
    # The sessions share the server's case source: G rollouts of one case, reset at once, render it once.
    from medeyes_env.sources.phantom.source import PhantomSource

    renders = []
    real_render = PhantomSource._render

    def counted(self, scene, focals, split, index):
        renders.append(index)
        return real_render(self, scene, focals, split, index)

    monkeypatch.setattr(PhantomSource, "_render", counted)

    async def rollout(base: str) -> tuple[str, bytes]:
        async with MedEyesClient(base) as env:
            first = await env.reset(seed=11)
            return first.observation.case_id, first.observation.image

    async def group(base: str) -> list[tuple[str, bytes]]:
        return await asyncio.gather(*(rollout(base) for _ in range(6)))

    with background_server(ServeConfig(port=0, include_gold=True)) as base:
        renders.clear()  # start-up builds one env to check the config; it renders nothing
        played = asyncio.run(group(base))
    assert len({case for case, _ in played}) == 1 and len({image for _, image in played}) == 1
    assert len(renders) == 1


def test_http_routes(url):
    assert httpx.get(url + "/health").json()["status"] == "healthy"
    schema = httpx.get(url + "/schema").json()
    assert "text" in schema["action"]["properties"]
    assert {"accuracy", "grounding", "image", "gold_answer"} <= set(schema["observation"]["properties"])
    reset = httpx.post(url + "/reset", json={"seed": 0}).json()  # stateless upstream: a fresh env per call
    assert reset["observation"]["case_id"].startswith("case-")
    assert httpx.get(url + "/state").json()["case_id"] is None


def bad_frames(ws) -> dict[str, dict]:
    """Each bad frame and the error frame the server answered with."""
    frames = {
        "not JSON": "{this is not json",
        "unknown type": json.dumps({"type": "explode"}),
        "step before reset": json.dumps({"type": "step", "data": {"text": DRILL}}),
        "reset with an unknown argument": json.dumps({"type": "reset", "data": {"sneed": 1}}),
        "step without text": json.dumps({"type": "step", "data": {"txt": DRILL}}),
        "action text too long": json.dumps({"type": "step", "data": {"text": "x" * (MAX_ACTION_CHARS + 1)}}),
        "text not a string": json.dumps({"type": "step", "data": {"text": ["<answer>", "no"]}}),
    }
    answers = {}
    for name, frame in frames.items():
        ws.send(frame)
        answers[name] = json.loads(ws.recv())["data"]
    return answers


def test_malformed_frames_get_clear_errors_and_the_socket_keeps_working(url):
    with connect(ws_url(url), max_size=None) as ws:
        answers = bad_frames(ws)
        ws.send(json.dumps({"type": "reset", "data": {"seed": 0}}))
        assert json.loads(ws.recv())["type"] == "observation"  # the same socket still plays
        ws.send(json.dumps({"type": "step", "data": {"text": "<answer>" + "y" * 5000 + "</answer>"}}))
        oversize_turn = json.loads(ws.recv())["data"]
    assert answers["not JSON"]["code"] == "INVALID_JSON"
    assert answers["unknown type"] == {"message": "Unknown message type: explode", "code": "UNKNOWN_TYPE"}
    assert answers["step before reset"] == {
        "message": "no episode in this session: send reset before step",
        "code": "EXECUTION_ERROR",
    }
    assert answers["reset with an unknown argument"]["message"] == (
        "unknown reset arguments ['sneed']; use seed, episode_id, case_index, split or index"
    )
    for name, msg in {
        "step without text": "Field required",
        "action text too long": "String should have at most 65536 characters",
        "text not a string": "Input should be a valid string",
    }.items():
        assert answers[name]["code"] == "VALIDATION_ERROR"
        assert answers[name]["errors"][0]["loc"] == ["text"] and answers[name]["errors"][0]["msg"] == msg
    # Over the protocol's own limit but under the wire's: a malformed turn, exactly as in-process.
    assert oversize_turn["observation"]["parsed_ok"] is False
    assert "oversized" in oversize_turn["observation"]["text"]


def test_oversize_frame_closes_that_socket_only(guarded_url):
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with connect(ws_url(guarded_url), additional_headers=headers, max_size=None) as ws:
        ws.send(json.dumps({"type": "step", "data": {"text": "x" * 100_000}}))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv()
    assert closed.value.rcvd.code == 1009  # message too big
    with MedEyesClient(guarded_url, token=TOKEN).sync() as env:
        assert env.reset(seed=0).observation.step == 0


def test_unknown_session_and_wrong_token_are_refused(guarded_url):
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with pytest.raises(InvalidStatus) as refused:  # attaching to a session is OpenEnv's MCP feature: off
        connect(ws_url(guarded_url, "?session_id=no-such-session"), additional_headers=headers)
    assert refused.value.response.status_code == 403
    for bad in ({}, {"Authorization": "Bearer wrong-token-xyz"}, {"Authorization": TOKEN}):
        with pytest.raises(InvalidStatus) as refused:
            connect(ws_url(guarded_url), additional_headers=bad)
        assert refused.value.response.status_code == 403
        response = httpx.post(guarded_url + "/reset", json={}, headers=bad)
        assert response.status_code == 401
        assert response.json() == {"detail": "missing or wrong bearer token: send 'Authorization: Bearer <token>'"}
    with pytest.raises(ConnectionError, match="server rejected WebSocket connection: HTTP 403"):
        MedEyesClient(guarded_url, token="wrong-token-xyz").sync().reset(seed=0)
    assert httpx.get(guarded_url + "/health").status_code == 200  # health stays open for load balancers
    big = httpx.post(guarded_url + "/reset", content=b"{" + b" " * 70_000 + b"}", headers=headers)
    assert big.status_code == 413
    assert big.json() == {"detail": "request body over 65536 bytes"}


def test_sessions_over_capacity_are_refused(guarded_url):
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with (
        connect(ws_url(guarded_url), additional_headers=headers),
        connect(ws_url(guarded_url), additional_headers=headers),
        connect(ws_url(guarded_url), additional_headers=headers) as third,
    ):
        answer = json.loads(third.recv())["data"]
    assert answer["code"] == "CAPACITY_REACHED" and answer["max_sessions"] == 2


def test_serve_config_errors_are_clear():
    with pytest.raises(ValueError, match="env_id 'MedEyes/Nope-v0' is not a MedEyes id; use one of"):
        ServeConfig(env_id="MedEyes/Nope-v0")
    result = CliRunner().invoke(app, ["serve", "--env-kwargs", "{bad"])
    assert result.exit_code == 2
    assert "--env-kwargs must be a JSON object" in result.output
    assert "--max-sessions" in CliRunner().invoke(app, ["serve", "--help"]).output


def test_idle_sessions_are_closed_and_say_so():
    with (
        background_server(ServeConfig(port=0, max_sessions=1, idle_timeout_s=0.5)) as base,
        connect(ws_url(base)) as idle,
    ):
        idle.send(json.dumps({"type": "reset", "data": {"seed": 0}}))
        idle.recv()
        with pytest.raises(ConnectionClosed) as closed:
            idle.recv(timeout=15)  # the server closes the socket, which frees the slot
        with connect(ws_url(base)) as other:
            other.send(json.dumps({"type": "reset", "data": {"seed": 0}}))
            assert json.loads(other.recv())["type"] == "observation"
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1008, "no message for 0.5 s")


def test_the_client_example_in_the_docs_runs(capsys):
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "integrations.md").read_text()
    block = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)[0]
    exec(compile(block, "docs/integrations.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "(1024, 1024) (256, 256, 3)" in printed
    assert "0.21250000000000002 True {'accuracy': 0.0, 'grammar': 1.0" in printed


def test_the_server_client_and_trl_adapter_import_without_torch():
    import subprocess
    import sys

    code = (
        "import sys; import medeyes_env.serving.server, medeyes_env.serving.client, medeyes_env.integrations.trl_env; "
        "print(sorted(m for m in ('torch', 'transformers', 'trl') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
