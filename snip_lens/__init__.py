"""snip_lens: interpretable machine unlearning (SNIP) for language models through TransformerLens."""

from .export import ExportReport, export_pruned
from .mask import NeuronMask
from .models import load_model
from .types import ActivationRecord, NeuronId, NeuronRecords

__all__ = ["NeuronMask", "export_pruned", "ExportReport", "load_model", "NeuronId", "ActivationRecord", "NeuronRecords"]
__version__ = "0.1.0"
