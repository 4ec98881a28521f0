"""Process and machine facts from /proc: CPU seconds, RSS, limits, the machine's identity."""

from __future__ import annotations

import os
import platform
import resource
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Final

__all__ = [
    "MachineCpu",
    "cpu_seconds",
    "free_port",
    "machine_info",
    "raise_nofile",
    "rss_kib",
    "stop_process",
]

CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
NOFILE_WANTED: Final = 65536


def raise_nofile(wanted: int = NOFILE_WANTED) -> int:
    """Raise RLIMIT_NOFILE as far as allowed (root may raise the hard limit); the new soft
    limit. Used in the harness, its workers and (as preexec_fn) every server it starts."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for new_hard in (max(hard, wanted), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, new_hard), new_hard))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cpu_seconds(pid: int, *, with_children: bool = False) -> float:
    """utime + stime of ``pid`` (all its threads) in seconds; 0.0 if it is gone.
    ``with_children`` adds cutime + cstime (children it has waited for)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    if with_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class MachineCpu:
    """Whole-machine CPU use between two /proc/stat readings."""

    busy: float = 0.0
    total: float = 0.0

    @classmethod
    def read(cls) -> MachineCpu:
        with open("/proc/stat") as f:
            parts = [int(x) for x in f.readline().split()[1:]]
        idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
        total = float(sum(parts[:8]))
        return cls(busy=(total - idle) / CLK_TCK, total=total / CLK_TCK)

    def since(self, earlier: MachineCpu) -> float:
        """Busy fraction of all cores since ``earlier``."""
        dt = self.total - earlier.total
        return (self.busy - earlier.busy) / dt if dt > 0 else 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
    """SIGTERM this process (only it, by its PID), then SIGKILL after ``grace_s``."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def machine_info() -> dict[str, object]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_kib = 0
    try:
        with open("/proc/meminfo") as f:
            mem_kib = int(f.readline().split()[1])
    except OSError:
        pass
    return {
        "cpu_model": model or platform.processor() or "unknown",
        "cores": os.cpu_count() or 0,
        #: CPUs this process may run on (what ``workers = "auto"`` would use)
        "usable_cpus": len(os.sched_getaffinity(0)),
        **cpuinfo_counts(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "hostname": socket.gethostname(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def cpuinfo_counts(path: str = "/proc/cpuinfo") -> dict[str, int]:
    """Logical processors, and physical cores where /proc/cpuinfo says (distinct
    (physical id, core id) pairs; 0 when it does not, as in many VMs)."""
    processors = 0
    cores: set[tuple[str, str]] = set()
    phys = core = ""
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "processor":
                    processors += 1
                    phys = core = ""
                elif key == "physical id":
                    phys = value.strip()
                elif key == "core id":
                    core = value.strip()
                    cores.add((phys, core))
    except OSError:
        pass
    return {"logical_cpus": processors, "physical_cores": len(cores)}
