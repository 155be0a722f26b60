"""`POST /v1/messages/count_tokens`: Anthropic's token counting, for the models the policy routes.

Anthropic SDK clients and coding agents call it to size a conversation before they send it. The
count is the gateway's own, the one admission reserves against: the Messages request translated to
chat, counted by the tokenizer family of the model's first target (exact for OpenAI models, the
documented estimate elsewhere, see gateway/tokens/counter.py). Counting calls no upstream and costs
nothing, so it is neither rate-limited nor ledgered; it still needs a key whose team may use the model.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.auth import authenticate
from gateway.errors import ErrorKind, GatewayError
from gateway.exchange import Reply, Services
from gateway.front_doors.messages import TranslationError, anthropic_reply, chat_request
from gateway.http.asgi import read_body, request_headers, send_reply
from gateway.pipeline import decode_object, resolve_model


class CountTokensRoute:
    """ASGI endpoint for POST /v1/messages/count_tokens.

    Given the app's services when the app is built, as `InferenceRoute` is: reading them from Starlette's
    `app.state` on every request goes through a failed attribute lookup (an AttributeError made and dropped).
    """

    def __init__(self, services: Services) -> None:
        self.services = services

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        services = self.services
        policy = services.policy()
        try:
            caller = authenticate(policy, request_headers(scope))
            body = decode_object(await read_body(scope, receive, policy.server.max_body_bytes))
            name = body.get("model")
            if not isinstance(name, str) or not name:
                raise GatewayError(ErrorKind.BAD_REQUEST, "model: Field required", param="model")
            model = resolve_model(policy, caller, name)
            try:
                chat = chat_request(body)
            except TranslationError as exc:
                raise GatewayError(ErrorKind.BAD_REQUEST, str(exc), param="messages") from exc
        except GatewayError as error:
            await send_reply(send, anthropic_reply(error))
            return
        target = model.targets[0]
        tokens = services.counter.count_chat_prompt(chat, target.upstream_model,
                                                    target.provider.adapter.capabilities.tokenizer)
        await send_reply(send, Reply(200, orjson.dumps({"input_tokens": tokens}), {}))
