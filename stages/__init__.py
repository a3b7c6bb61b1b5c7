"""The pipeline's stages: each one an algorithm declared once (stages/algorithm.py: its settings,
trainer, data kind, recipe, parent, report rows and curves), trained by the same machinery
(stages/run.py) into a checkpoint directory the next stage starts from (stages/handoff.py).

    recipes/           the built-in algorithms, a module each: pretrain, sft, dpo, grpo, simpo, orpo
    algorithm.py       the declaration, the registry (plugins: entry points) and the stage graph
    settings.py        the sections' settings; config.py composes the pipeline's configuration
    data.py, data_files.py, formats.py, demo.py     the data a stage reads
    run.py, parent.py, stage_dir.py, loaders.py     one stage's run, and its parts
    handoff.py, storage.py                          the stage directory, local or at a URL
    evaluation.py      held-out task metrics of every stage

A stage runs the same with or without Prefect: `train_stage(name, config, parent, out)`, or
`python -m alignflow.stages <name> ...` from the shell or torchrun. Importing this package loads
no algorithm (nor torch): the registry fills on first use."""
from .algorithm import (Algorithm, Headline, Panel, aligners, algorithms, chain, check_parent, children,
                        get_algorithm, register_algorithm)

__all__ = ["Algorithm", "Headline", "Panel", "aligners", "algorithms", "chain", "check_parent", "children",
           "get_algorithm", "register_algorithm"]
