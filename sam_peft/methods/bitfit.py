"""BitFit (Ben Zaken et al. 2022): only the encoder's bias terms train (plus the head)."""

from sam_peft.methods import register_method
from sam_peft.methods.base import Method, TrainPlan


@register_method("bitfit")
class BitFit(Method):
    display = "BitFit"
    paper_row = 4
    category = "subset"
    def select(self, model, ctx) -> TrainPlan:
        return TrainPlan(dense=[n for n in ctx.eligible if n.endswith(".bias")])
