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


def test_gradients_equal_a_plain_full_vocabulary_log_softmax(model):
    """The chunked fp32 head's backward is the textbook one: compare with autograd through
    the model's own logits, for the head weight and for the first layer below it."""
    examples = _examples()
    ids, mask, labels = pad_batch([e[0] for e in examples], [e[1] for e in examples], 0)
    grads = []
    for fast in (True, False):
        model.zero_grad()
        if fast:
            logps, _ = sequence_logps(model, ids, mask, labels, chunk_size=3)
        else:
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(ids, attention_mask=mask, position_ids=position_ids).logits[:, :-1]
            targets = labels[:, 1:]
            token = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
            logps = (token * (targets != IGNORE_INDEX)).sum(-1)
        (logps * torch.tensor([1.0, -2.0, 0.5, 3.0])).sum().backward()
        grads.append(
            [model.lm_head.weight.grad.clone(), model.model.layers[0].mlp.up_proj.weight.grad]
        )
    for fast, plain in zip(*grads, strict=True):
        assert fast.abs().sum() > 0
        torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-4)


def test_bf16_logps_with_the_fp32_head_are_closer_to_fp32_than_a_bf16_head():
    """bf16 weights, logits of real-model size (|logit| ~ 20): the head matmul in fp32 removes
    the rounding of the logits themselves (~0.06 at 20), the bf16 head does not. Measured:
    mean |error| per sequence (32-92 tokens) 0.114 nats with the fp32 head, 0.200 with the
    bf16 one; what remains is the bf16 backbone's (its hidden states are bf16)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=4000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    fp32 = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        fp32.lm_head.weight.mul_(40.0)  # logits in the tens, as a trained LM's
        for p in fp32.parameters():  # weights that bf16 holds exactly: only compute differs
            p.copy_(p.bfloat16().float())
    bf16 = LlamaForCausalLM(config).eval().to(torch.bfloat16)
    bf16.load_state_dict(fp32.state_dict())
    g = torch.Generator().manual_seed(2)
    examples = []
    for length in (40, 60, 80, 100):
        seq = torch.randint(1, 4000, (length,), generator=g).tolist()
        examples.append((seq, [IGNORE_INDEX] * 8 + seq[8:]))
    ids, mask, labels = pad_batch([e[0] for e in examples], [e[1] for e in examples], 0)
    with torch.no_grad():
        reference, _ = sequence_logps(fp32, ids, mask, labels)
        fp32_head, _ = sequence_logps(bf16, ids, mask, labels, chunk_size=16)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = bf16(ids, attention_mask=mask, position_ids=position_ids).logits  # bf16 matmul
        targets = labels[:, 1:]
        token = logits[:, :-1].float().log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])
        bf16_head = (token[..., 0] * (targets != IGNORE_INDEX)).sum(-1)
    fp32_error = (fp32_head - reference).abs().mean().item()
    bf16_error = (bf16_head - reference).abs().mean().item()
    print(
        f"mean |error| of summed log-probs: fp32 head {fp32_error:.4f}, bf16 head {bf16_error:.4f}"
    )
    assert fp32_error < 0.75 * bf16_error
