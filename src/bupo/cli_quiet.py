"""What the libraries under ``bupo`` print on their own, turned off for a ``bupo`` command unless asked for.

transformers draws a "Loading weights" bar at every model load, datasets one per ``map`` / ``filter``, the Hub one
per download; in a ``bupo train`` / ``eval`` / ``analyze`` / ``demo`` run they bury bupo's own lines (its
``generate`` / ``analyze`` bars and the training console stay; ``--quiet`` turns those off). TRL 1.16 also reads
transformers 5's deprecated ``is_gradient_checkpointing`` at every rollout, a FutureWarning addressed to TRL, not
to the user. vLLM logs ~50 INFO / WARNING lines at every engine start (its configuration, its CPU tuning advice, a
generic warning that chunked prefill is off - bupo turns it off on a CPU, see :mod:`bupo.engines`): only its errors
are shown (``VLLM_LOGGING_LEVEL=ERROR``), and torch's FutureWarning for ``torch.distributed.reduce_op`` that vLLM
0.31 triggers at import is dropped. DeepSpeed (imported by TRL where it is installed) prints "Setting accelerator to
CPU. If you have GPU or other accelerator, we were unable to detect it." on every machine without CUDA: that one line
is dropped too (on a GPU machine DeepSpeed finds CUDA and never prints it). ``--verbose`` (where a command has
it) or ``BUPO_VERBOSE=1`` keeps all of it; a variable the user set (e.g. ``HF_HUB_DISABLE_PROGRESS_BARS=0``) wins.
Standard library only at top level (``bupo --help`` stays fast).
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

#: set to 1 to keep the libraries' own progress bars in every ``bupo`` command
VERBOSE_ENV = "BUPO_VERBOSE"
#: read by huggingface_hub (and through it transformers) and by datasets when they are imported
BAR_ENVS = ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")
_TRUE = ("1", "true", "yes", "on")
#: torch's FutureWarning for a name vLLM 0.31 reads at import, addressed to vLLM
REDUCE_OP_DEPRECATION = r"`torch\.distributed\.reduce_op` is deprecated"
#: read by vLLM when it is imported: the level of its own log lines
VLLM_LEVEL_ENV = "VLLM_LOGGING_LEVEL"
#: DeepSpeed's warning at import on a machine without CUDA (its logger, "DeepSpeed", writes to stdout)
DEEPSPEED_CPU_FALLBACK = "Setting accelerator to CPU"
#: transformers 5's FutureWarnings for the old names of activation checkpointing, which TRL still uses
CHECKPOINTING_DEPRECATIONS = r"`(is_)?gradient_checkpointing(_kwargs|_enable|_disable)?` is deprecated"


def _not_deepspeed_cpu_fallback(record: Any) -> bool:
    """A ``logging`` filter: False (drop) for DeepSpeed's "Setting accelerator to CPU" line."""
    return not str(record.msg).startswith(DEEPSPEED_CPU_FALLBACK)


def wants_library_output(args: Any) -> bool:
    """``--verbose`` on the command line or ``BUPO_VERBOSE=1`` in the environment."""
    return bool(getattr(args, "verbose", None)) or os.environ.get(VERBOSE_ENV, "").strip().lower() in _TRUE


def hub_bars_off() -> bool:
    """Whether the Hub's (and so transformers') progress bars are switched off in this process's environment."""
    return os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").strip().lower() in _TRUE


def quiet_libraries() -> None:
    """Turn the libraries' progress bars and vLLM's log lines below ERROR off for this process (the environment
    variables they read at import, and for a library imported already - ``bupo`` used in-process - its own switch)
    and their checkpointing-rename FutureWarnings."""
    warnings.filterwarnings("ignore", message=CHECKPOINTING_DEPRECATIONS, category=FutureWarning)
    warnings.filterwarnings("ignore", message=REDUCE_OP_DEPRECATION, category=FutureWarning)
    import logging

    # a filter, not a level: DeepSpeed sets its logger's level itself when it is imported (addFilter adds it once)
    logging.getLogger("DeepSpeed").addFilter(_not_deepspeed_cpu_fallback)
    for name in BAR_ENVS:
        os.environ.setdefault(name, "1")
    os.environ.setdefault(VLLM_LEVEL_ENV, "ERROR")
    if os.environ[VLLM_LEVEL_ENV].strip().upper() == "ERROR":
        # vLLM's logger itself: vLLM warns about Triton at import, before it configures its logger from the variable,
        # and an in-process vLLM may have configured it already
        logging.getLogger("vllm").setLevel(logging.ERROR)
    if hub_bars_off():
        if "huggingface_hub" in sys.modules:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        if "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
    if "datasets" in sys.modules and os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"].strip().lower() in _TRUE:
        from datasets.utils import disable_progress_bars as disable_datasets_bars

        disable_datasets_bars()
