"""cegppo_loss, group_advantages and token_quadrants against numbers worked out by hand."""
import math

import pytest
import torch

from cegppo import (ALGOS, cegppo_loss, cispo_loss, group_advantages, policy_loss, positive_sft_loss, token_details,
                    token_quadrants)

DEFAULTS = ALGOS["cegppo"]


def run(ratios, advs, mask=None, **kw):
    """One response of len(ratios) tokens, old_logp = 0 so logp = log(ratio). Returns loss, grad, stats."""
    logp = torch.tensor([[math.log(r) for r in ratios]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros_like(logp)
    adv = torch.tensor([advs], dtype=torch.float64)
    m = torch.ones_like(old) if mask is None else torch.tensor([mask], dtype=torch.float64)
    loss, stats = cegppo_loss(logp, old, adv, m, **{**DEFAULTS, **kw})
    loss.backward()
    return loss.item(), logp.grad[0].tolist(), stats


# Each case: ratio r, advantage A, expected per-token loss value and d(loss)/d(logp) for one token,
# with eps 0.2, beta1 0.5, beta2 1.0, dual clip 10 (the paper's defaults, cegppo.ALGOS).
CASES = [
    # low clip region (r < 0.8, A < 0): value -(1-eps)*A = 0.8; gradient -beta1*(1-eps)*A = 0.5*0.8 = 0.4
    ("low region", 0.5, -1.0, 0.8, 0.4),
    # high clip region (r > 1.2, A > 0): value -(1+eps)*A = -1.2*2 = -2.4; gradient -beta2*(1+eps)*A = -2.4
    ("high region", 1.5, 2.0, -2.4, -2.4),
    # inside: value and gradient -r*A = -1.1*2 = -2.2
    ("inside", 1.1, 2.0, -2.2, -2.2),
    # r < 0.8 but A > 0: PPO does not clip here (min picks r*A), neither do we: -0.5, -0.5
    ("low ratio, A>0", 0.5, 1.0, -0.5, -0.5),
    # r > 1.2 but A < 0: not clipped either: -r*A = 1.5, gradient 1.5
    ("high ratio, A<0", 1.5, -1.0, 1.5, 1.5),
    # just inside the low boundary (r = 0.8001): the PPO gradient r*A, not the beta1 one
    ("low boundary inside", 0.8001, -1.0, 0.8001, 0.8001),
    # just outside it (r = 0.7999): value 0.8, gradient 0.4
    ("low boundary outside", 0.7999, -1.0, 0.8, 0.4),
    # just inside / outside the high boundary with A = 1: -1.1999 / -1.2 and beta2*1.2 = 1.2
    ("high boundary inside", 1.1999, 1.0, -1.1999, -1.1999),
    ("high boundary outside", 1.2001, 1.0, -1.2, -1.2),
    # dual clip binds (A < 0, r = 12: -r*A = 12 > 10 = -c*A): value 10, gradient 0
    ("dual clip", 12.0, -1.0, 10.0, 0.0),
    # dual clip does not bind at r = 9: value 9, gradient 9
    ("below dual clip", 9.0, -1.0, 9.0, 9.0),
]


@pytest.mark.parametrize("name,r,a,value,grad", CASES, ids=[c[0] for c in CASES])
def test_single_token_cases(name, r, a, value, grad):
    loss, g, _ = run([r], [a])
    assert loss == pytest.approx(value, abs=1e-9)
    assert g[0] == pytest.approx(grad, abs=1e-9)


def test_exact_boundary_counts_as_inside():
    # eps_low = 0: the low boundary is r = 1, hit exactly (logp == old_logp). r < 1 - eps is strict,
    # so the token keeps PPO's gradient -r*A = 1 rather than beta1 * 1 * 1 = 0.5.
    loss, g, stats = run([1.0], [-1.0], epsilon_low=0.0)
    assert (loss, g[0], stats["clip_ratio/low_mean"]) == (1.0, 1.0, 0.0)


def test_betas_scale_the_clipped_gradients():
    for b1, b2 in [(0.0, 0.0), (0.75, 1.0), (1.0, 0.5), (2.0, 3.0)]:
        _, g, _ = run([0.5, 1.5], [-1.0, 1.0], beta1=b1, beta2=b2)
        # token mean over 2 tokens: each gradient halves
        assert g[0] == pytest.approx(b1 * 0.8 / 2)
        assert g[1] == pytest.approx(-b2 * 1.2 / 2)


def test_token_mean_mask_and_stats():
    # tokens: low region (0.8), high region (-1.2), inside (-2.2), masked (r=3, A=5 would be -15)
    loss, g, stats = run([0.5, 1.5, 1.1, 3.0], [-1.0, 1.0, 2.0, 5.0], mask=[1, 1, 1, 0])
    assert loss == pytest.approx((0.8 - 1.2 - 2.2) / 3)
    assert g == pytest.approx([0.4 / 3, -1.2 / 3, -2.2 / 3, 0.0])
    assert stats["clip_ratio/low_mean"] == pytest.approx(1 / 3)
    assert stats["clip_ratio/high_mean"] == pytest.approx(1 / 3)
    assert stats["clip_ratio/dual_mean"] == 0.0
    assert stats["ratio/mean"] == pytest.approx((0.5 + 1.5 + 1.1) / 3)
    assert stats["ratio/max"] == pytest.approx(1.5)          # the masked 3.0 is not counted
    # k3 KL: mean of (r - 1) - log r over the three tokens
    kl = sum((r - 1) - math.log(r) for r in (0.5, 1.5, 1.1)) / 3
    assert stats["approx_kl"] == pytest.approx(kl)
    assert all(isinstance(v, float) for v in stats.values())


def test_num_tokens_makes_micro_batches_add_up():
    torch.manual_seed(0)
    logp = (torch.randn(4, 6) * 0.3 - 1).requires_grad_()
    old = logp.detach() + torch.randn(4, 6) * 0.3
    adv = torch.randn(4)
    mask = (torch.rand(4, 6) > 0.3).float()
    full, _ = cegppo_loss(logp, old, adv, mask, **DEFAULTS)
    g_full, = torch.autograd.grad(full, logp)
    n = int(mask.sum())
    parts = [cegppo_loss(logp[i:i + 2], old[i:i + 2], adv[i:i + 2], mask[i:i + 2], num_tokens=n, **DEFAULTS)[0] for i in (0, 2)]
    g_parts, = torch.autograd.grad(sum(parts), logp)
    assert sum(parts).item() == pytest.approx(full.item(), rel=1e-6)
    assert torch.allclose(g_parts, g_full, atol=1e-7)


def ppo_clip(logp, old, adv, mask, eps_low, eps_high, c):
    """PPO-clip written out the textbook way: -min(r A, clip(r) A), dual clip for A < 0, token mean."""
    r = torch.exp(logp - old)
    a = adv[:, None].expand_as(r)
    term = -torch.min(r * a, torch.clamp(r, 1 - eps_low, 1 + eps_high) * a)
    if c:
        term = torch.where(a < 0, torch.min(term, -c * a), term)
    return (term * mask).sum() / mask.sum()


@pytest.mark.parametrize("eps_low,eps_high,c", [(0.2, 0.2, None), (0.2, 0.28, 10.0), (0.1, 0.3, 3.0)])
def test_beta_zero_is_ppo_clip_in_value_and_gradient(eps_low, eps_high, c):
    torch.manual_seed(1)
    logp = (torch.randn(6, 10, dtype=torch.float64) - 1).requires_grad_()
    old = logp.detach() + torch.randn(6, 10, dtype=torch.float64) * 0.8   # many tokens outside the range
    adv = torch.randn(6, dtype=torch.float64) * 2
    mask = (torch.rand(6, 10) > 0.2).double()
    ours, stats = cegppo_loss(logp, old, adv, mask, epsilon_low=eps_low, epsilon_high=eps_high, beta1=0.0, beta2=0.0,
                              dual_clip=c)
    ref = ppo_clip(logp, old, adv, mask, eps_low, eps_high, c)
    g_ours, = torch.autograd.grad(ours, logp)
    g_ref, = torch.autograd.grad(ref, logp)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-12)
    assert torch.allclose(g_ours, g_ref, atol=1e-12)
    assert stats["clip_ratio/low_mean"] > 0 and stats["clip_ratio/high_mean"] > 0    # the test really exercises clipping


def test_group_advantages_and_zero_variance_groups():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    adv, zero = group_advantages(rewards, 4)
    # group 1: mean 0.25, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5 -> 1.5, -0.5, -0.5, -0.5
    assert adv[:4].tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5], abs=1e-5)
    # group 2: all equal -> exactly zero and flagged
    assert adv[4:8].tolist() == [0.0] * 4
    # group 3: mean 0.5, std sqrt(4 * 0.25 / 3) = 0.57735 -> +-0.866025
    assert adv[8:].tolist() == pytest.approx([-0.866025, 0.866025, -0.866025, 0.866025], abs=1e-5)
    assert zero.tolist() == [False, True, False]


def test_token_quadrants():
    # entropy 1.0 everywhere, so HP means logp > -1.
    logp = torch.tensor([[-0.5, -2.0, -0.2, -3.0, -0.1]])
    ent = torch.ones(1, 5)
    adv = torch.tensor([[1.0, 1.0, -2.0, -2.0, 0.0]])       # the A = 0 token is in no quadrant
    mask = torch.tensor([[1, 1, 1, 1, 1]])
    q = token_quadrants(logp, ent, adv, mask)
    assert [q[f"quadrants/{k}_frac"] for k in ("pa_hp", "pa_lp", "na_hp", "na_lp")] == pytest.approx([0.2] * 4)
    # drive -(logp + H) * A: PA&HP -(0.5)*1 = -0.5 (down); PA&LP -(-1)*1 = 1 (up);
    # NA&HP -(0.8)*(-2) = 1.6 (up); NA&LP -(-2)*(-2) = -4 (down)
    assert q["quadrants/pa_hp_drive"] == pytest.approx(-0.5)
    assert q["quadrants/pa_lp_drive"] == pytest.approx(1.0)
    assert q["quadrants/na_hp_drive"] == pytest.approx(1.6)
    assert q["quadrants/na_lp_drive"] == pytest.approx(-4.0)
    empty = token_quadrants(logp, ent, torch.tensor([0.0]), mask)
    assert empty["quadrants/pa_hp_frac"] == 0.0 and empty["quadrants/pa_hp_drive"] == 0.0


def test_algorithm_defaults_are_the_papers():
    # beta1 0.5 / beta2 1.0 (the paper's 1.5B default), eps 0.2, c 10; GRPO and DAPO differ only in
    # the betas (0) and DAPO's clip-higher eps_high 0.28
    assert ALGOS["cegppo"] == dict(beta1=0.5, beta2=1.0, epsilon_low=0.2, epsilon_high=0.2, dual_clip=10.0)
    assert ALGOS["grpo"] == {**ALGOS["cegppo"], "beta1": 0.0, "beta2": 0.0}
    assert ALGOS["dapo"] == {**ALGOS["grpo"], "epsilon_high": 0.28}
    # CISPO has only its weight cap, 1 + 4 = 5 (TRL's recommended epsilon_high for cispo, its cap itself)
    assert ALGOS["cispo"] == dict(beta1=None, beta2=None, epsilon_low=None, epsilon_high=4.0, dual_clip=None)


# CISPO, per token: loss -sg(min(r, 1 + eps_high)) * A * log pi; d loss / d log pi = -min(r, cap) * A.
# With eps_high 0.2 (cap 1.2), old_logp 0 so log pi = log r:
CISPO_CASES = [
    # inside, A > 0: weight r = 1.1; value -1.1 * 2 * log 1.1 = -0.209682; gradient -1.1 * 2 = -2.2
    ("inside, A>0", 1.1, 2.0, -1.1 * 2 * math.log(1.1), -2.2),
    # above the cap, A > 0 (PPO's high clip region: gradient 0 there): weight 1.2; gradient -1.2 * 2 = -2.4
    ("capped, A>0", 1.5, 2.0, -1.2 * 2 * math.log(1.5), -2.4),
    # above the cap, A < 0 (PPO does not clip here: gradient r = 1.5): weight 1.2, gradient 1.2
    ("capped, A<0", 1.5, -1.0, 1.2 * math.log(1.5), 1.2),
    # far below 1, A < 0 (PPO's low clip region: 0; CE-GPPO 0.5 * 0.8 = 0.4): weight r = 0.5, gradient 0.5
    ("low ratio, A<0", 0.5, -1.0, 0.5 * math.log(0.5), 0.5),
    # far below 1, A > 0: weight r, gradient -0.5
    ("low ratio, A>0", 0.5, 1.0, -0.5 * math.log(0.5), -0.5),
    # far above: r = 12, A < 0 (where the dual clip zeroes CE-GPPO's gradient): still 1.2
    ("r 12, A<0", 12.0, -1.0, 1.2 * math.log(12.0), 1.2),
]


@pytest.mark.parametrize("name,r,a,value,grad", CISPO_CASES, ids=[c[0] for c in CISPO_CASES])
def test_cispo_single_token_cases(name, r, a, value, grad):
    logp = torch.tensor([[math.log(r)]], dtype=torch.float64, requires_grad=True)
    loss, stats = cispo_loss(logp, torch.zeros_like(logp), torch.tensor([a], dtype=torch.float64),
                             torch.ones(1, 1, dtype=torch.float64), epsilon_high=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(value, abs=1e-12)
    assert logp.grad.item() == pytest.approx(grad, abs=1e-12)
    # the high clip share counts the cap binding with A > 0 (TRL's cispo_clip_ratio); no low region
    assert stats["clip_ratio/high_mean"] == (1.0 if r > 1.2 and a > 0 else 0.0)
    assert stats["clip_ratio/low_mean"] == stats["clip_ratio/dual_mean"] == 0.0


def test_cispo_token_mean_and_dispatch():
    # three tokens (r 1.1 A 2, r 1.5 A 2, r 0.5 A -1) and a masked one: gradients / 3 as in cegppo_loss
    ratios, advs = [1.1, 1.5, 0.5, 3.0], [2.0, 2.0, -1.0, 5.0]
    logp = torch.tensor([[math.log(r) for r in ratios]], dtype=torch.float64, requires_grad=True)
    old, adv = torch.zeros_like(logp), torch.tensor([advs], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    loss, stats = policy_loss("cispo", logp, old, adv, mask, **ALGOS["cispo"], num_tokens=None)
    loss.backward()
    # cap 5 (ALGOS): no weight is capped; gradient -r * A / 3
    assert logp.grad[0].tolist() == pytest.approx([-2.2 / 3, -3.0 / 3, 0.5 / 3, 0.0])
    assert stats["ratio/max"] == pytest.approx(1.5) and stats["clip_ratio/high_mean"] == 0.0
    # the other algorithms go to cegppo_loss with their knobs
    a, _ = policy_loss("gppo", logp, old, adv, mask, **ALGOS["gppo"])
    b, _ = cegppo_loss(logp, old, adv, mask, **ALGOS["gppo"])
    assert a.item() == b.item()


def test_positive_sft_loss_by_hand():
    # two responses: the first earned the full reward (3 tokens, the last masked out), the second not.
    logp = torch.tensor([[-0.5, -1.5, -9.0], [-2.0, -3.0, -4.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    positive = torch.tensor([True, False])
    loss = positive_sft_loss(logp, mask, positive)
    # token mean of -logp over the positive response's 2 tokens: (0.5 + 1.5) / 2 = 1.0
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    # d/d logp = -1/2 on those two tokens, 0 elsewhere
    assert logp.grad.tolist() == [[-0.5, -0.5, 0.0], [0.0, 0.0, 0.0]]
    # num_tokens: the mini-batch's count of positive tokens when accumulating micro-batches
    assert positive_sft_loss(logp, mask, positive, num_tokens=4).item() == pytest.approx(0.5)


def test_positive_sft_loss_is_zero_without_a_positive_response():
    logp = torch.tensor([[-0.5, -1.5]], requires_grad=True)
    loss = positive_sft_loss(logp, torch.ones(1, 2), torch.tensor([False]))
    assert loss.item() == 0.0
    loss.backward()                                          # it still carries the graph
    assert logp.grad.abs().sum() == 0


@pytest.mark.parametrize("algo", ["cegppo", "grpo", "gppo", "cispo"])
def test_recorded_weight_is_the_gradient_autograd_gives(algo):
    # F is recorded from the loss's own masks (clip_regions); the gradient autograd takes through the loss is
    # d loss / d log pi_t = -F_t * A_t / (number of tokens): they must agree token by token (F
    # includes the sampler correction's weight of the token, which scales its term)
    torch.manual_seed(3)
    logp = (torch.randn(5, 9, dtype=torch.float64) - 1).requires_grad_()
    old = logp.detach() + torch.randn(5, 9, dtype=torch.float64) * 0.7
    old[0, 0] = logp[0, 0].detach() - math.log(12.0)                  # r = 12 for one A < 0 token: dual clip
    adv = torch.tensor([-1.0, 1.5, -0.5, 2.0, -2.0], dtype=torch.float64)
    mask = torch.ones(5, 9, dtype=torch.float64)
    mask[2, 6:] = 0
    weights = torch.rand(5, 9, dtype=torch.float64) + 0.5            # a sampler correction's weights
    weights[1] = 1.0
    loss, stats = policy_loss(algo, logp, old, adv, mask, token_weights=weights, **ALGOS[algo])
    tok = token_details(algo, logp.detach(), old, adv, token_weights=weights, **ALGOS[algo])
    grad, = torch.autograd.grad(loss, logp)
    F = -grad * mask.sum() / adv[:, None]
    valid = mask.bool()
    assert torch.allclose(F[valid], tok["F"][valid], atol=1e-12)
    # the regions are the ones the statistics count
    n = mask.sum().item()
    assert ((tok["region"] == 1) & valid).sum().item() / n == pytest.approx(stats["clip_ratio/low_mean"])
    positive = adv[:, None].expand_as(mask) > 0
    high = (tok["region"] == 2) & valid & (positive if algo == "cispo" else True)   # CISPO's cap: either sign
    assert high.sum().item() / n == pytest.approx(stats["clip_ratio/high_mean"])
    if algo == "cispo":
        assert ((tok["region"] == 2) & ~positive & valid).any()      # capped with A < 0 too, shown as such
    assert torch.allclose(tok["ratio"], torch.exp(logp - old).detach())
    if algo != "cispo":
        assert tok["region"][0, 0] == 3 and tok["F"][0, 0] == 0.0  # the dual clip binds there
        assert (tok["region"] == 1).any() and (tok["region"] == 2).any()


def test_quadrant_of_each_token():
    from cegppo import quadrant_of
    logp = torch.tensor([[-0.5, -2.0, -0.2, -3.0, -0.1]])
    ent = torch.ones(1, 5)
    adv = torch.tensor([[1.0, 1.0, -2.0, -2.0, 0.0]])
    assert quadrant_of(logp, ent, adv).tolist() == [[0, 1, 2, 3, -1]]     # PA&HP, PA&LP, NA&HP, NA&LP, none


def test_sampler_correction_by_hand():
    from cegppo import sampler_correction
    # d = log pi_old - log pi_sample: response 0 [0.1, -0.2, 0.5] (sum 0.4), response 1 [1.5, 0, masked 9]
    old = torch.tensor([[0.1, -0.2, 0.5], [1.5, 0.0, 9.0]]) - 2.0
    sample = torch.full((2, 3), -2.0)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    e = math.exp
    want = {"token_truncate": [[e(0.1), e(-0.2), e(0.5)], [3.0, 1.0, 0.0]],
            "token_mask": [[e(0.1), e(-0.2), e(0.5)], [0.0, 1.0, 0.0]],                # e^1.5 = 4.48 > 3: 0
            "sequence_truncate": [[e(0.4)] * 3, [3.0, 3.0, 0.0]],                      # e^0.4 = 1.49
            "sequence_mask": [[e(0.4)] * 3, [0.0, 0.0, 0.0]],
            "off": [[1.0] * 3, [1.0, 1.0, 0.0]]}
    masked = {"token_mask": 1 / 5, "sequence_mask": 2 / 5}
    truncated = {"token_truncate": 1 / 5, "sequence_truncate": 2 / 5}
    for mode, w in want.items():
        got, st = sampler_correction(old, sample, mask, mode, cap=3.0)
        assert torch.allclose(got, torch.tensor(w), rtol=1e-6), mode
        assert st["sampling/correction_masked"] == pytest.approx(masked.get(mode, 0.0))
        assert st["sampling/correction_truncated"] == pytest.approx(truncated.get(mode, 0.0))
        valid = [x for row, m in zip(w, mask.tolist()) for x, k in zip(row, m) if k]
        assert st["sampling/importance_sampling_ratio/max"] == pytest.approx(max(valid), rel=1e-6)
        # where the sampler's numbers are pi_old (a CPU in float32), every weight is exactly 1
        ones, _ = sampler_correction(sample, sample, mask, mode, cap=3.0)
        assert torch.equal(ones, mask.float())


def test_steer_betas_on_hand_made_entropy_sequences():
    from cegppo import steer_betas

    def run(entropies, target, b1=0.5, b2=1.0, **kw):
        smoothed, out = None, []
        for h in entropies:
            b1, b2, smoothed = steer_betas(b1, b2, smoothed, h, target, **kw)
            out.append((b1, b2, smoothed))
        return out
    # the first step: smoothed = H; above the target by e = log(0.2 / 0.1) = 0.69: beta1 up, beta2 down by
    # rate * 0.69 = 0.0347 (beta2 from 1.0); below it by as much: the reverse (beta2 stays at its bound 1)
    (b1, b2, s), = run([0.2], 0.1)
    assert s == 0.2 and b1 == pytest.approx(0.5 + 0.05 * math.log(2)) and b2 == pytest.approx(1.0 - 0.05 * math.log(2))
    (b1, b2, s), = run([0.05], 0.1)
    assert b1 == pytest.approx(0.5 - 0.05 * math.log(2)) and b2 == 1.0
    # smoothing: H = 0.1, then 0.3: smoothed 0.1 + 0.2 * 0.2 = 0.14
    assert run([0.1, 0.3], 0.1)[-1][2] == pytest.approx(0.14)
    # inside the dead band (|log(H / H*)| <= 0.05): nothing moves
    assert run([0.104] * 10, 0.1)[-1][:2] == (0.5, 1.0)
    # a step moves each beta by at most `rate`, whatever the error (e clipped to 1)
    (b1, b2, _), = run([100.0], 0.1)
    assert (b1, b2) == pytest.approx((0.55, 0.95))
    # held away from the target, the betas move to their bounds and stay there: they never leave [0, beta_max]
    high = run([1.0] * 200, 0.1)
    assert all(0 <= b1 <= 1 and 0 <= b2 <= 1 for b1, b2, _ in high) and high[-1][:2] == (1.0, 0.0)
    low = run([0.01] * 200, 0.1)
    assert low[-1][:2] == (0.0, 1.0) and all(b1 >= 0 for b1, _, _ in low)
    # they move the right way monotonically on a constant signal, and settle on one at the target
    assert all(a[0] <= b[0] and a[1] >= b[1] for a, b in zip(high, high[1:]))
    settled = run([0.2] * 5 + [0.1] * 60, 0.1)
    assert settled[-1][:2] == settled[-2][:2] and abs(math.log(settled[-1][2] / 0.1)) <= 0.05


def test_positive_sft_loss_takes_the_sampler_corrections_weights():
    # two positive responses of 2 tokens: logp (-1, -2) and (-3, -4); the correction masks the second (weight 0)
    # and halves the first's second token: -(1 * -1 + 0.5 * -2) / 4 tokens = 0.5 (the denominator counts tokens)
    logp = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]])
    mask, positive = torch.ones(2, 2), torch.tensor([True, True])
    weights = torch.tensor([[1.0, 0.5], [0.0, 0.0]])
    assert positive_sft_loss(logp, mask, positive, token_weights=weights).item() == pytest.approx(0.5)
    assert positive_sft_loss(logp, mask, positive).item() == pytest.approx(2.5)      # without: (1+2+3+4) / 4
