"""expressive-attention: expressive attention (squared dot-product attention) for PyTorch."""
from .ops import VARIANTS, attention, expressive_attention, reference_attention

__version__ = "0.1.0"

__all__ = ["VARIANTS", "attention", "expressive_attention", "reference_attention", "__version__"]
