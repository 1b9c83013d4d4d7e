"""Long fuzz run of the property tests in ``tests/test_property.py``.

Each property (``PROPERTIES`` there: a ``check_*`` function and its hypothesis strategies) is run
as a ``@given`` test with ``settings(max_examples=N, database=None)`` and a fixed ``--seed``.  The
test body counts examples and catches failures instead of raising, so one bug does not end the
run: every failing example is counted, and the first example of each distinct failure (exception
type, message with numbers blanked, innermost frame) is recorded with its ``repr`` (evaluable
after ``from netgen import *``) and traceback.  Then each distinct failure is looked for again by
a second ``@given`` run that raises only on that failure, so hypothesis shrinks it towards a
minimal falsifying example (for at most ``--shrink-seconds``; 0 skips this).  Patterns of known
library bugs are left out of the generated networks unless ``--known-bugs``
(``netgen.AVOID_KNOWN_BUGS``).

    python benchmarks/fuzz.py                          # 500 examples per property, seed 0
    python benchmarks/fuzz.py --examples 200 --seed 3
    python benchmarks/fuzz.py --properties prune_meets_target --examples 50

Writes ``benchmarks/results/fuzz.json`` (examples run, failures, outcomes, seconds per property,
torch and hypothesis versions) and prints a summary.  Exit status 1 when anything failed.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import platform
import re
import sys
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import hypothesis  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402

import netgen  # noqa: E402
from test_property import PROPERTIES  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MAX_DISTINCT = 20  #: distinct failures recorded per property
MAX_SHRINK = 5  #: distinct failures shrunk per property


def signature(exc: BaseException) -> str:
    """Exception type, first message line (numbers blanked) and the innermost frame of our code:
    one string per distinct bug."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = next((f"{Path(f.filename).name}:{f.lineno} ({f.name})" for f in reversed(frames)
                  if "site-packages" not in f.filename and "/lib/python" not in f.filename), "?")
    message = re.sub(r"\d+", "#", (str(exc).strip().splitlines() or [""])[0])[:200]
    return f"{type(exc).__name__}: {message} @ {where}"


def _settings(examples: int) -> settings:
    return settings(max_examples=examples, database=None, deadline=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


def quiet_check(check, kwargs):
    """Run a check with stderr swallowed (torch's ShapeProp prints tracebacks it then re-raises)."""
    with contextlib.redirect_stderr(io.StringIO()):
        return check(**kwargs)


def run_property(name: str, examples: int, seed: int, shrink_seconds: float) -> dict:
    check, strategies = PROPERTIES[name]
    stats = {"examples": 0, "failures": 0, "outcomes": collections.Counter()}
    distinct: dict = {}

    def body(**kwargs):
        stats["examples"] += 1
        try:
            outcome = quiet_check(check, kwargs)
        except Exception as exc:  # noqa: BLE001 - record and go on
            stats["failures"] += 1
            key = signature(exc)
            if key in distinct:
                distinct[key]["count"] += 1
            elif len(distinct) < MAX_DISTINCT:
                distinct[key] = {"error": key, "count": 1, "first_example": repr(kwargs),
                                 "traceback": "".join(traceback.format_exception(exc))[-3000:]}
            return
        if outcome is not None:
            stats["outcomes"][str(outcome)] += 1

    start = time.perf_counter()
    hypothesis.seed(seed)(_settings(examples)(given(**strategies)(body)))()
    seconds = time.perf_counter() - start

    if shrink_seconds > 0:
        for key in list(distinct)[:MAX_SHRINK]:
            distinct[key]["shrunk_example"], distinct[key]["shrink_seconds"] = shrink_failure(
                check, strategies, key, examples, seed, shrink_seconds)

    return {"examples": stats["examples"], "failures": stats["failures"], "seconds": round(seconds, 2),
            "outcomes": dict(stats["outcomes"]), "distinct_failures": list(distinct.values())}


def shrink_failure(check, strategies, key: str, examples: int, seed: int, budget: float):
    """Let hypothesis find and shrink an example failing with signature ``key``, for at most
    ``budget`` seconds: past it every example passes at once, so the shrinker stops quickly and
    the smallest failing example seen so far (the shrinker only tries smaller ones) is returned."""
    found = {"smallest": None}
    start = time.perf_counter()

    class Match(Exception):
        pass

    def body(**kwargs):
        if found["smallest"] is not None and time.perf_counter() - start > budget:
            return
        try:
            quiet_check(check, kwargs)
        except Exception as exc:  # noqa: BLE001
            if signature(exc) == key:
                found["smallest"] = repr(kwargs)
                raise Match(found["smallest"]) from exc

    try:
        hypothesis.seed(seed)(_settings(examples)(given(**strategies)(body)))()
    except Match as exc:
        found["smallest"] = exc.args[0]
    except Exception:  # noqa: BLE001 - Flaky once the budget ran out: keep the smallest seen
        pass
    return found["smallest"] or "(not reproduced)", round(time.perf_counter() - start, 2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=500, help="examples per property (default 500)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--properties", default=",".join(PROPERTIES),
                        help=f"comma-separated subset of {', '.join(PROPERTIES)}")
    parser.add_argument("--shrink-seconds", type=float, default=120.0,
                        help="time to shrink each distinct failure (0: do not shrink; default 120)")
    parser.add_argument("--known-bugs", action="store_true",
                        help="also generate the patterns of known library bugs (netgen.AVOID_KNOWN_BUGS)")
    parser.add_argument("--out", type=Path, default=RESULTS / "fuzz.json")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.properties.split(",") if n.strip()]
    unknown = [n for n in names if n not in PROPERTIES]
    if unknown:
        parser.error(f"unknown properties {unknown}; choose from {list(PROPERTIES)}")

    netgen.AVOID_KNOWN_BUGS = not args.known_bugs
    warnings.filterwarnings("ignore")  # opaque-submodule notices etc.: not failures
    results = {}
    start = time.perf_counter()
    for name in names:
        print(f"[fuzz] {name}: {args.examples} examples, seed {args.seed} ...", flush=True)
        results[name] = r = run_property(name, args.examples, args.seed, args.shrink_seconds)
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(r["outcomes"].items()))
        print(f"[fuzz] {name}: {r['examples']} run, {r['failures']} failed, {r['seconds']:.1f}s"
              + (f" ({outcomes})" if outcomes else ""), flush=True)
        for f in r["distinct_failures"]:
            print(f"    x{f['count']}  {f['error']}")
            print(f"        example: {f.get('shrunk_example', f['first_example'])}")

    report = {
        "examples_per_property": args.examples,
        "seed": args.seed,
        "known_bugs_generated": args.known_bugs,
        "properties": results,
        "total_examples": sum(r["examples"] for r in results.values()),
        "total_failures": sum(r["failures"] for r in results.values()),
        "seconds": round(time.perf_counter() - start, 2),
        "torch": torch.__version__,
        "hypothesis": hypothesis.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"[fuzz] {report['total_examples']} examples, {report['total_failures']} failures, "
          f"{report['seconds']:.0f}s (torch {torch.__version__}); wrote {args.out}")
    return 1 if report["total_failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
