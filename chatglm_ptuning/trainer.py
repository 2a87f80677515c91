"""A small Seq2SeqTrainer subclass: prompt-only checkpoints, atomic and finite saves, a divergence
guard, counted training tokens, length-sorted evaluation, the evaluation loss over label tokens, and a
loss-curve plot. Everything else is the transformers Trainer as its users know it.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Sampler
from transformers import EvalPrediction, Seq2SeqTrainer, TrainerCallback
from transformers.integrations.deepspeed import deepspeed_load_checkpoint, is_deepspeed_zero3_enabled
from transformers.trainer import SCHEDULER_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .batch_generation import generate_rows
from .checkpoint import PromptSettings, save_prefix_checkpoint
from .collator import PROMPT_LENGTH_KEY, REAL_TOKENS_KEY
from .constants import IGNORE_INDEX
from .head_loss import shifted_labels
from .methods import load_method_state
from .prompt_learning import PrefixDropout
from .run_folder import (
    DIVERGED_SUFFIX,
    STAGING_DIR,
    RunFolderError,
    checkpoint_step,
    complete_checkpoints,
    damaged_checkpoint_error,
    write_run_settings,
)

logger = logging.getLogger(__name__)

# Eval batches generated together when rows can finish early: each generating prediction_step keeps
# per_device_eval_batch_size rows running and refills places from this many batches' rows, so only
# the pool's last rows run in a draining batch.
GENERATION_POOL_BATCHES = 8

# The private Trainer methods PromptTrainer overrides, each because transformers offers no public
# hook for it (tests/test_trainer_hooks.py fails when one is renamed or its parameters change).
# Everything else goes through public hooks: get_eval_dataloader/get_test_dataloader, save_model,
# evaluate/predict/prediction_step/evaluation_loop, get_batch_samples and callbacks.
PRIVATE_TRAINER_OVERRIDES: tuple[tuple[str, str], ...] = (
    ("_get_eval_sampler", "length-sorted evaluation: the eval/test sampler is chosen only here"),
    ("_get_grad_norm", "the divergence guard needs the step's pre-clip gradient norm, which no callback receives"),
    ("_get_output_dir", "atomic checkpoints: _save_checkpoint writes into <output_dir>/.staging through it"),
    ("_save_checkpoint", "atomic, finite checkpoints (staged, then renamed) carrying run_settings.json"),
    ("_save_optimizer_and_scheduler", "DeepSpeed prompt runs save their engine state without the frozen backbone"),
    ("_prepare_for_training", "DeepSpeed prompt runs resume non-strict (their checkpoints hold no frozen weights)"),
    ("_load_best_model", "DeepSpeed prompt runs load the best checkpoint non-strict"),
    ("_load_from_checkpoint", "resuming loads the method's own checkpoint files and refuses non-finite weights"),
    ("_load_optimizer_and_scheduler", "a damaged optimizer/scheduler file is named; the command line's learning rate applies"),
    ("_load_rng_state", "a damaged rng_state.pth is named"),
)

# Private Trainer members PromptTrainer calls or reads without overriding them.
PRIVATE_TRAINER_USES: tuple[tuple[str, str], ...] = (
    ("_tr_loss", "the divergence guard reads the loss summed since the last log"),
    ("_prepare_inputs", "prediction steps move their batch to the device as the Trainer does"),
    ("_pad_tensors_to_max_len", "generated ids and labels are padded to max_length as Seq2SeqTrainer does"),
    ("_load_scaler", "DeepSpeed prompt runs restore the loss scaler on resume"),
)


class TrainingDiverged(RuntimeError):
    """The loss, the gradient norm or a trainable weight became NaN or infinite."""


class PromptTrainer(Seq2SeqTrainer):
    """Seq2SeqTrainer that, given `prompt_settings` (a soft prompt or LoRA), saves only the trainable
    weights with those settings (soft prompts: model.safetensors; LoRA: PEFT's adapter files).

    Checkpoints are written into `<output_dir>/.staging/` and renamed into place once complete,
    so a killed run never leaves a `checkpoint-N` that looks whole; each also holds the run's
    `run_settings` (run_settings.json). A checkpoint is written only when every trainable weight is
    finite, and a step whose loss or gradient norm is not finite stops the run before the optimizer
    applies it (`DivergenceGuard`). Under DeepSpeed only the trainable parameters are gathered and
    saved (never the frozen backbone).

    Training batches' real (non-pad) and computed token counts are summed (`train_token_counts`).
    With `sort_eval_by_length` (the default) evaluation/prediction rows are batched longest prompt
    first, so each batch pads and generates little beyond its rows' own needs; predictions, label
    ids and metrics are put back in the dataset's order (one per row, also across processes).
    With `drop_finished_rows` (the default) a generating row leaves its batch once it has made EOS
    or its budget and a waiting row takes its place (`batch_generation.generate_rows`; a
    prediction_step gets GENERATION_POOL_BATCHES eval batches' rows); the tokens are the same
    either way, and the same as at batch size 1 when greedy.
    """

    def __init__(
        self,
        *args,
        prompt_settings: PromptSettings | None = None,
        eval_collator=None,  # noqa: ANN001 - batches eval/predict rows (prompts + labels) when given
        generation_kwargs: dict | None = None,
        run_settings: dict | None = None,
        sort_eval_by_length: bool = True,
        drop_finished_rows: bool = True,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.prompt_settings = prompt_settings
        self.eval_collator = eval_collator
        self.generation_kwargs = generation_kwargs or {}  # also used by evaluations during training
        self.active_generation_kwargs: dict = {}  # those of the evaluate/predict call under way
        self.run_settings = run_settings
        self.last_checkpoint: str | None = None  # the checkpoint this run wrote last
        self._staging_run_dir: str | None = None
        self._eval_loss_totals = torch.zeros(2, dtype=torch.float64)  # summed loss, label tokens
        self._step_grad_norm: torch.Tensor | float | None = None
        # The divergence guard reads the loss summed since the last log: the Trainer must not
        # replace a non-finite loss by the running mean first (the run stops at the first one anyway).
        self.args.logging_nan_inf_filter = False
        self.add_callback(DivergenceGuard(self))
        self.add_callback(CommandLineStepsCallback())
        self.sort_eval_by_length = sort_eval_by_length
        self.drop_finished_rows = drop_finished_rows
        self._token_counts = [0, 0]  # real, computed: this process's training batches

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval", **gen_kwargs):  # noqa: ANN001
        gen_kwargs = self._use_generation_kwargs(gen_kwargs)
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        if isinstance(dataset, str):
            dataset = self.eval_dataset[dataset]
        with self._in_file_order(dataset):
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix, **gen_kwargs)

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix="test", **gen_kwargs):  # noqa: ANN001
        gen_kwargs = self._use_generation_kwargs(gen_kwargs)
        with self._in_file_order(test_dataset) as file_order:
            output = super().predict(test_dataset, ignore_keys, metric_key_prefix, **gen_kwargs)
        return output._replace(predictions=file_order(output.predictions), label_ids=file_order(output.label_ids))

    def _use_generation_kwargs(self, gen_kwargs: dict) -> dict:
        """The generate() settings of this evaluate/predict call: `generation_kwargs`, then the call's,
        then (as Seq2SeqTrainer does) `generation_max_length`/`generation_num_beams` where unset.
        `prediction_step` reads them from `active_generation_kwargs`."""
        gen_kwargs = {**self.generation_kwargs, **gen_kwargs}
        if gen_kwargs.get("max_length") is None and gen_kwargs.get("max_new_tokens") is None and self.args.generation_max_length is not None:
            gen_kwargs["max_length"] = self.args.generation_max_length
        if gen_kwargs.get("num_beams") is None and self.args.generation_num_beams is not None:
            gen_kwargs["num_beams"] = self.args.generation_num_beams
        self.active_generation_kwargs = gen_kwargs
        return gen_kwargs

    # --- batching ------------------------------------------------------------------------------
    def eval_order(self, dataset) -> np.ndarray | None:  # noqa: ANN001
        """The order eval/predict rows are batched in: longest prompt first, ties in dataset order;
        None when rows stay in dataset order (sorting off, or rows without `input_ids`)."""
        if not self.sort_eval_by_length or dataset is None or not hasattr(dataset, "column_names"):
            return None
        if "input_ids" not in dataset.column_names:
            return None
        lengths = np.array([len(ids) for ids in dataset["input_ids"]])
        return np.argsort(-lengths, kind="stable")

    def _get_eval_sampler(self, eval_dataset) -> Sampler | None:  # noqa: ANN001
        order = self.eval_order(eval_dataset)
        return super()._get_eval_sampler(eval_dataset) if order is None else _FixedOrderSampler(order.tolist())

    @contextmanager
    def _in_file_order(self, dataset):  # noqa: ANN001
        """While evaluating `dataset`: compute_metrics sees predictions and labels one per dataset row
        (the rows several processes repeat to even out their last batches are cut off) in dataset
        order. Yields that same function of gathered per-row values, for predict's outputs."""
        rows = len(dataset) if dataset is not None and not isinstance(dataset, dict) and hasattr(dataset, "__len__") else None
        order = None if rows is None else self.eval_order(dataset)
        inverse = None if order is None else np.argsort(order)

        def file_order(values):  # noqa: ANN001, ANN202
            return _rows_in_order(values, rows, inverse)

        compute_metrics = self.compute_metrics
        if rows is not None and compute_metrics is not None and not self.args.batch_eval_metrics:

            def in_file_order(prediction: EvalPrediction) -> dict:
                return compute_metrics(EvalPrediction(
                    file_order(prediction.predictions), file_order(prediction.label_ids),
                    inputs=file_order(prediction.inputs), losses=prediction.losses,
                ))

            self.compute_metrics = in_file_order
        try:
            yield file_order
        finally:
            self.compute_metrics = compute_metrics

    def get_batch_samples(self, epoch_iterator, num_batches, device):  # noqa: ANN001
        """The Trainer's micro-batches of one optimizer step; also counts their real tokens (the
        collator's `REAL_TOKENS_KEY`, removed here before the forward) and computed tokens."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        for batch in batch_samples:
            computed = batch["input_ids"].numel()
            real = batch.pop(REAL_TOKENS_KEY, None)
            self._token_counts[0] += computed if real is None else int(real)
            self._token_counts[1] += computed
        return batch_samples, num_items_in_batch

    def train_token_counts(self) -> dict[str, int]:
        """Real (non-pad) and computed (padding included) tokens of the training batches this run
        trained on, summed over every process (call it on every rank)."""
        counts = torch.tensor(self._token_counts, dtype=torch.long, device=self.args.device)
        real, computed = self.accelerator.reduce(counts, reduction="sum").tolist()
        return {"train_real_tokens": real, "train_computed_tokens": computed}

    def get_eval_dataloader(self, eval_dataset=None):  # noqa: ANN001, ANN201
        with self._eval_batching():
            return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset):  # noqa: ANN001, ANN201
        with self._eval_batching():
            return super().get_test_dataloader(test_dataset)

    @contextmanager
    def _eval_batching(self):  # noqa: ANN202
        """While an eval/test dataloader is built: `eval_collator` (when given) batches its rows, and
        when generating, each batch holds GENERATION_POOL_BATCHES eval batches' rows, of which
        prediction_step generates `per_device_eval_batch_size` at a time (a finished row's place goes
        to the next waiting row)."""
        train_collator, eval_batch_size = self.data_collator, self.args.per_device_eval_batch_size
        if self.eval_collator is not None:
            self.data_collator = self.eval_collator
        if self.args.predict_with_generate and not self.args.prediction_loss_only and self.drop_finished_rows:
            self.args.per_device_eval_batch_size = eval_batch_size * GENERATION_POOL_BATCHES
        try:
            yield
        finally:
            self.data_collator, self.args.per_device_eval_batch_size = train_collator, eval_batch_size

    # --- what gets saved -------------------------------------------------------------------
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if self.is_deepspeed_enabled and getattr(named[0][1], "ds_id", None) is not None:
            import deepspeed  # ZeRO-3: parameters are partitioned; gather just these

            with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
                return {n: p.detach().float().cpu().clone() for n, p in named}
        return {n: p.detach().float().cpu().clone() for n, p in named}

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if self.prompt_settings is None:
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        state = self._trainable_state()  # every rank takes part in a ZeRO-3 gather
        if self.args.should_save:
            self._write_trainable(output_dir, state)

    def _write_trainable(self, output_dir: str, state: dict[str, torch.Tensor]) -> None:
        """Write the trainable weights with `prompt_settings`, the config, tokenizer and training args."""
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in trainable}
        if self.prompt_settings.method == "lora":
            from .lora import save_lora

            save_lora(self.model, output_dir, state)  # PEFT's adapter files
            self.prompt_settings.save(Path(output_dir))  # last: a folder with settings has its weights
        else:
            save_prefix_checkpoint(state, output_dir, self.prompt_settings)
        self.model.config.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self.prompt_settings is not None and self.is_deepspeed_enabled:
            # DeepSpeed's own checkpoint would otherwise hold the whole frozen backbone.
            from accelerate.utils import DeepSpeedSchedulerWrapper  # exported only where deepspeed is installed

            self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
            if self.args.should_save and not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper):
                # The Trainer's own scheduler is not in DeepSpeed's checkpoint; resuming reads this file.
                torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))
            return
        super()._save_optimizer_and_scheduler(output_dir)

    def _load_prompt_deepspeed_checkpoint(self, checkpoint: str) -> None:
        """DeepSpeed checkpoints of a prompt run hold no frozen weights, so the module loads non-strict
        (the Trainer loads strictly unless the model is a PEFT model)."""
        deepspeed_load_checkpoint(self.model_wrapped, checkpoint, load_module_strict=False)

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):  # noqa: ANN001
        if self.prompt_settings is None or not self.is_deepspeed_enabled or resume_from_checkpoint is None:
            return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, None)
        self._load_prompt_deepspeed_checkpoint(resume_from_checkpoint)
        self._load_optimizer_and_scheduler(resume_from_checkpoint)
        self._load_scaler(resume_from_checkpoint)
        return model, train_dataloader

    def _load_best_model(self) -> None:
        if self.prompt_settings is not None and self.is_deepspeed_enabled:
            self._load_prompt_deepspeed_checkpoint(self.state.best_model_checkpoint)
            return
        super()._load_best_model()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:  # noqa: ANN001
        if self.prompt_settings is None:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        else:
            load_method_state(model if model is not None else self.model, resume_from_checkpoint, self.prompt_settings)
        bad = self._nonfinite_weights()
        if bad:
            raise damaged_checkpoint_error(resume_from_checkpoint, "", f"non-finite weights: {', '.join(bad[:3])}")

    # --- resuming: damaged files named, the command line's learning rate applied -----------------
    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        try:
            super()._load_optimizer_and_scheduler(checkpoint)
        except Exception as err:  # noqa: BLE001 - a file run_folder.check_resume could not tell was damaged
            raise damaged_checkpoint_error(checkpoint, "optimizer.pt / scheduler.pt", f"{type(err).__name__}: {err}") from None
        if checkpoint is not None:
            self._apply_learning_rate()

    def _load_rng_state(self, checkpoint: str | None) -> None:
        try:
            super()._load_rng_state(checkpoint)
        except Exception as err:  # noqa: BLE001
            raise damaged_checkpoint_error(checkpoint, "rng_state.pth", f"{type(err).__name__}: {err}") from None

    def _apply_learning_rate(self) -> None:
        """The optimizer and scheduler states of a checkpoint carry the learning rate its run used;
        rescale them to --learning_rate (resuming after a divergence at a lower rate)."""
        base_lrs = getattr(self.lr_scheduler, "base_lrs", None)
        if not base_lrs or not base_lrs[0] or math.isclose(base_lrs[0], self.args.learning_rate):
            return
        ratio = self.args.learning_rate / base_lrs[0]
        self.lr_scheduler.base_lrs = [lr * ratio for lr in base_lrs]
        for group in self.optimizer.param_groups:
            group["lr"] *= ratio
            if "initial_lr" in group:
                group["initial_lr"] *= ratio
        self.lr_scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        logger.warning("resumed with learning rate %g (the checkpoint's run used %g)", self.args.learning_rate, base_lrs[0])

    # --- generation in evaluate/predict ----------------------------------------------------------
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):  # noqa: ANN001
        """Generate from the prompt alone and return only the new tokens, as the reference does.

        `max_length` is the reference's total length (prompt + answer). Each row gets the budget
        it would have alone (max_length - its own prompt length), so results do not depend on
        which rows share a batch; at most per_device_eval_batch_size rows generate at once, and a
        finished row's place goes to the next waiting row (see `generate_rows`).
        A decoder-only model's eval rows hold the prompt in input_ids and
        the reference answer in labels (different lengths), so no loss is computed on this path.
        """
        if not self.args.predict_with_generate or prediction_loss_only:
            return self._loss_prediction_step(model, inputs)
        inputs = self._prepare_inputs(inputs)
        gen_kwargs = {**self.active_generation_kwargs, **gen_kwargs}
        gen_kwargs = {k: v for k, v in gen_kwargs.items() if v is not None}
        gen_kwargs.setdefault("synced_gpus", is_deepspeed_zero3_enabled())
        max_length = gen_kwargs.pop("max_length", None) or self.model.generation_config.max_length
        budgets = max_length - _prompt_lengths(inputs)
        pad_id = self.processing_class.pad_token_id
        with torch.no_grad():
            generated = generate_rows(
                self.model, inputs["input_ids"], _left_padding_mask(inputs), budgets, pad_id, self.drop_finished_rows,
                max_rows=self.args.per_device_eval_batch_size, **gen_kwargs,
            )
        generated = self._pad_tensors_to_max_len(generated, max_length)
        labels = inputs.get("labels")
        if labels is not None:
            labels = self._pad_tensors_to_max_len(labels, max_length)
        return None, generated, labels

    # --- evaluation loss: the training convention, a mean over every label token of the set ---------
    def _loss_prediction_step(self, model, inputs):  # noqa: ANN001
        """The batch's mean next-token loss; its summed loss and label count are also added to the
        evaluation's running totals, from which `evaluation_loop` reports `eval_loss`."""
        inputs = self._prepare_inputs(inputs)
        inputs.pop(PROMPT_LENGTH_KEY, None)
        inputs.pop(REAL_TOKENS_KEY, None)
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError("evaluation rows carry no labels: the evaluation loss needs prompt + answer rows")
        count = (shifted_labels(labels) != IGNORE_INDEX).sum()
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = model(**inputs, num_items_in_batch=count.clamp(min=1)).loss.detach().float()
        self._eval_loss_totals += torch.stack((loss * count, count.float())).to(self._eval_loss_totals.device)
        return loss, None, None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):  # noqa: ANN001
        """The Trainer's loop; `<prefix>_loss` is replaced by the label-token mean over the whole set
        and all ranks (the Trainer averages per-batch means weighted by rows, which depends on the
        batch size)."""
        self._eval_loss_totals = torch.zeros(2, dtype=torch.float64, device=self.args.device)
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        totals = self.accelerator.reduce(self._eval_loss_totals, reduction="sum")
        if totals[1] > 0:
            output.metrics[f"{metric_key_prefix}_loss"] = (totals[0] / totals[1]).item()
        return output

    # --- atomic, finite checkpoints -------------------------------------------------------------
    def _get_output_dir(self, trial) -> str:  # noqa: ANN001
        return self._staging_run_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:  # noqa: ANN001
        bad = self._nonfinite_weights()
        if bad:
            raise self._diverged(
                f"after step {self.state.global_step} the trainable weight(s) {', '.join(bad[:3])} are not finite; "
                f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step} was not written."
            )
        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, STAGING_DIR)
        self._staging_run_dir = staging
        try:
            super()._save_checkpoint(model, trial)
            if self.args.should_save and self.run_settings is not None:
                write_run_settings(os.path.join(staging, name), self.run_settings)
        except Exception as err:
            if not _is_write_failure(err):
                raise
            shutil.rmtree(staging, ignore_errors=True)
            free = shutil.disk_usage(run_dir).free / 1e6
            raise RunFolderError(
                f"writing {name} into {run_dir} failed ({_reason(err)}; {free:.0f} MB free); nothing was removed: "
                f"the last complete checkpoint is {last_complete_checkpoint(run_dir) or 'none yet'}. Free some space, "
                "then continue with --resume_from_checkpoint True"
            ) from None
        finally:
            self._staging_run_dir = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(os.path.join(staging, name), final)
            shutil.rmtree(staging, ignore_errors=True)
            self.last_checkpoint = final
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
            )
        self.accelerator.wait_for_everyone()

    # --- divergence guard ------------------------------------------------------------------------
    def _nonfinite_weights(self) -> list[str]:
        """Names of the trainable weights holding NaN or infinity."""
        if self.is_deepspeed_enabled:
            state = self._trainable_state()  # ZeRO-3 partitions them: gathered
            return [n for n, t in state.items() if not torch.isfinite(t).all()]
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not named:
            return []
        finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in named]).tolist()
        return [n for (n, _), ok in zip(named, finite) if not ok]

    def _get_grad_norm(self, model, grad_norm=None):  # noqa: ANN001
        self._step_grad_norm = super()._get_grad_norm(model, grad_norm)
        return self._step_grad_norm

    def check_step_is_finite(self) -> None:
        """Raise TrainingDiverged when this optimizer step's loss or gradient norm is not finite.

        The gradient norm is the Trainer's (computed before clipping, whatever max_grad_norm is),
        else the trainable gradients' own. Not checked where the step itself skips non-finite
        gradients (fp16 loss scaling: an overflow is expected now and then) or where DeepSpeed
        computes the norm inside its own step; the finite-weights check before every save still holds."""
        loss = self._tr_loss  # summed since the last log; the run stops at the first non-finite one
        if not torch.isfinite(loss).all():
            raise self._diverged(f"the training loss became {loss.item()} at step {self.state.global_step + 1}; {_NOT_APPLIED}")
        norm, self._step_grad_norm = self._step_grad_norm, None
        if self.is_deepspeed_enabled or self.accelerator.scaler is not None:
            return
        if norm is None:
            grads = [p.grad for p in self.model.parameters() if p.requires_grad and p.grad is not None]
            if not grads:
                return
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        norm = float(norm)
        if not math.isfinite(norm):
            raise self._diverged(f"the gradient norm became {norm} at step {self.state.global_step + 1}; {_NOT_APPLIED}")

    def _diverged(self, what: str) -> TrainingDiverged:
        """The error that stops a diverged run. The checkpoint of the current step holds the very
        weights that just gave a non-finite step, so it is set aside (renamed `...-diverged`):
        the message names the last checkpoint a resume can continue from."""
        last = last_complete_checkpoint(self.args.output_dir)
        set_aside = ""
        if last is not None and checkpoint_step(Path(last)) == self.state.global_step and self.args.should_save:
            target = last + DIVERGED_SUFFIX
            shutil.rmtree(target, ignore_errors=True)
            os.replace(last, target)
            set_aside = f"{Path(last).name} holds the weights this step started from and was set aside as {target}. "
            last = last_complete_checkpoint(self.args.output_dir)
        resume = (
            f"continue from it with --resume_from_checkpoint {last} and a lower --learning_rate"
            if last
            else "start again with a lower --learning_rate"
        )
        return TrainingDiverged(
            f"{what} {set_aside}Last usable checkpoint: {last or 'none yet'}; {resume} (or fp32/bf16 instead of fp16)"
        )


_NOT_APPLIED = "stopped before the update was applied."


def _is_write_failure(err: BaseException) -> bool:
    """A failed write: an OSError, or torch's/safetensors' wrapping of one (a full disk surfaces as
    torch's `PytorchStreamWriter failed writing file` RuntimeError)."""
    text = str(err)
    return isinstance(err, OSError) or any(s in text for s in ("file write failed", "No space left", "IoError"))


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    return str(err).splitlines()[0][:200]


class DivergenceGuard(TrainerCallback):
    """Before every optimizer step: stop when the step's loss or gradient norm is not finite."""

    def __init__(self, trainer: PromptTrainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):  # noqa: ANN001
        self.trainer.check_step_is_finite()


class CommandLineStepsCallback(TrainerCallback):
    """A resumed state carries its run's logging/eval/save steps; the command line's apply."""

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        state.compute_steps(args, state.max_steps)


class _FixedOrderSampler(Sampler):
    """Yields the given dataset indices, in that order."""

    def __init__(self, order: list[int]):
        self.order = order

    def __iter__(self):  # noqa: ANN204
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def _rows_in_order(values, rows: int | None, inverse: np.ndarray | None):  # noqa: ANN001, ANN202
    """Gathered per-row `values` (an array, a tuple of arrays, or None) cut to the dataset's `rows`
    (evenly sharded processes repeat rows at the end) and, with `inverse`, put back in dataset order."""
    if values is None or rows is None:
        return values
    if isinstance(values, (tuple, list)):
        return type(values)(_rows_in_order(v, rows, inverse) for v in values)
    values = np.asarray(values)
    if not values.ndim or len(values) < rows:
        return values
    values = values[:rows]
    return values if inverse is None else values[inverse]


def _prompt_lengths(inputs: dict) -> torch.Tensor:
    """Each eval row's prompt length [b]: the collator's count, else the 2D attention mask's, else
    the padded width (no padding known)."""
    if PROMPT_LENGTH_KEY in inputs:
        return inputs[PROMPT_LENGTH_KEY].to(inputs["input_ids"].device)
    mask = inputs.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return mask.long().sum(-1)
    return torch.full(inputs["input_ids"].shape[:1], inputs["input_ids"].shape[-1], device=inputs["input_ids"].device)


def _left_padding_mask(inputs: dict) -> torch.Tensor:
    """The 2D padding mask [b, n] (1 = token) of left-padded prompt rows. The ChatGLM-6B tokenizer's
    [b, 1, n, n] mask and its positions are not passed on: generation rebuilds both from this
    mask at every length, as it does for ChatGLM2/3."""
    width = inputs["input_ids"].shape[-1]
    positions = torch.arange(width, device=inputs["input_ids"].device)
    return (positions[None, :] >= width - _prompt_lengths(inputs)[:, None]).long()


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The highest `checkpoint-N` in `output_dir` that was completely written, or None. A run owns
    its output folder (earlier runs' checkpoints are removed or refused), so this is the run's own."""
    found = complete_checkpoints(output_dir)
    return str(found[-1]) if found else None


class StepKeyedDropoutCallback(TrainerCallback):
    """Tells every PrefixDropout the optimizer step about to run (and the run's seed), so each row's
    prefix-dropout mask is the same in every batch layout; plain dropout again after training."""

    def on_step_begin(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        for module in _prefix_dropouts(model):
            module.step, module.seed = state.global_step, args.seed

    def on_train_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        for module in _prefix_dropouts(model):
            module.step = None


def _prefix_dropouts(model: torch.nn.Module | None) -> list[PrefixDropout]:
    return [m for m in model.modules() if isinstance(m, PrefixDropout)] if model is not None else []


class FinalCheckpointCallback(TrainerCallback):
    """Always save at the last step, whatever `save_steps` is (the reference does not)."""

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if state.max_steps and state.global_step >= state.max_steps:
            control.should_save = True
        return control


class LossPlotCallback(TrainerCallback):
    """Writes `loss_curve.png` (training loss, and eval loss when present) into output_dir."""

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if state.is_world_process_zero:
            plot_loss(state.log_history, Path(args.output_dir) / "loss_curve.png")


def plot_loss(log_history: list[dict], path: Path) -> Path | None:
    """Plot the logged losses against steps; returns the PNG path (None when nothing was logged)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {
        key: [(entry["step"], entry[key]) for entry in log_history if key in entry and "step" in entry]
        for key in ("loss", "eval_loss")
    }
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, points in series.items():
        ax.plot([s for s, _ in points], [v for _, v in points], marker="o" if len(points) < 30 else None, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
