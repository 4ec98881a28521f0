"""Benchmark harness: the gateway side by side with NATS, Redis pub/sub, ZeroMQ and the raw
socket limit, on loopback. ``python -m bench`` (or ``--quick``); see ``bench.__main__``."""
