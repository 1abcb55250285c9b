"""A command's start-up without Python's cyclic garbage collector.

A training, encoding or sampling command imports torch, accelerate, peft, transformers and diffusers:
about a million objects that live as long as the process, none of them garbage, which the collector
walks again and again while they pile up. Measured on 2 cores (`cogtune train t2v --model tiny`, 4
steps): 6.7 s of CPU with the collector on during the imports, 5.6 s with it paused and the imported
objects frozen (`gc.freeze`: later collections skip them), in every command and in every process a
launch starts. Pausing alone is not enough: the first collection after it walks everything still.

- `cogtune.cli.app.main` pauses collection when a command starts, and at its end leaves the collector as
  it found it (a command run in-process, as the tests do, unfreezes what it froze).
- A heavy command calls `load_libraries()` first: the libraries are imported while paused, what they
  made is frozen, and collection resumes before any weight or data is touched, so that the garbage of the
  work itself is collected as in any Python program.
- Any progress bar (`cogtune.report`) resumes collection too, for the commands that do not load the
  libraries: long work never runs with the collector off.
"""

from __future__ import annotations

import gc
import importlib

# What a command that builds CogVideoX models imports first (the diffusers modules pull in peft, transformers
# and bitsandbytes where installed).
LIBRARIES = ("torch", "accelerate", "peft", "diffusers.models.transformers.cogvideox_transformer_3d",
             "diffusers.models.autoencoders.autoencoder_kl_cogvideox")

_paused = False
_frozen = False


def pause_collection() -> None:
    """Stop automatic collection, if it is on, until `resume_collection` or `finish`."""
    global _paused
    if gc.isenabled():
        gc.disable()
        _paused = True


def load_libraries(modules: tuple[str, ...] = LIBRARIES) -> None:
    """Import `modules`; if collection is paused, freeze what the imports made and resume it."""
    global _frozen
    for name in modules:
        importlib.import_module(name)
    if _paused and not _frozen:
        gc.freeze()
        _frozen = True
    resume_collection()


def resume_collection() -> None:
    """Turn automatic collection back on if `pause_collection` turned it off (otherwise nothing)."""
    global _paused
    if _paused:
        _paused = False
        gc.enable()


def finish() -> None:
    """The command's end: collection as before it started, and nothing left frozen."""
    global _frozen
    resume_collection()
    if _frozen:
        gc.unfreeze()
        _frozen = False
