"""Tokenizer throughput: barcodes per second through ``KmerTokenizer.__call__``.

A 100k batch of ~658 nt random barcodes (lengths 638..678 before the 660 nt
cap, 5% of them carrying a few N's, like the synthetic benchmark), tokenized
with ``padding=True, truncation=True, return_tensors="pt"`` as a training or
data-preparation step would. Prints one line per (k, stride). Goal: >= 100k/s
on 2 CPU cores for the configured k-mer sizes.

    python benchmarks/bench_tokenizer.py [--n 100000] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from g2p.tokenizer import KmerTokenizer


def make_barcodes(n: int, seed: int = 0) -> list[str]:
    """``n`` random barcodes of 638..678 nt; 5% carry 1..5 N's."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(638, 679, size=n)
    letters = np.frombuffer(b"ACGT", dtype=np.uint8)[rng.integers(0, 4, size=int(lens.sum()))].copy()
    starts = np.cumsum(lens) - lens
    for i in np.flatnonzero(rng.random(n) < 0.05):
        letters[starts[i] + rng.integers(0, lens[i], size=rng.integers(1, 6))] = ord("N")
    flat = letters.tobytes().decode("ascii")
    return [flat[s : s + n_] for s, n_ in zip(starts.tolist(), lens.tolist())]


def bench(tok: KmerTokenizer, barcodes: list[str], repeats: int) -> float:
    """Best-of-``repeats`` barcodes per second."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = tok(barcodes, padding=True, truncation=True, return_tensors="pt")
        best = min(best, time.perf_counter() - t0)
        assert out["input_ids"].shape == out["attention_mask"].shape
    return len(barcodes) / best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="10k barcodes, one repeat (a smoke run)")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.repeats = min(args.n, 10_000), 1
    barcodes = make_barcodes(args.n)
    for k, stride in [(4, 4), (3, 3), (5, 5), (3, 1), (6, 1)]:
        rate = bench(KmerTokenizer(k=k, stride=stride), barcodes, args.repeats)
        print(f"tokenizer k={k} stride={stride}: {rate:,.0f} barcodes/s ({args.n:,} barcodes, best of {args.repeats})")


if __name__ == "__main__":
    main()
