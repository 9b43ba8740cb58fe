"""Traced pipeline stages for models that are not nn.Sequential: pure, one process."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from paratrain.errors import ConfigError
from paratrain.models.gpt import build_gpt, lm_loss
from paratrain.parallel.traced_split import (auto_split_points, check_split_points, parse_split_points,
                                             repeated_blocks, trace_stages)

TINY = dict(n_layer=4, n_embd=32, n_head=2, context=16, vocab_size=64)

warnings.filterwarnings("ignore", module="torch")


def chain(stages, x):
    """Run the stages one after the other in this process, as the pipeline does."""
    values = (x,)
    for stage in stages:
        out = stage(*values)
        values = out if isinstance(out, tuple) else (out,)
    return values[0]


def tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=64, n_positions=16, use_cache=False,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


@pytest.fixture(scope="module")
def gpt_split():
    model = build_gpt(seed=0, **TINY)
    return model, trace_stages(model, torch.randint(0, 64, (4, 16)), ["transformer.h.2"], 2)


def test_gpt_stages_reproduce_the_model_at_other_batch_sizes(gpt_split):
    model, split = gpt_split
    assert split.fixed_batch is None and split.split_points == ["transformer.h.2"]
    for batch in (1, 3, 7):   # dynamic batch: not the traced size
        x = torch.randint(0, 64, (batch, 16))
        assert torch.equal(chain(split.stages, x), model(x))


def test_the_tied_embedding_is_recorded_and_its_copies_sum_to_the_model_gradient(gpt_split):
    model, split = gpt_split
    assert [group.names for group in split.tied] == [{0: "transformer.wte.weight", 1: "lm_head.weight"}]
    # stage 0 also holds a copy under the head's name that its graph never uses
    assert split.unused == [{"lm_head.weight"}, set()]
    assert "lm_head.weight" not in {n for n, p in split.stages[0].named_parameters()
                                    if any(p is q for q in split.trainable(0))}
    x, y = torch.randint(0, 64, (3, 16)), torch.randint(0, 64, (3, 16))
    model.zero_grad()
    lm_loss(model(x), y).backward()
    for stage in split.stages:
        stage.zero_grad()
    lm_loss(chain(split.stages, x), y).backward()
    embedding = split.stages[0].get_parameter("transformer.wte.weight").grad
    head = split.stages[1].get_parameter("lm_head.weight").grad
    reference = model.transformer.wte.weight.grad
    assert not torch.allclose(embedding, reference, atol=1e-4)   # why the runtime must sum them
    torch.testing.assert_close(embedding + head, reference, rtol=0, atol=1e-6)
    assert split.stages[0].get_parameter("lm_head.weight").grad is None


def test_the_second_stage_takes_the_batch_size_as_an_int(gpt_split):
    _, split = gpt_split
    assert split.input_is_int == [(False,), (False, True)]


def test_the_original_model_is_left_untouched():
    model = build_gpt(seed=0, **TINY)
    forward = model.transformer.h[2].forward
    trace_stages(model, torch.randint(0, 64, (2, 16)), None, 2)
    assert model.transformer.h[2].forward == forward and model.training


def test_an_eval_twin_turns_dropout_off_and_shares_the_training_tensors():
    model = build_gpt(seed=0, dropout=0.2, **TINY)
    split = trace_stages(model, torch.randint(0, 64, (2, 16)), ["transformer.h.2"], 2)
    x = torch.randint(0, 64, (3, 16))
    first, second = chain(split.eval_stages, x), chain(split.eval_stages, x)
    assert torch.equal(first, second) and torch.equal(first, model.eval()(x))
    assert not torch.equal(chain(split.stages, x), chain(split.stages, x))   # the training trace keeps dropout
    for train_stage, eval_stage in zip(split.stages, split.eval_stages):
        assert all(a is b for a, b in zip(train_stage.parameters(), eval_stage.parameters()))
    with torch.no_grad():
        split.stages[1].get_parameter("lm_head.weight").add_(1.0)
    assert not torch.equal(chain(split.eval_stages, x), first)   # sees the training stage's update


def test_no_eval_twin_without_mode_dependent_modules(gpt_split):
    _, split = gpt_split
    assert split.eval_stages is split.stages


def test_gpt2_lm_head_model_splits_passing_a_bool_mask():
    model = tiny_gpt2()
    split = trace_stages(model, torch.randint(0, 64, (2, 16)), ["transformer.h.1"], 2)
    assert split.input_is_int[1] == (False, True, False)
    x = torch.randint(0, 64, (3, 16))
    assert torch.equal(chain(split.stages, x), model(x).logits)
    assert [g.names for g in split.tied] == [{0: "transformer.wte.weight", 1: "lm_head.weight"}]


def test_auto_split_points_balance_the_largest_module_list():
    model = build_gpt(seed=0, **TINY)
    assert repeated_blocks(model) == ("transformer.h", [f"transformer.h.{i}" for i in range(4)])
    assert auto_split_points(model, 2) == ["transformer.h.2"]
    assert auto_split_points(model, 4) == ["transformer.h.1", "transformer.h.2", "transformer.h.3"]
    assert auto_split_points(model, 1) == []
    with pytest.raises(ConfigError, match="between 1 and the model's 4 repeated blocks"):
        auto_split_points(model, 5)
    with pytest.raises(ConfigError, match="no nn.ModuleList"):
        auto_split_points(nn.Linear(2, 2), 2)


@pytest.mark.parametrize("points, fragment", [
    (["transformer.h.9"], "is not a module of GPT"),
    (["transformer.h.1", "transformer.h.2"], "names 2 modules; 2 stages need 1"),
])
def test_bad_split_points_are_refused(points, fragment):
    with pytest.raises(ConfigError, match=fragment):
        check_split_points(build_gpt(seed=0, **TINY), points, 2)


def test_split_points_must_be_in_module_order():
    with pytest.raises(ConfigError, match="distinct and in the model's module order"):
        check_split_points(build_gpt(seed=0, **TINY), ["transformer.h.3", "transformer.h.1"], 3)


def test_parse_split_points():
    assert parse_split_points("a.b, c.d") == ["a.b", "c.d"]
    assert parse_split_points("auto") is None and parse_split_points(None) is None
    with pytest.raises(ConfigError, match="empty name"):
        parse_split_points("a,,b")
