"""`lorax-core serve`: a live server on 127.0.0.1 driven by the official openai client. Greedy outputs equal the
engine's (streamed and not), adapters are models, bad requests get OpenAI error bodies while the server goes on,
a client that goes away cancels its request, and a few hundred concurrent requests all complete."""
import asyncio
import json
import random
import subprocess
import sys
import time

import httpx
import openai
import pytest

from server_helpers import BASE, KEY, SERVED, free_socket, live_server, write_model_and_adapters

GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return write_model_and_adapters(tmp_path_factory.mktemp("server"))


@pytest.fixture(scope="module")
def live(paths):
    with live_server(paths) as server:
        server.client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)
        yield server


def test_models_lists_the_base_and_the_adapters(live):
    models = {m.id: m for m in live.client.models.list().data}
    assert set(models) == {BASE, *SERVED}
    assert all(models[name].model_extra["parent"] == BASE for name in SERVED)
    assert httpx.get(f"{live.url}/health").json() == {"status": "ok"}  # no key needed for probes


@pytest.mark.parametrize("model", [BASE, *SERVED])
def test_completions_give_the_engine_outputs_streamed_or_not(live, model):
    out = live.client.completions.create(model=model, prompt="the red cat", max_tokens=8, **GREEDY)
    expected = live.expected("the red cat", model)
    assert out.choices[0].text == expected.text and out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(expected.prompt_token_ids), 8)
    chunks = list(live.client.completions.create(model=model, prompt="the red cat", max_tokens=8, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8 and not chunks[-1].choices


def test_token_id_prompts_and_adapters_differ(live):
    ids = live.oracle.tokenizer("one two three")["input_ids"]
    texts = {m: live.client.completions.create(model=m, prompt=ids, max_tokens=8, **GREEDY).choices[0].text
             for m in (BASE, *SERVED)}
    assert texts == {m: live.expected(ids, m).text for m in texts}
    assert len(set(texts.values())) == 3  # each adapter changes the output


def test_chat_uses_the_template_and_streams_the_same(live):
    messages = [{"role": "user", "content": "is the big dog red"}]
    tok = live.oracle.tokenizer
    ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
              add_special_tokens=False)["input_ids"]
    expected = live.expected(ids, "r8_all")
    out = live.client.chat.completions.create(model="r8_all", messages=messages, max_tokens=8, **GREEDY)
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == expected.text
    assert out.usage.prompt_tokens == len(ids)
    chunks = list(live.client.chat.completions.create(model="r8_all", messages=messages, max_tokens=8, stream=True,
                                                      **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_logprobs_stop_and_seed(live):
    out = live.client.completions.create(model="r4_qv", prompt="the dog", max_tokens=6, logprobs=2, **GREEDY)
    lp, expected = out.choices[0].logprobs, live.expected("the dog", "r4_qv", 6, logprobs=2)
    assert lp.token_logprobs == pytest.approx([t.logprob for t in expected.logprobs], abs=1e-4)
    assert all(len(top) <= 2 for top in lp.top_logprobs) and "".join(lp.tokens) == out.choices[0].text
    chat = live.client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=4, logprobs=True, top_logprobs=3, **GREEDY)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 3 for c in content)

    full = live.expected("the red cat", "r8_all", 12).text
    stop = full.strip().split(" ")[1] if " " in full.strip() else full[2:4]
    cut = live.client.completions.create(model="r8_all", prompt="the red cat", max_tokens=12, stop=[stop], **GREEDY)
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == full[: full.find(stop)]

    sampled = [live.client.completions.create(model=BASE, prompt="the", max_tokens=8, temperature=1.0, seed=7,
                                              extra_body={"ignore_eos": True}).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]

    penalties = dict(presence_penalty=1.5, frequency_penalty=2.0)  # OpenAI's penalties reach the engine
    penalized = live.client.completions.create(model=BASE, prompt="the", max_tokens=12, **GREEDY, **penalties)
    expected = live.expected("the", BASE, 12, **penalties)
    assert penalized.choices[0].text == expected.text != live.expected("the", BASE, 12).text
    forced = live.client.completions.create(model=BASE, prompt="the", max_tokens=4, logit_bias={"17": 100}, **GREEDY)
    assert forced.choices[0].text == live.oracle.tokenizer.decode([17] * 4)  # the bias wins every step


def test_several_prompts_and_n_choices(live):
    """prompt = [p0, p1] with n = 2: choice 2i + j is prompt i, sample j (seed + j); streamed the same."""
    prompts, sampled = ["the red cat", "one two"], dict(temperature=1.0, seed=11, extra_body={"ignore_eos": True})
    out = live.client.completions.create(model="r8_all", prompt=prompts, n=2, max_tokens=6, **sampled)
    single = [live.client.completions.create(model="r8_all", prompt=p, max_tokens=6, **(sampled | {"seed": 11 + j}))
              .choices[0].text for p in prompts for j in range(2)]
    assert [c.index for c in out.choices] == [0, 1, 2, 3] and [c.text for c in out.choices] == single
    assert single[0] != single[1]  # two samples of one prompt differ (seeds 11 and 12)
    assert out.usage.completion_tokens == 4 * 6
    assert out.usage.prompt_tokens == sum(len(live.oracle.tokenize(p)) for p in prompts)
    texts = ["", "", "", ""]
    for chunk in live.client.completions.create(model="r8_all", prompt=prompts, n=2, max_tokens=6, stream=True,
                                                **sampled):
        texts[chunk.choices[0].index] += chunk.choices[0].text
    assert texts == single
    chat = live.client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}], n=3,
                                               max_tokens=4, **GREEDY)
    assert [c.index for c in chat.choices] == [0, 1, 2] and len({c.message.content for c in chat.choices}) == 1
    with pytest.raises(openai.BadRequestError) as err:  # one refused prompt refuses the call; nothing keeps running
        live.client.completions.create(model=BASE, prompt=["the", "the " * 3000], max_tokens=2)
    assert "shorten the prompt" in err.value.body["message"]
    assert live.metrics()[("lorax_requests_running", ())] == 0


def test_bad_requests_get_openai_errors_and_the_server_goes_on(live):
    c = live.client
    with pytest.raises(openai.AuthenticationError) as err:
        openai.OpenAI(base_url=f"{live.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert "API key" in err.value.body["message"]
    with pytest.raises(openai.NotFoundError) as err:
        c.completions.create(model="nope", prompt="the", max_tokens=2)
    assert "`nope` does not exist" in err.value.body["message"] and err.value.body["code"] == "model_not_found"
    bad = [dict(temperature=-1), dict(n=0), dict(n=65), dict(top_p=0), dict(max_tokens=0),
           dict(presence_penalty=2.5), dict(frequency_penalty=-3), dict(logit_bias={"x": 1}),
           dict(logit_bias={"5": 101}), dict(logit_bias={"100000": 1}), dict(echo=True), dict(suffix="x"),
           dict(best_of=3), dict(extra_body={"response_format": {"type": "json_object"}}),
           dict(logit_bias={"①": 1})]
    for params in bad:
        with pytest.raises(openai.BadRequestError) as err:
            c.completions.create(model=BASE, prompt="the", **({"max_tokens": 2} | params))
        assert err.value.body["message"] and err.value.status_code == 400, params
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model=BASE, prompt=[5] * 5000, max_tokens=2)
    assert "shorten the prompt" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model=BASE, prompt="", max_tokens=2)
    assert "empty" in err.value.body["message"]
    raw = httpx.post(f"{live.url}/v1/completions", content=b'{"model": "tiny-base", "prompt": ',
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert raw.status_code == 400 and "not valid JSON" in raw.json()["error"]["message"]
    raw = httpx.post(f"{live.url}/v1/completions", json={"prompt": "the"}, headers={"Authorization": f"Bearer {KEY}"})
    assert raw.status_code == 400 and raw.json()["error"]["param"] == "model"
    # what the server cannot honour is refused, naming the field, rather than served without it
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    for field, params in [("tools", dict(tools=[tool])),
                          ("response_format", dict(response_format={"type": "json_object"}))]:
        with pytest.raises(openai.BadRequestError) as err:
            c.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}], max_tokens=2, **params)
        assert err.value.body["param"] == field and "is not supported" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                  top_logprobs=2)
    assert err.value.body["param"] == "top_logprobs"
    plain = c.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                      response_format={"type": "text"})
    assert plain.choices[0].finish_reason == "length"
    # and the server still serves
    out = c.completions.create(model="r8_all", prompt="the red cat", max_tokens=8, **GREEDY)
    assert out.choices[0].text == live.expected("the red cat", "r8_all").text


def test_adapters_load_and_unload_at_run_time(live, tmp_path):
    c, headers = live.client, {"Authorization": f"Bearer {KEY}"}
    path = str(live.paths[1]["r16_rslora"])
    loaded = httpx.post(f"{live.url}/v1/load_lora_adapter", json={"lora_name": "r16_rslora", "lora_path": path},
                        headers=headers)
    assert loaded.status_code == 200 and loaded.json()["rank"] == 16
    assert "r16_rslora" in {m.id for m in c.models.list().data}
    out = c.completions.create(model="r16_rslora", prompt="the red cat", max_tokens=8, **GREEDY)
    assert out.choices[0].text == live.expected("the red cat", "r16_rslora").text
    gone = httpx.post(f"{live.url}/v1/unload_lora_adapter", json={"lora_name": "r16_rslora"}, headers=headers)
    assert gone.status_code == 200
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="r16_rslora", prompt="the", max_tokens=2)
    (tmp_path / "adapter_config.json").write_text("{not json")
    broken = httpx.post(f"{live.url}/v1/load_lora_adapter", json={"lora_name": "broken", "lora_path": str(tmp_path)},
                        headers=headers)
    assert broken.status_code == 400 and "broken" in broken.json()["error"]["message"]
    unknown = httpx.post(f"{live.url}/v1/unload_lora_adapter", json={"lora_name": "never"}, headers=headers)
    assert unknown.status_code == 404
    assert {m.id for m in c.models.list().data} == {BASE, *SERVED}


def test_a_slow_hub_download_does_not_stall_generation(live, monkeypatch):
    """load_lora_adapter fetches a hub id off the engine's thread: requests keep being served meanwhile."""
    import threading

    import lorax_core.server.app as server_app

    local = live.paths[1]["r16_rslora"]

    def slow_download(source, what):  # a hub id whose download takes 2 s
        assert source == "someone/some-adapter"
        time.sleep(2.0)
        return local

    monkeypatch.setattr(server_app, "resolve_model_dir", slow_download)
    headers = {"Authorization": f"Bearer {KEY}"}
    answer = {}
    load = threading.Thread(target=lambda: answer.update(r=httpx.post(
        f"{live.url}/v1/load_lora_adapter", json={"lora_name": "from_hub", "lora_path": "someone/some-adapter"},
        headers=headers, timeout=30)))
    load.start()
    time.sleep(0.3)  # the download is under way
    start = time.monotonic()
    out = live.client.completions.create(model=BASE, prompt="the", max_tokens=4, **GREEDY)
    assert time.monotonic() - start < 1.2 and load.is_alive()  # served while the download went on
    assert out.choices[0].text == live.expected("the", BASE, 4).text
    load.join()
    assert answer["r"].status_code == 200 and answer["r"].json()["rank"] == 16
    info = {a["name"]: a for a in httpx.get(f"{live.url}/v1/adapters", headers=headers).json()["data"]}
    assert "from_hub" in info
    assert httpx.post(f"{live.url}/v1/unload_lora_adapter", json={"lora_name": "from_hub"},
                      headers=headers).status_code == 200


def test_a_client_that_disconnects_mid_stream_cancels_its_request(live):
    aborted = live.metrics().get(("lorax_requests_total", (("finish_reason", "abort"), ("model", BASE))), 0)
    body = {"model": BASE, "prompt": "the", "max_tokens": 100_000, "stream": True, "ignore_eos": True,
            "temperature": 0}
    with httpx.stream("POST", f"{live.url}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        lines = response.iter_lines()
        got = [next(lines) for _ in range(6)]
    assert any(line.startswith("data: ") for line in got)
    assert wait_for_abort(live, aborted)


def wait_for_abort(live, aborted_before, count=1):
    """Until the base model's abort count has grown by `count` and nothing runs; returns whether that happened."""
    key = ("lorax_requests_total", (("finish_reason", "abort"), ("model", BASE)))
    for _ in range(300):
        m = live.metrics()
        if m.get(key, 0) == aborted_before + count and m[("lorax_requests_running", ())] == 0:
            return m[("lorax_requests_waiting", ())] == 0
        time.sleep(0.02)
    return False


def test_a_client_that_gives_up_on_a_non_streamed_request_cancels_it(live):
    aborted = live.metrics().get(("lorax_requests_total", (("finish_reason", "abort"), ("model", BASE))), 0)
    # 16 prompts (as many as the server runs at once), each to the whole context (512 tokens), take the tiny model
    # about 0.85 s on the 2-core CI machine; one alone takes 0.34 s, too close to the 0.3 s after which the client
    # leaves (and the server notices within 0.1 s)
    body = {"model": BASE, "prompt": ["the"] * 16, "max_tokens": 100_000, "ignore_eos": True, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=0.3)
    assert wait_for_abort(live, aborted, count=16)


def test_a_client_that_gives_up_while_its_choices_wait_cancels_them_all(live):
    """64 prompts: 16 run, 48 wait for their turn when the client leaves. All of them end at once: the server
    watches for the client while the choices start too (it waited for every first token, about 3 s here, before)."""
    key = ("lorax_requests_total", (("finish_reason", "abort"), ("model", BASE)))
    aborted = live.metrics().get(key, 0)
    body = {"model": BASE, "prompt": ["the"] * 64, "max_tokens": 100_000, "ignore_eos": True, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=0.3)
    for _ in range(300):
        m = live.metrics()
        if m[("lorax_requests_running", ())] == 0 and m[("lorax_requests_waiting", ())] == 0:
            break
        time.sleep(0.02)
    assert m[("lorax_requests_running", ())] == 0 and m[("lorax_requests_waiting", ())] == 0
    assert m.get(key, 0) - aborted >= 32  # before: only the last 16 to start (the others had run to the end)


def test_metrics_count_requests_tokens_and_loads_per_adapter(live):
    before = live.metrics()
    live.client.completions.create(model="r4_qv", prompt="the red cat", max_tokens=5, **GREEDY)
    after = live.metrics()
    key = lambda name, **labels: (name, tuple(sorted(labels.items())))  # noqa: E731
    assert after[key("lorax_requests_total", finish_reason="length", model="r4_qv")] == \
        before.get(key("lorax_requests_total", finish_reason="length", model="r4_qv"), 0) + 1
    assert after[key("lorax_generation_tokens_total", model="r4_qv")] == \
        before.get(key("lorax_generation_tokens_total", model="r4_qv"), 0) + 5
    assert after[key("lorax_queue_seconds_count", model="r4_qv")] >= 1
    assert after[key("lorax_adapter_loads_total", model="r4_qv", to="host")] >= 1
    assert after[key("lorax_adapter_state", model="r4_qv", state="device")] == 1
    assert httpx.get(f"{live.url}/metrics").status_code == 401  # the key guards metrics too


def test_a_few_hundred_concurrent_requests_all_complete(live):
    """300 requests (streamed and not, mixed models) from 24 concurrent clients: every one completes with the
    engine's tokens."""
    rng = random.Random(0)
    words = ["the", "red", "cat", "big", "dog", "one", "two", "three", "is", "was"]
    prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 6))) for _ in range(20)]
    jobs = [(rng.choice(prompts), rng.choice([BASE, *SERVED]), i % 2 == 0) for i in range(300)]
    expected = {(p, m): live.expected(p, m, 4).text for p, m, _ in set((p, m, False) for p, m, _ in jobs)}
    client = openai.AsyncOpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0, timeout=120)

    async def one(prompt, model, stream, gate):
        async with gate:
            if not stream:
                out = await client.completions.create(model=model, prompt=prompt, max_tokens=4, **GREEDY)
                return out.choices[0].text, out.choices[0].finish_reason
            text, reason = "", None
            async for chunk in await client.completions.create(model=model, prompt=prompt, max_tokens=4,
                                                               stream=True, **GREEDY):
                text += chunk.choices[0].text
                reason = chunk.choices[0].finish_reason or reason
            return text, reason

    async def main():
        gate = asyncio.Semaphore(24)
        try:
            return await asyncio.gather(*(one(p, m, s, gate) for p, m, s in jobs))
        finally:
            await client.close()

    results = asyncio.run(main())
    assert [r for _, r in results] == ["length"] * len(jobs)
    assert [t for t, _ in results] == [expected[(p, m)] for p, m, _ in jobs]


def test_cli_serves_a_model_directory(paths):
    base, adapters = paths
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "lorax_core.cli", "serve", "--model", str(base), "--adapter",
                             f"mine={adapters['r4_qv']}", "--port", str(port), "--served-model-name", "tiny",
                             "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
            assert proc.poll() is None, proc.stdout.read()
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["tiny", "mine"]
        out = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": "mine", "prompt": "the cat",
                                                                         "max_tokens": 3, "temperature": 0}).json()
        assert out["usage"]["completion_tokens"] <= 3 and out["choices"][0]["finish_reason"] in ("length", "stop")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    bad = subprocess.run([sys.executable, "-m", "lorax_core.cli", "serve", "--model", str(base), "--adapter", "noeq"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "NAME=PATH" in bad.stderr


def test_scores_files_of_the_demo_and_of_lorax_eval(tmp_path):
    from lorax_core.server.scores import read_scores

    demo = tmp_path / "results.json"
    demo.write_text(json.dumps({"tasks": [{"task": "sentiment", "base_score": 0.0, "adapter_score": 61.0,
                                           "example": {"prompt": "review : good"}}]}))
    assert read_scores(demo) == {"sentiment": dict(task="sentiment", base_score=0.0, adapter_score=61.0,
                                                   examples=["review : good"])}
    evaluated = tmp_path / "eval.json"
    evaluated.write_text(json.dumps({"models": ["base", "sql", "math"], "scores": {
        "sql": {"base": 0.1, "sql": 0.8, "math": 0.1}, "arith": {"base": 0.2, "sql": 0.2, "math": 0.9}}}))
    rows = read_scores(evaluated)
    assert rows["sql"]["task"] == "sql" and rows["sql"]["adapter_score"] == pytest.approx(80.0)
    assert rows["math"]["task"] == "arith" and rows["math"]["base_score"] == pytest.approx(20.0)
    for text in ("{broken", json.dumps({"something": 1})):
        demo.write_text(text)
        with pytest.raises(ValueError, match="scores file"):
            read_scores(demo)
