"""A scripted fake of the Anthropic Messages API, for running the real Claude Code CLI offline.

It is a real HTTP server on 127.0.0.1 speaking `POST /v1/messages` with SSE
streaming (and JSON when a request does not ask to stream). Each test queues
the replies of the *conversation* in order: `Text`, `ToolUse`, `ApiError`,
`Hang`. Every request is recorded (body and a few headers; never the key), so
tests can assert what the CLI sent, e.g. that a resumed session carried the
earlier history.

The CLI also makes side requests that are not turns of the conversation
(token counting, quota probes, title/topic generation with a small model).
`is_conversation` tells them apart by shape: a conversation turn streams and
offers tools. Side requests get a short generic answer and are recorded too.

With `tls` (an ssl.SSLContext with a test CA's server certificate) it speaks
HTTPS, like the real API; `credentials` then records what each request
authenticated with (`x-api-key: ...` / `authorization: Bearer ...`), so tests
of the agent's API relay can check that the model received the real one.
"""

from __future__ import annotations

import itertools
import json
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_ids = itertools.count(1)


def _new_id(prefix: str) -> str:
    return f"{prefix}_fake{next(_ids):08d}"


@dataclass
class Text:
    """An assistant turn with one text block (stop_reason end_turn)."""

    text: str
    chunks: int = 3  # how many text_delta events to split it into


@dataclass
class ToolUse:
    """An assistant turn that calls one tool (stop_reason tool_use)."""

    name: str
    input: dict[str, Any]
    text: str = ""  # optional text block before the tool call
    id: str = field(default_factory=lambda: _new_id("toolu"))


@dataclass
class ApiError:
    """An HTTP error answer, e.g. 500 api_error, 529 overloaded_error, 401 authentication_error."""

    status: int
    type: str
    message: str


@dataclass
class Hang:
    """Start streaming a turn, then stall until the server shuts down (for cancel tests)."""

    text: str = "working on it"


Reply = Text | ToolUse | ApiError | Hang


@dataclass
class Recorded:
    method: str
    path: str
    body: dict[str, Any]
    headers: dict[str, str]
    conversation: bool

    @property
    def messages(self) -> list[dict[str, Any]]:
        msgs: list[dict[str, Any]] = self.body.get("messages") or []
        return msgs

    def text_of_messages(self) -> str:
        """All text in the request's messages (user prompts, assistant turns, tool results)."""
        return json.dumps(self.messages)


def is_conversation(path: str, body: dict[str, Any]) -> bool:
    return (
        path.startswith("/v1/messages")
        and "count_tokens" not in path
        and bool(body.get("stream"))
        and bool(body.get("tools"))
    )


_SAFE_HEADERS = ("user-agent", "anthropic-version", "anthropic-beta", "x-app", "content-type")


class FakeAnthropic:
    """Start with `with FakeAnthropic() as api:`; queue replies with `api.script(...)`."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self._lock = threading.Lock()
        self._replies: list[Reply] = []
        self.requests: list[Recorded] = []
        self.tls = tls
        # (header name, value) each request authenticated with, in order.
        self.credentials: list[tuple[str, str]] = []
        self.default_text = "OK"
        # Like the real API: streams are chunked and the connection stays open for the
        # next request. False: each stream ends with the connection (Connection: close).
        self.keep_alive = True
        # Close each connection after its response without saying so (a server whose
        # keep-alive timer fired): the client's next request must use a new one.
        self.close_after_response = False
        # Once: a request that comes on a connection which already served one is not
        # answered, the connection just closes (the keep-alive race a client must retry).
        self.drop_next_reused_request = False
        # TCP connections accepted so far (each TLS handshake is one).
        self.connections = 0
        self._closing = threading.Event()
        # Set when a Hang reply has started streaming (the CLI is mid-turn).
        self.hanging = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        if tls is not None:
            # Each connection's handshake runs in its own handler thread (not in accept()).
            self._server.socket = tls.wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False
            )
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # -- control -------------------------------------------------------------
    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def script(self, *replies: Reply) -> None:
        with self._lock:
            self._replies.extend(replies)

    def conversation_requests(self) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.conversation]

    def remaining(self) -> int:
        with self._lock:
            return len(self._replies)

    def start(self) -> FakeAnthropic:
        self._thread.start()
        return self

    def close(self) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> FakeAnthropic:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next_reply(self, conversation: bool) -> Reply:
        with self._lock:
            if conversation and self._replies:
                return self._replies.pop(0)
        return Text(self.default_text, chunks=1)

    # -- HTTP ----------------------------------------------------------------
    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def setup(self) -> None:
                with fake._lock:
                    fake.connections += 1
                if isinstance(self.request, ssl.SSLSocket):
                    self.request.settimeout(30)
                    try:
                        self.request.do_handshake()
                    except (OSError, ssl.SSLError):
                        pass  # the handler then reads nothing and ends
                super().setup()

            def do_HEAD(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:
                fake._record("GET", self.path, {}, self.headers, False)
                self._json(404, {"type": "error", "error": {"type": "not_found_error"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else {}
                except ValueError:
                    body = {}
                self.served = getattr(self, "served", 0) + 1
                with fake._lock:
                    drop = fake.drop_next_reused_request and self.served > 1
                    if drop:
                        fake.drop_next_reused_request = False
                if drop:
                    self.close_connection = True
                    return
                path = self.path.split("?", 1)[0]
                conv = is_conversation(path, body)
                fake._record("POST", self.path, body, self.headers, conv)
                if path.endswith("/count_tokens"):
                    self._json(200, {"input_tokens": 42})
                    return
                if not path.startswith("/v1/messages"):
                    self._json(404, {"type": "error", "error": {"type": "not_found_error"}})
                    return
                reply = fake._next_reply(conv)
                model = str(body.get("model") or "claude-fake")
                if isinstance(reply, ApiError):
                    self._json(
                        reply.status,
                        {
                            "type": "error",
                            "error": {"type": reply.type, "message": reply.message},
                        },
                    )
                    return
                if body.get("stream"):
                    self._stream(reply, model)
                else:
                    self._json(200, _message_json(reply, model))

            def _json(self, status: int, obj: Any) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("request-id", _new_id("req"))
                self.end_headers()
                self.wfile.write(data)
                self.wfile.flush()
                if fake.close_after_response:
                    self.close_connection = True

            def _stream(self, reply: Reply, model: str) -> None:
                chunked = fake.keep_alive and not isinstance(reply, Hang)
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                if chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                else:
                    self.send_header("Connection", "close")
                self.send_header("request-id", _new_id("req"))
                self.end_headers()
                self.close_connection = not chunked or fake.close_after_response
                try:
                    for event, data in _sse_events(reply, model):
                        text = f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()
                        if chunked:
                            text = b"%x\r\n%s\r\n" % (len(text), text)
                        self.wfile.write(text)
                        self.wfile.flush()
                    if chunked:
                        self.wfile.write(b"0\r\n\r\n")
                        self.wfile.flush()
                    if isinstance(reply, Hang):
                        fake.hanging.set()
                        fake._closing.wait(120)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        return Handler

    def _record(
        self, method: str, path: str, body: dict[str, Any], headers: Any, conv: bool
    ) -> None:
        hdrs = {k: str(headers.get(k)) for k in _SAFE_HEADERS if headers.get(k) is not None}
        with self._lock:
            self.requests.append(Recorded(method, path, body, hdrs, conv))
            for name in ("x-api-key", "authorization"):
                for value in headers.get_all(name) or ():
                    self.credentials.append((name, str(value)))


def _usage(inp: int = 10, out: int = 5) -> dict[str, int]:
    return {
        "input_tokens": inp,
        "output_tokens": out,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


def _content(reply: Reply) -> tuple[list[dict[str, Any]], str]:
    if isinstance(reply, ToolUse):
        blocks: list[dict[str, Any]] = []
        if reply.text:
            blocks.append({"type": "text", "text": reply.text})
        blocks.append(
            {"type": "tool_use", "id": reply.id, "name": reply.name, "input": reply.input}
        )
        return blocks, "tool_use"
    if isinstance(reply, (Text, Hang)):
        return [{"type": "text", "text": reply.text}], "end_turn"
    raise TypeError(reply)


def _message_json(reply: Reply, model: str) -> dict[str, Any]:
    blocks, stop = _content(reply)
    return {
        "id": _new_id("msg"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": blocks,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": _usage(),
    }


def _split(text: str, n: int) -> list[str]:
    n = max(1, min(n, len(text) or 1))
    size = -(-len(text) // n) if text else 1
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def _sse_events(reply: Reply, model: str) -> Iterator[tuple[str, dict[str, Any]]]:
    msg: dict[str, Any] = {
        "id": _new_id("msg"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": _usage(out=1),
    }
    yield "message_start", {"type": "message_start", "message": msg}
    yield "ping", {"type": "ping"}
    blocks, stop = _content(reply)
    for index, block in enumerate(blocks):
        if block["type"] == "text":
            yield (
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": index,
                    "content_block": {"type": "text", "text": ""},
                },
            )
            chunks = reply.chunks if isinstance(reply, Text) else 1
            for part in _split(block["text"], chunks):
                yield (
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": index,
                        "delta": {"type": "text_delta", "text": part},
                    },
                )
        else:
            yield (
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": index,
                    "content_block": {
                        "type": "tool_use",
                        "id": block["id"],
                        "name": block["name"],
                        "input": {},
                    },
                },
            )
            yield (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {
                        "type": "input_json_delta",
                        "partial_json": json.dumps(block["input"]),
                    },
                },
            )
        if isinstance(reply, Hang):
            return  # stall mid-block: the caller waits for shutdown
        yield "content_block_stop", {"type": "content_block_stop", "index": index}
    yield (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop, "stop_sequence": None},
            "usage": {"output_tokens": 5},
        },
    )
    yield "message_stop", {"type": "message_stop"}
