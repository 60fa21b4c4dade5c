"""The OpenAI-compatible HTTP server: `create_app(engine, model_name)` is a FastAPI app over an AsyncLLM.

Adapters are models: `model` names a registered adapter, or the base model's own name for no adapter. Endpoints:
/v1/completions and /v1/chat/completions (streamed with server-sent events when `stream` is true), /v1/models,
/v1/adapters, /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's names), /health and /metrics (Prometheus),
and at / the LoRA Land page (static files in server/static, with /ui/adapters: each adapter's state and scores).
Errors are answered with OpenAI's error body; nothing a request does stops the others.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from lorax_core.engine.async_llm import AsyncLLM
from lorax_core.engine.outputs import StreamDelta
from lorax_core.engine.sampling import SamplingParams
from lorax_core.engine.sequence import TokenLogprob
from lorax_core.model.loader import resolve_model_dir
from lorax_core.server.metrics import ModelStats, render_metrics
from lorax_core.server.protocol import (APIError, ChatRequest, CompletionRequest, LoadAdapterRequest, SamplingRequest,
                                        UnloadAdapterRequest)


class Server:
    """The state behind the routes: the engine, the served names, the API key and per-model counters."""

    def __init__(self, engine: AsyncLLM, model_name: str, api_key: str | None = None):
        self.engine, self.llm, self.model_name, self.api_key = engine, engine.llm, model_name, api_key
        self.stats: dict[str, ModelStats] = collections.defaultdict(ModelStats)
        self.started = int(time.time())

    # --- checks ------------------------------------------------------------------------------------------------
    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send the header `Authorization: Bearer <key>` with the "
                                "key this server was started with (--api-key)", code="invalid_api_key")

    async def has_adapter(self, name: str) -> bool:
        return await self.engine.call(lambda: name in self.llm.registry.names)

    async def adapter_for(self, model: str) -> str | None:
        """The adapter a request's `model` names (None: the base model); 404 if it names nothing served."""
        if model == self.model_name:
            return None
        if await self.has_adapter(model):
            return model
        raise APIError(404, f"the model `{model}` does not exist: use the base model `{self.model_name}` or a loaded "
                            "adapter (GET /v1/models lists them; POST /v1/load_lora_adapter loads one)",
                       code="model_not_found", param="model")

    def sampling(self, body: SamplingRequest, max_tokens: int | None, logprobs: int | None, prompt_len: int,
                 choice: int = 0) -> SamplingParams:
        """The engine's parameters for one choice; with a seed, choice j samples with seed + j (n distinct, each
        reproducible)."""
        unsupported = body.unsupported()
        if unsupported:
            raise APIError(400, f"{unsupported} is not supported by this server (no guided decoding, tool calls, "
                                "echo, suffix or best_of); send the request without it", param=unsupported)
        if max_tokens is None:  # as much as the context leaves
            max_tokens = max(1, self.llm.max_model_len - prompt_len)
        bias = body.logit_bias or {}
        if not all(key.isascii() and key.isdigit() for key in bias):
            raise APIError(400, f"logit_bias keys must be token ids, got {sorted(bias)[:5]}", param="logit_bias")
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                  top_k=body.top_k, min_p=body.min_p, repetition_penalty=body.repetition_penalty,
                                  presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                                  logit_bias={int(key): value for key, value in bias.items()} or None,
                                  seed=None if body.seed is None else body.seed + choice, stop=body.stop,
                                  ignore_eos=body.ignore_eos, logprobs=logprobs)
        except ValueError as err:
            raise APIError(400, str(err)) from None

    def tokenize(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        if isinstance(prompt, str) and not add_special_tokens and self.llm.tokenizer is not None:
            prompt = self.llm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        try:
            return self.llm.tokenize(prompt)
        except ValueError as err:
            raise APIError(400, str(err), param="prompt") from None

    def chat_prompt(self, body: ChatRequest) -> list[int]:
        tokenizer = self.llm.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise APIError(400, f"the model `{self.model_name}` has no chat template in its tokenizer: use "
                                "/v1/completions, or serve a model whose tokenizer_config.json has a chat_template",
                           param="messages")
        try:
            text = tokenizer.apply_chat_template([m.as_template_input() for m in body.messages], tokenize=False,
                                                 add_generation_prompt=True)
        except Exception as err:  # noqa: BLE001 - a template that rejects these messages (roles, order)
            raise APIError(400, f"the chat template rejected the messages: {err}", param="messages") from None
        return self.tokenize(text, add_special_tokens=False)  # the template writes the special tokens itself

    # --- running requests ------------------------------------------------------------------------------------
    async def start_choices(self, body: SamplingRequest, prompts: list[list[int]], max_tokens: int | None,
                            logprobs: int | None, adapter: str | None) -> _Choices:
        """Queue n requests per prompt (choice i * n + j: prompt i, sample j) together; if one is refused, the
        others are aborted and the refusal answers the whole call."""
        if body.n < 1 or len(prompts) * body.n > MAX_CHOICES:
            raise APIError(400, f"n = {body.n} for {len(prompts)} prompt(s): n must be >= 1 and at most {MAX_CHOICES} "
                                "choices in all; send several requests instead", param="n")
        params = [self.sampling(body, max_tokens, logprobs, len(ids), j) for ids in prompts for j in range(body.n)]
        ids = [ids for ids in prompts for _ in range(body.n)]
        starts = [asyncio.ensure_future(self.start(i, p, adapter, body.model)) for i, p in zip(ids, params)]
        try:
            results = await asyncio.gather(*starts, return_exceptions=True)
        except asyncio.CancelledError:  # the client went away while some requests still waited for their turn
            results = await asyncio.gather(*starts, return_exceptions=True)  # the waiting ones are cancelled too
            await _Choices([r for r in results if not isinstance(r, BaseException)]).close()
            raise
        started = _Choices([r for r in results if not isinstance(r, BaseException)])
        refused = next((r for r in results if isinstance(r, BaseException)), None)
        if refused is not None:
            await started.close()
            raise refused
        return started

    async def start(self, ids: list[int], params: SamplingParams, adapter: str | None, model: str
                    ) -> tuple[StreamDelta, AsyncIterator[StreamDelta]]:
        """Queue the request; its first delta and the rest. A refused request (prompt too long, ...) is a 400."""
        deltas = self._deltas(ids, params, adapter, model)
        try:
            first = await deltas.__anext__()
        except ValueError as err:
            raise APIError(400, str(err)) from None
        return first, deltas

    async def _deltas(self, ids, params, adapter, model) -> AsyncIterator[StreamDelta]:
        stats, accepted, finished, refused = self.stats[model], False, False, False
        stream = self.engine.stream(ids, params, adapter)
        try:
            async for delta in stream:
                if not accepted:
                    accepted = True
                    stats.accepted(len(ids))
                stats.delta(delta)
                finished = delta.finish_reason is not None
                yield delta
        except ValueError:
            stats.refused, refused = stats.refused + 1, True
            raise
        finally:
            await stream.aclose()  # aborts the request if it has not finished (a client that went away)
            if not finished and not refused:  # aborted while it ran, or while it waited for its turn
                stats.requests["abort"] += 1


MAX_CHOICES = 64  # choices (prompts x n) in one call


class _Choices:
    """The requests behind one response, choice i being request i (first delta, rest), started together."""

    def __init__(self, started: list[tuple[StreamDelta, AsyncIterator[StreamDelta]]]):
        self.started = started

    def __len__(self) -> int:
        return len(self.started)

    async def collect(self) -> list[StreamDelta]:
        """Each choice's whole output (StreamDelta.join of its deltas), once all have finished."""
        return list(await asyncio.gather(*(_collect(first, rest) for first, rest in self.started)))

    async def merged(self) -> AsyncIterator[tuple[int, StreamDelta]]:
        """(choice, delta) in the order the deltas come, until every choice has finished."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, delta: StreamDelta, rest: AsyncIterator[StreamDelta]) -> None:
            try:
                while True:
                    queue.put_nowait((i, delta))
                    if delta.finish_reason is not None:
                        return
                    delta = await rest.__anext__()
            except Exception as err:  # noqa: BLE001 - handed to the reader
                queue.put_nowait((i, err))

        pumps = [asyncio.create_task(pump(i, first, rest)) for i, (first, rest) in enumerate(self.started)]
        try:
            running = len(pumps)
            while running:
                i, item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                running -= item.finish_reason is not None
                yield i, item
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    async def close(self) -> None:
        """Close every request's delta stream (aborting those not finished)."""
        for _, rest in self.started:
            await rest.aclose()


async def _collect(first: StreamDelta, rest: AsyncIterator[StreamDelta]) -> StreamDelta:
    deltas = [first]
    while deltas[-1].finish_reason is None:
        deltas.append(await rest.__anext__())
    await rest.aclose()
    return StreamDelta.join(deltas)


async def _unless_disconnected(request: Request, work):
    """Await `work`, but cancel it (so its request is aborted) when the client goes away first; None then."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.1)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return None


def _failed(delta: StreamDelta) -> APIError:
    return APIError(500, f"the request failed while it ran: {delta.error}", type="server_error")


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


STATIC = Path(__file__).with_name("static")


def create_app(engine: AsyncLLM, model_name: str, api_key: str | None = None, scores: dict[str, dict] | None = None
               ) -> FastAPI:
    """The FastAPI app serving `engine`'s base model as `model_name` and each adapter under its own name; `scores`
    (adapter name -> task, base_score, adapter_score, examples: see server.scores) feed the LoRA Land page."""
    server = Server(engine, model_name, api_key)
    scores = scores or {}
    app = FastAPI(title="lorax-core", description="OpenAI-compatible multi-LoRA server")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.state.server = server
    auth = [Depends(server.check_key)]
    token_text = (lambda t: server.llm.tokenizer.decode([t])) if server.llm.tokenizer is not None else str

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, err: RequestValidationError):
        problems = []
        for e in err.errors():
            if e.get("type") == "json_invalid":
                problems.append(f"the request body is not valid JSON ({e.get('ctx', {}).get('error', e['msg'])})")
            else:
                where = ".".join(str(x) for x in e["loc"] if x != "body") or "body"
                problems.append(f"{where}: {e['msg']}")
        first = next((e for e in err.errors() if e.get("type") != "json_invalid"), None)
        param = ".".join(str(x) for x in first["loc"] if x != "body") if first else None
        return JSONResponse(APIError(400, "; ".join(problems), param=param or None).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        kind = "not_found" if err.status_code == 404 else None
        message = f"{request.method} {request.url.path}: {err.detail}"
        return JSONResponse(APIError(err.status_code, message, code=kind).body(), status_code=err.status_code)

    # --- the LoRA Land page -------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/ui/adapters", dependencies=auth)
    async def page_adapters():
        infos = await engine.call(server.llm.list_adapters)
        rows = []
        for a in infos:
            s = scores.get(a.name, {})
            rows.append({"name": a.name, "task": s.get("task"), "rank": a.rank, "state": a.tier.value,
                         "adapter_score": s.get("adapter_score"), "base_score": s.get("base_score"),
                         "examples": s.get("examples", []), "error": a.error})
        return {"base": model_name, "max_model_len": server.llm.max_model_len, "adapters": rows}

    # --- health, models, adapters, metrics ---------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=auth)
    async def models():
        adapters = await engine.call(server.llm.list_adapters)
        base = {"id": model_name, "object": "model", "created": server.started, "owned_by": "lorax-core",
                "root": str(server.llm.model_dir), "parent": None, "max_model_len": server.llm.max_model_len}
        return {"object": "list", "data": [base] + [
            {"id": a.name, "object": "model", "created": server.started, "owned_by": "lorax-core", "root": a.source,
             "parent": model_name} for a in adapters]}

    @app.get("/v1/adapters", dependencies=auth)
    async def adapters():
        infos = await engine.call(server.llm.list_adapters)
        return {"object": "list", "data": [
            {"name": a.name, "source": a.source, "rank": a.rank, "target_modules": list(a.target_modules),
             "state": a.tier.value, "host_bytes": a.host_bytes, "error": a.error, "stats": dataclasses.asdict(a.stats)}
            for a in infos]}

    @app.post("/v1/load_lora_adapter", dependencies=auth)
    async def load_adapter(body: LoadAdapterRequest):
        if body.lora_name == model_name:
            raise APIError(400, f"`{model_name}` is the base model's name; give the adapter another name",
                           param="lora_name")
        try:  # a hub id is fetched here, off the engine's thread: a slow download does not stall generation
            directory = await asyncio.to_thread(resolve_model_dir, body.lora_path, f"adapter {body.lora_name!r}")
            info = await engine.call(server.llm.load_adapter, body.lora_name, body.lora_path, directory)
        except (ValueError, OSError) as err:
            raise APIError(400, f"adapter `{body.lora_name}` was not loaded: {err}", param="lora_path") from None
        except Exception as err:  # noqa: BLE001 - a bug: still an OpenAI error body, the connection stays usable
            raise APIError(500, f"adapter `{body.lora_name}` was not loaded: {type(err).__name__}: {err}",
                           type="internal_error") from None
        server.stats[body.lora_name].loads += 1
        return {"status": "ok", "name": info.name, "rank": info.rank, "target_modules": list(info.target_modules)}

    @app.post("/v1/unload_lora_adapter", dependencies=auth)
    async def unload_adapter(body: UnloadAdapterRequest):
        if not await server.has_adapter(body.lora_name):
            raise APIError(404, f"no adapter `{body.lora_name}` is loaded", code="model_not_found",
                           param="lora_name")
        try:
            await engine.call(server.llm.unload_adapter, body.lora_name)
        except ValueError as err:
            raise APIError(409, str(err), param="lora_name") from None
        return {"status": "ok", "name": body.lora_name}

    @app.get("/metrics", dependencies=auth)
    async def metrics():
        def snapshot():
            s = server.llm.scheduler
            return server.llm.list_adapters(), len(s.running), len(s.waiting)

        adapters, running, waiting = await engine.call(snapshot)
        body, content_type = render_metrics(server.stats, adapters, running, waiting)
        return Response(body, media_type=content_type)

    # --- completions and chat completions -------------------------------------------------------------------
    async def respond(request: Request, body: SamplingRequest, started: _Choices, prompt_tokens: int, prefix: str,
                      whole: str, part: str, whole_choice, part_choice, opening=None):
        """One response over several requests (choice i is request i): a JSON body once all have finished, or
        SSE chunks as they come. whole_choice(i, collected) and part_choice(i, delta) format one choice; opening(i)
        is a first chunk per choice (the chat's role)."""
        rid, created = f"{prefix}-{uuid.uuid4().hex}", int(time.time())

        def envelope(obj: str, choices: list, **extra) -> dict:
            return {"id": rid, "object": obj, "created": created, "model": body.model, "choices": choices, **extra}

        def usage(completion_tokens: int) -> dict:
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens}

        if not body.stream:
            outs = await _unless_disconnected(request, started.collect())
            if outs is None:
                return Response(status_code=499)  # nobody is listening (nginx's "client closed request")
            failed = next((o for o in outs if o.finish_reason == "error"), None)
            if failed is not None:
                raise _failed(failed)
            return envelope(whole, [whole_choice(i, o) for i, o in enumerate(outs)],
                            usage=usage(sum(o.metrics.completion_tokens for o in outs)))

        async def events():
            if opening is not None:
                for i in range(len(started)):
                    yield _sse(envelope(part, [opening(i)]))
            completion_tokens = 0
            async for i, delta in started.merged():
                if delta.finish_reason == "error":
                    yield _sse(_failed(delta).body())
                    break
                yield _sse(envelope(part, [part_choice(i, delta)]))
                if delta.finish_reason is not None:
                    completion_tokens += delta.metrics.completion_tokens
            else:
                if body.stream_options and body.stream_options.include_usage:
                    yield _sse(envelope(part, [], usage=usage(completion_tokens)))
            yield _sse("[DONE]")

        return StreamingResponse(_closing(events(), started), media_type="text/event-stream")

    def completion_logprobs(lps: list[TokenLogprob], offset: int) -> dict:
        tokens = [token_text(lp.token_id) for lp in lps]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
                "top_logprobs": [{token_text(t): v for t, v in lp.top.items()} for lp in lps], "text_offset": offsets}

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, request: Request):
        adapter = await server.adapter_for(body.model)
        prompts = body.prompt if isinstance(body.prompt, list) and body.prompt and isinstance(
            body.prompt[0], (str, list)) else [body.prompt]
        ids = [server.tokenize(prompt) for prompt in prompts]
        started = await _unless_disconnected(request, server.start_choices(body, ids, body.max_tokens, body.logprobs,
                                                                           adapter))
        if started is None:
            return Response(status_code=499)  # the client went away while its requests waited for their turn
        offsets = [0] * len(started)  # text_offset of each choice's next streamed token

        def whole_choice(i: int, out: StreamDelta) -> dict:
            logprobs = completion_logprobs(out.logprobs, 0) if body.logprobs is not None else None
            return {"index": i, "text": out.text, "logprobs": logprobs, "finish_reason": out.finish_reason}

        def part_choice(i: int, delta: StreamDelta) -> dict:
            logprobs = None
            if body.logprobs is not None:
                logprobs = completion_logprobs(delta.logprobs, offsets[i])
                offsets[i] += sum(len(t) for t in logprobs["tokens"])
            return {"index": i, "text": delta.text, "logprobs": logprobs, "finish_reason": delta.finish_reason}

        return await respond(request, body, started, sum(map(len, ids)), "cmpl", "text_completion", "text_completion",
                             whole_choice, part_choice)

    def chat_logprobs(lps: list[TokenLogprob]) -> dict:
        def entry(token_id: int, logprob: float) -> dict:
            text = token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [entry(lp.token_id, lp.logprob) | {"top_logprobs": [entry(t, v) for t, v in lp.top.items()]}
                            for lp in lps]}

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatRequest, request: Request):
        adapter = await server.adapter_for(body.model)
        ids = server.chat_prompt(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        started = await _unless_disconnected(request, server.start_choices(
            body, [ids], body.max_completion_tokens or body.max_tokens, logprobs, adapter))
        if started is None:
            return Response(status_code=499)  # the client went away while its requests waited for their turn

        def whole_choice(i: int, out: StreamDelta) -> dict:
            return {"index": i, "message": {"role": "assistant", "content": out.text},
                    "logprobs": chat_logprobs(out.logprobs) if body.logprobs else None,
                    "finish_reason": out.finish_reason}

        def part_choice(i: int, delta: StreamDelta) -> dict:
            return {"index": i, "delta": {"content": delta.text} if delta.text else {},
                    "logprobs": chat_logprobs(delta.logprobs) if body.logprobs else None,
                    "finish_reason": delta.finish_reason}

        def opening(i: int) -> dict:
            return {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

        return await respond(request, body, started, len(ids), "chatcmpl", "chat.completion", "chat.completion.chunk",
                             whole_choice, part_choice, opening)

    return app


async def _closing(events: AsyncIterator[str], started: _Choices) -> AsyncIterator[str]:
    """The SSE events; when the response ends early (the client went away: the task is cancelled), the requests'
    delta streams are closed, which aborts them in the engine."""
    try:
        async for event in events:
            yield event
    finally:
        await events.aclose()
        await started.close()
