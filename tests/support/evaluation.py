"""Evaluation fixtures: a scripted generation backend whose verdicts follow from the per-sample seeds, and toy
benchmark rows."""

from __future__ import annotations

from bupo.generation import Completion


class ScriptedBackend:
    """Answers ``\\boxed{seed % 3}``: the verdicts are known in advance from the per-sample seeds."""

    name = "scripted"

    def __init__(self, batch: int = 4, fail_after: int | None = None) -> None:
        self.batch, self.fail_after, self.seen = batch, fail_after, []

    def generate(self, requests, settings, on_batch=None):
        out = []
        for b, start in enumerate(range(0, len(requests), self.batch)):
            if self.fail_after is not None and b >= self.fail_after:
                raise KeyboardInterrupt("simulated interruption")
            chunk = requests[start : start + self.batch]
            done = [
                Completion(f"so \\boxed{{{s % 3}}}", [1, 2, 3], "stop" if s % 2 else "length")
                for _, s in chunk
            ]
            self.seen.extend(s for _, s in chunk)
            out.extend(done)
            if on_batch:
                on_batch(list(range(start, start + len(chunk))), done)
        return out


def toy_rows(count: int, gts: list[str] | None = None) -> list[dict]:
    gts = gts or [str(i % 3) for i in range(count)]
    return [
        {"prompt": [{"role": "user", "content": f"problem {i}"}], "reward_model": {"ground_truth": gts[i]}}
        for i in range(count)
    ]
