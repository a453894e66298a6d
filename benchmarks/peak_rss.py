"""Peak resident memory of every process a command starts (torchrun's ranks included), read from outside.

Runs the command after ``--``, and every ``--interval`` seconds walks its process tree through ``/proc`` and reads
each process's ``VmHWM`` (the kernel's RSS high-water mark, which never decreases) and ``VmRSS``. A process's peak is
the last ``VmHWM`` read before it exited, so a peak reached in the last interval of a process's life can be missed
(the interval is short against a training step). The command's output is passed through, each line prefixed with
the seconds since the start, so the time of each rank's peak (also reported) can be matched with the log (an
evaluation, a step).

    python benchmarks/peak_rss.py --json /tmp/rss.json -- bash examples/train_rm_bilingual.sh --max_steps 12 ...

Prints one line per process whose command line contains ``--match`` (default ``train_reward_model.py``: the
workers; torchrun's own process and the launcher are left out): pid, peak RSS MB, when it was reached, and the RSS
at the end. Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time


def _children() -> dict[int, list[int]]:
    """``{ppid: [pid, ...]}`` of every process visible in /proc."""
    tree: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])  # the name in brackets may hold spaces
        tree.setdefault(ppid, []).append(int(name))
    return tree


def _descendants(root: int) -> list[tuple[int, int]]:
    """``(pid, parent pid)`` of ``root`` and every process below it."""
    tree, out, todo = _children(), [], [(root, 0)]
    while todo:
        pid, parent = todo.pop()
        out.append((pid, parent))
        todo += [(child, pid) for child in tree.get(pid, [])]
    return out


def _status_kb(pid: int) -> dict[str, int] | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f)
                    if k in ("VmHWM", "VmRSS")}
    except (OSError, ValueError):
        return None


def _cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of a process so far (``/proc/<pid>/stat``), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--interval", type=float, default=0.2, help="seconds between two readings")
    p.add_argument("--match", default="train_reward_model.py", help="report processes whose command line has this")
    p.add_argument("--json", default=None, help="write the per-process peaks and an RSS timeline here")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("no command given (put it after --)")

    t0 = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)

    def echo():
        for line in proc.stdout:
            sys.stdout.write(f"[{time.perf_counter() - t0:7.1f}s] {line}")
            sys.stdout.flush()

    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    procs: dict[int, dict] = {}  # pid -> cmd, parent, hwm_kb, t_hwm, rss_kb
    timeline: list[tuple[float, dict[int, int]]] = []
    last_sample = -1e9
    while True:
        done = proc.poll() is not None
        now = time.perf_counter() - t0
        sample = {}
        for pid, parent in _descendants(proc.pid):
            st = _status_kb(pid)
            if not st or "VmHWM" not in st:
                continue
            info = procs.setdefault(pid, {"cmd": _cmdline(pid), "parent": parent, "hwm_kb": 0, "t_hwm": 0.0,
                                          "rss_kb": 0})
            if st["VmHWM"] > info["hwm_kb"]:
                info["hwm_kb"], info["t_hwm"] = st["VmHWM"], now
            info["rss_kb"] = st["VmRSS"]
            info["cpu_s"] = _cpu_seconds(pid) or info.get("cpu_s", 0.0)
            sample[pid] = st["VmRSS"]
        if now - last_sample >= 1.0:  # the timeline once a second
            timeline.append((round(now, 1), sample))
            last_sample = now
        if done:
            break
        time.sleep(args.interval)
    reader.join(timeout=5)
    rc = proc.returncode
    wall = time.perf_counter() - t0

    matching = {pid for pid, info in procs.items() if args.match in info["cmd"]}
    # the workers: matching processes with no matching child (torchrun's own command line names the script too)
    workers = {pid: procs[pid] for pid in matching
               if not any(info["parent"] == pid for other, info in procs.items() if other in matching)}
    print(f"\nexit code {rc}, {wall:.0f} s; peak RSS per process matching {args.match!r}:")
    for pid, info in sorted(workers.items()):
        print(f"  pid {pid}: peak {info['hwm_kb'] / 1024:7.0f} MB at {info['t_hwm']:6.1f}s, "
              f"last RSS read {info['rss_kb'] / 1024:7.0f} MB, CPU time {info.get('cpu_s', 0.0):6.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "exit_code": rc, "wall_s": wall,
                       "peaks_mb": {str(pid): info["hwm_kb"] / 1024 for pid, info in workers.items()},
                       "processes": {str(pid): info for pid, info in procs.items()},
                       "timeline_rss_kb": [(t, {str(k): v for k, v in s.items() if k in workers})
                                           for t, s in timeline]}, f, indent=1)
    return rc


if __name__ == "__main__":
    sys.exit(main())
