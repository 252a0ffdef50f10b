"""OpenEnv's task API, bad reset arguments over HTTP, and OpenEnv's own validators against ``medeyes serve``.

The validators are openenv 0.10's: ``openenv validate --url`` (the running-server probe) against a real
server on a loopback port, with and without a token, and ``openenv validate medeyes_env --level static``
(the package check of ``medeyes_env/openenv.yaml``). Both run through openenv's own CLI in this process.
"""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import pytest

pytest.importorskip("openenv", reason="needs the serve extra: pip install 'medeyes[serve]'")

import httpx
from typer.testing import CliRunner

import medeyes_env
from medeyes_env.env import PROCEDURAL_CASES
from medeyes_env.serving.client import MedEyesClient
from medeyes_env.serving.server import MAX_TASK_RANGE, ServeConfig, background_server

TOKEN = "task-api-token-for-tests"


@pytest.fixture(scope="module")
def url():
    with background_server(ServeConfig(port=0, max_sessions=4)) as base:
        yield base


@pytest.fixture(scope="module")
def token_url():
    with background_server(ServeConfig(port=0, max_sessions=4, token=TOKEN)) as base:
        yield base


def openenv_cli(*args: str) -> tuple[int, str]:
    from openenv.cli.__main__ import app

    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_the_task_api_lists_splits_counts_and_specs_without_gold(url):
    splits = httpx.get(url + "/medeyes/splits").json()
    assert [s["name"] for s in splits] == ["train", "validation", "test"]
    assert all(s["num_tasks"] == PROCEDURAL_CASES and s["procedural"] for s in splits)  # phantoms are infinite
    assert httpx.post(url + "/MedEyes/num_tasks", json={"split": "test"}).json() == {"num_tasks": PROCEDURAL_CASES}
    task = httpx.post(url + "/medeyes/task", json={"split": "test", "index": 5}).json()["task"]
    local = gym.make("MedEyes/Phantom-v0", split="test").unwrapped
    local.reset(options={"case_index": 5})
    assert task["question"] == local.case.question and task["answer_type"] == local.case.answer_type.value
    assert task["case_id"].startswith("case-") and "gold_answer" not in task  # no gold without --eval
    tasks = httpx.post(url + "/medeyes/task_range", json={"split": "test", "start": 4, "stop": 7}).json()["tasks"]
    assert [t["index"] for t in tasks] == [4, 5, 6] and tasks[1] == task


def test_reset_with_split_and_index_plays_that_task(url):
    task = httpx.post(url + "/medeyes/task", json={"split": "validation", "index": 2}).json()["task"]
    reset = httpx.post(url + "/reset", json={"split": "validation", "index": 2}).json()  # HTTP: one-shot
    assert reset["observation"]["case_id"] == task["case_id"]
    with MedEyesClient(url).sync() as env:  # the socket: the same case, then the server's own split again
        assert env.reset(split="validation", index=2).observation.case_id == task["case_id"]
        default = env.reset(index=2).observation.case_id  # no split: the server's (train for phantoms)
    train = httpx.post(url + "/medeyes/task", json={"split": "train", "index": 2}).json()["task"]
    assert default == train["case_id"] != task["case_id"]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"sneed": 1}, 400, "unknown reset arguments ['sneed']; use seed, episode_id, case_index, split or index"),
        ({"split": "dev"}, 400, "unknown split 'dev'; use one of train, validation, test"),
        ({"index": "3"}, 400, "index must be a non-negative int, got '3'"),
        ({"index": True}, 400, "index must be a non-negative int, got True"),
        ({"case_index": -1}, 400, "case_index must be a non-negative int, got -1"),
        ({"index": PROCEDURAL_CASES}, 400, f"index {PROCEDURAL_CASES} is out of range: split 'train' has"),
        ({"index": 1, "case_index": 1}, 400, "pass the case as index or as case_index, not both"),
        ({"seed": -1}, 422, None),  # OpenEnv's own request model refuses it first
    ],
)
def test_bad_reset_arguments_over_http_are_4xx_with_the_reason(url, body, status, message):
    response = httpx.post(url + "/reset", json=body)
    assert response.status_code == status, response.text
    if message is not None:
        assert response.json()["detail"].startswith(message)


def test_bad_task_api_arguments_are_400_and_a_stateless_step_is_409(url):
    for path, body, message in [
        ("/medeyes/num_tasks", {"split": "dev"}, "unknown split 'dev'"),
        ("/medeyes/task", {"split": "test", "index": -2}, "index must be a non-negative int, got -2"),
        ("/medeyes/task_range", {"split": "test"}, f"ask for at most {MAX_TASK_RANGE}"),
    ]:
        response = httpx.post(url + path, json=body)
        assert response.status_code == 400 and message in response.json()["detail"], response.text
    step = httpx.post(url + "/step", json={"action": {"text": "<answer>no</answer>"}})
    assert step.status_code == 409
    assert step.json() == {"detail": "no episode in this session: send reset before step"}


def test_mcp_answers_json_rpc_with_no_tools_and_no_session():
    with background_server(ServeConfig(port=0, max_sessions=1)) as base:
        listed = httpx.post(base + "/mcp", json={"jsonrpc": "2.0", "method": "tools/list", "id": 7}).json()
        assert listed == {"jsonrpc": "2.0", "id": 7, "result": {"tools": []}}
        for _ in range(3):  # OpenEnv's /mcp made a session per call; this one makes none
            created = httpx.post(base + "/mcp", json={"jsonrpc": "2.0", "method": "openenv/session/create", "id": 1})
            assert created.json()["error"]["code"] == -32601
        assert httpx.post(base + "/mcp", content=b"{nope").json()["error"]["code"] == -32700
        with MedEyesClient(base).sync() as env:  # the one slot is still free
            assert env.reset(seed=0).observation.step == 0


def test_with_a_token_discovery_is_open_and_case_data_is_not(token_url):
    for path in ("/openapi.json", "/schema", "/metadata", "/health", "/medeyes/splits", "/list_environments"):
        assert httpx.get(token_url + path).status_code == 200, path
    assert httpx.post(token_url + "/medeyes/num_tasks", json={"split": "test"}).status_code == 200
    assert httpx.post(token_url + "/mcp", json={"jsonrpc": "2.0", "method": "tools/list", "id": 1}).status_code == 200
    for path, body in [("/medeyes/task", {"split": "test", "index": 0}), ("/reset", {}), ("/state", None)]:
        response = httpx.post(token_url + path, json=body) if body is not None else httpx.get(token_url + path)
        assert response.status_code == 401, path  # questions, images, rewards: the token's
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.post(token_url + "/medeyes/task", json={"split": "test", "index": 0}, headers=auth).status_code == 200


@pytest.mark.parametrize("which", ["url", "token_url"])
def test_openenv_validate_url_passes_with_and_without_a_token(which, request):
    base = request.getfixturevalue(which)
    code, output = openenv_cli("validate", "--url", base)
    assert code == 0, output
    assert output.count("PASS ") == 6 and "Verdict: PASS" in output, output


def test_openenv_validate_static_package_check_passes():
    package = Path(medeyes_env.__file__).parent  # medeyes_env/ holds openenv.yaml (shipped as package data)
    code, output = openenv_cli("validate", str(package), "--level", "static", "--skip-build")
    assert code == 0, output
    assert "PASS  static.manifest" in output and "Verdict: PASS" in output, output
