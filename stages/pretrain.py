"""Pretraining: train the run's tokenizer on the corpus, pack the corpus, train a model from scratch."""
from __future__ import annotations

from pathlib import Path

import torch

from models import LlamaForCausalLM, Tokenizer, get_preset, train_tokenizer
from trainers import distributed as dist_utils
from trainers.sft import collate_causal_lm

from . import data, handoff
from .config import PipelineConfig
from .context import StageRun


def corpus_tokenizer(stage: StageRun, corpus: data.RawSplit) -> Tokenizer:
    """Trained on the corpus (rank 0), or the one an interrupted attempt of this same stage
    already trained, so a resumed run tokenises exactly as before."""
    path = handoff.work_file(stage.out_dir, "tokenizer.json")  # discarded with state/ when the config changes
    if stage.dist.is_main and not path.exists():
        train_tokenizer(corpus.dataset["text"], vocab_size=stage.config.vocab_size).save(str(path))
    dist_utils.barrier()
    return Tokenizer.load(str(path))


def run(config: PipelineConfig, parent_dir: str | Path | None, out_dir: str | Path) -> dict | None:
    with StageRun("pretrain", config, None, out_dir) as stage:
        corpus = data.read("pretrain", config.pretrain.data, config.demo, "train")
        tok = corpus_tokenizer(stage, corpus)
        torch.manual_seed(stage.train_cfg.seed or 0)
        model = LlamaForCausalLM(get_preset(config.model, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                            eos_token_id=tok.eos_id, pad_token_id=tok.pad_id))
        stage.train(stage.trainer(model, tok, collate_causal_lm, train_raw=corpus), tok)
    return stage.result
