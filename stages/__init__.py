"""One module per pipeline stage: data -> model -> trainer -> checkpoint directory.

Each stage is a plain function `run(config, parent_dir, out_dir) -> result` that runs the same
with or without Prefect; `python -m stages <stage> ...` runs one from the shell or torchrun."""
from . import dpo, grpo, pretrain, sft

STAGES = {"pretrain": pretrain.run, "sft": sft.run, "dpo": dpo.run, "grpo": grpo.run}
PARENT_STAGE = {"sft": "pretrain", "dpo": "sft", "grpo": "sft"}
