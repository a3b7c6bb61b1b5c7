"""Pretraining: from scratch (a built-in model with a tokenizer trained on the corpus), or
continued on a Hugging Face model (the parent, an external base) with its own tokenizer."""
from __future__ import annotations

from pathlib import Path

import torch

from alignflow.models import LlamaForCausalLM, Tokenizer, get_preset, load_tokenizer, train_tokenizer
from alignflow.trainers import distributed as dist_utils
from alignflow.trainers.sft import collate_causal_lm

from . import data, handoff
from .config import PipelineConfig
from .context import StageRun


def corpus_tokenizer(stage: StageRun, corpus: data.RawSplit) -> Tokenizer:
    """Trained on the corpus (rank 0), or the one an interrupted attempt of this same stage
    already trained, so a resumed run tokenises exactly as before."""
    path = handoff.work_file(stage.out_dir, "tokenizer")  # a directory; discarded with state/
    if stage.dist.is_main and not (path / handoff.TOKENIZER).exists():
        train_tokenizer(corpus.dataset["text"], vocab_size=stage.config.vocab_size).save_pretrained(str(path))
    dist_utils.barrier()
    return load_tokenizer(str(path))


def from_scratch(stage: StageRun, corpus: data.RawSplit) -> tuple[torch.nn.Module, Tokenizer]:
    tok = corpus_tokenizer(stage, corpus)
    torch.manual_seed(stage.train_cfg.seed or 0)
    model = LlamaForCausalLM(get_preset(stage.config.model, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    return model, tok


def run(config: PipelineConfig, parent_dir: str | Path | None, out_dir: str | Path) -> dict | None:
    with StageRun("pretrain", config, parent_dir, out_dir) as stage:
        corpus = data.read("pretrain", config.pretrain.data, config.demo, "train")
        model, tok = stage.load_policy() if parent_dir else from_scratch(stage, corpus)
        stage.train(stage.trainer(model, tok, collate_causal_lm, train_raw=corpus), tok)
    return stage.result
