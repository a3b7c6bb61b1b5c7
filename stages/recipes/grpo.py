"""GRPO on prompts with verifiable answers: the policy samples through `models.generate_text`
(or a vLLM server that follows it, `rollout.engine: vllm`: stages/vllm_rollouts.py), and the
parent checkpoint, loaded again (or a LoRA policy with its adapter switched off), is the frozen
KL reference when beta > 0. Completions are scored by the reward functions and by any
reward models (`reward_model`: the run's rm stage; `reward_models`: directories), weighed
together in one sum."""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from pydantic import Field, field_validator, model_validator

from alignflow.models import generate_text
from alignflow.trainers.grpo import GRPOArgs, GRPOTrainer, RolloutArgs
from alignflow.trainers.args import Settings
from alignflow.trainers.placement import place_reference
from alignflow.trainers.rewards import required_columns

from .. import data
from ..algorithm import Algorithm, Headline, Panel, algorithms
from ..formats import PROMPTS
from ..reward_models import RewardModelScorer
from ..settings import StageConfig, TrainConfig
from ..vllm_rollouts import vllm_rollouts
from ..vllm_server import VLLMConfig

if TYPE_CHECKING:
    from ..run import StageRun


class RewardModelDir(Settings):
    path: str = Field(description="an rm stage's directory (an earlier run's) or a Hugging Face sequence-"
                                  "classification model directory with one label")
    weight: float = Field(1.0, description="its weight in the reward sum, beside reward_weights")


class RolloutConfig(RolloutArgs):
    """The trainer's rollout settings and the vLLM server's (`engine: vllm`)."""
    vllm: VLLMConfig = Field(VLLMConfig(), description="the vLLM server (engine: vllm): one already running, or "
                                                       "the one the stage starts")


class GRPOConfig(GRPOArgs, StageConfig):
    """GRPO's settings (`trainers.grpo.GRPOArgs`) beside its data and training loop, and the reward
    models that score completions beside the reward functions."""
    train: TrainConfig = TrainConfig(lr=1e-4, batch_size=4)
    reward_model: str | None = Field(None, description="a stage of this run whose reward model scores completions "
                                                       "(rm: the pipeline trains it first, on grpo's parent)")
    reward_model_weight: float = Field(1.0, description="its weight in the reward sum, beside reward_weights")
    reward_models: list[RewardModelDir] = Field([], description="reward models from directories, each with its weight")
    rollout: RolloutConfig = Field(RolloutConfig(), description="who samples the rollouts: the policy itself (hf) or "
                                                                "a vLLM server that follows it (vllm)")

    @field_validator("reward_model")
    @classmethod
    def _a_scoring_stage(cls, value: str | None) -> str | None:
        scoring = [name for name, a in algorithms().items() if a.scores]
        if value is not None and value not in scoring:
            raise ValueError(f"{value!r} is not a stage that trains a reward model ({', '.join(scoring)})")
        return value

    @model_validator(mode="after")
    def _something_scores(self) -> "GRPOConfig":
        if not self.reward_funcs and not self.reward_model and not self.reward_models:
            raise ValueError("no reward: give reward_funcs, a reward_model or reward_models")
        return self

    @model_validator(mode="after")
    def _an_engine_can_serve_it(self) -> "GRPOConfig":
        if self.rollout.engine == "vllm" and self.lora is not None and self.lora.quantize != "none":
            raise ValueError("rollout.engine vllm serves the policy's merged weights, which a 4-bit (QLoRA) base "
                             "cannot give exactly: use lora.quantize none, or engine hf")
        if self.rollout.engine == "vllm" and self.train.nnodes > 1 and not self.rollout.vllm.url:
            raise ValueError(f"rollout.engine vllm on {self.train.nnodes} nodes: the server a stage starts listens on "
                             "127.0.0.1 beside rank 0, out of the other nodes' reach; start one yourself and set "
                             "rollout.vllm.url (and a shared rollout.vllm.sync_dir)")
        return self

    def input_stages(self) -> tuple[str, ...]:
        return (self.reward_model,) if self.reward_model else ()

    def input_dirs(self) -> dict[str, str]:
        return {directory_role(i): m.path for i, m in enumerate(self.reward_models)}

    def reward_model_weights(self) -> dict[str, float]:
        """{input role: weight} of every reward model, in the order they are summed."""
        weights = {self.reward_model: self.reward_model_weight} if self.reward_model else {}
        return {**weights, **{directory_role(i): m.weight for i, m in enumerate(self.reward_models)}}


def directory_role(i: int) -> str:
    """What `reward_models[i]` is called as an input and in the metrics (rewards/reward_models_0:
    a name MLflow accepts)."""
    return f"reward_models_{i}"


def read_prompts(config, stage: str = "grpo") -> data.RawSplit:
    """The training prompts, refused without a column a reward function reads: that function
    would score no row, and GRPO would train silently on the others alone."""
    settings = config.stage(stage)
    raw = data.read(stage, PROMPTS, settings.data, config.demo, "train")
    found = raw.dataset.column_names
    for column, rewards in required_columns(settings.reward_funcs).items():
        if column not in found:
            raise data.DataError(f"{raw.origin}: no column {column!r}, which reward {', '.join(rewards)} reads "
                                 f"({stage}.reward_funcs; found {', '.join(found)})")
    return raw


def reward_scorers(stage: StageRun) -> tuple[list, list[float]]:
    """The reward models the settings name, loaded frozen on the stage's device (sharded under
    fsdp, like the reference), as reward functions, and their weights."""
    scorers, weights = [], []
    for role, weight in stage.settings.reward_model_weights().items():
        model, tok = stage.inputs[role].load(stage.device, stage.config.hf)
        model = place_reference(model, stage.settings.train, stage.device)
        scorers.append(RewardModelScorer(role, model, tok, stage.device))
        weights.append(weight)
    return scorers, weights


def train(stage: StageRun) -> None:
    s = stage.settings
    prompts = read_prompts(stage.config, stage.name)
    model, tok = stage.load_policy()
    reference = stage.reference_loader(model)() if s.beta > 0 else None
    scorers, weights = reward_scorers(stage)
    function_weights = s.reward_weights if s.reward_weights is not None else [1.0] * len(s.reward_funcs)
    with contextlib.ExitStack() as stack:
        generate_fn = generate_text
        if s.rollout.engine == "vllm":  # before the trainer shards the model: the server starts from whole weights
            generate_fn = stack.enter_context(vllm_rollouts(s.rollout.vllm, model, stage.device, stage.dist.is_main))
        trainer = stage.trainer(model, tok, train_raw=prompts, ref_model=reference, grpo=s,
                                reward_funcs=[*s.reward_funcs, *scorers], reward_weights=[*function_weights, *weights],
                                generate_fn=generate_fn, tokenizer=tok)
        stage.train(trainer, tok)


ALGORITHM = Algorithm(
    name="grpo", parent="sft", aligns=True, settings=GRPOConfig, trainer=GRPOTrainer, data=PROMPTS, recipe=train,
    headline=(Headline("GRPO val reward", "val_reward"),),
    panels=(Panel("reward", (("reward", "train"), ("val_reward", "held-out"))),
            Panel("KL to the reference", (("kl", "train"),)),
            Panel("completion length (tokens)", (("completion_length/mean", "train"),)),
            Panel("clip ratio", (("clip_ratio/region", "train"),))))
