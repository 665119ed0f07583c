"""Which split a model takes over a group of ranks, and the refusals that say why it takes none: checked from the
model's config and mlx-lm's classes alone, before any rank loads a weight (no group needed: only its size)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from forgellm.backends.mlx.distributed.sharding import Sharding, ShardingRefused
from forgellm.testing import build_tiny_model

QWEN2 = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": 4}


@dataclass
class GroupOfSize:
    """What planning reads of a group: its size."""

    ranks: int

    def size(self) -> int:
        return self.ranks

    def rank(self) -> int:
        return 0


def plan(path, ranks: int, parallel: str = "auto") -> str:
    return Sharding(GroupOfSize(ranks), parallel).plan(path)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("models") / "qwen2", config_overrides=QWEN2)


def test_auto_splits_by_tensor_where_the_ranks_divide_the_heads_else_by_pipeline(qwen2):
    # The tiny Qwen2 has 4 attention heads and 2 KV heads, and 4 layers.
    assert plan(qwen2, 2) == "tensor"
    assert plan(qwen2, 4) == "pipeline"
    assert plan(qwen2, 2, "pipeline") == "pipeline"


def test_heads_that_do_not_divide_are_refused_naming_the_counts(qwen2):
    with pytest.raises(
        ShardingRefused, match=r"its 4 attention heads do not divide by 3 \(it has 4 attention heads and 2 KV heads"
    ):
        plan(qwen2, 3, "tensor")


def test_a_llama_cannot_be_pipelined_and_a_model_without_its_weight_index_neither(tiny_model, tmp_path):
    with pytest.raises(ShardingRefused, match="mlx-lm has no pipeline parallelism for 'llama' models"):
        plan(tiny_model, 2, "pipeline")
    unindexed = build_tiny_model(tmp_path / "qwen2", config_overrides=QWEN2)
    (unindexed / "model.safetensors.index.json").unlink()
    with pytest.raises(ShardingRefused, match="no model.safetensors.index.json"):
        plan(unindexed, 2, "pipeline")


def test_more_ranks_than_layers_cannot_pipeline(qwen2):
    with pytest.raises(ShardingRefused, match="it has 4 layers, fewer than the 5 ranks"):
        plan(qwen2, 5, "pipeline")


def test_an_unreadable_config_is_refused_saying_so(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ShardingRefused, match="names no model_type"):
        plan(tmp_path, 2)
