"""``bupo train`` under a real launcher, instrumented (used by tests/engines/test_training_launchers.py, tests/engines/test_fsdp2_cpu.py
and ``benchmarks/gpu_check.py launchers``).

Run as ``accelerate launch --config_file CFG tests/support/launch_probe.py OUT train ...``: it adds one callback to
BuPOTrainer that records, on every rank, then runs ``bupo.cli.main(["train", ...])`` unchanged. Writes
OUT/probe-rank{r}.json (rewritten after every event: a run stopped by a timeout leaves what it measured) with:

- ``steps``: per optimizer step, whether that rank's own parameter shards (FSDP2: DTensor local shards; ZeRO-3: its
  partition) of the layers above k and the final norm are bitwise unchanged since the start (``upper_same``) and of
  the layers <= k (``lower_same``); ``upper_within_decay`` allows what weight decay alone does to a parameter with
  a zero (not None) gradient: |w - w0| <= steps x lr x wd x |w0| + one ulp; ``watched_master_same``: the fp32
  master weights (ZeRO-3: the optimizer's, where a bf16 partition hides a decay of lr x wd) of layer k+1, the last
  layer and the final norm are bitwise unchanged; ``moved_layers``: the decoder layers with a parameter shard on this
  rank that is not bitwise what it was at the start.
- ``parity``: before the first step, the internal policy's log-probs as the trainer computes them (TRL's fused LM
  head through the wrapped, sharded model, truncated after layer k) against an unsharded reference loaded from
  ``--model`` (:func:`bupo.internal.layer_logprobs`), and the distance of that reference to the full policy.
- ``first_full_update``: at the first full-phase step this process runs, the median of |w_after - w_before| / lr over the fp32 master
  weights of layer k+1, the last layer and the final norm: ~1 when their AdamW is fresh (step 1: m/sqrt(v) =
  g/|g|); a counter advanced while internal with zero moments gives less (bias correction of a later step).
- ``engine``: with ``--use_vllm true --vllm_mode colocate``, per step, the largest difference between this rank's vLLM
  engine's log-probs of a fixed sequence after the step's rollout and the trained model's at the step's start (TRL
  syncs the weights before the rollout; FSDP2 parameters gathered in full), and the engine's largest change since the
  start (vLLM's CPU linear layers keep their weights packed, so log-probs, not parameters, are compared).
- ``missed_forward``: per step, the FSDP2 units with a module that did not run its forward (torch 2.13 completes
  such a unit from the root's post-forward; torch <= 2.12 warns "did not run forward before backward").

Also OUT/eval-rank{r}.json: the number of evaluation requests this rank's generation backend (transformers or
vLLM) was given, per call (``requests``).

``BUPO_PROBE_ALTERNATING_REWARD=1`` replaces the rewards by 0/1 alternating ones (random-init models never score),
so every group has non-zero advantages.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from transformers import TrainerCallback

import bupo.training.trainer as trainer_mod
from bupo.cli import main


def _local(p: torch.Tensor) -> torch.Tensor:
    if hasattr(p, "ds_tensor"):  # DeepSpeed ZeRO-3: this rank's partition
        return p.ds_tensor.detach().clone()
    return (p.to_local() if hasattr(p, "to_local") else p).detach().clone()


#: the sequence whose next-token log-probs are compared between the trained model and a colocated vLLM engine
ENGINE_IDS = [5 + (7 * i) % 90 for i in range(24)]


@torch.no_grad()
def model_logps(model: torch.nn.Module, token_ids: list[int] = ENGINE_IDS) -> torch.Tensor:
    """log p(ids[t] | ids[:t]), t >= 1, from the model in eval mode (possibly sharded: every rank calls it)."""
    from bupo.internal.sharding import outside_step

    ids = torch.tensor([token_ids], device=next(model.parameters()).device)
    was_training = model.training
    model.eval()  # no dropout (LoRA's): the policy itself
    try:
        with outside_step(model):  # as bupo's own forwards outside the step: the sync before the rollout reads shards
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float().cpu()
    finally:
        model.train(was_training)
    return torch.log_softmax(logits, -1).gather(-1, ids[0, 1:].cpu().unsqueeze(-1)).squeeze(-1)


def engine_logps(llm, token_ids: list[int] = ENGINE_IDS) -> torch.Tensor:
    """The same log-probs from a vLLM engine (the prompt log-probs of one request)."""
    from vllm import SamplingParams

    out = llm.generate([{"prompt_token_ids": token_ids}],
                       SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0), use_tqdm=False)[0]
    return torch.tensor([pos[t].logprob for pos, t in zip(out.prompt_logprobs[1:], token_ids[1:], strict=True)])


def _master(p: torch.Tensor) -> torch.Tensor:
    """This rank's fp32 master values of ``p`` (ZeRO-3: the optimizer's fp32 copy, gathered in full)."""
    if hasattr(p, "ds_id"):
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(p).detach().float().cpu()
    return _local(p).float().cpu()


def _within_decay(now: torch.Tensor, init: torch.Tensor, steps: int, lr: float, wd: float) -> bool:
    ulp = torch.finfo(init.dtype).eps * init.abs().float()
    return bool(((now.float() - init.float()).abs() <= steps * lr * wd * init.abs().float() + ulp + 1e-30).all())


def alternating(completions, **kw):
    return [float(i % 2) for i in range(len(completions))]


def _arg(flag: str) -> str | None:
    argv = sys.argv
    return argv[argv.index(flag) + 1] if flag in argv[:-1] else None


class MissedForward:
    """FSDP2 units whose forward did not run all their modules (torch 2.13's late completion, spied on)."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        try:
            from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
        except ImportError:
            return
        real = getattr(FSDPState, "_force_complete_incomplete_states", None)
        if real is None:  # torch <= 2.12: the warning in the log is the signal
            return
        names = self.names

        def spy(state, output):
            for other in state._state_ctx.all_states:
                if other is not state and other._modules_to_run_forward:
                    names.update(type(m).__name__.removeprefix("FSDP") for m in other._modules_to_run_forward)
            return real(state, output)

        FSDPState._force_complete_incomplete_states = spy

    def take(self) -> list[str]:
        out = sorted(self.names)
        self.names.clear()
        return out


class Probe(TrainerCallback):
    def __init__(self, trainer, out: str) -> None:
        self.trainer, self.out = trainer, out
        self.init: dict[str, torch.Tensor] = {}
        self.before: dict[str, torch.Tensor] = {}
        self.lr = float("nan")
        self.missed = MissedForward()
        self.record: dict = {"steps": {}}

    def _model(self):
        return self.trainer.accelerator.unwrap_model(self.trainer.model)

    def _groups(self):
        k = self.trainer.args.internal_layer
        upper, lower = {}, {}
        for n, p in self._model().named_parameters():
            parts = n.split(".")
            if "layers" in parts:
                i = int(parts[parts.index("layers") + 1])
                (upper if i > k else lower)[n] = p
            elif n.endswith("model.norm.weight"):
                upper[n] = p
        return upper, lower

    def _watched(self) -> dict[str, torch.Tensor]:
        """Layer k+1, the last layer and the final norm: the parameters whose first full-phase update is measured."""
        k = self.trainer.args.internal_layer
        upper, _ = self._groups()
        last = max(int(n.split(".")[n.split(".").index("layers") + 1]) for n in upper if ".layers." in n)
        keep = (f".layers.{k + 1}.", f".layers.{last}.", "model.norm.weight")
        return {n: p for n, p in upper.items() if any(s in n for s in keep)}

    @torch.no_grad()
    def _parity(self) -> dict:
        """Internal log-probs through the trainer's own path (sharded model, TRL's fused head) vs unsharded."""
        from transformers import AutoModelForCausalLM

        from bupo.internal import layer_logprobs
        from bupo.internal.sharding import outside_step

        t, args = self.trainer, self.trainer.args
        dev = t.accelerator.device
        g = torch.Generator().manual_seed(0)
        vocab = self._model().config.get_text_config().vocab_size
        ids = torch.randint(3, vocab, (2, 24), generator=g).to(dev)
        mask = torch.ones_like(ids)
        was_internal, was_training = t._bupo_internal, t.model.training
        t._bupo_internal = True
        t.model.train()
        try:
            with outside_step(t.model_wrapped):  # no backward follows: reshard after, as bupo's own such forwards
                got, _, _ = t._get_per_token_logps_and_entropies(t.model_wrapped, ids, mask, ids.size(1) - 1)
        finally:
            t._bupo_internal = was_internal
            t.model.train(was_training)
        import transformers.integrations.deepspeed as hf_ds

        saved, hf_ds._hf_deepspeed_config_weak_ref = hf_ds._hf_deepspeed_config_weak_ref, None  # a plain reference
        try:
            ref_model = AutoModelForCausalLM.from_pretrained(_arg("--model"), dtype=torch.float32).to(dev).eval()
        finally:
            hf_ds._hf_deepspeed_config_weak_ref = saved
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bool(args.bf16)):
            ref = layer_logprobs(ref_model, ids, mask, layer=args.internal_layer, projection=args.internal_projection,
                                 temperature=args.temperature)
            full = torch.log_softmax(ref_model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
                                     / args.temperature, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        del ref_model
        diff = (got.float() - ref.float()).abs()
        return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
                "ref_vs_full_mean_abs": float((ref.float() - full).abs().mean())}

    def _dump(self) -> None:
        """Written after every event, so a run killed by a timeout leaves what it measured."""
        rank = int(os.environ.get("RANK", "0"))
        path = os.path.join(self.out, f"probe-rank{rank}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(self.record, f)
        os.replace(path + ".tmp", path)

    def on_train_begin(self, args, state, control, **kw):
        upper, lower = self._groups()
        self.init = {n: _local(p) for n, p in {**upper, **lower}.items()}
        self.init_master = {n: _master(p) for n, p in self._watched().items()}
        self.record["param_type"] = type(next(iter(upper.values()))).__name__
        self.record["wrapped"] = type(self.trainer.model_wrapped).__name__
        self.record["start_step"] = state.global_step
        self.record["world_size"] = self.trainer.accelerator.num_processes
        self._dump()
        if state.global_step == 0 and args.internal_steps > 0:
            self.record["parity"] = self._parity()
        self.missed.take()  # the parity forward is no training step
        self._dump()

    def on_step_begin(self, args, state, control, **kw):
        self.lr = float(self.trainer.lr_scheduler.get_last_lr()[0])
        if args.use_vllm:  # the policy this step's rollout must be generated with
            self.step_start = model_logps(self._model())
            self.model_init = getattr(self, "model_init", self.step_start)
        if "first_full_update" not in self.record:
            self.before = {n: _master(p) for n, p in self._watched().items()}

    def on_step_end(self, args, state, control, **kw):
        upper, lower = self._groups()
        same = lambda group: {n: torch.equal(_local(p), self.init[n]) for n, p in group.items()}  # noqa: E731
        u, lo = same(upper), same(lower)
        steps = state.global_step - self.record["start_step"]
        decay = all(_within_decay(_local(p), self.init[n], steps, args.learning_rate, args.weight_decay)
                    for n, p in upper.items())
        internal = self.trainer.bupo_internal
        watched = {n: _master(p) for n, p in self._watched().items()}
        self.record["steps"][state.global_step] = {
            "internal": internal, "upper_same": all(u.values()), "lower_same": all(lo.values()),
            "upper_within_decay": decay, "n_upper": len(u), "n_lower": len(lo), "lr": self.lr,
            "watched_master_same": all(torch.equal(w, self.init_master[n]) for n, w in watched.items()),
            "missed_forward": self.missed.take(),
            "moved_layers": sorted({int(n.split(".")[n.split(".").index("layers") + 1])
                                    for n, same in {**u, **lo}.items() if not same and ".layers." in n})}
        if args.use_vllm:
            engine = engine_logps(self.trainer.vllm_generation.llm)
            self.record["steps"][state.global_step]["engine"] = {
                "max_abs_vs_step_start": float((engine - self.step_start).abs().max()),
                "max_abs_vs_init": float((engine - self.model_init).abs().max())}
        if not internal and "first_full_update" not in self.record:
            after = watched
            ratio = torch.cat([((after[n] - self.before[n]).abs() / self.lr).flatten() for n in after])
            self.record["first_full_update"] = {"step": state.global_step, "median_update_over_lr": float(ratio.median()),
                                                "n_elements": int(ratio.numel()), "params": sorted(after)}
        self._dump()

    def on_train_end(self, args, state, control, **kw):
        keys = ("loss", "reward", "bupo/phase", "bupo/accuracy", "entropy", "bupo/entropy_internal",
                "bupo/entropy_full", "bupo/layer_entropy/final")
        self.record["logs"] = [{k: h[k] for k in keys if k in h} for h in state.log_history if "bupo/phase" in h]
        self.record["global_step"] = state.global_step
        self._dump()


def _count_eval_requests(out: str) -> None:
    """Wrap the evaluation backends' ``generate`` to record, per rank, how many requests each call was given."""
    from bupo.evaluation import backends

    calls: list[int] = []
    path = os.path.join(out, f"eval-rank{os.environ.get('RANK', '0')}.json")
    for cls in (backends.HFBackend, backends.VLLMBackend):
        def counted(self, requests, *a, _generate=cls.generate, **kw):
            calls.append(len(requests))
            with open(path, "w") as f:
                json.dump({"requests": calls}, f)
            return _generate(self, requests, *a, **kw)
        cls.generate = counted


_init = trainer_mod.BuPOTrainer.__init__


def _patched_init(self, *a, **kw):
    _init(self, *a, **kw)
    self.add_callback(Probe(self, OUT))


if __name__ == "__main__":
    torch.set_num_threads(1)
    OUT = sys.argv[1]
    os.makedirs(OUT, exist_ok=True)
    trainer_mod.BuPOTrainer.__init__ = _patched_init
    _count_eval_requests(OUT)
    if os.environ.get("BUPO_PROBE_ALTERNATING_REWARD") == "1":
        import bupo.rewards

        bupo.rewards.make_reward_func = lambda name, **kw: alternating
    rc = main(sys.argv[2:])
    sys.stdout.flush()
    sys.stderr.flush()
    # leave without destructors: tearing down gloo process groups at exit can abort on torch 2.13 CPU
    os._exit(rc)
