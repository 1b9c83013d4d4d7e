"""Recovery with knowledge distillation: the logit loss of a pruned student against its dense teacher.

``distillation_loss(student_logits, teacher_logits, temperature)`` is the forward KL divergence
``KL(p_teacher || p_student)`` between the temperature-softened distributions over the last
dimension, averaged over every other position (tokens of a batch of sequences, or images), and
multiplied by ``temperature ** 2`` so that its gradient keeps the scale of a cross-entropy as the
temperature changes (Hinton et al., 2015).  It is what Minitron and Sheared-LLaMA recover pruned
language models with; mix it with the task loss as you like:

    >>> import torch
    >>> teacher = torch.randn(2, 5, 11)
    >>> float(distillation_loss(teacher, teacher)) == 0.0
    True
    >>> student = torch.randn(2, 5, 11, requires_grad=True)
    >>> loss = 0.5 * distillation_loss(student, teacher, temperature=2.0)   # + 0.5 * task loss
    >>> loss.backward(); student.grad.shape
    torch.Size([2, 5, 11])

The teacher's logits carry no gradient (they are detached).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["distillation_loss"]


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """``T**2 * KL(softmax(teacher / T) || softmax(student / T))``, mean over all but the last dim."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape; distil outputs of the same inputs "
                         "(a pruned model keeps its output width)")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    classes = student_logits.shape[-1]
    student = F.log_softmax(student_logits.float().reshape(-1, classes) / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.detach().float().reshape(-1, classes) / temperature, dim=-1)
    kl = F.kl_div(student, teacher, reduction="batchmean", log_target=True)
    return kl * temperature ** 2
