"""cogtune: fine-tune CogVideoX text-to-video and image-to-video models.

The engine is importable without the command line: `cogtune.models` (registry and loading),
`cogtune.data` (datasets and clips), `cogtune.encode` (latent cache), `cogtune.train`
(training loop), `cogtune.sample` (generation) and `cogtune.demo` (the offline end-to-end run).
"""

__version__ = "0.1.0"
