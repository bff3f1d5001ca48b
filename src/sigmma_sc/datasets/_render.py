"""Block-wise rendering of the synthetic H&E (RGB) and Xenium morphology (DAPI, labels) images."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ._tissue import (
    BG,
    HYPOXIC,
    IMMUNE,
    LUMEN,
    NECROSIS,
    NEST,
    STROMA,
    T_STROMA,
    VESSEL,
    Cells,
    Layout,
)

# optical density (natural log) of one unit of stain, for R, G, B
_OD_HAEMATOXYLIN = np.array([1.16, 1.45, 0.60], np.float32)
_OD_EOSIN = np.array([0.08, 0.55, 0.26], np.float32)
_OD_GLASS = np.array([0.025, 0.025, 0.02], np.float32)
_TEX = 512  # period of the precomputed textures (pixels)
_SUB = 4  # domain fields are evaluated every _SUB pixels, then interpolated

# per-domain render parameters: eosin, fibre texture weight, background haematoxylin, debris
_DOMAIN_STYLE = {
    STROMA: (1.00, 1.0, 0.03, 0.0),
    T_STROMA: (0.95, 0.85, 0.05, 0.0),
    NEST: (0.60, 0.15, 0.12, 0.0),
    HYPOXIC: (0.85, 0.10, 0.08, 0.0),
    NECROSIS: (1.15, 0.0, 0.12, 1.0),
    IMMUNE: (0.45, 0.2, 0.15, 0.0),
    VESSEL: (1.10, 0.6, 0.05, 0.0),
    LUMEN: (0.10, 0.0, 0.0, 0.0),
}


@dataclass
class Frame:
    """Pixel grid of an image: µm = origin + pixel_size * R(rotation) @ (u, v), (u, v) intrinsic coordinates."""

    shape: tuple[int, int]
    pixel_size: float
    rotation: float = 0.0
    origin: tuple[float, float] = (0.0, 0.0)

    def _rot(self) -> tuple[float, float]:
        return float(np.cos(self.rotation)), float(np.sin(self.rotation))

    def to_um(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Intrinsic pixel coordinates to µm."""
        c, s = self._rot()
        ps = self.pixel_size
        return self.origin[0] + ps * (c * u - s * v), self.origin[1] + ps * (s * u + c * v)

    def to_px(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """µm to intrinsic pixel coordinates."""
        c, s = self._rot()
        dx, dy = (x - self.origin[0]) / self.pixel_size, (y - self.origin[1]) / self.pixel_size
        return c * dx + s * dy, -s * dx + c * dy


def _tile(texture: np.ndarray, r0: int, c0: int, h: int, w: int) -> np.ndarray:
    """A periodic texture over the block ``[r0:r0 + h, c0:c0 + w]`` of the image plane."""
    t = texture.shape[0]
    shifted = np.roll(texture, (-(r0 % t), -(c0 % t)), axis=(0, 1))
    return np.tile(shifted, (-(-h // t), -(-w // t)))[:h, :w]


class Renderer:
    """Renders blocks of an image :class:`Frame` from the tissue :class:`Layout` and :class:`Cells`."""

    def __init__(self, layout: Layout, cells: Cells, seed: int) -> None:
        self.layout, self.cells, self.seed = layout, cells, seed
        dom = layout.domain
        tissue = (dom != BG).astype(np.float32)
        style = np.zeros((4, *dom.shape), np.float32)  # eosin, fibre weight, haematoxylin, debris
        for d, values in _DOMAIN_STYLE.items():
            style[:, dom == d] = np.asarray(values, np.float32)[:, None]
        eosin, fibre_w, hbg, debris = style
        sigma = 1.5 / layout.grid  # soften the grid into ~1.5 µm-wide boundaries
        # fields sampled per block (see _FIELDS); the tissue mask is folded in
        raw = [
            tissue,
            tissue * eosin,
            1.3 * tissue * eosin * fibre_w,
            1.6 * tissue * (dom == LUMEN),
            tissue * debris,
            tissue * hbg,
            np.cos(2 * layout.angle),  # fibre orientation as a doubled-angle vector (smooth across the pi wrap)
            np.sin(2 * layout.angle),
        ]
        self.fields = np.stack([ndimage.gaussian_filter(f.astype(np.float32), sigma) for f in raw])
        self._textures: dict[float, tuple[np.ndarray, np.ndarray]] = {}

    # -- helpers -----------------------------------------------------------------------------------
    def _block_rng(self, kind: int, r0: int, c0: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, kind, r0, c0])

    def textures(self, pixel_size: float) -> tuple[np.ndarray, np.ndarray]:
        """Periodic fibre textures (centred on 0) at 0, 45, 90, 135 degrees and a red-blood-cell texture."""
        if pixel_size not in self._textures:
            rng = np.random.default_rng([self.seed, 99])
            ky = np.fft.fftfreq(_TEX)[:, None] * 2 * np.pi
            kx = np.fft.fftfreq(_TEX)[None, :] * 2 * np.pi
            noise = np.fft.fft2(rng.standard_normal((_TEX, _TEX)))
            s_par, s_perp = 4.0 / pixel_size, 0.45 / pixel_size
            fibres = []
            for ang in (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4):
                k_par = kx * np.cos(ang) + ky * np.sin(ang)
                k_perp = -kx * np.sin(ang) + ky * np.cos(ang)
                f = np.real(np.fft.ifft2(noise * np.exp(-0.5 * ((k_par * s_par) ** 2 + (k_perp * s_perp) ** 2))))
                fibres.append(np.clip(0.5 + 0.45 * f / f.std(), 0, 1) - 0.5)  # centred
            rbc = np.zeros((_TEX, _TEX), np.float32)
            r = 3.5 / pixel_size
            n_rbc = int(0.5 * _TEX**2 / (np.pi * r * r))
            yy, xx = np.ogrid[-int(r) - 1 : int(r) + 2, -int(r) - 1 : int(r) + 2]
            disc = np.clip(r - np.sqrt(yy**2 + xx**2) + 0.5, 0, 1) * (0.7 + 0.3 * (np.hypot(yy, xx) > r / 2))
            for cy, cx in rng.integers(0, _TEX, (n_rbc, 2)):
                rows, cols = (cy + yy) % _TEX, (cx + xx) % _TEX
                rbc[rows, cols] = np.maximum(rbc[rows, cols], disc)
            self._textures[pixel_size] = (np.stack(fibres).astype(np.float32), rbc)
        return self._textures[pixel_size]

    def sample_fields(self, frame: Frame, r0: int, c0: int, h: int, w: int, which: list[int]) -> np.ndarray:
        """Fields ``which`` on the block's sub-grid (every ``_SUB`` pixels): ``(len(which), h / _SUB, w / _SUB)``."""
        hs, ws = -(-h // _SUB), -(-w // _SUB)
        v, u = np.meshgrid(r0 + _SUB * np.arange(hs) + _SUB / 2, c0 + _SUB * np.arange(ws) + _SUB / 2, indexing="ij")
        x, y = frame.to_um(u, v)
        coords = np.stack([y / self.layout.grid - 0.5, x / self.layout.grid - 0.5])
        return np.stack(
            [ndimage.map_coordinates(self.fields[f], coords, order=1, mode="constant", cval=0.0) for f in which]
        )

    @staticmethod
    def upsample(sub: np.ndarray, h: int, w: int, *, linear: bool = True) -> np.ndarray:
        """Sub-grid fields ``(k, hs, ws)`` to block resolution ``(k, h, w)``, linear or nearest."""
        if not linear:
            return np.repeat(np.repeat(sub, _SUB, axis=1), _SUB, axis=2)[:, :h, :w]
        out = np.empty((len(sub), h, w), np.float32)
        for k, f in enumerate(sub):
            out[k] = ndimage.zoom(f, _SUB, order=1, grid_mode=True, mode="nearest")[:h, :w]
        return out

    def cells_in(self, frame: Frame, u: np.ndarray, v: np.ndarray, r0, c0, h, w, margin: float) -> np.ndarray:
        """Indices of cells whose centre (intrinsic ``u, v``) lies within a block plus margin."""
        return np.flatnonzero((u > c0 - margin) & (u < c0 + w + margin) & (v > r0 - margin) & (v < r0 + h + margin))

    # -- stamps ------------------------------------------------------------------------------------
    def stamps(self, frame: Frame, idx: np.ndarray, u, v, r0, c0, h, w, *, grow: bool = False, batch: int = 256):
        """Yield ``(cells, flat_index, nucleus_alpha, radius, in_cell)`` for soft-edged, pleomorphic nuclei.

        ``radius`` is the normalised distance from the nucleus centre (1 on its edge); ``in_cell`` (only with
        ``grow``) marks pixels inside the cell boundary (nucleus ellipse grown by the cell's expansion).
        """
        c = self.cells
        ps = frame.pixel_size
        order = idx[np.argsort(c.a[idx] + (c.expansion[idx] if grow else 0))]
        for start in range(0, len(order), batch):
            ids = order[start : start + batch]
            a, b = c.a[ids] / ps, c.b[ids] / ps
            e = c.expansion[ids] / ps if grow else np.zeros(len(ids))
            pleo = c.pleo[ids]
            reach = np.max(np.maximum(a * (1 + pleo[:, 0] + pleo[:, 2]), a + e)) + 2
            rad = int(np.ceil(reach))
            off = np.arange(-rad, rad + 1)
            cu, cv = u[ids] - c0, v[ids] - r0
            fu, fv = np.floor(cu).astype(np.int64), np.floor(cv).astype(np.int64)
            dx = (fu[:, None] + off[None, :] + 0.5 - cu[:, None]).astype(np.float32)
            dy = (fv[:, None] + off[None, :] + 0.5 - cv[:, None]).astype(np.float32)
            th = (c.theta[ids] - frame.rotation).astype(np.float32)
            cs, sn = np.cos(th)[:, None, None], np.sin(th)[:, None, None]
            pu = dx[:, None, :] * cs + dy[:, :, None] * sn
            pv = -dx[:, None, :] * sn + dy[:, :, None] * cs
            a3, b3 = a[:, None, None].astype(np.float32), b[:, None, None].astype(np.float32)
            nu, nv = pu / a3, pv / b3
            r = np.sqrt(nu * nu + nv * nv)
            p_max = float((pleo[:, 0] + pleo[:, 2]).max())
            if p_max > 0.02:  # radial harmonics, only where they can matter
                near = r < 1 / (1 - p_max) + 0.5 / float(np.sqrt(a.min() * b.min()))
                ang = np.arctan2(nv[near], nu[near])
                p = np.broadcast_to(pleo[:, None, None, :].astype(np.float32), (*r.shape, 4))[near]
                r[near] /= 1 + p[:, 0] * np.cos(2 * ang + p[:, 1]) + p[:, 2] * np.cos(3 * ang + p[:, 3])
            alpha = np.clip((1 - r) * np.sqrt(a3 * b3) + 0.5, 0, 1)
            notch = c.notch[ids] / ps
            if notch[:, 2].max() > 0:
                nr = np.maximum(notch[:, 2], 1e-3)[:, None, None].astype(np.float32)
                rn = np.hypot(pu - notch[:, 0, None, None], pv - notch[:, 1, None, None]) / nr
                alpha = np.where(nr > 1e-2, alpha * np.clip((rn - 1) * nr + 0.5, 0, 1), alpha)
            rows = fv[:, None, None] + off[None, :, None]
            cols = fu[:, None, None] + off[None, None, :]
            inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
            in_cell = None
            if grow:
                e3 = e[:, None, None].astype(np.float32)
                in_cell = ((pu / (a3 + e3)) ** 2 + (pv / (b3 + e3)) ** 2 <= 1) & inside
                keep = in_cell | ((alpha > 0) & inside)
            else:
                keep = (alpha > 0) & inside
            flat = (rows * w + cols)[keep]
            cell_of = np.broadcast_to(ids[:, None, None], keep.shape)[keep]
            yield cell_of, flat, alpha[keep], r[keep], (in_cell[keep] if grow else None)

    # -- H&E ---------------------------------------------------------------------------------------
    def he_block(self, frame: Frame, uv: tuple[np.ndarray, np.ndarray], r0: int, c0: int, h: int, w: int) -> np.ndarray:
        """RGB uint8 block ``(h, w, 3)`` of the H&E image (Beer-Lambert mix of haematoxylin and eosin)."""
        rng = self._block_rng(1, r0, c0)
        eos, fib, lum, deb, hbg, c2, s2 = self.sample_fields(frame, r0, c0, h, w, [1, 2, 3, 4, 5, 6, 7])
        # fibre texture weights per orientation (0, 45, 90, 135 degrees), in the image frame
        cr, sr = np.cos(2 * frame.rotation), np.sin(2 * frame.rotation)
        c2, s2 = c2 * cr + s2 * sr, s2 * cr - c2 * sr
        wts = np.stack([np.maximum(c2, 0), np.maximum(s2, 0), np.maximum(-c2, 0), np.maximum(-s2, 0)])
        norm = wts.sum(0)
        wts *= (norm > 0.05) / (norm + 1e-3)
        wts = self.upsample(wts, h, w, linear=False)  # smooth orientation: nearest is enough
        has_lumen, has_debris = bool(lum.max() > 0), bool(deb.max() > 0)
        subs = [eos, fib, hbg] + [lum] * has_lumen + [deb] * has_debris
        up = iter(self.upsample(np.stack(subs), h, w))
        eos, fib, hbg = next(up), next(up), next(up)
        lum = next(up) if has_lumen else None
        deb = next(up) if has_debris else None
        fibres, rbc = self.textures(frame.pixel_size)
        grain = rng.random((h, w), dtype=np.float32)

        texture = wts[0] * _tile(fibres[0], r0, c0, h, w)
        for k in range(1, 4):
            texture += wts[k] * _tile(fibres[k], r0, c0, h, w)
        c_eosin = eos + fib * texture
        c_haem = hbg * (0.7 + 0.6 * grain)
        if lum is not None:
            c_eosin += lum * _tile(rbc, r0, c0, h, w)
        if deb is not None:  # necrosis: granular eosin and karyorrhectic nuclear dust
            c_eosin += deb * 0.5 * (grain - 0.5)
            c_haem += deb * (ndimage.gaussian_filter(grain, 1.0) > 0.56) * 0.6

        # nuclei: haematoxylin with chromatin grain (vesicular tumour nuclei are paler in the centre)
        nuc = np.zeros(h * w, np.float32)
        u, v = uv
        margin = (self.cells.a.max() * 1.6) / frame.pixel_size + 2
        idx = self.cells_in(frame, u, v, r0, c0, h, w, margin)
        for cell_of, flat, alpha, r, _ in self.stamps(frame, idx, u, v, r0, c0, h, w):
            clearing = self.cells.vesicular[cell_of].astype(np.float32) * np.maximum(1 - r * r, 0)
            np.maximum.at(nuc, flat, alpha * self.cells.hem[cell_of].astype(np.float32) * (1 - clearing))
        c_haem = np.maximum(c_haem, nuc.reshape(h, w) * (0.75 + 0.5 * grain))
        c_haem = ndimage.gaussian_filter(c_haem, 0.6)

        noise = rng.standard_normal((h, w), dtype=np.float32)
        noise *= 2.5
        rgb = np.empty((h, w, 3), np.uint8)
        for ch in range(3):  # Beer-Lambert, one channel at a time to bound the temporaries
            od = c_haem * -_OD_HAEMATOXYLIN[ch]
            od -= c_eosin * _OD_EOSIN[ch]
            od -= _OD_GLASS[ch]
            np.exp(od, out=od)
            od *= 255.0
            od += noise
            rgb[..., ch] = np.clip(od, 0, 255, out=od)
        return rgb

    # -- Xenium morphology -------------------------------------------------------------------------
    def morphology_block(
        self,
        frame: Frame,
        uv: tuple[np.ndarray, np.ndarray],
        r0: int,
        c0: int,
        h: int,
        w: int,
        *,
        dapi: bool = True,
        labels: bool = True,
    ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        """DAPI block (uint16) and the nucleus and cell label blocks (uint32, 0 = background); None if not asked."""
        u, v = uv
        margin = (self.cells.a.max() * 1.6 + self.cells.expansion.max()) / frame.pixel_size + 2
        idx = self.cells_in(frame, u, v, r0, c0, h, w, margin)
        nuc = np.zeros(h * w, np.float32)
        nuc_lab = np.zeros(h * w, np.uint32) if labels else None
        cell_lab = np.zeros(h * w, np.uint32) if labels else None
        nuc_parts = []
        for cell_of, flat, alpha, _, in_cell in self.stamps(frame, idx, u, v, r0, c0, h, w, grow=labels):
            if dapi:
                np.maximum.at(nuc, flat, alpha * self.cells.dapi[cell_of].astype(np.float32))
            if labels:
                cell_lab[flat[in_cell]] = cell_of[in_cell] + 1
                core = alpha >= 0.5
                nuc_parts.append((flat[core], cell_of[core] + 1))
        if labels:  # a nucleus always belongs to its own cell
            for flat, lab in nuc_parts:
                nuc_lab[flat] = lab
                cell_lab[flat] = lab
            nuc_lab, cell_lab = nuc_lab.reshape(h, w), cell_lab.reshape(h, w)
        image = None
        if dapi:
            rng = self._block_rng(2, r0, c0)
            (tissue,) = self.upsample(self.sample_fields(frame, r0, c0, h, w, [0]), h, w)
            grain = rng.random((h, w), dtype=np.float32)
            img = 150.0 + 250.0 * tissue * (0.8 + 0.4 * grain) + 5200.0 * nuc.reshape(h, w) * (0.75 + 0.5 * grain)
            img = ndimage.gaussian_filter(img, 1.0)
            img += rng.standard_normal((h, w), dtype=np.float32) * np.sqrt(img) * 1.5
            image = np.clip(img, 0, 65535).astype(np.uint16)
        return image, nuc_lab, cell_lab
