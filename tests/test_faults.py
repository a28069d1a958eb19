"""The fault and load suite, short: real ``dmft serve`` processes, a real Redis of the suite's own, real sockets.

Each run (``tools.faults.scenarios``) must leave no problem: every request answered within its bound
(no hang), no 5xx but a 503 with ``Retry-After``, every error in the one shape, no session window lost
or doubled for a client that retries by ``seq``, and the service's memory (all its processes'
resident memory together) no more than ``MAX_GROWTH_MIB`` above where the run found it. Each test
prints its figures (``-s`` shows them); ``python bench/faults.py --minutes 10`` runs the same for longer.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tools.faults import scenarios
from tools.faults.scenarios import RunReport
from tools.faults.stacks import RedisStack, embedded_service, redis_service
from tools.stack import Server
from tools.traffic import WatchData

from .redis_fixtures import skip_or_fail

pytestmark = pytest.mark.fault

# The service holds about 380 MiB a worker with its inference process; a run may add buffers, connections and
# the allocator's slack, not what one bad request once cost (3.3 GB).
MAX_GROWTH_MIB = 256


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with embedded_service(tmp_path_factory.mktemp("embedded")) as server:
        yield server


@pytest.fixture(scope="module")
def on_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisStack]:
    try:
        with redis_service(tmp_path_factory.mktemp("on-redis")) as stack:
            yield stack
    except FileNotFoundError as error:
        skip_or_fail(str(error))


def check(report: RunReport) -> None:
    print(report.summary())
    assert report.tally.requests > 0
    assert report.problems(max_growth_mib=MAX_GROWTH_MIB) == []


@pytest.mark.parametrize("store", ["embedded", "redis"])
def test_event_stream_churn_leaves_every_route_answering(
    store: str, request: pytest.FixtureRequest, watch_data: WatchData
) -> None:
    server = request.getfixturevalue("embedded") if store == "embedded" else request.getfixturevalue("on_redis").server
    check(scenarios.event_stream_churn(server, watch_data, seconds=4))


def test_a_burst_of_sessions_beyond_the_redis_pool_waits_for_connections(
    on_redis: RedisStack, watch_data: WatchData
) -> None:
    check(scenarios.session_burst(on_redis.server, watch_data, sessions=200, chunks=3))


def test_a_thousand_connections_flooding_the_teacher_are_all_answered(embedded: Server, watch_data: WatchData) -> None:
    check(scenarios.teacher_flood(embedded, watch_data, connections=1200))


def test_slow_clients_are_cut_off_while_others_are_served(embedded: Server, watch_data: WatchData) -> None:
    report = scenarios.slow_clients(embedded, watch_data, slow=300, seconds=6)
    check(report)
    assert report.notes["closed with 408"] == 300


@pytest.mark.parametrize("kind", [scenarios.INFERENCE_PROCESS, scenarios.WORKER])
def test_a_process_killed_under_load_loses_no_window(on_redis: RedisStack, watch_data: WatchData, kind: str) -> None:
    report = scenarios.kill_process(on_redis.server, watch_data, kind=kind, seconds=6)
    check(report)
    assert "replaced in s" in report.notes


def test_redis_killed_and_restarted_mid_stream_loses_no_window(on_redis: RedisStack, watch_data: WatchData) -> None:
    report = scenarios.redis_restart(on_redis, watch_data, seconds=6)
    check(report)
    assert report.tally.statuses["503"] > 0, "no request saw the outage"
