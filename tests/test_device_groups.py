"""Device groups: a worker may own several chips (a bmodel compiled for 2 devices on an SC7 card).
One text form everywhere ("0,1"), validated in the config, carried in the Hello, and used as the
device label of the router's metrics and logs."""

from __future__ import annotations

import re
import sys
import threading
from pathlib import Path

import pytest

from common import wire
from common.config import ConfigError, GenerationDefaults, ModelConfig, WorkersConfig, load_config
from common.devices import DeviceGroupError, format_group, group_of, overlapping, parse_group
from protos import worker_pb2
from tests.harness import ProcessSet, inference_stub, start_pool, wait_until, write_config
from tests.harness import free_port as free_port_for_processes
from tests.router_harness import async_test, running_router, unregistered_worker
from tests.sail_standin import FAKE_SAIL
from tests.test_metrics import fetch, request
from tests.worker_peer import connected
from worker.core.checkpoint import load_hf_checkpoint
from worker.core.engine import load_engine
from worker.core.llm_engine import LLMEngine
from worker.core.numpy_graphs import NumpyGraphs
from worker.core.request import USER, ChatRequest, SamplingParams, Turn


def test_a_group_has_one_text_form():
    assert parse_group("1, 0") == (0, 1) and format_group((1, 0)) == "0,1"
    assert group_of(2) == (2,) and group_of("3") == (3,)
    for bad in ("", "0,,1", "a", "0,0", "-1"):
        with pytest.raises(DeviceGroupError):
            parse_group(bad)
    with pytest.raises(DeviceGroupError):
        group_of(True)
    assert overlapping([(0, 1), (2,), (1, 3)]) == [1]


def test_config_groups_validated_and_written_one_way(tmp_path: Path):
    path = tmp_path / "pool.yaml"
    path.write_text('workers:\n  devices: ["1,0", 2, "3,4"]\n')
    config = load_config(path, {})
    assert config.workers.groups == ("0,1", "2", "3,4")
    assert config.workers.count == 3
    path.write_text('workers:\n  devices: ["0,1", 1]\n')
    with pytest.raises(ConfigError, match=r"workers\.devices: must not put device \[1\] in two groups"):
        load_config(path, {})
    assert WorkersConfig(devices=(0, 1)).groups == ("0", "1")  # plain ids: one chip per worker


def test_dev_id_names_groups_with_semicolons_and_keeps_the_old_list(tmp_path: Path):
    path = tmp_path / "pool.yaml"
    path.write_text("")
    assert load_config(path, {"DEV_ID": "0,1;2,3"}).workers.groups == ("0,1", "2,3")
    assert load_config(path, {"DEV_ID": "0,1"}).workers.groups == ("0", "1")  # as the original server
    with pytest.raises(ConfigError, match=r"must not put device \[1\] in two groups"):
        load_config(path, {"DEV_ID": "0,1;1"})
    with pytest.raises(ConfigError, match=r"^DEV_ID: .*groups separated by ';'"):
        load_config(path, {"DEV_ID": "0,1;x"})


def test_the_numpy_engine_refuses_a_group_of_several_devices():
    with pytest.raises(
        ValueError, match="engine numpy runs a worker on one CPU slot, not on the device group 0,1"
    ):
        load_engine(ModelConfig(), (0, 1))


def test_a_worker_on_a_group_says_so_in_its_hello(procs, tmp_path: Path):
    with connected(procs, write_config(tmp_path), "1,0") as (peer, _worker):
        hello = peer.register()
        assert (hello.device_group, hello.device_id) == ("0,1", 0)


def test_the_router_labels_metrics_and_logs_with_the_group(tmp_path: Path):
    metrics_port = free_port_for_processes()
    overrides = {
        "router": {"metrics_listen": f"127.0.0.1:{metrics_port}"},
        "workers": {"devices": ["0,1", 2]},
    }
    config = write_config(tmp_path, overrides)
    with ProcessSet(tmp_path) as procs:
        pool = start_pool(procs, config)
        frames = list(inference_stub(pool.channel).StreamComplete(request("hi"), timeout=30))
        assert frames[-1].finished
        scraped = wait_until(
            lambda: (s := fetch(metrics_port)).value("bm_pool_worker_registrations_total") == 2 and s,
            "both workers counted",
        )
        assert scraped.value("bm_pool_worker_registrations_total", device_id="0,1") == 1
        assert scraped.value("bm_pool_worker_registrations_total", device_id="2") == 1
        line = pool.supervisor.wait_for_log(r"worker (\S+-dev0,1-w0-\d+) registered: device 0,1, model")
        assert re.search(r"-dev0,1-w0-", line.group(1))


def test_a_2dev_bmodel_serves_through_the_pool_on_a_device_group(
    tiny_chat_model: Path, tiny_chat_tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Supervisor, router and a sail worker on the group "0,1" (the stand-in as an SoC box with two
    chips) answer as the numpy engine does on the same weights."""
    sys.path.insert(0, str(FAKE_SAIL))
    try:
        from sophon._bmodel import write_bmodel
    finally:
        sys.path.remove(str(FAKE_SAIL))
    bmodel = write_bmodel(
        tmp_path / "tiny_2dev.bmodel",
        tiny_chat_model,
        seq_len=128,
        num_device=2,
        addr_mode=1,
        io_dtype="bfloat16",
    )
    defaults = {"max_new_tokens": 12, "temperature": 0.0, "repetition_penalty": 1.0}
    model = {"name": "tiny", "engine": "sail", "path": str(bmodel), "tokenizer": str(tiny_chat_model)}
    config = write_config(
        tmp_path, {"model": {**model, "defaults": defaults}, "workers": {"devices": ["0,1"]}}
    )
    for name, value in {
        "PYTHONPATH": str(FAKE_SAIL),
        "SAIL_STANDIN_TPU_NUM": "2",
        "SAIL_STANDIN_SOC": "1",
    }.items():
        monkeypatch.setenv(name, value)
    numpy_engine = LLMEngine(
        NumpyGraphs(load_hf_checkpoint(tiny_chat_model), 128),
        tiny_chat_tokenizer,
        "tiny",
        GenerationDefaults(**defaults),
    )
    question = ChatRequest("You are a helpful assistant.", (Turn(USER, "你好"),), SamplingParams())
    expected = "".join(chunk.text for chunk in numpy_engine.generate(question, threading.Event()))

    with ProcessSet(tmp_path) as procs:
        pool = start_pool(procs, config)
        frames = list(inference_stub(pool.channel).StreamComplete(request("你好"), timeout=60))
    assert frames[-1].finished and "-dev0,1-w0-" in frames[-1].worker_id
    assert "".join(frame.output_text for frame in frames) == expected != ""


def _hello(worker_id: str, group: str) -> worker_pb2.Hello:
    return worker_pb2.Hello(
        protocol_version=wire.PROTOCOL_VERSION,
        worker_id=worker_id,
        device_id=0,
        device_group=group,
        model_id="test-model",
        context_size=4096,
        pid=1,
    )


@async_test
async def test_the_router_refuses_a_group_not_written_the_one_way():
    async with running_router() as router, unregistered_worker(router.endpoint, "odd") as odd:
        for group, reason in (
            ("1,0", "device_group '1,0' is not written as sorted ids such as '0,1'"),
            ("0;1", "device_group: a device group is a device id or comma-separated ids"),
        ):
            odd.send(_hello("odd", group))
            assert reason in (await odd.next("disconnect")).reason
        assert router.server.snapshot().workers_idle == 0
        odd.send(_hello("odd", "0,1"))
        await odd.next("welcome")
