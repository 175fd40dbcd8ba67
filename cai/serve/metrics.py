"""The metrics of ``cai serve`` (``GET /metrics``), in Prometheus' text exposition format.

Counters since the server started, and quantiles over a recent window (Prometheus' ``summary``
type: a scraper reads ``name{quantile="0.99"}`` directly, no buckets to configure):

    cai_requests_total{endpoint,status}   cai_request_seconds{endpoint,quantile} (+ _sum, _count)
    cai_batch_items_total{kind}           cai_engine_calls_total{kind}   cai_engine_errors_total{kind}
    cai_batch_size{quantile} (+ _sum, _count)   cai_queue_length   cai_in_flight
    cai_client_disconnects_total

``kind`` is ``judge`` (items are pairs), ``score`` (a pointwise judge's responses) or
``reward_model`` (items are conversations). A request whose client left before its answer (in
the queue, or mid-body) is counted under status 499 and in ``cai_client_disconnects_total``.
"""

from __future__ import annotations

import math
import threading
from collections import Counter, deque

QUANTILES = (0.5, 0.9, 0.99)


class Metrics:
    """Counters and recent-window quantiles, rendered in Prometheus' text format."""

    def __init__(self, window: int = 2048):
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.latency: dict[str, deque[float]] = {}
        self.latency_sum: Counter[str] = Counter()
        self.items: Counter[str] = Counter()
        self.engine_calls: Counter[str] = Counter()
        self.engine_errors: Counter[str] = Counter()
        self.batch_sizes: deque[int] = deque(maxlen=window)
        self.disconnects = 0
        self.in_flight = 0
        self.window = window

    def batch_done(self, kind: str, items: int, seconds: float, error: Exception | None) -> None:
        if isinstance(error, ValueError):  # the judge's input checks refused it: no engine call
            return
        with self._lock:
            self.engine_calls[kind] += 1
            self.items[kind] += items
            self.batch_sizes.append(items)
            if error is not None:
                self.engine_errors[kind] += 1

    def request_done(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[endpoint, status] += 1
            self.latency.setdefault(endpoint, deque(maxlen=self.window)).append(seconds)
            self.latency_sum[endpoint] += seconds

    def render(self, queue_length: int) -> str:
        with self._lock:
            lines: list[str] = []

            def metric(name: str, kind: str, help: str, rows: list[tuple[str, float]]) -> None:
                lines.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}"])
                lines.extend(f"{name}{labels} {_number(value)}" for labels, value in rows)

            metric(
                "cai_requests_total",
                "counter",
                "HTTP requests answered, by endpoint and status.",
                [
                    (f'{{endpoint="{e}",status="{s}"}}', n)
                    for (e, s), n in sorted(self.requests.items())
                ],
            )
            rows = []
            for endpoint, values in sorted(self.latency.items()):
                rows += [
                    (f'{{endpoint="{endpoint}",quantile="{q}"}}', _quantile(values, q))
                    for q in QUANTILES
                ]
            metric(
                "cai_request_seconds",
                "summary",
                f"Request latency (quantiles over the last {self.window} requests).",
                rows,
            )
            lines += [
                f'cai_request_seconds_sum{{endpoint="{e}"}} {_number(self.latency_sum[e])}'
                for e in sorted(self.latency)
            ]
            lines += [
                f'cai_request_seconds_count{{endpoint="{e}"}} '
                f"{sum(n for (x, _), n in self.requests.items() if x == e)}"
                for e in sorted(self.latency)
            ]
            for name, counter, help in (
                ("cai_batch_items_total", self.items, "Pairs (judge) or conversations (reward model) sent to the engine."),
                ("cai_engine_calls_total", self.engine_calls, "Batched engine calls."),
                ("cai_engine_errors_total", self.engine_errors, "Engine calls that raised (their requests got 500)."),
            ):  # fmt: skip
                metric(name, "counter", help, [(f'{{kind="{k}"}}', n) for k, n in counter.items()])
            metric(
                "cai_batch_size",
                "summary",
                f"Items per engine call (quantiles over the last {self.window} calls).",
                [(f'{{quantile="{q}"}}', _quantile(self.batch_sizes, q)) for q in QUANTILES],
            )
            lines += [
                f"cai_batch_size_sum {sum(self.items.values())}",
                f"cai_batch_size_count {sum(self.engine_calls.values())}",
            ]
            metric("cai_queue_length", "gauge", "Items waiting for a batch.", [("", queue_length)])
            metric("cai_in_flight", "gauge", "Requests being answered.", [("", self.in_flight)])
            metric(
                "cai_client_disconnects_total",
                "counter",
                "Requests whose client went away before the answer.",
                [("", self.disconnects)],
            )
            return "\n".join(lines) + "\n"


def _quantile(values: deque, q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _number(value: float) -> str:
    return "NaN" if isinstance(value, float) and math.isnan(value) else f"{value:.6g}"


__all__ = ["Metrics"]
