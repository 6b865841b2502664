"""The stand-in (tests/fake_sail) is as strict as sophon-sail where the adapter's risks lie: these
pin the behaviours the risk tests rely on, so the stand-in cannot quietly become kind again."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.tiny_models import random_tensors, tiny_config, write_hf_checkpoint


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = tiny_config(vocab_size=97, max_positions=16)
    return write_hf_checkpoint(
        tmp_path_factory.mktemp("small"), config, random_tensors(config, 0, bias=False)
    )


def engine_of(sail, tmp_path: Path, checkpoint: Path, **options: object):
    from sophon._bmodel import write_bmodel

    return sail.EngineLLM(str(write_bmodel(tmp_path / "m.bmodel", checkpoint, seq_len=16, **options)), [0])


def test_addr_mode_is_per_graph_and_io_alone_memory_starts_uncleared(standin, tmp_path, small_checkpoint):
    sail = standin()
    engine = engine_of(sail, tmp_path, small_checkpoint, addr_mode=1)
    assert engine.get_addr_mode("block_cache_0") == 1
    assert engine.get_addr_mode("block_0") == engine.get_addr_mode("embedding") == 0
    assert engine.get_input_tensors("block_0") == {}
    history = engine.get_input_tensors("block_cache_0")[3]
    assert np.isnan(history.asnumpy().view(np.float16)).all()


def test_soc_runtime_tensors_have_a_host_mirror_synced_explicitly(standin, tmp_path, small_checkpoint):
    sail = standin(soc=True)
    engine = engine_of(sail, tmp_path, small_checkpoint, addr_mode=1)
    history = engine.get_input_tensors("block_cache_0")[3]
    history.update_data(np.zeros(history.shape(), dtype=np.uint16))
    assert not history.asnumpy().any()  # the mirror
    assert history._device_bytes(history._nbytes()).all()  # the device still holds the old bytes
    history.sync_s2d()
    assert not history._device_bytes(history._nbytes()).any()
    history._device_bytes(2)[:] = 1  # a graph writes the device
    assert not history.asnumpy().any()
    history.sync_d2s()
    assert history.asnumpy().reshape(-1)[0] == 257
    history.zeros()
    assert not history.asnumpy().any() and not history._device_bytes(history._nbytes()).any()
    own = sail.Tensor(sail.Handle(0), [4], sail.Dtype.BM_INT32, False, True)
    own.update_data(np.arange(4, dtype=np.int32))  # own device memory has no mirror, even on SoC
    assert own._device_bytes(16).view(np.int32).tolist() == [0, 1, 2, 3]


def test_the_real_error_classes_no_default_dtype_and_process_returns_none(
    standin, tmp_path, small_checkpoint
):
    sail = standin()
    assert not hasattr(sail, "SailError")
    assert {sail.SailDeviceError, sail.SailTensorError, sail.SailEngineError} <= {
        value for value in vars(sail).values() if isinstance(value, type) and issubclass(value, Exception)
    }
    with pytest.raises(TypeError):
        sail.Tensor(sail.Handle(0), [1])  # dtype is required
    engine = engine_of(sail, tmp_path, small_checkpoint)
    handle = sail.Handle(0)
    ids = sail.Tensor(handle, [1, 1], sail.Dtype.BM_INT32, False, True)
    out = sail.Tensor(
        handle, engine.get_output_shape("embedding_cache", 0), sail.Dtype.BM_BFLOAT16, False, True
    )
    assert engine.process("embedding_cache", {0: ids}, {0: out}) is None
    with pytest.raises(sail.SailEngineError, match="static"):
        engine.process(
            "embedding_cache", {0: sail.Tensor(handle, [1, 2], sail.Dtype.BM_INT32, False, True)}, {0: out}
        )


def test_the_view_constructor_is_missing_before_3_9_1(standin):
    sail = standin(version="3.9.0")
    assert sail.__version__ == "3.9.0"
    parent = sail.Tensor(sail.Handle(0), [4], sail.Dtype.BM_INT32, False, True)
    with pytest.raises(TypeError, match="incompatible constructor arguments"):
        sail.Tensor(parent, [2], 1)


def test_the_embedding_is_bf16_beside_f16_blocks_and_block_cache_may_be_dynamic(
    standin, tmp_path, small_checkpoint
):
    sail = standin()
    engine = engine_of(sail, tmp_path, small_checkpoint, io_dtype="float16", dynamic=True)
    assert engine.get_output_dtype("embedding", 0) == sail.Dtype.BM_BFLOAT16
    assert engine.get_input_dtype("block_0", 0) == sail.Dtype.BM_FLOAT16
    assert engine.get_is_dynamic("block_cache_0")
    static_cache = engine_of(sail, tmp_path, small_checkpoint, dynamic=True, block_cache_dynamic=False)
    assert static_cache.get_is_dynamic("block_0") and not static_cache.get_is_dynamic("block_cache_0")
