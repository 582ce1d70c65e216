"""The loss and the gradients' largest magnitude of each training step, read on the
host without making the GPU wait, for the guard of duties.py.

A GPU runs behind the Python that launches its kernels, and reading a value that it
computes waits until the GPU gets there. The notes' loop waits once a step, at
`loss.item()`, after backward. So the loss and the norm are copied to the host as
soon as they exist, during forward and at the end of backward: when the guard reads
them after that wait, they are there, and the GPU was never stopped a second time.
"""
import math

import torch
import torch.nn as nn
from torch.autograd.graph import register_multi_grad_hook
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel


class StepReadings:
    """The loss and gradient norm of the step under way, for `parallel`: the DDPM,
    or under torchrun its DistributedDataParallel, whose averaged gradients count.

    The norm is the infinity norm, max |g|: infinite or NaN exactly when a gradient
    is, and unlike the sum of squares it cannot overflow, even on the scaled
    gradients of float16 training.
    """

    def __init__(self, parallel: nn.Module) -> None:
        self.loss = self.norm = self.copied = None
        # under torchrun: the futures and largest magnitudes of the step's buckets
        self.pending, self.largest = [], []
        if isinstance(parallel, DistributedDataParallel):
            parallel.register_comm_hook(self, averaging_hook)
        else:
            parameters = [p for p in parallel.parameters() if p.requires_grad]
            register_multi_grad_hook(parameters, self.gradients_done)

    def take_loss(self, loss: torch.Tensor) -> None:
        """Start the copy of the step's loss to the host."""
        self.loss = to_host(loss.detach())

    def gradients_done(self, grads) -> None:
        """At the end of backward: start the copy of the gradients' norm."""
        grads = [g for g in grads if g is not None]
        self.take_norm(torch.nn.utils.get_total_norm(grads, norm_type=math.inf))

    def take_norm(self, norm: torch.Tensor) -> None:
        self.norm = to_host(norm)
        if norm.device.type == "cuda":
            # the loss's copy was queued before this one, so one event covers both
            self.copied = torch.cuda.Event()
            self.copied.record()

    def read(self) -> tuple[float, float]:
        """The step's loss and gradient norm, as Python floats."""
        if self.copied is not None:
            # already done after the notes' loss.item(); otherwise a wait
            self.copied.synchronize()
        return self.loss.item(), self.norm.item()

    def bucket_averaged(self, future: torch.futures.Future) -> torch.Tensor:
        """A bucket of gradients, averaged across the ranks: keep its max |g|."""
        averaged = future.value()
        self.largest.append(averaged.abs().amax())
        return averaged

    def buckets_done(self, last: torch.Tensor) -> torch.Tensor:
        """Every bucket averaged: the norm of them all."""
        self.take_norm(torch.stack(self.largest).amax())
        self.largest = []
        return last


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """On a CUDA GPU, a copy of `tensor` on the CPU, queued behind the GPU's work;
    elsewhere `tensor` itself, read when it is needed."""
    return tensor.to("cpu", non_blocking=True) if tensor.is_cuda else tensor


def averaging_hook(
    readings: StepReadings, bucket
) -> torch.futures.Future[torch.Tensor]:
    """DistributedDataParallel's own averaging of a bucket of gradients, which also
    keeps the bucket's largest magnitude; the last bucket's future waits for all, so
    that the norm covers every bucket, whatever order they finish in."""
    future = allreduce_hook(None, bucket).then(readings.bucket_averaged)
    readings.pending.append(future)
    if not bucket.is_last():
        return future
    pending, readings.pending = readings.pending, []
    return torch.futures.collect_all(pending).then(
        lambda _: readings.buckets_done(future.value())
    )
