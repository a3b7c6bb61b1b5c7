"""Stage directories on shared storage: a runs directory may be a local path or an fsspec URL
(`file://`, `memory://`, `s3://`, `gs://`, ...), so stages in different pods hand checkpoints to
each other through a bucket.

A stage always trains in a local working directory. For a URL that is a cache directory
(`$ALIGNFLOW_CACHE_DIR`, default `~/.cache/alignflow`), and `publish` uploads the finished
directory with the manifest last: each file goes to a `.part` name and is moved into place, and a
remote directory without `manifest.json` is incomplete, exactly as locally. `localize` downloads
a published directory into the cache (reusing a cached copy with the same content hash) and
verifies every sha256 before anything loads it. Training checkpoints (state/step-N) are mirrored
to the URL as they are written, so a retry on another machine resumes from the last one. Local
paths need no extra packages; remote schemes need only their fsspec backend (s3fs, gcsfs, ...)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from alignflow.models.files import plain_relative_path, read_seal, write_json_atomic
from alignflow.trainers.checkpoint import CHECKPOINT_DIR, META_FILE

from . import handoff
from .lock import LOCK_FILE

PART_SUFFIX = ".part"
# Not part of the published stage: state/ (with work/'s fingerprint) is mirrored on its own;
# the lock guards the local working copy only.
LOCAL_ONLY = (CHECKPOINT_DIR, handoff.WORK_DIR, LOCK_FILE)


def is_url(ref: str | Path) -> bool:
    return "://" in str(ref)


def join(base: str | Path, *parts: str) -> str:
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *parts])
    return str(Path(base, *parts))


def _fs(url: str):
    from fsspec.core import url_to_fs  # imported here: local runs never need it

    return url_to_fs(url)


def cache_dir(url: str) -> Path:
    """The local working copy of a URL: <cache>/<scheme>/<bucket and path>."""
    scheme, rest = str(url).split("://", 1)
    root = Path(os.environ.get("ALIGNFLOW_CACHE_DIR", Path.home() / ".cache" / "alignflow"))
    return root / scheme / rest.strip("/")


def local_dir(ref: str | Path) -> Path:
    """Where a stage directory is worked on locally: the path itself, or the URL's cache."""
    return cache_dir(str(ref)) if is_url(ref) else Path(ref)


def exists(ref: str | Path) -> bool:
    if not is_url(ref):
        return Path(ref).exists()
    fs, path = _fs(str(ref))
    return fs.exists(path)


def subdirs(ref: str | Path) -> list[str]:
    """Names of the directories in a (local or remote) directory, sorted; [] if it is missing."""
    if not is_url(ref):
        return sorted(p.name for p in Path(ref).iterdir() if p.is_dir()) if Path(ref).is_dir() else []
    fs, root = _fs(str(ref))
    if not fs.isdir(root):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False) if fs.isdir(p))


def read_manifest(ref: str | Path, verify: bool = False) -> dict:
    """A stage directory's manifest, local or at a URL (nothing else is downloaded): as recorded
    (cheap: listings, resume points), or with `verify` after re-hashing every file it lists
    (handoff.verify; a plain Hugging Face model directory, which has no manifest, gets its record
    that way). A URL's files are checked by `localize` as it downloads them, so there `verify`
    reads the manifest as recorded."""
    if not is_url(ref):
        return handoff.verify(ref) if verify else read_seal(ref, handoff.MANIFEST, handoff.StageDirError)
    fs, path = _fs(join(ref, handoff.MANIFEST))
    if not fs.exists(path):
        raise handoff.StageDirError(f"{ref} is not a complete stage directory: {handoff.MANIFEST} is missing")
    try:
        return json.loads(fs.cat_file(path))
    except json.JSONDecodeError as e:
        raise handoff.StageDirError(f"{join(ref, handoff.MANIFEST)} is not valid JSON: {e}") from e


@dataclass(frozen=True)
class Incomplete:
    reason: str
    damaged: bool  # a manifest is there, but a file it lists is missing or fails its sha256


def why_incomplete(ref: str | Path, config_hash: str, parent_hash: str | None,
                   inputs: dict[str, str] | None = None) -> Incomplete | None:
    """Why a stage must (re)run; None when it is complete for this config, parent and inputs
    besides the parent ({role: content hash}: stages/inputs.py)."""
    if not exists(join(ref, handoff.MANIFEST)):
        return Incomplete(f"{ref} holds no finished stage yet", damaged=False)
    try:
        manifest = read_manifest(ref)
    except handoff.StageDirError as e:
        return Incomplete(str(e), damaged=False)
    if not is_url(ref):  # a remote stage's files are checked by whoever downloads them (localize)
        try:
            handoff.verify(ref)
        except handoff.StageDirError as e:
            return Incomplete(str(e), damaged=True)
    if manifest.get("config_hash") != config_hash:
        return Incomplete(f"{ref} was built with other settings", damaged=False)
    if (manifest.get("parent") or {}).get("content_hash") != parent_hash:
        return Incomplete(f"{ref} was built on another parent", damaged=False)
    built_on = {role: got.get("content_hash") for role, got in (manifest.get("inputs") or {}).items()}
    wanted = inputs or {}
    if built_on != wanted:
        changed = sorted(role for role in {*built_on, *wanted} if built_on.get(role) != wanted.get(role))
        return Incomplete(f"{ref} was built on another {', '.join(changed)}", damaged=False)
    return None


def localize(ref: str | Path) -> Path:
    """A verified local copy of a complete stage directory (the directory itself if local)."""
    if not is_url(ref):
        handoff.verify(ref)
        return Path(ref)
    manifest = read_manifest(ref)
    local = cache_dir(str(ref))
    names = _download_names(join(ref, handoff.MANIFEST), manifest, local)  # before anything is fetched
    try:
        if handoff.verify(local)["content_hash"] == manifest.get("content_hash"):
            return local
    except handoff.StageDirError:
        pass
    local.mkdir(parents=True, exist_ok=True)
    (local / handoff.MANIFEST).unlink(missing_ok=True)
    fs, root = _fs(str(ref))
    for name in names:
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(f"{root.rstrip('/')}/{name}", str(local / name))
    write_json_atomic(local / handoff.MANIFEST, manifest)
    try:
        handoff.verify(local)
    except handoff.StageDirError as e:
        (local / handoff.MANIFEST).unlink(missing_ok=True)
        raise handoff.StageDirError(f"downloading {ref}: {e}") from e
    return local


def _download_names(manifest_url: str, manifest, local: Path) -> list[str]:
    """The file names a remote manifest lists, each checked to land inside `local`: the manifest
    comes from the bucket, and a crafted name (`../../x.sh`, `/etc/x`, a path through a symlink
    in the cache) must not make `localize` write anywhere else."""
    digests = manifest.get("sha256") if isinstance(manifest, dict) else None
    if not isinstance(digests, dict):
        raise handoff.StageDirError(f"{manifest_url} records no sha256 map of its files")
    root = local.resolve()
    for name in digests:
        parts = name.split("/")
        if not plain_relative_path(name):
            why = "not a plain relative path"  # also: absolute, Windows separators, drive letters
        elif links := [p for i in range(len(parts)) if (p := local.joinpath(*parts[:i + 1])).is_symlink()]:
            why = f"{links[0]} is a symlink, which the download would follow"
        elif not (local / name).resolve().is_relative_to(root):
            why = f"it resolves outside {local}"
        else:
            continue
        raise handoff.StageDirError(f"{manifest_url}: refusing sha256 entry {name!r}: {why}")
    return list(digests)


def publish(local: Path, url: str) -> None:
    """Upload a complete local stage directory to `url`, manifest last."""
    fs, root = _fs(url)
    root = root.rstrip("/")
    if fs.exists(f"{root}/{handoff.MANIFEST}"):
        fs.rm_file(f"{root}/{handoff.MANIFEST}")  # incomplete until the new upload finishes
    files = [p for p in sorted(local.rglob("*")) if p.is_file() and p.relative_to(local).parts[0] not in LOCAL_ONLY]
    files.sort(key=lambda p: p.name == handoff.MANIFEST)
    for path in files:
        put_file(path, f"{url.rstrip('/')}/{path.relative_to(local).as_posix()}")


def read_bytes(ref: str | Path) -> bytes | None:
    """A file's bytes, local or at a URL; None when it is not there."""
    if not is_url(ref):
        return Path(ref).read_bytes() if Path(ref).is_file() else None
    fs, path = _fs(str(ref))
    return fs.cat_file(path) if fs.exists(path) else None


def put_file(path: Path, url: str) -> None:
    """Write one file to a URL through a `.part` name, so a reader never sees half of it."""
    fs, target = _fs(url)
    fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
    fs.put_file(str(path), target + PART_SUFFIX)
    fs.mv(target + PART_SUFFIX, target)


def mirror_checkpoint(local: Path, step_dir: Path, url: str) -> None:
    """Copy a just-completed training checkpoint (state/step-N) to the stage's URL, its
    trainer_state.json last, and drop remote checkpoints the trainer pruned locally: a retry in
    another pod resumes from here (`restore_checkpoint`)."""
    state = local / CHECKPOINT_DIR
    remote_state = join(url, CHECKPOINT_DIR)
    put_file(handoff.work_file(local, handoff.FINGERPRINT), join(url, handoff.WORK_DIR, handoff.FINGERPRINT))
    files = sorted((p for p in step_dir.iterdir() if p.is_file()), key=lambda p: p.name == META_FILE)
    for path in files:
        put_file(path, join(remote_state, step_dir.name, path.name))
    fs, root = _fs(remote_state)
    kept = {p.name for p in state.iterdir() if p.is_dir()}
    for path in fs.ls(root, detail=False):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("step-") and name not in kept:
            fs.rm(path, recursive=True)


def restore_checkpoint(url: str, local: Path) -> str | None:
    """Before a stage trains with no checkpoint of its own: fetch the newest complete one that an
    earlier attempt mirrored to `url`, if it was written for the same config and parent (the
    fingerprint prepare_out_dir just wrote). Returns its name, or None."""
    state = local / CHECKPOINT_DIR
    if state.is_dir() and any(p.name.startswith("step-") for p in state.iterdir()):
        return None
    fs, remote_fingerprint = _fs(join(url, handoff.WORK_DIR, handoff.FINGERPRINT))
    try:
        if json.loads(fs.cat_file(remote_fingerprint)) != json.loads(handoff.work_file(local, handoff.FINGERPRINT).read_text()):
            return None
    except FileNotFoundError:  # nothing was mirrored yet
        return None
    fs, root = _fs(join(url, CHECKPOINT_DIR))
    complete = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)
                      if fs.exists(f"{p.rstrip('/')}/{META_FILE}"))
    if not complete:
        return None
    name = complete[-1]
    tmp = state / f"{name}.tmp"
    tmp.mkdir(parents=True)
    for path in fs.ls(f"{root}/{name}", detail=False):
        fs.get_file(path, str(tmp / path.rstrip("/").rsplit("/", 1)[-1]))
    tmp.rename(state / name)  # the trainer verifies its sha256s when it loads it
    return name


def remove(ref: str | Path, name: str) -> None:
    """Delete one file of a (local or remote) stage directory if it is there."""
    if not is_url(ref):
        (Path(ref) / name).unlink(missing_ok=True)
        return
    fs, path = _fs(join(ref, name))
    if fs.exists(path):
        fs.rm_file(path)
