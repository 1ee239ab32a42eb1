"""Spherical geodesic encoding (paper 3.2) and the environment token."""

from __future__ import annotations

import math

import pytest
import torch

from g2p.models.geo import EnvironmentEncoder, geodesic_xyz


@pytest.mark.parametrize(
    ("lat", "lon", "xyz"),
    [
        (0.0, 0.0, (1.0, 0.0, 0.0)),
        (90.0, 0.0, (0.0, 0.0, 1.0)),
        (-90.0, 123.0, (0.0, 0.0, -1.0)),
        (0.0, 90.0, (0.0, 1.0, 0.0)),
        (0.0, 180.0, (-1.0, 0.0, 0.0)),
        (0.0, -180.0, (-1.0, 0.0, 0.0)),
        (45.0, 45.0, (0.5, 0.5, math.sqrt(0.5))),
    ],
)
def test_geodesic_golden(lat: float, lon: float, xyz: tuple[float, float, float]) -> None:
    assert torch.allclose(geodesic_xyz(lat, lon), torch.tensor(xyz), atol=1e-7)


def test_antimeridian_and_unit_norm() -> None:
    assert torch.allclose(geodesic_xyz(12.5, 180.0), geodesic_xyz(12.5, -180.0), atol=1e-7)
    lat = torch.linspace(-90, 90, 37)
    lon = torch.linspace(-180, 180, 37)
    p = geodesic_xyz(lat, lon)  # (37, 3)
    assert p.shape == (37, 3) and p.dtype == torch.float32
    assert torch.allclose(p.norm(dim=-1), torch.ones(37), atol=1e-6)


def test_unknown_place_token() -> None:
    torch.manual_seed(0)
    enc = EnvironmentEncoder(hidden_size=8, env_hidden_size=4)
    lat = torch.tensor([10.0, 10.0, float("nan"), -30.0])
    lon = torch.tensor([20.0, 20.0, 5.0, 100.0])
    has = torch.tensor([True, False, True, True])
    h = enc(lat, lon, has)  # (4, 8)
    assert h.shape == (4, 8)
    assert torch.equal(h[1], enc.unknown_place.detach()) and torch.equal(h[2], enc.unknown_place.detach())
    assert not torch.allclose(h[0], h[1]) and not torch.allclose(h[0], h[3])
    h.sum().backward()  # NaN coordinates must not poison the gradients
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters())
