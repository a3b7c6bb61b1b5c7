"""A real two-node Ray cluster on this machine, on loopback addresses only, for the Ray launcher's
tests: a head (127.0.0.1) and a worker node (127.0.0.2, its own `ray start --address`), one
CPU each, each `ray start --block` in a session of its own, stopped by its session's PIDs.

Ray turns a node address of 127.0.0.1 (or `localhost`) into the machine's outward address, so
a cluster started with `--node-ip-address 127.0.0.1` would still talk over that address. Two
things keep every address on loopback here, neither of them in alignflow's code:
- `ray start` runs with `resolve_ip_for_localhost` as the identity (`START_RAY` below), so the
  head's 127.0.0.1 and the GCS address the worker node joins stay what they are;
- the driver that connects (the flow's `python -m alignflow.stages.ray_job`) runs with
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which makes Ray take 127.0.0.1 as its own address.
No dashboard (it needs ray[default]'s packages): without its State API, Ray Train's
PlacementGroupCleaner logs "Failed to query Ray Train Controller actor state" every few seconds,
which a cluster with a dashboard does not. Each node has its own --temp-dir: with one shared,
both nodes' log monitors forward every worker's lines, and the driver prints each twice."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START_RAY = ("import sys, ray._private.services as s; s.resolve_ip_for_localhost = lambda host: host; "
             "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()")
NO_PHONING_HOME = {"RAY_USAGE_STATS_ENABLED": "0", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
DRIVER_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    def __init__(self, root: Path):
        self.root = root  # short: Ray's Unix socket paths under it must stay under 108 bytes
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[subprocess.Popen] = []

    def _start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "wb")
        env = {k: v for k, v in os.environ.items() if k not in DRIVER_ENV}  # the drivers' switch stops `ray start`
        env.update(NO_PHONING_HOME, GLOO_SOCKET_IFNAME="lo")  # gloo's own sockets on loopback too
        proc = subprocess.Popen([sys.executable, "-c", START_RAY, "start", *args, "--num-cpus", "1",
                                 "--temp-dir", str(self.root / name), "--disable-usage-stats", "--block"],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        self.nodes.append(proc)
        deadline = time.monotonic() + 120
        while b"Ray runtime started" not in (self.root / f"{name}.log").read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray node {name} did not start:\n"
                                   + (self.root / f"{name}.log").read_text(errors="replace")[-3000:])
            time.sleep(0.2)
        return proc

    def start(self) -> "LocalCluster":
        try:
            self._start("head", "--head", "--node-ip-address", "127.0.0.1", "--port", str(self.port),
                        "--ray-client-server-port", str(free_port()), "--include-dashboard", "false")
            self._start("node2", "--address", self.address, "--node-ip-address", "127.0.0.2")
        except BaseException:
            self.stop()  # a head whose second node failed to start
            raise
        return self

    def sessions(self) -> set[int]:
        return {proc.pid for proc in self.nodes}  # each node's `ray start` leads a session

    def processes(self, title: str = "") -> list[int]:
        """The PIDs of this cluster's processes (its sessions), those whose command line starts
        with `title` (e.g. "ray::RayTrainWorker") when given."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if int(fields[3]) in self.sessions() and fields[0] != "Z" and cmdline.startswith(title):
                found.append(int(entry))
        return found

    def stop(self) -> None:
        """SIGTERM each node's process group, then SIGKILL whatever of its sessions is left (actors
        Ray started in groups of their own)."""
        for proc in self.nodes:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5  # `ray start --block` drains for up to 30 s: not needed here
        while any(p.poll() is None for p in self.nodes) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.nodes:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self.root, ignore_errors=True)


def start_cluster() -> LocalCluster:
    return LocalCluster(Path(tempfile.mkdtemp(prefix="afray-"))).start()
