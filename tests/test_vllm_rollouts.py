"""GRPO's rollouts through a real vLLM server (CPU build, its own venv: tests/vllm_env.py), started
by `stages.vllm_rollouts` on loopback and stopped by it: the engine's completions equal the
trainer's own generation, its log-probs the trainer's, and after an update (full or LoRA) it
serves the updated weights, a prompt longer than one KV block included."""
from __future__ import annotations

import copy
import os

import pytest
import torch

from alignflow.models import generate_text, load_model, load_tokenizer
from alignflow.models.lora import add_adapter
from alignflow.models.tokenizer import ensure_pad_token
from alignflow.stages.vllm_rollouts import vllm_rollouts
from alignflow.stages.vllm_server import VLLMConfig
from alignflow.trainers.logprobs import token_logps

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
NO_PHONING_HOME = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def vllm_python():
    from vllm_env import vllm_python as build

    return build()


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """A tiny Qwen2-style model (tied embeddings, q/k/v bias, padded vocabulary) with head
    dimension 32, the smallest vLLM's CPU attention takes, and its tokenizer."""
    from hf_fixtures import build_model_dir

    directory = build_model_dir("chatml", tmp_path_factory.mktemp("vllm-policy"), hidden_size=128)
    tok = load_tokenizer(str(directory))
    assert not ensure_pad_token(tok)  # chatml has its own pad token: no new embedding row
    return load_model(str(directory)), tok


@pytest.fixture(scope="module")
def engine(policy, vllm_python):
    """A server the test module shares, started from the policy's weights."""
    model, _ = policy
    settings = VLLMConfig(python=vllm_python, max_model_len=256, startup_timeout_s=300)
    with pytest.MonkeyPatch.context() as env:
        for k, v in NO_PHONING_HOME.items():
            env.setenv(k, v)
        with vllm_rollouts(settings, model, torch.device("cpu"), is_main=True) as rollouts:
            yield rollouts


def chat_prompts(tok) -> list[list[int]]:
    """Three chat prompts; the last is longer than two 32-token KV blocks."""
    texts = ["What is 2+2?", "Name a colour.", "please explain why the sky is blue, " * 3]
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False) for t in texts]
    assert len(prompts[-1]) > 64
    return prompts


def assert_same_generation(got, want):
    assert got.texts == want.texts
    assert torch.equal(got.completion_mask, want.completion_mask)
    keep = want.completion_mask.bool()
    width = want.prompt_mask.shape[1]
    assert torch.equal(got.sequences[:, width:][keep], want.sequences[:, width:][keep])
    assert torch.equal(got.sequences[:, :width], want.sequences[:, :width])
    assert torch.equal(got.ended, want.ended)


def test_greedy_completions_equal_the_trainers_own(engine, policy):
    model, tok = policy
    engine.sync(model, "start")
    prompts = chat_prompts(tok)
    got = engine(model, tok, prompts, max_new_tokens=24, temperature=0.0)
    want = generate_text(model, tok, prompts, max_new_tokens=24, temperature=0.0)
    assert_same_generation(got, want)
    assert got.completion_mask.sum() > 3 * 8  # real completions, not empty ones


def test_a_completion_stops_at_a_stop_token_which_it_keeps(engine, policy):
    """A token each greedy completion emits made a stop token (as generation_config's eos ids are):
    the engine stops where models.generate stops, the stop token kept in the completion (ended,
    mask 1 on it), the rows that never emit it running to max_new_tokens."""
    model, tok = policy
    engine.sync(model, "start")
    prompts = chat_prompts(tok)
    free = generate_text(model, tok, prompts, max_new_tokens=12, temperature=0.0)
    width = free.prompt_mask.shape[1]
    stop = int(free.sequences[0, width + 3])  # the first prompt's fourth token
    stopping = copy.copy(tok)
    stopping.generation_eos_token_ids = [stop]
    got = engine(model, stopping, prompts, max_new_tokens=12, temperature=0.0)
    want = generate_text(model, stopping, prompts, max_new_tokens=12, temperature=0.0)
    assert_same_generation(got, want)
    first = free.sequences[0, width:].tolist().index(stop) + 1
    assert got.ended[0] and got.completion_mask[0].sum() == first <= 4
    assert got.sequences[0, width + first - 1] == stop


def trainer_logps(model, g, temperature: float) -> torch.Tensor:
    """The trainer's log-probs [N, T] of a generation's completion tokens at `temperature`."""
    mask = torch.cat([g.prompt_mask, g.completion_mask], 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=g.sequences, attention_mask=mask, position_ids=positions).logits
    T = g.completion_mask.shape[1]
    targets = g.sequences[:, -T:].masked_fill(g.completion_mask == 0, -100)
    return token_logps(logits[:, -T - 1:-1], targets, temperature)


def gap(model, g, temperature: float) -> float:
    """The largest |log-prob| difference between the engine's and the model's on sampled tokens."""
    keep = g.completion_mask.bool()
    return (trainer_logps(model, g, temperature)[keep] - g.logps[keep]).abs().max().item()


def test_sampled_log_probs_are_the_trainers_at_the_temperature(engine, policy):
    model, tok = policy
    engine.sync(model, "start")
    prompts = [p for p in chat_prompts(tok) for _ in range(4)]  # three groups of four
    g = engine(model, tok, prompts, max_new_tokens=16, temperature=0.7, generator=torch.Generator().manual_seed(0))
    assert len(set(g.texts[:4])) > 1  # a group's completions differ: each request samples n of them
    assert g.completion_mask.sum() == 12 * 16
    assert gap(model, g, 0.7) < 1e-4


def test_after_an_update_the_server_serves_the_new_weights(engine, policy):
    """Full fine-tuning and LoRA: after one AdamW step and a sync, the log-probs the server samples
    with are the updated model's (to 1e-4), not the old one's, the prompt longer than two KV blocks
    included (its blocks' KV came from the old weights and must not be reused)."""
    base, tok = policy
    prompts = [p for p in chat_prompts(tok) for _ in range(2)]
    for lora in (False, True):
        model = copy.deepcopy(base)
        if lora:
            model = add_adapter(model, r=4, alpha=8, seed=1)
        engine.sync(model, ("before", lora))
        engine(model, tok, prompts, max_new_tokens=8, temperature=1.0)  # the old weights' KV in the prefix cache
        one_update(model, tok, prompts)
        engine.sync(model, ("after", lora))
        g = engine(model, tok, prompts, max_new_tokens=8, temperature=1.0, generator=torch.Generator().manual_seed(1))
        assert gap(model, g, 1.0) < 1e-4, f"lora={lora}"
        assert gap(base, g, 1.0) > 1e-2, f"lora={lora}: the update did not change the log-probs"


def one_update(model, tok, prompts, lr: float = 1e-2) -> None:
    """One AdamW step raising the likelihood of an arbitrary reply to each prompt."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    reply = tok.encode(" blue green red", add_special_tokens=False)
    for p in prompts:
        ids = torch.tensor([p + reply])
        labels = ids.clone()
        labels[0, :len(p)] = -100
        model(input_ids=ids, labels=labels).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_last_a_server_that_dies_mid_run_fails_the_next_rollout_with_its_last_lines(engine, policy):
    """The module's last test: it kills the shared server. The next rollout fails with one line
    saying the server exited, its interpreter and port, and its last lines; not a bare refused
    connection."""
    import signal

    from alignflow.stages.vllm_client import EngineError

    model, tok = policy
    engine.sync(model, "start")
    os.killpg(engine.server.proc.pid, signal.SIGKILL)
    engine.server.proc.wait(timeout=30)
    with pytest.raises(EngineError) as failure:
        engine(model, tok, chat_prompts(tok), max_new_tokens=4, temperature=0.0)
    message = str(failure.value)
    assert message.startswith(f"the vLLM server ({engine.server.python}, grpo.rollout.vllm.python; port "
                              f"{engine.server.port}) exited with code -9 while the stage ran. Its last lines: ")
    assert "\n" not in message
