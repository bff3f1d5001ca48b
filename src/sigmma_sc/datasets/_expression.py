"""Expression model of the synthetic section: gene panel, programmes and negative-binomial counts."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse

from ._tissue import (
    BCELL,
    CELL_TYPES,
    DOMAINS,
    ENDO,
    FIBRO,
    HYPOXIC,
    IMMUNE,
    MACRO,
    NECROSIS,
    PERI,
    TCELL,
    TUMOUR,
    TUMOUR_REGION,
    VESSEL,
    Cells,
)

CHEMOKINES = ("CXCL2", "CXCL6")
# contact programme: interferon-gamma response of tumour cells touching a T cell (see _tissue.contact_mask)
CONTACT_GENES = ("CXCL10", "CD274", "IDO1")
CONTACT_FRACTION = 0.03  # expected fraction of a contacted cell's library per contact gene

# marker genes per cell type, most specific first
_MARKERS = {
    TUMOUR: ("EPCAM", "KRT8", "KRT18", "KRT19", "CDH1", "ERBB2", "CEACAM6", "MUC1", "MKI67", "TOP2A"),
    FIBRO: ("COL1A1", "COL1A2", "DCN", "LUM", "COL3A1", "PDGFRA", "FAP", "POSTN", "SFRP2"),
    TCELL: ("CD3E", "CD3D", "CD2", "TRAC", "CD8A", "CD4", "IL7R", "GZMB", "CCR7"),
    BCELL: ("MS4A1", "CD79A", "CD19", "CD79B", "BANK1", "CXCR5"),
    MACRO: ("CD68", "CD163", "LYZ", "C1QA", "CSF1R", "AIF1", "APOE"),
    ENDO: ("PECAM1", "VWF", "CDH5", "KDR", "CLDN5", "EMCN"),
    PERI: ("ACTA2", "MYH11", "TAGLN", "RGS5", "PDGFRB", "DES"),
}
_SHARED = {"PTPRC": (TCELL, BCELL, MACRO)}
# domain programmes (all cells of the domain): immune aggregates (tertiary lymphoid structures),
# the hypoxic tumour core, and the tumour region as a whole (macro scale)
_LYMPHOID = ("CCL19", "CCL21", "CXCL13", "LTB")
_HYPOXIA = ("VEGFA", "CA9", "SLC2A1")
_TUMOUR_REGION = ("MMP11", "COL11A1", "SPP1", "TGFB1")
N_NEG_CONTROLS = 4


def gene_panel(n_genes: int, *, contact: bool = False) -> list[str]:
    """Gene names: real markers (by priority) then ``GENE_001``, ... up to ``n_genes``.

    With ``contact``, the contact-programme genes follow the chemokines (and push the last markers out);
    without, the panel is the one of sections written before the programme existed.
    """
    depth = max(len(m) for m in _MARKERS.values())
    round_robin = [m[i] for i in range(depth) for m in _MARKERS.values() if i < len(m)]
    programmes = (_LYMPHOID[0], _HYPOXIA[0], _TUMOUR_REGION[0])
    if contact:
        named = [*CHEMOKINES, *CONTACT_GENES, "PTPRC", *round_robin[:18], *programmes, *round_robin[18:]]
    else:
        named = [*CHEMOKINES, "PTPRC", *round_robin[:21], *programmes, *round_robin[21:]]
    named = list(dict.fromkeys([*named, *_LYMPHOID, *_HYPOXIA, *_TUMOUR_REGION]))
    if n_genes < 20:
        raise ValueError(f"n_genes must be >= 20 to hold the marker panel, got {n_genes}.")
    names = named[:n_genes]
    names += [f"GENE_{i:03d}" for i in range(1, n_genes - len(names) + 1)]
    return names


@dataclass
class ExpressionModel:
    """Normalised expression profile per (cell type, domain) and library-size parameters."""

    genes: list[str]
    profiles: np.ndarray  # (n_types, n_domains, n_genes), rows sum to 1
    chem_idx: np.ndarray  # column indices of CXCL2 / CXCL6
    chem_fraction: float  # expected fraction of a chemokine-high cell's library per chemokine gene
    library_median: np.ndarray  # per cell type
    contact_idx: np.ndarray | None = None  # column indices of CONTACT_GENES
    contact_fraction: float = CONTACT_FRACTION
    dispersion: float = 3.0

    @classmethod
    def build(cls, rng: np.random.Generator, n_genes: int, *, contact: bool = False) -> ExpressionModel:
        """Draw cell-type programmes and domain modulations (and the contact programme's genes with ``contact``)."""
        genes = gene_panel(n_genes, contact=contact)
        col = {g: i for i, g in enumerate(genes)}
        n_t, n_d = len(CELL_TYPES), len(DOMAINS)
        base = np.exp(rng.normal(-1.0, 1.0, n_genes)) * 0.08  # low background for every gene
        logw = np.log(np.broadcast_to(base, (n_t, n_genes)).copy())
        generic = np.array([g.startswith("GENE_") for g in genes])
        for t in range(n_t):  # each type also uses a random subset of the generic genes
            use = generic & (rng.random(n_genes) < 0.15)
            logw[t, use] = rng.normal(0.0, 1.0, use.sum())
            for rank, g in enumerate(_MARKERS[t]):
                if g in col:
                    logw[t, col[g]] = rng.normal(2.6 - 0.1 * rank, 0.3)
        for g, types in _SHARED.items():
            if g in col:
                logw[list(types), col[g]] = rng.normal(2.5, 0.2, len(types))
        for g in (*CHEMOKINES, *CONTACT_GENES):
            if g in col:
                logw[:, col[g]] = np.log(0.004)

        logfc = np.zeros((n_d, n_genes))
        for d in range(n_d):  # meso/macro texture: sparse random domain effects on generic genes
            use = generic & (rng.random(n_genes) < 0.06)
            logfc[d, use] = rng.normal(0.0, 0.8, use.sum())
        for g in _LYMPHOID:
            if g in col:
                logfc[IMMUNE, col[g]] = 2.5
        for g in _HYPOXIA:
            if g in col:
                logfc[[HYPOXIC, NECROSIS], col[g]] = 1.0
        macro_genes = [col[g] for g in _TUMOUR_REGION if g in col]
        macro_genes += list(np.flatnonzero(generic)[: max(0, 10 - len(macro_genes))])
        for d in TUMOUR_REGION:
            logfc[d, macro_genes] += 0.7
        logfc[VESSEL, [col[g] for g in ("PECAM1", "VWF") if g in col]] += 0.5

        w = np.exp(logw[:, None, :] + logfc[None, :, :])
        profiles = w / w.sum(-1, keepdims=True)
        library = np.array([180.0, 110.0, 70.0, 80.0, 130.0, 100.0, 100.0])
        chem_idx = np.array([col[g] for g in CHEMOKINES])
        contact_idx = np.array([col[g] for g in CONTACT_GENES]) if contact else None
        return cls(genes, profiles, chem_idx, 0.05, library, contact_idx)

    def sample(
        self, rng: np.random.Generator, cells: Cells, start: int, stop: int
    ) -> tuple[sparse.csr_matrix, np.ndarray]:
        """Counts of cells ``start:stop``: gene matrix (CSR, int32) and negative-control probe counts."""
        t, d = cells.cell_type[start:stop], cells.domain[start:stop]
        n = stop - start
        area = (
            np.pi
            * (cells.a[start:stop] + cells.expansion[start:stop])
            * (cells.b[start:stop] + cells.expansion[start:stop])
        )
        lib = self.library_median[t] * (area / 90.0) ** 0.3 * np.exp(rng.normal(0.0, 0.35, n))
        lib = np.clip(lib, 25.0, 600.0)
        mu = self.profiles[t, d] * lib[:, None]
        chem = cells.chemokine_high[start:stop]
        mu[np.ix_(chem, self.chem_idx)] += (self.chem_fraction * lib[chem])[:, None] * rng.uniform(
            0.7, 1.3, (chem.sum(), 2)
        )
        con = cells.contacted[start:stop]
        if self.contact_idx is not None and con.any():
            mu[np.ix_(con, self.contact_idx)] += (self.contact_fraction * lib[con])[:, None] * rng.uniform(
                0.7, 1.3, (con.sum(), len(self.contact_idx))
            )
        lam = rng.gamma(self.dispersion, mu / self.dispersion)
        counts = rng.poisson(lam).astype(np.int32)
        neg = rng.poisson(0.01, (n, N_NEG_CONTROLS)).astype(np.int32)
        return sparse.csr_matrix(counts), neg
