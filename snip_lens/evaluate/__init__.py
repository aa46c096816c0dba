"""Evaluations of a (possibly pruned) model on held-out data (SNIP): forget/retain language-model metrics,
CBT cloze accuracy (with KV-cache reuse of the shared context) and toxicity rate."""

from .cbt import (PREPOSITIONS, VERBS, CBTItem, build_cloze_items, cbt_accuracy, cbt_scores, load_cbt,
                  save_cbt_jsonl, split_sentences)
from .lm import ResidualCache, lm_metrics, prefix_cache
from .toxicity import (DetoxifyScorer, ProfanityScorer, ToxicityConfig, generate_samples, make_scorer,
                       toxicity_rate)

__all__ = [
    "ResidualCache", "lm_metrics", "prefix_cache",
    "CBTItem", "load_cbt", "save_cbt_jsonl", "build_cloze_items", "split_sentences", "cbt_scores",
    "cbt_accuracy", "PREPOSITIONS", "VERBS",
    "ToxicityConfig", "toxicity_rate", "generate_samples", "make_scorer", "ProfanityScorer", "DetoxifyScorer",
]
