"""GGMLTensor: raw bytes that keep their GGML type and logical shape through moves and wrapping."""

import copy

import pytest
import torch
from ggml_samples import random_blocks
from gguf_helpers import QT
from torch import nn

from gguf_loader import GGMLTensor, dequantize, is_quantized


def make(qtype=QT.Q8_0, shape=(4, 64)) -> GGMLTensor:
    raw = torch.from_numpy(random_blocks(qtype, 8, seed=2)).view(4, -1)
    return GGMLTensor(raw, qtype, shape)


def assert_same_meta(tensor, original):
    assert isinstance(tensor, GGMLTensor)
    assert tensor.qtype == original.qtype and tensor.shape == original.shape
    assert tensor.size() == original.size() and tensor.dtype == torch.uint8


def test_shape_is_logical_while_size_and_storage_describe_bytes():
    t = make()
    assert t.shape == torch.Size([4, 64]) and t.size() == torch.Size([4, 68])
    assert (t.numel(), t.element_size(), t.nbytes, t.stride()) == (272, 1, 272, (68, 1))
    assert t.untyped_storage().nbytes() == 272 and t.storage_offset() == 0
    assert t.qtype_name == "Q8_0" and t.tensor_type == QT.Q8_0 and t.tensor_shape == t.shape
    assert is_quantized(t) and not is_quantized(torch.zeros(1))


@pytest.mark.parametrize("move", [
    lambda t: t.to("cpu"), lambda t: t.to("cpu", non_blocking=True), lambda t: t.to(torch.uint8), lambda t: t.cpu(),
    lambda t: t.detach(), lambda t: t.clone(), lambda t: t.contiguous(), lambda t: t.data, lambda t: copy.deepcopy(t),
], ids=["to", "to-nonblocking", "to-uint8", "cpu", "detach", "clone", "contiguous", "data", "deepcopy"])
def test_moves_keep_bytes_and_metadata(move):
    t = make()
    moved = move(t)
    assert_same_meta(moved, t)
    assert torch.equal(moved.as_plain(), t.as_plain())
    assert torch.equal(dequantize(moved), dequantize(t))


def test_clone_and_deepcopy_own_their_bytes():
    t = make()
    for copied in (t.clone(), copy.deepcopy(t)):
        assert copied.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()


def test_pin_memory_keeps_metadata():
    if not torch.cuda.is_available():
        pytest.skip("pinning needs a CUDA device")
    assert_same_meta(make().pin_memory(), make())


def test_parameter_wrapping_keeps_the_subclass():
    t = make()
    param = nn.Parameter(t, requires_grad=False)
    assert isinstance(param, nn.Parameter) and isinstance(param, GGMLTensor)
    assert_same_meta(param, t)
    assert not param.requires_grad


def test_module_to_and_deepcopy_keep_quantized_parameters():
    module = nn.Module()
    module.weight = nn.Parameter(make(), requires_grad=False)
    module.to("cpu")
    assert_same_meta(module.weight, make())
    clone = copy.deepcopy(module)
    assert isinstance(clone.weight, nn.Parameter)
    assert_same_meta(clone.weight, make())
    module.half()  # uint8 parameters are not floating point: left alone
    assert_same_meta(module.weight, make())


def test_data_repointing_keeps_the_python_object_and_metadata():
    """The streamer points `.data` of parameters at views of flat buffers."""
    param = nn.Parameter(make(), requires_grad=False)
    ident = id(param)
    flat = torch.zeros(1000, dtype=torch.uint8)
    view = flat[100:100 + 272].view(4, 68)
    param.data = view
    assert id(param) == ident
    assert param.data_ptr() == view.data_ptr()
    assert param.shape == torch.Size([4, 64]) and param.qtype == QT.Q8_0
    assert torch.count_nonzero(dequantize(param)) == 0


@pytest.mark.parametrize("cast", [
    lambda t: t.float(), lambda t: t.half(), lambda t: t.bfloat16(), lambda t: t.double(), lambda t: t.int(),
    lambda t: t.to(torch.float16), lambda t: t.to("cpu", torch.bfloat16), lambda t: t.to(dtype=torch.float32),
    lambda t: t.type(torch.float32), lambda t: t.type_as(torch.zeros(1)),
], ids=["float", "half", "bfloat16", "double", "int", "to-dtype", "to-device-dtype", "to-kw", "type", "type_as"])
def test_casting_the_bytes_raises(cast):
    with pytest.raises(TypeError, match=r"cannot cast a GGMLTensor \(Q8_0 blocks, shape \(4, 64\)\).*dequantize"):
        cast(make())


def test_other_ops_return_plain_tensors():
    t = make()
    for result in (t + 1, t.view(-1), t[0], t.reshape(2, -1), torch.cat([t, t]), t.sum(), torch.zeros_like(t)):
        assert type(result) is torch.Tensor


def test_copy_into_checks_dtype_and_metadata():
    t = make()
    t.copy_(torch.zeros(4, 68, dtype=torch.uint8))
    assert torch.count_nonzero(t.as_plain()) == 0
    with pytest.raises(TypeError, match="cannot copy torch.float32 values"):
        t.copy_(torch.zeros(4, 68))
    other = GGMLTensor(torch.zeros(4, 68, dtype=torch.uint8), QT.Q8_0, (2, 128))
    with pytest.raises(ValueError, match="different type or shape"):
        t.copy_(other)


def test_construction_checks_byte_count_and_dtype():
    with pytest.raises(ValueError, match=r"Q8_0 tensor of shape \(4, 64\) needs 272 bytes, got 271"):
        GGMLTensor(torch.zeros(271, dtype=torch.uint8), QT.Q8_0, (4, 64))
    with pytest.raises(TypeError, match="must be uint8"):
        GGMLTensor(torch.zeros(68), QT.Q8_0, (2, 32))


def test_repr_names_type_and_logical_shape():
    assert repr(make()) == "GGMLTensor(Q8_0, shape=(4, 64), bytes=272, device=cpu)"


def test_meta_device_zeros_like_describes_bytes():
    """Memory estimators build meta copies: they must count bytes, not dequantized values."""
    meta = torch.zeros_like(make(), device="meta")
    assert meta.shape == torch.Size([4, 68]) and meta.dtype == torch.uint8


@pytest.mark.cuda
def test_cuda_roundtrip_moves_bytes():
    t = make()
    on_gpu = t.to("cuda", non_blocking=True)
    assert_same_meta(on_gpu, t)
    assert on_gpu.device.type == "cuda" and on_gpu.nbytes == t.nbytes
    assert torch.equal(dequantize(on_gpu).cpu(), dequantize(t))
    assert_same_meta(on_gpu.cpu(), t)
