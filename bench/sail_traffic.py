"""What the sail adapter moves between host and chip per token, measured through the sail stand-in.

    .venv/bin/python -m bench.sail_traffic [--layers 2 8] [--seq-len 512]

A tiny Qwen2 over Qwen's real vocabulary (151936 ids), compiled as sophon-demo does (BF16, static,
with greedy_head), answers a 20-token prompt greedily for 64 tokens; the stand-in counts the bytes
`Tensor.update_data` sends to the device and `Tensor.asnumpy` reads back, and the elements host
code compares with `numpy.array_equal` (the old adapter's skip-if-unchanged check, per layer).
These are counts, not times: they are what an SE7's ARM cores and the PCIe link would carry.
The stand-in is a test tool (tests/fake_sail); this benchmark loads it the way the tests do.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
QWEN_VOCAB = 151936
PROMPT = list(range(100, 120))
NEW_TOKENS = 64


def measure(layers: int, seq_len: int, folder: Path) -> dict[str, float]:
    import sophon.sail as sail
    from sophon._bmodel import write_bmodel

    from tests.tiny_models import random_tensors, tiny_config, write_hf_checkpoint
    from worker.core.driver import Generation
    from worker.core.sail_graphs import SailGraphs

    config = tiny_config(vocab_size=QWEN_VOCAB, max_positions=seq_len, layers=layers)
    checkpoint = write_hf_checkpoint(folder / f"ck{layers}", config, random_tensors(config, 0, bias=True))
    bmodel = write_bmodel(
        folder / f"m{layers}.bmodel", checkpoint, seq_len=seq_len, io_dtype="bfloat16", sampling_heads=True
    )
    graphs = SailGraphs(bmodel)
    counts = {"to_device": 0, "to_host": 0, "compared": 0}
    update_data, asnumpy, array_equal = sail.Tensor.update_data, sail.Tensor.asnumpy, np.array_equal

    def counted_update(tensor: object, data: np.ndarray) -> None:
        counts["to_device"] += data.nbytes
        update_data(tensor, data)

    def counted_read(tensor: object, *args: object) -> np.ndarray:
        values = asnumpy(tensor, *args)
        counts["to_host"] += values.nbytes
        return values

    def counted_equal(a: object, b: object, *args: object, **kwargs: object) -> bool:
        counts["compared"] += np.asarray(a).size
        return array_equal(a, b, *args, **kwargs)

    sail.Tensor.update_data, sail.Tensor.asnumpy, np.array_equal = counted_update, counted_read, counted_equal
    try:
        pick = lambda logits, _tokens: int(np.argmax(logits))  # noqa: E731
        generation = Generation(graphs, PROMPT, pick, NEW_TOKENS, set(), threading.Event(), greedy=True)
        tokens = len(list(generation))
    finally:
        sail.Tensor.update_data, sail.Tensor.asnumpy, np.array_equal = update_data, asnumpy, array_equal
    return {name: count / tokens for name, count in counts.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sail_traffic", description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO / "tests" / "fake_sail"))
    print(f"per token, averaged over {NEW_TOKENS} greedy tokens (prefill included), seq_len {args.seq_len}:")
    print(f"{'layers':>6}  {'host->device B':>14}  {'device->host B':>14}  {'elements compared':>17}")
    with tempfile.TemporaryDirectory() as folder:
        for layers in args.layers:
            figures = measure(layers, args.seq_len, Path(folder))
            print(
                f"{layers:>6}  {figures['to_device']:>14.0f}  {figures['to_host']:>14.0f}  "
                f"{figures['compared']:>17.0f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
