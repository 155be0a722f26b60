"""The demo policy shows every headline feature with no API key and no Redis (issue 16, item 1).

Each test is what a new user does in the README's quick start, through the real SDKs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest

from gateway.cli.main import main
from gateway.compiled.policy import load_policy
from tests.conftest import RunningGateway
from tests.demo_policy import ADMIN_KEY, DEMO, DEMO_KEY, INTERN_KEY, demo_text

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture
def demo(start_gateway: Callable[[str], RunningGateway]) -> RunningGateway:
    return start_gateway(demo_text())


def test_the_shipped_demo_keeps_its_state_in_the_git_ignored_folder() -> None:
    policy = load_policy(DEMO)
    root = DEMO.resolve().parents[1]
    assert policy.ledger_path is not None and policy.ledger_path.resolve().parent == root / ".switchboard"
    assert policy.state.url is None and policy.state.path == "../.switchboard/demo-state.sqlite"
    assert ".switchboard/" in (root / ".gitignore").read_text().split()
    assert all(p.settings.api_key is None and p.settings.kind == "mock" for p in policy.providers.values())


def test_a_chat_reply_carries_its_cost_at_the_real_models_list_price(demo: RunningGateway) -> None:
    raw = demo.client(DEMO_KEY).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello"}])
    reply = raw.parse()
    expected = (reply.usage.prompt_tokens * 0.15 + reply.usage.completion_tokens * 0.60) / 1e6
    assert float(raw.headers["x-switchboard-cost-usd"]) == pytest.approx(expected, rel=1e-6)
    assert expected > 0


def test_a_stream_ends_with_its_cost_in_the_usage_chunk(demo: RunningGateway) -> None:
    chunks = list(demo.client(DEMO_KEY).chat.completions.create(
        model="gpt-4o", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Stream, please"}]))
    last = chunks[-1]
    expected = (last.usage.prompt_tokens * 2.50 + last.usage.completion_tokens * 10.00) / 1e6
    assert last.model_extra is not None
    assert last.model_extra["switchboard"]["cost_usd"] == pytest.approx(expected, rel=1e-6)


def test_claude_and_gemini_names_answer_at_their_own_prices(demo: RunningGateway) -> None:
    client = anthropic.Anthropic(base_url=demo.base_url, api_key=DEMO_KEY, max_retries=0)
    raw = client.messages.with_raw_response.create(model="claude-sonnet-4-5", max_tokens=200,
                                                   messages=[{"role": "user", "content": "Hello Claude"}])
    message = raw.parse()
    assert message.content[0].type == "text" and message.content[0].text.startswith("Mock reply:")
    assert message.stop_reason == "end_turn"
    expected = (message.usage.input_tokens * 3.00 + message.usage.output_tokens * 15.00) / 1e6
    assert float(raw.headers["x-switchboard-cost-usd"]) == pytest.approx(expected, rel=1e-6)
    gemini = demo.client(DEMO_KEY).chat.completions.with_raw_response.create(
        model="gemini-2.5-flash", messages=[{"role": "user", "content": "Hello Gemini"}])
    usage = gemini.parse().usage
    assert float(gemini.headers["x-switchboard-cost-usd"]) == pytest.approx(
        (usage.prompt_tokens * 0.30 + usage.completion_tokens * 2.50) / 1e6, rel=1e-6)


def test_the_mock_ends_a_tool_loop_with_a_text_answer(demo: RunningGateway) -> None:
    client = demo.client(DEMO_KEY)
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Weather in Paris?"}]
    first = client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=[WEATHER])
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"}]
    second = client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=[WEATHER])
    assert second.choices[0].finish_reason == "stop" and not second.choices[0].message.tool_calls
    assert "18 C and sunny" in second.choices[0].message.content
    # A request that insists on a tool still gets one, tool result or not.
    forced = client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=[WEATHER],
                                            tool_choice="required")
    assert forced.choices[0].finish_reason == "tool_calls"


def test_an_anthropic_agent_loop_ends_with_end_turn(demo: RunningGateway) -> None:
    client = anthropic.Anthropic(base_url=demo.base_url, api_key=DEMO_KEY, max_retries=0)
    tool = {"name": "read_file", "description": "Read a file",
            "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}
    messages: list[dict[str, Any]] = [{"role": "user", "content": "What is in README.md?"}]
    first = client.messages.create(model="claude-haiku-4-5", max_tokens=500, tools=[tool], messages=messages)
    use = next(block for block in first.content if block.type == "tool_use")
    assert first.stop_reason == "tool_use"
    messages += [{"role": "assistant", "content": [block.model_dump() for block in first.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                               "content": "# Switchboard"}]}]
    with client.messages.stream(model="claude-haiku-4-5", max_tokens=500, tools=[tool], messages=messages) as s:
        final = s.get_final_message()
    assert final.stop_reason == "end_turn" and "# Switchboard" in final.content[0].text


def test_the_intern_team_runs_into_its_tiny_budget(demo: RunningGateway) -> None:
    client = demo.client(INTERN_KEY)
    hello = [{"role": "user", "content": "Hello"}]
    assert client.chat.completions.create(model="gpt-4o-mini", messages=hello).choices[0].message.content
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="gpt-4o-mini", messages=hello)
    assert refused.value.code == "budget_exceeded"
    assert "daily token budget limit 100" in refused.value.message
    usage = httpx.get(demo.base_url + "/admin/usage?team=interns",
                      headers={"authorization": f"Bearer {ADMIN_KEY}"}).json()
    budget = next(row for row in usage["usage"] if row["scope"] == "team")
    assert budget["limit"] == 100 and 0 < budget["used"] <= 100


def _spend_report(demo: RunningGateway, capsys: pytest.CaptureFixture[str], want: Callable[[list], bool]) -> list:
    """`switchboard spend --format json` once it shows what `want` expects (the ledger writes every 0.5 s)."""
    deadline = time.monotonic() + 10
    while True:
        assert main(["spend", "--policy", str(demo.policy_path), "--by", "team", "--format", "json"]) == 0
        report = orjson.loads(capsys.readouterr().out)
        if want(report) or time.monotonic() > deadline:
            return report
        threading.Event().wait(0.1)


def test_spend_and_admin_spend_show_the_ledgered_cost(demo: RunningGateway,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    costs = []
    for key, model in ((DEMO_KEY, "gpt-4o"), (DEMO_KEY, "claude-opus-4-5"), (INTERN_KEY, "gpt-4o-mini")):
        raw = demo.client(key).chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": f"Price me, {model}"}])
        costs.append(float(raw.headers["x-switchboard-cost-usd"]))
    report = _spend_report(demo, capsys, lambda rows: sum(r["requests"] for r in rows) == 3)
    by_team = {row["team"]: row for row in report}
    assert by_team["demo"]["requests"] == 2 and by_team["interns"]["requests"] == 1
    assert by_team["demo"]["cost_usd"] == pytest.approx(costs[0] + costs[1], rel=1e-6)
    assert by_team["interns"]["cost_usd"] == pytest.approx(costs[2], rel=1e-6)
    assert all(row["unpriced_requests"] == 0 for row in report)
    admin = httpx.get(demo.base_url + "/admin/spend?by=team", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert admin.status_code == 200 and admin.json() == report
    refused = httpx.get(demo.base_url + "/admin/spend?by=team", headers={"authorization": f"Bearer {DEMO_KEY}"})
    assert refused.status_code == 401
