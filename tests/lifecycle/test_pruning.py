"""Block importance, pruning advice, identity-skip surgery and evaluate_pruning."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from spectral_plugins.lifecycle.importance import (
    BlockImportance,
    advise_pruning,
    block_importance,
    importance_from_history,
    judge_advice,
    tie_set,
)
from spectral_plugins.lifecycle.pruning import evaluate_pruning, find_blocks, removal_loss, skip_blocks
from tests.synthetic import profile_history

SCALES = (3.0, 0.03, 1.0, 0.01, 0.3, 0.1)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Block(nn.Module):
    """``x + scale * tanh(W x)``: the damage of removing it grows with ``scale``."""

    def __init__(self, dim: int, scale: float, tuple_out: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim)
        self.scale = scale
        self.tuple_out = tuple_out

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):  # noqa: ANN201
        out = x + self.scale * torch.tanh(self.lin(x))
        return (out, None) if self.tuple_out else out


class Toy(nn.Module):
    def __init__(self, scales=SCALES, tuple_out: bool = False, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.layers = nn.ModuleList(Block(dim, s, tuple_out) for s in scales)
        self.head = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor, skip: tuple[int, ...] = ()) -> torch.Tensor:
        h = self.embed(x)
        for i, block in enumerate(self.layers):
            if i in skip:
                continue
            h = block(h, mask=None)
            h = h[0] if isinstance(h, tuple) else h
        return self.head(h)


@pytest.fixture()
def toy() -> tuple[Toy, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = Toy().eval()
    x = torch.randn(64, 4)
    with torch.no_grad():
        return model, x, model(x)


@pytest.mark.parametrize("tuple_out", [False, True])
def test_skip_equals_removal_and_is_undone(tuple_out: bool) -> None:
    torch.manual_seed(0)
    model = Toy(tuple_out=tuple_out).eval()
    x = torch.randn(5, 4)
    with torch.no_grad():
        before = model(x)
        with skip_blocks(model, [2, 4]):
            skipped = model(x)
            skipped_again = model(x)  # second call: the identity without running the block
        removed = model(x, skip=(2, 4))
        after = model(x)
    torch.testing.assert_close(skipped, removed, rtol=0, atol=0)
    torch.testing.assert_close(skipped_again, removed, rtol=0, atol=0)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert all("forward" not in block.__dict__ for block in model.layers)


def test_skip_is_undone_after_an_error(toy) -> None:
    model = toy[0]
    with pytest.raises(RuntimeError, match="boom"), skip_blocks(model, [0]):
        raise RuntimeError("boom")
    assert "forward" not in model.layers[0].__dict__


def test_find_blocks_and_shape_changing_blocks() -> None:
    model = Toy()
    assert find_blocks(model)[0] == "layers"
    stack = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8))
    with pytest.raises(ValueError, match="maps"), skip_blocks(stack, [0], blocks_path=""):
        stack(torch.randn(2, 4))


def test_importance_and_advice_from_numbers() -> None:
    imp = block_importance([0, 0, 1, 1, 2, None], ["q", "v", "q", "mlp_in", "o", "embed"],
                           [2.0, 4.0, 5.0, math.nan, 3.0, 1.0])
    assert imp.depths.tolist() == [0, 1, 2]
    np.testing.assert_allclose(imp.scores, [-3.0, -5.0, -3.0])
    assert imp.removal_order() == (1, 2, 0)  # ties: the later block goes first
    assert imp.removal_order(protect=[1]) == (2, 0)
    advice = advise_pruning(imp, 2)
    assert advice.remove == (1, 2) and advice.order == (1, 2, 0)
    reversed_imp = block_importance([0, 1], ["q", "q"], [2.0, 5.0], method="alpha_reversed")
    assert reversed_imp.removal_order() == (0, 1)
    with pytest.raises(ValueError, match="needs first-snapshot"):
        block_importance([0], ["q"], [2.0], method="alpha_drop")
    with pytest.raises(ValueError, match="n_remove"):
        advise_pruning(imp, 4)
    nan_imp = BlockImportance(np.array([0, 1]), np.array([math.nan, 1.0]), "alpha")
    assert nan_imp.removal_order() == (1, 0)


def test_importance_from_history() -> None:
    h = profile_history(np.array([3.0, 2.0, 4.0]))
    assert importance_from_history(h, method="alpha").removal_order() == (2, 0, 1)
    assert importance_from_history(h).method == "alpha"  # the default, pre-registered (docs/reproduction.md)
    drop = importance_from_history(h, method="alpha_drop")  # constant in time: no drop anywhere
    np.testing.assert_allclose(drop.scores, 0.0)
    h.append_values(10_000, {"L00_q": [5.0, 1.0, 2.0, 7.0], "L02_q": [5.0, 3.9, 2.0, 7.0]})
    drop = importance_from_history(h, method="alpha_drop", tail_fraction=0.01)  # the last step only
    assert drop.score(0) == pytest.approx(2.0)  # only L00_q has a value at that step: it fell by 2
    assert drop.score(2) == pytest.approx(0.1)
    assert math.isnan(drop.score(1))  # no alpha at all: removed last
    assert drop.removal_order() == (2, 0, 1)


def test_evaluate_pruning_on_a_planted_model(toy) -> None:
    model, x, target = toy

    def eval_fn(m: nn.Module) -> float:
        return float(nn.functional.mse_loss(m(x), target))

    planted = BlockImportance(np.arange(len(SCALES)), np.array(SCALES), "alpha")
    result = evaluate_pruning(model, eval_fn, 2, importance=planted, n_random=4)
    assert result.baseline_loss == 0.0
    assert result.spectral_blocks == (1, 3) == result.oracle_blocks  # the two smallest scales
    assert result.last_blocks == (4, 5)
    assert result.spearman_rho == pytest.approx(1.0)
    assert result.spectral_loss == result.oracle_loss < result.last_loss
    assert result.ratio_vs_last == pytest.approx(result.last_loss / result.spectral_loss)
    assert result.ratio_vs_last > 1 and result.ratio_vs_random > 1
    assert len(result.random_losses) == 4
    assert result.random_loss == pytest.approx(np.mean(result.random_losses))
    assert result.spectral_loss == removal_loss(model, eval_fn, (1, 3))
    assert set(result.scalars()) >= {"spectral_lifecycle/prune_ratio_vs_last",
                                     "spectral_lifecycle/importance_spearman"}
    with pytest.raises(ValueError, match="n_remove"):
        evaluate_pruning(model, eval_fn, len(SCALES), importance=planted)


def _batch(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (4, 16), generator=torch.Generator().manual_seed(0))


def test_evaluate_pruning_on_gpt2_with_engine_importance() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=4, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    x = _batch(64)

    def eval_fn(m: nn.Module) -> float:
        return float(m(x, labels=x).loss)  # the default use_cache=True path

    with torch.no_grad():
        logits = model(x).logits
    result = evaluate_pruning(model, eval_fn, 2, n_random=2)
    assert find_blocks(model)[0] == "transformer.h"
    assert result.importance.depths.tolist() == [0, 1, 2, 3]
    assert np.isfinite(result.importance.scores).all()
    assert len(result.spectral_blocks) == 2 and result.last_blocks == (2, 3)
    assert all(math.isfinite(v) and v != result.baseline_loss for v in result.single_losses)
    assert math.isfinite(result.spearman_rho)
    assert result.spectral_loss == pytest.approx(removal_loss(model, eval_fn, result.spectral_blocks))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, logits, rtol=0, atol=0)  # the model is restored


def test_skip_blocks_on_llama() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=16)
    model = transformers.LlamaForCausalLM(config).eval()
    x = _batch(64)
    with torch.no_grad():
        before = model(x).logits
        with skip_blocks(model, [0, 1, 2]):
            # every block skipped: logits = lm_head(norm(embeddings))
            expected = model.lm_head(model.model.norm(model.model.embed_tokens(x)))
            torch.testing.assert_close(model(x).logits, expected)
        torch.testing.assert_close(model(x).logits, before, rtol=0, atol=0)
    assert find_blocks(model)[0] == "model.layers"


def test_tie_set_and_judged_advice_from_known_costs() -> None:
    importance = BlockImportance(np.arange(4), np.array([4.0, 1.0, 2.0, 3.0]), "alpha")
    advice = advise_pruning(importance, 1)
    assert advice.reliable is None and "not verified" in advice.text()
    # block 1 is clearly cheapest: 0.01 +- 0.001 against >= 0.05: a reliable ranking
    clear = judge_advice(advice, [1.0, 0.01, 0.05, 0.06], [0.01, 0.001, 0.001, 0.001])
    assert clear.reliable and clear.tie_set == (1,) and clear.text() == "1, 2, 3, 0"
    # blocks 1-3 cost 0.010-0.013, each +- 0.003: which one to remove is undetermined
    noisy = judge_advice(advice, [1.0, 0.010, 0.012, 0.013], [0.01, 0.003, 0.003, 0.003])
    assert noisy.reliable is False and noisy.tie_set == (1, 2, 3)
    assert noisy.text().startswith("no reliable advice (removing any 1 of blocks [1, 2, 3] costs the same")
    assert tie_set([0.0, 0.1], [0.0, 0.0], (0, 1)) == (0,)
    assert tie_set([0.0, 0.1], [0.04, 0.04], (0, 1)) == (0, 1)  # 0.1 <= 2 * sqrt(2) * 0.04


def test_evaluate_pruning_with_per_batch_losses_judges_the_advice(toy) -> None:
    model, x, target = toy
    batches = x.split(8)
    targets = target.split(8)

    def per_batch(m: nn.Module) -> list[float]:
        return [float(nn.functional.mse_loss(m(b), t)) for b, t in zip(batches, targets)]

    planted = BlockImportance(np.arange(len(SCALES)), np.array(SCALES), "alpha")
    result = evaluate_pruning(model, per_batch, 1, importance=planted, n_random=2)
    se = np.asarray(result.single_stderr)
    increases = np.asarray(result.single_losses) - result.baseline_loss
    with torch.no_grad():  # Toy's own skip argument is an independent reference for the surgery
        skipped = [[float(nn.functional.mse_loss(model(b, skip=(i,)), t)) for b, t in zip(batches, targets)]
                   for i in range(len(SCALES))]
    expected = [np.std(losses, ddof=1) / np.sqrt(8) for losses in skipped]
    np.testing.assert_allclose(se, expected, rtol=1e-6)  # the baseline loss is 0 in every batch
    assert result.advice is not None and result.advice.reliable is (
        len(tie_set(increases, se, range(len(SCALES)))) <= 1)
    assert result.advice.tie_set[0] == int(np.argmin(increases))
    assert math.isfinite(result.spectral_vs_last_stderr)
