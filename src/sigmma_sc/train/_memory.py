"""Host-memory planning of CPU training steps.

On a CPU there is no out-of-memory exception to recover from: a training step larger than the machine's free
memory gets the process killed by the kernel (a Jupyter kernel just dies). Before training, :func:`plan_cpu_micro_batch`
estimates the peak memory of one forward + backward pass from the bundle's per-tile cell and edge counts and,
when a whole batch would not fit, splits it into GradCache micro-batches (the gradients are those of the
whole batch; every tile stays a negative of every other) or refuses with an error naming the fix.

The estimate is linear in the rows the message passing and the edge sampler touch, with coefficients
measured on the demo and the bone-marrow section (``benchmarks/cpu_memory.py``, ``BENCHMARKS.md``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

#: float32 values held for the backward pass per (edge row x width x layer) and per (cell x width x layer x
#: scale). Measured in ``benchmarks/cpu_memory.py`` (peak RSS of one forward + backward): the peak is 1.5-2.1
#: times the edge term alone on the demo and the bone-marrow section at widths 128 and 512; the cell term is
#: a near-constant ~7 % of the edge term there, so the two are not separately identifiable and these values
#: overestimate the measured peak by a factor 1.1-1.6 (on the safe side).
EDGE_COEF = 2.2
CELL_COEF = 2.0
#: the same for an inference pass (nothing is kept for a backward pass: the peak is one layer's messages);
#: measured 0.48-0.72 times the edge term, so the estimate overestimates by 1.0-1.6
INFERENCE_COEF = 0.7
#: fraction of the available memory one step may plan to use (the estimate's error, the rest of the process)
MEMORY_FRACTION = 0.5


def available_memory() -> int | None:
    """Bytes of memory this process can still allocate: ``MemAvailable``, capped by a cgroup limit (SLURM, containers).

    ``None`` when neither can be read (not Linux).
    """
    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
                break
    except (OSError, ValueError):
        pass
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),  # v1
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            if limit != "max" and int(limit) < 1 << 60:
                found.append(max(int(limit) - int(Path(usage_file).read_text().strip()), 0))
            break
        except (OSError, ValueError):
            continue
    return min(found) if found else None


def _terms(model, bundle) -> tuple[Tensor, Tensor]:
    """Edge rows (message passing and edge sampler, over layers and scales) and cell rows per tile ``(T,)``."""
    cfg = model.config
    counts = bundle._host_counts
    cells = counts["cells"].double()
    if not cfg.use_graph:
        return torch.zeros_like(cells), cells
    knn0, knn1, knn2 = (counts[f"knn{g}"].double() for g in range(3))
    cand = {"meso": counts["cand_meso"].double(), "macro": counts["cand_macro"].double()}
    run = model.st_encoder._run
    rows = torch.zeros_like(cells)
    graph = None
    for s in run:
        if graph is None:
            graph = {"micro": knn0, "meso": knn0 + knn1, "macro": knn0 + knn1 + knn2}[s]
        elif cfg.edge_addition:
            graph = graph + cand[s]
            rows = rows + cand[s]  # the edge sampler's scores of the candidates
        else:
            graph = {"meso": knn0 + knn1, "macro": knn0 + knn1 + knn2}[s]
        rows = rows + cfg.layers_per_scale * graph
    return rows, cfg.layers_per_scale * len(run) * cells


def step_bytes_per_tile(model, bundle, *, edge_coef: float | None = None, cell_coef: float | None = None) -> Tensor:
    """Estimated peak bytes of one training forward + backward pass, per tile ``(T,)`` (a batch: the sum).

    ``edge_coef`` and ``cell_coef`` replace :data:`EDGE_COEF` and :data:`CELL_COEF` (``benchmarks/cpu_memory.py``
    fits them from each term alone).
    """
    edge_coef = EDGE_COEF if edge_coef is None else edge_coef
    cell_coef = CELL_COEF if cell_coef is None else cell_coef
    rows, cells = _terms(model, bundle)
    return 4.0 * max(model.config.hidden, model.config.out_dim) * (edge_coef * rows + cell_coef * cells)


def inference_bytes_per_tile(model, bundle) -> Tensor:
    """Estimated peak bytes of an inference pass (``sg.tl.embed``, validation), per tile ``(T,)``."""
    rows, cells = _terms(model, bundle)
    return 4.0 * max(model.config.hidden, model.config.out_dim) * INFERENCE_COEF * (rows + cells)


def inference_chunks(model, bundle, idx: Tensor, max_tiles: int, available: int | None = None) -> list[Tensor]:
    """``idx`` in consecutive chunks of at most ``max_tiles`` tiles, smaller on a CPU where memory is short.

    Inference embeds each tile independently of the others (eval mode), so the chunking changes no result.
    """
    idx = idx.cpu()
    if model.device.type != "cpu" or idx.numel() <= 1:
        return list(idx.split(max(max_tiles, 1)))
    if available is None:
        available = available_memory()
    if available is None:
        return list(idx.split(max(max_tiles, 1)))
    cost = inference_bytes_per_tile(model, bundle)[idx]
    budget = MEMORY_FRACTION * available
    chunks, start, total = [], 0, 0.0
    for i, c in enumerate(cost.tolist()):
        if i > start and (i - start >= max_tiles or total + c > budget):
            chunks.append(idx[start:i])
            start, total = i, 0.0
        total += c
    chunks.append(idx[start:])
    return chunks


def plan_cpu_micro_batch(model, bundle, train_idx: Tensor, batch: int, available: int | None = None) -> int | None:
    """Micro-batch (tiles per forward pass) that keeps a CPU training step within memory, or ``None`` (no split).

    Raises ``MemoryError`` (before any training) when even one tile per forward pass would not fit.
    """
    if available is None:
        available = available_memory()
    if available is None or batch < 2:
        return None
    per_tile = step_bytes_per_tile(model, bundle)[train_idx.cpu()]
    budget = MEMORY_FRACTION * available
    largest = per_tile.sort(descending=True).values
    need = float(largest[:batch].sum())  # the most expensive batch the epochs can draw
    if need <= budget:
        return None
    typical = float(per_tile.mean())
    if float(largest[0]) > budget:
        raise MemoryError(
            f"One training tile needs about {float(largest[0]) / 2**30:.1f} GiB per training step on the CPU but "
            f"only {available / 2**30:.1f} GiB of memory is available. Use smaller tiles (`tile_size_um`), a "
            f"narrower model (`hidden`/`out_dim`, now {model.config.hidden}/{model.config.out_dim}), fewer "
            "candidate edges (`sg.pp.cell_graph`), or a GPU."
        )
    micro = 1
    while micro * 2 <= batch and float(largest[: micro * 2].sum()) <= budget:
        micro *= 2
    logger.info(
        "CPU memory: a batch of %d tiles would need about %.1f GiB per step (%.1f GiB available); accumulating "
        "its gradients over micro-batches of %d tiles (GradCache: the whole batch's gradients, every tile still a "
        "negative of every other; about %.1f GiB per micro-batch). Set `micro_batch` to choose it yourself.",
        batch, need / 2**30, available / 2**30, micro, micro * typical / 2**30,
    )  # fmt: skip
    return micro
