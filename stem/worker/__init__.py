"""The worker: consumes queues, runs handlers, writes results, acks."""

from stem.worker.worker import Worker

__all__ = ["Worker"]
