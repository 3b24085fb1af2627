"""The worker: one process per accelerator, executing the scheduler's plans on an engine.

It runs continuous-batching iterations in real time on an engine backend (``sim`` now, ``vllm``
later, both behind :class:`worker.engine.Engine`), publishes tokens to Redis streams, and
reports every step to the scheduler over a long-lived gRPC session.
"""
