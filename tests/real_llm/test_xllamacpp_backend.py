"""The llama.cpp backend against a real llama.cpp server (xllamacpp + Gemma 3 270M, see tests/real_llm/xllamacpp.py).

Deselect with `-m 'not real_llm'`; skips by itself when the packages are not installed.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from aibot.backends import ChatRequest, RequestFault, Timeouts, Unsupported, make_backend
from aibot.backends.base import ModelUnavailable
from aibot.generation.postprocess import clean_reply
from aibot.generation.prompt import build_request
from tests.real_llm.xllamacpp import real_llm_servers  # noqa: F401  (fixture)

pytestmark = pytest.mark.real_llm

ENTITY = SimpleNamespace(
    id="pirate", username="Pirate", system_role="system", system_prompt="You are a pirate. ",
    user_prompt="Answer in one short sentence.", nom=20, prompt_mode="messages", context_token_budget=1500,
    add_newline_to_context=False, add_entity_username=False, stop_sequences=["\n\n"],
    temperature=0.0, max_tokens=16, top_p=None, top_k=None, repeat_penalty=None, min_p=None,
    frequency_penalty=None, presence_penalty=None, filter_out=["Pirate:"], trim_after=["Human:"],
    trim_whitespace=True,
)
GLOBAL = SimpleNamespace(global_stop_sequences=[], global_filter_out=[], global_trim_after=[])


@pytest.fixture(scope="module")
def backends(real_llm_servers):  # noqa: F811
    bs = [make_backend("llamacpp", url, timeouts=Timeouts(total=120, read=120)) for url in real_llm_servers.urls]
    yield bs
    for b in bs:
        b.close()


def request_for(backend, model, text="Where is the treasure?", **kw):
    return build_request(ENTITY, text=text, sender="bob", context_lines=["alice: ahoy", "Pirate: Arr, matey."],
                         model=model, global_settings=GLOBAL,
                         count_tokens=lambda s: backend.tokenize(model, s), **kw)


def test_health_and_listing(backends, real_llm_servers):  # noqa: F811
    for backend, model in zip(backends, real_llm_servers.models):
        assert backend.health().healthy
        [loaded] = backend.list_loaded()
        assert loaded.key == model
        assert loaded.parallel == real_llm_servers.n_parallel
        assert loaded.context_length == real_llm_servers.n_ctx
        assert loaded.size_bytes > 100_000_000


def test_single_model_load_control(backends, real_llm_servers):  # noqa: F811
    backend, model = backends[0], real_llm_servers.models[0]
    assert backend.load(model).key == model            # the model it serves: a no-op
    with pytest.raises(ModelUnavailable, match="some-other-model"):   # permanent: it serves one model
        backend.load("some-other-model")
    with pytest.raises(Unsupported):
        backend.unload(model)


def test_tokenize_uses_the_server_tokenizer(backends, real_llm_servers):  # noqa: F811
    backend, model = backends[0], real_llm_servers.models[0]
    short, long = backend.tokenize(model, "hello world"), backend.tokenize(model, "hello world " * 50)
    assert isinstance(short, int) and 1 <= short < long
    assert backend.tokenize(model, "") == 0


def test_chat_and_stream_agree_at_temperature_zero(backends, real_llm_servers):  # noqa: F811
    backend, model = backends[0], real_llm_servers.models[0]
    req = request_for(backend, model)
    assert req.messages[0]["role"] == "system" and req.messages[-1]["content"] == "bob: Where is the treasure?"
    result = backend.chat(req)
    assert result.text.strip()
    assert result.finish_reason in ("stop", "length")
    assert 0 < result.completion_tokens <= 16 and result.prompt_tokens > 10
    streamed = "".join(backend.chat_stream(request_for(backend, model)))
    assert streamed == result.text
    reply = clean_reply(result.text, ENTITY, GLOBAL)
    assert reply is None or (reply == reply.strip() and "Pirate:" not in reply)


def test_real_tokenizer_trims_context_to_budget(backends, real_llm_servers):  # noqa: F811
    backend, model = backends[0], real_llm_servers.models[0]
    lines = [f"user{i}: " + "lorem ipsum dolor sit amet " * 8 for i in range(60)]
    req = build_request(ENTITY, text="hi", sender="bob", context_lines=lines, model=model, global_settings=GLOBAL,
                        token_budget=400, count_tokens=lambda s: backend.tokenize(model, s))
    assert "user59:" in req.messages[-1]["content"] and "user0:" not in req.messages[-1]["content"]
    result = backend.chat(req)
    assert result.prompt_tokens <= 400


def test_parallel_requests_on_both_servers(backends, real_llm_servers):  # noqa: F811
    jobs = [(b, m) for b, m in zip(backends, real_llm_servers.models) for _ in range(2)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda bm: bm[0].chat(ChatRequest(
            model=bm[1], messages=[{"role": "user", "content": "Count to five."}],
            params={"temperature": 0, "max_tokens": 8})), jobs))
    assert all(r.completion_tokens and r.text for r in results)
    assert {r.model for r in results} == set(real_llm_servers.models)


def test_prompt_over_context_is_a_request_fault(backends, real_llm_servers):  # noqa: F811
    backend, model = backends[1], real_llm_servers.models[1]
    req = ChatRequest(model=model, messages=[{"role": "user", "content": "hello " * 5000}], params={"max_tokens": 4})
    with pytest.raises(RequestFault) as info:
        backend.chat(req)
    assert not info.value.server_fault and info.value.status == 400
