"""`alignflow`: run the pipeline, re-run one stage, evaluate, sample, list runs, deploy."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from alignflow.stages import aligners, algorithms, children

EPILOG = """examples:
  alignflow run                                   # tiny preset, demo data, pretrain -> sft -> dpo
  alignflow run --align grpo --set grpo.beta=0.0  # GRPO instead of DPO, no KL term
  alignflow run --force dpo --set dpo.beta=0.3    # redo only DPO (completed stages are skipped)
  alignflow stage dpo --parent runs/tiny/sft --set dpo.beta=0.5
  alignflow eval runs/tiny/dpo
  alignflow generate runs/tiny/sft --prompt "What is 3 plus 4?"
  alignflow run --model /models/Qwen2.5-0.5B --start sft --preset hf-small \
      --set sft.data.source=chat.jsonl --set dpo.data.source=prefs.jsonl
  alignflow runs
  alignflow deploy --runs-dir s3://bucket/runs    # pools + deployments on $PREFECT_API_URL
  alignflow job-preview --var gpu_count=8         # the Kubernetes job a GPU run would get
"""


class Registered(Sequence):
    """argparse choices read from the algorithm registry only when argparse looks at them (a
    value to check, a command's --help): loading the algorithms imports torch, and `alignflow
    --help` or `alignflow runs` should not wait for it. Give the argument a metavar, or argparse
    reads the choices as it is declared."""

    def __init__(self, names: Callable[[], Iterable[str]]):
        self.names = names

    def __getitem__(self, i):
        return list(self.names())[i]

    def __len__(self) -> int:
        return len(list(self.names()))


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="configuration preset (stages/presets/*.yaml): tiny, gpt2-small, hf-small "
                                    "(default: hf-small with --model DIR, else tiny)")
    p.add_argument("--config", metavar="FILE", help="YAML file laid over the preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, repeatable: --set sft.train.lr=3e-4 --set dpo.beta=0.2")
    p.add_argument("--run-id", help="run directory name under runs_dir (default: the preset's name)")
    p.add_argument("--runs-dir", help="where run directories go: a path or an fsspec URL such as s3://bucket/runs "
                                      "(default: ./runs)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignflow", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Pretraining -> SFT -> DPO or GRPO as one resumable Prefect pipeline. Without "
                    "PREFECT_API_URL, flows run on Prefect's embedded server; with it, on that server.")
    parser.add_argument("--debug", action="store_true", default=bool(os.environ.get("ALIGNFLOW_DEBUG")),
                        help="show tracebacks of errors that are otherwise one line (also: ALIGNFLOW_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the full pipeline", description=(
        "Run pretrain -> sft -> the alignment stage (--align) into RUNS_DIR/RUN_ID/<stage>/. Stages whose output is "
        "already complete for the same config and parent are skipped; a failed stage is retried "
        "(config.retries) and resumes from its last checkpoint. Writes RUNS_DIR/RUN_ID/report.md."))
    add_config_args(p)
    p.add_argument("--model", help="a Hugging Face model directory to start from, or a built-in preset (tiny, "
                                   "gpt2-small; default: the preset's)")
    p.add_argument("--start", choices=Registered(algorithms), metavar="STAGE", help=(
        "the first stage: %(choices)s (default pretrain; with a Hugging Face model: sft, or pretrain to continue "
        "pretraining it)"))
    p.add_argument("--align", choices=Registered(lambda: [*aligners(), "none"]), default="dpo", metavar="STAGE",
                   help="the alignment stage: %(choices)s (default: dpo)")
    p.add_argument("--force", nargs="+", default=[], metavar="STAGE", help="re-run these stages even if complete")

    p = sub.add_parser("stage", help="re-run one stage against an earlier run's checkpoint", description=(
        "Run one stage on PARENT (an earlier run's checkpoint directory of the stage's parent: pretrain "
        "for sft, sft for the aligners, and also pretrain for orpo; or a Hugging Face model directory) "
        "into a new run directory whose manifest records the parent and its hash."))
    p.add_argument("name", choices=Registered(children), metavar="STAGE", help="the stage to run: %(choices)s")
    p.add_argument("--parent", required=True, help="the parent stage's checkpoint directory (path or fsspec URL)")
    add_config_args(p)

    p = sub.add_parser("eval", help="verify a checkpoint directory (or hash a Hugging Face model directory) and "
                                    "evaluate it on the eval section's sets and lm-eval tasks", description=(
        "Evaluate DIR (a stage directory of a run, or a Hugging Face model directory, evaluated as an sft stage) "
        "on the config's eval.sets and eval.lm_eval, without training anything. A stage directory's numbers are "
        "recorded in its eval.json, where the report and the next `alignflow run` find them."))
    p.add_argument("dir")
    add_config_args(p)

    p = sub.add_parser("generate", help="sample from a checkpoint directory or a Hugging Face model directory")
    p.add_argument("dir")
    add_config_args(p)
    p.add_argument("--prompt", action="append", required=True, help="a user message; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("runs", help="list runs, their stages and headline metrics")
    p.add_argument("--runs-dir", default="runs", help="a path or an fsspec URL (default: ./runs)")

    sub.add_parser("presets", help="list the configuration presets and model sizes")

    p = sub.add_parser("deploy", help="create the work pools and the deployments of deploy/prefect.yaml", description=(
        "On the Prefect server at PREFECT_API_URL: create (or update) the work pools alignflow-process and "
        "alignflow-k8s (deploy/k8s-job-template.json), then run `prefect deploy` on deploy/prefect.yaml. "
        "Safe to repeat. See deploy/README.md."))
    p.add_argument("--runs-dir", help="runs directory the deployments default to (path or fsspec URL; default "
                                      "$ALIGNFLOW_RUNS_DIR or <project>/runs)")
    p.add_argument("--schedules-active", action="store_true",
                   help="switch the deployments' cron schedules on (default: $ALIGNFLOW_SCHEDULES_ACTIVE or off)")
    p.add_argument("--image", help="image for the Kubernetes deployment (default: $ALIGNFLOW_IMAGE or alignflow:latest)")
    p.add_argument("--name", action="append", metavar="FLOW/DEPLOYMENT",
                   help="deploy only these (e.g. alignment-pipeline/nightly); default: all")
    p.add_argument("--pools-only", action="store_true", help="create the work pools, no deployments")

    p = sub.add_parser("job-preview", help="render a work pool's job template as a worker would",
                       description="Print the job configuration (for alignflow-k8s: the Kubernetes Job manifest) "
                                   "that the pool's worker would submit with these job variables.")
    p.add_argument("--pool", default="alignflow-k8s")
    p.add_argument("--var", dest="job_variables", action="append", default=[], metavar="KEY=VALUE",
                   help="a job variable, value read as YAML: --var gpu_count=8 --var shm_size=32Gi")
    return parser


def resolve_config(args):
    from alignflow.stages.config import load_config, parse_override

    overrides = dict(parse_override(item) for item in args.overrides)
    # Names, not YAML: --run-id 2024 is the string "2024".
    named = (("run_id", args.run_id), ("runs_dir", args.runs_dir), ("model", getattr(args, "model", None)),
             ("start", getattr(args, "start", None)))
    overrides.update({key: value for key, value in named if value})
    if args.command != "run":
        # `start` is `run`'s first stage, from the model given with --model. The other commands
        # name their own model directory (stage: --parent; eval, generate: DIR), so a preset's
        # start (hf-small's sft, which needs --model) does not apply to them.
        from alignflow.stages.algorithm import roots

        overrides["start"] = roots()[0]
    model = getattr(args, "model", None)
    preset = args.preset or ("hf-small" if model and Path(model).is_dir() else "tiny")
    return load_config(preset, args.config, overrides)


def cmd_run(args) -> int:
    from alignflow.stages.storage import local_dir

    from .pipeline import alignment_pipeline

    out = alignment_pipeline(config=resolve_config(args), align=args.align, force=args.force)
    print((local_dir(out["run_dir"]) / "report.md").read_text())
    return 0


def cmd_stage(args) -> int:
    from alignflow.stages import check_parent, storage

    from .pipeline import new_run_id, run_stage

    parent = args.parent if storage.is_url(args.parent) else str(Path(args.parent).resolve())
    config = resolve_config(args)
    if not args.run_id:  # chosen here, so an interrupted re-run can be resumed by name
        manifest = storage.read_manifest(parent, verify=True)  # a plain Hugging Face model directory too
        check_parent(args.name, manifest, parent)
        args.run_id = new_run_id(config.runs_dir, manifest, args.name)
    out = run_stage(stage=args.name, config=config, parent=parent, run_id=args.run_id)
    print((storage.local_dir(out["run_dir"]) / "report.md").read_text())
    return 0


def resume_hint(args) -> str:
    """What an interrupted `run` or `stage` left, and the command that continues it."""
    from alignflow.stages import chain, storage

    from .pipeline import resume_point

    try:
        config = resolve_config(args)
        if args.command == "run":
            run_id, again = config.resolved_run_id(), "Re-running the same command"
            stages = chain(None if args.align == "none" else args.align, config.start, config)
        else:
            run_id, stages, again = args.run_id, [args.name], f"Re-running it with --run-id {args.run_id}"
        point = resume_point(storage.join(config.runs_dir, run_id), stages)
    except Exception:  # the hint must never hide the interruption itself
        return "Re-running the same command resumes from the last checkpoint."
    if point is None:
        return f"Every stage of {run_id} is complete."
    stage, step = point
    where = f"from step {step} (its last checkpoint)" if step is not None else "from the start (no checkpoint yet)"
    return f"{stage} of run {run_id} was not finished; {again} resumes it {where}."


def cmd_eval(args) -> int:
    from alignflow.stages import eval_record, storage
    from alignflow.stages.evaluation import METRICS

    config = resolve_config(args)
    manifest = storage.read_manifest(args.dir, verify=True)
    what = "a Hugging Face model directory, files hashed" if manifest.get("external") else \
        f"{manifest['stage']} stage, sha256 verified"
    print(f"{args.dir}: {what}")
    record = eval_record.evaluate_directory(args.dir, config)
    for name, got in record["sets"].items():
        shown = ", ".join(f"{key} {got[key]:.4g}" for key, _ in METRICS if key in got)
        print(f"  {name}: {shown} ({got['prompts']} prompts)")
    for task, got in record["lm_eval"].items():
        print(f"  lm-eval {task}: " + ", ".join(f"{k} {v:.4g}" for k, v in got.items()))
    if not record["sets"] and not record["lm_eval"]:
        print("  no evaluation set applies to it: give eval.sets (or eval.lm_eval) with --config or --set")
    if not manifest.get("external"):
        print(f"  recorded in {storage.join(args.dir, 'eval.json')}")
    print("  training metrics: " + json.dumps({k: v for k, v in manifest["metrics"].items()
                                              if isinstance(v, float)}, indent=None))
    return 0


def cmd_generate(args) -> int:
    import torch

    from alignflow.models import REWARD, generate_text, prompt_ids
    from alignflow.stages import handoff, storage

    model, tok, manifest = handoff.load_stage(storage.localize(args.dir), options=resolve_config(args).hf)
    if manifest.get("model_kind") == REWARD:
        raise ValueError(f"{args.dir} holds a reward model: it scores a conversation, it does not generate one (GRPO "
                         "reads it as grpo.reward_models; transformers loads it with AutoModelForSequenceClassification)")
    prompts = [prompt_ids(tok, [{"role": "user", "content": p}]) for p in args.prompt]
    out = generate_text(model, tok, prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, generator=torch.Generator().manual_seed(args.seed))
    for prompt, text in zip(args.prompt, out.texts):
        print(f"> {prompt}\n{text}\n")
    return 0


def cmd_runs(args) -> int:
    from alignflow.flows.eval_report import headline_text
    from alignflow.flows.report import headline
    from alignflow.stages import eval_record, handoff, storage

    runs = storage.subdirs(args.runs_dir)
    if not runs:
        print(f"no runs in {args.runs_dir}")
    for run in runs:
        print(run)
        for stage in storage.subdirs(storage.join(args.runs_dir, run)):
            try:
                m = storage.read_manifest(storage.join(args.runs_dir, run, stage))
            except handoff.StageDirError:
                print(f"  {stage:9s} incomplete")
                continue
            shown = [f"{label} {text}" for label, text in headline(m["stage"], m["metrics"])]
            shown += headline_text({"evaluation": eval_record.read_record(storage.join(args.runs_dir, run, stage))})
            parent = m.get("parent") or {}
            lineage = f"  <- {parent['path']}" if parent.get("path") else ""
            print(f"  {stage:9s} " + ", ".join(shown) + lineage)
    return 0


def cmd_presets(args) -> int:
    from alignflow.models import PRESETS
    from alignflow.stages.config import PRESET_DIR, load_config

    for path in sorted(PRESET_DIR.glob("*.yaml")):
        try:
            cfg = load_config(path.stem)
        except ValueError:  # it starts from a model the user gives
            print(f"{path.stem:12s} settings for a Hugging Face model given with --model DIR")
            continue
        size = PRESETS[cfg.model].num_parameters() / 1e6
        print(f"{path.stem:12s} model {cfg.model} ({size:.1f}M params before the vocabulary is set), "
              f"tokenizer vocab {cfg.vocab_size}")
    return 0


def cmd_deploy(args) -> int:
    from . import deploy

    env = deploy.deploy_env(args.runs_dir, args.schedules_active, args.image)  # fails first without a server
    for line in deploy.ensure_pools():
        print(line)
    if not args.pools_only:
        deploy.prefect_deploy(env, args.name)
        print(f"deployed {', '.join(args.name) if args.name else 'every deployment'} of {deploy.PREFECT_FILE}")
    return 0


def cmd_job_preview(args) -> int:
    from alignflow.stages.config import parse_override

    from . import deploy

    job_variables = dict(parse_override(item, "--var") for item in args.job_variables)
    print(json.dumps(deploy.preview_job(args.pool, job_variables), indent=2))
    return 0


COMMANDS = {"run": cmd_run, "stage": cmd_stage, "eval": cmd_eval, "generate": cmd_generate,
            "runs": cmd_runs, "presets": cmd_presets, "deploy": cmd_deploy, "job-preview": cmd_job_preview}


FLOW_COMMANDS = ("run", "stage")  # the ones that need a Prefect server


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so every `finally` (the run lock, the
    torchrun process group, the embedded server) runs on the way out."""


_received: list[int] = []  # the signals this command's handlers ran for


def _terminate(signum, frame):
    _received.append(signum)
    raise Interrupted()


def _interrupt(signum, frame):
    """Ctrl-C or `kill -INT`: Python's own KeyboardInterrupt, and a note that it came. Prefect's
    flow engine swallows a KeyboardInterrupt raised once the flow run is final (it logs it at
    debug level and returns the result), so main reads the note too and still ends the command
    as interrupted."""
    _received.append(signum)
    raise KeyboardInterrupt()


def stop_on_sigint() -> Callable | int | None:
    """Install `_interrupt` for SIGINT; returns the handler it replaces. Also where SIGINT was
    inherited ignored: a non-interactive shell starts a background job (`alignflow run &` in a
    script, a CI step) with SIGINT ignored, Python then installs no handler at all, and a
    `kill -INT` was lost: the run trained to the end and exited 0. Whoever sends SIGINT to this
    process means it."""
    _received.clear()
    return signal.signal(signal.SIGINT, _interrupt)


class OneLineErrors(logging.Filter):
    """A failure a retry cannot fix (bad data, a bad setting: stages.failures) is logged as its
    one-line message; its traceback through Prefect's engine helps nobody. --debug keeps it."""

    def filter(self, record: logging.LogRecord) -> bool:
        from alignflow.stages.failures import is_permanent

        if record.exc_info and record.exc_info[1] is not None and is_permanent(record.exc_info[1]):
            record.exc_info = record.exc_text = None
        return True


def quiet_prefect_tracebacks() -> None:
    # On the loggers, not their handlers: Prefect installs its handlers when a flow starts.
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, OneLineErrors) for f in logger.filters):
            logger.addFilter(OneLineErrors())


def main(argv: list[str] | None = None) -> int:
    previous_sigint = stop_on_sigint()  # first: parsing a stage's name already imports torch
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGINT, previous_sigint)


def _main(argv: list[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)  # a stage's name loads the algorithms, plugins too
    except (RuntimeError, TypeError, ValueError) as e:  # an algorithm plugin that cannot load
        print(f"alignflow: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("alignflow: interrupted.", file=sys.stderr)
        return 130
    try:
        if args.command not in FLOW_COMMANDS:
            code = COMMANDS[args.command](args)
        else:
            from .embedded_server import serving

            if not args.debug:
                quiet_prefect_tracebacks()

            previous = signal.signal(signal.SIGTERM, _terminate)
            try:
                with serving():
                    code = COMMANDS[args.command](args)
            finally:
                signal.signal(signal.SIGTERM, previous)
        if _received:  # a signal whose KeyboardInterrupt something swallowed (see _interrupt)
            raise Interrupted() if signal.SIGTERM in _received else KeyboardInterrupt()
        return code
    except KeyboardInterrupt as e:
        print(f"alignflow {args.command}: interrupted. {resume_hint(args)}", file=sys.stderr)
        return 143 if isinstance(e, Interrupted) else 130
    except (ValueError, RuntimeError, OSError) as e:
        if args.debug:
            traceback.print_exc()
        from alignflow.stages.failures import one_line

        print(f"alignflow {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
