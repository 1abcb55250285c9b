"""A command's start-up and exit without Python's cyclic garbage collector walking every library object.

A training, encoding or sampling command imports torch, accelerate, peft, transformers and diffusers:
about a million objects that live as long as the process, none of them garbage. The collector walks
them again and again while they pile up, and once more in full when the interpreter exits. Measured on
2 cores (`cogtune train t2v --model tiny`, 4 steps, 3 validation prompts): 7.4 s of user CPU as Python does
it, 5.1 s with the imports paused and frozen and the exit's collection skipped, in every command and in
every process a launch starts.

- `cogtune.cli.app.main` pauses collection when a command starts. At its end it leaves the collector as
  it found it (a command run in-process, as the tests do, unfreezes what it froze, and freezes nothing
  where its caller has frozen objects already).
- A heavy command calls `load_libraries()` once its settings are read (the estimator calls it itself, on
  its first estimate not read from the cache, so that a cached `bench memory` grid imports none of it):
  the libraries are imported with collection off, what exists then is frozen (`gc.freeze`: later
  collections skip it), and collection resumes before any weight or data is touched, so that the
  work's own garbage is collected as in any program.
- Any progress bar (`cogtune.report`) resumes collection too: long work never runs with it off.
- At the interpreter's exit (`atexit`), everything left is frozen, so that the exit's full collection
  skips it. What a command writes is written and closed by then (cogtune writes atomically); objects in
  reference cycles are then freed with the process instead of one by one. Finalizers that matter at exit
  do not wait for the collector (`weakref.finalize`, logging's flush and the libraries' own `atexit`
  hooks run regardless).
"""

from __future__ import annotations

import atexit
import gc
import importlib
import sys

# What a command that builds CogVideoX models imports first (the diffusers modules pull in peft, transformers
# and bitsandbytes where installed; the pipelines T5's modules).
LIBRARIES = ("torch", "accelerate", "peft", "diffusers.models.transformers.cogvideox_transformer_3d",
             "diffusers.models.autoencoders.autoencoder_kl_cogvideox", "diffusers.pipelines.cogvideo",
             "diffusers.training_utils")

_command = False  # inside `cogtune.cli.app.main` (between `pause_collection` and `finish`)
_paused = False
_frozen = False


def pause_collection() -> None:
    """A command starts: stop automatic collection, if it is on, until `resume_collection` or `finish`."""
    global _command, _paused
    _command = True
    if gc.isenabled():
        gc.disable()
        _paused = True
    atexit.unregister(gc.freeze)  # registered once, however many commands run in the process
    atexit.register(gc.freeze)


def load_libraries(modules: tuple[str, ...] = LIBRARIES) -> None:
    """Import `modules`. Inside a command, the first call imports them with collection off, freezes what
    exists then (the libraries' objects) and turns collection on; outside one it imports as Python does."""
    global _frozen, _paused
    if not _command:
        for name in modules:
            importlib.import_module(name)
        return
    if all(name in sys.modules for name in modules):  # imported already (a second command in this process)
        resume_collection()
        return
    restore = gc.isenabled() or _paused
    gc.disable()
    for name in modules:
        importlib.import_module(name)
    if not _frozen and gc.get_freeze_count() == 0:  # where the caller froze objects already, they stay its own
        gc.freeze()
        _frozen = True
    _paused = False
    if restore:
        gc.enable()


def resume_collection() -> None:
    """Turn automatic collection back on if `pause_collection` turned it off (otherwise nothing)."""
    global _paused
    if _paused:
        _paused = False
        gc.enable()


def finish() -> None:
    """The command's end: collection as before it started, and nothing left frozen."""
    global _command, _frozen
    resume_collection()
    _command = False
    if _frozen:
        gc.unfreeze()
        _frozen = False
