"""Vocab-parallel KL for distillation: float64 reference at TP=1, and TP=2 over gloo equals
the full-vocabulary result (value and gradient)."""

import pytest
import torch

from megatron_dynamoe.training.distillation import distillation_loss, vocab_parallel_kl
from tests.multiproc import run_processes


def _logits(seed: int):
    gen = torch.Generator().manual_seed(seed)
    student = 3 * torch.randn(2, 5, 12, generator=gen, dtype=torch.float64)
    teacher = 3 * torch.randn(2, 5, 12, generator=gen, dtype=torch.float64)
    return student, teacher


def _reference_kl(student, teacher, temperature):
    log_p_t = torch.log_softmax(teacher / temperature, dim=-1)
    log_p_s = torch.log_softmax(student / temperature, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_matches_float64_reference(temperature):
    student, teacher = _logits(0)
    ref_s = student.clone().requires_grad_(True)
    reference = _reference_kl(ref_s, teacher, temperature)
    reference.sum().backward()
    s = student.float().requires_grad_(True)
    kl = vocab_parallel_kl(s, teacher.float(), temperature)
    kl.sum().backward()
    torch.testing.assert_close(kl.double(), reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad.double(), ref_s.grad, rtol=1e-4, atol=1e-6)
    assert (kl >= -1e-6).all()
    same = vocab_parallel_kl(s.detach(), s.detach(), temperature)
    assert same.abs().max() < 1e-5


def test_distillation_loss_mixes_lm_and_scaled_kl():
    student, teacher = _logits(1)
    lm = torch.rand(2, 5, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float64)
    loss, report = distillation_loss(lm, student.float(), teacher.float(), mask, weight=0.3,
                                     temperature=2.0)
    kl = _reference_kl(student, teacher, 2.0)
    expect = 0.7 * (lm * mask).sum() / mask.sum() + 0.3 * 4.0 * (kl * mask).sum() / mask.sum()
    assert loss.item() == pytest.approx(expect.item(), rel=1e-5)
    assert report["distill kl"].item() == pytest.approx(((kl * mask).sum() / mask.sum()).item(),
                                                        rel=1e-5)


def _tp_worker(rank, world_size, out):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    student, teacher = _logits(2)
    half = student.shape[-1] // world_size
    cols = slice(rank * half, (rank + 1) * half)
    s = student[..., cols].float().clone().requires_grad_(True)
    kl = vocab_parallel_kl(s, teacher[..., cols].float(), 1.5, dist.group.WORLD)
    (kl * torch.arange(1, 6).float()).sum().backward()  # a non-uniform upstream gradient
    torch.save((kl.detach(), s.grad), f"{out}.{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.multiproc
def test_kl_tensor_parallel_matches_full_vocabulary(tmp_path):
    run_processes(_tp_worker, 2, str(tmp_path / "kl"))
    student, teacher = _logits(2)
    s = student.float().requires_grad_(True)
    kl = vocab_parallel_kl(s, teacher.float(), 1.5)
    (kl * torch.arange(1, 6).float()).sum().backward()
    grads = []
    for rank in range(2):
        rank_kl, rank_grad = torch.load(tmp_path / f"kl.{rank}.pt")
        torch.testing.assert_close(rank_kl, kl.detach(), rtol=1e-5, atol=1e-6)
        grads.append(rank_grad)
    torch.testing.assert_close(torch.cat(grads, dim=-1), s.grad, rtol=1e-5, atol=1e-6)
