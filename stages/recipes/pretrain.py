"""Pretraining: from scratch (a built-in model with a tokenizer trained on the corpus), or
continued on a Hugging Face model (the parent, an external base) with its own tokenizer."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from alignflow.models import LlamaForCausalLM, Tokenizer, get_preset, load_tokenizer, train_tokenizer
from alignflow.trainers import PretrainTrainer
from alignflow.trainers import distributed as dist_utils

from .. import data, handoff
from ..algorithm import Algorithm, Headline
from ..formats import TEXT
from ..settings import StageConfig

if TYPE_CHECKING:
    from ..run import StageRun

# A language model's validation numbers (pretraining's and SFT's), apart from the preference
# and reward losses of the stages after them.
LANGUAGE_MODEL_HEADLINE = (Headline("LM val loss", "val_loss"), Headline("LM val perplexity", "val_ppl"))


class PretrainConfig(StageConfig):
    pass


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
    torch.manual_seed(stage.settings.train.seed or 0)
    model = LlamaForCausalLM(get_preset(stage.config.model, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    return model, tok


def train(stage: StageRun) -> None:
    corpus = data.read(stage.name, TEXT, stage.settings.data, stage.config.demo, "train")
    model, tok = stage.load_policy() if stage.parent else from_scratch(stage, corpus)
    stage.train(stage.trainer(model, tok, train_raw=corpus), tok)


ALGORITHM = Algorithm(name="pretrain", parent=None, settings=PretrainConfig, trainer=PretrainTrainer, data=TEXT,
                      recipe=train, headline=LANGUAGE_MODEL_HEADLINE)
