"""A small Seq2SeqTrainer subclass: prompt-only checkpoints, atomic saves, a NaN guard, and a
loss-curve plot. Everything else is the transformers Trainer as its users know it.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import torch
from transformers import Seq2SeqTrainer, TrainerCallback
from transformers.integrations.deepspeed import deepspeed_load_checkpoint, is_deepspeed_zero3_enabled
from transformers.trainer import SCHEDULER_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .checkpoint import PromptSettings, save_prefix_checkpoint
from .head_loss import IGNORE_INDEX, shifted_labels
from .collator import PROMPT_LENGTH_KEY
from .methods import load_method_state
from .prompt_learning import PrefixDropout

_STAGING_DIR = ".staging"  # checkpoints are written here, then renamed into place
TRAINER_STATE_FILE = "trainer_state.json"  # written last by the Trainer: marks a complete checkpoint


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class PromptTrainer(Seq2SeqTrainer):
    """Seq2SeqTrainer that, given `prompt_settings` (a soft prompt or LoRA), saves only the trainable
    weights with those settings (soft prompts: model.safetensors; LoRA: PEFT's adapter files).

    Checkpoints are written into `<output_dir>/.staging/` and renamed into place once complete,
    so a killed run never leaves a `checkpoint-N` that looks whole. Under DeepSpeed only the
    trainable parameters are gathered and saved (never the frozen backbone).
    """

    def __init__(
        self,
        *args,
        prompt_settings: PromptSettings | None = None,
        eval_collator=None,  # noqa: ANN001 - batches eval/predict rows (prompts + labels) when given
        generation_kwargs: dict | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.prompt_settings = prompt_settings
        self.eval_collator = eval_collator
        self.generation_kwargs = generation_kwargs or {}  # also used by evaluations during training
        self._staging_run_dir: str | None = None
        self._eval_loss_totals = torch.zeros(2, dtype=torch.float64)  # summed loss, label tokens

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval", **gen_kwargs):  # noqa: ANN001
        return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix, **{**self.generation_kwargs, **gen_kwargs})

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix="test", **gen_kwargs):  # noqa: ANN001
        return super().predict(test_dataset, ignore_keys, metric_key_prefix, **{**self.generation_kwargs, **gen_kwargs})

    def _get_dataloader(self, dataset, description, batch_size, sampler_fn=None, is_training=False, dataloader_key=None):  # noqa: ANN001
        if is_training or self.eval_collator is None:
            return super()._get_dataloader(dataset, description, batch_size, sampler_fn, is_training, dataloader_key)
        train_collator, self.data_collator = self.data_collator, self.eval_collator
        try:
            return super()._get_dataloader(dataset, description, batch_size, sampler_fn, is_training, dataloader_key)
        finally:
            self.data_collator = train_collator

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
            self._save(output_dir, state_dict=state)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if self.prompt_settings is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        state = state_dict if state_dict is not None else self._trainable_state()
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
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_method_state(model if model is not None else self.model, resume_from_checkpoint, self.prompt_settings)

    # --- generation in evaluate/predict ----------------------------------------------------------
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):  # noqa: ANN001
        """Generate from the prompt alone and return only the new tokens, as the reference does.

        `max_length` is the reference's total length (prompt + answer). Each row gets the budget
        it would have alone (max_length - its own prompt length), so results do not depend on
        which rows share a batch. A decoder-only model's eval rows hold the prompt in input_ids and
        the reference answer in labels (different lengths), so no loss is computed on this path.
        """
        if not self.args.predict_with_generate or prediction_loss_only:
            return self._loss_prediction_step(model, inputs)
        inputs = self._prepare_inputs(inputs)
        gen_kwargs = {**getattr(self, "_gen_kwargs", {}), **gen_kwargs}
        gen_kwargs = {k: v for k, v in gen_kwargs.items() if v is not None}
        gen_kwargs.setdefault("synced_gpus", is_deepspeed_zero3_enabled())
        max_length = gen_kwargs.pop("max_length", None) or self.model.generation_config.max_length
        prompt = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
        padded_length = prompt["input_ids"].shape[-1]
        lengths = inputs.get(PROMPT_LENGTH_KEY)
        if lengths is None:
            lengths = torch.full((prompt["input_ids"].shape[0],), padded_length)
        budgets = (max_length - lengths).clamp(min=0)
        with torch.no_grad():
            generated = self.model.generate(**prompt, max_new_tokens=max(int(budgets.max()), 1), **gen_kwargs)
        generated = generated[:, padded_length:]
        beyond = torch.arange(generated.shape[-1], device=generated.device)[None, :] >= budgets.to(generated.device)[:, None]
        generated = generated.masked_fill(beyond, self.processing_class.pad_token_id)
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

    # --- atomic checkpoints --------------------------------------------------------------------
    def _get_output_dir(self, trial) -> str:  # noqa: ANN001
        return self._staging_run_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:  # noqa: ANN001
        run_dir = self._get_output_dir(trial)
        self._staging_run_dir = os.path.join(run_dir, _STAGING_DIR)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_run_dir = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            final = os.path.join(run_dir, name)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(os.path.join(run_dir, _STAGING_DIR, name), final)
            shutil.rmtree(os.path.join(run_dir, _STAGING_DIR), ignore_errors=True)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
            )
        self.accelerator.wait_for_everyone()

    # --- NaN guard ----------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):  # noqa: ANN001
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not math.isfinite(loss.item()):
            last = last_complete_checkpoint(self.args.output_dir)
            raise TrainingDiverged(
                f"the training loss became {loss.item()} at step {self.state.global_step + 1}; stopping. "
                f"Last good checkpoint: {last or 'none yet'}. Try a lower --learning_rate or fp32/bf16 instead of fp16."
            )
        return loss


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The highest `checkpoint-N` in `output_dir` that was completely written, or None."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    steps = []
    for child in folder.iterdir():
        name = child.name
        if name.startswith(PREFIX_CHECKPOINT_DIR + "-") and name.split("-")[-1].isdigit():
            if (child / TRAINER_STATE_FILE).is_file():
                steps.append((int(name.split("-")[-1]), str(child)))
    return max(steps)[1] if steps else None


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
