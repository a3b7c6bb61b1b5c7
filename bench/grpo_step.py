"""Where a GRPO step's time goes, what the KV cache buys generation, and what a vLLM server buys
it, in one run.

On the tiny preset: the generation / scoring / optimisation shares of a GRPOTrainer step (from
the trainer's own timing metrics, averaged over steps after a warm-up step), then sampling
throughput of the same rollout shape with and without the KV cache.

    python bench/grpo_step.py [--device cpu|cuda] [--steps 4] [--prompts 4] [--generations 8]
                              [--prompt-len 16] [--new-tokens 64] [--threads N] [--preset tiny]

With `--engine both`, the same steps from the same weights once with the policy generating
(`hf`) and once with rollouts from a vLLM server (`rollout.engine: vllm`, docs/vllm-rollouts.md):
step time and generation tokens/s of each, and their ratios. The server is started from vLLM's own
interpreter (`--vllm-python`, default $ALIGNFLOW_VLLM_PYTHON), or `--url` names a running one
(started with VLLM_SERVER_DEV_MODE=1 and --logprobs-mode processed_logprobs). Its step time
includes the weight sync (write + reload) of every step.

    python bench/grpo_step.py --engine both [--vllm-python ~/vllm-env/bin/python | --url http://...]

No GPU number exists for the vLLM engine: vLLM cannot be installed on the GPU machines lent to
this project (nothing can be downloaded there). The script runs unchanged on a GPU machine that
has vLLM in a venv (`--device cuda --engine both --vllm-python ...`).

Under FSDP (generation on the gathered policy), through torchrun, without the KV-cache part:

    torchrun --nproc_per_node N bench/grpo_step.py --strategy fsdp [...]
"""
from __future__ import annotations

import argparse
import os

import torch
from torch.utils.data import DataLoader

from alignflow.models import LlamaForCausalLM, generate, generate_text, get_preset
from alignflow.trainers.grpo import GRPOTrainer, collate_prompts

from timing import seconds  # bench/timing.py, beside this script


class IdTokenizer:
    """Decodes ids to space-separated numbers: enough for the benchmark's reward."""
    pad_token_id, eos_token_id = 0, 1

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def distinct_tokens(prompts, completions, **columns):
    """A reward that varies within every group, so each step does real policy-gradient work."""
    return [len(set(c.split())) / max(len(c.split()), 1) for c in completions]


KEYS = ("time/generation_share", "time/scoring_share", "time/optimization_share", "generation/tokens_per_s")


def build_trainer(args, device, weights, loader, generate_fn, rollout) -> GRPOTrainer:
    """A trainer from `weights` (every engine starts from the same ones)."""
    config = get_preset(args.preset)
    model, ref = LlamaForCausalLM(config), LlamaForCausalLM(config)
    model.load_state_dict(weights)
    ref.load_state_dict(weights)
    return GRPOTrainer(model, ref, torch.optim.AdamW(model.parameters(), lr=1e-4), loader, [distinct_tokens],
                       generate_fn=generate_fn, tokenizer=IdTokenizer(), rollout=rollout,
                       num_generations=args.generations, max_completion_length=args.new_tokens,
                       device=device, max_steps=args.steps + 1, progress_bar=False, strategy=args.strategy)


def time_steps(trainer, loader, steps: int, device) -> tuple[float, dict[str, float]]:
    """(mean step seconds, mean timing metrics) over `steps` steps after a warm-up step."""
    batches = iter(loader)
    trainer.training_step([next(batches)])  # warm-up: allocator, kernels, lazy init (and the first sync)
    totals, step_seconds = dict.fromkeys(KEYS, 0.0), 0.0
    for _ in range(steps):
        batch, out = next(batches), []
        step_seconds += seconds(lambda: out.append(trainer.training_step([batch])), device) / steps
        for k in KEYS:
            totals[k] += out[0][k] / steps
    return step_seconds, totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, help="CPU threads (on a busy machine 1 can be much faster)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp")
    parser.add_argument("--engine", choices=["hf", "both"], default="hf",
                        help="both: also the same steps with rollouts from a vLLM server")
    parser.add_argument("--vllm-python", help="vLLM's interpreter (default: $ALIGNFLOW_VLLM_PYTHON)")
    parser.add_argument("--url", help="a running vLLM server instead of one this script starts")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(args.device, rank) if args.device == "cuda" and "LOCAL_RANK" in os.environ else torch.device(args.device)
    torch.manual_seed(0)
    config = get_preset(args.preset)
    weights = LlamaForCausalLM(config).state_dict()
    # Ids 0 and 1 play PAD and EOS; an untrained model rarely samples EOS, so completions run
    # close to full length.
    items = [{"prompt_input_ids": torch.randint(2, config.vocab_size, (args.prompt_len,)).tolist()}
             for _ in range(args.prompts * (args.steps + 1))]
    loader = DataLoader(items, batch_size=args.prompts, collate_fn=lambda b: collate_prompts(b, pad_id=0))
    trainer = build_trainer(args, device, weights, loader, generate_text, {"engine": "hf"})
    step_seconds, totals = time_steps(trainer, loader, args.steps, device)
    if not trainer.is_main:
        return
    model = trainer.model
    if trainer.sharded:  # the rest times the unsharded model alone
        print(f"strategy=fsdp ranks={trainer.dist.world_size} step {step_seconds:.3f} s, generation "
              f"{totals['generation/tokens_per_s']:.0f} tokens/s, generation share {totals['time/generation_share']:.1%}")
        return

    print(f"device={device} params={model.num_parameters() / 1e6:.2f}M prompts={args.prompts} "
          f"generations={args.generations} prompt={args.prompt_len} new={args.new_tokens} "
          f"threads={torch.get_num_threads()} steps={args.steps} strategy={args.strategy} step {step_seconds:.3f} s")
    print(f"GRPO step time share: generation {totals['time/generation_share']:.1%}, "
          f"scoring+reference {totals['time/scoring_share']:.1%}, "
          f"optimisation {totals['time/optimization_share']:.1%}")
    print(f"generation/optimisation time ratio: "
          f"{totals['time/generation_share'] / totals['time/optimization_share']:.2f}")
    print(f"trainer generation throughput: {totals['generation/tokens_per_s']:.0f} tokens/s")

    if args.engine == "both":
        compare_engines(args, device, weights, loader, step_seconds, totals)

    prompts = next(iter(loader))["prompt_input_ids"].to(device).repeat_interleave(args.generations, dim=0)
    n_tokens = prompts.shape[0] * args.new_tokens
    rates = {}  # no EOS here: both paths generate every token
    for use_cache in (True, False, True, False):  # alternate, keep the best: noise hits both alike
        g = torch.Generator(device=device).manual_seed(0)
        s = seconds(lambda: generate(model, prompts, max_new_tokens=args.new_tokens, use_cache=use_cache,
                                     generator=g), device)
        rates[use_cache] = max(rates.get(use_cache, 0.0), n_tokens / s)
    print(f"sampling {prompts.shape[0]}x{args.new_tokens} tokens: cached {rates[True]:.0f} tokens/s, "
          f"uncached {rates[False]:.0f} tokens/s, speedup {rates[True] / rates[False]:.2f}x")


def compare_engines(args, device, weights, loader, hf_seconds: float, hf: dict[str, float]) -> None:
    """The same steps from the same weights with rollouts from a vLLM server."""
    from alignflow.stages.vllm_rollouts import vllm_rollouts
    from alignflow.stages.vllm_server import VLLMConfig

    settings = VLLMConfig(python=args.vllm_python, url=args.url, max_model_len=args.prompt_len + args.new_tokens + 32)
    config = get_preset(args.preset)
    serving = LlamaForCausalLM(config)
    serving.load_state_dict(weights)
    with vllm_rollouts(settings, serving, device, is_main=True) as engine:
        trainer = build_trainer(args, device, weights, loader, engine, {"engine": "vllm"})
        step_seconds, totals = time_steps(trainer, loader, args.steps, device)
        sync = engine.sync_seconds / (args.steps + 1)
    print(f"engine vllm: step {step_seconds:.3f} s (of which weight sync {sync:.3f} s), generation "
          f"{totals['generation/tokens_per_s']:.0f} tokens/s, generation share {totals['time/generation_share']:.1%}")
    print(f"vllm / hf: step time {step_seconds / hf_seconds:.2f}x, generation tokens/s "
          f"{totals['generation/tokens_per_s'] / hf['generation/tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
