"""The stitching layer and its least-squares initialisation (snnet-spec.md, "Stitching layer").

A stitching layer maps the front anchor's features at the cut to the back anchor's width at the same position,
one pixel or token at a time: a 1x1 map with bias, no norm, no activation. Its module follows the layouts:
- tokens → tokens (ViT, Swin (B, H, W, C) maps): ``nn.Linear(C_front, C_back)`` on the last dimension;
- NCHW → NCHW (CNN → CNN, official ResNet-18→50): ``nn.Conv2d(C_front, C_back, 1)``;
- NCHW → tokens or (B, H, W, C) (CNN → Swin, official ResNet-18→Swin-T): ``ChannelsLastLinear``, which moves the
  channels last at the same H×W (and flattens to (B, H·W, C) for a token sequence), then applies the linear map.
  The official code applies the 1x1 conv first and flattens after; both compute the same, with the same FLOPs.
It starts from the least-squares map between the two anchors' features on a small calibration set (100 images
by default), rows = images × pixels (or tokens): the Moore-Penrose pseudo-inverse solution, so stitches work
before any training. ``LeastSquaresFit`` computes that solution from the normal equations, summed batch by batch
(no feature map is kept, one Gram matrix per front position serves all its targets); ``pinv_with_bias`` is the
direct pseudo-inverse, used below ``NORMAL_EQUATIONS_MIN_ROWS`` rows and as the reference the tests compare with.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ChannelsLastLinear(nn.Linear):
    """A linear stitching layer between feature layouts: (B, C, H, W) or (B, H, W, C) in, the back's layout out.

    Subclasses nn.Linear so its parameters are ``weight`` (C_back, C_front) and ``bias``, like every other layer.
    """

    def __init__(self, width_front: int, width_back: int, layout_front: str, layout_back: str):
        super().__init__(width_front, width_back, bias=True)
        self.layout_front = layout_front
        self.layout_back = layout_back

    def effective_weight(self) -> torch.Tensor:
        return self.weight  # a low-rank variant adds its update here (LoRAChannelsLastLinear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout_front == "nchw":
            x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        x = F.linear(x, self.effective_weight(), self.bias)
        if self.layout_back == "tokens":
            return x.flatten(1, 2)
        if self.layout_back == "nchw":
            return x.permute(0, 3, 1, 2)
        return x

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.layout_front}->{self.layout_back}"


def make_stitching_layer(width_front: int, width_back: int, layout_front: str = "tokens",
                         layout_back: str = "tokens", lora_rank: int = 0) -> nn.Module:
    """The stitching layer between two feature layouts ("tokens", "nhwc" or "nchw"; see the module docstring).

    ``lora_rank`` > 0: the SN-Netv2 variant of the same layer (``LowRankUpdate``), whose least-squares weight is
    frozen and whose rank-r update and bias are trained; ``merge_low_rank`` turns it back into the plain layer.
    """
    if layout_front == "tokens" and layout_back != "tokens":
        raise ValueError(f"a token sequence has no spatial shape to feed a {layout_back} feature map")
    if layout_front == layout_back == "nchw":
        if lora_rank:
            return LoRAConv2d(width_front, width_back, lora_rank)
        return nn.Conv2d(width_front, width_back, kernel_size=1, bias=True)
    if layout_front == layout_back:
        if lora_rank:
            return LoRALinear(width_front, width_back, lora_rank)
        return nn.Linear(width_front, width_back, bias=True)
    if lora_rank:
        return LoRAChannelsLastLinear(width_front, width_back, layout_front, layout_back, lora_rank)
    return ChannelsLastLinear(width_front, width_back, layout_front, layout_back)


# ------------------------------------------------------------------ SN-Netv2: low-rank (LoRA) stitching layers


class LowRankUpdate:
    """SN-Netv2's LoRA stitching layer, as a mixin over the plain layer: W = W_LS + (alpha/r)·B·A.

    W_LS (``weight``, filled by the least-squares init) is frozen; ``lora_A`` (r × C_in, Kaiming-uniform with
    a = √5, as nn.Linear's own init) and ``lora_B`` (C_out × r, zeros, so training starts at exactly the LS map)
    and the bias are trained; alpha = 1 (official). The update is added to the weight on every forward rather than
    merged in place on eval() as the official code does: no hidden merged state, a state dict always holds the
    factors apart (checkpoints, official ``lora_A``/``lora_B`` keys), and eval logits equal the official merged
    layer's. ``merged()`` gives the plain layer (one weight) that export and ``materialize`` use.
    """

    def _add_low_rank(self, rank: int, alpha: float = 1.0) -> None:
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        out_features, in_features = self.weight.shape[0], self.weight.shape[1]
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.rank = int(rank)
        self.lora_alpha = float(alpha)
        self.scaling = self.lora_alpha / self.rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.weight.requires_grad_(False)

    def effective_weight(self) -> torch.Tensor:
        delta = (self.lora_B @ self.lora_A) * self.scaling
        return self.weight + delta.reshape(self.weight.shape)

    def merged(self) -> nn.Module:
        """The plain stitching layer computing the same map (weight = W_LS + update), on the same device."""
        plain = self._plain()
        with torch.no_grad():
            plain.weight.copy_(self.effective_weight())
            plain.bias.copy_(self.bias)
        return plain.to(self.weight.device).train(self.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora_rank={self.rank}"


class LoRALinear(LowRankUpdate, nn.Linear):
    def __init__(self, width_front: int, width_back: int, rank: int, alpha: float = 1.0):
        nn.Linear.__init__(self, width_front, width_back, bias=True)
        self._add_low_rank(rank, alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)

    def _plain(self) -> nn.Module:
        return nn.Linear(self.in_features, self.out_features, bias=True)


class LoRAConv2d(LowRankUpdate, nn.Conv2d):
    """1x1 convolution (CNN → CNN) with the low-rank update on its (C_out, C_in) weight."""

    def __init__(self, width_front: int, width_back: int, rank: int, alpha: float = 1.0):
        nn.Conv2d.__init__(self, width_front, width_back, kernel_size=1, bias=True)
        self._add_low_rank(rank, alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.effective_weight(), self.bias)

    def _plain(self) -> nn.Module:
        return nn.Conv2d(self.in_channels, self.out_channels, kernel_size=1, bias=True)


class LoRAChannelsLastLinear(LowRankUpdate, ChannelsLastLinear):
    def __init__(self, width_front: int, width_back: int, layout_front: str, layout_back: str, rank: int,
                 alpha: float = 1.0):
        ChannelsLastLinear.__init__(self, width_front, width_back, layout_front, layout_back)
        self._add_low_rank(rank, alpha)

    def _plain(self) -> nn.Module:
        return ChannelsLastLinear(self.in_features, self.out_features, self.layout_front, self.layout_back)


def merge_low_rank(module: nn.Module) -> nn.Module:
    """Replace every low-rank stitching layer inside ``module`` (in place) by its merged plain layer, so an
    exported stitch has exactly the ops and parameters of a plain one. Returns ``module`` (or the merged layer
    when ``module`` itself is one)."""
    if isinstance(module, LowRankUpdate):
        return module.merged()
    for name, child in list(module.named_children()):
        if isinstance(child, LowRankUpdate):
            setattr(module, name, child.merged())
        else:
            merge_low_rank(child)
    return module


def feature_rows(x: torch.Tensor, layout: str = "tokens") -> torch.Tensor:
    """Features as (images × pixels or tokens, C), channels last, in the same pixel order for every layout."""
    if layout == "nchw":
        x = x.permute(0, 2, 3, 1)
    return x.reshape(-1, x.shape[-1])


def pinv_with_bias(x: torch.Tensor, layout: str = "tokens") -> torch.Tensor:
    """pinv([X, 1]) for X as (rows, C): computed once per front cut and reused for every target.

    Solved in float64, with the cutoff of the official code's float32 ``torch.linalg.pinv``: singular values below
    max(rows, C+1)·eps(float32)·σ_max are dropped. Without it, near-dead channels (ReLU features of a CNN stage)
    get weights in the hundreds, which fit the calibration set no better and lose the stitch in FP16.
    """
    a = _with_bias(feature_rows(x, layout))
    return torch.linalg.pinv(a, rtol=pinv_rtol(*a.shape))


def pinv_rtol(rows: int, columns: int) -> float:
    """The pseudo-inverse's cutoff relative to σ_max: that of the official float32 ``torch.linalg.pinv``."""
    return max(rows, columns) * torch.finfo(torch.float32).eps


def _with_bias(rows: torch.Tensor) -> torch.Tensor:
    """[X, 1] in float64."""
    x64 = rows.to(torch.float64)
    return torch.cat([x64, torch.ones(x64.shape[0], 1, dtype=torch.float64)], dim=1)


def least_squares_solution(x_pinv: torch.Tensor, y: torch.Tensor,
                           layout: str = "tokens") -> tuple[torch.Tensor, torch.Tensor]:
    """Solve min ||[X, 1] M - Y|| given pinv([X, 1]); returns (weight (C_b, C_f), bias (C_b,))."""
    y64 = feature_rows(y, layout).to(torch.float64)
    m = x_pinv @ y64  # (C_f + 1, C_b)
    return m[:-1].T.contiguous(), m[-1].contiguous()


# ------------------------------------------------------------ the same solution from the normal equations
#
# Why the normal equations reproduce pinv here: [X, 1] = U·Σ·Vᵀ gives G = [X, 1]ᵀ[X, 1] = V·Σ²·Vᵀ, so the
# eigenvectors of G are pinv's singular vectors, its eigenvalues the squared singular values, and pinv's solution
# is V_r·Σ_r⁻²·V_rᵀ·[X, 1]ᵀY over the kept σ_i > rtol·σ_max. Forming G squares the condition number, which is why
# the normal equations are usually avoided -- but pinv's own cutoff caps what is kept: κ(G_kept) ≤ 1/rtol², with
# rtol = max(rows, C+1)·eps(float32). In float64 the solution then differs from pinv's by about
# eps(float64)/rtol² times a growth factor ≤ rows: with ≥ 1024 rows that is ≤ 1.1e-16 · 1024 / (1024·1.19e-7)²
# = 7.6e-6 in the worst case, ~1e-9 typically (100 DeiT images: 19,700 rows, bound 4e-7). Below 1024 rows the
# rows are kept and pinv itself is used (cheap at that size).
# When no singular value falls under the cutoff (certified by bounds, ``_no_singular_value_cut``), a Cholesky
# solve is that solution (measured on 2 cores: 0.06 s at n = 385 and 0.08 s at n = 769, against 0.2-0.6 s and
# 3.6-11 s for an eigendecomposition); otherwise the eigendecomposition of G, truncated at pinv's cutoff.
NORMAL_EQUATIONS_MIN_ROWS = 1024
_CHUNK_ROWS = 16384  # float64 rows converted at once: bounds the temporaries to ~chunk·(C_f + ΣC_b)·8 bytes


class LeastSquaresFit:
    """min ||[X, 1]·M − Y_t|| for one X (a front position) and any number of targets Y_t, fed batch by batch.

    Holds [X, 1]ᵀ[X, 1] and [X, 1]ᵀ[Y_1, Y_2, ...] in float64 ((C+1)·(C+1+ΣC_t) numbers, whatever the number of
    rows): one Gram matrix serves every target, and no feature map outlives its batch. ``solve`` gives, per
    target, pinv([X, 1])·Y_t (to ~1e-9 relative; see above) as (weight (C_t, C), bias (C_t,)).
    """

    def __init__(self, width: int, target_widths: list[int], min_rows: int = NORMAL_EQUATIONS_MIN_ROWS):
        self.width = int(width)
        self.target_widths = [int(w) for w in target_widths]
        self.min_rows = int(min_rows)
        self.rows = 0
        self._kept: list[tuple[torch.Tensor, torch.Tensor]] = []  # raw (X, Y) rows until min_rows arrived
        self._gram: torch.Tensor | None = None  # [X, 1]ᵀ[X, 1]: (C+1, C+1), float64
        self._cross: torch.Tensor | None = None  # [X, 1]ᵀ[Y_1, Y_2, ...]: (C+1, ΣC_t), float64

    def add(self, x_rows: torch.Tensor, targets: list[torch.Tensor]) -> None:
        """One batch: X as (rows, C) and each target as (rows, C_t), rows in the same order (``feature_rows``)."""
        if len(targets) != len(self.target_widths):
            raise ValueError(f"expected {len(self.target_widths)} targets, got {len(targets)}")
        y64 = [t.to(torch.float64) for t in targets]
        y = y64[0] if len(y64) == 1 else torch.cat(y64, dim=1)  # (one target: no copy)
        if y.shape != (x_rows.shape[0], sum(self.target_widths)) or x_rows.shape[1] != self.width:
            raise ValueError(f"batch shapes {tuple(x_rows.shape)} / {tuple(y.shape)} do not fit width "
                             f"{self.width} and targets {self.target_widths}")
        self.rows += x_rows.shape[0]
        if self._gram is None:
            self._kept.append((x_rows, y))
            if self.rows < self.min_rows:
                return
            x_rows = torch.cat([x for x, _ in self._kept])
            y = torch.cat([t for _, t in self._kept])
            self._kept = []
            n = self.width + 1
            self._gram = torch.zeros(n, n, dtype=torch.float64)
            self._cross = torch.zeros(n, y.shape[1], dtype=torch.float64)
        for start in range(0, x_rows.shape[0], _CHUNK_ROWS):
            a = _with_bias(x_rows[start:start + _CHUNK_ROWS])
            # float32 features multiply exactly in float64; only the sums round.
            self._gram.addmm_(a.T, a)
            self._cross.addmm_(a.T, y[start:start + _CHUNK_ROWS])

    def solve(self) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], str]:
        """Per target (weight, bias) in float64, and how it was solved: "pinv", "cholesky" or "eigh"."""
        if self.rows == 0:
            raise ValueError("no rows were added")
        if self._gram is None:  # few rows: the pseudo-inverse itself
            x = torch.cat([x for x, _ in self._kept])
            y = torch.cat([t for _, t in self._kept])
            m, method = pinv_with_bias(x) @ y, "pinv"
        else:
            m, method = solve_normal_equations(self._gram, self._cross, self.rows)
        out = []
        for part in m.split(self.target_widths, dim=1):
            out.append((part[:-1].T.contiguous(), part[-1].contiguous()))
        return out, method


def solve_normal_equations(gram: torch.Tensor, cross: torch.Tensor, rows: int) -> tuple[torch.Tensor, str]:
    """pinv(A)·Y from G = AᵀA and AᵀY (A with ``rows`` rows), with pinv's cutoff ``pinv_rtol(rows, n)``."""
    rtol = pinv_rtol(rows, gram.shape[0])
    chol, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0 and _no_singular_value_cut(gram, chol, rtol):
        return torch.cholesky_solve(cross, chol), "cholesky"
    eigenvalues, vectors = torch.linalg.eigh(gram)
    keep = eigenvalues > rtol ** 2 * eigenvalues[-1]  # σ_i > rtol·σ_max, pinv's rule, on σ_i² = λ_i
    v = vectors[:, keep]
    return v @ ((v.T @ cross) / eigenvalues[keep].unsqueeze(1)), "eigh"


def _no_singular_value_cut(gram: torch.Tensor, chol: torch.Tensor, rtol: float, margin: float = 2.0) -> bool:
    """True when provably λ_min(G) > rtol²·λ_max(G) (with ``margin``): pinv keeps every direction, so the
    Cholesky solution is its solution. Uses upper bounds on λ_max(G) and λ_max(G⁻¹) = 1/λ_min(G), each within a
    factor n^(1/8) of the truth, so only spectra within ~2·n^(1/4) of the cutoff go to the eigendecomposition."""
    upper = _largest_eigenvalue_bound(gram)
    inverse_upper = _largest_eigenvalue_bound(torch.cholesky_inverse(chol))
    if not (math.isfinite(upper) and math.isfinite(inverse_upper)) or inverse_upper <= 0:
        return False
    return 1.0 / inverse_upper > margin * rtol ** 2 * upper


def _largest_eigenvalue_bound(h: torch.Tensor, squarings: int = 2) -> float:
    """An upper bound on the largest eigenvalue of a symmetric positive semi-definite matrix.

    λ_max^(2q) ≤ Σ λ_i^(2q) = ||H^q||_F², so λ_max ≤ ||H^q||_F^(1/q) with q = 2^squarings, which overshoots by at
    most n^(1/(2q)) (n^(1/8) = 2.1 for n = 385). Each squaring is rescaled to stay in range; the scales are summed
    as logarithms.
    """
    log_bound, power = 0.0, 1  # after i squarings h = H^(2^i) / scale, and log_bound = log(scale) / 2^i
    for _ in range(squarings):
        norm = float(torch.linalg.matrix_norm(h))
        if norm == 0.0 or not math.isfinite(norm):
            return norm
        log_bound += math.log(norm) / power
        h = h / norm
        h = h @ h
        power *= 2
    norm = float(torch.linalg.matrix_norm(h))
    if norm == 0.0 or not math.isfinite(norm):
        return norm
    return math.exp(log_bound + math.log(norm) / power)


@torch.no_grad()
def assign_mean_solution(layer: nn.Module, solutions: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """A layer shared by several (j, k) pairs gets the mean of their solutions (weights and biases).

    A 1x1 convolution takes the (C_b, C_f) weight as (C_b, C_f, 1, 1).
    """
    weight = torch.stack([w for w, _ in solutions]).mean(0)
    bias = torch.stack([b for _, b in solutions]).mean(0)
    layer.weight.copy_(weight.reshape(layer.weight.shape).to(layer.weight.dtype))
    layer.bias.copy_(bias.to(layer.bias.dtype))
