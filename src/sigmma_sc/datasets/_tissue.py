"""Tissue layout of the synthetic section: domains at three scales, cells and their nuclei.

All lengths are in micrometres, in the Xenium frame (x to the right, y down, origin at the top-left
corner of the morphology image).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

# Domain codes (index into DOMAINS). ``background`` and ``lumen`` hold no cells.
DOMAINS = (
    "background",
    "stroma",
    "tumour_stroma",
    "tumour_nest",
    "tumour_nest_hypoxic",
    "necrosis",
    "immune_aggregate",
    "vessel",
    "lumen",
)
BG, STROMA, T_STROMA, NEST, HYPOXIC, NECROSIS, IMMUNE, VESSEL, LUMEN = range(len(DOMAINS))
TUMOUR_REGION = (T_STROMA, NEST, HYPOXIC, NECROSIS)
CELL_DOMAINS = tuple(d for d in DOMAINS if d not in ("background", "lumen"))  # domains that hold cells

CELL_TYPES = ("tumour", "fibroblast", "T_cell", "B_cell", "macrophage", "endothelial", "pericyte")
TUMOUR, FIBRO, TCELL, BCELL, MACRO, ENDO, PERI = range(len(CELL_TYPES))

# cells per 100 µm² in each domain (mean over the section is ~ 1 cell per 110-120 µm²)
_DENSITY = np.array([0.0, 0.5, 0.7, 1.25, 1.1, 0.15, 2.0, 1.2, 0.0]) / 100.0

# cell-type mixing per domain (rows: DOMAINS, columns: CELL_TYPES)
_MIXING = np.array(
    [
        [0, 0, 0, 0, 0, 0, 0],
        [0.02, 0.60, 0.08, 0.02, 0.10, 0.10, 0.08],  # stroma
        [0.05, 0.50, 0.15, 0.03, 0.15, 0.07, 0.05],  # tumour stroma (desmoplastic)
        [0.85, 0.03, 0.05, 0.00, 0.05, 0.02, 0.00],  # tumour nest
        [0.82, 0.03, 0.03, 0.00, 0.10, 0.02, 0.00],  # hypoxic tumour nest
        [0.30, 0.00, 0.00, 0.00, 0.70, 0.00, 0.00],  # necrosis (debris, macrophages)
        [0.00, 0.03, 0.50, 0.35, 0.08, 0.04, 0.00],  # immune aggregate
        [0.00, 0.00, 0.00, 0.00, 0.05, 0.60, 0.35],  # vessel wall
        [0, 0, 0, 0, 0, 0, 0],
    ]
)

# nucleus shape per cell type: semi-major axis mean/sd (µm), minor/major ratio range,
# pleomorphism, haematoxylin and DAPI intensity (relative), kidney-shaped notch
_NUCLEUS = {
    TUMOUR: (4.6, 0.7, 0.65, 0.95, 0.14, 0.80, 0.55, False),
    FIBRO: (5.5, 0.8, 0.25, 0.40, 0.03, 0.90, 0.60, False),
    TCELL: (2.8, 0.25, 0.85, 1.00, 0.03, 1.35, 1.00, False),
    BCELL: (3.0, 0.25, 0.85, 1.00, 0.03, 1.30, 0.95, False),
    MACRO: (4.3, 0.5, 0.60, 0.85, 0.05, 0.75, 0.50, True),
    ENDO: (5.0, 0.6, 0.25, 0.35, 0.03, 0.95, 0.65, False),
    PERI: (4.5, 0.6, 0.35, 0.50, 0.03, 0.95, 0.60, False),
}
_ALIGNED_TYPES = (FIBRO, ENDO, PERI)

# planted contact programme (cell scale): tumour cells touching a T cell (centroids closer than
# CONTACT_DISTANCE_UM) respond (interferon-gamma-like genes, see _expression.CONTACT_GENES) and their
# nuclei swell and darken in the images (CONTACT_NUCLEUS_SCALE x axes, CONTACT_STAIN_SCALE x stain)
CONTACT_RECEIVER, CONTACT_SENDER = TUMOUR, TCELL
CONTACT_DISTANCE_UM = 15.0
CONTACT_NUCLEUS_SCALE = 1.35
CONTACT_STAIN_SCALE = 1.3


@dataclass
class Layout:
    """Domain maps of the section, sampled on a regular grid of ``grid`` µm."""

    width: float
    height: float
    grid: float
    domain: np.ndarray  # (ny, nx) uint8 codes into DOMAINS
    angle: np.ndarray  # (ny, nx) float32 fibre / vessel orientation (radians)

    def lookup(self, x: np.ndarray, y: np.ndarray, field: np.ndarray | None = None) -> np.ndarray:
        """Nearest-grid value of ``field`` (default: the domain map) at µm positions."""
        field = self.domain if field is None else field
        j = np.clip((x / self.grid).astype(np.int64), 0, field.shape[1] - 1)
        i = np.clip((y / self.grid).astype(np.int64), 0, field.shape[0] - 1)
        return field[i, j]


@dataclass
class Cells:
    """Per-cell ground truth and geometry (µm)."""

    x: np.ndarray
    y: np.ndarray
    cell_type: np.ndarray  # int codes into CELL_TYPES
    domain: np.ndarray  # int codes into DOMAINS
    a: np.ndarray  # nucleus semi-major axis
    b: np.ndarray  # nucleus semi-minor axis
    theta: np.ndarray  # nucleus orientation (radians, x towards y)
    expansion: np.ndarray  # cell boundary = nucleus ellipse grown by this distance
    pleo: np.ndarray  # (n, 4): amplitude and phase of the 2nd and 3rd radial harmonics
    notch: np.ndarray  # (n, 3): kidney notch centre (u, v) in the nucleus frame and radius (0 = none)
    hem: np.ndarray  # haematoxylin intensity
    dapi: np.ndarray  # DAPI intensity
    vesicular: np.ndarray  # central chromatin clearing in H&E (0 = dense)
    contact: np.ndarray | None = None  # receiving cells of the planted contact programme (None: all False)

    @property
    def n(self) -> int:
        """Number of cells."""
        return len(self.x)

    @property
    def chemokine_high(self) -> np.ndarray:
        """Tumour cells of hypoxic nests, which carry the planted CXCL2/CXCL6 programme."""
        return (self.cell_type == TUMOUR) & (self.domain == HYPOXIC)

    @property
    def contacted(self) -> np.ndarray:
        """Receiving cells (tumour) within ``CONTACT_DISTANCE_UM`` of a T cell, which carry the contact programme."""
        return np.zeros(self.n, dtype=bool) if self.contact is None else self.contact

    @property
    def in_tumour_region(self) -> np.ndarray:
        """Macro scale: whether the cell lies in the tumour region."""
        return np.isin(self.domain, TUMOUR_REGION)


def noise_field(rng: np.random.Generator, shape: tuple[int, int], grid: float, sigma_um: float) -> np.ndarray:
    """Smooth Gaussian random field (zero mean, unit variance) with correlation length ``sigma_um``."""
    step = max(sigma_um / 3.0, grid)
    ny, nx = (int(np.ceil(s * grid / step)) + 8 for s in shape)
    coarse = ndimage.gaussian_filter(rng.standard_normal((ny, nx)), sigma_um / step, mode="wrap")
    iy = (np.arange(shape[0]) + 0.5) * grid / step + 4
    ix = (np.arange(shape[1]) + 0.5) * grid / step + 4
    field = ndimage.map_coordinates(coarse, np.meshgrid(iy, ix, indexing="ij"), order=3, mode="nearest")
    return ((field - field.mean()) / (field.std() + 1e-12)).astype(np.float32)


def _quantile(values: np.ndarray, q: float, default: float = np.inf) -> float:
    return float(np.quantile(values, q)) if values.size else default


def make_layout(rng: np.random.Generator, n_cells: int) -> Layout:
    """Draw the domain maps of a section sized for ``n_cells`` at realistic density."""
    side = np.sqrt(n_cells * 110.0 / 0.62)  # ~62% of the scanned area is tissue
    width, height = 1.12 * side, side / 1.12
    grid = 2.0 if side <= 3000 else 4.0
    shape = (int(np.ceil(height / grid)), int(np.ceil(width / grid)))
    yy, xx = np.meshgrid((np.arange(shape[0]) + 0.5) * grid, (np.arange(shape[1]) + 0.5) * grid, indexing="ij")
    area_mm2 = width * height / 1e6

    # tissue: a rounded, lobed blob with a blank margin and a few holes (fat, tears)
    u, v = (xx - width / 2) / (0.44 * width), (yy - height / 2) / (0.44 * height)
    phi = np.arctan2(v, u)
    radius = 1.0 + 0.06 * noise_field(rng, shape, grid, max(40.0, side / 25))
    for k in range(2, 6):
        radius += rng.uniform(0.015, 0.045) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
    tissue = (np.abs(u) ** 2.6 + np.abs(v) ** 2.6) ** (1 / 2.6) < radius
    hole_scale = min(1.0, side / 1500)
    for _ in range(max(1, round(0.6 * area_mm2))):
        cy, cx = _sample_where(rng, tissue, grid, 1)[0]
        ra = rng.uniform(10, 25) + rng.uniform(0, 60) * hole_scale
        rb, ang = ra * rng.uniform(0.5, 1.0), rng.uniform(0, np.pi)
        du, dv = xx - cx, yy - cy
        pu, pv = du * np.cos(ang) + dv * np.sin(ang), -du * np.sin(ang) + dv * np.cos(ang)
        tissue &= (pu / ra) ** 2 + (pv / rb) ** 2 > 1

    # macro: tumour region (~45% of the tissue) vs. stroma
    macro = noise_field(rng, shape, grid, max(0.2 * side, 200.0))
    region = tissue & (macro > _quantile(macro[tissue], 0.55))
    # hypoxic sub-region: the tumour region's core, far from the stroma (and its vessels)
    depth = ndimage.distance_transform_edt(region) * grid
    hypoxic = region & (depth >= _quantile(depth[region], 0.72))
    # meso: tumour nests (blobs of ~100-300 µm), confluent in the hypoxic core, with necrotic centres
    meso = noise_field(rng, shape, grid, 40.0)
    nest = region & ~hypoxic & (meso > _quantile(meso[region & ~hypoxic], 0.50))
    nest_h = hypoxic & (meso > _quantile(meso[hypoxic], 0.20))
    necrosis = nest_h & (meso > _quantile(meso[hypoxic], 0.90)) & (depth > _quantile(depth[hypoxic], 0.3))

    domain = np.zeros(shape, np.uint8)
    domain[tissue] = STROMA
    domain[region] = T_STROMA
    domain[nest] = NEST
    domain[nest_h] = HYPOXIC
    domain[necrosis] = NECROSIS
    angle = (np.pi * noise_field(rng, shape, grid, 120.0)).astype(np.float32)

    _paint_immune_aggregates(rng, domain, region, grid, xx, yy, side)
    _paint_vessels(rng, domain, angle, grid, xx, yy)
    return Layout(width=width, height=height, grid=grid, domain=domain, angle=angle)


def _sample_where(rng: np.random.Generator, mask: np.ndarray, grid: float, n: int, weights=None) -> np.ndarray:
    """``n`` random (y, x) µm positions inside ``mask`` (optionally weighted)."""
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        idx = np.arange(mask.size)
    p = None
    if weights is not None:
        w = weights.ravel()[idx].astype(np.float64)
        p = w / w.sum() if w.sum() > 0 else None
    pick = rng.choice(idx, size=n, p=p)
    iy, ix = np.unravel_index(pick, mask.shape)
    return np.column_stack([(iy + rng.random(n)) * grid, (ix + rng.random(n)) * grid])


def _local_window(shape, grid, cy, cx, r):
    i0, i1 = max(0, int((cy - r) / grid)), min(shape[0], int((cy + r) / grid) + 2)
    j0, j1 = max(0, int((cx - r) / grid)), min(shape[1], int((cx + r) / grid) + 2)
    return slice(i0, i1), slice(j0, j1)


def _paint_immune_aggregates(rng, domain, region, grid, xx, yy, side) -> None:
    """Immune aggregates (50-150 µm), mostly in the stroma next to the tumour border."""
    tissue = domain > BG
    n_agg = max(1, round(4.0 * tissue.sum() * grid**2 / 1e6))
    dist = ndimage.distance_transform_edt(~region) * grid
    weights = np.where(domain == STROMA, np.exp(-dist / 250.0), 0.0) + 0.3 * (domain == T_STROMA)
    size_scale = min(1.0, side / 600)
    for cy, cx in _sample_where(rng, weights > 0, grid, n_agg, weights):
        ra = rng.uniform(25, 75) * max(size_scale, 0.5)
        rb, ang = ra * rng.uniform(0.7, 1.0), rng.uniform(0, np.pi)
        sl = _local_window(domain.shape, grid, cy, cx, ra * 1.3)
        du, dv = xx[sl] - cx, yy[sl] - cy
        pu, pv = du * np.cos(ang) + dv * np.sin(ang), -du * np.sin(ang) + dv * np.cos(ang)
        wobble = 1 + 0.12 * np.cos(3 * np.arctan2(pv, pu) + rng.uniform(0, 2 * np.pi))
        inside = (pu / ra) ** 2 + (pv / rb) ** 2 < wobble**2
        sub = domain[sl]
        sub[inside & np.isin(sub, (STROMA, T_STROMA))] = IMMUNE


def _paint_vessels(rng, domain, angle, grid, xx, yy) -> None:
    """Elongated vessels (capsules) in the stroma: an endothelial/pericyte wall around a lumen."""
    tissue = domain > BG
    n_ves = max(2, round(10.0 * tissue.sum() * grid**2 / 1e6))
    stroma = np.isin(domain, (STROMA, T_STROMA))
    weights = np.where(domain == STROMA, 1.0, 0.35)
    for cy, cx in _sample_where(rng, stroma, grid, n_ves, weights):
        ang = float(angle[min(int(cy / grid), domain.shape[0] - 1), min(int(cx / grid), domain.shape[1] - 1)])
        half = rng.uniform(10, 80)
        r_out = rng.uniform(9, 22)
        r_in = r_out - rng.uniform(4, 6)
        sl = _local_window(domain.shape, grid, cy, cx, half + r_out)
        du, dv = xx[sl] - cx, yy[sl] - cy
        along = np.clip(du * np.cos(ang) + dv * np.sin(ang), -half, half)
        d = np.hypot(du - along * np.cos(ang), dv - along * np.sin(ang))
        sub, sub_angle = domain[sl], angle[sl]
        ok = np.isin(sub, (STROMA, T_STROMA, IMMUNE, VESSEL))
        wall = ok & (d < r_out)
        sub[wall] = VESSEL
        sub_angle[wall] = ang
        sub[ok & (d < r_in)] = LUMEN


def nucleus_draws(rng: np.random.Generator, cell_type: int, k: int) -> tuple[np.ndarray, ...]:
    """Semi-axes ``a``, ``b``, haematoxylin and DAPI stain and ``(k, 4)`` pleomorphism of ``k`` nuclei of one type.

    One place for the draws (and their order) that every synthetic section makes from ``_NUCLEUS``.
    """
    a_mu, a_sd, r_lo, r_hi, p_amp, h, d, _ = _NUCLEUS[cell_type]
    a = np.clip(rng.normal(a_mu, a_sd, k), 0.6 * a_mu, 1.6 * a_mu)
    b = a * rng.uniform(r_lo, r_hi, k)
    hem = h * rng.uniform(0.85, 1.15, k)
    dapi = d * rng.uniform(0.8, 1.2, k)
    pleo = np.column_stack(
        [
            p_amp * rng.random(k),
            rng.uniform(0, 2 * np.pi, k),
            0.6 * p_amp * rng.random(k),
            rng.uniform(0, 2 * np.pi, k),
        ]
    )
    return a, b, hem, dapi, pleo


def contact_mask(x: np.ndarray, y: np.ndarray, cell_type: np.ndarray, distance: float = CONTACT_DISTANCE_UM) -> np.ndarray:
    """Cells of ``CONTACT_RECEIVER`` type whose centroid lies closer than ``distance`` µm to a ``CONTACT_SENDER`` cell."""
    out = np.zeros(len(x), dtype=bool)
    receivers, senders = np.flatnonzero(cell_type == CONTACT_RECEIVER), np.flatnonzero(cell_type == CONTACT_SENDER)
    if receivers.size == 0 or senders.size == 0:
        return out
    tree = cKDTree(np.column_stack([x[senders], y[senders]]))
    d, _ = tree.query(np.column_stack([x[receivers], y[receivers]]), k=1, distance_upper_bound=distance)
    out[receivers[d < distance]] = True
    return out


def place_cells(rng: np.random.Generator, layout: Layout, n_cells: int, *, contact: bool = True) -> Cells:
    """Place exactly ``n_cells`` cells with domain-dependent density, type mixing and nuclear shape.

    With ``contact``, tumour cells touching a T cell (see :func:`contact_mask`) get larger, darker nuclei;
    no random draw depends on it, so everything else is the same with and without.
    """
    density = _DENSITY[layout.domain]
    expected = density.sum() * layout.grid**2
    if expected <= 0:
        raise RuntimeError("The synthetic layout has no tissue; try another seed.")
    factor = 1.15 * n_cells / expected
    for _ in range(8):
        x, y = _thinned_hex_points(rng, layout, density, factor)
        if len(x) >= n_cells:
            break
        factor *= 1.3 * n_cells / max(len(x), 1)
    else:  # pragma: no cover - the loop always converges
        raise RuntimeError("Could not place the requested number of cells.")
    keep = np.sort(rng.choice(len(x), size=n_cells, replace=False))
    x, y = x[keep], y[keep]
    domain = layout.lookup(x, y).astype(np.int64)

    cum = np.cumsum(_MIXING, axis=1)
    cum /= np.maximum(cum[:, -1:], 1e-12)
    cell_type = (rng.random(n_cells)[:, None] > cum[domain]).sum(1).clip(0, len(CELL_TYPES) - 1)

    a, b, theta = np.empty(n_cells), np.empty(n_cells), rng.uniform(0, np.pi, n_cells)
    pleo, notch = np.zeros((n_cells, 4)), np.zeros((n_cells, 3))
    hem, dapi = np.empty(n_cells), np.empty(n_cells)
    field_angle = layout.lookup(x, y, layout.angle)
    for t, (*_, kidney) in _NUCLEUS.items():
        m = cell_type == t
        k = int(m.sum())
        a[m], b[m], hem[m], dapi[m], pleo[m] = nucleus_draws(rng, t, k)
        if t in _ALIGNED_TYPES:
            theta[m] = field_angle[m] + rng.normal(0, 0.25, k)
        if kidney:
            notch[m] = np.column_stack([np.zeros(k), b[m] * rng.uniform(1.2, 1.4, k), b[m] * rng.uniform(0.5, 0.65, k)])
    # tumour nuclei are vesicular (open chromatin); hypoxic ones small, dark and dense (pyknotic)
    vesicular = np.where(cell_type == TUMOUR, rng.uniform(0.3, 0.55, n_cells), 0.0)
    pyk = (cell_type == TUMOUR) & np.isin(domain, (HYPOXIC, NECROSIS))
    vesicular[pyk] = 0.0
    a[pyk] *= 0.85
    b[pyk] *= 0.85
    hem[pyk] *= 1.25
    dapi[pyk] *= 1.3
    contacted = contact_mask(x, y, cell_type) if contact else np.zeros(n_cells, dtype=bool)
    a[contacted] *= CONTACT_NUCLEUS_SCALE
    b[contacted] *= CONTACT_NUCLEUS_SCALE
    hem[contacted] *= CONTACT_STAIN_SCALE
    dapi[contacted] *= CONTACT_STAIN_SCALE

    # cell boundary: nucleus expansion up to 5 µm, limited by the neighbours (as in Xenium)
    tree = cKDTree(np.column_stack([x, y]))
    dist, _ = tree.query(np.column_stack([x, y]), k=2)
    nn = dist[:, 1] if n_cells > 1 else np.full(n_cells, 20.0)
    expansion = np.clip(0.75 * nn - np.sqrt(a * b), 1.0, 5.0)
    return Cells(
        x=x,
        y=y,
        cell_type=cell_type,
        domain=domain,
        a=a,
        b=b,
        theta=np.mod(theta, np.pi),
        expansion=expansion,
        pleo=pleo,
        notch=notch,
        hem=hem,
        dapi=dapi,
        vesicular=vesicular,
        contact=contacted,
    )


def _thinned_hex_points(rng, layout: Layout, density: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """Jittered hexagonal lattice thinned to the target density (keeps a minimal spacing)."""
    rho_max = float(density.max()) * factor
    d = np.sqrt(2.0 / (np.sqrt(3.0) * rho_max))
    dy = d * np.sqrt(3.0) / 2
    ny, nx = int(layout.height / dy) + 1, int(layout.width / d) + 1
    xs, ys = [], []
    for i in range(ny):  # row by row keeps memory bounded for large sections
        x = (np.arange(nx) + 0.5 * (i % 2) + 0.25) * d + rng.uniform(-0.22, 0.22, nx) * d
        y = np.full(nx, (i + 0.5) * dy) + rng.uniform(-0.22, 0.22, nx) * dy
        ok = (x > 0) & (x < layout.width) & (y > 0) & (y < layout.height)
        x, y = x[ok], y[ok]
        p = layout.lookup(x, y, density) * factor / rho_max
        keep = rng.random(len(x)) < p
        xs.append(x[keep])
        ys.append(y[keep])
    return np.concatenate(xs), np.concatenate(ys)
