"""Python servers' request-validation reports, as OpenAI reports a malformed request: a 400 naming the `param`.

FastAPI-based servers (llama-cpp-python, vLLM, TGI's router) refuse a request body that fails their pydantic
schema in one of two ways:

- FastAPI's own 422: `{"detail": [{"loc": ["body", "messages", 0, "role"], "msg": ..., "type": ...}]}`;
- llama-cpp-python 0.3's 500, whose route handler catches the validation exception like any other and sends its
  text as the message: `"7 validation errors:\\n  {'type': 'literal_error', 'loc': ('body', 'messages', 0,
  'ChatCompletionRequestSystemMessage', 'role'), 'msg': ..., 'input': ...}\\n ...\\n  File \\"/site-packages/
  llama_cpp/server/app.py\\", line 376, in create_chat_completion"`.

Both are the client's error, not the server's: they become the same 400, built only from the locations and
pydantic's own messages (never the echoed input, nor the file path), so nothing else of the upstream's text
reaches the client, and a 400 does not count against the target's breaker.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping, Sequence
from typing import Any

from providers.base import FailureKind, UpstreamFailure

# The head of FastAPI's RequestValidationError text: "1 validation error:" / "7 validation errors:".
_REPORT_HEAD = re.compile(r"\A\d+ validation errors?:\n")
_LITERAL_MESSAGE = "Input should be "


def validation_report(message: str) -> list[dict[str, Any]] | None:
    """The errors of a validation report sent as an error message, or None when `message` is not one."""
    if not _REPORT_HEAD.match(message):
        return None
    errors = []
    for line in message.splitlines()[1:]:
        line = line.strip()
        if not (line.startswith("{") and line.endswith("}")):
            continue
        try:
            error = ast.literal_eval(line)  # plain data (strings, tuples, numbers); anything else is skipped
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            continue
        if isinstance(error, dict) and isinstance(error.get("loc"), tuple | list):
            errors.append(error)
    return errors or None


def validation_failure(errors: Sequence[Any], retry_after: float | None = None) -> UpstreamFailure:
    """A 400 `invalid_request_error` naming the first failing parameter in OpenAI's notation (`messages[0].role`)."""
    entries = _relevant([e for e in errors if isinstance(e, dict)])
    first = entries[0] if entries else {}
    param = _param(first.get("loc") or ())
    same = [e for e in entries if _param(e.get("loc") or ()) == param]
    messages = [str(e.get("msg") or "") for e in same]
    if len(messages) > 1 and all(m.startswith(_LITERAL_MESSAGE) for m in messages):
        # One per union member ("Input should be 'system'", "... 'user'"): one message listing them all.
        choices = [m[len(_LITERAL_MESSAGE):] for m in messages]
        message = _LITERAL_MESSAGE + ", ".join(choices[:-1]) + " or " + choices[-1]
    else:
        message = messages[0] if messages and messages[0] else "the request failed validation"
    if param:
        message = f"{param}: {message}"
    extra = len(entries) - len(same)
    if extra > 0:
        message += f" (and {extra} more problem{'s' if extra > 1 else ''})"
    return UpstreamFailure(kind=FailureKind.BAD_REQUEST, status=400, message=message, code="invalid_request",
                           param=param, error_type="invalid_request_error", retry_after=retry_after)


def _is_member_tag(part: Any) -> bool:
    """A pydantic union member's class name in a location (`ChatCompletionRequestToolMessage`); request field
    names are lower-case in every OpenAI-shaped schema."""
    return isinstance(part, str) and part[:1].isupper()


def _relevant(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The errors that explain the failure. For a message matching one union member by its role (a `tool` message
    missing `tool_call_id`), the other members' complaints about the role are noise: keep that member's."""
    failed_on_literal: dict[tuple[Any, ...], bool] = {}
    for error in errors:
        loc = tuple(error["loc"])
        tag = next((i for i, part in enumerate(loc) if _is_member_tag(part)), None)
        if tag is not None:
            member = loc[:tag + 1]
            failed_on_literal[member] = failed_on_literal.get(member, False) or error.get("type") == "literal_error"
    matched = {member for member, literal in failed_on_literal.items() if not literal}
    if not matched:  # no member took the value (an unknown role): what each member expected is the whole story
        return [e for e in errors if e.get("type") == "literal_error" or not any(map(_is_member_tag, e["loc"]))]
    if len(matched) == len(failed_on_literal):
        return errors
    return [e for e in errors if not any(tuple(e["loc"])[:len(m)] == m for m in failed_on_literal.keys() - matched)]


def _param(loc: Sequence[Any]) -> str | None:
    """`("body", "messages", 0, "SomeMember", "role")` -> `messages[0].role`."""
    out = ""
    for part in loc:
        if (part == "body" and not out) or _is_member_tag(part):
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or None


def validation_failure_from(status: int, payload: Mapping[str, Any], message: Any,
                            retry_after: float | None) -> UpstreamFailure | None:
    """The 400 for FastAPI's 422 `detail` or a validation report sent as a 5xx message; None for other errors."""
    if status == 422 and isinstance(payload.get("detail"), list):
        return validation_failure(payload["detail"], retry_after)
    if status >= 500 and isinstance(message, str):
        errors = validation_report(message)
        if errors is not None:
            return validation_failure(errors, retry_after)
    return None
