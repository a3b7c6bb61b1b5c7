"""Settings are checked when the config is loaded, before any stage runs, and each error names
its key; the stage graph's parent check holds for the flows and `python -m stages` alike."""
import pytest
from pydantic import ValidationError

from flows.cli import build_parser, resolve_config
from stages.config import load_config


@pytest.mark.parametrize("key, value", [
    ("sft.train.lr", -0.001), ("pretrain.train.lr", 0), ("sft.train.log_interval", 0),
    ("dpo.train.warmup_steps", -1), ("dpo.beta", 0), ("demo.sft_examples", -5), ("eval.max_prompts", -1),
    ("eval.reward_samples", -1), ("grpo.train.max_steps", 0), ("grpo.num_generations", 1),
    ("eval.reward_funcs", ["contains"]),  # reads `target`, which the held-out prompts lack
])
def test_a_bad_setting_fails_at_load_naming_its_key(key, value):
    with pytest.raises(ValidationError, match=key.replace(".", r"\.")):
        load_config("tiny", overrides={key: value})


@pytest.mark.parametrize("run_id", ["2024", "yes", "2024-01-01"])
def test_a_run_id_is_a_name_not_yaml(run_id):
    args = build_parser().parse_args(["run", "--run-id", run_id, "--runs-dir", "123"])
    config = resolve_config(args)
    assert (config.run_id, config.runs_dir) == (run_id, "123")
