"""LLM: the offline Python API over LLMEngine.

    llm = LLM("smollm2")
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))
    outs[0].text, outs[0].token_ids, outs[0].finish_reason
    outs[0].outputs[0].text                                   # vLLM's shape works too
    llm.generate([{"prompt_token_ids": [1, 2, 3]}], sampling_params=SamplingParams(logprobs=2))
    whisper.generate([{"encoder_features": mel, "prompt_token_ids": [50258, 50259, 50359, 50363]}])
    LLM("whisper-base").transcribe("talk.wav")                # {"text": ...} (qkv/audio/speech_engine.py)
"""

from __future__ import annotations

import numbers
from typing import Iterator

import torch

from qkv.engine.engine import LLMEngine
from qkv.engine.request import RequestOutput, SamplingParams
from qkv.loading import load
from qkv.loading.hf import generation_defaults


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
    def __init__(self, model: str = "smollm2", dtype="auto", device: str | None = None, *,
                 threads: int | None = None, chat_template=None, attention_override: dict | str | None = None,
                 **engine_kwargs):
        """``model``: a named default, a ``.gguf`` file or an HF directory. ``dtype``: "auto" (the
        checkpoint's on CUDA; float32 on the CPU, bfloat16 with int8 weights: engine/dtype.py) or a name. ``chat_template``: a
        Jinja chat template file (or template text) used instead of the model's. ``engine_kwargs``:
        block_size, num_kv_blocks, kv_cache_memory, max_num_batched_tokens, max_num_seqs,
        enable_prefix_caching, max_model_len, kv_dtype, async_scheduling (None: on with CUDA graphs),
        quantization ("auto": on a CPU the weights keep the file's precision class, int4 for a Q4
        GGUF; "none": float; the rule: model/cpu_format.py), aot_decode (CPU: None runs one-sequence
        decode steps through this model's ahead-of-time compiled step when ``qkv compile`` has
        built it, else eagerly; False never: engine/cpu_aoti.py).
        ``attention_override``: e.g. ``{"dilation": 2}`` (qkv/attention_override.py; unknown keys refused)."""
        if threads is not None:  # 0 was skipped unsaid, and a negative count was torch's RuntimeError
            from qkv.engine.engine import check_sizes

            check_sizes(threads=threads)
            torch.set_num_threads(threads)
        check_device(device)  # before the load, which may take minutes
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if attention_override is not None:
            from qkv.attention_override import apply_attention_override, parse_override

            attention_override = parse_override(attention_override, "attention_override")  # before the load
        loaded = load(model)
        if chat_template is not None:
            from qkv.loading.chat_template import read_chat_template

            if loaded.tokenizer is None:
                raise ValueError(f"{loaded.source} has no tokenizer, so a chat template cannot be used")
            loaded = loaded._replace(tokenizer=loaded.tokenizer.with_chat_template(*read_chat_template(chat_template)))
        if attention_override:
            loaded = loaded._replace(config=apply_attention_override(loaded.config, attention_override))
        self.source = loaded.source
        self.tokenizer = loaded.tokenizer
        from qkv.model.cpu_format import resolve as weight_format

        engine_kwargs["quantization"] = weight_format(engine_kwargs.get("quantization", "auto"), loaded.source,
                                                      loaded.config, device, dtype,
                                                      engine_kwargs.get("tensor_parallel_size", 1))
        aot_decode = engine_kwargs.pop("aot_decode", None)
        from qkv.engine.engine import check_flags

        check_flags(aot_decode=aot_decode)
        self.quantization = engine_kwargs["quantization"]
        self.engine = LLMEngine(loaded.config, loaded.weights, loaded.tokenizer, dtype=dtype, device=device,
                                **engine_kwargs)
        if (aot_decode is not False and self.engine.device.type == "cpu" and self.engine.tp is None
                and self.engine.runner.compiled is None):
            from qkv.engine import cpu_aoti

            self.engine.runner.compiled = cpu_aoti.load(self, verbose=engine_kwargs.get("log_stats", True))
        self.config = loaded.config
        # Sampling defaults from generation_config.json (HF directories), in SamplingParams' names.
        self.generation_defaults = generation_defaults(loaded.source)

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams() with the model's generation_config.json defaults, as vLLM's LLM."""
        return SamplingParams(**self.generation_defaults)

    # ---------------------------------------------------------------- inputs
    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.source} has no tokenizer: pass token ids instead of text")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True, *,
                    special_tokens_in_content: bool = False, **template_kwargs) -> list[int]:
        """The prompt ids of a chat, rendered with the model's template (which writes its own BOS).
        Message content is plain text: ``<|im_start|>`` typed by a user is not a control token
        unless ``special_tokens_in_content`` (transformers' behaviour, which lets content forge
        turns). ``template_kwargs`` reach the template as extra variables. ChatTemplateError
        (a ValueError) if the template refuses the messages."""
        if self.tokenizer is None:
            raise ValueError(f"{self.source} has no tokenizer, so no chat template")
        return self.tokenizer.encode_chat(messages, add_generation_prompt,
                                          special_tokens_in_content=special_tokens_in_content, **template_kwargs)

    def _prompt_ids(self, p) -> list[int]:
        """One prompt: text, token ids, or vLLM's {"prompt": text} / {"prompt_token_ids": ids}, either
        dict with an ``"encoder_features"`` tensor for an encoder-decoder model (``generate``)."""
        if isinstance(p, dict):
            if p.get("multi_modal_data") or p.get("mm_processor_kwargs"):
                raise ValueError("multi_modal_data is not supported: pass an encoder-decoder model's input "
                                 "as {'encoder_features': tensor, 'prompt_token_ids': [...]}")
            keys = set(p) - {"encoder_features"}
            if keys == {"prompt"} and isinstance(p["prompt"], str):
                return self.encode(p["prompt"])
            if keys == {"prompt_token_ids"} and isinstance(p["prompt_token_ids"], (list, tuple)):
                return list(p["prompt_token_ids"])
            raise TypeError(f"a prompt dict must be {{'prompt': str}} or {{'prompt_token_ids': [int, ...]}} "
                            f"(optionally with 'encoder_features'), "
                            f"got {{{', '.join(f'{k!r}: {type(v).__name__}' for k, v in p.items())}}}")
        if isinstance(p, str):
            return self.encode(p)
        if isinstance(p, (list, tuple)):
            return list(p)  # the engine checks the ids (integers in the vocabulary)
        raise TypeError(f"a prompt must be a string, a list of token ids, or a dict with 'prompt' or "
                        f"'prompt_token_ids'; got {type(p).__name__}")

    @staticmethod
    def _is_single(prompts) -> bool:
        return isinstance(prompts, (str, dict)) or (isinstance(prompts, (list, tuple)) and bool(prompts)
                                                     and isinstance(prompts[0], numbers.Integral))

    def _params(self, params, sampling_params, count: int) -> list[SamplingParams]:
        if params is not None and sampling_params is not None:
            raise TypeError("pass either params or sampling_params, not both")
        params = params if params is not None else sampling_params
        if params is None:
            params = self.get_default_sampling_params()
        if isinstance(params, SamplingParams):
            return [params] * count
        if isinstance(params, (list, tuple)) and all(isinstance(x, SamplingParams) for x in params):
            if len(params) != count:
                raise ValueError(f"{len(params)} SamplingParams for {count} prompts: give one, or one per prompt")
            return list(params)
        raise TypeError(f"sampling_params must be a SamplingParams or a list of them, got {type(params).__name__}")

    # ---------------------------------------------------------------- generation
    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool | None = None, cache_salt: str | None = None, *,
                 sampling_params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run prompts batched through the scheduler. A prompt is a string, a list of token ids,
        or vLLM's ``{"prompt": str}`` / ``{"prompt_token_ids": [...]}``; for an encoder-decoder model
        (Whisper) the dict also carries ``"encoder_features"``: a float tensor of log-mel
        [num_mel_bins, 2 * max_source_positions] (Whisper base: [80, 3000]), and its prompt ids are
        the decoder's (start, language, task, timestamp tokens). Requests with different audio
        batch together; the prefix cache keys their decoder blocks by the features' hash. ``prompts`` is one
        prompt or a list of them. ``params`` (or vLLM's ``sampling_params=``): one
        SamplingParams for all, or one per prompt; None: the model's defaults
        (``get_default_sampling_params``). Returns one output per prompt, in order; with
        ``n > 1`` each has ``samples`` (and ``outputs``, vLLM's view)."""
        if self._is_single(prompts):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a prompt or a list of prompts, got {type(prompts).__name__}")
        ids = [self._prompt_ids(p) for p in prompts]
        feats = [p.get("encoder_features") if isinstance(p, dict) else None for p in prompts]
        outs = self._run(ids, self._params(params, sampling_params, len(ids)), use_tqdm, cache_salt, feats)
        for p, out in zip(prompts, outs):
            text = p if isinstance(p, str) else p.get("prompt") if isinstance(p, dict) else None
            for o in [out] + out.samples:
                o.prompt = text
        return outs

    def chat(self, conversations, params: SamplingParams | None = None, use_tqdm: bool | None = None, *,
             sampling_params: SamplingParams | None = None, chat_template_kwargs: dict | None = None):
        """One conversation (a list of {"role", "content"}) -> one output; a list of them -> a list."""
        single = bool(conversations) and isinstance(conversations[0], dict)
        convs = [conversations] if single else conversations
        ids = [self.chat_prompt(c, **(chat_template_kwargs or {})) for c in convs]
        outs = self._run(ids, self._params(params, sampling_params, len(ids)), use_tqdm, None)
        return outs[0] if single else outs

    def _run(self, prompt_ids: list[list[int]], params: list[SamplingParams], use_tqdm,
             cache_salt, features: list | None = None) -> list[RequestOutput]:
        heads = []
        features = features or [None] * len(prompt_ids)
        try:
            for ids, p, f in zip(prompt_ids, params, features):
                heads.append(self.engine.add_request(ids, p, cache_salt=cache_salt, encoder_features=f))
        except BaseException:  # nothing of a refused batch runs
            for reqs in heads:
                self.engine.abort(reqs[0].request_id)
            raise
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
        params = params or self.get_default_sampling_params()
        if params.n != 1:
            raise ValueError("stream() takes n=1")
        feats = prompt.get("encoder_features") if isinstance(prompt, dict) else None
        (req,) = self.engine.add_request(self._prompt_ids(prompt), params, encoder_features=feats)
        try:
            while not req.finished:
                for out in self.engine.step():
                    if out.request_id == req.request_id:
                        yield out
        finally:
            if not req.finished:
                self.engine.abort(req.request_id)

    def transcribe(self, audio, language: str | None = None, task: str = "transcribe",
                   response_format: str = "json", timestamps: bool = False, sample_rate: int | None = None):
        """Speech to text with a Whisper model: ``audio`` is a file path, a file's bytes or samples
        (16 kHz unless ``sample_rate`` says otherwise: resampled to Whisper's 16 kHz; with a file,
        refused: the file says its rate); 30-s windows run as one batch of greedy requests.
        Returns OpenAI's shapes (``text`` -> str; ``json`` -> {"text"}; ``verbose_json`` with segments). AudioError
        (a ValueError) names a bad argument or file; a model that is not Whisper is a ValueError.
        ``timestamps=True`` is refused: it needs Whisper's timestamp rules, not applied yet."""
        from qkv.audio.speech_engine import check_timestamps, speech_model
        from qkv.audio.transcribe import transcribe

        check_timestamps(timestamps)
        return transcribe(speech_model(self), audio, language, task, response_format, timestamps=timestamps,
                          sample_rate=sample_rate)

    def logits(self, token_ids: list[int] | torch.Tensor) -> torch.Tensor:
        """Float32 logits [len, vocab]; row t predicts token t+1, like HF ``model(ids).logits[0]``
        (``token_ids`` a list or a 1-D integer tensor)."""
        return self.engine.score(token_ids).cpu()

    def stats(self) -> dict:
        return self.engine.stats()
