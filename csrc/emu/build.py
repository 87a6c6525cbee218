"""Build the CPU emulation of the kernels (csrc/emu/emu.h) as the Python module `_C_emu`, and load it.

The kernel sources compile unchanged with the host compiler, after two rewrites of a copy of csrc/ that the host
compiler needs: `kernel<<<grid, block, smem, stream>>>(args)` becomes `::emu::launch(kernel, grid, block, smem,
stream)(args)`, and `extern __shared__ T name[];` a pointer to the CTA's shared-memory arena. The CUTLASS and Hopper
(TMA/wgmma) sources are left out (csrc/emu/stubs.cpp stands for them).

    python csrc/emu/build.py            build (cached under build/emu/ by a hash of the sources) and print the path
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
OUT = ROOT / "build" / "emu"
NOT_EMULATED = ("fp8_rowwise.cu", "flash_fwd_sm90.cu", "flash_bwd_sm90.cu")
FLAGS = ["-std=c++17", "-O2", "-fPIC", "-ffp-contract=off", "-DL3K_EMU", "-DL3K_MODULE=_C_emu",
         '-DL3K_CUDA_ARCH="emu"', '-DL3K_CUDA_VERSION="emu"', "-w"]  # fmt: skip


def _matching(text: str, i: int, open_: str, close: str, step: int) -> int:
    """Index of the bracket matching text[i] (an `open_` when step is 1, a `close` when step is -1)."""
    depth = 0
    while 0 <= i < len(text):
        if text[i] == (open_ if step == 1 else close):
            depth += 1
        elif text[i] == (close if step == 1 else open_):
            depth -= 1
            if depth == 0:
                return i
        i += step
    raise ValueError("unbalanced brackets")


_NAME = re.compile(r"(?:::)?[A-Za-z_]\w*(?:::[A-Za-z_]\w*)*$")


def rewrite_launches(text: str) -> str:
    """kernel<T, D><<<cfg>>>(args) -> ::emu::launch(kernel<T, D>, cfg)(args); a `<<<` not of that form (in a
    comment, say) is left alone."""
    pos = 0
    while (at := text.find("<<<", pos)) >= 0:
        pos = at + 3
        start = at
        while text[start - 1].isspace():
            start -= 1
        if text[start - 1] == ">":  # template arguments
            start = _matching(text, start - 1, "<", ">", -1)
        name_end = start
        while text[start - 1].isalnum() or text[start - 1] in "_:":
            start -= 1
        name = _NAME.search(text[start:name_end])  # `case 1:kernel` -> kernel
        end = text.find(">>>", at)
        paren = end + 3
        while end >= 0 and paren < len(text) and text[paren].isspace():
            paren += 1
        if name is None or end < 0 or paren >= len(text) or text[paren] != "(":
            continue
        start += name.start()
        close = _matching(text, paren, "(", ")", 1)
        kernel, config = text[start:at].strip(), text[at + 3 : end]
        text = f"{text[:start]}::emu::launch({kernel}, {config})({text[paren + 1 : close]}){text[close + 1 :]}"
    return text


_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:]+(?:\s+[\w:]+)*?)\s+(\w+)\[\];")
_STATIC_SHARED = re.compile(r"__shared__\s+(?:__align__\(\d+\)\s+)?([\w:<>]+)\s+(\w+)((?:\[[^\]]+\])+)\s*;")


def rewrite(text: str, file_id: int) -> str:
    """The two rewrites; static __shared__ arrays become references into the CTA's arena (one per CTA, poisoned like
    the dynamic part), each with an id from the file and its place in it."""
    text = _EXTERN_SHARED.sub(r"\1* \2 = reinterpret_cast<\1*>(::emu::shared_arena());", text)
    count = iter(range(1 << 16))

    def static(m: re.Match) -> str:
        t, name, dims = m.groups()
        key = (file_id + next(count)) & 0xFFFFFFFF
        return (f"{t} (&{name}){dims} = *reinterpret_cast<{t}(*){dims}>(::emu::static_shared(sizeof({t}{dims}), "
                f"alignof({t}), {key}u));")  # fmt: skip

    return rewrite_launches(_STATIC_SHARED.sub(static, text))


def _cuda_include() -> Path:
    for base in (os.environ.get("CUDA_HOME"), "/usr/local/cuda", "/usr/local/cuda-13.0"):
        if base and (Path(base) / "include" / "cuda_bf16.h").exists():
            return Path(base) / "include"
    nvcc = shutil.which("nvcc")
    if nvcc:  # may be a wrapper script: ask nvcc where its headers are
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", "/dev/null"], capture_output=True, text=True)
        for m in re.finditer(r"-I\"?([^\"\s]+include)", out.stderr):
            if (Path(m.group(1)) / "cuda_bf16.h").exists():
                return Path(m.group(1))
    raise RuntimeError("emu: the CUDA toolkit headers (cuda_bf16.h) were not found; set CUDA_HOME")


def _sources() -> list[Path]:
    files = sorted(p for p in CSRC.rglob("*") if p.suffix in (".cu", ".cuh", ".h", ".cpp") and p.is_file())
    return [p for p in files if p.name not in NOT_EMULATED]


def build(verbose: bool = False) -> Path:
    """Compile (or reuse) build/emu/<hash>/_C_emu<ext>; returns its path."""
    import pybind11

    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    digest = hashlib.sha256()
    for p in _sources():
        digest.update(str(p.relative_to(CSRC)).encode() + p.read_bytes())
    cxx = os.environ.get("CXX", "g++")
    compiler = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    cuda = _cuda_include()
    digest.update(" ".join(FLAGS + [sys.version, compiler, str(cuda), (cuda / "cuda.h").read_text()[:4000]]).encode())
    digest.update(Path(__file__).read_bytes())
    final = OUT / digest.hexdigest()[:16]
    target = final / f"_C_emu{suffix}"
    if target.exists():
        return target
    work = OUT / f"{final.name}.tmp{os.getpid()}"  # concurrent builds each use their own, the first rename wins
    shutil.rmtree(work, ignore_errors=True)
    src = work / "csrc"
    for p in _sources():
        rel = p.relative_to(CSRC)
        dst = src / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        text = p.read_text()
        emulated = p.suffix in (".cu", ".cuh", ".h") and rel.parts[0] != "emu"
        dst.write_text(rewrite(text, zlib.crc32(str(rel).encode()) << 8) if emulated else text)
    includes = [f"-I{src / 'emu' / 'include'}", f"-I{src}", f"-I{cuda}", f"-I{pybind11.get_include()}",
                f"-I{sysconfig.get_paths()['include']}"]  # fmt: skip
    units = [p for p in src.rglob("*") if p.suffix in (".cu", ".cpp")]

    def compile_one(unit: Path) -> Path:
        obj = unit.with_suffix(".o")
        lang = ["-x", "c++"] if unit.suffix == ".cu" else []
        cmd = [cxx, *FLAGS, "-include", "emu/emu.h", *includes, *lang, "-c", str(unit), "-o", str(obj)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"emu: compiling {unit.relative_to(src)} failed:\n{res.stderr[-6000:]}")
        if verbose:
            print("emu: compiled", unit.relative_to(src), file=sys.stderr)
        return obj

    jobs = int(os.environ.get("MAX_JOBS", os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        objs = list(pool.map(compile_one, units))
    lib = work / target.name
    res = subprocess.run([cxx, "-shared", *map(str, objs), "-o", str(lib)], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"emu: linking failed:\n{res.stderr[-6000:]}")
    try:
        work.rename(final)
    except OSError:  # another build finished first: use its module
        shutil.rmtree(work, ignore_errors=True)
    return target


def load(verbose: bool = False):
    """The `_C_emu` module (built if needed)."""
    path = build(verbose)
    spec = importlib.util.spec_from_file_location("_C_emu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    print(build(verbose=True))
