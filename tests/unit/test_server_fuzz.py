"""Schemathesis against the app's own OpenAPI schema, in process, with the scripted engine: no 5xx."""

from __future__ import annotations

import hypothesis
import pytest
from scripted_engine import ScriptedEngine

from server.app import build_app
from server.settings import ServerSettings

schemathesis = pytest.importorskip("schemathesis")

from schemathesis.checks import not_a_server_error  # noqa: E402



class ImmortalEngine(ScriptedEngine):
    """Schemathesis starts and stops the app's lifespan around every call: keep the engine up."""

    async def shutdown(self, timeout: float = 30.0) -> None:
        pass


app = build_app(ImmortalEngine(max_model_len=512), ServerSettings())
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@schema.parametrize()
@hypothesis.settings(
    max_examples=15, deadline=None, derandomize=True,
    suppress_health_check=list(hypothesis.HealthCheck),
)
def test_no_server_errors(case) -> None:
    case.call_and_validate(checks=[not_a_server_error])
