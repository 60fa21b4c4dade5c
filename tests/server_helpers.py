"""A live `lorax-core serve` app on 127.0.0.1 for tests (uvicorn in a thread), with an oracle engine beside it."""
import contextlib
import socket
import threading
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from model_helpers import save_adapters, save_model
from lorax_core import LLM, AsyncLLM, SamplingParams
from lorax_core.server import create_app

KEY = "sekret"
BASE = "tiny-base"
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
SERVED = ("r8_all", "r4_qv")  # loaded at start; r16_rslora is only on disk (a test loads it at run time)


class Live:
    def __init__(self, url, oracle, paths):
        self.url, self.oracle, self.paths = url, oracle, paths
        self.headers = {"Authorization": f"Bearer {KEY}"}

    def expected(self, prompt, model, max_tokens=8, ignore_eos=True, **params):
        """What the engine gives for this greedy request (a second engine on the same weights, used from the
        test's thread)."""
        adapter = None if model == BASE else model
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=ignore_eos, **params)
        return self.oracle.generate([prompt], params, adapters=[adapter])[0]

    def metrics(self) -> dict:
        text = httpx.get(f"{self.url}/metrics", headers=self.headers).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}


def free_socket() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def write_model_and_adapters(root):
    """The tiny Llama (its tokenizer with a chat template) and every ADAPTERS adapter, under root."""
    from transformers import AutoTokenizer

    base = save_model(root / "base", "llama")
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(base)
    adapters = save_adapters(base, root)
    return base, adapters


@contextlib.contextmanager
def live_server(paths, scores=None):
    """Serve the base as BASE with the SERVED adapters (API key KEY); yields a Live."""
    import uvicorn

    base, adapters = paths
    engines = []
    for _ in range(2):
        llm = LLM(base, dtype="float32", device="cpu", kv_block_size=4, max_num_seqs=16)
        for name in SERVED:
            llm.load_adapter(name, adapters[name])
        engines.append(llm)
    served, oracle = engines
    oracle.load_adapter("r16_rslora", adapters["r16_rslora"])
    engine = AsyncLLM(served)
    sock = free_socket()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, BASE, api_key=KEY, scores=scores), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(500):
        if server.started:
            break
        time.sleep(0.01)
    try:
        yield Live(f"http://127.0.0.1:{sock.getsockname()[1]}", oracle, paths)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        engine.close()
        sock.close()
