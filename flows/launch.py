"""Run a stage's processes from a Prefect task, under torchrun or as a Ray Train run
(stages/ray_job.py, the Ray driver): a child process group whose output streams into the
task's logger, polled so task timeouts and cancellation still work, and killed whole when the
task ends for any reason. Killing the Ray driver ends its Ray job, and Ray then stops the job's
workers on every node."""
from __future__ import annotations

import collections
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from alignflow.stages import failures, lifeline, storage
from alignflow.stages.lifeline import stop_process_group
from alignflow.stages.config import PipelineConfig


class StageProcessError(RuntimeError):
    """The stage's processes exited non-zero; the message carries the exit code and log tail.
    `permanent`: a rank failed in a way a retry cannot fix (stages.failures)."""

    def __init__(self, message: str, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


def torchrun_command(stage: str, config_file: Path, parent: str | None, out_dir: str, nproc: int,
                     nnodes: int, run_id: str, preset: str, log_dir: Path,
                     inputs: dict[str, str] | None = None) -> list[str]:
    # --tee 3: every rank's stdout and stderr, each line prefixed "[default<rank>]:", so the
    # Prefect log shows which rank printed what; --log-dir keeps each rank's files whole.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--tee", "3", "--log-dir", str(log_dir)]
    if nnodes == 1:
        cmd.append("--standalone")  # rendezvous on a free localhost port
    else:
        endpoint = os.environ.get("ALIGNFLOW_RDZV_ENDPOINT")
        if not endpoint:
            raise ValueError(f"nnodes={nnodes} needs ALIGNFLOW_RDZV_ENDPOINT=host:port (the rendezvous of all nodes)")
        cmd += ["--nnodes", str(nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", run_id]
    return cmd + ["-m", "alignflow.stages", *stage_arguments(stage, config_file, parent, out_dir, preset, inputs)]


def ray_command(stage: str, config_file: Path, parent: str | None, out_dir: str, preset: str,
                inputs: dict[str, str] | None = None) -> list[str]:
    """The Ray driver of one stage (stages/ray_job.py): it submits the stage's Ray Train run to
    the cluster at `ray.address` and waits for it."""
    return [sys.executable, "-m", "alignflow.stages.ray_job",
            *stage_arguments(stage, config_file, parent, out_dir, preset, inputs)]


def stage_arguments(stage: str, config_file: Path, parent: str | None, out_dir: str, preset: str,
                    inputs: dict[str, str] | None) -> list[str]:
    """What `python -m alignflow.stages` (and the Ray driver) take after the module's name."""
    args = [stage, "--preset", preset, "--config", str(config_file), "--out", str(out_dir)]
    if parent:
        args += ["--parent", parent]
    for name, path in (inputs or {}).items():
        args += ["--input", f"{name}={path}"]
    return args


TORCH_RANK_PREFIX = re.compile(r"^\[rank\d+\]: ?")  # what torch prepends to an exception's lines


def rank_tracebacks(log_dir: Path, max_lines: int = 40) -> str:
    """Each local rank's stderr from its last "Traceback" on, read from the per-rank files of
    torchrun's `--log-dir` after it exited: complete even where the live `--tee` stream lost a
    dying rank's last lines. A failed stage shows the failing rank's error, not only torchrun's
    summary."""
    report = []
    for path in sorted(log_dir.glob("*/attempt_*/*/stderr.log")):
        lines = [TORCH_RANK_PREFIX.sub("", line) for line in path.read_text(errors="replace").splitlines()]
        starts = [i for i, line in enumerate(lines) if line.startswith("Traceback")]
        if starts:
            block = lines[starts[-1]:][:max_lines]
            report.append(f"\nlocal rank {path.parent.name} ({path.parent.parent.name}):\n" + "\n".join(block))
    return "".join(report)


def _pump(stream, lines: queue.Queue) -> None:
    """Lines of torchrun's output, each as its final state: a progress bar redraws itself with
    carriage returns, so only what follows the last one is what a terminal would show."""
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace").rstrip("\r\n").rsplit("\r", 1)[-1]
        lines.put(line)
    lines.put(None)


# The Ray driver prints its workers' lines as they come: each one, uncoloured.
RAY_DRIVER_ENV = {"RAY_DEDUP_LOGS": "0", "RAY_COLOR_PREFIX": "0"}


def run_stage_processes(stage: str, config: PipelineConfig, parent: str | None, out_ref: str, logger,
                        inputs: dict[str, str] | None = None, poll_seconds: float = 0.5, tail_lines: int = 20) -> None:
    """Launch (torchrun or the Ray driver, by `train.launcher`), stream, wait; raise
    StageProcessError with the tail of the log on failure. `out_ref` is the stage directory (a
    path or an fsspec URL, which rank 0 publishes to); `inputs` the run's stages it reads besides
    its parent ({stage: directory})."""
    t = config.stage(stage).train
    local = storage.local_dir(out_ref)
    local.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="alignflow-launch-"))  # ours: removed when the launcher ends
    config_file = log_dir / "config.json"
    config_file.write_text(json.dumps(config.model_dump(mode="json"), indent=2))
    on_ray = t.resolved_launcher == "ray"
    if on_ray:
        what = "the Ray driver"
        cmd = ray_command(stage, config_file, parent, out_ref, config.preset, inputs)
    else:
        what = "torchrun"
        cmd = torchrun_command(stage, config_file, parent, out_ref, t.nproc_per_node, t.nnodes,
                               config.resolved_run_id(), config.preset, log_dir, inputs)
    logger.info("launching: %s", " ".join(cmd))
    # Its own session: a Ctrl-C in the terminal reaches only us, and we stop the group (finally
    # below); the ranks (or the Ray driver) watch our PID in case we are killed outright
    # (stages.lifeline). Bytes, split on newlines only: text mode would turn every carriage
    # return into a line.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", lifeline.ENV: str(os.getpid()),
                                 failures.FAILURE_DIR_ENV: str(log_dir), **(RAY_DRIVER_ENV if on_ray else {})})
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
    reader.start()
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    try:
        eof = False
        while not eof:
            try:
                line = lines.get(timeout=poll_seconds)
            except queue.Empty:
                continue  # returning to Python here lets a task timeout or cancellation interrupt us
            if line is None:
                eof = True
                continue
            tail.append(line)
            logger.info(line)
        while proc.poll() is None:
            time.sleep(poll_seconds)
    finally:  # also when a task timeout, a cancellation or Ctrl-C interrupts us: nothing is left behind
        stop_process_group(proc)
        tracebacks = rank_tracebacks(log_dir) if proc.returncode != 0 else ""
        permanent = failures.permanent_reasons(log_dir)
        said = failures.summary(log_dir)
        shutil.rmtree(log_dir, ignore_errors=True)
    if proc.returncode != 0:
        reason = f" {said}" if said else f" {permanent[0]}" if permanent else ""
        raise StageProcessError(f"stage {stage} failed: {what} exited with code {proc.returncode}.{reason}"
                                + tracebacks + "\nLast lines:\n" + "\n".join(tail), permanent=bool(permanent))
