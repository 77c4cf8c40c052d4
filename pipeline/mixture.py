"""The SFT mixture's files: what the mixture stage writes and the dense and MoE runs read."""

MIXTURE_ROWS = "train.jsonl"  # the rows, chat messages like an expert's dataset
MIXTURE_COUNTS = "counts.json"  # rows drawn per expert
