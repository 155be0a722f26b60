"""Every admin endpoint checks the admin key the same way (gateway/auth.py `authenticate_admin`)."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from tests.conftest import RunningGateway, key_hash, standard_policy
from tests.fakes import FakeOpenAIUpstream

ADMIN_KEY = "sk-admin-auth-test"
ADMIN = f"""
ledger:
  path: ledger.sqlite
admin:
  keys:
    - id: ops
      hash: "{key_hash(ADMIN_KEY)}"
    - id: retired
      hash: "{key_hash('sk-admin-retired')}"
      disabled: true
"""
ENDPOINTS = ["/admin/usage?team=alpha", "/admin/targets", "/admin/spend"]


@pytest.fixture
def admin_gateway(upstream: FakeOpenAIUpstream, start_gateway: Callable[[str], RunningGateway]) -> RunningGateway:
    return start_gateway(standard_policy(upstream.base_url, extra=ADMIN))


@pytest.mark.parametrize("path", ENDPOINTS)
@pytest.mark.parametrize(("authorization", "code"), [
    (None, "missing_api_key"),
    ("Basic " + ADMIN_KEY, "missing_api_key"),
    ("Bearer sk-alpha", "invalid_api_key"),  # a team's key is not an admin key
    ("Bearer sk-admin-retired", "invalid_api_key"),  # disabled
])
def test_admin_endpoints_refuse_anything_but_an_admin_key(admin_gateway: RunningGateway, path: str,
                                                          authorization: str | None, code: str) -> None:
    headers = {"authorization": authorization} if authorization is not None else {}
    response = httpx.get(admin_gateway.base_url + path, headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == code


@pytest.mark.parametrize("path", ENDPOINTS)
def test_admin_endpoints_accept_the_admin_key(admin_gateway: RunningGateway, path: str) -> None:
    response = httpx.get(admin_gateway.base_url + path, headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert response.status_code != 401, response.text
