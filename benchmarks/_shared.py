"""What the benchmark scripts share: named variants of a method, a process pool of runs, mean ± std cells."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from bayeslora.io import read_json, write_json_atomic, write_text_atomic


@dataclass(frozen=True)
class Variant:
    """A row of a table: a method and the options that differ from its defaults."""

    name: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)


def parse_variant(text: str) -> Variant:
    """``name=method:key=value,key=value`` (values parsed as JSON when they are JSON), or a bare method name."""
    name, _, spec = text.partition("=")
    if not spec:
        return Variant(name, name)
    method, _, assignments = spec.partition(":")
    options: dict[str, Any] = {}
    for assignment in filter(None, assignments.split(",")):
        key, _, value = assignment.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return Variant(name, method, options)


def run_directory(root: str | Path, task: str, variant: Variant, seed: int) -> Path:
    """Where the benchmark keeps the run of (task, variant, seed)."""
    return Path(root) / f"{task}-{variant.name}-seed{seed}"


def finished_or_stored(
    settings: dict[str, Any],
    task: str,
    variant: Variant,
    seed: int,
    options: dict[str, Any],
    ood_tasks: Sequence[str] = (),
    needs: Sequence[str] = (),
    refresh: Callable[[dict[str, Any], Path], dict[str, Any]] | None = None,
) -> tuple[str, dict[str, Any] | None]:
    """(label, record or None) of a configuration, what ``run_benchmark(finished=...)`` takes (``--tabulate``):
    its run's ``benchmark.json`` under ``settings["root"]`` if the run was made with ``options`` (the recipe, the
    defaults of now, every OOD task), passed through ``refresh(record, run_dir)`` if given, else its record in the
    record store ``settings["store"]`` under the same conditions and with every key in ``needs``."""
    run_dir = run_directory(settings["root"], task, variant, seed)
    record = finished_record(run_dir, variant, ood_tasks, options)
    if record is not None and refresh is not None:
        record = refresh(record, run_dir)
    if record is None:
        record = RecordStore(Path(settings["store"])).load(run_dir, variant, options, ood_tasks, needs)
    return f"{task} {variant.name} seed {seed}", record


#: The options a benchmark run was started with, in the run: only a run started with the same options is continued.
OPTIONS_FILE = "benchmark_options.json"


def _without_location(options: dict[str, Any]) -> dict[str, Any]:
    """Run options without where the run is: a results directory that was moved or reached through another
    path holds the same runs."""
    return {key: value for key, value in options.items() if key != "output_dir"}


def prepare_run(options: dict[str, Any], run_dir: Path) -> tuple[str, Any, list]:
    """How to (re)start the run at ``run_dir`` with these ``bayeslora.make_config`` options, picking up what an
    interrupted benchmark left there if it was started with the same options. Returns
    ``(state, config, callbacks)``, the callbacks to pass to ``bayeslora.train`` with the config:

    * ``("trained", None, [])``: training finished; its evaluation is completed if the benchmark was
      stopped during it;
    * ``("resumed", config, callbacks)``: continue from the run's last complete checkpoint, or an ensemble after
      its last finished member (``--resume``);
    * ``("new", config, callbacks)``: train from the start; an unfinished run with other options, or one that
      cannot be continued, is deleted first (benchmark runs are the benchmark's own).

    The callbacks save a checkpoint at the end of every epoch, after the other callbacks' end-of-epoch work
    (the per-epoch evaluations), so a stopped benchmark loses at most the epoch it was in."""
    import bayeslora as bl
    from bayeslora.runs import TRAIN_SUMMARY, RunExistsError, eval_dir
    from bayeslora.runs.checkpoints import resume_point

    options = json.loads(json.dumps({**options, "output_dir": str(run_dir)}))
    recorded = read_json(run_dir / OPTIONS_FILE) if (run_dir / OPTIONS_FILE).is_file() else None
    callbacks = [EpochCheckpoints(), RecordOptions(run_dir / OPTIONS_FILE, options)]
    if changed := run_made_with_other_defaults(run_dir, options):
        reason = f"made with other defaults than the code has now: {'; '.join(changed)}"
    elif recorded is not None and _without_location(recorded) == _without_location(options):
        if (run_dir / TRAIN_SUMMARY).is_file():
            if not evaluation_complete(eval_dir(run_dir, options["task"]), options.get("ood_tasks") or ()):
                print(f"{run_dir}: trained, evaluating it", flush=True)
                bl.evaluate(run_dir, ood_tasks=options.get("ood_tasks") or (), overwrite=True, progress=False)
            return "trained", None, []
        try:
            config = bl.make_config(**options, resume=True)
            resume_point(config, run_dir)
        except (FileNotFoundError, RunExistsError, ValueError) as why:
            reason = str(why).splitlines()[0]
        else:
            print(f"{run_dir}: continuing from its last checkpoint", flush=True)
            return "resumed", config, callbacks
    elif recorded is None:
        reason = "no benchmark options recorded"
    else:
        reason = "it was started with other options"
    if run_dir.exists():
        print(f"{run_dir}: training again ({reason})", flush=True)
        shutil.rmtree(run_dir)
    return "new", bl.make_config(**options), callbacks


def evaluation_complete(evaluation: Path, ood_tasks: Sequence[str] = ()) -> bool:
    """Whether the evaluation directory ``evaluation`` holds a finished evaluation: its metrics are written and, if
    the run is evaluated out of distribution on ``ood_tasks`` too, the entry of every one of them, which is added
    to the in-distribution metrics after the last OOD task (a benchmark stopped in between left the metrics
    without it)."""
    metrics = evaluation / "metrics.json"
    return metrics.is_file() and task_names(ood_tasks) <= set(read_json(metrics).get("ood", {}))


def task_names(tasks: Sequence[str]) -> set[str]:
    """The names under which evaluations of ``tasks`` (registry names, ``mmlu:<subject>``, JSONL paths, ``hf:``
    specs) are recorded."""
    from bayeslora.tasks import load_task

    return {load_task(task).name for task in tasks}


class EpochCheckpoints(TrainerCallback):
    """Save a checkpoint at the end of every epoch (after the end-of-epoch work of the other callbacks)."""

    def on_epoch_end(self, args, state, control, **kwargs):
        control.should_save = True


class RecordOptions(TrainerCallback):
    """Write the benchmark's options into a new run when its training starts."""

    def __init__(self, path: Path, options: dict[str, Any]) -> None:
        self.path, self.options = path, options

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.path.is_file():
            write_json_atomic(self.path, self.options)


TABULATE_HELP = "Train nothing: make the tables from the finished runs among the configurations, listing the others."


def finished_record(
    run_dir: Path, variant: Variant, ood_tasks: Sequence[str] = (), options: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The ``benchmark.json`` a finished run wrote last, if the run was made with ``variant``'s method and
    options (a run left by an earlier definition of the variant is trained again, not reused), with all of
    ``options`` (the run's ``bayeslora.make_config`` options, recorded in the run when it started; a run with
    another recipe is trained again) and holds the evaluation on every one of ``ood_tasks`` (otherwise its
    evaluation is completed and the record written again)."""
    path = run_dir / "benchmark.json"
    if not path.is_file():
        return None
    record = read_json(path)
    if record.get("method") != variant.method or record.get("options", {}) != variant.options:
        print(f"{run_dir} was made with other options than '{variant.name}' has now: not reused", flush=True)
        return None
    if options is not None:
        recorded = read_json(run_dir / OPTIONS_FILE) if (run_dir / OPTIONS_FILE).is_file() else {}
        if _without_location(recorded) != _without_location(json.loads(json.dumps(options))):
            why = "another recipe than the benchmark's now" if recorded else "no recipe recorded"
            print(f"{run_dir} was trained with {why}: not reused", flush=True)
            return None
        if changed := run_made_with_other_defaults(run_dir, options):
            print(
                f"{run_dir} was made with other defaults than the code has now ({'; '.join(changed)}): not reused",
                flush=True,
            )
            return None
    if missing := sorted(task_names(ood_tasks) - set(record.get("ood", {}))):
        print(f"{run_dir}: its record lacks the evaluation on {', '.join(missing)}: completing it", flush=True)
        return None
    return record


#: The keys under which a stored record keeps the options its run was trained with, and its whole configuration.
RUN_OPTIONS_KEY = "run_options"
RUN_CONFIG_KEY = "run_config"


def _not_compared() -> tuple[str, ...]:
    from bayeslora.runs.checkpoints import RUN_HANDLING

    return (*RUN_HANDLING, "target_modules", "scoring", "eval_tasks")


#: Configuration entries a stored record is not held to: how a run is kept (bayeslora's own list of the options
#: that do not change a run's result), and what is resolved only with the model and task loaded (the options that
#: decide them are compared).
NOT_COMPARED = _not_compared()


def resolved_options(options: dict[str, Any]) -> dict[str, Any]:
    """Every option of the run ``options`` describe as the code resolves it now (defaults and the method's own
    resolution included), JSON-normalised, without the method-specific options its method does not use (B-LoRA's
    gate options in a LoRA run: their defaults cannot change it): what a stored record's configuration is compared
    with."""
    import dataclasses

    import bayeslora as bl
    from bayeslora.config import option_users

    config = bl.make_config(**options)
    method = bl.get_method(config.method)
    config = method.resolve(config)
    used = method.used_options(config)
    resolved = json.loads(json.dumps(dataclasses.asdict(config)))
    return {key: value for key, value in resolved.items() if key in used or option_users(key) is None}


def changed_defaults(stored: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The options whose value in a stored run's configuration differs from what the run would be made with now
    (``key: old -> new``). An option the stored configuration lacks (added to the code later) has the value it had
    before it existed where bayeslora records one (:func:`bayeslora.runs.layout.with_legacy_defaults`), else None:
    a new option whose default is neither makes older records stale, which errs towards training again."""
    from bayeslora.runs.layout import with_legacy_defaults

    stored = with_legacy_defaults(stored)
    return [
        f"{key}: {stored.get(key)!r} -> {value!r}"
        for key, value in now.items()
        if key not in NOT_COMPARED and json.loads(json.dumps(stored.get(key))) != value
    ]


def run_made_with_other_defaults(run_dir: Path, options: dict[str, Any]) -> list[str]:
    """:func:`changed_defaults` of the run at ``run_dir`` (its ``config.yaml``, if it has one) against what
    ``options`` resolve to now: a run of the same options made before a default changed is another run."""
    from bayeslora.io import read_yaml
    from bayeslora.runs import CONFIG_FILE

    config_file = Path(run_dir) / CONFIG_FILE
    if not config_file.is_file():
        return []
    options = {key: value for key, value in options.items() if key != "output_dir"}
    return changed_defaults(read_yaml(config_file), resolved_options(options))


def stale_defaults(record: dict[str, Any]) -> list[str]:
    """:func:`changed_defaults` of a stored record (its configuration against what its recipe resolves to now);
    [] for a record without them (a run directory's ``benchmark.json``)."""
    config, recipe = record.get(RUN_CONFIG_KEY), record.get(RUN_OPTIONS_KEY)
    if config is None or recipe is None:
        return []
    try:
        resolved = resolved_options(recipe)
    except ValueError as why:  # a recipe the code refuses now (an option combination since forbidden)
        return [f"its recipe is refused now: {str(why).splitlines()[0]}"]
    return changed_defaults(config, resolved)


@dataclass(frozen=True)
class RecordStore:
    """Finished runs' records kept in the repository (``<results>/records/<tag>/<run name>.json``), so that a
    benchmark that outlives the machine it started on continues on another one from what was committed: run
    directories (adapters, checkpoints) stay on the machine that trained them, while the record, everything the
    tables are made from (per-question predictions included), travels with the code.

    A stored record stands for its run only if the run would be made the same way now: the same method and
    variant options, the same ``bayeslora.make_config`` options (the recipe), the same value of every option the
    code resolves them to (a changed default makes a record stale: :func:`changed_defaults`), every
    out-of-distribution task evaluated, and every key in ``needs`` (``heldout``, ``ts``: the evaluations added
    after training) present. What the code does with the same options is not checked: whoever changes a behaviour
    deletes the records made before it from the store, and their run directories (a benchmark stores the record of
    a finished run directory again)."""

    directory: Path

    def path(self, run_dir: Path) -> Path:
        return self.directory / f"{Path(run_dir).name}.json"

    def save(self, run_dir: Path, record: dict[str, Any], options: dict[str, Any]) -> None:
        """Keep ``record`` of the run at ``run_dir`` (trained with ``options``), replacing an earlier copy, with the
        run's whole configuration: its ``config.yaml`` where it has one (what it was trained with), else the
        options as the code resolves them now."""
        from bayeslora.io import read_yaml
        from bayeslora.runs import CONFIG_FILE

        recipe = _without_location(json.loads(json.dumps(options)))
        config_file = Path(run_dir) / CONFIG_FILE
        config = read_yaml(config_file) if config_file.is_file() else resolved_options(options)
        config = {key: value for key, value in json.loads(json.dumps(config)).items() if key not in NOT_COMPARED}
        write_json_atomic(self.path(run_dir), {**record, RUN_OPTIONS_KEY: recipe, RUN_CONFIG_KEY: config})

    def load(
        self,
        run_dir: Path,
        variant: Variant,
        options: dict[str, Any],
        ood_tasks: Sequence[str] = (),
        needs: Sequence[str] = (),
    ) -> dict[str, Any] | None:
        """The stored record of the run at ``run_dir`` if it stands for the run described (see the class), else
        None (with a line saying why, when a stored record was set aside)."""
        path = self.path(run_dir)
        if not path.is_file():
            return None
        stored = read_json(path)
        recipe = stored.pop(RUN_OPTIONS_KEY, None)
        config = stored.pop(RUN_CONFIG_KEY, None)
        if stored.get("method") != variant.method or stored.get("options", {}) != variant.options:
            why = f"made with other options than '{variant.name}' has now"
        elif recipe != _without_location(json.loads(json.dumps(options))):
            why = "trained with another recipe than the benchmark's now"
        elif config is not None and (changed := changed_defaults(config, resolved_options(options))):
            why = f"made with other defaults than the code has now ({'; '.join(changed)})"
        elif missing := sorted(task_names(ood_tasks) - set(stored.get("ood", {}))):
            why = f"without the evaluation on {', '.join(missing)}"
        elif missing := [key for key in needs if key not in stored]:
            why = f"without its {', '.join(missing)} evaluation"
        else:
            return stored
        print(f"{path}: the stored record was {why}: not used", flush=True)
        return None


def metrics_row(metrics: dict[str, Any]) -> dict[str, float]:
    """Accuracy, ECE, NLL and Brier of an evaluation's metrics."""
    return {key: metrics[key] for key in ("accuracy", "ece", "nll", "brier")}


def with_heldout(record: dict[str, Any], run_dir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The record with the metrics of the run on held-out training questions (``bayeslora eval --heldout``,
    predicted as the method predicts): what hyperparameters are chosen on. Computed once, stored in the run's
    ``benchmark.json``."""
    import bayeslora as bl
    from bayeslora.io import write_json_atomic

    size = settings.get("heldout_eval", 0)
    if not size or "heldout" in record:
        return record
    metrics = bl.evaluate(run_dir, heldout=size, overwrite=True, progress=False)
    record = {**record, "heldout": {**metrics_row(metrics), "n_examples": metrics["n_examples"]}}
    write_json_atomic(run_dir / "benchmark.json", record)
    return record


#: How a benchmark record keeps its per-question probabilities (``predictions["format"]``): each to 6 significant
#: digits. Records without it kept 6 decimals, which turned every probability below 5e-7 into 0.
PREDICTION_FORMAT = "6 significant digits"
#: A table's NLL cell where a side's kept probabilities are lossy (:func:`lossy_probabilities`).
LOSSY_CELL = "– (kept probabilities lossy)"


def lossy_probabilities(kept_format: str | None, probs: Any, labels: Any, recorded_nll: float) -> bool:
    """Whether per-question probabilities (``probs``: (n, k) tensor, ``labels``: (n,)) that a record kept in
    ``kept_format`` miss the NLL their evaluation recorded, −(1/n)·Σᵢ log pᵢ,yᵢ, by more than 1e-3 nats: a record of
    the old 6-decimal format with answers of probability below 5e-7, whose per-question NLL is not known. Records
    in :data:`PREDICTION_FORMAT` are exact."""
    from bayeslora.evaluation.metrics import negative_log_likelihood

    if kept_format == PREDICTION_FORMAT:
        return False
    return abs(negative_log_likelihood(probs, labels) - recorded_nll) > 1e-3


def interval_text(difference: dict[str, Any], scale: float = 1.0, digits: int = 3) -> str:
    """``+d [low, high]`` of a paired difference (``PairedDifference.to_dict()``), times ``scale`` (100: points)."""
    values = (scale * difference[key] for key in ("difference", "low", "high"))
    return "{:+.{d}f} [{:+.{d}f}, {:+.{d}f}]".format(*values, d=digits)


def mean_std(values: Sequence[float], scale: float = 1.0, digits: int = 1) -> str:
    """``mean ± std`` of ``values × scale`` (just the value when there is one)."""
    values = [v * scale for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_all(
    worker: Callable[..., dict[str, Any]],
    configurations: Sequence[tuple],
    jobs: int,
    on_result: Callable[[dict[str, Any]], None],
) -> None:
    """``worker(*configuration)`` for every configuration, ``jobs`` at a time in fresh processes (each with
    cores / jobs threads), or in this process when ``jobs`` is 1; ``on_result`` sees each result in order."""
    if jobs <= 1:
        for configuration in configurations:
            on_result(worker(*configuration))
        return
    threads = max(1, (os.cpu_count() or 1) // jobs)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker, initargs=(threads,)) as pool:
        futures = [pool.submit(worker, *configuration) for configuration in configurations]
        for future in futures:
            on_result(future.result())


#: The key of a result that holds its per-question predictions (kept in a file of their own).
PREDICTIONS_KEY = "predictions"


def _without_predictions(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in result.items() if k != PREDICTIONS_KEY} for result in results]


def result_label(result: dict[str, Any]) -> str:
    """``task/variant/seed`` of a result, the key of its predictions."""
    return f"{result.get('task')}/{result.get('variant')}/{result.get('seed')}"


def write_predictions(path: Path, results: Sequence[dict[str, Any]]) -> None:
    """The per-question predictions of every result that has them, gzipped JSON keyed by :func:`result_label`
    (written atomically, the same bytes for the same predictions: no time or name in the gzip header; nothing when
    no result has any)."""
    import gzip

    from bayeslora.io import atomic_path

    kept = {result_label(r): r[PREDICTIONS_KEY] for r in results if r.get(PREDICTIONS_KEY)}
    if not kept:
        return
    with (
        atomic_path(path) as tmp,
        open(tmp, "wb") as raw,
        gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as packed,
    ):
        packed.write(json.dumps(kept).encode("utf-8"))


def read_predictions(path: Path) -> dict[str, Any]:
    """The predictions :func:`write_predictions` wrote ({} when the file does not exist)."""
    import gzip

    if not path.is_file():
        return {}
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return json.load(handle)


def run_benchmark(
    worker: Callable[..., dict[str, Any]],
    configurations: Sequence[tuple],
    *,
    jobs: int,
    out: Path,
    tag: str,
    settings: dict[str, Any],
    summarize: Callable[[list[dict[str, Any]]], str],
    target_checks: Callable[[list[dict[str, Any]]], list[dict[str, Any]]],
    finished: Callable[..., tuple[str, dict[str, Any] | None]] | None = None,
) -> None:
    """Run every configuration (see :func:`run_all`), keeping ``<out>/<tag>.json`` up to date after each
    result; at the end add the target checks, write ``<tag>.md`` from ``summarize`` and print it.

    With ``finished`` (``finished(*configuration)`` -> (label, the finished run's record or None)) nothing is
    trained: the tables are made from the configurations already run, and the others are listed as missing."""
    started = time.time()
    results: list[dict[str, Any]] = []
    missing: list[str] = []

    def record(result: dict[str, Any]) -> None:
        results.append(result)
        write_json_atomic(out / f"{tag}.json", {"settings": settings, "results": _without_predictions(results)})

    if finished is None:
        run_all(worker, configurations, jobs, record)
    else:
        for configuration in configurations:
            label, result = finished(*configuration)
            if result is None:
                missing.append(label)
            else:
                results.append(result)
    summary = {"settings": settings, "results": _without_predictions(results), "targets": target_checks(results)}
    write_json_atomic(out / f"{tag}.json", {**summary, "missing": missing} if missing else summary)
    write_predictions(out / f"{tag}-predictions.json.gz", results)
    table = summarize(results)
    if missing:
        table += "\nNot run yet (not in the tables above): " + "; ".join(missing) + ".\n"
    write_text_atomic(out / f"{tag}.md", table)
    print(table)
    print(f"took {(time.time() - started) / 60:.1f} min")


def in_fresh_process(module: str, function: str, *arguments: Any) -> Any:
    """``function(*arguments)`` of the benchmark script ``module`` run in a fresh Python process (nothing another
    measurement allocated can linger in its allocator); its JSON result. Raises RuntimeError with the end of the
    process's stderr when it fails."""
    here = str(Path(__file__).parent)
    call = f"{function}({', '.join(map(repr, arguments))})"
    code = f"import json, sys; sys.path.insert(0, {here!r}); from {module} import {function}; print(json.dumps({call}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{module}.{call} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def step_peak_and_time(step: Callable[[], None], timed_steps: int) -> tuple[float, float]:
    """``(peak MiB, median seconds)`` of a training ``step``: one step first (the optimizer state exists after it,
    as in every later step), then the exact allocator peak of one step above everything alive before it
    (:class:`~bayeslora.system.AllocationPeak`, CPU), one untimed step after the profiler, then the median time of
    ``timed_steps`` more."""
    from bayeslora.system import AllocationPeak

    step()
    with AllocationPeak("cpu") as probe:
        step()
    step()
    times = []
    for _ in range(timed_steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return probe.peak_bytes / 2**20, statistics.median(times)


def aggregate_rounds(rounds: list[dict[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    """One measured setting over its rounds of fresh processes: ``keys`` from the first (the same in every round),
    the largest peak step memory (deterministic up to the allocator; the spread reported) and the median step time."""
    peaks = [r["peak_step_mib"] for r in rounds]
    return {
        **{k: rounds[0][k] for k in keys},
        "peak_step_mib": max(peaks),
        "peak_step_mib_spread": max(peaks) - min(peaks),
        "step_time_s": statistics.median(r["step_time_s"] for r in rounds),
        "step_times_s": [r["step_time_s"] for r in rounds],
        "rounds": len(rounds),
    }
