"""Runs stages.pretrain.run in a fresh process (plain python or under torchrun), for the tests.

python tests/pretrain_runner.py SETTINGS_JSON TOKENS_DIR TOKENIZER_DIR OUT_DIR
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.settings.pretrain import PretrainSettings  # noqa: E402
from pipeline.stage import configure_environment  # noqa: E402
from stages import pretrain  # noqa: E402

if __name__ == "__main__":
    settings_json, tokens, tokenizer, out = sys.argv[1:5]
    configure_environment()
    out = Path(out)
    outputs = pretrain.Outputs(out / "model", out / "checkpoints", out / "live", out / "samples.md")
    pretrain.run(
        PretrainSettings.model_validate_json(Path(settings_json).read_text()), Path(tokens), Path(tokenizer), outputs
    )
