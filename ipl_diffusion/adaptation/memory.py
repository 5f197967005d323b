"""Peak memory of a Stage-2 run, recorded in ``run_config.json["memory"]``.

On a CUDA device the number is the caching allocator's peak (``torch.cuda.max_memory_allocated``)
over the whole of Stage 2. A CPU has no allocator statistics, so there the number is the peak
of the tensors autograd saves for the backward pass that are alive at once -- the part of a
step's memory that the gradient mode, gradient checkpointing and the layer policy change
(``benchmarks/stage2_memory.py`` compares them the same way). It is measured through
``torch.autograd.graph.saved_tensors_hooks`` on the first :data:`CPU_MEASURED_ITERATIONS`
iterations only: every iteration saves the same tensor sizes, and the hooks cost time.

A resumed run starts from the report its checkpoint recorded (same device): its peak is the
larger of the two, so resuming a finished run does not record 0.
"""

from __future__ import annotations

import contextlib

import torch

CPU_MEASURED_ITERATIONS = 2


class SavedTensorMeter:
    """Peak bytes of autograd-saved tensors alive at the same time, while entered."""

    def __init__(self):
        self.live = self.peak = 0

    def _pack(self, tensor):
        meter, nbytes = self, tensor.numel() * tensor.element_size()

        class Handle:  # counts the tensor while autograd holds it; its __del__ is the release
            def __init__(self):
                self.tensor = tensor
                meter.live += nbytes
                meter.peak = max(meter.peak, meter.live)

            def __del__(self):
                meter.live -= nbytes

        return Handle()

    @staticmethod
    def _unpack(handle):
        return handle.tensor

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


class PeakMemory:
    """Measures one run's peak on ``device``; :meth:`iteration` wraps each training iteration.
    ``earlier``: the :meth:`report` a resumed checkpoint recorded (ignored from another device)."""

    def __init__(self, device, earlier: dict | None = None):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        same_device = bool(earlier) and earlier.get("device") == str(self.device)
        self.earlier = int(earlier.get("peak_bytes", 0)) if same_device else 0
        self.peak = 0
        self.measured = 0
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    @contextlib.contextmanager
    def iteration(self):
        if self.cuda or self.measured >= CPU_MEASURED_ITERATIONS:
            yield
            return
        with SavedTensorMeter() as meter:
            yield
        self.peak = max(self.peak, meter.peak)
        self.measured += 1

    def report(self) -> dict | None:
        """``{"device", "peak_bytes", "peak_mib", "measure"}`` for ``run_config.json``; None on a
        CPU where nothing was measured (a finished run resumed from a checkpoint that predates
        the report): no number rather than 0."""
        if not self.cuda and not self.measured and not self.earlier:
            return None
        if self.cuda:
            peak, measure = torch.cuda.max_memory_allocated(self.device), "CUDA allocator peak over Stage 2"
        else:
            peak, measure = self.peak, f"autograd-saved tensors, peak over iterations 1-{CPU_MEASURED_ITERATIONS} (CPU)"
        peak = max(peak, self.earlier)
        return {"device": str(self.device), "peak_bytes": int(peak), "peak_mib": round(peak / 2**20, 2), "measure": measure}
