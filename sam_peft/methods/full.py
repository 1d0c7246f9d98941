"""FullTuning: every eligible parameter trains."""

from sam_peft.methods import register_method
from sam_peft.methods.base import Method, TrainPlan


@register_method("full")
class FullTuning(Method):
    display = "FullTuning"
    paper_row = 1
    category = "full"
    def select(self, model, ctx) -> TrainPlan:
        return TrainPlan(dense=list(ctx.eligible))
