"""`python -m alignflow.stages.ray_job <stage> --config FILE --parent DIR --out DIR`: one stage's
training as a Ray Train run on a Ray cluster (`train.launcher: ray`).

This is the Ray driver the flow launches instead of torchrun (flows/launch.py): it connects to
the cluster at `ray.address` (or $RAY_ADDRESS), starts `nnodes x nproc_per_node` Ray Train
workers there, and waits. Each worker runs the stage exactly as a torchrun rank does
(`stages.run.train_stage`): Ray Train sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR and has
joined the process group (gloo on CPU, NCCL on GPUs) before the stage starts. Their lines reach
the driver's stdout, rank-prefixed, and so the task's Prefect log. The driver's Ray job owns the
workers: when the driver ends, however it ends (the flow stops its process group on a
cancellation, a Ctrl-C or a task timeout), Ray stops them on every node."""
from __future__ import annotations

import logging
import os
import re
import socket
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from . import failures, lifeline, storage
from .__main__ import parsed, stage_config, stage_parser

log = logging.getLogger("alignflow.ray")
# What the workers' environment takes from the driver's: where caches and offline switches point.
PASSED_ENV_PREFIXES = ("ALIGNFLOW_", "HF_", "TRANSFORMERS_")


class ClusterUnreachable(RuntimeError):
    """Nothing answers at the cluster's address (retried: the cluster may be starting)."""


class NotANode(RuntimeError):
    """A Ray driver runs on a node of its cluster; this machine is not one (a retry here cannot help)."""
    permanent = True


def cluster_address(configured: str | None) -> str:
    address = configured or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ValueError("train.launcher: ray needs a Ray cluster: set ray.address (its head's host:port, e.g. "
                         "10.0.0.5:6379) or RAY_ADDRESS")
    return address


def wait_until_answering(address: str, timeout_s: float) -> None:
    """A TCP connect to host:port until it answers, at most `timeout_s`: `ray.init` itself retries
    an address nobody answers for minutes. `auto` and ray:// addresses are left to Ray."""
    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"ray.address {address!r} is not host:port (e.g. 127.0.0.1:6379), 'auto' or a ray:// URL")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=min(5.0, timeout_s)):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ClusterUnreachable(
                    f"no Ray cluster answers at {address} (ray.address) after {timeout_s:g} s: {e.strerror or e}; "
                    "start one (ray start --head) or fix the address") from None
            time.sleep(0.5)


@contextmanager
def watchdog(seconds: float, line: str):
    """Ends this process with `line` (its failure, permanent) when the block has not finished
    within `seconds`: for calls that block in Ray's C++ code, where no Python signal lands."""
    done = threading.Event()

    def expire() -> None:
        if not done.wait(seconds):
            failures.mark_permanent(NotANode(line), 0)
            failures.leave_summary(line)
            print(f"python -m alignflow.stages.ray_job: error: {line}", file=sys.stderr, flush=True)
            os._exit(1)

    threading.Thread(target=expire, name="alignflow-ray-connect", daemon=True).start()
    try:
        yield
    finally:
        done.set()


def placement(nnodes: int, nproc_per_node: int) -> str:
    """One node: every worker on it. One worker per node: each on its own node. Both more than
    one: packed, so each node fills with its GPUs' workers (Ray cannot pin exactly k per node)."""
    if nnodes == 1:
        return "STRICT_PACK"
    return "STRICT_SPREAD" if nproc_per_node == 1 else "PACK"


def worker_main(job: dict) -> None:
    """One Ray Train worker: the stage, as a torchrun rank runs it."""
    import ray
    import ray.train

    from .config import PipelineConfig
    from .run import train_stage

    context = ray.train.get_context()
    rank = context.get_world_rank()
    progress = logging.getLogger("alignflow")
    progress.setLevel(logging.INFO)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"[rank{rank}]:%(message)s"))  # as torchrun's --tee prefixes
    progress.handlers = [handler]
    progress.propagate = False
    log.info("rank %d of %d on Ray node %s (%s), node rank %d", rank, context.get_world_size(),
             ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(), context.get_node_rank())
    train_stage(job["stage"], PipelineConfig.model_validate(job["config"]), job["parent"], job["out"], job["inputs"])


def absolute(ref: str | None) -> str | None:
    """A path as every worker reads it (their working directory is Ray's); URLs as they are."""
    return ref if ref is None or storage.is_url(ref) else str(Path(ref).resolve())


def failed_ranks(error: BaseException) -> dict[int, BaseException]:
    """{rank: what it raised} of a failed Ray Train run (the original exception where Ray kept it)."""
    found = getattr(error, "worker_failures", None) or {}
    return {rank: getattr(err, "cause", None) or err for rank, err in found.items()}


def first_line(error: BaseException, limit: int = 300) -> str:
    text = failures.one_line(error).strip()
    line = f"{type(error).__name__}: " + (text.splitlines()[0] if text else "(no message)")
    return line if len(line) <= limit else line[:limit] + " ..."


def what_happened(rank: int, error: BaseException) -> str:
    """`rank 1 died on node 10.0.0.7 (pid 4242) ...` when its process (or node) is gone, which Ray
    reports as a failed health check whose cause names the actor's address; else the rank's error."""
    died = getattr(error, "health_check_failure", None)
    if died is None:
        return f"rank {rank}: {first_line(error)}"
    text = str(died)
    ip, pid = re.search(r"\bip: (\S+)", text), re.search(r"\bpid: (\d+)", text)
    where = (f" on node {ip[1]}" if ip else "") + (f" (pid {pid[1]})" if pid else "")
    return f"rank {rank} died{where}: its process was killed or crashed, or its node was lost"


def failure_line(stage: str, error: BaseException) -> str:
    """One line over every failed rank, the dead ones first: the others' errors (a broken
    collective) usually follow from them."""
    ranks = failed_ranks(error)
    order = sorted(ranks, key=lambda r: (getattr(ranks[r], "health_check_failure", None) is None, r))
    said = [what_happened(rank, ranks[rank]) for rank in order] or [first_line(error)]
    return f"{stage} failed on Ray: " + "; ".join(said)


def run(argv: list[str] | None = None) -> int:
    ap = stage_parser("python -m alignflow.stages.ray_job", __doc__)
    args, inputs = parsed(ap, argv)
    lifeline.watch()  # end with the flow that launched us; our Ray job's workers end with us
    config = stage_config(args)
    t, settings = config.stage(args.stage).train, config.ray
    address = cluster_address(settings.address)
    wait_until_answering(address, settings.connect_timeout_s)

    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    passed = {k: v for k, v in os.environ.items() if k.startswith(PASSED_ENV_PREFIXES)}
    not_a_node = (f"the Ray cluster at {address} answers, but this machine could not join it as a driver, which must "
                  f"run on a node of the cluster: run the flow on a node, or make this machine one without resources "
                  f"(ray start --address {address} --num-cpus 0 --num-gpus 0; the Kubernetes deployment does: "
                  f"deploy/README.md)")
    # ray.init retries for minutes where it cannot join; a bounded wait is ours.
    with watchdog(settings.connect_timeout_s, f"{not_a_node}; ray.init did not return within "
                                              f"{settings.connect_timeout_s:g} s (ray.connect_timeout_s)"):
        try:
            # Ray Train's print patch would reroute every print() of the workers, even a library's
            # print(..., file=buffer): a `dis` listing came out in the log.
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True,
                     runtime_env={"env_vars": {**passed, "PYTHONUNBUFFERED": "1",
                                               "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}})
        except ConnectionError as e:  # Ray's own, after its address answered
            raise NotANode(f"{not_a_node}. Ray said: {str(e).splitlines()[0]}") from None
    use_gpu = settings.use_gpu if settings.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    workers = t.nnodes * t.nproc_per_node
    job = {"stage": args.stage, "config": config.model_dump(mode="json"), "parent": absolute(args.parent),
           "out": absolute(args.out), "inputs": {k: absolute(v) for k, v in inputs.items()}}
    print(f"{args.stage}: {workers} Ray Train workers ({t.nnodes} nodes x {t.nproc_per_node}, "
          f"{'GPU, nccl' if use_gpu else 'CPU, gloo'}) on the cluster at {address}", flush=True)
    with tempfile.TemporaryDirectory(prefix="alignflow-ray-") as records:  # Ray Train's own run records
        trainer = TorchTrainer(
            worker_main, train_loop_config=job,
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": settings.cpus_per_worker},
                                         placement_strategy=placement(t.nnodes, t.nproc_per_node)),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            run_config=RunConfig(name=f"alignflow-{config.resolved_run_id()}-{args.stage}-{os.getpid()}",
                                 storage_path=records,
                                 failure_config=FailureConfig(max_failures=settings.max_failures)))
        try:
            trainer.fit()
        except Exception as e:
            ranks = failed_ranks(e)
            for rank, error in ranks.items():
                failures.mark_permanent(error, rank)
            for rank, error in sorted(ranks.items()):  # each rank's whole error (a traceback) in the log
                print(f"\nrank {rank}: {error}", file=sys.stderr)
            line = failure_line(args.stage, e)
            failures.leave_summary(line)
            print(line, file=sys.stderr, flush=True)
            return 1
    print(f"{args.stage}: the Ray Train run finished", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except KeyboardInterrupt:
        return 130
    except (ValueError, ClusterUnreachable, NotANode) as e:
        failures.mark_permanent(e, 0)
        failures.leave_summary(failures.one_line(e))  # the flow's error leads with it, retried or not
        print(f"python -m alignflow.stages.ray_job: error: {failures.one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
