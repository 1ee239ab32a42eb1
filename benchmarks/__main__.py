"""Run the benchmarks: ``python -m benchmarks [NAME ...] [--quick]``.

Every module of this folder named ``bench_*.py`` or ``*_bench.py`` is a
benchmark; NAME picks some by their short name (``model`` for
``bench_model.py``, ``validate`` for ``validate_bench.py``, ``tokenizer``,
...) and none runs them all, in name order. Each module's
``main(argv: list[str] | None) -> int | None`` is called in this process with
``["--quick"]`` when ``--quick`` is given (shrunk sizes: a smoke run of every
benchmark in a minute or so, not figures to report), else with no arguments.
A benchmark that fails is reported and the others still run; the exit status
is non-zero if any failed.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent


def discover() -> dict[str, str]:
    """Short name -> module name for every benchmark module in this folder."""
    found = {}
    for path in sorted(HERE.glob("*.py")):
        stem = path.stem
        if stem.startswith("bench_"):
            found[stem[len("bench_"):]] = stem
        elif stem.endswith("_bench"):
            found[stem[: -len("_bench")]] = stem
    return found


def run_one(module_name: str, argv: list[str]) -> int:
    """Import ``benchmarks.<module_name>`` and call its ``main`` with ``argv``; its exit status."""
    module = importlib.import_module(f"{__package__ or 'benchmarks'}.{module_name}")
    main = module.main
    if inspect.signature(main).parameters:
        result = main(argv)
    else:  # an older main() that reads sys.argv itself
        saved, sys.argv = sys.argv, [module_name, *argv]
        try:
            result = main()
        finally:
            sys.argv = saved
    return int(result or 0)


def main(argv: list[str] | None = None) -> int:
    benches = discover()
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run (of {sorted(benches)}); none: all")
    ap.add_argument("--quick", action="store_true", help="pass --quick to each benchmark (shrunk sizes)")
    args = ap.parse_args(argv)
    unknown = [n for n in args.names if n not in benches]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; choose from {sorted(benches)}")
    chosen = args.names or sorted(benches)
    sys.path.insert(0, str(HERE.parent))  # the repository root, for `benchmarks.<module>`
    failed = []
    for name in chosen:
        print(f"== {name} ({benches[name]}.py){' --quick' if args.quick else ''}", flush=True)
        t0 = time.perf_counter()
        try:
            status = run_one(benches[name], ["--quick"] if args.quick else [])
        except SystemExit as e:  # argparse errors and sys.exit() inside a benchmark
            status = e.code if isinstance(e.code, int) else 1
        except Exception:
            traceback.print_exc()
            status = 1
        print(f"== {name}: {'ok' if status == 0 else f'FAILED (status {status})'} "
              f"in {time.perf_counter() - t0:.1f} s\n", flush=True)
        if status:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
