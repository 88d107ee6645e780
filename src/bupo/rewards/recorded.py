"""Which reward a model was trained with: the ``reward`` entry of the ``bupo_run.json`` that ``bupo train`` writes
next to the model it saves. ``bupo eval`` scores with it unless ``--reward`` says otherwise, so a model trained on
``final_number`` is not scored 0.00 by the paper's ``boxed_exact`` without a word.
"""

from __future__ import annotations

import json
from pathlib import Path

from bupo.rewards.api import REWARD_NAMES, parse_rewards

DEFAULT_REWARD = "boxed_exact"  # the paper's


def recorded_reward(model_folder: str | Path) -> str | None:
    """The first reward name recorded in ``model_folder/bupo_run.json``, or None when there is no such file, it
    cannot be read, or it records no reward this registry knows (a run trained on several rewards summed them;
    evaluation scores with one, the first)."""
    path = Path(model_folder) / "bupo_run.json"
    try:
        spec = json.loads(path.read_text()).get("reward")
        return parse_rewards(spec)[0]
    except (OSError, ValueError, AttributeError, TypeError):
        return None


def choose_reward(requested: str | None, model_folder: str | Path) -> tuple[str, str]:
    """(reward name, where it came from): ``requested`` if given, else the one recorded with the model, else the
    paper's ``boxed_exact``. ValueError for an unknown requested name (the accepted names in the message)."""
    if requested is not None:
        names = parse_rewards(requested)
        if len(names) != 1:
            raise ValueError(f"--reward takes one name ({', '.join(REWARD_NAMES)}), got {requested!r}")
        return names[0], "--reward"
    recorded = recorded_reward(model_folder)
    if recorded is not None:
        return recorded, f"recorded in {Path(model_folder) / 'bupo_run.json'}"
    return DEFAULT_REWARD, "the default, the paper's"

