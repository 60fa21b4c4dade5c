"""/metrics: per-model (base and each adapter) counters in Prometheus' text format, written by prometheus_client."""
from __future__ import annotations

import collections
import dataclasses

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

from lorax_core.adapters import AdapterInfo
from lorax_core.adapters.registry import Tier
from lorax_core.engine.outputs import StreamDelta


@dataclasses.dataclass
class ModelStats:
    """What the server counted for one model name (the base model's or an adapter's); kept across unloads."""

    requests: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # by finish reason
    refused: int = 0  # refused when queued (prompt too long, ...)
    prompt_tokens: int = 0
    generation_tokens: int = 0
    queue_seconds: float = 0.0  # arrival to first scheduled, over finished requests (not aborted ones)
    queue_count: int = 0
    ttft_seconds: float = 0.0  # arrival to first token, over finished requests that got one
    ttft_count: int = 0
    loads: int = 0  # POST /v1/load_lora_adapter

    def accepted(self, prompt_tokens: int) -> None:
        self.prompt_tokens += prompt_tokens

    def delta(self, delta: StreamDelta) -> None:
        self.generation_tokens += len(delta.token_ids)
        if delta.finish_reason is None:
            return
        self.requests[delta.finish_reason] += 1
        m = delta.metrics
        if m.queue_time is not None:
            self.queue_seconds += m.queue_time
            self.queue_count += 1
        if m.time_to_first_token is not None:
            self.ttft_seconds += m.time_to_first_token
            self.ttft_count += 1


def render_metrics(stats: dict[str, ModelStats], adapters: list[AdapterInfo], running: int, waiting: int
                   ) -> tuple[bytes, str]:
    """The exposition text and its content type."""
    return generate_latest(_Snapshot(stats, adapters, running, waiting)), CONTENT_TYPE_LATEST


class _Snapshot:
    """A one-off collector (generate_latest only calls collect())."""

    def __init__(self, stats, adapters, running, waiting):
        self.stats, self.adapters, self.running, self.waiting = stats, adapters, running, waiting

    def collect(self):
        requests = CounterMetricFamily("lorax_requests", "Finished requests by model and finish reason (stop, length, "
                                       "error, abort: the client went away, while the request ran or waited)",
                                       labels=["model", "finish_reason"])
        refused = CounterMetricFamily("lorax_requests_refused", "Requests refused when queued", labels=["model"])
        prompt = CounterMetricFamily("lorax_prompt_tokens", "Prompt tokens of accepted requests", labels=["model"])
        generated = CounterMetricFamily("lorax_generation_tokens", "Generated tokens", labels=["model"])
        queue = SummaryMetricFamily("lorax_queue_seconds", "Arrival to first scheduled, finished requests",
                                    labels=["model"])
        ttft = SummaryMetricFamily("lorax_time_to_first_token_seconds", "Arrival to first token", labels=["model"])
        for model, s in sorted(self.stats.items()):
            for reason, n in sorted(s.requests.items()):
                requests.add_metric([model, reason], n)
            refused.add_metric([model], s.refused)
            prompt.add_metric([model], s.prompt_tokens)
            generated.add_metric([model], s.generation_tokens)
            queue.add_metric([model], s.queue_count, s.queue_seconds)
            ttft.add_metric([model], s.ttft_count, s.ttft_seconds)
        yield from (requests, refused, prompt, generated, queue, ttft)

        loads = CounterMetricFamily("lorax_adapter_loads", "Adapter loads: disk to host memory, host memory to the "
                                    "device pool", labels=["model", "to"])
        evictions = CounterMetricFamily("lorax_adapter_evictions", "Adapters evicted from the device pool",
                                        labels=["model"])
        failures = CounterMetricFamily("lorax_adapter_load_failures", "Adapter loads that failed at run time",
                                       labels=["model"])
        state = GaugeMetricFamily("lorax_adapter_state", "1 for the tier each adapter is in now", labels=["model",
                                                                                                         "state"])
        for a in self.adapters:
            loads.add_metric([a.name, "host"], a.stats.host_loads)
            loads.add_metric([a.name, "device"], a.stats.device_loads)
            evictions.add_metric([a.name], a.stats.evictions)
            failures.add_metric([a.name], a.stats.failures)
            for tier in Tier:
                state.add_metric([a.name, tier.value], float(a.tier is tier))
        yield from (loads, evictions, failures, state)
        yield GaugeMetricFamily("lorax_adapters_on_device", "Adapters resident in the device pool",
                                value=sum(a.tier is Tier.DEVICE for a in self.adapters))
        yield GaugeMetricFamily("lorax_requests_running", "Requests running now", value=self.running)
        yield GaugeMetricFamily("lorax_requests_waiting", "Requests waiting now", value=self.waiting)
