"""A model's dimensions in one vocabulary, whatever its architecture: what 05_check's formulas count parameters and
memory from, what the studio estimates a config's model with, and what our own model's ModelArgs describe
(ModelArgs.dims()). Unknown sizes are None; flags default to a plain decoder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional


@dataclass
class Dims:
    hidden: Optional[int] = None  # model width
    layers: Optional[int] = None  # decoder layers (the decoder's, for encoder-decoder models)
    heads: Optional[int] = None  # query heads
    kv_heads: Optional[int] = None  # key/value heads (fewer than heads: grouped-query attention)
    head_dim: Optional[int] = None
    ffn: Optional[int] = None  # MLP hidden size
    vocab: Optional[int] = None
    context: Optional[int] = None  # the longest context the model was built for
    tied: bool = True  # the output head shares the input embedding
    gated: bool = True  # SwiGLU-style MLP (gate, up, down) rather than two matrices
    experts: int = 1  # mixture of experts: experts per layer, and how many each token uses
    experts_used: int = 1
    attention: str = "full"  # "full" or "ssm" (Mamba-style state space layers, no KV cache)
    ssm_inner: Optional[int] = None
    ssm_state: Optional[int] = None
    ssm_conv: Optional[int] = None
    bias: bool = False  # biases in every linear layer (GPT-2/BERT style)
    positions: int = 0  # learned absolute position embeddings (0: rotary or none)
    type_vocab: int = 0  # BERT's token type embeddings
    encoder_layers: Optional[int] = None  # encoder-decoder models: the encoder's layers
    kv_cache: bool = True  # decoders keep a KV cache while generating; encoders run one forward pass

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Dims:
        """From a report's `dims` (or any mapping), ignoring keys this version does not know."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
