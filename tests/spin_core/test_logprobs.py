import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from spin_core.logprobs import pad_batch, sequence_logps
from spin_core.prompts import IGNORE_INDEX


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def _examples():
    g = torch.Generator().manual_seed(1)
    examples = []
    for prompt_len, response_len in [(3, 5), (7, 2), (1, 9), (5, 5)]:
        ids = torch.randint(1, 97, (prompt_len + response_len,), generator=g).tolist()
        labels = [IGNORE_INDEX] * prompt_len + ids[prompt_len:]
        examples.append((ids, labels))
    return examples


def _naive(model, ids, labels):
    """Unpadded, full-vocabulary log_softmax + gather, one sequence at a time."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()  # (seq, vocab)
    logp = torch.log_softmax(logits[:-1], -1)
    targets = torch.tensor(labels[1:])
    keep = targets != IGNORE_INDEX
    return logp[keep].gather(-1, targets[keep, None]).sum().item(), int(keep.sum())


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_batched_padded_chunked_logps_equal_naive(model, side, chunk_size):
    examples = _examples()
    ids, mask, labels = pad_batch([e[0] for e in examples], [e[1] for e in examples], 0, side=side)
    with torch.no_grad():
        logps, counts = sequence_logps(model, ids, mask, labels, chunk_size=chunk_size)
    for row, (seq, lab) in enumerate(examples):
        expected, expected_count = _naive(model, seq, lab)
        assert logps[row].item() == pytest.approx(expected, abs=1e-5)
        assert counts[row].item() == expected_count


def test_gradients_flow_through_chunks_and_match_unchunked(model):
    examples = _examples()
    ids, mask, labels = pad_batch([e[0] for e in examples], [e[1] for e in examples], 0)
    grads = []
    for chunk in (2, 1024):
        model.zero_grad()
        logps, _ = sequence_logps(model, ids, mask, labels, chunk_size=chunk)
        logps.sum().backward()
        grads.append(model.lm_head.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_prompt_and_padding_are_not_scored(model):
    ids, mask, labels = pad_batch([[5, 6, 7, 8]], [[IGNORE_INDEX, IGNORE_INDEX, 7, 8]], 0)
    _, counts = sequence_logps(model, ids, mask, labels)
    assert counts.tolist() == [2]


def test_the_self_check_refuses_logits_that_are_not_the_head_of_the_hidden_states(model):
    """An architecture that rescales logits in its own forward is stopped, naming it."""
    from spin_core.errors import InputError
    from spin_core.logprobs import check_logprob_path

    ids, mask, labels = pad_batch(*zip(*_examples(), strict=True), pad_token_id=0)
    logps, _ = sequence_logps(model, ids, mask, labels)
    check_logprob_path(model, ids, mask, labels, logps)  # a plain Llama passes

    class ScaledLlama(LlamaForCausalLM):  # as Granite divides its logits by logits_scaling
        def forward(self, *args, **kwargs):
            output = super().forward(*args, **kwargs)
            output.logits = output.logits / 4.0
            return output

    scaled = ScaledLlama(model.config).eval()
    scaled.load_state_dict(model.state_dict())
    fast, _ = sequence_logps(scaled, ids, mask, labels)  # backbone + head: misses the scale
    with pytest.raises(InputError, match="LlamaForCausalLM|ScaledLlama"):
        check_logprob_path(scaled, ids, mask, labels, fast)
