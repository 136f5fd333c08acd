"""The webhook benchmark's load generator: figures in the README come from it, so it is tested.

Two bare endpoints under the real HTTP server: one with the secret the deliveries are signed
with, one with another. Side by side, each must get every delivery once and be reported on
its own (the wrong-secret one answers 401 every time, the other 202).
"""

from __future__ import annotations

import random

import pytest

from bench import bare_webhook, webhook_latency
from bot.httpserver import HttpServer
from tests.payloads import SECRET


@pytest.fixture
def endpoints():
    counts = {"right": 0, "wrong": 0}
    servers = []
    for name, secret in (("right", SECRET), ("wrong", "another-secret")):
        app = bare_webhook.create_app(secret)

        def counting(environ, start_response, app=app, name=name):
            counts[name] += 1
            return app(environ, start_response)

        servers.append(HttpServer(counting, "127.0.0.1", 0, threads=4).start())
    yield [s.url + "/webhook" for s in servers], counts
    for server in servers:
        server.stop()


def test_side_by_side_each_endpoint_gets_every_delivery_and_its_own_figures(endpoints):
    urls, counts = endpoints
    deliveries = webhook_latency.build_deliveries(60, 20, random.Random(3))
    right, wrong = webhook_latency.blast(urls, deliveries, rate=600.0, threads=3, seed=5)

    assert counts == {"right": 60, "wrong": 60}
    assert right["sent"] == wrong["sent"] == 60
    assert right["status_counts"] == {"202": 60}
    assert wrong["status_counts"] == {"401": 60}
    assert right["latency_ms"]["count"] == 60
    assert 0 < right["latency_ms"]["p50"] <= right["latency_ms"]["p99"]
    # kinds are kept per delivery: the mix adds up to what was sent
    assert sum(v["count"] for v in right["latency_ms_by_kind"].values()) == 60


def test_one_endpoint_alone(endpoints):
    urls, counts = endpoints
    deliveries = webhook_latency.plain_deliveries(25, 5, random.Random(1))
    (result,) = webhook_latency.blast(urls[:1], deliveries, rate=500.0, threads=2)
    assert counts == {"right": 25, "wrong": 0}
    assert result["status_counts"] == {"202": 25}


def test_handler_time_is_read_from_server_timing():
    assert webhook_latency.handler_ms(b"handler;dur=0.73") == 0.73
    assert webhook_latency.handler_ms(None) is None
