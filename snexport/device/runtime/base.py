"""The one runner contract every backend implements: load, run, close.

Validation, profiling and the on-device selector all drive engines through this contract, so a backend is
written once. Standard library only here; each backend imports its runtime lazily inside ``load``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Runner(Protocol):
    """A loaded engine that maps one input array to one output array.

    ``load()`` does the expensive part (reading the file, building the session/context) and is idempotent;
    ``run(x)`` takes a numpy float array shaped like ``input_shape`` (or a torch tensor for the torch backend)
    and returns the output as a numpy array; ``close()`` frees everything ``load()`` took.
    """

    backend: str  # "onnxruntime" | "tensorrt" | "torch"
    input_name: str
    input_shape: tuple
    output_name: str

    def load(self) -> None: ...

    def run(self, x: Any) -> Any: ...

    def close(self) -> None: ...


class RunnerContext:
    """`with runner:` loads on entry and closes on exit; every backend's runner inherits this."""

    def __enter__(self):
        self.load()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
