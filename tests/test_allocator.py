"""``pf2lora --allocator``: the command runs again under the chosen malloc, or stops with one line."""

from __future__ import annotations

import ctypes.util
import subprocess
import sys
from pathlib import Path

import pytest

from pf2lora import allocator
from pf2lora.cli import main
from pf2lora.config import ConfigError

JEMALLOC = ctypes.util.find_library("jemalloc")
needs_jemalloc = pytest.mark.skipif(JEMALLOC is None, reason="libjemalloc is not installed (apt install libjemalloc2)")
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("nosuch", "--allocator nosuch: not system, jemalloc, tcmalloc, or the path of a shared library"),
        (__file__, f"--allocator {__file__}: not a shared library"),
    ],
)
@linux
def test_an_allocator_that_is_not_there_is_one_line_and_exit_2(name, message, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["--allocator", name, "run", "train.rounds=1", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"pf2lora: error: {message}"
    assert not out.exists()  # nothing started


@linux
def test_a_known_allocator_that_is_not_installed_names_the_package(monkeypatch) -> None:
    monkeypatch.setattr(allocator.ctypes.util, "find_library", lambda name: None)
    message = r"libtcmalloc_minimal is not installed \(e.g. apt install libtcmalloc-minimal4\)"
    with pytest.raises(ConfigError, match=message):
        allocator.preload("tcmalloc")


def test_system_is_this_process() -> None:
    allocator.preload("system", own_process=False)  # nothing to do, nothing raised
    allocator.preload(None, own_process=False)


@linux
def test_the_command_runs_again_with_the_library_preloaded(monkeypatch, tmp_path: Path) -> None:
    lib = tmp_path / "libfake.so"
    lib.write_bytes(b"\x7fELF" + bytes(60))
    monkeypatch.setenv("LD_PRELOAD", "libother.so")
    monkeypatch.delenv(allocator.PRELOADED, raising=False)
    monkeypatch.setattr(sys, "orig_argv", ["python3", "-m", "pf2lora.cli", "--allocator", str(lib), "methods"])
    calls = []
    monkeypatch.setattr(allocator.os, "execve", lambda *a: calls.append(a))
    allocator.preload(str(lib))
    ((program, argv, env),) = calls
    assert program == sys.executable
    assert argv == [sys.executable, "-m", "pf2lora.cli", "--allocator", str(lib), "methods"]
    assert env["LD_PRELOAD"] == f"{lib} libother.so"  # first, and what was there stays
    assert env[allocator.PRELOADED] == str(lib)
    with pytest.raises(ConfigError, match="needs a process of its own"):
        allocator.preload(str(lib), own_process=False)  # main() called from Python: no exec
    monkeypatch.setenv(allocator.PRELOADED, str(lib))  # the run again, where ld.so ignored it
    with pytest.raises(ConfigError, match=f"the dynamic linker could not preload {lib}"):
        allocator.preload(str(lib))


@needs_jemalloc
@linux
def test_jemalloc_is_the_malloc_of_the_command_and_of_what_it_forks(tmp_path: Path) -> None:
    script = (
        "import os, sys\n"
        "from pf2lora.allocator import loaded, preload\n"
        "preload('jemalloc')\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        f"    os._exit(0 if loaded({JEMALLOC!r}) else 3)\n"
        "print(loaded(" + repr(JEMALLOC) + "), os.waitpid(pid, 0)[1])\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "0"]
    proc = subprocess.run(
        [sys.executable, "-m", "pf2lora.cli", "--allocator", "jemalloc", "methods"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "pf2lora" in proc.stdout
