"""The environment variables a ``bupo train --config`` YAML may set in its ``env:`` mapping: an allowlist.

A config file is data; its ``env:`` must not make Python or the loader run other code. A denylist misses some
(``PYTHONWARNINGS`` imports the module a warning filter names, in every process the run starts; vLLM's logging
config builds the classes it names), so only these are accepted: thread counts, devices, NCCL, the Hugging Face
caches and offline switches, Weights & Biases and bupo's own settings. Anything else is set in the shell, where
the user sees it. Standard library only.
"""

from __future__ import annotations

__all__ = ["ENV_ALLOWED", "ENV_ALLOWED_PREFIXES", "ENV_ALLOWED_TEXT", "env_allowed"]

#: variables accepted by exact name
ENV_ALLOWED = (
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TOKENIZERS_PARALLELISM",
    "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "CUDA_LAUNCH_BLOCKING", "PYTORCH_CUDA_ALLOC_CONF",
    "PYTORCH_ALLOC_CONF", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_BLOCKING_WAIT",
    "TRANSFORMERS_OFFLINE", "TRANSFORMERS_VERBOSITY", "TRANSFORMERS_NO_ADVISORY_WARNINGS",
    "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "HF_HUB_ENABLE_HF_TRANSFER",
    "HF_HUB_DISABLE_PROGRESS_BARS", "HF_HUB_DOWNLOAD_TIMEOUT", "HF_HUB_ETAG_TIMEOUT",
    "VLLM_USE_V1", "VLLM_ATTENTION_BACKEND", "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND",
    "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_WORKER_MULTIPROC_METHOD",
    "MASTER_ADDR", "MASTER_PORT",
)
#: variables accepted by prefix (bupo's own, NCCL's, Weights & Biases')
ENV_ALLOWED_PREFIXES = ("BUPO_", "NCCL_", "WANDB_")
ENV_ALLOWED_TEXT = (", ".join(p + "*" for p in ENV_ALLOWED_PREFIXES) + " and the names of "
                    "bupo.training.config_env.ENV_ALLOWED (" + ", ".join(ENV_ALLOWED[:5]) + ", ...; docs/training.md)")


def env_allowed(name: str) -> bool:
    """Whether a config's ``env:`` may set ``name`` (case-sensitive, as the environment is on Linux)."""
    return name in ENV_ALLOWED or (name.startswith(ENV_ALLOWED_PREFIXES) and name not in ENV_ALLOWED_PREFIXES)
