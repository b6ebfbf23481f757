"""The MoE block's configuration: experts per layer, router, variants, dispatch (one per model)."""
from __future__ import annotations

from dataclasses import dataclass

from megatron_ted.moe.hierarchical import A2A_ALGORITHMS
from megatron_ted.moe.router import RouterConfig

MLP_TYPES = ("standard", "residual")


@dataclass(frozen=True)
class MoEConfig:
    router: RouterConfig
    ffn_hidden_size: int
    # int N: layer i is MoE when i % N == 0 (Megatron-core); or one 0/1 per layer (1: MoE), as
    # --moe-layer-freq "([0]+[1]*N)" gives (model/layer_pattern.py)
    layer_freq: int | tuple[int, ...] = 2
    duplicate_token_dropping: bool = True
    # Pyramid-MoE: one expert count per MoE layer, in layer order (None: router.num_experts everywhere)
    num_experts_per_layer: tuple[int, ...] | None = None
    mlp_type: str = "standard"               # "residual": dense MLP + MoE mixed by a learned coefficient
    a2a_algorithm: str = "flat"              # "hierarchical": HetuMoE's node-aggregated EP exchange
    a2a_node_size: int | None = None         # ranks per node for "hierarchical" (None: the whole world)
    shared_expert_size: int | None = None    # shared experts' FFN size (None: none)
    shared_expert_gate: bool = False         # their sigmoid gate
    shared_expert_overlap: bool = False      # run them while the dispatch all-to-all is in flight

    def __post_init__(self):
        if self.mlp_type not in MLP_TYPES:
            raise ValueError(f"--mlp-type must be one of {', '.join(MLP_TYPES)}, got {self.mlp_type!r}")
        if self.a2a_algorithm not in A2A_ALGORITHMS:
            raise ValueError(f"--moe-a2a-algorithm must be one of {', '.join(A2A_ALGORITHMS)}, "
                             f"got {self.a2a_algorithm!r}")
