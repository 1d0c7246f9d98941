"""The seven benchmark tasks as plain data: inputs, labels, metric, task format.

Everything task-specific that the reader, the model heads and the metrics need lives in
this one table, in the spirit of Hugging Face's run_glue task table. The label tuples are
in jiant's order, because a class id is an index into them and the paper's numbers were
produced with jiant's ids.
"""

import difflib
from dataclasses import dataclass

from sam_peft.errors import UserError

KINDS = ("classification", "regression", "multiple_choice", "span_comparison")


@dataclass(frozen=True)
class DataSource:
    """Where a task's data comes from (`sam-peft data prepare`).

    paper_sha256: split -> sha256 of the authors' file data/tasks/data/<task>/<split>.jsonl at
        their commit (prepare.PAPER_COMMIT), computed with sha256sum from byte-identical copies.
    hub: (dataset id, config) on the Hugging Face hub; hub_fields: record key -> hub column
        ("target.x" nests under "target", as jiant's WSC files do); hub_labels: the hub's class
        names in the hub's order (None: a regression score).
    """

    paper_sha256: dict
    hub: tuple
    hub_fields: dict
    hub_labels: tuple | None


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # one of KINDS; decides how examples are encoded and which head is built
    fields: tuple  # record keys holding the inputs, in the order they are fed to the model
    labels: tuple | None  # label values in jiant's order (index = class id); None for regression
    metric: str  # key into sam_peft.metrics.METRICS
    prompts: dict | None = None  # COPA: question type -> prompt appended to the premise
    label_range: tuple | None = None  # regression: (low, high), inclusive
    num_choices: int | None = None  # multiple choice: answers per example
    display: str = ""  # the paper's column header (default: the name)
    source: DataSource | None = None  # where `data prepare` gets it

    def __post_init__(self):
        if not self.display:
            object.__setattr__(self, "display", self.name)


# The WSC record keys that hold the two spans (nested under "target" in jiant's files).
WSC_TARGET_KEYS = ("span1_index", "span1_text", "span2_index", "span2_text")

# In the paper's column order (tables and figures order tasks by it). Hub ids as of 2025 (the
# canonical "glue"/"super_glue" names moved); CB's hub names are the official SuperGLUE ones,
# of which the paper's files use a permutation (the metrics do not care which name a class has).
TASKS: dict[str, TaskSpec] = {
    "cola": TaskSpec(
        name="cola",
        display="CoLA",
        kind="classification",
        fields=("text",),
        labels=("0", "1"),
        metric="mcc",
        source=DataSource(
            paper_sha256={'train': '5491e572812a30f38a2b774c30c61c3910811d4fc3bf8018c4ae61158e42df56', 'val': '83a6e9237cefcf434672965a4e8f0f927736a1be53ee01a5fb5a598b7be5b293', 'test': '3474fdd08922a58afd286de50b3fe7fc866bcfbe58275109d9c79ff413bd8927'},
            hub=('nyu-mll/glue', 'cola'),
            hub_fields={'text': 'sentence'},
            hub_labels=("0", "1"),
        ),
    ),
    "stsb": TaskSpec(
        name="stsb",
        display="STS-B",
        kind="regression",
        fields=("text_a", "text_b"),
        labels=None,
        metric="pearson_spearman",
        label_range=(0.0, 5.0),
        source=DataSource(
            paper_sha256={'train': '6d0e2b7e474a613c489dde50ec3f2ce411d835e449e415b7965a219f41271f5a', 'val': 'bf6ef5ea1686cfdebcab868b60e2cba1b3e88647409c9dfddfc477bbc369e6a5', 'test': '3f6760916344281b23f4a4be13193c5a54f332452f72afeb0218fe9ca1559c07'},
            hub=('nyu-mll/glue', 'stsb'),
            hub_fields={'text_a': 'sentence1', 'text_b': 'sentence2'},
            hub_labels=None,
        ),
    ),
    "mrpc": TaskSpec(
        name="mrpc",
        display="MRPC",
        kind="classification",
        fields=("text_a", "text_b"),
        labels=("0", "1"),  # F1 is computed for class id 1 ("1" = paraphrase)
        metric="acc_f1",
        source=DataSource(
            paper_sha256={'train': 'd143c7ee117923713cadbdcd7c51ba40841feec80accba79e5e8f6f4ad911128', 'val': '5dfae3ee7c94bd6f884ac94b72837937e25d9da2673a38c96b42815e61d7d1be', 'test': 'f957a1da865a7300f02c754faf144863ac15848eba16867c9c76d35281956449'},
            hub=('nyu-mll/glue', 'mrpc'),
            hub_fields={'text_a': 'sentence1', 'text_b': 'sentence2'},
            hub_labels=("0", "1"),
        ),
    ),
    "rte": TaskSpec(
        name="rte",
        display="RTE",
        kind="classification",
        fields=("premise", "hypothesis"),
        labels=("entailment", "not_entailment"),
        metric="accuracy",
        source=DataSource(
            paper_sha256={'train': '67b5c03084a8d889f02fd8a78f60114a849c650972cdaeb336c51d06382215be', 'val': '2018c7890741da3932905e3eaf93b62c5ec1e738feae54e5d27e19ed13ebd6cf', 'test': '5be1b33721f4bde85eb213feedd12f1a8fc524cf07bb84359e5c177512b4462d'},
            hub=('nyu-mll/glue', 'rte'),
            hub_fields={'premise': 'sentence1', 'hypothesis': 'sentence2'},
            hub_labels=("entailment", "not_entailment"),
        ),
    ),
    "cb": TaskSpec(
        name="cb",
        display="CB",
        kind="classification",
        fields=("premise", "hypothesis"),
        labels=("neutral", "entailment", "contradiction"),  # jiant's order, not alphabetical
        metric="acc_macro_f1_3",
        source=DataSource(
            paper_sha256={'train': 'ea40353f4750b2d1aed0c2f74a50bc8749b56fe66d786099cc2d1d99b89b8e1c', 'val': 'af4abbe7acbed9626dc1c872039d6368f4291e24adb842c1eaf2c223dd3cc0bc', 'test': 'c4b436a826a76c730c128697ae952f01a56c4c8a1059d04e80e87a8433afc1c7'},
            hub=('aps/super_glue', 'cb'),
            hub_fields={'premise': 'premise', 'hypothesis': 'hypothesis'},
            hub_labels=("entailment", "contradiction", "neutral"),
        ),
    ),
    "copa": TaskSpec(
        name="copa",
        display="COPA",
        kind="multiple_choice",
        fields=("premise", "question", "choice1", "choice2"),
        labels=(0, 1),
        metric="accuracy",
        prompts={
            "cause": "What was the cause of this?",
            "effect": "What happened as a result?",
        },
        num_choices=2,
        source=DataSource(
            paper_sha256={'train': '67f286857f621b7a5cd730688d556e5e8d0f9ea189390c67d4bd43876c3b17a6', 'val': 'c993f2626c6c5349c3fd26a200a1bfdfd752c8193a8a57c1e83a18eec4ca7fa4', 'test': '8f77b9bdc46b0ef7cc626110c4d30b5011f6ac3640d572657d98f1405638bce3'},
            hub=('aps/super_glue', 'copa'),
            hub_fields={'premise': 'premise', 'question': 'question', 'choice1': 'choice1', 'choice2': 'choice2'},
            hub_labels=(0, 1),
        ),
    ),
    "wsc": TaskSpec(
        name="wsc",
        display="WSC",
        kind="span_comparison",
        fields=("text", "target"),
        labels=(False, True),
        metric="accuracy",
        source=DataSource(
            paper_sha256={'train': '6e93fe870ed2328cd33316823a434ba123ab66329d4577f33945e345ed459c0e', 'val': 'd22179ae8cda280441b0bc933ffaefe278ecc7ae53979e18eae28beb4c2f68f7', 'test': 'e5c685ea4bdc347354036a28176459f6feeb0b6870375ecfb3d6ddb1f0e28bef'},
            hub=('aps/super_glue', 'wsc.fixed'),
            hub_fields={'text': 'text', 'target.span1_index': 'span1_index', 'target.span1_text': 'span1_text', 'target.span2_index': 'span2_index', 'target.span2_text': 'span2_text'},
            hub_labels=(False, True),
        ),
    ),
}


def get_task(name: str) -> TaskSpec:
    """The TaskSpec called `name`; a TaskSpec passes through unchanged.

    Unknown names raise a UserError that suggests the closest known name, because a typo
    in a config should cost one glance, not a trip to the docs.
    """
    if isinstance(name, TaskSpec):
        return name
    if isinstance(name, str) and name in TASKS:
        return TASKS[name]
    known = ", ".join(sorted(TASKS))
    close = difflib.get_close_matches(str(name).lower(), sorted(TASKS), n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise UserError(f"unknown task {name!r}{hint}; known: {known}")
