"""attention_bounds runs the sample batch the way the model's forward accepts it (issue 15 item 6):
a user's own nn.Module taking a plain tensor, a dict of keyword arguments, a tuple of positional
arguments, a callable; a sample that cannot be used warns instead of leaving NaN in silence."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from spectral_plugins.attention.bounds import AttentionBounds, attention_bounds
from spectral_plugins.attention.inputs import model_call

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_torch_thread")
D, HEADS, VOCAB = 32, 4, 50


class SelfAttention(nn.Module):
    """Plain multi-head self-attention with separate q/k/v/o projections; records its logits."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.head_dim = HEADS, D // HEADS
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(D, D) for _ in range(4))
        self.logits: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (proj(x).view(b, n, HEADS, -1).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        logits = q @ k.transpose(-1, -2) * self.head_dim**-0.5
        self.logits.append(logits.detach())
        if mask is not None:
            logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
        return self.o_proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, D))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, pre_norm: bool) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = SelfAttention()
        self.mlp = MLP()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attn(self.norm1(x), mask)
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x, mask))  # post-norm: no norm right before q/k of block 0
        return self.norm2(x + self.mlp(x))


class TinyTransformer(nn.Module):
    """A user's own transformer: ``forward(tokens)`` takes a plain tensor, not ``input_ids=``."""

    def __init__(self, pre_norm: bool = True, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList(Block(pre_norm) for _ in range(layers))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return x


class MaskedTransformer(TinyTransformer):
    """Needs two positional arguments."""

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return x


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(5))


@pytest.fixture
def no_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        yield


def model(cls: type[TinyTransformer] = TinyTransformer, **kwargs: bool) -> TinyTransformer:
    torch.manual_seed(0)
    built = cls(**kwargs).eval()
    with torch.no_grad():  # norms that are not the identity, so finding them matters
        for block in built.blocks:
            block.norm1.weight.uniform_(0.5, 2.0)
    return built


def true_max_logits(net: TinyTransformer) -> list[torch.Tensor]:
    """Per block, per head: the largest |logit| the model itself computed (all recorded batches)."""
    return [torch.stack([t.abs().amax(dim=(0, 2, 3)) for t in b.attn.logits]).amax(0).double()
            for b in net.blocks]


def assert_observed_equals_the_models_logits(result: AttentionBounds, net: TinyTransformer) -> None:
    for layer, true_max in zip(result.layers, true_max_logits(net)):
        ours = torch.tensor([h.observed_max for h in layer.heads], dtype=torch.float64)
        assert torch.allclose(ours, true_max, rtol=1e-4), layer.key
        assert all(h.observed_max <= h.deterministic_bound for h in layer.heads)
    assert result.gamma_source == "sample"


def test_a_plain_tensor_reaches_a_forward_that_takes_one(ids: torch.Tensor, no_warnings: None) -> None:
    net = model()
    result = attention_bounds(net, sample_batch=ids)
    assert [la.norm_module for la in result.layers] == ["blocks.0.norm1", "blocks.1.norm1"]
    assert all(not math.isnan(la.bound()) and la.input_norm_source == "layernorm" for la in result.layers)
    assert not any("could not run" in c for c in result.caveats)
    assert_observed_equals_the_models_logits(result, net)


def test_without_a_norm_before_q_k_the_sample_gives_finite_bounds(ids: torch.Tensor,
                                                                  no_warnings: None) -> None:
    net = model(pre_norm=False)
    result = attention_bounds(net, sample_batch=ids)
    assert result.layers[0].input_norm_source == "sample" and not math.isnan(result.layers[0].bound())
    assert result.layers[1].norm_module == "blocks.0.norm2"  # post-norm of block 0 feeds block 1
    assert_observed_equals_the_models_logits(result, net)


def test_nan_bounds_without_a_sample_warn(ids: torch.Tensor) -> None:
    with pytest.warns(RuntimeWarning, match=r"bounds of \['L00_attn', 'L01_attn'\] are NaN: .*no sample"):
        result = attention_bounds(model(pre_norm=False))
    assert all(math.isnan(la.bound()) for la in result.layers)


def test_a_tuple_is_positional_arguments_and_a_callable_runs_anything(ids: torch.Tensor,
                                                                       no_warnings: None) -> None:
    mask = torch.ones_like(ids, dtype=torch.bool)
    net = model(MaskedTransformer)
    assert_observed_equals_the_models_logits(attention_bounds(net, sample_batch=(ids, mask)), net)
    net = model(MaskedTransformer)
    result = attention_bounds(net, sample_batch=[ids[:2], ids[2:]],
                              call_model=lambda m, batch: m(batch, torch.ones_like(batch, dtype=torch.bool)))
    assert_observed_equals_the_models_logits(result, net)
    assert model_call(net, {"tokens": ids, "mask": mask}) == ((), {"tokens": ids, "mask": mask})


def test_a_sample_the_forward_cannot_take_warns_and_says_what_to_pass(ids: torch.Tensor) -> None:
    with pytest.warns(RuntimeWarning, match=r"could not run MaskedTransformer on sample_batch \(TypeError: "
                                            r"MaskedTransformer.forward\(tokens, mask\) cannot take a "
                                            r"Tensor\); .*call_model=") as record:
        result = attention_bounds(model(MaskedTransformer), sample_batch=ids)
    assert len(record) == 1  # one warning, not one per reason
    assert any("could not run the model" in c for c in result.caveats)
    assert all(math.isnan(h.observed_max) for la in result.layers for h in la.heads)


def test_a_sample_that_fails_inside_the_model_warns(ids: torch.Tensor) -> None:
    with pytest.warns(RuntimeWarning, match=r"could not run TinyTransformer on sample_batch \(IndexError"):
        attention_bounds(model(), sample_batch=ids + VOCAB)  # token ids beyond the embedding


# --- Hugging Face models ---------------------------------------------------------------------------

def gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=32, vocab_size=64)
    torch.manual_seed(1)
    return transformers.GPT2Model(config).eval()


def test_hugging_face_models_get_token_ids_as_input_ids(no_warnings: None) -> None:
    net = gpt2()
    assert list(model_call(net, torch.zeros(1, 4, dtype=torch.long))[1]) == ["input_ids"]
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    result = attention_bounds(net, sample_batch=ids)
    assert result.gamma_source == "sample" and result.seq_len == 16
    assert all(not math.isnan(h.observed_max) for la in result.layers for h in la.heads)
    as_dict = attention_bounds(net, sample_batch={"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    via_callable = attention_bounds(net, sample_batch=ids, call_model=lambda m, batch: m(input_ids=batch))
    for other in (as_dict, via_callable):
        assert [h.observed_max for la in other.layers for h in la.heads] == \
            [h.observed_max for la in result.layers for h in la.heads]


def test_hugging_face_models_warn_on_inputs_they_do_not_take() -> None:
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    with pytest.warns(RuntimeWarning, match=r"could not run GPT2Model on sample_batch \(\w+Error: "):
        result = attention_bounds(gpt2(), sample_batch={"tokens": ids})
    assert result.gamma_source == "default"


def test_the_tracker_publishes_observed_logits_of_a_users_own_model(ids: torch.Tensor,
                                                                    no_warnings: None) -> None:
    from spectral_plugins.core.keys import attention_key
    from spectral_plugins.runtime.tracker import SpectralTracker

    net = model()
    # series="all": every attention quantity (the default publishes the rank-aware bound and its scale)
    tracker = SpectralTracker(net, every_n_steps=1, history=False, attention={"sample_batch": ids},
                              series="all")
    report = tracker.step(1)
    tracker.close()
    assert report is not None
    for layer, true_max in zip(("L00_attn", "L01_attn"), true_max_logits(net)):
        observed = report.scalars()[attention_key("observed_logit_max", layer)]
        assert observed == pytest.approx(float(true_max.max()), rel=1e-4)
        assert math.isfinite(report.scalars()[attention_key("logit_bound", layer)])
