"""Error feedback (fedpara/wire/feedback.py): the running sum of what was sent converges to the
running sum of what should have been sent; the residual survives a client restart, not a new run."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpara.wire import CodecSpec
from fedpara.wire.codecs import roundtrip
from fedpara.wire.feedback import ErrorFeedback

torch.set_num_threads(1)

SPECS = ["int4", "int2", "int8", "fp16+topk:0.1", "int4+topk:0.05", "int4+topk:0.3", "int2+topk:0.3"]


def _rounds(spec: str, deltas: list[dict], ef: bool = True):
    """(sum of what was sent, sum of what should have been sent, the final residual)."""
    fb, sent_sum, true_sum = ErrorFeedback(), None, None
    codec = CodecSpec.parse(spec)
    for d in deltas:
        x = fb.add(d) if ef else d
        sent = {k: roundtrip(v, codec) for k, v in x.items()}
        if ef:
            fb.settle(x, sent)
        sent_sum = sent if sent_sum is None else {k: sent_sum[k] + sent[k] for k in sent}
        true_sum = dict(d) if true_sum is None else {k: true_sum[k] + d[k] for k in d}
    return sent_sum, true_sum, fb.residual


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(SPECS), st.integers(1, 40), st.integers(0, 1 << 30), st.floats(0.01, 100.0),
       st.sampled_from([(48, 36), (700,), (3, 5, 40)]))
def test_sent_sum_tracks_the_true_sum_up_to_one_bounded_residual(spec, rounds, seed, scale, shape):
    g = torch.Generator().manual_seed(seed)
    deltas = [{"w": scale * torch.randn(shape, generator=g) * (1 + torch.rand(shape, generator=g))}
              for _ in range(rounds)]
    sent, true, residual = _rounds(spec, deltas)
    # the identity: sum(sent) = sum(delta) - e_T (exact up to float rounding)
    gap = true["w"] - sent["w"]
    tol = 1e-4 * float(sum(d["w"].abs().sum() for d in deltas)) / deltas[0]["w"].numel() + 1e-5 * scale
    assert torch.allclose(gap, residual["w"], atol=tol * rounds)
    # the residual stays bounded however many rounds pass (a contraction: top-k keeps a fraction F
    # of the energy, 4-bit (2-bit) keeps each element within 1/30 (1/6) of its block's range), so the mean gap per
    # round -> 0: the sum of what was sent converges to the sum of what should have been sent
    biggest = max(float(d["w"].norm()) for d in deltas)
    frac = CodecSpec.parse(spec).topk or 1.0
    bound = (2.0 / frac + 1.0) * biggest
    assert float(residual["w"].norm()) <= bound
    assert float(gap.norm()) / rounds <= bound / rounds


def test_without_error_feedback_top_k_loses_the_small_coordinates_for_good():
    d = {"w": torch.linspace(1.0, 2.0, 100)}  # the same delta every round: top-10% always keeps the same 10
    bound = (2.0 / 0.1 + 1.0) * float(d["w"].norm())
    errors = {}
    for rounds in (50, 200):
        sent_ef, true, _ = _rounds("fp32+topk:0.1", [d] * rounds)
        sent_no, _, _ = _rounds("fp32+topk:0.1", [d] * rounds, ef=False)
        assert int((sent_no["w"] == 0).sum()) == 90  # without EF, 90 coordinates are never sent at all
        errors[rounds] = (float((true["w"] - sent_ef["w"]).norm()), float((true["w"] - sent_no["w"]).norm()))
    assert all(ef <= bound for ef, _ in errors.values())  # with EF the gap stays bounded
    assert errors[200][1] > 3.9 * errors[50][1] > 3.9 * bound  # without, it grows with every round


def test_residual_is_saved_with_its_owner_and_refused_for_another(tmp_path):
    fb = ErrorFeedback()
    fb.settle({"w": torch.ones(3), "steps": torch.tensor(4)}, {"w": torch.zeros(3), "steps": torch.tensor(4)})
    assert set(fb.residual) == {"w"}  # only float tensors carry a residual
    owner = {"run_id": "r1", "spec": "mlp2"}
    fb.save(tmp_path / "res.safetensors", owner)
    again = ErrorFeedback()
    assert again.load(tmp_path / "res.safetensors", owner) and torch.equal(again.residual["w"], torch.ones(3))
    other = ErrorFeedback()
    assert not other.load(tmp_path / "res.safetensors", {"run_id": "r2", "spec": "mlp2"}) and not other.residual
    (tmp_path / "bad.safetensors").write_bytes(b"\x00garbage")
    assert not ErrorFeedback().load(tmp_path / "bad.safetensors", owner)


def test_a_residual_of_another_shape_is_dropped_not_added():
    fb = ErrorFeedback()
    fb.residual = {"w": torch.ones(4)}
    out = fb.add({"w": torch.zeros(5)})
    assert torch.equal(out["w"], torch.zeros(5))
