"""The HitAnno model: read :mod:`.model` first.

* :mod:`.model` — the configuration, the layers, the dense level-1 path, level 2, the head;
* :mod:`.sparse` — the exact sparse level-1 path (the default with one level-1 layer);
* :mod:`.kernels` — CPU speed kernels, each with a switch back to the plain torch expression;
* :mod:`.attention` — the attention functions of the dense paths.
"""

from hitanno_cli.model.attention import ATTENTION_CHOICES, attention_weights, flash_unavailable_reason, sdpa_attention
from hitanno_cli.model.kernels import (
    KERNELS,
    Dropout,
    HeadwiseProjection,
    OpenSetContext,
    SharedQueryAttention,
    plain_kernels,
)
from hitanno_cli.model.model import EncoderLayer, HitAnno, LinearPath, ModelConfig, ModelOutput, TokenEmbedding
from hitanno_cli.model.sparse import OpenSets, PanelTerms, open_sets

__all__ = [
    "ATTENTION_CHOICES",
    "KERNELS",
    "Dropout",
    "EncoderLayer",
    "HeadwiseProjection",
    "HitAnno",
    "LinearPath",
    "ModelConfig",
    "ModelOutput",
    "OpenSetContext",
    "OpenSets",
    "PanelTerms",
    "SharedQueryAttention",
    "TokenEmbedding",
    "attention_weights",
    "flash_unavailable_reason",
    "open_sets",
    "plain_kernels",
    "sdpa_attention",
]
