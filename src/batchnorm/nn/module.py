"""Module and Parameter: the small base that every NumPy layer builds on.

A layer computes ``forward(x)`` and, given dL/dy, ``backward(dy)`` returning dL/dx while
accumulating parameter gradients into ``Parameter.grad`` (as PyTorch's autograd does).
Parameters and child modules are found among the instance attributes; buffers are the
arrays named with :meth:`Module.register_buffer`. State dicts use PyTorch's key names.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np


class Parameter:
    """A learnable array ``data`` and its accumulated gradient ``grad`` (None until set)."""

    def __init__(self, data: Any):
        self.data = np.asarray(data)
        self.grad: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    def accumulate(self, grad: np.ndarray) -> None:
        """Add ``grad`` into ``self.grad`` in the parameter's dtype."""
        grad = np.asarray(grad, dtype=self.data.dtype).reshape(self.data.shape)
        if self.grad is None:
            self.grad = grad.copy()
        else:
            self.grad += grad

    def __repr__(self) -> str:
        return f"Parameter(shape={self.shape}, dtype={self.dtype})"


def as_numpy(value: Any) -> np.ndarray:
    """An ndarray from an ndarray, a scalar or a torch tensor (on any device)."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().cpu().numpy()
    return np.asarray(value)


class Module:
    """Base class of layers: parameters, buffers, children, train/eval, state dicts."""

    _optional_state: tuple[str, ...] = ()  # state_dict entries a checkpoint may lack

    def __init__(self) -> None:
        self.training = True
        self._buffer_names: list[str] = []

    # -- computation ------------------------------------------------------------------
    def forward(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def backward(self, dy: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)

    # -- structure --------------------------------------------------------------------
    def register_buffer(self, name: str, value: np.ndarray | None) -> None:
        if name not in self._buffer_names:
            self._buffer_names.append(name)
        setattr(self, name, value)

    def named_children(self) -> Iterator[tuple[str, Module]]:
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value

    def children(self) -> Iterator[Module]:
        for _, child in self.named_children():
            yield child

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        yield prefix, self
        for name, child in self.named_children():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self) -> Iterator[Module]:
        for _, module in self.named_modules():
            yield module

    def named_parameters(self) -> Iterator[tuple[str, Parameter]]:
        for prefix, module in self.named_modules():
            for name, value in vars(module).items():
                if isinstance(value, Parameter):
                    yield (f"{prefix}.{name}" if prefix else name), value

    def parameters(self) -> Iterator[Parameter]:
        for _, param in self.named_parameters():
            yield param

    def named_buffers(self) -> Iterator[tuple[str, np.ndarray]]:
        for prefix, module in self.named_modules():
            for name in module._buffer_names:
                value = getattr(module, name)
                if value is not None:
                    yield (f"{prefix}.{name}" if prefix else name), value

    def train(self, mode: bool = True) -> Module:
        for module in self.modules():
            module.training = mode
        return self

    def eval(self) -> Module:
        return self.train(False)

    def zero_grad(self) -> None:
        for param in self.parameters():
            param.grad = None

    # -- state ------------------------------------------------------------------------
    def state_dict(self) -> OrderedDict[str, np.ndarray]:
        """Copies of parameters then buffers, per module, under PyTorch's key names."""
        state: OrderedDict[str, np.ndarray] = OrderedDict()
        for prefix, module in self.named_modules():
            pre = f"{prefix}." if prefix else ""
            for name, value in vars(module).items():
                if isinstance(value, Parameter):
                    state[pre + name] = value.data.copy()
            for name in module._buffer_names:
                value = getattr(module, name)
                if value is not None:
                    state[pre + name] = np.array(value, copy=True)
        return state

    def _state_slots(self) -> dict[str, tuple[Module, str]]:
        slots: dict[str, tuple[Module, str]] = {}
        for prefix, module in self.named_modules():
            pre = f"{prefix}." if prefix else ""
            for name, value in vars(module).items():
                if isinstance(value, Parameter):
                    slots[pre + name] = (module, name)
            for name in module._buffer_names:
                if getattr(module, name) is not None:
                    slots[pre + name] = (module, name)
        return slots

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> None:
        """Copy values in (numpy arrays or torch tensors); all are checked before any is set.

        Raises KeyError naming missing or unexpected keys (when strict) and ValueError
        naming a key whose shape differs. Entries a layer lists in ``_optional_state`` may
        be missing (older checkpoints): they keep their current value, as in PyTorch.
        """
        slots = self._state_slots()
        missing = [
            k
            for k, (module, name) in slots.items()
            if k not in state_dict and name not in module._optional_state
        ]
        unexpected = [k for k in state_dict if k not in slots]
        if strict and (missing or unexpected):
            raise KeyError(
                f"state_dict does not match the module: missing keys {missing}, "
                f"unexpected keys {unexpected}"
            )
        staged: list[tuple[Module, str, np.ndarray]] = []
        for key, (module, name) in slots.items():
            if key not in state_dict:
                continue
            value = as_numpy(state_dict[key])
            current = getattr(module, name)
            target = current.data if isinstance(current, Parameter) else np.asarray(current)
            if value.shape != target.shape:
                raise ValueError(
                    f"state_dict[{key!r}] has shape {value.shape}, expected {target.shape}"
                )
            if not np.can_cast(value.dtype, target.dtype, casting="same_kind"):
                raise TypeError(
                    f"state_dict[{key!r}] has dtype {value.dtype}, expected {target.dtype}"
                )
            staged.append((module, name, value))
        for module, name, value in staged:
            current = getattr(module, name)
            if isinstance(current, Parameter):
                current.data[...] = value
            else:
                current[...] = value

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        children = list(self.named_children())
        head = f"{type(self).__name__}({self.extra_repr()}"
        if not children:
            return head + ")"
        lines = [head]
        for name, child in children:
            body = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {body}")
        return "\n".join(lines) + "\n)"


def save(state_dict: Mapping[str, Any], path: str | Path) -> None:
    """Write a state dict to an ``.npz`` file (no pickle)."""
    arrays = {key: as_numpy(value) for key, value in state_dict.items()}
    for key, value in arrays.items():
        if value.dtype == object:
            raise TypeError(f"state_dict[{key!r}] is not a numeric array")
    np.savez(Path(path), **arrays)  # type: ignore[arg-type]


def load(path: str | Path) -> OrderedDict[str, np.ndarray]:
    """Read a state dict written by :func:`save`, without unpickling anything."""
    with np.load(Path(path), allow_pickle=False) as data:
        return OrderedDict((key, data[key]) for key in data.files)
