"""Catch host synchronisations on the CPU, where CUDA's ``set_sync_debug_mode`` does not exist.

A training step must not wait for the device: nothing in it may read a tensor's value back into Python
(``.item()``, ``bool(t)``, ``int(t)``, ``if t.any():``) or produce a tensor whose *shape* depends on its
values (``nonzero``, boolean-mask indexing, ``unique``, ``masked_select``). On a GPU each of those blocks
until the queue drains and breaks CUDA graphs. They are the same ATen operators on every device, so
``forbid_host_syncs()`` intercepts them with a dispatch mode and raises, which lets a CPU-only test fail
when one creeps back into the step."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
# operators whose result needs the device's values on the host (value reads, data-dependent shapes)
SYNCING_OPS = {
    _aten._local_scalar_dense.default,  # .item(), bool(t), int(t), float(t)
    _aten.is_nonzero.default,
    _aten.nonzero.default,
    _aten.nonzero_static.default,
    _aten.masked_select.default,
    _aten._unique2.default,
    _aten.unique_dim.default,
    _aten.unique_consecutive.default,
    _aten.index.Tensor,  # only when indexed by a boolean mask, checked below
    _aten.equal.default,
}


class HostSyncError(RuntimeError):
    pass


class forbid_host_syncs(TorchDispatchMode):  # noqa: N801 (used as a context manager, like torch's modes)
    """Raise HostSyncError at the first operator that would make the host wait for the device's values."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCING_OPS:
            if func is _aten.index.Tensor:
                indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
                if any(i is not None and i.dtype == torch.bool for i in indices):
                    raise HostSyncError("boolean-mask indexing (its result's shape depends on the mask's values)")
            else:
                raise HostSyncError(f"{func} reads device values on the host")
        return func(*args, **kwargs)
