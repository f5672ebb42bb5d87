"""What is measured: hooks that record per-layer statistics of one training pass, on the device.

A `Recorder` attaches forward hooks to the layers worth watching (linear, normalisation, embedding and
activation modules) and, through a `TorchFunctionMode`, to activations called as functions inside a
`forward` (`torch.tanh(x)`, `F.relu(x)`). Each hook only keeps a detached copy of the layer's output
(a copy, because a later in-place op such as `ReLU(inplace=True)` would otherwise change it) and, in
backward, of the gradient arriving at it. `collect()` then reduces all copies of a pass at once: the
outputs are concatenated into one vector and every statistic (moments, extrema, saturation, dead units,
histograms) is a handful of segment-wise ops over it, so the cost does not grow with the number of
layers and there is exactly one device-to-host transfer per pass.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from nnvitals.numbers import DEAD_CUT, SATURATION_CUT

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
    min: float
    max: float
    nonfinite: int
    saturated: float | None  # share of outputs beyond +-0.97 (tanh-like), None when not bounded
    inactive: float | None  # share of outputs <= 0 (ReLU), None otherwise
    dead: int | None  # units saturated (|t| > 0.99) or inactive on every example of the batch
    hist: list[float]  # HIST_BINS counts over hist_range
    hist_range: tuple[float, float]
    hist_outside: tuple[float, float]  # counts below and above the range
    grad_std: float | None = None
    grad_mean: float | None = None
    grad_nonfinite: int = 0
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
    std: float
    grad_std: float | None
    nonfinite: bool
    grad_nonfinite: bool
    update_ratio: float | None = None  # log10(std(delta w) / std(w)) for this step

    @property
    def grad_to_weight(self) -> float | None:
        if self.grad_std is None or self.std == 0 or not math.isfinite(self.std):
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


class _Layout:
    """Index tensors for reducing one arrangement of watched outputs, built once and cached."""

    def __init__(self, specs: Sequence[_Spec], seg: torch.Tensor, device: torch.device):
        def vec(values: list[Any], dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        ranges = [HIST_RANGE.get(s.kind, DEFAULT_HIST_RANGE) for s in specs]
        self.seg = seg
        self.counts = vec([math.prod(s.shape) for s in specs])
        self.scale = vec([2.0 if s.kind == "sigmoid" else 1.0 for s in specs])
        self.shift = vec([-1.0 if s.kind == "sigmoid" else 0.0 for s in specs])
        self.bounded = vec([s.kind in BOUNDED for s in specs], torch.bool)
        self.relu = vec([s.kind in RELU_LIKE for s in specs], torch.bool)
        self.lo = vec([lo for lo, _ in ranges])
        self.span = vec([hi - lo for lo, hi in ranges])
        # Each element's global unit id (-1 outside watched activations), and the positions of the
        # saturation-map cells (first MAP_ROWS examples x first MAP_UNITS units) in the concatenation.
        unit_ids, map_pos = [], []
        offset, self.n_units = 0, 0
        for s in specs:
            n = math.prod(s.shape)
            if s.kind in BOUNDED or s.kind in RELU_LIKE:
                grid = torch.arange(n, device=device).reshape(s.shape)
                grid = grid.movedim(s.unit_dim, -1).reshape(-1, s.shape[s.unit_dim])
                per_unit = torch.empty(n, dtype=torch.long, device=device)
                per_unit[grid.reshape(-1)] = torch.arange(grid.shape[1], device=device).repeat(grid.shape[0])
                unit_ids.append(per_unit + self.n_units)
                self.n_units += grid.shape[1]
                if s.kind in BOUNDED:
                    map_pos.append(grid[:MAP_ROWS, :MAP_UNITS].reshape(-1) + offset)
            else:
                unit_ids.append(torch.full((n,), -1, dtype=torch.long, device=device))
            offset += n
        self.units = torch.cat(unit_ids)
        self.map_pos = torch.cat(map_pos) if map_pos else torch.zeros(0, dtype=torch.long, device=device)


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
    frame: Any = sys._getframe(2)
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


class Recorder:
    """Hooks on one model that measure its layers during a pass; `collect()` returns a `PassStats`.

    functions: also watch activation functions called inside forward (costs a little on every op).
    trace_all: also check every module's output for NaN/Inf, to name the module that produced one.
    """

    def __init__(self, model: nn.Module, *, functions: bool = True, trace_all: bool = False):
        self.model = model
        self.functions = functions
        self.trace_all = trace_all
        self.param_names = {id(p): n for n, p in model.named_parameters()}
        self.module_names = {id(m): n for n, m in model.named_modules()}
        self._param_kinds = {f"{mn}.{pn}" if mn else pn: module_kind(m)
                             for mn, m in model.named_modules() for pn, _ in m.named_parameters(recurse=False)}
        self.found_functions = False
        self._handles: list[RemovableHandle] = []
        self._watcher: _FunctionWatcher | None = None
        self._stack: list[nn.Module] = []
        self._cache: dict[Any, Any] = {}
        self._feeding_cache: dict[str, list[tuple[str, str]]] = {}
        self._reset()

    # -- attaching -------------------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> None:
        if self.attached:
            return
        for name, module in self.model.named_modules():
            kind = module_kind(module)
            track_stack = self.functions or self.trace_all
            if track_stack and module is not self.model:
                self._handles.append(module.register_forward_pre_hook(self._push))
            if kind is not None or isinstance(module, nn.Dropout | nn.AlphaDropout):
                self._handles.append(module.register_forward_hook(self._make_hook(name, kind), always_call=True))
            elif track_stack and module is not self.model:
                self._handles.append(module.register_forward_hook(self._make_hook(name, None), always_call=True))
        self._handles.append(self.model.register_forward_pre_hook(self._root_pre, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._root_post, always_call=True))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._exit_watcher()
        self._stack.clear()

    def _exit_watcher(self) -> None:
        if self._watcher is not None:
            watcher, self._watcher = self._watcher, None
            watcher.__exit__(None, None, None)

    # -- per-pass state ----------------------------------------------------------------------------
    def _reset(self) -> None:
        self._specs: list[_Spec] = []
        self._outs: list[torch.Tensor] = []
        self._pending = 0
        self._partials: list[torch.Tensor] = []  # reduced chunks, kept on the device until collect
        self._chunk_layouts: list[list[_Spec]] = []
        self._grads: dict[int, torch.Tensor] = {}  # spec index -> gradient copy
        self._producers: dict[int, tuple[torch.Tensor, str, nn.Module | None]] = {}
        self._names_used: dict[str, int] = {}
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

    # -- hooks -------------------------------------------------------------------------------------
    def _root_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._root_depth += 1
        if self._root_depth == 1:
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.is_floating_point()]
            if tensors and torch.is_grad_enabled():
                self._inputs_finite = torch.stack([torch.isfinite(a).all() for a in tensors]).all()
            if self.functions and self._watcher is None:
                self._watcher = _FunctionWatcher(self)
                self._watcher.__enter__()

    def _root_post(self, module: nn.Module, args: Any, out: Any) -> None:
        self._root_depth -= 1
        if self._root_depth > 0:
            return
        self._exit_watcher()
        self._stack.clear()
        if isinstance(out, torch.Tensor) and torch.is_grad_enabled():
            self._output_shape = tuple(out.shape)
            producer = self._producers.get(id(out))
            self._output_name = producer[1] if producer is not None and producer[0] is out else None
            if out.requires_grad:
                self._output_params = feeding_parameters(out, self.param_names)
            if self.trace_all:
                self._finite_flags.append(("", torch.ones((), dtype=torch.bool), torch.isfinite(out).all()))

    def _push(self, module: nn.Module, args: Any) -> None:
        self._stack.append(module)

    def _make_hook(self, name: str, kind: str | None) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if self._stack and self._stack[-1] is module:
                self._stack.pop()
            if not isinstance(out, torch.Tensor):
                return
            grad = torch.is_grad_enabled()
            if kind is None and not isinstance(module, nn.Dropout | nn.AlphaDropout):
                if self.trace_all and grad:
                    self._trace(name, module, args, out)
                return
            self._check_mode(name, module, grad)
            if not grad:
                return  # an inference pass: only its modes matter
            if self.trace_all:
                self._trace(name, module, args, out)
            if kind is None:
                return
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if is_batchnorm(module) and module.training and x is not None and x.dim() >= 2:
                self._bn_batches[name] = int(x.shape[0])
                prod = self._producers.get(id(x))
                if prod is not None and prod[0] is x and isinstance(prod[2], _LINEAR) \
                        and getattr(prod[2], "bias", None) is not None:
                    self._bias_before_norm.append((prod[1], name))
            self._record(name, kind, type(module).__name__, None, module, x, out)
        return hook

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
        self._record(base, kind, _function_name(func), _call_site(), None, x, out)

    def _check_mode(self, name: str, module: nn.Module, grad: bool) -> None:
        if not (is_batchnorm(module) or isinstance(module, nn.Dropout | nn.AlphaDropout)):
            return
        if grad and not module.training:
            self._mode_events.append(ModeEvent(name, type(module).__name__, False, True))
        elif not grad and module.training and is_batchnorm(module):
            self._mode_events.append(ModeEvent(name, type(module).__name__, True, False))

    def _trace(self, name: str, module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
        ins = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
        ok_in = torch.stack([torch.isfinite(a).all() for a in ins]).all() if ins else torch.ones((), dtype=torch.bool)
        self._finite_flags.append((name, ok_in, torch.isfinite(out).all() if out.is_floating_point()
                                   else torch.ones((), dtype=torch.bool)))
        if out.requires_grad:
            for a in ins:
                prod = self._producers.get(id(a))
                if prod is not None and prod[0] is a:
                    self._consumers.setdefault(prod[1], name)
            if module is not None and module_kind(module) is None:
                out.register_hook(self._grad_flag_hook(name))
                self._producers.setdefault(id(out), (out, name, module))

    def _grad_flag_hook(self, name: str) -> Callable[[torch.Tensor], None]:
        def hook(g: torch.Tensor) -> None:
            self._grad_flags.append((name, torch.isfinite(g).all()))
        return hook

    def _record(self, base: str, kind: str, op: str, site: str | None, module: nn.Module | None,
                x: torch.Tensor | None, out: torch.Tensor) -> None:
        if not out.is_floating_point() or out.numel() == 0:
            return
        count = self._names_used.get(base, 0) + 1
        self._names_used[base] = count
        name = base if count == 1 else f"{base}#{count}"
        prod = self._producers.get(id(x)) if x is not None else None
        producer = prod if prod is not None and prod[0] is x else None
        if name not in self._feeding_cache:
            self._feeding_cache[name] = (
                feeding_parameters(x, self.param_names) if x is not None and x.requires_grad else [])
        feeding = [p for p, role in self._feeding_cache[name] if role == "scale"]
        spec = _Spec(name, kind, op, site, tuple(out.shape), _unit_dim(module, out, producer[2] if producer else None),
                     producer[1] if producer else None, feeding)
        index = len(self._specs)
        self._specs.append(spec)
        self._outs.append(out.detach().clone())
        self._producers[id(out)] = (out, name, module)
        if x is not None and self.trace_all and producer is not None:
            self._consumers.setdefault(producer[1], name)
        if out.requires_grad:
            out.register_hook(self._grad_hook(index))
            if self.trace_all:
                out.register_hook(self._grad_flag_hook(name))
        self._pending += out.numel()
        if self._pending > FLUSH_ELEMENTS:
            self._flush()

    def _grad_hook(self, index: int) -> Callable[[torch.Tensor], None]:
        def hook(g: torch.Tensor) -> None:
            self._grads[index] = g.detach().clone()
        return hook

    # -- reduction ---------------------------------------------------------------------------------
    def _flush(self) -> None:
        """Reduce the buffered outputs to their statistics (still on the device) and drop the copies."""
        if not self._outs:
            return
        start = sum(len(c) for c in self._chunk_layouts)
        specs = self._specs[start:start + len(self._outs)]
        self._partials.append(self._reduce_outputs(specs, self._outs))
        self._chunk_layouts.append(specs)
        self._outs = []
        self._pending = 0

    def _segments(self, sizes: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Segment id of every element of the concatenation of tensors of these sizes (cached)."""
        key = ("seg", sizes, device)
        if key not in self._cache:
            self._cache[key] = torch.repeat_interleave(
                torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))
        return self._cache[key]

    def _layout(self, specs: Sequence[_Spec], device: torch.device) -> _Layout:
        key = ("layout", tuple((s.shape, s.unit_dim, s.kind) for s in specs), device)
        if key not in self._cache:
            self._cache[key] = _Layout(specs, self._segments(tuple(math.prod(s.shape) for s in specs), device),
                                       device)
        return self._cache[key]

    def _reduce_outputs(self, specs: Sequence[_Spec], outs: Sequence[torch.Tensor]) -> torch.Tensor:
        """One flat float tensor: per layer [count, mean, m2, min, max, nonfinite, saturated, dead-cut,
        inactive], then per layer HIST_BINS + 2 histogram counts, then per-unit alive counts, then the
        saturation-map cells."""
        device = outs[0].device
        lay = self._layout(specs, device)
        seg = lay.seg
        flat = torch.cat([o.reshape(-1) for o in outs]).float()
        finite = torch.isfinite(flat)
        clean = torch.where(finite, flat, torch.zeros((), device=device))
        zeros = torch.zeros(len(specs), device=device)
        means = zeros.index_add(0, seg, clean) / lay.counts
        centred = clean - means[seg]
        m2 = zeros.index_add(0, seg, centred * centred)
        lows = torch.full_like(zeros, math.inf).scatter_reduce(0, seg, clean, "amin")
        highs = torch.full_like(zeros, -math.inf).scatter_reduce(0, seg, clean, "amax")
        nonfinite = zeros.index_add(0, seg, (~finite).float())
        # Bounded activations mapped onto tanh's [-1, 1] (sigmoid s -> 2s - 1) and cut at +-0.97 / 0.99.
        t = (clean * lay.scale[seg] + lay.shift[seg]).abs()
        is_bounded = lay.bounded[seg]
        sat = (t > SATURATION_CUT) & is_bounded
        dead_cut = (t > DEAD_CUT) & is_bounded
        inactive = (clean <= 0) & lay.relu[seg]
        saturated = zeros.index_add(0, seg, sat.float())
        n_inactive = zeros.index_add(0, seg, inactive.float())
        # Histograms: bin index in [0, HIST_BINS + 1], 0 and the last being under- and overflow.
        pos = ((clean - lay.lo[seg]) / lay.span[seg] * HIST_BINS).floor().clamp(-1, HIST_BINS) + 1
        width = HIST_BINS + 2
        hist = torch.zeros(len(specs) * width, device=device).index_add(
            0, seg * width + pos.long(), finite.float())
        alive_counts = torch.zeros(lay.n_units, device=device)
        if lay.n_units:
            watched = lay.units >= 0
            alive_counts.index_add_(0, lay.units[watched], (~(dead_cut | inactive))[watched].float())
        sat_map = dead_cut[lay.map_pos].float()
        scalars = torch.stack([lay.counts, means, m2, lows, highs, nonfinite, saturated, n_inactive], 1)
        return torch.cat([scalars.reshape(-1), hist, alive_counts, sat_map])

    def _reduce_grads(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per gradient [mean, m2, nonfinite], then HIST_BINS + 2 counts in units of its own std."""
        device = grads[0].device
        sizes = tuple(g.numel() for g in grads)
        n = len(grads)
        seg = self._segments(sizes, device)
        flat = torch.cat([g.reshape(-1) for g in grads]).float()
        finite = torch.isfinite(flat)
        clean = torch.where(finite, flat, torch.zeros((), device=device))
        counts = torch.tensor(sizes, dtype=torch.float32, device=device)
        zeros = torch.zeros(n, device=device)
        means = zeros.index_add(0, seg, clean) / counts
        centred = clean - means[seg]
        m2 = zeros.index_add(0, seg, centred * centred)
        std = (m2 / (counts - 1).clamp(min=1)).sqrt()
        z = clean / std.clamp(min=1e-30)[seg]
        pos = ((z + GRAD_HIST_SIGMAS) / (2 * GRAD_HIST_SIGMAS) * HIST_BINS).floor().clamp(-1, HIST_BINS) + 1
        width = HIST_BINS + 2
        hist = torch.zeros(n * width, device=device).index_add(0, seg * width + pos.long(), finite.float())
        nonfinite = zeros.index_add(0, seg, (~finite).float())
        return torch.cat([torch.stack([means, m2, nonfinite], 1).reshape(-1), hist])

    def _param_tensors(self) -> list[tuple[str, torch.Tensor, str | None]]:
        """(name, parameter, kind of the module holding it) for every trainable parameter."""
        return [(n, p, self._param_kinds.get(n)) for n, p in self.model.named_parameters() if p.requires_grad]

    def snapshot_params(self) -> torch.Tensor | None:
        """A flat copy of all trainable parameters, to measure the next update against."""
        ps = self._param_tensors()
        if not ps:
            return None
        return torch.cat([p.detach().reshape(-1).float() for _, p, _ in ps])

    def _reduce_params(self, ps: list[tuple[str, torch.Tensor, str | None]], before: torch.Tensor | None,
                       lr: float | None) -> torch.Tensor:
        """Per parameter [std, grad std, nonfinite, grad nonfinite, has grad, update std]."""
        device = ps[0][1].device
        sizes = tuple(p.numel() for _, p, _ in ps)
        seg = self._segments(sizes, device)
        counts = torch.tensor(sizes, dtype=torch.float32, device=device)
        w = torch.cat([p.detach().reshape(-1).float() for _, p, _ in ps])
        has_grad = torch.tensor([p.grad is not None for _, p, _ in ps], dtype=torch.float32, device=device)
        g = torch.cat([(p.grad.detach() if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                       for _, p, _ in ps])

        def seg_std(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            finite = torch.isfinite(v)
            clean = torch.where(finite, v, torch.zeros((), device=device))
            zeros = torch.zeros(len(sizes), device=device)
            mean = zeros.index_add(0, seg, clean) / counts
            c = clean - mean[seg]
            var = zeros.index_add(0, seg, c * c) / (counts - 1).clamp(min=1)
            return var.sqrt(), zeros.index_add(0, seg, (~finite).float())

        w_std, w_bad = seg_std(w)
        g_std, g_bad = seg_std(g)
        if before is not None and before.numel() == w.numel():
            u_std, _ = seg_std(w - before)
        elif lr is not None:
            u_std = g_std * lr
        else:
            u_std = torch.full_like(w_std, math.nan)
        return torch.stack([w_std, g_std, w_bad, g_bad, has_grad, u_std], 1).reshape(-1)

    # -- collecting ----------------------------------------------------------------------------------
    def collect(self, *, before: torch.Tensor | None = None, lr: float | None = None) -> PassStats:
        """Reduce everything recorded since the last collect, move it to the host in one transfer, and
        return it as `PassStats`. `before`: a `snapshot_params()` taken before the optimizer step."""
        self._flush()
        parts = list(self._partials)
        grad_index = sorted(self._grads)
        if grad_index:
            parts.append(self._reduce_grads([self._grads[i] for i in grad_index]))
        ps = self._param_tensors()
        if ps:
            parts.append(self._reduce_params(ps, before, lr))
        flags = [f for _, a, b in self._finite_flags for f in (a, b)] + [f for _, f in self._grad_flags]
        if self._inputs_finite is not None:
            flags.append(self._inputs_finite)
        if flags:
            parts.append(torch.stack([f.float() for f in flags]).to(parts[0].device if parts else "cpu"))
        host = torch.cat([p.to(parts[0].device) for p in parts]).cpu().numpy().astype(np.float64) \
            if parts else np.zeros(0)

        layers: list[LayerStats] = []
        cursor = 0
        for chunk in self._chunk_layouts:
            layers_chunk, used = _parse_outputs(chunk, host[cursor:])
            layers.extend(layers_chunk)
            cursor += used
        if grad_index:
            width = HIST_BINS + 2
            block = host[cursor:cursor + len(grad_index) * (3 + width)]
            cursor += block.size
            head = block[:3 * len(grad_index)].reshape(-1, 3)
            hists = block[3 * len(grad_index):].reshape(-1, width)
            for row, i, h in zip(head, grad_index, hists, strict=True):
                layer = layers[i]
                n = max(math.prod(layer.shape) - 1, 1)
                layer.grad_mean = float(row[0])
                layer.grad_std = math.sqrt(max(row[1], 0.0) / n)
                layer.grad_nonfinite = int(row[2])
                layer.grad_hist = h[1:-1].tolist()
        params: list[ParamStats] = []
        if ps:
            block = host[cursor:cursor + 6 * len(ps)].reshape(-1, 6)
            cursor += block.size
            for (name, p, kind), row in zip(ps, block, strict=True):
                params.append(ParamStats(
                    name, tuple(p.shape), kind, float(row[0]),
                    float(row[1]) if row[4] else None, bool(row[2]), bool(row[3] and row[4]),
                    math.log10(row[5] / row[0]) if row[4] and row[0] > 0 and row[5] > 0 else None))
        flag_values = host[cursor:]
        result = PassStats(layers, params, self._output_name, self._output_shape, list(self._output_params),
                           list(self._mode_events), dict(self._bn_batches), list(self._bias_before_norm))
        k = 0
        for name, _, _ in self._finite_flags:
            ok_in, ok_out = flag_values[k], flag_values[k + 1]
            k += 2
            if ok_in and not ok_out and result.first_nonfinite_forward is None:
                result.first_nonfinite_forward = name or "(model output)"
        for name, _ in self._grad_flags:
            if not flag_values[k] and result.first_nonfinite_backward is None:
                result.first_nonfinite_backward = (name, self._consumers.get(name))
            k += 1
        if self._inputs_finite is not None:
            result.inputs_nonfinite = not bool(flag_values[k])
        self._reset()
        return result


def _parse_outputs(specs: Sequence[_Spec], values: np.ndarray) -> tuple[list[LayerStats], int]:
    n = len(specs)
    width = HIST_BINS + 2
    scalars = values[:8 * n].reshape(n, 8)
    hists = values[8 * n:8 * n + n * width].reshape(n, width)
    cursor = 8 * n + n * width
    n_units = sum(s.shape[s.unit_dim] for s in specs if s.kind in BOUNDED or s.kind in RELU_LIKE)
    alive = values[cursor:cursor + n_units]
    cursor += n_units
    layers = []
    unit_cursor = 0
    for s, row, h in zip(specs, scalars, hists, strict=True):
        count, mean, m2, lo, hi, nonfinite, sat, inactive = row
        finite_count = max(count - nonfinite, 1)
        units = s.shape[s.unit_dim]
        dead = None
        sat_map = None
        if s.kind in BOUNDED or s.kind in RELU_LIKE:
            dead = int((alive[unit_cursor:unit_cursor + units] == 0).sum())
            unit_cursor += units
        if s.kind in BOUNDED:
            rows, cols = min(int(count) // units, MAP_ROWS), min(units, MAP_UNITS)
            sat_map = values[cursor:cursor + rows * cols].reshape(rows, cols) > 0.5
            cells = rows * cols
            cursor += cells
        layers.append(LayerStats(
            name=s.name, kind=s.kind, op=s.op, site=s.site, shape=s.shape, units=units,
            mean=float(mean), std=math.sqrt(max(m2, 0.0) / max(count - 1, 1)),
            min=float(lo), max=float(hi), nonfinite=int(nonfinite),
            saturated=float(sat / finite_count) if s.kind in BOUNDED else None,
            inactive=float(inactive / finite_count) if s.kind in RELU_LIKE else None,
            dead=dead, hist=h[1:-1].tolist(),
            hist_range=HIST_RANGE.get(s.kind, DEFAULT_HIST_RANGE), hist_outside=(float(h[0]), float(h[-1])),
            input_from=s.input_from, feeding=list(s.feeding), sat_map=sat_map,
        ))
    return layers, cursor

