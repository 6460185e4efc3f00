"""Stage `train`: train one variant (params `variants.<name>` on cached features, or
`pixel_variants.<name>` end to end from the images).

Writes ``<out>/model.safetensors``, ``<out>/config.json``, ``<out>/run_id`` and the training
curve ``<curves>`` (CSV: step, loss, lr; a DVC plot). Logs params, per-step loss and learning
rate, and the checkpoint to the variant's MLflow run.

Model selection (vlbench/selection.py): every ``train.eval_every`` steps and at the last step the
model is scored on the dev split (rsum, greedy CIDEr or the dev loss, ``train.select_on``); the
saved model is the best evaluation's, training stops after ``train.patience`` evaluations without
improvement, config.json records the selected step, and the dev curve goes to ``--dev-curves``
(CSV: step, metric, value; default ``dev/<name>`` next to ``<curves>``; a DVC plot). With
``optim.ema_decay`` > 0 the evaluations score (and the saved model holds) the exponential moving
average of the trainable weights over the cross-entropy steps, not the step's own weights.

Resume: every ``train.checkpoint_every`` steps (and on SIGTERM) the full training state (trainable
weights, optimizer, step, RNG states, curve so far, MLflow run id) goes to
``checkpoints/<variant>/last.pt``, outside the stage's outs so DVC does not delete it. Running the
stage again with the same params continues from there, in the same MLflow run, and ends with the
same weights as an uninterrupted run. A checkpoint made under other params is ignored.
A captioner with SCST (vlbench/scst.py) also keeps the state at the end of its cross-entropy steps,
``checkpoints/<variant>/ce_end.pt``, made under every param but ``scst`` and the beam re-ranking
(``decoding.rerank_*``): a run that changes only those (an SCST sweep) loads it, skips those steps,
and ends with the weights a run from scratch would; it starts a new MLflow run (param
``cross_entropy_run``: the run that trained those steps) with their loss and dev curves copied in.
The file stays after the stage; delete it to free the disk.

Many processes: the same command under ``torchrun --nproc_per_node N -m vlbench train ...`` (or
``accelerate launch``) trains with DDP; ``optim.batch_size`` stays the global batch, each rank
takes its slice, and only rank 0 logs and writes (see vlbench/distributed.py).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .. import distributed, io
from ..config import to_flat_dict
from ..data.manifests import captions_by_row
from ..errors import ParamError
from ..inputs import FrozenBottom, check_features, open_inputs
from ..models.consensus import NeighbourCaptions
from ..models.protocols import AlignmentModel, CaptioningModel
from ..models.trained import save_trained
from ..models.variants import create_variant_model, prepare_variant, variant
from ..params import load_params, section, variant_group, variant_params
from ..runtime import configure_threads, fault_point, fingerprint, pick_device, seed_everything
from ..scst import run_scst
from ..selection import Selection, eval_cadence, make_dev_metric, selection_metric
from ..tracking import Tracker
from ..training import (Batches, Checkpoint, TextCache, TunedTextCache, WeightAverage, accumulate, amp_dtype,
                        lr_at, make_step, native_bf16, no_bf16_reason, variant_precision)


def cross_entropy_params(vparams: dict) -> dict:
    """A captioner's params that its cross-entropy steps depend on: all but ``scst`` and the beam
    re-ranking (those steps decode greedily, for their dev CIDEr, and never re-rank)."""
    out = {k: v for k, v in vparams.items() if k != "scst"}
    if isinstance(out.get("decoding"), dict):
        out["decoding"] = {k: v for k, v in out["decoding"].items() if not k.startswith("rerank_")}
    return out


def make_val_loss(model: AlignmentModel | CaptioningModel, cfg, inputs, splits_dir: str, cached_text: bool, device,
                  max_images: int = 256):
    """-> a function giving the mean loss over a fixed slice of the val split (first caption of
    each image, fixed batches): comparable across steps, and it draws no random numbers."""
    ids = inputs.ids[:max_images]
    captions = [caps[:1] for caps in captions_by_row(splits_dir, "val", ids)]
    text_cache = TextCache(model, captions, device) if cached_text else None
    step_fn = make_step(model, cfg, captions, text_cache, inputs, device)
    bs = cfg.optim.batch_size

    @torch.no_grad()
    def val_loss() -> float:
        model.eval()
        chunks = [list(range(s, min(s + bs, len(ids)))) for s in range(0, len(ids), bs)]
        chunks = [c for c in chunks if len(c) > 1]  # a contrastive batch of one is meaningless
        losses = [step_fn(c, [0] * len(c)).item() * len(c) for c in chunks]
        return sum(losses) / sum(map(len, chunks))

    return val_loss


class Quiet:
    """Stands in for the MLflow Tracker on ranks other than 0, which log nothing."""

    run_id = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def log_params(self, *args, **kwargs) -> None:
        pass

    log_metrics = log_artifact = log_params


def run(params_path: str, name: str, features_dir: str | None, splits_dir: str, out: str, curves: str,
        checkpoint_dir: str | None = None, dev_curves: str | None = None) -> None:
    raw = load_params(params_path)
    cfg = variant(raw, name)
    pixels = variant_group(raw, name) == "pixel_variants"
    if pixels == bool(features_dir):
        raise ParamError(f"{variant_group(raw, name)}.{name}: " + (
            "a pixel variant reads images, not --features" if pixels else "needs --features (its cached image tokens)"))
    tcfg, tracking = section(raw, "train"), section(raw, "tracking")
    # optim.batch_size is the global batch of one optimizer step, whatever the number of processes
    # and micro-steps it is split into: results do not depend on the hardware
    ranks = distributed.from_env()
    parts = ranks.world_size * tcfg.grad_accum_steps
    if cfg.optim.batch_size % parts:
        raise ParamError(f"{variant_group(raw, name)}.{name}.optim.batch_size: {cfg.optim.batch_size} does not split "
                         f"into {ranks.world_size} process(es) x train.grad_accum_steps={tcfg.grad_accum_steps}")
    if features_dir:  # features of another encoder or image size would train silently wrong
        check_features(features_dir, cfg.image_encoder, f"{variant_group(raw, name)}.{name}.image_encoder",
                       section(raw, "features").image_size)
    seed_everything(tcfg.seed)  # the same on every rank: same initial weights, same batches
    device = distributed.setup(ranks, pick_device(tcfg.device))
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)

    inputs = open_inputs("train", splits_dir, features_dir, cfg)
    ids = inputs.ids
    captions = captions_by_row(splits_dir, "train", ids)
    extra = {**inputs.describe(), "image_encoder": cfg.image_encoder}
    extra |= prepare_variant(cfg, [c for caps in captions for c in caps])  # e.g. a vocabulary, saved with the model
    model = create_variant_model(cfg, extra["image_dim"], extra["n_grid"], extra.get("vocab"), pixels=pixels).to(device)
    if getattr(getattr(cfg, "decoding", None), "rerank_neighbours", 0):  # kept with the model (models/consensus.py)
        if pixels:
            raise ParamError(f"{variant_group(raw, name)}.{name}.decoding.rerank_neighbours: needs cached image "
                             f"features (the features stage), not pixel inputs")
        model.neighbours = NeighbourCaptions.from_inputs(inputs, captions)
    frozen_bottom = getattr(model, "image_top", None) is not None  # image_tuning: top
    if frozen_bottom:  # the frozen stages' maps are the same every step: computed once
        inputs = FrozenBottom(inputs, model, device, "train")
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    average = WeightAverage({k: p for k, p in model.named_parameters() if p.requires_grad},
                            cfg.optim.ema_decay) if cfg.optim.ema_decay else None
    text_cache = None
    if cfg.family == "alignment" and cfg.text_tuning == "frozen":
        model.eval()
        text_cache = TextCache(model, captions, device)
    elif cfg.family == "alignment" and cfg.text_tune_layers and cfg.text_tuning == "full":
        if TunedTextCache.works_for(model, [c for caps in captions[:8] for c in caps], device):
            text_cache = TunedTextCache(model, captions, device)  # the frozen layers run once per caption
        elif ranks.is_main:
            print(f"vlbench train: {cfg.text_encoder}'s tuned layers do not run apart from its frozen ones; "
                  f"every step runs the whole text encoder", file=sys.stderr)
    optim = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                              fused=device.type == "cuda")  # one kernel for all parameters
    precision = variant_precision(cfg, tcfg)
    dtype = amp_dtype(precision, device)
    if dtype == torch.bfloat16 and not native_bf16(device) and ranks.is_main:
        print(f"vlbench train: {name}: precision {precision!r}, but {no_bf16_reason(device)}: "
              f"autocast emulates it, many times slower than fp32; set precision: auto "
              f"(bf16 only where it is native) or fp32", file=sys.stderr)
    amp = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # fp16 underflows small gradients
    forward, no_sync = model, contextlib.nullcontext
    if ranks.active:
        from torch.nn.parallel import DistributedDataParallel

        # a fully tuned pretrained encoder has trainable parts the loss never reaches (HF poolers)
        unused = "full" in (getattr(cfg, "text_tuning", None), getattr(cfg, "image_tuning", None))
        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                          find_unused_parameters=unused)
        no_sync = forward.no_sync
    if tcfg.compile:
        forward = torch.compile(forward)
    step_fn = make_step(model, cfg, captions, text_cache, inputs, device, forward)
    val_inputs = open_inputs("val", splits_dir, features_dir, cfg)
    if frozen_bottom and ranks.is_main:  # rank 0 validates
        val_inputs = FrozenBottom(val_inputs, model, device, "val")
    val_loss = make_val_loss(model, cfg, val_inputs, splits_dir,
                             text_cache is not None, device) if ranks.is_main else None  # rank 0 validates
    # model selection on the dev split: the best evaluation's weights become the model (vlbench/selection.py)
    selection = Selection(selection_metric(cfg.family, tcfg.select_on), tcfg.patience)
    eval_every = eval_cadence(tcfg)
    dev_metric = None
    if ranks.is_main and selection.metric != "val_loss":
        dev_metric = make_dev_metric(model, cfg, val_inputs, splits_dir, device, tcfg.dev_images)
    # alignment draws one caption per image (a repeated image would be a false negative) unless its
    # loss knows the pairs of one image (dual_encoder captions_per_image with multi_positive / vse_max_violation)
    batches = Batches(len(inputs), captions, cfg.optim.batch_size, tcfg.seed, getattr(cfg, "caption_sampling", "random"),
                      getattr(cfg, "captions_per_image", 1))

    def made_under(vparams: dict) -> str:
        return fingerprint(vparams, tcfg.seed, precision, tcfg.grad_accum_steps, extra, ids,
                           [eval_every, tcfg.select_on, tcfg.patience, tcfg.dev_images])

    folder = Path(checkpoint_dir or f"checkpoints/{name}")
    ckpt = Checkpoint(folder, made_under(variant_params(raw, name)))
    scst = cfg.family == "captioning" and cfg.scst.steps
    # the state at the end of the cross-entropy steps, made under the params those steps use: a run
    # that changes only SCST settings (or the re-ranking) starts from it instead of repeating them
    ce_end = Checkpoint(folder, made_under(cross_entropy_params(variant_params(raw, name))), "ce_end.pt") if scst else None
    state = ckpt.load()
    ce_reused = state is None and ce_end is not None and (state := ce_end.load()) is not None
    start, rows, best_val = 0, [], float("inf")
    run_id_file = out_dir / "run_id"
    if state is not None:  # every rank loads it: they all continue from the same state
        model.load_state_dict(state["model"], strict=False)
        optim.load_state_dict(state["optim"])
        scaler.load_state_dict(state["scaler"])
        batches.rng.setstate(state["batch_rng"])
        torch.set_rng_state(state["torch_rng"])
        start, rows, best_val = state["step"], state["rows"], state["best_val_loss"]
        selection.load_state_dict(state["selection"])
        if average is not None:
            average.load_state_dict(state["average"])
        if ranks.is_main and ce_reused:
            print(f"vlbench train: {name}: the cross-entropy steps of MLflow run {state['run_id']} ({ce_end.path}), "
                  f"made under the same params but scst and decoding.rerank_*; SCST starts from their end",
                  file=sys.stderr)
        elif ranks.is_main:
            io.write_text(run_id_file, state["run_id"])
            print(f"vlbench train: resuming {name} from step {start}/{cfg.optim.steps}", file=sys.stderr)

    stop = {"signal": None}
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))

    # lineage: the DVC hashes of what it trains on (data/raw for pixel variants: their images)
    read = [splits_dir, features_dir or str(Path(splits_dir).parent / "raw")]
    resuming = state is not None and not ce_reused  # a reused cross-entropy end starts a new MLflow run
    tracker = Tracker(tracking.experiment, name, run_id_file, resume=resuming, inputs=read,
                      context="training") if ranks.is_main else Quiet()
    with tracker as mlflow:
        if not resuming:
            mlflow.log_params({**to_flat_dict(cfg), "seed": tcfg.seed, "device": str(device),
                               "trainable_params": n_trainable, "train_images": len(ids),
                               "precision": precision, "autocast": str(dtype or torch.float32).removeprefix("torch."),
                               "compile": tcfg.compile,
                               "grad_accum_steps": tcfg.grad_accum_steps, "world_size": ranks.world_size})
        if ce_reused:  # the new run gets the reused steps' curves too (their dev loss is not kept)
            mlflow.log_params({"cross_entropy_run": state["run_id"]})
            for row in rows:
                mlflow.log_metrics({"train_loss": row["loss"], "lr": row["lr"]}, step=row["step"])
            for row in selection.rows:
                mlflow.log_metrics({f"dev_{row['metric']}": row["value"]}, step=row["step"])

        def save_checkpoint(next_step: int, into: Checkpoint = ckpt, **more) -> None:
            into.save(model={k: v.detach().cpu() for k, v in model.state_dict().items() if k in trainable},
                      optim=optim.state_dict(), scaler=scaler.state_dict(), step=next_step, rows=rows,
                      batch_rng=batches.rng.getstate(),
                      torch_rng=torch.get_rng_state(), run_id=mlflow.run_id, best_val_loss=best_val,
                      selection=selection.state_dict(),
                      average=average.state_dict() if average is not None else None, **more)

        def validate(at_step: int, averaged: bool = True, with_loss: bool = True) -> None:
            """Dev loss and metric; the weight average's, when there is one and ``averaged``
            (cross-entropy steps; SCST trains and evaluates its own weights). ``with_loss`` False:
            the metric alone (weights whose dev loss is already logged)."""
            with average.applied() if averaged and average is not None else contextlib.nullcontext():
                evaluate_dev(at_step, with_loss)
            model.train()  # models keep their frozen parts in eval mode themselves

        def evaluate_dev(at_step: int, with_loss: bool) -> None:
            nonlocal best_val
            logged, value = {}, None
            if with_loss:
                with amp:
                    value = val_loss()
                best_val = min(best_val, value)
                logged = {"val_loss": value, "best_val_loss": best_val}
            if dev_metric is not None:
                with amp:
                    value = dev_metric()
                logged[f"dev_{selection.metric}"] = value
            selection.update(at_step, value, lambda: {k: v.detach().to("cpu", copy=True)
                                                      for k, v in model.state_dict().items() if k in trainable})
            if dev_metric is not None:
                logged[f"best_dev_{selection.metric}"] = selection.best
            mlflow.log_metrics(logged, step=at_step)

        trainable = {k for k, v in model.named_parameters() if v.requires_grad} | {k for k, _ in model.named_buffers()}
        t0, done = time.perf_counter(), start
        model.train()
        bar = tqdm(range(start, cfg.optim.steps), desc=f"train {name}", unit="step", initial=start, total=cfg.optim.steps,
                   disable=not ranks.is_main)
        for step in bar:
            lr = lr_at(step, cfg.optim)
            for g in optim.param_groups:
                g["lr"] = lr
            # every rank draws the whole global batch from the same seeded sampler and keeps its part
            idx, cap_idx = (ranks.share(x) for x in batches.sample())
            optim.zero_grad(set_to_none=True)
            loss = accumulate(step_fn, idx, cap_idx, tcfg.grad_accum_steps, amp, scaler, no_sync)
            scaler.unscale_(optim)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(optim)
            scaler.update()
            if average is not None:
                average.update(step)
            if step % cfg.optim.log_every == 0 or step == cfg.optim.steps - 1:
                value = distributed.mean(loss.item(), device)  # the loss of the global batch
                rows.append({"step": step, "loss": round(value, 5), "lr": lr})
                mlflow.log_metrics({"train_loss": value, "lr": lr}, step=step)
                bar.set_postfix(loss=f"{value:.3f}")
            done = step + 1
            fault_point(done)
            at_checkpoint = tcfg.checkpoint_every and done % tcfg.checkpoint_every == 0
            at_eval = (eval_every and done % eval_every == 0) or done == cfg.optim.steps
            if ranks.is_main and at_eval:
                validate(done)
            # early stopping: rank 0 decides, every rank stops at the same step
            early = bool(at_eval) and done < cfg.optim.steps and distributed.any_rank(selection.exhausted, device)
            stopping = distributed.any_rank(bool(stop["signal"]), device)  # all ranks stop at the same step
            if ranks.is_main and ((at_checkpoint and done < cfg.optim.steps) or stopping) and not early:
                save_checkpoint(done)
            if early:
                selection.stopped_at = done  # kept in later checkpoints (SCST's): a resume knows where CE ended
                if ranks.is_main:
                    print(f"vlbench train: early stop after step {done}: no better dev {selection.metric} in "
                          f"{tcfg.patience} evaluations (best {selection.best:.4g} at step {selection.best_step})",
                          file=sys.stderr)
                break
            if stopping:
                distributed.barrier()  # the launcher stops every rank once one exits: not before the save
                signum = stop["signal"] or signal.SIGTERM
                if ranks.is_main:
                    print(f"vlbench train: stopped by signal {signum} after step {done}; "
                          f"run the stage again to resume", file=sys.stderr)
                raise SystemExit(128 + signum)
        bar.close()
        seconds = time.perf_counter() - t0
        done = selection.stopped_at or done  # the last step trained (a resume after an early stop starts past it)
        if not ranks.is_main:
            return
        if scst and not ce_reused and "scst" not in (state or {}):
            save_checkpoint(cfg.optim.steps, into=ce_end)  # the loop above is skipped when it is loaded
        timing = {} if ce_reused else {"train_seconds": seconds, "train_samples_per_s":
                                       max(0, done - start) * cfg.optim.batch_size / max(seconds, 1e-9)}
        mlflow.log_metrics({**timing, "selected_step": selection.best_step})
        if scst and cfg.scst.start == "last":  # the last evaluation's weights (a resumed SCST loads its own)
            if average is not None:
                average.copy_to_weights()
        elif selection.weights is not None:  # the best evaluation's weights, not the last step's
            model.load_state_dict(selection.weights, strict=False)
        scst_rows, scst_steps = [], {}  # self-critical CIDEr-D training after the cross-entropy steps (vlbench/scst.py), rank 0 only
        if scst and cfg.scst.dev_decoding == "configured":  # SCST's own dev metric (config.py: ScstConfig)
            images = tcfg.dev_images if cfg.scst.dev_images is None else cfg.scst.dev_images
            dev_metric = make_dev_metric(model, cfg, val_inputs, splits_dir, device, images, decoding=cfg.decoding)
            if "scst" not in (state or {}):  # a resumed SCST has its selection back from the checkpoint
                selection.restart("configured_cider")
                # the SCST start, scored like SCST's evaluations; its dev loss was logged at the last CE
                # evaluation (the same weights with start: last)
                validate(done, averaged=False, with_loss=cfg.scst.start != "last")
        if scst:
            scst_rows, scst_done = run_scst(model, cfg, inputs, captions, device, mlflow, first_step=done, seed=tcfg.seed,
                                 state=state, amp=amp, scaler=scaler,
                                 save=lambda s: save_checkpoint(cfg.optim.steps, scst=s), stop=stop,
                                 checkpoint_every=tcfg.checkpoint_every, selection=selection,
                                 evaluate=lambda at: validate(at, averaged=False),
                                 eval_every=eval_every if cfg.scst.eval_every is None else cfg.scst.eval_every,
                                 name=name)
            model.load_state_dict(selection.weights, strict=False)  # the best dev evaluation of either phase
            scst_steps = {"scst_steps_trained": scst_done, "scst_steps": cfg.scst.steps}  # the selected step may lie here
        selected = selection.summary(done, cfg.optim.steps) | scst_steps
        save_trained(model, out_dir, name, variant_params(raw, name), {**extra, "selection": selected})
        with io.atomic_path(curves) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["step", "loss", "lr", *(["scst_reward", "scst_baseline"] if scst_rows else [])])
            w.writeheader()
            w.writerows(rows + scst_rows)
        dev_curves = Path(dev_curves or Path(curves).parent / "dev" / Path(curves).name)
        dev_curves.parent.mkdir(parents=True, exist_ok=True)
        with io.atomic_path(dev_curves) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["step", "metric", "value"])
            w.writeheader()
            w.writerows(selection.rows)
        mlflow.log_artifact(str(out_dir / "model.safetensors"), "checkpoint")
        mlflow.log_artifact(str(out_dir / "config.json"), "checkpoint")
    ckpt.remove()
    print(f"{name}: {done} steps in {seconds:.1f}s, final loss {rows[-1]['loss']:.4f}; selected step "
          f"{selection.best_step} (dev {selection.metric} {selection.best:.4f})")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="vlbench train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml",
                    help="params file (reads variants.<name> or pixel_variants.<name>, train, tracking, "
                         "features.image_size)")
    ap.add_argument("--variant", required=True, help="a key of `variants` or `pixel_variants` in params.yaml")
    ap.add_argument("--features", default=None,
                    help="folder of the features stage for the variant's image encoder (not for pixel_variants, "
                         "which read the images listed in --splits)")
    ap.add_argument("--splits", default="data/splits")
    ap.add_argument("--out", default=None, help="model folder (default models/<variant>)")
    ap.add_argument("--curves", default=None, help="training-curve CSV (default metrics/curves/<variant>.csv)")
    ap.add_argument("--checkpoints", default=None, help="resume folder (default checkpoints/<variant>)")
    ap.add_argument("--dev-curves", default=None,
                    help="dev-evaluation CSV (step, metric, value; default: dev/<name> next to --curves, "
                         "e.g. metrics/curves/dev/<variant>.csv)")
    a = ap.parse_args(argv)
    configure_threads(section(load_params(a.params), "train").threads)
    try:
        run(a.params, a.variant, a.features, a.splits, a.out or f"models/{a.variant}",
            a.curves or f"metrics/curves/{a.variant}.csv", a.checkpoints, a.dev_curves)
    finally:
        distributed.teardown()
