"""The paper-size conditioner: seconds to build it and to encode one barcode.

The paper's BERT (12 layers, 12 heads, 768 wide, 1024 positions; k = 3) is
built from the ``paper`` preset with random weights, then encodes one 658 nt
barcode with a place (the shapes ``tests/test_conditioner.py`` checks).
Goal: build + encode within 20 s on 2 CPU cores (a few seconds when quiet);
the test used to assert it, a loaded machine made that a flaky test, so the
figure lives here. Best of ``--repeats``, with the 1-minute load average.

    python -m benchmarks conditioner [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from g2p.config import preset
from g2p.models.conditioner import Conditioner
from g2p.tokenizer import build_tokenizer

GOAL_S = 20.0


def once(barcode: str) -> tuple[float, float]:
    """(build seconds, encode seconds) of one fresh paper-size conditioner."""
    paper = preset("paper")
    t0 = time.perf_counter()
    m = Conditioner.from_config(paper.conditioner, paper.tokenizer).eval()
    built = time.perf_counter() - t0
    out = build_tokenizer(paper.tokenizer)([barcode], padding=True, return_tensors="pt")
    t1 = time.perf_counter()
    with torch.no_grad():
        m(out["input_ids"], out["attention_mask"], torch.tensor([51.5]), torch.tensor([-0.1]), torch.tensor([True]))
    return built, time.perf_counter() - t1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one repeat (a smoke run)")
    args = ap.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    barcode = "".join("ACGT"[i * 7 % 4] for i in range(658))
    times = [once(barcode) for _ in range(repeats)]
    build, encode = min(t[0] for t in times), min(t[1] for t in times)
    verdict = "ok" if build + encode <= GOAL_S else "over the goal"
    print(f"paper conditioner: build {build:.2f} s, encode 1 barcode {encode:.3f} s, total {build + encode:.2f} s "
          f"(goal <= {GOAL_S:g} s: {verdict}; best of {repeats}, load {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
