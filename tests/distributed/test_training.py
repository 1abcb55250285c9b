"""DDP and FSDP2 through `accelerate launch` on 2 CPU processes (gloo) equal one process with the same global batch.

Each launch uses the file `cogtune config accelerate` writes, and accumulates gradients over 2
micro-steps (so the skipped synchronisation of the first one is tested too).

Tolerances: the processes sum gradients in another order than one process does, so float32
results differ by rounding, which Adam's normalisation amplifies for weights whose gradients are
near zero. Measured on 2 CPU cores (4 steps, lr 1e-3), largest weight difference: LoRA 5e-8
(i2v LoRA 1.5e-8), full fine-tuning 1.4e-5 (Adam moves a weight by up to 4e-3 over these steps),
DDP and FSDP alike.
The tests allow LoRA 1e-6 and full 1e-4 absolute, losses 1e-5 relative. Resuming under FSDP is
exact.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.conftest import VALIDATION_PROMPTS, accelerate_launch, finish, write_accelerate_config
from tests.distributed.forked import forked_launch

TOLERANCE = {"lora": 1e-6, "i2v": 1e-6, "full": 1e-4}
ARGS = ("--model", "tiny", "--steps", "4", "--rank", "4", "--lr", "1e-3", "--lr-schedule", "cosine",
        "--warmup-steps", "1", "--gradient-accumulation", "2", "--checkpoint-every", "2", "--keep-checkpoints", "0",
        "--validation-steps", "2")


@dataclasses.dataclass
class Run:
    output_dir: Path
    log: str

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        lora = self.output_dir / "pytorch_lora_weights.safetensors"
        if lora.is_file():
            return load_file(lora)
        return load_file(self.output_dir / "transformer" / "diffusion_pytorch_model.safetensors")

    @property
    def losses(self) -> list[float]:
        return json.loads((self.output_dir / "training_summary.json").read_text())["losses"]


# The runs `accelerate launch` starts (its CLI and torchrun, as a user runs them); the others' processes are
# forked with the environment accelerate gives them (tests/distributed/forked.py): the same runs, a third of
# the CPU time.
LAUNCHED = {("ddp", "lora", False), ("fsdp", "lora", False)}


@pytest.fixture(scope="session")
def training_runs(shared_runs, three_prompt_cache, i2v_cache):
    """Runs by (strategy, method, resumed), each made once per test run: 'one' is one process with batch 2.

    Methods: 'lora' and 'full' (t2v on `tiny`), 'i2v' (a LoRA on `tiny-i2v`). FSDP full fine-tuning
    lets FSDP checkpoint the block activations (`fsdp_activation_checkpointing: true`); the other
    runs use cogtune's own checkpointing. test_reshard.py resumes some of them.
    """

    def get(strategy: str, method: str, resumed: bool = False) -> Run:
        def train(output: Path) -> str:
            args = ["train", "t2v", *ARGS, "--data", three_prompt_cache, "--output-dir", output]
            if method == "full":
                args.append("--full")
            if method == "i2v":
                args = ["train", "i2v", *ARGS, "--model", "tiny-i2v", "--data", i2v_cache, "--output-dir", output]
            if resumed:
                args += ["--resume", get(strategy, method).output_dir / "checkpoints" / "step-000002"]
            if strategy == "one":
                return _in_process(*args, "--batch-size", "2")
            config = write_accelerate_config(output.parent, strategy, gpus=2)
            if (strategy, method) == ("fsdp", "full"):
                config.write_text(config.read_text().replace("fsdp_activation_checkpointing: false",
                                                             "fsdp_activation_checkpointing: true"))
            if (strategy, method, resumed) in LAUNCHED:
                return finish(accelerate_launch(config, *args, "--batch-size", "1",
                                                record_latents=output.parent / "latents"))
            return forked_launch(config, *args, "--batch-size", "1", log=output.parent / "launch-forked.log",
                                 record_latents=output.parent / "latents").finish()

        return Run(*shared_runs(f"{strategy}-{method}{'-resumed' if resumed else ''}", train))

    return get


@pytest.fixture
def runs(training_runs):
    return training_runs


def _in_process(*args) -> str:
    """`cogtune ARGS` in this process (one process: no launcher), through the real entry point."""
    from cogtune.cli.app import main

    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        assert exc.code in (0, None), f"cogtune {' '.join(map(str, args))} failed"
    return ""


def _max_difference(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> float:
    assert left.keys() == right.keys()
    return max(float((left[k].float() - right[k].float()).abs().max()) for k in left)


def assert_same_training(left: Run, right: Run, method: str, label: str) -> None:
    """Two runs trained the same: weights within the method's float tolerance, losses within 1e-5."""
    difference = _max_difference(left.weights, right.weights)
    print(f"{label}: largest weight difference {difference:.2e}")
    assert difference <= TOLERANCE[method]
    assert left.losses == pytest.approx(right.losses, rel=1e-5)


def assert_resumed_exactly(straight: Run, resumed: Run) -> None:
    """A run resumed at step 2 ended bit for bit where the run straight through did, losses included."""
    assert "resumed from" in resumed.log and "at step 2" in resumed.log
    left, right = straight.weights, resumed.weights
    assert left.keys() == right.keys()
    assert all(torch.equal(left[k], right[k]) for k in left)
    assert resumed.losses == straight.losses


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "method"), [("ddp", "lora"), ("ddp", "full"), ("fsdp", "lora"), ("fsdp", "full"),
                                                  ("fsdp", "i2v")])
def test_two_processes_equal_one_with_the_same_global_batch(runs, strategy, method):
    two, one = runs(strategy, method), runs("one", method)
    assert "1 per process x 2 processes x 2 accumulation = 4 per step" in two.log
    assert {"ddp": "DDP", "fsdp": "FSDP2, full shard"}[strategy] in two.log
    if (strategy, method) == ("fsdp", "full"):
        assert "FSDP activation checkpointing" in two.log
    assert_same_training(two, one, method, f"{strategy} {method}")


@pytest.mark.slow
def test_fsdp_saves_the_same_files_as_one_process(runs):
    """Gathered on the main process: a diffusers LoRA with the same metadata, a loadable transformer/ folder."""
    from diffusers import CogVideoXTransformer3DModel
    from safetensors import safe_open

    lora_two, lora_one = runs("fsdp", "lora").output_dir, runs("one", "lora").output_dir
    with safe_open(str(lora_two / "pytorch_lora_weights.safetensors"), "pt") as two, \
            safe_open(str(lora_one / "pytorch_lora_weights.safetensors"), "pt") as one:
        assert two.metadata() == one.metadata()
    full_two, full_one = runs("fsdp", "full").output_dir, runs("one", "full").output_dir
    assert sorted(p.name for p in (full_two / "transformer").iterdir()) == \
        sorted(p.name for p in (full_one / "transformer").iterdir())
    CogVideoXTransformer3DModel.from_pretrained(full_two / "transformer")
    checkpoint = lora_two / "checkpoints" / "step-000002"
    assert (checkpoint / "pytorch_lora_weights.safetensors").is_file()  # diffusers format beside the shards
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir() and (checkpoint / "optimizer_0").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_fsdp_resume_continues_exactly(runs, method):
    """2 steps, then a resume from that checkpoint for 2 more, equal 4 steps straight (accelerate's sharded state)."""
    straight, resumed = runs("fsdp", method), runs("fsdp", method, resumed=True)
    assert_resumed_exactly(straight, resumed)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_three_validation_prompts_on_two_processes(runs, strategy, sampled, tmp_path):
    """3 prompts, 2 processes: no hang (FSDP pads the second process's turn), and each video is the one its
    process should render: prompt i on process i mod 2, equal to `cogtune sample` with the run's LoRA (and,
    for the base half, without it) at the validation's seed + i. Compared on the latents the VAE decodes,
    which the launched processes record (tests/distributed/launch_hooks/), to the float32 bound of
    `tests.rounding` (validation's prompt embeddings come from the cache, sample's from T5 now)."""
    import tomllib

    from safetensors.torch import load_file

    from cogtune.models.registry import TINY_PRESETS
    from cogtune.sample import SampleConfig, run_sample
    from tests.rounding import denoising_tolerance

    two = runs(strategy, "lora")
    folder = two.output_dir / "validation" / "final"
    names = sorted(p.name for p in folder.glob("*.mp4"))
    assert names == [f"{i:02d}.mp4" for i in range(len(VALIDATION_PROMPTS))]
    assert sorted(p.name for p in (folder / "base-vs-lora").glob("*.mp4")) == names

    validation = tomllib.loads((two.output_dir / "config.toml").read_text())["validation"]
    recorded: dict[tuple[int, str], list] = {}
    for path in sorted((two.output_dir.parent / "latents").glob("*.safetensors")):
        seed, kind, rank = path.name.split("-")[:3]
        recorded.setdefault((int(seed.removeprefix("seed")), kind), []).append((int(rank.removeprefix("rank")),
                                                                               load_file(path)["latents"]))
    seeds = [validation["seed"] + index for index in range(len(VALIDATION_PROMPTS))]
    assert sorted(recorded) == sorted((seed, kind) for seed in seeds for kind in ("lora", "base"))

    def sample(**kwargs):
        sampled.latents.clear()
        run_sample(SampleConfig(model="tiny", prompts=VALIDATION_PROMPTS, output=str(tmp_path / str(len(kwargs))),
                                steps=validation["steps"], guidance=validation["guidance"], seed=validation["seed"],
                                frames=9, height=64, width=64, **kwargs))
        return list(sampled.latents)

    expected = {"lora": sample(lora=str(two.output_dir)), "base": sample()}
    spec = TINY_PRESETS["tiny"]
    scale = max(latents.abs().max().item() for latents in expected["lora"])
    tolerance = denoising_tolerance(spec, validation["steps"], 9, 64, 64, text_tokens=spec.max_text_tokens) * scale
    for (seed, kind), renders in recorded.items():
        index = seed - validation["seed"]
        for rank, latents in renders:  # FSDP's padding turn renders a process's last prompt once more
            assert rank == index % 2, (seed, kind, rank)
            torch.testing.assert_close(latents, expected[kind][index], rtol=0, atol=tolerance)
    # Each recorded video matches one expected video only: the LoRA's and the base's, and the prompts' videos,
    # are more than twice the tolerance apart (the 4-step LoRA moves the latents by ~6 tolerances here).
    for index in range(len(VALIDATION_PROMPTS)):
        assert (expected["lora"][index] - expected["base"][index]).abs().max() > 2 * tolerance
        assert (expected["lora"][index] - expected["lora"][index - 1]).abs().max() > 2 * tolerance


@pytest.mark.slow
def test_hybrid_shard_over_two_machines_equals_one_process(tmp_path, three_prompt_cache):
    """The README's multi-machine command on one host: 2 launches (machine ranks 0 and 1) x 2 processes,
    FSDP2 hybrid (2 replicas x 2 shards), equal one process with batch 4."""
    config = write_accelerate_config(tmp_path, "fsdp-hybrid", gpus=2, machines=2, main_process_ip="127.0.0.1")
    args = ["train", "t2v", *ARGS, "--data", three_prompt_cache]
    launches = [forked_launch(config, *args, "--batch-size", "1", "--output-dir", tmp_path / "hybrid",
                              machine_rank=rank, log=tmp_path / f"machine-{rank}.log") for rank in (0, 1)]
    log = [launch.finish() for launch in launches][0]  # both must finish; machine 0's main process reports
    assert "FSDP2, hybrid: 2 replicas x 2 shards" in log
    assert "1 per process x 4 processes x 2 accumulation = 8 per step" in log
    _in_process(*args, "--batch-size", "4", "--output-dir", tmp_path / "one")
    hybrid, single = Run(tmp_path / "hybrid", log), Run(tmp_path / "one", "")
    assert _max_difference(hybrid.weights, single.weights) <= TOLERANCE["lora"]
    assert hybrid.losses == pytest.approx(single.losses, rel=1e-5)
    assert len(list((tmp_path / "hybrid" / "validation" / "final").glob("*.mp4"))) == len(VALIDATION_PROMPTS)


@pytest.mark.slow
def test_encode_under_the_same_launch_makes_the_same_cache(tmp_path, synthetic_data, tiny_cache):
    """`encode` under the training's FSDP config: each process encodes its share, the cache equals one process's.
    (Under torchrun: tests/encode/test_interrupt.py's torchrun test, whose 2 processes' items the resumed cache
    keeps, equal to one process's.)"""
    from tests.encode.compare import assert_same_cache

    config = write_accelerate_config(tmp_path, "fsdp", gpus=2)
    log = forked_launch(config, "encode", "--model", "tiny", "--data-root", synthetic_data, "--buckets", "9x64x64",
                        "--num-workers", "0", "--validation-prompt", "A red circle moves left.", "--output-dir",
                        tmp_path / "two", log=tmp_path / "launch.log").finish()
    assert "2 processes" in log
    assert_same_cache(tiny_cache, tmp_path / "two")
