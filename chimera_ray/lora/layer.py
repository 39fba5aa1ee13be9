"""The multi-head LoRA linear layer: one shared down-projection, one up-projection head per shot.

Shapes (per adapted ``nn.Linear`` with frozen ``W0: (out, in)``)::

    lora_A     (G, r, in)    G = 1 (chimera, classwise) or K (imagewise: an A per shot)
    lora_B     (K, out, r)   one head per shot, zero-initialised
    head_group (K,)          which A each head uses (all 0 when A is shared)

    y = W0 x + s * B_k (A_{g(k)} x),   s = lora_alpha / r

The layer is stateful the way peft's adapter switching is: the code that owns the UNet
sets a per-sample *routing state* before calling it (the UNet's forward cannot carry
extra arguments down to every projection). Three states:

* ``set_heads(head_index)``: training; sample n uses head ``head_index[n]``.
* ``set_mixture(weights, class_index)``: generation; sample n uses ``B' = sum_k w[n,k] B_k``
  of class ``class_index[n]`` from a bank of classes (``load_bank``) or the layer's own heads.
  ``B'`` is built once here and reused by every denoising step.
* ``set_factors(A', B')``: precomputed per-sample factors ``(n, R, in)``, ``(n, out, R)``.

All three run as batched matmuls (``torch.bmm``), no per-sample Python loop, so one batch
can hold different classes and different mixtures. Classifier-free guidance doubles the
UNet batch ``[uncond..., cond...]``: pass ``cfg=True`` to repeat the state to match.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MultiHeadLoRALinear", "mixture_factors"]


def mixture_factors(
    bank_A: torch.Tensor,
    bank_B: torch.Tensor,
    shared_a: bool,
    class_index: torch.Tensor,
    weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample low-rank factors of a head mixture.

    Args:
        bank_A: ``(C, G, r, in)`` A matrices of C classes (G = 1 when shared).
        bank_B: ``(C, K, out, r)`` heads of C classes (zero-padded to K heads).
        shared_a: whether each class has one A for all its heads.
        class_index: ``(n,)`` long, class slot of each sample.
        weights: ``(n, K)`` mixture weights (zero on padded heads).

    Returns:
        ``A': (n, R, in)`` and ``B': (n, out, R)`` with ``R = r`` when A is shared. For
        independent A's (imagewise) only heads with a non-zero weight somewhere in the batch
        are kept, ``R = m * r`` for at most m mixed heads per sample (m = 1 or 2 for LoFT).
    """
    A_c = bank_A[class_index]  # (n, G, r, in)
    B_c = bank_B[class_index]  # (n, K, out, r)
    w = weights.to(B_c.dtype)
    if shared_a:
        return A_c[:, 0], torch.einsum("nk,nkor->nor", w, B_c)
    # imagewise: sum_k w_k B_k A_k = [w_1 B_1 | ... | w_m B_m] @ [A_1; ...; A_m]
    m = int((w != 0).sum(dim=1).max().clamp(min=1))
    top_w, top_k = w.topk(m, dim=1)  # (n, m)
    n, _, out, r = B_c.shape
    idx = top_k[:, :, None, None]
    A_sel = torch.gather(A_c, 1, idx.expand(n, m, *A_c.shape[2:]))  # (n, m, r, in)
    B_sel = torch.gather(B_c, 1, idx.expand(n, m, out, r)) * top_w[:, :, None, None]
    return A_sel.reshape(n, m * r, -1), B_sel.permute(0, 2, 1, 3).reshape(n, out, m * r)


class MultiHeadLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a shared-A, multi-head-B LoRA.

    Args:
        base: the linear layer to adapt; its parameters are frozen.
        rank: LoRA rank r.
        lora_alpha: LoRA scale numerator (scale = lora_alpha / rank).
        num_heads: K, number of B heads (shots of the class; 1 for classwise).
        shared_a: one A for all heads (chimera, classwise) or one per head (imagewise).
        init_a: "kaiming" (peft's default: Kaiming-uniform, a=sqrt(5)) or "gaussian" (peft's
            ``init_lora_weights="gaussian"``: N(0, 1/rank^2), the paper's initialisation).
    """

    def __init__(self, base: nn.Linear, rank: int, lora_alpha: float, num_heads: int, shared_a: bool = True,
                 init_a: str = "kaiming"):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"MultiHeadLoRALinear wraps nn.Linear, got {type(base).__name__}")
        if rank < 1 or num_heads < 1:
            raise ValueError(f"rank and num_heads must be >= 1 (got rank={rank}, num_heads={num_heads})")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.rank = rank
        self.lora_alpha = float(lora_alpha)
        self.scaling = self.lora_alpha / rank
        self.num_heads = num_heads
        self.shared_a = shared_a
        groups = 1 if shared_a else num_heads
        dev = base.weight.device
        # LoRA weights stay float32 even when the base runs in half precision.
        self.lora_A = nn.Parameter(torch.empty(groups, rank, base.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(num_heads, base.out_features, rank, device=dev))
        if init_a not in ("kaiming", "gaussian"):
            raise ValueError(f"init_a must be kaiming or gaussian (got {init_a!r})")
        for g in range(groups):  # peft's inits; B is zero either way -> step 0 is the base model
            if init_a == "gaussian":
                nn.init.normal_(self.lora_A.data[g], std=1.0 / rank)
            else:
                nn.init.kaiming_uniform_(self.lora_A.data[g], a=math.sqrt(5))
        head_group = torch.zeros(num_heads, dtype=torch.long) if shared_a else torch.arange(num_heads)
        self.register_buffer("head_group", head_group.to(dev), persistent=False)
        self.bank_A: torch.Tensor | None = None
        self.bank_B: torch.Tensor | None = None
        self._heads: torch.Tensor | None = None
        self._factors: tuple[torch.Tensor, torch.Tensor] | None = None
        self._disabled = False

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def extra_repr(self) -> str:
        return f"rank={self.rank}, lora_alpha={self.lora_alpha}, heads={self.num_heads}, shared_a={self.shared_a}"

    # ---- routing state -----------------------------------------------------------------

    def clear_state(self) -> None:
        """Forgets routing state and disabled flag."""
        self._heads, self._factors, self._disabled = None, None, False

    def set_disabled(self, disabled: bool = True) -> None:
        """Disabled: the layer returns the frozen base output (``base`` mode)."""
        self.clear_state()
        self._disabled = disabled

    def set_heads(self, head_index: torch.Tensor, cfg: bool = False) -> None:
        """Training routing: sample n goes through head ``head_index[n]``.

        Args:
            head_index: ``(n,)`` integer tensor with values in ``[0, num_heads)``.
            cfg: repeat for a classifier-free-guidance doubled batch ``[uncond, cond]``.
        """
        head_index = torch.as_tensor(head_index)
        if head_index.ndim != 1 or head_index.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"head_index must be a 1-D integer tensor (got shape {tuple(head_index.shape)}, {head_index.dtype})")
        if head_index.numel() and (int(head_index.min()) < 0 or int(head_index.max()) >= self.num_heads):
            raise ValueError(
                f"head_index values must be in [0, {self.num_heads}) for a layer with {self.num_heads} heads "
                f"(got min {int(head_index.min())}, max {int(head_index.max())})"
            )
        self.clear_state()
        head_index = head_index.to(self.lora_B.device, torch.long)
        self._heads = torch.cat([head_index, head_index]) if cfg else head_index

    def load_bank(self, adapters: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Stacks several classes' adapters for mixed-class batches (generation).

        Args:
            adapters: per class slot, ``(A: (G_c, r, in), B: (K_c, out, r))``. Heads are
                zero-padded to the largest K; with independent A's (imagewise) the A stack
                is padded the same way.
        """
        if not adapters:
            raise ValueError("load_bank needs at least one adapter")
        k_max = max(B.shape[0] for _, B in adapters)
        g_max = max(A.shape[0] for A, _ in adapters)
        dev = self.lora_B.device
        bank_A = torch.zeros(len(adapters), g_max, self.rank, self.in_features, device=dev)
        bank_B = torch.zeros(len(adapters), k_max, self.out_features, self.rank, device=dev)
        for c, (A, B) in enumerate(adapters):
            if A.shape[1:] != (self.rank, self.in_features) or B.shape[1:] != (self.out_features, self.rank):
                raise ValueError(
                    f"adapter {c} has A {tuple(A.shape)} / B {tuple(B.shape)}, expected (*, {self.rank}, "
                    f"{self.in_features}) / (*, {self.out_features}, {self.rank}); was it trained with another rank or base model?"
                )
            if self.shared_a and A.shape[0] != 1:
                raise ValueError(f"adapter {c} has {A.shape[0]} A matrices but this layer shares one A (mode mismatch)")
            bank_A[c, : A.shape[0]] = A.to(dev, bank_A.dtype)
            bank_B[c, : B.shape[0]] = B.to(dev, bank_B.dtype)
        self.bank_A, self.bank_B = bank_A, bank_B

    def set_mixture(
        self,
        weights: torch.Tensor,
        class_index: torch.Tensor | None = None,
        cfg: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Generation routing: sample n uses ``B' = sum_k weights[n, k] B_k`` of its class.

        ``B'`` is computed here, once per image, and reused by every UNet call until the
        state changes (the mixture is constant over the denoising steps).

        Args:
            weights: ``(n, K)`` non-negative weights summing to 1 per row (K = heads of the
                bank, or of this layer when no bank is loaded).
            class_index: ``(n,)`` class slot in the bank; None uses the layer's own heads.
            cfg: repeat the state for a classifier-free-guidance doubled batch.
            dtype: dtype of the stored factors (default: the base weight's dtype).
        """
        if class_index is None:
            bank_A, bank_B = self.lora_A.detach()[None], self.lora_B.detach()[None]
            class_index = torch.zeros(weights.shape[0], dtype=torch.long)
        else:
            if self.bank_A is None:
                raise ValueError("set_mixture got a class_index but no bank is loaded; call load_bank first")
            bank_A, bank_B = self.bank_A, self.bank_B
        class_index = torch.as_tensor(class_index).to(bank_B.device, torch.long)
        weights = torch.as_tensor(weights, dtype=torch.float32).to(bank_B.device)
        n, k = bank_B.shape[0], bank_B.shape[1]
        if weights.ndim != 2 or weights.shape[1] != k:
            raise ValueError(f"weights must have shape (batch, {k}) for {k} heads (got {tuple(weights.shape)})")
        if class_index.shape != (weights.shape[0],):
            raise ValueError(f"class_index must have shape ({weights.shape[0]},) like weights' batch (got {tuple(class_index.shape)})")
        if class_index.numel() and (int(class_index.min()) < 0 or int(class_index.max()) >= n):
            raise ValueError(f"class_index values must be in [0, {n}) for a bank of {n} classes")
        A, B = mixture_factors(bank_A, bank_B, self.shared_a, class_index, weights)
        self.set_factors(A, B, cfg=cfg, dtype=dtype)

    def set_factors(self, A: torch.Tensor, B: torch.Tensor, cfg: bool = False, dtype: torch.dtype | None = None) -> None:
        """Routing by precomputed per-sample factors.

        Args:
            A: ``(n, R, in)``.
            B: ``(n, out, R)``.
            cfg: repeat for a classifier-free-guidance doubled batch.
            dtype: storage dtype (default: the base weight's dtype, so half-precision
                generation multiplies in half precision).
        """
        if A.ndim != 3 or B.ndim != 3 or A.shape[0] != B.shape[0] or A.shape[1] != B.shape[2]:
            raise ValueError(f"factors must be A (n, R, {self.in_features}) and B (n, {self.out_features}, R); got {tuple(A.shape)}, {tuple(B.shape)}")
        if A.shape[2] != self.in_features or B.shape[1] != self.out_features:
            raise ValueError(f"factors must be A (n, R, {self.in_features}) and B (n, {self.out_features}, R); got {tuple(A.shape)}, {tuple(B.shape)}")
        dtype = dtype or self.base.weight.dtype
        # Fold the LoRA scale into B once instead of once per call.
        A, B = A.detach().to(dtype), (B.detach() * self.scaling).to(dtype)
        if cfg:
            A, B = torch.cat([A, A]), torch.cat([B, B])
        self.clear_state()
        self._factors = (A, B)

    # ---- forward -------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Applies the adapted projection.

        Args:
            x: ``(n, tokens, in)`` or ``(n, in)``; n must equal the routing state's batch.

        Returns:
            ``(n, tokens, out)`` or ``(n, out)`` in the base layer's output dtype.
        """
        y = self.base(x)
        if self._disabled:
            return y
        n = x.shape[0]
        if self._factors is not None:
            A, B = self._factors
            self._check_batch(n, A.shape[0])
            h = torch.bmm(x.reshape(n, -1, self.in_features).to(A.dtype), A.transpose(1, 2))
            Bt = B.transpose(1, 2)
            if y.dtype != h.dtype:
                return y + torch.bmm(h, Bt).reshape(y.shape).to(y.dtype)
            # y + h @ B' as one fused baddbmm: no (n, tokens, out) temporary for the low-rank
            # term and one pass over y; in place when autograd does not need y.
            y3 = y.reshape(n, -1, Bt.shape[-1])
            if torch.is_grad_enabled() and (y.requires_grad or h.requires_grad):
                return torch.baddbmm(y3, h, Bt).reshape(y.shape)
            return y3.baddbmm_(h, Bt).reshape(y.shape)
        if self._heads is not None:
            self._check_batch(n, self._heads.shape[0])
            A = self.lora_A[self.head_group[self._heads]]  # (n, r, in): gradient flows to the shared A
            B = self.lora_B[self._heads]  # (n, out, r)
            xs = x.reshape(n, -1, self.in_features).to(A.dtype)
            d = torch.bmm(torch.bmm(xs, A.transpose(1, 2)), B.transpose(1, 2))
            return y + (self.scaling * d).reshape(y.shape).to(y.dtype)
        if self.num_heads == 1:
            # One head is an ordinary LoRA: no routing needed.
            d = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A[0]), self.lora_B[0])
            return y + (self.scaling * d).to(y.dtype)
        raise RuntimeError(
            f"MultiHeadLoRALinear with {self.num_heads} heads has no routing state: call set_heads "
            "(training), set_mixture/set_factors (generation) or set_disabled before the forward pass"
        )

    def _check_batch(self, n: int, state_n: int) -> None:
        if n != state_n:
            hint = (
                " The input batch is twice the state's: classifier-free guidance doubles the batch, "
                "set the state with cfg=True." if n == 2 * state_n else ""
            )
            raise ValueError(f"routing state is for a batch of {state_n} samples but the input has {n}.{hint}")
