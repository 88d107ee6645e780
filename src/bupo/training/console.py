"""The ``bupo train`` console: one progress bar per run, a line at each phase switch and one at the end.

Replaces transformers' PrinterCallback (raw log dicts, ~40 keys each) and ProgressCallback (optimizer steps) unless
``--verbose``; with ``--verbose`` TRL's own output stays and this console adds only the switch and end lines.

Conventions: the bar counts rollout steps (1-based; one generation batch = ``optimizer_steps_per_rollout``
optimizer steps), which is what ``internal_steps`` (s_inter) counts; k is 0-based (paper layer k+1); entropies
in nats per token. Only the main process (rank 0) prints.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, spec)


class TrainingConsole(TrainerCallback):
    """Progress bar (rollout step / total, phase and k, reward, H(pi^k), H(pi), step time) and summary lines.

    ``trainer``: the :class:`bupo.training.trainer.BuPOTrainer` (its phase, layer and switch are read, never
    changed); ``bar``: show progress (off with ``--verbose``, where TRL's own printing stays); ``file``: where to
    write (stdout, with bupo's other result lines). On a terminal the progress is a bar redrawn in place; into a
    file or pipe (a log, CI, ``nohup``) it is one plain line per rollout step, so that no redraws pile up in the
    log and other lines (evaluations, warnings) do not land inside the bar's.
    """

    def __init__(self, trainer: Any, *, bar: bool = True, file: TextIO | None = None) -> None:
        self.trainer = trainer
        self.show_bar = bar
        self.file = file
        self.bar: Any = None
        self.n_per = max(1, int(trainer.args.optimizer_steps_per_rollout))
        self.phase: tuple[bool, int | None] | None = None  # (internal, k) of the last rollout step seen
        self.values: dict[str, float] = {}
        self.first_reward: float | None = None
        self.rollout_t0 = time.time()
        self.step_time: float | None = None
        self.t0 = time.time()
        self.lines = False  # progress as one line per rollout step (not a terminal)
        self.total: int | None = None
        self.pending: int | None = None  # a rollout step whose line waits for its logged reward

    # --- helpers --------------------------------------------------------------------------------------------

    @property
    def out(self) -> TextIO:
        return self.file or sys.stdout

    def _write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.out)
        else:
            print(line, file=self.out, flush=True)

    def _phase_name(self, internal: bool, k: int | None) -> str:
        return f"internal k={k}" if internal else "full"

    def _postfix(self) -> str:
        internal, k = self.phase or (bool(self.trainer.args.internal_steps > 0), self.trainer.bupo_layer)
        v = self.values
        return (f"{self._phase_name(internal, k)} | reward {_fmt(v.get('reward'))} | "
                f"H(pi^k) {_fmt(v.get('bupo/entropy_internal'))} H(pi) {_fmt(v.get('bupo/entropy_full'))} | "
                f"{_fmt(self.step_time, '.1f')} s/step")

    @staticmethod
    def _main(state: Any) -> bool:
        return bool(state.is_world_process_zero)

    # --- callback events ------------------------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if not self._main(state):
            return
        self.t0 = self.rollout_t0 = time.time()
        total = math.ceil(state.max_steps / self.n_per) if state.max_steps > 0 else None
        done = state.global_step // self.n_per
        self.total = total
        isatty = getattr(self.out, "isatty", None)
        self.lines = self.show_bar and not (callable(isatty) and isatty())
        if self.show_bar and not self.lines:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=done, desc="rollout", unit="step", file=self.out,
                            dynamic_ncols=True, mininterval=0.5, bar_format="{desc} {n_fmt}/{total_fmt} {bar:20} "
                            "[{elapsed}<{remaining}]{postfix}")
            self.bar.set_postfix_str(self._postfix(), refresh=False)

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if not self._main(state) or state.global_step % self.n_per:
            return
        # a rollout step ends every optimizer_steps_per_rollout optimizer steps
        now = time.time()
        self.step_time, self.rollout_t0 = now - self.rollout_t0, now
        step = state.global_step // self.n_per  # the rollout step just trained (1-based)
        current = (bool(self.trainer.bupo_internal), self.trainer.bupo_layer)
        if self.phase is not None and current != self.phase:
            self._switch_line(step, current)
        elif self.phase is None and not current[0] and self.trainer.args.internal_steps > 0 and step > 1:
            self._switch_line(step, current)  # resumed past the switch: say where the full phase started
        self.phase = current
        if self.lines:
            self.pending = step
            if not control.should_log:  # else on_log prints it with this step's reward and entropies
                self._progress_line()
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(self._postfix(), refresh=False)
            if not control.should_log:  # else on_log redraws with this step's reward and entropies
                self.bar.refresh()

    def _switch_line(self, step: int, current: tuple[bool, int | None]) -> None:
        prev = self._phase_name(*self.phase) if self.phase is not None else "internal"
        switch = self.trainer.bupo_switch
        why = switch.get("reason", "")
        if switch.get("mode") == "schedule" and current[0]:
            why = f"internal_schedule {switch.get('schedule')}"
        v = self.values
        self._write(f"bupo: rollout step {step}: {prev} -> {self._phase_name(*current)} ({why}); "
                    f"reward {_fmt(v.get('reward'))}, H(pi^k) {_fmt(v.get('bupo/entropy_internal'))}, "
                    f"H(pi) {_fmt(v.get('bupo/entropy_full'))} nats")

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
        if not self._main(state) or not logs:
            return
        for key in ("reward", "bupo/entropy_internal", "bupo/entropy_full", "bupo/accuracy"):
            x = logs.get(key)
            if isinstance(x, (int, float)) and math.isfinite(x):
                self.values[key] = float(x)
                if key == "reward" and self.first_reward is None:
                    self.first_reward = float(x)
        if self.bar is not None and "reward" in logs:
            self.bar.set_postfix_str(self._postfix())
        if self.pending is not None and "reward" in logs:
            self._progress_line()

    def _progress_line(self) -> None:
        elapsed = int(time.time() - self.t0)
        total = "?" if self.total is None else self.total
        print(f"rollout {self.pending}/{total} [{elapsed // 60:02d}:{elapsed % 60:02d}] {self._postfix()}",
              file=self.out, flush=True)
        self.pending = None

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if not self._main(state):
            return
        if self.bar is not None:
            self.bar.set_postfix_str(self._postfix(), refresh=False)
            self.bar.close()
            self.bar = None
        if self.pending is not None:  # its log never came (a run stopped between the step and its log)
            self._progress_line()
        switch = self.trainer.bupo_switch
        if switch.get("mode") == "none":
            phases = "GRPO (full policy)"
        else:
            s = switch.get("step")
            internal = f"internal rollout steps 1..{s - 1}" if s else "internal throughout"
            phases = f"k={self.trainer.bupo_layer} (paper layer {(self.trainer.bupo_layer or 0) + 1}), {internal}"
        v = self.values
        self._write(f"bupo: done: {state.global_step // self.n_per} rollout steps ({state.global_step} optimizer "
                    f"steps) in {time.time() - self.t0:.0f} s; {phases}; reward {_fmt(self.first_reward)} -> "
                    f"{_fmt(v.get('reward'))}, H(pi^k) {_fmt(v.get('bupo/entropy_internal'))}, "
                    f"H(pi) {_fmt(v.get('bupo/entropy_full'))} nats")


def install_console(trainer: Any, verbose: bool = False) -> TrainingConsole:
    """Attach the console; without ``verbose`` remove transformers' raw-dict printer and optimizer-step bar."""
    if not verbose:
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    console = TrainingConsole(trainer, bar=not verbose)
    trainer.add_callback(console)
    return console
