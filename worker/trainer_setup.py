"""Building what trains: the base model loaded for training, and the TRL SFTTrainer that fine-tunes it with LoRA.

Loss is on the response only: TRL's prompt/completion examples mask the prompt, append EOS to the completion
and learn it; padding is masked by position (the collator pads labels with -100), never by token id, since
GPT-2's pad token is its EOS. Trained tokens are those labels: response tokens that are not padding.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast

import torch
from datasets import Dataset, disable_progress_bars
from peft import LoraConfig, PeftModel, prepare_model_for_kbit_training
from transformers import PreTrainedModel, PrinterCallback, ProgressCallback
from trl import SFTConfig, SFTTrainer

from shared.chat_templates import ALPACA_CHAT_TEMPLATE
from shared.fine_tuning import ResolvedHyperparameters
from shared.settings import Quantization, Settings
from worker.alpaca_data import TrainingData
from worker.chat_data import training_examples
from worker.completion_head import score_only_labelled_positions
from worker.model_loading import LoadedModel, compute_dtype, load_base_model, pick_device

log = logging.getLogger(__name__)

SAVE_TOTAL_LIMIT = 2  # checkpoints kept on disk per job; older ones are deleted as new ones are written


class ModelLoadFailed(Exception):
    """The base model or its tokenizer could not be loaded."""


# ----------------------------------------------------------------------------------------------------------
# The base model
# ----------------------------------------------------------------------------------------------------------


def load_trainable_base(name: str, settings: Settings, hp: ResolvedHyperparameters) -> LoadedModel:
    """The frozen base model for a fine-tune, quantized as hp asks; raises ModelLoadFailed with one line."""
    device = pick_device(settings.device)
    quantization = load_quantization(hp.quantization, device)
    try:
        loaded = load_base_model(name, settings.base_model_revision, quantization, settings.device)
    except Exception as exc:
        log.exception("loading %s failed", name)
        message = " ".join(str(exc).split())[:500]
        raise ModelLoadFailed(f"could not load base model {name!r}: {type(exc).__name__}: {message}") from exc
    keep_4bit_trainable(loaded.model)
    return loaded


def load_quantization(quantization: str, device: torch.device) -> Quantization:
    """How to load the frozen base: nf4/int8 as asked; "none" = bf16 where native, else fp32."""
    if quantization in ("nf4", "int8"):
        return "nf4" if quantization == "nf4" else "int8"
    return "bf16" if compute_dtype(device) == torch.bfloat16 else "fp32"


def keep_4bit_trainable(model: torch.nn.Module) -> int:
    """Turns off bitsandbytes' CPU inference repack on every Linear4bit; returns how many it changed.

    On a CPU with AVX512-BF16 the first no-grad forward of a Linear4bit repacks its weight into an
    inference-only layout, after which QLoRA training fails ("a view of a leaf Variable that requires grad
    is being used in an in-place operation"). Must run before any forward, including the base evaluation.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            setattr(module, "support_avx512bf16_for_cpu", False)  # noqa: B010  (a bitsandbytes attribute)
            changed += 1
    return changed


# ----------------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------------


def build_trainer(
    loaded: LoadedModel,
    data: TrainingData,
    hp: ResolvedHyperparameters,
    seed: int,
    *,
    output_dir: Path,
    chat_template: str = ALPACA_CHAT_TEMPLATE,
    init_adapter: Path | None = None,
) -> CountingSFTTrainer:
    """A TRL SFTTrainer for LoRA on the loaded base with completion-only loss, ready to train().

    Examples are rendered with chat_template (worker/chat_data.py): loss on the answers only. With
    init_adapter (a continued fine-tune) training starts from that adapter's weights, and its LoRA shape
    (rank, alpha, target modules) replaces the hyperparameters'; otherwise a new adapter is made from hp."""
    disable_progress_bars()
    model = loaded.model
    if loaded.quantization in ("nf4", "int8"):
        # Freezes the base, upcasts its unquantized weights (embeddings, layer norms) to fp32.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if init_adapter is not None:
        model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
    tokenizer = loaded.tokenizer
    tokenizer.padding_side = "right"  # training pads on the right; the collator masks padding by position

    max_length = min(hp.max_seq_len, loaded.context_length)
    train_examples = training_examples(data.train, tokenizer, chat_template, max_length)
    validation = training_examples(data.validation, tokenizer, chat_template, max_length) if data.validation else None
    eval_dataset = Dataset.from_list(validation) if validation else None
    rows = packed_rows(tokenizer, train_examples, hp.batch_size, max_length) if hp.packing else hp.batch_size
    bf16, fp16 = mixed_precision(loaded.device)
    args = SFTConfig(
        output_dir=str(output_dir),
        seed=seed,
        data_seed=seed,
        # Optimisation
        num_train_epochs=hp.n_epochs,
        max_steps=hp.max_steps or -1,
        per_device_train_batch_size=rows,
        per_device_eval_batch_size=rows,
        gradient_accumulation_steps=hp.gradient_accumulation_steps,
        learning_rate=hp.learning_rate,
        lr_scheduler_type=hp.lr_scheduler,
        warmup_steps=min(hp.warmup_ratio, 0.999),  # transformers 5: a float below 1 is a share of the steps
        # Data: prompt/completion pairs -> loss on the completion (+ EOS) only
        max_length=max_length,
        packing=hp.packing,
        completion_only_loss=True,
        # Unpacked batches are padded to their longest example; drawing them from length-sorted megabatches
        # (50 batches, shuffled) cut padding from about 45% to 4% on Alpaca-like lengths (bench/train.py).
        train_sampling_strategy="random" if hp.packing else "group_by_length",
        # Speed: GPT-2 on these lengths fits in memory; recomputing activations would cost about 20-30%.
        activation_checkpointing=False,
        bf16=bf16,
        fp16=fp16,
        use_cpu=loaded.device.type == "cpu",
        # Bookkeeping: every step is logged (the callback thins what reaches the database)
        logging_strategy="steps",
        logging_steps=1,
        eval_strategy="steps" if hp.eval_every_steps and eval_dataset is not None else "no",
        eval_steps=hp.eval_every_steps,
        save_strategy="steps",
        save_steps=hp.save_every_steps,
        save_total_limit=SAVE_TOTAL_LIMIT,
        report_to="none",
        disable_tqdm=True,
    )
    trainer = CountingSFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_examples),
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=lora_config(hp) if init_adapter is None else None,
    )
    assert trainer.model is not None
    keep_adapters_fp32(trainer.model)
    # TRL's fused LM head projects every position on the CPU; this one projects the answers' positions only.
    peft_model: PeftModel = trainer.model  # type: ignore[assignment]  # peft_config or init_adapter made one
    score_only_labelled_positions(cast(PreTrainedModel, peft_model.get_base_model()), loaded.device)
    for noisy in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(noisy)
    return trainer


def lora_config(hp: ResolvedHyperparameters) -> LoraConfig:
    """The LoRA adapter the hyperparameters ask for, on GPT-2's Conv1D layers."""
    return LoraConfig(
        r=hp.lora_r,
        lora_alpha=hp.lora_alpha,  # type: ignore[arg-type]  # peft annotates int; it only divides by r
        lora_dropout=hp.lora_dropout,
        target_modules=list(hp.target_modules),
        fan_in_fan_out=True,  # GPT-2's Conv1D stores weights (in, out); bitsandbytes layers ignore it
        bias="none",
        task_type="CAUSAL_LM",
    )


def keep_adapters_fp32(model: torch.nn.Module) -> None:
    """Casts the trainable (LoRA) weights back to fp32 after TRL cast them to bf16.

    TRL casts the LoRA weights of a quantized base to bf16 (the QLoRA paper's GPU recipe). bf16 resolves
    about 1/256 of a weight, the size of an Adam step at lr 2e-4 on weights of about 0.05, so updates
    would partly round away. fp32 adapters are peft's own default, a small share of the parameters, still
    computed in bf16 under autocast, and keep resume exact (the cast is not reapplied on resume).
    """
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def packed_rows(tokenizer: Any, examples: list[dict[str, Any]], batch_size: int, max_length: int) -> int:
    """Packed rows per step that hold about batch_size examples, so batch_size keeps its meaning.

    TRL's batch is rows; a packed row of max_length tokens holds several examples, and padding-free
    packing runs a step's rows as one sequence whose attention (without FlashAttention's varlen kernels,
    e.g. on CPU) costs the square of its length: 8 rows of 512 tokens ran out of 20 GB on GPT-2.
    """
    sample = examples[:: max(1, len(examples) // 1000)]  # the mean of about 1000 is plenty
    lengths = [
        len(e["input_ids"]) if "input_ids" in e else len(tokenizer(e["prompt"] + e["completion"])["input_ids"]) + 1
        for e in sample
    ]
    mean = sum(min(n, max_length) for n in lengths) / max(1, len(lengths))
    return max(1, round(batch_size * mean / max_length))


def mixed_precision(device: torch.device) -> tuple[bool, bool]:
    """(bf16, fp16) autocast flags for the Trainer: bf16 where native (CPU with AVX512-BF16, recent GPUs)."""
    dtype = compute_dtype(device)
    return dtype == torch.bfloat16, dtype == torch.float16


class CountingSFTTrainer(SFTTrainer):
    """SFTTrainer that counts trained tokens: labels that are not -100 (response tokens, not padding)."""

    trained_tokens: int = 0

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
        # Labels are -100 on prompt tokens, padding and the first token of each packed sequence.
        self.trained_tokens += int((inputs["labels"] != -100).sum())
        return super().training_step(model, inputs, num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # kept in trainer_state.json, so a resumed attempt continues the count
            logs["trained_tokens"] = self.trained_tokens
        super().log(logs, start_time)
