"""The ``exoticnorm`` command line: ``study``, ``norms``, ``bench``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from . import registry
from .base import InputError
from .data import DatasetNotFound
from .models.lenet import ACTIVATIONS, LAYER_SETS
from .train import MODELS, OPTIMIZERS, RunConfig, RunError, check_norm_option, train_run

DIVERGED_EXIT = 3


def _parse_value(raw: str) -> Any:
    python = {"True": True, "False": False, "None": None}
    if raw in python:
        return python[raw]
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def parse_norm_opts(norm: str, pairs: tuple[str, ...]) -> dict[str, Any]:
    """``key=value`` strings → the norm's options, typed like each option's default
    (``train.check_norm_option``); a bad one is a click.UsageError (exit code 2) naming it."""
    try:
        registry.norm_options(norm)
    except registry.NormConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    parsed: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise click.UsageError(f"--norm-opt expects key=value, got {pair!r}")
        try:
            parsed[key] = check_norm_option(norm, key, _parse_value(raw))
        except registry.NormConfigError as exc:
            raise click.UsageError(f"--norm-opt {pair}: {exc}") from exc
    return parsed


def _checked_config(fields: dict[str, Any], pairs: tuple[str, ...]) -> RunConfig:
    """The RunConfig of a run, its model built once: any bad setting or norm option is a
    click.UsageError (exit code 2) here, before anything is written, never a traceback later."""
    try:
        config = RunConfig(**fields)
    except (RunError, ValueError, TypeError) as exc:
        raise click.UsageError(str(exc)) from exc
    try:
        config.build_model()
    except (ValueError, TypeError) as exc:  # NormConfigError is a ValueError
        opts = f" with --norm-opt {', '.join(pairs)}" if pairs else ""
        raise click.UsageError(f"--norm {config.norm}{opts}: {exc}") from exc
    return config


@click.group()
@click.version_option(package_name="exoticnorm")
def main() -> None:
    """exoticnorm: exotic normalization layers for PyTorch, and studies of them."""


@main.command()
@click.option("--norm", default="bn", show_default=True, help="Registered norm name (see `exoticnorm norms`).")
@click.option("--norm-opt", "norm_opts", multiple=True, metavar="KEY=VALUE", help="A norm option; repeatable.")
@click.option("--norm-layers", default="all", show_default=True, type=click.Choice(list(LAYER_SETS)),
              help="Which LeNet layers get the norm.")
@click.option("--dropout", default=0.0, show_default=True, help="Dropout after the fc1/fc2 activations.")
@click.option("--bias/--no-bias", default=True, show_default=True, help="Bias in layers a norm follows.")
@click.option("--model", default="lenet", show_default=True, type=click.Choice(list(MODELS)),
              help="d2l's LeNet, or a narrow ResNet-8/20 for 28×28 (width 8, a norm after every conv).")
@click.option("--activation", default="auto", show_default=True, type=click.Choice(["auto", *ACTIVATIONS]),
              help="auto: the model's own (sigmoid for lenet as in d2l, relu for the resnets).")
@click.option("--epochs", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=0.1, show_default=True, type=float)
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--optimizer", default="sgd", show_default=True, type=click.Choice(OPTIMIZERS))
@click.option("--weight-decay", default=0.0, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda or cuda:N.")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Folder with FashionMNIST (else $EXOTICNORM_DATA, cache, Debian package, download).")
@click.option("--download/--no-download", default=True, show_default=True, help="Let torchvision download the data as a last resort.")
@click.option("--limit-train", type=click.IntRange(min=2), help="Use only the first N training images.")
@click.option("--limit-test", type=click.IntRange(min=1), help="Use only the first N test images.")
@click.option("--precise-stats", default=100, show_default=True, type=click.IntRange(min=0),
              help="Each epoch is evaluated twice: with the running statistics, and with statistics "
                   "recomputed over this many training batches with the final weights, for every norm "
                   "that keeps statistics (0: the running protocol only).")
@click.option("--out", type=click.Path(file_okay=False), help="Run directory [default: runs/NORM-sSEED-TIME].")
@click.option("--wandb", "wandb_mode", type=click.Choice(["online", "offline", "disabled"]),
              help="[default: with --resume the run's own mode; else $WANDB_MODE, else online "
                   "when logged in, else offline]")
@click.option("--group", help="wandb group for this run.")
@click.option("--resume", is_flag=True, help="Continue the unfinished run in --out from its last epoch.")
@click.option("--nproc", default=1, show_default=True, type=click.IntRange(min=1),
              help="Train this one model on N processes of this machine (torchrun, DDP, synced norms; "
                   "one GPU each with CUDA); --batch-size is the global batch, split over them.")
@click.pass_context
def study(ctx: click.Context, norm_opts, out, device, data_dir, download, wandb_mode, group, resume, nproc,
          **fields) -> None:
    """Train the d2l BN-LeNet (or a small ResNet, --model) on FashionMNIST with a norm (defaults: d2l's SGD, lr 0.1, batch 128, 10 epochs).

    Under torchrun (`torchrun --nproc-per-node N -m exoticnorm study ...`) the processes train
    one model together; `--nproc N` starts that for you."""
    from . import distributed
    from .train import pick_device

    try:
        if resume:
            if not out:
                raise RunError("--resume needs --out DIR, the run directory to continue")
            config_path = Path(out) / "config.json"
            if not config_path.exists():
                raise RunError(f"--resume: {config_path} not found; is {out} a run directory?")
            saved = json.loads(config_path.read_text())
    except (RunError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    if resume:
        given = {k: v for k, v in fields.items()
                 if ctx.get_parameter_source(k) is not click.core.ParameterSource.DEFAULT}
        if norm_opts:
            given["norm_opts"] = parse_norm_opts(given.get("norm", saved["norm"]), norm_opts)
        config = _checked_config({**saved, **given}, norm_opts)
    else:
        config = _checked_config({**fields, "norm_opts": parse_norm_opts(fields["norm"], norm_opts)}, norm_opts)
        out = out or f"runs/{config.norm}-s{config.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    if nproc > 1:
        _launch_torchrun(ctx, nproc, config.batch_size, out)
    try:
        with distributed.session(pick_device(device)):  # joins torchrun's process group, if any
            out = distributed.from_main(out)  # the default name: rank 0's clock
            # wandb_mode None (no --wandb): a resumed run keeps the mode it started with
            summary = train_run(config, out, device=device, data_dir=data_dir, wandb_mode=wandb_mode,
                                resume=resume, download=download, echo=click.echo, group=group)
    except (RunError, registry.NormConfigError, DatasetNotFound, InputError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    if summary["status"] == "diverged":
        ctx.exit(DIVERGED_EXIT)


def _launch_torchrun(ctx: click.Context, nproc: int, batch_size: int, out: str) -> None:
    """`study --nproc N`: the same command (with --out fixed) as N processes under torchrun;
    exits with their exit code (DIVERGED_EXIT when the run diverged)."""
    import os

    from . import distributed

    if "WORLD_SIZE" in os.environ:
        raise click.UsageError("--nproc starts torchrun itself; under torchrun leave it out")
    try:
        distributed.check_batch_size(batch_size, nproc)
    except distributed.DistributedError as exc:
        raise click.UsageError(str(exc)) from exc
    args = []
    for param in ctx.command.params:  # the options given, defaults left out
        if param.name in ("nproc", "out") or ctx.get_parameter_source(param.name) is click.core.ParameterSource.DEFAULT:
            continue
        value = ctx.params[param.name]
        if param.is_flag:
            args += [param.opts[0]] if value else param.secondary_opts[:1]
        else:
            for v in value if param.multiple else [value]:
                args += [param.opts[0], str(v)]
    code = distributed.launch(nproc, [*args, "--out", str(out)])
    summary = Path(out) / "summary.json"
    if code and summary.exists() and json.loads(summary.read_text()).get("status") == "diverged":
        code = DIVERGED_EXIT
    ctx.exit(code)


@main.command()
def norms() -> None:
    """List the registered norms, with a one-line description and their options."""
    descriptions = registry.describe_norms()
    width = max(map(len, descriptions))
    for name, text in descriptions.items():
        options = ", ".join(k for k in registry.norm_options(name) if k not in ("device", "dtype"))
        click.echo(f"{name:<{width}}  {text}")
        if options:
            click.echo(f"{'':<{width}}  options: {options}")


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
def summarize(run_dirs) -> None:
    """Markdown table of run folders: seeds grouped, mean ± std of the final metrics, test
    accuracy under both eval protocols (runs from before them in a column of their own)."""
    from .report import summarize as summary_table

    n, text = summary_table(run_dirs)
    if not n:
        raise click.ClickException(f"no finished run (summary.json) among {len(run_dirs)} folder(s)")
    click.echo(f"{n} runs (finished or diverged); mean ± sample std over seeds, n = finished\n")
    click.echo(text, nl=False)


@main.command()
@click.option("--norms", "names", default=None, help="Comma-separated norms [default: all registered].")
@click.option("--repeats", default=30, show_default=True, help="Timed forward+backward passes per layer shape.")
@click.option("--train-steps", default=100, show_default=True, help="Timed LeNet training steps per norm (0 skips).")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write the results here.")
def bench(names, repeats, train_steps, device, json_out) -> None:
    """Time each norm against torch.nn.BatchNorm in the same process and print ratios."""
    from .bench import run_bench

    chosen = names.split(",") if names else [n for n in registry.available_norms()]
    try:
        for n in chosen:
            registry.create_norm(n, 6)
    except registry.NormConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    results = run_bench(chosen, repeats, train_steps, device, echo=click.echo)
    if json_out:
        Path(json_out).write_text(json.dumps(results, indent=2) + "\n")


@main.command("bench-whitening")
@click.option("--iternorm", type=click.Path(exists=True, dir_okay=False),
              help="The published IterNorm layer (iterative_normalization.py) to compare with.")
@click.option("--channels", default="64,256,1024", show_default=True)
@click.option("--group", default=64, show_default=True, help="Channels per whitened group.")
@click.option("--repeats", default=5, show_default=True)
@click.option("--lenet-steps", default=0, show_default=True,
              help="Also measure on activations of a BN-LeNet trained this many steps (0 = skip).")
@click.option("--device", default="cpu", show_default=True,
              help="cpu, cuda, cuda:N or auto for the whitening table (the LeNet table stays on the CPU).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write the results here.")
def bench_whitening(iternorm, channels, group, repeats, lenet_steps, device, json_out) -> None:
    """Every whitening variant (and IterNorm): time and whitening error, one table."""
    from .bench_whitening import run_whitening_bench
    from .train import pick_device

    try:
        dev = pick_device(device)
    except RunError as exc:
        raise click.UsageError(str(exc)) from exc
    rows = run_whitening_bench(tuple(int(c) for c in channels.split(",")), group=group,
                               iternorm=iternorm, repeats=repeats, lenet_steps=lenet_steps,
                               echo=click.echo, device=dev)
    if json_out:
        Path(json_out).write_text(json.dumps(rows, indent=2) + "\n")


@main.command("bench-sketch")
@click.option("--bins", default=500, show_default=True)
@click.option("--batches", default=1500, show_default=True, help="Batches of 256 values per stream.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write the results here.")
def bench_sketch(bins, batches, json_out) -> None:
    """QuantileSketch accuracy and update speed, beside KLL (pip install datasketches)."""
    from .bench_sketch import run_sketch_bench

    results = run_sketch_bench(batches=batches, bins=bins, echo=click.echo)
    if json_out:
        Path(json_out).write_text(json.dumps(results, indent=2) + "\n")


def _study_runs_dir(study, out: str | None) -> Path:
    return Path(out) if out else Path("runs/studies") / study.run_dir_name


def _check_executor_options(ctx: click.Context, executor: str) -> None:
    """`run`: an option typed for another executor than the chosen one is a usage error."""
    given = [p.name for p in ctx.command.params
             if ctx.get_parameter_source(p.name) is click.core.ParameterSource.COMMANDLINE]
    for name in given:
        owner = name.split("_")[0]
        if owner in ("ray", "slurm") and owner != executor:
            raise click.UsageError(f"--{name.replace('_', '-')} applies to --executor {owner}, "
                                   f"not {executor}; add --executor {owner} or leave it out")
    if executor == "slurm" and "jobs" in given:
        raise click.UsageError("--jobs applies to the local and ray executors; with --executor slurm, "
                               "--slurm-array-parallelism sets how many cells run at once")


@main.command()
@click.argument("study_file", type=click.Path(dir_okay=False))
@click.option("--seeds", type=click.IntRange(min=1), help="Seeds 0..N-1 [default: the study's].")
@click.option("--quick", is_flag=True, help="The study's quick form (few epochs, a data subset, fewer seeds).")
@click.option("--jobs", default=1, show_default=True, type=click.IntRange(min=1),
              help="Cells run in parallel processes (each gets cores/jobs threads); with --executor "
                   "ray, cells per node (each gets cores/jobs CPUs, or one GPU).")
@click.option("--shard", help="i/n: run only every n-th cell starting at the i-th (split a study over machines).")
@click.option("--out", type=click.Path(file_okay=False), help="Runs folder [default: runs/studies/NAME[-quick]].")
@click.option("--device", default="auto", show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False))
@click.option("--download/--no-download", default=True, show_default=True)
@click.option("--wandb", "wandb_mode", type=click.Choice(["online", "offline", "disabled"]),
              help="[default: $WANDB_MODE, else online when logged in, else offline]")
@click.option("--export-sweep", type=click.Path(dir_okay=False),
              help="Write the grid as a wandb sweep config (YAML) and run nothing.")
@click.option("--executor", default="local", show_default=True, type=click.Choice(["local", "ray", "slurm"]),
              help="Where the cells run: here (--jobs processes), as Ray tasks, or as a SLURM job "
                   "array (submitit). The runs folder must be shared storage for ray and slurm.")
@click.option("--ray-address", envvar="RAY_ADDRESS", show_envvar=True,
              help="Ray cluster, HEAD_IP:6379 [default: a local Ray started for the run].")
@click.option("--slurm-partition", help="SLURM partition [default: the cluster's].")
@click.option("--slurm-time", default=120, show_default=True, type=click.IntRange(min=1),
              help="Time limit of each cell, in minutes (a cell cut off resumes on the next run).")
@click.option("--slurm-gpus-per-task", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--slurm-cpus-per-task", default=1, show_default=True, type=click.IntRange(min=1),
              help="CPUs of each cell, also its torch threads.")
@click.option("--slurm-array-parallelism", default=256, show_default=True, type=click.IntRange(min=1),
              help="Cells running at once.")
@click.option("--slurm-cluster", default="slurm", show_default=True, type=click.Choice(["slurm", "local"]),
              help="local: submitit's local executor, every cell a process on this machine (to try a setup).")
@click.pass_context
def run(ctx, study_file, seeds, quick, jobs, shard, out, device, data_dir, download, wandb_mode, export_sweep,
        executor, **executor_opts) -> None:
    """Run every cell of a study (studies/NAME.toml); finished cells are skipped, killed ones resumed."""
    from .executors import ExecutorError, make_executor
    from .study import StudyError, load_study, parse_shard
    from .runner import run_cells

    _check_executor_options(ctx, executor)
    try:
        study = load_study(study_file, quick=quick, seeds=seeds)
        shard_spec = parse_shard(shard)
        if export_sweep:
            import yaml

            Path(export_sweep).write_text(yaml.safe_dump(study.sweep_config(seeds_given=seeds is not None),
                                                         sort_keys=False))
            click.echo(f"wrote {export_sweep} ({len(study.cells)} runs); start it with: "
                       f"wandb sweep {export_sweep}  and then: wandb agent ENTITY/PROJECT/SWEEP_ID")
            return
        runs = _study_runs_dir(study, out)
        with make_executor(executor, study_name=study.run_dir_name, runs=runs, jobs=jobs, device=device,
                           **executor_opts) as cells_executor:  # connects before anything is written
            counts = run_cells(study, runs, jobs=jobs, shard=shard_spec, device=device, data_dir=data_dir,
                               wandb_mode=wandb_mode, download=download, echo=click.echo,
                               executor=cells_executor)
    except (StudyError, RunError, ExecutorError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(" ".join(f"{k}: {v}" for k, v in counts.items()))
    report_cmd = f"exoticnorm report {study_file}" + (" --quick" if quick else "") + (f" --runs {out}" if out else "")
    click.echo(f"report: {report_cmd}")
    if counts["failed"] or counts["mismatch"] or counts["busy"]:
        click.echo("some cells failed or were skipped; see log.txt in their folders", err=True)
        ctx.exit(1)


@main.command("run-cell", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("study_file", type=click.Path(dir_okay=False))
@click.option("--quick", is_flag=True)
@click.option("--seeds", type=click.IntRange(min=1), help="Seeds 0..N-1 [default: the study's].")
@click.option("--out", type=click.Path(file_okay=False), help="Runs folder [default: runs/studies/NAME[-quick]].")
@click.option("--device", default="auto", show_default=True)
@click.option("--wandb", "wandb_mode", type=click.Choice(["online", "offline", "disabled"]))
@click.pass_context
def run_cell(ctx, study_file, quick, seeds, out, device, wandb_mode) -> None:
    """One cell of a study, named by --AXIS=LABEL ... --seed=S (what `wandb agent` calls)."""
    from .study import StudyError, load_study
    from .runner import run_one_cell

    labels, seed = {}, None
    for arg in ctx.args:
        key, sep, value = arg.lstrip("-").partition("=")
        if not arg.startswith("--") or not sep:
            raise click.UsageError(f"expected --AXIS=LABEL, got {arg!r}")
        if key == "seed":
            if not value.lstrip("-").isdigit():
                raise click.UsageError(f"--seed takes an integer, got {value!r}")
            seed = int(value)
        else:
            labels[key] = value
    try:
        study = load_study(study_file, quick=quick, seeds=seeds)
        if seed is None:
            raise StudyError("run-cell needs --seed=S")
        cell = study.find_cell(labels, seed)
        result = run_one_cell(study, cell, _study_runs_dir(study, out), device=device, wandb_mode=wandb_mode)
    except (StudyError, RunError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{cell.run_name}: {result['status']}")
    if result["status"] == "failed":
        raise click.ClickException(result["error"])


@main.command()
@click.argument("source", type=click.Path(exists=True))
@click.option("--quick", is_flag=True, help="Report the study's quick runs.")
@click.option("--seeds", type=click.IntRange(min=1), help="Seeds 0..N-1 [default: the study's].")
@click.option("--runs", type=click.Path(file_okay=False), help="Runs folder [default: runs/studies/NAME[-quick]].")
@click.option("--out", type=click.Path(file_okay=False),
              help="Report folder [default: studies/NAME/ for a full study, RUNS/report for --quick].")
@click.option("--wandb-report", is_flag=True, help="Also create a wandb report (online and logged in).")
def report(source, quick, seeds, runs, out, wandb_report) -> None:
    """Tables, figures (PNG and PDF) and a markdown answer for a study (its .toml or runs folder)."""
    from .study import StudyError, load_study
    from .report import make_report, wandb_report_for

    try:
        src = Path(source)
        if src.is_dir():
            meta = json.loads((src / "study.json").read_text()) if (src / "study.json").exists() else None
            if meta is None:
                raise StudyError(f"{src} has no study.json; pass the study's .toml, or a folder made by `exoticnorm run`")
            study = load_study(meta["file"], quick=meta["quick"], seeds=seeds or len(meta["seeds"]))
            runs_dir = src
        else:
            study = load_study(src, quick=quick, seeds=seeds)
            runs_dir = _study_runs_dir(study, runs)
        out_dir = Path(out) if out else (runs_dir / "report" if study.quick else Path("studies") / study.name)
        written = make_report(study, runs_dir, out_dir, echo=click.echo)
        if wandb_report:
            wandb_report_for(study, echo=click.echo)
    except (StudyError, RunError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"report: {written}")


@main.command()
@click.option("--studies", "studies_dir", default="studies", show_default=True, type=click.Path(file_okay=False),
              help="Folder of study files (NAME.toml) and their reports (NAME/results.json).")
@click.option("--out", default="paper", show_default=True, type=click.Path(file_okay=False),
              help="Where paper.md, paper.pdf, provenance.json and sources.json go.")
@click.option("--pdf/--no-pdf", default=True, show_default=True, help="Also build paper.pdf (needs typst).")
def paper(studies_dir, out, pdf) -> None:
    """The paper (markdown and PDF) from the studies' reports; every number traced to its source."""
    from .paper import write_paper

    write_paper(Path(studies_dir), Path(out), pdf=pdf, echo=click.echo)
