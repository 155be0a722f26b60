"""The gateway's own checks of a request's fields (gateway/request_checks.py)."""

from __future__ import annotations

import pytest

from gateway.errors import GatewayError
from gateway.request_checks import check_request
from providers.base import Endpoint

_MESSAGES = [{"role": "user", "content": "Hello"}]


def _refusal(payload: dict) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        check_request(Endpoint.CHAT, b"{}", payload)
    return caught.value


def test_a_request_with_well_typed_fields_passes() -> None:
    check_request(Endpoint.CHAT, b"{}", {"model": "m", "messages": _MESSAGES, "max_tokens": 32, "temperature": 0.5,
                                         "stop": ["x"], "user": None, "stream": True})


@pytest.mark.parametrize("order", [("temperature", "max_tokens", "user"), ("user", "max_tokens", "temperature"),
                                   ("max_tokens", "user", "temperature")])
def test_the_first_badly_typed_field_in_the_requests_order_is_named(order: tuple[str, ...]) -> None:
    bad = {"temperature": "hot", "max_tokens": 1.5, "user": 7}
    payload = {"model": "m", "messages": _MESSAGES, **{name: bad[name] for name in order}}
    error = _refusal(payload)
    assert error.param == order[0] and error.code == "invalid_type"
    expected = {"temperature": "a number", "max_tokens": "an integer", "user": "a string"}[order[0]]
    assert error.message.startswith(f"Invalid type for '{order[0]}': expected {expected}, but got ")


def test_a_boolean_is_not_an_integer() -> None:
    error = _refusal({"model": "m", "messages": _MESSAGES, "stream": False, "max_tokens": True})
    assert error.param == "max_tokens" and error.message.endswith("but got a boolean.")
