"""Training checkpoints: weights as safetensors, everything else as tensors/JSON, never pickle.

    <save_dir>/state/step-00000120/
        model.safetensors       weights of the unwrapped model (its own parameter names); of a
                                partly frozen model (LoRA) only what trains (`trained_tensors`)
        training_state.pt       optimizer, scheduler, scaler (torch.save of tensors and
                                plain containers only: loadable with weights_only=True)
        rng-rank<r>.pt          each rank's RNG states, now and at the start of its epoch
        trainer_state.json      step, epoch, data position, early stopping, sha256 of the above

Under `strategy: fsdp` no rank holds the whole model, so the weights and optimizer state are
written by every rank with torch.distributed.checkpoint instead (`__<rank>_0.distcp`, tensors
loaded with weights_only=True, and `.metadata`, which DCP itself reads with pickle: it is
loaded only after its sha256 matched the record). DCP reshards on load, so a checkpoint written
by N ranks resumes on M. training_state.pt then holds the scheduler, scaler and algorithm state.

A checkpoint is written into `step-N.tmp/` and renamed when complete, so a crash leaves
either a whole checkpoint or a `.tmp` directory that nothing reads. `trainer_state.json`
is written last and records every other file's sha256, which `load` verifies (models.files
`seal`/`verify_seal`, shared with the stage hand-off)."""
from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from alignflow.models.files import atomic_write, read_seal, seal, verify_seal

CHECKPOINT_DIR = "state"
_STEP_DIR = re.compile(r"^step-(\d+)$")
META_FILE = "trainer_state.json"  # written last: a checkpoint directory with it is complete
REQUIRED_FILES = ("model.safetensors", "training_state.pt", "rng-rank0.pt")  # its record must vouch for these
SHARDED_REQUIRED_FILES = (".metadata", "training_state.pt", "rng-rank0.pt")
FORMATS = {"safetensors": "ddp", "dcp": "fsdp"}  # the checkpoint format each strategy writes


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or altered, or could not be written; the
    message names the file."""


# --- weights ---

TRAINED_ONLY = "trained"  # metadata["contents"] of a checkpoint holding only what trains


def trained_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """What a checkpoint holds of a partly frozen model (a LoRA adapter on a frozen base): the
    parameters that train and the buffers, one name per storage. None when every parameter
    trains: then the whole model is saved. Frozen parameters never change, so a resumed run has
    them already, rebuilt the way the first run built them (from the parent checkpoint); so has
    what describes them (a 4-bit base's quantization state)."""
    params = list(model.named_parameters(remove_duplicate=False))
    if all(p.requires_grad for _, p in params):
        return None
    kept = {n for n, p in params if p.requires_grad} | {n for n, _ in model.named_buffers()}
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        if name in kept and (t.data_ptr(), t.shape) not in seen:  # tied names: one copy
            seen.add((t.data_ptr(), t.shape))
            out[name] = t.detach().contiguous()
    return out


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """safetensors cannot hold two names for one storage; `save_model` drops duplicates
    of tied weights and `load_weights` re-ties them."""
    trained = trained_tensors(model)
    if trained is None:
        atomic_write(path, lambda tmp: save_model(model, tmp, metadata={"format": "pt"}))
    else:
        atomic_write(path, lambda tmp: save_file(trained, tmp, metadata={"format": "pt", "contents": TRAINED_ONLY}))


def load_weights(model: torch.nn.Module, path: Path) -> None:
    device = str(next(model.parameters()).device)
    try:
        with safe_open(str(path), "pt") as f:
            partial = (f.metadata() or {}).get("contents") == TRAINED_ONLY
        if not partial:
            load_model(model, str(path), strict=True, device=device)
            return
        expected = set(trained_tensors(model) or model.state_dict())
        state = load_file(str(path), device=device)
    except (SafetensorError, RuntimeError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot load weights from {path}: {e}") from e
    if set(state) != expected:  # e.g. resumed with other lora settings than it was saved with
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise CheckpointError(f"{path} holds the trained tensors of another model: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]} (was it saved with other lora settings?)")
    model.load_state_dict(state, strict=False)


# --- RNG ---

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python, numpy and torch RNG states as tensors/ints (weights_only-loadable)."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": py_gauss},
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- checkpoint directories ---

def checkpoint_root(save_dir: str | os.PathLike) -> Path:
    return Path(save_dir) / CHECKPOINT_DIR


def step_dir(save_dir: str | os.PathLike, step: int) -> Path:
    return checkpoint_root(save_dir) / f"step-{step:08d}"


def step_of(path: Path) -> int:
    """The step of a checkpoint directory `step-N`."""
    return int(_STEP_DIR.match(path.name).group(1))


def list_checkpoints(save_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first. `.tmp` directories are never complete."""
    root = checkpoint_root(save_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / META_FILE).exists()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(save_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(save_dir)
    return found[-1] if found else None


def begin(save_dir: str | os.PathLike, step: int) -> Path:
    """Fresh temporary directory for the checkpoint of `step` (rank 0 only)."""
    tmp = step_dir(save_dir, step).with_suffix(".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


# torch.save's zip writer reports a short write (a full disk, a quota) as a RuntimeError.
_ZIP_WRITER_ERRORS = ("PytorchStreamWriter", "inline_container", "unexpected pos", "file write failed")


@contextlib.contextmanager
def writing(tmp: Path):
    """Around writing the checkpoint in `tmp` (step-N.tmp): on any failure remove the half-written
    directory (nothing reads it, but it holds disk space the user is likely short of) and re-raise
    with the checkpoint named. An OSError keeps its errno (ENOSPC stays visible); anything else
    becomes a one-line CheckpointError."""
    try:
        yield
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit: cleaned up, not reworded
            raise
        where = tmp.with_suffix("")
        if isinstance(e, OSError):
            cause = e.strerror or str(e)
            if e.filename:
                cause += f": {e.filename}"
            message = f"writing checkpoint {where} failed: {cause}"
            raise (OSError(e.errno, message) if e.errno is not None else OSError(message)) from e
        cause = (str(e).strip().splitlines() or [""])[0]
        if any(m in cause for m in _ZIP_WRITER_ERRORS):
            raise CheckpointError(f"writing checkpoint {where} failed (disk full?): {cause}") from e
        raise CheckpointError(f"writing checkpoint {where} failed: {type(e).__name__}: {cause}") from e


def save_rng(tmp: Path, rank: int, current: dict, epoch_start: dict | None) -> None:
    torch.save({"current": current, "epoch_start": epoch_start}, tmp / f"rng-rank{rank}.pt")


def save_state(tmp: Path, model: torch.nn.Module | None, training_state: dict) -> None:
    """Rank 0's part: the weights (unless sharded: `save_sharded` wrote them) and the rest."""
    if model is not None:
        save_weights(model, tmp / "model.safetensors")
    torch.save(training_state, tmp / "training_state.pt")


def _trained_only():
    """Sharded checkpoints leave out frozen parameters too (a LoRA adapter's base), as
    `trained_tensors` does for one process."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True)


def save_sharded(tmp: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of the weights and of the optimizer state into `tmp`."""
    from torch.distributed.checkpoint import FileSystemWriter, save
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=_trained_only())
    save({"model": model_state, "optimizer": optim_state}, storage_writer=FileSystemWriter(tmp))


def load_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The weights and optimizer state of `path` into this rank's shards, however many ranks
    wrote them. Every rank must call it."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=_trained_only())  # this rank's, to fill
    state = {"model": model_state, "optimizer": optim_state}
    try:
        load(state, storage_reader=FileSystemReader(path))
    except Exception as e:
        raise CheckpointError(f"cannot load the sharded weights and optimizer state of {path}: {e}") from e
    # Not strict: the frozen parameters are not in it (`load` has already refused a missing key).
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))


def commit(tmp: Path, meta: dict, keep_last: int | None) -> Path:
    """Hash every file, write trainer_state.json last, rename into place, prune old ones."""
    seal(tmp, META_FILE, meta, [p.name for p in tmp.iterdir() if p.is_file()])
    final = tmp.with_suffix("")
    if final.exists():  # a re-save of the same step (e.g. after resume) replaces it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep_last:
        for old in list_checkpoints(final.parent.parent)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: Path, model: torch.nn.Module, rank: int,
         sharded_optimizer: torch.optim.Optimizer | None = None) -> tuple[dict, dict, dict]:
    """Verify every recorded sha256, load the weights into `model` (and, for a sharded model, the
    optimizer state into `sharded_optimizer`), and return (meta, training_state, rng) for the
    trainer to restore."""
    strategy = "fsdp" if sharded_optimizer is not None else "ddp"
    written_by = FORMATS[read_seal(path, META_FILE, CheckpointError).get("format", "safetensors")]
    if written_by != strategy:
        raise CheckpointError(f"{path} was written with strategy {written_by}; resume it with strategy {written_by} "
                              f"(this run uses {strategy})")
    meta = verify_seal(path, META_FILE, CheckpointError,
                       required=SHARDED_REQUIRED_FILES if sharded_optimizer is not None else REQUIRED_FILES)
    if sharded_optimizer is not None:
        load_sharded(path, model, sharded_optimizer)
    else:
        load_weights(model, path / "model.safetensors")
    device = next(model.parameters()).device
    state_path = path / "training_state.pt"
    rng_path = path / f"rng-rank{rank}.pt"
    if not rng_path.exists():  # resumed with more ranks than saved: share rank 0's states
        rng_path = path / "rng-rank0.pt"
    try:
        training_state = torch.load(state_path, map_location=device, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot load {state_path}: {e}") from e
    try:
        rng = torch.load(rng_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot load {rng_path}: {e}") from e
    return meta, training_state, rng
