"""Memory readings of the benchmarks and the experiments (Linux ``/proc``; None where it is not available), in MB.

- :func:`rss_mb`: resident set size now (``VmRSS``) of this process or of ``pid`` (the driver watching a case).
- :func:`maxrss_mb`: this process's peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``).
- :func:`reset_hwm` / :func:`hwm_mb` / :func:`peak_rss_mb`: the peak over a stretch of the process only (the timed
  calls), and the peak of the whole process although the first was reset.
- :func:`trim_heap`: hand the C heap's free pages back to the OS.
- :func:`mem_available_mb`: what the machine can still give (``MemAvailable``).
"""

from __future__ import annotations

import resource
from typing import Optional, Union

Pid = Union[int, str]


def _status_mb(field: str, pid: Pid = "self") -> Optional[float]:
    """A ``kB`` field of ``/proc/<pid>/status`` in MB (None: no such process or field)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def rss_mb(pid: Pid = "self") -> Optional[float]:
    """Resident set size now (``VmRSS``) of this process, or of process ``pid``."""
    return _status_mb("VmRSS", pid)


def hwm_mb() -> Optional[float]:
    """This process's peak RSS since start or since the last :func:`reset_hwm` (``VmHWM``)."""
    return _status_mb("VmHWM")


def maxrss_mb() -> float:
    """This process's peak RSS (``ru_maxrss``; reset by :func:`reset_hwm` as well)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


_HWM_BEFORE_RESET = 0.0  # the process's peak RSS before reset_hwm() (imports, set-up, compilation, warm-up)


def trim_heap() -> None:
    """Return the C heap's free pages to the OS (glibc ``malloc_trim(0)``; a no-op elsewhere). XLA's compiler
    frees ~300 MB of the bench-size BPTT program's compile-time memory, which glibc keeps mapped; without this
    the step's own allocations stack on top of it in the RSS."""
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_hwm() -> bool:
    """Release the heap's free pages (:func:`trim_heap`, every case alike), then reset the kernel's peak-RSS
    counter of this process (Linux ≥ 4.0); False if not permitted."""
    trim_heap()
    global _HWM_BEFORE_RESET
    _HWM_BEFORE_RESET = max(_HWM_BEFORE_RESET, maxrss_mb())
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # also resets what getrusage reports as ru_maxrss
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """The whole process's peak RSS: :func:`reset_hwm` also resets ``ru_maxrss``, so the peak before it is kept."""
    return max(maxrss_mb(), _HWM_BEFORE_RESET)


def mem_available_mb() -> Optional[float]:
    """Memory the machine can give without swapping (``MemAvailable`` of ``/proc/meminfo``)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None
