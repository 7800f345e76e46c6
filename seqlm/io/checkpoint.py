"""Checkpoints: crash-safe, verified, and free of pickle.

A training run writes a checkpoint *root* (``<out_dir>/checkpoint``)::

    checkpoint/
      latest                  "step-00000200": written last (temp file, fsync, rename, fsync dir)
      step-00000100/          one complete checkpoint per save (the newest ``keep_last`` kept)
      step-00000200/
        config.yaml           the RunConfig (load -> dump -> load is equal)
        model.safetensors     weights (tied tensors stored once)
        tokenizer/            the tokenizer (Tokenizer.save)
        trainer.safetensors   optimizer tensors and RNG states (uint8), training only
        trainer.json          the rest of the trainer state (step, param groups, counters)
        meta.json             step, metrics, parameter count, seqlm version
        manifest.json         size and SHA-256 of every file above, verified at load

A step directory is written under a hidden temp name (``.step-00000200.tmp-<pid>-<rand>``),
every file and the directory fsynced, then renamed into place; ``latest`` moves after that
and older step directories are pruned only then. So at every instant the newest complete
checkpoint is loadable and a partial one is never visible: a crash leaves at most a hidden
temp directory, removed by the next save (:func:`clean_stale`). A missing or stale ``latest``
falls back to the newest step directory.

A model-only save (``seqlm convert ... --out DIR``) writes one such directory in place of a
root. It refuses to replace a directory that is not a seqlm checkpoint, and swaps an old
checkpoint for the new one atomically (``renameat2(RENAME_EXCHANGE)`` where the kernel has it).

Every reader (:func:`load_model`, :func:`load_weights`, ``--checkpoint`` of every command)
accepts a root, a step directory or a model-only directory (:func:`resolve_checkpoint`).
Nothing is unpickled: tensors come from safetensors, the rest from JSON / YAML.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as _st_load_file
from safetensors.torch import load_model as _st_load_model
from safetensors.torch import save_file as _st_save_file
from safetensors.torch import save_model as _st_save_model

import seqlm
from seqlm import fsutil
from seqlm.config import ConfigError, dump_config, load_config
from seqlm.io import state as _state

MANIFEST, LATEST = "manifest.json", "latest"
FORMAT = "seqlm-checkpoint"
STEP_RE = re.compile(r"^step-(\d{8,})$")
TMP_RE = re.compile(r"^\.(.+)\.(?:tmp|trash)-(\d+)-[0-9a-f]+$")
# what a checkpoint directory may hold; a model-only save refuses to replace anything else
KNOWN = {"config.yaml", "model.safetensors", "tokenizer", "meta.json", MANIFEST, "trainer.safetensors",
         "trainer.json", "trainer.pt", "eval"}


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete, corrupt or does not match the model/tokenizer."""


class CheckpointWriteError(CheckpointError, OSError):
    """Writing a checkpoint failed (disk full, I/O error); earlier checkpoints are intact."""


def step_name(step: int) -> str:
    return f"step-{int(step):08d}"


# --------------------------------------------------------------------------------------
# finding checkpoints

def _is_ckpt_dir(p: Path) -> bool:
    return (p / "model.safetensors").is_file() and (p / "config.yaml").is_file()


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Complete step directories of a root, oldest first."""
    out = []
    try:
        children = list(root.iterdir())
    except OSError:
        return []
    for c in children:
        m = STEP_RE.match(c.name)
        if m and c.is_dir() and ((c / MANIFEST).is_file() or _is_ckpt_dir(c)):
            out.append((int(m.group(1)), c))
    return sorted(out)


def is_root(path) -> bool:
    p = Path(path)
    return p.is_dir() and not _is_ckpt_dir(p) and ((p / LATEST).is_file() or bool(_step_dirs(p)))


def find_checkpoint(path) -> Optional[Path]:
    """The checkpoint directory ``path`` denotes (see :func:`resolve_checkpoint`), or None when
    ``path`` does not exist or is a root without a complete checkpoint yet."""
    p = Path(path)
    if not p.is_dir():
        return None
    if _is_ckpt_dir(p):
        return p
    latest = p / LATEST
    if latest.is_file():
        try:
            name = latest.read_text().strip()
        except (OSError, UnicodeDecodeError):
            name = ""
        cand = p / name
        if STEP_RE.match(name) and cand.is_dir() and ((cand / MANIFEST).is_file() or _is_ckpt_dir(cand)):
            return cand
    steps = _step_dirs(p)
    return steps[-1][1] if steps else None


def resolve_checkpoint(path) -> Path:
    """A checkpoint root -> its ``latest`` step directory (falling back to the newest complete
    one); a step or model-only directory -> itself. CheckpointError otherwise."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {str(p)!r}: no such directory")
    if not p.is_dir():
        raise CheckpointError(f"checkpoint {str(p)!r}: not a directory")
    found = find_checkpoint(p)
    if found is None:
        if (p / "trainer.pt").exists() or (p / "model.safetensors").exists() or (p / "config.yaml").exists():
            missing = [f for f in ("config.yaml", "model.safetensors") if not (p / f).exists()]
            raise CheckpointError(f"checkpoint {str(p)!r}: missing {', '.join(missing)} (incomplete)")
        raise CheckpointError(f"checkpoint {str(p)!r}: no complete checkpoint here (no model.safetensors, "
                              f"no step-* directory)")
    return found


def clean_stale(root) -> list[Path]:
    """Remove leftover temp / trash directories of saves whose process is gone."""
    root, removed = Path(root), []
    if not root.is_dir():
        return removed
    for c in root.iterdir():
        m = TMP_RE.match(c.name)
        if m and fsutil.owner_gone(int(m.group(2))):
            shutil.rmtree(c, ignore_errors=True) if c.is_dir() else c.unlink(missing_ok=True)
            removed.append(c)
    return removed


# --------------------------------------------------------------------------------------
# writing

def _write_contents(d: Path, model, cfg, tokenizer, trainer_state, meta) -> None:
    fsutil.write_bytes(d / "config.yaml", dump_config(cfg).encode())
    fsutil.fs_step("write", d / "model.safetensors")
    _st_save_model(_unwrap(model), str(d / "model.safetensors"))
    fsutil.public(d / "model.safetensors")
    fsutil.fsync_path(d / "model.safetensors")
    fsutil.fs_step("write", d / "tokenizer")
    tokenizer.save(d / "tokenizer")
    for f in sorted((d / "tokenizer").iterdir()):
        fsutil.fsync_path(f)
    fsutil.fsync_path(d / "tokenizer")
    if trainer_state is not None:
        tensors, skeleton = _state.flatten(trainer_state)
        fsutil.fs_step("write", d / "trainer.safetensors")
        _st_save_file(tensors, str(d / "trainer.safetensors"))
        fsutil.public(d / "trainer.safetensors")
        fsutil.fsync_path(d / "trainer.safetensors")
        fsutil.write_bytes(d / "trainer.json", _state.dumps(skeleton))
    info = {"seqlm_version": seqlm.__version__,
            "n_params": sum(p.numel() for p in _unwrap(model).parameters()),
            "tokenizer_fingerprint": tokenizer.fingerprint(), **(meta or {})}
    fsutil.write_bytes(d / "meta.json", json.dumps(info, indent=2).encode())
    files = {}
    for f in sorted(x for x in d.rglob("*") if x.is_file()):
        files[f.relative_to(d).as_posix()] = {"size": f.stat().st_size, "sha256": fsutil.sha256_file(f)}
    fsutil.write_bytes(d / MANIFEST, json.dumps({"format": FORMAT, "version": 2, "files": files},
                                                  indent=1).encode())
    fsutil.fsync_path(d)


def _new_tmp(parent: Path, name: str, kind: str = "tmp") -> Path:
    tmp = parent / f".{name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"
    os.mkdir(tmp)  # mode 0777 & ~umask (tempfile.mkdtemp would make it owner-only)
    return tmp


def save_checkpoint(path, model: torch.nn.Module, cfg, tokenizer, trainer_state: Optional[dict] = None,
                    meta: Optional[dict] = None, *, step: Optional[int] = None,
                    keep_last: Optional[int] = None) -> Path:
    """Write a checkpoint; returns its directory.

    With ``step``: ``path`` is a checkpoint root; writes ``path/step-<step>``, then moves
    ``latest`` to it, then prunes all but the newest ``keep_last`` step directories (None: keep
    all). Without ``step``: ``path`` is a model-only checkpoint directory, created or replacing
    an earlier seqlm checkpoint (anything else there is refused, never deleted).

    A failure (disk full, I/O error) leaves every earlier checkpoint as it was and raises
    CheckpointError naming the target."""
    path = Path(path)
    if step is not None:
        return _save_step(path, int(step), keep_last, model, cfg, tokenizer, trainer_state, meta)
    return _save_single(path, model, cfg, tokenizer, trainer_state, meta)


def _write_failed(target: Path, e: OSError, prev: Optional[Path]) -> CheckpointWriteError:
    kept = f"the previous checkpoint {str(prev)!r} is intact" if prev else "no earlier checkpoint was touched"
    why = e.strerror or str(e)
    return CheckpointWriteError(f"could not write checkpoint {str(target)!r}: {why}"
                           f"{' (disk full)' if e.errno == 28 else ''}; {kept}")


def _save_step(root: Path, step: int, keep_last, model, cfg, tokenizer, trainer_state, meta) -> Path:
    if root.exists() and _is_ckpt_dir(root):
        raise CheckpointError(f"checkpoint root {str(root)!r} holds a single checkpoint (model.safetensors); "
                              f"move it away or pick another train.out_dir")
    root.mkdir(parents=True, exist_ok=True)
    clean_stale(root)
    name = step_name(step)
    final, prev = root / name, find_checkpoint(root)
    tmp = _new_tmp(root, name)
    try:
        _write_contents(tmp, model, cfg, tokenizer, trainer_state, {"step": step, **(meta or {})})
        if final.exists():  # re-saving a step (e.g. resumed from an older one): old one out first
            fsutil.remove_tree(final)
        fsutil.rename(tmp, final)
        fsutil.fsync_path(root)
        fsutil.replace_file(root / LATEST, (name + "\n").encode())
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failed(final, e, prev) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last is not None:
        for _, d in _step_dirs(root)[:-keep_last] if keep_last > 0 else []:
            if d != final:
                try:
                    fsutil.remove_tree(d)
                except OSError:  # pruning is best effort; the new checkpoint is already complete
                    pass
    return final


def _save_single(path: Path, model, cfg, tokenizer, trainer_state, meta) -> Path:
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"checkpoint {str(path)!r}: exists and is not a directory; refusing to replace it")
        if is_root(path):
            raise CheckpointError(f"checkpoint {str(path)!r} is a checkpoint root of a training run (step-* "
                                  f"directories); refusing to replace it: choose a new directory")
        entries = sorted(c.name for c in path.iterdir())
        if entries and not _is_ckpt_dir(path):
            raise CheckpointError(f"{str(path)!r} exists and is not a seqlm checkpoint (it holds "
                                  f"{', '.join(entries[:5])}{', ...' if len(entries) > 5 else ''}); "
                                  f"refusing to replace it: choose a new or empty directory")
        foreign = [e for e in entries if e not in KNOWN]
        if foreign:
            raise CheckpointError(f"checkpoint {str(path)!r} also holds files that are not part of a "
                                  f"checkpoint ({', '.join(foreign[:5])}); refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_tmp(path.parent, path.name)
    prev = path if path.exists() and _is_ckpt_dir(path) else None
    try:
        _write_contents(tmp, model, cfg, tokenizer, trainer_state, meta)
        if path.exists() and not any(path.iterdir()):
            path.rmdir()
        fsutil.replace_dir(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failed(path, e, prev) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _unwrap(model):
    return getattr(model, "_orig_mod", model)  # torch.compile wrapper


# --------------------------------------------------------------------------------------
# reading

def verify(path, files: Optional[list[str]] = None) -> Path:
    """Check sizes and SHA-256 of a checkpoint's files against its manifest (all files, or
    ``files``); a checkpoint without a manifest (older seqlm, foreign) is not checked.
    Raises CheckpointError naming the first bad file; returns the resolved directory."""
    d = resolve_checkpoint(path)
    mpath = d / MANIFEST
    if not mpath.is_file():
        return d
    try:
        man = json.loads(mpath.read_text())
        entries = man["files"]
        assert man.get("format") == FORMAT and isinstance(entries, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise CheckpointError(f"checkpoint {str(d)!r}: {MANIFEST} is corrupt") from None
    for rel, want in entries.items():
        if files is not None and rel not in files and rel.split("/")[0] not in files:
            continue
        f = d / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint {str(d)!r}: {rel} is missing")
        size = f.stat().st_size
        if size != want.get("size"):
            raise CheckpointError(f"checkpoint {str(d)!r}: {rel} is corrupt or truncated "
                                  f"({size} bytes, expected {want.get('size')})")
        if fsutil.sha256_file(f) != want.get("sha256"):
            raise CheckpointError(f"checkpoint {str(d)!r}: {rel} is corrupt (SHA-256 does not match the manifest)")
    return d


def read_meta(path) -> dict[str, Any]:
    d = resolve_checkpoint(path)
    p = d / "meta.json"
    if not p.exists():
        return {}
    try:
        meta = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {str(d)!r}: meta.json is corrupt ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {str(d)!r}: meta.json is corrupt (not an object)")
    return meta


def load_weights(model: torch.nn.Module, path, strict: bool = True) -> tuple[list[str], list[str]]:
    """Load model.safetensors into ``model``; returns (missing, unexpected) when not strict."""
    d = verify(path, ["model.safetensors"])
    f = d / "model.safetensors"
    if not f.is_file():
        raise CheckpointError(f"checkpoint {str(d)!r}: model.safetensors is missing")
    try:
        missing, unexpected = _st_load_model(_unwrap(model), str(f), strict=strict)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"checkpoint {str(d)!r}: model.safetensors is corrupt or truncated ({e})") from None
    except RuntimeError:
        raise CheckpointError(f"checkpoint {str(d)!r}: weights do not fit the model: {_misfit(model, f)} "
                              f"(is the model config the checkpoint's own config.yaml?)") from None
    return list(missing), list(unexpected)


def _misfit(model, f: Path) -> str:
    """A one-line summary of how a weights file and a model differ."""
    from safetensors import safe_open

    with safe_open(str(f), framework="pt") as h:
        shapes = {k: tuple(h.get_slice(k).get_shape()) for k in h.keys()}
    sd, ptrs, want = _unwrap(model).state_dict(), set(), {}
    for k, v in sd.items():  # tied tensors are stored once: count each storage once
        if v.data_ptr() not in ptrs or k in shapes:
            want[k] = tuple(v.shape)
        ptrs.add(v.data_ptr())
    probs = [f"{k}: file {shapes[k]} vs model {want[k]}" for k in want if k in shapes and shapes[k] != want[k]]
    probs += [f"{k} missing from the file" for k in want if k not in shapes]
    probs += [f"{k} not in the model" for k in shapes if k not in want]
    more = f" and {len(probs) - 3} more" if len(probs) > 3 else ""
    return "; ".join(probs[:3]) + more


def load_model(path, device="cpu", overrides: list[str] = ()):
    """-> (model, cfg, tokenizer) from a checkpoint (root, step or model-only directory),
    model in eval mode. Every file is verified against the manifest first."""
    from seqlm.data.tokenizers import load_tokenizer
    from seqlm.io.factory import build_model

    d = verify(path, ["config.yaml", "model.safetensors", "tokenizer", "meta.json"])
    for f in ("config.yaml", "model.safetensors", "tokenizer"):
        if not (d / f).exists():
            raise CheckpointError(f"checkpoint {str(d)!r}: missing {f} (incomplete or not a seqlm checkpoint)")
    try:
        cfg = load_config(d / "config.yaml", overrides)
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {str(d)!r}: {e}") from None
    try:
        tok = load_tokenizer(d / "tokenizer")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {str(d)!r}: tokenizer/: {e}") from None
    fp = read_meta(d).get("tokenizer_fingerprint")
    if fp is not None and fp != tok.fingerprint():
        raise CheckpointError(f"checkpoint {str(d)!r}: tokenizer/ does not match the one the model was trained with")
    model = build_model(cfg, tok.vocab_size)
    load_weights(model, d)
    return model.to(device).eval(), cfg, tok


def load_trainer_state(path) -> Optional[dict]:
    """The trainer state saved with a checkpoint (None for a model-only checkpoint).
    Never unpickles: an old ``trainer.pt`` is refused."""
    d = resolve_checkpoint(path)
    st, js = d / "trainer.safetensors", d / "trainer.json"
    if not st.exists() and not js.exists():
        if (d / "trainer.pt").exists():
            raise CheckpointError(f"checkpoint {str(d)!r}: trainer.pt is a pickle (seqlm < 0.2 format), which "
                                  f"can run code when loaded, so seqlm does not load it; start a new run from "
                                  f"its weights with train.init_from={str(d)!r}")
        return None
    verify(d, ["trainer.safetensors", "trainer.json"])
    try:
        tensors = _st_load_file(str(st))
        skeleton = json.loads(js.read_text())
        return _state.unflatten(skeleton, tensors)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {str(d)!r}: trainer state (trainer.safetensors / trainer.json) "
                              f"is corrupt: {e}") from None


def init_from_checkpoint(model: torch.nn.Module, path, verbose: bool = True) -> list[str]:
    """Load the weights of checkpoint ``path`` (a stage-1 HMT, or a plain LM) into ``model``
    (an HMT, typically stage 2). Every tensor in the file must fit the model; the model's
    parameters the file lacks must all be HMT parameters (``memory.*``): they keep their fresh
    initialisation and are returned (and printed). Anything else is a CheckpointError."""
    if find_checkpoint(path) is None:
        raise CheckpointError(f"memory.init_from: no checkpoint at {str(path)!r} (model.safetensors missing)")
    path = resolve_checkpoint(path)
    missing, unexpected = load_weights(model, path, strict=False)
    backbone_missing = sorted(k for k in missing if not k.startswith("memory."))
    if unexpected or backbone_missing:
        parts = []
        if unexpected:
            parts.append(f"weights the model has no place for: {sorted(unexpected)}")
        if backbone_missing:
            parts.append(f"backbone weights missing from the file: {backbone_missing}")
        raise CheckpointError(f"memory.init_from {str(path)!r} does not fit this model: " + "; ".join(parts)
                              + " (is model: the same backbone as the checkpoint's?)")
    new = sorted(missing)
    if verbose:
        what = ", ".join(new) if new else "nothing"
        print(f"HMT: initialised from {path}; newly initialised: {what}")
    return new


def maybe_init_from(model, cfg) -> list[str]:
    """For the training loop, on a fresh (not resumed) run: apply ``memory.init_from`` if set.
    Returns the newly initialised parameter names (empty when nothing was loaded)."""
    mem = getattr(cfg, "memory", None)
    if mem is None or not mem.init_from:
        return []
    return init_from_checkpoint(model, mem.init_from)
