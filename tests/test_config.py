"""The typed configuration: built once from the flags, saved in checkpoints with a version, compared
field by field; checkpoints written before it (tests/fixtures/main_moe_checkpoint) still load."""
import dataclasses
import json
import os

import pytest
import torch

from megatron_ted.config.compare import MAY_CHANGE, first_difference, flag_of
from megatron_ted.config.from_flags import configs_from_args, model_config_from_flags
from megatron_ted.config.serialize import model_config_from_dict, model_config_to_dict
from megatron_ted.training.arguments import build_parser, parse_args
from megatron_ted.training.checkpoint import CheckpointError, check_args_compatible, read_metadata, saved_model_config

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "main_moe_checkpoint")
# the flags the fixture was written with (its README)
FIXTURE_FLAGS = ["--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "2", "--ffn-hidden-size", "32",
                 "--seq-length", "16", "--num-experts", "4", "--moe-router-topk", "2", "--moe-layer-freq", "2",
                 "--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope",
                 "--group-query-attention", "--num-query-groups", "1", "--untie-embeddings-and-output-weights",
                 "--disable-bias-linear", "--micro-batch-size", "2", "--global-batch-size", "2", "--mock-data",
                 "--vocab-size", "60", "--make-vocab-size-divisible-by", "16", "--seed", "1234",
                 "--hidden-dropout", "0", "--attention-dropout", "0"]
MLA = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
       "--mock-data", "--vocab-size", "100", "--num-experts", "4", "--multi-latent-attention",
       "--position-embedding-type", "rope", "--kv-lora-rank", "8", "--q-lora-rank", "12", "--qk-head-dim", "8",
       "--qk-pos-emb-head-dim", "4", "--v-head-dim", "8", "--moe-router-score-function", "sigmoid",
       "--moe-router-enable-expert-bias", "--rotary-scaling-factor", "4"]


def _flags(argv, vocab=128):
    args = parse_args(argv, world_size=1)
    args.padded_vocab_size = vocab
    return args


def test_checkpoint_of_main_loads_with_the_same_logits():
    """Written by the code before the typed configuration, read by this code: the model config is
    upgraded from the saved flags and the logits are those the old code computed."""
    from megatron_ted.inference.model import load_model
    with open(os.path.join(FIXTURE, "logits_main.json")) as f:
        ref = json.load(f)
    model = load_model(FIXTURE)
    with torch.no_grad():
        logits = model(torch.tensor(ref["tokens"]))
    torch.testing.assert_close(logits, torch.tensor(ref["logits"]), atol=2e-6, rtol=0)
    # the upgraded config is the one these flags give now, and a run with them may resume from it
    meta = read_metadata(os.path.join(FIXTURE, "iter_0000002"))
    assert "version" not in meta["model_config"]
    assert saved_model_config(meta) == model_config_from_flags(_flags(FIXTURE_FLAGS, 64))
    check_args_compatible(FIXTURE, model_config_from_flags(_flags(FIXTURE_FLAGS, 64)))
    with pytest.raises(CheckpointError, match="has --rotary-base 10000.0 but this run has 500000.0"):
        check_args_compatible(FIXTURE, model_config_from_flags(_flags(FIXTURE_FLAGS + ["--rotary-base", "5e5"], 64)))


def test_model_config_round_trips_through_json_with_a_version():
    config = configs_from_args(_flags(MLA)).model
    data = json.loads(json.dumps(model_config_to_dict(config)))
    assert data["version"] == 2 and data["gpt"]["mla"]["kv_lora_rank"] == 8
    assert model_config_from_dict(data) == config
    del data["gpt"]["rope"]["beta_fast"]                   # a field the checkpoint predates: its default
    assert model_config_from_dict(data).gpt.rope.beta_fast == 32.0
    data["gpt"]["brand_new"] = 1
    with pytest.raises(ValueError, match="model config field gpt.brand_new is unknown"):
        model_config_from_dict(data)
    with pytest.raises(ValueError, match="format version 3"):
        model_config_from_dict({**data, "version": 3})


@pytest.mark.parametrize("extra, flag", [
    (["--kv-lora-rank", "16"], "--kv-lora-rank"), (["--qk-pos-emb-head-dim", "8"], "--qk-pos-emb-head-dim"),
    (["--moe-router-score-function", "softmax"], "--moe-router-score-function"),
    (["--rotary-scaling-factor", "8"], "--rotary-scaling-factor"), (["--disable-bias-linear"], "--disable-bias-linear"),
    (["--num-experts", "8"], "--num-experts"), (["--moe-router-topk", "1"], "--moe-router-topk")])
def test_a_changed_model_flag_is_named(extra, flag):
    """Every field of the model's identity is compared (GQA, MLA, RoPE and router options included,
    which the list of compared flags missed before)."""
    saved = model_config_from_flags(_flags(MLA))
    diff = first_difference(saved, model_config_from_flags(_flags(MLA + extra)))
    assert diff is not None and diff.flag == flag


def test_training_knobs_may_change_on_resume():
    saved = model_config_from_flags(_flags(MLA))
    for extra in (["--hidden-dropout", "0.3"], ["--moe-expert-capacity-factor", "2"], ["--moe-aux-loss-coeff", "0.1"],
                  ["--seed", "7"], ["--moe-no-duplicate-token-dropping"], ["--moe-token-drop-policy", "position"]):
        assert first_difference(saved, model_config_from_flags(_flags(MLA + extra))) is None, extra


def test_every_compared_field_names_a_real_flag():
    flags = {s for a in build_parser()._actions for s in a.option_strings}
    config = model_config_from_flags(_flags(MLA))
    leaves = ["num_experts"]

    def walk(obj, prefix):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, prefix + f.name + ".")
            if not dataclasses.is_dataclass(value) or f.name in ("mla", "moe"):   # the optional parts: flags
                leaves.append(prefix + f.name)
    walk(config, "")
    for path in leaves:
        if path in MAY_CHANGE:
            continue
        for flag in flag_of(path).split(" ")[0].split("/"):
            assert flag in flags, (path, flag)
