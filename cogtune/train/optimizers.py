"""Optimizers by name, from the libraries that implement them, with their pitfalls handled.

- `adamw`, `adam`: torch.
- `adamw-8bit`, `adamw-8bit-paged`: bitsandbytes (paged state lives in unified memory, so a spike
  pages out instead of failing).
- `adamw-8bit-ao`, `adamw-4bit-ao`: torchao's low-bit AdamW. They keep `lr` as a tensor; a schedule
  that writes a float back breaks them ("lr was changed to a non-Tensor object"), so
  `keep_tensor_learning_rates` puts the value back into the tensor after every schedule step.
- `adamw-cpu-offload`: torchao's `CPUOffloadOptimizer` (optimizer state and step on the CPU; with
  gradient offload when there is no accumulation). Its LR schedule works through its
  `param_groups` (the inner optimizers' own dicts); gradient clipping must look at the offloaded
  gradients, which `clip_gradients` does.
- `prodigy`: prodigyopt (learning-rate free; `lr` is a multiplier, 1.0 by default).
"""

from __future__ import annotations

from typing import Any

from cogtune.errors import ConfigError

OPTIMIZERS = ("adamw", "adam", "adamw-8bit", "adamw-8bit-paged", "adamw-8bit-ao", "adamw-4bit-ao",
              "adamw-cpu-offload", "prodigy")
CUDA_ONLY = ("adamw-cpu-offload",)
# adamw-cpu-offload moves tensors of at least this many elements to the host; smaller ones (and their
# state) stay on the device, where their copies would cost more than they save.
CPU_OFFLOAD_MIN_ELEMENTS = 4096


def default_learning_rate(name: str) -> float:
    return 1.0 if name == "prodigy" else 1e-4


def make_optimizer(name: str, parameters: list[Any], *, lr: float, betas: tuple[float, float], eps: float,
                   weight_decay: float, gradient_accumulation: int = 1):
    import torch

    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name in ("adamw-8bit", "adamw-8bit-paged"):
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if name == "adamw-8bit-paged" else bnb.optim.AdamW8bit
        return cls(parameters, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name in ("adamw-8bit-ao", "adamw-4bit-ao"):
        import torchao.optim

        cls = torchao.optim.AdamW8bit if name == "adamw-8bit-ao" else torchao.optim.AdamW4bit
        return cls(parameters, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adamw-cpu-offload":
        import torchao.optim

        # Offloaded gradients are copied, not summed, on each backward: only without accumulation.
        return torchao.optim.CPUOffloadOptimizer(
            parameters, torch.optim.AdamW, offload_gradients=gradient_accumulation == 1,
            minimal_size=CPU_OFFLOAD_MIN_ELEMENTS, lr=lr, betas=betas,
            eps=eps, weight_decay=weight_decay,
        )
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(parameters, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, safeguard_warmup=True,
                       use_bias_correction=True)
    raise ConfigError(f"unknown optimizer '{name}' (known: {', '.join(OPTIMIZERS)})")


def unwrap(optimizer: Any) -> Any:
    """The library optimizer inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def remember_tensor_learning_rates(optimizer: Any) -> list[Any]:
    return [group["lr"] for group in unwrap(optimizer).param_groups]


def keep_tensor_learning_rates(optimizer: Any, originals: list[Any]) -> None:
    """Write a schedule's float back into an optimizer's tensor `lr` (torchao keeps `lr` as a tensor)."""
    import torch

    for group, original in zip(unwrap(optimizer).param_groups, originals):
        if isinstance(original, torch.Tensor) and not isinstance(group["lr"], torch.Tensor):
            original.fill_(float(group["lr"]))
            group["lr"] = original


def current_learning_rate(optimizer: Any) -> float:
    return float(unwrap(optimizer).param_groups[0]["lr"])


def clip_gradients(accelerator: Any, optimizer: Any, parameters: list[Any], max_norm: float) -> float | None:
    """Clip the global gradient norm, wherever the gradients are (on the device or offloaded to the CPU).

    Returns the norm before clipping; None under DeepSpeed, which clips inside its engine's step
    (accelerate would return the previous step's norm there), and when no parameter has a gradient.
    """
    import torch
    from accelerate.utils import DistributedType

    inner = unwrap(optimizer)
    host_map = getattr(inner, "param_d2h_map", None)
    if host_map is None:
        norm = accelerator.clip_grad_norm_(parameters, max_norm)
        if norm is None or accelerator.distributed_type == DistributedType.DEEPSPEED:
            return None
        return float(norm)
    for event in inner.queue.values():  # the offloading copies run on a side stream
        event.synchronize()
    grads = [host.grad for device_param, host in host_map.items() if device_param in inner.queue]
    grads += [p.grad for group in inner.d_param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return None
    norms = [torch.linalg.vector_norm(g.float()).to("cpu") for g in grads]
    total = torch.linalg.vector_norm(torch.stack(norms))
    scale = max_norm / (float(total) + 1e-6)
    if scale < 1.0:
        for grad in grads:
            grad.mul_(scale)
    return float(total)
