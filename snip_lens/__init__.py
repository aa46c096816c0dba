"""snip_lens: interpretable machine unlearning (SNIP) for language models through TransformerLens."""

from .collect import ActivationRecords, NeuronStats, collect
from .concepts import (CONCEPTS_PROMPT_VERSION, build_concepts_prompt, distinctive_concepts, extract_concepts,
                       parse_concepts)
from .corpus import TokenWindows, load_corpus, load_texts, make_windows
from .embed import CachedEmbedder, Embedder, LocalEmbedder, OpenAIEmbedder, get_embedder
from .score import NeuronIndex, NeuronScores, max_cosine, max_cosine_reference, score_neurons
from .evaluate import (CBTItem, ResidualCache, ToxicityConfig, build_cloze_items, cbt_accuracy, lm_metrics,
                       load_cbt, prefix_cache, toxicity_rate)
from .explain import (ExplainConfig, HeuristicExplainer, LocalChatClient, build_explanation_prompt, explain,
                      import_explanations, load_explanations, save_explanations)
from .export import ExportReport, export_pruned
from .llm import ChatClient, DiskCache, LLMConfig, LLMError, OpenAIChatClient, run_all
from .mask import NeuronMask
from .models import load_model
from .select import (activation_scores, hybrid_scores, keyword_scores, llm_judge_scores, mask_from_scores,
                     random_scores)
from .sweep import DataConfig, SweepConfig, run_sweep
from .config import ModelConfig, RunConfig
from .results import SweepResults
from .types import ActivationRecord, DatasetConcepts, NeuronExplanation, NeuronId, NeuronRecords

__all__ = ["collect", "ActivationRecords", "NeuronStats", "TokenWindows", "load_corpus", "load_texts",
           "make_windows", "NeuronMask", "export_pruned", "ExportReport", "load_model", "NeuronId", "ActivationRecord", "NeuronRecords",
           "ExplainConfig", "HeuristicExplainer", "LocalChatClient", "build_explanation_prompt", "explain",
           "import_explanations", "load_explanations", "save_explanations", "ChatClient", "DiskCache", "LLMConfig",
           "LLMError", "OpenAIChatClient", "run_all",
           "lm_metrics", "prefix_cache", "ResidualCache", "CBTItem", "load_cbt", "build_cloze_items", "cbt_accuracy",
           "ToxicityConfig", "toxicity_rate",
           "CONCEPTS_PROMPT_VERSION", "build_concepts_prompt", "parse_concepts", "extract_concepts",
           "distinctive_concepts", "Embedder", "LocalEmbedder", "OpenAIEmbedder", "CachedEmbedder", "get_embedder",
           "NeuronScores", "NeuronIndex", "score_neurons", "max_cosine", "max_cosine_reference",
           "activation_scores", "hybrid_scores", "keyword_scores", "llm_judge_scores", "mask_from_scores",
           "random_scores", "DataConfig", "SweepConfig", "run_sweep", "DatasetConcepts", "NeuronExplanation"]
__all__ += ["RunConfig", "ModelConfig", "SweepResults"]
__version__ = "0.1.0"
