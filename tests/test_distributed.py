"""Training on two processes (gloo, CPU) equals training on one with their batches concatenated.

Every test forks two worker processes that join a gloo process group through a file in the
test's own folder (no ports to collide on), runs its part there, and saves what it saw; the
parent compares with the single-process computation. Forking keeps the workers' start-up to
a fraction of a second (no re-import), and every test has a deadline, so a failure never
hangs the suite.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from conftest import (
    needs_offline_assets,
    reduced_default_run_argv,
    step_input,
    tiny_runner_kwargs,
    trainer_config,
)
from datasets import Dataset
from sae_lens import SAE
from sae_lens.training.sae_trainer import SAETrainer
from transformer_lens import HookedTransformer

from sae_lens_batchtopk import (
    CalibratedBatchTopKSAE,
    CalibratedBatchTopKSAEConfig,
    CalibratedBatchTopKTrainingSAE,
    CalibratedBatchTopKTrainingSAEConfig,
    FeatureChoiceTrainingSAE,
    FeatureChoiceTrainingSAEConfig,
    NonFiniteError,
    calibrate_thresholds,
    make_runner_config,
)
from sae_lens_batchtopk.distributed import (
    DistributedBatch,
    DistributedError,
    init_process_group,
)
from sae_lens_batchtopk.distributed_runner import (
    DistributedSAETrainingRunner,
    activations_state_filename,
    check_checkpoint_processes,
    validate_distributed_runner_config,
)
from sae_lens_batchtopk.selection import n_selected, threshold_sample_stride
from sae_lens_batchtopk.tools.cli import Resources, _without_nproc, main
from sae_lens_batchtopk.trainer import DistributedSAETrainer, check_batch_divides

WORLD = 2


def run_processes(
    tmp_path: Path,
    work: Callable[[int], None],
    *,
    deadline_s: float = 120.0,
    collective_timeout_s: float = 60.0,
) -> None:
    """Run ``work(rank)`` on :data:`WORLD` forked processes joined in a gloo group.

    Raises the first worker's exception (with its traceback); fails the test if the workers
    are not all done within ``deadline_s``.
    """
    tmp_path.mkdir(parents=True, exist_ok=True)
    rendezvous = tmp_path / "rendezvous"

    def worker(rank: int) -> None:
        torch.set_num_threads(1)
        init_process_group(
            backend="gloo",
            init_method=f"file://{rendezvous}",
            rank=rank,
            world_size=WORLD,
            timeout_s=collective_timeout_s,
        )
        try:
            work(rank)
        finally:
            dist.destroy_process_group()

    context = mp.start_processes(worker, nprocs=WORLD, start_method="fork", join=False)
    deadline = time.monotonic() + deadline_s
    while not context.join(timeout=0.2):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the worker processes did not finish within {deadline_s} s")


def shares(x: torch.Tensor, rank: int) -> torch.Tensor:
    """Process ``rank``'s rows of a batch split evenly over :data:`WORLD` processes."""
    return x.chunk(WORLD)[rank]


def saved(tmp_path: Path) -> list[Any]:
    """What each worker saved with ``torch.save(..., tmp_path / f"rank{rank}.pt")``."""
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


# -- global selection -----------------------------------------------------------------------


def reference_indices(hidden_pre: torch.Tensor, k: float) -> torch.Tensor:
    """Batch top-k with ties to the lowest flat index: a stable descending sort."""
    flat = hidden_pre.reshape(-1)
    n_keep = min(n_selected(k, hidden_pre.shape[0]), flat.numel())
    order = torch.sort(flat, descending=True, stable=True).indices[:n_keep]
    return order[flat[order] > 0].sort().values


def sampled_constant_rows(n_rows: int, d_sae: int) -> torch.Tensor:
    """The sampled entries all 1.0, the others distinct values below: the floor misses.

    The fast path's floor (from the strided sample) is then 1.0 and nothing lies above it, so
    the selection must fall back to every positive entry, and cut among ties at 1.0.
    """
    flat = 0.5 + 0.4 * torch.rand(n_rows * d_sae, generator=torch.Generator().manual_seed(3))
    flat[:: threshold_sample_stride(flat.numel(), d_sae)] = 1.0
    return flat.view(n_rows, d_sae)


SELECTION_CASES: dict[str, tuple[list[torch.Tensor], float]] = {
    # Large enough for the sampled floor and radix select (float32 and float64 bit patterns).
    "random_float32": (
        list(torch.randn(2, 512, 512, generator=torch.Generator().manual_seed(0))),
        4.0,
    ),
    "random_float64": (
        list(torch.randn(2, 256, 512, generator=torch.Generator().manual_seed(1)).double()),
        7.5,
    ),
    # Few distinct values: the cut-off falls among ties spread over both processes; unequal
    # row counts.
    "ties_unequal_rows": (
        [
            torch.randint(-2, 6, (100, 128), generator=torch.Generator().manual_seed(2)) / 4,
            torch.randint(-2, 6, (60, 128), generator=torch.Generator().manual_seed(3)) / 4,
        ],
        5.0,
    ),
    "floor_misses": ([sampled_constant_rows(512, 257), sampled_constant_rows(512, 257)], 100.0),
    "fewer_positive_than_budget": (
        [-torch.rand(64, 32), torch.where(torch.rand(64, 32) < 0.02, 1.0, -1.0)],
        4.0,
    ),
}


def test_global_batch_topk_equals_single_process_on_concatenated_batch(tmp_path: Path) -> None:
    def work(rank: int) -> None:
        batch = DistributedBatch()
        kept = {
            name: batch.batch_topk_indices(parts[rank], k)
            for name, (parts, k) in SELECTION_CASES.items()
        }
        torch.save(kept, tmp_path / f"rank{rank}.pt")

    run_processes(tmp_path, work)
    per_rank = saved(tmp_path)
    for name, (parts, k) in SELECTION_CASES.items():
        offset = parts[0].numel()
        union = torch.cat([per_rank[0][name], per_rank[1][name] + offset])
        expected = reference_indices(torch.cat(parts), k)
        assert torch.equal(union, expected), name


# -- one training step ----------------------------------------------------------------------

D_IN, D_SAE, ROWS, STEPS = 8, 32, 16, 3


def make_step_sae(**options: Any) -> CalibratedBatchTopKTrainingSAE:
    torch.manual_seed(0)
    cfg = CalibratedBatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=3.0, **options)
    return CalibratedBatchTopKTrainingSAE(cfg)


STEP_CASES: dict[str, dict[str, Any]] = {
    # Sparse path; dead latents from the SAE's own token window; AuxK active from step 1.
    "sparse": {"sae": {"dead_tokens_window": 40}, "dead_tokens": 1000},
    # Dense path; dead latents from SAELens's trainer mask; activation-norm scaling.
    "dense": {
        "sae": {"fast_path": False, "normalize_activations": "expected_average_only_in"},
        "dead_steps": 10,
    },
}


def make_step_trainer(case: dict[str, Any], sae: CalibratedBatchTopKTrainingSAE) -> SAETrainer:
    cfg = trainer_config(STEPS, WORLD * ROWS, dead_feature_window=2, lr=1e-3)
    trainer = SAETrainer(cfg, sae, iter([]))
    if "dead_tokens" in case:
        sae.tokens_since_fired[: D_SAE // 2] = case["dead_tokens"]
    if "dead_steps" in case:
        trainer.n_forward_passes_since_fired[: D_SAE // 2] = case["dead_steps"]
    return trainer


def step_batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    # Small activations keep the gradient norm under SAELens's clip at 1.0, so the test sees
    # gradients as computed (a sum-instead-of-mean bug would not be clipped away).
    return [0.2 + 0.1 * torch.randn(WORLD * ROWS, D_IN, generator=generator) for _ in range(STEPS)]


def train_steps(trainer: SAETrainer, batches: list[torch.Tensor]) -> dict[str, Any]:
    """Step through ``batches``; what every step selected, lost and applied, and the end state."""
    grads: list[list[torch.Tensor]] = []
    trainer.optimizer.register_step_pre_hook(
        lambda *_: grads.append([p.grad.clone() for p in trainer.sae.parameters()])
    )
    if trainer.sae.cfg.normalize_activations == "expected_average_only_in":
        trainer.activation_scaler.estimate_scaling_factor(D_IN, iter(batches), len(batches))
    steps = []
    for batch in batches:
        output = trainer.step(batch)
        trainer.n_training_steps += 1
        steps.append(
            {
                "acts": output.feature_acts.detach().to_dense(),
                "losses": {name: float(loss.detach()) for name, loss in output.losses.items()},
            }
        )
    return {
        "steps": steps,
        "grads": grads,
        "scaling_factor": trainer.activation_scaler.scaling_factor,
        "state": {name: t.clone() for name, t in trainer.sae.state_dict().items()},
        "counters": {
            "n_forward_passes_since_fired": trainer.n_forward_passes_since_fired.clone(),
            "act_freq_scores": trainer.act_freq_scores.clone(),
            "n_training_samples": trainer.n_training_samples,
            "n_frac_active_samples": trainer.n_frac_active_samples,
        },
    }


@pytest.mark.parametrize("case_name", list(STEP_CASES))
def test_distributed_steps_equal_single_process_steps(tmp_path: Path, case_name: str) -> None:
    case = STEP_CASES[case_name]
    batches = step_batches()
    single = train_steps(make_step_trainer(case, make_step_sae(**case["sae"])), batches)

    def work(rank: int) -> None:
        sae = make_step_sae(**case["sae"])
        trainer = DistributedSAETrainer.carrying_state_of(make_step_trainer(case, sae))
        result = train_steps(trainer, [shares(batch, rank) for batch in batches])
        torch.save(result, tmp_path / f"rank{rank}.pt")

    run_processes(tmp_path, work)
    per_rank = saved(tmp_path)
    close = {"rtol": 1e-5, "atol": 1e-6}
    for step, expected in enumerate(single["steps"]):
        acts = torch.cat([r["steps"][step]["acts"] for r in per_rank])
        assert torch.equal(acts != 0, expected["acts"] != 0), f"step {step}: selection"
        torch.testing.assert_close(acts, expected["acts"], **close)
        for name, loss in expected["losses"].items():
            mean = sum(r["steps"][step]["losses"][name] for r in per_rank) / WORLD
            assert mean == pytest.approx(loss, rel=1e-5, abs=1e-7), f"step {step}: {name}"
        assert sum(g.pow(2).sum() for g in single["grads"][step]) < 1, "clipping would hide"
        for r in per_rank:
            for got, want in zip(r["grads"][step], single["grads"][step], strict=True):
                torch.testing.assert_close(got, want, **close)
    assert single["steps"][0]["losses"]["auxk_loss"] > 0, "the aux loss must be exercised"
    for r in per_rank:
        assert r["scaling_factor"] == pytest.approx(single["scaling_factor"], rel=1e-6)
        for name, tensor in single["state"].items():
            torch.testing.assert_close(r["state"][name], tensor, **close, equal_nan=True)
        for name, value in single["counters"].items():
            got = r["counters"][name]
            assert torch.equal(got, value) if isinstance(value, torch.Tensor) else got == value, (
                name
            )


# -- calibration ----------------------------------------------------------------------------

CALIBRATION_ROWS, CALIBRATION_BATCHES = 32, 8


def make_inference_sae() -> CalibratedBatchTopKSAE:
    torch.manual_seed(1)
    sae = CalibratedBatchTopKSAE(CalibratedBatchTopKSAEConfig(d_in=D_IN, d_sae=64, k=4.0))
    with torch.no_grad():
        sae.W_enc.normal_()
        sae.b_enc.normal_(std=0.1)
    return sae


def calibration_batches(rank: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(10 + rank)
    return [
        torch.randn(CALIBRATION_ROWS, D_IN, generator=generator) for _ in range(CALIBRATION_BATCHES)
    ]


def calibrate_all(
    batches: list[torch.Tensor], distributed: DistributedBatch | None
) -> dict[str, Any]:
    results = {}
    for method in ("l0", "per_latent", "paper"):
        result = calibrate_thresholds(
            make_inference_sae(),
            batches,
            method=method,
            chunk_tokens=CALIBRATION_ROWS,
            distributed=distributed,
        )
        results[method] = result.to_metadata() | {"thresholds": result.thresholds}
    return results


@pytest.mark.parametrize("scope", ["global", "local"])
def test_distributed_calibration_equals_calibration_on_union(tmp_path: Path, scope: str) -> None:
    parts = [calibration_batches(rank) for rank in range(WORLD)]
    if scope == "global":  # the processes' i-th batches form the union's i-th batch
        union = [torch.cat(batches) for batches in zip(*parts, strict=True)]
    else:  # each process's batch is a batch: rank 0's, then rank 1's
        union = [batch for batches in parts for batch in batches]
    expected = calibrate_all(union, None)

    def work(rank: int) -> None:
        results = calibrate_all(parts[rank], DistributedBatch(scope=scope))
        torch.save(results, tmp_path / f"rank{rank}.pt")

    run_processes(tmp_path, work)
    for results in saved(tmp_path):
        for method, want in expected.items():
            got = results[method]
            assert torch.equal(got.pop("thresholds"), want["thresholds"]), method
            assert got == {name: v for name, v in want.items() if name != "thresholds"}, method


# -- the runner -----------------------------------------------------------------------------


def runner_config(folder: Path, **overrides: Any) -> Any:
    options = {
        "training_tokens": 2048,
        "train_batch_size_tokens": 64,
        "n_checkpoints": 1,
        "normalize_activations": "expected_average_only_in",
        "feature_sampling_window": 8,
        "calibration_tokens": 512,
        **overrides,
    }
    return make_runner_config(**tiny_runner_kwargs(folder, **options))


def train_on_processes(
    tmp_path: Path, folder: Path, model: HookedTransformer, dataset: Dataset, **overrides: Any
) -> None:
    """Train the tiny model on two processes; each saves the SAE it ended with."""

    def work(rank: int) -> None:
        torch.manual_seed(rank)  # different initialisations: process 0's must win
        cfg = runner_config(folder, **overrides)
        runner = DistributedSAETrainingRunner(cfg, override_model=model, override_dataset=dataset)
        sae = runner.run()
        torch.save(
            {"state": sae.state_dict(), "curves": runner.training_curves},
            folder / f"rank{rank}.pt",
        )

    run_processes(tmp_path, work, deadline_s=300)


def checkpoints(folder: Path) -> list[Path]:
    """Checkpoint folders of a run (SAELens puts them under a random run id)."""
    return sorted(folder.glob("checkpoints/*/*"))


@pytest.mark.slow
def test_runner_on_two_processes_saves_what_process_zero_held(
    tmp_path: Path, tiny_model: HookedTransformer, tiny_dataset: Dataset
) -> None:
    folder = tmp_path / "run"
    train_on_processes(tmp_path, folder, tiny_model, tiny_dataset)
    held = saved(folder)
    for name, tensor in held[0]["state"].items():
        assert torch.equal(tensor, held[1]["state"][name]), f"replicas differ in {name}"

    loaded = SAE.load_from_disk(folder / "output")
    assert isinstance(loaded, CalibratedBatchTopKSAE)
    trained = CalibratedBatchTopKTrainingSAE.from_dict(
        runner_config(folder).get_training_sae_cfg_dict()
    )
    trained.load_state_dict(held[0]["state"])
    expected = CalibratedBatchTopKSAE.from_sae(trained)
    for name, tensor in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert torch.isfinite(loaded.threshold).all()
    calibration = loaded.cfg.metadata.calibration
    assert calibration["n_tokens"] == 512
    assert calibration["heldout"]["threshold_after"]["n_tokens"] > 0

    (checkpoint,) = checkpoints(folder)
    for rank in range(WORLD):
        assert (checkpoint / activations_state_filename(rank)).exists()
    check_checkpoint_processes(checkpoint, WORLD)
    with pytest.raises(ValueError, match="written by 2 processes"):
        check_checkpoint_processes(checkpoint, 3)
    assert held[0]["curves"][-1]["tokens"] == 2048


@pytest.mark.slow
def test_runner_resume_on_two_processes_equals_uninterrupted_run(
    tmp_path: Path, tiny_model: HookedTransformer, tiny_dataset: Dataset
) -> None:
    full = tmp_path / "full"
    train_on_processes(tmp_path / "a", full, tiny_model, tiny_dataset)
    (checkpoint,) = checkpoints(full)
    resumed = tmp_path / "resumed"
    train_on_processes(
        tmp_path / "b",
        resumed,
        tiny_model,
        tiny_dataset,
        resume_from_checkpoint=str(checkpoint),
    )
    want, got = saved(full)[0]["state"], saved(resumed)[0]["state"]
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


# -- errors ---------------------------------------------------------------------------------


def test_mismatched_settings_fail_on_every_process(tmp_path: Path) -> None:
    def work(rank: int) -> None:
        sae = make_step_sae(dead_tokens_window=40 + rank)
        trainer = SAETrainer(trainer_config(1, WORLD * ROWS), sae, iter([]))
        try:
            DistributedSAETrainer.carrying_state_of(trainer)
        except ValueError as error:
            (tmp_path / f"rank{rank}.txt").write_text(str(error))

    run_processes(tmp_path, work)
    for rank in range(WORLD):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert "sae.dead_tokens_window: process 0 has 40, process 1 has 41" in message


def test_a_non_finite_batch_on_one_process_stops_every_process_before_the_update(
    tmp_path: Path,
) -> None:
    def work(rank: int) -> None:
        sae = make_step_sae(dead_tokens_window=40)
        trainer = DistributedSAETrainer.carrying_state_of(
            SAETrainer(trainer_config(1, WORLD * ROWS), sae, iter([]))
        )
        batch = shares(step_batches()[0], rank).clone()
        if rank == 1:
            batch[3, 2] = torch.nan
        before = {name: t.clone() for name, t in sae.state_dict().items()}
        with pytest.raises(NonFiniteError) as raised:
            trainer.step(batch)
        for name, tensor in sae.state_dict().items():
            torch.testing.assert_close(tensor, before[name], rtol=0, atol=0, equal_nan=True)
        (tmp_path / f"rank{rank}.txt").write_text(str(raised.value))

    run_processes(tmp_path, work)
    assert (
        "process 1: training step 0: non-finite values in the input batch"
        in (tmp_path / "rank1.txt").read_text()
    )
    assert "non-finite values on process(es) [1]" in (tmp_path / "rank0.txt").read_text()


def test_a_process_that_stops_answering_fails_the_others_within_the_timeout(
    tmp_path: Path,
) -> None:
    def work(rank: int) -> None:
        batch = DistributedBatch()
        if rank == 1:
            time.sleep(30)  # stuck: never joins the collective (killed when rank 0 fails)
            return
        start = time.monotonic()
        try:
            batch.summed(torch.ones(1))
        except DistributedError as error:
            (tmp_path / "error.txt").write_text(f"{time.monotonic() - start}\n{error}")
            raise

    with pytest.raises(mp.ProcessRaisedException, match="DistributedError"):
        run_processes(tmp_path, work, collective_timeout_s=2)
    waited, message = (tmp_path / "error.txt").read_text().split("\n", 1)
    assert float(waited) < 20
    assert "process 0 of 2: all-reduce (sum) failed" in message


def test_batches_and_token_counts_must_divide_over_processes(tmp_path: Path) -> None:
    check_batch_divides(64, 2)
    with pytest.raises(ValueError, match="train_batch_size_tokens=64 does not divide over 3"):
        check_batch_divides(64, 3)
    cfg = runner_config(tmp_path, train_batch_size_tokens=66, calibration_tokens=513)
    with pytest.raises(ValueError, match="calibration_tokens=513 does not divide over 2"):
        validate_distributed_runner_config(cfg, 2)
    with pytest.raises(ValueError, match="train_batch_size_tokens=66 does not divide over 4"):
        validate_distributed_runner_config(cfg, 4)


def test_feature_choice_refuses_global_selection_across_processes(tmp_path: Path) -> None:
    def work(rank: int) -> None:
        cfg = FeatureChoiceTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=3.0)
        sae = FeatureChoiceTrainingSAE(cfg)
        with pytest.raises(ValueError, match="selection_scope='local'"):
            sae.set_distributed(DistributedBatch())
        local = FeatureChoiceTrainingSAE(
            FeatureChoiceTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=3.0, selection_scope="local")
        )
        local.set_distributed(DistributedBatch())
        local.training_forward_pass(step_input(local, torch.randn(ROWS, D_IN)))

    run_processes(tmp_path, work)


# -- the command line ------------------------------------------------------------------------


def tiny_cli_config(tmp_path: Path, **overrides: object) -> Path:
    options = tiny_runner_kwargs(tmp_path, eval_tokens=512, ce_eval_batches=1, **overrides)
    del options["output_path"]
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(options))
    return config


def test_cli_train_as_torchrun_workers_writes_one_folder_from_process_zero(
    tmp_path: Path, tiny_model: HookedTransformer, tiny_dataset: Dataset
) -> None:
    """Each process runs the CLI's ``train`` as torchrun would start it; process 0 writes."""
    config = tiny_cli_config(tmp_path / "cfg")
    out = tmp_path / "run"

    def work(rank: int) -> None:
        resources = Resources(
            tiny_model, tiny_dataset.select(range(448)), tiny_dataset.select(range(448, 512))
        )
        assert main(["train", str(config), "--output", str(out)], resources) == 0

    run_processes(tmp_path / "group", work)
    loaded = SAE.load_from_disk(out)
    assert isinstance(loaded, CalibratedBatchTopKSAE)
    assert loaded.cfg.metadata.calibration["method"] == "l0"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["headline"]["inference_l0_heldout"] > 0
    throughput = metrics["training_throughput"]
    assert throughput["processes"] == 2 and throughput["tokens"] == 4096
    assert 0 < throughput["communication_seconds"] < throughput["seconds"]
    assert "on 2 processes" in (out / "report.md").read_text()
    assert {"cfg.json", "runner_cfg.json", "training_curves.json", "report.md"} <= {
        path.name for path in out.iterdir()
    }
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".run.")] == []


def test_cli_checks_distributed_settings_before_launching(
    tmp_path: Path, tiny_resources: Resources, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tiny_cli_config(tmp_path, train_batch_size_tokens=63, calibration_tokens=2048)
    argv = ["train", str(config), "--nproc-per-node", "2", "--dry-run"]
    assert main(argv, tiny_resources) == 2
    assert "--nproc-per-node 2: train_batch_size_tokens=63" in capsys.readouterr().err
    assert _without_nproc(["train", "c.yaml", "--nproc-per-node", "2", "--overwrite"]) == [
        "train",
        "c.yaml",
        "--overwrite",
    ]
    assert _without_nproc(["train", "--nproc-per-node=4", "c.yaml"]) == ["train", "c.yaml"]


@needs_offline_assets
@pytest.mark.slow
def test_cli_launches_two_processes_with_torchrun(tmp_path: Path) -> None:
    """``--nproc-per-node 2`` on the offline SmolLM2, reduced: torchrun starts the workers."""
    out = tmp_path / "smollm2"
    argv = [*reduced_default_run_argv(out), "--nproc-per-node", "2"]
    assert main(argv) == 0
    headline = json.loads((out / "metrics.json").read_text())["headline"]
    assert 0 < headline["l0"] < 256
    assert SAE.load_from_disk(out).cfg.metadata.calibration["n_tokens"] == 2048
