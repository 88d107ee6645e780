"""The model card (README.md) of the bundled model, rendered from the recipe record and the GRPO proof."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def render_card(record: dict[str, Any], proof: dict[str, Any] | None = None) -> str:
    cfg = record["config"]
    ev = record["eval_heldout_t1"]
    k = ev["samples_per_problem"]
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [bupo, qwen3, tiny, arithmetic, reasoning]",
        "---",
        "",
        "# tiny_reasoner: bupo's bundled tiny reasoning model",
        "",
        "A ~{:.1f}M-parameter Qwen3 (`Qwen3ForCausalLM`, {} decoder layers) trained from scratch by the recipe"
        " in `bupo.zoo.recipe` (`bupo model build`) on bupo's synthetic arithmetic task"
        " (`bupo.data.task`). It is the default `--model` of every bupo command, so analysis, BuPO"
        " training, evaluation and the demo run offline on a laptop CPU.".format(
            record["parameters"] / 1e6, cfg["num_hidden_layers"]
        ),
        "",
        "## Architecture",
        "",
        f"- Qwen3: hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, {cfg['num_attention_heads']}"
        f" query heads / {cfg['num_key_value_heads']} KV heads, head_dim {cfg['head_dim']}, MLP"
        f" {cfg['intermediate_size']}, RoPE theta {cfg['rope_theta']:g}, RMSNorm (incl. Qwen3's q/k norms),"
        f" {record['parameters']:,} parameters.",
        "- **Tied embeddings** (`tie_word_embeddings=true`), as in Qwen3-0.6B/1.7B/4B: the unembedding E_u used"
        " by BuPO's internal policies softmax(H^l E_u^T) is the input embedding matrix.",
        "- Tokenizer: character-level fast tokenizer (`tokenizers` WordLevel over printable ASCII + newline, plus"
        " whole-word tokens for the system prompt's words and the chat roles), Qwen3 special tokens"
        " `<|endoftext|>` (pad), `<|im_start|>`, `<|im_end|>` (eos), and `<think>`/`</think>`. Other characters"
        " map to `<unk>`.",
        "- Chat template: the official Qwen3 template without tool calling; `enable_thinking=False` opens the"
        " assistant turn with an empty `<think>\\n\\n</think>\\n\\n` block (the paper's `qwen3_no_thinking`"
        " setting). With the plain generation prompt the model writes that block itself.",
        "- `generation_config.json`: temperature 1.0 sampling from the full distribution (top_p 1, no top-k),"
        f" max_new_tokens {cfg['max_new_tokens']}, stops at `<|im_end|>`.",
        "",
        "## Task and data",
        "",
        "Multi-step integer arithmetic: `Compute (23 + 7 - 4) * 3 - 9.` with the paper's system prompt"
        " (`Please reason step by step, and put your final answer within \\boxed{}.`). Solutions evaluate one"
        " operation per line and end with `\\boxed{answer}`; difficulty = number of operations (default mix"
        " 2/3/3/4); all values stay in 0..99. Train and test problems are disjoint by hash of the expression.",
        "",
        f"Example held-out completion (temperature 1.0):\n\n```\n{record.get('example_completion', '')}\n```",
        "",
        "## Recipe (how it was made)",
        "",
        f"- Seed {cfg['seed']}; {cfg['steps']} AdamW steps of batch {cfg['batch_size']} (lr {cfg['lr']:g},"
        f" {cfg['warmup_steps']} warmup steps, cosine to {cfg['min_lr_ratio']:g}x, weight decay"
        f" {cfg['weight_decay']:g}, clip {cfg['grad_clip']:g}); {record['train']['examples_seen']:,} training"
        " examples drawn from the train split (chunks of 4,096 distinct problems, one generation seed per chunk),"
        " loss on the assistant turn only;"
        f" {_pct(cfg['plain_prompt_frac'])} of the examples use the plain generation prompt, the rest"
        " `enable_thinking=False`.",
        f"- **Calibration: imperfect demonstrations.** Each solution step's result is replaced, with probability"
        f" {cfg['noise']:g}, by a nearby wrong value (off by 1, 2 or 10), and later steps carry the wrong value."
        " The model learns the procedure and also the slip rate, so temperature-1.0 samples slip now and then"
        " (pass@1 well below pass@k) while the correct answer stays the most likely one (greedy accuracy is"
        " high): room for RL. With ~3 steps per problem, at most about 0.8^3 = 51% of sampled chains are slip-free"
        " at temperature 1.0.",
        f"- Rebuild: `bupo model build --out DIR --seed {cfg['seed']} --threads {cfg['threads']}`. The recipe is"
        " deterministic: the same seed, torch version and CPU give the same weights bit for bit (the shipped"
        " weights were checked by building them twice; no randomness besides the seeded init and the seeded"
        " data stream, no dropout).",
        f"- Measured on a 2-core CPU (shared with other jobs while measured, so pessimistic): training"
        f" {record['train']['train_seconds']:.0f} s, evaluation {record['eval_seconds']:.0f} s, total"
        f" {record['total_seconds']:.0f} s; final training loss {record['train']['final_loss']:.3f}."
        f" torch {record['torch']}, transformers {record['transformers']}.",
        "",
        "## Measured accuracy (held-out)",
        "",
        f"{ev['problems']} test-split problems (`make_examples('test', {ev['problems']}, seed={cfg['eval_seed']})`),"
        f" {k} samples each at temperature 1.0, `enable_thinking=False` prompt, reward `bupo.rewards.boxed_exact`,"
        " unbiased pass@k estimator:",
        "",
        "| metric | value |",
        "|---|---|",
        f"| pass@1 (T=1.0) | {_pct(ev.get('pass@1'))} |",
        f"| pass@{k} (T=1.0) | {_pct(ev.get(f'pass@{k}'))} |",
        f"| greedy accuracy | {_pct(record.get('eval_heldout_greedy_pass@1'))} |",
        "",
    ]
    if proof:
        b, a = proof["before"], proof["after"]
        kk = b["samples_per_problem"]
        lines += [
            "## RL can improve it (GRPO proof)",
            "",
            f"`bupo model grpo-proof` (`bupo.zoo.grpo_proof`): plain TRL `GRPOTrainer` ({proof.get('trl', '')}),"
            f" reward `boxed_exact`, {proof['config']['max_steps']} steps of {proof['config']['prompts_per_step']}"
            f" prompts x {proof['config']['num_generations']} generations, lr {proof['config']['learning_rate']:g},"
            f" loss `{proof['config']['loss_type']}`, beta 0, T=1.0, train split (seed {proof['config']['seed']}).",
            f"Training took **{proof['train_seconds']:.0f} s** ({proof['steps_done']} steps, torch threads"
            f" {proof['threads']}; {proof.get('machine_note') or 'CPU'}); the evaluations before and after are"
            " not included in that time.",
            "",
            f"| held-out ({b['problems']} problems x {kk} samples, T=1.0) | before | after |",
            "|---|---|---|",
            f"| pass@1 | {_pct(b['pass@1'])} | {_pct(a['pass@1'])} |",
            f"| pass@{kk} | {_pct(b.get(f'pass@{kk}'))} | {_pct(a.get(f'pass@{kk}'))} |",
            "",
            f"pass@1 gain: **{100 * (a['pass@1'] - b['pass@1']):+.1f} points**.",
            "",
        ]
    lines += [
        "## Limits",
        "",
        "- A toy: it knows this task only (two-digit arithmetic chains). On other text it emits arithmetic-like"
        " strings; characters outside ASCII become `<unk>`.",
        "- Use it to exercise code paths (internal policies, entropy flow, BuPO/GRPO training, evaluation), not to"
        " draw conclusions about large models.",
        "",
    ]
    return "\n".join(lines)


def write_card(
    folder: str | os.PathLike, record: dict[str, Any] | None = None, proof: dict[str, Any] | None = None
) -> Path:
    """(Re)write ``folder/README.md`` atomically from ``record`` and ``proof`` (the GRPO proof result).

    Either one left out is read from the folder: ``recipe.json``, and ``grpo_proof.json`` if present.
    """
    from bupo.io import atomic_write_text

    folder = Path(folder)
    if record is None:
        record = json.loads((folder / "recipe.json").read_text(encoding="utf-8"))
    if proof is None:
        proof_file = folder / "grpo_proof.json"
        proof = json.loads(proof_file.read_text(encoding="utf-8")) if proof_file.is_file() else None
    return atomic_write_text(folder / "README.md", render_card(record, proof))
