"""Spherical geodesic encoding of a place and the environment token (paper 3.2).

Latitude beta and longitude lambda go to the unit sphere,
``(x, y, z) = (cos b cos l, cos b sin l, sin b)``, so that places close on the
Earth are close in the encoding (longitude -180 and 180 are the same point, and
the poles do not depend on longitude), and an MLP turns that point into one
token h_e of the conditioner's width.

Records without a place (``has_place`` False, or NaN coordinates: the data
rules keep such records and mark them) get a learned "unknown place" embedding
instead, so the conditioner never sees a made-up coordinate such as (0, 0).
"""

from __future__ import annotations

import torch
from torch import nn


def geodesic_xyz(lat_deg: torch.Tensor | float, lon_deg: torch.Tensor | float) -> torch.Tensor:
    """Latitude/longitude in degrees -> points ``(..., 3)`` on the unit sphere (x, y, z)."""
    lat = torch.deg2rad(torch.as_tensor(lat_deg, dtype=torch.float64))
    lon = torch.deg2rad(torch.as_tensor(lon_deg, dtype=torch.float64))
    xyz = torch.stack([torch.cos(lat) * torch.cos(lon), torch.cos(lat) * torch.sin(lon), torch.sin(lat)], dim=-1)
    # computed in float64 so cos(90 deg) is ~6e-17, not ~4e-8, then cast
    dtype = lat_deg.dtype if isinstance(lat_deg, torch.Tensor) and lat_deg.is_floating_point() else torch.float32
    return xyz.to(dtype)


def place_known(lat: torch.Tensor, lon: torch.Tensor, has_place: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) bool: the record has a usable place (flag set and both coordinates finite)."""
    known = torch.isfinite(lat) & torch.isfinite(lon)
    return known if has_place is None else known & has_place.to(torch.bool)


class EnvironmentEncoder(nn.Module):
    """MLP([x, y, z]) -> one token of width ``hidden_size``; a learned token where the place is unknown."""

    def __init__(self, hidden_size: int, env_hidden_size: int = 64):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(3, env_hidden_size),
            nn.GELU(),
            nn.Linear(env_hidden_size, hidden_size),
        )
        self.unknown_place = nn.Parameter(torch.randn(hidden_size) * 0.02)  # (d,)

    def forward(self, lat: torch.Tensor, lon: torch.Tensor, has_place: torch.Tensor | None = None) -> torch.Tensor:
        """lat, lon: (B,) degrees (NaN allowed where unknown); has_place: (B,) bool -> (B, d)."""
        known = place_known(lat, lon, has_place)  # (B,)
        # zero the unknown coordinates *before* the MLP: a NaN that went through
        # it would poison the gradients even though torch.where drops its value
        lat = torch.where(known, lat, torch.zeros_like(lat))
        lon = torch.where(known, lon, torch.zeros_like(lon))
        weight = self.mlp[0].weight
        h = self.mlp(geodesic_xyz(lat, lon).to(weight.dtype))  # (B, d)
        return torch.where(known[:, None], h, self.unknown_place.to(h.dtype).expand_as(h))
