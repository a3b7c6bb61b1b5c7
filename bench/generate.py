"""KV-cached vs uncached greedy decoding throughput on the tiny preset.

    python bench/generate.py [--device cpu|cuda] [--batch 16] [--prompt-len 16] [--new-tokens 128]
"""

import argparse
import os
import sys

import torch

# Run as a plain script from anywhere, installed or not.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import LlamaForCausalLM, generate, get_preset  # noqa: E402
from timing import seconds  # noqa: E402  (bench/timing.py, beside this script)


def best_time(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up: allocator, kernels, lazy init
    return min(seconds(fn, device) for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    config = get_preset("tiny")
    model = LlamaForCausalLM(config).to(device)
    prompt = torch.randint(0, config.vocab_size, (args.batch, args.prompt_len), device=device)

    def run(use_cache: bool) -> torch.Tensor:
        # eos_token_id=None: every row generates all new tokens, so both paths do equal work.
        return generate(model, prompt, max_new_tokens=args.new_tokens, temperature=0, use_cache=use_cache)

    # Random-init logits have near-ties, so rounding may flip a few tokens: report, don't fail.
    agreement = (run(True) == run(False)).float().mean().item()
    n_tokens = args.batch * args.new_tokens
    print(
        f"device={device} params={model.num_parameters() / 1e6:.2f}M batch={args.batch} "
        f"prompt={args.prompt_len} new={args.new_tokens} threads={torch.get_num_threads()}"
    )
    print(f"cached/uncached token agreement: {agreement:.1%}")
    rates = {}
    for use_cache in (True, False):
        seconds = best_time(lambda: run(use_cache), device, args.repeats)
        rates[use_cache] = n_tokens / seconds
        name = "cached" if use_cache else "uncached"
        print(f"{name:>9}: {rates[use_cache]:10.0f} tokens/s ({seconds * 1e3:.1f} ms)")
    print(f"speedup cached/uncached: {rates[True] / rates[False]:.2f}x")


if __name__ == "__main__":
    main()
