"""The phantom's anatomy: a random patient in a canonical frame, and the masks that both the renderer
and the ground-truth boxes are computed from.

Everything is described in *canonical* coordinates ``(u, v)``: ``u`` grows to the image's right (the
patient's left on a PA view), ``v`` grows downwards, and the thorax spans roughly ``u, v in [-1, 1]``.
An affine placement (scale, rotation, shift) maps that frame onto the image. Because the renderer draws
each structure from the same mask functions that the region boxes are measured on, a box always encloses
what is visibly there, whatever the rotation or the findings did to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.constants import REGIONS


@dataclass(frozen=True)
class Placement:
    """Where the canonical frame lands in an image of ``rows x cols`` pixels."""

    rows: int
    cols: int
    cx: float  # image x of canonical (0, 0), pixels
    cy: float
    sx: float  # pixels per canonical unit along u
    sy: float  # pixels per canonical unit along v
    theta: float  # rotation, radians

    def to_canonical(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image pixel centres -> canonical (u, v)."""
        c, s = np.cos(self.theta), np.sin(self.theta)
        dx, dy = x - self.cx, y - self.cy
        return (c * dx + s * dy) / self.sx, (-s * dx + c * dy) / self.sy

    def grid(self, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
        """Canonical coordinates of the centres of a ``rows x cols`` grid laid over the whole image."""
        x = (np.arange(cols, dtype=np.float32) + 0.5) * (self.cols / cols)
        y = (np.arange(rows, dtype=np.float32) + 0.5) * (self.rows / rows)
        return self.to_canonical(x[None, :], y[:, None])


@dataclass(frozen=True)
class Anatomy:
    """One patient's shape parameters (canonical units). Findings that change the shape (cardiomegaly,
    a widened mediastinum) are applied by building a modified copy before rendering."""

    apex: float  # v of the lung apices
    dome_r: float  # v of the right hemidiaphragm's dome peak
    dome_l: float
    dome_curv: float  # how fast the domes fall off laterally
    lung_halfwidth_r: float  # lateral extent of each lung from the midline
    lung_halfwidth_l: float
    med_halfwidth: float  # half width of the upper mediastinum
    med_shift: float  # mediastinal centre line u
    heart_u: float
    heart_v: float
    heart_halfwidth: float
    heart_halfheight: float
    carina_v: float
    knob_r: float  # aortic knob radius
    clavicle_v: float  # v of the clavicles' medial ends
    rib_phase: float  # v offset of the rib cage
    spine_halfwidth: float

    @staticmethod
    def sample(rng: np.random.Generator) -> Anatomy:
        apex = -0.86 + rng.uniform(-0.04, 0.04)
        dome_r = 0.40 + rng.uniform(-0.06, 0.06)
        return Anatomy(
            apex=apex,
            dome_r=dome_r,
            dome_l=dome_r + rng.uniform(0.02, 0.08),
            dome_curv=rng.uniform(0.55, 0.8),
            lung_halfwidth_r=rng.uniform(0.82, 0.9),
            lung_halfwidth_l=rng.uniform(0.82, 0.9),
            med_halfwidth=rng.uniform(0.11, 0.14),
            med_shift=rng.uniform(-0.01, 0.03),
            heart_u=rng.uniform(0.1, 0.15),
            heart_v=dome_r + rng.uniform(0.0, 0.04),
            heart_halfwidth=rng.uniform(0.34, 0.40),  # cardiothoracic ratio ~0.40-0.46
            heart_halfheight=rng.uniform(0.4, 0.45),
            carina_v=rng.uniform(-0.36, -0.28),
            knob_r=rng.uniform(0.07, 0.09),
            clavicle_v=apex + rng.uniform(0.1, 0.16),
            rib_phase=rng.uniform(-0.03, 0.03),
            spine_halfwidth=rng.uniform(0.075, 0.09),
        )


def place(rng: np.random.Generator, rows: int, cols: int) -> Placement:
    """A random but fully-in-frame placement: the thorax fills ~75-90% of the width, rotated <= 5 deg."""
    sx = cols * rng.uniform(0.40, 0.45)
    sy = min(rows * rng.uniform(0.40, 0.44), sx * rng.uniform(1.0, 1.2))
    return Placement(
        rows=rows,
        cols=cols,
        cx=cols * (0.5 + rng.uniform(-0.025, 0.025)),
        cy=rows * (0.5 + rng.uniform(-0.02, 0.03)),
        sx=float(sx),
        sy=float(sy),
        theta=float(np.deg2rad(rng.uniform(-5.0, 5.0))),
    )


# --- structures -------------------------------------------------------------------------------------

def dome(a: Anatomy, u: np.ndarray) -> np.ndarray:
    """v of the diaphragm under each u: two parabolic domes meeting under the heart."""
    right = a.dome_r + a.dome_curv * (u + 0.45) ** 2
    left = a.dome_l + a.dome_curv * (u - 0.45) ** 2
    return np.where(u < a.med_shift, right, left)


def lung_lateral(a: Anatomy, v: np.ndarray, side: int) -> np.ndarray:
    """|u| of a lung's lateral border (from the mediastinal centre line): widening gently downwards."""
    halfwidth = a.lung_halfwidth_r if side < 0 else a.lung_halfwidth_l
    return halfwidth * (0.7 + 0.3 * np.sqrt(np.clip((v - a.apex) / 1.2, 0.0, 1.0)))


def lung_mask(a: Anatomy, u: np.ndarray, v: np.ndarray, side: int) -> np.ndarray:
    """side -1 = right lung (image left), +1 = left lung. A rounded apex, the lateral chest wall, the
    base on the dome; the medial border is the mediastinum and heart."""
    su = side * (u - a.med_shift)
    top = a.apex + 1.1 * (su - 0.42) ** 2
    inside = (v > top) & (v < dome(a, u)) & (su > a.med_halfwidth) & (su < lung_lateral(a, v, side))
    return inside & ~heart(a, u, v)


def heart(a: Anatomy, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    e = ((u - a.heart_u) / a.heart_halfwidth) ** 2 + ((v - a.heart_v) / a.heart_halfheight) ** 2
    return (e < 1.0) & (v < dome(a, u) + 0.02)


def heart_top(a: Anatomy) -> float:
    return a.heart_v - a.heart_halfheight


def mediastinum_column(a: Anatomy, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (np.abs(u - a.med_shift) < a.med_halfwidth) & (v > a.apex - 0.1) & (v < dome(a, u))


def aortic_knob(a: Anatomy, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    ku, kv = a.med_shift + a.med_halfwidth + 0.02, a.carina_v - 0.1
    return (u - ku) ** 2 + (v - kv) ** 2 < a.knob_r**2


def trachea(a: Anatomy, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (np.abs(u - a.med_shift + 0.01) < 0.042) & (v < a.carina_v) & (v > -1.4)


def bronchi(a: Anatomy, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Main bronchi leaving the carina at ~35 degrees either side."""
    du, dv = u - (a.med_shift - 0.01), v - a.carina_v
    along = dv
    off = np.abs(du) - 0.7 * dv
    return (along > 0) & (along < 0.16) & (np.abs(off) < 0.03)


def carina_disc(a: Anatomy, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (u - (a.med_shift - 0.01)) ** 2 + ((v - a.carina_v - 0.02) / 1.2) ** 2 < 0.055**2


def spine(a: Anatomy, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (np.abs(u - a.med_shift + 0.01) < a.spine_halfwidth) & (v > a.apex - 0.2) & (v < 1.35)


def clavicle(a: Anatomy, u: np.ndarray, v: np.ndarray, side: int) -> np.ndarray:
    """A gently S-shaped bar from the manubrium out and up to the shoulder."""
    t = side * u - 0.07
    centre = a.clavicle_v - 0.22 * t + 0.12 * np.sin(np.pi * np.clip(t, 0, 0.7) / 0.7) * 0.5
    return (t > 0) & (t < 0.72) & (np.abs(v - centre) < 0.032)


def ribs(a: Anatomy, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Ten posterior rib arcs per side: out from the spine, up a little, then curving down."""
    t = np.abs(u - a.med_shift) - 0.08
    valid = (t > 0) & (t < 0.95)
    shape = -0.12 * t + 0.55 * t**2
    out = np.zeros(np.broadcast(u, v).shape, dtype=bool)
    for k in range(10):
        centre = a.apex + 0.04 + a.rib_phase + 0.135 * k + shape
        out |= valid & (np.abs(v - centre) < 0.028)
    return out


def body(a: Anatomy, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Soft tissue: a rounded trunk plus the neck above it."""
    trunk = (np.abs(u / 1.02) ** 3.2 + np.abs((v - 0.2) / 1.4) ** 3.2) < 1.0
    neck = (np.abs(u - a.med_shift) < 0.3) & (v < a.apex)
    return trunk | neck


# --- the 29 regions ---------------------------------------------------------------------------------

def lung_bounds(a: Anatomy, side: int) -> tuple[float, float]:
    """(apex v, lowest v) of one lung: the zones split this span in thirds."""
    halfwidth = a.lung_halfwidth_r if side < 0 else a.lung_halfwidth_l
    peak = a.dome_r if side < 0 else a.dome_l
    lowest = peak + a.dome_curv * (halfwidth - 0.45) ** 2
    return a.apex + 0.01, float(lowest)


def hilum_centre(a: Anatomy, side: int) -> tuple[float, float]:
    top, bottom = lung_bounds(a, side)
    return a.med_shift + side * (a.med_halfwidth + 0.1), top + 0.45 * (bottom - top)


def region_masks(a: Anatomy, u: np.ndarray, v: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean mask of every Chest ImaGenome region on the grid ``(u, v)``, keyed by region name."""
    shape = np.broadcast(u, v).shape
    u = np.broadcast_to(u, shape)
    v = np.broadcast_to(v, shape)
    masks: dict[str, np.ndarray] = {}
    d = dome(a, u)
    for side, name in ((-1, "right"), (1, "left")):
        lung = lung_mask(a, u, v, side)
        top, bottom = lung_bounds(a, side)
        span = bottom - top
        masks[f"{name} lung"] = lung
        masks[f"{name} upper lung zone"] = lung & (v < top + span / 3)
        masks[f"{name} mid lung zone"] = lung & (v >= top + span / 3) & (v < top + 2 * span / 3)
        masks[f"{name} lower lung zone"] = lung & (v >= top + 2 * span / 3)
        masks[f"{name} apical zone"] = lung & (v < top + 0.14 * span)
        hu, hv = hilum_centre(a, side)
        masks[f"{name} hilar structures"] = ((u - hu) / 0.1) ** 2 + ((v - hv) / 0.13) ** 2 < 1.0
        su = side * (u - a.med_shift)
        halfwidth = a.lung_halfwidth_r if side < 0 else a.lung_halfwidth_l
        masks[f"{name} costophrenic angle"] = lung & (v > d - 0.16) & (su > halfwidth - 0.3)
        masks[f"{name} hemidiaphragm"] = (
            (v >= d) & (v < d + 0.07) & (su > a.med_halfwidth) & (su < halfwidth)
            & ~heart(a, u, v - 0.07)
        )
    masks["trachea"] = trachea(a, u, v) & (v > a.apex - 0.25)
    masks["spine"] = spine(a, u, v) & (v < d + 0.15)
    masks["right clavicle"] = clavicle(a, u, v, -1)
    masks["left clavicle"] = clavicle(a, u, v, 1)
    masks["aortic arch"] = aortic_knob(a, u, v)
    column = mediastinum_column(a, u, v)
    hrt = heart(a, u, v)
    masks["mediastinum"] = column | hrt | masks["aortic arch"]
    masks["upper mediastinum"] = (column | masks["aortic arch"]) & (v < heart_top(a) + 0.04)
    masks["svc"] = (
        (u > a.med_shift - a.med_halfwidth - 0.02) & (u < a.med_shift - 0.03)
        & (v > a.apex + 0.08) & (v < heart_top(a) + 0.06)
    )
    masks["cardiac silhouette"] = hrt
    cav_v = heart_top(a) + 0.06
    rel = np.clip(1.0 - ((cav_v - a.heart_v) / a.heart_halfheight) ** 2, 0.0, 1.0)
    cav_u = a.heart_u - a.heart_halfwidth * float(np.sqrt(rel))
    masks["cavoatrial junction"] = (u - cav_u) ** 2 + (v - cav_v) ** 2 < 0.05**2
    masks["right atrium"] = hrt & (u < a.heart_u - 0.35 * a.heart_halfwidth)
    masks["carina"] = carina_disc(a, u, v)
    masks["abdomen"] = body(a, u, v) & (v > d + 0.07)
    assert set(masks) == set(REGIONS)
    return masks


def boxes_from_masks(masks: dict[str, np.ndarray], rows: int, cols: int) -> np.ndarray:
    """(29, 4) boxes ``x_min, y_min, x_max, y_max`` in pixels of a ``rows x cols`` image, from masks laid
    on a coarser grid covering the same image; an empty mask gives a NaN box."""
    out = np.full((len(REGIONS), 4), np.nan, dtype=np.float32)
    for i, name in enumerate(REGIONS):
        m = masks[name]
        gr, gc = m.shape
        ys = np.flatnonzero(m.any(axis=1))
        xs = np.flatnonzero(m.any(axis=0))
        if len(xs) == 0:
            continue
        out[i] = (xs[0] * cols / gc, ys[0] * rows / gr, (xs[-1] + 1) * cols / gc, (ys[-1] + 1) * rows / gr)
    return out
