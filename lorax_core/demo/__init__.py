"""`lorax-core demo`: LoRA Land in miniature. Builds (or takes) a base model, trains one QLoRA adapter per
synthetic task with the project's trainer, scores the base and each adapter on held-out test sets through the
engine, then serves every adapter from one engine at once in mixed batches and reports the throughput."""
from lorax_core.demo.run import DemoSettings, run

__all__ = ["DemoSettings", "run"]
