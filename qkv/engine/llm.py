"""LLM: the offline Python API over LLMEngine.

    llm = LLM("smollm2")
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))
    outs[0].text, outs[0].token_ids, outs[0].finish_reason
"""

from __future__ import annotations

from typing import Iterator

import torch

from qkv.engine.engine import LLMEngine
from qkv.engine.request import RequestOutput, SamplingParams
from qkv.loading import load


def check_device(device: str | None, name: str = "device") -> None:
    """Refuse a device the engine cannot use before anything is loaded (ValueError, one line)."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"{name} {device!r} is not a device name; use cpu or cuda (cuda:N for one GPU)") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} {device!r} is not supported; use cpu or cuda (cuda:N for one GPU)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"{name} {device}: {why}; use {name} cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{name} {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")



class LLM:
    def __init__(self, model: str = "smollm2", dtype="float32", device: str | None = None, *,
                 threads: int | None = None, **engine_kwargs):
        """``model``: a named default, a ``.gguf`` file or an HF directory. ``engine_kwargs``:
        block_size, num_kv_blocks, kv_cache_memory, max_num_batched_tokens, max_num_seqs,
        enable_prefix_caching, max_model_len, kv_dtype, async_scheduling (None: on with CUDA graphs)."""
        if threads:
            torch.set_num_threads(threads)
        check_device(device)  # before the load, which may take minutes
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        loaded = load(model)
        self.source = loaded.source
        self.tokenizer = loaded.tokenizer
        self.engine = LLMEngine(loaded.config, loaded.weights, loaded.tokenizer, dtype=dtype, device=device,
                                **engine_kwargs)
        self.config = loaded.config

    # ---------------------------------------------------------------- inputs
    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.source} has no tokenizer: pass token ids instead of text")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def chat_prompt(self, messages: list[dict], *, special_tokens_in_content: bool = False) -> list[int]:
        """The prompt ids of a chat, rendered with the model's template (which writes its own BOS).
        Message content is plain text: ``<|im_start|>`` typed by a user is not a control token
        unless ``special_tokens_in_content`` (transformers' behaviour, which lets content forge
        turns). ChatTemplateError (a ValueError) if the template refuses the messages."""
        if self.tokenizer is None:
            raise ValueError(f"{self.source} has no tokenizer, so no chat template")
        return self.tokenizer.encode_chat(messages, add_generation_prompt=True,
                                          special_tokens_in_content=special_tokens_in_content)

    # ---------------------------------------------------------------- generation
    def generate(self, prompts, params: SamplingParams | None = None, use_tqdm: bool | None = None,
                 cache_salt: str | None = None) -> list[RequestOutput]:
        """Run prompts (a string, token ids, or a list of either) batched through the scheduler.
        Returns one output per prompt, in order; with ``n > 1`` each has ``samples``."""
        params = params or SamplingParams()
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        return self._run([self.encode(p) for p in prompts], params, use_tqdm, cache_salt)

    def chat(self, conversations, params: SamplingParams | None = None, use_tqdm: bool | None = None):
        """One conversation (a list of {"role", "content"}) -> one output; a list of them -> a list."""
        params = params or SamplingParams()
        single = bool(conversations) and isinstance(conversations[0], dict)
        convs = [conversations] if single else conversations
        outs = self._run([self.chat_prompt(c) for c in convs], params, use_tqdm, None)
        return outs[0] if single else outs

    def _run(self, prompt_ids: list[list[int]], params, use_tqdm, cache_salt) -> list[RequestOutput]:
        heads = [self.engine.add_request(ids, params, cache_salt=cache_salt) for ids in prompt_ids]
        final: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm or (use_tqdm is None and len(prompt_ids) >= 8):
            from tqdm import tqdm

            bar = tqdm(total=sum(len(h) for h in heads), desc="generate", unit="seq")
        try:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.finished:
                        final[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for reqs in heads:
                self.engine.abort(reqs[0].request_id)
            raise
        finally:
            if bar is not None:
                bar.close()
        results = []
        for reqs in heads:
            samples = [final[r.request_id] for r in reqs]
            head = samples[0]
            if len(samples) > 1:
                head.samples = samples
            results.append(head)
        return results

    def stream(self, prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield an output (with ``text_delta``) for every token of one prompt (n must be 1)."""
        params = params or SamplingParams()
        if params.n != 1:
            raise ValueError("stream() takes n=1")
        (req,) = self.engine.add_request(self.encode(prompt), params)
        try:
            while not req.finished:
                for out in self.engine.step():
                    if out.request_id == req.request_id:
                        yield out
        finally:
            if not req.finished:
                self.engine.abort(req.request_id)

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """Float32 logits [len, vocab]; row t predicts token t+1, like HF ``model(ids).logits[0]``."""
        return self.engine.score(list(token_ids)).cpu()

    def stats(self) -> dict:
        return self.engine.stats()
