"""Shared fixtures: a root in the official BIOSCAN-5M layout built from the 25 real records."""

from tests.fixtures import bioscan_sample_root  # noqa: F401
