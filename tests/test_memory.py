"""fedpara commands keep freed buffers for reuse (fedpara/runtime/memory.py): the page faults a
round's 1 MB frames would cost again and again are paid once."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
glibc_linux = pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                                 reason="glibc's mallopt")

# what a round does to the allocator: a message's worth of 1 MB frames, built and dropped, again
ROUNDS = """
import resource, sys
from fedpara.runtime.memory import tune_malloc
print(tune_malloc())
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    frames = [bytearray(1 << 20) for _ in range(40)]
    for f in frames:
        f[::4096] = b"x" * len(f[::4096])  # touch every page, as filling a frame does
    del frames
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""


# a 61 MB model's message buffers (VGG16 dense): above glibc's highest mmap threshold (32 MB), so
# with its defaults each one is a fresh mapping; built and dropped by the main and another thread.
# Prints the faults of the first pass (each arena's first touch) and of the 5 passes after it.
BIG = """
import resource, threading
from fedpara.runtime.memory import tune_malloc
print(tune_malloc())
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def message():
    buf = bytearray(61_020_000)
    buf[::4096] = b"x" * len(buf[::4096])
def one_pass():
    message()
    t = threading.Thread(target=message)
    t.start()
    t.join()
start = faults()
one_pass()
warm = faults()
for _ in range(5):
    one_pass()
print(warm - start, faults() - warm)
"""


def _faults(malloc: str, script: str = ROUNDS):
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "FEDPARA_MALLOC": malloc}).stdout.split()
    return out[0], *map(int, out[1:])


@glibc_linux
def test_freed_frames_are_reused_instead_of_faulted_in_again():
    tuned, tuned_faults = _faults("")
    default, default_faults = _faults("default")
    assert (tuned, default) == ("True", "False")  # FEDPARA_MALLOC=default keeps the C library's way
    once = 40 * 256  # 40 MB of 4 KiB pages
    assert tuned_faults < 1.3 * once  # paid once, in the first round
    assert default_faults > 1.5 * tuned_faults  # glibc's defaults hand it back and fault it in again


@glibc_linux
def test_buffers_beyond_the_mmap_threshold_are_reused_too():
    tuned, tuned_first, tuned_rest = _faults("", BIG)
    default, default_first, default_rest = _faults("default", BIG)
    assert (tuned, default) == ("True", "False")
    per_buffer = 61_020_000 // 4096
    assert default_rest > 8 * per_buffer  # 10 more buffers: each a fresh mapping, faulted in again
    # tuned: the first pass faults each arena's pages in once (main + the thread's, 2 buffers' worth);
    # the 10 buffers after it reuse them. (In a long pytest session glibc has once been seen to hand
    # a thread a fresh arena: at most one more buffer's worth.)
    assert tuned_first < 3 * per_buffer and tuned_rest < 1.5 * per_buffer


def test_every_fedpara_command_applies_it(monkeypatch, tmp_path):
    import fedpara.runtime.memory as memory
    from fedpara.runtime.cli import main

    calls = []
    monkeypatch.setattr(memory, "tune_malloc", lambda: calls.append(1) or True)
    assert main(["keys", "new", "k1", "--dir", str(tmp_path)]) == 0
    assert calls == [1] and (tmp_path / "k1.pub").exists()
