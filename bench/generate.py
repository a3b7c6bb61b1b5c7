"""KV-cached vs uncached greedy decoding throughput on the tiny preset: the built-in model, and
the same weights as a transformers LlamaForCausalLM (its own cache, through the same `generate`).

    python bench/generate.py [--device cpu|cuda] [--batch 16] [--prompt-len 16] [--new-tokens 128]
"""

import argparse
import tempfile

import torch

from alignflow.models import LlamaForCausalLM, generate, get_preset, load_model, save_pretrained  # noqa: E402
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
    builtin = LlamaForCausalLM(config).to(device)
    with tempfile.TemporaryDirectory() as directory:
        save_pretrained(builtin, directory)
        hf = load_model(directory, device=device)  # transformers' LlamaForCausalLM, sdpa
    prompt = torch.randint(0, config.vocab_size, (args.batch, args.prompt_len), device=device)
    print(f"device={device} params={builtin.num_parameters() / 1e6:.2f}M batch={args.batch} "
          f"prompt={args.prompt_len} new={args.new_tokens} threads={torch.get_num_threads()}")
    for name, model in (("built-in", builtin), ("transformers", hf)):
        def run(use_cache: bool) -> torch.Tensor:
            # eos_token_id=None: every row generates all new tokens, so both paths do equal work.
            return generate(model, prompt, max_new_tokens=args.new_tokens, temperature=0, use_cache=use_cache)

        # Random-init logits have near-ties, so rounding may flip a few tokens: report, don't fail.
        agreement = (run(True) == run(False)).float().mean().item()
        rates = {}
        for use_cache in (True, False):
            rates[use_cache] = args.batch * args.new_tokens / best_time(lambda: run(use_cache), device, args.repeats)
        print(f"{name:>12}: cached {rates[True]:8.0f} tokens/s, uncached {rates[False]:8.0f} tokens/s, "
              f"cached/uncached {rates[True] / rates[False]:5.2f}x (target >= 5x), token agreement {agreement:.1%}")


if __name__ == "__main__":
    main()
