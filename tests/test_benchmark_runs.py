"""The benchmarks' run handling (benchmarks/_shared.py): a stopped benchmark continues its runs where they
were, and never continues a run started with other options."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

import bayeslora as bl
from _toy_models import write_word_task
from bayeslora.io import read_json, write_json_atomic
from bayeslora.models import ModelLoadError
from bayeslora.runs import eval_dir

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from _shared import OPTIONS_FILE, Variant, finished_record, prepare_run


class StopAtStep(TrainerCallback):
    """Interrupt training as Ctrl-C would, at the start of a step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            raise KeyboardInterrupt


def test_a_stopped_benchmark_run_continues_and_other_options_start_again(tiny_llama_dir, tmp_path):
    task = write_word_task(tmp_path / "toy.jsonl", 12)
    options = dict(model=str(tiny_llama_dir), task=str(task), eval_tasks=[str(task)], rank=2, epochs=3,
                   batch_size=4, train_size=8, lr=1e-2, seed=3)  # fmt: skip
    run = tmp_path / "run"
    state, config, callbacks = prepare_run(options, run)
    assert state == "new"
    with pytest.raises(KeyboardInterrupt):  # stopped in the third epoch (2 steps per epoch)
        bl.train(config, progress=False, callbacks=[*callbacks, StopAtStep(5)])
    assert (run / OPTIONS_FILE).is_file() and (run / "checkpoints" / "checkpoint-4").is_dir()

    state, config, callbacks = prepare_run(options, run)
    assert state == "resumed"
    bl.train(config, progress=False, callbacks=callbacks)
    reference = bl.train(**options, output_dir=str(tmp_path / "reference"), progress=False)
    ours, expected = (load_file(str(r / "adapter" / "adapter_model.safetensors")) for r in (run, reference))
    for key in expected:
        torch.testing.assert_close(ours[key], expected[key], atol=1e-5, rtol=1e-5)

    shutil.rmtree(run / "eval")  # stopped while evaluating: only the evaluation is done again
    assert prepare_run(options, run)[:2] == ("trained", None)
    assert (run / "eval" / "toy" / "metrics.json").is_file()
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "run").symlink_to(run)  # the same runs reached through another path are still the same runs
    assert prepare_run(options, moved / "run")[:2] == ("trained", None)

    state, _, _ = prepare_run({**options, "lr": 5e-3}, run)  # other options: never continued
    assert state == "new" and not run.exists()


def test_a_run_stopped_during_its_out_of_distribution_evaluation_completes_it(tiny_llama_dir, tmp_path):
    task = write_word_task(tmp_path / "toy.jsonl", 12)
    other = write_word_task(tmp_path / "other.jsonl", 6)
    options = dict(model=str(tiny_llama_dir), task=str(task), eval_tasks=[str(task)], ood_tasks=[str(other)],
                   rank=2, epochs=1, batch_size=4, train_size=8, lr=1e-2, seed=3)  # fmt: skip
    run = tmp_path / "run"
    state, config, callbacks = prepare_run(options, run)
    assert state == "new"
    bl.train(config, progress=False, callbacks=callbacks)
    metrics_file = eval_dir(run, str(task)) / "metrics.json"
    assert set(read_json(metrics_file)["ood"]) == {str(other)}
    # stopped after the in-distribution evaluation, before the OOD task's: the metrics have no `ood` entry yet
    shutil.rmtree(eval_dir(run, str(other)))
    write_json_atomic(metrics_file, {k: v for k, v in read_json(metrics_file).items() if k != "ood"})
    assert prepare_run(options, run)[:2] == ("trained", None)
    assert set(read_json(metrics_file)["ood"]) == {str(other)}
    assert (eval_dir(run, str(other)) / "metrics.json").is_file()

    variant = Variant("lora", "lora", {})
    write_json_atomic(run / "benchmark.json", {"method": "lora", "options": {}})  # a record written without it
    assert finished_record(run, variant) is not None
    assert finished_record(run, variant, ood_tasks=[str(other)]) is None
    assert finished_record(run, variant, options=options) is not None  # the recipe the run was started with
    assert finished_record(run, variant, options={**options, "train_size": 6}) is None  # another recipe


def test_the_calibration_benchmark_records_every_ensemble_member_and_combines_them(tiny_llama_dir, tmp_path):
    """Each member's end-of-epoch evaluation is its own record (a member's used to replace the one before's),
    and the ensemble's curve combines them: at the last epoch it is the ensemble's final evaluation."""
    from bayeslora.io import read_json
    from calibration import EPOCHS_FILE, _epoch_callback, ensemble_epochs

    task = write_word_task(tmp_path / "toy.jsonl", 12)
    run = tmp_path / "ensemble"
    config = bl.make_config(model=str(tiny_llama_dir), task=str(task), eval_tasks=[str(task)], method="ensemble",
                            ensemble_size=2, rank=2, epochs=2, batch_size=4, train_size=8, lr=1e-2, seed=3,
                            output_dir=str(run))  # fmt: skip
    bl.train(config, progress=False, callbacks=[_epoch_callback(config, n_samples=1)])

    history = read_json(run / EPOCHS_FILE)
    assert [(r["epoch"], r["member"]) for r in history] == [
        (1, "member0"),
        (1, "member1"),
        (2, "member0"),
        (2, "member1"),
    ]
    assert history[2]["probs"] != history[3]["probs"]  # two members, not one recorded twice
    (final,) = [read_json(path) for path in (run / "eval").glob("*/metrics.json")]
    combined = ensemble_epochs(history, 2, "probs")
    assert [r["epoch"] for r in combined] == [1, 2]
    for key in ("accuracy", "ece", "nll", "brier"):
        assert combined[-1][key] == pytest.approx(final[key], abs=1e-6)
    assert ensemble_epochs(history[:3], 2, "probs") == combined[:1]  # an epoch not every member reached: left out
    assert combined[-1]["nll"] != ensemble_epochs(history, 2, "logits")[-1]["nll"]


def test_a_stored_record_stands_for_its_run_only_when_the_run_would_be_made_the_same_way(tmp_path):
    """The record store (committed with the results) lets a benchmark continue on another machine: a stored
    record is used for a run only with the same variant, the same recipe, every OOD task and every later
    evaluation present."""
    from _shared import RUN_OPTIONS_KEY, RecordStore

    store = RecordStore(tmp_path / "records" / "tag")
    run = tmp_path / "elsewhere" / "arc-easy-melora-seed1"
    variant = Variant("melora", "melora", {"sigma_lr": 0.05})
    options = {"task": "arc-easy", "method": "melora", "seed": 1, "sigma_lr": 0.05, "output_dir": str(run)}
    record = {"task": "arc-easy", "method": "melora", "options": {"sigma_lr": 0.05}, "seed": 1, "heldout": {},
              "ood": {"obqa": {}}}  # fmt: skip
    store.save(run, record, options)
    assert store.path(run) == tmp_path / "records" / "tag" / "arc-easy-melora-seed1.json"
    assert RUN_OPTIONS_KEY not in store.load(run, variant, options)
    assert store.load(run, variant, options) == record
    moved = tmp_path / "moved" / run.name  # the same run made under another root
    assert store.load(moved, variant, {**options, "output_dir": str(moved)}) == record
    assert store.load(run, variant, options, ood_tasks=["obqa"], needs=["heldout"]) == record
    assert store.load(run, Variant("melora", "melora", {"sigma_lr": 0.005}), options) is None  # other variant
    assert store.load(run, variant, {**options, "seed": 2}) is None  # another recipe
    assert store.load(run, variant, options, ood_tasks=["arc-challenge"]) is None  # an OOD task not evaluated
    assert store.load(run, variant, options, needs=["ts"]) is None  # temperature scaling not done yet
    assert store.load(tmp_path / "other-run", variant, options) is None


def test_a_stored_record_made_with_other_defaults_does_not_stand_for_its_run(tmp_path, capsys):
    """A record keeps its run's whole configuration: when a default changes, the same options no longer make the
    same run. An option added to the code later counts as None in older records."""
    from _shared import RUN_CONFIG_KEY, RecordStore, resolved_options

    store = RecordStore(tmp_path)
    run = tmp_path / "runs" / "sst2-blora-seed1"
    variant = Variant("blora", "blora", {})
    options = {"task": "sst2", "method": "blora", "seed": 1}
    store.save(run, {"method": "blora", "options": {}}, options)
    saved = read_json(store.path(run))
    assert saved[RUN_CONFIG_KEY]["gate_lambda"] == resolved_options(options)["gate_lambda"]
    assert "output_dir" not in saved[RUN_CONFIG_KEY]
    assert store.load(run, variant, options) is not None

    older = {key: value for key, value in saved[RUN_CONFIG_KEY].items() if key != "gate_lr"}  # before it existed
    write_json_atomic(store.path(run), {**saved, RUN_CONFIG_KEY: older})
    assert store.load(run, variant, options) is not None  # its default, None, is how runs were made before
    unbudgeted = {key: value for key, value in older.items() if key != "gate_budget"}
    write_json_atomic(store.path(run), {**saved, RUN_CONFIG_KEY: unbudgeted})
    assert store.load(run, variant, options) is None  # made before the budget existed: none, not today's default
    assert "gate_budget: None -> 0.25" in capsys.readouterr().out
    write_json_atomic(store.path(run), {**saved, RUN_CONFIG_KEY: {**older, "gate_lambda": 0.5}})
    assert store.load(run, variant, options) is None  # the default has changed since
    assert "gate_lambda: 0.5 -> " in capsys.readouterr().out
    without = {key: value for key, value in older.items() if key != "gate_cost"}  # an option with a non-None default
    write_json_atomic(store.path(run), {**saved, RUN_CONFIG_KEY: without})
    assert store.load(run, variant, options) is None


def test_a_stored_record_is_not_held_to_options_its_method_does_not_use(tmp_path, capsys):
    """A LoRA run's record stays valid when B-LoRA's gate defaults change; a B-LoRA run's does not."""
    from _shared import RUN_CONFIG_KEY, RecordStore

    store = RecordStore(tmp_path)
    for method in ("lora", "blora"):
        run = tmp_path / "runs" / f"sst2-{method}-seed1"
        variant, options = Variant(method, method, {}), {"task": "sst2", "method": method, "seed": 1}
        store.save(run, {"method": method, "options": {}}, options)
        saved = read_json(store.path(run))
        write_json_atomic(store.path(run), {**saved, RUN_CONFIG_KEY: {**saved[RUN_CONFIG_KEY], "gate_travel": 4.0}})
        assert (store.load(run, variant, options) is None) == (method == "blora")
    assert "gate_travel: 4.0 -> 8.0" in capsys.readouterr().out


def test_a_finished_run_made_before_a_default_changed_is_trained_again(tmp_path):
    """A run directory of the same variant and recipe made with another default (B-LoRA's travel 4 before it was 8)
    is neither reused as finished nor continued: it is another run."""
    import yaml

    from _shared import resolved_options

    options = {"task": "sst2", "method": "blora", "seed": 1}
    variant = Variant("blora", "blora", {})
    for travel, current in ((8.0, True), (4.0, False)):
        run = tmp_path / f"travel{travel:g}"
        write_json_atomic(run / "benchmark.json", {"method": "blora", "options": {}})
        write_json_atomic(run / OPTIONS_FILE, {**options, "output_dir": str(run)})
        (run / "train_summary.json").write_text("{}")
        config = {**resolved_options(options), "gate_travel": travel}
        (run / "config.yaml").write_text(yaml.safe_dump(config))
        assert (finished_record(run, variant, options=options) is not None) == current
    state, _, _ = prepare_run(options, run)  # the travel-4 run
    assert state == "new" and not run.exists()


def test_a_calibration_table_expects_other_seeds_of_the_chosen_variant_only(monkeypatch):
    """Of a family searched at seed 1 only the variant with the lowest held-out NLL is run at other seeds: the
    others are not listed as missing there; a variant outside every family is."""
    import calibration

    nll = {"a-lo": 1.2, "a-hi": 0.9, "fixed": 1.0}

    def stored(task, variant, seed, settings):
        heldout = {"nll": nll[variant.name], "accuracy": 0.5, "ece": 0.1}
        return "", {"task": task, "variant": variant.name, "seed": seed, "heldout": heldout}

    monkeypatch.setattr(calibration, "stored_or_finished", stored)
    variants = [Variant(name, "lora", {}) for name in nll]
    configurations = [("t", v, s) for v in variants for s in (1, 2, 3)]
    kept = calibration.without_unchosen_seeds(configurations, {"select": ["a=a-lo,a-hi"]})
    assert [(v.name, s) for _, v, s in kept] == [("a-lo", 1), ("a-hi", 1), ("a-hi", 2), ("a-hi", 3)] + [
        ("fixed", s) for s in (1, 2, 3)
    ]


def test_other_seeds_run_for_the_chosen_variant_only_once_the_choice_is_made(monkeypatch, tmp_path, capsys):
    """`--select` with seeds other than 1: refused while a member's seed 1 lacks its held-out evaluation (the
    choice could still change), then only the chosen member (and the variants outside every family) is run."""
    import calibration

    nll = {"a-lo": 1.2, "a-hi": 0.9}

    def stored(task, variant, seed, settings):
        if variant.name not in nll:
            return "", None
        heldout = {"nll": nll[variant.name], "accuracy": 0.5, "ece": 0.1}
        return "", {"task": task, "variant": variant.name, "seed": seed, "heldout": heldout}

    run = []
    monkeypatch.setattr(calibration, "stored_or_finished", stored)
    monkeypatch.setattr(
        calibration, "run_benchmark", lambda _, configurations, **kw: run.extend(c[:3] for c in configurations)
    )
    argv = ["--tasks", "t", "--seeds", "2", "--select", "a=a-lo,a-hi,a-new", "--out", str(tmp_path)]
    with pytest.raises(SystemExit):  # a-new has no seed-1 run yet
        calibration.main([*argv, "--variants", "fixed=lora", "a-lo=lora", "a-hi=lora", "a-new=lora"])
    assert "not finished for: t a-new" in capsys.readouterr().err
    nll["a-new"] = 1.0
    calibration.main([*argv, "--variants", "fixed=lora", "a-lo=lora", "a-hi=lora", "a-new=lora"])
    assert [(task, v.name, seed) for task, v, seed in run] == [("t", "fixed", 2), ("t", "a-hi", 2)]


def test_the_calibration_benchmark_uses_a_stored_record_instead_of_training_again(tmp_path):
    from _shared import RecordStore
    from calibration import run_one, run_options, stored_or_finished

    settings = dict(model="no-such-model", train_size=8, epochs=1, batch_size=4, lr=1e-2, limit=4, samples=2,
                    rank=2, alpha=4.0, heldout_eval=4, ts_heldout=4, ood={"arc-easy": ["obqa"]},
                    root=str(tmp_path / "runs"), store=str(tmp_path / "records"))  # fmt: skip
    variant = Variant("lora", "lora", {})
    run_dir = tmp_path / "runs" / "arc-easy-lora-seed1"
    record = {"task": "arc-easy", "variant": "lora", "method": "lora", "options": {}, "seed": 1, "heldout": {},
              "ts": {}, "ood": {"obqa": {}}}  # fmt: skip
    assert stored_or_finished("arc-easy", variant, 1, settings) == ("arc-easy lora seed 1", None)
    RecordStore(tmp_path / "records").save(run_dir, record, run_options("arc-easy", variant, 1, settings))
    assert run_one("arc-easy", variant, 1, settings) == record  # training would fail: there is no such model
    assert not run_dir.exists()
    assert stored_or_finished("arc-easy", variant, 1, settings) == ("arc-easy lora seed 1", record)
    with pytest.raises(ModelLoadError):  # with another recipe the record does not stand for the run: it trains
        run_one("arc-easy", variant, 1, {**settings, "lr": 5e-3})


def test_the_calibration_benchmark_reuses_a_finished_run_only_with_its_recipe(tmp_path):
    """A finished run directory (its benchmark.json) stands for the configuration only if the run recorded the
    recipe the benchmark asks for now: with another learning rate it is trained again."""
    from bayeslora.io import write_json_atomic
    from calibration import run_one, run_options, stored_or_finished

    settings = dict(model="no-such-model", train_size=8, epochs=1, batch_size=4, lr=1e-2, limit=4, samples=2,
                    rank=2, alpha=4.0, root=str(tmp_path / "runs"), store=str(tmp_path / "records"))  # fmt: skip
    variant = Variant("lora", "lora", {})
    run_dir = tmp_path / "runs" / "arc-easy-lora-seed1"
    record = {"task": "arc-easy", "variant": "lora", "method": "lora", "options": {}, "seed": 1}
    write_json_atomic(run_dir / "benchmark.json", record)
    options = run_options("arc-easy", variant, 1, settings)
    write_json_atomic(run_dir / OPTIONS_FILE, {**options, "output_dir": str(run_dir)})
    assert run_one("arc-easy", variant, 1, settings) == record  # training would fail: there is no such model
    assert stored_or_finished("arc-easy", variant, 1, settings)[1] == record
    assert stored_or_finished("arc-easy", variant, 1, {**settings, "lr": 5e-3})[1] is None  # nor tabulated
    with pytest.raises(ModelLoadError):
        run_one("arc-easy", variant, 1, {**settings, "lr": 5e-3})


def test_a_bayesian_runs_record_keeps_its_posterior_width_per_module_kind(tiny_llama_dir, tmp_path):
    """The calibration benchmark's record of a Me-LoRA run holds what `bayeslora posterior` reports (the widths by
    data size are tabulated from records, on any machine); a LoRA run's holds none."""
    from _toy_models import train_toy
    from bayeslora.pipeline.posterior import posterior_report
    from calibration import _with_posterior_width, posterior_width_section

    task = write_word_task(tmp_path / "toy.jsonl", 8)
    melora = train_toy(tiny_llama_dir, task, tmp_path / "melora", method="melora", samples=2)
    record = _with_posterior_width({"task": "toy", "variant": "melora", "method": "melora", "seed": 1}, melora)
    assert [w["module"] for w in record["posterior_width"]] == ["q_proj", "v_proj", "lm_head"]
    assert read_json(melora / "benchmark.json")["posterior_width"] == record["posterior_width"]
    posterior_report([melora], tmp_path / "report")
    reported = read_json(tmp_path / "report" / "posterior.json")["summary"]
    assert [{k: v for k, v in row.items() if k != "run"} for row in reported] == record["posterior_width"]
    table = posterior_width_section([record], [("toy", "melora")])
    assert any("| toy | melora | q_proj | 2 |" in line for line in table)
    lora = {"task": "toy", "variant": "lora", "method": "lora", "seed": 1}
    assert _with_posterior_width(lora, tmp_path / "no-run") == lora


def test_stored_predictions_are_the_same_bytes_for_the_same_predictions(tmp_path):
    """A committed predictions file changes only when the predictions do (no time in its gzip header)."""
    import time

    from _shared import read_predictions, result_label, write_predictions

    results = [{"task": "arc-easy", "variant": "lora", "seed": 1, "predictions": {"probs": [[0.25, 0.75]]}}]
    write_predictions(tmp_path / "a.json.gz", results)
    time.sleep(1.1)  # gzip's header time has a resolution of one second
    write_predictions(tmp_path / "b.json.gz", results)
    assert (tmp_path / "a.json.gz").read_bytes() == (tmp_path / "b.json.gz").read_bytes()
    assert read_predictions(tmp_path / "a.json.gz") == {result_label(results[0]): {"probs": [[0.25, 0.75]]}}


def test_a_stored_record_whose_recipe_is_refused_now_is_stale_not_a_crash():
    """`gate_lambda: 0` with a gate budget is refused since the budget became a default: such a stored record is
    set aside (the table reader skips it) instead of stopping the tabulation."""
    from _shared import RUN_CONFIG_KEY, RUN_OPTIONS_KEY, stale_defaults

    recipe = {"task": "sst2", "method": "blora", "seed": 1, "gate_lambda": 0.0}
    (why,) = stale_defaults({RUN_OPTIONS_KEY: recipe, RUN_CONFIG_KEY: {}})
    assert why.startswith("its recipe is refused now:")


def test_the_selection_table_says_when_a_choice_waits_for_members():
    from calibration import selection_section

    def record(variant: str, nll: float) -> dict:
        return {"task": "t", "variant": variant, "seed": 1, "heldout": {"nll": nll, "accuracy": 0.5, "ece": 0.1}}

    partial = "\n".join(selection_section([record("a-lo", 1.2)], ["a=a-lo,a-hi"]))
    assert "| t | a | a-lo (best so far: 1 of 2) | 1.200 |" in partial and "**chosen**" not in partial
    complete = "\n".join(selection_section([record("a-lo", 1.2), record("a-hi", 0.9)], ["a=a-lo,a-hi"]))
    assert "| t | a | a-hi **chosen** | 0.900 |" in complete and "| t | a | a-lo | 1.200 |" in complete


def test_kept_probabilities_keep_their_relative_precision_however_small():
    """6 significant digits, not 6 decimals: an answer's probability of 1e-9 would have become 0 (an NLL of 745
    nats for that question instead of 20.7)."""
    from calibration import _rounded

    probs = torch.tensor([[1 - 1.234567e-9 - 0.3, 1.234567e-9, 0.3]], dtype=torch.float64)
    kept = torch.tensor(_rounded(probs), dtype=torch.float64)
    assert torch.allclose(kept, probs, rtol=5e-6, atol=0)
    assert abs(kept[0, 1].log() - probs[0, 1].log()) < 1e-5


def _evaluation_like(run: Path, source: str, task: str, generator: torch.Generator) -> torch.Tensor:
    """A copy of the run's evaluation on ``source`` as one on ``task``, with other probabilities (so that reading
    the wrong folder shows)."""
    from safetensors.torch import save_file

    from bayeslora.evaluation.evaluate import PREDICTIONS_FILE

    shutil.copytree(eval_dir(run, source), eval_dir(run, task))
    labels = load_file(str(eval_dir(run, source) / PREDICTIONS_FILE))["labels"]
    probs = torch.randn(labels.shape[0], 2, generator=generator).mul(8).softmax(-1)
    save_file({"probs": probs, "labels": labels}, str(eval_dir(run, task) / PREDICTIONS_FILE))
    return probs


def test_a_runs_record_in_the_lossy_format_reads_its_probabilities_again_from_the_run(
    tiny_llama_dir, tmp_path, monkeypatch
):
    """A finished run whose record kept 6 decimals gets every per-question probability (its task, an
    out-of-distribution one, both temperature-scaled) from its evaluations again, in the record, the run's
    benchmark.json and, when a table reads the run, the record store."""
    import calibration
    from _toy_models import train_toy
    from bayeslora.evaluation import load_predictions
    from calibration import PREDICTION_FORMAT, _with_exact_predictions

    task, run = write_word_task(tmp_path / "toy.jsonl", 8), tmp_path / "lora"
    train_toy(tiny_llama_dir, task, run, method="lora")
    generator = torch.Generator().manual_seed(0)
    expected = {"own": load_predictions(eval_dir(run, "toy")).probs}
    for name, source, target in (("ts", "toy", "toy-ts"), ("ood", "toy", "other"), ("ood-ts", "toy", "other-ts")):
        expected[name] = _evaluation_like(run, source, target, generator)
    metrics = read_json(eval_dir(run, "toy") / "metrics.json")
    write_json_atomic(eval_dir(run, "toy") / "metrics.json", {**metrics, "ood": {"other": {"auroc_entropy": 0.5}}})

    def lossy(probs: torch.Tensor) -> list:
        return [[round(float(p), 6) for p in row] for row in probs.tolist()]

    old = {
        "task": "toy",
        "ts": {"nll": 1.0},
        "ood": {"other": {"nll": 1.0}},
        "predictions": {"probs": lossy(expected["own"]), "ts": lossy(expected["ts"]), "ood": {"other": {}}},
    }
    record = _with_exact_predictions(old, run, {})
    kept = record["predictions"]
    assert kept["format"] == PREDICTION_FORMAT
    assert kept["labels"] == load_predictions(eval_dir(run, "toy")).labels.tolist()
    for name, values in (("own", kept["probs"]), ("ts", kept["ts"]), ("ood", kept["ood"]["other"]["probs"]),
                         ("ood-ts", kept["ood"]["other"]["ts"])):  # fmt: skip
        assert torch.allclose(torch.tensor(values, dtype=torch.float64), expected[name].double(), rtol=5e-6), name
    assert record["ood"] == old["ood"] and record["ts"] == old["ts"]
    assert read_json(run / "benchmark.json") == record
    assert _with_exact_predictions(record, tmp_path / "gone", {}) is record  # already exact: the run is not read

    # a table reading the run: the record it gets, and the store, hold the exact probabilities
    saved = []
    monkeypatch.setattr(calibration, "_save", lambda run_dir, record, *_: saved.append((run_dir, record)))
    monkeypatch.setattr(calibration, "run_options", lambda *_: {})
    monkeypatch.setattr(
        calibration, "finished_or_stored", lambda *args: ("label", args[-1](old, run))
    )  # what finished_or_stored does with a run's record
    _, tabulated = calibration.stored_or_finished("toy", Variant("lora", "lora", {}), 1, {})
    assert tabulated["predictions"]["format"] == PREDICTION_FORMAT and saved == [(run, tabulated)]


def test_a_runs_record_is_refreshed_only_when_it_comes_from_the_run(monkeypatch, tmp_path):
    import _shared

    settings = {"root": str(tmp_path / "runs"), "store": str(tmp_path / "records")}
    variant = Variant("lora", "lora", {})
    monkeypatch.setattr(_shared, "finished_record", lambda *_: {"from": "run"})
    refreshed = _shared.finished_or_stored(settings, "t", variant, 1, {}, refresh=lambda r, d: {**r, "at": d.name})
    assert refreshed[1] == {"from": "run", "at": "t-lora-seed1"}
    monkeypatch.setattr(_shared, "finished_record", lambda *_: None)
    assert _shared.finished_or_stored(settings, "t", variant, 1, {}, refresh=lambda r, d: 1 / 0)[1] is None


def _kept(variant: str, probs: list, labels: list, nll: float, exact: bool, **more) -> dict:
    from calibration import PREDICTION_FORMAT

    predictions = {"probs": probs, "labels": labels, **({"format": PREDICTION_FORMAT} if exact else {})}
    return {"task": "t", "variant": variant, "seed": 1, "final": {"nll": nll}, "predictions": predictions, **more}


def _rows(section: list[str]) -> dict[str, str]:
    """{`task | difference` cells: the row} of an intervals section."""
    return {
        " | ".join(line.split(" | ")[:2]).lstrip("| "): line for line in section if line.startswith(("| t |", "| t → "))
    }


def test_a_paired_nll_is_left_out_where_kept_probabilities_do_not_reproduce_it():
    """An old record whose answer's probability was rounded to 0 (its NLL was 14.5 for that question, not 690)
    gets no NLL interval, on its task, temperature-scaled, or out of distribution; accuracy and ECE, which rounding
    does not move, keep theirs; an old record whose probabilities reproduce its NLL keeps its NLL interval."""
    from bayeslora.evaluation.metrics import negative_log_likelihood
    from calibration import intervals_section

    labels = [0, 1, 0, 1]
    sure = [[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]]
    rounded = [[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [1.0, 0.0]]  # the answer's 3e-7 kept as 0

    def nll(probs: list) -> float:
        return negative_log_likelihood(torch.tensor(probs), torch.tensor(labels))

    ood = {"o": {"probs": sure, "ts": rounded, "labels": labels}}
    a = _kept("a", sure, labels, nll(sure), exact=True, ts={"nll": nll(sure)})
    a["predictions"].update(ts=sure, ood=ood)
    b = _kept("b", rounded, labels, 3.72, exact=False, ts={"nll": nll(sure)},
              ood={"o": {"nll": nll(sure), "ts": {"nll": 3.72}}})  # fmt: skip
    b["predictions"].update(ts=sure, ood=ood)
    rows = _rows(intervals_section([a, b], ["a:b", "a:b+ts"]))
    lossy = ["t | a − b", "t → o | a − b+ts"]
    exact = ["t | a − b+ts", "t → o | a − b"]
    assert sorted(rows) == sorted(lossy + exact)
    for key in lossy:
        assert rows[key].endswith("| – (kept probabilities lossy) |") and rows[key].count("[") == 2, key
    for key in exact:
        assert rows[key].count("[") == 3 and "lossy" not in rows[key], key
    reproduced = _kept("b", sure, labels, nll(sure), exact=False)
    assert _rows(intervals_section([a, reproduced], ["a:b"]))["t | a − b"].count("[") == 3
    other_questions = _kept("b", sure, [1, 1, 0, 1], 0.5, exact=True)
    with pytest.raises(ValueError, match="other questions"):
        intervals_section([a, other_questions], ["a:b"])


def test_a_pairs_side_named_after_a_family_is_the_variant_it_chose_on_held_out_questions():
    """The choice is the member with the lowest held-out NLL (a-hi here), not the lowest evaluation NLL (a-lo);
    before every member is in, the row says the choice may change."""
    from calibration import intervals_section

    labels, probs = [0, 1], [[0.9, 0.1], [0.2, 0.8]]
    lo, hi, b = (_kept(v, probs, labels, nll, exact=True) for v, nll in (("a-lo", 0.1), ("a-hi", 0.5), ("b", 0.2)))
    lo["heldout"], hi["heldout"] = {"nll": 0.9, "accuracy": 1, "ece": 0}, {"nll": 0.7, "accuracy": 1, "ece": 0}
    assert list(_rows(intervals_section([lo, hi, b], ["a:b"], ["a=a-lo,a-hi"]))) == ["t | a-hi − b"]
    partial = _rows(intervals_section([lo, b], ["a:b"], ["a=a-lo,a-hi"]))
    assert list(partial) == ["t | a-lo (best so far: 1 of 2) − b"]
