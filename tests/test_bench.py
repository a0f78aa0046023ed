"""The benchmark harness keeps working: tiny end-to-end runs, cache reuse, input validation.

These are not benchmarks: shapes are tiny so that two full runs (every architecture, every
calibration method, CE/KL with the full SmolLM2) fit in well under a minute on 2 CPU cores.
The model is loaded once per module and passed in, as ``run_benchmark`` allows. Tests of
training alone (the sae-lens-defaults preset's settings, snapshots) use random activations in
an in-memory :class:`ActivationCache` instead, and need no model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_D_MODEL, needs_offline_assets
from sae_lens.config import LanguageModelSAERunnerConfig, LoggingConfig
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY
from transformer_lens import HookedTransformer

from sae_lens_batchtopk.calibration import METHODS
from sae_lens_batchtopk.evaluation import reconstruction_stats
from sae_lens_batchtopk.saes.calibrated_batchtopk_sae import ARCHITECTURE
from sae_lens_batchtopk.tools.benchmarks import harness, quality, quality_config, quality_report
from sae_lens_batchtopk.tools.benchmarks.activation_cache import ActivationCache, CacheSpec
from sae_lens_batchtopk.tools.benchmarks.quality_config import BenchConfig
from sae_lens_batchtopk.tools.benchmarks.quality_report import FILES

ROW_FIELDS = {
    "label",
    "architecture",
    "method",
    "k",
    "d_sae",
    "l0_mean",
    "l0_p5",
    "l0_p50",
    "l0_p95",
    "l0_deviation",
    "nmse",
    "explained_variance",
    "ce_loss_score",
    "kl_div_score",
    "dead_fraction",
    "train_tokens_per_s",
    "peak_memory_mb",
}
EXPECTED_LABELS = {
    "topk",
    "batchtopk[ema]",
    "jumprelu",
    *(f"calibrated_batchtopk/auxk[{method}]" for method in METHODS),
}


def tiny_config(tmp_path: Path, **overrides: object) -> BenchConfig:
    settings: dict[str, object] = {
        "k": (4,),
        "d_sae": (64,),
        "train_tokens": 2048,
        "calibration_tokens": 1024,
        "heldout_tokens": 512,
        "eval_sequences": 1,
        "context_size": 32,
        "batch_size": 128,
        "lr": 1e-3,
        "dead_window_tokens": 512,
        "cache_dir": tmp_path / "cache",
        "output": tmp_path / "out",
        "memory_probe": False,  # a fresh process per run; one test below turns it on
    }
    settings.update(overrides)
    return BenchConfig(**settings)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def smollm2() -> HookedTransformer:
    from sae_lens_batchtopk.tools.offline import load_smollm2

    return load_smollm2()


@needs_offline_assets
def test_run_writes_every_row_and_reuses_the_cache_and_runs(
    tmp_path: Path, smollm2: HookedTransformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tiny_config(tmp_path)
    first = quality.run_benchmark(config, model=smollm2, show_progress=False)

    assert first["cache"]["reused"] is False
    assert {row["label"] for row in first["rows"]} == EXPECTED_LABELS
    for row in first["rows"]:
        assert row.keys() >= ROW_FIELDS, ROW_FIELDS - row.keys()
        assert 0 < row["nmse"] < 2
        assert row["ce_loss_clean"] < row["ce_loss_zero"]
    calibrated = [r for r in first["rows"] if r["architecture"] == "calibrated_batchtopk"]
    assert len({r["train_tokens_per_s"] for r in calibrated}) == 1  # one training run
    for name in FILES:
        assert (config.output / name).stat().st_size > 0
    assert json.loads((config.output / FILES.json).read_text())["rows"] == first["rows"]
    section = (config.output / FILES.section).read_text()
    assert "Machine:" in section and "| calibrated_batchtopk/auxk[l0] |" in section

    cache_file = Path(first["cache"]["path"])
    written = cache_file.stat().st_mtime_ns
    second = quality.run_benchmark(
        dataclasses.replace(
            config, architectures=("topk",), output=tmp_path / "again", memory_probe=True
        ),
        model=smollm2,
        show_progress=False,
    )
    assert second["rows"][0]["peak_memory_mb"] > 0  # measured in a fresh process
    (run_file,) = (tmp_path / "again" / quality.RUNS_DIR).iterdir()
    assert json.loads(run_file.read_text())["memory_probe"]["peak_memory_mb"] > 0
    assert second["cache"] == {"path": str(cache_file), "reused": True}
    assert cache_file.stat().st_mtime_ns == written
    assert list(cache_file.parent.iterdir()) == [cache_file]  # no leftover temporary files
    # Same seed, same tokens: the topk run is reproduced exactly.
    assert second["rows"][0]["nmse"] == first["rows"][0]["nmse"]

    # Same settings and output: every finished run is reused, nothing retrains.
    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished run was retrained")

    monkeypatch.setattr(quality, "_train", no_training)
    resumed = quality.run_benchmark(config, model=smollm2, show_progress=False)
    assert resumed["rows"] == first["rows"]
    assert len(list((config.output / quality.RUNS_DIR).iterdir())) == 4  # one file per run
    with pytest.raises(AssertionError, match="retrained"):
        quality.run_benchmark(
            dataclasses.replace(config, lr=2e-3), model=smollm2, show_progress=False
        )


@needs_offline_assets
def test_feature_choice_and_aux_variants(tmp_path: Path, smollm2: HookedTransformer) -> None:
    config = tiny_config(
        tmp_path,
        architectures=("calibrated_batchtopk", "feature_choice"),
        aux_variants=("none", "auxk+zipf"),
    )
    rows = quality.run_benchmark(config, model=smollm2, show_progress=False)["rows"]
    labels = {row["label"] for row in rows}
    for variant in config.aux_variants:
        assert {f"calibrated_batchtopk/{variant}[{m}]" for m in METHODS} <= labels
        assert {f"feature_choice/{variant}[{m}]" for m in ("l0", "per_latent")} <= labels
        assert f"feature_choice/{variant}[paper]" not in labels  # refused for Feature Choice
    for row in rows:
        if row["method"] in ("l0", "per_latent"):  # calibrated L0 is exact on its own tokens
            assert row["calibration_l0"] == pytest.approx(4, rel=0.02)


@pytest.mark.parametrize(
    ("overrides", "option"),
    [
        ({"architectures": ("topk", "relu")}, "--architectures"),
        ({"k": (128,)}, "--k"),
        ({"k": (2.5,)}, "--k"),
        ({"calibration_tokens": 64}, "--calibration-tokens"),
        ({"train_tokens": 100}, "--train-tokens"),
        ({"heldout_tokens": 0}, "--heldout-tokens"),
        ({"aux_variants": ("auxk+nope",)}, "--aux-variants"),
    ],
)
def test_bad_input_fails_before_any_work(
    tmp_path: Path, overrides: dict[str, object], option: str
) -> None:
    config = tiny_config(tmp_path, **overrides)
    with pytest.raises(ValueError, match=option):
        quality.run_benchmark(config)  # no model passed: loading it would be "work"
    assert not (tmp_path / "cache").exists()


def test_main_reports_bad_options(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = ["--k", "300", "--d-sae", "256", "--output", str(tmp_path / "out")]
    assert quality.main(argv) == 2
    assert "--k" in capsys.readouterr().err


def test_quick_sets_tiny_defaults_that_explicit_options_override() -> None:
    config, (validated,) = quality.parse_command(["--quick", "--epochs", "1"])
    assert config.train_tokens == quality_config.QUICK_SETTINGS["train_tokens"]
    assert config.d_sae == (256,) and config.k == (8,) and config.epochs == 1
    assert validated == config  # one hook: the same settings, validated


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        # A command BENCHMARKS.md quotes: every option keeps its spelling and meaning.
        (
            "--k 32 16 --d-sae 4608 --architectures batchtopk calibrated_batchtopk --batch-size"
            " 1024 --lr 1e-3 --train-tokens 700000 --epochs 3 --calibration-tokens 100000"
            " --heldout-tokens 100000 --dead-window-tokens 51200 --seed 43 --output runs/x",
            {"k": (32.0, 16.0), "d_sae": (4608,), "batch_size": 1024, "lr": 1e-3, "seed": 43,
             "architectures": ("batchtopk", "calibrated_batchtopk"), "train_tokens": 700_000,
             "epochs": 3, "dead_window_tokens": 51_200, "output": Path("runs/x")},
        ),
        ("--quick --no-memory-probe --rerun", {"memory_probe": False, "rerun": True}),
        ("--rerun --no-memory-probe --quick", {"memory_probe": False, "rerun": True}),
        ("--aux-variants none auxk+zipf --jumprelu-l0-coefficient 4",
         {"aux_variants": ("none", "auxk+zipf"), "jumprelu_l0_coefficient": 4.0}),
        ("--preset sae-lens-defaults --train-tokens 8192 --snapshot-tokens 4096",
         {"preset": "sae-lens-defaults", "snapshot_tokens": (4096,),
          "architectures": quality_config.PRESET_ARCHITECTURES}),
    ],
)  # fmt: skip
def test_command_line_options_set_their_fields(argv: str, expected: dict[str, object]) -> None:
    config, _ = quality.parse_command(argv.split())
    assert {name: getattr(config, name) for name in expected} == expected


@needs_offline_assets
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, device="cuda", architectures=("batchtopk",), memory_probe=True)
    results = quality.run_benchmark(config, show_progress=False)
    assert results["machine"]["gpu"]
    assert results["rows"][0]["peak_memory_mb"] > 0


# --- the sae-lens-defaults preset -------------------------------------------------------------

DEFAULTS = quality_config.SAE_LENS_DEFAULTS_PRESET
# SAELens's default batch; literal on purpose, as a cross-check of what the harness reads.
SAE_LENS_BATCH = 4096


def tiny_defaults_config(tmp_path: Path, **overrides: object) -> BenchConfig:
    """Tiny shapes under the sae-lens-defaults preset: no bench-only setting is touched."""
    settings: dict[str, object] = {
        "preset": DEFAULTS,
        "k": (4,),
        "d_sae": (64,),
        "train_tokens": 2 * SAE_LENS_BATCH,
        "calibration_tokens": 1024,
        "heldout_tokens": 512,
        "eval_sequences": 1,
        "context_size": 32,
        "cache_dir": tmp_path / "cache",
        "output": tmp_path / "out",
        "memory_probe": False,
    }
    settings.update(overrides)
    return BenchConfig(**settings)  # type: ignore[arg-type]


def random_cache(train_batches: int = 2, d_in: int = 16) -> ActivationCache:
    """Random activations with a residual-like mean, in an in-memory cache (no model)."""
    generator = torch.Generator().manual_seed(0)
    sizes = {"train": train_batches * SAE_LENS_BATCH, "calibration": 1024, "heldout": 512}
    splits = {
        split: (torch.randn(n, d_in, generator=generator) + 2.0).half()
        for split, n in sizes.items()
    }
    spec = CacheSpec("random", "blocks.0.hook_resid_post", *sizes.values(), 1, 2, 0)
    return ActivationCache(spec, Path("in-memory"), splits, torch.zeros(1, 2, dtype=torch.long))


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor: bitwise comparison, NaN included (NaN != NaN as floats)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def field_default(field: dataclasses.Field[object]) -> object:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


@pytest.mark.parametrize("architecture", quality_config.PRESET_ARCHITECTURES)
def test_defaults_preset_sets_only_architecture_k_shape_device_seed_tokens(
    tmp_path: Path, architecture: str
) -> None:
    config = tiny_defaults_config(tmp_path, epochs=3)
    runner = quality_config.runner_config_for(architecture, 4, 64, config, 16, None, False)

    # The trainer settings are those SAELens builds when a user sets nothing else.
    sae_class = SAE_TRAINING_CLASS_REGISTRY[architecture][1]
    reference = LanguageModelSAERunnerConfig(
        sae=sae_class(d_in=16, d_sae=64, k=4),
        training_tokens=config.total_training_tokens,
        seed=config.seed,
        device="cpu",
        logger=LoggingConfig(log_to_wandb=False),
        verbose=False,
    )
    ours, theirs = runner.to_sae_trainer_config(), reference.to_sae_trainer_config()
    for field in dataclasses.fields(ours):
        if field.name != "checkpoint_path":  # SAELens appends a random run id
            assert getattr(ours, field.name) == getattr(theirs, field.name), field.name
    # ... and every runner field the bench does not set is the dataclass default.
    set_here = {"sae", "training_tokens", "device", "seed", "logger", "verbose"}
    filled_in_post_init = {"checkpoint_path", "lr_end", "llm_device", "act_store_device"}
    filled_in_post_init |= {"model_from_pretrained_kwargs"}
    for field in dataclasses.fields(LanguageModelSAERunnerConfig):
        if field.name not in set_here | filled_in_post_init:
            assert getattr(runner, field.name) == field_default(field), field.name
    # Every SAE-config field but the shape and k is the architecture's own default.
    assert type(runner.sae) is sae_class
    for field in dataclasses.fields(sae_class):
        if field.name not in {"d_in", "d_sae", "k", "device", "metadata"}:
            assert getattr(runner.sae, field.name) == field_default(field), field.name
    assert runner.sae.k == 4 and isinstance(runner.sae.k, int if architecture == "topk" else float)

    # The values the issue lists, as a cross-check of the reading above.
    assert (runner.lr, runner.lr_scheduler_name, runner.lr_warm_up_steps) == (3e-4, "constant", 0)
    assert (runner.adam_beta1, runner.adam_beta2) == (0.9, 0.999)
    assert runner.train_batch_size_tokens == SAE_LENS_BATCH == config.training_batch_size
    assert (runner.dead_feature_window, runner.feature_sampling_window) == (1000, 2000)
    assert runner.sae.normalize_activations == "none" and runner.sae.decoder_init_norm == 0.1
    assert quality_config.resolved_settings(runner)["trainer"]["lr"] == 3e-4


@pytest.mark.parametrize("architecture", quality_config.PRESET_ARCHITECTURES)
def test_defaults_preset_leaves_b_dec_and_scaling_to_sae_lens(
    tmp_path: Path, architecture: str
) -> None:
    runner = quality_config.runner_config_for(
        architecture, 4, 64, tiny_defaults_config(tmp_path), 16, None, False
    )
    sae, trainer = harness.new_sae_and_trainer(runner, iter([]), None)
    torch.manual_seed(runner.seed)
    untouched = SAE_TRAINING_CLASS_REGISTRY[architecture][0](runner.sae)
    for name, tensor in untouched.state_dict().items():
        assert torch.equal(bits(sae.state_dict()[name]), bits(tensor)), name
    assert not sae.b_dec.any()  # SAELens's zero init; ours sets the mean at its first step
    assert trainer.activation_scaler.scaling_factor is None
    # The bench preset, by contrast, fixes both.
    mean = torch.full((16,), 2.0)
    sae, trainer = harness.new_sae_and_trainer(runner, iter([]), (0.5, mean))
    assert torch.equal(sae.b_dec, mean * 0.5) and trainer.activation_scaler.scaling_factor == 0.5


@pytest.mark.parametrize("architecture", quality_config.PRESET_ARCHITECTURES)
def test_snapshot_equals_a_separate_run_bitwise(tmp_path: Path, architecture: str) -> None:
    cache = random_cache(train_batches=2)
    # 3 epochs of 2 batches; snapshots after step 1 and step 3 (inside the second epoch).
    long = tiny_defaults_config(tmp_path, epochs=3, snapshot_tokens=(1 * 4096, 3 * 4096 + 5))
    runner = quality_config.runner_config_for(architecture, 4, 64, long, cache.d_in, None, False)
    budgets = quality._train(runner, 4, long, cache, None)
    assert [info["training_tokens"] for _, info in budgets] == [4096, 3 * 4096, 6 * 4096]
    assert [info["snapshot"] for _, info in budgets] == [True, True, False]

    for (snapshot, info), steps in zip(budgets[:2], (1, 3), strict=True):
        # A separate run of that many tokens: same cache, hence the same batch stream.
        short = dataclasses.replace(long, train_tokens=steps * 4096, epochs=1, snapshot_tokens=())
        runner = quality_config.runner_config_for(
            architecture, 4, 64, short, cache.d_in, None, False
        )
        ((separate, separate_info),) = quality._train(runner, 4, short, cache, None)
        assert separate_info["training_tokens"] == info["training_tokens"]
        assert separate_info["train_dead_fraction"] == info["train_dead_fraction"]
        state, expected = snapshot.state_dict(), separate.state_dict()
        assert state.keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(bits(state[name]), bits(tensor)), name
    # Not vacuous: training moved the weights between the budgets.
    assert not torch.equal(budgets[0][0].W_enc, budgets[2][0].W_enc)


@pytest.mark.parametrize(
    ("change", "constant"),
    [
        ({}, True),
        ({"lr_warm_up_steps": 2}, False),
        ({"lr_decay_steps": 2}, False),
        ({"lr_scheduler_name": "cosineannealing"}, False),
    ],
)
def test_snapshots_are_refused_unless_the_schedule_is_constant(
    tmp_path: Path, change: dict[str, object], constant: bool
) -> None:
    config = tiny_defaults_config(tmp_path, epochs=2, snapshot_tokens=(4096,))
    runner = dataclasses.replace(
        quality_config.runner_config_for("topk", 4, 64, config, 16, None, False), **change
    )
    assert quality_config.is_constant_schedule(vars(runner)) is constant
    if not constant:
        with pytest.raises(ValueError, match="--snapshot-tokens"):
            quality._train(runner, 4, config, random_cache(), None)


@pytest.mark.parametrize(
    ("overrides", "option"),
    [
        ({"snapshot_tokens": (4096,)}, "--snapshot-tokens"),  # the bench preset: cosine
        ({"preset": DEFAULTS, "snapshot_tokens": (2 * 4096,)}, "--snapshot-tokens"),  # = total
        ({"preset": DEFAULTS, "snapshot_tokens": (100,)}, "--snapshot-tokens"),
        ({"preset": DEFAULTS, "lr": 2e-3}, "--lr"),
        ({"preset": DEFAULTS, "batch_size": 128}, "--batch-size"),
        ({"preset": DEFAULTS, "aux_variants": ("none",)}, "--aux-variants"),
        ({"preset": DEFAULTS, "architectures": ("topk", "jumprelu")}, "--architectures"),
        ({"preset": DEFAULTS, "architectures": ("calibrated_batchtopk",)}, "--architectures"),
        ({"preset": DEFAULTS, "architectures": ("matryoshka_batchtopk",)}, "--architectures"),
        ({"preset": DEFAULTS, "train_tokens": 4000}, "--train-tokens"),
        ({"preset": "nope"}, "--preset"),
    ],
)
def test_defaults_preset_bad_input_fails_before_any_work(
    tmp_path: Path, overrides: dict[str, object], option: str
) -> None:
    config = BenchConfig(
        **{  # type: ignore[arg-type]
            "k": (4,),
            "d_sae": (64,),
            "train_tokens": 2 * 4096,
            "cache_dir": tmp_path / "cache",
            **overrides,
        }
    )
    with pytest.raises(ValueError, match=option):
        quality.run_benchmark(config)
    assert not (tmp_path / "cache").exists()


def test_cli_refuses_bench_only_options_under_the_defaults_preset(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Even at the bench default, which the preset would otherwise silently ignore.
    assert quality.main(["--preset", DEFAULTS, "--lr", str(BenchConfig().lr)]) == 2
    assert "error: --lr: --preset sae-lens-defaults" in capsys.readouterr().err
    # --quick leaves the bench-only settings alone there; hooks split the output.
    config, configs = quality.parse_command(
        ["--preset", DEFAULTS, "--quick", "--hook", "blocks.1.x", "b.2"]
    )
    assert config.architectures == quality_config.PRESET_ARCHITECTURES and config.lr == 4e-4
    assert [c.output for c in configs] == [config.output / "blocks.1.x", config.output / "b.2"]
    assert [c.hook_name for c in configs] == ["blocks.1.x", "b.2"]
    with pytest.raises(ValueError, match="--hook"):
        quality.per_hook_configs(config, ["a", "a"])


@pytest.mark.parametrize(
    ("ours_l0", "ours_nmse", "verdict"),
    [
        (32.2, 0.050, "yes"),  # L0 within 1 %: NMSE decides
        (31.8, 0.052, "no"),
        (30.0, 0.050, "yes"),  # fewer latents and no worse
        (34.0, 0.052, "no"),  # more latents and still worse
        (30.0, 0.052, "unclear"),  # worse, but with fewer latents
        (34.0, 0.049, "unclear"),  # better, but with more latents
    ],
)
def test_equal_l0_verdict(ours_l0: float, ours_nmse: float, verdict: str) -> None:
    assert quality_report.equal_l0_verdict(ours_l0, ours_nmse, 32.0, 0.051) == verdict


def test_comparison_cells_pick_the_compared_rows() -> None:
    def row(label: str, l0: float, nmse: float, tokens: int = 4096, **extra: object) -> dict:
        fields = {"l0_mean": l0, "nmse": nmse, "ce_loss_score": 0.9, "kl_div_score": 0.8}
        return {"label": label, "hook": "h", "d_sae": 64, "k": 4, "training_tokens": tokens,
                "snapshot": False, "dead_fraction": 0.1, **fields, **extra}  # fmt: skip

    rows = [
        row("topk", 4, 0.30),
        row("batchtopk[ema]", 9, 0.20),
        row("batchtopk[l0]", 4, 0.25),
        row("calibrated_batchtopk[l0]", 4, 0.22),
        row("calibrated_batchtopk[l0@batchtopk]", 9.05, 0.15),
        row("batchtopk[ema]", 9, 0.20, tokens=8192),
        row("calibrated_batchtopk[l0]", 4, 0.22, tokens=8192, equal_l0_error="cannot reach 9"),
    ]
    first, second = quality_report.comparison_cells(rows)
    assert first["verdict"] == "yes" and first["ours_equal_l0_nmse"] == 0.15
    assert (first["builtin_l0"], first["builtin_calibrated_nmse"], first["topk_nmse"]) == (
        9,
        0.25,
        0.3,
    )
    assert first["ce_loss_score"] == {"ours": 0.9, "builtin": 0.9, "topk": 0.9}
    assert second["verdict"] == "n/a: cannot reach 9" and second["topk_nmse"] is None
    assert first["ours_lower_l0"] is None  # no lower-L0 row: the cell did not need one
    assert "| `h` | 4 | 64 | 4,096 |" in quality_report.quality_table(
        [first], quality_report.CELL_COLUMNS
    )


@pytest.mark.parametrize(
    ("lower_l0", "lower_nmse", "verdict"),
    [
        (9.02, 0.16, "yes (ours at L0 9.02: NMSE 0.1600)"),  # within 1 % now, and lower
        (8.70, 0.19, "yes (ours at L0 8.70: NMSE 0.1900)"),  # fewer latents and no worse
        (9.05, 0.21, "no (ours at L0 9.05: NMSE 0.2100)"),  # equal L0 and worse
        (8.70, 0.21, "unclear"),  # fewer latents and worse: still undecided
    ],
)
def test_ours_below_the_builtin_l0_decides_an_unclear_cell(
    lower_l0: float, lower_nmse: float, verdict: str
) -> None:
    def row(label: str, l0: float, nmse: float) -> dict:
        return {"label": label, "hook": "h", "d_sae": 64, "k": 4, "training_tokens": 4096,
                "snapshot": False, "l0_mean": l0, "nmse": nmse}  # fmt: skip

    rows = [
        row("batchtopk[ema]", 9.0, 0.20),
        row("calibrated_batchtopk[l0]", 4.1, 0.22),
        row(f"calibrated_batchtopk[{quality_report.EQUAL_L0_METHOD}]", 9.2, 0.15),  # +2.2 %
        row(f"calibrated_batchtopk[{quality_report.LOWER_L0_METHOD}]", lower_l0, lower_nmse),
    ]
    (cell,) = quality_report.comparison_cells(rows)
    assert cell["verdict"] == verdict
    assert (cell["ours_lower_l0"], cell["ours_lower_l0_nmse"]) == (lower_l0, lower_nmse)
    assert quality_report.LOWER_L0_METHOD == "l0@batchtopk-3%"


@pytest.mark.parametrize(("builtin_l0", "reachable"), [(6.0, True), (60.0, False)])
def test_ours_is_calibrated_to_the_builtin_l0_or_says_why_not(
    tmp_path: Path, builtin_l0: float, reachable: bool
) -> None:
    cache = random_cache(train_batches=1)
    config = tiny_defaults_config(tmp_path, train_tokens=4096)
    runner = quality_config.runner_config_for(ARCHITECTURE, 4, 64, config, cache.d_in, None, False)
    ((trained, _),) = quality._train(runner, 4, config, cache, None)
    calibration = cache.batches("calibration", config.training_batch_size)
    forms = list(quality._inference_saes(ARCHITECTURE, trained, calibration, config, builtin_l0))

    methods = [method for method, _, _ in forms]
    compared = [quality_report.EQUAL_L0_METHOD, quality_report.LOWER_L0_METHOD]
    assert methods == (["l0", *compared] if reachable else ["l0"])
    assert forms[0][2]["calibration_target_l0"] == 4
    if reachable:
        assert forms[1][2]["calibration_target_l0"] == builtin_l0
        assert forms[1][2]["calibration_l0"] == pytest.approx(builtin_l0, rel=0.05)
        assert forms[2][2]["calibration_target_l0"] == pytest.approx(builtin_l0 * 0.97)
        assert forms[2][1].threshold.min() > forms[1][1].threshold.min()  # fewer fire
        assert "equal_l0_error" not in forms[0][2]
    else:  # a target ours cannot fire often enough for is reported, not fatal
        assert "cannot fire that often" in forms[0][2]["equal_l0_error"]


def test_several_hooks_are_checked_first_and_combined(
    tmp_path: Path, tiny_model: HookedTransformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    configs = quality.per_hook_configs(
        tiny_defaults_config(tmp_path, snapshot_tokens=(4096,)), hooks
    )

    def fake_run(config: BenchConfig, **kwargs: object) -> dict[str, object]:
        """One hook's results, as run_benchmark returns them (numbers made up)."""
        rows = [
            {"label": label, "architecture": label.split("[")[0], "hook": config.hook_name,
             "preset": DEFAULTS, "k": 4, "d_sae": 64, "training_tokens": tokens,
             "snapshot": tokens == 4096, "l0_mean": l0, "l0_p5": l0, "l0_p50": l0,
             "l0_p95": l0, "nmse": nmse}
            for tokens in (4096, 8192)
            for label, l0, nmse in (("batchtopk[ema]", 9.0, 0.2),
                                    ("calibrated_batchtopk[l0@batchtopk]", 9.0, 0.1))
        ]  # fmt: skip
        return {
            "settings": quality_config.recorded_settings(config),
            "cache": {"path": config.hook_name, "reused": False},
            "rows": rows,
            "cells": quality_report.comparison_cells(rows),
        }

    monkeypatch.setattr(quality, "run_benchmark", fake_run)
    with pytest.raises(ValueError, match="--hook"):  # before the first hook's work
        quality.run_benchmarks(
            [*configs, dataclasses.replace(configs[0], hook_name="blocks.9.nope")],
            tmp_path / "out",
            model=tiny_model,
        )
    results = quality.run_benchmarks(configs, tmp_path / "out", model=tiny_model, command="cmd")

    assert [row["hook"] for row in results["rows"]] == [hooks[0]] * 4 + [hooks[1]] * 4
    assert [(cell["hook"], cell["verdict"]) for cell in results["cells"]] == [
        (hook, "yes") for hook in hooks for _ in range(2)
    ]
    assert results["settings"]["hook_name"] == hooks
    section = (tmp_path / "out" / FILES.section).read_text()
    assert f"hooks `{hooks[0]}`, `{hooks[1]}`" in section and "are snapshots" in section
    assert "at equal L0: none." in section
    assert f"| `{hooks[1]}` | 4 | 64 | 4,096 (snapshot) |" in section
    for name in FILES:
        assert (tmp_path / "out" / name).stat().st_size > 0


@needs_offline_assets
def test_defaults_preset_end_to_end(
    tmp_path: Path, smollm2: HookedTransformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    statistics_passed: list[object] = []
    new_sae_and_trainer = harness.new_sae_and_trainer

    def spy(runner: object, batches: object, statistics: object) -> object:
        statistics_passed.append(statistics)
        return new_sae_and_trainer(runner, batches, statistics)  # type: ignore[arg-type]

    monkeypatch.setattr(quality, "new_sae_and_trainer", spy)
    # topk's deployed form is the bench preset's, tested above; leaving it out saves time.
    config = tiny_defaults_config(
        tmp_path,
        train_tokens=4096,
        epochs=2,
        snapshot_tokens=(4096,),
        architectures=("batchtopk", "calibrated_batchtopk"),
    )
    results = quality.run_benchmark(config, model=smollm2, show_progress=False)

    assert statistics_passed == [None] * 2  # no b_dec override, no fixed scaling, any run
    rows = results["rows"]
    for tokens, snapshot in ((4096, True), (8192, False)):
        budget = {row["label"]: row for row in rows if row["training_tokens"] == tokens}
        assert budget.keys() >= {"batchtopk[ema]", "batchtopk[l0]", "calibrated_batchtopk[l0]"}
        assert {row["snapshot"] for row in budget.values()} == {snapshot}
        assert budget["batchtopk[l0]"]["l0_mean"] == pytest.approx(4, rel=0.2)
        # Ours at k, and at the built-in's L0 unless it cannot fire that often (tiny d_sae).
        ours = budget["calibrated_batchtopk[l0]"]
        equal = budget.get(f"calibrated_batchtopk[{quality_report.EQUAL_L0_METHOD}]")
        builtin_l0 = budget["batchtopk[ema]"]["l0_mean"]
        if equal is None:
            assert f"for target {builtin_l0}" in ours["equal_l0_error"]
        else:
            assert equal["calibration_target_l0"] == builtin_l0
    assert [(cell["training_tokens"], cell["snapshot"]) for cell in results["cells"]] == [
        (4096, True),
        (8192, False),
    ]

    run = json.loads((config.output / quality.RUNS_DIR / "batchtopk-k4-d64.json").read_text())
    trainer, sae = run["resolved_settings"]["trainer"], run["resolved_settings"]["sae"]
    defaults = quality_config.runner_defaults()
    assert trainer["lr"] == defaults["lr"] and trainer["lr_scheduler_name"] == "constant"
    assert trainer["train_batch_size_samples"] == defaults["train_batch_size_tokens"]
    assert sae["architecture"] == "batchtopk" and sae["normalize_activations"] == "none"
    assert json.loads((config.output / FILES.json).read_text())["rows"] == rows
    assert "4,096 tokens are snapshots" in (config.output / FILES.section).read_text()

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished run was retrained")

    monkeypatch.setattr(quality, "_train", no_training)
    assert quality.run_benchmark(config, model=smollm2, show_progress=False)["rows"] == rows


# --- Matryoshka: SAELens's matryoshka_batchtopk and ours, evaluated per level -------------------

MATRYOSHKA = "calibrated_matryoshka_batchtopk"


def test_level_nmse_decodes_only_each_prefix_of_the_codes() -> None:
    cache = random_cache(train_batches=1)
    config = tiny_config(Path("unused"), architectures=(ARCHITECTURE,))
    runner = quality_config.runner_config_for(ARCHITECTURE, 4, 64, config, cache.d_in, None, False)
    sae, _ = harness.new_sae_and_trainer(runner, iter([]), None)
    inference = quality._export(sae)
    heldout = cache.batches("heldout", 128)
    levels = quality.level_nmse(inference, heldout, [8, 32, 64])

    x = torch.cat(heldout)
    codes = inference.encode(x).detach()
    variance = sum(float((b - b.mean(0)).double().pow(2).sum()) for b in heldout)
    for width, nmse in zip([8, 32], levels, strict=False):
        decoded = codes[:, :width] @ inference.W_dec[:width] + inference.b_dec
        error = float((decoded.detach() - x).double().pow(2).sum())
        assert nmse == pytest.approx(error / variance, rel=1e-5)
    assert levels[-1] == pytest.approx(reconstruction_stats(inference, heldout)["nmse"])
    assert levels[0] > levels[1] > levels[2]


def test_matryoshka_runs_end_to_end(
    tmp_path: Path, tiny_model: HookedTransformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SAELens's Matryoshka and ours on the same tokens (tiny model, random activations)."""
    cache = random_cache(train_batches=1, d_in=TINY_D_MODEL)
    cache.eval_tokens = torch.randint(1, 64, (1, 16), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(quality, "load_model_and_cache", lambda *args: (tiny_model, cache))
    monkeypatch.setattr(quality, "special_token_ids", lambda tokenizer: [0])
    config = tiny_config(
        tmp_path,
        hook_name=cache.spec.hook_name,
        train_tokens=4096,
        batch_size=512,
        architectures=(MATRYOSHKA, "matryoshka_batchtopk", ARCHITECTURE),  # any order
        matryoshka_widths=(8, 16, 32),
    )
    results = quality.run_benchmark(config, model=tiny_model, show_progress=False)

    rows = {row["label"]: row for row in results["rows"]}
    # The built-in trains first, so that ours can be calibrated to its L0.
    assert [label.split("/")[0].split("[")[0] for label in rows] == [
        *[ARCHITECTURE] * 3,
        *["matryoshka_batchtopk"] * 2,
        *[MATRYOSHKA] * 4,
    ]
    builtin = rows["matryoshka_batchtopk[ema]"]
    equal = rows[f"{MATRYOSHKA}/auxk[l0@matryoshka_batchtopk]"]
    assert equal["calibration_target_l0"] == builtin["l0_mean"]
    assert equal["calibration_l0"] == pytest.approx(builtin["l0_mean"], rel=0.05)
    assert rows["matryoshka_batchtopk[l0]"]["calibration_l0"] == pytest.approx(4, rel=0.02)
    for row in rows.values():  # every row, the plain ones too, per level
        assert row["level_widths"] == [8, 16, 32, 64]
        assert row["level_nmse"][-1] == pytest.approx(row["nmse"])
    run = json.loads(
        (config.output / quality.RUNS_DIR / f"{MATRYOSHKA}-auxk-k4-d64.json").read_text()
    )
    assert run["resolved_settings"]["sae"]["matryoshka_widths"] == [8, 16, 32, 64]
    assert run["resolved_settings"]["sae"]["use_matryoshka_aux_loss"] is False
    assert results["settings"]["matryoshka_levels"] == {"64": [8, 16, 32, 64]}
    section = (config.output / FILES.section).read_text()
    assert "| NMSE per level |" in section and "(d_sae 64: 8/16/32/64)" in section
    assert f"| {MATRYOSHKA}/auxk[l0@matryoshka_batchtopk] | 4 | 64 |" in section


@pytest.mark.parametrize(
    ("overrides", "option"),
    [
        ({"matryoshka_widths": (8, 16)}, "--matryoshka-widths: no Matryoshka architecture"),
        ({"architectures": (MATRYOSHKA,), "matryoshka_widths": (16, 8)}, "--matryoshka-widths"),
        ({"architectures": (MATRYOSHKA,), "matryoshka_widths": (8, 128)}, "--matryoshka-widths"),
        ({"architectures": (MATRYOSHKA,), "d_sae": (4,)}, "--matryoshka-widths"),  # 4/8 = 0
    ],
)
def test_matryoshka_bad_input_fails_before_any_work(
    tmp_path: Path, overrides: dict[str, object], option: str
) -> None:
    config = tiny_config(tmp_path, **{"k": (2,), **overrides})
    with pytest.raises(ValueError, match=option):
        quality.run_benchmark(config)
    assert not (tmp_path / "cache").exists()


def test_matryoshka_widths_default_to_fractions_of_d_sae() -> None:
    config, _ = quality.parse_command(
        ["--architectures", "batchtopk", MATRYOSHKA, "--d-sae", "4608", "--k", "32"]
    )
    assert config.level_widths(4608) == [576, 1152, 2304, 4608]
    assert BenchConfig().level_widths(4608) is None  # no Matryoshka run, no levels
    config, _ = quality.parse_command(
        ["--architectures", MATRYOSHKA, "--matryoshka-widths", "512", "2048", "--d-sae", "4096"]
    )
    assert config.level_widths(4096) == [512, 2048, 4096]
