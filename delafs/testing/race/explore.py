"""Many schedules: explore, summarise, replay, and the ``delafs race``
command."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from .consts import DEFAULT_MAX_STEPS
from .mutants import MUTANTS, _mutant_stats, mutant
from .plan import make_plan
from .schedule import Result, Schedule, run_schedule
from .scheduler import Finding


@dataclass
class Summary:
    punch: str
    mutant: str | None
    schedules: int = 0
    steps: int = 0
    interleavings: set = field(default_factory=set)
    findings: list[Finding] = field(default_factory=list)
    first_finding_at: int | None = None     # 1-based schedule count of the first finding
    seconds: float = 0.0
    stats: dict = field(default_factory=dict)


def explore(*, punch: str = "scan", schedules: int = 100, seed: int = 0,
            mutant_name: str | None = None, stop_at_first: bool = False,
            max_steps: int = DEFAULT_MAX_STEPS, progress=None) -> Summary:
    """Run ``schedules`` schedules with seeds seed, seed+1, ..."""
    if punch not in ("scan", "legacy"):
        raise ValueError(f"punch mode must be scan or legacy, not {punch!r}")
    if mutant_name is not None and mutant_name not in MUTANTS:
        raise ValueError(f"unknown mutant {mutant_name!r} (known: {', '.join(MUTANTS)})")
    s = Summary(punch, mutant_name)
    t0 = time.perf_counter()
    for k in _mutant_stats:
        _mutant_stats[k] = 0
    with mutant(mutant_name):
        for i in range(schedules):
            sd = seed + i
            res = Schedule(sd, punch=punch, mutant_name=mutant_name, max_steps=max_steps).run()
            s.schedules += 1
            s.steps += res.steps
            s.interleavings.add(res.trace_hash)
            for k, v in res.stats.items():
                s.stats[k] = s.stats.get(k, 0) + v
            if res.findings:
                if s.first_finding_at is None:
                    s.first_finding_at = i + 1
                s.findings.extend(res.findings)
            if progress is not None:
                progress(i + 1, res)
            if res.findings and stop_at_first:
                break
    if mutant_name:
        s.stats.update({f"mutant_{k}": v for k, v in _mutant_stats.items()})
    s.seconds = time.perf_counter() - t0
    return s


def format_summary(s: Summary, *, max_findings: int = 5) -> str:
    what = f"punch={s.punch}" + (f" mutant={s.mutant}" if s.mutant else "")
    lines = [f"delafs race ({what}): {s.schedules} schedules, {s.steps} steps, "
             f"{len(s.interleavings)} distinct interleavings, {s.seconds:.1f}s"]
    st = s.stats
    keys = ["punches", "punch_ranges", "short_copies", "stale_mappings", "page_mkwrites",
            "fs_delalloc_converted", "fs_nonda_allocations", "fs_writeback_errors", "fs_discards",
            "mutant_scans", "mutant_scans_with_dirty_past_eof"]
    lines.append("  reached: " + ", ".join(f"{k}={st[k]}" for k in keys if k in st))
    if not s.findings:
        lines.append("  no findings")
    else:
        seeds = sorted({f.seed for f in s.findings})
        lines.append(f"  {len(s.findings)} finding(s) in {len(seeds)} schedule(s); first after "
                     f"{s.first_finding_at} schedule(s)")
        seen = set()
        shown = 0
        for f in s.findings:
            if f.seed in seen:
                continue
            seen.add(f.seed)
            msg = f.message.splitlines()[0] if f.message else ""
            lines.append(f"  - seed {f.seed}, step {f.step}: {f.kind}: {msg}")
            shown += 1
            if shown >= max_findings:
                break
        mut = f" --mutant {s.mutant}" if s.mutant else ""
        lines.append(f"  replay: delafs race --punch {s.punch}{mut} --replay {s.findings[0].seed}")
    return "\n".join(lines)


def replay(seed: int, *, punch: str = "scan", mutant_name: str | None = None,
           out=sys.stdout, max_steps: int = DEFAULT_MAX_STEPS) -> Result:
    """Run one schedule and print its workload, every step and its findings."""
    plan = make_plan(seed, mutant_name)
    print(f"schedule {seed} (punch={punch}{', mutant=' + mutant_name if mutant_name else ''})",
          file=out)
    for line in plan.describe():
        print(f"  {line}", file=out)
    res = run_schedule(seed, punch=punch, mutant_name=mutant_name, max_steps=max_steps)
    logs = {}
    for line in res.log:
        step = int(line[6:line.index("]")])
        logs.setdefault(step, []).append(line)
    for line in logs.pop(0, []):
        print(f"  {line}", file=out)
    for step, name, point in res.trace:
        print(f"step {step:5d}: release {name:<10} at {point}", file=out)
        for line in logs.pop(step, []):
            print(f"           {line}", file=out)
    print(f"trace {res.trace_hash} ({res.steps} steps)", file=out)
    if res.findings:
        for f in res.findings:
            print(f"FINDING {f}", file=out)
    else:
        print("no findings", file=out)
    return res


def main(args) -> int:
    """``delafs race`` (argparse namespace from delafs.cli)."""
    if args.list_mutants:
        for name, what in MUTANTS.items():
            print(f"{name:22} {what}")
        print("no_eof_clamp cannot be caught in this model: no block past EOF is ever dirty "
              "while a punch scan runs (tests/engine/test_race.py)")
        return 0
    if args.mutant and args.punch != "scan":
        print("delafs race: mutants are variants of the scan punch; use --punch scan",
              file=sys.stderr)
        return 2
    if args.replay is not None:
        res = replay(args.replay, punch=args.punch, mutant_name=args.mutant)
        return 1 if res.findings else 0

    def progress(i, res):
        if args.verbose:
            state = "; ".join(str(f).splitlines()[0] for f in res.findings) or "ok"
            print(f"schedule {res.seed}: {res.steps} steps, trace {res.trace_hash[:12]}: {state}",
                  flush=True)
        elif sys.stderr.isatty() and i % 50 == 0:
            print(f"\r{i}/{args.schedules} schedules", end="", file=sys.stderr, flush=True)

    s = explore(punch=args.punch, schedules=args.schedules, seed=args.seed,
                mutant_name=args.mutant, stop_at_first=args.exitfirst, progress=progress)
    if sys.stderr.isatty() and not args.verbose:
        print("\r", end="", file=sys.stderr)
    print(format_summary(s))
    return 1 if s.findings else 0
