"""Training feeds the transformer exactly what diffusers' pipelines feed it when sampling.

The oracle is the pipeline itself: for one clip of every tiny family and task, the pipeline runs
one denoising step on the tiny model (a deterministic VAE posterior, the transformer call
recorded), and the inputs cogtune's training step builds from its cache for the same clip, noise
and timestep must be the pipeline's, tensor by tensor and frame by frame: `hidden_states` (noisy
latents and, for I2V, the condition channels), `encoder_hidden_states`, `timestep`, `ofs`,
`image_rotary_emb`. At the pipeline's first timestep (999, where CogVideoX's zero-SNR schedule
keeps no signal) the noisy latents are the noise itself; the clean latents are checked at an
intermediate timestep against the pipeline's own video processor, VAE and scheduler, and for the
1.0 text-to-video families against the video-to-video pipeline, which noises a clip itself.
"""

from __future__ import annotations

import dataclasses

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image

from cogtune.models.loading import load_scheduler, resolve_model
from cogtune.models.registry import TINY_PRESETS
from cogtune.models.tiny import ensure_tiny_model
from cogtune.train.data import load_batch
from cogtune.train.step import StepSettings, draw_step_inputs, make_transformer_inputs, sample_generators

FAMILIES = ["tiny", "tiny-rotary", "tiny-i2v", "tiny-1.5", "tiny-1.5-i2v"]
FRAMES, HEIGHT, WIDTH = 9, 64, 64


@pytest.fixture(scope="module")
def clip_dataset(tmp_path_factory):
    """One clip of exactly the bucket's frame count, so that every frame is used, in order."""
    from cogtune.data.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(tmp_path_factory.mktemp("oracle-data"), count=1, frames=FRAMES,
                                  height=HEIGHT, width=WIDTH)
    # Decoded by imageio's ffmpeg, not by cogtune's reader: the pipeline gets what a user would give it.
    reader = imageio_ffmpeg.read_frames(str(root / "videos" / "clip_000.mp4"))
    meta = next(reader)
    width, height = meta["size"]
    frames = np.stack([np.frombuffer(raw, np.uint8).reshape(height, width, 3) for raw in reader])
    assert len(frames) == FRAMES
    caption = (root / "prompts.txt").read_text().splitlines()[0]
    return root, frames, caption


@pytest.fixture(scope="module")
def oracle_cache(tmp_path_factory, clip_dataset, cogtune_home):
    from cogtune.data.dataset import DatasetConfig
    from cogtune.encode import EncodeConfig, encode_dataset

    made = {}

    def build(name: str):
        if name not in made:
            root = tmp_path_factory.mktemp("oracle-cache") / name
            encode_dataset(EncodeConfig(model=name, output_dir=str(root), data=DatasetConfig(root=str(clip_dataset[0])),
                                        buckets=(f"{FRAMES}x{HEIGHT}x{WIDTH}",), image_noise_samples=0,
                                        num_workers=0))
            made[name] = root
        return made[name]

    return build


@pytest.fixture
def deterministic_posterior(monkeypatch):
    """Every VAE posterior draw (the pipeline's and cogtune's) returns the posterior mean."""
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)


def _pipeline(name: str, cls=None):
    from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline

    spec = TINY_PRESETS[name]
    cls = cls or (CogVideoXImageToVideoPipeline if spec.is_i2v else CogVideoXPipeline)
    return cls.from_pretrained(ensure_tiny_model(name))


def _record_transformer_calls(pipe) -> list[dict]:
    calls: list[dict] = []

    def hook(module, args, kwargs):
        calls.append({k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()})

    pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def _cogtune_inputs(name: str, cache_root, noise, timesteps):
    """What cogtune's training step builds from its cache, with the given noise and timesteps."""
    from cogtune.encode.cache import VideoLatentCache

    model = resolve_model(name)
    scheduler = load_scheduler(model)
    cache = VideoLatentCache(cache_root)
    batch = load_batch(cache, [0])
    drawn = draw_step_inputs(model.spec, scheduler, batch, cache.empty_prompt_embeds(), StepSettings(),
                             sample_generators(0, 0, 0, 0, 1))
    drawn = dataclasses.replace(drawn, noise=noise, timesteps=timesteps)
    return make_transformer_inputs(model.spec, scheduler, drawn, torch.device("cpu"), torch.float32)


def _assert_same_call(ours: dict, theirs: dict, spec, latent_atol: float = 0.0) -> None:
    channels = spec.latent_channels
    ours_hidden, theirs_hidden = ours["hidden_states"], theirs["hidden_states"]
    assert ours_hidden.shape == theirs_hidden.shape
    for frame in range(theirs_hidden.shape[1]):
        torch.testing.assert_close(ours_hidden[:, frame, :channels], theirs_hidden[:, frame, :channels],
                                   atol=latent_atol, rtol=latent_atol / 2, msg=f"noisy latents differ in frame {frame}")
        if spec.is_i2v:
            torch.testing.assert_close(ours_hidden[:, frame, channels:], theirs_hidden[:, frame, channels:],
                                       atol=1e-5, rtol=1e-5, msg=f"condition channels differ in frame {frame}")
    torch.testing.assert_close(ours["encoder_hidden_states"], theirs["encoder_hidden_states"], atol=1e-5, rtol=1e-5)
    assert ours["timestep"].dtype == theirs["timestep"].dtype
    assert ours["timestep"].tolist() == theirs["timestep"].tolist()
    if theirs.get("ofs") is None:
        assert ours["ofs"] is None
    else:
        torch.testing.assert_close(ours["ofs"], theirs["ofs"])
    if theirs["image_rotary_emb"] is None:
        assert ours["image_rotary_emb"] is None
    else:
        for a, b in zip(ours["image_rotary_emb"], theirs["image_rotary_emb"], strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", FAMILIES)
def test_training_inputs_are_the_pipelines(name, clip_dataset, oracle_cache, deterministic_posterior):
    spec = TINY_PRESETS[name]
    _, frames, caption = clip_dataset
    pipe = _pipeline(name)
    calls = _record_transformer_calls(pipe)
    kwargs = {"image": Image.fromarray(frames[0])} if spec.is_i2v else {}
    pipe(prompt=caption, num_frames=FRAMES, height=HEIGHT, width=WIDTH, num_inference_steps=1, guidance_scale=1.0,
         generator=torch.Generator().manual_seed(0), output_type="latent",
         max_sequence_length=spec.max_text_tokens, **kwargs)
    (theirs,) = calls
    noise = theirs["hidden_states"][:, :, : spec.latent_channels]
    built = _cogtune_inputs(name, oracle_cache(name), noise, torch.tensor([999]))
    _assert_same_call(built.kwargs, theirs, spec)
    if spec.is_i2v:  # the condition image sits in frame 0 only, as the pipeline puts it (1.5 included)
        condition = built.kwargs["hidden_states"][0, :, spec.latent_channels:]
        assert condition[0].abs().sum() > 0 and condition[1:].abs().sum() == 0


@pytest.mark.parametrize("name", FAMILIES)
def test_clean_latents_are_the_pipeline_vae_encoding(name, clip_dataset, oracle_cache, deterministic_posterior):
    """At an intermediate timestep the noisy latents are the pipeline scheduler's noising of the clip as the
    pipeline's own video processor and VAE encode it (1.5: its padding frame, dropped after sampling by the
    pipeline, repeats the first frame, as in THUDM's finetune)."""
    spec = TINY_PRESETS[name]
    _, frames, _ = clip_dataset
    pipe = _pipeline(name)
    video = pipe.video_processor.preprocess_video([Image.fromarray(f) for f in frames], height=HEIGHT, width=WIDTH)
    with torch.no_grad():
        clean = pipe.vae.encode(video).latent_dist.sample() * pipe.vae.config.scaling_factor
    clean = clean.permute(0, 2, 1, 3, 4)  # (B, F, C, H, W), as the pipelines lay latents out
    padded_frames = spec.padded_latent_count(clean.shape[1])
    clean = torch.cat([clean[:, :1]] * (padded_frames - clean.shape[1]) + [clean], dim=1)
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))
    timesteps = torch.tensor([499])
    expected = pipe.scheduler.add_noise(clean, noise, timesteps)
    built = _cogtune_inputs(name, oracle_cache(name), noise, timesteps)
    torch.testing.assert_close(built.kwargs["hidden_states"][:, :, : spec.latent_channels], expected,
                               atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["tiny", "tiny-rotary"])
def test_noisy_latents_are_the_video_to_video_pipelines(name, clip_dataset, oracle_cache, deterministic_posterior):
    """The video-to-video pipeline encodes and noises a clip itself: its first transformer input is training's."""
    from diffusers import CogVideoXVideoToVideoPipeline

    spec = TINY_PRESETS[name]
    _, frames, caption = clip_dataset
    pipe = _pipeline(name, CogVideoXVideoToVideoPipeline)
    calls = _record_transformer_calls(pipe)
    noised = []
    add_noise = pipe.scheduler.add_noise

    def recording_add_noise(original, noise, timesteps):
        noised.append(noise.clone())
        return add_noise(original, noise, timesteps)

    pipe.scheduler.add_noise = recording_add_noise
    pipe(video=[Image.fromarray(f) for f in frames], prompt=caption, height=HEIGHT, width=WIDTH,
         num_inference_steps=10, strength=0.5, guidance_scale=1.0, generator=torch.Generator().manual_seed(0),
         output_type="latent", max_sequence_length=spec.max_text_tokens)
    theirs = calls[0]
    built = _cogtune_inputs(name, oracle_cache(name), noised[0], theirs["timestep"])
    assert int(theirs["timestep"][0]) not in (0, 999)
    # Tolerance: cogtune decodes with decord, the test with imageio's ffmpeg, and the VAE runs once per side.
    _assert_same_call(built.kwargs, theirs, spec, latent_atol=2e-4)


def test_held_out_loss_is_the_v_prediction_error_on_the_pipelines_inputs(clip_dataset, oracle_cache,
                                                                         deterministic_posterior):
    """The held-out loss of an item is the mean, over the fixed timesteps, of the squared error between the
    transformer's v-prediction and the true velocity `sqrt(a) e - sqrt(1 - a) x0` (loss.py derives that the
    training loss equals it), with x0 the pipeline VAE's encoding of the clip, e the item's fixed noise, the
    noisy latents the pipeline scheduler's, and the prompt the pipeline's own T5 encoding."""
    from accelerate import Accelerator

    from cogtune.encode.cache import VideoLatentCache
    from cogtune.train.config import EvaluationConfig, TrainConfig
    from cogtune.train.evaluation import Evaluator, fixed_timesteps, heldout_inputs
    from cogtune.train.heldout import HeldOut

    spec = TINY_PRESETS["tiny"]
    _, frames, caption = clip_dataset
    pipe = _pipeline("tiny")
    held = HeldOut(VideoLatentCache(oracle_cache("tiny")), (0,), frozenset(), held_out=True)
    config = TrainConfig(model="tiny", data="cache", output_dir="run", evaluation=EvaluationConfig(timesteps=3))
    scheduler = load_scheduler(resolve_model("tiny"))
    evaluator = Evaluator(config, spec, held, scheduler, Accelerator(cpu=True), torch.float32)
    ours = evaluator.evaluate(pipe.transformer, step=1, train_loss=None)
    assert evaluator.evaluate(pipe.transformer, step=2, train_loss=None).loss == ours.loss  # fixed: comparable
    assert ours.effect is None  # no LoRA to switch off

    noise = heldout_inputs(spec, scheduler, held, 0).noise  # the item's fixed noise
    video = pipe.video_processor.preprocess_video([Image.fromarray(f) for f in frames], height=HEIGHT, width=WIDTH)
    with torch.no_grad():
        clean = (pipe.vae.encode(video).latent_dist.sample() * pipe.vae.config.scaling_factor).permute(0, 2, 1, 3, 4)
        prompt_embeds, _ = pipe.encode_prompt(caption, do_classifier_free_guidance=False,
                                              max_sequence_length=spec.max_text_tokens)
        losses = []
        timesteps = fixed_timesteps(pipe.scheduler.config.num_train_timesteps, 3)
        assert timesteps == [166, 500, 833]  # the middles of three equal ranges of 0..999
        for t in timesteps:
            t = torch.tensor([t])
            noisy = pipe.scheduler.add_noise(clean, noise, t)
            v_pred = pipe.transformer(hidden_states=noisy, encoder_hidden_states=prompt_embeds, timestep=t,
                                      return_dict=False)[0]
            a = pipe.scheduler.alphas_cumprod[t]
            velocity = a.sqrt() * noise - (1 - a).sqrt() * clean
            losses.append(float(((v_pred - velocity) ** 2).mean()))
    # Tolerance: the clean latents agree within 2e-4 (cogtune decodes the clip with decord, this test with
    # imageio's ffmpeg; see the test above), which moves a mean squared error of ~0.5 (its root ~0.7) by about
    # 2 x 0.7 x 2e-4 x (1 + the transformer's gain), under 1e-3 (measured: 5e-9). A wrong timestep, noise or
    # weighting moves it by tenths: the three timesteps' losses here are 0.83, 0.44 and 0.37.
    assert ours.loss == pytest.approx(sum(losses) / len(losses), abs=1e-3)
