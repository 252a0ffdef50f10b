"""Fixtures more than one test file uses; each has this one home. (The repository root's conftest.py only says
which modules doctest collection skips.)

- ``tiny_models``: the session's private model cache; ``tiny_models.path(arch)`` builds a tiny model there once.
- ``tiny_cache``: ``MEDEYES_CACHE`` pointed at that cache for one test, with the default tiny model built.
- ``openai_server``: start stand-in OpenAI-compatible servers (tests/openai_stand_in.py), closed after the test.

Nothing here imports torch at collection time: the verifiers stage's venv has none. Helper modules in tests/ are
imported by their bare name (``from openai_stand_in import ...``; pytest puts tests/ on sys.path for this file):
``tests.…`` would find the ``tests`` package that a dependency installs into .venv-openrlhf's site-packages.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from openai_stand_in import Responder, StandInServer, StartServer


class TinyModels:
    """A private ``MEDEYES_CACHE`` for the test session: each tiny model is built in it on first use, then reused.

    Expert demonstrations that a training run generates on first use land in it too, so later runs of the same
    config read them back instead of generating them again.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, arch: str = "idefics3") -> Path:
        """The tiny ``arch`` model's directory (the default model is idefics3), built if it is not there yet."""
        from medeyes.models.factory import ensure_tiny_model

        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("MEDEYES_CACHE", str(self.root))
            return ensure_tiny_model(arch, "tiny")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    """The session's tiny-model cache (one per xdist worker); module-scoped fixtures load models from it."""
    return TinyModels(tmp_path_factory.mktemp("medeyes-cache"))


@pytest.fixture
def tiny_cache(tiny_models: TinyModels, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``MEDEYES_CACHE`` set to the session's cache for this test, with the default tiny model (``tiny``) in it."""
    tiny_models.path("idefics3")
    monkeypatch.setenv("MEDEYES_CACHE", str(tiny_models.root))
    return tiny_models.root


@pytest.fixture
def openai_server() -> Iterator[StartServer]:
    """``start(respond, delay_s=0.0, port=0)``: a stand-in OpenAI-compatible server answering ``respond(request)``."""
    servers: list[StandInServer] = []

    def start(respond: Responder, delay_s: float = 0.0, port: int = 0) -> StandInServer:
        server = StandInServer(respond, delay_s, port)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()
