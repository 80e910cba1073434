"""Who am I in the model-parallel grid: tensor-parallel and pipeline-parallel ranks and their groups.

NeMo's rank order: tensor-parallel rank varies fastest, so a TP group is a run of consecutive global ranks (the
GPUs of one node) and pipeline stages are across nodes: global rank = pp_rank * tp_size + tp_rank.
Data parallelism is 1 (one model replica serves), as in NeMo's eval script.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


class ParallelConfigError(ValueError):
    pass


@dataclass
class ParallelState:
    tp_size: int = 1
    pp_size: int = 1
    rank: int = 0
    device: torch.device = torch.device("cpu")
    tp_group: Optional[dist.ProcessGroup] = None  # None: single rank, collectives are no-ops
    pp_group: Optional[dist.ProcessGroup] = None

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def stage_rank(self, pp_rank: int, tp_rank: Optional[int] = None) -> int:
        """Global rank of (pp_rank, tp_rank); tp_rank defaults to ours."""
        return pp_rank * self.tp_size + (self.tp_rank if tp_rank is None else tp_rank)

    @property
    def last_stage_leader(self) -> int:
        """The rank that samples: first TP rank of the last stage."""
        return self.stage_rank(self.pp_size - 1, 0)


def layer_range(num_layers: int, pp_size: int, pp_rank: int) -> range:
    """Layers held by a stage: an even split (NeMo requires num_layers % pp_size == 0 without a custom split)."""
    if num_layers % pp_size:
        raise ParallelConfigError(
            f"num_layers ({num_layers}) is not divisible by pipeline_model_parallel_size ({pp_size})")
    per_stage = num_layers // pp_size
    return range(pp_rank * per_stage, (pp_rank + 1) * per_stage)


def check_divisibility(cfg, tp_size: int) -> None:
    """Every TP rank must hold whole query groups, heads, ffn columns and vocab rows."""
    problems = []
    if cfg.num_query_groups % tp_size:
        problems.append(f"num_query_groups ({cfg.num_query_groups}) % tensor_model_parallel_size ({tp_size}) != 0"
                        " (each rank must hold whole query groups)")
    if cfg.num_attention_heads % tp_size:
        problems.append(f"num_attention_heads ({cfg.num_attention_heads}) % tensor_model_parallel_size ({tp_size})"
                        " != 0")
    if cfg.ffn_hidden_size % tp_size:
        problems.append(f"ffn_hidden_size ({cfg.ffn_hidden_size}) % tensor_model_parallel_size ({tp_size}) != 0")
    if cfg.padded_vocab_size % tp_size:
        problems.append(f"padded vocab size ({cfg.padded_vocab_size}) % tensor_model_parallel_size ({tp_size}) != 0")
    if problems:
        raise ParallelConfigError("cannot split the model: " + "; ".join(problems))
