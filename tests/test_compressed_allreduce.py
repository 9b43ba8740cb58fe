"""Compressed bucket reducers over real gloo processes on loopback.

Every worker also simulates every other worker with the pure codecs, so it can check
that the reducer returned exactly the sum of each worker's decoded gradient.
"""
import os
import signal
import time
import traceback

import pytest
import torch

from conftest import newest_checkpoint, run_workers
from paratrain.comm import codecs
from paratrain.comm.codecs import parse_compression
from paratrain.errors import CommTimeout
from paratrain.parallel.compressed import (CastReducer, GatherReducer, PowerSGDReducer, build_bucket_reducer,
                                           plan_segments, sum_in_rank_order)
from paratrain.parallel.reducers import AllreduceReducer

BUCKET_SIZES = (37, 301)          # odd sizes: padding, chunks that do not divide evenly
SHAPES_OF_BUCKET_1 = [(10, 20), (20,), (9, 9)]   # 200 + 20 + 81 = 301
STEPS = 3


def init_worker(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    from datetime import timedelta
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world, timeout=timedelta(seconds=30))


def make_grad(rank: int, step: int, bucket: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * step + 100 * bucket + rank)
    return torch.randn(BUCKET_SIZES[bucket], generator=generator) * 0.3


# --------------------------------------------------------------------------- references

def reference_cast(grads, dtype):
    scale = 1.0 / len(grads) if dtype == torch.float16 else 1.0
    chunk_sum = sum_in_rank_order([codecs.encode_cast(g, dtype, scale=scale) for g in grads])
    return codecs.decode_cast(chunk_sum.to(dtype), scale=scale)


class GatherReference:
    """Every worker's residuals, advanced with the pure codecs."""

    def __init__(self, config, world):
        self.config, self.world = config, world
        self.residuals = {}

    def step(self, bucket, grads):
        decoded = []
        for rank, grad in enumerate(grads):
            payload, state = codecs.encode(self.config, grad, self.residuals.get((rank, bucket)))
            self.residuals[(rank, bucket)] = state
            decoded.append(codecs.decode(self.config, payload, grad.numel()))
        return sum_in_rank_order(decoded)


class PowerSGDReference:
    def __init__(self, config, world, shapes):
        self.config, self.world, self.shapes = config, world, shapes
        self.residuals, self.qs = {}, {}

    def step(self, bucket, grads):
        segments = plan_segments(self.shapes.get(bucket), grads[0].numel(), self.config.rank)
        ms = [g + self.residuals.get((r, bucket), torch.zeros_like(g)) for r, g in enumerate(grads)]
        result = torch.zeros_like(grads[0])
        new_res = [torch.zeros_like(g) for g in grads]
        for index, seg in enumerate(segments):
            span = slice(seg.start, seg.start + seg.numel)
            if not seg.compressed:
                result[span] = sum(m[span] for m in ms)
                continue
            mats = []
            for m in ms:
                padded = torch.zeros(seg.rows * seg.cols)
                padded[:seg.numel] = m[span]
                mats.append(padded.view(seg.rows, seg.cols))
            rank = min(self.config.rank, seg.rows, seg.cols)
            q = self.qs.get((bucket, index))
            if q is None:
                q = codecs.initial_q(seg.cols, rank, self.config.seed + 7919 * bucket + index)
            p = codecs.orthogonalize(sum(mat @ q for mat in mats))
            q_locals = [mat.t() @ p for mat in mats]
            q_sum = sum(q_locals)
            result[span] = (p @ q_sum.t()).reshape(-1)[:seg.numel]
            decoded_each = [(p @ ql.t()).reshape(-1)[:seg.numel] for ql in q_locals]
            # the result is the sum of each worker's decoded gradient
            assert torch.allclose(result[span], sum(decoded_each), atol=1e-5)
            for r, mat in enumerate(mats):
                new_res[r][span] = mat.reshape(-1)[:seg.numel] - decoded_each[r]
            self.qs[(bucket, index)] = q_sum
        for r in range(len(grads)):
            self.residuals[(r, bucket)] = new_res[r]
        return result


SPECS = ("none", "fp16", "bf16", "2bit:0.2", "2bit", "topk:0.05", "powersgd:2", "quant:4")


def reducer_worker(rank, world, port, queue):
    try:
        init_worker(rank, world, port)
        report = {}
        for spec in SPECS:
            config = parse_compression(spec)
            reducer = build_bucket_reducer(config)
            shapes = {1: SHAPES_OF_BUCKET_1} if config.type == "powersgd" else {}
            for bucket, bucket_shapes in shapes.items():
                reducer.describe_bucket(bucket, bucket_shapes)
            if config.type in ("2bit", "topk", "quant"):
                reference = GatherReference(config, world)
            elif config.type == "powersgd":
                reference = PowerSGDReference(config, world, shapes)
            max_error, exact, digest = 0.0, True, []
            for step in range(STEPS):
                pending = [reducer.launch(b, make_grad(rank, step, b)) for b in range(len(BUCKET_SIZES))]
                for bucket, handle in enumerate(pending):
                    got = handle.wait(timeout=30)
                    grads = [make_grad(r, step, bucket) for r in range(world)]
                    if config.type == "none":
                        expected = sum_in_rank_order(grads)
                    elif config.type in ("fp16", "bf16"):
                        expected = reference_cast(grads, codecs.CAST_DTYPES[config.type])
                    else:
                        expected = reference.step(bucket, grads)
                    assert got.shape == expected.shape and got.dtype == torch.float32
                    exact = exact and torch.equal(got, expected)
                    max_error = max(max_error, (got - expected).abs().max().item())
                    digest.append(got.sum().item())
            report[spec] = {"exact": exact, "max_error": max_error, "bytes": reducer.bytes_sent,
                            "payload": reducer.payload_bytes,
                            "digest": digest}
        torch.distributed.destroy_process_group()
        queue.put((rank, report))
    except BaseException:
        queue.put((rank, traceback.format_exc()))


@pytest.mark.timeout(150)
def test_reducers_return_the_sum_of_decoded_gradients_on_3_workers():
    results = run_workers(reducer_worker, 3, 140)
    for rank, report in enumerate(results):
        assert isinstance(report, dict), f"rank {rank} failed:\n{report}"
    first = results[0]
    for spec in SPECS:
        # every rank ends up with the same bits
        assert all(r[spec]["digest"] == first[spec]["digest"] for r in results), spec
    # gather-based codecs and the cast codecs do their own arithmetic: exact
    for spec in ("fp16", "bf16", "2bit:0.2", "2bit", "topk:0.05", "quant:4"):
        assert first[spec]["exact"], (spec, first[spec]["max_error"])
    assert first["none"]["max_error"] < 1e-5          # gloo adds in its own order
    assert first["powersgd:2"]["max_error"] < 1e-4    # QR and matmuls, same inputs
    payload = {spec: first[spec]["payload"] for spec in SPECS}
    wire = {spec: first[spec]["bytes"] for spec in SPECS}
    assert payload["none"] == 4 * sum(BUCKET_SIZES) * STEPS
    assert wire["none"] == sum(2 * 2 * 4 * n // 3 for n in BUCKET_SIZES) * STEPS   # ring: 2(N-1)/N
    assert payload["fp16"] * 2 == payload["none"]
    assert wire["fp16"] * 2 == pytest.approx(wire["none"], rel=0.03)   # chunk padding only
    assert payload["2bit:0.2"] == 4 * (3 + 19) * STEPS     # ceil(37/16) + ceil(301/16) words
    assert payload["2bit"] == 4 * (3 + 1 + 19 + 2) * STEPS  # and one scale per 256 entries
    assert payload["topk:0.05"] == 8 * (2 + 16) * STEPS    # ceil(0.05 * n) entries
    assert payload["quant:4"] == 4 * (1 + 5 + 2 + 38) * STEPS   # scales, then 8 codes per word
    for spec in ("2bit:0.2", "2bit", "topk:0.05", "quant:4"):
        assert wire[spec] == 2 * payload[spec]             # all_gather: N-1 copies
    assert payload["powersgd:2"] < payload["none"] and wire["powersgd:2"] < wire["none"]

def timeout_worker(rank, world, port, queue):
    try:
        init_worker(rank, world, port)
        if rank == 0:
            reducer = build_bucket_reducer(parse_compression("2bit"))
            start = time.monotonic()
            try:
                reducer.launch(0, torch.ones(10)).wait(timeout=1.0)
                queue.put((rank, "no timeout"))
            except CommTimeout as exc:
                queue.put((rank, (str(exc), time.monotonic() - start)))
        else:
            queue.put((rank, "silent"))
            time.sleep(4)   # never joins the collective while rank 0 waits
    except BaseException:
        queue.put((rank, traceback.format_exc()))
    queue.close()
    queue.join_thread()   # flush the result before the hard exit below
    os._exit(0)   # the timed-out group cannot be shut down cleanly


@pytest.mark.timeout(60)
def test_wait_times_out_and_names_what_it_waited_for():
    results = run_workers(timeout_worker, 2, 50)
    assert isinstance(results[0], tuple), results[0]
    message, elapsed = results[0]
    assert "all_gather of 2bit bucket 0" in message and "rank 0" in message
    assert elapsed < 10


# --------------------------------------------------------------------------- one process

def test_single_process_reducers_decode_their_own_payload():
    grad = torch.randn(100, generator=torch.Generator().manual_seed(0))
    for spec in SPECS:
        config = parse_compression(spec)
        reducer = build_bucket_reducer(config)
        got = reducer.launch(0, grad).wait(timeout=5)
        assert got.shape == grad.shape
        if config.type in ("2bit", "topk", "quant"):
            payload, _ = codecs.encode(config, grad)
            assert torch.equal(got, codecs.decode(config, payload, 100))
        elif config.type == "powersgd":
            assert torch.allclose(got + reducer.buckets[0].residual, grad, atol=1e-5)
        else:
            assert torch.allclose(got, grad, atol=1e-2)


def test_compressed_launch_does_not_touch_the_callers_bucket_and_plain_sums_in_place():
    grad = torch.randn(50)
    before = grad.clone()
    for spec in SPECS[1:]:
        build_bucket_reducer(parse_compression(spec)).launch(0, grad).wait(timeout=5).mul_(3.0)
        assert torch.equal(grad, before), spec
    assert SPECS[0] == "none"
    assert build_bucket_reducer(parse_compression("none")).launch(0, grad).wait(timeout=5) is grad


def test_factory_picks_reducer_and_rejects_raw_specs():
    assert type(build_bucket_reducer(parse_compression("none"))) is AllreduceReducer
    assert build_bucket_reducer(parse_compression("none")).linear
    assert not any(build_bucket_reducer(parse_compression(spec)).linear for spec in SPECS[1:])
    assert isinstance(build_bucket_reducer(parse_compression("bf16")), CastReducer)
    assert isinstance(build_bucket_reducer(parse_compression("topk")), GatherReducer)
    assert isinstance(build_bucket_reducer(parse_compression("powersgd")), PowerSGDReducer)
    with pytest.raises(TypeError, match="CompressionConfig"):
        build_bucket_reducer({"type": "2bit"})


def test_plan_segments_compresses_matrices_only():
    segments = plan_segments([(100, 50), (100,), (3, 3)], 5000 + 100 + 9, rank=2)
    assert [(s.start, s.numel, s.compressed) for s in segments] == [
        (0, 5000, True), (5000, 100, False), (5100, 9, False)]   # 2 * (3 + 3) >= 9
    whole = plan_segments(None, 1000, rank=2)
    assert len(whole) == 1 and whole[0].rows * whole[0].cols >= 1000


# --------------------------------------------------------------------------- end to end (CLI)

# Shared by every codec: no momentum, because 2bit's +-threshold steps ride a
# momentum buffer badly (error feedback keeps the sum right, not the timing).
CLI_TRAINING = ["--model", "cnn", "--epochs", "12", "--batch-size", "64", "--lr", "0.4",
                "--momentum", "0", "--seed", "0", "--no-progress", "--json"]


def run_cli(args: list, timeout: float) -> dict:
    """``paratrain train ARGS``; the last stdout line is the JSON summary. The CLI runs
    in its own session so that a timeout can stop it and every worker it started."""
    import json
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-m", "paratrain.cli", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, output[-3000:]
    return json.loads(output.strip().splitlines()[-1])


def heldout_accuracy(args: list, log_dir) -> float:
    """Mean held-out accuracy of the last 3 epochs (rank 0's metrics.jsonl): one final
    evaluation of 360 images moves by a point (3.6 images) from seed to seed."""
    import json
    run_cli([*args, "--log-dir", str(log_dir)], timeout=280)
    lines = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [line["accuracy"] for line in lines if line["kind"] == "eval"]
    assert len(evals) == 12, evals
    return sum(evals[-3:]) / 3


@pytest.fixture(scope="module")
def uncompressed_cnn_accuracy(tmp_path_factory):
    return heldout_accuracy(["--workers", "4", *CLI_TRAINING], tmp_path_factory.mktemp("none"))


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("spec", ["fp16", "bf16", "2bit:0.5", "topk:0.01", "powersgd:4"])
def test_each_codec_trains_the_digits_cnn_within_one_point(spec, uncompressed_cnn_accuracy, tmp_path):
    accuracy = heldout_accuracy(["--workers", "4", "--compression", spec, *CLI_TRAINING], tmp_path)
    assert accuracy >= uncompressed_cnn_accuracy - 0.01, (spec, accuracy, uncompressed_cnn_accuracy)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_accumulation_equals_a_k_times_larger_batch(tmp_path):
    # 64 samples per step either way: one batch of 64, or 4 micro-batches of 16 that
    # communicate once.
    common = ["--workers", "2", "--model", "cnn", "--epochs", "1", "--batch-size", "64", "--seed", "3",
              "--no-progress", "--json"]
    run_cli([*common, "--accumulate", "4", "--checkpoint-dir", str(tmp_path / "k4")], timeout=180)
    run_cli([*common, "--accumulate", "1", "--checkpoint-dir", str(tmp_path / "k1")], timeout=180)
    accumulated = newest_checkpoint(tmp_path / "k4")["strategy"]["model"]
    large_batch = newest_checkpoint(tmp_path / "k1")["strategy"]["model"]
    assert accumulated.keys() == large_batch.keys()
    worst = max((accumulated[name] - large_batch[name]).abs().max().item() for name in accumulated)
    assert worst <= 1e-5, worst
