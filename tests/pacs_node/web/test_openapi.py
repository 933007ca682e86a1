"""Schemathesis against the admin API's served OpenAPI schema: generated requests (a few per
operation, with an admin token) never get a 5xx."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from tests.pacs_node.web.conftest import Web, serve_web


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Web]:
    server, web = serve_web(tmp_path_factory.mktemp("openapi"))
    try:
        yield web
    finally:
        server.stop()
        web.runtime.close()


@pytest.fixture(scope="module")
def api_schema(served: Web) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(served.base + "/api/openapi.json", headers=served.admin)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_server_errors(case: schemathesis.Case, served: Web) -> None:
    case.call_and_validate(base_url=served.base, headers=served.admin, checks=[not_a_server_error])
