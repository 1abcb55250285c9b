"""Keep third-party import chatter (torchao, bitsandbytes, torch, diffusers) off the user's terminal.

Messages of these libraries at import time are about optional kernels we do not use; they bury
cogtune's own output. `--debug` (COGTUNE_DEBUG=1) leaves them alone.
"""

from __future__ import annotations

import logging
import os
import warnings

_NOISY_LOGGERS = ("torchao", "bitsandbytes", "torch.utils._pytree", "torch._dynamo", "diffusers", "transformers",
                  "accelerate", "peft", "huggingface_hub")

_done = False


def debug_enabled() -> bool:
    return os.environ.get("COGTUNE_DEBUG", "") not in ("", "0")


def quiet_libraries() -> None:
    """Lower the log level of chatty libraries; call before importing them. Idempotent."""
    global _done
    if _done or debug_enabled():
        return
    _done = True
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*is an Enum subclass.*")
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
