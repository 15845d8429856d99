"""ncfast.integrations.transformers on tiny randomly initialised causal LMs (GPT-2, Llama-style):
the features are the head's input, the numbers those of the token path on the same features."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from ncfast.integrations.transformers import (  # noqa: E402
    BadBatchError,
    NeuralCollapseCallback,
    UnsupportedModelError,
    measure_language_model,
)
from ncfast.tokens import TokenMeasurement, next_token_labels  # noqa: E402
from tests.helpers.assertions import assert_same_metrics  # noqa: E402
from tests.helpers.language_models import tiny_gpt2  # noqa: E402

VOCAB, DIM, SEQ = 40, 12, 16


def gpt2(seed: int) -> nn.Module:
    return tiny_gpt2(seed, VOCAB, DIM, SEQ)


def llama(seed):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=DIM, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=SEQ,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).double().eval()


MODELS = {"gpt2": gpt2, "llama": llama}


def token_batches(seed, batches=4, size=8, pad=True):
    """Dicts of input_ids and attention_mask, some sequences right-padded (token 0)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        ids = torch.randint(1, VOCAB, (size, SEQ), generator=g)
        lengths = torch.randint(SEQ // 2, SEQ + 1, (size,), generator=g) if pad else None
        mask = torch.ones_like(ids)
        if lengths is not None:
            mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
            ids = ids * mask
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def by_hand(model, batches):
    """The token path fed the final hidden state (after the model's final norm) of each batch,
    from the base model's output: no hook."""
    head = model.get_output_embeddings()
    tokens = TokenMeasurement(VOCAB, DIM, head.weight, head.bias)
    rows, row_labels = [], []
    with torch.no_grad():
        for batch in batches:
            hidden = model.base_model(**batch).last_hidden_state
            labels = next_token_labels(batch["input_ids"], batch["attention_mask"])
            tokens.update(hidden, labels)
            keep = labels != -100
            rows.append(hidden[keep])
            row_labels.append(labels[keep])
    return tokens, torch.cat(rows), torch.cat(row_labels)


@pytest.mark.parametrize("name", list(MODELS))
def test_measure_equals_the_token_path_on_the_final_hidden_state(name, seed):
    model = MODELS[name](seed)
    batches = token_batches(seed)
    result = measure_language_model(model, batches, counts=True)
    tokens, _, labels = by_hand(model, batches)
    expected = dict(tokens.compute())
    # Same model, same inputs, features of the same forward code: the same rows, bit for bit.
    got = {k: v for k, v in result.items() if k in expected}
    assert_same_metrics(got, expected)
    assert result["num_tokens"] == len(labels) == result["num_samples"]
    assert result["classes_present"] == len(labels.unique())
    assert result["ignored_tokens"] == sum(b["input_ids"].numel() for b in batches) - len(labels)
    assert torch.equal(result["token_counts"], torch.bincount(labels, minlength=VOCAB))
    assert result["passes"] == 1
    assert not model.training


@pytest.mark.parametrize("name", list(MODELS))
def test_loss_is_the_models_own_loss(name, seed):
    model = MODELS[name](seed)
    batches = token_batches(seed, batches=1, pad=True)
    result = measure_language_model(model, batches)
    batch = batches[0]
    hf_labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        own = model(**batch, labels=hf_labels).loss
    # Hugging Face's loss rounds the (float64) logits to float32 first: relative error a few
    # float32 eps of the logits' size (~1); ncfast's is float64 throughout.
    assert result["loss"] == pytest.approx(float(own), rel=1e-6)
    # HF labels in the batch give the same tokens and loss as the mask.
    again = measure_language_model(model, [{**batch, "labels": hf_labels}])
    assert again["num_tokens"] == result["num_tokens"]
    assert again["loss"] == pytest.approx(result["loss"], rel=1e-12)


def test_weight_tied_head_without_bias_and_a_head_with_bias(seed):
    model = gpt2(seed)
    head = model.get_output_embeddings()
    assert head.weight is model.transformer.wte.weight and head.bias is None
    batches = token_batches(seed)
    tied = measure_language_model(model, batches)
    assert tied["nc3_self_duality"] > 0 and math.isfinite(tied["nc2_equinorm_classifiers"])
    # A bias moves the decisions: NC4 and the MSE keys follow the head the model uses.
    model.lm_head = nn.Linear(DIM, VOCAB, bias=True).double()
    with torch.no_grad():
        model.lm_head.weight.copy_(head.weight)
        model.lm_head.bias.copy_(torch.linspace(-30, 30, VOCAB))
    biased = measure_language_model(model, batches)
    tokens, _, _ = by_hand(model, batches)
    assert biased["nc4_ncc_mismatch"] == tokens.compute()["nc4_ncc_mismatch"]
    assert biased["loss_mse"] != tied["loss_mse"] and biased["nc1"] == tied["nc1"]


def test_second_pass_when_the_features_exceed_the_budget(seed):
    model = gpt2(seed)
    batches = token_batches(seed)
    one = measure_language_model(model, batches)
    two = measure_language_model(model, batches, memory_budget_bytes=0)
    assert (one["passes"], two["passes"]) == (1, 2)
    assert two["nc4_ncc_mismatch"] == one["nc4_ncc_mismatch"]


def test_bad_input_names_the_argument(seed):
    model = gpt2(seed)
    with pytest.raises(BadBatchError, match=r"batch\['input_ids'\] holds token ids outside"):
        measure_language_model(model, [torch.full((2, 4), VOCAB)])
    labels = torch.full((2, 4), 3)
    labels[0, 1] = VOCAB + 7
    with pytest.raises(BadBatchError, match=r"batch\['labels'\].*max 47"):
        measure_language_model(
            model, [{"input_ids": torch.ones(2, 4, dtype=torch.long), "labels": labels}]
        )
    with pytest.raises(BadBatchError, match="must be a dict with 'input_ids'"):
        measure_language_model(model, [(torch.ones(2, 4, dtype=torch.long),)])
    model.lm_head = nn.Sequential(nn.Linear(DIM, VOCAB))
    with pytest.raises(
        UnsupportedModelError, match="output head is a Sequential, not an nn.Linear"
    ):
        measure_language_model(model, token_batches(seed))

    class NoHiddenStates(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = nn.Linear(DIM, VOCAB)

        def forward(self, input_ids, attention_mask=None):
            return transformers.modeling_outputs.CausalLMOutput(logits=torch.zeros(2, 4, VOCAB))

    with pytest.raises(UnsupportedModelError, match="did not call its output head"):
        measure_language_model(NoHiddenStates(), [torch.ones(2, 4, dtype=torch.long)])
    with pytest.raises(UnsupportedModelError, match="model must be a torch.nn.Module"):
        measure_language_model("gpt2", [])


def test_trainer_callback_logs_what_measure_returns(seed, tmp_path):
    pytest.importorskip("accelerate")
    model = gpt2(seed).float()
    batches = token_batches(seed, batches=2, pad=False)
    rows = [{"input_ids": ids} for b in batches for ids in b["input_ids"]]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=8, report_to=[], use_cpu=True
    )

    def collate(items):
        ids = torch.stack([item["input_ids"] for item in items])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    trainer = transformers.Trainer(model, args, eval_dataset=rows, data_collator=collate)
    callback = NeuralCollapseCallback.attach_to(trainer)
    metrics = trainer.evaluate()
    expected = measure_language_model(model, [collate(rows[:8]), collate(rows[8:])])
    assert metrics["eval_nc/nc1"] == pytest.approx(expected["nc1"], rel=1e-9)
    assert metrics["eval_nc/nc4_ncc_mismatch"] == expected["nc4_ncc_mismatch"]
    assert metrics["eval_nc/num_tokens"] == expected["num_tokens"] == 2 * 8 * (SEQ - 1)
    logged = [row for row in trainer.state.log_history if "eval_nc/nc1" in row]
    assert len(logged) == 1 and logged[0]["eval_nc/nc1"] == metrics["eval_nc/nc1"]
    assert callback.history[0]["num_tokens"] == expected["num_tokens"]
    # Training-mode forward passes are not measured; a second evaluation starts afresh, with
    # the head as it is then (training moves it).
    model.train()
    model(input_ids=batches[0]["input_ids"])
    with torch.no_grad():
        model.lm_head.weight.add_(
            torch.randn(VOCAB, DIM, generator=torch.Generator().manual_seed(seed))
        )
    again = trainer.evaluate()
    moved = measure_language_model(model, [collate(rows[:8]), collate(rows[8:])])
    assert again["eval_nc/num_tokens"] == expected["num_tokens"]
    assert again["eval_nc/nc3_self_duality"] == pytest.approx(moved["nc3_self_duality"], rel=1e-9)
    assert again["eval_nc/nc4_ncc_mismatch"] == moved["nc4_ncc_mismatch"]
    assert moved["nc3_self_duality"] != pytest.approx(expected["nc3_self_duality"], rel=1e-3)
