"""jiant's task metrics, reported x100 like the paper's tables.

Each metric returns {"major": ..., <minor metrics>...}; "major" is the number that early
stopping and the paper's tables use. The definitions follow jiant 2.2.0 exactly (the
paper's numbers come from it) and lean on sklearn / scipy rather than hand-written
formulas, so they agree with jiant bit for bit.
"""

import warnings

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

from sam_peft.tasks import TaskSpec, get_task


def _percent(values: dict) -> dict:
    # Plain python floats: results are written to JSON and compared across runs.
    return {key: float(value) * 100.0 for key, value in values.items()}


def mcc(predictions: np.ndarray, labels: np.ndarray) -> dict:
    value = matthews_corrcoef(labels, predictions)
    return _percent({"major": value, "mcc": value})


def _correlation(fn, predictions: np.ndarray, labels: np.ndarray) -> float:
    # A constant side (a collapsed regressor early in training, or a single example) has
    # no defined correlation; scipy returns nan, which would poison "best so far"
    # comparisons in early stopping. Score it as no correlation instead.
    if len(labels) < 2 or np.ptp(predictions) == 0 or np.ptp(labels) == 0:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = fn(predictions, labels)[0]
    return 0.0 if np.isnan(value) else float(value)


def pearson_spearman(predictions: np.ndarray, labels: np.ndarray) -> dict:
    predictions = predictions.astype(np.float64)
    labels = labels.astype(np.float64)
    pearson = _correlation(pearsonr, predictions, labels)
    spearman = _correlation(spearmanr, predictions, labels)
    return _percent({"major": (pearson + spearman) / 2, "pearson": pearson, "spearman": spearman})


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> dict:
    acc = float(np.mean(predictions == labels))
    return _percent({"major": acc, "acc": acc})


def acc_f1(predictions: np.ndarray, labels: np.ndarray) -> dict:
    acc = float(np.mean(predictions == labels))
    # zero_division=0 gives sklearn's default value without its warning.
    f1 = f1_score(labels, predictions, pos_label=1, average="binary", zero_division=0)
    return _percent({"major": (acc + f1) / 2, "acc": acc, "f1": f1})


def acc_macro_f1_3(predictions: np.ndarray, labels: np.ndarray) -> dict:
    # jiant's CommitmentBank scheme: one binary F1 per class (class c vs. the rest) for
    # the three classes, averaged. A class absent from both labels and predictions (CB's
    # validation split has no class 2 at all) counts as F1 0, so it drags the mean down,
    # exactly as in jiant.
    acc = float(np.mean(predictions == labels))
    per_class = [
        f1_score(labels == c, predictions == c, zero_division=0) for c in range(3)
    ]
    macro = float(np.mean(per_class))
    return _percent({"major": (acc + macro) / 2, "acc": acc, "f1_macro": macro})


METRICS = {
    "mcc": mcc,
    "pearson_spearman": pearson_spearman,
    "acc_f1": acc_f1,
    "acc_macro_f1_3": acc_macro_f1_3,
    "accuracy": accuracy,
}


def compute(task: str | TaskSpec, predictions, labels) -> dict:
    """The task's metrics x100: {"major": float, ...minor metrics}.

    predictions are class ids (ints), or floats for STS-B; labels likewise. Lists, numpy
    arrays and CPU tensors all work.
    """
    spec = get_task(task)
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    if predictions.ndim != 1 or labels.ndim != 1:
        raise ValueError(
            f"{spec.name}: predictions and labels must be 1-D "
            f"(got shapes {predictions.shape} and {labels.shape})"
        )
    if len(predictions) != len(labels):
        raise ValueError(
            f"{spec.name}: {len(predictions)} predictions but {len(labels)} labels"
        )
    if len(labels) == 0:
        raise ValueError(f"{spec.name}: no predictions to score")
    return METRICS[spec.metric](predictions, labels)


def trivial(task: str | TaskSpec, train_labels, labels) -> float:
    """The major metric of a constant prediction: the train split's majority class (ties: the
    smallest class id), or for regression the train mean, which correlates with nothing (0).
    A run whose score equals it has learned nothing measurable on that split (MRPC's 74.80:
    always "paraphrase")."""
    spec = get_task(task)
    train = np.asarray(train_labels)
    if spec.kind == "regression":
        constant = float(train.mean())
    else:
        values, counts = np.unique(train, return_counts=True)
        constant = values[np.argmax(counts)]  # np.unique sorts: the first maximum is the smallest id
    return compute(spec, np.full(len(labels), constant), labels)["major"]
