"""Kinds of model, in report order; every model's id is `<kind>/<name>`, its kind one of these."""

# The optional runs' kinds come last: the default experiment makes none of them.
MODEL_KINDS = ("base", "expert", "merge", "moe", "dense", "moe_trained", "adapter", "qat", "dpo", "quantized")
