"""The engine API: `LLM(model, ...)`, `load_adapter`, `generate`, `stream` (DESIGN.md section 3)."""
from __future__ import annotations

import gc
import json
import numbers
from collections.abc import Iterator, Sequence as Seq
from pathlib import Path

import torch

from lorax_core.adapters import AdapterInfo, AdapterPool, AdapterRegistry, PoolConfig
from lorax_core.engine.block_manager import BlockManager
from lorax_core.engine.config import EngineConfig
from lorax_core.engine.detokenizer import append_text, text_decoder
from lorax_core.engine.model_runner import ModelRunner
from lorax_core.engine.outputs import RequestError, RequestMetrics, RequestOutput, StreamDelta
from lorax_core.engine.sampler import Sampled, launch
from lorax_core.engine.sampling import SamplingParams
from lorax_core.engine.scheduler import Scheduler
from lorax_core.engine.sequence import Sequence
from lorax_core.model.config import as_token_ids
from lorax_core.model.loader import load_model, read_config, resolve_model_dir

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
Prompt = str | list[int]


class LLM:
    """One base model with many LoRA adapters; every batch may mix them.

    model: a Hugging Face model directory or hub id; dtype: "auto" (bfloat16 on CUDA, float32 on CPU) or a
    float dtype; quantize: None or "nf4"; device: "cuda" or "cpu" (default: cuda when available);
    engine_options: fields of EngineConfig.
    """

    def __init__(self, model: str | Path, dtype: str | torch.dtype = "auto", quantize: str | None = None,
                 device: str | torch.device | None = None, **engine_options):
        self.config = config = EngineConfig(**engine_options)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = _resolve_dtype(dtype, self.device)
        self.model_dir = model_dir = resolve_model_dir(model)
        mc = read_config(model_dir)
        max_positions = min(mc.max_position_embeddings, config.max_model_len or mc.max_position_embeddings)
        self.model = load_model(model_dir, mc, self.dtype, self.device, quantize, max_positions)
        self.tokenizer = _load_tokenizer(model_dir)
        self._decode = text_decoder(self.tokenizer) if self.tokenizer is not None else None
        self.eos_token_ids = _eos_ids(mc.eos_token_ids, model_dir, self.tokenizer)

        modules = mc.lora_modules()
        pool_bytes = config.adapter_pool_bytes or (2**30 if self.device.type == "cuda" else 2**27)
        page = config.adapter_page_size or min(1024, 1 << (mc.hidden_size - 1).bit_length())
        self.pool = AdapterPool(PoolConfig(mc.num_layers, modules, pool_bytes, self.dtype, self.device, page,
                                           config.max_active_adapters, config.max_lora_rank))
        host_bytes = config.host_adapter_cache_bytes or (2**31 if self.device.type == "cuda" else 2**29)
        self.registry = AdapterRegistry(self.pool, modules, mc.num_layers, config.max_lora_rank, host_bytes,
                                        config.adapter_loader_threads)

        block_bytes = mc.kv_bytes_per_token(self.dtype) * config.kv_block_size
        num_blocks = self._kv_cache_bytes() // block_bytes
        self.max_model_len = min(max_positions, num_blocks * config.kv_block_size)
        if num_blocks < 1 or self.max_model_len < 2:
            raise ValueError(f"the KV cache has room for {num_blocks} blocks of {config.kv_block_size} tokens; raise "
                             "kv_cache_bytes or gpu_memory_utilization")
        graph_batch = config.max_num_seqs if config.cuda_graphs else 0
        self.runner = ModelRunner(self.model, self.pool, num_blocks, config.kv_block_size, graph_batch,
                                  self.max_model_len, config.max_num_seqs)
        self.blocks = BlockManager(num_blocks, config.kv_block_size)
        self.scheduler = Scheduler(config.max_num_seqs, max(config.max_num_batched_tokens, config.max_num_seqs),
                                   config.max_active_adapters, config.adapter_time_slice_s, self.blocks, self.registry,
                                   max_model_len=self.max_model_len)
        torch.manual_seed(config.seed)  # unseeded requests draw from the global generator
        async_scheduling = config.async_scheduling
        self.async_scheduling = self.device.type == "cuda" if async_scheduling is None else async_scheduling
        self._in_flight: Sampled | None = None  # the launched step whose tokens the host does not have yet

    # --- adapters --------------------------------------------------------------------------------------------
    def load_adapter(self, name: str, source: str | Path, directory: Path | None = None) -> AdapterInfo:
        """Register a PEFT LoRA adapter from a directory or hub id, validated now (config and safetensors header)
        against this base model; requests name it in `adapters`. Its weights are read when a request needs
        them (in the background), and kept in host memory and the device pool while there is room. `directory`:
        where `source` already resolved to (a server fetches hub ids off the engine's thread)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
        self._refuse_if_in_use(name, "replace")
        directory = directory or resolve_model_dir(source, f"adapter {name!r}")
        return self.registry.register(name, str(source), directory)

    def unload_adapter(self, name: str) -> None:
        """Forget an adapter (device pool, host memory and registry); refused while requests use it."""
        self.registry.stats(name)  # ValueError if unknown
        self._refuse_if_in_use(name, "unload")
        self.registry.unregister(name)

    def list_adapters(self) -> list[AdapterInfo]:
        """Every registered adapter: where it is (disk / loading / host / device), its rank and its counters."""
        return [self.registry.info(name) for name in self.registry.names]

    def _refuse_if_in_use(self, name: str, verb: str) -> None:
        if self.scheduler.demand[name]:
            raise ValueError(f"adapter {name!r} has {self.scheduler.demand[name]} unfinished request(s); wait for "
                             f"them or abort them before you {verb} it")

    # --- requests --------------------------------------------------------------------------------------------
    def add_request(self, prompt: Prompt, params: SamplingParams | None = None, adapter: str | None = None) -> Sequence:
        """Queue one request (a ValueError says why it is refused; nothing else is affected)."""
        params = params or SamplingParams()
        stats = self.registry.stats(adapter) if adapter is not None else None  # ValueError if unknown
        ids = self.tokenize(prompt)
        vocab = self.model.config.vocab_size
        outside = [t for t in (params.logit_bias or {}) if t >= vocab]
        if outside:
            raise ValueError(f"logit_bias names token ids {outside[:5]} outside the vocabulary (0..{vocab - 1})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; this engine's context is {self.max_model_len} tokens "
                             "(max_model_len) and at least one must be generated: shorten the prompt")
        seq = Sequence(ids, params, adapter)
        self.scheduler.add(seq)
        if stats is not None:
            stats.requests += 1
            stats.prompt_tokens += len(ids)
        return seq

    def tokenize(self, prompt: Prompt) -> list[int]:
        """A prompt as token ids (text through the model's tokenizer), checked: a ValueError says what is wrong."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer in the model directory; pass token ids instead")
            ids = self.tokenizer(prompt)["input_ids"] if prompt else []
        elif _is_token_list(prompt := _listed(prompt)) or (isinstance(prompt, (list, tuple)) and not prompt):
            ids = [int(t) for t in prompt]
            vocab = self.model.config.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})")
        else:
            raise ValueError(f"a prompt is a string or a list of token ids (integers), got {prompt!r:.80}")
        if not ids:
            raise ValueError("the prompt is empty; give at least one token")
        return ids

    def abort(self, seq: Sequence) -> None:
        """Cancel a request, waiting or running; it finishes with finish_reason "abort"."""
        self.scheduler.finish(seq, "abort")

    def step(self) -> list[Sequence]:
        """One engine step (decodes and prompt chunks together); returns the sequences that got a new token.

        With async scheduling (on a GPU by default) a step's tokens reach the host during the next call: each call
        launches a step, whose inputs for the newest tokens come from the previous step's tokens on the device, and
        then takes that previous step's tokens, so the host's work overlaps the device's. A sequence that stops
        meanwhile gets one more row computed and dropped. With nothing to run but adapters on their way in, it waits
        for them first."""
        previous = self._in_flight
        seqs = self.scheduler.schedule()
        if not seqs and previous is None and self.registry.wait_for_loads(self.scheduler.active):
            seqs = self.scheduler.schedule()
        if not seqs:
            if previous is not None:
                return self._take(previous)
            if not self.scheduler.running and self.scheduler.waiting and not self.registry.loading:
                raise RuntimeError(f"engine stalled: {len(self.scheduler.waiting)} waiting requests cannot be "
                                   "scheduled with nothing running (KV blocks or adapter slots); this is a bug")
            return []
        for name in {s.adapter for s in seqs if s.adapter is not None}:
            self.pool.wait(name)  # the compute stream waits for these adapters' copies (only these)
        logits = self.runner.run(seqs, previous.tokens if previous is not None else None)
        sampled = [s for s in seqs if s.samples]  # the others computed a prompt chunk that is not the last
        for seq in seqs:
            seq.num_computed_tokens += seq.chunk
            seq.chunk = 0
        got = []
        if previous is not None and any(s.num_pending and _penalized(s) for s in sampled):
            got, previous = self._take(previous), None  # the penalties count the tokens on the host
        current = launch(logits, sampled)
        for row, seq in enumerate(sampled):
            seq.num_pending += 1
            seq.pending_row = row
        self._in_flight = current
        if previous is not None:
            got = self._take(previous)
        if not self.async_scheduling:  # (a step may be in flight still if the flag was just turned off)
            got += [seq for seq in self._take(current) if seq not in got]
        return got

    def _take(self, step: Sampled) -> list[Sequence]:
        """Wait for a launched step's tokens and give them to their sequences (those that ended meanwhile drop
        theirs); returns the sequences that got one."""
        if self._in_flight is step:
            self._in_flight = None
        tokens, records = step.resolve()
        now = self.scheduler.clock()
        got = []
        for seq, token, record in zip(step.seqs, tokens, records):
            seq.num_pending -= 1
            if seq.finished:  # stopped or aborted while this token was on the device
                continue
            seq.append(token)
            if record is not None:
                seq.logprobs.append(record)
            if seq.first_token_time is None:
                seq.first_token_time = now
            if seq.adapter is not None:
                self.registry.stats(seq.adapter).generated_tokens += 1
            self._update(seq, token)
            got.append(seq)
        return got

    def generate(self, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None,
                 adapters: str | None | Seq[str | None] = None) -> list[RequestOutput]:
        """Complete every prompt (text or token ids), each with its adapter (None: the base model).

        Raises RequestError (a ValueError) after the others complete if some requests were refused; its
        `.outputs` holds all of them. A request whose adapter fails to load at run time (its file broke after
        load_adapter) ends with finish_reason "error" and the message in `.error`; the others are unaffected."""
        prompts = _listed(prompts)  # a numpy array or tensor: one prompt (1-D) or one per row (2-D)
        prompts = [prompts] if isinstance(prompts, str) or _is_token_list(prompts) else list(prompts)
        n = len(prompts)
        params_list = list(params) if isinstance(params, Seq) else [params] * n
        adapter_list = list(adapters) if isinstance(adapters, (list, tuple)) else [adapters] * n
        if len(params_list) != n or len(adapter_list) != n:
            raise ValueError(f"{n} prompts need {n} sampling params and {n} adapters (or one for all), got "
                             f"{len(params_list)} and {len(adapter_list)}")
        seqs, errors = [], {}
        for i, (prompt, p, a) in enumerate(zip(prompts, params_list, adapter_list)):
            try:
                seqs.append(self.add_request(prompt, p, a))
            except ValueError as err:
                errors[i] = str(err)
                seqs.append(None)
        try:
            while any(s is not None and not s.finished for s in seqs):
                self.step()
        except BaseException:  # a failed step (or Ctrl-C): end this call's requests so the engine stays usable
            for s in seqs:
                if s is not None and not s.finished:
                    self.abort(s)
            raise
        outputs = [self._output(s) if s is not None else
                   RequestOutput(-1, [], [], "", "error", adapter_list[i], error=errors[i]) for i, s in enumerate(seqs)]
        if errors:
            lines = "; ".join(f"request {i}: {e}" for i, e in errors.items())
            raise RequestError(f"{len(errors)} of {n} requests refused ({lines}); the others completed, see "
                               ".outputs", outputs)
        return outputs

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, adapter: str | None = None
               ) -> Iterator[StreamDelta]:
        """Yield the request's new text and tokens as they are generated (other queued requests advance too)."""
        seq = self.add_request(prompt, params, adapter)
        cursor = [0, 0]
        try:
            while True:
                if seq in self.step() or seq.finished:
                    delta = self.next_delta(seq, cursor)
                    if delta is not None:
                        yield delta
                if seq.finished:
                    return
        finally:
            self.abort(seq)  # a consumer that stops early cancels the request

    def next_delta(self, seq: Sequence, cursor: list[int]) -> StreamDelta | None:
        """The request's output since `cursor` ([tokens, characters] already sent; advanced here), or None when it
        has nothing new and has not finished. The last delta carries finish_reason and the request's metrics."""
        ids = seq.token_ids[seq.prompt_len + cursor[0]:]  # only what is new: no copy of the whole completion
        if not ids and not seq.finished:
            return None
        shown = self._visible_len(seq)
        logprobs = seq.logprobs[cursor[0]:] if seq.params.logprobs is not None else None
        metrics = self._metrics(seq) if seq.finished else None
        delta = StreamDelta(seq.id, seq.text[cursor[1]:shown], ids, seq.finish_reason, logprobs, seq.error, metrics)
        cursor[:] = cursor[0] + len(ids), max(shown, cursor[1])
        return delta

    def close(self) -> None:
        """Stop the adapter loader threads (also on leaving a `with LLM(...) as llm:` block)."""
        self.registry.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- internals -------------------------------------------------------------------------------------------
    def _update(self, seq: Sequence, token: int) -> None:
        p, decode = seq.params, self._decode
        cut = -1
        if decode is not None:
            unchanged = append_text(decode, seq)  # seq.text[:unchanged] was searched at earlier steps
            cut = _find_stop(seq.text, p.stop, max(0, unchanged - max(map(len, p.stop), default=0) + 1))
        if cut >= 0 or token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            reason = "stop"
        elif seq.num_completion_tokens >= p.max_tokens or len(seq.token_ids) >= self.max_model_len:
            reason = "length"
        else:
            return
        if decode is not None:  # the final text is the tokens' decode, which differs from the text grown token
            # by token only where bytes of invalid UTF-8 turned earlier bytes into U+FFFD (byte-fallback tokenizers)
            seq.text = decode(seq.completion_ids)
            cut = _find_stop(seq.text, p.stop, 0) if cut >= 0 else -1
            seq.text = seq.text[:cut] if cut >= 0 else seq.text
        self.scheduler.finish(seq, reason)

    @staticmethod
    def _visible_len(seq: Sequence) -> int:
        """How much of the text is safe to stream: a possible stop-string prefix and a partial UTF-8 character are
        held back."""
        text = seq.text
        if seq.finished:
            return len(text)
        n = len(text) - max((len(s) - 1 for s in seq.params.stop), default=0)
        while n > 0 and text[n - 1] == "\ufffd":
            n -= 1
        return max(n, 0)

    def _output(self, seq: Sequence) -> RequestOutput:
        logprobs = seq.logprobs if seq.params.logprobs is not None else None
        return RequestOutput(seq.id, seq.token_ids[: seq.prompt_len], seq.completion_ids, seq.text, seq.finish_reason,
                             seq.adapter, logprobs, seq.error, self._metrics(seq))

    @staticmethod
    def _metrics(seq: Sequence) -> RequestMetrics:
        return RequestMetrics(seq.arrival_time, seq.first_scheduled_time, seq.first_token_time, seq.finished_time,
                              seq.prompt_len, seq.num_completion_tokens)

    def _kv_cache_bytes(self) -> int:
        c = self.config
        if c.kv_cache_bytes:
            return c.kv_cache_bytes
        if self.device.type != "cuda":
            return 2**29
        # An engine dropped earlier in this process gives its KV cache back to torch's allocator, which keeps it
        # cached; hand the wholly unused segments back to the driver so that free memory says what one allocation
        # can get (cached memory in partly used segments is fragmented: counting it failed a 50 GB allocation).
        gc.collect()
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        mc = self.model.config
        width = 3 * mc.intermediate_size + 4 * mc.hidden_size + mc.q_size + 2 * mc.kv_size
        activations = max(c.max_num_batched_tokens, 2048) * width * 4 + 2**28  # prefill peak, with margin
        budget = int(total * c.gpu_memory_utilization) - (total - free) - activations
        if budget < 2**20:
            gib, allowed = 2**30, total * c.gpu_memory_utilization
            raise ValueError(f"no GPU memory is left for the KV cache: {(total - free) / gib:.1f} of "
                             f"{total / gib:.1f} GiB are in use (weights, adapter pool, other engines or processes) "
                             f"and gpu_memory_utilization={c.gpu_memory_utilization} allows {allowed / gib:.1f} GiB; "
                             "pass kv_cache_bytes, raise gpu_memory_utilization, or close the other engine")
        return budget


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {', '.join(_DTYPES)}, got {dtype!r}")
        return _DTYPES[dtype]
    if dtype not in _DTYPES.values():
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    return dtype


def _penalized(seq: Sequence) -> bool:
    """The sampler reads this sequence's tokens on the host (repetition, presence or frequency penalty)."""
    return seq.seen_ids is not None or seq.output_counts is not None


def _find_stop(text: str, stops: list[str], start: int) -> int:
    """Where the first stop string in text[start:] begins, or -1."""
    return min((i for i in (text.find(s, start) for s in stops) if i >= 0), default=-1)


def _is_token_list(x) -> bool:
    """A non-empty list of integers (numpy's too; not bools)."""
    return (isinstance(x, (list, tuple)) and len(x) > 0
            and all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in x))


def _listed(x):
    """A numpy array or torch tensor as (nested) lists; anything else as it is."""
    return x.tolist() if hasattr(x, "tolist") and not isinstance(x, (str, list, tuple)) else x


def _load_tokenizer(model_dir: Path):
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _eos_ids(config_eos: tuple[int, ...], model_dir: Path, tokenizer) -> set[int]:
    ids = set(config_eos)
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        ids.update(as_token_ids(json.loads(gen.read_text()).get("eos_token_id")))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
