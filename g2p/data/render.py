"""Draw one specimen, top view, as BIOSCAN's cropped photographs show them.

A pure function of its parameters (no randomness here: the synthesiser draws
every number beforehand), so an image can be redrawn from the ground-truth
parquet alone, in any process, with identical bytes.

Anatomy in *body units* (head tip to abdomen tip = 1), head up, before pose:
head (with two eyes) > thorax > optional waist (a thin petiole) > abdomen
(egg-shaped, six segment lines, pattern of bands / spot pairs / lengthwise
stripes); wings by plan: none, one or two translucent tinted pairs with veins,
hard elytra covering the abdomen (the pattern then sits on them), or broad
opaque scaled wings with spots; six two-segment legs from the thorax; two
antennae, clubbed or not. Drawn at twice the size and box-reduced (anti-
aliasing), on a light beige-grey background with a soft vignette (mean about
0.76, as the dataset's normalisation constants say), then lit: ``light_gain``
scales brightness, ``light_warmth`` shifts red against blue.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Mapping
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

SUPERSAMPLE = 2
BODY_FRACTION = 0.34  # body length / image side, before size_base and Bergmann size
BACKGROUND = (0.830, 0.825, 0.815)
Point = tuple[float, float]


def _rgb(h: float, s: float, v: float, a: float | None = None) -> tuple[int, ...]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    out = (int(r * 255 + 0.5), int(g * 255 + 0.5), int(b * 255 + 0.5))
    return out if a is None else out + (int(a * 255 + 0.5),)


@lru_cache(maxsize=8)
def _vignette(size: int) -> np.ndarray:
    """(S, S, 1) brightness falloff: 1 at the centre, about 0.92 in the corners."""
    c = (np.arange(size) + 0.5) / size - 0.5
    r2 = c[None, :] ** 2 + c[:, None] ** 2
    return (1.0 - 0.16 * r2)[:, :, None].astype(np.float32)


class _Canvas:
    """Body-unit drawing on a PIL image: rotate by the pose, scale, translate."""

    def __init__(self, draw: ImageDraw.ImageDraw, cx: float, cy: float, scale: float, angle_deg: float):
        self.draw, self.cx, self.cy, self.scale = draw, cx, cy, scale
        a = math.radians(angle_deg)
        self.cos, self.sin = math.cos(a), math.sin(a)

    def tr(self, pts: np.ndarray) -> list[Point]:
        x, y = pts[:, 0] * self.scale, pts[:, 1] * self.scale
        xs = self.cx + x * self.cos - y * self.sin
        ys = self.cy + x * self.sin + y * self.cos
        return list(zip(xs.tolist(), ys.tolist()))

    def polygon(self, pts: np.ndarray, fill: tuple[int, ...], outline: tuple[int, ...] | None = None,
                width: float = 0.0) -> None:
        self.draw.polygon(self.tr(pts), fill=fill, outline=outline,
                          width=max(1, round(width * self.scale)) if outline else 1)

    def line(self, pts: np.ndarray, fill: tuple[int, ...], width: float) -> None:
        self.draw.line(self.tr(pts), fill=fill, width=max(1, round(width * self.scale)), joint="curve")

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, fill: tuple[int, ...],
                angle: float = 0.0, outline: tuple[int, ...] | None = None, width: float = 0.0) -> None:
        self.polygon(ellipse_points(cx, cy, rx, ry, angle), fill, outline, width)


def ellipse_points(cx: float, cy: float, rx: float, ry: float, angle: float = 0.0, n: int = 28) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    c, s = math.cos(angle), math.sin(angle)
    return np.stack([cx + x * c - y * s, cy + x * s + y * c], axis=1)


def _half_width(y: np.ndarray, yc: float, rx: float, ry: float) -> np.ndarray:
    """Egg-shaped abdomen: half-width at ``y`` (widest towards the thorax)."""
    s = np.clip((y - yc) / ry, -1.0, 1.0)
    return rx * np.sqrt(1.0 - s * s) * (1.0 - 0.22 * s)


def _abdomen_slice(y0: float, y1: float, yc: float, rx: float, ry: float, x0: float = -2.0,
                   x1: float = 2.0, n: int = 10) -> np.ndarray:
    """Polygon of the abdomen between ``y0`` and ``y1`` and between ``x0`` and ``x1``."""
    y = np.linspace(y0, y1, n)
    hw = _half_width(y, yc, rx, ry)
    left, right = np.maximum(-hw, x0), np.minimum(hw, x1)
    return np.concatenate([np.stack([left, y], 1), np.stack([right, y], 1)[::-1]])


def layout(p: Mapping[str, float]) -> dict[str, float]:
    """Body-unit positions and radii of head, thorax and abdomen."""
    h, t, a, w = p["head_size"], p["thorax_size"], p["abdomen_length"], p["waist"]
    total = h + t + a + w
    h, t, a, w = h / total, t / total, a / total, w / total
    y_head = -0.5 + h / 2
    y_thorax = -0.5 + h + t / 2
    y_abd = 0.5 - a / 2
    aw = p["abdomen_width"]
    return {"h": h, "t": t, "a": a, "w": w, "y_head": y_head, "y_thorax": y_thorax, "y_abd": y_abd,
            "head_rx": 0.6 * h * 1.15, "head_ry": 0.5 * h, "thorax_rx": 0.5 * max(0.9 * t, 0.75 * aw),
            "thorax_ry": 0.5 * t, "abd_rx": 0.5 * aw, "abd_ry": 0.5 * a}


def _pattern(cv: _Canvas, p: Mapping[str, float], g: Mapping[str, float], colour: tuple[int, ...],
             scale_x: float = 1.0) -> None:
    """Bands, spot pairs or lengthwise stripes over the abdomen (or the elytra)."""
    yc, rx, ry = g["y_abd"], g["abd_rx"] * scale_x, g["abd_ry"]
    n = int(p["pattern_count"])
    kind = int(p["pattern_kind"])
    top, bottom = yc - 0.8 * ry, yc + 0.9 * ry
    if kind == 0:  # transverse bands
        period = (bottom - top) / n
        for i in range(n):
            y0 = top + (i + 0.3) * period
            cv.polygon(_abdomen_slice(y0, y0 + 0.5 * period, yc, rx, ry), colour)
    elif kind == 1:  # pairs of round spots
        for i in range(n):
            y = top + (i + 0.5) * (bottom - top) / n
            hw = float(_half_width(np.array([y]), yc, rx, ry)[0])
            r = min(0.3 * hw, 0.45 * (bottom - top) / n)
            for sx in (-1.0, 1.0):
                cv.ellipse(sx * 0.5 * hw, y, r, r, colour)
    else:  # lengthwise stripes: median, paired, or both
        xs = {1: (0.0,), 2: (-0.45, 0.45), 3: (-0.55, 0.0, 0.55)}[max(1, min(n, 3))]
        half = 0.09 * rx / 0.5 * 0.5 + 0.012
        for x in xs:
            cv.polygon(_abdomen_slice(yc - 0.9 * ry, yc + 0.85 * ry, yc, rx, ry,
                                      x0=x * rx - half, x1=x * rx + half, n=14), colour)


def _wings(cv: _Canvas, p: Mapping[str, float], g: Mapping[str, float], pattern_rgb: tuple[int, ...]) -> None:
    plan = int(p["wing_type"])
    if plan in (0, 3):
        return
    length, width, ang = p["wing_length"], p["wing_width"], math.radians(p["wing_angle"])
    tint = p["wing_hue"]
    pairs = [(length, width, ang)]
    if plan == 2:
        pairs.append((0.72 * length, 0.85 * width, ang + math.radians(14)))
    if plan == 4:  # scaled wings: broad, forewing and rounder hindwing
        pairs = [(0.95 * length, 1.5 * width + 0.08, ang + math.radians(8)),
                 (0.7 * length, 1.3 * width + 0.08, ang + math.radians(38))]
    base_y = g["y_thorax"] - 0.15 * g["t"]
    torn = _lost(p, "wing")
    for k, (wl0, ww, a) in enumerate(reversed(pairs)):  # hindwings first, under the forewings
        for side, sx in enumerate((-1.0, 1.0)):
            wl = wl0 * (0.55 if side == torn and k == len(pairs) - 1 else 1.0)  # a torn forewing
            d = (sx * math.sin(a), math.cos(a))  # backwards, turned outwards by a
            bx, by = sx * 0.3 * g["thorax_rx"], base_y
            cx, cy = bx + d[0] * wl / 2, by + d[1] * wl / 2
            rot = math.atan2(d[1], d[0])
            if plan == 4:
                fill = _rgb(tint, 0.7, 0.55 - 0.08 * k, 0.97)
                cv.ellipse(cx, cy, wl / 2, ww / 2, fill, rot, outline=_rgb(tint, 0.8, 0.2, 1.0), width=0.012)
                n = int(p["pattern_count"])
                for i in range(n):
                    f = (i + 0.5) / n - 0.5
                    cv.ellipse(cx + d[0] * f * wl * 0.7, cy + d[1] * f * wl * 0.7, 0.16 * ww, 0.16 * ww,
                               pattern_rgb)
            else:
                fill = _rgb(tint, 0.55, 0.8, 0.55)
                cv.ellipse(cx, cy, wl / 2, ww / 2, fill, rot, outline=_rgb(tint, 0.6, 0.35, 0.8),
                           width=0.008)
                for off in (-0.25, 0.2):  # two veins from the base
                    tip = (cx + d[0] * wl * 0.35 - d[1] * off * ww, cy + d[1] * wl * 0.35 + d[0] * off * ww)
                    cv.line(np.array([[bx, by], tip]), _rgb(tint, 0.6, 0.3, 0.7), 0.006)


def _lost(p: Mapping[str, float], part: str) -> int:
    """Which leg (0-5) or side (0-1) of ``part`` the specimen lost; -1 if none (see traits.DAMAGE)."""
    code = {"leg": 1, "antenna": 2, "wing": 3}[part]
    if int(p.get("damage", 0)) != code:
        return -1
    k = int(p.get("damage_part", 0))
    return k if part == "leg" else k % 2


def _legs(cv: _Canvas, p: Mapping[str, float], g: Mapping[str, float], colour: tuple[int, ...]) -> None:
    ll = p["leg_length"]
    width = 0.028
    lost = _lost(p, "leg")
    # (attachment offset along the thorax, femur angle, tibia angle), radians from +x, y down
    pairs = ((-0.3, -0.55, -1.2), (0.0, 0.1, 0.45), (0.3, 0.6, 1.15))
    for j, (dy, a1, a2) in enumerate(pairs):
        for side, sx in enumerate((-1.0, 1.0)):
            if 2 * j + side == lost:
                continue
            x0, y0 = sx * 0.7 * g["thorax_rx"], g["y_thorax"] + dy * g["t"]
            x1, y1 = x0 + sx * math.cos(a1) * 0.45 * ll, y0 + math.sin(a1) * 0.45 * ll
            x2, y2 = x1 + sx * math.cos(a2) * 0.55 * ll, y1 + math.sin(a2) * 0.55 * ll
            cv.line(np.array([[x0, y0], [x1, y1], [x2, y2]]), colour, width)


def _antennae(cv: _Canvas, p: Mapping[str, float], g: Mapping[str, float], colour: tuple[int, ...]) -> None:
    al = p["antenna_length"]
    y0 = g["y_head"] - 0.7 * g["head_ry"]
    lost = _lost(p, "antenna")
    for side, sx in enumerate((-1.0, 1.0)):
        if side == lost:
            continue
        x0 = sx * 0.3 * g["head_rx"]
        x1, y1 = x0 + sx * 0.25 * al, y0 - 0.45 * al
        x2, y2 = x1 + sx * 0.3 * al, y1 - 0.45 * al
        cv.line(np.array([[x0, y0], [x1, y1], [x2, y2]]), colour, 0.018)
        if p["antenna_club"] > 0.5:
            cv.ellipse(x2, y2, 0.035, 0.05, colour, math.atan2(y2 - y1, x2 - x1))


def draw_specimen(p: Mapping[str, float], size: int) -> Image.Image:
    """The RGB image (``size`` x ``size``) of one record; ``p`` holds the decoded
    traits (:func:`g2p.data.traits.decode`), ``size_mult`` and the nuisance values."""
    ss = size * SUPERSAMPLE
    tone = 1.0 + p["bg_tone"]
    bg = tuple(int(255 * c * tone + 0.5) for c in BACKGROUND)
    img = Image.new("RGB", (ss, ss), bg)
    draw = ImageDraw.Draw(img, "RGBA")
    scale = ss * BODY_FRACTION * p["size_base"] * p["size_mult"]
    cv = _Canvas(draw, ss * (0.5 + p["offset_x"]), ss * (0.5 + p["offset_y"]), scale, p["pose_deg"])
    g = layout(p)
    h, s, v = p["body_hue"], p["body_sat"], p["body_light"]
    body = _rgb(h, s, v, 1.0)
    dark = _rgb(h, min(1.0, s + 0.1), 0.55 * v, 1.0)
    light = _rgb(h, 0.7 * s, min(1.0, v + 0.18), 0.7)
    pattern = _rgb(p["pattern_hue"], 0.75, p["pattern_light"], 1.0)

    _legs(cv, p, g, dark)
    _antennae(cv, p, g, dark)
    plan = int(p["wing_type"])
    if plan == 4:
        _wings(cv, p, g, pattern)  # scaled wings spread beside and under the body
    # abdomen, segmented, with the pattern unless elytra carry it
    yc, rx, ry = g["y_abd"], g["abd_rx"], g["abd_ry"]
    cv.polygon(_abdomen_slice(yc - ry, yc + ry, yc, rx, ry, n=24), body, outline=dark, width=0.01)
    if plan != 3:
        _pattern(cv, p, g, pattern)
    for i in range(1, 6):
        y = yc - ry + 2 * ry * i / 6.0
        hw = float(_half_width(np.array([y]), yc, rx, ry)[0])
        cv.line(np.array([[-0.95 * hw, y], [0.95 * hw, y]]), dark[:3] + (150,), 0.008)
    if g["w"] > 0:  # waist: a thin petiole
        cv.polygon(np.array([[-0.04, g["y_thorax"]], [0.04, g["y_thorax"]], [0.03, yc - ry + 0.02],
                             [-0.03, yc - ry + 0.02]]), dark)
    if plan == 3:  # elytra: two hard halves over the abdomen, a dark suture between
        y_top = g["y_thorax"] + 0.35 * g["t"]
        shell = _rgb(h, s, min(1.0, v * 1.12), 1.0)
        for side in (-1.0, 1.0):
            y = np.linspace(y_top, yc + 0.92 * ry, 16)
            hw = np.maximum(_half_width(y, yc, rx * 1.08, ry), 0.6 * rx)
            hw[-4:] *= np.linspace(1.0, 0.3, 4)
            edge = np.stack([side * hw, y], 1)
            mid = np.stack([np.zeros_like(y), y], 1)[::-1]
            cv.polygon(np.concatenate([edge, mid]), shell, outline=dark, width=0.01)
        _pattern(cv, p, g, pattern, scale_x=1.02)
        cv.line(np.array([[0.0, y_top], [0.0, yc + 0.9 * ry]]), dark, 0.012)
    elif plan in (1, 2):
        _wings(cv, p, g, pattern)
    cv.ellipse(0.0, g["y_thorax"], g["thorax_rx"], g["thorax_ry"], body, outline=dark, width=0.01)
    cv.ellipse(-0.2 * g["thorax_rx"], g["y_thorax"] - 0.2 * g["thorax_ry"], 0.35 * g["thorax_rx"],
               0.3 * g["thorax_ry"], light)  # a highlight: the body reads as rounded
    cv.ellipse(0.0, g["y_head"], g["head_rx"], g["head_ry"], body, outline=dark, width=0.01)
    for sx in (-1.0, 1.0):
        cv.ellipse(sx * 0.62 * g["head_rx"], g["y_head"] - 0.1 * g["head_ry"], 0.38 * g["head_rx"],
                   0.55 * g["head_ry"], (25, 20, 18, 255))

    img = img.reduce(SUPERSAMPLE)
    arr = np.asarray(img, dtype=np.float32) * _vignette(size)
    warm = p["light_warmth"]
    arr *= np.array([p["light_gain"] * (1 + warm), p["light_gain"], p["light_gain"] * (1 - warm)],
                    dtype=np.float32)
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB")


def body_area_fraction(p: Mapping[str, np.ndarray]) -> np.ndarray:
    """Approximate share of the image the body covers (head, thorax, abdomen, wings).

    Vectorised over records; used for the size columns of the metadata
    without rendering (the metadata-only presets).
    """
    h, t, a, w = p["head_size"], p["thorax_size"], p["abdomen_length"], p["waist"]
    total = h + t + a + w
    aw = p["abdomen_width"]
    body = math.pi / 4 * (1.15 * h * h + np.maximum(0.9 * t, 0.75 * aw) * t + aw * a) / (total * total)
    winged = np.isin(p["wing_type"], (1, 2, 4))
    wings = np.where(winged, math.pi / 2 * p["wing_length"] * p["wing_width"], 0.0)
    scale = BODY_FRACTION * p["size_base"] * p["size_mult"]
    return (body + 0.5 * wings) * scale * scale
