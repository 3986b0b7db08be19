"""The CUDA int4 path's host side, without a GPU: per-engine workspaces, cached kernel arguments, the
stream and context of the tensors' own device. Kernels are replaced by fakes that record their calls
(their math is checked under the simulator in ``test_int4_kernels_sim.py``)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from pipo.ops import int4_dispatch
from pipo.ops.int4_dispatch import Int4Workspace, dequant_matmul
from pipo.ops.kernels import checks, cuda_adapter, dequant_int4, gemv_int4
from pipo.ops.quant import QuantTensor


@pytest.fixture
def fake_gpu(monkeypatch):
    """Kernels that compute on the CPU, a settable current stream, and counted argument wraps."""
    state = {"stream": "A", "wraps": 0, "dequant_launches": 0, "stream_devices": []}

    def fake_dequant(q, out, *, weights=None):
        state["dequant_launches"] += 1
        out[:, :q.shape[1]] = dequant_int4.reference(q).to(out.dtype)
        return out

    def as_array(t):
        state["wraps"] += 1
        return t

    def current_stream(device):
        state["stream_devices"].append(device)
        return state["stream"]

    monkeypatch.setattr(dequant_int4, "dequant_int4", fake_dequant)
    monkeypatch.setattr(cuda_adapter, "as_array", as_array)
    monkeypatch.setattr(cuda_adapter, "current_stream", current_stream)
    monkeypatch.setattr(gemv_int4, "as_array", as_array)
    monkeypatch.setattr(gemv_int4, "current_stream", current_stream)
    yield state
    int4_dispatch._CURRENT.set(None)  # begin_block made a test's workspace current


def _quant(seed=0) -> QuantTensor:
    return checks.random_quant(12, 64, 32, torch.device("cpu"), seed)


def test_two_workspaces_never_share_a_dense_buffer(fake_gpu):
    q, x = _quant(), torch.randn(10, 64)
    spaces = [Int4Workspace(), Int4Workspace()]
    for ws in spaces:
        ws.begin_block({"w": q})
        dequant_matmul(x, q, ws)
    a, b = (ws.dense(q, torch.float32, "A") for ws in spaces)
    assert a.data_ptr() != b.data_ptr()
    assert not hasattr(dequant_int4, "scratch")  # no module-wide buffer left to share


def test_a_dense_matrix_is_reused_only_on_the_stream_that_made_it(fake_gpu):
    q, x = _quant(), torch.randn(10, 64)
    ws = Int4Workspace()
    ws.begin_block({"w": q})
    y_a = dequant_matmul(x, q, ws)
    dequant_matmul(x, q, ws)  # the block's next micro-batch, same stream: no new pass
    assert fake_gpu["dequant_launches"] == 1
    fake_gpu["stream"] = "B"
    y_b = dequant_matmul(x, q, ws)  # another stream gets its own matrix, made in its own order
    assert fake_gpu["dequant_launches"] == 2
    assert ws.dense(q, torch.float32, "A").data_ptr() != ws.dense(q, torch.float32, "B").data_ptr()
    assert torch.equal(y_a, y_b)


def test_the_next_block_drops_the_previous_blocks_matrices(fake_gpu):
    q = _quant()
    ws = Int4Workspace()
    ws.begin_block({"w": q})
    dequant_matmul(torch.randn(10, 64), q, ws)
    ws.begin_block({"w": _quant(1)})
    assert ws.dense(q, torch.float32, "A") is None


def test_weight_wrappers_are_made_once_per_view(fake_gpu):
    q = _quant()
    ws = Int4Workspace()
    first = ws.weight_arrays(q)
    assert fake_gpu["wraps"] == 3
    same_memory = QuantTensor.from_parts(q.to_parts(), q.shape, q.group_size)  # a refilled slot's view
    assert ws.weight_arrays(same_memory) is first and fake_gpu["wraps"] == 3
    ws.weight_arrays(_quant(1))
    assert fake_gpu["wraps"] == 6


def test_a_gemv_launch_with_cached_weights_wraps_only_activations_and_output(fake_gpu, monkeypatch):
    launched = []
    monkeypatch.setattr(gemv_int4, "_launcher", lambda *key: lambda *args: launched.append(args))
    q = _quant()
    ws = Int4Workspace()
    for _ in range(3):
        gemv_int4.gemv_int4(torch.randn(2, 64), q, weights=ws.weight_arrays(q))
    assert len(launched) == 3 and fake_gpu["wraps"] == 3 + 2 * 3  # weights once, then x and y


def test_launches_use_the_stream_of_the_tensors_device(fake_gpu, monkeypatch):
    monkeypatch.setattr(gemv_int4, "_launcher", lambda *key: lambda *args: None)
    x = torch.randn(2, 64)
    gemv_int4.gemv_int4(x, _quant())
    assert fake_gpu["stream_devices"] == [x.device]


def test_current_stream_asks_torch_for_the_given_device(monkeypatch):
    asked = []

    class Stream:
        cuda_stream = 1234

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: asked.append(device) or Stream())
    monkeypatch.setattr(cuda_adapter.cuda, "external_stream", lambda handle: ("numba stream", handle))
    cuda_adapter._external_stream.cache_clear()
    try:
        assert cuda_adapter.current_stream(torch.device("cuda", 1)) == ("numba stream", 1234)
    finally:
        cuda_adapter._external_stream.cache_clear()
    assert asked == [torch.device("cuda", 1)]


def test_device_scope_selects_numbas_context_of_cuda_n(monkeypatch):
    class Gpus:
        def __getitem__(self, index):
            return ("context of", index)

    monkeypatch.setattr(cuda_adapter.cuda, "gpus", Gpus(), raising=False)
    assert cuda_adapter.device_scope(torch.device("cuda", 1)) == ("context of", 1)
    assert isinstance(cuda_adapter.device_scope(torch.device("cuda", 0)), contextlib.nullcontext)
    assert isinstance(cuda_adapter.device_scope(torch.device("cuda")), contextlib.nullcontext)


def test_without_a_workspace_nothing_is_cached(fake_gpu):
    q, x = _quant(), torch.randn(10, 64)
    assert int4_dispatch.current_workspace() is None
    dequant_matmul(x, q)
    dequant_matmul(x, q)
    assert fake_gpu["dequant_launches"] == 2
