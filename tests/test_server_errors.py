"""Bad input, auth, backpressure and loading: the right status and OpenAI error body, and the server healthy after."""

from __future__ import annotations

import threading

import httpx
import pytest

from tests.server_helpers import MODEL, demo_engine, running_server, wait_until

USER = [{"role": "user", "content": "Hi"}]
LONG = "ROMEO: " * 1200          # > the demo's 1024-token context

CHAT_CASES = [   # (body, status, param, code or None)
    ({}, 400, "messages", "missing"),
    ({"messages": []}, 400, "messages", "too_short"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role", "union_tag_invalid"),
    ({"messages": [{"role": "user"}]}, 400, "messages[0].content", "missing"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     None, None),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].tool_call_id", "missing"),
    ({"messages": USER, "temperature": 2.5}, 400, "temperature", "less_than_equal"),
    ({"messages": USER, "temperature": -1}, 400, "temperature", "greater_than_equal"),
    ({"messages": USER, "top_p": 0}, 400, "top_p", "greater_than"),
    ({"messages": USER, "top_p": 1.5}, 400, "top_p", "less_than_equal"),
    ({"messages": USER, "top_k": -2}, 400, "top_k", "greater_than_equal"),
    ({"messages": USER, "min_p": 1.5}, 400, "min_p", "less_than_equal"),
    ({"messages": USER, "max_tokens": 0}, 400, "max_tokens", "greater_than_equal"),
    ({"messages": USER, "max_completion_tokens": -3}, 400, "max_completion_tokens", "greater_than_equal"),
    ({"messages": USER, "n": 0}, 400, "n", "greater_than_equal"),
    ({"messages": USER, "n": 9}, 400, "n", None),                                # demo engine: max_batch_size 8
    ({"messages": USER, "seed": "x"}, 400, "seed", "int_parsing"),
    ({"messages": USER, "stop": [""]}, 400, "stop", None),
    ({"messages": USER, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", "less_than_equal"),
    ({"messages": USER, "top_logprobs": 2}, 400, "top_logprobs", None),
    ({"messages": USER, "presence_penalty": 0.5}, 400, "presence_penalty", None),
    ({"messages": USER, "response_format": {"type": "xml"}}, 400, "response_format.type", "literal_error"),
    ({"messages": USER, "response_format": {"type": "json_schema"}}, 400, "response_format", None),
    ({"messages": USER, "chat_template_kwargs": {"thinking": False, "x": 1}}, 400, "chat_template_kwargs.x",
     "extra_forbidden"),
    ({"messages": USER, "tools": [{"type": "function", "function": {"name": "a"}}],
      "tool_choice": {"type": "function", "function": {"name": "b"}}}, 400, "tool_choice", None),
    ({"messages": USER, "tool_choice": "required"}, 400, "tool_choice", None),
    ({"messages": USER, "tool_choice": "sometimes"}, 400, "tool_choice", None),
    ({"messages": [{"role": "user", "content": LONG}]}, 400, "messages", "context_length_exceeded"),
    ({"messages": USER, "model": "gpt-4"}, 404, "model", "model_not_found"),
]

COMPLETION_CASES = [
    ({}, 400, "prompt", "missing"),
    ({"prompt": ""}, 400, "prompt", None),
    ({"prompt": []}, 400, "prompt", None),
    ({"prompt": [1, 99999]}, 400, "prompt", None),
    ({"prompt": LONG}, 400, "prompt", "context_length_exceeded"),
    ({"prompt": "x", "echo": True}, 400, "echo", None),
    ({"prompt": "x", "logprobs": 50}, 400, "logprobs", "less_than_equal"),
    ({"prompt": "x", "n": 9}, 400, "n", None),
    ({"prompt": "x", "model": "nope"}, 404, "model", "model_not_found"),
]


@pytest.fixture(scope="module")
def engine():
    return demo_engine()


@pytest.fixture(scope="module")
def http(engine):
    with running_server(engine) as s, s.client() as c:
        yield c


def _check(r: httpx.Response, status: int, param, code):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == ("invalid_request_error" if status in (400, 404) else error["type"])
    if param is not None:
        assert error["param"] == param, error
        assert param.split("[")[0].split(".")[0] in error["message"] or status == 404, error
    if code is not None:
        assert error["code"] == code, error


@pytest.mark.parametrize("body,status,param,code", CHAT_CASES)
def test_bad_chat_requests(http, body, status, param, code):
    _check(http.post("/v1/chat/completions", json=body), status, param, code)
    assert http.get("/health").status_code == 200


@pytest.mark.parametrize("body,status,param,code", COMPLETION_CASES)
def test_bad_completion_requests(http, body, status, param, code):
    _check(http.post("/v1/completions", json=body), status, param, code)
    assert http.get("/health").status_code == 200


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/tokenize"])
def test_malformed_json(http, path):
    r = http.post(path, content=b'{"messages": [', headers={"content-type": "application/json"})
    _check(r, 400, None, "json_invalid")
    assert "JSON" in r.json()["error"]["message"]
    assert http.get("/health").status_code == 200


def test_tokenizer_routes(http, engine):
    _check(http.post("/detokenize", json={"tokens": [-1]}), 400, "tokens", None)
    _check(http.post("/tokenize", json={}), 400, "prompt", None)
    ids = http.post("/tokenize", json={"prompt": "ROMEO:"}).json()
    assert ids["tokens"] == engine.tokenizer.encode("ROMEO:") and ids["count"] == len(ids["tokens"])
    assert http.post("/detokenize", json={"tokens": ids["tokens"]}).json()["prompt"] == "ROMEO:"
    _check(http.get("/v1/models/other"), 404, "model", "model_not_found")
    assert http.get(f"/v1/models/{MODEL}").json()["id"] == MODEL


def test_api_key(engine, monkeypatch):
    with running_server(engine, api_key="sekrit") as s, s.client() as c:
        _check(c.get("/v1/models"), 401, None, "invalid_api_key")
        _check(c.post("/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer wrong"}),
               401, None, "invalid_api_key")
        _check(c.post("/tokenize", json={"prompt": "x"}), 401, None, "invalid_api_key")
        assert c.get("/v1/models", headers={"Authorization": "Bearer sekrit"}).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200


def test_queue_limit_answers_429_with_retry_after(engine):
    with running_server(engine, max_queue=0) as s, s.client() as c:
        # n=8 fills max_batch_size + max_queue = 8 slots for as long as the stream runs.
        with c.stream("POST", "/v1/completions", json={"prompt": "ROMEO:", "n": 8, "max_tokens": 600,
                                                       "stream": True}) as running:
            lines = running.iter_lines()     # held: a dropped iterator closes the response (a disconnect)
            next(lines)
            r = c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2})
            _check(r, 429, None, "rate_limit_exceeded")
            assert int(r.headers["retry-after"]) >= 1
            assert c.get("/health").status_code == 200
        assert wait_until(lambda: s.state.host.slots_taken == 0)
        assert c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2}).status_code == 200


def test_health_is_503_while_loading(engine):
    gate = threading.Event()

    def load():          # the real engine, handed over only once the test lets loading finish
        gate.wait(30)
        return engine
    with running_server(load) as s, s.client() as c:
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        _check(c.post("/v1/completions", json={"prompt": "x"}), 503, None, "model_not_ready")
        gate.set()
        assert wait_until(lambda: c.get("/health").status_code == 200)
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_load_failure_is_reported(engine):
    def load():
        raise ValueError("max_seq_len=0 must lie in [1, 1024]")
    failures = []
    with running_server(load, on_load_error=failures.append) as s, s.client() as c:
        assert wait_until(lambda: failures)
        r = c.get("/health")
        assert r.status_code == 503 and "max_seq_len" in r.json()["error"]
