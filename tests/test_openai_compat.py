"""Every OpenAI (and vLLM extra) request field is either honoured or refused with a 400 that
names it; logprobs equal HF's; sampling options reach the engine.

The field lists come from the installed ``openai`` package's request types, so a field that
a newer client adds fails ``test_every_field_is_classified`` until it is classified here
(and in docs/serving.md's compatibility table). The server is the real app under uvicorn in
this process (tests/test_server.py's fixtures), driven by the official client or httpx.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from tests.test_server import Server, make_model_dir  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

OK, NO = "ok", "refused"

# field -> (extra body fields, expected, for "ok": the test that checks the behaviour).
# Values are what a client would plausibly send; "refused" ones must get a 400 naming the field.
COMMON = {
    "model": ({"model": "tiny"}, OK, "test_server.py::test_bad_requests"),
    "n": ({"n": 2}, OK, "test_sampling_reaches_the_engine"),
    "max_tokens": ({"max_tokens": 3}, OK, "test_sampling_reaches_the_engine"),
    "temperature": ({"temperature": 0.7, "seed": 3}, OK, "test_sampling_reaches_the_engine"),
    "top_p": ({"top_p": 0.5, "temperature": 1.0, "seed": 3}, OK, "test_sampling_reaches_the_engine"),
    "seed": ({"seed": 5}, OK, "test_sampling_reaches_the_engine"),
    "stop": ({"stop": ["x"]}, OK, "test_server.py::test_stop_string"),
    "stream": ({"stream": True}, OK, "test_server.py::test_stream_deltas_equal_non_streamed"),
    "stream_options": ({"stream": True, "stream_options": {"include_usage": True}}, OK,
                       "test_server.py::test_stream_ends_with_done"),
    "frequency_penalty": ({"frequency_penalty": 1.5}, OK, "test_sampling_reaches_the_engine"),
    "presence_penalty": ({"presence_penalty": 1.5}, OK, "test_sampling_reaches_the_engine"),
    "logit_bias": ({"logit_bias": {"7": 100}}, OK, "test_sampling_reaches_the_engine"),
    "user": ({"user": "alice"}, OK, "informational (as at OpenAI)"),
    # vLLM's extras
    "top_k": ({"top_k": 2, "temperature": 1.0, "seed": 3}, OK, "test_sampling_reaches_the_engine"),
    "min_p": ({"min_p": 0.5, "temperature": 1.0, "seed": 3}, OK, "test_sampling_reaches_the_engine"),
    "repetition_penalty": ({"repetition_penalty": 2.0}, OK, "test_sampling_reaches_the_engine"),
    "min_tokens": ({"min_tokens": 2}, OK, "test_sampling_api.py::test_min_tokens_suppresses_eos"),
    "stop_token_ids": ({"stop_token_ids": [5]}, OK, "test_sampling_reaches_the_engine"),
    "ignore_eos": ({"ignore_eos": True}, OK, "test_server.py::test_completion_matches_offline_engine"),
    "include_stop_str_in_output": ({"include_stop_str_in_output": True, "stop": ["o"]}, OK,
                                   "test_sampling_api.py::test_include_stop_str_in_output_and_bad_words"),
    "skip_special_tokens": ({"skip_special_tokens": False}, OK, "test_sampling_reaches_the_engine"),
    "bad_words": ({"bad_words": ["the"]}, OK, "test_sampling_api.py::test_include_stop_str_in_output_and_bad_words"),
    "allowed_token_ids": ({"allowed_token_ids": [5, 6, 7]}, OK, "test_sampling_reaches_the_engine"),
    "prompt_logprobs": ({"prompt_logprobs": 2}, OK, "test_logprobs_match_hf"),
    "cache_salt": ({"cache_salt": "s"}, OK, "test_security.py::test_cache_salt_field"),
    "response_format": ({"response_format": {"type": "json_object"}}, OK,
                        "test_structured.py::test_server_response_format_and_guided_fields"),
    "guided_json": ({"guided_json": {"type": "object"}}, OK,
                    "test_structured.py::test_server_response_format_and_guided_fields"),
    "guided_regex": ({"guided_regex": "a+"}, OK, "test_structured.py::test_server_response_format_and_guided_fields"),
    "guided_choice": ({"guided_choice": ["a", "b"]}, OK,
                      "test_structured.py::test_server_response_format_and_guided_fields"),
    "guided_grammar": ({"guided_grammar": 'root ::= "a"'}, OK,
                       "test_structured.py::test_json_schema_regex_choice_grammar_outputs_match"),
    "structured_outputs": ({"structured_outputs": {"json": {}}}, OK,
                           "test_structured.py::test_json_schema_regex_choice_grammar_outputs_match"),
    "guided_decoding_backend": ({"guided_decoding_backend": "xgrammar"}, NO, None),
    "guided_whitespace_pattern": ({"guided_whitespace_pattern": " "}, NO, None),
    # vLLM fields qkv does not implement: unknown, so a 400 naming them
    "use_beam_search": ({"use_beam_search": True}, NO, None),
    "length_penalty": ({"length_penalty": 1.2}, NO, None),
    "truncate_prompt_tokens": ({"truncate_prompt_tokens": 4}, NO, None),
    "frobnicate": ({"frobnicate": 1}, NO, None),  # a misspelt/unknown field
}

CHAT = {
    **COMMON,
    "messages": ({}, OK, "test_server.py::test_chat_uses_model_template"),
    "max_completion_tokens": ({"max_completion_tokens": 3}, OK, "test_server.py::test_chat_uses_model_template"),
    "logprobs": ({"logprobs": True}, OK, "test_logprobs_match_hf"),
    "top_logprobs": ({"logprobs": True, "top_logprobs": 2}, OK, "test_logprobs_match_hf"),
    "chat_template_kwargs": ({"chat_template_kwargs": {"persona": "pirate"}}, OK,
                             "test_chat_template_kwargs_reach_the_template"),
    "add_generation_prompt": ({"add_generation_prompt": False}, OK, "test_chat_template_kwargs_reach_the_template"),
    "parallel_tool_calls": ({"parallel_tool_calls": False}, OK, "test_tool_calls.py::test_hermes_stream_equals_whole"),
    "prompt_cache_key": ({"prompt_cache_key": "k"}, OK, "no-op: prefix caching is automatic"),
    "safety_identifier": ({"safety_identifier": "u1"}, OK, "informational (as at OpenAI)"),
    "chat_template": ({"chat_template": "{{ 7*7 }}"}, NO, None),
    # this server's ChatML template renders no tools: "none" keeps them out (test_tool_calls.py has the rest)
    "tools": ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "tool_choice": "none"},
              OK, "test_tool_calls.py::test_tool_call_answer_and_stream"),
    "tool_choice": ({"tool_choice": "required"}, NO, None),  # no tools to call; the rest: test_tool_calls.py
    "functions": ({"functions": [{"name": "f"}]}, NO, None),
    "function_call": ({"function_call": "auto"}, NO, None),
    "audio": ({"audio": {"voice": "alloy", "format": "wav"}}, NO, None),
    "modalities": ({"modalities": ["text", "audio"]}, NO, None),
    "prediction": ({"prediction": {"type": "content", "content": "x"}}, NO, None),
    "web_search_options": ({"web_search_options": {}}, NO, None),
    "reasoning_effort": ({"reasoning_effort": "low"}, NO, None),
    "verbosity": ({"verbosity": "low"}, NO, None),
    "metadata": ({"metadata": {"a": "b"}}, NO, None),
    "store": ({"store": True}, NO, None),
    "service_tier": ({"service_tier": "flex"}, NO, None),
    "prompt_cache_retention": ({"prompt_cache_retention": "24h"}, NO, None),
    "prompt_cache_options": ({"prompt_cache_options": {}}, NO, None),
    "moderation": ({"moderation": {}}, NO, None),
    "echo": ({"echo": True}, NO, None),  # completions only
    "continue_final_message": ({"continue_final_message": True}, NO, None),
}

COMPLETIONS = {
    **COMMON,
    "prompt": ({}, OK, "test_server.py::test_completion_matches_offline_engine"),
    "logprobs": ({"logprobs": 2}, OK, "test_logprobs_match_hf"),
    "echo": ({"echo": True}, OK, "test_logprobs_match_hf"),
    "best_of": ({"best_of": 3}, NO, None),
    "suffix": ({"suffix": "end"}, NO, None),
    "top_logprobs": ({"top_logprobs": 2}, NO, None),  # a chat field
}

# No-ops that look like refusals: accepted.
NO_OPS = [("chat", {"response_format": {"type": "text"}}), ("chat", {"tool_choice": "none"}),
          ("chat", {"modalities": ["text"]}), ("chat", {"store": False}), ("chat", {"service_tier": "auto"}),
          ("completions", {"best_of": 1})]


def schema_fields(module) -> set[str]:
    return set(module.CompletionCreateParamsBase.__annotations__)


VLLM_EXTRAS = {"top_k", "min_p", "repetition_penalty", "min_tokens", "stop_token_ids", "ignore_eos",
               "include_stop_str_in_output", "skip_special_tokens", "bad_words", "allowed_token_ids",
               "prompt_logprobs", "cache_salt", "response_format", "guided_json", "guided_regex",
               "guided_choice", "logit_bias"}


def test_every_field_is_classified():
    """The installed openai client's fields and vLLM's extras all have an entry above."""
    from openai.types import completion_create_params as comp
    from openai.types.chat import completion_create_params as chat

    assert schema_fields(chat) | VLLM_EXTRAS | {"tools", "tool_choice", "chat_template_kwargs"} <= set(CHAT), \
        sorted(schema_fields(chat) - set(CHAT))
    assert schema_fields(comp) | VLLM_EXTRAS <= set(COMPLETIONS), sorted(schema_fields(comp) - set(COMPLETIONS))
    # every "ok" names where its behaviour is checked, and that test exists
    here = sys.modules[__name__]
    tests_dir = Path(__file__).parent
    for table in (CHAT, COMPLETIONS):
        for field, (_, verdict, where) in table.items():
            if verdict != OK:
                continue
            assert where, field
            if "::" in where:
                file, name = where.split("::")
                assert f"def {name}(" in (tests_dir / file).read_text(), (field, where)
            elif where.startswith("test_"):
                assert hasattr(here, where), (field, where)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("compat-llama"))


@pytest.fixture(scope="module")
def llm(model_dir):
    from qkv import LLM

    return LLM(model_dir, device="cpu", num_kv_blocks=64, max_num_batched_tokens=256)


@pytest.fixture(scope="module")
def ref_llm(model_dir):
    from qkv import LLM

    return LLM(model_dir, device="cpu", num_kv_blocks=64)


@pytest.fixture(scope="module")
def server(llm):
    from qkv.server import create_app

    s = Server(create_app(llm, "tiny"))
    yield s
    s.stop()
    assert llm.stats()["num_blocks_in_use"] == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=60, max_retries=0)


def _post(server, endpoint: str, extra: dict) -> httpx.Response:
    if endpoint == "chat":
        body = {"messages": [{"role": "user", "content": "hello world"}], "max_tokens": 3}
    else:
        body = {"prompt": "the quick brown", "max_tokens": 3}
    body.update(extra)
    return httpx.post(f"{server.url}/v1/{'chat/completions' if endpoint == 'chat' else 'completions'}",
                      json=body, timeout=60)


@pytest.mark.parametrize("endpoint,field", [("chat", f) for f in CHAT] + [("completions", f) for f in COMPLETIONS])
def test_field_is_honoured_or_refused_by_name(server, endpoint, field):
    extra, verdict, _ = (CHAT if endpoint == "chat" else COMPLETIONS)[field]
    r = _post(server, endpoint, extra)
    if verdict == OK:
        assert r.status_code == 200, r.text
    else:
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert field in err["message"], err
        assert err["code"] in ("unsupported_parameter", "invalid_value"), err


@pytest.mark.parametrize("endpoint,extra", NO_OPS)
def test_no_op_values_are_accepted(server, endpoint, extra):
    assert _post(server, endpoint, extra).status_code == 200


def test_message_fields(server):
    """An assistant message sent back as OpenAI returned it (empty refusal, annotations) is
    fine; a non-empty one, or an unknown message field, is a 400 naming it."""
    def chat(msg):
        return httpx.post(server.url + "/v1/chat/completions", json={"messages": [
            {"role": "user", "content": "hi"}, msg, {"role": "user", "content": "again"}], "max_tokens": 2}, timeout=60)

    ok = {"role": "assistant", "content": "hello", "refusal": None, "annotations": [], "name": "bot"}
    assert chat(ok).status_code == 200
    for field, value in [("refusal", "no"), ("audio", {"id": "a"}), ("colour", "red")]:
        r = chat({**ok, field: value})
        assert r.status_code == 400 and f"messages.1.{field}" in r.json()["error"]["message"], r.text


def test_openai_client_gets_400_for_a_bad_schema(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "x", "schema": {"type": "frob"}}})
    assert "response_format" in str(e.value)


def _hf(model_dir):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").eval()


def _hf_logprobs(hf, ids):
    import torch

    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_logprobs_match_hf(client, llm, ref_llm, model_dir):
    """The served logprobs are HF's log_softmax at the tokens the offline engine generates
    (greedy: the same tokens; a token's text alone cannot name its id for partial UTF-8)."""
    from qkv import SamplingParams

    hf = _hf(model_dir)
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    # chat: logprobs + top_logprobs
    msgs = [{"role": "user", "content": "count: one two three"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3, extra_body={"ignore_eos": True})
    prompt = llm.chat_prompt(msgs)
    toks = ref_llm.generate([prompt], greedy)[0].token_ids
    ref = _hf_logprobs(hf, prompt + toks)
    for i, item in enumerate(r.choices[0].logprobs.content):
        row = ref[len(prompt) - 1 + i]
        assert abs(item.logprob - row[toks[i]].item()) < 1e-4
        assert item.logprob == pytest.approx(row.max().item(), abs=1e-4)  # greedy: the top token
        top = row.topk(3)
        assert [t.logprob for t in item.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert [llm.tokenizer.decode([t], skip_special_tokens=False) for t in top.indices.tolist()] == \
            [t.token for t in item.top_logprobs]
    # completions: logprobs + echo (the prompt's tokens and their logprobs first; the first has none)
    ids = llm.encode("the quick brown fox")
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=4, temperature=0, logprobs=2, echo=True,
                                  extra_body={"ignore_eos": True, "prompt_logprobs": 1})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 4 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert r.choices[0].text.startswith(llm.tokenizer.decode(ids))
    full = ids + ref_llm.generate([ids], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0].token_ids
    ref = _hf_logprobs(hf, full)
    for t in range(1, len(full)):
        assert abs(lp.token_logprobs[t] - ref[t - 1, full[t]].item()) < 1e-4, t
        # {text: logprob}: tokens with equal text (partial UTF-8) share a key, so check the best
        assert max(lp.top_logprobs[t].values()) == pytest.approx(ref[t - 1].max().item(), abs=1e-4)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    # vLLM's prompt_logprobs on the choice
    plp = r.choices[0].model_extra["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(ids)
    for t in range(1, len(ids)):
        assert plp[t][str(ids[t])]["logprob"] == pytest.approx(ref[t - 1, ids[t]].item(), abs=1e-4)


def test_streamed_logprobs_equal_non_streamed(client):
    kw = dict(model="tiny", prompt="hello world, how", max_tokens=6, temperature=0, logprobs=1,
              extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw).choices[0].logprobs
    got = []
    for chunk in client.completions.create(stream=True, **kw):
        if chunk.choices and chunk.choices[0].logprobs:
            got += chunk.choices[0].logprobs.token_logprobs
    assert got == pytest.approx(whole.token_logprobs, abs=1e-6)
    # echo streams the prompt first
    kw["prompt"], kw["echo"], kw["logprobs"] = "hello", True, None
    text = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
    assert text == client.completions.create(**kw).choices[0].text and text.startswith("hello")
    # chat: the streamed content logprobs are the answer's
    chat = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0,
                logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**chat).choices[0].logprobs.content
    got = [t for c in client.chat.completions.create(stream=True, **chat)
           if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob, len(t.top_logprobs)) for t in got] == \
        [(t.token, pytest.approx(t.logprob, abs=1e-6), 2) for t in whole]


@pytest.mark.parametrize("extra,params", [
    ({"temperature": 0.7, "seed": 3}, dict(temperature=0.7, seed=3)),
    ({"top_k": 2, "temperature": 1.0, "seed": 3}, dict(top_k=2, temperature=1.0, seed=3)),
    ({"top_p": 0.5, "temperature": 1.0, "seed": 3}, dict(top_p=0.5, temperature=1.0, seed=3)),
    ({"min_p": 0.95, "temperature": 1.0, "seed": 3}, dict(min_p=0.95, temperature=1.0, seed=3)),
    ({"repetition_penalty": 2.0}, dict(repetition_penalty=2.0)),
    ({"frequency_penalty": 1.5}, dict(frequency_penalty=1.5)),
    ({"presence_penalty": 1.5}, dict(presence_penalty=1.5)),
    ({"logit_bias": {"7": 100}}, dict(logit_bias={7: 100})),
    ({"allowed_token_ids": [5, 6, 7]}, dict(allowed_token_ids=[5, 6, 7])),
    ({"stop_token_ids": [200]}, dict(stop_token_ids=[200])),  # greedy's 4th token
    ({"skip_special_tokens": False, "allowed_token_ids": [0, 1, 2, 40]},
     dict(skip_special_tokens=False, allowed_token_ids=[0, 1, 2, 40])),
    ({"n": 2, "temperature": 1.0, "seed": 9}, dict(n=2, temperature=1.0, seed=9)),
])
def test_sampling_reaches_the_engine(server, ref_llm, extra, params):
    """The server's answer equals the offline engine's with the same SamplingParams, and
    differs from its answer without the option (the first key): the option was applied."""
    from qkv import SamplingParams

    prompt = "count: one two three four"
    base = {"temperature": 0, "max_tokens": 12, "ignore_eos": True}
    r = _post(server, "completions", {**base, "prompt": prompt, **extra})
    assert r.status_code == 200, r.text
    texts = [c["text"] for c in r.json()["choices"]]
    want = ref_llm.generate(prompt, SamplingParams(**{**base, **params}))[0]
    assert texts == [o.text for o in want.outputs]
    option = next(iter(params))
    without = ref_llm.generate(prompt, SamplingParams(**{**base, **{k: v for k, v in params.items() if k != option}}))
    assert texts != [o.text for o in without[0].outputs], option


def test_chat_template_kwargs_reach_the_template(tmp_path):
    import tests.test_server as ts
    from qkv import LLM
    from qkv.server import create_app

    d = make_model_dir(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% if persona %}[{{ persona }}]{% endif %}" + ts.CHAT_TEMPLATE)
    (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps(cfg))
    llm = LLM(d, device="cpu", num_kv_blocks=32)
    plain = llm.chat_prompt([{"role": "user", "content": "hi"}])
    pirate = llm.chat_prompt([{"role": "user", "content": "hi"}], persona="pirate")
    assert llm.tokenizer.decode(pirate).startswith("[pirate]") and plain != pirate
    s = Server(create_app(llm, "tiny"))
    try:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "temperature": 0}
        url = s.url + "/v1/chat/completions"
        r = httpx.post(url, json={**body, "chat_template_kwargs": {"persona": "pirate"}}, timeout=60).json()
        assert r["usage"]["prompt_tokens"] == len(pirate)
        r = httpx.post(url, json={**body, "add_generation_prompt": False}, timeout=60).json()
        assert r["usage"]["prompt_tokens"] == len(llm.chat_prompt(body["messages"], add_generation_prompt=False))
        r = httpx.post(url, json={**body, "chat_template_kwargs": {"messages": []}}, timeout=60)
        assert r.status_code == 400 and "chat_template_kwargs" in r.json()["error"]["message"]
    finally:
        s.stop()
