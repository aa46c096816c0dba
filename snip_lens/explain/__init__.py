"""SNIP step 1: explain every MLP neuron in words, from what it reads, what it writes, or both.

Two choices make an explainer (:class:`ExplainConfig`):

- **who writes the sentence** (``kind``): ``openai`` (any OpenAI-compatible chat server), ``local`` (an
  in-process transformers chat model) or ``heuristic`` (offline, no LLM; the historical name);
- **which evidence** (``explanations``): ``input`` (the neuron's top-activating windows: the paper's
  appendix A.1 prompt, OpenAI's neuron explainer), ``output`` (VocabProj of Gur-Arieh et al. 2025: the
  tokens its output weights promote and suppress through the final norm and the unembedding) or ``both``.

Every explanation is a :class:`~snip_lens.types.NeuronExplanation` that keeps its evidence. The package:
:mod:`.prompts` (prompt builders and the answer parser), :mod:`.input`, :mod:`.output`, :mod:`.both`
(offline explainers, one per kind), :mod:`.vocabproj` (output-centric evidence from weights),
:mod:`.local` (local chat model), :mod:`.runner` (running, caching, files) and :mod:`.importers`
(published explanations).
"""

from .both import OfflineCombinedExplainer, describe_both
from .config import ExplainConfig
from .importers import ImportFormat, import_explanations
from .input import HeuristicExplainer, OfflineInputExplainer, describe_input, input_evidence
from .local import LocalChatClient
from .output import OfflineOutputExplainer, describe_output
from .prompts import (
    BOTH_PROMPT_VERSION,
    EXPLANATION_PREFIX,
    FEW_SHOT_EXAMPLES,
    OUTPUT_PROMPT_VERSION,
    PROMPT_VERSION,
    SYSTEM_PROMPT,
    build_both_prompt,
    build_explanation_prompt,
    build_output_prompt,
    format_activation_records,
    max_activation_of,
    non_zero_proportion,
    parse_explanation,
    scale_activations,
)
from .runner import (
    explain,
    explain_to_file,
    load_explanations,
    make_client,
    records_digest,
    retry_failed,
    save_explanations,
)
from .vocabproj import VocabProjection, activation_signs, vocab_projection

__all__ = [
    "PROMPT_VERSION", "OUTPUT_PROMPT_VERSION", "BOTH_PROMPT_VERSION", "EXPLANATION_PREFIX", "SYSTEM_PROMPT",
    "FEW_SHOT_EXAMPLES", "ExplainConfig", "HeuristicExplainer", "OfflineInputExplainer", "OfflineOutputExplainer",
    "OfflineCombinedExplainer", "LocalChatClient", "build_explanation_prompt", "build_output_prompt",
    "build_both_prompt", "parse_explanation", "format_activation_records", "scale_activations",
    "non_zero_proportion", "max_activation_of", "explain", "explain_to_file", "make_client", "records_digest",
    "save_explanations", "load_explanations", "retry_failed", "import_explanations", "ImportFormat", "input_evidence",
    "describe_input", "describe_output", "describe_both", "VocabProjection", "vocab_projection",
    "activation_signs",
]
