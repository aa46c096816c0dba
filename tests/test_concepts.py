"""Tests of SNIP step 2: the concepts prompt, parsing the LLM's list, sampling, the offline fallback."""

from __future__ import annotations

import math
import re
from collections import Counter

import pytest

from snip_lens.concepts import (
    build_concepts_prompt,
    distinctive_concepts,
    extract_concepts,
    log_odds_dirichlet,
    parse_concepts,
    check_concepts_independent,
    sample_documents,
)
from snip_lens.types import DatasetConcepts

GOLDEN = """We're studying how neurons in a neural network affect the model's performance on specific tasks. \
Each neuron looks for some particular thing in a short document. To measure how neurons are related to the \
given task, we want to know what concepts are important for the task.

Neuron concepts examples:
1. the past and present tense of the verb "to be" (was, were, is).
2. variations of the verb 'be'.
3. modal verbs, especially "would" and "were".
4. action verbs related to starting or beginning.
5. future tense verbs and words related to commitment.
6. the usage of the verb "to be" and its conjugations.
7. the verb 'use' and its variations.
8. the word "could" and similar auxiliary verbs indicating possibility.
9. the word "like" and its variations, as well as other verbs expressing desire or interest.
10. verbs related to posting and sharing information.

Given the input samples below:

sample1: The cat sat on the mat.

sample2: def f(x):
    return x

List a comprehensive list of categories of concepts that are important for language models to comprehend \
the given texts. Output in the following format:
1. concept1
2. concept2
..."""


def test_prompt_golden():
    msgs = build_concepts_prompt(["The cat sat on the mat.", "  def f(x):\n    return x\n"])
    assert msgs == [{"role": "user", "content": GOLDEN}]


def test_prompt_needs_samples():
    with pytest.raises(ValueError, match="at least one sample"):
        build_concepts_prompt([])


def test_parse_numbered_bulleted_dedup_trim():
    text = """Here are the concepts:
1. Function definitions.
2) **Indentation** in code
3. function definitions
- string literals;
* "import statements"
4. concept4
5. ...
Some closing remark."""
    assert parse_concepts(text) == ["Function definitions", "Indentation in code", "string literals",
                                    "import statements"]


@pytest.mark.parametrize("answer", ["", "   ", "I cannot help with that.", "1. concept1\n2. concept2\n...",
                                    "#### ??? !!!"])
def test_parse_empty_or_malformed_raises_with_excerpt(answer):
    with pytest.raises(ValueError, match="no numbered list of concepts") as e:
        parse_concepts(answer)
    assert repr(" ".join(answer.split())[:300]) in str(e.value)


def test_sample_documents_distinct():
    texts = ["same doc"] * 50 + [f"doc {i}" for i in range(20)]
    s = sample_documents(texts, 10, max_chars=100, seed=3)
    assert len(s) == 10 and len(set(s)) == 10
    assert s == sample_documents(texts, 10, max_chars=100, seed=3)  # reproducible
    few = sample_documents(["a doc", "a doc", "b doc", " b doc "], 10, max_chars=100)
    assert sorted(few) == ["a doc", "b doc"]


def test_sample_documents_cut_to_max_chars():
    long = "\n".join(f"line number {i} of a long document" for i in range(500))
    (s,) = sample_documents([long], 1, max_chars=200, seed=1)
    assert len(s) <= 200 and s.startswith("line number")


class FakeChat:
    """A chat client that returns a fixed answer and records the prompts it got."""

    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.prompts: list[str] = []

    async def generate(self, messages: list[dict]) -> str:
        self.prompts.append(messages[-1]["content"])
        return self.answer


def test_extract_concepts_with_llm_distinct_samples_and_cache(tmp_path):
    forget = [f"document number {i}" for i in range(30)] + ["document number 0"] * 30
    client = FakeChat("1. numbers\n2. Documents\n3. documents\n")
    c = extract_concepts(forget, client=client, n_samples=10, cache_dir=tmp_path)
    assert c.concepts == ["numbers", "Documents"]
    (prompt,) = client.prompts
    samples = re.findall(r"^sample(\d+): (.*)$", prompt, flags=re.M)
    assert [int(n) for n, _ in samples] == list(range(1, 11))
    assert len({s for _, s in samples}) == 10  # distinct, never the same sample ten times
    again = extract_concepts(forget, client=client, n_samples=10, cache_dir=tmp_path)
    assert again.concepts == c.concepts and len(client.prompts) == 1  # served from the cache


def test_extract_concepts_malformed_answer_not_cached(tmp_path):
    client = FakeChat("Sorry, no list today.")
    with pytest.raises(ValueError, match="no numbered list"):
        extract_concepts(["a", "b"], client=client, cache_dir=tmp_path)
    assert not any(tmp_path.rglob("*.json"))


def test_extract_concepts_over_http(tmp_path):
    from snip_lens.llm import LLMConfig
    from snip_lens.loopback import LoopbackServer

    with LoopbackServer(answer=lambda m: "1. Python functions\n2. loops\n") as srv:
        cfg = LLMConfig(model="m", base_url=srv.base_url, api_key_env=None, max_retries=0)
        c = extract_concepts(["def f(): pass", "for x in y: pass"], client=cfg)
    assert c.concepts == ["Python functions", "loops"] and c.source == "llm:m"


@pytest.mark.parametrize("forget", [[], ["", "   \n"], None])
def test_empty_forget_set(forget):
    with pytest.raises(ValueError, match="forget set is empty"):
        extract_concepts(forget)
    with pytest.raises(ValueError, match="forget set is empty"):
        extract_concepts(forget, client=FakeChat("1. x"))


def test_log_odds_matches_formula():
    a = Counter({"x": 10, "y": 1, "z": 5})
    b = Counter({"x": 2, "y": 8, "w": 3})
    z = log_odds_dirichlet(a, b, prior_strength=10.0)
    pooled = a + b
    total, na, nb = sum(pooled.values()), sum(a.values()), sum(b.values())
    for w in pooled:
        al = 10.0 * pooled[w] / total
        d = math.log((a[w] + al) / (na + 10 - a[w] - al)) - math.log((b[w] + al) / (nb + 10 - b[w] - al))
        assert z[w] == pytest.approx(d / math.sqrt(1 / (a[w] + al) + 1 / (b[w] + al)))
    assert z["x"] > 0 > z["y"] and z["w"] < 0 < z["z"]


CODE = [
    '''import os\n\n\nclass Reader:\n    """Read files."""\n\n    def __init__(self, path_name):\n        self.path_name = path_name\n\n    def read_all(self):\n        # read everything\n        with open(self.path_name) as f:\n            return f.read()\n''',
    '''from typing import Any\n\n\ndef parse_args(item_list):\n    if not item_list:\n        return None\n    for item in item_list:\n        if item.startswith("-"):\n            yield item\n''',
    '''import sys\n\n\ndef main(argv=None):\n    argv = argv or sys.argv[1:]\n    for arg in argv:\n        print(arg)\n    return 0\n\n\nclass Writer:\n    def __init__(self, path_name):\n        self.path_name = path_name\n''',
    '''def add_numbers(a, b):\n    return a + b\n\n\ndef sub_numbers(a, b):\n    if a is None:\n        return None\n    return a - b\n\n\nclass Box:\n    def __init__(self, item_list):\n        self.item_list = item_list\n''',
]
PROSE = [
    "The history of the town is long, and the people of the valley have told it in many ways over the years.",
    "It was a cold morning when the travellers reached the river, and they were glad of the fire in the inn.",
    "In the spring the fields are green and the farmers are busy with the work of the season.",
    "She said that the book was the best she had read, and that she would give it to her sister.",
]


def _collapsed(texts):
    return " ".join(" ".join(texts).split())


def test_distinctive_concepts_code_vs_prose_are_copied_from_the_forget_set():
    concepts = distinctive_concepts(CODE, PROSE, n=30)
    assert len(concepts) == len(set(concepts)) <= 30
    assert {"def", "self", "return"} <= set(concepts)
    flat = _collapsed(CODE)
    assert all(c in flat for c in concepts), [c for c in concepts if c not in flat]  # text, not a template
    assert "the" not in concepts and not any(c in ("of", "and") for c in concepts)


def test_distinctive_concepts_prose_vs_code():
    concepts = distinctive_concepts(PROSE, CODE, n=10)
    assert "the" in concepts and "def" not in concepts and "self" not in concepts
    assert all(c in _collapsed(PROSE) for c in concepts)
    assert len(concepts) <= 10


def test_distinctive_concepts_of_another_language_need_no_rule_for_it():
    from pathlib import Path

    german = (Path(__file__).parent / "fixtures" / "two_languages_de.txt").read_text(encoding="utf-8").splitlines()
    concepts = distinctive_concepts(german, PROSE, n=20)
    assert {"die", "und", "der"} <= set(concepts)
    assert all(c in _collapsed(german) for c in concepts)
    assert any(len(c.split()) >= 3 for c in concepts[:3])  # the most typical lines lead


def test_offline_concepts_share_nothing_with_the_offline_explainers():
    """No template or vocabulary of the explainers: their sentence frames never occur in a concept, and the
    concepts module imports nothing from the explainers."""
    import inspect

    import snip_lens.concepts as concepts_module

    src = inspect.getsource(concepts_module)
    assert "explain" not in "".join(line for line in src.splitlines() if line.lstrip().startswith(("import", "from")))
    for frame in ("the token", "the tokens", "in text with", "raises the next", "after '", "before '"):
        assert frame not in src
    concepts = distinctive_concepts(CODE, PROSE, n=30)
    assert not any(c.startswith(("the token", "raises the next")) for c in concepts)


def test_guard_refuses_a_concept_that_equals_an_explanation():
    from snip_lens.types import NeuronExplanation, NeuronId

    expl = [NeuronExplanation(NeuronId(0, 1), "the token 'def' after '\\n'"), NeuronExplanation(NeuronId(0, 2), None,
                                                                                            error="x")]
    check_concepts_independent(DatasetConcepts(["def", "self"]), expl)  # different strings: fine
    with pytest.raises(ValueError, match="equals an explanation \\(neuron L0/N1\\).*circular"):
        check_concepts_independent(["self", "The token 'def'  after '\\n'"], expl)


def test_distinctive_concepts_empty_reference():
    with pytest.raises(ValueError, match="reference corpus is empty"):
        distinctive_concepts(CODE, [])


def test_extract_concepts_offline_on_stdlib():
    from snip_lens.corpus import load_texts

    c = extract_concepts(load_texts("code", max_docs=40, seed=0), reference_texts=load_texts("prose"), n_concepts=25)
    assert isinstance(c, DatasetConcepts) and c.source.startswith("distinctive")
    assert len(c.concepts) == 25 and {"def", "self"} <= set(c.concepts)
