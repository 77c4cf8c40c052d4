"""Kinds of model, in report order; every model's id is `<kind>/<name>`, its kind one of these."""

MODEL_KINDS = ("base", "expert", "merge", "moe", "dense", "moe_trained")
