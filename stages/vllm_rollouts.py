"""GRPO's rollouts through a vLLM server (`grpo.rollout.engine: vllm`), behind the trainer's
`generate_fn`: prompt ids in, a `models.Generation` out, with the engine's per-token sampling
log-probs for the importance-sampling correction.

The server either runs already (`grpo.rollout.vllm.url`) or the stage starts one (rank 0, on its
own device: stages/vllm_server.py) and every rank sends its own prompts to it. Before every
generation round whose policy differs from the server's weights (the trainer says which policy
version it is: `sync`), rank 0 writes the policy's weights, LoRA merged and gathered under
FSDP, as one safetensors file into the sync directory (under /dev/shm by default: no disk is
touched), the server reloads them in place and drops its prefix cache (KV blocks of the old
weights would otherwise be reused for prompts longer than a block); the other ranks wait at a
barrier. So a rollout never runs on stale weights, the first one included (the parent, or a
resumed checkpoint)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from alignflow.models.chat import stop_ids
from alignflow.models.generate import Generation
from alignflow.models.lora import base_of, merged_state
from alignflow.trainers import distributed as dist_utils

from .vllm_client import EngineError, VLLMClient
from .vllm_server import VLLMServer

WEIGHTS = "model.safetensors"


class EngineRollouts:
    """The trainer's `generate_fn` over a vLLM server; `sync(model, version)` before generating."""

    def __init__(self, client: VLLMClient, sync_dir: Path | None, is_main: bool, server: VLLMServer | None = None):
        self.client, self.sync_dir, self.is_main, self.server = client, sync_dir, is_main, server
        self.version: object = None  # the policy version the server holds (None: not synced yet)
        self.sync_seconds = 0.0

    @contextlib.contextmanager
    def _requests(self):
        """A failed request, said as the death of the server the stage started when it died."""
        try:
            yield
        except EngineError as e:
            if self.server is None:
                raise
            raise self.server.explain(e) from e

    def sync(self, model: torch.nn.Module, version: object) -> None:
        """Give the server the policy's weights unless it already holds `version`. Every rank
        calls it (under FSDP inside the trainer's `unsharded()` block, so the weights are whole)."""
        if version == self.version:
            return
        start = time.perf_counter()
        if self.is_main:
            write_weights(model, self.sync_dir)
            with self._requests():
                self.client.load_weights(str(self.sync_dir))
                self.client.reset_cache()
        dist_utils.barrier()
        self.version = version
        self.sync_seconds += time.perf_counter() - start

    def __call__(self, model, tokenizer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None) -> Generation:
        """`models.generate_text`'s contract through the server. Consecutive equal prompts (a GRPO
        group) go as one request for n completions, each request with its own seed drawn from
        `generator`; all requests at once, so the server batches them."""
        if self.version is None:
            raise RuntimeError("the vLLM server was asked for rollouts before the policy's weights were synced")
        stops = stop_ids(tokenizer)
        groups = _runs(prompts)
        greedy = temperature == 0  # vLLM refuses n > 1 there; the completions would be one anyway
        seeds = ([None] * len(groups) if greedy else
                 [int(s) for s in torch.randint(0, 2**31 - 1, (len(groups),), generator=generator)])
        with self._requests():
            answers = self.client.complete_all([
                dict(prompt=prompts[start], n=1 if greedy else n, max_tokens=max_new_tokens, temperature=temperature,
                     top_k=top_k, top_p=top_p, stop_ids=stops, seed=seed) for (start, n), seed in zip(groups, seeds)])
        completions = [c for (_, n), answer in zip(groups, answers) for c in (answer * n if greedy else answer)]
        device = next(model.parameters()).device
        return _generation(prompts, completions, tokenizer, device)


def _runs(prompts: list[list[int]]) -> list[tuple[int, int]]:
    """(first index, length) of each run of equal consecutive prompts."""
    runs: list[tuple[int, int]] = []
    for i, p in enumerate(prompts):
        if runs and prompts[runs[-1][0]] == p:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def _generation(prompts, completions, tokenizer, device) -> Generation:
    """The left-padded prompts and right-padded completions as `generate_text` lays them out."""
    width = max(len(p) for p in prompts)
    length = max(max(len(c.token_ids) for c in completions), 1)
    pad = tokenizer.pad_token_id
    n = len(prompts)
    ids = torch.full((n, width + length), pad, dtype=torch.long)
    prompt_mask = torch.zeros((n, width), dtype=torch.long)
    completion_mask = torch.zeros((n, length), dtype=torch.long)
    logps = torch.zeros((n, length), dtype=torch.float32)
    for row, (p, c) in enumerate(zip(prompts, completions)):
        k = len(c.token_ids)
        ids[row, width - len(p):width] = torch.tensor(p)
        prompt_mask[row, width - len(p):] = 1
        ids[row, width:width + k] = torch.tensor(c.token_ids, dtype=torch.long)
        completion_mask[row, :k] = 1
        logps[row, :k] = torch.tensor(c.logps)
    texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in completions]
    ended = torch.tensor([c.stopped for c in completions])
    return Generation(ids.to(device), prompt_mask.to(device), completion_mask.to(device), texts,
                      ended=ended.to(device), logps=logps.to(device))


def write_weights(model: torch.nn.Module, directory: Path) -> None:
    """The policy's weights (LoRA merged) as `directory/model.safetensors`, replaced atomically.
    A tied head is written as a tensor of its own (see `write_config`)."""
    state, stored = {}, set()
    for name, tensor in merged_state(model).items():
        tensor = tensor.to("cpu").contiguous()
        if tensor.data_ptr() in stored:  # safetensors keeps each storage once
            tensor = tensor.clone()
        stored.add(tensor.data_ptr())
        state[name] = tensor
    tmp = directory / (WEIGHTS + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, directory / WEIGHTS)


def write_config(model: torch.nn.Module, directory: Path) -> None:
    """config.json of the policy's plain model (the built-in model's in transformers' Llama form),
    its head untied from its embedding: vLLM reloads a tied head from nowhere (it skips
    `lm_head.*` of a tied model and keeps the old head, "ParallelLMHead: Failed to load weights",
    vLLM 0.32), so the server holds the head as its own tensor, which every sync writes."""
    base = base_of(model)
    config = base.config
    if hasattr(config, "to_hf_dict"):  # the built-in model
        fields = config.to_hf_dict()
    else:
        fields = config.to_dict()
        fields.setdefault("architectures", [type(base).__name__])
        fields["use_cache"] = True
    fields["torch_dtype"] = fields["dtype"] = str(next(base.parameters()).dtype).removeprefix("torch.")
    fields["tie_word_embeddings"] = False
    (directory / "config.json").write_text(json.dumps(fields, indent=2, default=str))


def sync_directory(configured: str | None) -> Path:
    """Where the policy's weights are written for the server: `configured`, else a new directory
    under /dev/shm (memory) where it exists."""
    if configured:
        path = Path(configured)
        path.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="alignflow-vllm-", dir=path))
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="alignflow-vllm-", dir=shm))


@contextlib.contextmanager
def vllm_rollouts(settings, model: torch.nn.Module, device: torch.device, is_main: bool):
    """An `EngineRollouts` for the stage's ranks, its server started (rank 0) unless `settings.url`
    names one; the server stopped and the sync directory removed however the block ends.
    `settings`: the stage's `rollout.vllm` section."""
    sync_dir = sync_directory(settings.sync_dir) if is_main else None
    try:
        with contextlib.ExitStack() as stack:
            client, server = None, None
            if is_main:
                if settings.url:
                    client = VLLMClient(settings.url, settings.request_timeout_s)
                    if not client.healthy(timeout_s=10.0):
                        raise RuntimeError(f"no vLLM server answers at {settings.url} (grpo.rollout.vllm.url)")
                else:  # it starts from the policy as it is now (the first rollout syncs it again)
                    write_config(model, sync_dir)
                    write_weights(model, sync_dir)
                    server = VLLMServer(settings, str(sync_dir), device)
                    client = stack.enter_context(server)
            url = dist_utils.broadcast_object(client.url if client else None)
            if client is None:  # the other ranks: the same server, and a sync directory only rank 0 writes
                client = VLLMClient(url, settings.request_timeout_s)
            yield EngineRollouts(client, sync_dir, is_main, server)
    finally:
        if sync_dir is not None:
            shutil.rmtree(sync_dir, ignore_errors=True)
