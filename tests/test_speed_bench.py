"""The speed benchmark reports what it measures; its inputs are checked before any work.

Not a benchmark: the figures it prints here mean nothing. What is checked is how they are
derived: throughput and speed-ups from the timed steps (warm-up excluded), the fast path's MSE
curve against the dense reference's, a selection check that does fail on a wrong selection,
and outputs that hold the results, for the plain BatchTopK runs and the Matryoshka ones.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from conftest import needs_offline_assets
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from transformer_lens import HookedTransformer

from sae_lens_batchtopk.saes.calibrated_batchtopk_sae import CalibratedBatchTopKTrainingSAE
from sae_lens_batchtopk.tools.benchmarks import speed, speed_report
from sae_lens_batchtopk.tools.benchmarks.activation_cache import ActivationCache
from sae_lens_batchtopk.tools.benchmarks.harness import MemoryProbe, activation_statistics
from sae_lens_batchtopk.tools.benchmarks.speed import BATCHTOPK, MATRYOSHKA, Family, SpeedConfig
from sae_lens_batchtopk.tools.cli import main as cli_main

# Seconds every (fake) timed training step of a run takes; the warm-up step takes WARMUP_SECONDS.
STEP_SECONDS = {"baseline": 0.1, "dense": 0.2, "fast": 0.04}
# Seconds the encoder matmul timed after each of those steps takes.
MATMUL_SECONDS = {"baseline": 0.05, "dense": 0.08, "fast": 0.025}
WARMUP_SECONDS = 10.0
# The family's settings in a tiny config: the Matryoshka runs nest at these widths.
FAMILY_SETTINGS: dict[str, dict[str, object]] = {
    "batchtopk": {},
    "matryoshka": {"matryoshka_widths": (8, 16, 32)},
}


@pytest.fixture(scope="module")
def smollm2() -> HookedTransformer:
    from sae_lens_batchtopk.tools.offline import load_smollm2

    return load_smollm2()


def random_batches(config: SpeedConfig, d_in: int = 16) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [
        torch.randn(config.batch_size, d_in, generator=generator) + 1.0
        for _ in range(config.total_steps)
    ]


def role_names(family: Family) -> dict[str, str]:
    return {"baseline": family.baseline, "dense": family.dense, "fast": family.fast}


@pytest.mark.parametrize("name", list(FAMILY_SETTINGS))
def test_throughput_and_speed_ups_come_from_the_timed_steps(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Each run's steps and encoder matmuls take known times: tokens/s, median, speed-up and
    the step's multiple of the encoder matmul follow from them."""
    config = SpeedConfig(
        d_sae=64, k=4.0, batch_size=32, steps=3, warmup_steps=1, **FAMILY_SETTINGS[name]
    )
    family = config.family
    assert family == {"batchtopk": BATCHTOPK, "matryoshka": MATRYOSHKA}[name]
    assert config.runs == tuple(family.runs)  # every run of the family by default
    names = role_names(family)
    seconds: Iterator[float] = iter(())

    def fake_timed(device: str, call: Callable[[], object]) -> tuple[object, float]:
        return call(), next(seconds)

    monkeypatch.setattr(speed, "_timed", fake_timed)
    monkeypatch.setattr(speed, "probe_training", lambda *args, **kwargs: MemoryProbe(0.0, True))
    batches = random_batches(config)
    train_stats = (1.0, batches[0].mean(0))
    runs = {}
    for role, step in STEP_SECONDS.items():
        # The encoder matmul is timed after each timed step, not after the warm-up step.
        seconds = iter([WARMUP_SECONDS] + [step, MATMUL_SECONDS[role]] * config.steps)
        runs[names[role]] = speed.time_training_steps(names[role], config, batches, train_stats)
        assert next(seconds, None) is None  # every step and matmul, and only those, was timed

    baseline, dense, fast = names.values()
    for role, step in STEP_SECONDS.items():
        # The warm-up step counts in neither figure.
        assert runs[names[role]]["tokens_per_s"] == pytest.approx(config.batch_size / step)
        assert runs[names[role]]["median_step_s"] == step
        assert runs[names[role]]["encoder_matmul_s"] == MATMUL_SECONDS[role]
        assert runs[names[role]]["x_encoder_matmul"] == pytest.approx(step / MATMUL_SECONDS[role])
    speedups = speed.speed_ups(runs, baseline)
    assert speedups == pytest.approx({baseline: 1.0, dense: 0.5, fast: 2.5})
    assert speed.speed_ups({fast: runs[fast]}, baseline) == {}  # no baseline, no speed-up

    # Same weights, same batches: the sparse path trains exactly like the dense reference...
    assert runs[fast]["fast_path"] and not runs[dense]["fast_path"]
    assert runs[fast]["mse_loss"] == pytest.approx(runs[dense]["mse_loss"], rel=1e-5)
    match = speed.curve_match(runs, family)
    assert match is not None and match["max_relative_difference"] < 1e-5
    # ... while training moves the loss far more than that, so a difference would show.
    assert match["step_to_step_change"] > 1e-3


def test_selection_check_fails_on_a_different_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    config = SpeedConfig(d_sae=64, k=4.0)
    sae_in = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    assert speed.time_selection(config, sae_in, repeats=1)["same_selection"] is True

    exact = speed.batch_topk_indices

    def fast_path_drops_an_entry(
        hidden_pre: torch.Tensor, k: float, *, fast: bool = True
    ) -> torch.Tensor:
        chosen = exact(hidden_pre, k, fast=fast)
        return chosen[1:] if fast else chosen

    monkeypatch.setattr(speed, "batch_topk_indices", fast_path_drops_an_entry)
    assert speed.time_selection(config, sae_in, repeats=1)["same_selection"] is False


@needs_offline_assets
def test_quick_speed_run(tmp_path: Path, smollm2: HookedTransformer) -> None:
    config = SpeedConfig(
        d_sae=256,
        k=4.0,
        batch_size=128,
        steps=3,
        warmup_steps=1,
        cache_dir=tmp_path / "cache",
        output=tmp_path / "out",
    )
    results = speed.run_speed_benchmark(config, model=smollm2, show_progress=False)

    runs = results["runs"]
    assert list(runs) == list(BATCHTOPK.runs)
    baseline = runs[BATCHTOPK.baseline]["tokens_per_s"]
    for run in runs.values():
        assert len(run["mse_loss"]) == config.total_steps
        assert run["speedup"] == pytest.approx(run["tokens_per_s"] / baseline)
        peak_fraction = run["required_flops_per_s"] / results["peak_matmul_flops"]
        assert run["fraction_of_peak"] == pytest.approx(peak_fraction)
        matmul_flops = 2 * config.batch_size * results["settings"]["d_in"] * config.d_sae
        assert run["encoder_matmul_fraction_of_peak"] == pytest.approx(
            matmul_flops / run["encoder_matmul_s"] / results["peak_matmul_flops"]
        )
        assert run["x_encoder_matmul"] == pytest.approx(
            run["median_step_s"] / run["encoder_matmul_s"]
        )
    fast, dense = runs[BATCHTOPK.fast]["mse_loss"], runs[BATCHTOPK.dense]["mse_loss"]
    assert fast == pytest.approx(dense, rel=1e-4)
    assert results["curve_match"] == speed.curve_match(runs, BATCHTOPK)
    assert results["selection"]["same_selection"] is True

    for name in speed_report.FILES:
        assert (config.output / name).stat().st_size > 0
    written = json.loads((config.output / speed_report.FILES.json).read_text())
    assert (written["runs"], written["curve_match"]) == (runs, results["curve_match"])
    section = (config.output / speed_report.FILES.section).read_text()
    assert "| calibrated_batchtopk | sparse |" in section and "| batchtopk | dense |" in section


def test_quick_sets_tiny_defaults_that_explicit_options_override() -> None:
    config = speed.parse_command(["--quick", "--steps", "3", "--hook", "blocks.1.hook_resid_post"])
    assert (config.d_sae, config.batch_size, config.steps) == (512, 256, 3)
    assert config.hook_name == "blocks.1.hook_resid_post"  # --hook, as before: hook_name's alias


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["--runs", "nope"], "--runs"),
        (["--steps", "0"], "--steps"),
        (["--k", "0"], "--k"),
        (["--warmup-steps", "-1"], "--warmup-steps"),
        (["--matryoshka-widths", "4096", "512"], "--matryoshka-widths"),
        (["--matryoshka-widths", "512", "32768"], "--matryoshka-widths"),
        (["--matryoshka-widths", "0", "512"], "--matryoshka-widths"),
        (["--use-matryoshka-aux-loss"], "--use-matryoshka-aux-loss"),
        (["--matryoshka-widths", "512", "--runs", "batchtopk"], "--runs"),
        (["--runs", "matryoshka_batchtopk"], "--runs"),
        (["--synthetic-d-in", "0"], "--synthetic-d-in"),
        (["--memory-probe-steps", "0"], "--memory-probe-steps"),
    ],
)
def test_bad_options_fail_before_work(
    argv: list[str], option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["bench-speed", *argv]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"sae-batchtopk bench-speed: error: {option}")


def random_cache(config: SpeedConfig, d_in: int = 16) -> ActivationCache:
    """Random activations with a residual-like mean in an in-memory cache: no model needed."""
    generator = torch.Generator().manual_seed(0)
    train = torch.randn(config.total_steps * config.batch_size, d_in, generator=generator) + 2.0
    spec = dataclasses.replace(config.cache_spec(), model_name="random")
    splits = {"train": train.half(), "calibration": train[:1].half(), "heldout": train[:1].half()}
    return ActivationCache(spec, Path("in-memory"), splits, torch.zeros(1, 2, dtype=torch.long))


@pytest.mark.parametrize("per_level", [False, True], ids=["whole-sae-aux", "per-level-aux"])
def test_matryoshka_runs_time_both_libraries_from_the_same_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, per_level: bool
) -> None:
    """SAELens's matryoshka_batchtopk is the baseline; the section states the aux setting."""
    config = SpeedConfig(
        d_sae=256,
        k=1.0,  # 32 of 256 latents fire per step: most are dead after the window
        batch_size=32,
        steps=3,
        warmup_steps=1,
        dead_window_steps=1,
        matryoshka_widths=(32, 64, 128),
        use_matryoshka_aux_loss=per_level,
        output=tmp_path / "out",
    )
    cache = random_cache(config)
    monkeypatch.setattr(speed, "load_model_and_cache", lambda *args: (None, cache))
    monkeypatch.setattr(speed, "probe_training", lambda *args, **kwargs: MemoryProbe(0.0, True))
    monkeypatch.setattr(speed, "peak_matmul_flops", lambda device, dtype: 1e9)  # 2048² matmuls
    built = []

    def spy(runner_config: object, *args: object) -> object:
        built.append(runner_config)
        return new_sae_and_trainer(runner_config, *args)

    new_sae_and_trainer = speed.new_sae_and_trainer
    monkeypatch.setattr(speed, "new_sae_and_trainer", spy)
    results = speed.run_speed_benchmark(config, show_progress=False)

    assert [runner.sae.architecture() for runner in built] == [
        "matryoshka_batchtopk",
        "calibrated_matryoshka_batchtopk",
        "calibrated_matryoshka_batchtopk",
    ]
    for runner in built:  # the same nesting and aux setting for every run
        assert runner.sae.matryoshka_widths == [32, 64, 128, 256]
        assert runner.sae.use_matryoshka_aux_loss is per_level
    runs = results["runs"]
    assert results["baseline"] == MATRYOSHKA.baseline
    baseline_speed = runs[MATRYOSHKA.baseline]["tokens_per_s"]
    assert runs[MATRYOSHKA.fast]["speedup"] == pytest.approx(
        runs[MATRYOSHKA.fast]["tokens_per_s"] / baseline_speed
    )  # speed-ups are over SAELens's Matryoshka, not over SAELens's batchtopk
    assert runs[MATRYOSHKA.fast]["dead_fraction_end"] > 0  # the aux losses did run
    assert results["curve_match"]["max_relative_difference"] < 1e-5
    section = (config.output / speed_report.FILES.section).read_text()
    assert "vs SAELens's `matryoshka_batchtopk`" in section
    assert "Matryoshka widths 32/64/128/256" in section
    assert "| speed-up vs matryoshka_batchtopk |" in section
    aux = "per-level AuxK" if per_level else "AuxK on the whole SAE's residual"
    assert f"{aux}" in section and "active (dead after 1 idle steps)" in section


def test_a_dead_window_as_long_as_the_run_is_reported_as_no_aux_loss() -> None:
    settings = dataclasses.asdict(SpeedConfig(steps=3, warmup_steps=1, dead_window_steps=4))
    assert "never runs: no latent can be dead" in speed_report.aux_setting(settings)
    settings["dead_window_steps"] = 3
    assert "active (dead after 3 idle steps)" in speed_report.aux_setting(settings)


def no_model(*args: object) -> None:
    raise AssertionError("synthetic activations load no model or cache")


def test_autocast_reaches_the_trainer_and_our_run_takes_the_sparse_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under --autocast every run trains under SAELens's bfloat16 autocast; ours stays sparse."""
    config = SpeedConfig(
        synthetic_d_in=16,
        d_sae=64,
        k=4.0,
        batch_size=32,
        steps=2,
        warmup_steps=1,
        autocast=True,
        output=tmp_path / "out",
    )
    monkeypatch.setattr(speed, "load_model_and_cache", no_model)
    monkeypatch.setattr(speed, "probe_training", lambda *args, **kwargs: MemoryProbe(0.0, True))
    peak_dtypes = []

    def fake_peak(device: str, dtype: torch.dtype) -> float:
        peak_dtypes.append(dtype)
        return 1e9

    monkeypatch.setattr(speed, "peak_matmul_flops", fake_peak)
    trainers = []

    def spy(runner_config: object, *args: object) -> object:
        sae, trainer = new_sae_and_trainer(runner_config, *args)
        trainers.append(trainer)
        return sae, trainer

    new_sae_and_trainer = speed.new_sae_and_trainer
    monkeypatch.setattr(speed, "new_sae_and_trainer", spy)
    matmul_dtypes = []

    def spy_matmul(*args: object) -> Callable[[], torch.Tensor]:
        matmul = encoder_matmul(*args)

        def recorded() -> torch.Tensor:
            result = matmul()
            matmul_dtypes.append(result.dtype)
            return result

        return recorded

    encoder_matmul = speed.encoder_matmul
    monkeypatch.setattr(speed, "encoder_matmul", spy_matmul)
    results = speed.run_speed_benchmark(config, show_progress=False)

    assert [trainer.cfg.autocast for trainer in trainers] == [True] * 3
    assert all(isinstance(t.autocast_if_enabled, torch.autocast) for t in trainers)
    runs = results["runs"]
    assert runs[BATCHTOPK.fast]["fast_path"] is True  # the sparse path ran under autocast
    assert not runs[BATCHTOPK.dense]["fast_path"] and not runs[BATCHTOPK.baseline]["fast_path"]
    assert set(matmul_dtypes) == {torch.bfloat16} and len(matmul_dtypes) == 3 * config.steps
    assert peak_dtypes == [torch.bfloat16] and results["peak_matmul_dtype"] == "bfloat16"
    assert results["settings"]["d_in"] == 16 and "synthetic" in results["activations"]
    section = (config.output / speed_report.FILES.section).read_text()
    assert "autocast on" in section and "| × encoder matmul |" in section
    assert "synthetic activations: seeded standard Gaussian, d_in 16" in section


def test_a_sparse_run_that_falls_back_to_the_dense_path_reports_dense(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The path column reads what the steps did, not what the config asked for."""
    config = SpeedConfig(d_sae=64, k=4.0, batch_size=32, steps=1, warmup_steps=0)
    monkeypatch.setattr(speed, "probe_training", lambda *args, **kwargs: MemoryProbe(0.0, True))
    monkeypatch.setattr(
        speed.CalibratedBatchTopKTrainingSAE, "sparse_path_blocker", lambda *args: "refused"
    )
    batches = random_batches(config)
    with pytest.warns(UserWarning, match="training on the dense path: refused"):
        run = speed.time_training_steps(BATCHTOPK.fast, config, batches, (1.0, batches[0].mean(0)))
    assert run["fast_path"] is False


def test_memory_only_probes_each_run_on_synthetic_activations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--memory-only: one real probe per run, nothing timed; the probe reports the path."""
    config = SpeedConfig(
        synthetic_d_in=16,
        d_sae=64,
        k=4.0,
        batch_size=32,
        memory_only=True,
        memory_probe_steps=2,
        dead_window_steps=1,
        autocast=True,
        runs=(BATCHTOPK.fast,),
        output=tmp_path / "out",
    )
    monkeypatch.setattr(speed, "load_model_and_cache", no_model)

    def not_timed(*args: object) -> None:
        raise AssertionError("memory_only times nothing")

    for timer in ("time_training_steps", "peak_matmul_flops", "time_selection"):
        monkeypatch.setattr(speed, timer, not_timed)
    results = speed.run_speed_benchmark(config, show_progress=False)

    (run,) = results["runs"].values()
    assert run["fast_path"] is True and run["peak_memory_mb"] >= 0
    section = (config.output / speed_report.FILES.section).read_text()
    assert "## Peak training memory vs SAELens's `batchtopk`" in section
    assert "2 training steps per run in a fresh process" in section
    assert "| calibrated_batchtopk | sparse |" in section
    assert "AuxK active (dead after 1 idle steps)" in section
    for name in speed_report.FILES:
        assert (config.output / name).stat().st_size > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_speed_run_under_autocast(tmp_path: Path) -> None:
    """bench-speed as run on a GPU, nothing faked: CUDA memory probes in fresh processes, the
    bfloat16 peak, ours on the sparse path with the dense reference's curve."""
    config = SpeedConfig(
        synthetic_d_in=64,
        d_sae=1024,
        k=8.0,
        batch_size=512,
        steps=3,
        warmup_steps=1,
        memory_probe_steps=2,
        autocast=True,
        dead_fraction=0.25,
        device="cuda",
        output=tmp_path / "out",
    )
    results = speed.run_speed_benchmark(config, show_progress=False)

    runs = results["runs"]
    assert runs[BATCHTOPK.fast]["fast_path"] is True
    assert results["machine"]["gpu"] and results["peak_matmul_dtype"] == "bfloat16"
    for run in runs.values():
        assert run["peak_memory_mb"] > 0 and 0 < run["encoder_matmul_fraction_of_peak"] < 1
    assert results["curve_match"]["max_relative_difference"] < 0.05
    assert results["selection"]["same_selection"]


def test_activation_statistics_match_the_whole_split_computed_at_once() -> None:
    """Chunked accumulation gives SAELens's factor sqrt(d_in) / mean norm and the mean."""
    activations = torch.randn(1000, 16, generator=torch.Generator().manual_seed(0)) + 3.0
    factor, mean = activation_statistics(activations.split(300))
    assert factor == pytest.approx(4.0 / float(activations.double().norm(dim=-1).mean()))
    assert mean == pytest.approx(activations.mean(0), abs=1e-5)


def test_peak_matmul_is_measured_in_the_dtype_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    dtypes = []

    def fake_timed(device: str, call: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
        result = call()
        dtypes.append(result.dtype)
        return result, 0.5

    monkeypatch.setattr(speed, "_timed", fake_timed)
    flops = speed.peak_matmul_flops("cpu", torch.bfloat16, size=64, repeats=2)
    assert flops == 2 * 64**3 / 0.5 and dtypes == [torch.bfloat16] * 2


def test_dead_fraction_declares_the_same_latents_dead_in_every_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--dead-fraction: every step of every run (and its memory probe) has that dead set."""
    config = SpeedConfig(
        d_sae=64, k=4.0, batch_size=32, steps=2, warmup_steps=1, dead_fraction=0.25
    )
    batches = random_batches(config)
    dead_set = speed.forced_dead_set(config)
    assert dead_set is not None and dead_set.numel() == 16
    probed = []

    def probe(
        runner_config: object, probe_batches: object, stats: object, **kwargs: object
    ) -> MemoryProbe:
        probed.append(kwargs["dead_set"])
        return MemoryProbe(0.0, True)

    monkeypatch.setattr(speed, "probe_training", probe)
    seen: list[torch.Tensor] = []
    step = CalibratedBatchTopKTrainingSAE.training_forward_pass

    def spy(sae: CalibratedBatchTopKTrainingSAE, step_input: TrainStepInput) -> TrainStepOutput:
        seen.append(step_input.dead_neuron_mask.nonzero().squeeze(1))
        return step(sae, step_input)

    monkeypatch.setattr(CalibratedBatchTopKTrainingSAE, "training_forward_pass", spy)
    for name in (BATCHTOPK.fast, BATCHTOPK.dense):
        run = speed.time_training_steps(name, config, batches, (1.0, batches[0].mean(0)))
        assert run["dead_fraction_end"] == 0.25
    assert len(seen) == 2 * config.total_steps
    assert all(torch.equal(dead, dead_set) for dead in seen)
    assert all(torch.equal(dead, dead_set) for dead in probed)
    settings = dataclasses.asdict(config)
    assert "AuxK active (25% of the latents dead at every step)" in speed_report.aux_setting(
        settings
    )
    with pytest.raises(ValueError, match="--dead-fraction must be between 0 and 1"):
        dataclasses.replace(config, dead_fraction=1.0).validate()
