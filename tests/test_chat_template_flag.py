"""``--chat-template FILE`` (qkv serve, qkv chat) and ``LLM(chat_template=FILE)``: the file's
template is rendered in the bounded sandbox instead of the model's; a chat request to a
model without a template is a 400 that names ``--chat-template``."""

from __future__ import annotations

import io
import json

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from tests.test_server import Server, make_model_dir  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# A template unlike the model's ChatML one, so its use shows in the prompt.
TEMPLATE = ("{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}<|im_end|>{% endfor %}"
            "{% if add_generation_prompt %}[ASSISTANT]{% endif %}")
MESSAGES = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def bare_dir(tmp_path_factory):
    """The tiny chat model with its chat template removed."""
    d = tmp_path_factory.mktemp("no-template")
    make_model_dir(d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "chat.jinja").write_text(TEMPLATE)
    return d


def test_llm_chat_template_file(bare_dir, tmp_path):
    from qkv import LLM
    from qkv.loading.chat_template import ChatTemplateError

    llm = LLM(str(bare_dir), device="cpu", num_kv_blocks=16, chat_template=bare_dir / "chat.jinja")
    ids = llm.chat_prompt(MESSAGES)
    assert llm.tokenizer.decode(ids, skip_special_tokens=False) == "[USER] hello world<|im_end|>[ASSISTANT]"
    assert llm.tokenizer.token_to_id("<|im_end|>") in llm.engine.eos_ids  # the template's end of turn stops
    bad = tmp_path / "bad.jinja"
    bad.write_text("line one\n{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match=r"bad\.jinja.*line"):
        LLM(str(bare_dir), device="cpu", num_kv_blocks=16, chat_template=bad)
    with pytest.raises(ChatTemplateError, match="nowhere.jinja.*no such file"):
        LLM(str(bare_dir), device="cpu", num_kv_blocks=16, chat_template=str(tmp_path / "nowhere.jinja"))
    # the sandbox bounds a file's template too
    loop = tmp_path / "loop.jinja"
    loop.write_text("{% for i in range(99999) %}{% for j in range(99999) %}x{% endfor %}{% endfor %}")
    slow = LLM(str(bare_dir), device="cpu", num_kv_blocks=16, chat_template=loop)
    with pytest.raises(ChatTemplateError, match="loops more than|longer than|output"):
        slow.chat_prompt(MESSAGES)


def test_server_without_template_names_the_flag(bare_dir):
    from qkv import LLM
    from qkv.server import create_app

    plain = LLM(str(bare_dir), device="cpu", num_kv_blocks=16)
    s = Server(create_app(plain, "tiny"))
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
        assert "--chat-template" in str(e.value) and e.value.code == "no_chat_template"
        assert client.completions.create(model="tiny", prompt="hello", max_tokens=2).choices[0].text is not None
    finally:
        s.stop()
    served = LLM(str(bare_dir), device="cpu", num_kv_blocks=16, chat_template=str(bare_dir / "chat.jinja"))
    s = Server(create_app(served, "tiny"))
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60)
        r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
        assert r.usage.prompt_tokens == len(served.chat_prompt(MESSAGES))
    finally:
        s.stop()


def test_cli_chat_template_flag(bare_dir, monkeypatch, capsys):
    from qkv.cli import main

    common = ["--model", str(bare_dir), "--device", "cpu", "--num-kv-blocks", "16", "--max-tokens", "3"]
    monkeypatch.setattr("sys.stdin", io.StringIO("hello world\n\n"))
    assert main(["chat", *common]) == 2
    assert "--chat-template FILE" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO("hello world\n\n"))
    assert main(["chat", *common, "--chat-template", str(bare_dir / "chat.jinja"), "--verbose"]) == 0
    err = capsys.readouterr().err
    assert "[prompt " in err  # --verbose: the turn ran
    assert main(["serve", *common[:-2], "--chat-template", str(bare_dir / "missing.jinja")]) == 2
    err = capsys.readouterr().err
    assert "--chat-template" in err and "missing.jinja" in err
