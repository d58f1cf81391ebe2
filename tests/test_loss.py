import math

import pytest
import torch
import torch.nn.functional as F

from dspark_hf import dspark_loss
from dspark_hf.training.loss import position_weights


def reference_terms(draft, target, labels, mask, confidence, decay_gamma):
    """Position by position, straight from the method's definitions (float64)."""
    draft, target = draft.double(), target.double()
    block = labels.shape[-1]
    ce_num = l1_num = conf_num = weight_sum = 0.0
    acceptance_sums, counts = [0.0] * block, [0] * block
    for index in torch.nonzero(mask).tolist():
        *lead, k = index
        w = math.exp(-k / decay_gamma)
        p_draft = torch.softmax(draft[tuple(index)], -1)
        p_target = torch.softmax(target[tuple(index)], -1)
        l1 = (p_draft - p_target).abs().sum()
        accept = 1 - 0.5 * l1.detach()
        c = torch.sigmoid(confidence[tuple(index)].double())
        ce_num = ce_num - w * torch.log(p_draft[labels[tuple(index)]])
        l1_num = l1_num + w * l1
        conf_num = conf_num - w * (accept * torch.log(c) + (1 - accept) * torch.log(1 - c))
        weight_sum += w
        acceptance_sums[k] += float(accept)
        counts[k] += 1
    return {
        "ce_loss": ce_num / weight_sum,
        "l1_loss": l1_num / weight_sum,
        "confidence_loss": conf_num / weight_sum,
        "weight_sum": weight_sum,
        "acceptance": [s / c if c else float("nan") for s, c in zip(acceptance_sums, counts)],
        "position_count": counts,
    }


def make_inputs(seed=0, batch=2, anchors=3, block=4, vocab=11):
    g = torch.Generator().manual_seed(seed)
    draft = torch.randn(batch, anchors, block, vocab, generator=g) * 2
    target = torch.randn(batch, anchors, block, vocab, generator=g) * 2
    labels = torch.randint(0, vocab, (batch, anchors, block), generator=g)
    confidence = torch.randn(batch, anchors, block, generator=g)
    lengths = torch.tensor([[4, 2, 0], [1, 3, 4]])  # valid prefix length of each block
    mask = torch.arange(block) < lengths[..., None]
    return draft, target, labels, mask, confidence


def test_two_token_vocabulary_by_hand():
    # p_d = (1/2, 1/2), p_t = (3/4, 1/4): L1 = 1/2, acceptance 3/4, CE of label 0 = log 2.
    draft = torch.zeros(1, 1, 2)
    target = torch.tensor([[[math.log(3.0), 0.0]]])
    out = dspark_loss(draft, target, torch.tensor([[0]]), torch.tensor([[True]]), torch.zeros(1, 1))
    assert out.ce_loss.item() == pytest.approx(math.log(2))
    assert out.l1_loss.item() == pytest.approx(0.5)
    assert out.acceptance.tolist() == pytest.approx([0.75])
    # BCE of sigmoid(0) = 1/2 against 3/4 is log 2 whatever the target.
    assert out.confidence_loss.item() == pytest.approx(math.log(2))
    assert out.loss.item() == pytest.approx(0.1 * math.log(2) + 0.9 * 0.5 + math.log(2))


@pytest.mark.parametrize("decay_gamma", [4.0, 0.7])
def test_every_term_matches_reference(decay_gamma):
    draft, target, labels, mask, confidence = make_inputs()
    out = dspark_loss(draft, target, labels, mask, confidence, decay_gamma=decay_gamma)
    ref = reference_terms(draft, target, labels, mask, confidence, decay_gamma)
    for name in ("ce_loss", "l1_loss", "confidence_loss"):
        assert getattr(out, name).item() == pytest.approx(float(ref[name]), rel=1e-5), name
    assert out.weight_sum.item() == pytest.approx(ref["weight_sum"], rel=1e-6)
    assert out.position_count.tolist() == ref["position_count"]
    assert out.acceptance.tolist() == pytest.approx(ref["acceptance"], rel=1e-5)
    expected = 0.1 * ref["ce_loss"] + 0.9 * ref["l1_loss"] + 1.0 * ref["confidence_loss"]
    assert out.loss.item() == pytest.approx(float(expected), rel=1e-5)
    weighted = dspark_loss(
        draft,
        target,
        labels,
        mask,
        confidence,
        ce_weight=2.0,
        l1_weight=0.0,
        confidence_weight=0.5,
        decay_gamma=decay_gamma,
    )
    assert weighted.loss.item() == pytest.approx(2.0 * out.ce_loss.item() + 0.5 * out.confidence_loss.item())


def test_gradients_match_reference_autograd():
    draft, target, labels, mask, confidence = make_inputs(seed=1)
    draft64, conf64 = draft.double().requires_grad_(), confidence.double().requires_grad_()
    ref = reference_terms(draft64, target, labels, mask, conf64, 4.0)
    (0.1 * ref["ce_loss"] + 0.9 * ref["l1_loss"] + ref["confidence_loss"]).backward()

    draft32, conf32 = draft.clone().requires_grad_(), confidence.clone().requires_grad_()
    dspark_loss(draft32, target, labels, mask, conf32).loss.backward()
    torch.testing.assert_close(draft32.grad, draft64.grad.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(conf32.grad, conf64.grad.float(), rtol=1e-4, atol=1e-6)


def test_custom_backward_passes_gradcheck():
    # No confidence logits: their target is detached on purpose, which a numerical check would see.
    draft, target, labels, mask, _ = make_inputs(seed=2, vocab=5)
    draft = draft[:, :2].double().requires_grad_()

    def fn(d):
        return dspark_loss(d, target[:, :2].double(), labels[:, :2], mask[:, :2], chunk_size=3).loss

    assert torch.autograd.gradcheck(fn, (draft,), fast_mode=True)


def test_chunked_equals_unchunked_values_and_gradients():
    draft, target, labels, mask, confidence = make_inputs(seed=3, vocab=37)
    results = []
    for chunk_size in (1, 5, None):
        d, c = draft.clone().requires_grad_(), confidence.clone().requires_grad_()
        out = dspark_loss(d, target, labels, mask, c, chunk_size=chunk_size)
        out.loss.backward()
        results.append((out, d.grad, c.grad))
    (whole, whole_draft_grad, whole_conf_grad) = results[-1]
    for out, draft_grad, conf_grad in results[:-1]:
        for name in ("loss", "ce_loss", "l1_loss", "confidence_loss", "token_acceptance"):
            torch.testing.assert_close(getattr(out, name), getattr(whole, name), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(draft_grad, whole_draft_grad, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(conf_grad, whole_conf_grad, rtol=1e-6, atol=1e-8)


def test_masked_positions_are_ignored():
    draft, target, labels, mask, confidence = make_inputs(seed=4)
    d = draft.clone().requires_grad_()
    out = dspark_loss(d, target, labels, mask, confidence)
    out.loss.backward()
    assert torch.all(d.grad[~mask] == 0)
    assert torch.any(d.grad[mask] != 0)

    noise = ~mask
    changed = dspark_loss(
        draft + 5 * noise[..., None] * torch.randn_like(draft),
        target - 3 * noise[..., None],
        labels.masked_fill(noise, 0),
        mask,
        confidence + 7 * noise,
    )
    for name in ("loss", "ce_loss", "l1_loss", "confidence_loss", "acceptance"):
        torch.testing.assert_close(getattr(changed, name), getattr(out, name))


def test_confidence_target_is_detached():
    draft, target, labels, mask, confidence = make_inputs(seed=5)
    d, c = draft.clone().requires_grad_(), confidence.clone().requires_grad_()
    out = dspark_loss(d, target, labels, mask, c, ce_weight=0.0, l1_weight=0.0)
    out.loss.backward()
    assert torch.all(d.grad == 0)
    weights = torch.exp(-torch.arange(4) / 4.0) * mask
    expected = weights * (torch.sigmoid(confidence) - out.token_acceptance) / weights.sum()
    torch.testing.assert_close(c.grad, expected)


def test_low_precision_logits_use_float32_math():
    draft, target, labels, mask, confidence = make_inputs(seed=6)
    d16 = draft.bfloat16().requires_grad_()
    out16 = dspark_loss(d16, target.bfloat16(), labels, mask, confidence.bfloat16())
    out16.loss.backward()
    assert out16.loss.dtype == torch.float32 and d16.grad.dtype == torch.bfloat16
    d32 = draft.bfloat16().float().requires_grad_()
    out32 = dspark_loss(d32, target.bfloat16().float(), labels, mask, confidence.bfloat16().float())
    out32.loss.backward()
    assert out16.loss.item() == pytest.approx(out32.loss.item(), rel=1e-6)
    torch.testing.assert_close(d16.grad.float(), d32.grad, rtol=1e-2, atol=1e-4)


def test_no_valid_position_gives_zero_loss_and_gradient():
    draft, target, labels, mask, confidence = make_inputs(seed=7)
    d = draft.clone().requires_grad_()
    out = dspark_loss(d, target, labels, torch.zeros_like(mask), confidence)
    out.loss.backward()
    assert out.loss.item() == 0.0 and torch.all(d.grad == 0)
    assert torch.isnan(out.acceptance).all() and out.position_count.sum() == 0


def test_without_confidence_logits():
    draft, target, labels, mask, confidence = make_inputs(seed=8)
    out = dspark_loss(draft, target, labels, mask)
    assert out.confidence_loss is None
    assert out.loss.item() == pytest.approx(0.1 * out.ce_loss.item() + 0.9 * out.l1_loss.item())
    ce = F.cross_entropy(draft[mask], labels[mask], reduction="none")
    weights = torch.exp(-torch.nonzero(mask)[:, -1] / 4.0)
    assert out.ce_loss.item() == pytest.approx((ce * weights).sum().item() / weights.sum().item(), rel=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target_logits": torch.zeros(2, 3, 5)}, "target_logits"),
        ({"labels": torch.zeros(2, 4, dtype=torch.long)}, "labels"),
        ({"loss_mask": torch.ones(3, dtype=torch.bool)}, "loss_mask"),
        ({"confidence_logits": torch.zeros(2, 3, 1)}, "confidence_logits"),
        ({"decay_gamma": 0.0}, "decay_gamma"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_bad_inputs_raise(kwargs, message):
    inputs = {
        "draft_logits": torch.zeros(2, 3, 6),
        "target_logits": torch.zeros(2, 3, 6),
        "labels": torch.zeros(2, 3, dtype=torch.long),
        "loss_mask": torch.ones(2, 3, dtype=torch.bool),
    }
    inputs.update(kwargs)
    with pytest.raises(ValueError, match=message):
        dspark_loss(**inputs)


def test_draft_vocabulary_loss_equals_the_full_loss_of_a_drafter_with_no_mass_outside():
    """Over a draft vocabulary S the loss is the full-vocabulary loss of a drafter whose logits are -inf
    outside S: L1 adds the target mass outside S as a constant, and labels outside S give no CE."""
    torch.manual_seed(0)
    vocab, block = 11, 3
    vocab_ids = torch.tensor([0, 2, 3, 7, 10])
    draft = torch.randn(4, block, vocab_ids.numel(), requires_grad=True)
    target = torch.randn(4, block, vocab) * 2
    labels = torch.randint(0, vocab, (4, block))
    labels[0, 0], labels[1, 0] = 3, 5  # one label inside S, one outside
    mask = torch.ones(4, block, dtype=torch.bool)
    restricted = dspark_loss(draft, target, labels, mask, vocab_ids=vocab_ids)

    full = torch.full((4, block, vocab), float("-inf")).index_copy(-1, vocab_ids, draft.detach())
    p_draft, p_target = full.softmax(-1), target.softmax(-1)
    l1 = (p_draft - p_target).abs().sum(-1)
    inside = torch.isin(labels, vocab_ids)
    ce = torch.where(inside, -full.log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1), 0.0)
    weights = position_weights(block, 4.0).expand(4, -1)
    torch.testing.assert_close(restricted.l1_loss, (l1 * weights).sum() / weights.sum())
    torch.testing.assert_close(restricted.ce_loss, (ce * weights).sum() / weights.sum())
    torch.testing.assert_close(restricted.acceptance, (1 - 0.5 * l1).mean(0))

    # Gradients: those of the full loss through the ids in S (finite differences on one logit).
    restricted.loss.backward()
    step = 1e-3
    bumped = draft.detach().clone()
    bumped[2, 1, 3] += step
    plus = dspark_loss(bumped, target, labels, mask, vocab_ids=vocab_ids).loss
    bumped[2, 1, 3] -= 2 * step
    minus = dspark_loss(bumped, target, labels, mask, vocab_ids=vocab_ids).loss
    torch.testing.assert_close(draft.grad[2, 1, 3], (plus - minus) / (2 * step), rtol=1e-2, atol=1e-4)

    # The same numbers from precomputed target probabilities.
    probs = target.softmax(-1)[..., vocab_ids]
    again = dspark_loss(
        draft,
        None,
        labels,
        mask,
        vocab_ids=vocab_ids,
        target_probs=probs,
        target_outside_mass=1 - probs.sum(-1),
    )
    torch.testing.assert_close(again.loss, restricted.loss)

    # And from one row per distinct position: positions that share a target read the same row.
    flat_probs = probs.reshape(-1, probs.shape[-1])
    rows = torch.arange(flat_probs.shape[0]).view(probs.shape[:-1])
    rows[1] = rows[0]  # position group 1 shares group 0's targets
    shared = flat_probs.clone().view_as(probs)
    shared[1] = shared[0]
    common = {"vocab_ids": vocab_ids, "chunk_size": 3}
    expected = dspark_loss(
        draft, None, labels, mask, target_probs=shared, target_outside_mass=1 - shared.sum(-1), **common
    )
    draft.grad = None
    expected.loss.backward()
    expected_grad = draft.grad.clone()
    draft.grad = None
    outside = 1 - flat_probs.sum(-1)
    by_row = dspark_loss(
        draft,
        None,
        labels,
        mask,
        target_probs=flat_probs,
        target_outside_mass=outside,
        target_rows=rows,
        **common,
    )
    by_row.loss.backward()
    torch.testing.assert_close(by_row.loss, expected.loss, rtol=0, atol=0)
    torch.testing.assert_close(draft.grad, expected_grad, rtol=0, atol=0)
