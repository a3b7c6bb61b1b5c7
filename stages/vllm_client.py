"""A vLLM server's HTTP API, as GRPO's rollouts use it (standard library only):

    completions    POST /v1/completions with token-id prompts: token ids and per-token log-probs back
    load_weights   POST /collective_rpc reload_weights: the server reads a safetensors directory
    reset_cache    POST /reset_prefix_cache: KV blocks computed with the old weights are dropped

The last two exist only on a server started with VLLM_SERVER_DEV_MODE=1."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass


class EngineError(RuntimeError):
    """The server refused a request, answered nonsense, or could not be reached."""


@dataclass
class Completion:
    token_ids: list[int]   # the sampled tokens, the stop token included when one ended it
    logps: list[float]     # each token's log-probability under the sampling distribution
    stopped: bool          # a stop token ended it (else max_tokens did)


class VLLMClient:
    def __init__(self, url: str, timeout_s: float = 600.0):
        self.url, self.timeout_s = url.rstrip("/"), timeout_s
        self._model: str | None = None

    def _request(self, path: str, body: dict | None = None, method: str = "POST", timeout_s: float | None = None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            hint = (" (the server was not started with VLLM_SERVER_DEV_MODE=1, which weight updates need)"
                    if e.code == 404 and path in ("/collective_rpc", "/reset_prefix_cache") else "")
            raise EngineError(f"vLLM server {self.url}{path} answered {e.code}{hint}: {detail}") from e
        except (urllib.error.URLError, OSError) as e:
            raise EngineError(f"vLLM server {self.url}{path} did not answer: {e}") from e
        return json.loads(raw) if raw else None

    def healthy(self, timeout_s: float = 2.0) -> bool:
        try:
            self._request("/health", method="GET", timeout_s=timeout_s)
            return True
        except EngineError:
            return False

    @property
    def model(self) -> str:
        """The served model's name, which every completion request must give."""
        if self._model is None:
            self._model = self._request("/v1/models", method="GET")["data"][0]["id"]
        return self._model

    def load_weights(self, directory: str) -> None:
        self._request("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": directory}})

    def reset_cache(self) -> None:
        result = self._request("/reset_prefix_cache", {})
        if isinstance(result, dict) and result.get("success") is False:
            raise EngineError(f"vLLM server {self.url} could not reset its prefix cache: {result}")

    def completions(self, prompt: list[int], n: int, max_tokens: int, temperature: float, top_k: int | None,
                    top_p: float | None, stop_ids: list[int], seed: int | None) -> list[Completion]:
        """`n` completions of one token-id prompt. Only `stop_ids` stop a completion (ignore_eos
        keeps the model's generation_config from adding its own), as in `models.generate`."""
        body = {"model": self.model, "prompt": prompt, "n": n, "max_tokens": max_tokens,
                "temperature": temperature, "top_k": top_k or -1, "top_p": 1.0 if top_p is None else top_p,
                "ignore_eos": True, "stop_token_ids": stop_ids, "logprobs": 0, "return_token_ids": True,
                "return_tokens_as_token_ids": True, "skip_special_tokens": False}
        if seed is not None:
            body["seed"] = seed
        choices = sorted(self._request("/v1/completions", body)["choices"], key=lambda c: c["index"])
        if len(choices) != n:
            raise EngineError(f"vLLM server {self.url} returned {len(choices)} completions for n={n}")
        out = []
        for c in choices:
            ids, logps = c.get("token_ids"), (c.get("logprobs") or {}).get("token_logprobs")
            if ids is None or logps is None or len(ids) != len(logps):
                raise EngineError(f"vLLM server {self.url} returned no token ids or log-probs (a vLLM without "
                                  "return_token_ids?): alignflow needs vLLM 0.10 or newer")
            out.append(Completion(list(ids), [float(x) for x in logps], c.get("finish_reason") == "stop"))
        return out

    def complete_all(self, requests: list[dict]) -> list[list[Completion]]:
        """Several `completions` calls at once, so the server batches them; results in order."""
        if not requests:
            return []
        with ThreadPoolExecutor(max_workers=min(len(requests), 64)) as pool:
            return list(pool.map(lambda kwargs: self.completions(**kwargs), requests))
