"""Pretraining: train the run's tokenizer, pack the corpus, train a model from scratch."""
from __future__ import annotations

from pathlib import Path

import torch

from models import LlamaForCausalLM, Tokenizer, get_preset, train_tokenizer
from trainers import PretrainTrainer
from trainers import distributed as dist_utils
from trainers.checkpoint import CHECKPOINT_DIR
from trainers.sft import collate_causal_lm

from . import common
from . import data as data_mod
from .config import PipelineConfig


def run_tokenizer(run: common.StageRun) -> Tokenizer:
    """Train on the pretraining corpus (rank 0), or reuse the one an interrupted attempt of this
    same stage already wrote, so a resumed run tokenises exactly as before."""
    path = run.out_dir / CHECKPOINT_DIR / "tokenizer.json"  # wiped with state/ if the config changes
    if run.dist.is_main and not path.exists():
        raw, origin, rows = data_mod.load_split("pretrain", run.config.pretrain.data, run.config.demo, "train")
        raw, _ = data_mod.validate(raw, "pretrain", origin, run.config.pretrain.data.on_bad_rows, rows)
        train_tokenizer((row["text"] for row in raw), vocab_size=run.config.vocab_size).save(str(path))
    dist_utils.barrier()
    return Tokenizer.load(str(path))


def run(config: PipelineConfig, parent_dir: str | Path | None, out_dir: str | Path) -> dict | None:
    stage = common.begin("pretrain", config, None, out_dir)
    tok = run_tokenizer(stage)
    train = common.load_data(stage, "pretrain", tok, "train")
    val = common.load_data(stage, "pretrain", tok, "val")
    if len(train.dataset) == 0:
        raise data_mod.DataError(f"{train.origin}: too little text for one block of {config.pretrain.data.max_length} tokens")

    torch.manual_seed(stage.train_cfg.seed)
    model = LlamaForCausalLM(get_preset(config.model, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                        eos_token_id=tok.eos_id, pad_token_id=tok.pad_id))
    trainer = PretrainTrainer(model=model, optimizer=common.optimizer_for(model, stage),
                              **common.loaders(stage, train, val, lambda items: collate_causal_lm(items, tok.pad_id)),
                              **common.trainer_kwargs(stage))
    return common.train_and_finish(stage, trainer, tok)
