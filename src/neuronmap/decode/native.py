"""Small C kernels shipped as source, compiled once per machine, loaded with ctypes.

A kernel ``NAME`` is ``neuronmap/decode/csrc/NAME.c``. The first ``load(NAME)`` compiles it with the system C
compiler (``$CC``, else ``gcc``, else ``cc``; about a second) into ``$NEURONMAP_CACHE/native/NAME-HASH.so``,
written beside and renamed into place, so processes racing to build it never load a partial file. The hash
covers the source, the flags, the compiler's version and the machine, so an edit or a new compiler builds anew
and an old build is never loaded by mistake. ``make install`` builds every kernel, so a user's first run does
not wait for it.

Where no compiler works, the CPU lacks an instruction set the kernel needs, or ``NEURONMAP_NATIVE=0``, ``load``
returns None and says why in ``why_not(NAME)``; every caller then takes its pure-torch path, which gives the same
results (the tests compare the two).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from neuronmap.core.fsio import atomic_file
from neuronmap.core.cache import cache_dir

FLAGS = ("-O3", "-fPIC", "-shared", "-fopenmp", "-std=c11")


@dataclass(frozen=True)
class Kernel:
    """One C kernel: its extra compiler flags and the CPU flags (as /proc/cpuinfo names them) it needs."""

    flags: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    file: str | None = None  # the source under csrc/ when not NAME.c


KERNELS: dict[str, Kernel] = {
    "record": Kernel(),
    # neuronmap.decode.fused: split-precision products on vdpbf16ps (AVX512-BF16), fp32 accumulation.
    "fused": Kernel(flags=("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma"),
                    needs=("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "fma")),
    # The same source with the products on AMX-BF16 tiles (Intel Sapphire Rapids and later): 3-4x vdpbf16ps's rate.
    "fused_amx": Kernel(flags=("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma",
                               "-mamx-tile", "-mamx-bf16", "-DNM_AMX"), file="fused",
                        needs=("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "fma", "amx_tile", "amx_bf16")),
}
_WHY: dict[str, str] = {}


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def compiler() -> str | None:
    """The C compiler to use: ``$CC``, else ``gcc``, else ``cc`` on the PATH, or None."""
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def source(name: str) -> bytes:
    """The C source of kernel ``name``, as shipped in the package."""
    return resources.files("neuronmap.decode").joinpath("csrc", f"{KERNELS[name].file or name}.c").read_bytes()


def flags(name: str) -> tuple[str, ...]:
    """The compiler flags of kernel ``name``: the common ones and its own."""
    return FLAGS + KERNELS[name].flags


def built_path(name: str, cc: str) -> Path:
    """Where kernel ``name`` built by ``cc`` lives in the cache (the name carries the build's hash)."""
    version = subprocess.run([cc, "--version"], capture_output=True, timeout=30).stdout
    key = hashlib.sha256(b"\0".join([source(name), " ".join(flags(name)).encode(), version,
                                     platform.machine().encode()])).hexdigest()[:16]
    return cache_dir() / "native" / f"{name}-{key}.so"


def build(name: str) -> Path:
    """Compile kernel ``name`` into the cache unless it is there already; its path.

    Raises:
        OSError: no compiler, or the cache cannot be written.
        subprocess.CalledProcessError: the compiler failed (its stderr attached).
    """
    cc = compiler()
    if cc is None:
        raise OSError("no C compiler found (set $CC, or install gcc)")
    out = built_path(name, cc)
    if out.is_file():
        return out
    with atomic_file(out, "kernel cache ($NEURONMAP_CACHE)") as tmp:
        src = tmp.with_suffix(".c")
        src.write_bytes(source(name))
        try:
            subprocess.run([cc, *flags(name), "-o", str(tmp), str(src), "-lm"], check=True, capture_output=True,
                           timeout=300)
        finally:
            src.unlink(missing_ok=True)
    return out


@lru_cache(maxsize=None)
def load(name: str) -> ctypes.CDLL | None:
    """Kernel ``name``, built if needed and loaded, or None where it cannot be (``why_not`` says why).

    Example:
        >>> lib = load("record")  # doctest: +SKIP
    """
    if os.environ.get("NEURONMAP_NATIVE", "1") == "0":
        _WHY[name] = "NEURONMAP_NATIVE=0"
        return None
    missing = [f for f in KERNELS[name].needs if f not in cpu_flags()]
    if missing:
        _WHY[name] = f"this CPU lacks {', '.join(missing)}"
        return None
    try:
        return ctypes.CDLL(str(build(name)))
    except subprocess.CalledProcessError as e:
        _WHY[name] = f"the C compiler failed: {e.stderr.decode(errors='replace').strip()[-300:]}"
    except (OSError, subprocess.SubprocessError) as e:
        _WHY[name] = str(e)
    return None


def why_not(name: str) -> str | None:
    """Why ``load(name)`` returned None, or None if it did not (or was not called)."""
    return _WHY.get(name)


if __name__ == "__main__":  # `python -m neuronmap.decode.native`: build every kernel (make install runs it)
    for k in KERNELS:
        lib = load(k)
        print(f"{k}: {'built' if lib is not None else 'not built: ' + str(why_not(k))}")
