"""An algorithm, declared once: everything the pipeline needs to train a stage with it.

    ALGORITHM = Algorithm(
        name="dpo", parent="sft", aligns=True,
        settings=DPOConfig,    # its config section `dpo:`, a StageConfig subclass
        trainer=DPOTrainer,    # a BaseTrainer subclass; its progress_metrics are the progress line's fields
        data=PAIRS,            # a DataKind: columns, row check, tokenisation, batches, demo rows
        recipe=train,          # recipe(stage: StageRun): load the model(s), build the trainer, train
        headline=(Headline("DPO val accuracy", "val_rewards/accuracies", cases="val_items"), ...),
        panels=(Panel("DPO accuracy", (("rewards/accuracies", "train"), ...)),),
    )

The stage graph, the configuration's sections (stages/config.py), the data a stage reads, the
demo rows, the report card and curves (flows/report.py), the CLI's choices and the Prefect
parameter types all derive from the registered declarations. The built-in ones are the modules
of alignflow.stages.recipes (pretrain, sft, rm, dpo, grpo, kto, orpo, simpo), each found there. Another package adds
its own through the entry point group `alignflow.algorithms`, which every process that imports
alignflow reads (the CLI, torchrun's ranks, Prefect workers and deployments):

    [project.entry-points."alignflow.algorithms"]
    slic = "my_package.slic:ALGORITHM"

`register_algorithm` adds one in the running process, before the configuration is first built.
docs/architecture.md, "Adding an algorithm", walks through one."""
from __future__ import annotations

import importlib
import keyword
import pkgutil
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from alignflow.trainers.base import BaseTrainer

    from .data import DataKind
    from .settings import StageConfig

ENTRY_POINTS = "alignflow.algorithms"
# The configuration's shared keys (stages/config.py: SharedConfig's fields; tests/test_config.py
# keeps the two in step) and `--align none`: no algorithm may take them as its name.
RESERVED = ("preset", "model", "start", "hf", "vocab_size", "runs_dir", "run_id", "device", "retries", "tracking",
            "tracking_uri", "tracking_experiment", "demo", "eval", "ray", "none")


@dataclass(frozen=True)
class Headline:
    """A row of the report card: `metric` under `label`; for a rate, `cases` names the metric
    counting its cases, and the cell reads `87.0% (40/46)`."""
    label: str
    metric: str
    cases: str | None = None


@dataclass(frozen=True)
class Panel:
    """A panel of a stage's curves.png: (metric, line label) pairs drawn against the step."""
    title: str
    lines: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Algorithm:
    name: str                            # the stage, its config section and its trainer's registered name
    settings: type[StageConfig]          # the section's model (its defaults: the stage's, before any preset)
    trainer: type[BaseTrainer]
    data: DataKind                       # what the stage reads
    recipe: Callable[..., None]          # recipe(stage: StageRun): models in, trainer built, trained
    parent: str | None = "sft"           # the stage whose output it trains on (None: it starts the graph)
    also_trains_on: tuple[str, ...] = ()  # other stages whose checkpoint `alignflow stage` may give it
    aligns: bool = False                 # an alignment stage, the pipeline's last: `alignflow run --align <name>`
    scores: bool = False                 # its model scores sequences (a reward model): it is not generated from
    headline: tuple[Headline, ...] = ()  # its report rows, beside evaluation's (task accuracy, ...)
    panels: tuple[Panel, ...] = ()       # its curves, after the loss panel every stage has


_registry: dict[str, Algorithm] = {}
_state = "unloaded"  # -> "loading" -> "loaded"
_frozen_by: str | None = None  # what built the configuration from the registry; later additions are refused


def register_algorithm(algorithm: Algorithm) -> Algorithm:
    """Add an algorithm (and its trainer, as `create_trainer(name)`). Refused once the
    configuration has been built from the registry: it could no longer hold the section."""
    from alignflow.trainers import BaseTrainer, register_trainer

    from .settings import StageConfig

    if _state == "unloaded":
        algorithms()  # the built-ins (and installed plugins) first: they keep the pipeline's order
    name = algorithm.name
    if not name.isidentifier() or keyword.iskeyword(name) or name in RESERVED:
        raise ValueError(f"algorithm name {name!r}: it names a config section, so it must be an identifier "
                         f"other than {', '.join(RESERVED)}")
    if not (isinstance(algorithm.settings, type) and issubclass(algorithm.settings, StageConfig)):
        raise TypeError(f"algorithm {name!r}: settings must be a StageConfig subclass, got {algorithm.settings!r}")
    if not (isinstance(algorithm.trainer, type) and issubclass(algorithm.trainer, BaseTrainer)):
        raise TypeError(f"algorithm {name!r}: trainer must be a BaseTrainer subclass, got {algorithm.trainer!r}")
    if algorithm.parent is not None and algorithm.parent not in _registry:
        raise ValueError(f"algorithm {name!r} trains on {algorithm.parent!r}, which no registered algorithm is "
                         f"(registered: {', '.join(_registry)})")
    unknown = [other for other in algorithm.also_trains_on if other not in _registry]
    if unknown:
        raise ValueError(f"algorithm {name!r} also trains on {unknown[0]!r}, which no registered algorithm is "
                         f"(registered: {', '.join(_registry)})")
    if _frozen_by and name not in _registry:
        raise RuntimeError(f"algorithm {name!r} registered after {_frozen_by} was built from the registry: "
                           f"register it before importing alignflow.stages.config, or install it as an "
                           f"entry point ({ENTRY_POINTS})")
    _registry[name] = algorithm
    register_trainer(name, algorithm.trainer)
    return algorithm


def algorithms() -> dict[str, Algorithm]:
    """Every algorithm by name, in pipeline order: each after its parent, built-ins before
    plugins, reward models first, then by name (pretrain, sft, rm, dpo, grpo, kto, orpo, simpo,
    then a plugin's)."""
    global _state
    if _state == "loading":  # an algorithm's module asked while the registry is being filled
        raise RuntimeError("the algorithms were asked for while they load: an algorithm's module must not use "
                           "the registry (or import alignflow.stages.config) when it is imported")
    if _state == "unloaded":
        _state = "loading"
        try:
            _load()
        except BaseException:
            _state = "unloaded"
            raise
        _state = "loaded"
    return dict(_registry)


def _load() -> None:
    from . import recipes as builtin

    found = [importlib.import_module(f"{builtin.__name__}.{m.name}").ALGORITHM
             for m in pkgutil.iter_modules(builtin.__path__)]
    plugins = [_plugin(point) for point in metadata.entry_points(group=ENTRY_POINTS)]
    for algorithm in _in_pipeline_order(found, plugins):
        register_algorithm(algorithm)


def _in_pipeline_order(builtin: list[Algorithm], plugins: list[Algorithm]) -> list[Algorithm]:
    """Parents before children; among those ready, built-ins first, then reward models (which
    other stages read), then by name."""
    every = [*builtin, *plugins]
    names = [a.name for a in every]
    if len(set(names)) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"two algorithms are named {', '.join(twice)}: a plugin's name must differ from the others'")
    rank = {a.name: (i >= len(builtin), not a.scores, a.name) for i, a in enumerate(every)}
    waiting, ordered = {a.name: a for a in every}, []
    while waiting:
        ready = [a for a in waiting.values() if a.parent is None or a.parent in {o.name for o in ordered}]
        if not ready:
            names = ", ".join(f"{a.name} (on {a.parent})" for a in waiting.values())
            raise ValueError(f"these algorithms train on a parent no registered algorithm is: {names}")
        ordered.append(min(ready, key=lambda a: rank[a.name]))
        del waiting[ordered[-1].name]
    return ordered


def _plugin(point: metadata.EntryPoint) -> Algorithm:
    where = f"entry point {point.name} = {point.value} ({ENTRY_POINTS})"
    try:
        algorithm = point.load()
    except Exception as e:  # whatever the plugin's import raises: name the plugin and the way out
        raise RuntimeError(f"{where} failed to load: {type(e).__name__}: {e} (fix or uninstall that package)") from e
    if not isinstance(algorithm, Algorithm) or algorithm.name != point.name:
        raise TypeError(f"{where} is not an Algorithm named {point.name!r}")
    return algorithm


def freeze(what: str) -> dict[str, Algorithm]:
    """The registry, closed to new algorithms from now on because `what` was built from it."""
    global _frozen_by
    found = algorithms()
    _frozen_by = _frozen_by or what
    return found


def get_algorithm(name: str) -> Algorithm:
    found = algorithms()
    if name not in found:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(found)}")
    return found[name]


# ---- the stage graph ----

def roots() -> tuple[str, ...]:
    """The stages that start the graph (no parent): a built-in model is trained from scratch there."""
    return tuple(name for name, a in algorithms().items() if a.parent is None)


def aligners() -> tuple[str, ...]:
    """The stages `alignflow run --align` chooses from."""
    return tuple(name for name, a in algorithms().items() if a.aligns)


def children() -> tuple[str, ...]:
    """The stages that can re-run on a parent (`alignflow stage`)."""
    return tuple(name for name, a in algorithms().items() if a.parent)


def ancestors(name: str) -> list[str]:
    """`name`'s parent, its parent's parent, ..., root first."""
    found, chain = algorithms(), []
    while found[name].parent:
        name = found[name].parent
        chain.insert(0, name)
    return chain


def chain(align: str | None, start: str | None = None, config=None) -> list[str]:
    """The pipeline's stages in order, each after its parent and the stages it reads: `align` and
    its ancestors, or with align None the stages every alignment stage builds on, plus the stages
    their settings read besides the parent (with `config`: grpo.reward_model=rm adds rm and its
    ancestors); from `start` on (a run from a Hugging Face model may skip pretraining, or go
    straight to alignment), which trains on the run's base model and is followed only by its
    own descendants."""
    if align is None:
        wanted = {s for a in aligners() for s in ancestors(a)}
    else:
        wanted = {*ancestors(align), align}
    todo = list(wanted)
    while todo:
        for other in inputs_of(todo.pop(), config):
            new = {*ancestors(other), other} - wanted
            wanted |= new
            todo += new
    names = _upstream_first(wanted, config)
    start = start or names[0]
    if start not in names:
        raise ValueError(f"start: {start} is not a stage of the pipeline {' -> '.join(names)}")
    return [name for name in names if name == start or start in ancestors(name)]


def inputs_of(name: str, config) -> tuple[str, ...]:
    """The stages `name` reads besides its parent, as `config` sets it (none without a config)."""
    return tuple(config.stage(name).input_stages()) if config is not None else ()


def _upstream_first(names: set[str], config) -> list[str]:
    """`names` with every stage after its parent and its inputs; otherwise in registry order."""
    found, placed = algorithms(), []
    while len(placed) < len(names):
        ready = [n for n in found if n in names and n not in placed
                 and all(d in placed for d in (found[n].parent, *inputs_of(n, config)) if d in names)]
        if not ready:
            cycle = ", ".join(f"{n} (reads {', '.join(inputs_of(n, config))})" for n in names if n not in placed)
            raise ValueError(f"these stages read each other's output, so none can run first: {cycle}")
        placed.append(ready[0])
    return placed


def check_parent(stage: str, parent_manifest: dict, parent_ref) -> None:
    """A stage trains only on a checkpoint of its parent stage, or on a plain Hugging Face model
    directory (an external base: any stage may start from one). The flows and `python -m
    alignflow.stages` both ask here."""
    if parent_manifest.get("external"):
        return
    algorithm, found = get_algorithm(stage), parent_manifest.get("stage")
    accepted = (algorithm.parent, *algorithm.also_trains_on)
    if found not in accepted:
        raise ValueError(f"{stage} trains on a {' or '.join(accepted)} checkpoint, but {parent_ref} holds a "
                         f"{found} stage")
