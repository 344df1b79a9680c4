"""Models: the decoder (transformer.py), named sizes (sizes.py), scalar heads (heads.py)."""
from rlhf_jax.models.heads import ScalarHead, ScalarModel, last_token_value
from rlhf_jax.models.sizes import SIZES, model_config
from rlhf_jax.models.transformer import (ModelConfig, Transformer, init_cache,
                                         positions_from_mask)
