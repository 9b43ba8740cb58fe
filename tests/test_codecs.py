"""Codecs as pure functions: no network, no processes."""
import math

import numpy as np
import pytest
import torch

from paratrain.comm import codecs
from paratrain.comm.codecs import CompressionConfig, parse_compression
from paratrain.errors import ConfigError


# --------------------------------------------------------------------------- 2bit

def test_2bit_reproduces_mxnet_residual_sequence():
    # The sequence: threshold 0.5, pushes 0.4, 0.1, 0.2, 0.3 send 0, +0.5, 0, +0.5.
    residual = torch.zeros(1)
    sent = []
    for push in (0.4, 0.1, 0.2, 0.3):
        words, residual = codecs.encode_2bit(torch.tensor([push]), residual, 0.5)
        sent.append(codecs.decode_2bit(words, 1, 0.5).item())
    assert sent == [0.0, 0.5, 0.0, 0.5]
    assert residual.item() == pytest.approx(0.0, abs=1e-7)


def test_2bit_negative_side_mirrors_positive():
    residual = torch.zeros(1)
    sent = []
    for push in (-0.4, -0.1, -0.2, -0.3):
        words, residual = codecs.encode_2bit(torch.tensor([push]), residual, 0.5)
        sent.append(codecs.decode_2bit(words, 1, 0.5).item())
    assert sent == [0.0, -0.5, 0.0, -0.5]


def _mxnet_2bit_reference(grads, threshold):
    """Element by element, in float32, as MXNet's quantize_2bit kernel does it."""
    t = np.float32(threshold)
    residual = np.zeros(grads[0].shape, dtype=np.float32)
    all_sent = []
    for grad in grads:
        sent = np.zeros_like(residual)
        for i in range(residual.size):
            residual[i] = residual[i] + np.float32(grad[i])
            if residual[i] >= t:
                sent[i] = t
                residual[i] -= t
            elif residual[i] <= -t:
                sent[i] = -t
                residual[i] += t
        all_sent.append(sent)
    return all_sent, residual


def test_2bit_matches_reference_simulation_on_random_tensors():
    generator = torch.Generator().manual_seed(3)
    grads = [torch.randn(203, generator=generator) * 0.4 for _ in range(6)]
    expected_sent, expected_residual = _mxnet_2bit_reference([g.numpy() for g in grads], 0.3)
    residual = torch.zeros(203)
    for grad, expected in zip(grads, expected_sent):
        words, residual = codecs.encode_2bit(grad, residual, 0.3)
        assert words.dtype == torch.int32 and words.numel() == math.ceil(203 / 16)
        np.testing.assert_array_equal(codecs.decode_2bit(words, 203, 0.3).numpy(), expected)
    np.testing.assert_array_equal(residual.numpy(), expected_residual)


def test_2bit_packs_sixteen_codes_per_word_in_mxnet_layout():
    codes = torch.tensor([1, -1, 0, 1] + [0] * 11 + [-1], dtype=torch.int8)
    words = codecs.pack_2bit(codes)
    assert words.numel() == 1
    packed = words.view(torch.uint8).tolist()
    # byte 0 holds codes 0..3 from the high bits: 11 10 00 11; byte 3 ends with 10.
    assert packed == [0b11100011, 0, 0, 0b00000010]


@pytest.mark.parametrize("numel", [1, 15, 16, 17, 100, 1024])
def test_2bit_pack_round_trips(numel):
    codes = torch.randint(-1, 2, (numel,), dtype=torch.int8, generator=torch.Generator().manual_seed(numel))
    words = codecs.pack_2bit(codes)
    assert words.numel() == math.ceil(numel / 16)
    assert torch.equal(codecs.unpack_2bit(words, numel), codes)


def test_2bit_unpack_rejects_bad_payload():
    with pytest.raises(TypeError, match="int32"):
        codecs.unpack_2bit(torch.zeros(2, dtype=torch.float32), 10)
    with pytest.raises(ValueError, match="cannot hold"):
        codecs.unpack_2bit(torch.zeros(1, dtype=torch.int32), 17)


# --------------------------------------------------------------------------- 2bit, scaled (the default)

def test_scaled_2bit_is_the_least_squares_ternary_of_each_block():
    # one block of 256: 200 entries near +-1 and 56 near 0.01 -> the scale is about 1
    generator = torch.Generator().manual_seed(0)
    big = torch.sign(torch.randn(200, generator=generator)) * (1 + 0.1 * torch.rand(200, generator=generator))
    grad = torch.cat([big, torch.full((56,), 0.01)])
    payload, residual = codecs.encode_2bit_scaled(grad, torch.zeros(256))
    assert payload.numel() == codecs.scaled_2bit_words(256) == 16 + 1
    decoded = codecs.decode_2bit_scaled(payload, 256)
    scale = payload[-1:].view(torch.float32).item()
    assert scale == pytest.approx(big.abs().mean().item(), rel=1e-6)   # the mean of what is sent
    assert torch.equal(decoded[:200], torch.sign(big) * scale) and torch.all(decoded[200:] == 0)
    assert torch.allclose(decoded + residual, grad, atol=1e-6)         # nothing lost
    # no other scale in {-v, 0, v} fits better
    def error(v):
        codes = (grad >= v / 2).float() - (grad <= -v / 2).float()
        return (grad - codes * v).square().sum().item()
    assert all(error(scale) <= error(scale * f) for f in (0.8, 0.9, 1.1, 1.25))


def test_scaled_2bit_follows_the_gradients_scale_per_block():
    grad = torch.cat([torch.randn(256) * 1e-4, torch.randn(256) * 1e3, torch.zeros(100)])
    payload, residual = codecs.encode_2bit_scaled(grad, torch.zeros_like(grad))
    scales = payload[-3:].view(torch.float32)
    assert 1e-5 < scales[0] < 1e-3 and 1e2 < scales[1] < 1e4 and scales[2] == 0
    decoded = codecs.decode_2bit_scaled(payload, grad.numel())
    for block in (slice(0, 256), slice(256, 512)):   # a third or more of each block goes out
        assert (decoded[block] != 0).float().mean() > 0.3
    assert torch.all(decoded[512:] == 0) and torch.all(residual[512:] == 0)


def test_scaled_2bit_error_feedback_adds_up_and_payload_is_checked():
    generator = torch.Generator().manual_seed(1)
    residual, sent, total = torch.zeros(300), torch.zeros(300), torch.zeros(300)
    for _ in range(5):
        grad = torch.randn(300, generator=generator)
        payload, residual = codecs.encode_2bit_scaled(grad, residual)
        sent += codecs.decode_2bit_scaled(payload, 300)
        total += grad
    assert torch.allclose(sent + residual, total, atol=1e-5)
    with pytest.raises(ValueError, match="int32 words"):
        codecs.decode_2bit_scaled(payload[:-1], 300)


def test_2bit_with_an_explicit_threshold_is_still_mxnets():
    config = parse_compression("2bit:0.5")
    state, sent = None, []
    for push in (0.4, 0.1, 0.2, 0.3):
        payload, state = codecs.encode(config, torch.tensor([push]), state)
        assert payload[0].numel() == 1          # no scale travels: the threshold is the job's
        sent.append(codecs.decode(config, payload, 1).item())
    assert sent == [0.0, 0.5, 0.0, 0.5]


# --------------------------------------------------------------------------- quant

@pytest.mark.parametrize("bits", [4, 8])
def test_quant_rounds_each_block_to_its_scale_and_keeps_the_rest(bits):
    generator = torch.Generator().manual_seed(bits)
    grad = torch.randn(1000, generator=generator) * torch.linspace(0.01, 10, 1000)
    payload, residual = codecs.encode_quant(grad, torch.zeros(1000), bits)
    assert payload.dtype == torch.int32 and payload.numel() == codecs.quant_words(1000, bits)
    assert payload.numel() == 4 + 1000 * bits // 32
    decoded = codecs.decode_quant(payload, 1000, bits)
    assert torch.allclose(decoded + residual, grad, atol=1e-5)
    levels = codecs.quant_levels(bits)
    for block, got in zip(grad.split(codecs.QUANT_BLOCK), decoded.split(codecs.QUANT_BLOCK)):
        step = block.abs().max().item() / levels
        assert (got - block).abs().max().item() <= step / 2 + 1e-6    # round to nearest
    assert decoded.abs().max() == pytest.approx(grad.abs().max().item(), rel=1e-6)


def test_quant_packs_4bit_codes_low_nibble_first_and_unpacks_exactly():
    grad = torch.tensor([7.0, -7.0, 0.0, 1.0, 2.0, 3.0, -1.0, 5.0, 6.0])   # scale 1: codes are the values
    payload, residual = codecs.encode_quant(grad, torch.zeros(9), 4)
    assert torch.all(residual == 0)
    code_bytes = payload[1:].view(torch.uint8).tolist()
    assert code_bytes[:2] == [(7 + 7) | ((-7 + 7) << 4), (0 + 7) | ((1 + 7) << 4)]
    assert torch.equal(codecs.decode_quant(payload, 9, 4), grad)
    with pytest.raises(ValueError, match="int32 words"):
        codecs.decode_quant(payload, 100, 4)


def test_quant_error_feedback_sends_what_rounding_dropped():
    grad = torch.tensor([1.0] + [0.01] * 255)      # 0.01 rounds to 0 at 4 bits (step 1/7)
    residual, sent = torch.zeros(256), torch.zeros(256)
    for _ in range(20):
        payload, residual = codecs.encode_quant(grad, residual, 4)
        sent += codecs.decode_quant(payload, 256, 4)
    assert torch.all(sent[1:] > 0)                  # the residual grew until it was sent
    assert torch.allclose(sent + residual, grad * 20, atol=1e-5)


# --------------------------------------------------------------------------- topk

def test_topk_sends_largest_ratio_and_keeps_the_rest():
    grad = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    indices, values, residual = codecs.encode_topk(grad, torch.zeros(1000), 0.01)
    assert indices.dtype == torch.int32 and indices.numel() == 10
    threshold = grad.abs().sort(descending=True).values[9]
    assert torch.all(values.abs() >= threshold)
    decoded = codecs.decode_topk(indices, values, 1000)
    assert torch.equal(decoded + residual, grad)  # nothing lost: sent + residual
    assert torch.count_nonzero(residual) == 990


def test_topk_error_feedback_sends_small_entries_eventually():
    grad = torch.tensor([1.0, 0.1, 0.1, 0.1])
    residual = torch.zeros(4)
    sent_total = torch.zeros(4)
    for _ in range(30):
        indices, values, residual = codecs.encode_topk(grad, residual, 0.25)
        sent_total += codecs.decode_topk(indices, values, 4)
    assert torch.all(sent_total[1:] > 0)  # the residual grew until small entries won
    assert torch.allclose(sent_total + residual, grad * 30)


def test_topk_pack_round_trips_and_count():
    indices = torch.tensor([3, 7, 11], dtype=torch.int32)
    values = torch.tensor([-1.5, 2.25, 1e-30])
    back_indices, back_values = codecs.unpack_topk(codecs.pack_topk(indices, values))
    assert torch.equal(back_indices, indices) and torch.equal(back_values, values)
    assert codecs.topk_count(1000, 0.01) == 10
    assert codecs.topk_count(5, 0.01) == 1
    assert codecs.topk_count(10, 1.0) == 10


# --------------------------------------------------------------------------- fp16, bf16

def test_cast_codecs_halve_bytes_and_undo_scale():
    grad = torch.randn(64)
    for name, dtype in codecs.CAST_DTYPES.items():
        payload = codecs.encode_cast(grad, dtype, scale=0.25)
        assert payload.dtype == dtype and payload.element_size() == 2
        assert torch.allclose(codecs.decode_cast(payload, scale=0.25), grad, rtol=1e-2, atol=1e-2)


def test_fp16_prescale_avoids_overflow_of_a_sum():
    grad = torch.full((4,), 40000.0)
    assert torch.isinf(codecs.encode_cast(grad, torch.float16) * 4).all()
    payload = codecs.encode_cast(grad, torch.float16, scale=1 / 4)
    assert torch.isfinite(payload.float() * 4).all()


# --------------------------------------------------------------------------- powersgd

def test_powersgd_recovers_a_low_rank_matrix():
    generator = torch.Generator().manual_seed(1)
    matrix = torch.randn(40, 2, generator=generator) @ torch.randn(2, 30, generator=generator)
    q = codecs.initial_q(30, 2, seed=0)
    p, q_next, residual = codecs.encode_powersgd(matrix, torch.zeros(40, 30), q)
    assert p.shape == (40, 2) and q_next.shape == (30, 2)
    assert torch.allclose(codecs.decode_powersgd(p, q_next), matrix, atol=1e-4)
    assert residual.abs().max() < 1e-4


def test_powersgd_error_feedback_adds_up():
    generator = torch.Generator().manual_seed(2)
    q = codecs.initial_q(20, 1, seed=0)
    residual = torch.zeros(25, 20)
    sent_total = torch.zeros(25, 20)
    grads = [torch.randn(25, 20, generator=generator) for _ in range(5)]
    for grad in grads:
        p, q, residual = codecs.encode_powersgd(grad, residual, q)
        sent_total += codecs.decode_powersgd(p, q)
    # error feedback: what was sent plus what is still owed equals everything pushed
    assert torch.allclose(sent_total + residual, sum(grads), atol=1e-4)
    assert residual.norm() > 0  # rank 1 cannot send a full-rank matrix at once


def test_powersgd_warm_start_improves_the_approximation():
    generator = torch.Generator().manual_seed(4)
    matrix = torch.randn(50, 50, generator=generator)
    q = codecs.initial_q(50, 4, seed=0)
    errors = []
    for _ in range(4):  # same matrix, no residual: pure power iteration on Q
        p, q, _ = codecs.encode_powersgd(matrix, torch.zeros(50, 50), q)
        errors.append((codecs.decode_powersgd(p, q) - matrix).norm().item())
    assert errors[-1] < errors[0]
    assert torch.equal(codecs.initial_q(50, 4, 7), codecs.initial_q(50, 4, 7))


def test_matrix_shape_covers_numel():
    for numel in (1, 2, 17, 1000, 12345):
        rows, cols = codecs.matrix_shape(numel)
        assert rows * cols >= numel and rows * cols - numel < cols


# --------------------------------------------------------------------------- one-call API

@pytest.mark.parametrize("spec, ratio", [("none", 1.0), ("fp16", 2.0), ("bf16", 2.0), ("2bit:0.5", 16.0),
                                         ("2bit", 32 / (2 + 32 / 256)), ("topk:0.01", 50.0),
                                         ("quant", 32 / (8 + 32 / 256)), ("quant:4", 32 / (4 + 32 / 256))])
def test_encode_decode_bytes_fall_by_expected_factor(spec, ratio):
    config = parse_compression(spec)
    grad = torch.randn(16000, generator=torch.Generator().manual_seed(5))
    payload, _ = codecs.encode(config, grad)
    assert codecs.payload_nbytes(payload) == pytest.approx(grad.numel() * 4 / ratio, rel=0.01)
    decoded = codecs.decode(config, payload, grad.numel())
    assert decoded.shape == (16000,) and decoded.dtype == torch.float32


def test_encode_state_carries_residual_between_calls():
    config = parse_compression("2bit:0.5")
    payload, state = codecs.encode(config, torch.tensor([0.4]))
    assert codecs.decode(config, payload, 1).item() == 0.0
    payload, state = codecs.encode(config, torch.tensor([0.1]), state)
    assert codecs.decode(config, payload, 1).item() == 0.5


def test_encode_powersgd_payload_is_p_and_q():
    config = parse_compression("powersgd:2")
    grad = torch.randn(100)
    payload, state = codecs.encode(config, grad)
    assert [t.shape for t in payload] == [(10, 2), (10, 2)]
    decoded = codecs.decode(config, payload, 100)
    assert torch.allclose(decoded + state.residual, grad, atol=1e-5)


# --------------------------------------------------------------------------- config

@pytest.mark.parametrize("spec, expected", [
    (None, CompressionConfig()),
    ("", CompressionConfig()),
    ("none", CompressionConfig()),
    ("fp16", CompressionConfig(type="fp16")),
    ("BF16", CompressionConfig(type="bf16")),
    ("2bit", CompressionConfig(type="2bit", threshold=None)),
    ({"type": "2bit"}, CompressionConfig(type="2bit")),
    ("quant", CompressionConfig(type="quant", bits=8)),
    ("quant:4", CompressionConfig(type="quant", bits=4)),
    ("2bit:0.25", CompressionConfig(type="2bit", threshold=0.25)),
    ("topk:0.05", CompressionConfig(type="topk", ratio=0.05)),
    ("powersgd:4", CompressionConfig(type="powersgd", rank=4)),
    ({"type": "2bit", "threshold": 0.5}, CompressionConfig(type="2bit", threshold=0.5)),
    ({"type": "topk", "ratio": 0.1}, CompressionConfig(type="topk", ratio=0.1)),
])
def test_parse_compression_accepts_cli_and_mxnet_forms(spec, expected):
    assert parse_compression(spec) == expected


@pytest.mark.parametrize("spec, message", [
    ("3bit", "3bit"),
    ("2bit:-1", "threshold"),
    ("2bit:abc", "abc"),
    ("topk:0", "ratio"),
    ("topk:1.5", "ratio"),
    ("powersgd:0", "rank"),
    ("powersgd:1.5", "1.5"),
    ("quant:3", "bits"),
    ("quant:x", "'x'"),
    ("fp16:2", "no ':' parameter"),
    ({"threshold": 0.5}, "'type'"),
    ({"type": "2bit", "ratio": 0.1}, "ratio"),
    (42, "42"),
])
def test_parse_compression_rejects_bad_specs_by_name(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_compression(spec)


def test_config_round_trips_through_mxnet_dict():
    for spec in ("fp16", "2bit", "2bit:0.3", "topk:0.02", "powersgd:3", "quant:4"):
        config = parse_compression(spec)
        assert parse_compression(config.to_dict()) == config
