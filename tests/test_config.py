"""Settings are checked when the config is loaded, before any stage runs, and each error names
its key; the stage graph's parent check holds for the flows and `python -m stages` alike."""
import pytest
from pydantic import ValidationError

from alignflow.flows.cli import build_parser, resolve_config
from alignflow.stages.config import load_config


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


@pytest.mark.parametrize("run_id", ["../../escaped", "a/b", "..", " x", "a\\b"])
def test_a_run_id_that_is_not_a_plain_name_is_refused_before_anything_is_written(run_id, tmp_path, capsys):
    """It names a directory under runs_dir: `../../escaped` wrote a stage and its report outside it."""
    from alignflow.flows.cli import main
    from alignflow.flows.pipeline import run_stage

    with pytest.raises(ValidationError, match="is not a plain name"):
        load_config("tiny", overrides={"run_id": run_id})
    runs = tmp_path / "X" / "runs"
    assert main(["run", "--runs-dir", str(runs), "--run-id", run_id]) == 1
    assert "is not a plain name" in capsys.readouterr().err
    # The flow's own parameter (what a deployment's form passes), before the parent is read.
    with pytest.raises(ValueError, match="is not a plain name"):
        run_stage.fn(stage="dpo", parent=str(tmp_path / "no-parent"), run_id=run_id)
    assert list(tmp_path.iterdir()) == []


def test_a_model_directory_picks_the_hf_small_preset_and_starts_at_sft(tmp_path):
    config = resolve_config(build_parser().parse_args(["run", "--model", str(tmp_path)]))
    assert (config.preset, config.model, config.start, config.builtin_model) == ("hf-small", str(tmp_path), "sft", False)
    assert config.sft.train.precision == "bf16" and config.dpo.train.lr == 5e-7
    config = resolve_config(build_parser().parse_args(["run", "--model", str(tmp_path), "--start", "pretrain"]))
    assert config.start == "pretrain"
    assert resolve_config(build_parser().parse_args(["run"])).preset == "tiny"  # the default run is unchanged


def test_starting_after_pretraining_needs_a_model_to_start_from():
    with pytest.raises(ValidationError, match="start: sft needs a model to start from: set model to a Hugging Face"):
        load_config("tiny", overrides={"start": "sft"})
    with pytest.raises(ValidationError, match="start: sft needs a model"):
        load_config("hf-small")  # its settings wait for --model


def test_a_section_given_as_a_dict_merges_into_the_preset_s_section():
    base = load_config("gpt2-small")
    merged = load_config("gpt2-small", overrides={"grpo.train": {"strategy": "fsdp", "activation_checkpointing": True}})
    assert merged.grpo.train.strategy == "fsdp" and merged.grpo.train.activation_checkpointing
    assert (merged.grpo.train.lr, merged.grpo.train.batch_size) == (base.grpo.train.lr, base.grpo.train.batch_size)


def test_a_section_given_as_a_dict_keeps_the_algorithm_s_own_defaults():
    """A config file or --set naming one key of a section no preset block sets (a new
    algorithm's, a plugin's) must not reset the algorithm's lr 1e-4 to the generic TrainConfig's
    1e-3 (it did: the dict replaced the algorithm's default `train`)."""
    config = load_config("tiny")
    simpo = type(config.simpo).model_validate({"train": {"max_steps": 5}})
    assert (simpo.train.lr, simpo.train.max_steps) == (1e-4, 5)
    grpo = type(config.grpo).model_validate({"train": {"lr": 1e-5}})
    assert (grpo.train.lr, grpo.train.batch_size) == (1e-5, 4)  # GRPO's own default batch size
    # Through load_config, on top of the preset's block.
    assert load_config("tiny", overrides={"simpo.train.max_steps": 5}).simpo.train.lr == config.simpo.train.lr


def test_cpu_offload_without_fsdp_is_refused_naming_the_key():
    with pytest.raises(ValueError, match="fsdp_cpu_offload needs strategy: fsdp"):
        load_config("tiny", overrides={"sft.train.fsdp_cpu_offload": True})


def test_no_algorithm_can_take_a_shared_key_as_its_section():
    from alignflow.stages.algorithm import RESERVED
    from alignflow.stages.config import SharedConfig

    assert {*SharedConfig.model_fields, "none"} == set(RESERVED)


def test_the_sections_are_the_registered_algorithms_in_pipeline_order():
    from alignflow.stages import algorithms
    from alignflow.stages.config import PipelineConfig

    config = load_config("tiny")
    assert list(config.sections()) == list(algorithms()) == ["pretrain", "sft", "rm", "dpo", "grpo", "kto", "orpo", "simpo"]
    assert [n for n in PipelineConfig.model_fields if n in algorithms()] == list(algorithms())
    assert config.start == "pretrain"  # the first stage without a parent
