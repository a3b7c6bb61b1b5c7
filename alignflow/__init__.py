"""alignflow: pretraining -> SFT -> DPO or GRPO as one reliable, observable, resumable pipeline.

This folder holds only the package's root. Its four layers sit at the repository root and are
installed beneath it (pyproject.toml's package-dir):

    alignflow.flows     flows/     Prefect flows, the `alignflow` command, reports, launchers
    alignflow.stages    stages/    the algorithms' declarations and recipes, data, the stage directory
    alignflow.trainers  trainers/  the training loop and the algorithms' losses and trainers
    alignflow.models    models/    the built-in decoder, Hugging Face I/O, chat rendering, generation

Importing `alignflow` imports none of them (no torch, no Prefect)."""

__version__ = "0.1.0"
