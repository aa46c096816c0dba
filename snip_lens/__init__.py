"""snip_lens: interpretable machine unlearning (SNIP) for language models through TransformerLens."""

from .mask import NeuronMask
from .models import load_model
from .types import ActivationRecord, NeuronId, NeuronRecords

__all__ = ["NeuronMask", "load_model", "NeuronId", "ActivationRecord", "NeuronRecords"]
__version__ = "0.1.0"
