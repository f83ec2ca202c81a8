"""Loads the base model once per worker process, quantized as the settings say."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedTokenizerBase

from shared.settings import Quantization

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A base model ready to run, with what generation needs to know about it."""

    name: str
    model: Any  # transformers PreTrainedModel, or a peft PeftModel wrapping it
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    quantization: Quantization

    @property
    def context_length(self) -> int:
        config = self.model.config
        return int(getattr(config, "n_positions", None) or config.max_position_embeddings)


def pick_device(setting: str) -> torch.device:
    """CUDA when asked for or, with auto, when present; otherwise the CPU."""
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the hardware runs it natively, fp32 elsewhere."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_runs_bf16() else torch.float32


def cpu_runs_bf16() -> bool:
    """Whether oneDNN multiplies bf16 on this CPU (AVX512 or its BF16 and AMX extensions, Arm's BF16).

    Elsewhere (an AVX2-only x86 CPU, say) torch's bf16 matmul falls back to a reference loop: on an AVX2 AMD EPYC
    a (1024 x 768) @ (768 x 3072) product took 4.9 s in bf16 against 0.1 s in fp32, so bf16 there would make
    training, serving and the nf4 compute dtype 50 times slower, not faster."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without the check
        return False


def quantization_config(quantization: Quantization, device: torch.device) -> BitsAndBytesConfig | None:
    """bitsandbytes settings for nf4 or int8; None for the unquantized dtypes."""
    if quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute_dtype(device),
            bnb_4bit_use_double_quant=True,
        )
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def weights_dtype(quantization: Quantization, device: torch.device) -> torch.dtype:
    """dtype of the weights bitsandbytes leaves alone (embeddings, tied head) or of the whole model."""
    if quantization == "fp32":
        return torch.float32
    if quantization == "bf16" or quantization == "nf4":
        # For nf4 the unquantized 31% of GPT-2 (embeddings, tied head) in bf16 halves resident memory.
        return compute_dtype(device)
    return torch.float16 if device.type == "cuda" else torch.float32


def load_tokenizer(name: str, revision: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer, padding on the left for batched generation."""
    tokenizer = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_base_model(name: str, revision: str, quantization: Quantization, device_setting: str) -> LoadedModel:
    """The base model and tokenizer, from the hub or a local directory, ready for inference."""
    device = pick_device(device_setting)
    tokenizer = load_tokenizer(name, revision)
    model = AutoModelForCausalLM.from_pretrained(
        name,
        revision=revision,
        quantization_config=quantization_config(quantization, device),
        dtype=weights_dtype(quantization, device),
        device_map={"": str(device)},
        trust_remote_code=False,
        use_safetensors=True,
    )
    model.eval()
    _contiguous_head_input(model)
    log.info("loaded %s (%s) on %s", name, quantization, device)
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, device=device, quantization=quantization)


def warn_if_4bit_is_slow_here(loaded: LoadedModel) -> bool:
    """Logs a warning when bitsandbytes has no fast 4-bit kernel for this CPU; True when it did.

    bitsandbytes decodes nf4 on the CPU with a kernel that needs AVX512-BF16; elsewhere every layer is
    dequantized at every step. On an AVX2 EPYC, full-size GPT-2 decoded 9 tokens/s alone and 134 tokens/s at 32
    rows in nf4, against 18 and 159 in fp32: there fp32 serves faster (and GPT-2 fits easily)."""
    if loaded.device.type != "cpu" or loaded.quantization != "nf4":
        return False
    if any(getattr(m, "support_avx512bf16_for_cpu", False) for m in loaded.model.modules()):
        return False
    log.warning(
        "bitsandbytes has no fast 4-bit kernel for this CPU (it needs AVX512-BF16): every nf4 layer is "
        "dequantized at every step; LLMQ_QUANTIZATION=fp32 serves faster here (measured 1.2x at 32 rows, 2x alone)"
    )
    return True


def _contiguous_head_input(model: Any) -> None:
    # The LM head gets a strided slice of the last hidden state; with frozen bf16 weights torch then
    # copies a [batch, hidden, vocab] tensor (2.5x slower, +2 GB). A contiguous input avoids it.
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))
