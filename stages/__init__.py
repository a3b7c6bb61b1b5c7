"""One module per pipeline stage (pretrain, sft, dpo, grpo). Filled by the pipeline issue."""
