"""The built-in GPT and the pytext corpus: pure, fast, no network."""
import math
import re

import pytest
import torch

from paratrain.data.text import (ByteTextDataset, build_pytext, default_stdlib_dir, is_excluded, is_heldout,
                                 list_sources, order_files)
from paratrain.errors import ConfigError
from paratrain.models.gpt import GPTConfig, bits_per_byte, build_gpt, lm_loss

TINY = dict(n_layer=2, n_head=2, n_embd=32, context=16)


@pytest.mark.parametrize("field, value, fragment", [
    ("n_embd", 130, "n_embd=130 must be divisible by n_head=4"),
    ("n_layer", 0, "n_layer=0"),
    ("context", 12.5, "context=12.5"),
    ("vocab_size", True, "vocab_size=True"),
    ("dropout", 1.0, "dropout=1.0"),
    ("dropout", -0.1, "dropout=-0.1"),
    ("bias", 1, "bias=1"),
])
def test_config_rejects_bad_values_naming_them(field, value, fragment):
    with pytest.raises(ConfigError, match=fragment):
        GPTConfig(**{field: value})


def test_build_gpt_rejects_unknown_fields():
    with pytest.raises(ConfigError, match="n_layers"):
        build_gpt(n_layers=3)


def test_build_gpt_applies_overrides_to_a_config():
    model = build_gpt(GPTConfig(**TINY), n_layer=3)
    assert len(model.transformer.h) == 3 and model.config.n_embd == 32


def test_logits_shape_and_module_names():
    model = build_gpt(seed=0, **TINY)
    logits = model(torch.randint(0, 256, (3, 16)))
    assert logits.shape == (3, 16, 256) and logits.dtype == torch.float32
    names = {name for name, _ in model.named_modules()}
    assert {"transformer.wte", "transformer.wpe", "transformer.drop", "transformer.h.1",
            "transformer.ln_f", "lm_head"} <= names


def test_sequence_longer_than_context_is_refused():
    model = build_gpt(seed=0, **TINY)
    with pytest.raises(ConfigError, match="17 exceeds GPTConfig.context=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_head_is_tied_to_the_embedding_as_one_parameter():
    model = build_gpt(seed=0, **TINY)
    assert model.lm_head.weight is model.transformer.wte.weight
    names = [name for name, _ in model.named_parameters()]
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names
    lm_loss(model(torch.randint(0, 256, (2, 8))), torch.randint(0, 256, (2, 8))).backward()
    assert model.transformer.wte.weight.grad is not None


def test_init_follows_gpt2():
    model = build_gpt(seed=0, n_layer=8, n_embd=256, n_head=4)
    residual = model.transformer.h[0].attn.c_proj.weight.std().item()
    other = model.transformer.h[0].attn.c_attn.weight.std().item()
    assert other == pytest.approx(0.02, rel=0.05)
    assert residual == pytest.approx(0.02 / math.sqrt(16), rel=0.05)


def test_same_seed_same_weights():
    first, second = build_gpt(seed=3, **TINY), build_gpt(seed=3, **TINY)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))


def test_attention_is_causal():
    model = build_gpt(seed=0, **TINY).eval()
    tokens = torch.randint(0, 256, (2, 16))
    changed = tokens.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 256
    before, after = model(tokens), model(changed)
    assert torch.equal(before[:, :9], after[:, :9])
    assert not torch.allclose(before[:, 9:], after[:, 9:])


def test_lm_loss_flattens_batch_and_time():
    logits, targets = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    manual = -torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    assert lm_loss(logits, targets).item() == pytest.approx(manual.mean().item(), rel=1e-6)
    assert lm_loss(logits, targets, reduction="sum").item() == pytest.approx(manual.sum().item(), rel=1e-6)
    with pytest.raises(ConfigError, match="reduction='none'"):
        lm_loss(logits, targets, reduction="none")


def test_bits_per_byte():
    assert bits_per_byte(math.log(256)) == pytest.approx(8.0)
    assert bits_per_byte(math.log(2)) == pytest.approx(1.0)
    # an untrained model predicts close to uniform over 256 bytes
    model = build_gpt(seed=0, **TINY)
    tokens = torch.randint(0, 256, (4, 17))
    assert bits_per_byte(lm_loss(model(tokens[:, :-1]), tokens[:, 1:]).item()) == pytest.approx(8.0, abs=0.1)


def test_windows_do_not_overlap_and_targets_shift_by_one():
    data = torch.arange(23, dtype=torch.uint8)
    dataset = ByteTextDataset(data, context=5)
    assert len(dataset) == 4          # (23 - 1) // 5: windows start at 0, 5, 10, 15
    x, y = dataset[1]
    assert x.dtype == y.dtype == torch.int64
    assert x.tolist() == [5, 6, 7, 8, 9] and y.tolist() == [6, 7, 8, 9, 10]
    assert dataset[3][1].tolist() == [16, 17, 18, 19, 20]
    with pytest.raises(IndexError):
        dataset[4]
    assert len(ByteTextDataset(torch.arange(6, dtype=torch.uint8), context=5)) == 1
    assert len(ByteTextDataset(torch.arange(5, dtype=torch.uint8), context=5)) == 0


def test_window_step_keeps_every_kth_window():
    dataset = ByteTextDataset(torch.arange(40, dtype=torch.uint8), context=4, window_step=3)
    assert len(dataset) == 3          # windows start at 0, 12, 24; one at 36 would need 41 bytes
    assert [dataset[i][0].tolist() for i in range(3)] == [[0, 1, 2, 3], [12, 13, 14, 15], [24, 25, 26, 27]]
    assert dataset[2][1].tolist() == [25, 26, 27, 28]
    assert len(ByteTextDataset(torch.arange(41, dtype=torch.uint8), context=4, window_step=3)) == 4


def test_byte_dataset_rejects_bad_inputs():
    with pytest.raises(ConfigError, match="uint8"):
        ByteTextDataset(torch.arange(10), context=4)
    with pytest.raises(ConfigError, match="context=0"):
        ByteTextDataset(torch.zeros(10, dtype=torch.uint8), context=0)
    with pytest.raises(ConfigError, match="window_step=0"):
        ByteTextDataset(torch.zeros(10, dtype=torch.uint8), context=2, window_step=0)


def test_corpus_excludes_third_party_and_optional_parts():
    assert is_excluded("site-packages/torch/__init__.py")
    assert is_excluded("unittest/test/test_case.py") and is_excluded("idlelib/editor.py")
    assert is_excluded("_sysconfigdata__linux_x86_64-linux-gnu.py")
    assert is_excluded("config-3.11-x86_64-linux-gnu/python-config.py")
    assert not is_excluded("asyncio/tasks.py") and not is_excluded("json/decoder.py")
    relatives = [f.relative for f in list_sources(default_stdlib_dir())]
    assert relatives == sorted(relatives) and "os.py" in relatives
    assert not any(is_excluded(r) or not r.endswith(".py") for r in relatives)


def test_corpus_and_split_are_deterministic_and_disjoint():
    train, heldout = build_pytext(context=64, max_train_bytes=200_000, max_heldout_bytes=20_000)
    again, heldout_again = build_pytext(context=64, max_train_bytes=200_000, max_heldout_bytes=20_000)
    assert torch.equal(train.data, again.data) and torch.equal(heldout.data, heldout_again.data)
    assert train.num_bytes == 200_000 and len(train) == (200_000 - 1) // 64
    assert (train.vocab_size, train.task) == (256, "lm")
    sources = list_sources(default_stdlib_dir())
    held = [f for f in sources if is_heldout(f.relative)]
    assert 0.03 < len(held) / len(sources) < 0.2
    # the held-out split holds every held-out file, in the same order as train takes its own
    ordered = order_files(sources, "hashed")
    expected = b"".join((default_stdlib_dir() / f.relative).read_bytes() for f in ordered if is_heldout(f.relative))
    assert bytes(heldout.data.tolist()) == expected and heldout.num_files == len(held)
    train_bytes = b""
    for source in (f for f in ordered if not is_heldout(f.relative)):
        if len(train_bytes) >= 200_000:
            break
        train_bytes += (default_stdlib_dir() / source.relative).read_bytes()
    assert bytes(train.data.tolist()) == train_bytes[:200_000]     # no held-out file in train


def test_heldout_windows_are_spread_evenly_under_the_cap():
    _, heldout = build_pytext(context=64, max_train_bytes=10_000, max_heldout_bytes=20_000)
    assert len(heldout) * 64 <= 20_000 and len(heldout) >= 20_000 // 64 // 2
    assert heldout.window_step > 1
    last_start = (len(heldout) - 1) * heldout.window_step * 64
    assert last_start > heldout.num_bytes * 0.8     # windows reach the end of the split, not its first files
    x, y = heldout[1]
    start = heldout.window_step * 64
    assert x.tolist() == heldout.data[start:start + 64].tolist()
    assert y.tolist() == heldout.data[start + 1:start + 65].tolist()
    _, everything = build_pytext(context=64, max_train_bytes=10_000, max_heldout_bytes=10 ** 8)
    assert everything.window_step == 1 and len(everything) == (everything.num_bytes - 1) // 64


def test_file_orders_take_different_files_under_a_cap_and_the_same_held_out_files():
    hashed_train, hashed_held = build_pytext(context=64, max_train_bytes=300_000, file_order="hashed")
    sorted_train, sorted_held = build_pytext(context=64, max_train_bytes=300_000, file_order="sorted")
    assert not torch.equal(hashed_train.data, sorted_train.data)
    assert sorted(hashed_held.data.tolist()) == sorted(sorted_held.data.tolist())
    relatives = [f.relative for f in list_sources(default_stdlib_dir())]
    first_sorted = next(r for r in relatives if not is_heldout(r))
    assert bytes(sorted_train.data[:64].tolist()) == (default_stdlib_dir() / first_sorted).read_bytes()[:64]
    with pytest.raises(ConfigError, match="file_order='random'"):
        build_pytext(file_order="random")


def test_split_membership_depends_on_the_path_only():
    assert is_heldout("os.py") == is_heldout("os.py")
    assert {is_heldout(f"pkg/m{i}.py") for i in range(100)} == {True, False}


def test_a_tiny_stdlib_tree_is_split_by_file(tmp_path):
    for i in range(40):
        (tmp_path / f"mod{i:02d}.py").write_bytes(f"# module {i}\n".encode() * 20)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "skip.py").write_bytes(b"x" * 1000)
    train, heldout = build_pytext(context=8, max_train_bytes=10**6, max_heldout_bytes=10**6, stdlib_dir=tmp_path,
                                  file_order="sorted")
    names = [f"mod{i:02d}.py" for i in range(40)]
    held = [n for n in names if is_heldout(n)]
    assert heldout.num_files == len(held) and train.num_files == 40 - len(held)
    assert b"x" not in bytes(train.data.tolist())
    texts = {n: (tmp_path / n).read_bytes() for n in names}
    assert bytes(heldout.data.tolist()) == b"".join(texts[n] for n in held)
    assert bytes(train.data.tolist()) == b"".join(texts[n] for n in names if n not in held)


def test_missing_or_empty_stdlib_says_where_it_looked(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path / "nowhere"))):
        build_pytext(stdlib_dir=tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="found no .py files"):
        build_pytext(stdlib_dir=tmp_path)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"context": 0}, "context=0"),
    ({"max_train_bytes": -5}, "max_train_bytes=-5"),
    ({"max_heldout_bytes": 1.5}, "max_heldout_bytes=1.5"),
])
def test_build_pytext_validates_arguments(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        build_pytext(**kwargs)


def test_too_small_a_cap_is_refused():
    with pytest.raises(ConfigError, match="too few for one window"):
        build_pytext(context=128, max_train_bytes=100)
