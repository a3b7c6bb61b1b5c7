"""Hugging Face models through alignflow's own machinery: generation with a KV cache, the stage
directory they are saved to (sharded too), and a plain model directory as a parent."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_fixtures import FAMILIES
from alignflow.models import generate, generate_text, prompt_ids
from alignflow.stages import handoff

PROMPTS = [[{"role": "user", "content": "What is 3 plus 4?"}],
           [{"role": "user", "content": "Tom has 2 apples and gets 5 more. How many apples does Tom have now?"}]]


def left_padded(tok, prompts):
    ids = [prompt_ids(tok, p) for p in prompts]
    width = max(map(len, ids))
    batch = torch.tensor([[tok.pad_token_id] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    return batch, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_greedy_decoding_equals_uncached(family, hf_model_dir):
    model, tok, _ = handoff.load_stage(hf_model_dir(family))
    ids, mask = left_padded(tok, PROMPTS)
    runs = [generate(model, ids, mask, max_new_tokens=12, temperature=0, pad_token_id=tok.pad_token_id,
                     use_cache=use_cache) for use_cache in (True, False)]
    assert torch.equal(*runs)
    # Each left-padded row continues exactly as it does alone: padding changes nothing.
    for row, prompt in enumerate(PROMPTS):
        alone = torch.tensor([prompt_ids(tok, prompt)])
        out = generate(model, alone, max_new_tokens=12, temperature=0)
        assert torch.equal(out[0, alone.shape[1]:], runs[0][row, ids.shape[1]:])


def test_sampling_stops_at_the_end_of_turn_token(hf_model_dir):
    model, tok, _ = handoff.load_stage(hf_model_dir("neox"))
    end = tok.convert_tokens_to_ids("<|end|>")

    def favour_end(module, args, output):  # make <|end|> by far the likeliest token everywhere
        output.logits[..., end] += 100.0
        return output

    model.register_forward_hook(favour_end)
    out = generate_text(model, tok, [prompt_ids(tok, p) for p in PROMPTS], max_new_tokens=8, temperature=1.0,
                        top_k=5, top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert out.ended.all() and out.completion_mask.sum(-1).tolist() == [1, 1]
    assert out.texts == ["", ""]


def logits(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("family", FAMILIES)
def test_a_saved_stage_is_a_hugging_face_directory(family, hf_model_dir, tmp_path):
    model, tok, _ = handoff.load_stage(hf_model_dir(family))
    out = tmp_path / "sft"
    handoff.save_stage(out, model, tok)
    manifest = handoff.write_manifest(out, {"stage": "sft", "model_kind": "transformers", "metrics": {},
                                            "timings": {}})
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= set(manifest["sha256"])
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    # Training forwards fill no KV cache; the directory written keeps inference's default.
    assert model.config.use_cache is False and reloaded.config.use_cache is True
    ids = torch.tensor([prompt_ids(tok, PROMPTS[1])])
    assert (logits(reloaded, ids) - logits(model, ids)).abs().max() < 1e-5
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert hf_tok.apply_chat_template(PROMPTS[1], add_generation_prompt=True, tokenize=True,
                                      return_dict=True)["input_ids"] == ids[0].tolist()
    assert hf_tok.pad_token_id == tok.pad_token_id != tok.eos_token_id


def test_a_sharded_stage_round_trips_with_every_shard_sealed(hf_model_dir, tmp_path):
    model, tok, _ = handoff.load_stage(hf_model_dir("llama3"))
    out = tmp_path / "sft"
    (out).mkdir()
    (out / "model.safetensors").write_text("a stale single file from an earlier attempt")
    handoff.save_stage(out, model, tok, max_shard_size="20KB")
    manifest = handoff.write_manifest(out, {"stage": "sft", "model_kind": "transformers", "metrics": {},
                                            "timings": {}})
    index = json.loads((out / handoff.WEIGHT_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert set(shards) | {handoff.WEIGHT_INDEX} <= set(manifest["sha256"])
    loaded, _, _ = handoff.load_stage(out)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    # A record that leaves a shard out cannot vouch for it.
    del manifest["sha256"][shards[0]]
    (out / handoff.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(handoff.StageDirError, match=f"does not list {shards[0]}"):
        handoff.verify(out)


def test_a_plain_model_directory_as_parent_is_hashed_and_recorded(hf_model_dir, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(hf_model_dir("chatml"), base)
    record = handoff.verify(base)
    assert record["external"] and record["stage"] is None and record["path"] == str(base)
    assert set(record["sha256"]) == {p.name for p in base.iterdir()}
    weights = base / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert handoff.verify(base)["content_hash"] != record["content_hash"]
    (base / "model.safetensors").rename(base / "pytorch_model.bin")
    with pytest.raises(handoff.StageDirError, match="no safetensors weights"):
        handoff.verify(base)


def test_remote_code_is_refused_unless_trusted(hf_model_dir, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(hf_model_dir("neox"), base)
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"needs code from its repository .*hf.trust_remote_code: true"):
        handoff.load_stage(base)


def test_a_base_without_a_padding_token_gets_the_same_new_row_on_every_load(hf_model_dir):
    # llama3 has no pad token: one is added and its embedding row appended, at the others' mean, so a
    # policy and its separately loaded reference (or a run and its resumption) start identical.
    (a, tok, _), (b, _, _) = handoff.load_stage(hf_model_dir("llama3")), handoff.load_stage(hf_model_dir("llama3"))
    assert tok.pad_token == "<|pad|>" and a.get_input_embeddings().num_embeddings == len(tok)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    emb = a.get_input_embeddings().weight
    assert torch.equal(emb[tok.pad_token_id], emb[:-1].mean(0))


def test_a_model_with_fewer_rows_than_its_tokenizer_has_tokens_is_refused_not_grown(hf_model_dir, tmp_path, capsys):
    # Only the padding token alignflow adds may get a new row; a tokenizer 100 tokens past the
    # model's vocabulary (its BOS and EOS among them) belongs to another model.
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignflow.flows.cli import main as cli

    base = tmp_path / "base"
    shutil.copytree(hf_model_dir("llama3"), base)
    tok = AutoTokenizer.from_pretrained(base)
    config = json.loads((base / "config.json").read_text())
    rows = len(tok) - 100
    LlamaForCausalLM(LlamaConfig(**{**config, "vocab_size": rows})).save_pretrained(base)
    message = (rf"{base}: the model has {rows} embedding rows \(vocab_size {rows}\) but its tokenizer has {len(tok)} "
               rf"tokens, so ids {rows}-{len(tok) - 1} \(.*<\|begin_of_text\|> {tok.bos_token_id}.*"
               rf"<\|eot_id\|> {tok.eos_token_id}\) have no embedding")
    with pytest.raises(ValueError, match=message):
        handoff.load_stage(base)
    capsys.readouterr()  # save_pretrained's progress bars
    assert cli(["eval", str(base)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "use the tokenizer it was trained with" in err
    # As the issue ran it: one stage with the preset for Hugging Face models, which trained (rc 0).
    proc = subprocess.run([sys.executable, "-m", "alignflow.stages", "sft", "--preset", "hf-small", "--parent",
                           str(base), "--out", str(tmp_path / "sft")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1].startswith(f"python -m alignflow.stages sft: error: {base}: the model has "
                                                   f"{rows} embedding rows"), proc.stderr
    assert not (tmp_path / "sft" / "model.safetensors").exists()


def not_a_model(kind: str, base, tmp_path):
    """(a directory as a user might give it, the one line they should read about it)."""
    d = tmp_path / "model"
    if kind == "missing":
        return d, f"{d} does not exist: give a stage directory of an earlier run or a Hugging Face model directory"
    if kind == "a file":
        d.write_text("")
        return d, f"{d} is a file: give a stage directory of an earlier run or a Hugging Face model directory"
    shutil.copytree(base, d)
    if kind == "no config.json":
        (d / "config.json").unlink()
        return d, (f"{d} has no config.json, so it is not a Hugging Face model directory (its weights "
                   "model.safetensors need the model's config.json beside them): copy it from where the model came from")
    if kind == "no tokenizer files":
        (d / "tokenizer.json").unlink()
        (d / "tokenizer_config.json").unlink()
        return d, (f"{d} has no tokenizer (no tokenizer.json or tokenizer_config.json): copy the tokenizer files of "
                   "the model it came from into it")
    (d / "tokenizer.json").unlink()  # a tokenizer_config.json alone, no vocabulary to build one from
    return d, (f"{d} has no tokenizer.json, and transformers cannot build the fast tokenizer alignflow needs from "
               "its other tokenizer files: copy tokenizer.json of the model it came from into it")


@pytest.mark.parametrize("kind", ["missing", "a file", "no config.json", "no tokenizer files", "no tokenizer.json"])
def test_a_directory_that_is_no_model_is_refused_saying_what_is_missing(kind, hf_model_dir, tmp_path, capsys):
    # Not "manifest.json is missing" (nor transformers' "install sentencepiece or tiktoken").
    from alignflow.flows.cli import main as cli

    d, message = not_a_model(kind, hf_model_dir("llama3"), tmp_path)
    capsys.readouterr()  # the fixture's own output, when it builds the model now
    assert cli(["eval", str(d)]) == 1
    assert capsys.readouterr().err.splitlines() == [f"alignflow eval: error: {message}"]


def test_cli_eval_and_generate_take_a_plain_model_directory(hf_model_dir, capsys):
    from alignflow.flows.cli import main as cli

    base = str(hf_model_dir("chatml"))
    assert cli(["eval", base, "--set", "eval.max_prompts=3", "--set", "eval.reward_samples=0"]) == 0
    out = capsys.readouterr().out
    assert f"{base}: a Hugging Face model directory, files hashed" in out and "(3 prompts)" in out
    assert cli(["generate", base, "--prompt", "What is 3 plus 4?", "--max-new-tokens", "6"]) == 0
    model, tok, _ = handoff.load_stage(base)
    expected = generate_text(model, tok, [prompt_ids(tok, PROMPTS[0])], max_new_tokens=6).texts[0]
    assert capsys.readouterr().out == f"> What is 3 plus 4?\n{expected}\n\n"
