"""Random draws of the global batch, so that a shard or micro-batch sees the noise one process would draw for it.

With micro-batches (GradCache) or several processes, the rows of a batch are embedded in pieces; every
dropout mask and Gumbel draw is taken as its rows of the draw of the whole batch (:class:`GlobalBatchNoise`),
so a step does not depend on how the batch is split.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor


#: random ops whose draws are rebuilt from a global-batch draw (the others pass through, with a warning)
def _random_ops() -> tuple[set, set]:
    import torch.nn.functional as F

    handled = {F.dropout, torch.rand, torch.randn, Tensor.bernoulli_, Tensor.uniform_, Tensor.normal_}
    other = {
        torch.bernoulli, torch.randint, torch.randperm, torch.multinomial, torch.rand_like, torch.randn_like,
        torch.randint_like, torch.normal, torch.poisson, Tensor.exponential_, Tensor.random_, Tensor.geometric_,
        Tensor.cauchy_, Tensor.log_normal_, F.alpha_dropout, F.feature_alpha_dropout, F.dropout1d, F.dropout2d,
        F.dropout3d, F.gumbel_softmax, F.rrelu,
    }  # fmt: skip
    return handled, other


class GlobalBatchNoise(torch.overrides.TorchFunctionMode):
    """Rebuild every random draw of a forward pass on a shard of the batch from the draw of the whole batch.

    A batch of tiles concatenates its rows per *kind* in tile order (``"tiles"``: one row per tile, ``"cells"``,
    ``"cand_meso"``, ``"cand_macro"``: the rows of every tile, as :meth:`~sigmma_sc.model.TrainingBundle.select`
    lays them out). One process draws each dropout mask, Gumbel noise, ... once for the whole global batch. Inside
    this mode, a random op on this rank's rows draws the tensor of the *global* batch from the same generator
    (so it consumes the random stream exactly as one process would) and keeps this rank's rows; the draw is
    cached for the step, so later micro-batches (GradCache) and the second GradCache pass reuse it. Every rank
    then draws the same numbers as one process on the global batch, and the random states of all ranks stay
    equal. The kind of an op is the one whose local row count matches dim 0 (an ambiguity is resolved by the
    op's position in the forward pass, else a warning and a per-rank draw); :meth:`push` names it explicitly.

    Handled: :func:`torch.nn.functional.dropout` (``nn.Dropout``), :func:`torch.rand`, :func:`torch.randn`,
    ``Tensor.bernoulli_``/``uniform_``/``normal_``; other random ops pass through with a warning (their draws
    are per rank). Memory: the step's draws of the global batch are kept until :meth:`start_step` (dropout
    masks as booleans).

    Parameters
    ----------
    counts
        Kind -> ``(T,)`` rows per tile of the whole data set (host tensors), indexed by tile id.
    """

    def __init__(self, counts: dict[str, Tensor]):
        super().__init__()
        self.counts = {k: torch.as_tensor(v).long().cpu() for k, v in counts.items()}
        self._handled, self._other = _random_ops()
        self._kinds: dict[int, str] = {}  # position of a draw in the forward pass -> its kind (learned)
        self._warned: set[str] = set()
        self._cache: dict[tuple[str, int], Any] = {}
        self._span: dict[str, tuple[int, int, int]] = {}
        self._forced: list[str] = []
        self.in_chunk = False
        self._ordinal = 0
        self._seen: dict[str, int] = {}
        self._cum: dict[str, Tensor] = {}

    def start_step(self, idx: Tensor) -> None:
        """Begin an optimiser step on the global batch ``idx`` (tile ids, the same on every rank)."""
        idx = torch.as_tensor(idx).long().cpu()
        self._cache.clear()
        self._cum = {"tiles": torch.arange(idx.numel() + 1)}
        for k, c in self.counts.items():
            self._cum[k] = torch.cat([torch.zeros(1, dtype=torch.long), c[idx].cumsum(0)])

    def start_chunk(self, start: int, stop: int) -> None:
        """Begin the forward pass of the batch positions ``[start, stop)`` of the global batch."""
        self._span = {k: (int(c[start]), int(c[stop]) - int(c[start]), int(c[-1])) for k, c in self._cum.items()}
        self._ordinal, self._seen, self._forced, self.in_chunk = 0, {}, [], True

    def end_chunk(self) -> None:
        """End the forward pass of a chunk."""
        self.in_chunk, self._forced = False, []

    def end_step(self) -> None:
        """Free the step's draws."""
        self._cache.clear()

    def push(self, kind: str) -> None:
        """Random ops draw rows of ``kind`` until :meth:`pop` (e.g. from module hooks)."""
        self._forced.append(kind)

    def pop(self) -> None:
        """Undo the last :meth:`push`."""
        self._forced.pop()

    def skipped_rand(self, kind: str, dtype: torch.dtype, device: torch.device) -> None:
        """Consume the ``torch.rand`` draw of ``kind`` that this shard skips (it has no rows; the global batch has)."""
        if self._span[kind][2] > 0:
            with torch._C.DisableTorchFunction():  # called from a hook, inside this mode
                self._draw("rand", kind, lambda n: torch.rand(n, dtype=dtype, device=device))

    def _kind(self, n: int) -> str | None:
        if self._forced:
            return self._forced[-1]
        match = [k for k, (_, m, _) in self._span.items() if m == n]
        if len({self._span[k] for k in match}) == 1:
            kind = match[0]
        else:
            kind = self._kinds.get(self._ordinal)
            if kind is None or kind not in match:
                return None
        self._kinds.setdefault(self._ordinal, kind)
        return kind

    def _draw(self, what: str, kind: str, make: Callable[[int], Any]) -> Any:
        """The cached global draw of the current op (``make(total_rows)`` on its first sight in the step)."""
        key = (kind, self._seen.get(kind, 0))
        self._seen[kind] = key[1] + 1
        self._ordinal += 1
        if key not in self._cache:
            self._cache[key] = (what, make(self._span[kind][2]))
        cached_what, value = self._cache[key]
        if cached_what != what:
            raise RuntimeError(
                f"The random draws of this forward pass differ between micro-batches ({cached_what} vs {what} for "
                f"{key}); distributed training cannot reproduce one process's noise here."
            )
        return value

    def _rows(self, kind: str, full: Tensor) -> Tensor:
        start, n, _ = self._span[kind]
        return full[start : start + n]

    def _pass(self, func: Any, args: tuple, kwargs: dict, why: str) -> Any:
        name = getattr(func, "__name__", str(func))
        if name not in self._warned:
            self._warned.add(name)
            warnings.warn(
                f"Distributed training: the random op {name} is drawn per rank ({why}), so this rank's noise differs "
                "from one process on the global batch (training stays valid; runs are not identical to 1 process).",
                RuntimeWarning,
                stacklevel=3,
            )
        return func(*args, **kwargs)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._handled:
            return self._handle(func, args, kwargs)
        if func in self._other:
            return self._pass(func, args, kwargs, "not rebuilt from the global batch")
        return func(*args, **kwargs)

    def _handle(self, func: Any, args: tuple, kwargs: dict) -> Any:
        import torch.nn.functional as F

        if func is F.dropout:
            x, rest = args[0], dict(zip(("p", "training", "inplace"), args[1:], strict=False)) | kwargs
            p, training, inplace = float(rest.get("p", 0.5)), bool(rest.get("training", True)), rest.get("inplace")
            if not training or p == 0.0 or x.dim() == 0:
                return func(*args, **kwargs)
            kind = self._kind(x.shape[0])
            if kind is None:
                return self._pass(func, args, kwargs, f"no kind of rows has {x.shape[0]} rows here")
            shape, opts = tuple(x.shape[1:]), {"dtype": x.dtype, "device": x.device}

            def make(n: int) -> Tensor | None:
                if n * math.prod(shape) == 0:
                    return None  # one process draws nothing for an empty tensor
                return F.dropout(torch.ones((n, *shape), **opts), p, True) != 0  # noqa: FBT003

            keep = self._draw("dropout", kind, make)
            if keep is None or x.numel() == 0:
                return x
            if p == 1.0:
                noise = torch.zeros((), **opts)
            else:
                noise = self._rows(kind, keep).to(x.dtype).div_(1 - p)  # the mask of one process, bit for bit
            return x.mul_(noise) if inplace else x * noise

        if func in (torch.rand, torch.randn):
            size = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else args
            size = tuple(int(s) for s in size)
            if "size" in kwargs:
                size = tuple(kwargs.pop("size"))
            if not size:
                return self._pass(func, args, kwargs, "a scalar draw")
            kind = self._kind(size[0])
            if kind is None:
                return self._pass(func, args, kwargs, f"no kind of rows has {size[0]} rows here")
            out = kwargs.pop("out", None)
            full = self._draw(func.__name__, kind, lambda n: func((n, *size[1:]), **kwargs))
            rows = self._rows(kind, full)
            return rows if out is None else out.copy_(rows)

        # in-place Tensor methods: bernoulli_(p), uniform_(a, b), normal_(mean, std)
        t = args[0]
        if t.dim() == 0 or (func is Tensor.bernoulli_ and isinstance(args[1] if len(args) > 1 else 0.5, Tensor)):
            return self._pass(func, args, kwargs, "a scalar or tensor-probability draw")
        kind = self._kind(t.shape[0])
        if kind is None:
            return self._pass(func, args, kwargs, f"no kind of rows has {t.shape[0]} rows here")

        def fill(n: int) -> Tensor:
            return func(t.new_empty((n, *t.shape[1:])), *args[1:], **kwargs)

        full = self._draw(func.__name__, kind, fill)
        return t.copy_(self._rows(kind, full))


@contextlib.contextmanager
def rank_noise(model: torch.nn.Module, counts: Mapping[str, Tensor]) -> Iterator[GlobalBatchNoise]:
    """A :class:`~sigmma_sc.train.GlobalBatchNoise` for ``model``, with the edge samplers' draws named explicitly.

    Each edge sampler's Gumbel noise is drawn as rows of ``cand_{scale}``; a shard without candidates at a scale
    (the sampler returns before drawing) still consumes the global draw, so the random streams stay aligned.
    The hooks are removed on exit.
    """
    noise = GlobalBatchNoise({k: counts[k] for k in ("cells", "cand_meso", "cand_macro") if k in counts})
    handles = []
    samplers = dict(getattr(getattr(model, "st_encoder", None), "samplers", None) or {})
    for scale, sampler in samplers.items():
        kind = f"cand_{scale}"

        def pre(module: torch.nn.Module, args: tuple, kind: str = kind) -> None:
            if not (module.training and noise.in_chunk):
                return
            h, edge_index = args[0], args[1]
            if edge_index.shape[1] == 0:
                noise.skipped_rand(kind, torch.float32, h.device)  # what the sampler would draw for the batch
            noise.push(kind)

        def post(module: torch.nn.Module, args: tuple, out: Any) -> None:
            if module.training and noise.in_chunk:
                noise.pop()

        handles += [sampler.register_forward_pre_hook(pre), sampler.register_forward_hook(post)]
    try:
        yield noise
    finally:
        for h in handles:
            h.remove()


def batch_embedder(
    model: Any,
    data: Any,
    idx: Tensor,
    amp: Callable[[], contextlib.AbstractContextManager],
    noise: GlobalBatchNoise,
) -> Callable[[Tensor], dict[str, Tensor]]:
    """``embed(pos)``: embeddings of the positions ``pos`` of the batch ``idx`` (a shard, a micro-batch).

    Every random draw of the forward pass is taken as their rows of the whole batch's draw
    (:class:`~sigmma_sc.train.GlobalBatchNoise`); ``noise.start_step(idx)`` begins the step.
    """

    def embed(pos: Tensor) -> dict[str, Tensor]:
        start = int(pos[0]) if pos.numel() else 0
        noise.start_chunk(start, start + pos.numel())
        try:
            with amp(), noise:
                return model.embed_batch(data.select(idx[pos]))
        finally:
            noise.end_chunk()

    return embed


