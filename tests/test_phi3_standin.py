"""The phi3-moe profile end to end on a CPU, with a tiny stand-in for Phi-3 (tests/phi3_standin.py).

The stand-in has Phi-3-mini-4k-instruct-LLaMAfied's config and tokenizer layout at tiny sizes.
The test applies the profile through pipeline/profiles.py in a copy of the project, changes only
what a CPU and no network force (each change below says why), runs `dvc repro` and checks what
every stage made. Run it with `python -m pytest tests/test_phi3_standin.py -m scale -x` (`make
test-scale`): the stand-in's own tests too are left out of `make test`, to keep CI's time.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from pipeline.profiles import dump, profile_params
from pipeline.settings.params_file import load_params
from pipeline.settings.sft import SFTSettings
from tests import phi3_standin
from tests.project import commit_all, copy_project, dvc, stages_run

pytestmark = pytest.mark.scale

STANDIN = "data/local/phi3"
# The profile's experts, each trained here on one of the data stage's generated chat datasets
# (`messages` rows) instead of its hub dataset.
EXPERT_DATA = {"chat": "addition", "instruct": "sorting", "math": "comparison", "code": "counting"}
RECIPES = ["ties", "dare_ties", "task_arithmetic", "linear"]


def hellaswag_rows() -> list[dict]:
    """Rows with hellaswag's own columns (the hub's validation split has these)."""
    rows = []
    for index, (a, b) in enumerate([(3, 4), (5, 2), (7, 1), (6, 3), (2, 2), (8, 1)]):
        endings = [f"gets {a + b} apples.", f"gets {a + b + 1} apples.", "goes home.", f"gets {a * b + 5} apples."]
        rows.append({"ind": index, "activity_label": "Counting apples", "ctx_a": f"A girl has {a} apples.",
                     "ctx_b": f"she is given {b} more and", "ctx": "", "endings": endings, "source_id": f"s{index}",
                     "split": "val", "split_type": "indomain", "label": "0"})  # fmt: skip
    return rows


def arc_rows() -> list[dict]:
    """Rows with ARC's own columns (arc_easy and arc_challenge read the same layout)."""
    return [
        {"id": f"q{index}", "question": f"Which number is larger, {a} or {b}?", "answerKey": "A",
         "choices": {"text": [str(max(a, b)), str(min(a, b))], "label": ["A", "B"]}}
        for index, (a, b) in enumerate([(12, 7), (40, 93), (55, 56), (81, 18), (3, 30), (64, 46)])
    ]  # fmt: skip


def write_jsonl(project: Path, name: str, rows: list[dict]) -> str:
    """data/local/<name> in the project; its path as a setting names it."""
    path = project / "data/local" / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path.relative_to(project))


def cpu_offline_params(project: Path) -> dict:
    """The phi3-moe profile over the project's params.yaml, with what a CPU and no network force."""
    params = profile_params("phi3-moe", base=project / "params.yaml", root=project)
    params["hub"] = {}  # offline: the stand-in and the files below replace every hub snapshot
    params["tokenize"]["base_model"] = STANDIN  # the stand-in instead of data/hub/phi3
    params["finetune"]["base_model"] = STANDIN
    experts = {name: {"dataset": f"data/sft/{skill}.jsonl"} for name, skill in EXPERT_DATA.items()}
    params["finetune"]["experts"] = experts
    params["eval"]["task_data"] = {  # the same tasks and splits, from small local files in their columns
        "hellaswag": {"validation": write_jsonl(project, "hellaswag.jsonl", hellaswag_rows())},
        "arc_easy": {"test": write_jsonl(project, "arc_easy.jsonl", arc_rows())},
        "arc_challenge": {"test": write_jsonl(project, "arc_challenge.jsonl", arc_rows())},
    }
    params["eval"]["limit"] = 4  # size
    sft = params["sft"]
    sft["adapter"] = "lora"  # qlora: bitsandbytes' 4-bit weights need CUDA (the pipeline refuses it on CPU)
    # bf16: transformers' TrainingArguments refuses bf16 without a GPU ("Your setup doesn't support
    # bf16/gpu. You need to assign use_cpu"), and axolotl passes no use_cpu. The merges and the MoE
    # stay bfloat16 (merge.dtype, moe.dtype); eval computes in float32 on CPU (eval.dtype auto).
    sft["precision"] = "fp32"
    sft["flash_attention"] = False  # the flash-attn package needs a GPU: SDPA instead
    # sizes: a few optimizer steps on short packed sequences (the profile: 2000 steps of 2048 tokens)
    sft.update(max_steps=2, warmup_steps=1, sequence_len=128)
    params["mixture"]["defaults"]["max_steps"] = 2
    params["mixture"]["rows"] = 64
    # the default experiment's synthetic data and its tiny pretrain run (still a stage here), shrunk
    # as in tests/test_dvc_pipeline.py
    params["data"]["world"]["corpus_megabytes"] = 0.2
    params["data"]["skills"].update(train_examples=100, eval_examples=20)
    params["data"]["story_eval_examples"] = 20
    params["pretrain"]["model"].update(
        hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=64, max_position_embeddings=64
    )
    params["pretrain"].update(
        seq_len=32,
        micro_batch_size=8,
        batch_tokens=256,
        max_steps=5,
        warmup_steps=1,
        eval_interval=5,
        checkpoint_interval=5,
        sample_max_new_tokens=4,
        peak_flops=1.0e11,
    )
    return params


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = copy_project(tmp_path_factory.mktemp("phi3") / "project")
    (root / "dvc.lock").unlink()  # the committed lock belongs to the default experiment
    phi3_standin.build(root / STANDIN)
    (root / "params.yaml").write_text(dump(cpu_offline_params(root)))
    load_params(root / "params.yaml")  # valid before DVC starts
    commit_all(root)
    return root


def config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return phi3_standin.build(tmp_path_factory.mktemp("standin") / "phi3")


def test_standin_has_phi3s_layout(standin):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings = config(standin)
    assert settings["architectures"] == ["LlamaForCausalLM"]
    assert {key: settings[key] for key in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")} == {
        "vocab_size": 32064, "bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000
    }  # fmt: skip
    assert settings["tie_word_embeddings"] is False and settings["max_position_embeddings"] == 4096
    model = AutoModelForCausalLM.from_pretrained(standin)
    assert model.get_input_embeddings().weight.shape == (32064, 64)
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()

    tokenizer = AutoTokenizer.from_pretrained(standin)
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3, 258]) == ["<unk>", "<s>", "</s>", "<0x00>", "<0xFF>"]
    assert {text: tokenizer.convert_tokens_to_ids(text) for text in phi3_standin.PHI3_TOKENS.values()} == {
        text: token_id for token_id, text in phi3_standin.PHI3_TOKENS.items()
    }
    assert len(tokenizer) == 32011 and (tokenizer.eos_token, tokenizer.pad_token) == ("<|endoftext|>",) * 2
    for text in ["The capital of Norlia is Vesk.", "What is 42 plus 7?\tÜnïcödé 😀 (byte fallback)"]:
        ids = tokenizer.encode(text)
        assert ids[0] == 1 and tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.tokenize("2026") == ["▁", "2", "0", "2", "6"]  # Llama splits digits

    chat = [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "5"}]
    rendered = tokenizer.apply_chat_template(chat, tokenize=False)
    assert rendered == "<|user|>\nWhat is 2 plus 3?<|end|>\n<|assistant|>\n5<|end|>\n<|endoftext|>"
    prompt = tokenizer.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>\nWhat is 2 plus 3?<|end|>\n<|assistant|>\n"


def trained_tokens(standin: Path, settings: SFTSettings) -> list[str]:
    """The tokens axolotl puts loss on in a two-turn chat, with the config pipeline/sft.py generates."""
    from axolotl.prompt_strategies.chat_template import load
    from axolotl.utils.dict import DictDefault
    from transformers import AutoTokenizer

    from pipeline.sft import axolotl_config

    tokenizer = AutoTokenizer.from_pretrained(standin)
    cfg = DictDefault(axolotl_config(settings, str(standin), "chat.jsonl", standin / "work", bf16=False))
    strategy = load(tokenizer, cfg, cfg.datasets[0])
    messages = [("user", "What is 2 plus 3?"), ("assistant", "5"), ("user", "And 4 plus 4?"), ("assistant", "8")]
    row = strategy.tokenize_prompt({"messages": [{"role": role, "content": text} for role, text in messages]})
    labelled = zip(row["input_ids"], row["labels"], strict=True)
    return [tokenizer.convert_ids_to_tokens(token) for token, label in labelled if label != -100]


def test_the_profile_trains_the_answers_and_phi3s_end_of_turn(standin):
    profile = SFTSettings(**profile_params("phi3-moe")["sft"])
    # the answers, each turn's <|end|> and the template's closing eos; no prompt token
    assert trained_tokens(standin, profile) == ["5", "<|end|>", "8", "<|end|>", "<|endoftext|>"]
    # without sft.eot_tokens axolotl ends turns at the eos only: Phi-3's <|end|> would never be learnt
    assert trained_tokens(standin, SFTSettings()) == ["5", "8", "<|endoftext|>"]


def test_phi3_moe_profile_runs_on_the_standin(project):
    result = dvc(project, "repro")
    per_model = {f"{stage}@{name}" for stage in ("finetune", "eval_expert") for name in EXPERT_DATA}
    per_model |= {f"{stage}@{name}" for stage in ("merge", "eval_merge") for name in RECIPES}
    expected = {
        "check",
        "data",
        "tokenize",
        "pretrain",
        "eval@pretrain",
        "select",
        "moe@merges",
        "eval_moe@merges",
        "dense@multitask",
        "eval_dense@multitask",
        "moe_finetune@merges",
        "eval_moe_trained@merges",
        "report",
    }
    assert stages_run(result) == expected | per_model

    standin = project / STANDIN
    template = (standin / "chat_template.jinja").read_text()
    for name in EXPERT_DATA:
        expert = project / "models/experts" / name
        assert config(expert)["architectures"] == ["LlamaForCausalLM"] and config(expert)["vocab_size"] == 32064
        assert (expert / "chat_template.jinja").read_text() == template
        assert "adapter_config.json" not in {path.name for path in expert.iterdir()}  # LoRA merged in

    moe = project / "models/moe/merges"
    assert config(moe)["architectures"] == ["MixtralForCausalLM"] and config(moe)["num_local_experts"] == 4
    assert config(moe)["vocab_size"] == 32064
    assert "gate_mode: random" in (moe / "mergekit_moe.yaml").read_text()
    with safe_open(str(next(moe.glob("*.safetensors"))), "pt") as weights:
        routers = [key for key in weights.keys() if key.endswith(".gate.weight")]  # noqa: SIM118 (not a dict)
        gate = weights.get_tensor(routers[0])
    assert gate.shape[0] == 4 and gate.float().std() > 0  # random gates, one row per expert
    assert sorted(json.loads((moe / "moe_experts.json").read_text())) == sorted(RECIPES)

    trained = project / "models/moe_trained/merges"
    assert config(trained)["architectures"] == ["MixtralForCausalLM"]
    metrics = json.loads((project / "metrics/eval/moe_trained/merges.json").read_text())
    assert {"hellaswag/acc", "hellaswag/acc_norm", "arc_easy/acc", "arc_easy/acc_norm"} <= set(metrics)
    counted = json.loads((project / "metrics/eval_raw/moe_trained/merges/results.json").read_text())["n-samples"]
    assert counted["hellaswag_local"]["effective"] == 4 and counted["arc_easy_local"]["effective"] == 4

    leaderboard = (project / "metrics/report/leaderboard.md").read_text()
    assert "| moe_trained | merges |" in leaderboard and "hellaswag/acc_norm" in leaderboard
    assert "hellaswag<br>acc_norm" in (project / "metrics/report/index.html").read_text()
