"""Chat templates: transformers' ``{% generation %}`` tag renders like transformers renders it,
and a template with a syntax error fails the load (with its line), not every request."""

from __future__ import annotations

import json

import pytest
import tokenizers

from qkv.loading import ChatTemplateError, LoadError
from qkv.loading.hf import hf_tokenizer
from qkv.loading.tokenizer import Tokenizer

# SmolLM3/Qwen-style: assistant turns wrapped in the marker transformers uses for assistant masks.
GENERATION_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m.content }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"}]


def _backend():
    return tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "<|im_end|>": 1}, unk_token="<unk>"))


def test_generation_tag_renders_like_transformers():
    from transformers.utils.chat_template_utils import render_jinja_template

    tok = Tokenizer(_backend(), chat_template=GENERATION_TEMPLATE)
    ours = tok.apply_chat_template(CHAT, add_generation_prompt=True)
    ref = render_jinja_template([CHAT], chat_template=GENERATION_TEMPLATE, add_generation_prompt=True)[0][0]
    assert ours == ref
    assert "<|im_start|>assistant\nHello!<|im_end|>" in ours


@pytest.mark.parametrize("template,line", [
    ("{% for m in messages %}{{ m.content }}", 1),  # unclosed for
    ("{{ bos_token }}\n{% if x %}\n{{ x }\n{% endif %}", 3),
    ("a\nb\n{% generation %}unclosed", 3),
])
def test_syntax_error_fails_at_construction_with_line(template, line):
    with pytest.raises(ChatTemplateError, match=f"my-template: chat template syntax error at line {line}"):
        Tokenizer(_backend(), chat_template=template, name="my-template")


def test_syntax_error_in_a_model_directory_is_a_load_error(tmp_path):
    _backend().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% if %}"}))
    with pytest.raises(LoadError, match="tokenizer_config.json: chat template syntax error at line 1"):
        hf_tokenizer(tmp_path, [])
    (tmp_path / "chat_template.jinja").write_text("ok\n{% endfor %}")
    with pytest.raises(LoadError, match="chat_template.jinja: chat template syntax error at line 2"):
        hf_tokenizer(tmp_path, [])
    (tmp_path / "chat_template.jinja").write_text(GENERATION_TEMPLATE)
    assert "Hello!" in hf_tokenizer(tmp_path, []).apply_chat_template(CHAT)
