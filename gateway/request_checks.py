"""What the gateway checks of a client's request before any step relies on it.

The upstream validates a request in full; the gateway only checks the fields
that its own steps or its translating adapters read (to count tokens, to
build another API's request, to reserve a budget), so that a wrong type is a
400 naming the `param`, as OpenAI answers it, and never a crash deep inside
an adapter. The rules are data: one table per endpoint of field -> expected
shape. Fields the gateway passes through untouched are left to the upstream.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import orjson

from gateway.errors import ErrorKind, GatewayError
from providers.base import Endpoint

# orjson refuses to encode more than 255 levels, and every upstream request is encoded with it; a body that
# nests deeper is refused up front. Counting brackets is a cheap bound that spares the common case the walk.
_ENCODABLE_BRACKETS = 250


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _boolean(value: Any) -> bool:
    return isinstance(value, bool)


def _string(value: Any) -> bool:
    return isinstance(value, str)


def _object(value: Any) -> bool:
    return isinstance(value, dict)


def _stop(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))


def _tool_choice(value: Any) -> bool:
    return isinstance(value, str | dict)


def _tokens_or_text(value: Any) -> bool:
    """A prompt or embeddings input: text, texts, token ids, or lists of token ids."""
    if isinstance(value, str):
        return True
    if not isinstance(value, list):
        return False
    return (all(isinstance(v, str) for v in value) or all(_integer(v) for v in value)
            or all(isinstance(v, list) and all(_integer(t) for t in v) for v in value))


Rule = tuple[Callable[[Any], bool], str]

_SAMPLING: dict[str, Rule] = {
    "temperature": (_number, "a number"),
    "top_p": (_number, "a number"),
    "presence_penalty": (_number, "a number"),
    "frequency_penalty": (_number, "a number"),
    "max_tokens": (_integer, "an integer"),
    "n": (_integer, "an integer"),
    "seed": (_integer, "an integer"),
    "stop": (_stop, "a string or an array of strings"),
    "stream_options": (_object, "an object"),
    "logit_bias": (_object, "an object"),
    "user": (_string, "a string"),
}

_RULES: dict[Endpoint, dict[str, Rule]] = {
    Endpoint.CHAT: {
        **_SAMPLING,
        "max_completion_tokens": (_integer, "an integer"),
        "top_logprobs": (_integer, "an integer"),
        "logprobs": (_boolean, "a boolean"),
        "parallel_tool_calls": (_boolean, "a boolean"),
        "response_format": (_object, "an object"),
        "tool_choice": (_tool_choice, "a string or an object"),
        "reasoning_effort": (_string, "a string"),
    },
    Endpoint.COMPLETIONS: {
        **_SAMPLING,
        "prompt": (_tokens_or_text, "a string, an array of strings, or an array of token ids"),
        "echo": (_boolean, "a boolean"),
        "best_of": (_integer, "an integer"),
        "logprobs": (_integer, "an integer"),
        "suffix": (_string, "a string"),
    },
    Endpoint.EMBEDDINGS: {
        "input": (_tokens_or_text, "a string, an array of strings, or an array of token ids"),
        "encoding_format": (_string, "a string"),
        "dimensions": (_integer, "an integer"),
        "user": (_string, "a string"),
    },
    Endpoint.RESPONSES: {
        "max_output_tokens": (_integer, "an integer"),
        "temperature": (_number, "a number"),
        "top_p": (_number, "a number"),
        "instructions": (_string, "a string"),
    },
}


# A module name for the member: on Python 3.11 `Endpoint.CHAT` is an unspecialized lookup through EnumType's
# `__getattr__` hook, ~15 times the cost of reading a global.
_CHAT = Endpoint.CHAT


def check_request(endpoint: Endpoint, body: bytes, payload: Mapping[str, Any]) -> None:
    """Raise a 400 naming the first field of `payload` the gateway cannot work with."""
    if len(body) > _ENCODABLE_BRACKETS and body.count(b"[") + body.count(b"{") > _ENCODABLE_BRACKETS:
        _check_depth(payload)
    rules = _RULES[endpoint]
    # Only the fields both sent and checked, found by a set intersection in C: a request names a few fields (most
    # of them unchecked), the tables list every checked one.
    for name in rules.keys() & payload.keys():
        value = payload[name]
        if value is not None and not rules[name][0](value):
            raise _first_invalid(rules, payload)
    if endpoint is _CHAT:
        _check_messages(payload.get("messages"))
        tools = payload.get("tools")
        if tools is not None:
            _check_tools(tools)


def _first_invalid(rules: Mapping[str, Rule], payload: Mapping[str, Any]) -> GatewayError:
    """The 400 for the first field, in the request's order, that breaks its rule (the intersection has no order)."""
    for name, value in payload.items():
        rule = rules.get(name)
        if rule is not None and value is not None and not rule[0](value):
            return invalid(name, f"Invalid type for '{name}': expected {rule[1]}, but got {json_kind(value)}.")
    raise AssertionError("no field breaks its rule")


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list):
        raise invalid("messages", f"Invalid type for 'messages': expected an array, but got {json_kind(messages)}.")
    if not messages:
        raise invalid("messages", "Invalid 'messages': empty array. Expected an array with minimum length 1.",
                      code="empty_array")
    for i, message in enumerate(messages):  # a message's path (`messages[i]`) is spelled out only for an error
        if not isinstance(message, dict):
            raise invalid(f"messages[{i}]", f"Invalid type for 'messages[{i}]': expected an object, but got "
                          f"{json_kind(message)}.")
        role = message.get("role")
        if role.__class__ is not str or role not in _ROLES:  # the frozenset lookup is the common case's only cost
            _refuse_role(f"messages[{i}]", role)
        content = message.get("content")
        if content is not None and content.__class__ is not str:
            _check_content(f"messages[{i}]", content)
        if "tool_calls" in message or "name" in message or "tool_call_id" in message:
            _check_tool_fields(f"messages[{i}]", message)


def _check_content(where: str, content: Any) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise invalid(f"{where}.content", f"Invalid type for '{where}.content': expected a string or an "
                      f"array of content parts, but got {json_kind(content)}.")
    for j, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise invalid(f"{where}.content[{j}]", f"Invalid content part '{where}.content[{j}]': expected "
                          "an object with a string 'type'.")


def _check_tool_fields(where: str, message: dict[str, Any]) -> None:
    calls = message.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            raise invalid(f"{where}.tool_calls", f"Invalid type for '{where}.tool_calls': expected an array, "
                          f"but got {json_kind(calls)}.")
        for j, call in enumerate(calls):
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise invalid(f"{where}.tool_calls[{j}]", f"Invalid tool call '{where}.tool_calls[{j}]': "
                              "expected an object with a 'function' object carrying a string 'name'.")
            arguments = function.get("arguments")
            if arguments is not None and not isinstance(arguments, str):
                raise invalid(f"{where}.tool_calls[{j}].function.arguments", "Invalid type for "
                              f"'{where}.tool_calls[{j}].function.arguments': expected a string of JSON.")
    for name in ("name", "tool_call_id"):
        if message.get(name) is not None and not isinstance(message[name], str):
            raise invalid(f"{where}.{name}", f"Invalid type for '{where}.{name}': expected a string.")


# OpenAI's chat roles. A role outside them reached upstreams that refuse it in their own way (llama-cpp-python
# answered a 500 carrying its file paths, and every such answer counted against the target's breaker).
_ROLE_NAMES = ("system", "developer", "user", "assistant", "tool", "function")
_ROLES = frozenset(_ROLE_NAMES)
_ROLE_LIST = ", ".join(f"'{name}'" for name in _ROLE_NAMES[:-1]) + f", and '{_ROLE_NAMES[-1]}'"


def _refuse_role(where: str, role: Any) -> None:
    if not isinstance(role, str):
        raise invalid(f"{where}.role",
                      f"Invalid type for '{where}.role': expected a string, but got {json_kind(role)}.")
    shown = role if len(role) <= 40 else role[:40] + "..."
    raise invalid(f"{where}.role", f"Invalid value: '{shown}'. Supported values are: {_ROLE_LIST}.",
                  code="invalid_value")


def _check_tools(tools: Any) -> None:
    if not isinstance(tools, list):
        raise invalid("tools", f"Invalid type for 'tools': expected an array, but got {json_kind(tools)}.")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("type"), str):
            raise invalid(f"tools[{i}]", f"Invalid tool 'tools[{i}]': expected an object with a string 'type'.")
        if tool["type"] == "function":
            function = tool.get("function")
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise invalid(f"tools[{i}].function", f"Invalid tool 'tools[{i}]': a function tool needs a "
                              "'function' object with a string 'name'.")
            parameters = function.get("parameters")
            if parameters is not None and not isinstance(parameters, dict):
                raise invalid(f"tools[{i}].function.parameters", f"Invalid type for 'tools[{i}].function."
                              "parameters': expected a JSON Schema object.")


def _check_depth(payload: Mapping[str, Any]) -> None:
    try:
        orjson.dumps(payload)
    except orjson.JSONEncodeError:
        for name, value in payload.items():
            try:
                orjson.dumps(value)
            except orjson.JSONEncodeError:
                raise invalid(name, f"'{name}' is nested too deeply: JSON values may nest at most 254 levels.",
                              code="nesting_too_deep") from None
        raise invalid(None, "The request body is nested too deeply.", code="nesting_too_deep") from None


def invalid(param: str | None, message: str, code: str = "invalid_type") -> GatewayError:
    return GatewayError(ErrorKind.BAD_REQUEST, message, param=param, code=code)


def json_kind(value: Any) -> str:
    """How a 400 names a JSON value's type: "an array", "a string", "null"..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
