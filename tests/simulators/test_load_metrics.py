"""The load runner's scrape of a crew's metrics (how it counts the model fits of a measured run)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, start_http_server

from simulators.load import metric_sum
from waterdoctor.embedded import free_port


def test_metric_sum_adds_the_matching_labelled_samples_only() -> None:
    registry = CollectorRegistry()
    fits = Counter("wd_analytics_model_fits_total", "Models fitted", ["outcome"], registry=registry)
    other = Counter(
        "wd_analytics_model_fits_other_total", "Not the same metric", ["outcome"], registry=registry
    )
    fits.labels("ok").inc(7)
    fits.labels("failed").inc(2)
    other.labels("ok").inc(100)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        assert metric_sum(port, "wd_analytics_model_fits_total", 'outcome="ok"') == 7
        assert metric_sum(port, "wd_analytics_model_fits_total") == 9  # every outcome
        assert metric_sum(port, "wd_no_such_metric") == 0
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert metric_sum(port, "wd_analytics_model_fits_total") is None  # nothing answers: unknown, not zero
