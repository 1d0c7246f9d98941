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

    def __post_init__(self):
        if not self.display:
            object.__setattr__(self, "display", self.name)


# The WSC record keys that hold the two spans (nested under "target" in jiant's files).
WSC_TARGET_KEYS = ("span1_index", "span1_text", "span2_index", "span2_text")

# In the paper's column order (tables and figures order tasks by it).
TASKS: dict[str, TaskSpec] = {
    "cola": TaskSpec(
        name="cola",
        display="CoLA",
        kind="classification",
        fields=("text",),
        labels=("0", "1"),
        metric="mcc",
    ),
    "stsb": TaskSpec(
        name="stsb",
        display="STS-B",
        kind="regression",
        fields=("text_a", "text_b"),
        labels=None,
        metric="pearson_spearman",
        label_range=(0.0, 5.0),
    ),
    "mrpc": TaskSpec(
        name="mrpc",
        display="MRPC",
        kind="classification",
        fields=("text_a", "text_b"),
        labels=("0", "1"),  # F1 is computed for class id 1 ("1" = paraphrase)
        metric="acc_f1",
    ),
    "rte": TaskSpec(
        name="rte",
        display="RTE",
        kind="classification",
        fields=("premise", "hypothesis"),
        labels=("entailment", "not_entailment"),
        metric="accuracy",
    ),
    "cb": TaskSpec(
        name="cb",
        display="CB",
        kind="classification",
        fields=("premise", "hypothesis"),
        labels=("neutral", "entailment", "contradiction"),  # jiant's order, not alphabetical
        metric="acc_macro_f1_3",
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
    ),
    "wsc": TaskSpec(
        name="wsc",
        display="WSC",
        kind="span_comparison",
        fields=("text", "target"),
        labels=(False, True),
        metric="accuracy",
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
