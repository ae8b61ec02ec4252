"""An expert-bank layer (ComfyUI 0.33's `MoEExperts` interface) whose bank may be a GGMLTensor.

ComfyUI's GPT-OSS encoder builds its experts with `ops.MoEExperts(num_experts, in_features, out_features, bias)`
and runs them as

    with experts.bank_resident(x) as bank:
        y = bank.expert_linear(x_e, e)   # for each expert e that received tokens

Core's own class casts the whole bank to the compute dtype once per call. Dequantized, a GPT-OSS-20B gate/up
bank is 32 x 5760 x 2880 values (1 GiB in bfloat16) per layer, so this layer moves only the raw bytes to the
input's device once and dequantizes the rows of one expert at a time (the experts a token batch actually
uses). Plain float banks are cast one expert at a time too. When ComfyUI attached weight functions (LoRA
patches) they need the whole bank, which is then dequantized once per call, as core does.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .dequant import dequantize_raw
from .ops import GGUFLayer, GGUFOpsConfig
from .tensor import GGMLTensor


class GGUFMoEExperts(GGUFLayer, torch.nn.Module):
    """`num_experts` linear layers stored as one bank: weight [E, out, in], bias [E, out]."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None) -> None:
        torch.nn.Module.__init__(self)
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self._gguf_expected = ("weight", "bias") if bias else ("weight",)
        self.weight = None
        self.bias = None
        self._resident: tuple | None = None

    @contextlib.contextmanager
    def bank_resident(self, input: torch.Tensor):
        """The bank on the input's device for the duration of one forward (not re-entrant)."""
        if self.weight is None:
            raise RuntimeError(f"{type(self).__name__}: weight was never loaded (state dict had no weight)")
        if getattr(self, "weight_function", None) or getattr(self, "bias_function", None):
            resident = self.cast_weight_bias(input)  # patches see the whole dequantized bank
        else:
            bias = None if self.bias is None else self._cast(self.bias, input.dtype, input.device, ())
            resident = (self.weight.to(input.device, non_blocking=True), bias)
        self._resident = resident
        try:
            yield self
        finally:
            self._resident = None

    def expert_linear(self, input: torch.Tensor, index: int) -> torch.Tensor:
        """input @ weight[index].T + bias[index], in the input's dtype."""
        if self._resident is not None:
            return self._expert_linear(input, *self._resident, index)
        with self.bank_resident(input) as bank:
            return bank._expert_linear(input, *bank._resident, index)

    def _expert_linear(self, input, weight, bias, index: int) -> torch.Tensor:
        dtype = input.dtype
        if isinstance(weight, GGMLTensor):
            shape = torch.Size((self.out_features, self.in_features))
            raw = weight.as_plain()[index]
            expert = dequantize_raw(raw, weight.qtype, shape, self.gguf_config.dequant_dtype or dtype).to(dtype)
        else:
            expert = weight[index].to(dtype)
        return F.linear(input, expert, None if bias is None else bias[index].to(dtype))


def make_moe_experts(config: GGUFOpsConfig | None = None) -> type[GGUFMoEExperts]:
    """A fresh `MoEExperts` class carrying `config` (per model, like `make_ops`)."""
    return type("MoEExperts", (GGUFMoEExperts,), {"gguf_config": config or GGUFOpsConfig()})
