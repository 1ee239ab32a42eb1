"""Shared fixtures: a root in the official BIOSCAN-5M layout built from the 25 real records.

Ray's token authentication is off for the whole test session, in this process and every process it
starts (set before Ray is imported). Ray 2.60 turns it on for a new local ``ray.init()`` by writing
``RAY_AUTH_MODE=token`` into ``os.environ``, but its C++ side reads the mode once: a test that switched
the variable (to join the ``ray start`` test cluster of tests/raycluster.py, which runs without
tokens) left later ``ray.init()`` calls with a GCS that wanted a token and a client that sent none
("Failed to start GCS ... InvalidAuthToken", CI of 2026-12-02). One mode for the session avoids that.
Every Ray cluster the tests start listens on loopback only.
"""

import os

os.environ["RAY_AUTH_MODE"] = "disabled"

from tests.fixtures import bioscan_sample_root, one_thread  # noqa: E402, F401
