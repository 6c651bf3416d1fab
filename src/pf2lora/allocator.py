"""``pf2lora --allocator jemalloc ...``: run a command under another malloc.

glibc's malloc keeps a training's transient memory in its heap, fragmented: one client's training
of the default experiment grows a process by ~210 MB where under 80 MB is ever live at once, and
a worker process (``train.workers``) holds that much of its own. jemalloc (or tcmalloc) keeps it
near what is live. A malloc can only be chosen before a process starts, so the command runs itself
again with the library in ``LD_PRELOAD``, as PyTorch's own CPU launcher does
(``python -m torch.backends.xeon.run_cpu --enable-jemalloc``). Everything the command starts
inherits it: worker processes, Flower's SuperNodes and ClientApps.

The library is the system's (``apt install libjemalloc2``, ``libtcmalloc-minimal4``): it ships in
no Python package, so the option is not the default and nothing depends on it.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from pathlib import Path

from pf2lora.config import ConfigError

LIBRARIES = {"jemalloc": ("jemalloc",), "tcmalloc": ("tcmalloc_minimal", "tcmalloc")}  # as find_library names them
PACKAGES = {"jemalloc": "libjemalloc2", "tcmalloc": "libtcmalloc-minimal4"}  # Debian's, for the error
PRELOADED = "PF2LORA_PRELOADED"  # set in the command run again: the library it was given


def resolve(name: str) -> str:
    """What to put in ``LD_PRELOAD`` for ``name``: a known allocator's library as the dynamic
    linker finds it, or the path of a shared library."""
    if name in LIBRARIES:
        for lib in LIBRARIES[name]:
            found = ctypes.util.find_library(lib)
            if found:
                return found
        raise ConfigError(
            f"--allocator {name}: lib{LIBRARIES[name][0]} is not installed "
            f"(e.g. apt install {PACKAGES[name]}), "
            "or give the library's path"
        )
    path = Path(name)
    if not path.is_file():
        raise ConfigError(f"--allocator {name}: not system, {', '.join(LIBRARIES)}, or the path of a shared library")
    with path.open("rb") as f:
        if f.read(4) != b"\x7fELF":
            raise ConfigError(f"--allocator {name}: not a shared library")
    return str(path.resolve())


def loaded(lib: str) -> bool:
    """Whether ``lib`` (a name as :func:`resolve` gives it) is mapped into this process."""
    base = Path(lib).name
    with open("/proc/self/maps") as maps:
        return any(Path(line.split(maxsplit=5)[-1].strip()).name == base for line in maps if "/" in line)


def preload(name: str | None, own_process: bool = True) -> None:
    """Make ``name`` this process's malloc: return if it already is (or ``name`` is ``system`` or
    empty), else run this command again with it preloaded (does not return). ``own_process``:
    whether this process is the command's (false when :func:`pf2lora.cli.main` is called from
    Python with its own arguments, where there is nothing to run again). Raises
    :class:`ConfigError` for an allocator that is not there or that the dynamic linker ignored."""
    if not name or name == "system":
        return
    if not sys.platform.startswith("linux"):
        raise ConfigError(f"--allocator {name}: only on Linux (LD_PRELOAD)")
    lib = resolve(name)
    if loaded(lib):
        return
    if os.environ.get(PRELOADED) == lib:  # this is the command run again, and ld.so ignored it
        raise ConfigError(f"--allocator {name}: the dynamic linker could not preload {lib}")
    if not own_process:
        raise ConfigError(f"--allocator {name}: needs a process of its own (run the pf2lora command)")
    env = {**os.environ, PRELOADED: lib}
    env["LD_PRELOAD"] = " ".join(p for p in (lib, os.environ.get("LD_PRELOAD", "")) if p)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
