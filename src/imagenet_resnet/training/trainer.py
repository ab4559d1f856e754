"""One training run: `train` reads as the list of its steps, `train_one_epoch` and `end_epoch` as one epoch's.
The run's pieces are built in training/run.py, a resume's checks and agreements are training/resume.py's, and a
budget's fits training/run_budget.py's."""

from __future__ import annotations

import contextlib
import functools
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from ..config import Config, save_config
from ..data.loader import worker_death
from ..data.presets import pipeline_description
from ..errors import UserError
from ..evaluation.loop import evaluate
from ..storage.mirror import LEASE_SECONDS, Mirror, NoMirror, open_mirror
from ..storage.urls import redact
from . import distributed
from .budget import Budget
from .checkpoint import Checkpointer, Progress
from .ledger import Ledger
from .lr_finder import LRSweep, save_plot, sweep
from .memory import say_memory
from .monitor import MetricsSink, SampleLog, StepReporter, SystemSampler
from .optim import lr_for_batch, lr_per_256
from .resume import agree_on_checkpoint, newest_checkpoint, reshape_for_resume, restretch, resume_run
from .run import Run, build_run, endless_batches, epoch_side, loader_workers, run_epochs, run_identity, run_shape, where
from .run_budget import budget_for, budget_plan, refit, refuse_a_spent_budget, resume_budget
from .run_folder import RunFolder
from .schedules import LRSchedule
from .spot import spot_notice_for
from .step import StepSums
from .stopping import MirrorTakenOver, StopPolicy
from .tracking import TrackRequest, open_tracking


class RunLog:
    """Prints to stdout and appends the same lines to RUN/train.log, those said before the run was accepted
    once it is (a refused run writes nothing); silent on ranks other than 0."""

    def __init__(self, folder: RunFolder, enabled: bool = True):
        self.folder, self.enabled, self.file, self.unwritten = folder, enabled, None, []

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        line = f"{time.strftime('%H:%M:%S')} {redact(message)}"  # the one writer of train.log: no secret in it
        print(line, flush=True)
        self.unwritten.append(line)
        if self.folder.accepted:
            self.file = self.file or open(self.folder.log, "a", buffering=1)
            self.file.write("".join(f"{unwritten}\n" for unwritten in self.unwritten))
            self.unwritten.clear()


def _sweep(run: Run, start_lr: float = 1e-5, end_lr: float = 10.0, steps: int = 200) -> LRSweep:
    """The LR range test on copies of this run's model and optimizer, fed by its training loader."""

    return sweep(run.model, run.state.optimizer, endless_batches(run), run.normalize, run.precision, run.cfg.optim.label_smoothing,
                 start_lr, end_lr, steps, accumulation_steps=run.cfg.train.accumulation_steps)


def find_lr(cfg: Config, out_png: str | Path, start_lr: float = 1e-5, end_lr: float = 10.0,
            steps: int = 200) -> dict[str, float]:
    """`imagenet-resnet find-lr`: sweep, plot on rank 0, and return the suggestion."""
    world, device = distributed.init(cfg.train.device)
    run = build_run(cfg, world, device)
    result = _sweep(run, start_lr, end_lr, steps)
    picks = result.suggestion()
    if world.is_main:
        save_plot(result, out_png, run.global_batch)
    return {**picks, "suggested_optim_lr_per_256": lr_per_256(picks["suggested_lr"], cfg.optim, run.global_batch),
            "global_batch": run.global_batch, "steps": len(result.lrs), "diverged": result.diverged}


def _plan(run: Run, peak_lr: float) -> str:
    """The first log line: what will be trained, where, and how."""
    cfg, t, world = run.cfg, run.cfg.train, run.world
    pipeline = "" if cfg.data.pipeline == "fast" else f" | {pipeline_description(cfg.data.pipeline)} pipeline"
    length = f"{t.epochs} epochs"
    if t.budget:
        length = f"the {t.epochs}-epoch recipe fitted to --budget {t.budget} (measured after the first steps)"
    elif run.timeline.stretched:
        length = f"{run.timeline.total_steps / run.steps_per_epoch:.2f} epochs (the {t.epochs}-epoch recipe stretched)"
    return (f"{cfg.model.describe()} | {len(run.train_index.classes)} classes | train {len(run.train_set)} / val "
            f"{len(run.val_set)} images{pipeline} | {run.device} {run.precision} | {world.world_size} process(es) | "
            f"global batch {run.global_batch} ({t.batch_size} per process x {t.accumulation_steps} accumulation x "
            f"{world.world_size}) | peak LR {peak_lr:.4g} ({cfg.optim.lr} per 256) | {run.steps_per_epoch} "
            f"steps/epoch x {length} | loader workers {run.train_loader.num_workers} + "
            f"{run.val_loader.num_workers} (validation) per process"
            + (f" | {run.cpu_threads}" if run.cpu_threads else ""))


def _cpu_hint(run: Run) -> str | None:
    m = run.cfg.model
    if run.device.type != "cpu" or (m.name in ("resnet18", "resnet34") and m.width <= 32):
        return None
    return (f"note: {m.name} at width {m.width} on the CPU is slow (see the estimate after the first steps); for a "
            "quick run use --recipe small_cpu, or lower model.width (e.g. 16) and data.train_size (e.g. 64)")


def dry_run(cfg: Config, out_dir: Path | None = None, resume: bool = False) -> None:
    """What `train` would do with this config and run folder, said line by line as it is found, without training
    or writing anything: the resolved config, the plan, where a resume would continue, what a step needs in
    memory, and with a budget the steps timed and the fit; refused where train would refuse. Under torchrun every
    process joins the group, as the run would (a budget's dry-run times real DDP steps), and rank 0 speaks."""
    world, device = distributed.init(cfg.train.device)
    say = functools.partial(print, flush=True) if world.is_main else (lambda line: None)
    folder = RunFolder(out_dir) if out_dir is not None else None
    try:
        if folder is not None and not resume:
            folder.check_new()
        newest = (None, None)
        if folder is not None and resume:
            newest = distributed.on_every_rank(lambda: newest_checkpoint(folder.root))
        say(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        run = _planned_run(cfg, world, device, folder, newest, say)
        if folder is not None and resume and newest[0] is None:
            say(f"--resume: {folder} holds no checkpoint yet: a new run would start there")
        say(f"plan: {_plan(run, lr_for_batch(cfg.optim, run.global_batch))}")
        if _cpu_hint(run):
            say(_cpu_hint(run))
        split = say_memory(run, say)
        if cfg.train.budget:
            if split is not None:  # timed as it can run here, and said so
                cfg.train.batch_size, cfg.train.accumulation_steps = split
                run = _planned_run(cfg, world, device, folder, newest, lambda line: None)
                say(f"budget {cfg.train.budget}: timed at --batch-size {split[0]} --set train.accumulation_steps="
                    f"{split[1]}, the split that fits here: give train the same")
            budget_plan(run, say, Ledger(folder) if newest[0] is not None else None, newest[0])
    finally:
        distributed.shutdown()


def _planned_run(cfg: Config, world: distributed.Dist, device: torch.device, folder: RunFolder | None,
                 newest: tuple[dict | None, str | None], say) -> Run:
    """The run train would build, a resume checked and loaded into it as train does (nothing is written);
    says where the resume would continue and what is left."""
    reshaped = reshape_for_resume(cfg, newest[0], world.world_size) if newest[0] is not None else None
    run = build_run(cfg, world, device)
    if newest[0] is None:
        return run
    checkpointer = Checkpointer(folder, False, cfg, run.train_index.classes, shape=run_shape(run),
                                identity=run_identity(run))
    resumed = resume_run(run, checkpointer, newest, reshaped, say)
    schedule = LRSchedule(cfg.schedule, lr_for_batch(cfg.optim, run.global_batch), cfg.train.epochs,
                          run.steps_per_epoch, run.timeline)
    restretch(run, newest[0], schedule, say)
    left = run.timeline.total_steps - run.progress.global_step
    say(f"--resume: would continue {resumed} at {where(run)}: " + (
        f"{left} of the run's {run.timeline.total_steps} steps left ({left / run.steps_per_epoch:.2f} epochs)"
        if left or run.progress.step_in_epoch else "nothing is left to train"))
    return run


@contextlib.contextmanager
def _worker_deaths(checkpointer: Checkpointer):
    """A loader worker that died (killed from outside: the out-of-memory killer, most often) surfaces as a
    RuntimeError at any point of a step: nothing is saved then, and the run stops in one line, resumable from
    its last checkpoint if it has one (under torchrun with --max-restarts, torchrun resumes it). A worker's
    own exception is a bug: it keeps its traceback."""
    try:
        yield
    except RuntimeError as e:
        death = worker_death(e)
        if death is None:
            raise
        cause, remedy = death
        then = (f"run the same command with --resume ({checkpointer.last_good()})" if checkpointer.saved_step
                is not None else "run the same command again (no checkpoint was written yet)")
        raise UserError(f"a data-loading process died ({cause}): {f'{remedy}, then ' if remedy else ''}{then}") from e


def _save(run: Run, checkpointer: Checkpointer, budget: Budget | None, best: bool = False) -> None:
    p = run.progress
    p.skipped_images = int(distributed.all_sum([run.skipped.count], run.device)[0])
    with budget.timed("save_seconds") if budget else contextlib.nullcontext():
        if budget is not None:
            p.total_steps, p.schedule_knots = run.timeline.total_steps, [list(k) for k in run.timeline.knots]
            p.budget_used_seconds, p.budget_costs = budget.used(), budget.costs.to_dict()
            budget.heartbeat(True)
        if run.tracking:
            checkpointer.identity["tracking"] = run.tracking.run_ids()  # a resume continues the same tracker runs
        checkpointer.save(run.state, best)
        distributed.barrier()  # nobody goes on (or exits) while rank 0 is still writing


def train(cfg: Config, out_dir: str | Path, resume: bool = False, mirror: str | None = None,
          mirror_wait: float = 300.0, take_over: bool = False, lease_seconds: float = LEASE_SECONDS, lease: bool = True,
          track: TrackRequest | None = None) -> dict[str, Any]:
    """Train, evaluate and checkpoint for cfg.train.epochs into the run folder `out_dir`, which this trainer owns
    alone while it runs (training/run_folder.py), mirrored to the URL `mirror` if given (its lease taken, over a
    live one with `take_over`) and sent to the trackers of `track`; returns the last epoch's record. Every check
    comes before the run writes its first file."""
    folder = RunFolder(Path(out_dir))
    if not resume:  # by every process before any can write there: distributed.init waits for them all
        folder.check_new()
    world, device = distributed.init(cfg.train.device)
    with _owned(folder, world, resume, mirror, mirror_wait, take_over, lease_seconds, lease) as store:
        log = RunLog(folder, enabled=world.is_main)
        store.report_to(log)
        newest = _checkpoint_to_continue(folder, world, resume, store, mirror, log)
        reshaped = reshape_for_resume(cfg, newest[0], world.world_size) if newest[0] is not None else None
        run = build_run(cfg, world, device)
        t = cfg.train
        checkpointer = Checkpointer(folder, world.is_main, cfg, run.train_index.classes, store.notify, run_shape(run),
                                    run_identity(run))
        if cfg.optim.find_lr and newest[0] is None:  # a resumed run keeps the LR it chose
            _choose_lr(run, log)
        if newest[0] is not None:
            log(f"resumed {resume_run(run, checkpointer, newest, reshaped, log)} at {where(run)}")
        elif resume:
            log(f"--resume: no {folder.last} yet, starting a new run")
        peak_lr = lr_for_batch(cfg.optim, run.global_batch)
        schedule = LRSchedule(cfg.schedule, peak_lr, t.epochs, run.steps_per_epoch, run.timeline)
        restretch(run, newest[0], schedule, log)
        ledger = Ledger(folder if world.is_main else None, store.notify)
        budget = budget_for(run, ledger) if t.budget else None
        if budget is not None and newest[0] is not None:
            refuse_a_spent_budget(run, budget, newest[0])
        folder.accept()  # every check passed: the run's files are written from here on
        metrics, system, reporter = _open_writers(run, folder, store, checkpointer, track, newest[0], mirror_wait, log)
        _say_the_start(run, peak_lr, budget, ledger, folder, log)
        stop = StopPolicy(world, device, t.stop_at_step, t.checkpoint_every_steps, spot_notice_for(t), store)
        # The stop policy outermost: its signal handlers stay until the mirror has drained (a shutdown's second
        # SIGTERM, torchrun's, must not kill the process during the last uploads).
        with stop, store, run.tracking, metrics, system or contextlib.nullcontext(), loader_workers(run), \
                _worker_deaths(checkpointer):
            if budget is not None and newest[0] is not None:
                resume_budget(run, budget, newest[0], reporter, log)
            # An epoch stopped at its last step (a signal) still needs its end: its validation and checkpoint.
            while run.progress.global_step < run.timeline.total_steps or run.progress.step_in_epoch:
                epoch = run.progress.epoch
                lr = train_one_epoch(run, epoch, schedule, budget, stop, reporter, checkpointer, log)
                if budget is not None and run.progress.step_in_epoch == run.steps_per_epoch:
                    refit(run, budget, reporter, log)  # with this epoch's costs measured
                record = end_epoch(run, epoch, lr, system, log, budget)
                is_best = _keep_record(run, record)
                # The record first: should the process die before last.pt is written, the resume drops it and
                # redoes the epoch, where in the other order the record would be lost.
                metrics.epoch(record, run.progress.global_step)
                _save(run, checkpointer, budget, best=is_best)
                if budget is not None:
                    log(budget.describe(run.progress.global_step))
            _say_the_end(run, budget, log)
    return run.state.metrics


@contextlib.contextmanager
def _owned(folder: RunFolder, world: distributed.Dist, resume: bool, mirror: str | None, mirror_wait: float,
           take_over: bool, lease_seconds: float, lease: bool):
    """The run folder and its mirror, held by this trainer alone until it ends: rank 0 takes the folder's lock,
    then the mirror's lease (one guard, one refusal: a second trainer stops in one line on every rank); a newer
    run in the mirror is brought down first, on every node. Yields the mirror. A run that fails before it began
    gives the lease back, and one refused (a UserError: the data, a budget too small for it) before its first
    checkpoint leaves the folder as it found it, so the corrected command runs there; a crash keeps its log."""
    distributed.on_every_rank(lambda: folder.claim(take_over) if world.is_main else None)
    if not world.is_main:  # every node has its --out: rank 0's claim made the writer's, another node's copy is here
        folder.root.mkdir(parents=True, exist_ok=True)
    store, failed, refused = NoMirror(), True, False
    try:
        store = distributed.on_every_rank(lambda: open_mirror(mirror, folder.root, resume, world.is_main, mirror_wait,
                                                              take_over, lease_seconds, world.local_rank, lease))
        yield store
        failed = False
    except UserError:
        refused = True
        raise
    finally:
        if failed and not folder.accepted:  # refused: the lease given back now (an accepted run's mirror does it)
            store.release()
        folder.release(refused or (failed and not folder.accepted))


def _checkpoint_to_continue(folder: RunFolder, world: distributed.Dist, resume: bool, store: Mirror | NoMirror,
                            mirror: str | None, log: RunLog) -> tuple[dict | None, str | None]:
    """The checkpoint every rank continues from (each node reads its own run folder); none for a new run. A
    refusal on one rank stops every rank."""
    if not resume:
        return None, None
    newest = distributed.on_every_rank(lambda: newest_checkpoint(folder.root))
    return agree_on_checkpoint(folder.root, newest, world, store if mirror and world.is_main else None, mirror, log)


def _open_writers(run: Run, folder: RunFolder, store: Mirror | NoMirror, checkpointer: Checkpointer,
                  track: TrackRequest | None, saved: dict | None, mirror_wait: float, log: RunLog):
    """The accepted run's writers besides its log and checkpointer: the sample log, the trackers, the metrics
    sink (a resumed run's records past its checkpoint dropped), config.yaml, the system sampler and the step
    reporter; returns the last three that the loop uses."""
    cfg, t, is_main = run.cfg, run.cfg.train, run.world.is_main
    run.samples = SampleLog(folder) if t.record_samples and is_main else None
    run.tracking = open_tracking(track, cfg, checkpointer.identity["data"]["fingerprint"], folder, is_main, saved, log,
                                 store.notify, mirror_wait)
    metrics = MetricsSink(folder, is_main, t.tensorboard, run.progress, store.notify, run.tracking)
    if is_main:  # resolved: with the LR the finder chose, if it ran
        save_config(cfg, folder.config)
    system = SystemSampler(run.device, t.sample_system_seconds) if is_main and t.sample_system_seconds > 0 else None
    reporter = StepReporter(folder, is_main, log, run.steps_per_epoch, run.timeline.total_steps, t.log_every_steps,
                            system, metrics.scalars)
    return metrics, system, reporter


def _say_the_start(run: Run, peak_lr: float, budget: Budget | None, ledger: Ledger, folder: RunFolder,
                   log: RunLog) -> None:
    log(_plan(run, peak_lr))
    if budget is not None:
        log(f"budget {run.cfg.train.budget}: the machine time of the whole run ({folder.ledger.name}); {ledger.said()}")
    if _cpu_hint(run):
        log(_cpu_hint(run))


def _say_the_end(run: Run, budget: Budget | None, log: RunLog) -> None:
    if run.skipped.count:
        log(f"{run.skipped.count} unreadable images were skipped (named in the warnings above)")
    if budget is not None:
        log(budget.summary())
        budget.heartbeat(True)  # billed up to here: what follows is the exit EXIT_SECONDS keeps back


def _choose_lr(run: Run, log: RunLog) -> None:
    """The LR finder's suggestion becomes optim.lr (per 256 images, as configs give it)."""
    picks, optim = _sweep(run).suggestion(), run.cfg.optim
    optim.lr = lr_per_256(picks["suggested_lr"], optim, run.global_batch)
    log(f"LR finder: lowest smoothed loss at {picks['min_loss_lr']:.3g}; training with peak LR "
        f"{picks['suggested_lr']:.3g} (optim.lr={optim.lr:.4g} per 256 images)")


def _keep_record(run: Run, record: dict[str, Any]) -> bool:
    """The epoch's record becomes the run's latest; returns whether it is the best so far. best.pt follows
    the weights the run is for: the EMA's when there is one."""
    score = record.get("val_top1_ema") if run.state.ema is not None else record["val_top1"]
    is_best = score is not None and score > run.progress.best_top1
    if is_best:
        run.progress.best_top1 = score
    run.state.metrics = record
    return is_best


def train_one_epoch(run: Run, epoch: int, schedule: LRSchedule, budget: Budget | None, stop: StopPolicy,
                    reporter: StepReporter, checkpointer: Checkpointer, log: RunLog) -> float:
    """The optimizer steps of one epoch, from where a resumed run left off, up to the run's end when that
    comes first (a budget's fit); returns the last LR. Stops the run (checkpoint, then RunStopped) when the
    stop policy says so. Nothing here waits for the device except a logged step (the running loss), a
    checkpoint and the epoch's end."""
    t, p = run.cfg.train, run.progress
    run.model.train()
    side = epoch_side(run, run.timeline, epoch)
    run.train_sampler.set_epoch(epoch, start_batch=p.step_in_epoch * t.accumulation_steps, side=side)
    sums = StepSums(run.device)
    micro_batches = iter(run.train_loader)
    lr = schedule(p.global_step)
    reporter.start_epoch(epoch, run_epochs(run), p.step_in_epoch)
    if budget is not None:
        budget.start_epoch(p.global_step, side)
    for step in range(p.step_in_epoch, run.steps_per_epoch):
        if p.global_step >= run.timeline.total_steps:  # a budget's fit ends the run mid-epoch
            break
        lr = schedule(p.global_step)
        waiting = time.perf_counter()
        step_batches = [next(micro_batches) for _ in range(t.accumulation_steps)]
        p.epoch_data_wait += time.perf_counter() - waiting
        for _, _, problems in step_batches:
            run.skipped.add(problems)
        if run.samples is not None:
            run.samples.write(p.global_step, epoch, run.train_sampler.global_indices(step * t.accumulation_steps,
                                                                                      t.accumulation_steps))
        run.optimizer_step(step_batches, lr, p.global_step, sums)
        p.global_step += 1
        p.step_in_epoch = step + 1
        reporter.step(epoch, step, p.global_step, functools.partial(sums.running, p), lr,
                      sums.images * run.world.world_size / (time.perf_counter() - sums.started))
        if budget is not None and budget.refit_due(p.global_step):
            refit(run, budget, reporter, log)
        stopping = stop.after_step(p.global_step)
        if stopping or (stop.checkpoint_due(p.global_step) and step + 1 < run.steps_per_epoch):
            _fold(run, sums, checkpointer)
            _save(run, checkpointer, budget)
            if stopping:
                hint = "" if isinstance(stopping, MirrorTakenOver) else "; run the same command with --resume to continue"
                log(f"{stopping}: saved {checkpointer.last} at {where(run)}{hint}")
                raise stopping
    _fold(run, sums, checkpointer)
    reporter.end_epoch()
    return lr


def _fold(run: Run, sums: StepSums, checkpointer: Checkpointer) -> None:
    """Fold the steps' sums into the run's progress. A loss or weights that are not finite stop the run here,
    before anything is saved: last.pt and previous.pt stay the last good ones."""
    first_nonfinite = sums.fold_into(run.progress, run.model)
    if first_nonfinite is not None:
        raise UserError(f"training diverged: the loss or the weights became NaN or infinite at global step "
                        f"{first_nonfinite + 1}; stopped without saving: {checkpointer.last_good()}. Lower optim.lr "
                        "(or lengthen schedule.warmup_epochs, or set optim.clip_grad_norm), then run the same "
                        "command with --resume")


def end_epoch(run: Run, epoch: int, lr: float, system: SystemSampler | None, log: RunLog,
              budget: Budget | None = None) -> dict[str, Any]:
    """The epoch's record: training figures, machine use, and validation when it is due (of the EMA weights
    too; always at the run's last epoch, partial or not)."""
    cfg, t, epochs = run.cfg, run.cfg.train, run_epochs(run)
    last = run.progress.global_step >= run.timeline.total_steps
    record = _training_record(run.progress, epoch, lr)
    record["train_size"] = epoch_side(run, run.timeline, epoch)
    if run.timeline.stretched:
        record.update(total_steps=run.timeline.total_steps, epochs_fitted=run.timeline.total_steps / run.steps_per_epoch)
    if budget is not None:
        record.update(budget_seconds=budget.seconds, budget_used_seconds=budget.used())
    if system is not None:
        record.update(system.take("epoch"))
    if run.device.type == "cuda":  # the most the tensors needed, against the GPU memory NVML sees in use
        record["gpu_peak_allocated_gb"] = torch.cuda.max_memory_allocated(run.device) / 2**30
        torch.cuda.reset_peak_memory_stats(run.device)
    distributed.broadcast_buffers(run.model)
    head = f"epoch {epoch + 1}/{epochs} train loss {record['train_loss']:.4f} |"
    if last or (t.eval_every and (epoch + 1) % t.eval_every == 0):
        with budget.timed("eval_seconds") if budget else contextlib.nullcontext():
            val = evaluate(run.model, run.val_loader, run.normalize, run.precision, run.skipped, cfg.data.eval_flip)
            if run.state.ema is not None:
                distributed.broadcast_buffers(run.state.ema.module)
                ema = evaluate(run.state.ema.module, run.val_loader, run.normalize, run.precision, None,
                               cfg.data.eval_flip)
        record.update(val_loss=val["loss"], val_top1=val["top1"], val_top5=val["top5"], val_images=val["images"])
        if run.state.ema is not None:
            record.update(val_loss_ema=ema["loss"], val_top1_ema=ema["top1"], val_top5_ema=ema["top5"])
            log(f"epoch {epoch + 1}/{epochs} EMA weights: val top-1 {ema['top1']:.4f} top-5 {ema['top5']:.4f}")
        log(f"{head} val loss {val['loss']:.4f} top-1 {val['top1']:.4f} top-5 {val['top5']:.4f} | "
            f"{record['images_per_sec']:.0f} img/s {record['epoch_seconds']:.1f} s")
    else:
        record.update(val_loss=None, val_top1=None, val_top5=None, val_images=0)
        log(f"{head} {record['images_per_sec']:.0f} img/s")
    record["skipped_images"] = int(distributed.all_sum([run.skipped.count], run.device)[0])
    return record


def _training_record(progress: Progress, epoch: int, lr: float) -> dict[str, Any]:
    """The finished epoch's training figures; `progress` moves on to the next epoch."""
    record = {
        "epoch": epoch + 1,
        "step": progress.global_step,
        "train_loss": progress.epoch_loss_sum / max(progress.epoch_images, 1),
        "train_top1": progress.epoch_correct / max(progress.epoch_images, 1),
        "lr": lr,
        "images_per_sec": progress.epoch_images / max(progress.epoch_seconds, 1e-9),
        "epoch_seconds": progress.epoch_seconds,
        "data_wait_seconds": progress.epoch_data_wait,
        "data_wait_share": progress.epoch_data_wait / max(progress.epoch_seconds, 1e-9),
        "time": time.time(),
    }
    progress.epoch, progress.step_in_epoch = epoch + 1, 0
    progress.epoch_loss_sum, progress.epoch_images, progress.epoch_seconds, progress.epoch_data_wait = 0.0, 0, 0.0, 0.0
    progress.epoch_correct = 0
    return record
