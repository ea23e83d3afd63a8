"""Device check: structured outputs on CUDA (graphs + async on), a tiny random Llama with
SmolLM2's real tokenizer at temperature 1: every sample matches its constraint; plain rows
in the same batch are unaffected (equal to a run without structured neighbours); then decode
tok/s of 32 JSON rows beside 32 plain ones.

Usage: build the model directory on a machine with the gguf package (the tests' builder),
    PYTHONPATH=. python -c "import sys; sys.path.insert(0, 'tests'); from pathlib import Path;
        from test_structured import make_model_dir; make_model_dir(Path('build/so_model'))"
then on the GPU machine (llguidance installed): python benchmarks/structured_cuda_check.py build/so_model
"""
import json, re, sys, time
import torch
from qkv import LLM, SamplingParams, StructuredOutputs

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
          "age": {"type": "integer", "minimum": 0, "maximum": 150},
          "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}, "ok": {"type": "boolean"}},
          "required": ["name", "age", "ok"], "additionalProperties": False}
REGEX, CHOICES = r"[a-z]{2,4}-\d{2}", ["red", "green", "blue jay"]

def valid_json(t):
    o = json.loads(t)
    assert set(o) <= set(SCHEMA["properties"]) and {"name", "age", "ok"} <= set(o), o
    assert isinstance(o["name"], str) and len(o["name"]) <= 6 and isinstance(o["age"], int) and 0 <= o["age"] <= 150
    assert isinstance(o["ok"], bool) and all(x in ("a", "b") for x in o.get("tags", [])) and len(o.get("tags", [])) <= 2

llm = LLM(sys.argv[1], device="cuda", dtype="float32", num_kv_blocks=512)
print("async", llm.engine.async_scheduling, "graphs", getattr(llm.engine, "graphs", None) is not None)
plain = SamplingParams(max_tokens=24, temperature=1.0, seed=7, ignore_eos=True)
alone = llm.generate(["hello there"], plain)[0].token_ids
ok = 0
for seed in range(4):
    ps = [SamplingParams(max_tokens=80, temperature=1.0, seed=seed, n=3, structured_outputs=StructuredOutputs(json=SCHEMA)),
          SamplingParams(max_tokens=20, temperature=1.0, seed=seed, n=2, structured_outputs=StructuredOutputs(regex=REGEX)),
          SamplingParams(max_tokens=20, temperature=1.0, seed=seed, structured_outputs=StructuredOutputs(choice=CHOICES)),
          plain]
    outs = llm.generate(["a", "b", "c", "hello there"], ps)
    for s in outs[0].samples:
        if s.finish_reason == "stop": valid_json(s.text); ok += 1
    for s in outs[1].samples:
        assert re.fullmatch(REGEX, s.text), s.text; ok += 1
    assert outs[2].text in CHOICES, outs[2].text; ok += 1
    assert outs[3].token_ids == alone, "plain row changed by structured neighbours"
st = llm.stats(); assert st["num_blocks_free"] + st["num_blocks_cached"] == st["num_blocks_total"], st
print("structured CUDA ok:", ok, "constrained samples checked; stats", st)
# cost: 32 plain rows vs 32 json rows, decode tok/s
for so in (None, StructuredOutputs(json=SCHEMA)):
    p = SamplingParams(max_tokens=64, temperature=1.0, seed=1, structured_outputs=so, ignore_eos=so is None)
    llm.generate(["x"] * 32, p); torch.cuda.synchronize(); t = time.perf_counter()
    o = llm.generate(["x"] * 32, p); torch.cuda.synchronize(); dt = time.perf_counter() - t
    n = sum(len(r.token_ids) for r in o)
    print(f"32 rows {'json' if so else 'plain'}: {n} tokens in {dt*1e3:.0f} ms = {n/dt:.0f} tok/s")
