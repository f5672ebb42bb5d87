"""What is measured: hooks that record per-layer statistics of one training pass, on the device.

A `Recorder` watches the layers worth watching (linear, normalisation, embedding and activation modules)
through one process-wide module forward hook that hands each call to that layer's own hook, and, through a
`TorchFunctionMode`, activations called as functions inside a `forward` (`torch.tanh(x)`, `F.relu(x)`). Once a
pass has shown that the layers are called only inside the model's own call, the kernel's `Watch` stands in for
the process-wide hook: for the length of that call each watched module gets an instance `forward` that hands
its calls on, so that torch's module calls (the model's own aside) keep their fast path.
A hook only keeps the layer's output (a copy where something has been seen changing it in place) and,
in backward, the gradient arriving at it; what a record is (its name, kind, shape, input) is worked out
once, and a pass that repeats the last one's layers takes it from the last pass's entries. `collect()`
then reduces everything (moments, saturation, dead units, histograms) and moves it to the host in one
transfer. On the CPU the compiled kernel (`_kernel.c`; its C++ lender `_autograd.cpp` hooks the gradients and
reads tensors' addresses through torch's C++ API) does that in one call for the whole pass (the
weights' copy for the next update included), one pass per tensor, and replays a repeated pass's records in
the forward hook without the interpreter; elsewhere the small outputs of the
same kind and shape are stacked and each stack reduced in a few torch ops, so the cost hardly grows with
depth. On either path large layers (STACK_LIMIT values and more) are reduced one by one, as they come, and
both write the same numbers at the same places of one float32 buffer. Reading them into `PassStats` waits until
somebody asks (`RawPass.stats()`).
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import math
import operator
import sys
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from nnvitals.numbers import DEAD_CUT, SATURATION_CUT

KERNEL_VERSION = 15  # the item layout below and the kernel's types; a kernel built from another version is not used
try:  # the compiled CPU kernel (src/nnvitals/_kernel.c); where it was not built, torch ops do all the work
    from nnvitals import _kernel

    if getattr(_kernel, "VERSION", None) != KERNEL_VERSION:
        _kernel = None
except ImportError:  # pragma: no cover - depends on the install
    _kernel = None
try:  # torch's C++ API for gradient hooks and more (src/nnvitals/_autograd.cpp); where it was not built, its Python API
    from nnvitals._autograd import keep_grad as _keep_grad
    from nnvitals._autograd import state as _params_state
except ImportError:  # pragma: no cover - depends on the install
    _keep_grad = _params_state = None

HIST_BINS = 50
# Fixed histogram ranges per kind of layer output, so histograms of different steps (and, later, of
# different processes) can be added bin by bin. Values outside land in the under/overflow counts.
HIST_RANGE = {"tanh": (-1.0, 1.0), "sigmoid": (0.0, 1.0)}
DEFAULT_HIST_RANGE = (-5.0, 5.0)
# Gradient histograms are taken in units of the layer's own gradient std, over +-GRAD_HIST_SIGMAS.
GRAD_HIST_SIGMAS = 4.0
# The saturation map keeps at most this many rows (examples) and columns (units) per layer.
MAP_ROWS, MAP_UNITS = 64, 256
# Above this many buffered output elements, reduce what is buffered before going on (bounds memory).
FLUSH_ELEMENTS = 1 << 24
# Layers with at least this many values are reduced one by one, without stacking them (a copy) with others
# of their shape, and an output that autograd does not protect is reduced as it comes rather than copied:
# for large tensors the copy costs more than the few ops it saves.
STACK_LIMIT = 1 << 16

_ACTIVATION_MODULES: dict[type[nn.Module], str] = {
    nn.Tanh: "tanh", nn.Hardtanh: "tanh", nn.Sigmoid: "sigmoid", nn.Hardsigmoid: "sigmoid",
    nn.ReLU: "relu", nn.ReLU6: "relu", nn.LeakyReLU: "leaky_relu", nn.PReLU: "leaky_relu",
    nn.ELU: "elu", nn.SELU: "selu", nn.CELU: "elu", nn.GELU: "gelu", nn.SiLU: "silu", nn.Mish: "silu",
    nn.Softplus: "softplus",
}
_ACTIVATION_FUNCTIONS: dict[Any, str] = {
    torch.tanh: "tanh", torch.Tensor.tanh: "tanh", torch.sigmoid: "sigmoid", torch.Tensor.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid", F.hardtanh: "tanh", torch.relu: "relu", torch.Tensor.relu: "relu", F.relu: "relu",
    F.relu6: "relu", F.leaky_relu: "leaky_relu", F.elu: "elu", F.selu: "selu", F.gelu: "gelu",
    F.silu: "silu", F.mish: "silu", F.softplus: "softplus",
}
_LINEAR = (nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
           nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_NORM = (*_BATCHNORM, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
         nn.InstanceNorm3d, nn.LocalResponseNorm, nn.RMSNorm)
_CHANNEL_FIRST = (nn.Conv1d, nn.ConvTranspose1d, nn.BatchNorm1d, nn.InstanceNorm1d)
BOUNDED = ("tanh", "sigmoid")
RELU_LIKE = ("relu",)
ACTIVATIONS = frozenset(_ACTIVATION_MODULES.values())


def module_kind(module: nn.Module) -> str | None:
    """The kind of layer a module is, or None when it is not one the doctor watches."""
    for t, kind in _ACTIVATION_MODULES.items():
        if type(module) is t:
            return kind
    if isinstance(module, _LINEAR):
        return "linear"
    if isinstance(module, _NORM):
        return "norm"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, _BATCHNORM)


@dataclass
class LayerStats:
    """Statistics of one layer's output (and the gradient arriving at it) for one pass."""

    name: str
    kind: str  # tanh, sigmoid, relu, gelu, ..., linear, norm, embedding
    op: str  # the module class ("Linear") or the function ("torch.tanh")
    site: str | None  # file:line of a function call, None for modules
    shape: tuple[int, ...]
    units: int
    mean: float
    std: float
    nonfinite: bool  # NaN or Inf among the outputs
    saturated: float | None  # share of outputs beyond +-0.97 (tanh-like), None when not bounded
    inactive: float | None  # share of outputs <= 0 (ReLU), None otherwise
    dead: int | None  # units saturated (|t| > 0.99) or inactive on every example of the batch
    hist: list[float]  # activations: HIST_BINS counts over hist_range (empty for other layers)
    hist_range: tuple[float, float]
    hist_outside: tuple[float, float]  # counts below and above the range
    grad_std: float | None = None
    grad_mean: float | None = None
    grad_nonfinite: bool = False
    grad_hist: list[float] | None = None  # over +-GRAD_HIST_SIGMAS * grad_std
    input_from: str | None = None  # the watched layer whose output this layer consumed
    feeding: list[str] = field(default_factory=list)  # parameters feeding this layer's input
    sat_map: np.ndarray | None = field(default=None, repr=False)  # rows x units, True where |t| > 0.99

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "sat_map"}
        d["shape"] = list(self.shape)
        d["hist_range"] = list(self.hist_range)
        d["hist_outside"] = list(self.hist_outside)
        return d


@dataclass
class ParamStats:
    """One parameter tensor: its spread, its gradient's, and (when known) the update's."""

    name: str
    shape: tuple[int, ...]
    module_kind: str | None
    std: float | None  # measured for weights (2-D and more) only
    grad_std: float | None
    nonfinite: bool
    grad_nonfinite: bool
    update_ratio: float | None = None  # log10(std(delta w) / std(w)) for this step; -inf: no change

    @property
    def grad_to_weight(self) -> float | None:
        if self.grad_std is None or not self.std or not math.isfinite(self.std):
            return None
        return self.grad_std / self.std

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["shape"] = list(self.shape)
        d["grad_to_weight"] = self.grad_to_weight
        return d


@dataclass
class ModeEvent:
    """A module found in the wrong train/eval mode for what the pass was doing."""

    name: str
    op: str
    training: bool  # the module's mode
    grad_enabled: bool  # whether the pass was recording gradients


@dataclass
class PassStats:
    """Everything a Recorder measured in one pass."""

    layers: list[LayerStats]
    params: list[ParamStats]
    output_name: str | None = None  # the watched layer that produced the model's output, if any
    output_shape: tuple[int, ...] | None = None
    output_params: list[tuple[str, str]] = field(default_factory=list)  # (param, "scale" | "zero")
    mode_events: list[ModeEvent] = field(default_factory=list)
    batchnorm_batches: dict[str, int] = field(default_factory=dict)  # BN layer -> examples per batch
    bias_before_norm: list[tuple[str, str]] = field(default_factory=list)  # (linear with bias, BN)
    first_nonfinite_forward: str | None = None
    first_nonfinite_backward: tuple[str, str | None] | None = None  # (output of, consumed by)
    inputs_nonfinite: bool = False

    def stats(self) -> PassStats:
        return self

    def drop_maps(self) -> None:
        for lay in self.layers:
            lay.sat_map = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, numbers, strings), e.g. for a checkpoint; saturation maps are left out."""
        d = dataclasses.asdict(self)
        d["layers"] = [lay.to_dict() for lay in self.layers]
        d["params"] = [p.to_dict() for p in self.params]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PassStats:
        def tuples(value: Any) -> Any:
            return tuple(value) if isinstance(value, list) else value

        layers = [LayerStats(**{k: tuples(v) if k in ("shape", "hist_range", "hist_outside") else v
                                for k, v in lay.items()}) for lay in d["layers"]]
        params = [ParamStats(**{k: tuples(v) if k == "shape" else v for k, v in p.items() if k != "grad_to_weight"})
                  for p in d["params"]]
        rest = {k: v for k, v in d.items() if k not in ("layers", "params")}
        rest["output_shape"] = tuples(rest["output_shape"])
        rest["output_params"] = [tuple(x) for x in rest["output_params"]]
        rest["bias_before_norm"] = [tuple(x) for x in rest["bias_before_norm"]]
        rest["first_nonfinite_backward"] = tuples(rest["first_nonfinite_backward"])
        rest["mode_events"] = [ModeEvent(**ev) for ev in rest["mode_events"]]
        return cls(layers, params, **rest)


@dataclass
class _Spec:
    """What is known of a watched output before its statistics are computed."""

    name: str
    kind: str
    op: str
    site: str | None
    shape: tuple[int, ...]
    unit_dim: int
    input_from: str | None
    feeding: list[str]
    base: str  # the name before a "#2" told apart a second call
    # Whether the output must be copied when recorded: learned on the first pass, which copies it and then sees
    # whether anything changed it in place before it was reduced (an in-place ReLU after a Linear does).
    copy: bool = True

    def __post_init__(self) -> None:
        self.numel = math.prod(self.shape)
        # an activation's output is saved for its own backward, so autograd already forbids changing it in place
        self.protected = self.kind in ACTIVATIONS


@dataclass
class _Trainable:
    """The trainable parameters as a pass sees them: worked out once, kept while they stay the same."""

    ps: list[tuple[str, torch.Tensor, str | None]]  # (name, parameter, kind of the module holding it)
    weights: list[int]  # indices into `ps` of the weights, parameters of 2 dimensions or more
    on_cpu: bool  # all in host memory, where the kernel (when built) can take them
    layouts: dict[str, _Layout] = field(default_factory=dict)  # the kernel's, built when first needed
    _block: torch.Tensor | None = None

    def __post_init__(self) -> None:
        weights = set(self.weights)
        self.described = [(n, tuple(p.shape), kind) for n, p, kind in self.ps]  # what RawPass needs of them
        self.params = [p for _, p, _ in self.ps]
        self.w = [self.ps[i][1] for i in self.weights]  # the weights
        self.rest = [p for i, (_, p, _) in enumerate(self.ps) if i not in weights]  # biases, gains

    @property
    def by_kernel(self) -> bool:
        """Whether the kernel reduces them: it is built and they are in host memory."""
        return self.on_cpu and _kernel is not None

    def params_layout(self, updates: bool, copy: bool = False) -> _Layout:
        """The kernel's layout for the parameters' statistics, reading `tensors()`. `updates`: also the weights'
        updates, measured against `copy_block()` (given to `run`), which `copy` then overwrites with the weights
        as they are now, in the same pass."""
        return self.layout("params+updates+copy" if updates and copy else "params+updates" if updates else "params")

    def tensors(self) -> list[torch.Tensor | None]:
        """What the parameters' layouts read, in their order: the weights, their gradients, the others, theirs."""
        return [*self.w, *map(_GRAD, self.w), *self.rest, *map(_GRAD, self.rest)]

    def copy_block(self) -> torch.Tensor:
        """The one block the kernel copies the weights into (see `layout`), made when first needed."""
        if self._block is None:
            self._block = torch.empty(sum(t.numel() for t in self.w))
        return self._block

    def layout(self, what: str) -> _Layout:
        """The kernel's items for the weights' copy into `copy_block()` ("copy") or the parameters' statistics
        ("params", "params+updates", "params+updates+copy"), in the slots `_reduce_params` writes with torch
        ops: the sums of what is measured of the weights (themselves, their gradients and their updates), then
        the sums of squares of that and of the other parameters and their gradients."""
        if what not in self.layouts:
            w_sizes, rest_sizes = [t.numel() for t in self.w], [t.numel() for t in self.rest]
            k = len(w_sizes)
            starts = np.cumsum([0, *w_sizes[:-1]], dtype=np.int64) * 4  # each weight's bytes in the copy
            layout = _Layout()
            if what == "copy":  # no slots: each weight to its place in the block given to `run`
                for n in w_sizes:
                    layout.add(n, mode="copy")
                layout.y_offsets, layout.y_rows = starts, np.ones(k, np.int64)
            else:
                updates = what != "params"
                measured = (3 if updates else 2) * k
                for j, n in enumerate(w_sizes):  # a weight, with its update measured in the same pass
                    layout.add(n, mode=what.removeprefix("params+") if updates else "other", o_sum=j,
                               o_sq=measured + j, o_usum=2 * k + j if updates else -1,
                               o_usq=measured + 2 * k + j if updates else -1)
                for j, n in enumerate(w_sizes):  # its gradient
                    layout.add(n, o_sum=k + j, o_sq=measured + k + j)
                for j, n in enumerate(rest_sizes * 2):  # the others and their gradients: only whether finite
                    layout.add(n, o_sq=2 * measured + j)
                layout.size = 2 * measured + 2 * len(rest_sizes)
                if updates:
                    layout.y_offsets = np.concatenate([starts, np.zeros(k + 2 * len(rest_sizes), np.int64)])
                    layout.y_rows = (np.arange(len(layout.rows)) < k).astype(np.int64)
            self.layouts[what] = layout
        return self.layouts[what]


@dataclass
class Snapshot:
    """The weights as they were before an optimizer step (`Recorder.snapshot_params`), to measure the update
    against: one block the kernel copied them into, or (off the CPU) one copy per weight."""

    trainable: _Trainable  # the parameters it was taken of: a different set at collect time means no update
    block: torch.Tensor | None = None
    copies: list[torch.Tensor] | None = None


_DISTRIBUTED = torch.distributed.is_available()


def world_size() -> int:
    """How many processes train together (torch.distributed), 1 when alone."""
    dist = torch.distributed
    return dist.get_world_size() if _DISTRIBUTED and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True outside torch.distributed and on rank 0 inside it: the one process that writes files."""
    return world_size() == 1 or torch.distributed.get_rank() == 0


def _grad_or_zeros(p: torch.Tensor) -> torch.Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)


def _groups(specs: Sequence[_Spec]) -> list[tuple[str, list[int]]]:
    """Indices of the outputs that can be stacked and reduced together: same kind, same shape."""
    groups: dict[tuple[str, tuple[int, ...], int], list[int]] = {}
    for i, s in enumerate(specs):
        kind = s.kind if s.kind in BOUNDED or s.kind in RELU_LIKE else "other"
        shape = (s.shape[s.unit_dim], s.numel) if kind != "other" else (s.numel,)
        groups.setdefault((kind, shape, i if s.numel >= STACK_LIMIT else -1), []).append(i)
    return [(kind, idx) for (kind, _, _), idx in groups.items()]


def _stacked(tensors: list[torch.Tensor], unit_dim: int | None = None) -> torch.Tensor:
    """k tensors of as many values as one (k, values) float tensor or, given the unit axis, as (k, examples,
    units): one copy (a view for k = 1). Layout ops (each costs about as much as a small reduction) only
    where the tensors need them."""
    if unit_dim is not None and unit_dim != tensors[0].dim() - 1:
        tensors = [t.movedim(unit_dim, -1) for t in tensors]
    shape = tensors[0].shape
    if any(t.shape != shape for t in tensors):
        tensors = [t.reshape(-1) if unit_dim is None else t.reshape(-1, t.shape[-1]) for t in tensors]
    x = torch.stack(tensors) if len(tensors) > 1 else tensors[0].unsqueeze(0)
    x = x.reshape(len(tensors), -1) if unit_dim is None else x.reshape(len(tensors), -1, x.shape[-1])
    return x if x.dtype == torch.float32 else x.float()


def _sums(flat: torch.Tensor) -> list[torch.Tensor]:
    """Per row of (k, n): the sum and the sum of squares (a NaN or Inf anywhere shows in both)."""
    return [flat.sum(1), torch.linalg.vector_norm(flat, dim=1).square_()]


def _histograms(x: torch.Tensor, lo: float, hi: float, bounded: bool, scale: torch.Tensor | None = None
                ) -> torch.Tensor:
    """HIST_BINS + 2 counts per row of x (k, ...) over [lo, hi): the first and the last are under- and
    overflow. Each value's bin is computed, then counted with one scatter_add over all rows. `bounded`:
    the values cannot exceed `hi`, which then belongs to the last bin (a saturated tanh sits exactly at
    1.0). `scale` (k, 1): values are divided by it first (gradients, in units of their own std). NaN
    counts as underflow."""
    k = x.shape[0]
    width = HIST_BINS / (hi - lo)
    u = x.reshape(k, -1)
    u = u * (width / scale) if scale is not None else u * width
    u = u.add_(1 - lo * width).nan_to_num_(0.0).clamp_(0, HIST_BINS if bounded else HIST_BINS + 1).long()
    counts = torch.zeros(k, HIST_BINS + 2, device=x.device)
    return counts.scatter_add_(1, u, torch.ones((), device=x.device).expand(u.shape)).view(-1)


def _reduce_group(kind: str, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Statistics of k stacked outputs of one kind: sums and sums of squares, and for activations the
    saturated (or inactive) counts, histograms and per-unit "alive" flags (1 where some example of the
    batch is neither saturated nor inactive: flags of several processes add up to the same verdict);
    plus, for tanh-like layers, the saturation-map cells (left on the device: they are read only when a
    picture is drawn)."""
    k = x.shape[0]
    parts = _sums(x.reshape(k, -1))
    if kind == "other":
        return parts, None
    lo, hi = HIST_RANGE.get(kind, DEFAULT_HIST_RANGE)
    if kind == "relu":
        flagged = x <= 0
        alive = x.amax(1) > 0  # x is (k, examples, units)
        cells = None
    else:
        t = x.abs() if kind == "tanh" else (2 * x - 1).abs_()  # sigmoid s -> 2s - 1 on tanh's scale
        flagged = t > SATURATION_CUT
        alive = ~(t.amin(1) > DEAD_CUT)  # written so that NaN counts as alive, as it cannot be dead
        cells = t[:, :MAP_ROWS, :MAP_UNITS] > DEAD_CUT
    # float32 throughout: counts stay exact below 2**24, and concatenating one dtype is cheap
    parts += [flagged.reshape(k, -1).sum(1).float(), _histograms(x, lo, hi, kind in BOUNDED), alive.reshape(-1).float()]
    return parts, cells


# One tensor's share of the kernel's work (item_t in _kernel.c): where it is, its layout, what to measure of it
# and at which float32 slots of the block its numbers go (-1: not wanted).
_ITEM = np.dtype([(f, np.int64) for f in ("x", "y", "outer", "units", "inner", "mode", "o_sum", "o_sq", "o_flag",
                                          "o_hist", "o_alive", "cells", "map_rows", "map_units", "numel", "o_usum",
                                          "o_usq")]
                 + [("lo", np.float64), ("hi", np.float64)])
# A saturation map as the kernel left it: (its copy of all maps' cells, first cell, rows, units), cut out of
# it only when read (RawPass.stats).
MapCells = tuple[np.ndarray, int, int, int]
_IS_CPU = operator.attrgetter("is_cpu")
_GRAD = operator.attrgetter("grad")
_VERSION = operator.attrgetter("_version")
_PARAM_STATE = operator.attrgetter("requires_grad", "shape", "is_cpu")  # what decides the trainable set
_MODE = {"other": 0, "tanh": 1, "sigmoid": 2, "relu": 3, "grad": 4, "copy": 5, "updates": 6, "updates+copy": 7}


class _Layout:
    """Where each tensor's numbers go in a block the kernel fills, worked out once per plan (only the addresses
    change from pass to pass). The slots are those the torch-op reductions write, in their order. Rows are
    added with `add`, in the order the tensors will be given to `run`."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.size = 0  # float32 slots in the block
        self.maps: list[tuple[int, int, int, int]] = []  # (item, first cell, rows, units) of saturation maps
        self.cells = 0  # saturation-map cells in all
        self._items: np.ndarray | None = None
        self._y: torch.Tensor | None = None  # the y block the items point into (the Trainable's, kept as long as it)
        # rows whose `y` lies in one block given to `run` (1 in y_rows), at these byte offsets of it
        self.y_rows: np.ndarray | None = None
        self.y_offsets: np.ndarray | None = None

    def add(self, count: int, *, mode: str = "other", o_sum: int = -1, o_sq: int = -1,
            shape: tuple[int, int, int] | None = None, o_flag: int = -1, o_hist: int = -1, o_alive: int = -1,
            o_usum: int = -1, o_usq: int = -1,
            hist_range: tuple[float, float] = (0.0, 1.0), saturation_map: bool = False) -> None:
        outer, units, inner = shape or (count, 1, 1)
        rows = units_kept = 0
        cells = -1
        if saturation_map:
            rows, units_kept = min(outer * inner, MAP_ROWS), min(units, MAP_UNITS)
            self.maps.append((len(self.rows), self.cells, rows, units_kept))
            cells = self.cells
            self.cells += rows * units_kept
        self.rows.append(dict(outer=outer, units=units, inner=inner, mode=_MODE[mode], o_sum=o_sum, o_sq=o_sq,
                              o_flag=o_flag, o_hist=o_hist, o_alive=o_alive, o_usum=o_usum, o_usq=o_usq,
                              map_rows=rows, map_units=units_kept,
                              numel=count, lo=hist_range[0], hi=hist_range[1], cells=cells))

    @staticmethod
    def joined(layouts: Sequence[_Layout]) -> _Layout:
        """One layout doing the work of several in one call: each one's rows, slots and map cells after the
        previous ones'."""
        joined = _Layout()
        y_rows, y_offsets = [], []
        for layout in layouts:
            shift, first = joined.size, len(joined.rows)
            for row in layout.rows:
                row = dict(row)
                for key in ("o_sum", "o_sq", "o_flag", "o_hist", "o_alive", "o_usum", "o_usq"):
                    row[key] += shift if row[key] >= 0 else 0
                row["cells"] += joined.cells if row["cells"] >= 0 else 0
                joined.rows.append(row)
            joined.maps += [(first + item, joined.cells + start, r, u) for item, start, r, u in layout.maps]
            joined.cells += layout.cells
            joined.size += layout.size
            none = np.zeros(len(layout.rows), np.int64)
            y_rows.append(layout.y_rows if layout.y_rows is not None else none)
            y_offsets.append(layout.y_offsets if layout.y_offsets is not None else none)
        if any(layout.y_rows is not None for layout in layouts):
            joined.y_rows, joined.y_offsets = np.concatenate(y_rows), np.concatenate(y_offsets)
        return joined

    def run(self, xs: Sequence[torch.Tensor | None], y_block: torch.Tensor | None = None
            ) -> tuple[np.ndarray, list[MapCells]]:
        """The block for these tensors (one per row, in order; None: zeros), minus, for the rows marked in
        `y_rows`, the values at `y_offsets` of `y_block` (a float32 block), which copy rows write to instead;
        plus the saturation maps the rows asked for, as places in one copy of their cells."""
        if self._items is None:
            self._items = np.zeros(len(self.rows), _ITEM)
            for key in self.rows[0] if self.rows else ():
                self._items[key] = [row[key] for row in self.rows]
            self._numel = [row["numel"] for row in self.rows]
            self._cells = np.empty(self.cells, dtype=np.bool_)
            self._at = self._items.ctypes.data, self._cells.ctypes.data
        items = self._items  # one pass at a time per layout: only the addresses change
        keep: list[torch.Tensor] = []  # float32 copies made here live until the kernel is done with them
        assert _kernel is not None
        if _kernel.addresses(self._at[0], len(items), xs if isinstance(xs, list) else list(xs), torch.float32) != -1:
            items["x"] = self._addresses(xs, keep)  # some tensor is not float32 and contiguous: converted here
        if self.y_rows is not None and self.y_offsets is not None \
                and (y_block is None or y_block is not self._y):  # (usually the same block)
            ends = self.y_offsets + self.y_rows * 4 * items["numel"]
            if y_block is None or not (y_block.dtype == torch.float32 and y_block.is_contiguous() and y_block.is_cpu
                                       and int(ends.max(initial=0)) <= 4 * y_block.numel()):
                raise RuntimeError("nnvitals: the weights' copy does not match the weights")
            items["y"] = self.y_rows * y_block.data_ptr() + self.y_offsets
            self._y = y_block
        # (numpy: cheaper to make than a tensor, and the host array as is; none where nothing is measured)
        out = np.empty(self.size, np.float32) if self.size else _NOTHING
        _kernel.reduce(self._at[0], len(items), out, self._at[1], self.cells, HIST_BINS, SATURATION_CUT, DEAD_CUT)
        if not self.maps:
            return out, []
        cells = self._cells.copy()
        return out, [(cells, start, r, u) for _, start, r, u in self.maps]

    def _addresses(self, tensors: Sequence[torch.Tensor | None], keep: list[torch.Tensor]) -> list[int]:
        """Each tensor's address (0 for None), where needed of a float32, contiguous copy kept in `keep`."""
        found = []
        for t, numel in zip(tensors, self._numel, strict=True):
            if t is None:
                found.append(0)
                continue
            if t.numel() != numel:  # the kernel trusts these sizes: never let it read past a tensor
                raise RuntimeError(f"nnvitals: expected a tensor of {numel} values, got shape {tuple(t.shape)}")
            if t.dtype != torch.float32 or not t.is_contiguous():
                t = t.float().contiguous()
                keep.append(t)
            found.append(t.data_ptr())
        return found


_NOTHING = np.empty(0, np.float32)  # the block of a layout that only copies


def _as_recorded(rows: list[tuple[int, torch.Tensor, int, bool]]) -> bool:
    """Whether every row (place, output, version then, copied) was kept without a copy and its output is still at
    that version (by the kernel where it is built)."""
    check = getattr(_kernel, "as_recorded", None)
    if check is not None:
        return bool(check(rows))
    return all(not copied and out._version == version for _, out, version, copied in rows)


def _grad_cell(out: torch.Tensor) -> list[torch.Tensor]:
    """A list autograd will append the output's gradient to, as the output's grad_fn receives it (retain_grad
    would keep a copy): a hook registered the way Tensor.register_hook does, without making its handle (the
    kernel's Replay does the same)."""
    cell: list[torch.Tensor] = []
    if _keep_grad is not None and _keep_grad(out, cell):  # (a C++ hook, where it was built)
        return cell
    if type(out) is torch.Tensor and out._backward_hooks is None and out.grad_fn is not None:
        # (ordered, with a key no handle has: register_hook may add to it later)
        out._backward_hooks = collections.OrderedDict(nnvitals=cell.append)
        out.grad_fn._register_hook_dict(out)
    else:
        out.register_hook(cell.append)
    return cell


def _take_grads(cells: list[list[torch.Tensor]], outs: list[torch.Tensor], versions: list[int]
                ) -> list[torch.Tensor | None] | None:
    """The gradients autograd handed these outputs, each taken from its cell (emptied), when each came once and no
    output has changed since it was recorded; else None, nothing taken (by the kernel where it is built)."""
    take = getattr(_kernel, "take_grads", None)
    if take is not None:
        return take(cells, outs, versions)
    if any(len(cell) != 1 for cell in cells) or list(map(_VERSION, outs)) != versions:
        return None
    return [cell.pop() for cell in cells]


def _on_cpu(tensors: Sequence[torch.Tensor | None]) -> bool:
    """Whether the kernel can take these: it is built and they are in host memory."""
    if _kernel is None:
        return False
    try:
        return all(map(_IS_CPU, tensors))
    except AttributeError:  # a None among them (a missing gradient)
        return all(t is None or t.is_cpu for t in tensors)


def _output_layout(specs: Sequence[_Spec], plan: list[tuple[str, list[int]]]) -> tuple[_Layout, list[int]]:
    """The kernel's items for a `_reduce_outputs` block (same slots as _reduce_group's), and which output each
    item reads."""
    layout, order, cursor, width = _Layout(), [], 0, HIST_BINS + 2
    for kind, idx in plan:
        k = len(idx)
        for j, i in enumerate(idx):
            s = specs[i]
            n = s.numel
            if kind == "other":
                layout.add(n, o_sum=cursor + j, o_sq=cursor + k + j)
            else:
                units = s.shape[s.unit_dim]
                layout.add(n, mode=kind, o_sum=cursor + j, o_sq=cursor + k + j,
                           shape=(math.prod(s.shape[:s.unit_dim]), units, math.prod(s.shape[s.unit_dim + 1:])),
                           o_flag=cursor + 2 * k + j, o_hist=cursor + 3 * k + width * j,
                           o_alive=cursor + (3 + width) * k + units * j,
                           hist_range=HIST_RANGE.get(kind, DEFAULT_HIST_RANGE), saturation_map=kind in BOUNDED)
            order.append(i)
        cursor += 2 * k if kind == "other" else (3 + width + specs[idx[0]].shape[specs[idx[0]].unit_dim]) * k
    layout.size = cursor
    return layout, order


def _grad_layout(specs: Sequence[_Spec], plan: list[tuple[str, list[int]]], blocks: dict[int, int]
                 ) -> tuple[_Layout, list[int], dict[int, int]]:
    """The kernel's items for a `_reduce_grads` block (same slots), which gradient each item reads, and where
    the blocks already reduced in backward go (`blocks`: their sizes by gradient index)."""
    layout, order, starts, cursor, width = _Layout(), [], {}, 0, HIST_BINS + 2
    for kind, idx in plan:
        if idx[0] in blocks:  # a group of one, already reduced: its slots stay free for it
            starts[idx[0]] = cursor
            cursor += blocks[idx[0]]
            continue
        k = len(idx)
        for j, i in enumerate(idx):
            n = specs[i].numel
            if kind == "other":
                layout.add(n, o_sum=cursor + j, o_sq=cursor + k + j)
            else:
                layout.add(n, mode="grad", o_sum=cursor + j, o_sq=cursor + k + j,
                           o_hist=cursor + 2 * k + width * j, hist_range=(-GRAD_HIST_SIGMAS, GRAD_HIST_SIGMAS))
            order.append(i)
        cursor += 2 * k if kind == "other" else (2 + width) * k
    layout.size = cursor
    return layout, order, starts


_TRANSPARENT = ("AddBackward", "SubBackward", "MmBackward", "AddmmBackward", "BmmBackward",
                "TBackward", "TransposeBackward", "PermuteBackward", "ViewBackward",
                "ReshapeAliasBackward", "UnsafeViewBackward", "ExpandBackward", "SqueezeBackward",
                "UnsqueezeBackward", "CloneBackward", "ToCopyBackward", "ConvolutionBackward",
                "AddcmulBackward", "LinearBackward")


def feeding_parameters(t: torch.Tensor, names: dict[int, str]) -> list[tuple[str, str]]:
    """The parameters an output depends on through affine ops only (no non-linearity, no norm input).

    Walks the autograd graph back from `t` through additions, matrix products, convolutions and
    reshapes; collects the leaf parameters met on the way, each marked "zero" when it is added (a
    bias) and "scale" when it multiplies (a weight or a normalisation gain).
    """
    found: list[tuple[str, str]] = []
    seen: set[int] = set()
    start = t.grad_fn
    stack = [start] if start is not None else []
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        kind = type(node).__name__
        transparent = kind.startswith(_TRANSPARENT)
        norm = kind.startswith(("NativeBatchNormBackward", "NativeLayerNormBackward", "CudnnBatchNormBackward"))
        if not (transparent or norm or node is start):
            continue
        for i, (child, _) in enumerate(node.next_functions):
            if child is None:
                continue
            var = getattr(child, "variable", None)
            if var is None:
                if transparent:
                    stack.append(child)
                continue
            name = names.get(id(var))
            if name is None:
                continue
            is_bias = kind.startswith(("AddBackward", "SubBackward")) or (
                kind.startswith(("AddmmBackward", "ConvolutionBackward")) and var.dim() == 1) or (
                norm and i == 2)
            found.append((name, "zero" if is_bias else "scale"))
    return found


def _unit_dim(module: nn.Module | None, out: torch.Tensor, producer_module: nn.Module | None) -> int:
    if out.dim() <= 1:
        return 0
    if out.dim() >= 4:
        return 1
    if out.dim() == 3 and (isinstance(module, _CHANNEL_FIRST) or isinstance(producer_module, _CHANNEL_FIRST)):
        return 1
    return out.dim() - 1


_TORCH_DIR = str(Path(torch.__file__).parent)


def _call_site() -> str | None:
    """file:line of the first frame outside torch and this module: where an activation was called."""
    frame: Any = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith(_TORCH_DIR) and filename != __file__:
            return f"{Path(filename).name}:{frame.f_lineno}"
        frame = frame.f_back
    return None


def _function_name(func: Any) -> str:
    """How a user would write the call: torch.tanh, F.relu, Tensor.tanh."""
    module = getattr(func, "__module__", None) or ""
    if module.endswith("functional") or module == "torch._C._nn":
        return f"F.{func.__name__}"
    if "TensorBase" in getattr(func, "__qualname__", ""):
        return f"Tensor.{func.__name__}"
    return f"torch.{func.__name__}"


class _FunctionWatcher(TorchFunctionMode):
    """Sees activation functions called inside forward and reports them to the recorder."""

    def __init__(self, recorder: Recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        kind = _ACTIVATION_FUNCTIONS.get(func)
        if kind is not None and isinstance(out, torch.Tensor) and args:
            self.recorder._on_function(func, kind, args[0], out)
        return out


class HookSet:
    """Hooks registered with torch once, then put into and taken out of torch's hook dicts under the ids they
    were registered with: a Monitor attaches for every sample, and registering anew (a handle, weak references)
    costs about 4 µs a hook where a dict entry costs a tenth of that. Entries go back in at the end of each dict,
    where registering them again would put them."""

    def __init__(self, handles: Sequence[RemovableHandle]):
        self._entries = [(d, h.id, d[h.id]) for h in handles
                         for d in (h.hooks_dict_ref(), *(ref() for ref in h.extra_dict_ref))
                         if d is not None and h.id in d]

    def insert(self) -> None:
        for d, key, value in self._entries:
            d[key] = value

    def remove(self) -> None:
        for d, key, _ in self._entries:
            d.pop(key, None)


@dataclass
class _Steady:
    """What `Recorder._collect_steady` needs of the pass before: its records (the next pass's template), how many,
    its parameters and whether their updates and copy were measured, and its worked-out layout."""

    entries: list[Any]
    count: int
    trainable: _Trainable
    updates: bool
    copy: bool
    layout: _Layout
    out_order: list[int]
    grad_order: list[int]
    names: list[str]
    plan: list[tuple[str, list[int]]]


class Recorder:
    """Hooks on one model that measure its layers during a pass; `collect()` returns a `RawPass`.

    functions: also watch activation functions called inside forward (costs a little on every op).
    trace_all: also check every module's output for NaN/Inf, to name the module that produced one.
    """

    def __init__(self, model: nn.Module, *, functions: bool = True, trace_all: bool = False):
        self.model = model
        self.functions = functions
        self.trace_all = trace_all
        self._params = list(model.named_parameters())
        self._param_list = [p for _, p in self._params]
        self.param_names = {id(p): n for n, p in self._params}
        self.module_names = {id(m): n for n, m in model.named_modules()}
        self._param_kinds = {f"{mn}.{pn}" if mn else pn: module_kind(m)
                             for mn, m in model.named_modules() for pn, _ in m.named_parameters(recurse=False)}
        self.found_functions = False
        self._hooks_on: HookSet | None = None  # the hooks attached now
        self.attached = False  # whether they are in place (an attribute: a Monitor asks on every step it arms)
        self._watcher: _FunctionWatcher | None = None
        self._stack: list[nn.Module] = []
        self._cache: dict[Any, Any] = {}
        self._spec_cache: dict[tuple[str, tuple[int, ...], str | None], _Spec] = {}
        self.snapshot: Snapshot | None = None  # the weights' copy last taken (snapshot_params, collect)
        # Whether a pass records only inside the model's own call (None: not seen yet), and whether this pass's hooks
        # are finding out: learned from the first pass that records anything with the kernel's Replay as the hook.
        self.inside_only: bool | None = None
        self._learning = False
        self._trainable_now: tuple[Any, Any] = (None, None)  # the parameters' state last seen, its set
        self._steady: _Steady | None = None  # the last pass, where the next one can repeat it (see _collect_steady)
        self._last: RawPass | None = None  # the last pass's numbers (see RawPass.sharing)
        self._reset()

    # -- attaching -------------------------------------------------------------------------------
    def attach(self) -> None:
        if self.attached:
            return
        # A process-wide forward hook (with a pre-hook where the call stack is tracked) hands each call to the
        # watched module's own hook: registering it costs a few microseconds where a hook per module cost a
        # hundred. The hooks are made on the first attach and kept (a Monitor attaches every sample).
        # Where the kernel's Replay is the hook and a pass has been seen recording only inside the model's own call,
        # the kernel's Watch hands it the watched modules' calls instead (see _kernel.c): no process-wide hook.
        track_stack = self.functions or self.trace_all
        replay = getattr(_kernel, "Replay", None)
        key = ("attach", track_stack, replay)
        if key not in self._cache:
            self._cache[key] = self._hooks(track_stack, replay)
        hook, before, replayed, watch = self._cache[key]
        way = "watch" if watch is not None and self.inside_only else "learn" if replayed and self.inside_only is None \
            else "replay" if replayed else "python"
        self._learning = way == "learn"  # (until a pass has shown whether it records only inside the model's call)
        hooks_key = ("hooks", track_stack, replay, way)
        if hooks_key in self._cache:
            self._hooks_on = self._cache[hooks_key]
            self._hooks_on.insert()
            self.attached = True
            return
        handles = []
        if before is not None:
            handles.append(register_module_forward_pre_hook(before))
        if track_stack:  # (the model's own calls counted, to know when a pass ends)
            handles.append(self.model.register_forward_pre_hook(self._root_pre))
        if way == "watch":
            handles += [self.model.register_forward_pre_hook(watch),
                        self.model.register_forward_hook(watch.leave, always_call=True),
                        self.model.register_forward_hook(hook, with_kwargs=True, always_call=True)]
        elif replayed:  # (the kernel's Replay does `_root_post`'s work too: one hook fewer to register and call)
            handles.append(register_module_forward_hook(hook, with_kwargs=True, always_call=True))
            if way == "learn":
                handles += [self.model.register_forward_pre_hook(self._model_entered),
                            self.model.register_forward_hook(self._model_left, always_call=True)]
        else:
            handles.append(register_module_forward_hook(hook, always_call=True))
            handles.append(self.model.register_forward_hook(self._root_post, with_kwargs=True, always_call=True))
        self._hooks_on = self._cache[hooks_key] = HookSet(handles)
        self.attached = True

    def _hooks(self, track_stack: bool, replay: Any
               ) -> tuple[Callable[..., None], Callable[..., None] | None, bool, Any]:
        """For `attach`: the process-wide forward hook, the pre-hook where the call stack is tracked, whether the
        forward hook is the kernel's Replay, and the kernel's Watch that can hand the Replay the modules' calls
        instead (where each module's forward is a plain function of its class, which an instance forward can stand
        in for; None elsewhere)."""
        table: dict[int, tuple[nn.Module, Callable[..., None], str, bool]] = {}
        pushed: dict[int, nn.Module] = {}
        for name, module in self.model.named_modules():
            kind = module_kind(module)
            if track_stack and module is not self.model:
                pushed[id(module)] = module
            if kind is not None or isinstance(module, nn.Dropout | nn.AlphaDropout) or id(module) in pushed:
                table[id(module)] = (module, self._make_hook(name, kind, module), name, is_batchnorm(module))

        def after(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            entry = table.get(id(module))
            if entry is None or entry[0] is not module:
                return
            if self._stack and self._stack[-1] is module:
                self._stack.pop()
            # The common case first: this pass so far has made the same records as the last one, and this call
            # is the same layer again, with an output of the same shape, fed by the same record (or none).
            index = len(self._specs)
            template = self._template
            if index == self._matched and index < len(template) and template[index][0] is module \
                    and type(out) is torch.Tensor:
                entry_then = template[index]
                _, spec, count, x_from = entry_then
                x = args[0] if args else None
                prod = self._producers.get(id(x))
                if out.shape == spec.shape and torch.is_grad_enabled() \
                        and (prod[3] if prod is not None and prod[0] is x else -1) == x_from:
                    if entry[3]:
                        self._replayed_batchnorm(entry, spec, module, prod, x_from)
                    self._matched += 1
                    self._keep(spec, count, module, out, x_from, entry_then)
                    return
            entry[1](module, args, out)  # the layer's own hook, which works everything out

        def before(module: nn.Module, args: tuple[Any, ...]) -> None:
            if pushed.get(id(module)) is module:
                self._stack.append(module)

        # Where the kernel is built and no call stack is tracked, its Replay does `after`'s common case in C (the
        # same steps, less interpreter), handing everything else to `after`.
        if replay is None or pushed:
            return after, before if pushed else None, False, None
        hook = replay(self, table, torch.Tensor, torch.is_grad_enabled, STACK_LIMIT, FLUSH_ELEMENTS, after,
                      _LINEAR, self.model, collections.OrderedDict)
        modules = tuple(m for m, _, _, _ in table.values() if m is not self.model)
        watch = getattr(_kernel, "Watch", None)
        if watch is not None and all(
                isinstance(inspect.getattr_static(type(m), "forward", None), types.FunctionType) for m in modules):
            return hook, None, True, watch(modules, hook)
        return hook, None, True, None

    def detach(self) -> None:
        self.attached = False
        if self._hooks_on is not None:
            self._hooks_on.remove()
            self._hooks_on = None
        if self._watcher is not None:
            self._exit_watcher()
        self._stack.clear()

    def _exit_watcher(self) -> None:
        if self._watcher is not None:
            watcher, self._watcher = self._watcher, None
            watcher.__exit__(None, None, None)

    def _seen(self) -> int:
        """What this pass has seen so far: its records, and the modes reported (an inference call makes no record)."""
        return len(self._specs) + len(self._mode_events)

    def _model_entered(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """The model called, while it is not known whether passes record only inside its own call."""
        if self._model_depth == 0 and self._seen() != self._records_inside:
            self._outside = True  # records made between the model's calls
        self._model_depth += 1

    def _model_left(self, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        self._model_depth -= 1
        if self._model_depth == 0:
            self._records_inside = self._seen()
            self._model_calls += 1

    # -- per-pass state ----------------------------------------------------------------------------
    def _reset(self) -> None:
        self._specs: list[_Spec] = []
        self._outs: list[torch.Tensor] = []
        # beside each buffered output that autograd does not protect: (spec index, the output, its version,
        # whether a copy was buffered), to check at reduction time that an uncopied one is still as it was
        self._unprotected: list[tuple[int, torch.Tensor, int, bool]] = []
        self._stale: set[int] = set()  # outputs changed in place before they were reduced: no numbers
        self._pending = 0
        self._partials: list[torch.Tensor] = []  # reduced chunks, kept on the device until collect
        self._chunks: list[tuple[list[_Spec], list[tuple[str, list[int]]]]] = []  # reduced outputs: specs, plan
        self._maps: list[tuple[str, torch.Tensor | MapCells]] = []  # layer name -> saturation-map cells
        # outputs whose gradient a hook keeps for us (in its cell, see _grad_cell) or, for large ones, reduces as
        # it arrives (into _grad_blocks); beside them their cells, spec indices and their versions then
        self._grad_outs: list[torch.Tensor] = []
        self._grad_cells: list[list[torch.Tensor]] = []
        self._grad_at: list[int] = []
        self._grad_versions: list[int] = []
        self._grad_blocks: dict[int, torch.Tensor] = {}  # spec index -> large gradient, reduced as it came
        self._grad_hooked = False  # whether some gradient is reduced as it comes (its cell stays empty)
        # id of a recorded output (or, with trace_all, any module's) -> (the output, its name, its module,
        # its place among this pass's records or -1)
        self._producers: dict[int, tuple[torch.Tensor, str, nn.Module | None, int]] = {}
        self._names_used: dict[str, int] = {}  # calls so far per name, for the records up to _named
        self._named = 0
        # What each record of a pass was: (module or None for a function, spec, its count among calls of that
        # name, the place of the record whose output was its input or -1). A pass that makes the same records
        # as the last one takes them from its entries instead of working them out again (see attach).
        entries = getattr(self, "_entries", [])
        self._template: list[tuple[nn.Module | None, _Spec, int, int]] = [] if self.trace_all else entries
        self._entries: list[tuple[nn.Module | None, _Spec, int, int]] = []
        self._matched = 0  # how many of this pass's records, from the first, are those of the template
        self._mode_events: list[ModeEvent] = []
        self._bn_batches: dict[str, int] = {}
        self._bias_before_norm: list[tuple[str, str]] = []
        self._finite_flags: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # name, in ok, out ok
        self._grad_flags: list[tuple[str, torch.Tensor]] = []
        self._consumers: dict[str, str] = {}
        self._output_name: str | None = None
        self._output_shape: tuple[int, ...] | None = None
        self._output_params: list[tuple[str, str]] = []
        self._inputs_finite: torch.Tensor | None = None
        self._root_depth = 0
        self._model_depth = 0  # (see _model_entered)
        self._model_calls = 0
        self._records_inside = 0
        self._outside = False

    # -- hooks -------------------------------------------------------------------------------------
    def _root_pre(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """The model called (registered only where a call stack is tracked): the function watcher on."""
        self._root_depth += 1
        if self._root_depth == 1 and self.functions and self._watcher is None:
            self._watcher = _FunctionWatcher(self)
            self._watcher.__enter__()

    def _root_post(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        if self._root_depth > 0:
            self._root_depth -= 1
            if self._root_depth == 0:
                self._exit_watcher()
                self._stack.clear()
        grad = torch.is_grad_enabled()
        # The model's inputs and output are those of the first call of the model to return: with nested calls
        # (Lightning runs `training_step` as the model's forward, which calls the model), the outer one returns a
        # loss.
        if grad and self._inputs_finite is None:
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.is_floating_point()]
            if tensors:
                at = tensors[0].device
                self._inputs_finite = torch.stack([torch.isfinite(a).all().to(at) for a in tensors]).all()
        if isinstance(out, torch.Tensor) and grad and self._output_shape is None:
            self._output_shape = tuple(out.shape)
            producer = self._producers.get(id(out))
            self._output_name = producer[1] if producer is not None and producer[0] is out else None
            if out.requires_grad:  # the output layer's parameters stay the same from pass to pass
                key = ("output", self._output_shape)
                if key not in self._cache:
                    self._cache[key] = feeding_parameters(out, self.param_names)
                self._output_params = self._cache[key]
            if self.trace_all:
                self._finite_flags.append(("", torch.ones((), dtype=torch.bool, device=out.device),
                                           torch.isfinite(out).all()))

    def _make_hook(self, name: str, kind: str | None, watched: nn.Module) -> Callable[..., None]:
        # what does not change from call to call, worked out once (called for each call that `attach`'s
        # process-wide hook does not replay from the last pass)
        batchnorm = is_batchnorm(watched)
        dropout = isinstance(watched, nn.Dropout | nn.AlphaDropout)
        op = type(watched).__name__

        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if not isinstance(out, torch.Tensor):
                return
            grad = torch.is_grad_enabled()
            if kind is None and not dropout:
                if self.trace_all and grad:
                    self._trace(name, module, args, out)
                return
            if (batchnorm or dropout) and module.training != grad and (grad or batchnorm):
                # training with BatchNorm/Dropout in eval mode, or inference with BatchNorm in train mode
                self._mode_events.append(ModeEvent(name, op, module.training, grad))
            if not grad:
                return  # an inference pass: only its modes matter
            if self.trace_all:
                self._trace(name, module, args, out)
            if kind is None:
                return
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if batchnorm and module.training and x is not None and x.dim() >= 2:
                prod = self._producers.get(id(x))
                self._batchnorm_input(name, x.shape[0], prod if prod is not None and prod[0] is x else None)
            self._record(name, kind, op, None, module, x, out)
        return hook

    def _replayed_batchnorm(self, entry: tuple[nn.Module, Any, str, bool], spec: _Spec, module: nn.Module,
                            prod: tuple[Any, str, nn.Module | None, int] | None, x_from: int) -> None:
        """A replayed BatchNorm call: its mode checked, and in training its batch and the layer before it."""
        if not module.training:
            self._mode_events.append(ModeEvent(entry[2], spec.op, False, True))
        elif len(spec.shape) >= 2:
            self._batchnorm_input(entry[2], spec.shape[0], prod if x_from >= 0 else None)

    def _batchnorm_input(self, name: str, batch: int, producer: tuple[Any, str, nn.Module | None, int] | None
                         ) -> None:
        """A BatchNorm in training: its batch size, and whether a bias right before it is wasted."""
        self._bn_batches[name] = batch
        if producer is not None and isinstance(producer[2], _LINEAR) \
                and producer[2]._parameters.get("bias") is not None:  # (what `module.bias` reads, less slowly)
            self._bias_before_norm.append((producer[1], name))

    def _on_function(self, func: Any, kind: str, x: Any, out: torch.Tensor) -> None:
        if not torch.is_grad_enabled():
            return
        parent = self._stack[-1] if self._stack else self.model
        if type(parent) in _ACTIVATION_MODULES:
            return  # an activation module calling its own function: the module hook records it
        self.found_functions = True
        prefix = self.module_names.get(id(parent), "")
        base = f"{prefix}.{func.__name__}()" if prefix else f"{func.__name__}()"
        x = x if isinstance(x, torch.Tensor) else None
        self._record(base, kind, _function_name(func), _call_site, None, x, out)

    def _trace(self, name: str, module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
        ins = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
        ok = torch.ones((), dtype=torch.bool, device=out.device)  # (where the flags are: all go in one stack)
        ok_in = torch.stack([torch.isfinite(a).all().to(ok.device) for a in ins]).all() if ins else ok
        self._finite_flags.append((name, ok_in, torch.isfinite(out).all() if out.is_floating_point() else ok))
        if out.requires_grad:
            for a in ins:
                prod = self._producers.get(id(a))
                if prod is not None and prod[0] is a:
                    self._consumers.setdefault(prod[1], name)
            if module is not None and module_kind(module) is None:
                out.register_hook(self._grad_flag_hook(name))
                self._producers.setdefault(id(out), (out, name, module, -1))

    def _grad_reducer(self, index: int) -> Callable[[torch.Tensor], None]:
        specs = self._specs

        def hook(g: torch.Tensor) -> None:
            if self._specs is specs:  # still the pass that recorded it
                self._grad_blocks[index] = self._reduce_grads([specs[index]], [g.detach()])
        return hook

    def _grad_flag_hook(self, name: str) -> Callable[[torch.Tensor], None]:
        def hook(g: torch.Tensor) -> None:
            self._grad_flags.append((name, torch.isfinite(g).all()))
        return hook

    def _record(self, base: str, kind: str, op: str, site: Callable[[], str | None] | None, module: nn.Module | None,
                x: torch.Tensor | None, out: torch.Tensor) -> None:
        if out.numel() == 0 or not out.is_floating_point():
            return
        if self._named < len(self._entries):  # records kept since the last one worked out here: count their names
            for _, kept, calls, _ in self._entries[self._named:]:
                self._names_used[kept.base] = calls
            self._named = len(self._entries)
        count = self._names_used.get(base, 0) + 1
        name = base if count == 1 else f"{base}#{count}"
        prod = self._producers.get(id(x)) if x is not None else None
        producer = prod if prod is not None and prod[0] is x else None
        key = (name, out.shape, producer[1] if producer else None)
        spec = self._spec_cache.get(key)
        if spec is None:  # the first pass through this layer with this shape: work out what is fixed
            feeding = feeding_parameters(x, self.param_names) if x is not None and x.requires_grad else []
            spec = _Spec(name, kind, op, site() if site else None, tuple(out.shape),
                         _unit_dim(module, out, producer[2] if producer else None), key[2],
                         [p for p, role in feeding if role == "scale"], base)
            self._spec_cache[key] = spec
        if x is not None and self.trace_all and producer is not None:
            self._consumers.setdefault(producer[1], name)
        x_from = producer[3] if producer else -1
        index, template = len(self._specs), self._template
        if index == self._matched and index < len(template) and template[index] == (module, spec, count, x_from):
            self._matched += 1  # (a function's record, or a layer's worked out anew, may still be the same)
        self._keep(spec, count, module, out, x_from)

    def _keep(self, spec: _Spec, count: int, module: nn.Module | None, out: torch.Tensor, x_from: int,
              entry: tuple[nn.Module | None, _Spec, int, int] | None = None) -> None:
        """Keep a recorded output (or a copy) for reduction and ask for its gradient. `entry`: the template's,
        when it is the same."""
        index = len(self._specs)
        self._specs.append(spec)
        self._entries.append(entry or (module, spec, count, x_from))
        # An output other than an activation's is reduced right away when large (below), else copied as it is
        # now if the layer's output has been seen changed in place (a Linear's before an in-place ReLU) or has
        # not been seen yet, and checked for changes when it is reduced.
        # (No detach: the reductions run without autograd and only read the values.)
        numel = spec.numel
        reduce_now = not spec.protected and numel >= STACK_LIMIT
        version = out._version
        if spec.protected or reduce_now:
            self._outs.append(out)
        else:
            self._unprotected.append((index, out, version, spec.copy))
            self._outs.append(out.detach().clone() if spec.copy else out)
        self._producers[id(out)] = (out, spec.name, module, index)
        if out.requires_grad:
            if numel >= STACK_LIMIT:  # reduced as it arrives, not kept
                self._grad_hooked = True
                out.register_hook(self._grad_reducer(index))
                self._grad_cells.append([])
            else:
                self._grad_cells.append(_grad_cell(out))
            self._grad_outs.append(out)
            self._grad_at.append(index)
            self._grad_versions.append(version)
            if self.trace_all:
                out.register_hook(self._grad_flag_hook(spec.name))
        self._pending += numel
        if reduce_now or self._pending > FLUSH_ELEMENTS:
            self._flush()

    # -- reduction ---------------------------------------------------------------------------------
    def _buffered(self) -> tuple[list[_Spec], list[tuple[str, list[int]]]]:
        """The buffered outputs' specs and plan, now a chunk of the pass; those buffered without a copy are
        checked to be as they were when recorded."""
        specs = self._specs[len(self._specs) - len(self._outs):]
        rows = self._unprotected
        if rows and not _as_recorded(rows):  # (usually none was copied and none has changed: nothing to mark)
            for index, out, version, copied in rows:
                changed = out._version != version
                if not copied and changed:  # its numbers would be those of whatever changed it: none this time
                    self._stale.add(index)
                self._specs[index].copy = changed
        self._unprotected = []
        plan = self._plan(specs)
        self._chunks.append((specs, plan))
        return specs, plan

    @torch.no_grad()
    def _flush(self) -> None:
        """Reduce the buffered outputs to their statistics (still on the device) and drop the copies."""
        if not self._outs:
            return
        specs, plan = self._buffered()
        self._partials.append(self._reduce_outputs(specs, plan, self._outs))
        self._outs = []
        self._pending = 0

    def _plan(self, specs: Sequence[_Spec]) -> list[tuple[str, list[int]]]:
        key = tuple(map(id, specs))  # specs live on in _spec_cache: their ids name them
        if key not in self._cache:
            self._cache[key] = _groups(specs)
        return self._cache[key]

    def _output_items(self, specs: Sequence[_Spec], plan: list[tuple[str, list[int]]]
                      ) -> tuple[_Layout, list[int], list[str]]:
        """The kernel's layout for these outputs, which output each item reads and the saturation maps' layers."""
        key = ("kernel", id(plan))  # (a plan lives on in the cache, as its specs do)
        if key not in self._cache:
            layout, order = _output_layout(specs, plan)
            self._cache[key] = layout, order, [specs[order[item]].name for item, _, _, _ in layout.maps]
        return self._cache[key]

    def _grad_items(self, specs: Sequence[_Spec], blocks: dict[int, int]) -> tuple[_Layout, list[int], dict[int, int]]:
        """The kernel's layout for these gradients (see _grad_layout); `blocks`: sizes of those already reduced."""
        plan = self._plan(specs)
        key = ("kernel-grads", id(plan), tuple(blocks))
        if key not in self._cache:
            self._cache[key] = _grad_layout(specs, plan, blocks)
        return self._cache[key]

    def _reduce_outputs(self, specs: Sequence[_Spec], plan: list[tuple[str, list[int]]],
                        outs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Each group of same-kind, same-shape outputs stacked and reduced in one go (see _reduce_group),
        all in one flat tensor; `_parse_outputs` reads it back in the same order."""
        if _on_cpu(outs):
            layout, order, names = self._output_items(specs, plan)
            block, cells = layout.run([outs[i] for i in order])
            self._maps.extend(zip(names, cells, strict=True))
            return torch.from_numpy(block)
        parts: list[torch.Tensor] = []
        for kind, idx in plan:
            x = _stacked([outs[i] for i in idx], None if kind == "other" else specs[idx[0]].unit_dim)
            group_parts, maps = _reduce_group(kind, x)
            parts += group_parts
            if maps is not None:
                self._maps.extend(zip([specs[i].name for i in idx], maps, strict=True))
        return torch.cat(parts)

    @torch.no_grad()
    def _reduce_grads(self, specs: Sequence[_Spec], grads: Sequence[torch.Tensor | None],
                      ready: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
        """Per group of same-shape gradients their sums and sums of squares; for activations also
        HIST_BINS + 2 counts in units of each gradient's own std. `ready`: blocks of large gradients
        (groups of one) already reduced, as they arrived in the backward pass."""
        if _on_cpu(grads):
            blocks = {i: b for i, b in enumerate(ready or []) if b is not None}
            layout, order, starts = self._grad_items(specs, {i: b.numel() for i, b in blocks.items()})
            out = torch.from_numpy(layout.run([grads[i] for i in order])[0])
            for i, b in blocks.items():
                out[starts[i]:starts[i] + b.numel()] = b
            return out
        parts: list[torch.Tensor] = []
        for kind, idx in self._plan(specs):
            block = ready[idx[0]] if ready else None
            if block is not None:
                parts.append(block)
                continue
            x = _stacked([g for g in (grads[i] for i in idx) if g is not None])
            n = x.shape[1]
            total, squares = _sums(x)
            parts += [total, squares]
            if kind != "other":
                std = ((squares - total * total / n) / max(n - 1, 1)).clamp_(min=1e-30).sqrt_()
                parts.append(_histograms(x, -GRAD_HIST_SIGMAS, GRAD_HIST_SIGMAS, False, std[:, None]))
        return torch.cat(parts)

    def _reduce_on_cpu(self, specs: Sequence[_Spec], grads: Sequence[torch.Tensor | None],
                       ready: Sequence[torch.Tensor | None], t: _Trainable, before: Snapshot | None, snapshot: bool,
                       steady: bool = False) -> tuple[np.ndarray, int]:
        """By the kernel in one call, the slots of _reduce_outputs (the outputs still buffered), _reduce_grads
        (these gradients) and _reduce_params, one after the other, and with `snapshot` the weights' copy last
        (after the updates have read the one it replaces); and where the parameters' slots begin (the slots
        before them are what processes add up). `steady`: a pass the next one can repeat (see _collect_steady)."""
        outs = self._outs
        out_specs: list[_Spec] = []
        plan = None
        if outs:
            out_specs, plan = self._buffered()
            self._outs, self._pending = [], 0
        blocks = {i: b for i, b in enumerate(ready) if b is not None} if ready else {}
        sizes = {i: b.numel() for i, b in blocks.items()}
        updates, copy = before is not None, snapshot and bool(t.w)
        # (the gradients' plan is the outputs' when every output has its gradient: the usual case)
        grad_plan = plan if specs == out_specs else self._plan(specs) if specs else None
        key = ("pass", id(plan), id(grad_plan), tuple(sizes.items()), id(t), updates, copy)
        if key not in self._cache:
            self._cache[key] = self._pass_layout(out_specs, plan, specs, sizes, t, updates, copy)
        layout, out_order, grad_order, names, starts, split = self._cache[key]
        xs = [*map(outs.__getitem__, out_order), *map(grads.__getitem__, grad_order)]
        if t.ps:
            xs += t.tensors()
        if copy and not updates:
            xs += t.w
        block, maps = layout.run(xs, t.copy_block() if updates or copy else None)
        self._maps.extend(zip(names, maps, strict=True))
        if steady and plan is not None:
            self._steady = _Steady(self._entries, len(specs), t, updates, copy, layout, out_order, grad_order, names,
                                   plan)
        for i, b in blocks.items():
            block[starts[i]:starts[i] + b.numel()] = b.numpy()
        return block, split

    def _pass_layout(self, out_specs: Sequence[_Spec], plan: list[tuple[str, list[int]]] | None,
                     specs: Sequence[_Spec], sizes: dict[int, int], t: _Trainable, updates: bool, copy: bool
                     ) -> tuple[_Layout, list[int], list[int], list[str], dict[int, int], int]:
        """For _reduce_on_cpu, worked out once per kind of pass: the joined layout, which output and which
        gradient each of its first items reads, the saturation maps' layers, where the gradient blocks already
        reduced go, and where the parameters' slots begin."""
        layouts: list[_Layout] = []
        out_order: list[int] = []
        grad_order: list[int] = []
        names: list[str] = []
        starts: dict[int, int] = {}
        if plan is not None:
            layout, out_order, names = self._output_items(out_specs, plan)
            layouts.append(layout)
        if specs:
            layout, grad_order, starts = self._grad_items(specs, sizes)
            offset = sum(lay.size for lay in layouts)  # (the outputs' slots come first)
            starts = {i: start + offset for i, start in starts.items()}
            layouts.append(layout)
        split = sum(layout.size for layout in layouts)
        if t.ps:  # (the weights' copy for the next step taken as their updates are measured)
            layouts.append(t.params_layout(updates, copy))
        if copy and not updates:
            layouts.append(t.layout("copy"))
        return _Layout.joined(layouts), out_order, grad_order, names, starts, split

    def _trainable(self) -> _Trainable:
        """The trainable parameters (those with requires_grad), worked out again only when that, a shape or a
        device changes."""
        state = _params_state(self._param_list) if _params_state is not None \
            else tuple(map(_PARAM_STATE, self._param_list))
        if state != self._trainable_now[0]:  # (compared as it is: no hash of it, most times)
            key = ("trainable", state)
            if key not in self._cache:
                ps: list[tuple[str, torch.Tensor, str | None]] = [
                    (n, p, self._param_kinds.get(n)) for n, p in self._params if p.requires_grad]
                self._cache[key] = _Trainable(ps, [i for i, (_, p, _) in enumerate(ps) if p.dim() >= 2],
                                              all(p.is_cpu for _, p, _ in ps))
            self._trainable_now = state, self._cache[key]
        return self._trainable_now[1]

    def snapshot_params(self) -> Snapshot:
        """Copies of the weights, to measure the next update against."""
        t = self._trainable()
        if not t.by_kernel:
            with torch.no_grad():
                self.snapshot = Snapshot(t, copies=list(torch._foreach_mul(t.w, 1.0)))
        else:  # all copied by the kernel, in one call, into the parameters' one block: one snapshot lives at a
            # time (collect uses it, the next sample replaces it)
            t.layout("copy").run(t.w, t.copy_block())
            self.snapshot = Snapshot(t, block=t.copy_block())
        return self.snapshot

    @torch.no_grad()
    def _reduce_params(self, t: _Trainable, before: Snapshot | None) -> torch.Tensor:
        """For the weights: the sums and sums of squares of the weights, their gradients and, given `before`
        (one copy per weight), their updates. For the other parameters (biases, gains): their sums of
        squares and their gradients', which only tell whether they are finite."""
        w, rest = t.w, t.rest
        if t.by_kernel:  # the kernel, in one call
            block = before.block if before is not None else None
            return torch.from_numpy(t.params_layout(block is not None).run(t.tensors(), block)[0])
        g = [_grad_or_zeros(p) for p in w]
        copies = before.copies if before is not None else None
        measured_tensors = w + g + (list(torch._foreach_sub(w, copies)) if copies is not None else [])
        rest_tensors = rest + [_grad_or_zeros(p) for p in rest]
        parts = []
        if measured_tensors:  # in float32 whatever the parameters' dtype (half-precision sums would overflow)
            parts.append(torch.stack([t.sum(dtype=torch.float32) for t in measured_tensors]))
        if measured_tensors or rest_tensors:
            parts.append(torch.stack(torch._foreach_powsum(measured_tensors + rest_tensors, 2, dtype=torch.float32)))
        return torch.cat(parts)

    # -- collecting ----------------------------------------------------------------------------------
    def collect(self, *, before: Snapshot | None = None, lr: float | None = None, snapshot: bool = False
                ) -> RawPass:
        """Reduce everything recorded since the last collect and move it to the host in one transfer.

        Returns a `RawPass`: the numbers as one array, read into `PassStats` only when asked (`.stats()`),
        so that a training loop pays for the device work and the transfer, not for the bookkeeping.
        `before`: a `snapshot_params()` taken before the optimizer step. `snapshot`: then take the next one
        (`self.snapshot`), on the CPU in the same kernel call."""
        if self._steady is not None:
            raw = self._collect_steady(self._steady, before, lr, snapshot)
            if raw is not None:
                return raw
            self._steady = None
        # A gradient is read only if its output was not changed in place afterwards (it would then be the
        # gradient of something else).
        outs = self._grad_outs
        taken = None if self._grad_hooked else _take_grads(self._grad_cells, outs, self._grad_versions)
        grad_list: list[torch.Tensor | None]
        ready_list: list[torch.Tensor | None]
        if taken is not None:  # the usual case, without a Python loop
            grad_index, grad_list, ready_list = self._grad_at, taken, []
        else:
            grad_index, grad_list, ready_list = [], [], []
            for i, t, version, cell in zip(self._grad_at, outs, self._grad_versions, self._grad_cells, strict=True):
                unchanged = t._version == version
                if cell:  # (more than one: backward ran more than once through it; autograd would add them up)
                    g = sum(cell[1:], cell[0])
                    cell.clear()
                    if unchanged:
                        grad_index.append(i)
                        grad_list.append(g)
                        ready_list.append(None)
                elif unchanged and i in self._grad_blocks:  # large: reduced as it arrived, to this block
                    grad_index.append(i)
                    grad_list.append(None)
                    ready_list.append(self._grad_blocks[i])
        # (grad_index rises: as long as the specs, it is all of them)
        grad_specs = self._specs if len(grad_index) == len(self._specs) else [self._specs[i] for i in grad_index]
        trainable = self._trainable()
        ps = trainable.ps
        if before is not None:
            usable = before.block if trainable.by_kernel else before.copies
            if before.trainable is not trainable or usable is None:
                before = None  # the trainable weights (or the way they are reduced) changed: no update to measure
        # Two parts: what the processes under torch.distributed add up (outputs, gradients) and the rest.
        own: torch.Tensor | None = None
        world = world_size()
        flags = [f for _, a, b in self._finite_flags for f in (a, b)] + [f for _, f in self._grad_flags] \
            if self._finite_flags or self._grad_flags else []
        if self._inputs_finite is not None:
            flags.append(self._inputs_finite)
        host: np.ndarray | _OnTheWay | None = None
        if trainable.by_kernel and _on_cpu(self._outs) and _on_cpu(grad_list):
            steady = taken is not None and len(grad_index) == len(self._outs) == len(self._specs) \
                and not (self._partials or self._stale or flags or self._learning) and world == 1
            block, split = self._reduce_on_cpu(grad_specs, grad_list, ready_list, trainable, before, snapshot, steady)
            if snapshot:
                self.snapshot = Snapshot(trainable, block=trainable.copy_block())
                snapshot = False
            if world == 1 and not self._partials and not flags:
                host = block  # the kernel's one block, made for this pass, is all of it
            else:
                whole = torch.from_numpy(block)
                parts = [*self._partials, whole if world == 1 or not ps else whole[:split]]
                own = whole[split:] if world > 1 and ps else None
        else:
            self._flush()
            parts = list(self._partials)
            if grad_index:
                parts.append(self._reduce_grads(grad_specs, grad_list, ready_list))
            own = self._reduce_params(trainable, before) if ps else None
        if host is None:
            if world > 1 and parts:
                # Under torch.distributed every rank measured its own share of the batch. Sums, sums of squares,
                # counts, histogram bins and per-unit counts all add up: one collective on one buffer makes
                # them the statistics of the whole batch. (Parameters need none: DDP keeps them equal.)
                packed = torch.cat(parts)
                torch.distributed.all_reduce(packed)
                parts = [packed]
            if own is not None:
                parts.append(own)
            if flags:
                at = parts[0].device if parts else flags[0].device
                parts.append(torch.stack([f.to(at) for f in flags]).float())
            device = parts[0].device if parts else None
            host = _to_host(torch.cat([p if p.device == device else p.to(device) for p in parts])) if parts \
                else np.zeros(0, np.float32)
        raw = self._raw_pass(host, grad_index, trainable, before is not None, lr, world)
        if self._learning and self._specs:
            self.inside_only = self._model_calls > 0 and not self._outside and self._records_inside == self._seen()
            self._learning = False
            if self.inside_only and self.attached:  # (the next pass watched without the process-wide hook)
                self.detach()
                self.attach()
        self._reset()
        if snapshot:
            self.snapshot_params()
        return raw

    def _raw_pass(self, host: np.ndarray | _OnTheWay, grad_index: list[int], t: _Trainable, updates: bool,
                  lr: float | None, world: int) -> RawPass:
        """The pass's RawPass: the numbers and what is needed to read them."""
        self._last = RawPass(
            host=host, chunks=self._chunks, grads=grad_index,
            params=t.described, has_grad=list(map(operator.is_not, map(_GRAD, t.params), repeat(None))),
            weights=t.weights, updates_measured=updates, lr=lr,
            maps=self._maps, finite_flags=[n for n, _, _ in self._finite_flags] if self._finite_flags else [],
            grad_flags=[n for n, _ in self._grad_flags] if self._grad_flags else [], consumers=self._consumers,
            inputs_checked=self._inputs_finite is not None, world=world, stale=self._stale,
            base=PassStats([], [], self._output_name, self._output_shape, list(self._output_params),
                           self._mode_events, self._bn_batches, self._bias_before_norm),
        ).sharing(self._last)
        return self._last

    def _collect_steady(self, steady: _Steady, before: Snapshot | None, lr: float | None, snapshot: bool
                        ) -> RawPass | None:
        """collect() for a pass that made the same records as the last one, on the CPU, alone, with every output's
        gradient and nothing else to check: the last pass's layout filled in again, with none of the working out.
        None (nothing taken) for any other pass."""
        t = self._trainable()
        n = steady.count
        updates = before is not None and before.trainable is t and before.block is not None
        if self._template is not steady.entries or t is not steady.trainable or updates != steady.updates \
                or (snapshot and bool(t.w)) != steady.copy or self._matched != n or len(self._specs) != n \
                or len(self._outs) != n or len(self._grad_at) != n or self._partials or self._stale \
                or self._grad_hooked or self._finite_flags or self._grad_flags or self._learning \
                or self._inputs_finite is not None or world_size() != 1 or not _on_cpu(self._outs) \
                or (self._unprotected and not _as_recorded(self._unprotected)):
            return None
        grads = _take_grads(self._grad_cells, self._grad_outs, self._grad_versions)
        if grads is None:
            return None
        outs = self._outs
        xs = [*map(outs.__getitem__, steady.out_order), *map(grads.__getitem__, steady.grad_order), *t.tensors()]
        if steady.copy and not steady.updates:
            xs += t.w
        host, maps = steady.layout.run(xs, t.copy_block() if steady.updates or steady.copy else None)
        self._chunks.append((self._specs, steady.plan))
        self._maps.extend(zip(steady.names, maps, strict=True))
        raw = self._raw_pass(host, self._grad_at, t, steady.updates, lr, 1)
        self._reset()
        steady.entries = self._template  # (this pass's records, the same as the last one's)
        if snapshot:
            self.snapshot = Snapshot(t, block=t.copy_block())
        return raw


@dataclass
class _OnTheWay:
    """A pass's numbers being copied from the GPU to the host behind the training step's own work."""

    copy: torch.Tensor  # (in pinned host memory)
    done: Any  # torch.cuda.Event, recorded after the copy

    def arrived(self) -> np.ndarray:
        self.done.synchronize()
        return self.copy.numpy()


def _to_host(block: torch.Tensor) -> np.ndarray | _OnTheWay:
    """A pass's numbers on the host: from a GPU without waiting for it (the copy is queued after the pass's
    own work and waited for only when the numbers are read), so a sampled step does not stall the loop."""
    if block.device.type != "cuda":
        return block.cpu().numpy()
    copy = block.to("cpu", non_blocking=True)  # (torch puts it in pinned memory: no synchronisation)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(block.device))
    return _OnTheWay(copy, done)


@dataclass
class RawPass:

    """One pass's numbers as they came off the device, and what is needed to read them."""

    host: np.ndarray | _OnTheWay
    chunks: list[tuple[list[_Spec], list[tuple[str, list[int]]]]]
    grads: list[int]  # the layers (indices in pass order) whose output gradient was reduced
    params: list[tuple[str, tuple[int, ...], str | None]]  # name, shape, module kind
    has_grad: list[bool]  # per parameter
    weights: list[int]  # the parameters (indices) whose spreads were measured
    updates_measured: bool
    lr: float | None
    maps: list[tuple[str, torch.Tensor | MapCells]] | None  # saturation-map cells (on the device: tensors)
    finite_flags: list[str]
    grad_flags: list[str]
    consumers: dict[str, str]
    inputs_checked: bool
    world: int  # processes whose statistics were added together (1 outside torch.distributed)
    stale: set[int]  # layers (indices in pass order) changed in place before they were measured: left out
    base: PassStats  # the fields known without reading `host`
    _stats: PassStats | None = None

    def drop_maps(self) -> None:
        """Forget the saturation maps (a Monitor keeps them for the latest pass only)."""
        self.maps = None

    def sharing(self, last: RawPass | None) -> RawPass:
        """This pass, holding the last one's description (layers, parameters, ...) wherever it is the same: a
        Monitor keeps up to thousands of passes, most of them alike but for their numbers, and every list that
        each kept of its own would be more for Python's garbage collector to go through, again and again."""
        if last is not None:
            for name in _DESCRIPTION:
                mine, theirs = getattr(self, name), getattr(last, name)
                if mine is not theirs and mine == theirs:
                    setattr(self, name, theirs)
        return self

    def stats(self) -> PassStats:
        if self._stats is None:
            self._stats = self._read()
        return self._stats

    def _read(self) -> PassStats:
        if isinstance(self.host, _OnTheWay):
            self.host = self.host.arrived()
        host = self.host.astype(np.float64)
        layers: list[LayerStats] = []
        cursor = 0
        for chunk, plan in self.chunks:
            cursor = _parse_outputs(chunk, plan, host, cursor, layers, self.world)
        if self.grads:
            specs = [s for chunk, _ in self.chunks for s in chunk]
            for kind, idx in _groups([specs[i] for i in self.grads]):
                k = len(idx)
                sums, squares = host[cursor:cursor + k], host[cursor + k:cursor + 2 * k]
                cursor += 2 * k
                targets = [layers[self.grads[i]] for i in idx]
                # Each rank's loss is a mean over its own share of the batch, so its gradients are `world`
                # times those of the whole batch's mean loss: scale back to the latter.
                sums, squares = sums / self.world, squares / self.world ** 2
                for layer, total, sq in zip(targets, sums, squares, strict=True):
                    layer.grad_mean, layer.grad_std = _mean_std(total, sq, math.prod(layer.shape) * self.world)
                    layer.grad_nonfinite = not math.isfinite(sq)
                if kind != "other":
                    hists = host[cursor:cursor + k * (HIST_BINS + 2)].reshape(k, HIST_BINS + 2)
                    cursor += hists.size
                    for layer, h in zip(targets, hists, strict=True):
                        layer.grad_hist = h[1:-1].tolist()
        params: list[ParamStats] = []
        if self.params:
            k = len(self.weights)
            counts = [math.prod(self.params[i][1]) for i in self.weights]
            m = 3 if self.updates_measured else 2  # weights, gradients (and updates), k of each
            sums, squares = host[cursor:cursor + m * k], host[cursor + m * k:cursor + 2 * m * k]
            cursor += 2 * m * k
            stds = [[_mean_std(a, b, n)[1] for a, b, n in zip(sums[j * k:(j + 1) * k], squares[j * k:(j + 1) * k],
                                                              counts, strict=True)] for j in range(m)]
            # param index -> [w std, grad std(, update std)]; a NaN/Inf anywhere makes its std NaN
            spread = {i: [column[j] for column in stds] for j, i in enumerate(self.weights)}
            others = [i for i in range(len(self.params)) if i not in spread]
            norms = {i: (host[cursor + j], host[cursor + len(others) + j]) for j, i in enumerate(others)}
            cursor += 2 * len(others)
            for i, ((name, shape, module), has_grad) in enumerate(zip(self.params, self.has_grad, strict=True)):
                measured = spread.get(i)
                w_std = g_std = ratio = None
                if measured is not None:
                    w_std, g_std = measured[0], measured[1]
                    w_check, g_check = w_std, g_std
                    update = measured[2] if len(measured) == 3 else self.lr * g_std if self.lr is not None else None
                    if has_grad and update is not None and w_std > 0:
                        # -inf: the weight did not move at all (its gradient is zero)
                        ratio = math.log10(update / w_std) if update > 0 else -math.inf
                else:
                    w_check, g_check = norms[i]
                params.append(ParamStats(name, shape, module, w_std, g_std if has_grad else None,
                                         not math.isfinite(w_check), has_grad and not math.isfinite(g_check),
                                         ratio))
        flag_values = host[cursor:]
        if self.stale:
            layers = [lay for i, lay in enumerate(layers) if i not in self.stale]
        result = dataclasses.replace(self.base, layers=layers, params=params)
        k = 0
        for name in self.finite_flags:
            ok_in, ok_out = flag_values[k], flag_values[k + 1]
            k += 2
            if ok_in and not ok_out and result.first_nonfinite_forward is None:
                result.first_nonfinite_forward = name or "(model output)"
        for name in self.grad_flags:
            if not flag_values[k] and result.first_nonfinite_backward is None:
                result.first_nonfinite_backward = (name, self.consumers.get(name))
            k += 1
        if self.inputs_checked:
            result.inputs_nonfinite = not bool(flag_values[k])
        if self.maps:
            by_name = {lay.name: lay for lay in layers}
            for name, cells in self.maps:
                if name in by_name:
                    by_name[name].sat_map = cells.cpu().numpy() if isinstance(cells, torch.Tensor) \
                        else cells[0][cells[1]:cells[1] + cells[2] * cells[3]].reshape(cells[2], cells[3])
        return result


# What a RawPass says of its pass besides the numbers (none of it changed once made)
_DESCRIPTION = ("chunks", "grads", "params", "has_grad", "weights", "finite_flags", "grad_flags", "consumers", "stale",
                "base")


def _mean_std(total: float, squares: float, count: int) -> tuple[float, float]:
    mean = float(total) / count
    return mean, math.sqrt(max(float(squares) - float(total) * mean, 0.0) / max(count - 1, 1))


def _parse_outputs(specs: Sequence[_Spec], plan: list[tuple[str, list[int]]], values: np.ndarray, cursor: int,
                   layers: list[LayerStats], world: int = 1) -> int:
    """Append LayerStats read from one `_reduce_outputs` block at `cursor`; returns the new cursor.
    `world`: how many processes' outputs (each of the shape in `specs`) were added together."""
    found: dict[int, LayerStats] = {}
    width = HIST_BINS + 2
    for kind, idx in plan:
        k = len(idx)
        sums, squares = values[cursor:cursor + k], values[cursor + k:cursor + 2 * k]
        cursor += 2 * k
        flagged = hists = alive = None
        if kind != "other":
            units = specs[idx[0]].shape[specs[idx[0]].unit_dim]
            flagged = values[cursor:cursor + k]
            cursor += k
            hists = values[cursor:cursor + k * width].reshape(k, width)
            cursor += k * width
            alive = values[cursor:cursor + k * units].reshape(k, units)
            cursor += k * units
        for j, i in enumerate(idx):
            s = specs[i]
            count = s.numel * world
            mean, std = _mean_std(sums[j], squares[j], count)
            share = float(flagged[j] / count) if flagged is not None else None
            found[i] = LayerStats(
                name=s.name, kind=s.kind, op=s.op, site=s.site, shape=s.shape, units=s.shape[s.unit_dim],
                mean=mean, std=std, nonfinite=not math.isfinite(squares[j]),
                saturated=share if kind in BOUNDED else None, inactive=share if kind in RELU_LIKE else None,
                dead=int((alive[j] == 0).sum()) if alive is not None else None,
                hist=hists[j, 1:-1].tolist() if hists is not None else [],
                hist_range=HIST_RANGE.get(s.kind, DEFAULT_HIST_RANGE),
                hist_outside=(float(hists[j, 0]), float(hists[j, -1])) if hists is not None else (0.0, 0.0),
                input_from=s.input_from, feeding=list(s.feeding),
            )
    layers.extend(found[i] for i in range(len(specs)))
    return cursor
