"""snip_lens: interpretable machine unlearning (SNIP) for language models through TransformerLens."""

from .collect import ActivationRecords, NeuronStats, collect
from .corpus import TokenWindows, load_corpus, load_texts, make_windows
from .evaluate import (CBTItem, ResidualCache, ToxicityConfig, build_cloze_items, cbt_accuracy, lm_metrics,
                       load_cbt, prefix_cache, toxicity_rate)
from .explain import (ExplainConfig, HeuristicExplainer, LocalChatClient, build_explanation_prompt, explain,
                      import_explanations, load_explanations, save_explanations)
from .export import ExportReport, export_pruned
from .llm import ChatClient, DiskCache, LLMConfig, LLMError, OpenAIChatClient, run_all
from .mask import NeuronMask
from .models import load_model
from .types import ActivationRecord, NeuronId, NeuronRecords

__all__ = ["collect", "ActivationRecords", "NeuronStats", "TokenWindows", "load_corpus", "load_texts",
           "make_windows", "NeuronMask", "export_pruned", "ExportReport", "load_model", "NeuronId", "ActivationRecord", "NeuronRecords",
           "ExplainConfig", "HeuristicExplainer", "LocalChatClient", "build_explanation_prompt", "explain",
           "import_explanations", "load_explanations", "save_explanations", "ChatClient", "DiskCache", "LLMConfig",
           "LLMError", "OpenAIChatClient", "run_all",
           "lm_metrics", "prefix_cache", "ResidualCache", "CBTItem", "load_cbt", "build_cloze_items", "cbt_accuracy",
           "ToxicityConfig", "toxicity_rate"]
__version__ = "0.1.0"
