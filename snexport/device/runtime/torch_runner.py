"""PyTorch backend of the runner contract: runs an in-memory ``nn.Module`` (a materialised stitch).

It is the reference the exported engines are validated against and the baseline they are profiled against,
so it runs the module the way a deployment would: eval mode, no autograd, optionally as a replayed CUDA graph.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from snexport.errors import BackendUnavailableError
from snexport.device.runtime.base import RunnerContext


class TorchRunner(RunnerContext):
    """``TorchRunner(module, input_shape, device="cpu"|"cuda", cuda_graphs=False)``.

    ``input_shape`` is the full input shape including the batch dimension, e.g. ``(1, 3, 224, 224)``.
    With ``cuda_graphs=True`` the forward pass is captured once after warm-up and replayed: one launch instead
    of one per kernel, which is what makes small ViTs latency-bound rather than launch-bound on a GPU. A graph
    reads fixed addresses, so inputs are copied into a static buffer before each replay.
    """

    backend = "torch"
    input_name = "input"
    output_name = "output"

    def __init__(
        self,
        module: Any,
        input_shape: Sequence[int],
        device: str = "cpu",
        cuda_graphs: bool = False,
        warmup: int = 3,
        dtype: Optional[Any] = None,
    ):
        self.module = module
        self.input_shape = tuple(int(d) for d in input_shape)
        self.device = str(device)
        self.cuda_graphs = bool(cuda_graphs)
        self.warmup = int(warmup)
        self._dtype = dtype
        self.input_dtype = ""
        self._loaded = False
        self._graph = self._static_in = self._static_out = None

    def load(self) -> None:
        if self._loaded:
            return
        import torch

        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailableError(
                f"device '{self.device}' was requested but torch sees no CUDA GPU here; use device='cpu'"
            )
        if self.cuda_graphs and not self.device.startswith("cuda"):
            raise BackendUnavailableError("cuda_graphs=True needs device='cuda'; drop cuda_graphs for CPU runs")
        if self._dtype is None:
            # Follow the module: a .half() stitch takes half inputs.
            floats = [p.dtype for p in self.module.parameters() if p.is_floating_point()]
            self._dtype = floats[0] if floats else torch.float32
        self.input_dtype = str(self._dtype).replace("torch.", "")
        self.module = self.module.eval().to(self.device)
        if self.cuda_graphs:
            self._capture(torch)
        self._loaded = True

    def _capture(self, torch) -> None:
        static_in = torch.zeros(self.input_shape, dtype=self._dtype, device=self.device)
        with torch.no_grad():
            # Warm up on a side stream, as capture requires: lazy initialisation (cuBLAS handles, autotuning)
            # must not happen inside the captured region.
            side = torch.cuda.Stream(device=self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(max(1, self.warmup)):
                    self.module(static_in)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.module(static_in)
        self._graph, self._static_in, self._static_out = graph, static_in, static_out

    def run(self, x: Any) -> Any:
        """Run one batch; ``x`` is a numpy array or torch tensor; returns the output as a numpy array."""
        import torch

        if not self._loaded:
            self.load()
        x = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
        if self._graph is not None:
            with torch.no_grad():
                self._static_in.copy_(x.reshape(self.input_shape))
                self._graph.replay()
                # .cpu() waits for the replay and copies out of the static buffer the next replay overwrites.
                return _to_numpy(torch, self._static_out)
        with torch.inference_mode():
            return _to_numpy(torch, self.module(x.to(device=self.device, dtype=self._dtype)))

    def close(self) -> None:
        self._graph = self._static_in = self._static_out = None
        self._loaded = False

    @property
    def settings(self) -> dict:
        return {
            "backend": self.backend,
            "device": self.device,
            "cuda_graphs": self.cuda_graphs,
            "dtype": self.input_dtype or None,
        }


def _to_numpy(torch, tensor):
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16
        tensor = tensor.float()
    return tensor.detach().cpu().numpy()
