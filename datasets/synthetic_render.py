"""Pixels of the synthetic FairFedMed-Oph twin: fundus, masks and OCT drawing, scanner style, npz.

`synthetic.py` decides *who* each patient is (site, groups, label, anatomy); this module
only draws what such a patient's images look like. Plain numpy. The fundus records the disc
and cup it drew (`DiscGeometry`); the disc / cup mask and the optic-nerve-head OCT are drawn
from that record, so the three show one anatomy.
"""

from __future__ import annotations

import functools
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed member timestamp: np.savez stamps the wall clock

REF_DISC_AREA = 2.6  # mm^2 drawn with radius DISC_RADIUS (fraction of the half-width)
DISC_RADIUS = 0.19
# Image quality vs pigmentation p: disc and cup contrast fall by these shares at p = 1, the
# noise sd rises by this factor, and a choroidal texture of this amplitude appears.
PIGMENT_DISC_LOSS, PIGMENT_CUP_LOSS, PIGMENT_NOISE_GAIN, PIGMENT_TEXTURE = 0.45, 0.5, 1.0, 0.04


@dataclass(frozen=True)
class SiteStyle:
    """Acquisition style and population of one site (mixes are shares of codes 0.., then -1)."""

    gamma: float
    brightness: float  # additive offset after gamma
    blur: float  # gaussian sigma in pixels at 128 px (scaled with fundus_size)
    noise: float  # gaussian noise sd on the [0, 1] scale
    prevalence: float  # glaucoma share at age 60
    male_share: float
    race_mix: tuple[float, float, float]  # Asian, Black, White
    ethnicity_mix: tuple[float, float, float]  # non-hispanic, hispanic, unknown
    language_mix: tuple[float, float, float, float]  # english, spanish, others, unknown
    marital_mix: tuple[float, ...]  # married, single, divorced, widowed, separated, unknown


@dataclass(frozen=True)
class DiscGeometry:
    """The optic disc and cup one fundus drew (image coordinates in [-1, 1], x right, y down).

    Disc: the ellipse of semi-axes (rx, ry) around (cx, cy). Cup: semi-axes cdr * (rx, ry)
    around (ox, oy), so its vertical cup-to-disc ratio is `cdr` (when it lies inside the disc).
    """

    cx: float
    cy: float
    rx: float
    ry: float
    ox: float
    oy: float
    cdr: float

    def disc_distance(self, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
        """Elliptic distance to the disc centre (1 on its border), as the fundus computes it."""
        return np.sqrt(((xx - self.cx) * (1 / self.rx)) ** 2 + ((yy - self.cy) * (1 / self.ry)) ** 2)

    def cup_distance(self, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
        return np.sqrt(((xx - self.ox) * (1 / (self.cdr * self.rx))) ** 2 + ((yy - self.oy) * (1 / (self.cdr * self.ry))) ** 2)


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    yy, xx = np.meshgrid(c, c, indexing="ij")
    return yy, xx


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable gaussian blur of the last two axes (edge padding), numpy only."""
    if sigma < 0.3:
        return img
    r = int(np.ceil(2.5 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    n = img.shape[-2]
    p = np.pad(img, [(0, 0)] * (img.ndim - 2) + [(r, r), (0, 0)], mode="edge")
    img = sum(w * p[..., i : i + n, :] for i, w in enumerate(k))
    n = img.shape[-1]
    p = np.pad(img, [(0, 0)] * (img.ndim - 1) + [(r, r)], mode="edge")
    return sum(w * p[..., i : i + n] for i, w in enumerate(k))


def _acquire(clean: np.ndarray, site: SiteStyle, blur: float, noise: float,
             rng: np.random.Generator) -> np.ndarray:
    """Site scanner style: blur, gamma, brightness, noise, then 8-bit quantisation."""
    img = _blur(clean, blur)
    img = np.clip(img, 0, 1) ** site.gamma + site.brightness
    img = img + noise * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


def fundus(row: Any, site: SiteStyle, size: int, rng: np.random.Generator) -> np.ndarray:
    """SLO fundus: background, macula, optic disc with its cup (CDR), vessels; site style."""
    return fundus_and_geometry(row, site, size, rng)[0]


def fundus_and_geometry(row: Any, site: SiteStyle, size: int, rng: np.random.Generator) -> tuple[np.ndarray, DiscGeometry]:
    """The fundus of `fundus` and the disc / cup it drew (the masks and the ONH OCT use it).

    The geometry is recorded, not drawn again: the random stream and every pixel are those
    of generator version 1.
    """
    yy, xx = _grid(size)
    p = float(row.pigment)
    side = float(rng.choice([-1.0, 1.0]))  # right / left eye: disc nasal, macula temporal
    cx, cy = side * 0.38 + float(rng.normal(0, 0.05)), float(rng.normal(0, 0.06))
    r = DISC_RADIUS * float(np.sqrt(row.disc_area / REF_DISC_AREA))
    rx, ry = r, r * float(rng.normal(1.08, 0.03))  # discs are vertically oval
    # Background: illumination fall-off, darker and blotchier (choroidal texture) with pigment.
    rr2 = xx * xx + yy * yy
    img = (0.52 - 0.14 * p) - 0.10 * rr2
    x1, y1 = xx[0], yy[:, 0]
    for _ in range(4):  # separable: cos(a x + b y + c) = cos(ax)cos(by+c) - sin(ax)sin(by+c)
        fx, fy = rng.uniform(2, 7, 2) * rng.choice([-1, 1], 2)
        c, amp = float(rng.uniform(0, 6.3)), 0.012 + PIGMENT_TEXTURE * p
        img += amp * (np.outer(np.cos(fy * y1 + c), np.cos(fx * x1))
                      - np.outer(np.sin(fy * y1 + c), np.sin(fx * x1)))
    mx = cx - side * 0.9  # macula (fovea), temporal to the disc
    img -= 0.08 * np.outer(np.exp(-(y1**2) / 0.03), np.exp(-((x1 - mx) ** 2) / 0.03))
    d_disc = np.sqrt(((xx - cx) * (1 / rx)) ** 2 + ((yy - cy) * (1 / ry)) ** 2)
    img += (0.15 * (1 - PIGMENT_DISC_LOSS * p)) * (1 - np.tanh((d_disc - 1) * (1 / 0.14)))
    cdr = float(row.cdr)
    ox, oy = cx - side * 0.1 * r * float(rng.random()), cy + float(rng.normal(0, 0.03)) * r
    d_cup = np.sqrt(((xx - ox) * (1 / (cdr * rx))) ** 2 + ((yy - oy) * (1 / (cdr * ry))) ** 2)
    img += (0.13 * (1 - PIGMENT_CUP_LOSS * p)) * (1 - np.tanh((d_cup - 1) * (1 / 0.24)))
    # Vessels: dark curved lines leaving the disc, thinning with distance (arc-length distance
    # to the vessel's centre line in polar coordinates around the disc centre).
    rho = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
    phi = np.arctan2(yy - cy, xx - cx)
    width2 = np.maximum(0.022 * (1 - 0.6 * rho), 0.006) ** 2
    outside = rho > 0.3 * r
    for theta in rng.uniform(0, 2 * np.pi, int(rng.integers(5, 9))):
        bend = float(rng.normal(0, 0.8))
        dphi = phi - bend * rho - float(theta)
        dphi -= (2 * np.pi) * np.rint(dphi * (1 / (2 * np.pi)))  # wrap to [-pi, pi]
        dist2 = (rho * dphi) ** 2
        img -= (0.16 * np.exp(-dist2 / width2)) * outside
    img *= np.sqrt(rr2) < 0.96  # circular field of view
    noise = site.noise * (1 + PIGMENT_NOISE_GAIN * p)
    return _acquire(img, site, site.blur * size / 128, noise, rng), DiscGeometry(cx, cy, rx, ry, ox, oy, cdr)


def oct_volume(row: Any, site: SiteStyle, shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """B-scans (slices, depth, width): retinal bands; the nerve-fibre band thins with glaucoma."""
    d, h, w = shape
    s = np.linspace(-1, 1, d, dtype=np.float32)[:, None, None]
    x = np.linspace(-1, 1, w, dtype=np.float32)[None, None, :]
    z = np.arange(h, dtype=np.float32)[None, :, None] / h
    top = 0.25 + 0.06 * (x**2 + s**2) + rng.normal(0, 0.02)
    nfl = 0.12 * row.rnfl * (1 + 0.35 * np.abs(s)) * (1 + 0.1 * x)  # thicker above/below disc
    widths = (nfl, 0.10, 0.06, 0.05, 0.09, 0.05)  # NFL, GCL/IPL, INL, OPL, ONL, RPE
    levels = (0.05, 0.75, 0.45, 0.22, 0.5, 0.2, 0.9, 0.35)  # vitreous, bands..., choroid
    band = (z >= top).astype(np.int64)
    edge = top
    for wd in widths:
        edge = edge + wd
        band = band + (z >= edge)
    img = np.asarray(levels, dtype=np.float32)[band]
    img = img * np.exp(0.25 * rng.standard_normal(img.shape, dtype=np.float32))  # speckle
    return _acquire(img, site, site.blur * 0.5, site.noise, rng)


# FairSeg's mask codes (specs/datasets.md): 0 background, -1 neuroretinal rim (the disc without the cup), -2 optic cup.
MASK_BACKGROUND, MASK_DISC, MASK_CUP = 0, -1, -2
FIELD_OF_VIEW = 0.96  # radius of the fundus's circular field of view (image half-widths)


def disc_cup_mask(geometry: DiscGeometry, size: int) -> np.ndarray:
    """(size, size) int8 disc / cup mask of the fundus that drew `geometry`, in FairSeg's codes.

    A pixel is disc where the disc's smooth edge is at least half up (elliptic distance <= 1),
    cup likewise; the cup is clipped to the disc (a rim pixel is disc, never cup outside it) and
    both to the field of view, where the fundus is black.
    """
    yy, xx = _grid(size)
    seen = np.sqrt(xx * xx + yy * yy) < FIELD_OF_VIEW
    disc = (geometry.disc_distance(xx, yy) <= 1) & seen
    cup = (geometry.cup_distance(xx, yy) <= 1) & disc
    mask = np.full((size, size), MASK_BACKGROUND, dtype=np.int8)
    mask[disc] = MASK_DISC
    mask[cup] = MASK_CUP
    return mask


# The optic-nerve-head OCT cube: a square field centred on the disc, this half-width in fundus
# units (1 unit ~ 4.8 mm at the reference disc, so ~6 x 6 mm as real ONH cubes).
ONH_FIELD = 0.625
ONH_HEALTHY_CDR = 0.35  # the rim the nerve-fibre thickness `rnfl` refers to (healthy mean CDR)
CUP_DEPTH_AT_CDR1 = 0.30  # cup depth below the rim surface at CDR 1 (share of the scan depth)
RPE_DEPTH, RETINA_BELOW_NFL = 0.62, 0.20  # Bruch's membrane depth; retina under the NFL


def onh_volume(row: Any, geometry: DiscGeometry, site: SiteStyle, shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """Optic-nerve-head B-scans (slices top to bottom, depth, width) of the disc the fundus drew.

    One anatomy with the fundus and its masks: the disc and cup are that fundus's ellipses (the
    cube is centred on the disc), the cup is a bowl whose depth grows with the same CDR, and the
    nerve-fibre layer around the disc is `rnfl`'s thickness scaled by the rim's share of the
    disc, (1 - CDR^2) / (1 - ONH_HEALTHY_CDR^2): a larger cup, a thinner NFL. Inside the disc
    (Bruch's membrane opening) there are no retinal layers, only nerve tissue over the lamina.
    """
    d, h, w = shape
    g = geometry
    ys = np.linspace(-ONH_FIELD, ONH_FIELD, d, dtype=np.float32)[:, None] + g.cy
    xs = np.linspace(-ONH_FIELD, ONH_FIELD, w, dtype=np.float32)[None, :] + g.cx
    d_disc, d_cup = g.disc_distance(xs, ys), g.cup_distance(xs, ys)  # (slices, width)
    rim_share = (1 - g.cdr**2) / (1 - ONH_HEALTHY_CDR**2)
    nfl = 0.12 * float(row.rnfl) * rim_share * (1 + 0.8 * np.exp(-(((d_disc - 1) / 0.6) ** 2)))  # thickest at the margin
    ilm = RPE_DEPTH - RETINA_BELOW_NFL - nfl + CUP_DEPTH_AT_CDR1 * g.cdr * np.clip(1 - d_cup**2, 0, None)
    ilm, nfl_end = ilm[:, None, :], (ilm + nfl)[:, None, :]
    z = (np.arange(h, dtype=np.float32) / h)[None, :, None]
    retina = np.select(
        [z < ilm, z < nfl_end, z < nfl_end + RETINA_BELOW_NFL / 2, z < RPE_DEPTH, z < RPE_DEPTH + 0.04],
        [0.05, 0.75, 0.45, 0.25, 0.9], 0.35)  # vitreous, NFL, inner, outer retina, RPE, choroid
    nerve = np.select([z < ilm, z < RPE_DEPTH + 0.12], [0.05, 0.5], 0.3)  # vitreous, nerve, lamina
    img = np.where((d_disc <= 1)[:, None, :], nerve, retina).astype(np.float32)
    img = img * np.exp(0.25 * rng.standard_normal(img.shape, dtype=np.float32))  # speckle
    return _acquire(img, site, site.blur * 0.5, site.noise, rng)


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez's format (uncompressed zip of .npy) with a fixed member timestamp."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, value in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_TIME)
            with zf.open(info, "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.asanyarray(value), allow_pickle=False)
