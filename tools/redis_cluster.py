"""A real Redis Cluster on loopback, from Debian's ``redis-server`` and ``redis-cli``, and blocking clients for a URL.

``run_redis_cluster`` starts one ``redis-server`` per master in cluster mode, joins them with
``redis-cli --cluster create`` (the slots split evenly, no replicas) and waits until every node
sees the cluster whole; ``move_slot`` moves one slot's keys to another master the way
``redis-cli --cluster reshard`` does, key batch by key batch, while clients keep using it.
The tests, ``.ci/run``'s cluster and the benchmarks start clusters from here.

    python -m tools.redis_cluster --ports 7101 7102 7103 --dir /tmp/dmft-cluster   # until interrupted
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.cluster import ClusterNode, RedisCluster

from app.store.redis_client import cluster_address

HOST = "127.0.0.1"
READY_TIMEOUT_S = 30.0
NODE_TIMEOUT_MS = 2000  # how soon the nodes give up on a silent peer
BUS_OFFSET = 10000  # a node also listens on its port + 10000, for the cluster bus
PORTS = range(20000, 55000)  # whose bus ports are valid ports too, below the usual ephemeral range


def free_node_ports(count: int) -> list[int]:
    """``count`` ports that nothing listens on, nor on their bus ports."""
    chosen: list[int] = []
    while len(chosen) < count:
        port = random.choice(PORTS)
        if port not in chosen and all(_free(candidate) for candidate in (port, port + BUS_OFFSET)):
            chosen.append(port)
    return chosen


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def sync_client(url: str) -> redis.Redis | RedisCluster:
    """A blocking client for a Redis URL, of one Redis or of a cluster (``redis+cluster://``)."""
    address = cluster_address(url)
    if address is None:
        return redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=5.0)
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in address.nodes],
        username=address.username,
        password=address.password,
        ssl=address.tls,
        socket_connect_timeout=1.0,
        socket_timeout=5.0,
    )


@dataclass
class RedisClusterProcesses:
    ports: list[int]
    workdir: Path
    processes: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    created: bool = False

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{HOST}:{port}" for port in self.ports)

    def start(self) -> None:
        """Start every node that is not running, and wait until they answer; once the cluster was created, until
        it is whole again (a node started again finds its cluster in its nodes.conf)."""
        for port in self.ports:
            if port not in self.processes:
                node_dir = self.workdir / str(port)
                node_dir.mkdir(parents=True, exist_ok=True)
                command = ["redis-server", "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
                           "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                           "--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--dir", str(node_dir)]  # fmt: skip
                self.processes[port] = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        _wait(self._nodes_answer, "start")
        if self.created:
            _wait(lambda: _cluster_ok(self.ports), "become whole again")

    def create(self) -> None:
        """Join the nodes into a cluster, the slots split evenly, as ``redis-cli --cluster create`` does."""
        command = ["redis-cli", "--cluster", "create", *(f"{HOST}:{port}" for port in self.ports), "--cluster-yes"]
        subprocess.run(command, check=True, capture_output=True, timeout=READY_TIMEOUT_S)
        _wait(lambda: _cluster_ok(self.ports), "become whole")
        self.created = True

    def stop(self) -> None:
        """Stop every node; its data goes with it (no persistence), its place in the cluster stays in nodes.conf."""
        while self.processes:
            _stop(self.processes.popitem()[1])

    def _nodes_answer(self) -> bool:
        for port in self.ports:
            try:
                with self.node(port) as client:
                    client.ping()
            except (redis.RedisError, OSError):
                return False
        return True

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(host=HOST, port=port, socket_connect_timeout=1.0, socket_timeout=10.0)

    def node_id(self, port: int) -> str:
        with self.node(port) as client:
            return client.execute_command("CLUSTER", "MYID").decode()

    def owner(self, slot: int) -> int:
        """The port of the master that serves ``slot``."""
        with self.node(self.ports[0]) as client:
            for start, end, (_, port, *_), *_ in client.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return int(port)
        raise LookupError(f"no node serves slot {slot}")

    def move_slot(self, slot: int, to_port: int, *, batch: int = 10, pause_s: float = 0.0) -> int:
        """Move ``slot`` and its keys to the master on ``to_port``, ``batch`` keys at a time, ``pause_s`` between
        batches; the keys moved."""
        from_port = self.owner(slot)
        source, target = self.node_id(from_port), self.node_id(to_port)
        moved = 0
        with self.node(from_port) as origin, self.node(to_port) as destination:
            destination.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source)
            origin.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target)
            while keys := origin.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch):
                origin.execute_command("MIGRATE", HOST, to_port, "", 0, 5000, "KEYS", *keys)
                moved += len(keys)
                time.sleep(pause_s)
            # The new owner first, then the old one, as redis-cli does: no moment where nobody claims the slot.
            destination.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target)
            origin.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target)
        for port in self.ports:
            if port not in (from_port, to_port):
                with self.node(port) as other:
                    other.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target)
        return moved


def _cluster_ok(ports: list[int]) -> bool:
    for port in ports:
        try:
            with redis.Redis(host=HOST, port=port, socket_connect_timeout=0.5, socket_timeout=1.0) as client:
                info = client.execute_command("CLUSTER", "INFO").decode()
        except (redis.RedisError, OSError):
            return False
        if "cluster_state:ok" not in info or f"cluster_known_nodes:{len(ports)}" not in info:
            return False
    return True


def _wait(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Redis Cluster did not {what} within {READY_TIMEOUT_S:.0f} s")
        time.sleep(0.05)


@contextmanager
def run_redis_cluster(workdir: Path, ports: list[int]) -> Iterator[RedisClusterProcesses]:
    """Masters on ``ports`` (one per port) joined into a cluster, their files in ``workdir``; stopped afterwards."""
    for tool in ("redis-server", "redis-cli"):
        if shutil.which(tool) is None:
            raise FileNotFoundError(f"{tool} is not installed (Debian package redis-server)")
    cluster = RedisClusterProcesses(list(ports), workdir)
    try:
        cluster.start()
        cluster.create()
        yield cluster
    finally:
        cluster.stop()


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ports", type=int, nargs="+", default=[7101, 7102, 7103])
    parser.add_argument("--dir", type=Path, required=True, help="where the nodes keep their files")
    args = parser.parse_args()
    stop = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # taken by sigwait below, so that the nodes are stopped
    with run_redis_cluster(args.dir, args.ports) as cluster:
        print(cluster.url, flush=True)
        signal.sigwait(stop)


if __name__ == "__main__":
    main()
