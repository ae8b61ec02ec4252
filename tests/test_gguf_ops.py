"""GGUF layers: quantized weights from a file give the same outputs as plain layers on dequantized weights."""

from types import SimpleNamespace

import pytest
import torch
from ggml_samples import random_blocks
from gguf_helpers import QT
from torch import nn

from gguf_loader import GGMLTensor, GGUFFileWriter, GGUFOpsConfig, dequantize, make_ops, read_gguf


class SmallNet(nn.Module):
    """One of every supported layer, wired so each one's output matters."""

    def __init__(self, ops):
        super().__init__()
        self.emb = ops.Embedding(100, 64)
        self.lin = ops.Linear(64, 64)
        self.norm = ops.LayerNorm(64)
        self.rms = ops.RMSNorm(64, eps=1e-6)
        self.conv1 = ops.Conv1d(64, 32, 3, padding=1)
        self.group = ops.GroupNorm(4, 32)
        self.conv2 = ops.Conv2d(32, 32, 3, padding=1)
        self.conv3 = ops.Conv3d(32, 16, (1, 3, 3), padding=(0, 1, 1))

    def forward(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        x = self.emb(ids).to(dtype)                       # (B, T, 64)
        x = self.rms(self.norm(self.lin(x)))
        x = self.group(self.conv1(x.transpose(1, 2)))     # (B, 32, T)
        x = self.conv2(x.unsqueeze(-1).expand(-1, -1, -1, 4).contiguous())  # (B, 32, T, 4)
        return self.conv3(x.unsqueeze(2))                 # (B, 16, 1, T, 4)


# name -> (GGUF type, how it is written): quantized by gguf-py, raw K-quant blocks, or plain floats.
LAYOUT = {
    "emb.weight": "Q5_1", "lin.weight": "Q8_0", "lin.bias": "F32", "norm.weight": "F16", "norm.bias": "F32",
    "rms.weight": "BF16", "conv1.weight": "Q4_0", "conv1.bias": "F32", "group.weight": "F32", "group.bias": "F16",
    "conv2.weight": "Q8_0", "conv2.bias": "BF16", "conv3.weight": "Q4_K", "conv3.bias": "F32",
}


@pytest.fixture(scope="module")
def quantized_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ops") / "small.gguf"
    reference = SmallNet(nn)
    generator = torch.Generator().manual_seed(0)
    writer = GGUFFileWriter(path, architecture="test")
    for name, value in reference.state_dict().items():
        qtype = LAYOUT[name]
        if qtype == "Q4_K":
            n_blocks = value.numel() // 256
            writer.add_tensor(name, random_blocks(QT.Q4_K, n_blocks, seed=5), qtype, shape=tuple(value.shape))
        else:
            data = torch.randn(value.shape, generator=generator) * 0.2 + (1.0 if "norm" in name else 0.0)
            writer.add_tensor(name, data, qtype)
    writer.write()
    return path


def load(path, ops) -> SmallNet:
    model = SmallNet(ops)
    model.load_state_dict(read_gguf(path).tensors)
    return model.eval()


def plain_reference(path, dtype) -> SmallNet:
    model = SmallNet(nn)
    model.load_state_dict({name: dequantize(t, dtype) for name, t in read_gguf(path).tensors.items()})
    return model.to(dtype).eval()


def test_quantized_model_matches_dequantized_plain_model_bit_for_bit(quantized_file):
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    model = load(quantized_file, make_ops())
    assert isinstance(model.lin.weight, GGMLTensor) and isinstance(model.conv3.weight, GGMLTensor)
    with torch.no_grad():
        ours = model(ids)
        reference = plain_reference(quantized_file, torch.float32)(ids)
    assert ours.shape == (2, 16, 1, 7, 4)
    assert torch.equal(ours, reference)


def test_bfloat16_compute_matches_bfloat16_dequantized_weights(quantized_file):
    ids = torch.randint(0, 100, (1, 5), generator=torch.Generator().manual_seed(2))
    ops = make_ops(GGUFOpsConfig(embedding_dtype=torch.bfloat16))
    with torch.no_grad():
        ours = load(quantized_file, ops)(ids, torch.bfloat16)
        reference = plain_reference(quantized_file, torch.bfloat16)(ids, torch.bfloat16)
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, reference)


def test_dequant_dtype_rounds_through_the_configured_dtype(quantized_file):
    ops = make_ops(GGUFOpsConfig(dequant_dtype=torch.float16))
    model = load(quantized_file, ops)
    x = torch.randn(3, 64)
    expected = nn.functional.linear(x, dequantize(model.lin.weight, torch.float16).float(), model.lin.bias)
    assert torch.equal(model.lin(x), expected)


def test_loading_assigns_without_copying(quantized_file):
    tensors = read_gguf(quantized_file).tensors
    model = SmallNet(make_ops())
    model.load_state_dict(tensors)
    assert model.lin.weight.data_ptr() == tensors["lin.weight"].data_ptr()
    assert model.lin.bias.data_ptr() == tensors["lin.bias"].data_ptr()
    assert isinstance(model.lin.weight, nn.Parameter) and not model.lin.weight.requires_grad


def test_construction_allocates_no_weights():
    ops = make_ops()
    layer = ops.Linear(8192, 8192, bias=True, device="cpu", dtype=torch.float32)
    assert layer.weight is None and layer.bias is None
    assert layer.in_features == 8192 and isinstance(layer, nn.Linear)


def test_every_call_builds_new_classes_with_their_own_config():
    a, b = make_ops(GGUFOpsConfig(dequant_dtype=torch.float32)), make_ops()
    assert a.Linear is not b.Linear and a.Linear.gguf_config != b.Linear.gguf_config
    assert b.Linear.gguf_config == GGUFOpsConfig() and a.config.dequant_dtype is torch.float32
    with pytest.raises(AttributeError):
        a.config.dequant_dtype = torch.float16  # frozen


def test_missing_weight_and_bias_are_reported():
    layer = make_ops().Linear(64, 32)
    result = layer.load_state_dict({}, strict=False)
    assert set(result.missing_keys) == {"weight", "bias"}
    with pytest.raises(RuntimeError, match="weight was never loaded"):
        layer(torch.randn(2, 64))


def test_missing_bias_runs_without_bias():
    layer = make_ops().Linear(64, 32)
    weight = torch.randn(32, 64)
    result = layer.load_state_dict({"weight": weight}, strict=False)
    assert result.missing_keys == ["bias"]
    x = torch.randn(2, 64)
    assert torch.equal(layer(x), x @ weight.T)


def test_unexpected_keys_are_reported():
    with pytest.raises(RuntimeError, match="Unexpected key.*extra"):
        make_ops().Linear(64, 32).load_state_dict({"weight": torch.randn(32, 64), "bias": torch.randn(32),
                                                   "extra": torch.zeros(1)})


def test_plain_weights_of_any_float_dtype_are_cast_to_the_input():
    layer = make_ops().Linear(16, 8)
    layer.load_state_dict({"weight": torch.randn(8, 16, dtype=torch.float16), "bias": torch.randn(8)})
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, nn.functional.linear(x, layer.weight.to(torch.bfloat16), layer.bias.to(torch.bfloat16)))


def test_embedding_dtype_choices():
    ops = make_ops()
    quantized = ops.Embedding(10, 32)
    quantized.load_state_dict({"weight": GGMLTensor(torch.from_numpy(random_blocks(QT.Q8_0, 10)), QT.Q8_0, (10, 32))})
    ids = torch.tensor([[1, 2]])
    assert quantized(ids).dtype == torch.float32
    assert quantized(ids, out_dtype=torch.float16).dtype == torch.float16
    plain = ops.Embedding(10, 32)
    plain.load_state_dict({"weight": torch.randn(10, 32, dtype=torch.bfloat16)})
    assert plain(ids).dtype == torch.bfloat16


def test_weight_function_hooks_run_on_dequantized_values():
    """ComfyUI attaches LoRA patches as `weight_function`; they see the dequantized weight."""
    layer = make_ops().Linear(32, 4)
    weight = GGMLTensor(torch.from_numpy(random_blocks(QT.Q8_0, 4)), QT.Q8_0, (4, 32))
    layer.load_state_dict({"weight": weight, "bias": torch.zeros(4)})
    seen = []
    layer.weight_function = [lambda w: (seen.append(w.dtype), w * 2)[1]]
    x = torch.randn(1, 32)
    assert torch.equal(layer(x), x @ (dequantize(weight) * 2).T)
    assert seen == [torch.float32]


def test_in_place_weight_functions_never_touch_the_stored_weight():
    """Regression: ComfyUI's LoRA patches do `weight += delta`; for a plain weight already in the compute dtype
    and device, `.to()` returns the parameter itself, which the patch would corrupt (once per forward)."""
    layer = make_ops().Linear(8, 4)
    weight, bias = torch.randn(4, 8), torch.randn(4)
    layer.load_state_dict({"weight": weight.clone(), "bias": bias.clone()})

    def add_one(w):
        w += 1.0
        return w

    layer.weight_function = [add_one]
    layer.bias_function = [add_one]
    x = torch.randn(2, 8)
    first, second = layer(x), layer(x)
    assert torch.equal(first, second)
    assert torch.equal(layer.weight, weight) and torch.equal(layer.bias, bias)
    assert torch.allclose(first, x @ (weight + 1).T + bias + 1)


def test_custom_base_namespace_is_used_and_left_untouched():
    class BaseLinear(nn.Linear):
        marker = "base"

    base = SimpleNamespace(Linear=BaseLinear)
    ops = make_ops(base=base)
    assert issubclass(ops.Linear, BaseLinear) and not hasattr(ops, "Conv2d")
    assert not hasattr(BaseLinear, "gguf_config") and base.Linear is BaseLinear
    layer = ops.Linear(32, 4)
    assert layer.forward_comfy_cast_weights.__func__ is layer.forward.__func__


def test_module_to_moves_quantized_bytes(quantized_file):
    model = load(quantized_file, make_ops())
    model.to("cpu")
    assert isinstance(model.lin.weight, GGMLTensor) and model.lin.weight.qtype == QT.Q8_0


@pytest.mark.cuda
def test_weights_dequantize_on_the_input_device(quantized_file):
    model = load(quantized_file, make_ops())
    ids = torch.randint(0, 100, (1, 5))
    with torch.no_grad():
        cpu = model(ids)
        gpu = model(ids.cuda())  # weights stay on the CPU; bytes move per call
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)


def test_quantized_embedding_dequantizes_only_the_looked_up_rows(monkeypatch):
    """Same values as a lookup in the fully dequantized table, without dequantizing the table."""
    table = GGMLTensor(torch.from_numpy(random_blocks(QT.Q6_K, 50, seed=8)), QT.Q6_K, (50, 256))
    layer = make_ops().Embedding(50, 256)
    layer.load_state_dict({"weight": table})
    ids = torch.tensor([[3, 3, 49], [0, 17, 3]])
    expected = nn.functional.embedding(ids, dequantize(table))
    seen = []
    import gguf_loader.ops as ops_module
    original = ops_module.dequantize_raw
    monkeypatch.setattr(ops_module, "dequantize_raw", lambda raw, *a: (seen.append(raw.shape[0]), original(raw, *a))[1])
    assert torch.equal(layer(ids), expected)
    assert seen == [6]  # six token rows, not fifty
    assert torch.equal(layer(ids, out_dtype=torch.bfloat16), expected.to(torch.bfloat16))
