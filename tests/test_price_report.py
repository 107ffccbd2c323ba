"""The equal-cost reading of a report and steps to target (sweeps/targets.py), on run
folders as `python -m train` leaves them."""

import csv
import json

import pytest

from sweeps.report import method, report
from train.config import typed


def run_folder(d, *, optimizer="sgd", beta=0.0, epochs=300, batch=2048, vals=(0.8,), test=0.8, seed=0,
               subset=0, extra_optim=None, every=10, train_samples=8192):
    """A finished run: evaluations every ``every`` epochs with validation ``vals`` in turn."""
    d.mkdir(parents=True)
    optim = {"optimizer": optimizer, "inner": "sgd", "micro_batches": 4, "lr": 0.05, "lr_scaling": "none",
             "warmup_epochs": 0.0, "beta": beta, **(extra_optim or {})}
    config = {"data": {"dataset": "x", "train_samples": train_samples, "subset_seed": subset},
              "model": {"model": "mlp"}, "optim": optim,
              "train": {"batch_size": batch, "seed": seed, "epochs": epochs}}
    (d / "config.json").write_text(json.dumps(config))
    (d / "summary.json").write_text(json.dumps({"status": "finished"}))
    history = [{"epoch": every * (i + 1), "accuracy": 0.9, "loss": 0.3, "val_accuracy": v,
                "test_accuracy": test, "images_per_sec": 1.0, "grad_variance": 1.0} for i, v in enumerate(vals)]
    (d / "metrics.json").write_text(json.dumps(history))


def test_methods_are_named_apart_and_carry_their_strength(tmp_path):
    def optim(**keys):
        return typed({"optim": keys}).optim

    assert method(optim(optimizer="sam")) == "sam"
    assert method(optim(optimizer="sam", sam_scope="global")) == "sam_global"
    assert method(optim(optimizer="sam", sam_adaptive=True)) == "asam"
    assert method(optim(optimizer="grad_penalty", sam_scope="global")) == "grad_penalty"
    runs = tmp_path / "runs"
    run_folder(runs / "a", optimizer="sam", beta=0.0, extra_optim={"rho": 0.2}, test=0.81)
    run_folder(runs / "b", optimizer="sam", extra_optim={"rho": 0.1, "sam_scope": "global"}, test=0.82)
    run_folder(runs / "c", optimizer="grad_penalty", beta=0.1, test=0.83)
    table = report(runs)["table"]
    assert "| global batch | grad_penalty | sam | sam_global |" in table
    assert "83.00 (lr=0.05, β=0.1," in table and "81.00 (lr=0.05, ρ=0.2," in table and "82.00 (lr=0.05, ρ=0.1," in table


def test_equal_cost_reads_sgd_at_twice_the_epochs_of_a_two_pass_method(tmp_path):
    """By epochs, SGD@600 is another budget than the two-pass methods' 300 and left out;
    at equal cost (gradient passes per sample) it is the budget they share, and SGD@300
    (half the cost) is the one left out."""
    runs = tmp_path / "runs"
    run_folder(runs / "ga", optimizer="gradalign", beta=0.1, epochs=300, test=0.87)
    run_folder(runs / "sam", optimizer="sam", extra_optim={"rho": 0.2}, epochs=300, test=0.86)
    run_folder(runs / "sgd600", epochs=600, test=0.85)
    run_folder(runs / "sgd300", epochs=300, test=0.84)
    by_epochs = report(runs, out=tmp_path / "e")["table"]
    assert "85.00" not in by_epochs and "84.00 (lr=0.05, warmup 0, 300 epochs" in by_epochs
    equal = report(runs, out=tmp_path / "c", equal_cost=True)["table"]
    assert "85.00 (lr=0.05, warmup 0, 600 epochs" in equal and "84.00" not in equal
    assert "87.00 (lr=0.05, β=0.1, warmup 0, 300 epochs" in equal
    assert "Equal cost" in equal and "(batch 2048: 1 sgd at 300 epochs)" in equal


def test_steps_to_target_counts_updates_and_gradient_evaluations(tmp_path):
    """The target is SGD's mean best validation at its smallest batch in the reference
    report (over the seeds of its best lr); a two-pass run pays two passes per sample; a
    run that never reaches the target is not reached, never its budget."""
    from sweeps import targets

    ref = tmp_path / "ref"
    ref.mkdir()
    rows = [dict(id=f"s{i}", status="done", optimizer="sgd", subset_seed=0, batch_size=b, lr=lr, val_accuracy=v)
            for i, (b, lr, v) in enumerate([(128, 0.01, 0.88), (128, 0.01, 0.90), (128, 0.02, 0.70),
                                            (2048, 0.05, 0.99)])]
    with open(ref / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    assert targets.targets_from(ref / "results.csv") == {0: pytest.approx(0.89)}
    runs = tmp_path / "runs"
    # 8192 samples at batch 2048: 4 updates an epoch, evaluated every 10 epochs (40 updates).
    run_folder(runs / "ga", optimizer="gradalign", beta=0.1, vals=(0.85, 0.88, 0.895, 0.90))
    run_folder(runs / "sgd", epochs=600, vals=(0.80, 0.85, 0.87, 0.889))
    run_folder(runs / "sgd_b", batch=512, epochs=150, vals=(0.891,))
    result = targets.write([runs], ref, tmp_path / "out")
    by_id = {m["id"]: m for m in result["measured"]}
    assert (by_id["ga"]["epoch_to_target"], by_id["ga"]["updates_to_target"]) == (30, 120)
    assert by_id["ga"]["grad_evals_to_target"] == 120 * 2 * 2048
    assert by_id["sgd_b"]["updates_to_target"] == 10 * 16 and by_id["sgd_b"]["grad_evals_to_target"] == 160 * 512
    assert not by_id["sgd"]["reached"] and by_id["sgd"]["updates_to_target"] is None
    text = (tmp_path / "out" / "steps_to_target.md").read_text()
    assert "| 2048 | gradalign | lr=0.05, β=0.1, 300 epochs | 1/1 | 120 | 0.49 | 40 |" in text
    assert "| 2048 | sgd | lr=0.05, 600 epochs | 0/1 | – | – | 40 |" in text
    assert (tmp_path / "out" / "steps_to_target.png").stat().st_size > 0
    with pytest.raises(FileNotFoundError, match="does not exist"):
        targets.write([runs], tmp_path / "nowhere", tmp_path / "out")


def test_scaling_model_combines_measured_updates_and_rates_with_the_ring_cost(tmp_path):
    """T(W) = U(128 W) · (128 / r + A · (2(W−1)α + 2(W−1)/W · S/β)): measured U interpolated
    log-log between batches, held at the full batch beyond the training set, never
    extrapolated below the smallest batch; two allreduces for a two-pass method."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("scaling_model", Path(__file__).parents[1] / "benchmarks/scaling_model.py")
    sm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sm)
    results = tmp_path / "results.csv"
    # the rates all come from one set of kernels, oneDNN's, where every method has a run there
    results.write_text("id,status,optimizer,batch_size,images_per_sec,onednn\n"
                       "a,done,sgd,2048,1000,on\nb,done,gradalign,2048,500,on\nc,done,sgd,512,1,on\n"
                       "d,done,sgd,2048,400,\ne,done,gradalign,2048,200,off\nf,done,sgd,2048,9,mixed\n")
    steps = tmp_path / "steps.csv"
    steps.write_text("id,subset_seed,batch_size,optimizer,lr,beta,epochs,reached,updates_to_target,chosen\n"
                     "a,0,2048,sgd,0.05,0,600,True,800,True\nb,0,2048,gradalign,0.05,0.1,300,True,400,True\n"
                     "c,0,8192,gradalign,0.1,0.1,700,True,100,True\nd,0,8192,gradalign,0.1,0.1,700,False,,True\n"
                     "e,0,8192,sgd,0.05,0,700,True,10,False\n")
    inputs = {"rates_from": [str(results)], "rate_batch": 2048, "steps_to_target": str(steps), "subset_seed": 0,
              "full_batch": 8192, "latency_s": 1e-3, "bandwidth_bytes_per_s": 1e6, "gradient_bytes": 1e6,
              "gradient_bytes_note": "test"}
    result = sm.predict(inputs)
    assert result["updates"]["gradalign"][8192] == (100.0, 1, 2)
    assert result["rows"][("sgd", 8)] is None          # below the smallest measured batch
    assert result["rows"][("sgd", 64)] is None         # 8192 not measured for the chosen sgd
    ga16 = result["rows"][("gradalign", 16)]
    comm = 2 * (2 * 15 * 1e-3 + 2 * 15 / 16 * 1.0)
    assert ga16["total_s"] == pytest.approx(400 * (128 / 500 + comm))
    assert result["rows"][("gradalign", 32)]["updates"] == pytest.approx(200.0)  # log-log midpoint
    held = result["rows"][("gradalign", 128)]
    assert held["held"] and held["updates"] == 100.0
    assert "| 16 | 2048 |" in sm.table(inputs, result)
    assert "gradalign 500, sgd 1000 (all on one set of CPU kernels: oneDNN)" in sm.table(inputs, result)
    # without oneDNN for SGD: Eigen covers neither, so each method takes what it has, said so
    results.write_text(results.read_text().replace("a,done,sgd,2048,1000,on", "a,done,sgd,2048,1000,mixed"))
    assert sm.rates([str(results)], 2048) == {"gradalign": (500.0, "oneDNN"), "sgd": (400.0, "unrecorded")}
    assert "not comparable" in sm.table(inputs, sm.predict(inputs))
    # a set that covers every method wins over a preferred one that does not
    results.write_text(results.read_text().replace("d,done,sgd,2048,400,", "d,done,sgd,2048,400,off"))
    assert sm.rates([str(results)], 2048) == {"gradalign": (200.0, "Eigen"), "sgd": (400.0, "Eigen")}


def test_paired_differences_against_gradalign_per_subset_and_pooled(tmp_path):
    """GradAlign − method, paired by (subset, seed): the numbers worked by hand.
    Subset 0 (where settings are chosen): GA 0.880/0.870/0.860, SAM 0.870/0.875/0.850
    -> +1.0, -0.5, +1.0: mean 0.5, std sqrt(0.75), SE 0.5, 2 of 3 ahead, not beyond 2 SE.
    SGD 0.850/0.845/0.840 -> +3.0, +2.5, +2.0: mean 2.5, SE sqrt(0.25/3) = 0.29, beyond.
    Subset 1 holds a worse SAM setting (rho 0.4) that subset 0 rejects: only the chosen
    rho 0.2 is paired there."""
    runs = tmp_path / "runs"
    ga = {0: (0.880, 0.870, 0.860), 1: (0.890, 0.880, 0.870)}
    sam = {0: (0.870, 0.875, 0.850), 1: (0.880, 0.880, 0.860)}
    sgd = {0: (0.850, 0.845, 0.840), 1: (0.860, 0.860, 0.860)}
    for subset in (0, 1):
        for seed in range(3):
            tag = f"{subset}{seed}"
            run_folder(runs / f"ga{tag}", optimizer="gradalign", beta=0.8, seed=seed, subset=subset,
                       test=ga[subset][seed])
            run_folder(runs / f"sam{tag}", optimizer="sam", extra_optim={"rho": 0.2}, seed=seed,
                       subset=subset, test=sam[subset][seed])
            run_folder(runs / f"samhi{tag}", optimizer="sam", extra_optim={"rho": 0.4}, seed=seed,
                       subset=subset, vals=(0.7,), test=0.1)
            run_folder(runs / f"sgd{tag}", epochs=600, seed=seed, subset=subset, test=sgd[subset][seed])
    table = report(runs, out=tmp_path / "out", equal_cost=True)["table"]
    paired = table[table.index("GradAlign against each method"):]
    subset0 = paired[:paired.index("subset_seed 1 (no part")]
    subset1 = paired[paired.index("subset_seed 1 (no part"):paired.index("All subsets")]
    pooled = paired[paired.index("All subsets"):]
    assert "| 2048 | sam | +0.50 ± 0.50 | 3 | 2 of 3 | no |" in subset0
    assert "| 2048 | sgd | +2.50 ± 0.29 | 3 | 3 of 3 | yes |" in subset0
    # subset 1: SAM +1.0, 0.0, +1.0 (mean 0.67, SE 0.33, not 2 SE); SGD +3, +2, +1 (SE 0.58)
    assert "| 2048 | sam | +0.67 ± 0.33 | 3 | 2 of 3 | no |" in subset1
    assert "| 2048 | sgd | +2.00 ± 0.58 | 3 | 3 of 3 | yes |" in subset1
    # pooled SAM: +1, -0.5, +1, +1, 0, +1: mean 0.583, std 0.665, SE 0.271 -> beyond 2 SE
    assert "| 2048 | sam | +0.58 ± 0.27 | 6 | 4 of 6 | yes |" in pooled
    assert "gradalign |" not in paired


def test_paired_differences_need_three_pairs_for_a_verdict(tmp_path):
    runs = tmp_path / "runs"
    for seed, (g, s) in enumerate([(0.88, 0.85), (0.87, 0.86)]):
        run_folder(runs / f"ga{seed}", optimizer="gradalign", beta=0.1, seed=seed, test=g)
        run_folder(runs / f"pen{seed}", optimizer="grad_penalty", beta=0.1, seed=seed, test=s)
    run_folder(runs / "sgd_lone", epochs=300, seed=5, test=0.80)  # no GradAlign run of seed 5
    table = report(runs, out=tmp_path / "out")["table"]
    assert "| 2048 | grad_penalty | +2.00 ± 1.00 | 2 | 2 of 2 | – |" in table
    assert "| 2048 | sgd |" not in table[table.index("GradAlign against"):]


def test_results_say_which_kernels_computed_each_run_and_the_archive_keeps_it(tmp_path):
    runs = tmp_path / "runs"
    # {run: (epoch its first recorded session started at, oneDNN in each session)}
    sessions = {"on": (0, [True, True]), "mixed": (0, [False, True]), "off": (0, [False]),
                "unrecorded": None, "first_part_unrecorded": (60, [True])}
    for seed, (name, recorded) in enumerate(sessions.items()):
        run_folder(runs / name, seed=seed)
        if recorded is not None:
            first, kernels = recorded
            (runs / name / "sessions.json").write_text(json.dumps(
                [{"start": first + 100 * i, "tensorflow": "2.x", "onednn": k, "gpus": 0}
                 for i, k in enumerate(kernels)]))
    report(runs, out=tmp_path / "out")
    with open(tmp_path / "out" / "results.csv") as f:
        got = {r["id"]: r["onednn"] for r in csv.DictReader(f)}
    assert got == {"on": "on", "mixed": "mixed", "off": "off", "unrecorded": "", "first_part_unrecorded": ""}
    assert (tmp_path / "out" / "runs" / "mixed" / "sessions.json").exists()
